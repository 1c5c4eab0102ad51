r"""The noise schedule, the DDIM grid and the segment boundaries of iCD.

**Noise schedule.** Stable Diffusion 1.5 trains with $T = 1000$ discrete timesteps and
"scaled-linear" betas (linear in $\sqrt\beta$, from $\beta_{\min} = 0.00085$ to
$\beta_{\max} = 0.012$):

$$\beta_t = \Big(\sqrt{\beta_{\min}} + \tfrac{t}{T - 1}\big(\sqrt{\beta_{\max}}
            - \sqrt{\beta_{\min}}\big)\Big)^2, \qquad
  \bar\alpha_t = \prod_{i \le t} (1 - \beta_i),$$

$$\alpha_t = \sqrt{\bar\alpha_t}, \qquad \sigma_t = \sqrt{1 - \bar\alpha_t}, \qquad
  x_t = \alpha_t x_0 + \sigma_t \epsilon, \quad \epsilon \sim \mathcal N(0, I).$$

Notation trap: $\alpha_t$ here is the *signal scale* $\sqrt{\bar\alpha_t}$ (the DDIM and iCD
papers' symbol), not DDPM's per-step $1 - \beta_t$. Since $\alpha_t^2 + \sigma_t^2 = 1$ the
process is variance preserving.

Convention used everywhere in icd_lite: **t = 0 is the clean end of the trajectory**, with
$\alpha_0 := 1$ and $\sigma_0 := 0$ (as diffusers' DDIM with ``set_alpha_to_one=True`` and the
iCD boundary parameterization). The network is never evaluated at t = 0.

**The DDIM grid.** Distillation works on the $N = 50$-step grid with the "trailing" spacing of
diffusers,

$$t_i = \mathrm{round}\!\left(\tfrac{i\,T}{N}\right) - 1, \quad i = 1, \dots, N
  \qquad (\,[19, 39, \dots, 999]\ \text{for}\ N = 50\,),$$

one grid step being $k = T / N = 20$ timesteps.

**Segment boundaries.** iCD splits the trajectory into m segments
$[b_0, b_1], [b_1, b_2], \dots, [b_{m-1}, b_m]$ with $b_0 = 0$ and $b_m = 999$:

* reverse boundaries (decoder CD_m):  $[b_0, \dots, b_{m-1}] = [0, b_1, \dots, b_{m-1}]$; a point at
  time t is mapped to its segment's lower end $s = \max\{b_i \le t\}$ (``reverse_target``);
* forward boundaries (encoder fCD_m): $[b_1, \dots, b_m] = [b_1, \dots, b_{m-1}, 999]$; a point at
  time t is mapped to its segment's upper end $s = \min\{b_i \ge t\}$ (``forward_target``).

Default rule (method.md section 3, the authors' code): with $k = \lceil N / m \rceil$, the inner
boundaries are the grid points $b_j = t_{j k}$ for $j = 1, \dots, m - 1$ (``ddim_t`` indices
``arange(k, N, k) - 1``). So m = 4 gives [0, 259, 519, 779] / [259, 519, 779, 999].
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

NUM_TRAIN_TIMESTEPS = 1000
DDIM_STEPS = 50


class NoiseSchedule:
    r"""$\alpha_t$ and $\sigma_t$ of a discrete variance-preserving schedule (SD1.5's by default).

    ``alpha(t)``, ``sigma(t)`` look up float64 tables of length T; ``add_noise`` makes $x_t$.
    """

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
                               dtype=torch.float32, device="cpu") ** 2   # beta_t, [T]
        self.betas = betas
        self.alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)  # abar_t = prod(1 - beta), [T]
        alpha = self.alphas_cumprod.sqrt().double()              # alpha_t = sqrt(abar_t), [T]
        sigma = (1.0 - self.alphas_cumprod).sqrt().double()      # sigma_t = sqrt(1 - abar_t), [T]
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
        r"""$\alpha_t = \sqrt{\bar\alpha_t}$, float64, same shape as t ($\alpha_0 = 1$)."""
        return self._alpha[self._check(t).cpu()]

    def sigma(self, t) -> torch.Tensor:
        r"""$\sigma_t = \sqrt{1 - \bar\alpha_t}$, float64, same shape as t ($\sigma_0 = 0$)."""
        return self._sigma[self._check(t).cpu()]

    def add_noise(self, x0: torch.Tensor, eps: torch.Tensor, t) -> torch.Tensor:
        r"""$x_t = \alpha_t x_0 + \sigma_t \epsilon$; x0, eps [B, ...]; t an int or [B]."""
        a, s = (broadcast_to(v, x0) for v in (self.alpha(t), self.sigma(t)))  # [] or [B, 1, ...]
        return a * x0 + s * eps                                                # x_t, [B, ...]


SD15_SCHEDULE = NoiseSchedule()


def broadcast_to(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Turn a scalar or per-sample vector into a tensor that broadcasts against x [B, ...]."""
    values = torch.as_tensor(values).to(device=x.device, dtype=x.dtype)  # [] or [B]
    if values.ndim == 0:
        return values
    if values.shape[0] != x.shape[0]:
        raise ValueError(f"got {values.shape[0]} per-sample values for a batch of {x.shape[0]}")
    return values.reshape(-1, *([1] * (x.ndim - 1)))  # [B, 1, ..., 1], as many dims as x


def ddim_timesteps(num_steps: int = DDIM_STEPS,
                   num_train_timesteps: int = NUM_TRAIN_TIMESTEPS) -> list[int]:
    r"""The ascending DDIM grid $t_i = \mathrm{round}(iT/N) - 1$: [19, 39, ..., 999] for N = 50."""
    if not isinstance(num_steps, int) or not 1 <= num_steps <= num_train_timesteps:
        raise ValueError(f"num_steps must be an integer in [1, {num_train_timesteps}], "
                         f"got {num_steps!r}")
    ratio = num_train_timesteps / num_steps
    return [round(ratio * (i + 1)) - 1 for i in range(num_steps)]


@dataclass(frozen=True)
class Boundaries:
    r"""Segment boundaries of an iCD pair: ``reverse`` for CD_m, ``forward`` for fCD_m.

    The m segments are [reverse[j], forward[j]] $= [b_j, b_{j+1}]$; the two lists must share
    their inner points $b_1, \dots, b_{m-1}$.
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
        r"""$s = \max\{b_i \in \text{reverse} : b_i \le t\}$: the lower end of t's segment.

        t is an int or a tensor of timesteps; s has t's shape (a boundary maps to itself). The
        losses apply it to $t' = t - k$ (one grid step below t), so a student at grid time t is
        trained to jump to the next boundary *strictly* below t, as decoding does
        (``decoding_steps``: 259 -> 0).
        """
        edges = torch.tensor(self.reverse, device=torch.as_tensor(t).device)  # [m]
        index = torch.searchsorted(edges, torch.as_tensor(t), right=True) - 1  # t's shape
        return edges[index]

    def forward_target(self, t: torch.Tensor) -> torch.Tensor:
        r"""$s = \min\{b_i \in \text{forward} : b_i \ge t\}$: the upper end of t's segment.

        t is an int or a tensor of timesteps; s has t's shape (a boundary maps to itself). The
        losses apply it to $t' = t + k$, so the encoder jumps to the next boundary strictly
        above t, as encoding does (``encoding_steps``: 259 -> 519).
        """
        edges = torch.tensor(self.forward, device=torch.as_tensor(t).device)  # [m]
        index = torch.searchsorted(edges, torch.as_tensor(t), right=False)    # t's shape
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
    r"""Boundaries for m segments by the rule of the authors' code (method.md section 3).

    $k = \lceil N / m \rceil$ and $b_j = t_{jk}$ for $j = 1, \dots, m - 1$ on the N-step DDIM grid.
    """
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
