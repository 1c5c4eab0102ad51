"""Load the shipped toy-world weights, each checked against the manifest's sha256 first, onto
``device`` (the CPU by default)."""

from __future__ import annotations

from .checkpoints import load_state, read_manifest, verified_path
from .models import build_clip, build_unet, build_vae
from .text import build_tokenizer


def load_clip(tokenizer=None, device="cpu"):
    """The world's CLIP (text and image towers), in eval mode."""
    clip = build_clip(tokenizer or build_tokenizer())
    load_state(verified_path("clip.safetensors"), clip, kind="clip")
    return clip.to(device).eval().requires_grad_(False)


def load_vae(device="cpu"):
    """The world's AutoencoderKL, with the latent scaling factor measured at training."""
    vae = build_vae()
    load_state(verified_path("vae.safetensors"), vae, kind="vae")
    vae.register_to_config(scaling_factor=read_manifest()["vae.safetensors"]["scaling_factor"])
    return vae.to(device).eval().requires_grad_(False)


def load_unet(device="cpu"):
    """The teacher: the EMA weights of the world's UNet2DConditionModel."""
    unet = build_unet()
    load_state(verified_path("unet.safetensors"), unet, kind="unet")
    return unet.to(device).eval().requires_grad_(False)
