"""iCD students on a UNet: the teacher's UNet plus a guidance embedding, as full copies or LoRA.

Both students of iCD start as copies of the teacher (method.md section 3). The reverse student also
reads the guidance scale: LCM's recipe adds a linear layer ``time_embedding.cond_proj`` that maps
the sinusoidal embedding of ``w_code * 1000`` (``guidance.guidance_embedding``) into the
timestep embedding (``UNet2DConditionModel(time_cond_proj_dim=...)``, input ``timestep_cond``).
Initialising that layer to zero makes the student *exactly* the teacher at step 0, whatever w.

``UNetStudent`` adapts the UNet to the student signature of ``icd_lite.losses`` and
``icd_lite.consistency``: ``eps_hat = student(x, t, s, cond, w_code)``. Like the authors' code, the
UNet sees t (and w), not s: the boundary is a function of t on the DDIM grid.

On SD1.5 the students are LoRA adapters (rank 64 on the layers listed in ``SD15_LORA_TARGETS``,
method.md section 3), added with peft through diffusers' ``add_adapter``.
"""

from __future__ import annotations

import copy

import torch
from diffusers import UNet2DConditionModel
from torch import nn

from .guidance import guidance_embedding

SD15_LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "proj_out", "ff.net.0.proj",
                     "ff.net.2", "conv1", "conv2", "conv_shortcut", "downsamplers.0.conv",
                     "upsamplers.0.conv", "time_emb_proj"]


class UNetStudent(nn.Module):
    """eps_theta(x_t, t, c, w) from a UNet with a guidance embedding; ``s`` is not an input."""

    def __init__(self, unet: UNet2DConditionModel):
        super().__init__()
        if unet.config.time_cond_proj_dim is None:
            raise ValueError("the student UNet needs time_cond_proj_dim for the guidance "
                             "embedding; build it with student_from_teacher(teacher)")
        self.unet = unet

    def forward(self, x, t, s, cond, w_code):
        # On the CPU whatever the device: its angles reach 2e4 rad, where a GPU's sin rounds
        # differently, and the same w must give the same embedding (and image) everywhere.
        embedding = guidance_embedding(w_code.float().cpu(), self.unet.config.time_cond_proj_dim)
        return self.unet(x, t, encoder_hidden_states=cond,
                         timestep_cond=embedding.to(x.device, x.dtype)).sample


def student_from_teacher(teacher: UNet2DConditionModel, embedding_dim: int | None = None
                         ) -> UNetStudent:
    """A full copy of the teacher with a zero-initialised guidance projection.

    ``embedding_dim`` defaults to min(512, twice the first block's width): 512 on SD1.5, as in
    method.md section 2, and 128 on the toy UNet.
    """
    if teacher.config.time_cond_proj_dim is not None:
        raise ValueError("the teacher already has a guidance embedding (time_cond_proj_dim); "
                         "pass the plain teacher UNet")
    dim = embedding_dim or min(512, 2 * teacher.config.block_out_channels[0])
    unet = UNet2DConditionModel.from_config(teacher.config, time_cond_proj_dim=dim)
    missing, unexpected = unet.load_state_dict(teacher.state_dict(), strict=False)
    if missing != ["time_embedding.cond_proj.weight"] or unexpected:
        raise RuntimeError(f"teacher and student differ beyond the guidance projection: "
                           f"missing {missing}, unexpected {unexpected}")
    nn.init.zeros_(unet.time_embedding.cond_proj.weight)  # the student starts as the teacher
    if unet.dtype != teacher.dtype:
        unet = unet.to(dtype=teacher.dtype)
    return UNetStudent(unet.to(teacher.device))


def add_lora(student: UNetStudent, rank: int = 64, targets=SD15_LORA_TARGETS,
             lora_alpha: int | None = None, train_guidance: bool = True,
             init_lora_weights="gaussian") -> UNetStudent:
    """Freeze the student's UNet and train only LoRA adapters (peft) and the guidance projection.

    Targets that the UNet does not have (a tiny UNet has no ``conv_shortcut`` in every block) are
    simply not matched by peft; at least one must match. ``lora_alpha`` defaults to ``rank``
    (scale 1, the toy world); the SD1.5 release used peft's default 8 with rank 64 (scale
    0.125) and peft's default init (``init_lora_weights=True``). ``train_guidance=False`` keeps
    ``time_embedding.cond_proj`` frozen (a student of a CFG-distilled teacher keeps its
    projection, as the release did).
    """
    from peft import LoraConfig

    unet = student.unet
    unet.requires_grad_(False)
    names = {name for name, _ in unet.named_modules()}
    present = [t for t in targets if any(name == t or name.endswith("." + t) for name in names)]
    if not present:
        raise ValueError(f"none of the LoRA targets {targets} exist in this UNet")
    unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank if lora_alpha is None else lora_alpha,
                                init_lora_weights=init_lora_weights, target_modules=present))
    unet.time_embedding.cond_proj.requires_grad_(train_guidance)
    return student


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    return [p for p in module.parameters() if p.requires_grad]


def merged_unet(student: UNetStudent) -> UNet2DConditionModel:
    """A plain copy of the student's UNet with any LoRA adapters fused into its weights, so that
    it saves and loads like a full student."""
    unet = copy.deepcopy(student.unet)
    if getattr(unet, "peft_config", None):
        unet.fuse_lora()
        unet.unload_lora()
    return unet
