r"""The paper's metrics at Stable Diffusion 1.5 scale, from well-kept libraries.

Each metric here is the real one that the toy analogue in ``icd_lite.metrics`` stands for, with the
same call shape (``metric(a, b) -> [B]``, ``clip.clip_t(images, prompts) -> [B]``):

| here (the paper's name)       | model, library                  | convention                 |
|-------------------------------|---------------------------------|----------------------------|
| ClipScore.clip_t (CLIP score) | CLIP ViT-L/14, transformers     | cos (iCD), 100 max(cos, 0) |
| ClipScore.clip_i (CLIP-I)     | same                            | same                       |
| DinoV2Similarity (DINOv2)     | dinov2-base, pooler_output      | raw cosine                 |
| DinoStructureDistance (PnP)   | dino-vitb8, keys of last block  | PnP's: 0-255 inputs        |
| LPIPS                         | torchmetrics (+ torchvision)    | lower = closer             |
| psnr, mse                     | torchmetrics, torch             | [0, 1] scale, peak 1       |
| FID                           | torchmetrics (+ torch-fidelity) | LANCZOS 256, centre crop   |
| ImageReward (optional)        | the image-reward package        | the package's score        |

Images. Every metric takes batches ``[B, 3, H, W]``, either float in [0, 1] or uint8 in 0..255
(the toy world's [-1, 1] images are refused with a one-line ValueError that says how to map them:
``(x + 1) / 2``). Models that read pictures (CLIP, DINOv2, ImageReward) receive them as PIL images,
quantised to uint8 by rounding, through their Hugging Face processors with the PIL backend (the
processors of 2024 that iCD and PnPInversion ran; transformers 5's default backend needs
torchvision).

Sources, cited per metric below:
- **OFF** = github.com/yandex-research/invertible-cd @ 1bf9010, ``utils/metrics.py`` (iCD's own).
- **PNP** = github.com/cure-lab/PnPInversion @ 07f97f4, ``evaluation/matrics_calculator.py``
  (PIE-Bench's metric code).
- **PAPER** = Starodubcev et al., Invertible Consistency Distillation, NeurIPS 2024: Tables 1-2, 4
  (generation, inversion), Fig. 9 and Table 3 (editing).

Precision: everything here runs in the model's dtype (fp32 by default); iCD computed CLIP and
DINOv2 features under ``torch.cuda.amp.autocast()`` (fp16 on a GPU), so its values may differ in
the third decimal.

Loading. Each class has ``from_pretrained(name_or_path)`` that takes a hub id or a local folder
(``HF_HUB_OFFLINE=1`` with a folder works offline); tests build tiny models from configs and hand
them to the constructor, so nothing is downloaded in CI.

Where it runs. CLIP, DINOv2, DINO structure distance, PSNR and MSE run everywhere. LPIPS and FID's
default Inception need torchvision (and FID torch-fidelity), which import on Colab and GPU machines
but not beside this project's CPU torch build: there, construct them with an injected backbone
(see the tests) or run them on a GPU machine.
"""

from __future__ import annotations

import importlib
from typing import Literal, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CLIP_ID = "openai/clip-vit-large-patch14"
DINOV2_ID = "facebook/dinov2-base"
DINO_VITB8_ID = "facebook/dino-vitb8"
IMAGE_REWARD_ID = "ImageReward-v1.0"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)

Convention = Literal["cosine", "torchmetrics"]


# --- images: one checked format in, PIL or uint8 out -------------------------------------------

def check_images(images: torch.Tensor, name: str = "images") -> None:
    """A batch [B, 3, H, W], uint8 or float in [0, 1]; else a one-line ValueError."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"{name} must be a [B, 3, H, W] tensor (uint8, or float in [0, 1]), "
                         f"got {shape}")
    if images.dtype == torch.uint8:
        return
    if not images.is_floating_point():
        raise ValueError(f"{name} must be uint8 or float in [0, 1], got dtype {images.dtype}")
    if not bool(torch.isfinite(images).all()):
        raise ValueError(f"{name} contain NaN or infinite values")
    low, high = float(images.min()), float(images.max())
    if low < 0 or high > 1:
        hint = "; [-1, 1] images? map them with (x + 1) / 2" if low >= -1 and high <= 1 else ""
        raise ValueError(f"{name} must be in [0, 1], got values in [{low:.3g}, {high:.3g}]{hint}")


def check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    """Two checked batches of one shape."""
    check_images(a, "a")
    check_images(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"image batches differ in shape: {tuple(a.shape)} vs {tuple(b.shape)}")


def to_uint8(images: torch.Tensor) -> torch.Tensor:
    """uint8 [B, 3, H, W] from a checked batch (floats in [0, 1] are scaled by 255 and rounded)."""
    if images.dtype == torch.uint8:
        return images
    return (images.float() * 255).round().clamp(0, 255).to(torch.uint8)


def to_float(images: torch.Tensor) -> torch.Tensor:
    """float64 [B, 3, H, W] in [0, 1] from a checked batch (uint8 divided by 255)."""
    return images.double() / 255 if images.dtype == torch.uint8 else images.double()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """RGB PIL images from a checked batch [B, 3, H, W]."""
    array = to_uint8(images).permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, 3) uint8
    return [Image.fromarray(a) for a in array]


def from_pil(images: Sequence[Image.Image]) -> torch.Tensor:
    """uint8 [B, 3, H, W] from RGB PIL images of one size."""
    arrays = [np.asarray(im.convert("RGB")) for im in images]  # each (H, W, 3)
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def _features(output) -> torch.Tensor:
    """A feature tensor [B, D] from ``get_*_features``: transformers 5 returns a ModelOutput
    (the projected features in ``pooler_output``), transformers 4 the tensor itself."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _pil_image_processor(cls_name: str, name_or_path: str):
    """The PIL-backend image processor (transformers 5: ``<Name>Pil``; 4.x: the slow one)."""
    import transformers

    cls = getattr(transformers, cls_name + "Pil", None) or getattr(transformers, cls_name)
    return cls.from_pretrained(name_or_path)


# --- CLIP -------------------------------------------------------------------------------------

class ClipScore:
    """CLIP score with ViT-L/14: image-text (CLIP-T) and image-image (CLIP-I) similarity.

    ``convention`` chooses the scale:
    - ``"cosine"`` (default): raw cosine of the projected, unit-normalised features, in [-1, 1].
      iCD's own numbers (OFF ``calc_clip_score_images_prompts``, ``calc_clip_score_images_images``;
      PAPER Table 1, Fig. 9: "CLIP score" ~0.26-0.33).
    - ``"torchmetrics"``: 100 * max(cos, 0), what torchmetrics' ``CLIPScore`` returns per image and
      thus PnPInversion's PIE-Bench "CLIP similarity" (PNP ``calculate_clip_similarity``; ~25 in
      its Table 1). tests/test_sd15_metrics.py checks this equals torchmetrics' ``CLIPScore``.

    Images reach the processor as PIL (resize shortest side to 224, bicubic, centre crop 224).
    Prompts are truncated to 77 tokens with the end token kept (iCD's ``truncation=True``);
    torchmetrics cuts the tokens after encoding, dropping the end token of a >77-token prompt:
    no PIE-Bench prompt is that long.

    ``model``: a ``transformers.CLIPModel``; ``processor``: a ``CLIPProcessor`` (or any callable
    with its ``images=`` / ``text=`` interface).
    """

    def __init__(self, model, processor, convention: Convention = "cosine"):
        if convention not in ("cosine", "torchmetrics"):
            raise ValueError(f"convention must be 'cosine' or 'torchmetrics', got {convention!r}")
        self.model, self.processor, self.convention = model.eval(), processor, convention

    @classmethod
    def from_pretrained(cls, name_or_path: str = CLIP_ID, convention: Convention = "cosine",
                        device: str | torch.device = "cpu") -> "ClipScore":
        """Weights from the hub id (default ``openai/clip-vit-large-patch14``) or a local folder."""
        from transformers import AutoTokenizer, CLIPModel, CLIPProcessor

        processor = CLIPProcessor(
            image_processor=_pil_image_processor("CLIPImageProcessor", name_or_path),
            tokenizer=AutoTokenizer.from_pretrained(name_or_path))
        return cls(CLIPModel.from_pretrained(name_or_path).to(device), processor, convention)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image features [B, D] of a [B, 3, H, W] batch."""
        check_images(images)
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        features = _features(self.model.get_image_features(pixel_values=pixels.to(self.device)))
        return F.normalize(features.float(), dim=-1)  # (B, D)

    @torch.no_grad()
    def text_features(self, prompts: Sequence[str]) -> torch.Tensor:
        """Unit-norm projected text features [B, D] of B prompts."""
        if isinstance(prompts, str) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("prompts must be a list of strings, one per image")
        tokens = self.processor(text=list(prompts), return_tensors="pt", padding=True,
                                truncation=True, max_length=77)
        features = _features(self.model.get_text_features(
            input_ids=tokens["input_ids"].to(self.device),
            attention_mask=tokens["attention_mask"].to(self.device)))
        return F.normalize(features.float(), dim=-1)  # (B, D)

    def _scale(self, cosine: torch.Tensor) -> torch.Tensor:
        return cosine if self.convention == "cosine" else 100 * cosine.clamp_min(0)

    def clip_t(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        """CLIP-T: similarity of each image with its prompt, shape [B] (scale: ``convention``)."""
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        cosine = (self.image_features(images) * self.text_features(prompts)).sum(-1)  # (B,)
        return self._scale(cosine).cpu()

    def clip_i(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """CLIP-I: similarity of image a[i] with b[i], shape [B] (scale: ``convention``)."""
        check_pair(a, b)
        cosine = (self.image_features(a) * self.image_features(b)).sum(-1)  # (B,)
        return self._scale(cosine).cpu()


# --- DINOv2 and DINO ------------------------------------------------------------------------

class DinoV2Similarity:
    """DINOv2-base similarity: raw cosine of ``pooler_output`` (the final-layer-normed CLS token),
    shape [B]; 1 = same features. iCD's preservation metric (OFF ``calc_dinov2_images_images``;
    PAPER Table 2, Fig. 9). Preprocessing: the model's ``AutoImageProcessor`` (BitImageProcessor:
    resize shortest side 256 bicubic, centre crop 224, ImageNet normalisation), PIL backend.
    ``model``: a ``transformers.Dinov2Model``; ``processor``: its image processor."""

    def __init__(self, model, processor):
        self.model, self.processor = model.eval(), processor

    @classmethod
    def from_pretrained(cls, name_or_path: str = DINOV2_ID,
                        device: str | torch.device = "cpu") -> "DinoV2Similarity":
        from transformers import AutoModel

        processor = _pil_image_processor("BitImageProcessor", name_or_path)
        return cls(AutoModel.from_pretrained(name_or_path).to(device), processor)

    @torch.no_grad()
    def features(self, images: torch.Tensor) -> torch.Tensor:
        """Pooled features [B, D] of a [B, 3, H, W] batch."""
        check_images(images)
        pixels = self.processor(images=to_pil(images), return_tensors="pt")["pixel_values"]
        device = next(self.model.parameters()).device
        return self.model(pixel_values=pixels.to(device)).pooler_output.float()  # (B, D)

    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        check_pair(a, b)
        return F.cosine_similarity(self.features(a), self.features(b), dim=-1).cpu()  # (B,)


class DinoStructureDistance:
    """PIE-Bench's "structure distance" (PNP ``LossG.calculate_global_ssim_loss``, after Tumanyan
    et al. 2022, Splicing ViT features): per image, the MSE between the cosine self-similarity
    matrices [T, T] of the keys of the last block of DINO ViT-B/8, source vs edit; shape [B].
    PnP prints it x10^3.

    Quirks of PNP reproduced (flagged, since they look like bugs but define the published numbers):
    - the images enter as **0-255 floats**, then ImageNet mean/std normalisation is applied as if
      they were in [0, 1] (values up to ~1100);
    - resize: shorter side to 224 (longer side at most 480), bilinear; PnP ran torchvision's
      ``Resize`` on tensors, whose antialiasing was off by default before torchvision 0.17:
      ``antialias=False`` here; say True to get the newer behaviour;
    - the tokens include the CLS token (T = 1 + (224/8)^2 = 785 for a square image).

    Model: the hub's ``facebook/dino-vitb8`` (transformers' conversion of the checkpoint PNP
    loads with ``torch.hub.load('facebookresearch/dino:main', 'dino_vitb8')``); the keys are the
    output of the last block's key projection (all heads concatenated, as PNP's reshape of
    ``qkv`` gives). Parity with the torch.hub model was not measured offline.
    """

    def __init__(self, model, size: int = 224, max_size: int = 480, antialias: bool = False):
        self.model, self.size, self.max_size = model.eval(), size, max_size
        self.antialias = antialias
        self.key_projection = _last_key_projection(model)

    @classmethod
    def from_pretrained(cls, name_or_path: str = DINO_VITB8_ID,
                        device: str | torch.device = "cpu", **kwargs) -> "DinoStructureDistance":
        from transformers import ViTModel

        return cls(ViTModel.from_pretrained(name_or_path, add_pooling_layer=False).to(device),
                   **kwargs)

    def _resize(self, x: torch.Tensor) -> torch.Tensor:
        """torchvision ``Resize(size, max_size)``: shorter side to ``size``, longer capped."""
        h, w = x.shape[-2:]
        short, long = min(h, w), max(h, w)
        new_short, new_long = self.size, int(self.size * long / short)
        if new_long > self.max_size:
            new_short, new_long = int(self.max_size * short / long), self.max_size
        size = (new_short, new_long) if h <= w else (new_long, new_short)
        return F.interpolate(x, size=size, mode="bilinear", align_corners=False,
                             antialias=self.antialias)

    @torch.no_grad()
    def key_self_similarity(self, images: torch.Tensor) -> torch.Tensor:
        """Cosine self-similarity [B, T, T] of the last block's keys, from 0-255 inputs (quirk)."""
        check_images(images)
        device = next(self.model.parameters()).device
        x = self._resize(to_float(images).float().to(device) * 255)  # (B, 3, h, w), 0..255
        mean = torch.tensor(IMAGENET_MEAN, device=device)[:, None, None]
        std = torch.tensor(IMAGENET_STD, device=device)[:, None, None]
        captured = []
        hook = self.key_projection.register_forward_hook(lambda m, i, out: captured.append(out))
        try:
            self.model(pixel_values=(x - mean) / std, interpolate_pos_encoding=True)
        finally:
            hook.remove()
        keys = F.normalize(captured[0].float(), dim=-1, eps=1e-8)  # (B, T, D), heads concatenated
        return keys @ keys.transpose(1, 2)  # (B, T, T)

    def __call__(self, source: torch.Tensor, edited: torch.Tensor) -> torch.Tensor:
        check_pair(source, edited)
        difference = self.key_self_similarity(edited) - self.key_self_similarity(source)
        return difference.pow(2).flatten(1).mean(1).cpu()  # (B,)


def _last_key_projection(model) -> torch.nn.Module:
    """The key projection of a ViT's last block: ``k_proj`` (transformers 5) or ``key`` (4.x)."""
    keys = [module for name, module in model.named_modules()
            if name.endswith((".k_proj", ".attention.key"))]
    if not keys:
        raise ValueError(f"{type(model).__name__} has no attention key projection to hook")
    return keys[-1]


# --- pixel metrics --------------------------------------------------------------------------

def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale, shape [B] (uint8 inputs are divided
    by 255 first). PnP prints background MSE x10^4 (PNP ``calculate_mse``, torchmetrics
    ``MeanSquaredError`` on [0, 1] images)."""
    check_pair(a, b)
    return (to_float(a) - to_float(b)).pow(2).flatten(1).mean(1)  # (B,) float64


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB with peak 1 on the [0, 1] scale (= peak 255 on uint8), shape [B];
    +inf for identical images. torchmetrics' ``peak_signal_noise_ratio(data_range=1)`` per image.

    Equals iCD's ``calculate_psnr`` (uint8 arrays in float64, 20 log10(255 / sqrt(MSE)); OFF,
    PAPER Table 2) on uint8 images, except that iCD returns a single ``inf`` for the whole list
    when one image pair is identical, where this returns ``inf`` for that image only."""
    from torchmetrics.functional.image import peak_signal_noise_ratio

    check_pair(a, b)
    return peak_signal_noise_ratio(to_float(a), to_float(b), data_range=1.0, reduction="none",
                                   dim=(1, 2, 3))  # (B,)


class LPIPS:
    """LPIPS (Zhang et al. 2018) through torchmetrics' ``LearnedPerceptualImagePatchSimilarity``
    (``normalize=True``: [0, 1] inputs mapped to [-1, 1]; ``reduction='none'``), shape [B].

    Two presets, one per source:
    - ``LPIPS.pnp()``: SqueezeNet, full 512x512 images: PIE-Bench's "LPIPS" (PNP
      ``calculate_lpips``, x10^3 in its tables).
    - ``LPIPS.icd()``: VGG on images PIL-resized (bicubic) to 224x224: iCD's inversion LPIPS
      (OFF ``calculate_lpips``; PAPER Table 2). iCD ran **piq**'s ``LPIPS()`` (VGG16, ImageNet
      mean/std normalisation, the LPIPS-v0.1 linear heads), not torchmetrics; torchmetrics' VGG
      LPIPS uses the same heads and an input scaling equal to ImageNet's to about 1e-3, so values
      should agree to a few 1e-3, but the two were not compared here (piq needs torchvision).

    torchmetrics builds the backbone from torchvision (weights downloaded to
    ``$TORCH_HOME/hub/checkpoints`` on first use): this runs where torchvision imports (Colab,
    GPU machines), not beside this project's CPU torch; tests inject a backbone.
    """

    def __init__(self, net_type: Literal["squeeze", "vgg", "alex"] = "squeeze",
                 resize: int | None = None, device: str | torch.device = "cpu"):
        try:
            from torchmetrics.image.lpip import LearnedPerceptualImagePatchSimilarity
            metric = LearnedPerceptualImagePatchSimilarity(net_type=net_type, reduction="none",
                                                            normalize=True)
        except ModuleNotFoundError as error:
            raise ImportError(f"LPIPS needs torchvision (a build matching torch {torch.__version__}"
                              f"), for torchmetrics' backbone: {error}") from None
        self.metric, self.resize = metric.to(device), resize

    @classmethod
    def pnp(cls, device: str | torch.device = "cpu") -> "LPIPS":
        return cls("squeeze", None, device)

    @classmethod
    def icd(cls, device: str | torch.device = "cpu") -> "LPIPS":
        return cls("vgg", 224, device)

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if self.resize is not None:
            images = from_pil([im.resize((self.resize, self.resize), Image.BICUBIC)
                               for im in to_pil(images)])
        return to_float(images).float().to(self.metric.device)  # (B, 3, h, w) in [0, 1]

    @torch.no_grad()
    def __call__(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        check_pair(a, b)
        self.metric.reset()
        return self.metric(self._prepare(a), self._prepare(b)).flatten().cpu()  # (B,)


# --- FID ------------------------------------------------------------------------------------

def fid_resize(images: torch.Tensor, size: int = 256) -> torch.Tensor:
    """iCD's FID preprocessing (OFF ``get_activations``): PIL LANCZOS resize of the shorter side
    to ``size``, centre crop ``size`` x ``size``; uint8 [B, 3, size, size]."""
    check_images(images)
    out = []
    for im in to_pil(images):
        w, h = im.size
        scale = size / min(w, h)
        im = im.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.LANCZOS)
        left, top = (im.width - size) // 2, (im.height - size) // 2
        out.append(im.crop((left, top, left + size, top + size)))
    return from_pil(out)


class FID:
    """Frechet Inception Distance through torchmetrics' ``FrechetInceptionDistance``.

    Images: [0, 1] floats or uint8, any size, resized the paper's way first (``fid_resize``:
    LANCZOS to 256 + centre crop; OFF ``calculate_fid``, PAPER Tables 1 and 4), then handed to
    the feature network as **uint8** [B, 3, 256, 256]. The default network (``feature=2048``) is
    torch-fidelity's TF-ported Inception-v3 pool features, the same weights as pytorch-fid's
    ``pt_inception-2015-12-05``, which iCD used; the two resize to 299 slightly differently, so
    expect small differences from iCD's numbers. It needs ``torch-fidelity`` and torchvision
    (Colab, GPU machines). ``feature`` may instead be any ``nn.Module`` mapping uint8
    [B, 3, 256, 256] to [B, D] (tests inject one).

    Use: ``update(images, real=True/False)`` batch by batch, then ``compute()``; or
    ``fid(real_images, fake_images)`` in one call. ``load_reference(npz)`` reads pytorch-fid
    statistics (``mu``, ``sigma``; e.g. iCD's ``fid_stats_mscoco512_val.npz``) as the real set.
    """

    def __init__(self, feature: int | torch.nn.Module = 2048, resize: int = 256,
                 device: str | torch.device = "cpu"):
        from torchmetrics.image.fid import FrechetInceptionDistance

        try:
            metric = FrechetInceptionDistance(feature=feature, normalize=False,
                                              reset_real_features=False)
        except ModuleNotFoundError as error:
            raise ImportError(f"FID's default Inception needs torch-fidelity and torchvision "
                              f"(or pass feature=<nn.Module>): {error}") from None
        self.metric, self.resize = metric.to(device), resize

    @torch.no_grad()
    def update(self, images: torch.Tensor, real: bool) -> None:
        self.metric.update(fid_resize(images, self.resize).to(self.metric.device), real=real)

    def load_reference(self, path: str, num_samples: int = 50_000) -> None:
        """Real-set statistics from a pytorch-fid ``.npz`` (mu [D], sigma [D, D]), stored as the
        sums torchmetrics keeps; ``num_samples`` only sets the n-1 / n weighting."""
        stats = np.load(path)
        mu = torch.from_numpy(stats["mu"]).double()
        sigma = torch.from_numpy(stats["sigma"]).double()
        n = num_samples
        self.metric.real_features_sum = (n * mu).to(self.metric.device)
        self.metric.real_features_cov_sum = ((n - 1) * sigma + n * torch.outer(mu, mu)
                                             ).to(self.metric.device)
        self.metric.real_features_num_samples = torch.tensor(n, device=self.metric.device)

    def compute(self) -> float:
        return float(self.metric.compute())

    def reset(self) -> None:
        """Forget the generated set (the real set, or a loaded reference, is kept)."""
        self.metric.reset()

    def __call__(self, real: torch.Tensor, fake: torch.Tensor) -> float:
        """FID between two image sets (each [N, 3, H, W], N >= 2), from scratch."""
        self.metric.reset_real_features = True
        self.metric.reset()
        self.metric.reset_real_features = False
        self.update(real, real=True)
        self.update(fake, real=False)
        return self.compute()


# --- ImageReward (optional) -----------------------------------------------------------------

IMAGE_REWARD_MISSING = (
    "ImageReward needs the optional package image-reward (pip install image-reward), which does "
    "not install beside diffusers 0.42 / transformers 5: run it in its own environment")


class ImageReward:
    """ImageReward-v1.0 (Xu et al. 2023): a learned human-preference score of an image for its
    prompt, shape [B] (the package's ``score(prompt, [image])``, higher = preferred). iCD's
    editing and generation metric (OFF ``calc_ir``; PAPER Tables 1, 4).

    Optional: the ``image-reward`` package pins old timm/transformers and does not co-install with
    this project's diffusers/transformers; ``from_pretrained`` raises ImportError with one line
    when it is missing. ``scorer`` is anything with ``score(prompt: str, images: list[PIL]) ->
    float`` (the package's model, or a fake in tests).
    """

    def __init__(self, scorer):
        self.scorer = scorer

    @classmethod
    def from_pretrained(cls, name: str = IMAGE_REWARD_ID,
                        device: str | torch.device = "cpu") -> "ImageReward":
        try:  # by name: the package cannot be a declared extra (it does not co-install)
            reward = importlib.import_module("ImageReward")
        except ImportError:
            raise ImportError(IMAGE_REWARD_MISSING) from None
        return cls(reward.load(name, device=device).eval())

    @torch.no_grad()
    def __call__(self, images: torch.Tensor, prompts: Sequence[str]) -> torch.Tensor:
        check_images(images)
        if len(prompts) != len(images):
            raise ValueError(f"{len(images)} images but {len(prompts)} prompts")
        scores = [float(self.scorer.score(p, [im])) for p, im in zip(prompts, to_pil(images))]
        return torch.tensor(scores)  # (B,)

