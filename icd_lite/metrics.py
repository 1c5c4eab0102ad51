r"""Metrics, mirroring the paper's, computed in the toy world (and honestly named as analogues).

| paper (SD1.5)                       | here                                                        |
|-------------------------------------|-------------------------------------------------------------|
| PSNR, MSE                           | the same, on images in [-1, 1] mapped to [0, 1]              |
| LPIPS (VGG features)                | ``lpips_like``: the same formula on the toy CLIP's ViT layers |
| DinoV2 similarity                   | ``dino_like``: cosine of the toy CLIP's pooled image features |
| CLIP score (ViT-L/14)               | ``clip_t``: cosine of the toy CLIP's image and text embeddings|
| FID (Inception features)            | ``frechet_distance`` of the toy CLIP's image embeddings       |
| NLL of latents under N(0, I)        | ``latent_nll`` (per dimension, nats)                         |
| (only this world)                   | ``attribute_accuracy``: zero-shot shape / colour / background |
| PIE-Bench background PSNR/MSE/SSIM  | ``masked_*``: outside the exact edit mask                     |

LPIPS-like distance (Zhang et al. 2018, without the learned per-channel weights): for each layer l,
unit-normalise the features of every patch along channels, then
``d = mean_l mean_patches || f_l(a) - f_l(b) ||^2``.

Frechet distance between Gaussians fitted to two feature sets::

    FD = ||mu_1 - mu_2||^2 + Tr(S_1 + S_2 - 2 (S_1 S_2)^{1/2})

with Tr((S_1 S_2)^{1/2}) = sum of square roots of the eigenvalues of S_1 S_2.

Devices: the pixel metrics compare ``b`` (and the mask) on the device of ``a``, so a generated
batch on a GPU can be scored against reference images loaded on the CPU; ``ToyPerception`` moves
images and text tokens to its CLIP's device; the Frechet distance is computed in float64 on the
CPU (a 64x64 eigenproblem: the same numbers from features made on any device).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F

from .checks import check_image_values
from .world.scenes import BACKGROUND_COLORS, OBJECT_COLORS, PATTERNS, SHAPES, SIZES
from .world.text import build_tokenizer, tokenize


def _check_images(*images: torch.Tensor) -> None:
    """Batches [B, 3, H, W] of one shape, finite (ValueError), and in [-1, 1]: an image with no
    negative value, as a [0, 1] image would be, gets an ``ImageRangeWarning`` (a UserWarning,
    not an error: an all-white or all-gray image is a legal one to score)."""
    for x in images:
        if x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"images must be [B, 3, H, W] in [-1, 1], got shape {tuple(x.shape)}")
    if len({tuple(x.shape) for x in images}) > 1:
        raise ValueError(f"image batches differ in shape: {[tuple(x.shape) for x in images]}")
    for x in images:
        check_image_values(x)


def _on_device_of(a: torch.Tensor, *others):
    """The other tensors (None passes through) on the device of ``a``."""
    return [x if x is None else x.to(a.device) for x in others]


def mse(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image mean squared error on the [0, 1] scale, shape [B]."""
    _check_images(a, b)
    return _mse(a, b)


def _mse(a, b):
    (b,) = _on_device_of(a, b)
    return (((a - b) / 2) ** 2).flatten(1).mean(1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-image PSNR in dB for images in [-1, 1] (peak = 1 on the [0, 1] scale), shape [B]."""
    _check_images(a, b)  # before clamping, which would turn inf into 1
    return -10 * torch.log10(_mse(a.clamp(-1, 1), b.clamp(-1, 1)).clamp_min(1e-10))


def _nan_where_empty(values: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """``values`` [B] with NaN where ``keep`` [B, ...] holds no True: no pixel to compare."""
    return values.masked_fill(~keep.flatten(1).any(1), float("nan"))


def masked_mse(a, b, keep: torch.Tensor) -> torch.Tensor:
    """MSE over the pixels where ``keep`` ([B, H, W] bool) is True, e.g. outside an edit mask;
    NaN where keep is empty: no pixel to compare (``np.nanmean`` skips it in a table)."""
    _check_images(a, b)
    return _masked_mse(a, b, keep)


def _masked_mse(a, b, keep):
    b, keep = _on_device_of(a, b, keep)
    weights = keep[:, None].float()
    mse_kept = (((((a - b) / 2) ** 2) * weights).flatten(1).sum(1)
                / (3 * weights.flatten(1).sum(1)).clamp_min(1))
    return _nan_where_empty(mse_kept, keep)


def masked_psnr(a, b, keep: torch.Tensor) -> torch.Tensor:
    """PSNR over the pixels where ``keep`` is True; NaN where keep is empty: no pixel to
    compare."""
    _check_images(a, b)
    return -10 * torch.log10(_masked_mse(a.clamp(-1, 1), b.clamp(-1, 1), keep).clamp_min(1e-10))


def ssim(a, b, keep: torch.Tensor | None = None, window: int = 7) -> torch.Tensor:
    """Structural similarity (Wang et al. 2004, uniform window) per image, averaged over the
    pixels where ``keep`` is True (all pixels by default); NaN where keep is empty: no pixel to
    compare."""
    _check_images(a, b)
    b, keep = _on_device_of(a, b, keep)
    a, b = (a.clamp(-1, 1) + 1) / 2, (b.clamp(-1, 1) + 1) / 2
    c1, c2 = 0.01**2, 0.03**2

    def blur(x):
        return F.avg_pool2d(x, window, stride=1, padding=window // 2, count_include_pad=False)

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    ssim_map = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / (
        (mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    weights = torch.ones_like(a[:, :1]) if keep is None else keep[:, None].float()
    values = (ssim_map * weights).flatten(1).sum(1) / (3 * weights.flatten(1).sum(1)).clamp_min(1)
    return values if keep is None else _nan_where_empty(values, keep)


def latent_nll(z: torch.Tensor) -> float:
    """Mean negative log-likelihood per dimension of latents under N(0, I), in nats."""
    return float((0.5 * z.double() ** 2).mean() + 0.5 * math.log(2 * math.pi))


def frechet_distance(features_a: torch.Tensor, features_b: torch.Tensor) -> float:
    """Frechet distance between Gaussians fitted to two [N, D] feature sets (the FID formula)."""
    if features_a.ndim != 2 or features_b.ndim != 2 or features_a.shape[1] != features_b.shape[1]:
        raise ValueError("feature sets must be [N, D] with the same D")
    if min(len(features_a), len(features_b)) < 2:
        raise ValueError("need at least two samples per set")
    a, b = features_a.detach().double().cpu(), features_b.detach().double().cpu()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
    eigenvalues = torch.linalg.eigvals(cov_a @ cov_b).real.clamp_min(0)
    trace_sqrt = eigenvalues.sqrt().sum()
    return float((mu_a - mu_b).pow(2).sum() + cov_a.trace() + cov_b.trace() - 2 * trace_sqrt)


class ToyPerception:
    """Perceptual metrics from the toy world's CLIP (``icd_lite.world.loading.load_clip``)."""

    def __init__(self, clip, tokenizer=None):
        self.clip = clip.eval()
        self.tokenizer = tokenizer or build_tokenizer()
        self._attribute_table = None

    @property
    def device(self) -> torch.device:
        """Where the CLIP runs; images and prompts are moved there."""
        return next(self.clip.parameters()).device

    @torch.no_grad()
    def _vision(self, images: torch.Tensor):
        _check_images(images)
        return self.clip.vision_model(pixel_values=images.to(self.device),
                                      output_hidden_states=True)

    @torch.no_grad()
    def image_embeddings(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm projected image embeddings [B, D] (the CLIP space; also FD's features)."""
        pooled = self._vision(images).pooler_output
        return F.normalize(self.clip.visual_projection(pooled), dim=-1)

    @torch.no_grad()
    def text_embeddings(self, prompts: list[str]) -> torch.Tensor:
        tokens = tokenize(self.tokenizer, prompts).to(self.device)
        pooled = self.clip.text_model(**tokens).pooler_output
        return F.normalize(self.clip.text_projection(pooled), dim=-1)

    def clip_t(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        """CLIP-T analogue: cosine of each image with its prompt, shape [B]."""
        return (self.image_embeddings(images) * self.text_embeddings(prompts)).sum(-1)

    def dino_like(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """DinoV2-like similarity: cosine of pooled (pre-projection) image features, [B]."""
        return F.cosine_similarity(self._vision(a).pooler_output,
                                   self._vision(b).pooler_output, dim=-1)

    def lpips_like(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """LPIPS-like distance over the ViT's hidden layers (patch tokens), shape [B]."""
        layers_a, layers_b = self._vision(a).hidden_states[1:], self._vision(b).hidden_states[1:]
        distances = [(F.normalize(fa[:, 1:], dim=-1) - F.normalize(fb[:, 1:], dim=-1))
                     .pow(2).sum(-1).mean(1) for fa, fb in zip(layers_a, layers_b)]
        return torch.stack(distances).mean(0)

    def _attributes(self):
        """Every single-object caption of the grammar, its attributes and text embeddings."""
        if self._attribute_table is None:
            rows = [(size, color, shape, bg, pattern) for size, color, shape, bg, pattern
                    in itertools.product(SIZES, OBJECT_COLORS, SHAPES, BACKGROUND_COLORS, PATTERNS)
                    if color != bg]
            prompts = [f"a {s} {c} {sh} on a {'striped ' if p == 'striped' else ''}{bg} background"
                       for s, c, sh, bg, p in rows]
            self._attribute_table = (rows, self.text_embeddings(prompts))
        return self._attribute_table

    def predict_attributes(self, images: torch.Tensor) -> list[dict]:
        """Zero-shot attributes of single-object images: the best-matching grammar caption."""
        rows, text = self._attributes()
        best = (self.image_embeddings(images) @ text.T).argmax(-1)
        keys = ("size", "color", "shape", "background", "pattern")
        return [dict(zip(keys, rows[i])) for i in best.tolist()]

    def attribute_accuracy(self, images: torch.Tensor, scenes) -> dict:
        """Fraction of single-object images whose zero-shot shape, object colour and
        background colour match the scene that was asked for."""
        predictions = self.predict_attributes(images)
        if any(len(scene.objects) != 1 for scene in scenes):
            raise ValueError("attribute accuracy is defined for single-object scenes")
        truth = [{"shape": s.objects[0].shape, "color": s.objects[0].color,
                  "background": s.background} for s in scenes]
        return {key: sum(p[key] == t[key] for p, t in zip(predictions, truth)) / len(truth)
                for key in ("shape", "color", "background")}
