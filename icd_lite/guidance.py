r"""Classifier-free guidance (CFG), dynamic guidance schedules and the guidance embedding.

**Units: read this first.** There are two guidance units in this project, and mixing them up
shifts every guidance scale by one:

=====================  ==========================  ======================================
unit                   unguided / paper's strong    used by
=====================  ==========================  ======================================
classical $w$          $w = 1$ / $w = 8$            the paper, ``ICDPipeline``, the CLI
code $w_{code} = w-1$  $w_{code} = 0$ / $7$         this module, losses, consistency, solver
=====================  ==========================  ======================================

Every function here takes ``w_code`` unless its name says ``classical``: so
``constant_guidance(7.0)`` is the paper's w = 8. Convert with ``classical_to_code`` /
``code_to_classical``.

**CFG** (Ho & Salimans, 2022). With $\epsilon_c = \epsilon_\theta(x_t, t, c)$ the conditional
and $\epsilon_\varnothing = \epsilon_\theta(x_t, t, \varnothing)$ the unconditional prediction,

$$\hat\epsilon_w = \epsilon_\varnothing + w\,(\epsilon_c - \epsilon_\varnothing)
                 = \epsilon_c + w_{code}\,(\epsilon_c - \epsilon_\varnothing),
  \qquad w_{code} = w - 1 .$$

The left form is in the classical unit (the paper's), the right one in the code unit ("Imagen"
form), which is what ``cfg`` computes.

**Dynamic CFG** (paper section 3.3, Fig. 2). With $u = t / T$ the fraction of the trajectory
(0 = data, 1 = noise), the guidance applied at step t is, in the code unit:

* step (what the paper uses, $\tau_1 = \tau_2 = \tau$):
  $w_{code}(u) = w_{code}\,\mathbb 1[u \le \tau]$: unguided at high noise, full w below;
* ramp (the paper's Fig. 2a reading of CADS):
  $w_{code}(u) = w_{code}$ for $u \le \tau_1$, $0$ for $u \ge \tau_2$,
  $w_{code}\,\frac{\tau_2 - u}{\tau_2 - \tau_1}$ in between;
* interval (Fig. 2b): $w_{code}(u) = w_{code}\,\mathbb 1[\tau_1 \le u \le \tau_2]$.

Note that CADS itself (Sadat et al., 2024) anneals the *condition* (it adds noise to the
conditioning embedding at high noise), not w; the ramp here is a schedule on w that mimics its
effect. The paper reports (Fig. 4a) that guidance at high noise is what breaks inversion, so
switching it off there keeps decoding close to the unguided trajectory while low-noise steps still
get the sharpening of CFG. Notebook 01 tests that claim on a world with an exact teacher.

**Guidance embedding** (LCM, Luo et al. 2023). A student receives $w_{code}$ (code unit) as a
sinusoidal embedding of $1000\,w_{code}$, added to its timestep embedding (``timestep_cond`` of
``UNet2DConditionModel`` with ``time_cond_proj_dim``), so one network serves every w:

$$e(w_{code}) = \big[\sin(1000\,w_{code} f_k),\ \cos(1000\,w_{code} f_k)\big]_{k=0}^{d/2-1},
  \qquad f_k = \exp\!\Big(-\frac{k \ln 10000}{d/2 - 1}\Big).$$
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_finite
from .schedule import NUM_TRAIN_TIMESTEPS


def classical_to_code(w: float) -> float:
    """Classical scale w (1 = unguided) to the code unit w_code = w - 1 (8 -> 7); w finite."""
    check_finite("the classical guidance scale w", w, 1, fix="1 = unguided, e.g. 8")
    return w - 1.0


def code_to_classical(w_code: float) -> float:
    """Code unit w_code (0 = unguided) to the classical scale w = w_code + 1 (7 -> 8)."""
    check_w_code(w_code)
    return w_code + 1.0


def check_w_code(w_code) -> None:
    """w_code (a number, or a tensor with one per sample) must be finite and >= 0."""
    check_finite("guidance w_code", w_code, 0, fix="0 = unguided; classical w = w_code + 1")


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w_code) -> torch.Tensor:
    r"""$\hat\epsilon_w = \epsilon_c + w_{code}(\epsilon_c - \epsilon_\varnothing)$ (CODE unit).

    w_code = w - 1 (0 = unguided; the paper's w = 8 is ``w_code = 7``), a number or one per
    sample [B]. eps_cond and eps_uncond are [B, ...] (e.g. [B, C, h, w] latents, [B, 2] in 2D).
    """
    check_w_code(w_code)
    w = torch.as_tensor(w_code, dtype=eps_cond.dtype, device=eps_cond.device)  # [] or [B]
    if w.ndim == 1:
        w = w.reshape(-1, *([1] * (eps_cond.ndim - 1)))                        # [B, 1, ...]
    return eps_cond + w * (eps_cond - eps_uncond)                              # [B, ...]


@dataclass(frozen=True)
class GuidanceSchedule:
    r"""$w_{code}(t)$ as a function of the timestep: constant, step, ramp or interval.

    ``w_code`` is in the CODE unit (w - 1; 7 is the paper's w = 8), and calling the schedule
    returns the code unit too. ``tau1``/``tau2`` are fractions $u = t / T$. For "step",
    tau1 = tau2 = tau; for "constant" they are unused. The formulas are in the module docstring.
    """

    w_code: float
    kind: str = "constant"
    tau1: float = 1.0
    tau2: float = 1.0

    def __post_init__(self):
        check_w_code(self.w_code)
        kinds = ("constant", "step", "ramp", "interval")
        if self.kind not in kinds:
            raise ValueError(f"unknown guidance schedule kind {self.kind!r}; choose one of {kinds}")
        for name in ("tau1", "tau2"):
            check_finite(name, getattr(self, name), 0, 1,
                         fix=f"{name} is a fraction of the trajectory (t / T)")
        if self.tau1 > self.tau2:
            raise ValueError(f"need tau1 <= tau2, got tau1 = {self.tau1}, tau2 = {self.tau2}")

    def __call__(self, t) -> float:
        """w_code (code unit, w - 1) at integer timestep t."""
        u = float(t) / NUM_TRAIN_TIMESTEPS
        if self.kind == "constant":
            return self.w_code
        if self.kind == "step":
            return self.w_code if u <= self.tau1 else 0.0
        if self.kind == "interval":
            return self.w_code if self.tau1 <= u <= self.tau2 else 0.0
        # ramp: full below tau1, off above tau2, linear in between
        if u <= self.tau1:
            return self.w_code
        if u >= self.tau2:
            return 0.0
        return self.w_code * (self.tau2 - u) / (self.tau2 - self.tau1)


def constant_guidance(w_code: float) -> GuidanceSchedule:
    """Ordinary CFG: the same w_code (code unit: 7.0 means the paper's w = 8) at every step."""
    return GuidanceSchedule(w_code, "constant")


def step_guidance(w_code: float, tau: float) -> GuidanceSchedule:
    r"""The paper's dynamic CFG: unguided for $t/T > \tau$, w_code (code unit) below."""
    return GuidanceSchedule(w_code, "step", tau, tau)


def ramp_guidance(w_code: float, tau1: float, tau2: float) -> GuidanceSchedule:
    """CADS-like: full w_code (code unit) below tau1, none above tau2, a linear ramp between."""
    return GuidanceSchedule(w_code, "ramp", tau1, tau2)


def interval_guidance(w_code: float, tau1: float, tau2: float) -> GuidanceSchedule:
    """Guidance w_code (code unit) only in the middle interval tau1 <= t / T <= tau2 (Fig. 2b)."""
    return GuidanceSchedule(w_code, "interval", tau1, tau2)


def guided_model(model, null_cond, guidance: GuidanceSchedule):
    """Wrap an eps model ``model(x, t, cond)`` into one that applies ``guidance`` at each t.

    The returned callable has the same signature, so the DDIM loops drive it unchanged. When
    w_code(t) = 0 it makes one network call; otherwise two (conditional and unconditional).
    ``guidance`` is in the CODE unit (``constant_guidance(7.0)`` is the paper's w = 8). x is
    [B, ...], t [B] with one timestep shared by the batch (``t[0]`` picks the guidance).
    """

    def eps_fn(x, t, cond):
        w_code = guidance(int(t[0]))            # code unit, one value for the batch
        eps_cond = model(x, t, cond)            # eps_c, [B, ...]
        if w_code == 0:
            return eps_cond
        return cfg(eps_cond, model(x, t, null_cond), w_code)   # eps_hat_w, [B, ...]

    return eps_fn


def guidance_embedding(w_code: torch.Tensor, dim: int = 512) -> torch.Tensor:
    r"""Sinusoidal embedding of $1000\,w_{code}$, shape [B, dim] (LCM's guidance-scale embedding).

    $e = [\sin(1000\,w_{code} f_k), \cos(1000\,w_{code} f_k)]$,
    $f_k = \exp(-k \ln 10000 / (d/2 - 1))$, on the device of ``w_code``: a [B] vector in the
    CODE unit (w - 1; 7 is the paper's w = 8); a list gives a CPU embedding.
    """
    w_code = torch.as_tensor(w_code, dtype=torch.float32)                        # [B]
    if w_code.ndim != 1:
        raise ValueError(f"w_code must be a vector with one value per sample, got shape "
                         f"{tuple(w_code.shape)}")
    if dim < 4:
        raise ValueError(f"embedding dim must be at least 4, got {dim}")
    check_w_code(w_code)
    half = dim // 2
    # Same float32 operations, in the same order, as diffusers: angles reach ~2e4 rad, so a
    # different rounding of the frequencies would change the embedding by ~1e-3.
    log_step = torch.log(torch.tensor(10000.0, device=w_code.device)) / (half - 1)
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w_code.device) * -log_step)
    angles = (w_code * 1000.0)[:, None] * freqs[None, :]           # 1000 w_code f_k, [B, dim // 2]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)  # [B, 2 * (dim // 2)]
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))                  # [B, dim]
    return emb
