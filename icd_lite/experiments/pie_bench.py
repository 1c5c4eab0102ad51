r"""PIE-Bench (Ju et al., "PnP Inversion", ICLR 2024): the editing benchmark of iCD's Fig. 9 and
Table 3, loaded as its authors distribute it, with two metric suites kept apart.

The data cannot be downloaded by code (a Google form; see github.com/cure-lab/PnPInversion). Point
``load_pie_bench`` at the folder that holds::

    mapping_file.json                 # id -> prompts, edit type, blended words, RLE mask
    annotation_images/0_random_140/000000000000.jpg
    annotation_images/1_change_object_80/1_artificial/1_animal/111000000000.jpg
    ...                               # 700 images, 512 x 512

Ids (12 digits): the first digit is the edit type (``EDIT_TYPES``); for types 1-9 the second is
the category (1 artificial = paintings and other made images, 2 natural = photos) and the third the
subject (1 animal, 2 human, 3 indoor, 4 outdoor); type 0 (random) has neither.

Prompts carry the edited span in brackets, ``"a [rusty] bicycle"``, sometimes in the original
prompt too: ``strip_brackets`` removes them, as PnPInversion's evaluation does before scoring.

Masks: a run-length list ``[start0, len0, start1, len1, ...]`` over the row-major flattened
512 x 512 image, 1 = the region to edit. ``decode_mask`` clips runs at the end and, like
PnPInversion's ``mask_decode``, **forces the 1-pixel frame (first/last row and column) to 1**
("to avoid annotation errors in boundary"), so the background never includes the frame.

Subsets iCD evaluates (github.com/yandex-research/invertible-cd @ 1bf9010,
``running/benchmarks/instructions/``):
- ``"icd140"``: all 140 images of type 0 (``editing_pie_bench_140.csv``, used by every launcher);
- ``"icd420"``: type 0 and the **natural** (photo) half of each type 1-9, i.e. ids whose second
  digit is 2: 140 + 40/40/40/20/20/20/20/40/40 (``editing_pie_bench_all.csv``). This rule
  reproduces that CSV's member list exactly (its 420 file names, checked against the repository
  snapshot); "half" is not a random draw.

Two suites, never mixed in one table:
- ``PnPSuite``: PIE-Bench's own metric code (PnPInversion ``evaluation/evaluate.py`` and
  ``matrics_calculator.py``), quirks reproduced and flagged in its docstring;
- ``ICDSuite``: iCD's own editing metrics (``utils/metrics.py`` ``calc_all``): raw-cosine CLIP,
  DINOv2 pooled cosine, ImageReward when installed.

``evaluate(items, {method: {id: edited image}}, suite)`` returns a per-image DataFrame and the
summary as the papers print it (``summary_table``). ``save_edits`` runs an editor over the items
and stores its PNGs in the source layout; ``edited_from_folder`` reads such a folder back, or
PnPInversion's own ``output/<method>/annotation_images`` (to check numbers against its Table 1).
The ``python -m icd_lite.bench pie`` command runs the editors and calls these.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal, Mapping, Sequence

import torch
from PIL import Image

from ..sd15 import metrics as M

if TYPE_CHECKING:
    import pandas

EDIT_TYPES = ("random", "change object", "add object", "delete object", "change content",
              "change pose", "change color", "change material", "change background",
              "change style")
TYPE_FOLDERS = ("0_random_140", "1_change_object_80", "2_add_object_80", "3_delete_object_80",
                "4_change_attribute_content_40", "5_change_attribute_pose_40",
                "6_change_attribute_color_40", "7_change_attribute_material_40",
                "8_change_background_80", "9_change_style_80")
CATEGORIES = {"1": "artificial", "2": "natural"}
SUBJECTS = {"1": "animal", "2": "human", "3": "indoor", "4": "outdoor"}
SIZE = 512
Subset = Literal["all", "icd140", "icd420"]


# --- the data ---------------------------------------------------------------------------------

def strip_brackets(prompt: str) -> str:
    """The prompt without PIE-Bench's ``[`` ``]`` marks: ``"a [rusty] bike"`` -> ``"a rusty
    bike"``."""
    return prompt.replace("[", "").replace("]", "")


def decode_mask(rle: Sequence[int], shape: tuple[int, int] = (SIZE, SIZE)) -> torch.Tensor:
    """PIE-Bench's run-length mask as bool [H, W], True = region to edit.

    ``rle`` = [start0, len0, start1, len1, ...] over the row-major flattened image; runs are
    clipped at the end; the 1-pixel frame is set True (PnPInversion ``mask_decode``). A list of
    odd length or a start outside the image is a ValueError."""
    if len(rle) % 2:
        raise ValueError(f"an RLE mask has (start, length) pairs, got {len(rle)} numbers")
    length = shape[0] * shape[1]
    flat = torch.zeros(length, dtype=torch.bool)  # (H * W,)
    for start, run in zip(rle[0::2], rle[1::2]):
        if not 0 <= start < length or run < 0:
            raise ValueError(f"RLE run ({start}, {run}) lies outside a {shape[0]}x{shape[1]} mask")
        flat[start:start + run] = True  # slicing clips the run at the end
    mask = flat.reshape(shape)  # (H, W)
    mask[0, :] = mask[-1, :] = mask[:, 0] = mask[:, -1] = True  # the forced frame
    return mask


@dataclass(frozen=True)
class PieItem:
    """One PIE-Bench entry. ``image_path``: the source picture; ``relative_path``: the
    mapping's ``image_path`` (below ``annotation_images``). Prompts are bracket-stripped;
    ``editing_prompt_marked`` keeps the brackets (the edited span, for attention-based editors).
    ``category`` and ``subject`` are None for type 0."""

    id: str
    image_path: Path
    relative_path: Path
    original_prompt: str
    editing_prompt: str
    editing_prompt_marked: str
    editing_instruction: str
    edit_type: int
    category: str | None
    subject: str | None
    blended_word: str
    mask_rle: tuple[int, ...]

    @property
    def edit_type_name(self) -> str:
        return EDIT_TYPES[self.edit_type]

    def mask(self) -> torch.Tensor:
        """bool [512, 512], True = region to edit (frame included)."""
        return decode_mask(self.mask_rle)

    def image(self) -> torch.Tensor:
        """The source picture as uint8 [3, H, W] (512 x 512 in PIE-Bench)."""
        return load_image(self.image_path)


def parse_id(image_id: str) -> tuple[int, str | None, str | None]:
    """(edit type, category, subject) from a 12-digit PIE-Bench id; ValueError if malformed."""
    if not re.fullmatch(r"\d{12}", image_id):
        raise ValueError(f"a PIE-Bench id has 12 digits, got {image_id!r}")
    edit_type = int(image_id[0])
    if edit_type == 0:
        return 0, None, None
    category, subject = CATEGORIES.get(image_id[1]), SUBJECTS.get(image_id[2])
    if category is None or subject is None:
        raise ValueError(f"id {image_id}: digits 2-3 must be category 1-2 and subject 1-4")
    return edit_type, category, subject


def load_pie_bench(root: str | Path, mapping: str = "mapping_file.json") -> list[PieItem]:
    """The entries of a PIE-Bench folder (see the module docstring), sorted by id.

    Raises FileNotFoundError (one line: what is missing, where to get it) and ValueError for an
    entry whose id disagrees with its ``editing_type_id``."""
    root = Path(root)
    mapping_path = root / mapping
    if not mapping_path.is_file():
        raise FileNotFoundError(f"no {mapping} in {root}: PIE-Bench is distributed by its authors "
                                f"(github.com/cure-lab/PnPInversion, data request form)")
    entries = json.loads(mapping_path.read_text())
    items = [_item(root, image_id, entry) for image_id, entry in sorted(entries.items())]
    missing = [item.image_path for item in items if not item.image_path.is_file()]
    if missing:
        raise FileNotFoundError(f"{len(missing)} images of {mapping} are missing, "
                                f"e.g. {missing[0]}")
    return items


def _item(root: Path, image_id: str, entry: dict) -> PieItem:
    edit_type, category, subject = parse_id(image_id)
    if int(entry["editing_type_id"]) != edit_type:
        raise ValueError(f"id {image_id} is type {edit_type} but editing_type_id is "
                         f"{entry['editing_type_id']!r}")
    return PieItem(
        id=image_id, image_path=root / "annotation_images" / entry["image_path"],
        relative_path=Path(entry["image_path"]),
        original_prompt=strip_brackets(entry["original_prompt"]),
        editing_prompt=strip_brackets(entry["editing_prompt"]),
        editing_prompt_marked=entry["editing_prompt"],
        editing_instruction=entry.get("editing_instruction", ""), edit_type=edit_type,
        category=category, subject=subject, blended_word=entry.get("blended_word", ""),
        mask_rle=tuple(entry["mask"]))


def select(items: Sequence, subset: Subset = "all") -> list:
    """The entries (``PieItem``s, or anything with ``.id``) of a subset, in the given order:
    ``"all"``; ``"icd140"`` = type 0; ``"icd420"`` = type 0 + natural images of types 1-9."""
    if subset == "all":
        return list(items)
    if subset == "icd140":
        return [item for item in items if item.id[0] == "0"]
    if subset == "icd420":
        return [item for item in items if item.id[0] == "0" or item.id[1] == "2"]
    raise ValueError(f"subset must be 'all', 'icd140' or 'icd420', got {subset!r}")


# --- images ------------------------------------------------------------------------------------

def load_image(image) -> torch.Tensor:
    """uint8 [3, H, W] from a path, a PIL image, or a tensor [3, H, W] (uint8, or float in
    [0, 1])."""
    if isinstance(image, torch.Tensor):
        M.check_images(image[None], "edited image")
        return M.to_uint8(image[None])[0]
    if isinstance(image, (str, Path)):
        with Image.open(image) as opened:
            return M.from_pil([opened])[0]
    if isinstance(image, Image.Image):
        return M.from_pil([image])[0]
    raise ValueError(f"an image must be a path, a PIL image or a [3, H, W] tensor, got "
                     f"{type(image).__name__}")


def rightmost_square(image: torch.Tensor, size: int = SIZE) -> torch.Tensor:
    """PnPInversion's crop of a non-square edited image: the bottom-right ``size`` x ``size``
    (editors save strips source | reconstruction | edit, the edit last).
    [3, H, W] -> [3, size, size]; a square image is returned as it is."""
    h, w = image.shape[-2:]
    if h == w:
        return image
    if h < size or w < size:
        raise ValueError(f"a non-square edited image must be at least {size}x{size}, got {h}x{w}")
    return image[:, h - size:, w - size:]


def resize_512(image: torch.Tensor) -> torch.Tensor:
    """iCD's ``load_512``: a plain PIL resize to 512 x 512 (default filter, bicubic; no crop)."""
    if tuple(image.shape[-2:]) == (SIZE, SIZE):
        return image
    return M.from_pil([M.to_pil(image[None])[0].resize((SIZE, SIZE))])[0]


def save_edits(items: Sequence[PieItem], edit, folder: str | Path) -> dict[str, Path]:
    """Run ``edit(item) -> image`` (a PIL image or a [3, H, W] tensor, uint8 or float in [0, 1])
    on every item and save it losslessly as ``<folder>/<relative_path>.png``; returns {id: path},
    ready for ``evaluate``. An existing file is kept, so a rerun resumes."""
    paths = {}
    for item in items:
        path = (Path(folder) / item.relative_path).with_suffix(".png")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            M.to_pil(load_image(edit(item))[None])[0].save(path)
        paths[item.id] = path
    return paths


def edited_from_folder(items: Sequence[PieItem], folder: str | Path) -> dict[str, Path]:
    """{id: path} of edited images laid out like the source images, e.g. PnPInversion's outputs
    ``output/<method>/annotation_images/<image_path>`` (that name, or the same name in .png).
    Raises FileNotFoundError naming the first missing one."""
    paths = {}
    for item in items:
        candidates = [Path(folder) / item.relative_path,
                      (Path(folder) / item.relative_path).with_suffix(".png")]
        found = [path for path in candidates if path.is_file()]
        if not found:
            raise FileNotFoundError(f"no edited image for {item.id} in {folder} "
                                    f"({item.relative_path})")
        paths[item.id] = found[0]
    return paths


# --- the suites --------------------------------------------------------------------------------

class PnPSuite:
    r"""PIE-Bench's metrics as PnPInversion's ``evaluate.py`` computes them (its default list).

    Per image (column names are PnP's):
    - ``structure_distance``: ``DinoStructureDistance`` of source vs edit, whole image;
    - ``psnr_unedit_part``, ``lpips_unedit_part``, ``mse_unedit_part``, ``ssim_unedit_part``:
      background preservation;
    - ``clip_similarity_source_image`` (source vs original prompt), ``clip_similarity_target_image``
      (edit vs editing prompt, "Whole"), ``clip_similarity_target_image_edit_part`` (edit with the
      background blacked out, "Edited").

    Quirks reproduced (each changes the numbers; kept so they compare with published tables):
    1. **Background metrics on images multiplied by (1 - mask), over the full 512 x 512 image**: the
       edit region is zeroed in both images and still counted, so PSNR/SSIM rise and MSE/LPIPS
       fall with the size of the mask (a masked-region metric would not count those pixels).
       A metric returns NaN when the background is empty.
    2. **Structure distance on 0-255 inputs** (ImageNet normalisation applied to unscaled
       pixels), resize without antialiasing; see ``DinoStructureDistance``.
    3. **The right-most 512 crop**: a non-square edited image is cut to its bottom-right
       512 x 512 (``rightmost_square``); the source is used as it is (512 x 512).
    4. **CLIP similarity = 100 max(cos, 0)** (torchmetrics ``CLIPScore``), prompts
       bracket-stripped; "Edited" multiplies the uint8 edit by the mask.
    5. Images pass through uint8 (PNG/JPG files) and [0, 1] floats (x / 255); PSNR with peak 1,
       SSIM torchmetrics' defaults (Gaussian 11, sigma 1.5, data range 1), LPIPS SqueezeNet on
       x 2 - 1.
    The printed table scales them: structure x10^3, LPIPS x10^3, MSE x10^4, SSIM x10^2
    (``TABLE``); PSNR in dB and CLIP as they are.

    ``lpips=None`` leaves that column NaN (LPIPS needs torchvision: Colab, GPU machines).
    """

    name = "pnp"
    COLUMNS = ("structure_distance", "psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part",
               "ssim_unedit_part", "clip_similarity_source_image", "clip_similarity_target_image",
               "clip_similarity_target_image_edit_part")
    # (group, printed name, column, scale), in PnPInversion's Table 1 order
    TABLE = (("Structure", "Distance x10^3", "structure_distance", 1e3),
             ("Background Preservation", "PSNR", "psnr_unedit_part", 1),
             ("Background Preservation", "LPIPS x10^3", "lpips_unedit_part", 1e3),
             ("Background Preservation", "MSE x10^4", "mse_unedit_part", 1e4),
             ("Background Preservation", "SSIM x10^2", "ssim_unedit_part", 1e2),
             ("CLIP Similarity", "Whole", "clip_similarity_target_image", 1),
             ("CLIP Similarity", "Edited", "clip_similarity_target_image_edit_part", 1))

    def __init__(self, clip: M.ClipScore, structure: M.DinoStructureDistance,
                 lpips: M.LPIPS | None = None):
        if clip.convention != "torchmetrics":
            raise ValueError("PnP's CLIP similarity is 100 max(cos, 0): build the ClipScore with "
                             "convention='torchmetrics'")
        self.clip, self.structure, self.lpips = clip, structure, lpips

    @classmethod
    def from_pretrained(cls, device: str | torch.device = "cpu", lpips: bool = True) -> "PnPSuite":
        """CLIP ViT-L/14, DINO ViT-B/8 and (with torchvision) LPIPS SqueezeNet from the hub."""
        return cls(M.ClipScore.from_pretrained(M.CLIP_ID, "torchmetrics", device),
                   M.DinoStructureDistance.from_pretrained(M.DINO_VITB8_ID, device),
                   M.LPIPS.pnp(device) if lpips else None)

    def prepare(self, edited: torch.Tensor) -> torch.Tensor:
        return rightmost_square(edited)

    def score(self, item: PieItem, source: torch.Tensor, edited: torch.Tensor) -> dict[str, float]:
        """The metrics of one edit: ``source``, ``edited`` uint8 [3, 512, 512]."""
        if source.shape != edited.shape or tuple(source.shape[-2:]) != (SIZE, SIZE):
            raise ValueError(f"PnP's metrics compare 512x512 images, got source "
                             f"{tuple(source.shape)} and edit {tuple(edited.shape)}")
        src, edit = source[None], edited[None]  # (1, 3, 512, 512) uint8
        mask = item.mask().to(torch.uint8)  # (512, 512), 1 = edit region
        clip_source = self.clip.clip_t(src, [item.original_prompt])  # (1,)
        clip_target = self.clip.clip_t(edit, [item.editing_prompt])  # (1,)
        row = {"structure_distance": float(self.structure(src, edit)[0]),
               **self._background(src, edit, 1 - mask),
               "clip_similarity_source_image": float(clip_source[0]),
               "clip_similarity_target_image": float(clip_target[0]),
               "clip_similarity_target_image_edit_part": math.nan}
        if mask.any():
            row["clip_similarity_target_image_edit_part"] = float(
                self.clip.clip_t(edit * mask, [item.editing_prompt])[0])
        return row

    def _background(self, src, edit, keep) -> dict[str, float]:
        """Quirk 1: both images times (1 - mask) [H, W], each metric over the full image."""
        from torchmetrics.functional.image import structural_similarity_index_measure

        names = ("psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part")
        if not keep.any():
            return dict.fromkeys(names, math.nan)
        a, b = M.to_float(src).float() * keep, M.to_float(edit).float() * keep  # (1, 3, H, W)
        return {"psnr_unedit_part": float(M.psnr(a, b)[0]),
                "lpips_unedit_part": float(self.lpips(a, b)[0]) if self.lpips else math.nan,
                "mse_unedit_part": float(M.mse(a, b)[0]),
                "ssim_unedit_part": float(structural_similarity_index_measure(
                    a, b, data_range=1.0))}


class ICDSuite:
    """iCD's own editing metrics (invertible-cd ``utils/metrics.py`` ``calc_all``; PAPER Fig. 9):

    - ``clip_t``: CLIP ViT-L/14 **raw cosine** of the edit with the editing prompt (editability);
    - ``clip_i``: CLIP raw cosine of source vs edit (preservation);
    - ``dinov2``: DINOv2-base pooled cosine of source vs edit (preservation);
    - ``image_reward``: ImageReward of the edit for the editing prompt, NaN without the package.

    Both images go through iCD's ``load_512`` (plain resize to 512, no crop); no mask is used.
    The printed table is the mean of each column (``TABLE``)."""

    name = "icd"
    COLUMNS = ("clip_t", "clip_i", "dinov2", "image_reward")
    TABLE = (("Editing", "CLIP score", "clip_t", 1),
             ("Editing", "ImageReward", "image_reward", 1),
             ("Preservation", "DINOv2", "dinov2", 1),
             ("Preservation", "CLIP-I", "clip_i", 1))

    def __init__(self, clip: M.ClipScore, dinov2: M.DinoV2Similarity,
                 image_reward: M.ImageReward | None = None):
        if clip.convention != "cosine":
            raise ValueError("iCD's CLIP score is the raw cosine: build the ClipScore with "
                             "convention='cosine'")
        self.clip, self.dinov2, self.image_reward = clip, dinov2, image_reward

    @classmethod
    def from_pretrained(cls, device: str | torch.device = "cpu",
                        image_reward: bool = False) -> "ICDSuite":
        """CLIP ViT-L/14, DINOv2-base and (if asked; needs its package) ImageReward-v1.0."""
        return cls(M.ClipScore.from_pretrained(M.CLIP_ID, "cosine", device),
                   M.DinoV2Similarity.from_pretrained(M.DINOV2_ID, device),
                   M.ImageReward.from_pretrained(device=device) if image_reward else None)

    def prepare(self, edited: torch.Tensor) -> torch.Tensor:
        return resize_512(edited)

    def score(self, item: PieItem, source: torch.Tensor, edited: torch.Tensor) -> dict[str, float]:
        """The metrics of one edit: ``source``, ``edited`` uint8 [3, H, W]."""
        src, edit = resize_512(source)[None], resize_512(edited)[None]  # (1, 3, 512, 512)
        reward = (float(self.image_reward(edit, [item.editing_prompt])[0])
                  if self.image_reward else math.nan)
        return {"clip_t": float(self.clip.clip_t(edit, [item.editing_prompt])[0]),
                "clip_i": float(self.clip.clip_i(src, edit)[0]),
                "dinov2": float(self.dinov2(src, edit)[0]),
                "image_reward": reward}


# --- evaluation and tables ----------------------------------------------------------------------

def evaluate(items: Sequence[PieItem], edited: Mapping[str, Mapping[str, object]],
             suite: PnPSuite | ICDSuite, by: str | None = None
             ) -> tuple["pandas.DataFrame", "pandas.DataFrame"]:
    """Score edited images with one suite.

    ``edited``: {method name: {PIE-Bench id: edited image}} with an image for every item (a path,
    a PIL image, or a [3, H, W] tensor, uint8 or float in [0, 1]). Returns ``(per_image,
    summary)``: per_image has one row per (method, id) with the id's edit type, category and
    subject and the suite's ``COLUMNS``; summary is ``summary_table(per_image, suite, by)``.
    Raises ValueError naming a method that lacks images for some ids."""
    import pandas as pd

    rows = []
    for method, images in edited.items():
        missing = [item.id for item in items if item.id not in images]
        if missing:
            raise ValueError(f"{method}: no edited image for {len(missing)} of {len(items)} ids, "
                             f"e.g. {missing[0]}")
        for item in items:
            edit = suite.prepare(load_image(images[item.id]))  # (3, H, W) uint8
            rows.append({"method": method, "id": item.id, "edit_type": item.edit_type,
                         "edit_type_name": item.edit_type_name, "category": item.category,
                         "subject": item.subject, **suite.score(item, item.image(), edit)})
    per_image = pd.DataFrame(rows)
    return per_image, summary_table(per_image, suite, by)


def summary_table(per_image: "pandas.DataFrame", suite: PnPSuite | ICDSuite,
                  by: str | None = None) -> "pandas.DataFrame":
    """The table as the papers print it: one row per method (and per ``by`` value, e.g.
    ``"edit_type"``), columns (group, metric) from ``suite.TABLE``, each the mean over images
    skipping NaN (PnPInversion's "nan" rows), times its scale."""
    import pandas as pd

    keys = ["method"] + ([by] if by else [])
    means = per_image.groupby(keys, sort=False)[[column for _, _, column, _ in suite.TABLE]].mean()
    table = pd.DataFrame({(group, name): means[column] * scale
                          for group, name, column, scale in suite.TABLE})
    table.columns = pd.MultiIndex.from_tuples(table.columns)
    return table


def format_table(summary: "pandas.DataFrame", digits: int = 2) -> str:
    """The summary as fixed-width text, e.g. for a terminal or a README."""
    return summary.to_string(float_format=lambda value: f"{value:.{digits}f}")
