r"""The noise schedule, the DDIM grid and the segment boundaries of iCD.

Stable Diffusion 1.5 trains with T = 1000 discrete timesteps and "scaled-linear" betas::

    beta_t   = (linspace(sqrt(0.00085), sqrt(0.012), T))^2
    abar_t   = prod_{i <= t} (1 - beta_i)
    alpha_t  = sqrt(abar_t),   sigma_t = sqrt(1 - abar_t)
    x_t      = alpha_t * x_0 + sigma_t * eps

Convention used everywhere in icd_lite: **t = 0 is the clean end of the trajectory**, with
alpha_0 := 1 and sigma_0 := 0 (as diffusers' DDIM with ``set_alpha_to_one=True`` and the iCD
boundary parameterization). The network is never evaluated at t = 0.

Distillation works on the 50-step DDIM grid ``ddim_t = [19, 39, ..., 999]`` (20 i - 1, the
"trailing" spacing of diffusers), and splits the trajectory into m segments:

* reverse boundaries (decoder CD_m):  [0, b_1, ..., b_{m-1}]
* forward boundaries (encoder fCD_m): [b_1, ..., b_{m-1}, 999]

Default rule (method.md section 3): interval = ceil(50 / m); the b_i are the DDIM timesteps at
indices ``arange(interval, 50, interval) - 1``. So m = 4 gives [0, 259, 519, 779] / [259, 519, 779,
999].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
DDIM_STEPS = 50


class NoiseSchedule:
    """alpha_t and sigma_t of a discrete variance-preserving schedule (SD1.5's by default)."""

    def __init__(self, beta_start: float = 0.00085, beta_end: float = 0.012,
                 num_train_timesteps: int = NUM_TRAIN_TIMESTEPS):
        if not 0 < beta_start < beta_end < 1:
            raise ValueError(f"need 0 < beta_start < beta_end < 1, got {beta_start}, {beta_end}")
        self.num_train_timesteps = num_train_timesteps
        # "scaled_linear": linear in sqrt(beta), as in Stable Diffusion. Computed in float32
        # exactly as diffusers does, so that our solver and diffusers' schedulers agree to 1e-6.
        # The tables stay on the CPU: alpha(t) / sigma(t) look them up there and callers move
        # the values to their tensors' device (``broadcast_to``), the same numbers everywhere.
        betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps,
                               dtype=torch.float32, device="cpu") ** 2
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # abar_t
        alpha = self.alphas_cumprod.sqrt().double()
        sigma = (1.0 - self.alphas_cumprod).sqrt().double()
        alpha[0], sigma[0] = 1.0, 0.0  # t = 0 is the clean end (see module docstring)
        self._alpha, self._sigma = alpha, sigma

    def _check(self, t: torch.Tensor) -> torch.Tensor:
        t = torch.as_tensor(t)
        if t.is_floating_point():
            if not torch.equal(t, t.round()):
                raise ValueError("timesteps must be whole numbers (0 ... T-1)")
            t = t.long()
        if t.numel() and (t.min() < 0 or t.max() >= self.num_train_timesteps):
            raise ValueError(f"timesteps must lie in [0, {self.num_train_timesteps - 1}], "
                             f"got values from {int(t.min())} to {int(t.max())}")
        return t

    def alpha(self, t) -> torch.Tensor:
        """alpha_t = sqrt(abar_t), float64, same shape as t (alpha_0 = 1)."""
        return self._alpha[self._check(t).cpu()]

    def sigma(self, t) -> torch.Tensor:
        """sigma_t = sqrt(1 - abar_t), float64, same shape as t (sigma_0 = 0)."""
        return self._sigma[self._check(t).cpu()]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        """x_t = alpha_t x_0 + sigma_t eps; t is an int or one timestep per sample."""
        a, s = (broadcast_to(v, x0) for v in (self.alpha(t), self.sigma(t)))
        return a * x0 + s * eps


SD15_SCHEDULE = NoiseSchedule()


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar or per-sample vector into a tensor that broadcasts against x [B, ...]."""
    values = torch.as_tensor(values).to(device=x.device, dtype=x.dtype)
    if values.ndim == 0:
        return values
    if values.shape[0] != x.shape[0]:
        raise ValueError(f"got {values.shape[0]} per-sample values for a batch of {x.shape[0]}")
    return values.reshape(-1, *([1] * (x.ndim - 1)))


def ddim_timesteps(num_steps: int = DDIM_STEPS,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    """The ascending DDIM grid with trailing spacing: [19, 39, ..., 999] for 50 steps."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], "
                         f"got {num_steps!r}")
    ratio = num_train_timesteps / num_steps
    return [round(ratio * (i + 1)) - 1 for i in range(num_steps)]


@dataclass(frozen=True)
class Boundaries:
    """Segment boundaries of an iCD pair: ``reverse`` for CD_m, ``forward`` for fCD_m.

    The m segments are [reverse[j], forward[j]]; the two lists must share their inner points.
    """

    reverse: tuple[int, ...]
    forward: tuple[int, ...]

    def __post_init__(self):
        rev, fwd = tuple(int(e) for e in self.reverse), tuple(int(e) for e in self.forward)
        object.__setattr__(self, "reverse", rev)
        object.__setattr__(self, "forward", fwd)
        fix = "pass e.g. Boundaries(reverse=[0, 339, 699], forward=[339, 699, 999])"
        if len(rev) == 0 or len(rev) != len(fwd):
            raise ValueError(f"reverse and forward boundaries must have the same length m >= 1, "
                             f"got {list(rev)} and {list(fwd)}; {fix}")
        if rev[0] != 0 or fwd[-1] != NUM_TRAIN_TIMESTEPS - 1:
            raise ValueError(f"reverse boundaries must start at 0 and forward ones end at "
                             f"{NUM_TRAIN_TIMESTEPS - 1}, got {list(rev)} / {list(fwd)}; {fix}")
        if any(b <= a for a, b in zip(rev, rev[1:] + (fwd[-1],))):
            raise ValueError(f"boundaries must be strictly increasing, got {list(rev)}; {fix}")
        if rev[1:] != fwd[:-1]:
            raise ValueError(f"mismatched boundaries: the inner points of reverse {list(rev)} and "
                             f"forward {list(fwd)} differ; {fix}")

    @property
    def m(self) -> int:
        """Number of segments (= number of student steps)."""
        return len(self.reverse)

    def reverse_target(self, t: torch.Tensor) -> torch.Tensor:
        """s = max{e in reverse : e <= t}: where CD_m maps a point at time t."""
        edges = torch.tensor(self.reverse, device=torch.as_tensor(t).device)
        index = torch.searchsorted(edges, torch.as_tensor(t), right=True) - 1
        return edges[index]

    def forward_target(self, t: torch.Tensor) -> torch.Tensor:
        """s = min{e in forward : e >= t}: where fCD_m maps a point at time t."""
        edges = torch.tensor(self.forward, device=torch.as_tensor(t).device)
        index = torch.searchsorted(edges, torch.as_tensor(t), right=False)
        return edges[index.clamp(max=len(edges) - 1)]

    def decoding_steps(self) -> list[tuple[int, int]]:
        """(t, s) pairs of multistep decoding: (999, b_{m-1}), ..., (b_1, 0)."""
        times = [self.forward[-1]] + list(reversed(self.reverse))
        return list(zip(times[:-1], times[1:]))

    def encoding_steps(self, start: int = 19) -> list[tuple[int, int]]:
        """(t, s) pairs of multistep encoding: (19, b_1), ..., (b_{m-1}, 999)."""
        if not 0 < start < self.forward[0]:
            raise ValueError(f"encoding must start between 0 and {self.forward[0]}, got {start}")
        times = [start] + list(self.forward)
        return list(zip(times[:-1], times[1:]))


def default_boundaries(m: int, num_ddim_steps: int = DDIM_STEPS) -> Boundaries:
    """Boundaries for m segments by the rule of the authors' code (method.md section 3)."""
    if not isinstance(m, int) or not 1 <= m <= num_ddim_steps:
        raise ValueError(f"m (the number of segments) must be an integer in [1, {num_ddim_steps}] "
                         f"(the DDIM grid size), got {m!r}")
    grid = ddim_timesteps(num_ddim_steps)
    interval = math.ceil(num_ddim_steps / m)
    inner = [grid[i - 1] for i in range(interval, num_ddim_steps, interval)]
    if len(inner) != m - 1:
        raise ValueError(f"the default rule gives {len(inner) + 1} segments for m = {m} on a "
                         f"{num_ddim_steps}-step grid; pass explicit Boundaries instead")
    return Boundaries(reverse=[0] + inner, forward=inner + [grid[-1]])
