"""The SD1.5 pipeline: an ``ICDPipeline`` that also carries plain Stable Diffusion 1.5's UNet.

At the toy scale the teacher baselines (DDIM / NPI / NTI + P2P) run on ``load_components("toy")``.
At SD1.5 they run on the plain SD1.5 UNet with real two-pass CFG (method.md section 6), while the
students are the CFG-distilled teacher plus the authors' LoRAs. So this pipeline registers one
more module, ``base_unet``, and its ``base`` hands it out as the ``Components`` teacher::

    pipe = icd_lite.load_sd15_pipeline()
    icd_edit(pipe, images, source, target, w=20.0)          # the students, 8 NFE
    baseline_edit(pipe.base, images, source, target, "npi")  # SD1.5 + CFG, 50 steps

Everything else (encode, decode, generate, reconstruct, ``__call__``) is ``ICDPipeline``'s.
"""

from __future__ import annotations

import torch
from diffusers import UNet2DConditionModel

from ..components import Components
from ..pipeline import ICDPipeline


class SD15Pipeline(ICDPipeline):
    """``ICDPipeline`` + ``base_unet`` (plain SD1.5, for the baselines) + the release's name.

    ``config.image_fit`` ("resize" or "crop"; ``pipe.register_to_config(image_fit="crop")``)
    says how images of another size than the VAE's (512x512) are brought to it, with a warning.

    ``forward_unet`` / ``reverse_unet`` are the students: UNets with the LoRA fused in, or
    ``AdapterView``s of one UNet holding both LoRAs as peft adapters (see ``loading``).
    """

    model_cpu_offload_seq = "text_encoder->forward_unet->reverse_unet->base_unet->vae"

    def __init__(self, forward_unet, reverse_unet, vae, text_encoder, tokenizer, scheduler,
                 reverse_boundaries=(0, 259, 519, 779), forward_boundaries=(259, 519, 779, 999),
                 preset: str = "sd15", base_unet: UNet2DConditionModel | None = None,
                 release: str | None = None, image_fit: str = "resize"):
        super().__init__(forward_unet, reverse_unet, vae, text_encoder, tokenizer, scheduler,
                         reverse_boundaries, forward_boundaries, preset)
        self.register_modules(base_unet=base_unet)
        self.register_to_config(release=release, image_fit=image_fit)

    @property
    def base(self) -> Components:
        """Prompts, VAE and the plain SD1.5 UNet (``unet``; None if loaded without it)."""
        return Components(getattr(self, "base_unet", None), self.vae, self.text_encoder,
                          self.tokenizer, self.scheduler, self.config.preset,
                          image_fit=getattr(self.config, "image_fit", "resize"))


class AdapterView(torch.nn.Module):
    """One named peft adapter of a shared UNet, seen as a UNet of its own.

    The forward and reverse LoRAs then live on one copy of the teacher (less memory than two
    fused copies; see ``loading.load_sd15_pipeline(fuse=False)``); each call first activates
    its adapter with diffusers' ``set_adapter``. Attention processors, config, device and dtype
    are the shared UNet's.
    """

    def __init__(self, unet: UNet2DConditionModel, adapter: str):
        super().__init__()
        self.unet, self.adapter = unet, adapter

    @property
    def config(self):
        return self.unet.config

    @property
    def dtype(self) -> torch.dtype:
        return self.unet.dtype

    @property
    def device(self) -> torch.device:
        return self.unet.device

    @property
    def attn_processors(self):
        return self.unet.attn_processors

    def set_attn_processor(self, processors) -> None:
        self.unet.set_attn_processor(processors)

    def forward(self, *args, **kwargs):
        if self.unet.active_adapters() != [self.adapter]:
            self.unet.set_adapter(self.adapter)
            self.unet.requires_grad_(False)  # peft marks an activated adapter trainable
        return self.unet(*args, **kwargs)
