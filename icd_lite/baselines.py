r"""Inversion baselines on the same teacher (method.md section 6): DDIM, null-text and
negative-prompt inversion.

All three first run DDIM inversion of the teacher (unguided, 50 steps): z0 -> x_999, then decode
with 50 guided DDIM steps. They differ in the unconditional input of CFG while decoding::

    eps_w = eps(x_t, t, c) + w_code (eps(x_t, t, c) - eps(x_t, t, u_t))

* DDIM inversion: u_t = the null prompt "" (its guided decoding drifts from the inversion path);
* negative-prompt inversion (NPI, Miyake et al. 2023): u_t = c, the source prompt itself, so
  the guided step equals the unguided one and decoding retraces the inversion without
  optimisation;
* null-text inversion (NTI, Mokady et al. 2023): u_t is optimised, step by step, so that the
  guided step from x_t lands on the inversion's x_{t-1}: up to 10 Adam steps per timestep with
  lr = 1e-2 (1 - i / 100), stopping early once the loss is below 1e-5.

Each returns a ``pipeline.Output`` whose ``nfe`` counts teacher evaluations per image (a CFG step
is two; NTI's optimisation steps count one forward each, their backward passes are extra).
"""

from __future__ import annotations

import time

import torch
from tqdm.auto import tqdm

from .checks import check_finite
from .components import Components
from .guidance import cfg, classical_to_code, guided_model
from .pipeline import TAU_FIX, W_FIX, CountCalls, Output, as_prompts, guidance_schedule
from .solver import (ddim_jump, invert_ddim, inversion_timesteps, sample_ddim, sampling_timesteps,
                     timestep_batch)


def _inversion_path(model, z0, cond, steps: int) -> list[torch.Tensor]:
    """Unguided DDIM inversion keeping every point: [x_0, x_19, ..., x_999] for 50 steps."""
    points = []
    x_T = invert_ddim(model, z0, inversion_timesteps(steps), extra_args={"cond": cond},
                      callback=lambda info: points.append(info["x"]), disable=True)
    return points + [x_T]


def prepare(components: Components, images, prompts):
    """(z0, source-prompt embeddings, null-prompt embeddings) of a batch of images."""
    z0 = components.encode_images(images)
    cond = components.encode_prompt(as_prompts(prompts, len(images)))
    null = components.encode_prompt([""] * len(images))
    return z0, cond, null


@torch.no_grad()
def ddim_invert(model, z0, cond, null, w: float = 1.0, tau: float | None = None,
                steps: int = 50) -> torch.Tensor:
    """DDIM inversion z0 -> x_999 of the eps model ``model``, guided by (w, tau) with ``null``
    as the unconditional input (unguided by default)."""
    encoder = guided_model(model, null, guidance_schedule(w, tau))
    return invert_ddim(encoder, z0, inversion_timesteps(steps), extra_args={"cond": cond},
                       disable=True)


@torch.no_grad()
def ddim_decode(model, x_T, cond, null, w: float = 1.0, tau: float | None = None,
                steps: int = 50) -> torch.Tensor:
    """DDIM decoding x_999 -> z0, guided by (w, tau) with ``null`` as the unconditional input."""
    decoder = guided_model(model, null, guidance_schedule(w, tau))
    return sample_ddim(decoder, x_T, sampling_timesteps(steps), extra_args={"cond": cond},
                       disable=True)


@torch.no_grad()
def ddim_reconstruct(components: Components, images: torch.Tensor, prompts, w: float = 1.0,
                     tau: float | None = None, w_encode: float = 1.0, tau_encode=None,
                     steps: int = 50) -> Output:
    """DDIM inversion (guided by ``w_encode``/``tau_encode``, unguided by default) and DDIM
    decoding guided by (w, tau): the paper's fDDIM50 / DDIM50 rows."""
    guidance_schedule(w, tau)  # checks them before any work
    check_finite("w_encode", w_encode, 1, fix=W_FIX)
    if tau_encode is not None:
        check_finite("tau_encode", tau_encode, 0, 1, fix=TAU_FIX)
    begin = time.perf_counter()
    z0, cond, null = prepare(components, images, prompts)
    model = CountCalls(components.eps_model())
    x_T = ddim_invert(model, z0, cond, null, w_encode, tau_encode, steps)
    latents = ddim_decode(model, x_T, cond, null, w, tau, steps)
    return Output(components.decode_latents(latents), latents, model.calls,
                  time.perf_counter() - begin)


@torch.no_grad()
def negative_prompt_reconstruct(components: Components, images: torch.Tensor, prompts,
                                w: float = 8.0, steps: int = 50) -> Output:
    """NPI: unguided DDIM inversion, then guided decoding with the source prompt as the
    unconditional input (so the CFG step reduces to the conditional one)."""
    guidance_schedule(w)  # checks w before any work
    begin = time.perf_counter()
    z0 = components.encode_images(images)
    cond = components.encode_prompt(as_prompts(prompts, len(images)))
    model = CountCalls(components.eps_model())
    x_T = ddim_invert(model, z0, cond, cond, steps=steps)  # unguided: the null input is unused
    latents = ddim_decode(model, x_T, cond, cond, w, steps=steps)
    return Output(components.decode_latents(latents), latents, model.calls,
                  time.perf_counter() - begin)


def null_text_inversion(components: Components, z0: torch.Tensor, cond: torch.Tensor,
                        null: torch.Tensor, w: float = 8.0, steps: int = 50,
                        inner_steps: int = 10, lr: float = 1e-2, early_stop: float = 1e-5,
                        model=None, disable=True):
    """Optimise one unconditional embedding per timestep (Mokady et al. 2023, Algorithm 1).

    Returns (x_999, [u_t for each decoding step]); decoding from x_999 with CFG w and u_t as the
    unconditional input at step i retraces the unguided inversion path.
    """
    w_code = classical_to_code(w)  # checks w (finite, >= 1)
    check_finite("inner_steps", inner_steps, 0, integer=True,
                 fix="Adam steps per timestep, e.g. 10")
    check_finite("lr", lr, 0, low_open=True, fix="Adam's learning rate, e.g. 1e-2")
    check_finite("early_stop", early_stop, 0,
                 fix="the loss below which a timestep stops, e.g. 1e-5")
    model = model or components.eps_model()
    with torch.no_grad():
        path = _inversion_path(model, z0, cond, steps)
    grid = sampling_timesteps(steps)
    x, nulls = path[-1], []
    u = null.float().clone()  # optimised in float32 (Adam's updates vanish in float16)
    for i, (t, s) in enumerate(tqdm(list(zip(grid[:-1], grid[1:])), disable=disable,
                                    desc="null-text inversion")):
        target, t_batch = path[-2 - i], timestep_batch(t, x)
        with torch.no_grad():
            eps_cond = model(x, t_batch, cond)
        u = u.detach().clone().requires_grad_(True)  # a new tensor: Adam updates it in place
        optimizer = torch.optim.Adam([u], lr=lr * (1 - i / 100))
        for _ in range(inner_steps):
            eps = cfg(eps_cond, model(x, t_batch, u.to(null.dtype)), w_code)
            loss = torch.nn.functional.mse_loss(ddim_jump(x, eps, t, s).float(), target.float())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            if loss.item() < early_stop:
                break
        u = u.detach()
        nulls.append(u.to(null.dtype))  # u_t; the next step optimises a clone of it
        with torch.no_grad():
            x = ddim_jump(x, cfg(eps_cond, model(x, t_batch, u.to(null.dtype)), w_code), t, s)
    return path[-1], nulls


def null_text_reconstruct(components: Components, images: torch.Tensor, prompts,
                          w: float = 8.0, steps: int = 50, inner_steps: int = 10) -> Output:
    """NTI: optimise the null embeddings on the unguided inversion path, then decode with CFG w
    using them."""
    begin = time.perf_counter()
    z0, cond, null = prepare(components, images, prompts)
    model = CountCalls(components.eps_model())
    x_T, nulls = null_text_inversion(components, z0, cond, null, w, steps, inner_steps,
                                     model=model)
    w_code = classical_to_code(w)
    x = x_T
    grid = sampling_timesteps(steps)
    with torch.no_grad():
        for (t, s), u in zip(zip(grid[:-1], grid[1:]), nulls):
            t_batch = timestep_batch(t, x)
            x = ddim_jump(x, cfg(model(x, t_batch, cond), model(x, t_batch, u), w_code), t, s)
        images_out = components.decode_latents(x)
    return Output(images_out, x, model.calls, time.perf_counter() - begin)
