r"""Multi-boundary consistency models: the forward (encoder) and reverse (decoder) students.

A consistency model maps any point x_t of a probability-flow ODE trajectory to the point of the
*same* trajectory at a fixed time s. iCD (paper section 3.1, Fig. 3) splits the trajectory into m
segments and lets each model map to the boundary of the segment x_t lies in:

* reverse model CD_m (theta+, decoder): s = the segment's lower boundary (towards data);
* forward model fCD_m (theta-, encoder): s = the segment's upper boundary (towards noise).

Parameterization (paper eq. 3, no c_skip / c_out): the network predicts eps_hat and the model's
output is one DDIM jump to the boundary (``solver.ddim_jump``):

.. math::

    f_\theta(x_t, t, s) = \alpha_s \frac{x_t - \sigma_t \hat\epsilon}{\alpha_t}
                          + \sigma_s \hat\epsilon,
    \qquad \hat\epsilon = \epsilon_\theta(x_t, t, s, c, w)

The fraction is the clean point the student predicts, :math:`\hat x_0 = (x_t - \sigma_t
\hat\epsilon) / \alpha_t`; at s = 0 (alpha_0 = 1, sigma_0 = 0) the model returns it unchanged,
which is why the last decoding jump is an x0 prediction. ``sample_consistency`` hands x0_hat and
eps_hat of every jump to its callback, as k-diffusion's samplers hand out ``denoised``.

A *student* here is any callable ``student(x, t, s, cond, w_code) -> eps_hat`` (t, s: long
[B]; w_code: float [B], classical w - 1). m boundaries give m-step decoding and m-step encoding.

Two discretisations of inversion meet here. fCD_m is distilled from the teacher's inverse step
t -> t + 20 with eps evaluated at the *current* time t (``losses.forward_cd_loss``, the authors'
``forward_train_step``), whereas the DDIM50 inversion baseline ``solver.invert_ddim`` evaluates
eps at the *target* time (diffusers' ``DDIMInverseScheduler``). Both are first-order
approximations of the same ODE; they differ by O(step) per step.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from tqdm.auto import tqdm

from .guidance import GuidanceSchedule, constant_guidance
from .schedule import SD15_SCHEDULE, Boundaries, NoiseSchedule
from .solver import ddim_jump, eps_to_x0

Student = Callable[..., torch.Tensor]


def as_batch(values, x: torch.Tensor, dtype=torch.long) -> torch.Tensor:
    """An int/float or a [B] tensor as a [B] tensor on x's device."""
    values = torch.as_tensor(values, device=x.device)
    if values.ndim == 0:
        values = values.expand(x.shape[0])
    return values.to(dtype)


def student_eps(student: Student, x_t: torch.Tensor, t, s, cond, w_code=0.0) -> torch.Tensor:
    """eps_hat = eps_theta(x_t, t, s, c, w_code): the student's noise, shaped like x_t."""
    t, s = as_batch(t, x_t), as_batch(s, x_t)                             # long [B] each
    return student(x_t, t, s, cond, as_batch(w_code, x_t, torch.float32))  # [B, C, H, W]


def consistency_fn(student: Student, x_t: torch.Tensor, t, s, cond, w_code=0.0,
                   schedule: NoiseSchedule = SD15_SCHEDULE) -> torch.Tensor:
    r"""f_theta(x_t, t, s): the student's eps_hat followed by one DDIM jump from t to s (eq. 3).

    .. math::
        f_\theta(x_t,t,s)=\alpha_s\frac{x_t-\sigma_t\hat\epsilon}{\alpha_t}+\sigma_s\hat\epsilon
    """
    t, s = as_batch(t, x_t), as_batch(s, x_t)                 # long [B] each
    eps_hat = student_eps(student, x_t, t, s, cond, w_code)  # [B, C, H, W]
    return ddim_jump(x_t, eps_hat, t, s, schedule)            # [B, C, H, W], the point at time s


@torch.no_grad()
def sample_consistency(student: Student, x: torch.Tensor, steps: Sequence[tuple[int, int]],
                       cond, guidance: GuidanceSchedule | None = None,
                       schedule: NoiseSchedule = SD15_SCHEDULE, callback=None,
                       disable=None) -> torch.Tensor:
    r"""Run a consistency model over (t, s) jumps; w_code(t) comes from ``guidance``.

    One network evaluation per jump. After each jump ``callback`` receives
    ``{'x', 'i', 't', 's', 'x0_hat', 'eps_hat'}``: ``x`` the new point x_s, ``eps_hat`` the
    student's prediction at (x_t, t, s) and ``x0_hat`` = (x_t - sigma_t eps_hat) / alpha_t, the
    clean image the jump aimed through (k-diffusion's ``denoised``). With s = 0 the new x *is*
    x0_hat. Decoding's x0_hat sequence shows the image sharpening jump by jump; encoding's shows
    what the encoder still "sees" in the noise.
    """
    guidance = guidance or constant_guidance(0.0)
    for i, (t, s) in enumerate(tqdm(list(steps), disable=disable, desc="consistency")):
        t_b, s_b = as_batch(t, x), as_batch(s, x)                       # long [B] each
        eps_hat = student_eps(student, x, t_b, s_b, cond, guidance(t))  # [B, C, H, W]
        x_next = ddim_jump(x, eps_hat, t_b, s_b, schedule)              # [B, C, H, W] at time s
        if callback is not None:
            x0_hat = eps_to_x0(x, eps_hat, t_b, schedule)               # [B, C, H, W]
            callback({"x": x_next, "i": i, "t": t, "s": s, "x0_hat": x0_hat, "eps_hat": eps_hat})
        x = x_next
    return x


def decode(student: Student, x_T: torch.Tensor, boundaries: Boundaries, cond,
           guidance: GuidanceSchedule | None = None, schedule: NoiseSchedule = SD15_SCHEDULE,
           callback=None, disable=True) -> torch.Tensor:
    """CD_m: noise x_999 -> data in m jumps (999 -> b_{m-1} -> ... -> 0), guided by w(t)."""
    return sample_consistency(student, x_T, boundaries.decoding_steps(), cond, guidance,
                              schedule, callback, disable)


def encode(student: Student, x0: torch.Tensor, boundaries: Boundaries, cond,
           schedule: NoiseSchedule = SD15_SCHEDULE, start: int = 19,
           generator: torch.Generator | None = None, callback=None,
           disable=True) -> torch.Tensor:
    """fCD_m: data -> noise in m jumps, always unguided (method.md section 5).

    x0 is first noised to t = ``start`` (19) with eps drawn from ``generator`` (a CPU generator;
    the draw is moved to x0's device), since the students are trained on
    the DDIM grid and never see t = 0; then (19 -> b_1 -> ... -> 999).
    """
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype)  # on the generator's CPU
    x = schedule.add_noise(x0, eps.to(x0.device), start)
    return sample_consistency(student, x, boundaries.encoding_steps(start), cond, None,
                              schedule, callback, disable)
