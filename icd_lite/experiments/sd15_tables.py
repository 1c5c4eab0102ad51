r"""Tables 2 and 4 of the paper at Stable Diffusion 1.5 scale, with the paper's numbers beside.

* ``table2`` (inversion, PAPER Table 2): each image is encoded and decoded with its own caption,
  and the reconstruction is compared with the image: LPIPS (down), DINOv2 cosine (up), PSNR dB
  (up). Rows: fDDIM50 / DDIM50 (the plain SD1.5 UNet, ``pipe.base``) at w = 1, w = 8 and w = 8 +
  dynamic CFG (tau 0.8), and the release pair (fCD_m / CD_m) at w = 1 and at w = 8 + d.CFG.
* ``table4`` (generation, PAPER Table 4): images from prompts at w = 8: FID against reference
  statistics (down), CLIP score (up), ImageReward (up, optional). Rows: DDIM50, CD4, CD4 + d.CFG
  tau 0.8 / 0.7 and, given the 3-step release, CD3 and CD3 + d.CFG 0.7.

Units. w is the *classical* guidance scale (1 = unguided, 8 = the paper's "w = 8"); the
students receive ``w_code = w - 1`` through their guidance embedding (the authors' code passes
7 for "w = 8": ``../shared/sd15_facts.md`` 1.4), the DDIM baselines run two-pass CFG
``eps_c + (w - 1)(eps_c - eps_null)``. ``tau``: dynamic CFG, guided only for t <= 1000 tau
(tau 0.8: every step but t = 999 of the students' 4). NFE counts UNet passes per image (a CFG
step is two). The DDIM rows invert unguided (the toy's Table 2 rows,
``experiments.evaluation.TABLE2_ROWS``): the guidance is the decoder's.

What the authors ran (yandex-research/invertible-cd @ 1bf9010, OFF; ``sd15_facts.md`` 1.6, 3.3)
and what is kept:

* images: PIL RGB, plain resize to 512 x 512 (``load_512``; PIL's default bicubic; the aspect
  ratio changes). ``fit="crop"`` instead takes data.py's Resize(512) + CenterCrop(512);
* the t = 19 noise of the encoder is seeded with 30. Here image i gets the generator seeded
  ``seed + i``, so a row equals ``pipe.reconstruct(image_i, caption_i, w, tau, seed=30 + i)``
  whatever the batch (the authors reseed per batch, so their noise depends on the batching);
* generation: **one fixed noise per prompt**, ``torch.randn`` from a CPU generator seeded
  ``seed + i`` (= ``pipe.generate(prompt_i, seed=30 + i)``), the same x_T for every row. The
  authors' ``init_latent`` draws one noise and expands it over the batch, so the prompts of a
  batch share x_T: a quirk *not* copied (it shrinks the diversity FID sees);
* metrics (``icd_lite.sd15.metrics``, OFF ``utils/metrics.py``): PSNR per image on uint8
  (peak 255); LPIPS VGG on 224 x 224 PIL-resized images (torchmetrics' VGG LPIPS standing in for
  piq's, ``LPIPS.icd()``); DINOv2-base pooled cosine; FID on pytorch-fid's Inception features of
  LANCZOS-256 centre crops against a reference ``.npz`` (``fid_stats_mscoco512_val.npz``); CLIP
  ViT-L/14 **raw cosine** (not 100 cos); ImageReward-v1.0, optional. Quirks not copied: OFF
  pairs reconstructions with images by two unsorted ``os.listdir`` calls (here by index), its
  PSNR returns inf for the whole list when one pair is identical (here the mean is over finite
  values), and it saves JPEGs (here PNGs: lossless, what was decoded is what is scored).

Files under ``out`` (a rerun resumes: an image already saved is not made again)::

    images/real/00000.png           the image as encoded (Table 2), at the VAE's size
    images/<row>/00000.png          a reconstruction or a generation; <row> names method,
                                    release, w and tau, e.g. icd-4step-v1_w8_dcfg0.8
    inputs.csv, settings.json       what the images are of; a rerun with others is refused
    table2.csv / .txt, table2_per_image.csv, table2_run.json   (table4 likewise)

The tables (pandas DataFrames indexed by row) carry ``paper_*`` columns quoted from
``experiments.paper`` (``TABLE2``; the 3-step pair from ``TABLE5``; ``TABLE4``).
"""

from __future__ import annotations

import csv
import json
import tempfile
import time
import zipfile
from typing import TYPE_CHECKING
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch

from PIL import Image
from tqdm.auto import tqdm

if TYPE_CHECKING:  # pandas comes with the [notebooks] extra: imported where a table is made
    import pandas as pd

from .. import baselines
from ..consistency import sample_consistency
from ..pipeline import CountCalls
from ..schedule import SD15_SCHEDULE
from . import paper

SEED = 30  # the authors' launchers: the t = 19 noise, and the generation noise
W_GUIDED = 8.0  # classical; the authors' code unit 7
BASELINE_STEPS = 50
LIMIT = 5000  # the paper's 5k COCO images / prompts (OFF generate.py max_cnt)
ENCODE_START = 19  # the encoder's first timestep (the clean latent is noised to t = 19)


@dataclass(frozen=True)
class Row:
    """One row of Table 2 or 4.

    ``method``: "DDIM" (plain SD1.5, two-pass CFG, ``steps`` DDIM steps; Table 2 inverts with
    unguided DDIM first), "iCD" (Table 2: the pair, fCD_m / CD_m), "CD4" / "CD3" (Table 4: the
    reverse student of a 4- / 3-step pair). ``w``: classical guidance; ``tau``: dynamic CFG
    threshold (None: constant); ``table``: 2 or 4; ``paper``: the row's key in the paper's
    table (iCD rows: picked by m at run time, ``paper_values``)."""

    method: str
    w: float
    tau: float | None = None
    table: int = 2
    paper: object = None

    def label(self, m: int | None = None, release: str | None = None, steps: int = 50) -> str:
        """The row as printed, e.g. "fDDIM50 / DDIM50 + d.CFG .8, w = 8"."""
        guidance = f" + d.CFG {str(self.tau).lstrip('0')}" if self.tau is not None else ""
        if self.method == "DDIM":
            name = f"fDDIM{steps} / DDIM{steps}" if self.table == 2 else f"DDIM{steps}"
        elif self.method == "iCD":
            name = f"fCD{m} / CD{m} ({release or 'own'})"
        else:
            name = f"{self.method} ({release or 'own'})"
        return f"{name}{guidance}, w = {self.w:g}"

    def folder(self, release: str | None = None, steps: int = 50) -> str:
        """The row's image folder: method (with the release, or the DDIM steps), w, tau."""
        method = f"ddim{steps}" if self.method == "DDIM" else \
            f"{self.method.lower()}-{release or 'own'}"
        return f"{method}_w{self.w:g}" + (f"_dcfg{self.tau:g}" if self.tau is not None else "")


TABLE2_ROWS = (
    Row("DDIM", 1.0, None, 2, ("DDIM50", 1)),
    Row("DDIM", W_GUIDED, None, 2, ("DDIM50", 8)),
    Row("DDIM", W_GUIDED, 0.8, 2, ("DDIM50 + d.CFG", 8)),
    Row("iCD", 1.0, None, 2),
    Row("iCD", W_GUIDED, 0.8, 2),
)
TABLE4_ROWS = (
    Row("DDIM", W_GUIDED, None, 4, "DDIM50"),
    Row("CD4", W_GUIDED, None, 4, "CD4"),
    Row("CD4", W_GUIDED, 0.8, 4, "CD4 + d.CFG .8"),
    Row("CD4", W_GUIDED, 0.7, 4, "CD4 + d.CFG .7"),
    Row("CD3", W_GUIDED, None, 4, "CD3"),
    Row("CD3", W_GUIDED, 0.7, 4, "CD3 + d.CFG .7"),
)
TABLE2_METRICS = ("lpips", "dino", "psnr")
TABLE4_METRICS = ("fid", "clip", "image_reward")


def paper_values(row: Row, m: int | None = None) -> dict:
    """The paper's numbers for ``row`` as {"paper_<metric>": value} (NaN where it has none).

    Table 2's pair rows are recipe G of ``paper.TABLE2`` (the full iCD, what the 4-step release
    is) for m = 4 and "fCD3 / CD3" of ``paper.TABLE5`` for m = 3."""
    names = TABLE2_METRICS if row.table == 2 else TABLE4_METRICS
    if row.table == 4:
        values = paper.TABLE4.get(row.paper, {})
    elif row.method != "iCD":
        values = paper.TABLE2.get(row.paper, {})
    elif m == 4:
        values = paper.TABLE2[("G", 1) if row.w == 1 else ("G + d.CFG", 8)]
    elif m == 3:
        values = paper.TABLE5[("fCD3 / CD3", int(row.w))]
    else:
        values = {}
    return {f"paper_{name}": values.get(name, float("nan")) for name in names}


# --- images ------------------------------------------------------------------------------------

def load_picture(source, size: int = 512, fit: str = "resize") -> torch.Tensor:
    """uint8 [3, size, size] from a path or PIL image. ``fit="resize"``: the authors'
    ``load_512`` (RGB, plain resize, PIL's default bicubic); ``"crop"``: ``sd15.data``'s
    Resize(size) + CenterCrop(size) (the training transform). ValueError for a bad file."""
    if fit == "crop":
        from ..sd15.data import load_image

        if isinstance(source, Image.Image):  # load_image reads what Image.open reads
            source = _png_bytes(source)
        pixels = load_image(source, size)  # (3, S, S) in [-1, 1]
        return ((pixels + 1) * 127.5).round().clamp(0, 255).to(torch.uint8)
    if fit != "resize":
        raise ValueError(f"fit must be 'resize' or 'crop', got {fit!r}")
    try:
        image = source if isinstance(source, Image.Image) else Image.open(source)
        image = image.convert("RGB").resize((size, size), Image.BICUBIC)
    except OSError as error:
        raise ValueError(f"cannot read image {source}: {error}") from None
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # (3, S, S)


def _png_bytes(image: Image.Image):
    import io

    buffer = io.BytesIO()
    image.convert("RGB").save(buffer, format="PNG")
    buffer.seek(0)
    return buffer


def save_pictures(images: torch.Tensor, paths: Sequence[Path]) -> None:
    """Save a batch [B, 3, H, W] in [-1, 1] as lossless PNGs (uint8, rounded)."""
    pixels = ((images.detach().float().cpu() + 1) * 127.5).round().clamp(0, 255)
    for picture, path in zip(pixels.to(torch.uint8).permute(0, 2, 3, 1).numpy(), paths):
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture).save(path)


def read_pictures(paths: Sequence[Path]) -> torch.Tensor:
    """uint8 [B, 3, H, W] from PNG paths of one size."""
    arrays = []
    for path in paths:
        with Image.open(path) as image:
            arrays.append(np.asarray(image.convert("RGB")))
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


def picture_path(folder: Path, index: int) -> Path:
    return folder / f"{index:05d}.png"


# --- a run folder ------------------------------------------------------------------------------

def prepare_out(out, inputs: Sequence[tuple[str, str]], settings: dict) -> Path:
    """Create ``out`` and record what its images are of (``inputs.csv``: index, source,
    caption; ``settings.json``). A folder made for other inputs or settings is refused with
    a one-line ValueError (its images would be reused silently)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    recorded = out / "settings.json"
    if recorded.is_file():
        old = json.loads(recorded.read_text())
        changed = [key for key in settings if key in old and old[key] != settings[key]]
        if changed:
            raise ValueError(f"{out} holds images made with {changed[0]} = {old[changed[0]]!r}, "
                             f"not {settings[changed[0]]!r}; choose another --out")
    rows = _read_inputs(out / "inputs.csv")
    for i, (old, new) in enumerate(zip(rows, inputs)):
        if tuple(old) != tuple(new):
            raise ValueError(f"{out} holds images of other inputs (item {i}: {old[0]!r} there, "
                             f"{new[0]!r} now); choose another --out")
    if len(inputs) > len(rows):
        with open(out / "inputs.csv", "w", newline="", encoding="utf-8") as file:
            writer = csv.writer(file)
            writer.writerow(["index", "source", "caption"])
            writer.writerows([i, *pair] for i, pair in enumerate(inputs))
    recorded.write_text(json.dumps({**(json.loads(recorded.read_text())
                                       if recorded.is_file() else {}), **settings}, indent=1))
    return out


def _read_inputs(path: Path) -> list[tuple[str, str]]:
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as file:
        return [(row["source"], row["caption"]) for row in csv.DictReader(file)]


def batches(indices: Sequence[int], size: int):
    """Consecutive chunks of ``indices`` of at most ``size``."""
    for begin in range(0, len(indices), size):
        yield list(indices[begin:begin + size])


class Clock:
    """Wall seconds of GPU work (synchronising CUDA before reading the time)."""

    def __init__(self, device: torch.device):
        self.cuda = torch.device(device).type == "cuda"

    def __call__(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter()


@dataclass
class Made:
    """What one row produced in this call: images, seconds, NFE per image."""

    images: int = 0
    seconds: float = 0.0
    nfe: int | None = None

    def add(self, images: int, seconds: float, nfe: int) -> None:
        self.images += images
        self.seconds += seconds
        self.nfe = nfe


# --- Table 2: making the reconstructions -------------------------------------------------------

@torch.no_grad()
def encode_seeded(pipe, z0: torch.Tensor, cond: torch.Tensor, seeds: Sequence[int]):
    """The pair's encoder (fCD_m, unguided) on a batch, with image i's t = 19 noise drawn from
    a CPU generator seeded ``seeds[i]``: ``ICDPipeline.encode_latents`` with one seed per image
    (equal to it on a batch of one). z0 [B, 4, h, w], cond [B, L, D] -> (x_999 [B, 4, h, w],
    NFE per image)."""
    eps = torch.cat([torch.randn((1, *z0.shape[1:]), dtype=z0.dtype,
                                 generator=torch.Generator().manual_seed(int(seed)))
                     for seed in seeds])  # (B, 4, h, w), on the CPU like the pipeline's
    x = SD15_SCHEDULE.add_noise(z0, eps.to(z0.device), ENCODE_START)
    student = CountCalls(pipe.forward_student)
    noise = sample_consistency(student, x, pipe.boundaries.encoding_steps(ENCODE_START), cond,
                               None, disable=True)
    return noise, student.calls


def _reconstruct_group(pipe, method: str, rows, folders, indices, pictures, captions,
                       seed: int, steps: int, clock: Clock) -> dict:
    """Encode a batch of images (``indices``) once, unguided, and decode it for every row that
    still lacks some of them. Returns {row: (images made, seconds, NFE per image)}."""
    images = torch.stack([pictures[i] for i in indices]).float() / 127.5 - 1  # (B, 3, S, S)
    prompts = [captions[i] for i in indices]
    base, made = pipe.base, {}
    begin = clock()
    if method == "DDIM":
        z0, cond, null = baselines.prepare(base, images, prompts)
        model = CountCalls(base.eps_model())
        x_T = baselines.ddim_invert(model, z0, cond, null, steps=steps)
        encode_calls = model.calls
    else:
        z0, cond = base.encode_images(images), base.encode_prompt(prompts)
        x_T, encode_calls = encode_seeded(pipe, z0, cond, [seed + i for i in indices])
    encode_seconds = (clock() - begin) / len(indices)
    for row in rows:
        missing = [k for k, i in enumerate(indices)
                   if not picture_path(folders[row], i).is_file()]
        if not missing:
            continue
        begin = clock()
        if method == "DDIM":
            model.calls = 0
            keep = torch.tensor(missing)
            latents = baselines.ddim_decode(model, x_T[keep], cond[keep], null[keep], row.w,
                                            row.tau, steps)
            decoded, calls = base.decode_latents(latents), model.calls
        else:
            output = pipe.decode(x_T[torch.tensor(missing)], [prompts[k] for k in missing],
                                 row.w, row.tau)
            decoded, calls = output.images, output.nfe
        seconds = clock() - begin
        save_pictures(decoded, [picture_path(folders[row], indices[k]) for k in missing])
        made[row] = (len(missing), seconds + encode_seconds * len(missing), encode_calls + calls)
    return made


def make_reconstructions(pipe, sources: Sequence, captions: Sequence[str], out: Path,
                         rows=TABLE2_ROWS, seed: int = SEED, steps: int = BASELINE_STEPS,
                         batch_size: int = 8, fit: str = "resize", progress: bool = True
                         ) -> dict[Row, Made]:
    """Save ``images/real`` and every row's reconstructions under ``out``; skip what exists."""
    size, release = pipe.base.image_size, pipe.config.release
    real = out / "images" / "real"
    folders = {row: out / "images" / row.folder(release, steps) for row in rows}
    pictures = _LazyPictures(sources, size, fit, real)
    clock, made = Clock(pipe.device), {row: Made() for row in rows}
    for method in dict.fromkeys(row.method for row in rows):
        group = [row for row in rows if row.method == method]
        todo = [i for i in range(len(sources))
                if any(not picture_path(folders[row], i).is_file() for row in group)]
        for chunk in tqdm(list(batches(todo, batch_size)), desc=f"Table 2, {method}",
                          disable=not progress):
            done = _reconstruct_group(pipe, method, group, folders, chunk, pictures, captions,
                                      seed, steps, clock)
            for row, (count, seconds, nfe) in done.items():
                made[row].add(count, seconds, nfe)
    for i in range(len(sources)):  # every reference on disk, even when nothing was made now
        if not picture_path(real, i).is_file():
            pictures[i]
    return made


class _LazyPictures:
    """pictures[i] -> uint8 [3, S, S]: ``images/real/<i>.png`` if saved, else loaded from
    ``sources[i]`` (``load_picture``) and saved there."""

    def __init__(self, sources, size: int, fit: str, folder: Path):
        self.sources, self.size, self.fit, self.folder = sources, size, fit, folder

    def __getitem__(self, i: int) -> torch.Tensor:
        path = picture_path(self.folder, i)
        if path.is_file():
            return read_pictures([path])[0]
        picture = load_picture(self.sources[i], self.size, self.fit)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(picture.permute(1, 2, 0).numpy()).save(path)
        return picture


# --- Table 2: the metrics and the table ----------------------------------------------------------

@dataclass
class InversionMetrics:
    """Table 2's metrics (PAPER Table 2; OFF ``calc_inversion``). ``lpips``: ``LPIPS.icd()``
    (VGG, 224 px) or any ``(a, b) -> [B]`` on uint8 / [0, 1] batches; ``dino``:
    ``DinoV2Similarity`` (pooled cosine). None leaves a column NaN. PSNR is always computed
    (``sd15.metrics.psnr``: per image, uint8 scale, peak 255)."""

    lpips: Callable | None = None
    dino: Callable | None = None

    @classmethod
    def from_pretrained(cls, device="cpu", dinov2: str | None = None, lpips: bool = True):
        """DINOv2-base (hub id or folder) and, with torchvision, VGG LPIPS."""
        from ..sd15 import metrics as M

        return cls(M.LPIPS.icd(device) if lpips else None,
                   M.DinoV2Similarity.from_pretrained(dinov2 or M.DINOV2_ID, device))


def score_reconstructions(out: Path, rows, n: int, metrics: InversionMetrics, release,
                          steps: int, batch_size: int = 16) -> pd.DataFrame:
    """Per image and row: lpips, dino, psnr, mse (reconstruction vs ``images/real``)."""
    import pandas as pd

    from ..sd15 import metrics as M

    records = []
    for row in rows:
        folder = out / "images" / row.folder(release, steps)
        for chunk in batches(range(n), batch_size):
            real = read_pictures([picture_path(out / "images" / "real", i) for i in chunk])
            made = read_pictures([picture_path(folder, i) for i in chunk])
            columns = {"psnr": M.psnr(made, real), "mse": M.mse(made, real),
                       "lpips": metrics.lpips(made, real) if metrics.lpips else None,
                       "dino": metrics.dino(made, real) if metrics.dino else None}
            for k, i in enumerate(chunk):
                records.append({"row": row.folder(release, steps), "index": i,
                                **{name: float("nan") if v is None else float(v[k])
                                   for name, v in columns.items()}})
    return pd.DataFrame.from_records(records)


def _mean_and_spread(values: pd.Series) -> tuple[float, float]:
    """Mean over finite values and the half-width of its normal 95 % interval."""
    finite = values[np.isfinite(values)]
    if finite.empty:
        return float("nan"), float("nan")
    spread = 1.96 * finite.std() / len(finite) ** 0.5 if len(finite) > 1 else float("nan")
    return float(finite.mean()), float(spread)


def expected_nfe(row: Row, m: int | None = None, steps: int = BASELINE_STEPS) -> int:
    """UNet passes per image: DDIM inversion ``steps`` (Table 2) + decoding, two per guided
    step (d.CFG: steps with t <= 1000 tau only); a student one per step (guidance embedded).
    Table 2: DDIM50 100 (w = 1), 150 (w = 8), 140 (w = 8, tau 0.8); the 4-step pair 8."""
    from ..solver import sampling_timesteps

    if row.method.startswith("CD"):  # Table 4: the reverse student of an m-step pair
        return int(row.method[2:])
    if row.method == "iCD":  # Table 2: m encoding + m decoding steps
        return 2 * m
    grid = sampling_timesteps(steps)[:-1]  # the decoding steps' t: 999, 979, ..., 19
    guided = sum(1 for t in grid if row.w != 1 and (row.tau is None or t <= 1000 * row.tau))
    return (steps if row.table == 2 else 0) + len(grid) + guided


def table2(pipe, images: Sequence, captions: Sequence[str], metrics, out=None,
           rows=TABLE2_ROWS, seed: int = SEED, steps: int = BASELINE_STEPS,
           batch_size: int = 8, fit: str = "resize", progress: bool = True) -> pd.DataFrame:
    """PAPER Table 2 on an ``SD15Pipeline``: reconstruction of ``images`` (paths or PIL images,
    read lazily at the VAE's size, ``fit``) with their ``captions``.

    ``metrics``: an ``InversionMetrics``, or a zero-argument function building one, called once
    the images are made (so a GPU holds the diffusion models and the metric models in turn).
    ``out``: the run folder (module doc; resumable); None: a temporary one. ``seed``: image i's
    t = 19 noise is seeded ``seed + i``. ``steps``: the DDIM rows' steps (50: the paper's).

    Returns a DataFrame indexed by the row's label: method, w, tau, nfe, images, lpips, dino,
    psnr, psnr_ci95, mse, seconds_per_image (of the images made in this call; NaN when all were
    already there), paper_lpips, paper_dino, paper_psnr. Writes ``table2*.csv/txt/json``.
    """
    if len(images) != len(captions) or not len(images):
        raise ValueError(f"need one caption per image and at least one image, got "
                         f"{len(images)} images and {len(captions)} captions")
    with _run_folder(out) as folder:
        folder = prepare_out(folder, [(_name(s), c) for s, c in zip(images, captions)],
                             {"table": 2, "seed": seed, "fit": fit,
                              "size": pipe.base.image_size})
        made = make_reconstructions(pipe, images, captions, folder, rows, seed, steps,
                                    batch_size, fit, progress)
        metrics = metrics() if callable(metrics) else metrics
        release, m = pipe.config.release, pipe.boundaries.m
        per_image = score_reconstructions(folder, rows, len(images), metrics, release, steps)
        table = _table2_frame(rows, per_image, made, m, release, steps)
        _write(folder, "table2", table, per_image,
               {row.folder(release, steps): made[row] for row in rows},
               {"images": len(images), "seed": seed, "fit": fit, "steps": steps,
                "release": release})
    return table


def _table2_frame(rows, per_image, made, m, release, steps) -> pd.DataFrame:
    import pandas as pd
    records = []
    for row in rows:
        scores = per_image[per_image.row == row.folder(release, steps)]
        psnr, spread = _mean_and_spread(scores.psnr)
        records.append({
            "row": row.label(m, release, steps), "method": row.method, "w": row.w,
            "tau": row.tau, "nfe": made[row].nfe or expected_nfe(row, m, steps),
            "images": len(scores), "lpips": scores.lpips.mean(), "dino": scores.dino.mean(),
            "psnr": psnr, "psnr_ci95": spread, "mse": scores.mse.mean(),
            "seconds_per_image": made[row].seconds / made[row].images if made[row].images
            else float("nan"), **paper_values(row, m)})
    return pd.DataFrame.from_records(records).set_index("row")


# --- Table 4 -----------------------------------------------------------------------------------

def prompt_noise(indices: Sequence[int], shape: tuple[int, ...], seed: int = SEED) -> torch.Tensor:
    """x_T [B, *shape]: prompt i's noise from a CPU generator seeded ``seed + i`` (the same for
    every row and batch; ``pipe.generate(prompt_i, seed=seed + i)`` draws the same)."""
    return torch.cat([torch.randn((1, *shape), generator=torch.Generator().manual_seed(seed + i))
                      for i in indices])


@torch.no_grad()
def ddim_generate(pipe, noise: torch.Tensor, prompts: Sequence[str], w: float = W_GUIDED,
                  tau: float | None = None, steps: int = BASELINE_STEPS):
    """DDIM on plain SD1.5 (``pipe.base``) from x_999 = ``noise``, two-pass CFG with the empty
    prompt. Returns (images [B, 3, H, W] in [-1, 1], NFE per image)."""
    base = pipe.base
    cond = base.encode_prompt(list(prompts))
    null = base.encode_prompt([""] * len(prompts))
    model = CountCalls(base.eps_model())
    latents = baselines.ddim_decode(model, noise.to(base.device, base.unet.dtype), cond, null,
                                    w, tau, steps)
    return base.decode_latents(latents), model.calls


def make_generations(students: dict, prompts: Sequence[str], out: Path, rows=TABLE4_ROWS,
                     seed: int = SEED, steps: int = BASELINE_STEPS, batch_size: int = 8,
                     progress: bool = True) -> dict[Row, Made]:
    """Every row's images under ``out/images/<row>``; rows whose pair is missing are left out.
    ``students``: {"CD4": pipe, "CD3": pipe3} (the DDIM rows use the first pipe's base)."""
    first = next(iter(students.values()))
    made = {}
    for row in rows:
        pipe = first if row.method == "DDIM" else students.get(row.method)
        if pipe is None:
            continue
        folder = out / "images" / row.folder(pipe.config.release, steps)
        todo = [i for i in range(len(prompts)) if not picture_path(folder, i).is_file()]
        clock, made[row] = Clock(pipe.device), Made()
        for chunk in tqdm(list(batches(todo, batch_size)), desc=f"Table 4, {folder.name}",
                          disable=not progress):
            noise = prompt_noise(chunk, pipe.latent_shape, seed)  # (B, 4, h, w), CPU
            texts = [prompts[i] for i in chunk]
            begin = clock()
            if row.method == "DDIM":
                images, nfe = ddim_generate(pipe, noise, texts, row.w, row.tau, steps)
            else:
                output = pipe.decode(noise.to(pipe.device), texts, row.w, row.tau)
                images, nfe = output.images, output.nfe
            made[row].add(len(chunk), clock() - begin, nfe)
            save_pictures(images, [picture_path(folder, i) for i in chunk])
    return made


@dataclass
class GenerationMetrics:
    """Table 4's metrics (PAPER Table 4; OFF ``calculate_fid``, ``calc_clip_score_images_prompts``,
    ``calc_ir``): ``fid`` an ``sd15.metrics.FID`` (LANCZOS 256 + centre crop, Inception pool
    features; a tiny feature net in tests), ``clip`` a ``ClipScore`` with convention "cosine"
    (raw cosine, ViT-L/14), ``image_reward`` an ``ImageReward`` or None (NaN column)."""

    fid: object | None = None
    clip: object | None = None
    image_reward: object | None = None

    @classmethod
    def from_pretrained(cls, device="cpu", clip: str | None = None, fid: bool = True,
                        image_reward: bool = False):
        from ..sd15 import metrics as M

        return cls(M.FID(device=device) if fid else None,
                   M.ClipScore.from_pretrained(clip or M.CLIP_ID, "cosine", device),
                   M.ImageReward.from_pretrained(device=device) if image_reward else None)


def check_fid_reference(path) -> int:
    """The feature width D of a pytorch-fid statistics file; ValueError (one line) when it is
    missing or lacks a vector ``mu`` [D] and a matrix ``sigma`` [D, D]."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"FID reference {path} not found (pytorch-fid statistics .npz with mu "
                         f"and sigma, e.g. the authors' fid_stats_mscoco512_val.npz)")
    try:
        stats = np.load(path)  # an NpzFile; a .npy gives an array (IndexError below)
        mu, sigma = np.asarray(stats["mu"]), np.asarray(stats["sigma"])
    except (KeyError, IndexError, ValueError, OSError, zipfile.BadZipFile) as error:
        raise ValueError(f"FID reference {path}: not a .npz with mu and sigma ({error})") from None
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)):
        raise ValueError(f"FID reference {path}: mu must be [D] and sigma [D, D], got "
                         f"{mu.shape} and {sigma.shape}")
    return len(mu)


def score_generations(out: Path, rows, prompts, metrics: GenerationMetrics, fid_reference,
                      releases: dict, steps: int, batch_size: int = 16
                      ) -> tuple[pd.DataFrame, dict]:
    """Per image: clip, image_reward; per row: FID of all its images against the reference
    (NaN without a reference or an FID metric)."""
    import pandas as pd

    fid = metrics.fid if fid_reference is not None else None
    if fid is not None:
        fid.load_reference(str(fid_reference))
    records, fids = [], {}
    for row in rows:
        folder = out / "images" / row.folder(releases[row], steps)
        if fid is not None:
            fid.reset()  # the generated set only: the reference stays
        for chunk in batches(range(len(prompts)), batch_size):
            images, texts = read_pictures([picture_path(folder, i) for i in chunk]), \
                [prompts[i] for i in chunk]
            clip = metrics.clip.clip_t(images, texts) if metrics.clip else None
            reward = metrics.image_reward(images, texts) if metrics.image_reward else None
            if fid is not None:
                fid.update(images, real=False)
            records += [{"row": row.folder(releases[row], steps), "index": i,
                         "clip": float("nan") if clip is None else float(clip[k]),
                         "image_reward": float("nan") if reward is None else float(reward[k])}
                        for k, i in enumerate(chunk)]
        fids[row] = fid.compute() if fid is not None else float("nan")
    return pd.DataFrame.from_records(records), fids


def table4(pipe, prompts: Sequence[str], metrics, fid_reference, pipe3=None, out=None,
           rows=TABLE4_ROWS, seed: int = SEED, steps: int = BASELINE_STEPS,
           batch_size: int = 8, progress: bool = True) -> pd.DataFrame:
    """PAPER Table 4 at w = 8: generation from ``prompts`` by DDIM on plain SD1.5 and by the
    reverse students of ``pipe`` (a 4-step pair: the CD4 rows) and ``pipe3`` (optional, the
    3-step release: the CD3 rows); a pair of another m fills the rows of its m.

    ``metrics``: a ``GenerationMetrics`` or a zero-argument function building one (called after
    the images are made). ``fid_reference``: pytorch-fid statistics ``.npz`` (None: FID NaN).
    ``seed``: prompt i's noise is seeded ``seed + i``, the same for every row. ``out``: the run
    folder (resumable); None: a temporary one.

    Returns a DataFrame indexed by the row's label: method, w, tau, nfe, images, fid, clip,
    image_reward, seconds_per_image, paper_fid, paper_clip, paper_image_reward.
    """
    prompts = list(prompts)
    if not prompts:
        raise ValueError("no prompts")
    if fid_reference is not None:
        check_fid_reference(fid_reference)
    students = {f"CD{p.boundaries.m}": p for p in (pipe, pipe3) if p is not None}
    with _run_folder(out) as folder:
        folder = prepare_out(folder, [(str(i), p) for i, p in enumerate(prompts)],
                             {"table": 4, "seed": seed, "size": pipe.base.image_size})
        made = make_generations(students, prompts, folder, rows, seed, steps, batch_size,
                                progress)
        rows = list(made)
        metrics = metrics() if callable(metrics) else metrics
        releases = {row: (pipe if row.method == "DDIM" else students[row.method]).config.release
                    for row in rows}
        per_image, fids = score_generations(folder, rows, prompts, metrics, fid_reference,
                                            releases, steps)
        table = _table4_frame(rows, per_image, fids, made, releases, steps)
        _write(folder, "table4", table, per_image,
               {row.folder(releases[row], steps): made[row] for row in rows}, {
            "prompts": len(prompts), "seed": seed, "steps": steps,
            "fid_reference": str(fid_reference), "releases": sorted({str(r) for r in
                                                                      releases.values()})})
    return table


def _table4_frame(rows, per_image, fids, made, releases, steps) -> pd.DataFrame:
    import pandas as pd
    records = []
    for row in rows:
        scores = per_image[per_image.row == row.folder(releases[row], steps)]
        m = int(row.method[2:]) if row.method.startswith("CD") else None
        records.append({
            "row": row.label(m, releases[row], steps), "method": row.method, "w": row.w,
            "tau": row.tau, "nfe": made[row].nfe or expected_nfe(row, m, steps),
            "images": len(scores), "fid": fids[row], "clip": scores["clip"].mean(),
            "image_reward": scores.image_reward.mean(),
            "seconds_per_image": made[row].seconds / made[row].images if made[row].images
            else float("nan"), **paper_values(row)})
    return pd.DataFrame.from_records(records).set_index("row")


# --- shared ------------------------------------------------------------------------------------

def _name(source) -> str:
    return str(source) if isinstance(source, (str, Path)) else f"<{type(source).__name__}>"


def _run_folder(out):
    """``out`` as a context (None: a temporary folder, removed afterwards)."""
    if out is None:
        return tempfile.TemporaryDirectory(prefix="icd-table-")
    return nullcontext(out)


TITLES = {"table2": "Table 2, inversion: LPIPS (VGG, 224 px; down), DINOv2 cosine (up), PSNR dB "
                    "(up); paper_*: the paper's SD1.5 numbers",
          "table4": "Table 4, generation at w = 8: FID vs the reference (down), CLIP score "
                    "ViT-L/14 raw cosine (up), ImageReward (up; NaN when not installed); "
                    "paper_*: the paper's SD1.5 numbers"}


def format_table(table: pd.DataFrame) -> str:
    """The table as text, measured and paper columns side by side."""
    return table.to_string(float_format=lambda v: f"{v:.4g}", na_rep="-")


def _write(folder: Path, name: str, table, per_image, made: dict, settings: dict) -> None:
    """``<name>.csv``, ``<name>.txt``, ``<name>_per_image.csv``, ``<name>_run.json``; print."""
    table.to_csv(folder / f"{name}.csv")
    per_image.to_csv(folder / f"{name}_per_image.csv", index=False)
    text = f"{TITLES[name]}\n{format_table(table)}\n"
    (folder / f"{name}.txt").write_text(text)
    record = {**settings, "made_now": {name: asdict(m) for name, m in made.items()}}
    (folder / f"{name}_run.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(text, flush=True)


# --- from the command line ---------------------------------------------------------------------

def read_prompts(path, limit: int | None = None) -> list[str]:
    """Prompts from a CSV with a ``caption`` column (COCO's layout, the authors'
    ``generation_coco.csv``) or a ``prompt`` column, or a text file with one per line; the first
    ``limit``. ValueError (one line) for a missing file, column or an empty list."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"prompt file {path} not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as file:
            reader = csv.DictReader(file)
            column = next((c for c in ("caption", "prompt") if c in (reader.fieldnames or [])),
                          None)
            if column is None:
                raise ValueError(f"{path} has no caption or prompt column (got "
                                 f"{reader.fieldnames})")
            prompts = [(row[column] or "").strip() for row in reader]
    else:
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()
                   if line.strip()]
    if not prompts:
        raise ValueError(f"{path} holds no prompts")
    return prompts[:limit] if limit else prompts


def read_pairs(data, images=None, limit: int | None = None) -> tuple[list[Path], list[str]]:
    """(image paths, captions) from a COCO-layout CSV (``file_name``, ``caption``; images in
    ``images`` or the folder named as the CSV's stem) or a folder of images with same-stem
    ``.txt`` captions (``sd15.data.CaptionImages``); the first ``limit``, each checked to
    exist. ValueError (one line) otherwise."""
    from ..sd15.data import CaptionImages

    path = Path(data)
    if path.suffix.lower() == ".csv" and path.is_file():
        pairs = CaptionImages.from_csv(path, images)
    elif path.is_dir():
        pairs = CaptionImages.from_folder(path)
    else:
        raise ValueError(f"--data {data}: not a CSV file (idx, file_name, caption) or a folder "
                         f"of images with .txt captions")
    paths, captions = pairs.paths[:limit], [c.strip() for c in pairs.captions[:limit]]
    missing = [p for p in paths if not Path(p).is_file()]
    if missing:
        raise ValueError(f"{len(missing)} image(s) of --data not found, e.g. {missing[0]}")
    return paths, captions


def _free(pipes, device) -> None:
    """Move the diffusion models off the GPU so the metric models fit beside nothing."""
    for pipe in pipes:
        if pipe is not None:
            pipe.to("cpu")
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def run_table2_command(paths, captions, out, sources: dict, device="auto", seed: int = SEED,
                       steps: int = BASELINE_STEPS, batch_size: int = 8, fit: str = "resize",
                       metric_models: dict | None = None) -> pd.DataFrame:
    """``python -m icd_lite.bench table2``: load the pipeline from ``sources``
    (``load_sd15_pipeline``'s keyword arguments), make the reconstructions, move the pipeline
    off the GPU, then score with ``InversionMetrics.from_pretrained(**metric_models)``."""
    from ..device import resolve_device
    from ..sd15.loading import load_sd15_pipeline

    device = resolve_device(device)
    pipe = load_sd15_pipeline(device=device, **sources)

    def metrics():
        _free([pipe], device)
        return InversionMetrics.from_pretrained(device, **(metric_models or {}))

    return table2(pipe, paths, captions, metrics, out, seed=seed, steps=steps,
                  batch_size=batch_size, fit=fit)


def run_table4_command(prompts, fid_reference, out, sources: dict, release3: str | None = "3step",
                       device="auto", seed: int = SEED, steps: int = BASELINE_STEPS,
                       batch_size: int = 8, metric_models: dict | None = None) -> pd.DataFrame:
    """``python -m icd_lite.bench table4``: the pair of ``sources`` (CD4 rows and the DDIM
    baseline) and, unless ``release3`` is None, the 3-step release from the same LoRA source
    (without a second base UNet); generate, free the GPU, score with
    ``GenerationMetrics.from_pretrained(**metric_models)``."""
    from ..device import resolve_device
    from ..sd15.loading import load_sd15_pipeline

    device = resolve_device(device)
    pipe = load_sd15_pipeline(device=device, **sources)
    pipe3 = None
    if release3 is not None:
        pipe3 = load_sd15_pipeline(device=device, with_base_unet=False,
                                   **{**sources, "release": release3})

    def metrics():
        _free([pipe, pipe3], device)
        return GenerationMetrics.from_pretrained(device, **(metric_models or {}))

    return table4(pipe, prompts, metrics, fid_reference, pipe3, out, seed=seed, steps=steps,
                  batch_size=batch_size)
