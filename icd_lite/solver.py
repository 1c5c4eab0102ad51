r"""The deterministic DDIM solver (Song et al., 2021, eta = 0), in both directions.

Everything is built on one move, the DDIM *jump* from time t to any time s:

.. math::

    \hat x_0 = \frac{x_t - \sigma_t \hat\epsilon}{\alpha_t}
    \qquad\text{(predicted clean point)}, \qquad
    x_s = \alpha_s \hat x_0 + \sigma_s \hat\epsilon \qquad\text{(re-noised to level } s)

s < t denoises (sampling), s > t inverts (encoding). With s = 0 (alpha_0 = 1, sigma_0 = 0) the
jump returns x0_hat. The same jump is iCD's boundary parameterization (paper eq. 3),
:math:`f_\theta(x_t,t,s)=\alpha_s\frac{x_t-\sigma_t\hat\epsilon}{\alpha_t}+\sigma_s\hat\epsilon`:
a consistency model is an epsilon network followed by one jump to its segment boundary
(``consistency.py``).

DDIM inversion runs the same jump upwards, t -> s > t. The eps it needs is the one at the
*unknown* end of the step, so it is approximated (Mokady et al. 2023; diffusers'
``DDIMInverseScheduler``) by evaluating the network at the target time on the current point:

.. math::

    x_s = \alpha_s \frac{x_t - \sigma_t\,\epsilon(x_t, s, c)}{\alpha_t}
          + \sigma_s\,\epsilon(x_t, s, c), \qquad s > t

**Two discretisations of inversion** (a trap): ``invert_ddim`` evaluates eps at the *target*
time s, as above, and never at t = 0. The forward-CD teacher step that fCD_m is distilled from
(``losses.forward_cd_loss``, the authors' ``forward_train_step``) evaluates it at the *current*
time t, :math:`\epsilon(x_t, t, c)`. Both approximate the same ODE to first order; the student
encoder and the DDIM50 inversion baseline therefore follow slightly different discrete paths.

The loops follow k-diffusion's shape: ``sample_x(model, x, timesteps, extra_args=None,
callback=None, disable=None)`` where ``model(x, t, **extra_args)`` returns epsilon, ``callback``
receives ``{'x', 'i', 't', 's', 'denoised'}`` after each step, and ``disable`` switches off tqdm.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .schedule import SD15_SCHEDULE, NoiseSchedule, broadcast_to, ddim_timesteps

EpsModel = Callable[..., torch.Tensor]


def eps_to_x0(x_t: torch.Tensor, eps: torch.Tensor, t, schedule: NoiseSchedule = SD15_SCHEDULE):
    r"""x0_hat = (x_t - sigma_t eps) / alpha_t: :math:`\hat x_0=(x_t-\sigma_t\epsilon)/\alpha_t`."""
    alpha, sigma = (broadcast_to(v, x_t) for v in (schedule.alpha(t), schedule.sigma(t)))
    # alpha, sigma: [B, 1, 1, 1] (or scalars), broadcast over x_t's [B, C, H, W]
    return (x_t - sigma * eps) / alpha  # [B, C, H, W]


def x0_to_eps(x_t: torch.Tensor, x0: torch.Tensor, t, schedule: NoiseSchedule = SD15_SCHEDULE):
    """eps = (x_t - alpha_t x0) / sigma_t (undefined at the clean end t = 0)."""
    if torch.as_tensor(t).eq(0).any():
        raise ValueError("eps is undefined at t = 0, where x_t = x_0")
    alpha, sigma = (broadcast_to(v, x_t) for v in (schedule.alpha(t), schedule.sigma(t)))
    return (x_t - alpha * x0) / sigma


def ddim_jump(x_t: torch.Tensor, eps: torch.Tensor, t, s,
              schedule: NoiseSchedule = SD15_SCHEDULE) -> torch.Tensor:
    r"""One DDIM move from time t to time s along the predicted noise eps (either direction).

    .. math:: x_s = \alpha_s \frac{x_t - \sigma_t \epsilon}{\alpha_t} + \sigma_s \epsilon

    t and s are ints or one timestep per sample; s = t returns x_t unchanged.
    """
    x0_hat = eps_to_x0(x_t, eps, t, schedule)  # [B, C, H, W]
    alpha_s, sigma_s = (broadcast_to(v, x_t) for v in (schedule.alpha(s), schedule.sigma(s)))
    return alpha_s * x0_hat + sigma_s * eps     # [B, C, H, W], the point at time s


def timestep_batch(t: int, x: torch.Tensor) -> torch.Tensor:
    """The integer timestep t as a [B] tensor for the network."""
    return torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)


def _check_direction(timesteps: Sequence[int], descending: bool, name: str):
    steps = list(timesteps)
    if len(steps) < 2:
        raise ValueError(f"{name} needs at least two timesteps (start and end), got {steps}")
    pairs = zip(steps[:-1], steps[1:])
    if any((b >= a) if descending else (b <= a) for a, b in pairs):
        order = "strictly decreasing, e.g. [999, 979, ..., 19, 0]" if descending \
            else "strictly increasing, e.g. [0, 19, 39, ..., 999]"
        raise ValueError(f"{name}: timesteps must be {order}, got {steps[:4]}...")
    return steps


@torch.no_grad()
def sample_ddim(model: EpsModel, x: torch.Tensor, timesteps: Sequence[int],
                schedule: NoiseSchedule = SD15_SCHEDULE, extra_args=None, callback=None,
                disable=None) -> torch.Tensor:
    """Implements deterministic DDIM sampling (Song et al. 2021, eq. 12 with eta = 0).

    ``timesteps`` is decreasing and ends at the target time, e.g. ``[999, 979, ..., 19, 0]``
    for 50 steps; the model is evaluated at every timestep but the last.
    """
    steps = _check_direction(timesteps, descending=True, name="sample_ddim")
    extra_args = extra_args or {}
    for i, (t, s) in enumerate(tqdm(list(zip(steps[:-1], steps[1:])), disable=disable,
                                    desc="DDIM")):
        eps = model(x, timestep_batch(t, x), **extra_args)  # eps(x_t, t): [B, C, H, W]
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "s": s, "denoised": eps_to_x0(x, eps, t, schedule)})
        x = ddim_jump(x, eps, t, s, schedule)
    return x


@torch.no_grad()
def invert_ddim(model: EpsModel, x: torch.Tensor, timesteps: Sequence[int],
                schedule: NoiseSchedule = SD15_SCHEDULE, extra_args=None, callback=None,
                disable=None) -> torch.Tensor:
    r"""Implements DDIM inversion: the DDIM ODE step run from data to noise.

    ``timesteps`` is increasing and starts at the data's time, e.g. ``[0, 19, 39, ..., 999]``.
    As in diffusers' ``DDIMInverseScheduler`` and null-text inversion, the step t -> s uses
    eps evaluated at the *target* time s on the current point (the usual approximation
    x_t ~ x_s), so the model is queried at the same times as in sampling and never at t = 0:

    .. math::
        x_s = \alpha_s \frac{x_t - \sigma_t\epsilon(x_t, s)}{\alpha_t} + \sigma_s\epsilon(x_t, s)

    Not the forward-CD teacher step (``losses.forward_cd_loss``, the authors'
    ``forward_train_step``), which evaluates eps at the *current* time t.
    """
    steps = _check_direction(timesteps, descending=False, name="invert_ddim")
    extra_args = extra_args or {}
    for i, (t, s) in enumerate(tqdm(list(zip(steps[:-1], steps[1:])), disable=disable,
                                    desc="DDIM inversion")):
        eps = model(x, timestep_batch(s, x), **extra_args)  # eps(x_t, s): [B, C, H, W]
        if callback is not None:
            callback({"x": x, "i": i, "t": t, "s": s, "denoised": eps_to_x0(x, eps, t, schedule)})
        x = ddim_jump(x, eps, t, s, schedule)
    return x


def sampling_timesteps(num_steps: int, schedule: NoiseSchedule = SD15_SCHEDULE) -> list[int]:
    """Decreasing trailing grid ending at the clean end: [999, 979, ..., 19, 0] for 50 steps."""
    steps = list(reversed(ddim_timesteps(num_steps, schedule.num_train_timesteps)))
    return steps if steps[-1] == 0 else steps + [0]  # grids of > T/2 steps already reach 0


def inversion_timesteps(num_steps: int, schedule: NoiseSchedule = SD15_SCHEDULE) -> list[int]:
    """Increasing grid from the clean end: [0, 19, 39, ..., 999] for 50 steps."""
    return list(reversed(sampling_timesteps(num_steps, schedule)))
