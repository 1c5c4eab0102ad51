r"""Text-guided image editing: iCD with Prompt-to-Prompt, and its baselines on the same teacher.

iCD editing (method.md section 5), 8 network evaluations with 4 steps, 6 with 3 ("around 7")::

    x_T  = fCD_m(image; source prompt, unguided)                       m NFE
    [x_src, x_tgt] <- [x_T, x_T]
    for each decoding step (t, s):                                      m NFE (one batch)
        [x_src, x_tgt] = CD_m([x_src, x_tgt], t -> s; [c_src, c_tgt], w_code = [0, w(t)])
        under attention control (``attention.PromptToPrompt``), then the local blend
    edited = D(x_tgt)   (and D(x_src) reconstructs the image)

The source branch is unguided, so it retraces the encoding; the target branch follows the target
prompt under dynamic CFG w(t) (guidance only for t / T <= tau). ``prompt_switch_edit`` is the
paper's SDXL recipe without attention control: decode with the target prompt alone, and on the
unguided steps (t / T > tau) let the source prompt stand in for it.

Baselines (method.md section 6), P2P on a 50-step DDIM decoding of the teacher with CFG on both
branches, ``eps = eps(x, c) + w_code (eps(x, c) - eps(x, u))``, after an unguided DDIM inversion:

* ``"ddim"``: u = the null prompt (P2P on DDIM inversion);
* ``"npi"``: u = the source prompt (negative-prompt inversion);
* ``"nti"``: u = the per-step null embeddings optimised by null-text inversion.

Every editor returns an ``Edit``: the edited images, the source branch's reconstructions, the
network evaluations per edit (a batched call counts once, as the paper's "4 + 4 = 8") and seconds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .attention import PromptToPrompt, attention_control, check_p2p_numbers
from .baselines import ddim_invert, null_text_inversion, prepare
from .checks import check_finite
from .consistency import consistency_fn
from .guidance import cfg, classical_to_code
from .pipeline import CountCalls, ICDPipeline, as_prompts, guidance_schedule
from .solver import ddim_jump, sampling_timesteps, timestep_batch

BASELINES = ("ddim", "npi", "nti")
SD15_BLEND_DOWNSAMPLE = 4  # SD1.5's local blend reads the 16x16 maps of 64x64 latents (P2P)


@dataclass
class Edit:
    """Edited images and source-branch reconstructions in [-1, 1], NFE per edit, seconds."""

    images: torch.Tensor
    reconstructions: torch.Tensor | None
    nfe: int
    seconds: float


@dataclass(frozen=True)
class P2PSettings:
    """The attention-control knobs (see ``attention.py``); defaults follow method.md section 5."""

    cross_fraction: float = 0.3
    self_fraction: float = 0.6
    amplify: float = 4.0
    blend_threshold: float = 0.3
    blend_downsample: int | None = None  # None: 4 on SD1.5 (16x16 maps), all maps on the toy

    def __post_init__(self):
        check_p2p_numbers(cross_fraction=self.cross_fraction, self_fraction=self.self_fraction,
                          amplify=self.amplify, blend_threshold=self.blend_threshold)

    def controller(self, tokenizer, sources, targets, num_steps, blend_words=None,
                   amplify_words=None, preset: str = "toy") -> PromptToPrompt:
        downsample = self.blend_downsample or (SD15_BLEND_DOWNSAMPLE if preset == "sd15"
                                               else None)
        return PromptToPrompt(tokenizer, sources, targets, num_steps, self.cross_fraction,
                              self.self_fraction, self.amplify, amplify_words, blend_words,
                              self.blend_threshold, blend_downsample=downsample)


def _prompt_pairs(components, images, sources, targets):
    """One source and one target prompt per image, as the text encoder reads them (checked)."""
    batch = len(images)
    sources = components.clean_prompts(as_prompts(sources, batch))
    targets = components.clean_prompts(as_prompts(targets, batch))
    if not all(sources) or not all(targets):
        raise ValueError("an edit needs a non-empty source prompt (what the image shows) and a "
                         "non-empty target prompt (the same prompt with the edit made)")
    return sources, targets


def _cleaned(components, words):
    """A tuple of words read like the prompts (lower case, vocabulary checked); None or a
    malformed value passes through, for PromptToPrompt to reject with the expected form."""
    if words is None or isinstance(words, str):
        return words
    return tuple(components.clean_prompts(list(words)))


def _controller(p2p: P2PSettings, components, sources, targets, num_steps: int, blend_words,
                amplify_words) -> PromptToPrompt:
    """The P2P controller of a batch of edits, its blend and amplify words read like the
    prompts."""
    if blend_words is not None and not isinstance(blend_words, str):
        blend_words = [pair if pair is None or isinstance(pair, str)
                       else tuple(_cleaned(components, side) for side in pair)
                       for pair in blend_words]
    if amplify_words is not None and not isinstance(amplify_words, str):
        amplify_words = [_cleaned(components, words) for words in amplify_words]
    return p2p.controller(components.tokenizer, sources, targets, num_steps, blend_words,
                          amplify_words, components.preset)


@torch.no_grad()
def icd_edit(pipeline: ICDPipeline, images: torch.Tensor, sources, targets, w: float = 4.0,
             tau: float | None = 0.8, p2p: P2PSettings = P2PSettings(), blend_words=None,
             amplify_words=None, seed: int = 0) -> Edit:
    """iCD editing of a batch of images (see the module docstring); w is classical (1 = none;
    the authors' SD1.5 scripts use 20 = their 19 in the code unit w - 1, with tau 0.8 and the
    P2P defaults here: ``icd_edit(load_sd15_pipeline(), ..., w=20.0)``; the toy students edit
    best near 4: see
    ``editing_evaluation.W_ICD``); ``tau`` = None guides every step with w; ``seed`` seeds the
    noise that takes the image to t = 19 before encoding.

    ``blend_words``: a list with, per edit, (source words, target words) for P2P's local blend,
    or None, e.g. [(("circle",), ("square",))]; ``amplify_words``: a list with, per edit, the
    target words to reweight, e.g. [("blue",)] (default: the words that changed).
    """
    begin = time.perf_counter()
    guidance = guidance_schedule(w, tau)  # checks w and tau (finite, in range) first
    components, batch = pipeline.base, len(images)
    sources, targets = _prompt_pairs(components, images, sources, targets)
    controller = _controller(p2p, components, sources, targets, pipeline.boundaries.m,
                             blend_words, amplify_words)
    cond = components.encode_prompt(sources + targets)  # [sources; targets], encoded once
    noise, encoder_nfe = pipeline.encode_latents(components.encode_images(images), cond[:batch],
                                                 seed)
    x = noise.repeat(2, 1, 1, 1)
    reverse = CountCalls(pipeline.reverse_student)
    with attention_control(pipeline.reverse_student.unet, controller):
        for i, (t, s) in enumerate(pipeline.boundaries.decoding_steps()):
            controller.begin_step(i)
            w_code = torch.tensor([0.0] * batch + [guidance(t)] * batch, device=x.device)
            x = controller.blend_latents(consistency_fn(reverse, x, t, s, cond, w_code))
        controller.finish()
    reconstructed, edited = components.decode_latents(x).chunk(2)
    return Edit(edited, reconstructed, encoder_nfe + reverse.calls, time.perf_counter() - begin)


@torch.no_grad()
def prompt_switch_edit(pipeline: ICDPipeline, images: torch.Tensor, sources, targets,
                       w: float = 8.0, tau: float = 0.7, seed: int = 0) -> Edit:
    """Encode with the source prompt, decode with the target prompt under dynamic CFG (w, tau);
    on the unguided steps the source prompt's embeddings stand in for the target's (so with
    w = 1 every step is unguided and the result is the reconstruction)."""
    begin = time.perf_counter()
    guidance = guidance_schedule(w, tau)  # checks w and tau first
    components = pipeline.base
    sources, targets = _prompt_pairs(components, images, sources, targets)
    source_cond, target_cond = components.encode_prompt(sources + targets).chunk(2)
    x, encoder_nfe = pipeline.encode_latents(components.encode_images(images), source_cond, seed)
    reverse = CountCalls(pipeline.reverse_student)
    for t, s in pipeline.boundaries.decoding_steps():
        w_code = guidance(t)
        x = consistency_fn(reverse, x, t, s, target_cond if w_code > 0 else source_cond, w_code)
    return Edit(components.decode_latents(x), None, encoder_nfe + reverse.calls,
                time.perf_counter() - begin)


def p2p_ddim_decode(model, x_T: torch.Tensor, cond: torch.Tensor, unconds: list[torch.Tensor],
                    w_code: float, controller: PromptToPrompt, steps: int = 50) -> torch.Tensor:
    """DDIM decoding of the pairs [sources; targets] with CFG on both branches and the
    controller on the conditional pass; ``unconds[i]`` is the unconditional input of step i."""
    grid = sampling_timesteps(steps)
    x = x_T
    for i, (t, s) in enumerate(zip(grid[:-1], grid[1:])):
        controller.begin_step(i)
        t_batch = timestep_batch(t, x)
        eps_cond = model(x, t_batch, cond)
        with controller.paused():
            eps_uncond = model(x, t_batch, unconds[i])
        x = controller.blend_latents(ddim_jump(x, cfg(eps_cond, eps_uncond, w_code), t, s))
    controller.finish()
    return x


def baseline_edit(components, images: torch.Tensor, sources, targets, method: str = "ddim",
                  w: float = 7.5, steps: int = 50, p2p: P2PSettings = P2PSettings(),
                  blend_words=None, amplify_words=None, nti_inner_steps: int = 10) -> Edit:
    """DDIM50 inversion + P2P, NPI + P2P or NTI + P2P on the teacher (``method``)."""
    if method not in BASELINES:
        raise ValueError(f"unknown baseline {method!r}; choose one of {BASELINES}")
    guidance_schedule(w)  # checks w before any work; steps are checked by the DDIM grid
    check_finite("nti_inner_steps", nti_inner_steps, 0, integer=True,
                 fix="Adam steps per timestep of null-text inversion, e.g. 10")
    begin = time.perf_counter()
    sources, targets = _prompt_pairs(components, images, sources, targets)
    z0, source_cond, null = prepare(components, images, sources)
    target_cond = components.encode_prompt(targets)
    model = CountCalls(components.eps_model())
    if method == "nti":
        x_T, nulls = null_text_inversion(components, z0, source_cond, null, w, steps,
                                         nti_inner_steps, model=model)
        unconds = [u.repeat(2, 1, 1) for u in nulls]
    else:
        x_T = ddim_invert(model, z0, source_cond, null, steps=steps)
        uncond = source_cond if method == "npi" else null
        unconds = [uncond.repeat(2, 1, 1)] * steps
    controller = _controller(p2p, components, sources, targets, steps, blend_words,
                             amplify_words)
    with torch.no_grad(), attention_control(components.unet, controller):
        x = p2p_ddim_decode(model, x_T.repeat(2, 1, 1, 1), torch.cat([source_cond, target_cond]),
                            unconds, classical_to_code(w), controller, steps)
        reconstructed, edited = components.decode_latents(x).chunk(2)
    return Edit(edited, reconstructed, model.calls, time.perf_counter() - begin)
