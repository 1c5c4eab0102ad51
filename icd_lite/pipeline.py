r"""The iCD pipeline: encode an image to noise, decode noise to an image, generate from a prompt.

A distilled pair of students (see ``distill.py``) gives three operations, each in m network
evaluations (NFE) with m boundaries (method.md section 5)::

    encode:    z0 = E(image);  x_19 = alpha_19 z0 + sigma_19 eps;  x_19 -> b_1 -> ... -> x_999
               forward model fCD_m, unguided, source prompt
    decode:    x_999 -> ... -> b_1 -> z0;  image = D(z0)
               reverse model CD_m, guidance w(t) through the guidance embedding (one pass a step)
    generate:  decode from seeded Gaussian noise

Every call returns an ``Output`` with the images, the latents, the number of network evaluations
per image (a CFG step of a teacher counts two, a step of the guidance-embedded student one) and the
wall time. Guidance is given in the classical unit w (1 = unguided); ``tau`` switches on the
paper's dynamic CFG: guidance only for t / T <= tau.

The shipped toy students load with ``icd_lite.distill.load_pipeline("G")``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch

from .components import Components
from .consistency import decode as consistency_decode
from .consistency import encode as consistency_encode
from .guidance import GuidanceSchedule, classical_to_code, constant_guidance, step_guidance
from .schedule import Boundaries


@dataclass
class Output:
    """What a pipeline call produced: images in [-1, 1] (None for ``encode``), latents, NFE per
    image and seconds of wall time."""

    images: torch.Tensor | None
    latents: torch.Tensor
    nfe: int
    seconds: float


class CountCalls:
    """Wrap a network and count its calls: one call on a batch is one evaluation per image."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


def guidance_schedule(w: float, tau: float | None = None) -> GuidanceSchedule:
    """Classical w (1 = unguided), constant when tau is None, else the paper's dynamic CFG."""
    w_code = classical_to_code(w)
    return constant_guidance(w_code) if tau is None else step_guidance(w_code, tau)


def as_prompts(prompts, batch: int) -> list[str]:
    """One prompt for every image: a single string is repeated."""
    if isinstance(prompts, str):
        return [prompts] * batch
    prompts = list(prompts)
    if len(prompts) != batch:
        raise ValueError(f"got {len(prompts)} prompts for {batch} images; give one prompt per "
                         f"image or a single string for all of them")
    return prompts


class ICDPipeline:
    """A forward (encoder) and a reverse (decoder) student over the same boundaries."""

    def __init__(self, components: Components, forward_student, reverse_student,
                 boundaries: Boundaries):
        self.components = components
        self.forward_student = forward_student
        self.reverse_student = reverse_student
        self.boundaries = boundaries

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.components.unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, prompts, seed: int = 0) -> Output:
        """Images [B, 3, H, W] in [-1, 1] -> noise x_999 with the forward model, unguided."""
        begin = time.perf_counter()
        z0 = self.components.encode_images(images)
        cond = self.components.encode_prompt(as_prompts(prompts, len(images)))
        noise, nfe = self.encode_latents(z0, cond, seed)
        return Output(None, noise, nfe, time.perf_counter() - begin)

    @torch.no_grad()
    def encode_latents(self, z0: torch.Tensor, cond: torch.Tensor, seed: int = 0):
        """Scaled VAE latents z0 and prompt embeddings -> (noise x_999, NFE): ``encode`` without
        the VAE and the text encoder, for callers that already have both."""
        student = CountCalls(self.forward_student)
        generator = torch.Generator().manual_seed(seed)
        noise = consistency_encode(student, z0, self.boundaries, cond, generator=generator)
        return noise, student.calls

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, prompts, w: float = 1.0,
               tau: float | None = None) -> Output:
        """Noise x_999 [B, C, h, w] -> images with the reverse model under guidance (w, tau)."""
        if tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise must have shape [B, {', '.join(map(str, self.latent_shape))}]"
                             f" for this model, got {tuple(noise.shape)}")
        begin = time.perf_counter()
        cond = self.components.encode_prompt(as_prompts(prompts, len(noise)))
        student = CountCalls(self.reverse_student)
        latents = consistency_decode(student, noise, self.boundaries, cond,
                                     guidance_schedule(w, tau))
        images = self.components.decode_latents(latents)
        return Output(images, latents, student.calls, time.perf_counter() - begin)

    def generate(self, prompts, w: float = 8.0, tau: float | None = 0.8, seed: int = 0,
                 num_images: int | None = None) -> Output:
        """Images from prompts: seeded noise decoded by the reverse model."""
        prompts = [prompts] * (num_images or 1) if isinstance(prompts, str) else list(prompts)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.latent_shape), generator=generator)
        return self.decode(noise, prompts, w, tau)

    def reconstruct(self, images: torch.Tensor, prompts, w: float = 1.0,
                    tau: float | None = None, seed: int = 0) -> Output:
        """Inversion: encode, then decode with the same prompt (NFE and time of both)."""
        encoded = self.encode(images, prompts, seed)
        decoded = self.decode(encoded.latents, prompts, w, tau)
        return Output(decoded.images, decoded.latents, encoded.nfe + decoded.nfe,
                      encoded.seconds + decoded.seconds)
