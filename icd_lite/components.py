"""One loading function for both scales: the toy world (default, CPU, offline) and SD1.5.

``load_components("toy")`` and ``load_components("sd15")`` return the same ``Components``: the
diffusers / transformers objects Stable Diffusion is made of (UNet, VAE, text encoder, tokenizer,
scheduler), plus helpers that speak the library's conventions (prompts -> embeddings, images
<-> scaled latents, and the UNet as an eps model ``eps(x, t, cond)`` for ``icd_lite.solver``).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDIMScheduler, UNet2DConditionModel
from transformers import CLIPTextModel, CLIPTokenizer

from .checks import check_image_values
from .device import resolve_device
from .schedule import NUM_TRAIN_TIMESTEPS
from .world.loading import load_clip, load_unet, load_vae
from .world.models import text_encoder_from_clip
from .world.text import build_tokenizer, check_prompt, tokenize

SD15_MODEL_ID = "stable-diffusion-v1-5/stable-diffusion-v1-5"


def ddim_scheduler() -> DDIMScheduler:
    """diffusers' DDIM with the conventions of icd_lite: SD1.5 betas, trailing spacing, and
    alpha = 1 at the clean end."""
    return DDIMScheduler(num_train_timesteps=NUM_TRAIN_TIMESTEPS, beta_start=0.00085,
                         beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                         set_alpha_to_one=True, timestep_spacing="trailing", steps_offset=1)


@dataclass
class Components:
    """The modules of a Stable-Diffusion-type model and helpers in icd_lite's conventions.

    ``unet`` is the teacher (None in an ``ICDPipeline.base``, which has students instead)."""

    unet: UNet2DConditionModel | None
    vae: AutoencoderKL
    text_encoder: torch.nn.Module
    tokenizer: object
    scheduler: DDIMScheduler
    preset: str
    clip: torch.nn.Module | None = None  # the toy world's CLIP, used by the metrics
    image_fit: str = "resize"  # SD1.5: how other image sizes reach the VAE's (fit_images)

    @property
    def image_size(self) -> int:
        return self.vae.config.sample_size

    @property
    def vae_scale_factor(self) -> int:
        """Image pixels per latent cell along a side: 8 on SD1.5, 4 on the toy world."""
        return 2 ** (len(self.vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        """Where the models run (the VAE's device; every module is moved together)."""
        return self.vae.device

    def clean_prompts(self, prompts) -> list[str]:
        """The prompts as the text encoder reads them: on the toy world lower-cased and checked
        against its vocabulary (an unknown word is an error that lists the vocabulary)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if self.preset == "toy":
            return [check_prompt(p, self.tokenizer) for p in prompts]
        return list(prompts)

    @torch.no_grad()
    def encode_prompt(self, prompts: list[str]) -> torch.Tensor:
        """Text embeddings [B, L, D] (the UNet's cross-attention input); "" is the null prompt."""
        tokens = tokenize(self.tokenizer, self.clean_prompts(prompts))
        mask = None  # SD1.5's text encoder reads the padding; the toy one masks it (see models)
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = tokens.attention_mask.to(self.device)
        return self.text_encoder(tokens.input_ids.to(self.device), attention_mask=mask)[0]

    def check_images(self, images: torch.Tensor) -> None:
        """ValueError unless ``images`` is a float batch [B, 3, H, W] of finite values in
        [-1, 1] at the VAE's size.

        An image with no negative value is how a [0, 1] image looks on this scale, and encoding
        one gives a wrong picture (a reconstruction at 8.7 dB instead of 29.0), so it gets a
        ``checks.ImageRangeWarning`` naming the image and the conversion. A warning, not an
        error: a legal picture may be pale everywhere (a photograph of fog or snow; a mid-gray
        picture given to the command line), while the toy world's own images never trigger it
        (measured: 0 of 2000 scenes, 0 of 600 ToyBench images).
        """
        size = self.image_size
        if not torch.is_tensor(images) or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be a float tensor [B, 3, {size}, {size}] in [-1, 1]; "
                             f"got {getattr(images, 'shape', type(images))}. Convert RGBA or "
                             f"grayscale pictures to RGB first")
        if images.shape[-2:] != (size, size):
            raise ValueError(f"the {self.preset} VAE expects {size}x{size} images, got "
                             f"{tuple(images.shape[-2:])}; resize them first")
        check_image_values(images, zero_one="ignore")  # NaN / inf first: they pass min and max
        if images.min() < -1.001 or images.max() > 1.001:
            raise ValueError("images must lie in [-1, 1] (map uint8 pixels with x / 127.5 - 1)")
        check_image_values(images, zero_one="warn")

    def fit_images(self, images: torch.Tensor) -> torch.Tensor:
        """On SD1.5, images [B, 3, H, W] of another size than the VAE's S x S (512) are brought
        to it with an ``ImageResizeWarning`` that says how: ``image_fit`` "resize" (the authors'
        ``load_512``: plain bilinear resize, the aspect ratio changes when H != W) or "crop"
        (centre-crop the largest square, then resize). The toy world refuses other sizes
        (``check_images``); anything that is not a [B, 3, H, W] tensor is left to it."""
        size = self.image_size
        if (self.preset != "sd15" or not torch.is_tensor(images) or images.ndim != 4
                or images.shape[1] != 3 or tuple(images.shape[-2:]) == (size, size)):
            return images
        height, width = images.shape[-2:]
        if self.image_fit == "crop":
            side = min(height, width)
            top, left = (height - side) // 2, (width - side) // 2
            images = images[..., top:top + side, left:left + side]  # (B, 3, side, side)
            how = f"centre-cropped to {side}x{side} and resized"
        else:
            how = "resized" + (" (aspect ratio changed)" if height != width else "")
        fitted = F.interpolate(images.float(), size=(size, size), mode="bilinear",
                               align_corners=False, antialias=True)  # (B, 3, S, S)
        warnings.warn(f"images of {width}x{height} (W x H) were {how} to {size}x{size}, the "
                      f"VAE's size; pass {size}x{size} images, or set image_fit='crop' / "
                      f"'resize' to choose how", ImageResizeWarning, stacklevel=3)
        return fitted.clamp(-1, 1).to(images.dtype)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """z0 = VAE posterior mean * scaling_factor (SD's 0.18215; measured for the toy VAE).
        On SD1.5 images of another size are first resized or cropped (``fit_images``)."""
        images = self.fit_images(images)
        self.check_images(images)
        latents = self.vae.encode(images.to(self.device, self.vae.dtype)).latent_dist.mean
        return latents * self.vae.config.scaling_factor

    @torch.no_grad()
    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Images in [-1, 1] from scaled latents."""
        images = self.vae.decode(latents / self.vae.config.scaling_factor).sample
        return images.clamp(-1, 1)

    def eps_model(self):
        """The UNet as ``eps(x, t, cond)`` for ``sample_ddim`` / ``invert_ddim`` / the losses.

        Raises ValueError when there is no teacher (an ``ICDPipeline.base`` has students only)."""
        if self.unet is None:
            raise ValueError("these components have no teacher UNet (an ICDPipeline's base holds "
                             "students only); pass load_components('toy') to the baselines")

        def eps(x, t, cond):
            return self.unet(x, t, encoder_hidden_states=cond).sample
        return eps


class ImageResizeWarning(UserWarning):
    """Images of another size than the SD1.5 VAE's were resized or cropped to it."""


def sd15_dtype(device: torch.device, dtype: torch.dtype | None) -> torch.dtype:
    """float16 on CUDA and float32 on the CPU when ``dtype`` is None; float16 on the CPU is
    refused (ValueError: these models are slow and inexact there)."""
    if dtype is None:
        return torch.float16 if device.type == "cuda" else torch.float32
    if dtype == torch.float16 and device.type == "cpu":
        raise ValueError("float16 on a CPU is not supported by these models; use float32 "
                         "(dtype=None picks float16 on CUDA and float32 on the CPU)")
    return dtype


def load_components(preset: str = "toy", device: str | torch.device = "cpu",
                    model_id: str = SD15_MODEL_ID, dtype: torch.dtype | None = None) -> Components:
    """The model of ``preset``: "toy" (shipped weights, checked against their sha256) or "sd15"
    (Stable Diffusion 1.5 from the Hugging Face hub or a local copy: ``model_id`` may be a
    path), with every module on ``device`` ("cpu", "cuda", "cuda:N", or "auto": CUDA when
    available). Raises ValueError for an unknown preset or a device this machine lacks."""
    device = resolve_device(device)
    if preset == "toy":
        tokenizer = build_tokenizer()
        clip = load_clip(tokenizer)
        components = Components(load_unet(), load_vae(), text_encoder_from_clip(clip),
                                tokenizer, ddim_scheduler(), "toy", clip)
    elif preset == "sd15":
        components = _load_sd15(model_id, dtype)
    else:
        raise ValueError(f"unknown preset {preset!r}; choose 'toy' or 'sd15'")
    for module in (components.unet, components.vae, components.text_encoder, components.clip):
        if module is not None:
            module.to(device).eval().requires_grad_(False)
    return components


def _load_sd15(model_id, dtype, revision: str | None = None,
               with_unet: bool = True) -> Components:
    """SD1.5's modules (hub id or local folder, at ``revision``) in ``dtype``, on the CPU;
    ``with_unet=False`` leaves the UNet out (``unet`` None)."""
    if dtype == torch.float16 and not torch.cuda.is_available():
        raise ValueError("float16 on a CPU is not supported by these models; use float32")
    model_id = str(model_id)
    try:
        unet = (UNet2DConditionModel.from_pretrained(model_id, subfolder="unet",
                                                     revision=revision, torch_dtype=dtype)
                if with_unet else None)
        vae = AutoencoderKL.from_pretrained(model_id, subfolder="vae", revision=revision,
                                            torch_dtype=dtype)
        text_encoder = CLIPTextModel.from_pretrained(model_id, subfolder="text_encoder",
                                                     revision=revision, torch_dtype=dtype)
        tokenizer = CLIPTokenizer.from_pretrained(model_id, subfolder="tokenizer",
                                                  revision=revision)
    except OSError as error:
        raise OSError(f"could not load Stable Diffusion 1.5 from {model_id!r}: it needs access to "
                      f"the Hugging Face hub (unset HF_HUB_OFFLINE) or a local copy of the "
                      f"model (pass its folder as model_id). Original error: {error}") from None
    return Components(unet, vae, text_encoder, tokenizer, ddim_scheduler(), "sd15")
