r"""The losses of invertible consistency distillation (paper section 3, eqs. 2-5; method.md
section 4).

Written against plain callables, so the same code distils a 2D MLP or a UNet:

* ``teacher(x, t, cond) -> eps``: the epsilon-predicting teacher (CFG is applied here, with
  ``null_cond`` as the unconditional input);
* ``student(x, t, s, cond, w_code) -> eps_hat``: a student; f_theta is eps_hat followed by a
  DDIM jump to s (see ``consistency.py``).

One batch (x0, cond) and one noise eps feed four losses, applied in this order, each followed by an
optimizer step on its own model (Algorithm 1 of the paper)::

    1. L_CD(theta+)  reverse CD   f+(x_t, t -> s) ~ f+(x_t', t' -> s),  x_t' = DDIM_teacher(t -> t - 20; w)
    2. L_CD(theta-)  forward CD   f-(x_t, t -> s) ~ f-(x_t', t' -> s),  x_t' = invDDIM_teacher(t -> t + 20)
    3. lambda_f L_f  forward preservation   f-(f+(x_hi, hi -> lo), lo -> hi) ~ x_hi   (updates theta-)
    4. lambda_r L_r  reverse preservation   f+(f-(x_lo, lo -> hi), hi -> lo) ~ x_lo   (updates theta+)

Targets come from the online student under stop-gradient (no EMA, as LCM-LoRA), and are replaced by
x_t' itself where t' is already the boundary (the boundary condition f(x, s, s) = x). Distance:
pseudo-Huber d(a, b) = mean(sqrt((a - b)^2 + c^2) - c).

Teacher note: the authors distil from a CFG-distilled teacher (one pass with a w-embedding); here
the teacher runs real CFG (two passes), the LCM recipe. Both give the same guided eps_w target.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_finite
from .consistency import as_batch, consistency_fn
from .guidance import cfg, check_w_code
from .schedule import SD15_SCHEDULE, Boundaries, NoiseSchedule, ddim_timesteps
from .solver import ddim_jump


def pseudo_huber(prediction: torch.Tensor, target: torch.Tensor, c: float = 1e-3) -> torch.Tensor:
    """d(a, b) = mean(sqrt((a - b)^2 + c^2) - c): L2-like near 0, L1-like far away."""
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    check_finite("pseudo-Huber c", c, 0, low_open=True, fix="e.g. 1e-3")
    return torch.mean(torch.sqrt((prediction.float() - target.float()) ** 2 + c**2) - c)


def _random_choice(values, n: int, generator, device) -> torch.Tensor:
    values = torch.as_tensor(values, device=device)
    index = torch.randint(len(values), (n,), generator=generator).to(device)
    return values[index]


def _keep_boundary(target: torch.Tensor, x_prev: torch.Tensor, t_prev, s) -> torch.Tensor:
    """Boundary condition: where t' == s the target is x_t' itself."""
    at_boundary = (t_prev == s).reshape(-1, *([1] * (target.ndim - 1)))
    return torch.where(at_boundary, x_prev, target)


def _guided_teacher_eps(teacher, x_t, t, cond, null_cond, w_code) -> torch.Tensor:
    """eps_w of the teacher: real CFG (two passes: cond and null), or, for a CFG-distilled
    teacher that reads w itself (``teacher.embeds_guidance`` true: the authors' SD1.5 teacher,
    ``icd_lite.sd15.train``), one pass ``teacher(x, t, cond, w_code)``."""
    if getattr(teacher, "embeds_guidance", False):
        return teacher(x_t, t, cond, w_code)
    return cfg(teacher(x_t, t, cond), teacher(x_t, t, null_cond), w_code)


def reverse_cd_loss(student, teacher, x0, eps, cond, null_cond, boundaries: Boundaries,
                    w_code_choices=(0.0, 7.0, 11.0, 15.0, 19.0), generator=None,
                    schedule: NoiseSchedule = SD15_SCHEDULE, huber_c: float = 1e-3,
                    num_ddim_steps: int = 50) -> torch.Tensor:
    """Reverse CD (method.md section 4, loss 1): n ~ U{0..49}, t = ddim_t[n],
    t' = max(t - 20, 0), s = max{e in reverse boundaries : e <= t'}, w_code ~ U(w_code_choices)."""
    check_w_code(torch.as_tensor(w_code_choices))
    grid = torch.tensor([0] + ddim_timesteps(num_ddim_steps), device=x0.device)
    n = torch.randint(num_ddim_steps, (x0.shape[0],), generator=generator).to(x0.device)
    t, t_prev = grid[n + 1], grid[n]  # t' is one grid step below t (0 below the first step)
    s = boundaries.reverse_target(t_prev)
    w_code = _random_choice(w_code_choices, x0.shape[0], generator, x0.device).float()

    x_t = schedule.add_noise(x0, eps, t)
    prediction = consistency_fn(student, x_t, t, s, cond, w_code, schedule)
    with torch.no_grad():
        x_prev = ddim_jump(x_t, _guided_teacher_eps(teacher, x_t, t, cond, null_cond, w_code),
                           t, t_prev, schedule)
        # Where t' == s the target is x_t' itself (masked below): never query the student
        # there, which would be at t' = 0 on the first grid step.
        t_query = torch.where(t_prev == s, t, t_prev)
        target = consistency_fn(student, x_prev, t_query, s, cond, w_code, schedule)
        target = _keep_boundary(target, x_prev, t_prev, s)
    return pseudo_huber(prediction, target, huber_c)


def forward_cd_loss(student, teacher, x0, eps, cond, boundaries: Boundaries, generator=None,
                    schedule: NoiseSchedule = SD15_SCHEDULE, huber_c: float = 1e-3,
                    num_ddim_steps: int = 50) -> torch.Tensor:
    """Forward CD (method.md section 4, loss 2): n ~ U{0..48}, t = ddim_t[n], t' = t + 20,
    s = min{e in forward boundaries : e >= t'}; unguided inverse DDIM step of the teacher."""
    grid = torch.tensor(ddim_timesteps(num_ddim_steps), device=x0.device)
    n = torch.randint(num_ddim_steps - 1, (x0.shape[0],), generator=generator).to(x0.device)
    t, t_next = grid[n], grid[n + 1]
    s = boundaries.forward_target(t_next)

    x_t = schedule.add_noise(x0, eps, t)
    prediction = consistency_fn(student, x_t, t, s, cond, 0.0, schedule)
    with torch.no_grad():
        x_next = ddim_jump(x_t, teacher(x_t, t, cond), t, t_next, schedule)
        target = consistency_fn(student, x_next, t_next, s, cond, 0.0, schedule)
        target = _keep_boundary(target, x_next, t_next, s)
    return pseudo_huber(prediction, target, huber_c)


def _segment_ends(boundaries: Boundaries, n: int, generator, device, clean_start: int = 19):
    """j ~ U{0..m-1}: s_hi = forward[j], s_lo = reverse[j] (0 replaced by 19)."""
    j = torch.randint(boundaries.m, (n,), generator=generator).to(device)
    s_hi = torch.tensor(boundaries.forward, device=device)[j]
    s_lo = torch.tensor(boundaries.reverse, device=device)[j].clamp(min=clean_start)
    return s_lo, s_hi


def forward_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                              boundaries: Boundaries, generator=None,
                              schedule: NoiseSchedule = SD15_SCHEDULE,
                              huber_c: float = 1e-3) -> torch.Tensor:
    """L_f (paper eq. 4): decode one segment with the frozen reverse model, re-encode it with
    the forward model, and ask for the starting point back. Gradients reach theta- only."""
    s_lo, s_hi = _segment_ends(boundaries, x0.shape[0], generator, x0.device)
    x_hi = schedule.add_noise(x0, eps, s_hi)
    with torch.no_grad():
        y = consistency_fn(reverse_student, x_hi, s_hi, s_lo, cond, 0.0, schedule)
    return pseudo_huber(consistency_fn(forward_student, y, s_lo, s_hi, cond, 0.0, schedule),
                        x_hi, huber_c)


def reverse_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                              boundaries: Boundaries, generator=None,
                              schedule: NoiseSchedule = SD15_SCHEDULE,
                              huber_c: float = 1e-3) -> torch.Tensor:
    """L_r: encode one segment with the frozen forward model, decode it (unguided) with the
    reverse model, and ask for the starting point back. Gradients reach theta+ only."""
    s_lo, s_hi = _segment_ends(boundaries, x0.shape[0], generator, x0.device)
    x_lo = schedule.add_noise(x0, eps, s_lo)
    with torch.no_grad():
        y = consistency_fn(forward_student, x_lo, s_lo, s_hi, cond, 0.0, schedule)
    return pseudo_huber(consistency_fn(reverse_student, y, s_hi, s_lo, cond, 0.0, schedule),
                        x_lo, huber_c)


@dataclass
class ICDConfig:
    """Hyper-parameters of one iCD run (defaults: the SD1.5 release, method.md section 4).

    ``lambda_f = 0`` / ``lambda_r = 0`` switch a preservation loss off, and ``forward_cd =
    False`` trains the forward model by L_f alone (configuration E of Table 2): the paper's
    ablations.
    """

    boundaries: Boundaries
    w_code_choices: tuple = (0.0, 7.0, 11.0, 15.0, 19.0)
    lambda_f: float = 1.5
    lambda_r: float = 1.5
    huber_c: float = 1e-3
    grad_clip: float = 1.0
    num_ddim_steps: int = 50
    forward_cd: bool = True

    def __post_init__(self):
        if not isinstance(self.boundaries, Boundaries):
            raise TypeError("boundaries must be a Boundaries (see schedule.default_boundaries)")
        for name in ("lambda_f", "lambda_r"):
            check_finite(name, getattr(self, name), 0, fix="0 switches that preservation loss off")
        check_finite("huber_c", self.huber_c, 0, low_open=True, fix="e.g. 1e-3")
        check_finite("grad_clip", self.grad_clip, 0, low_open=True, fix="a gradient norm, e.g. 1")
        check_w_code(torch.as_tensor(self.w_code_choices))
        if not self.forward_cd and self.lambda_f == 0:
            raise ValueError("with forward_cd=False and lambda_f=0 nothing trains the forward "
                             "model; set lambda_f > 0 or forward_cd=True")


def _optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, grad_clip: float):
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    params = [p for group in optimizer.param_groups for p in group["params"]]
    torch.nn.utils.clip_grad_norm_(params, grad_clip)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def icd_training_step(reverse_student, forward_student, teacher, reverse_optimizer,
                      forward_optimizer, x0, cond, null_cond, config: ICDConfig,
                      generator=None, schedule: NoiseSchedule = SD15_SCHEDULE) -> dict:
    """One iCD iteration on a batch: the four updates in the paper's order. Returns the losses.

    ``reverse_optimizer`` must hold theta+ and ``forward_optimizer`` theta-.
    """
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)
    boundaries, c = config.boundaries, config.huber_c
    losses = {}

    loss = reverse_cd_loss(reverse_student, teacher, x0, eps, cond, null_cond, boundaries,
                           config.w_code_choices, generator, schedule, c, config.num_ddim_steps)
    _optimizer_step(loss, reverse_optimizer, config.grad_clip)
    losses["reverse_cd"] = loss.item()

    if config.forward_cd:
        loss = forward_cd_loss(forward_student, teacher, x0, eps, cond, boundaries, generator,
                               schedule, c, config.num_ddim_steps)
        _optimizer_step(loss, forward_optimizer, config.grad_clip)
        losses["forward_cd"] = loss.item()

    if config.lambda_f > 0:
        loss = forward_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                                         boundaries, generator, schedule, c)
        _optimizer_step(config.lambda_f * loss, forward_optimizer, config.grad_clip)
        losses["forward_preservation"] = loss.item()

    if config.lambda_r > 0:
        loss = reverse_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                                         boundaries, generator, schedule, c)
        _optimizer_step(config.lambda_r * loss, reverse_optimizer, config.grad_clip)
        losses["reverse_preservation"] = loss.item()
    return losses
