r"""The losses of invertible consistency distillation (paper section 3, eqs. 2-5; method.md
section 4). Notebook 03 executes one training step of this file, loss by loss.

Written against plain callables, so the same code distils a 2D MLP or a UNet:

* ``teacher(x, t, cond) -> eps``: the epsilon-predicting teacher $\epsilon_\phi$ (CFG is applied
  here, with ``null_cond`` as the unconditional input);
* ``student(x, t, s, cond, w_code) -> eps_hat``: a student $\epsilon_\theta$; $f_\theta$ is
  eps_hat followed by a DDIM jump to s (``consistency.consistency_fn``).

Shapes (minGPT's habit; the 2D world of ``toy2d`` uses [B, 2] points and [B] labels instead):
x0, eps, x_t: [B, C, h, w] scaled VAE latents; cond, null_cond: [B, L, D] text embeddings;
t, t', s: long [B]; w_code: float [B]. Every loss is a scalar.

**The boundary parameterization** (paper eq. 3). A student maps x_t to its segment boundary s
with one DDIM jump along its own noise prediction, with $\alpha_0 := 1, \sigma_0 := 0$:

$$f_\theta(x_t, t, s) = \alpha_s \frac{x_t - \sigma_t \epsilon_\theta(x_t, t, s, c, w)}{\alpha_t}
  + \sigma_s \epsilon_\theta(x_t, t, s, c, w)$$

A student at grid time t jumps to the *next* boundary strictly below it (reverse student
$\theta^+$, CD_m, decoder; reverse boundaries $[0, b_1, \dots, b_{m-1}]$) or strictly above it
(forward student $\theta^-$, fCD_m, encoder; forward boundaries $[b_1, \dots, b_{m-1}, 999]$):
$s^+(t) = \max\{b_i < t\}$, $s^-(t) = \min\{b_i > t\}$, so a point on a boundary jumps to the
next one, never to itself. The losses compute it from the next grid time $t' = t \mp 20$:
``boundaries.reverse_target(t')`` $= \max\{b_i \le t'\}$ with $t' = t - 20$ and
``boundaries.forward_target(t')`` $= \min\{b_i \ge t'\}$ with $t' = t + 20$, which on the DDIM
grid is the same rule; decoding and encoding walk ``Boundaries.decoding_steps()`` /
``encoding_steps()``, boundary to boundary.

**The distance** is pseudo-Huber, L2-like near 0 and L1-like far away ($c = 10^{-3}$):

$$d(a, b) = \operatorname{mean}\Big(\sqrt{(a - b)^2 + c^2} - c\Big)$$

**The four losses.** One batch (x0, c) and one noise eps feed all four, applied in this order,
each followed by an optimizer step on its own model (Algorithm 1 of the paper); sg is
stop-gradient, $x_t = \alpha_t x_0 + \sigma_t \epsilon$, $\phi$ the teacher:

1. reverse CD, updates $\theta^+$ (t on the DDIM grid, $t' = t - 20$, $w$ drawn per sample):

   $$\mathcal{L}_{CD}^{+} = d\Big(f_{\theta^+}(x_t, t, s; c, w),\;
     \mathrm{sg}\, f_{\theta^+}(x_{t'}, t', s; c, w)\Big), \quad
     x_{t'} = \mathrm{DDIM}_\phi(x_t, t \to t'; w), \quad s = \max\{b_i \le t'\}$$

2. forward CD, updates $\theta^-$ ($t' = t + 20$, always unguided):

   $$\mathcal{L}_{CD}^{-} = d\Big(f_{\theta^-}(x_t, t, s; c),\;
     \mathrm{sg}\, f_{\theta^-}(x_{t'}, t', s; c)\Big), \quad
     x_{t'} = \mathrm{DDIM}^{-1}_\phi(x_t, t \to t'), \quad s = \min\{b_i \ge t'\}$$

3. forward preservation (paper eq. 4), updates $\theta^-$ only; segment $j$ drawn per sample,
   $[b_j, b_{j+1}]$ = (reverse[j], forward[j]), $b_0 = 0$ replaced by 19:

   $$\mathcal{L}_f = d\Big(f_{\theta^-}\big(\mathrm{sg}\,
     f_{\theta^+}(x_{b_{j+1}}, b_{j+1} \to b_j), b_j \to b_{j+1}\big),\; x_{b_{j+1}}\Big)$$

4. reverse preservation, updates $\theta^+$ only:

   $$\mathcal{L}_r = d\Big(f_{\theta^+}\big(\mathrm{sg}\, f_{\theta^-}(x_{b_j}, b_j \to b_{j+1}),
     b_{j+1} \to b_j\big),\; x_{b_j}\Big)$$

The total objective (paper eq. 5), with $\lambda_f = \lambda_r = 1.5$ by default:

$$\mathcal{L} = \mathcal{L}_{CD}^{+} + \mathcal{L}_{CD}^{-} + \lambda_f \mathcal{L}_f
  + \lambda_r \mathcal{L}_r$$

Targets come from the online student under stop-gradient (no EMA copy of the weights, as
LCM-LoRA), and are replaced by x_t' itself where t' is already the boundary (the boundary
condition f(x, s, s) = x).

Two traps, signposted where they meet the code:

* **Two guidance units.** Here (as in the whole core) guidance is ``w_code = w - 1``
  ($\epsilon_w = \epsilon_c + w_{code} (\epsilon_c - \epsilon_\varnothing)$, 0 = unguided), so
  the release's ``w_code_choices`` (0, 7, 11, 15, 19) are classical w = 1, 8, 12, 16, 20; the
  pipeline and the command line take the classical w.
* **Two discretisations of inversion.** The forward-CD teacher step evaluates eps at the
  *current* time t (the authors' ``forward_train_step``); ``solver.invert_ddim`` evaluates it at
  the *target* time (diffusers' ``DDIMInverseScheduler``). So fCD is distilled from a slightly
  different discrete ODE than the DDIM50 inversion it is compared with; both are defensible.

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
    r"""$d(a, b) = \operatorname{mean}(\sqrt{(a - b)^2 + c^2} - c)$: L2-like near 0, L1-like far
    away. With the default $c = 10^{-3}$, far below the latent differences of training, it is in
    effect $\operatorname{mean}|a - b|$. prediction, target: any shape, the same one (e.g.
    [B, C, h, w]); returns a scalar."""
    if prediction.shape != target.shape:
        raise ValueError(f"shapes differ: {tuple(prediction.shape)} vs {tuple(target.shape)}")
    check_finite("pseudo-Huber c", c, 0, low_open=True, fix="e.g. 1e-3")
    return torch.mean(torch.sqrt((prediction.float() - target.float()) ** 2 + c**2) - c)  # ()


def _random_choice(values, n: int, generator, device) -> torch.Tensor:
    values = torch.as_tensor(values, device=device)
    index = torch.randint(len(values), (n,), generator=generator).to(device)
    return values[index]


def _keep_boundary(target: torch.Tensor, x_prev: torch.Tensor, t_prev, s) -> torch.Tensor:
    """Boundary condition $f(x, s, s) = x$: where t' == s the target is x_t' itself."""
    at_boundary = (t_prev == s).reshape(-1, *([1] * (target.ndim - 1)))  # (B, 1, 1, 1) bool
    return torch.where(at_boundary, x_prev, target)                     # (B, C, h, w)


def _guided_teacher_eps(teacher, x_t, t, cond, null_cond, w_code) -> torch.Tensor:
    r"""eps_w of the teacher: real CFG (two passes: cond and null),
    $\epsilon_w = \epsilon_\phi(x_t, t, c) + w_{code} (\epsilon_\phi(x_t, t, c) -
    \epsilon_\phi(x_t, t, \varnothing))$ with ``w_code = w - 1``, or, for a CFG-distilled
    teacher that reads w itself (``teacher.embeds_guidance`` true: the authors' SD1.5 teacher,
    ``icd_lite.sd15.train``), one pass ``teacher(x, t, cond, w_code)``. Returns (B, C, h, w)."""
    if getattr(teacher, "embeds_guidance", False):
        return teacher(x_t, t, cond, w_code)
    return cfg(teacher(x_t, t, cond), teacher(x_t, t, null_cond), w_code)


def reverse_cd_loss(student, teacher, x0, eps, cond, null_cond, boundaries: Boundaries,
                    w_code_choices=(0.0, 7.0, 11.0, 15.0, 19.0), generator=None,
                    schedule: NoiseSchedule = SD15_SCHEDULE, huber_c: float = 1e-3,
                    num_ddim_steps: int = 50) -> torch.Tensor:
    r"""Reverse CD $\mathcal{L}_{CD}^{+}$ (method.md section 4, loss 1), updates $\theta^+$:

    $$d\big(f_{\theta^+}(x_t, t, s; c, w),\ \mathrm{sg}\, f_{\theta^+}(x_{t'}, t', s; c, w)\big),
    \quad x_{t'} = \mathrm{DDIM}_\phi(x_t, t \to t'; w)$$

    n ~ U{0..49}, t = ddim_t[n], t' = max(t - 20, 0), s = max{b_i in reverse : b_i <= t'},
    w_code ~ U(w_code_choices) (w_code = w - 1: 0 is unguided). x0, eps: (B, C, h, w);
    cond, null_cond: (B, L, D). Returns a scalar.
    """
    check_w_code(torch.as_tensor(w_code_choices))
    grid = torch.tensor([0] + ddim_timesteps(num_ddim_steps), device=x0.device)  # (51,) 0, 19..999
    n = torch.randint(num_ddim_steps, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
    t, t_prev = grid[n + 1], grid[n]  # t' = t - 20, one grid step below t (0 below the first)
    s = boundaries.reverse_target(t_prev)  # s = max{b_i <= t'}, (B,)
    w_code = _random_choice(w_code_choices, x0.shape[0], generator, x0.device).float()  # (B,)

    x_t = schedule.add_noise(x0, eps, t)  # x_t = alpha_t x_0 + sigma_t eps, (B, C, h, w)
    prediction = consistency_fn(student, x_t, t, s, cond, w_code, schedule)  # f+(x_t, t, s; w)
    with torch.no_grad():
        # x_{t'} = DDIM(x_t, t -> t'; w): one guided teacher step, (B, C, h, w)
        x_prev = ddim_jump(x_t, _guided_teacher_eps(teacher, x_t, t, cond, null_cond, w_code),
                           t, t_prev, schedule)
        # Where t' == s the target is x_t' itself (masked below): never query the student
        # there, which would be at t' = 0 on the first grid step.
        t_query = torch.where(t_prev == s, t, t_prev)
        target = consistency_fn(student, x_prev, t_query, s, cond, w_code, schedule)  # sg f+
        target = _keep_boundary(target, x_prev, t_prev, s)  # x_{t'} where t' = s
    return pseudo_huber(prediction, target, huber_c)  # d(prediction, target), ()


def forward_cd_loss(student, teacher, x0, eps, cond, boundaries: Boundaries, generator=None,
                    schedule: NoiseSchedule = SD15_SCHEDULE, huber_c: float = 1e-3,
                    num_ddim_steps: int = 50) -> torch.Tensor:
    r"""Forward CD $\mathcal{L}_{CD}^{-}$ (method.md section 4, loss 2), updates $\theta^-$:

    $$d\big(f_{\theta^-}(x_t, t, s; c),\ \mathrm{sg}\, f_{\theta^-}(x_{t'}, t', s; c)\big),
    \quad x_{t'} = \mathrm{DDIM}^{-1}_\phi(x_t, t \to t')$$

    n ~ U{0..48}, t = ddim_t[n], t' = t + 20, s = min{b_i in forward : b_i >= t'}; the
    teacher's inverse DDIM step is unguided (w_code = 0). x0, eps: (B, C, h, w); cond:
    (B, L, D). Returns a scalar.

    Discretisation: this step evaluates eps at the *current* time t, as the authors'
    ``forward_train_step``; ``solver.invert_ddim`` (DDIM50 inversion, the baseline) evaluates
    it at the *target* time t', as diffusers' ``DDIMInverseScheduler``.
    """
    grid = torch.tensor(ddim_timesteps(num_ddim_steps), device=x0.device)  # (50,) 19, 39..999
    n = torch.randint(num_ddim_steps - 1, (x0.shape[0],), generator=generator).to(x0.device)  # (B,)
    t, t_next = grid[n], grid[n + 1]  # t' = t + 20, (B,)
    s = boundaries.forward_target(t_next)  # s = min{b_i >= t'}, (B,)

    x_t = schedule.add_noise(x0, eps, t)  # x_t = alpha_t x_0 + sigma_t eps, (B, C, h, w)
    prediction = consistency_fn(student, x_t, t, s, cond, 0.0, schedule)  # f-(x_t, t, s)
    with torch.no_grad():
        # x_{t'} = DDIM^{-1}(x_t, t -> t'), eps at the current time t: NOT invert_ddim's
        # discretisation (eps at the target time t'; see solver.invert_ddim)
        x_next = ddim_jump(x_t, teacher(x_t, t, cond), t, t_next, schedule)  # (B, C, h, w)
        target = consistency_fn(student, x_next, t_next, s, cond, 0.0, schedule)  # sg f-
        target = _keep_boundary(target, x_next, t_next, s)  # x_{t'} where t' = s
    return pseudo_huber(prediction, target, huber_c)  # d(prediction, target), ()


def _segment_ends(boundaries: Boundaries, n: int, generator, device, clean_start: int = 19):
    """j ~ U{0..m-1}: s_hi = forward[j] = b_{j+1}, s_lo = reverse[j] = b_j (0 replaced by 19)."""
    j = torch.randint(boundaries.m, (n,), generator=generator).to(device)  # (B,)
    s_hi = torch.tensor(boundaries.forward, device=device)[j]  # b_{j+1}, (B,)
    s_lo = torch.tensor(boundaries.reverse, device=device)[j].clamp(min=clean_start)  # b_j, (B,)
    return s_lo, s_hi


def forward_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                              boundaries: Boundaries, generator=None,
                              schedule: NoiseSchedule = SD15_SCHEDULE,
                              huber_c: float = 1e-3) -> torch.Tensor:
    r"""$\mathcal{L}_f$ (paper eq. 4): decode one segment with the frozen reverse model,
    re-encode it with the forward model, and ask for the starting point back. Gradients reach
    $\theta^-$ only. Both jumps are unguided (w_code = 0).

    $$d\Big(f_{\theta^-}\big(\mathrm{sg}\, f_{\theta^+}(x_{b_{j+1}}, b_{j+1} \to b_j),
    b_j \to b_{j+1}\big),\ x_{b_{j+1}}\Big)$$

    x0, eps: (B, C, h, w); cond: (B, L, D). Returns a scalar.
    """
    s_lo, s_hi = _segment_ends(boundaries, x0.shape[0], generator, x0.device)  # b_j, b_{j+1}
    x_hi = schedule.add_noise(x0, eps, s_hi)  # x_{b_{j+1}}, (B, C, h, w)
    with torch.no_grad():
        # y = sg f+(x_{b_{j+1}}, b_{j+1} -> b_j), (B, C, h, w)
        y = consistency_fn(reverse_student, x_hi, s_hi, s_lo, cond, 0.0, schedule)
    # d(f-(y, b_j -> b_{j+1}), x_{b_{j+1}})
    return pseudo_huber(consistency_fn(forward_student, y, s_lo, s_hi, cond, 0.0, schedule),
                        x_hi, huber_c)


def reverse_preservation_loss(forward_student, reverse_student, x0, eps, cond,
                              boundaries: Boundaries, generator=None,
                              schedule: NoiseSchedule = SD15_SCHEDULE,
                              huber_c: float = 1e-3) -> torch.Tensor:
    r"""$\mathcal{L}_r$: encode one segment with the frozen forward model, decode it
    (unguided) with the reverse model, and ask for the starting point back. Gradients reach
    $\theta^+$ only.

    $$d\Big(f_{\theta^+}\big(\mathrm{sg}\, f_{\theta^-}(x_{b_j}, b_j \to b_{j+1}),
    b_{j+1} \to b_j\big),\ x_{b_j}\Big)$$

    x0, eps: (B, C, h, w); cond: (B, L, D). Returns a scalar.
    """
    s_lo, s_hi = _segment_ends(boundaries, x0.shape[0], generator, x0.device)  # b_j, b_{j+1}
    x_lo = schedule.add_noise(x0, eps, s_lo)  # x_{b_j}, (B, C, h, w)
    with torch.no_grad():
        # y = sg f-(x_{b_j}, b_j -> b_{j+1}), (B, C, h, w)
        y = consistency_fn(forward_student, x_lo, s_lo, s_hi, cond, 0.0, schedule)
    # d(f+(y, b_{j+1} -> b_j; w = 1), x_{b_j})
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
    r"""One iCD iteration on a batch: the four updates of eq. 5 in the paper's order
    (Algorithm 1), $\mathcal{L}_{CD}^{+}$ on $\theta^+$, $\mathcal{L}_{CD}^{-}$ on $\theta^-$,
    $\lambda_f \mathcal{L}_f$ on $\theta^-$, $\lambda_r \mathcal{L}_r$ on $\theta^+$, each
    followed by its optimizer step. Returns the losses (unweighted, before each update) as
    floats: ``reverse_cd``, ``forward_cd``, ``forward_preservation``, ``reverse_preservation``
    (a switched-off term is absent).

    x0: (B, C, h, w) scaled latents; cond, null_cond: (B, L, D). ``reverse_optimizer`` must
    hold theta+ and ``forward_optimizer`` theta-.
    """
    eps = torch.randn(x0.shape, generator=generator, dtype=x0.dtype).to(x0.device)  # (B, C, h, w)
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
