"""The networks of the toy world, as the same diffusers / transformers types Stable Diffusion uses.

| SD1.5 component            | toy world                                                      |
|----------------------------|----------------------------------------------------------------|
| CLIP ViT-L/14 text encoder | ``CLIPTextModel``, 2 layers, width 64, word-level vocabulary    |
| (CLIP image tower, metrics)| ``CLIPVisionModel``, 3 layers, width 64, 4x4 patches of 32x32  |
| ``AutoencoderKL`` f = 8    | ``AutoencoderKL`` f = 4: 32x32x3 images <-> 8x8x4 latents       |
| ``UNet2DConditionModel``   | the same class, 1.7M parameters, cross-attention to the text    |

All sizes were chosen by measurement on a 2-core CPU (see the training table of docs/world.md).
"""

from __future__ import annotations

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPConfig, CLIPModel, CLIPTextModel, CLIPVisionConfig

from .scenes import IMAGE_SIZE
from .text import text_encoder_config

LATENT_CHANNELS = 4
LATENT_SIZE = 8


def clip_config(tokenizer) -> CLIPConfig:
    """A tiny CLIP: the text encoder of ``text.py`` and a 3-layer ViT on 4x4 patches."""
    text = text_encoder_config(tokenizer)
    vision = CLIPVisionConfig(image_size=IMAGE_SIZE, patch_size=4, num_channels=3,
                              hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                              num_attention_heads=4, projection_dim=64)
    return CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                      projection_dim=64)


def build_clip(tokenizer) -> CLIPModel:
    return CLIPModel(clip_config(tokenizer))


def text_encoder_from_clip(clip: CLIPModel) -> CLIPTextModel:
    """The text tower of the world's CLIP as a standalone ``CLIPTextModel`` (what SD loads).

    It was trained (and the teacher conditioned) with the padding masked out, so its config says
    ``use_attention_mask``: diffusers' StableDiffusionPipeline then passes the mask too. Without
    it the padding positions' hidden states change and the teacher's colour accuracy falls from
    96 % to 87 % (measured).
    """
    encoder = CLIPTextModel(clip.config.text_config)
    encoder.config.use_attention_mask = True
    # transformers 4 nests the transformer as `.text_model`; transformers 5 flattens it.
    getattr(encoder, "text_model", encoder).load_state_dict(clip.text_model.state_dict())
    return encoder.eval()


def build_vae() -> AutoencoderKL:
    """AutoencoderKL with 3 levels (two 2x downsamplings): 32x32x3 -> 8x8x4."""
    return AutoencoderKL(in_channels=3, out_channels=3,
                         down_block_types=("DownEncoderBlock2D",) * 3,
                         up_block_types=("UpDecoderBlock2D",) * 3,
                         block_out_channels=(16, 32, 32), layers_per_block=1,
                         latent_channels=LATENT_CHANNELS, norm_num_groups=16,
                         sample_size=IMAGE_SIZE)


def build_unet(cross_attention_dim: int = 64, time_cond_proj_dim: int | None = None):
    """The teacher's UNet on 8x8x4 latents (students add ``time_cond_proj_dim``)."""
    return UNet2DConditionModel(
        sample_size=LATENT_SIZE, in_channels=LATENT_CHANNELS, out_channels=LATENT_CHANNELS,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        block_out_channels=(64, 64), layers_per_block=1, norm_num_groups=32,
        cross_attention_dim=cross_attention_dim, attention_head_dim=8,
        time_cond_proj_dim=time_cond_proj_dim)
