"""The exact 2D teacher: its eps is -sigma_t grad log p_t, and DDIM on it is the exact PF-ODE."""

import pytest
import torch

from icd_lite.solver import inversion_timesteps, invert_ddim, sample_ddim, sampling_timesteps
from icd_lite.toy2d import NULL_LABEL, default_world


def finite_difference_eps(world, x, t, labels, h=1e-5):
    """-sigma_t * grad_x log p_t(x | c) by central differences, one coordinate at a time."""
    grad = torch.zeros_like(x)
    for k in range(2):
        step = torch.zeros_like(x)
        step[:, k] = h
        up, down = world.log_prob(x + step, t, labels), world.log_prob(x - step, t, labels)
        grad[:, k] = (up - down) / (2 * h)
    return -world.schedule.sigma(t).item() * grad


@pytest.mark.parametrize("t", [50, 300, 900])
@pytest.mark.parametrize("label", [0, 1, 2, NULL_LABEL])
def test_exact_eps_is_scaled_score(t, label):
    world = default_world()
    generator = torch.Generator().manual_seed(t)
    x0, _ = world.sample(64, generator=generator)
    x = world.schedule.add_noise(x0, torch.randn(x0.shape, generator=generator,
                                                 dtype=torch.float64), t)
    labels = torch.full((64,), label)
    eps = world.eps(x, t, labels)
    assert eps.dtype == torch.float64
    torch.testing.assert_close(eps, finite_difference_eps(world, x, t, labels),
                               rtol=0, atol=1e-6)


def test_eps_mixed_labels_and_times():
    world = default_world()
    x = torch.randn(4, 2, dtype=torch.float64)
    labels, t = torch.tensor([0, 1, 2, NULL_LABEL]), torch.tensor([10, 200, 600, 999])
    eps = world(x, t, labels)
    for i in range(4):
        torch.testing.assert_close(eps[i], world.eps(x[i:i + 1], int(t[i]), labels[i:i + 1])[0])
    # the condition matters: class 0 and class 1 pull the same point to different modes
    assert (world.eps(x, 200, 0) - world.eps(x, 200, 1)).abs().max() > 0.1


def test_eps_keeps_dtype():
    world = default_world()
    assert world.eps(torch.zeros(3, 2), 500, NULL_LABEL).dtype == torch.float32


def test_eps_at_zero_raises():
    world = default_world()
    with pytest.raises(ValueError, match="undefined at t = 0"):
        world.eps(torch.zeros(2, 2), 0, 0)
    with pytest.raises(ValueError, match="undefined at t = 0"):
        world.eps(torch.zeros(2, 2), torch.tensor([5, 0]), 0)


@pytest.mark.parametrize("label", [3, 7, -2])
def test_bad_labels_raise(label):
    world = default_world()
    message = r"labels must be -1 \(unconditional\) or a class in \[0, 2\]"
    with pytest.raises(ValueError, match=message):
        world.eps(torch.zeros(2, 2), 500, label)
    with pytest.raises(ValueError, match="labels must be"):
        world.log_prob(torch.zeros(2, 2), 500, label)
    with pytest.raises(ValueError, match="labels must be"):
        world.sample(5, labels=label)


@pytest.mark.parametrize("label", [0, 1, 2])
def test_conditional_sample_stays_in_its_class(label):
    world = default_world()
    x0, labels = world.sample(500, labels=label, generator=torch.Generator().manual_seed(1))
    assert x0.shape == (500, 2) and x0.dtype == torch.float64
    assert labels.tolist() == [label] * 500
    # each point is near (within 6 std) one of the three means of its class
    means = world.means[world.classes == label]
    distance = torch.cdist(x0, means).min(dim=1).values
    assert distance.max() < 6 * 0.25
    # and far from every mean of the other classes
    other = torch.cdist(x0, world.means[world.classes != label]).min(dim=1).values
    assert other.min() > distance.max() - 0.5


def test_sample_prior_covers_all_classes_and_is_deterministic():
    world = default_world()
    x_a, c_a = world.sample(900, generator=torch.Generator().manual_seed(3))
    x_b, c_b = world.sample(900, generator=torch.Generator().manual_seed(3))
    x_c, _ = world.sample(900, generator=torch.Generator().manual_seed(4))
    assert torch.equal(x_a, x_b) and torch.equal(c_a, c_b)
    assert not torch.equal(x_a, x_c)
    counts = torch.bincount(c_a, minlength=3)
    assert counts.min() > 250  # 3 classes x 3 equal-weight components each
    torch.testing.assert_close(x_a.mean(0), torch.zeros(2, dtype=torch.float64), rtol=0, atol=0.15)


def test_sample_with_null_label_draws_from_the_prior():
    world = default_world()
    x0, labels = world.sample(300, labels=NULL_LABEL, generator=torch.Generator().manual_seed(0))
    assert x0.shape == (300, 2)
    assert set(labels.tolist()) == {0, 1, 2}


def test_ddim_inversion_of_exact_teacher_gives_gaussian_latents():
    world = default_world()
    x0, labels = world.sample(2000, generator=torch.Generator().manual_seed(0))
    latents = invert_ddim(lambda x, t: world.eps(x, t, labels), x0, inversion_timesteps(200),
                          disable=True)
    torch.testing.assert_close(latents.mean(0), torch.zeros(2, dtype=torch.float64),
                               rtol=0, atol=0.1)
    torch.testing.assert_close(latents.std(0), torch.ones(2, dtype=torch.float64),
                               rtol=0, atol=0.1)


def test_ddim_inversion_then_sampling_reconstructs():
    world = default_world()
    x0, labels = world.sample(500, generator=torch.Generator().manual_seed(1))

    def model(x, t):
        return world.eps(x, t, labels)

    latents = invert_ddim(model, x0, inversion_timesteps(100), disable=True)
    reconstruction = sample_ddim(model, latents, sampling_timesteps(100), disable=True)
    mse = torch.mean((reconstruction - x0) ** 2).item()
    assert mse < 1e-2
    assert torch.mean((latents - x0) ** 2).item() > 0.3  # the latents are not the data


def test_default_world_radius_scales_the_ring_only():
    # the default is the world every notebook and test uses; radius widens the ring of modes
    base, wide = default_world(), default_world(radius=4.0)
    ring = torch.full((8,), 2.0, dtype=torch.float64)
    torch.testing.assert_close(base.means[:8].norm(dim=1), ring)
    torch.testing.assert_close(wide.means, 2.0 * base.means)
    assert torch.equal(wide.stds, base.stds) and torch.equal(wide.classes, base.classes)
    for bad in (0.0, -1.0, float("nan"), float("inf"), "2"):
        with pytest.raises(ValueError, match="radius"):
            default_world(radius=bad)
