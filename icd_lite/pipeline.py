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

``ICDPipeline`` is a diffusers ``DiffusionPipeline`` whose registered modules are the forward and
reverse student UNets, the VAE, the text encoder, the tokenizer and the scheduler, so it has
``.to(device, dtype)``, ``save_pretrained`` and ``from_pretrained`` like any diffusers pipeline,
and ``pipe(prompt, guidance_scale=...)`` generates as LCM's pipeline does. The shipped toy students
load with ``icd_lite.load_pipeline("G")`` (or ``"G3"``, the 3-step pair, and the ablation recipes
of ``distill.RECIPES``).
"""

from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, DiffusionPipeline, UNet2DConditionModel
from diffusers.image_processor import VaeImageProcessor
from diffusers.utils import logging as diffusers_logging

from .checks import check_finite
from .components import Components, load_components
from .consistency import decode as consistency_decode
from .consistency import encode as consistency_encode
from .device import resolve_device
from .guidance import GuidanceSchedule, classical_to_code, constant_guidance, step_guidance
from .schedule import Boundaries
from .students import UNetStudent
from .world import checkpoints

STUDENTS_DIR = "students"  # shipped pairs: icd_lite/world/weights/students/<recipe>/


@dataclass
class Output:
    """What a pipeline call produced: images in [-1, 1] (None for ``encode``), latents, NFE per
    image and seconds of wall time."""

    images: torch.Tensor | None
    latents: torch.Tensor
    nfe: int
    seconds: float

    def __repr__(self) -> str:
        def shape(x):
            return None if x is None else (f"{type(x).__name__} x {len(x)}" if isinstance(x, list)
                                           else list(x.shape))
        return (f"Output(images={shape(self.images)}, latents={shape(self.latents)}, "
                f"nfe={self.nfe}, seconds={self.seconds:.3f})")


class CountCalls:
    """Wrap a network and count its calls: one call on a batch is one evaluation per image."""

    def __init__(self, model):
        self.model = model
        self.calls = 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        return self.model(*args, **kwargs)


W_FIX = "the classical guidance scale: 1 = unguided, e.g. 4 or 8"
TAU_FIX = "guidance only for t / T <= tau; None guides every step"


def guidance_schedule(w: float, tau: float | None = None) -> GuidanceSchedule:
    """Classical w (1 = unguided), constant when tau is None, else the paper's dynamic CFG; w
    and tau must be finite (ValueError naming them otherwise)."""
    check_finite("w", w, 1, fix=W_FIX)
    if tau is not None:
        check_finite("tau", tau, 0, 1, fix=TAU_FIX)
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


class ICDPipeline(DiffusionPipeline):
    """A forward (encoder, fCD_m) and a reverse (decoder, CD_m) student over the same boundaries.

    Registered modules (saved and loaded by ``save_pretrained`` / ``from_pretrained``):
    ``forward_unet`` and ``reverse_unet`` (``UNet2DConditionModel`` with a guidance embedding,
    ``time_cond_proj_dim``), ``vae``, ``text_encoder``, ``tokenizer``, ``scheduler`` (DDIM, SD1.5
    betas: the schedule the students were distilled on). Config: the boundaries (method.md
    section 3) and the preset ("toy" checks prompts against the toy world's vocabulary).
    """

    model_cpu_offload_seq = "text_encoder->forward_unet->reverse_unet->vae"

    def __init__(self, forward_unet: UNet2DConditionModel, reverse_unet: UNet2DConditionModel,
                 vae: AutoencoderKL, text_encoder, tokenizer, scheduler: DDIMScheduler,
                 reverse_boundaries=(0, 259, 519, 779), forward_boundaries=(259, 519, 779, 999),
                 preset: str = "toy"):
        super().__init__()
        boundaries = Boundaries(reverse_boundaries, forward_boundaries)  # checks them
        self.register_modules(forward_unet=forward_unet, reverse_unet=reverse_unet, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(reverse_boundaries=list(boundaries.reverse),
                                forward_boundaries=list(boundaries.forward), preset=preset)
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.base.vae_scale_factor)

    @classmethod
    def from_components(cls, components: Components, forward_unet: UNet2DConditionModel,
                        reverse_unet: UNet2DConditionModel, boundaries: Boundaries
                        ) -> "ICDPipeline":
        """A pipeline over the VAE, text encoder, tokenizer and scheduler of ``components``."""
        return cls(forward_unet, reverse_unet, components.vae, components.text_encoder,
                   components.tokenizer, components.scheduler, boundaries.reverse,
                   boundaries.forward, components.preset)

    @property
    def boundaries(self) -> Boundaries:
        return Boundaries(self.config.reverse_boundaries, self.config.forward_boundaries)

    @property
    def base(self) -> Components:
        """Prompt encoding and the VAE (``Components``' helpers) over this pipeline's modules."""
        return Components(None, self.vae, self.text_encoder, self.tokenizer, self.scheduler,
                          self.config.preset)

    @property
    def forward_student(self) -> UNetStudent:
        """The encoder as ``eps_hat = student(x, t, s, cond, w_code)`` (icd_lite.consistency)."""
        return UNetStudent(self.forward_unet)

    @property
    def reverse_student(self) -> UNetStudent:
        return UNetStudent(self.reverse_unet)

    @property
    def latent_shape(self) -> tuple[int, int, int]:
        config = self.reverse_unet.config
        return (config.in_channels, config.sample_size, config.sample_size)

    @torch.no_grad()
    def encode(self, images: torch.Tensor, prompts, seed: int = 0) -> Output:
        """Images [B, 3, H, W] in [-1, 1] -> noise x_999 [B, C, h, w] with the forward model,
        unguided; ``seed`` draws the eps that noises z0 to t = 19 (on the CPU, then moved)."""
        begin = time.perf_counter()
        z0 = self.base.encode_images(images)
        cond = self.base.encode_prompt(as_prompts(prompts, len(images)))
        noise, nfe = self.encode_latents(z0, cond, seed)
        return Output(None, noise, nfe, time.perf_counter() - begin)

    @torch.no_grad()
    def encode_latents(self, z0: torch.Tensor, cond: torch.Tensor, seed: int = 0):
        """Scaled VAE latents z0 and prompt embeddings -> (noise x_999, NFE): ``encode`` without
        the VAE and the text encoder, for callers that already have both."""
        student = CountCalls(self.forward_student)
        generator = torch.Generator().manual_seed(seed)  # CPU: the same noise on every device
        noise = consistency_encode(student, z0, self.boundaries, cond, generator=generator)
        return noise, student.calls

    @torch.no_grad()
    def decode(self, noise: torch.Tensor, prompts, w: float = 1.0,
               tau: float | None = None) -> Output:
        """Noise x_999 [B, C, h, w] -> images [B, 3, H, W] in [-1, 1] with the reverse model
        under guidance (classical w, dynamic CFG for t / T <= tau)."""
        if tuple(noise.shape[1:]) != self.latent_shape:
            raise ValueError(f"noise must have shape [B, {', '.join(map(str, self.latent_shape))}]"
                             f" for this model, got {tuple(noise.shape)}")
        if not bool(torch.isfinite(noise).all()):
            raise ValueError("noise (latents) contains NaN or infinite values; draw it with "
                             "torch.randn or take it from encode(...).latents")
        guidance = guidance_schedule(w, tau)  # checks w and tau before any work
        begin = time.perf_counter()
        cond = self.base.encode_prompt(as_prompts(prompts, len(noise)))
        student = CountCalls(self.reverse_student)
        noise = noise.to(self.device, self.reverse_unet.dtype)
        latents = consistency_decode(student, noise, self.boundaries, cond, guidance)
        images = self.base.decode_latents(latents)
        return Output(images, latents, student.calls, time.perf_counter() - begin)

    def generate(self, prompts, w: float = 8.0, tau: float | None = 0.8, seed: int = 0,
                 num_images: int | None = None) -> Output:
        """Images from prompts: noise drawn from a CPU generator seeded with ``seed`` (so a seed
        gives the same image on any device), moved to the pipeline's device and decoded."""
        prompts = [prompts] * (num_images or 1) if isinstance(prompts, str) else list(prompts)
        generator = torch.Generator().manual_seed(seed)
        noise = torch.randn((len(prompts), *self.latent_shape), generator=generator)  # CPU
        return self.decode(noise.to(self.device), prompts, w, tau)

    def reconstruct(self, images: torch.Tensor, prompts, w: float = 1.0,
                    tau: float | None = None, seed: int = 0) -> Output:
        """Inversion: encode, then decode with the same prompt (NFE and time of both)."""
        guidance_schedule(w, tau)  # checks w and tau before encoding
        encoded = self.encode(images, prompts, seed)
        decoded = self.decode(encoded.latents, prompts, w, tau)
        return Output(decoded.images, decoded.latents, encoded.nfe + decoded.nfe,
                      encoded.seconds + decoded.seconds)

    def __call__(self, prompt, num_inference_steps: int | None = None,
                 guidance_scale: float = 8.0, tau: float | None = 0.8,
                 num_images_per_prompt: int = 1, generator: torch.Generator | None = None,
                 latents: torch.Tensor | None = None, output_type: str = "pil",
                 return_dict: bool = True):
        """Text-to-image as diffusers' LCM pipeline is called: ``pipe(prompt, guidance_scale=8)``.

        ``guidance_scale`` is the classical w (1 = unguided), ``tau`` the dynamic-CFG threshold
        (None: constant guidance); ``num_inference_steps``, if given, must equal the number of
        boundaries m (a consistency pair decodes in exactly m steps); ``generator`` (a CPU
        generator, as in diffusers' docs on reproducibility) or ``latents`` [B, C, h, w] fix the
        noise. ``output_type``: "pil", "np" or "pt" (images in [0, 1]); "latent" returns the
        latents. Returns ``Output`` (images, latents, nfe, seconds), or a tuple
        ``(images, nfe)`` with ``return_dict=False``.
        """
        check_finite("guidance_scale", guidance_scale, 1, fix=W_FIX)
        if num_inference_steps is not None and num_inference_steps != self.boundaries.m:
            raise ValueError(f"this pair decodes in m = {self.boundaries.m} steps (its "
                             f"boundaries); got num_inference_steps={num_inference_steps}")
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        prompts = [p for p in prompts for _ in range(num_images_per_prompt)]
        if latents is None:
            generator = generator or torch.Generator().manual_seed(0)
            latents = torch.randn((len(prompts), *self.latent_shape), generator=generator,
                                  dtype=torch.float32)
        output = self.decode(latents.to(self.device), prompts, guidance_scale, tau)
        if output_type == "latent":
            output.images = output.latents
        else:
            output.images = self.image_processor.postprocess(output.images.float(),
                                                             output_type=output_type)
        return output if return_dict else (output.images, output.nfe)


def shipped_recipes() -> list[str]:
    """The recipes whose student pair ships with the toy world (see ``distill.RECIPES``)."""
    manifest = checkpoints.read_manifest()
    names = {name.split("/")[1] for name in manifest if name.startswith(STUDENTS_DIR + "/")}
    return sorted(names)


def student_folder(recipe_name: str) -> Path:
    """The folder of a shipped pair, after checking both UNets' weights against the manifest."""
    if recipe_name not in shipped_recipes():
        raise ValueError(f"no shipped student pair {recipe_name!r}; the toy world ships "
                         f"{', '.join(shipped_recipes())} (distil others with "
                         f"`python -m icd_lite.distill --recipe NAME`)")
    folder = checkpoints.WEIGHTS_DIR / STUDENTS_DIR / recipe_name
    for role in ("forward_unet", "reverse_unet"):
        name = f"{STUDENTS_DIR}/{recipe_name}/{role}/diffusion_pytorch_model.safetensors"
        checkpoints.verified_path(name)
    return folder


def load_pipeline(recipe_name: str = "G", components: Components | None = None,
                  device: str | torch.device | None = None) -> ICDPipeline:
    """The shipped student pair of ``recipe_name`` on the toy world, ready to encode / decode.

    It shares the VAE, text encoder, tokenizer and scheduler of ``components`` (loaded on
    ``device`` when not given; default CPU, "auto" picks CUDA when available) and runs on their
    device. Weights are checked against the manifest's sha256 before loading.
    """
    if components is None:
        components = load_components("toy", device="cpu" if device is None else device)
    elif device is not None and resolve_device(device) != components.device:
        raise ValueError(f"device {device!r} differs from the components' {components.device}; "
                         f"load the components on that device, or omit device")
    return load_pair(student_folder(recipe_name), components)


def load_pair(folder: Path, components: Components) -> ICDPipeline:
    """A pair saved by ``save_students`` in ``folder`` (checked by the caller), on the device
    and dtype of ``components``, whose VAE, text encoder, tokenizer and scheduler it shares."""
    with _quiet_loading():
        pipe = ICDPipeline.from_pretrained(folder, vae=components.vae,
                                           text_encoder=components.text_encoder,
                                           tokenizer=components.tokenizer,
                                           scheduler=components.scheduler)
        for unet in (pipe.forward_unet, pipe.reverse_unet):  # float16 on disk
            unet.to(components.device, components.vae.dtype).eval().requires_grad_(False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@contextmanager
def _quiet_loading():
    """Load a shipped pair without diffusers' "Loading pipeline components" bar and its notice
    about casting the float16 files to float32 (a cast that is exact)."""
    was_enabled, verbosity = (diffusers_logging.is_progress_bar_enabled(),
                              diffusers_logging.get_verbosity())
    diffusers_logging.disable_progress_bar()
    diffusers_logging.set_verbosity_error()
    try:
        yield
    finally:
        diffusers_logging.set_verbosity(verbosity)
        if was_enabled:
            diffusers_logging.enable_progress_bar()


def load_pipelines(components: Components, recipes=None) -> dict[str, ICDPipeline]:
    """An ICDPipeline for each shipped recipe (or for ``recipes``), sharing the components."""
    return {name: load_pipeline(name, components) for name in (recipes or shipped_recipes())}


def save_students(pipe: ICDPipeline, folder: Path) -> list[Path]:
    """Write the pair as ``save_pretrained`` does, less the modules shared with the toy world:
    ``model_index.json`` and ``forward_unet/``, ``reverse_unet/`` (config + safetensors).
    Returns the two weights files."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    paths = []
    for role in ("forward_unet", "reverse_unet"):
        getattr(pipe, role).save_pretrained(folder / role)
        paths.append(folder / role / "diffusion_pytorch_model.safetensors")
    return paths
