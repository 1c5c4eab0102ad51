"""DDIM jump, sampling and inversion, checked against diffusers' schedulers step by step."""

import pytest
import torch
from diffusers import DDIMInverseScheduler, DDIMScheduler

from icd_lite.schedule import SD15_SCHEDULE
from icd_lite.solver import (ddim_jump, eps_to_x0, inversion_timesteps, invert_ddim, sample_ddim,
                             sampling_timesteps, x0_to_eps)

CONFIG = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
              timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
SHAPE = (2, 4, 8, 8)


class DummyEps:
    """A fixed eps model, nonlinear in x and t, that mixes channels and neighbouring pixels."""

    def __init__(self):
        generator = torch.Generator().manual_seed(1234)
        self.mix = torch.randn(4, 4, 3, 3, generator=generator) * 0.1
        self.calls = []

    def __call__(self, x, t):
        self.calls.append(torch.as_tensor(t).reshape(-1)[0].item())
        t = torch.as_tensor(t, dtype=x.dtype).reshape(-1, 1, 1, 1)
        mixed = torch.nn.functional.conv2d(x, self.mix.to(x.dtype), padding=1)
        return torch.tanh(0.3 * x + t / 1000) + mixed * torch.cos(t / 300)


def start_point():
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


def diffusers_loop(scheduler_class, num_steps):
    """Run diffusers' scheduler over its whole loop; return the result and the model's calls."""
    scheduler = scheduler_class(**CONFIG)
    scheduler.set_timesteps(num_steps)
    reference_model, x = DummyEps(), start_point()
    for t in scheduler.timesteps:
        x = scheduler.step(reference_model(x, t), t, x).prev_sample
    return x, reference_model


@pytest.mark.parametrize("num_steps", [10, 50])
def test_sample_ddim_matches_diffusers(num_steps):
    x, reference_model = diffusers_loop(DDIMScheduler, num_steps)
    model = DummyEps()
    ours = sample_ddim(model, start_point(), sampling_timesteps(num_steps), disable=True)
    assert model.calls == reference_model.calls  # same timesteps, same order
    assert (ours - x).abs().max().item() <= 1e-5
    assert (ours - start_point()).abs().max().item() > 0.1  # something did happen


@pytest.mark.parametrize("num_steps", [10, 50])
def test_invert_ddim_matches_diffusers(num_steps):
    x, reference_model = diffusers_loop(DDIMInverseScheduler, num_steps)
    model = DummyEps()
    ours = invert_ddim(model, start_point(), inversion_timesteps(num_steps), disable=True)
    assert model.calls == reference_model.calls
    assert model.calls[0] != 0  # the network is never queried at the clean end
    assert (ours - x).abs().max().item() <= 1e-5


def test_timestep_lists():
    assert sampling_timesteps(50)[:3] == [999, 979, 959]
    assert sampling_timesteps(50)[-3:] == [39, 19, 0]
    assert len(sampling_timesteps(50)) == 51
    assert inversion_timesteps(4) == [0, 249, 499, 749, 999]


def test_jump_to_same_time_is_identity():
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    for t in (1, 259, 999):
        torch.testing.assert_close(ddim_jump(x, eps, t, t), x)


@pytest.mark.parametrize("t, s", [(999, 19), (19, 999), (500, 1), (259, 779)])
def test_jump_round_trip(t, s):
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    there = ddim_jump(x, eps, t, s)
    assert (there - x).abs().max() > 1e-3
    torch.testing.assert_close(ddim_jump(there, eps, s, t), x)


def test_jump_keeps_the_trajectory_of_a_fixed_pair():
    # with eps the true noise of x_t = alpha_t x0 + sigma_t eps, a jump to s lands exactly on
    # alpha_s x0 + sigma_s eps
    x0, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    x_t = SD15_SCHEDULE.add_noise(x0, eps, 700)
    torch.testing.assert_close(ddim_jump(x_t, eps, 700, 300), SD15_SCHEDULE.add_noise(x0, eps, 300))


def test_jump_to_zero_is_x0_prediction():
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    torch.testing.assert_close(ddim_jump(x, eps, 519, 0), eps_to_x0(x, eps, 519))


def test_per_sample_times():
    x, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    t, s = torch.tensor([999, 259]), torch.tensor([779, 0])
    both = ddim_jump(x, eps, t, s)
    torch.testing.assert_close(both[0], ddim_jump(x[:1], eps[:1], 999, 779)[0])
    torch.testing.assert_close(both[1], ddim_jump(x[1:], eps[1:], 259, 0)[0])


def test_eps_x0_inverse():
    x_t, eps = torch.randn(SHAPE, dtype=torch.float64), torch.randn(SHAPE, dtype=torch.float64)
    x0 = eps_to_x0(x_t, eps, 333)
    torch.testing.assert_close(x0_to_eps(x_t, x0, 333), eps)
    torch.testing.assert_close(eps_to_x0(x_t, x0_to_eps(x_t, x0, 333), 333), x0)


def test_x0_to_eps_at_zero_raises():
    x = torch.randn(SHAPE)
    with pytest.raises(ValueError, match="undefined at t = 0"):
        x0_to_eps(x, x, 0)
    with pytest.raises(ValueError, match="undefined at t = 0"):
        x0_to_eps(x, x, torch.tensor([5, 0]))


@pytest.mark.parametrize("timesteps", [[0, 19, 39], [999, 999, 0], [999, 0, 19], [999], []])
def test_sample_ddim_bad_order(timesteps):
    with pytest.raises(ValueError, match="sample_ddim"):
        sample_ddim(DummyEps(), start_point(), timesteps, disable=True)


@pytest.mark.parametrize("timesteps", [[999, 979, 0], [0, 19, 19], [19, 0, 39], [0], []])
def test_invert_ddim_bad_order(timesteps):
    with pytest.raises(ValueError, match="invert_ddim"):
        invert_ddim(DummyEps(), start_point(), timesteps, disable=True)


@pytest.mark.parametrize("run, timesteps", [(sample_ddim, [999, 499, 0]),
                                            (invert_ddim, [0, 499, 999])])
def test_callback_once_per_step(run, timesteps):
    seen = []
    run(DummyEps(), start_point(), timesteps, callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == [0, 1]
    assert [(info["t"], info["s"]) for info in seen] == list(zip(timesteps[:-1], timesteps[1:]))
    assert all(set(info) == {"x", "i", "t", "s", "denoised"} for info in seen)
    assert seen[0]["x"].shape == seen[0]["denoised"].shape == SHAPE


def test_sample_ddim_extra_args_and_disable(capsys):
    def model(x, t, scale):
        return scale * x

    out = sample_ddim(model, start_point(), [999, 0], extra_args={"scale": 0.0}, disable=True)
    # eps = 0 makes the single jump a pure rescaling by alpha_0 / alpha_999
    torch.testing.assert_close(out, start_point() / SD15_SCHEDULE.alpha(999).float())
    assert "DDIM" not in capsys.readouterr().err


class DummyStudent:
    """A consistency student ``(x, t, s, cond, w_code) -> eps_hat`` built on DummyEps."""

    def __init__(self):
        self.eps = DummyEps()

    def __call__(self, x, t, s, cond, w_code):
        assert t.shape == s.shape == w_code.shape == (x.shape[0],)
        s, w_code = (v.to(x.dtype).reshape(-1, 1, 1, 1) for v in (s, w_code))
        return self.eps(x, t) * (1 + s / 2000) + 0.01 * w_code


@pytest.mark.parametrize("steps", [[(999, 779), (779, 519), (519, 259), (259, 0)],
                                   [(19, 259), (259, 519), (519, 999)]])
def test_sample_consistency_callback_hands_out_x0_hat_and_eps_hat(steps):
    from icd_lite.consistency import consistency_fn, sample_consistency
    from icd_lite.guidance import constant_guidance

    student, x_start, seen = DummyStudent(), start_point(), []
    out = sample_consistency(student, x_start, steps, None, constant_guidance(7.0),
                             callback=seen.append, disable=True)
    assert [info["i"] for info in seen] == list(range(len(steps)))
    assert all(set(info) == {"x", "i", "t", "s", "x0_hat", "eps_hat"} for info in seen)

    x_t = x_start
    for info, (t, s) in zip(seen, steps):
        assert (info["t"], info["s"]) == (t, s)
        # eps_hat is the student's own prediction at (x_t, t, s) ...
        w = torch.full((SHAPE[0],), 7.0)
        expected_eps = student(x_t, torch.full((SHAPE[0],), t), torch.full((SHAPE[0],), s), None, w)
        torch.testing.assert_close(info["eps_hat"], expected_eps)
        # ... x0_hat = (x_t - sigma_t eps_hat) / alpha_t, the clean point the jump aims through
        alpha, sigma = SD15_SCHEDULE.alpha(t).float(), SD15_SCHEDULE.sigma(t).float()
        torch.testing.assert_close(info["x0_hat"], (x_t - sigma * info["eps_hat"]) / alpha)
        # ... and x the jump's landing point, exactly f_theta(x_t, t, s) (numerics unchanged)
        assert torch.equal(info["x"], consistency_fn(student, x_t, t, s, None, 7.0))
        x_t = info["x"]
    assert torch.equal(out, seen[-1]["x"])
    if steps[-1][1] == 0:  # at s = 0 (alpha_0 = 1, sigma_0 = 0) the last jump returns x0_hat
        torch.testing.assert_close(out, seen[-1]["x0_hat"])
    else:
        assert (out - seen[-1]["x0_hat"]).abs().max() > 0.1
