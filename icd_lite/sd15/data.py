"""Training data for SD1.5-scale distillation: image-caption sources and their latent cache.

Sources (``open_source``):

* a CSV in COCO's layout as the authors use it (columns ``idx, file_name, caption``; images in a
  folder, by default the CSV's stem beside it: ``data/train2014.csv`` -> ``data/train2014/``;
  invertible-cd ``training/src/datasets.py``, ``COCODataset``);
* a folder of images, each with a caption file of the same stem (``cat.jpg`` + ``cat.txt``);
* webdataset shards (``.tar``, brace patterns allowed; ``jpg``/``png`` + ``txt`` per sample), if
  the ``webdataset`` package imports. They are read once, sequentially, into the cache.

Every image is read as the authors do: PIL, RGB, ``Resize(512)`` (shorter side, bilinear,
antialiased) then ``CenterCrop(512)``, scaled to [-1, 1] (done with PIL, no torchvision).

The latent cache (``encode_to_cache`` / ``LatentCache``) holds, per sample, z0 = VAE posterior
mean x ``scaling_factor`` (float16, [4, 64, 64] at 512 px: 32 KiB) and the text encoder's last
hidden state (float16, [77, 768]: 118 KiB), plus the empty prompt's. Each process of a launch
encodes its share into ``part-<rank>-of-<world>.safetensors``; rows are read lazily (safetensors
maps the file), so a 80k-caption COCO cache (~12 GB) is not held in memory. ``StreamedLatents``
encodes the same rows on the fly instead (VAE and text encoder in the training loop).
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from safetensors import safe_open
from safetensors.torch import save_file

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
CSV_COLUMNS = ("idx", "file_name", "caption")


def load_image(path, resolution: int = 512) -> torch.Tensor:
    """[3, resolution, resolution] float32 in [-1, 1]: RGB, Resize(resolution) on the shorter
    side (bilinear, antialiased: torchvision's PIL path), CenterCrop(resolution)."""
    try:
        with Image.open(path) as file:
            image = file.convert("RGB")
    except (OSError, UnidentifiedImageError) as error:
        raise ValueError(f"cannot read image {path}: {error}") from None
    w, h = image.size
    scale = resolution / min(w, h)
    size = (max(resolution, round(w * scale)), max(resolution, round(h * scale)))
    image = image.resize(size, Image.BILINEAR)
    left, top = (size[0] - resolution) // 2, (size[1] - resolution) // 2  # CenterCrop rounding
    image = image.crop((left, top, left + resolution, top + resolution))
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy())  # (H, W, 3) in 0..255
    return pixels.permute(2, 0, 1) / 127.5 - 1.0  # (3, H, W) in [-1, 1]


class CaptionImages:
    """Image-caption pairs by index: ``pairs[i] -> (image [3, R, R] in [-1, 1], caption)``."""

    def __init__(self, paths: list[Path], captions: list[str], resolution: int = 512):
        if not paths:
            raise ValueError("the dataset is empty: no image-caption pairs found")
        self.paths, self.captions, self.resolution = paths, captions, resolution

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int):
        return load_image(self.paths[i], self.resolution), self.captions[i]

    @classmethod
    def from_csv(cls, csv_path, images=None, resolution: int = 512) -> "CaptionImages":
        """COCO's layout: columns idx, file_name, caption; ``images`` defaults to the folder
        named as the CSV's stem beside it."""
        csv_path = Path(csv_path)
        images = Path(images) if images else csv_path.with_suffix("")
        if not images.is_dir():
            raise ValueError(f"image folder {images} not found (pass --images DIR)")
        with open(csv_path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            missing = [c for c in CSV_COLUMNS[1:] if c not in (reader.fieldnames or [])]
            if missing:
                raise ValueError(f"{csv_path} has no column(s) {missing}; COCO's layout is "
                                 f"{', '.join(CSV_COLUMNS)} (got {reader.fieldnames})")
            rows = list(reader)
        return cls([images / row["file_name"] for row in rows],
                   [row["caption"] or "" for row in rows], resolution)

    @classmethod
    def from_folder(cls, folder, resolution: int = 512) -> "CaptionImages":
        """Images with a same-stem ``.txt`` caption each, in sorted order."""
        folder = Path(folder)
        images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        if not images:
            raise ValueError(f"{folder} holds no images ({', '.join(IMAGE_SUFFIXES)})")
        lacking = [p.name for p in images if not p.with_suffix(".txt").exists()]
        if lacking:
            raise ValueError(f"{len(lacking)} image(s) in {folder} have no caption file "
                             f"(<stem>.txt), e.g. {lacking[0]}")
        captions = [p.with_suffix(".txt").read_text(encoding="utf-8").strip() for p in images]
        return cls(images, captions, resolution)


def webdataset_pairs(pattern: str, resolution: int = 512):
    """(image, caption) from webdataset shards, in shard order; needs ``webdataset``."""
    try:
        import webdataset as wds
    except ImportError:
        raise ImportError("webdataset shards need the webdataset package "
                          "(pip install webdataset), or convert them to a CSV + folder") from None
    import io
    for sample in wds.WebDataset(pattern, shardshuffle=False):
        key = next((k for k in ("jpg", "jpeg", "png", "webp") if k in sample), None)
        if key is None or "txt" not in sample:
            raise ValueError(f"webdataset sample {sample.get('__key__')} lacks an image or txt")
        yield load_image(io.BytesIO(sample[key]), resolution), sample["txt"].decode().strip()


def open_source(data, images=None, resolution: int = 512):
    """A ``CaptionImages`` for a CSV or folder; the shards' pairs (a generator) for a .tar."""
    text = str(data)
    if text.endswith(".tar") or "{" in text:
        return webdataset_pairs(text, resolution)
    path = Path(data)
    if path.suffix.lower() == ".csv" and path.is_file():
        return CaptionImages.from_csv(path, images, resolution)
    if path.is_dir():
        return CaptionImages.from_folder(path, resolution)
    raise ValueError(f"--data {data}: not a CSV file, an image folder or webdataset shards")


class Encoder:
    """The frozen VAE and text encoder of SD1.5: images -> z0, captions -> embeddings."""

    def __init__(self, vae, text_encoder, tokenizer, device="cpu", dtype=torch.float32):
        self.vae, self.text_encoder, self.tokenizer = vae, text_encoder, tokenizer
        self.device, self.dtype = torch.device(device), dtype

    @torch.no_grad()
    def images(self, images: torch.Tensor) -> torch.Tensor:
        """z0 [B, 4, R/8, R/8] = posterior mean x scaling_factor (the authors' inference;
        deterministic, so a cache and a streamed run see the same z0)."""
        pixels = images.to(self.device, self.vae.dtype)  # (B, 3, R, R) in [-1, 1]
        mean = self.vae.encode(pixels).latent_dist.mean
        return (mean * self.vae.config.scaling_factor).float()

    @torch.no_grad()
    def captions(self, captions: list[str]) -> torch.Tensor:
        """Last hidden state [B, L, D] (L = 77, D = 768 on SD1.5)."""
        tokens = self.tokenizer(list(captions), padding="max_length", truncation=True,
                                max_length=self.tokenizer.model_max_length, return_tensors="pt")
        ids = tokens.input_ids.to(self.device)
        return self.text_encoder(ids)[0].float()


def _chunks(pairs, rank: int, world: int, batch: int):
    """(global indices, images, captions) of this rank's rows (i % world == rank)."""
    indices, images, captions = [], [], []
    items = ((i, pairs[i]) for i in range(rank, len(pairs), world)) \
        if isinstance(pairs, CaptionImages) else \
        ((i, item) for i, item in enumerate(pairs) if i % world == rank)
    for i, (image, caption) in items:
        indices.append(i), images.append(image), captions.append(caption)
        if len(indices) == batch:
            yield indices, torch.stack(images), captions
            indices, images, captions = [], [], []
    if indices:
        yield indices, torch.stack(images), captions


def encode_to_cache(pairs, encoder: Encoder, folder, rank: int = 0, world: int = 1,
                    batch: int = 16) -> Path:
    """Encode this rank's share of ``pairs`` into ``folder/part-<rank>-of-<world>``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    index, latents, texts = [], [], []
    for rows, images, captions in _chunks(pairs, rank, world, batch):
        index += rows
        latents.append(encoder.images(images).half().cpu())  # (b, 4, R/8, R/8)
        texts.append(encoder.captions(captions).half().cpu())  # (b, L, D)
    if not index and rank == 0:
        raise ValueError("the dataset is empty: no image-caption pairs found")
    tensors = {"index": torch.tensor(index, dtype=torch.long)}
    if index:
        tensors.update(latents=torch.cat(latents), text=torch.cat(texts))
    if rank == 0:
        tensors["null_text"] = encoder.captions([""]).half().cpu()  # (1, L, D)
    path = folder / f"part-{rank:05d}-of-{world:05d}.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    return path


class LatentCache:
    """Rows of an encoded dataset, read lazily: ``cache.get(indices) -> (z0, cond)``."""

    def __init__(self, folder):
        self.folder = Path(folder)
        parts = sorted(self.folder.glob("part-*-of-*.safetensors"))
        if not parts:
            raise ValueError(f"no latent cache in {self.folder} (part-*-of-*.safetensors)")
        worlds = {p.stem.rsplit("-of-", 1)[1] for p in parts}
        if len(worlds) != 1 or len(parts) != int(worlds.pop()):
            raise ValueError(f"incomplete latent cache in {self.folder}: {len(parts)} parts; "
                             f"delete it to re-encode")
        self.files = [safe_open(str(p), "pt") for p in parts]
        self.where = {}  # global row -> (file, local row)
        for f, file in enumerate(self.files):
            for local, row in enumerate(file.get_tensor("index").tolist()):
                self.where[row] = (f, local)
            if "null_text" in file.keys():
                self.null = file.get_tensor("null_text").float()  # (1, L, D)
        if sorted(self.where) != list(range(len(self.where))):
            raise ValueError(f"latent cache {self.folder} has gaps; delete it to re-encode")

    def __len__(self) -> int:
        return len(self.where)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        """z0 [b, 4, h, w] and cond [b, L, D], float32 on the CPU."""
        latents, texts = [], []
        for i in indices:
            f, local = self.where[int(i)]
            latents.append(self.files[f].get_slice("latents")[local:local + 1])
            texts.append(self.files[f].get_slice("text")[local:local + 1])
        return torch.cat(latents).float(), torch.cat(texts).float()


class StreamedLatents:
    """The same rows as a cache, encoded when asked (VAE and text encoder in the loop)."""

    def __init__(self, pairs: CaptionImages, encoder: Encoder):
        if not isinstance(pairs, CaptionImages):
            raise ValueError("streaming needs a CSV or folder (indexable); webdataset shards "
                             "are encoded into a cache first")
        self.pairs, self.encoder = pairs, encoder
        self.null = encoder.captions([""]).cpu()  # (1, L, D)

    def __len__(self) -> int:
        return len(self.pairs)

    def get(self, indices) -> tuple[torch.Tensor, torch.Tensor]:
        images, captions = zip(*(self.pairs[int(i)] for i in indices))
        z0 = self.encoder.images(torch.stack(images))  # (b, 4, R/8, R/8)
        return z0.cpu(), self.encoder.captions(list(captions)).cpu()


def shuffled_indices(n: int, step: int, batch: int, seed: int) -> torch.Tensor:
    """The global batch of iteration ``step``: positions [step*batch, (step+1)*batch) of an
    endless sequence of permutations of range(n), one per epoch (seeded by seed and epoch), the
    same on every process and after a resume."""
    out = []
    for position in range(step * batch, (step + 1) * batch):
        epoch, offset = divmod(position, n)
        if not out or offset == 0 or position == step * batch:
            perm = torch.randperm(n, generator=torch.Generator().manual_seed(
                seed * 1_000_003 + epoch))
        out.append(int(perm[offset]))
    return torch.tensor(out)
