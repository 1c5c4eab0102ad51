"""Test builders for the SD1.5 metrics and PIE-Bench (tests/test_sd15_metrics.py,
tests/test_pie_bench.py): tiny models from configs (never downloaded) and a fabricated
PIE-Bench-format folder, laid out as its authors distribute it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

WORDS = ("<|startoftext|> <|endoftext|> a an the of on in with photo cat dog bird man woman "
         "red blue green rusty wooden glass table bicycle mountain road building cake smiling "
         "running watercolor painting flowers tree sky grass").split()


def tiny_tokenizer():
    """A word-level CLIP-style tokenizer: <start> words <end>, padded with <end>."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {word: i for i, word in enumerate(WORDS)}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<|endoftext|>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>",
        special_tokens=[("<|startoftext|>", 0), ("<|endoftext|>", 1)])
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<|startoftext|>",
                                   eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   unk_token="<|endoftext|>")


def tiny_clip(seed: int = 0):
    """(CLIPModel, CLIPProcessor): 1 layer, width 16, 32x32 pixels, projection 8."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor, CLIPImageProcessorPil

    config = CLIPConfig(
        text_config=dict(vocab_size=len(WORDS), hidden_size=16, intermediate_size=32,
                         num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=77,
                         bos_token_id=0, eos_token_id=1, pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                           num_attention_heads=2, image_size=32, patch_size=8),
        projection_dim=8)
    torch.manual_seed(seed)
    model = CLIPModel(config).eval()
    processor = CLIPProcessor(
        image_processor=CLIPImageProcessorPil(size={"shortest_edge": 32},
                                              crop_size={"height": 32, "width": 32}),
        tokenizer=tiny_tokenizer())
    return model, processor


def tiny_dinov2(seed: int = 0):
    """(Dinov2Model, BitImageProcessorPil): 1 layer, width 16, 32x32 pixels."""
    from transformers import BitImageProcessorPil, Dinov2Config, Dinov2Model

    torch.manual_seed(seed)
    model = Dinov2Model(Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32, image_size=32, patch_size=8)).eval()
    processor = BitImageProcessorPil(size={"shortest_edge": 36},
                                     crop_size={"height": 32, "width": 32},
                                     image_mean=[0.485, 0.456, 0.406],
                                     image_std=[0.229, 0.224, 0.225])
    return model, processor


def tiny_dino_vit(seed: int = 0):
    """A ViTModel with DINO ViT-B/8's patch size and input size (224), 2 layers of width 16."""
    from transformers import ViTConfig, ViTModel

    torch.manual_seed(seed)
    config = ViTConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                       intermediate_size=32, image_size=224, patch_size=8)
    return ViTModel(config, add_pooling_layer=False).eval()


class MeanColourFeatures(torch.nn.Module):
    """An injected FID feature network: uint8 [B, 3, H, W] -> [B, 6] (per-channel mean and std
    of the pixels in [0, 1]). ``num_features`` tells torchmetrics the width."""

    num_features = 6

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = images.float() / 255
        return torch.cat([x.mean((2, 3)), x.std((2, 3))], dim=1)  # (B, 6)


def fake_squeezenet_features(name: str, pretrained: bool = False):
    """Stands in for torchvision's ``squeezenet1_1().features`` inside torchmetrics' LPIPS:
    13 layers whose 7 slices give 64, 128, 256, 384, 384, 512, 512 channels (the widths of
    torchmetrics' squeeze.pth heads), random weights, 16x downsampled so 512x512 stays fast."""
    from torch import nn

    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 64, 4, stride=4), nn.ReLU(),                           # slice 1: 64
        nn.MaxPool2d(4), nn.Conv2d(64, 128, 1), nn.ReLU(),                   # slice 2: 128
        nn.Identity(), nn.Conv2d(128, 256, 1), nn.ReLU(),                    # slice 3: 256
        nn.Conv2d(256, 384, 1), nn.ReLU(),                                   # slice 4: 384
        nn.Conv2d(384, 384, 1), nn.Conv2d(384, 512, 1), nn.Conv2d(512, 512, 1))  # 384, 512, 512


def inject_lpips_backbone(monkeypatch) -> None:
    """Let torchmetrics' LPIPS build without torchvision: its SqueezeNet gets the fake backbone
    (the linear heads, scaling and distance stay torchmetrics' own)."""
    import torchmetrics.functional.image.lpips as functional_lpips
    import torchmetrics.image.lpip as lpip

    monkeypatch.setattr(lpip, "_TORCHVISION_AVAILABLE", True)
    monkeypatch.setattr(functional_lpips, "_get_tv_model_features", fake_squeezenet_features)


# --- a fabricated PIE-Bench folder --------------------------------------------------------------

def encode_rle(mask: np.ndarray) -> list[int]:
    """PIE-Bench's run-length code of a [512, 512] 0/1 mask: [start0, len0, start1, len1, ...]
    over the row-major flattened image, runs of 1."""
    flat = np.concatenate([[0], mask.flatten().astype(np.int8), [0]])
    edges = np.flatnonzero(np.diff(flat))  # starts and ends of runs, alternating
    starts, ends = edges[0::2], edges[1::2]
    return [int(v) for pair in zip(starts, ends - starts) for v in pair]


FIXTURE_ITEMS = {
    # id: (folder, original prompt, editing prompt, box of the edit (top, left, bottom, right))
    "000000000000": ("0_random_140",
                     "a slanted mountain bicycle on the road in front of a building",
                     "a slanted [rusty] mountain bicycle on the road in front of a building",
                     (200, 150, 400, 380)),
    "000000000001": ("0_random_140", "a [cat] on a wooden table", "a [dog] on a wooden table",
                     (100, 100, 300, 300)),
    "111000000000": ("1_change_object_80/1_artificial/1_animal", "a painting of a [cat]",
                     "a painting of a [dog]", (150, 200, 350, 450)),
    "224000000003": ("2_add_object_80/2_natural/4_outdoor", "a tree on the grass",
                     "a tree with [flowers] on the grass", (300, 0, 511, 511)),
    "623000000001": ("6_change_attribute_color_40/2_natural/3_indoor", "a [red] table",
                     "a [blue] table", (50, 60, 460, 470)),
    "914000000002": ("9_change_style_80/1_artificial/4_outdoor", "a photo of a mountain road",
                     "a [watercolor] painting of a mountain road", (0, 0, 512, 512)),
}


def write_pie_folder(root: Path, seed: int = 0) -> Path:
    """A PIE-Bench-format folder: ``mapping_file.json`` and ``annotation_images/<folder>/<id>.jpg``
    (512x512 noise pictures), bracketed prompts, real RLE masks of one box each. Returns root."""
    rng = np.random.default_rng(seed)
    mapping = {}
    for image_id, (folder, original, editing, (top, left, bottom, right)) in FIXTURE_ITEMS.items():
        mask = np.zeros((512, 512), np.uint8)
        mask[top:bottom, left:right] = 1
        path = Path(folder) / f"{image_id}.jpg"
        (root / "annotation_images" / folder).mkdir(parents=True, exist_ok=True)
        pixels = rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)
        Image.fromarray(pixels).resize((512, 512), Image.BILINEAR).save(
            root / "annotation_images" / path, quality=95)
        mapping[image_id] = {
            "image_path": str(path), "original_prompt": original, "editing_prompt": editing,
            "editing_instruction": "edit it", "editing_type_id": image_id[0],
            "blended_word": "", "mask": encode_rle(mask)}
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


def full_pie_ids() -> list[str]:
    """The 700 ids of the real PIE-Bench, by its naming: type 0 = 000000000000..000000000139;
    types 1-9: <type><1 artificial|2 natural><1 animal|2 human|3 indoor|4 outdoor><9-digit index>,
    n/8 per (category, subject) for a type of n images."""
    sizes = {1: 80, 2: 80, 3: 80, 4: 40, 5: 40, 6: 40, 7: 40, 8: 80, 9: 80}
    ids = [f"{i:012d}" for i in range(140)]
    for edit_type, n in sizes.items():
        for category in (1, 2):
            for subject in (1, 2, 3, 4):
                ids += [f"{edit_type}{category}{subject}{i:09d}" for i in range(n // 8)]
    return ids
