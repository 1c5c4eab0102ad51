"""The SD1.5 noise schedule, the trailing DDIM grid and the iCD segment boundaries."""

import pytest
import torch
from diffusers import DDIMScheduler

from icd_lite.schedule import SD15_SCHEDULE, Boundaries, ddim_timesteps, default_boundaries

SD15 = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_alphas_cumprod_match_diffusers():
    reference = DDIMScheduler(**SD15).alphas_cumprod
    assert reference.dtype == SD15_SCHEDULE.alphas_cumprod.dtype
    torch.testing.assert_close(SD15_SCHEDULE.alphas_cumprod, reference, rtol=0, atol=0)


def test_alpha_sigma_values():
    t = torch.arange(1, 1000)
    abar = SD15_SCHEDULE.alphas_cumprod.double()[1:]
    assert SD15_SCHEDULE.alpha(0).item() == 1.0
    assert SD15_SCHEDULE.sigma(0).item() == 0.0
    torch.testing.assert_close(SD15_SCHEDULE.alpha(t) ** 2, abar, rtol=0, atol=1e-6)
    torch.testing.assert_close(SD15_SCHEDULE.alpha(t) ** 2 + SD15_SCHEDULE.sigma(t) ** 2,
                               torch.ones(999, dtype=torch.float64), rtol=0, atol=1e-6)
    alpha = SD15_SCHEDULE.alpha(t)
    assert torch.all(alpha[1:] < alpha[:-1])  # strictly more noise as t grows
    assert SD15_SCHEDULE.alpha(999).item() == pytest.approx(0.0683, abs=1e-3)


def test_alpha_accepts_whole_floats_and_batches():
    assert SD15_SCHEDULE.alpha(500.0).item() == SD15_SCHEDULE.alpha(500).item()
    assert SD15_SCHEDULE.sigma(torch.tensor([[1, 2], [3, 4]])).shape == (2, 2)


def test_add_noise_per_sample():
    x0, eps = torch.ones(2, 3, dtype=torch.float64), torch.full((2, 3), 2.0, dtype=torch.float64)
    x = SD15_SCHEDULE.add_noise(x0, eps, torch.tensor([0, 999]))
    torch.testing.assert_close(x[0], x0[0])
    a, s = SD15_SCHEDULE.alpha(999), SD15_SCHEDULE.sigma(999)
    torch.testing.assert_close(x[1], (a + 2 * s).expand(3))


@pytest.mark.parametrize("t", [-1, 1000, [5, 1000]])
def test_timesteps_out_of_range_raise(t):
    with pytest.raises(ValueError, match=r"timesteps must lie in \[0, 999\]"):
        SD15_SCHEDULE.alpha(torch.tensor(t))


@pytest.mark.parametrize("t", [2.5, torch.tensor([1.0, 1.5])])
def test_fractional_timesteps_raise(t):
    with pytest.raises(ValueError, match="whole numbers"):
        SD15_SCHEDULE.alpha(t)
    with pytest.raises(ValueError, match="whole numbers"):
        SD15_SCHEDULE.sigma(t)


def test_ddim_grid_50():
    assert ddim_timesteps(50) == [20 * i - 1 for i in range(1, 51)]
    assert ddim_timesteps() == ddim_timesteps(50)


@pytest.mark.parametrize("num_steps", [1, 4, 10, 20, 25, 50, 100])
def test_ddim_grid_matches_diffusers_trailing(num_steps):
    scheduler = DDIMScheduler(**SD15, timestep_spacing="trailing")
    scheduler.set_timesteps(num_steps)
    assert ddim_timesteps(num_steps) == scheduler.timesteps.tolist()[::-1]


@pytest.mark.parametrize("num_steps", [0, -3, 1001, 50.0, "50"])
def test_ddim_grid_bad_steps(num_steps):
    with pytest.raises(ValueError, match="num_steps must be an integer"):
        ddim_timesteps(num_steps)


@pytest.mark.parametrize("m, reverse, forward", [
    (1, [0], [999]),
    (2, [0, 499], [499, 999]),
    (3, [0, 339, 679], [339, 679, 999]),
    (4, [0, 259, 519, 779], [259, 519, 779, 999]),
])
def test_default_boundaries(m, reverse, forward):
    boundaries = default_boundaries(m)
    assert boundaries.reverse == tuple(reverse)
    assert boundaries.forward == tuple(forward)
    assert boundaries.m == m


@pytest.mark.parametrize("reverse, forward", [
    ([0, 339, 699], [339, 699, 999]),             # released 3-step
    ([0, 249, 499, 699], [249, 499, 699, 999]),   # released 4-step-v2
])
def test_explicit_boundaries_accepted(reverse, forward):
    boundaries = Boundaries(reverse=reverse, forward=forward)
    assert boundaries.reverse == tuple(reverse) and boundaries.forward == tuple(forward)
    assert boundaries.m == len(reverse)


@pytest.mark.parametrize("m", [0, -1, 51, 2.0, "4", None])
def test_default_boundaries_bad_m(m):
    with pytest.raises(ValueError, match=r"m \(the number of segments\) must be an integer"):
        default_boundaries(m)


def test_default_boundaries_rule_not_applicable():
    # ceil(50 / 11) = 5 gives 10 segments, not 11: the rule says so instead of lying
    with pytest.raises(ValueError, match="pass explicit Boundaries"):
        default_boundaries(11)


@pytest.mark.parametrize("reverse, forward, message", [
    ([0, 339, 699], [339, 700, 999], "inner points"),
    ([0, 339, 699], [339, 999], "same length"),
    ([], [], "same length"),
    ([19, 339, 699], [339, 699, 999], "must start at 0"),
    ([0, 339, 699], [339, 699, 998], "must start at 0 and forward ones end at 999"),
    ([0, 699, 339], [699, 339, 999], "strictly increasing"),
    ([0, 339, 339], [339, 339, 999], "strictly increasing"),
    ([0, 999], [999, 999], "strictly increasing"),
])
def test_bad_boundaries(reverse, forward, message):
    with pytest.raises(ValueError, match=message):
        Boundaries(reverse=reverse, forward=forward)


@pytest.mark.parametrize("t, s", [(999, 779), (780, 779), (779, 779), (778, 519), (519, 519),
                                  (260, 259), (259, 259), (258, 0), (19, 0), (0, 0)])
def test_reverse_target(t, s):
    assert default_boundaries(4).reverse_target(torch.tensor(t)).item() == s


@pytest.mark.parametrize("t, s", [(0, 259), (19, 259), (259, 259), (260, 519), (519, 519),
                                  (520, 779), (779, 779), (780, 999), (999, 999)])
def test_forward_target(t, s):
    assert default_boundaries(4).forward_target(torch.tensor(t)).item() == s


def test_targets_vectorized():
    boundaries = default_boundaries(4)
    t = torch.tensor([999, 258, 259, 520])
    assert boundaries.reverse_target(t).tolist() == [779, 0, 259, 519]
    assert boundaries.forward_target(t).tolist() == [999, 259, 259, 779]


def test_decoding_and_encoding_steps_m4():
    boundaries = default_boundaries(4)
    assert boundaries.decoding_steps() == [(999, 779), (779, 519), (519, 259), (259, 0)]
    assert boundaries.encoding_steps() == [(19, 259), (259, 519), (519, 779), (779, 999)]
    assert default_boundaries(1).decoding_steps() == [(999, 0)]


@pytest.mark.parametrize("start", [0, 259, 300])
def test_encoding_start_out_of_first_segment(start):
    with pytest.raises(ValueError, match="encoding must start between 0 and 259"):
        default_boundaries(4).encoding_steps(start)
