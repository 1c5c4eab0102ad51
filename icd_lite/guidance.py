r"""Classifier-free guidance (CFG), dynamic guidance schedules and the guidance embedding.

**Units.** The paper speaks of the *classical* scale w (w = 1: unguided, w = 8: strong).
The code uses the "Imagen" unit ``w_code = w - 1`` (0: unguided)::

    eps_w = eps_c + w_code * (eps_c - eps_uncond)          (Ho & Salimans, 2022)

Every function here takes ``w_code`` unless its name says ``classical``.

**Dynamic CFG** (paper section 3.3, Fig. 2; CADS, Sadat et al. 2024): with u = t / T,

* step (what the paper uses, tau1 = tau2 = tau): w(u) = w for u <= tau, 0 above;
* ramp (CADS-like, Fig. 2a): w for u <= tau1, 0 for u >= tau2, linear in between;
* interval (Fig. 2b): w only for tau1 <= u <= tau2.

Guidance at high noise is what breaks inversion (Fig. 4a): switching it off there keeps decoding
close to the unguided trajectory while low-noise steps still get the sharpening of CFG.

**Guidance embedding** (LCM, Luo et al. 2023): a student receives w_code as a sinusoidal
embedding of ``w_code * 1000``, added to its timestep embedding (``timestep_cond`` of
``UNet2DConditionModel`` with ``time_cond_proj_dim``), so one network serves every w.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_finite
from .schedule import NUM_TRAIN_TIMESTEPS


def classical_to_code(w: float) -> float:
    """Classical scale w (1 = unguided) to the code unit w_code = w - 1; w must be finite."""
    check_finite("the classical guidance scale w", w, 1, fix="1 = unguided, e.g. 8")
    return w - 1.0


def code_to_classical(w_code: float) -> float:
    """Code unit w_code (0 = unguided) to the classical scale w = w_code + 1."""
    check_w_code(w_code)
    return w_code + 1.0


def check_w_code(w_code) -> None:
    """w_code (a number, or a tensor with one per sample) must be finite and >= 0."""
    check_finite("guidance w_code", w_code, 0, fix="0 = unguided; classical w = w_code + 1")


def cfg(eps_cond: torch.Tensor, eps_uncond: torch.Tensor, w_code) -> torch.Tensor:
    """eps_w = eps_c + w_code (eps_c - eps_uncond). w_code is a number or one per sample."""
    check_w_code(w_code)
    w = torch.as_tensor(w_code, dtype=eps_cond.dtype, device=eps_cond.device)
    if w.ndim == 1:
        w = w.reshape(-1, *([1] * (eps_cond.ndim - 1)))
    return eps_cond + w * (eps_cond - eps_uncond)


@dataclass(frozen=True)
class GuidanceSchedule:
    """w_code as a function of the timestep: constant, step, ramp or interval (see module doc).

    ``tau1``/``tau2`` are fractions of T. For "step", tau1 = tau2 = tau; for "constant" they are
    unused.
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
        """w_code at integer timestep t."""
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
    """Ordinary CFG: the same w_code at every step."""
    return GuidanceSchedule(w_code, "constant")


def step_guidance(w_code: float, tau: float) -> GuidanceSchedule:
    """The paper's dynamic CFG: unguided for t / T > tau, w_code below."""
    return GuidanceSchedule(w_code, "step", tau, tau)


def ramp_guidance(w_code: float, tau1: float, tau2: float) -> GuidanceSchedule:
    """CADS-like: full w_code below tau1, none above tau2, a linear ramp between."""
    return GuidanceSchedule(w_code, "ramp", tau1, tau2)


def interval_guidance(w_code: float, tau1: float, tau2: float) -> GuidanceSchedule:
    """Guidance only in the middle interval tau1 <= t / T <= tau2 (Fig. 2b)."""
    return GuidanceSchedule(w_code, "interval", tau1, tau2)


def guided_model(model, null_cond, guidance: GuidanceSchedule):
    """Wrap an eps model ``model(x, t, cond)`` into one that applies ``guidance`` at each t.

    The returned callable has the same signature, so the DDIM loops drive it unchanged. When
    w_code(t) = 0 it makes one network call; otherwise two (conditional and unconditional).
    """

    def eps_fn(x, t, cond):
        w_code = guidance(int(t[0]))
        eps_cond = model(x, t, cond)
        if w_code == 0:
            return eps_cond
        return cfg(eps_cond, model(x, t, null_cond), w_code)

    return eps_fn


def guidance_embedding(w_code: torch.Tensor, dim: int = 512) -> torch.Tensor:
    """Sinusoidal embedding of w_code * 1000, shape [B, dim] (LCM's guidance-scale embedding).

    emb = [sin(1000 w f_k), cos(1000 w f_k)], f_k = exp(-k log(10000) / (dim/2 - 1)), on the
    device of ``w_code`` (a tensor; a list or number gives a CPU embedding).
    """
    w_code = torch.as_tensor(w_code, dtype=torch.float32)
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
    angles = (w_code * 1000.0)[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)
    if dim % 2 == 1:
        emb = torch.nn.functional.pad(emb, (0, 1))
    return emb
