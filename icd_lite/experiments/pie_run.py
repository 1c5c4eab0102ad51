r"""Every editor on PIE-Bench at SD1.5 scale, scored by both metric suites:
``python -m icd_lite.bench pie --data DIR --preset sd15`` (the CLI parses; this module runs).

    items  = load_items(DIR, "icd140")                       # pie_bench.load_pie_bench + select
    pipe   = load_sd15_pipeline("4step-v1")                  # the students and plain SD1.5
    tables = run_pie(items, make_editors(pipe), lambda: build_suites("cuda"), "build/pie-bench")

writes, under the output folder::

    edits/<editor>/<PIE-Bench image path>.png   one edit per image (a rerun skips existing files)
    pnp_per_image.csv  pnp_table.csv  pnp_by_edit_type.csv  pnp_table.txt
    icd_per_image.csv  icd_table.csv  icd_by_edit_type.csv  icd_table.txt
    run.json                                    settings, and seconds / NFE of this run's edits

The two suites stay apart (``pie_bench.PnPSuite``: PnPInversion's Table 1 with its quirks;
``pie_bench.ICDSuite``: iCD's Fig. 9 metrics); each table is printed as the papers print it.

Editors and their settings (``SETTINGS``; w is classical, 1 = unguided, the code unit is w - 1):

=========  ======================================  =====  ==========  ====================
editor     what                                    w      P2P x / s   amplify, blend
=========  ======================================  =====  ==========  ====================
icd        iCD, 4 + 4 NFE, dynamic w (tau 0.8)     20     0.3 / 0.6   4, blend 0.3
ddim       DDIM50 inversion + P2P, null prompt     8      0.4 / 0.8   3, blend 0.3
npi        negative-prompt inversion + P2P         8      0.2 / 0.5   3, blend 0.3
nti        null-text inversion + P2P (10 Adam)     8      0.4 / 0.8   3, blend 0.3
=========  ======================================  =====  ==========  ====================

Sources: iCD's ``running/sd1.5/launch_editing_iCD_sd1.5.sh`` and ``edit.py`` (yandex-research/
invertible-cd @ 1bf9010; ``../shared/sd15_facts.md`` section 1.6): w = 19 in the code unit, tau
0.8, P2P cross 0.3 / self 0.6, amplify 4, seed 30; NPI: CFG 8 (the classical formula, so
classical 8), 0.2 / 0.5, amplify 3; NTI: CFG 8, 0.4 / 0.8, amplify 3. iCD reports no DDIM + P2P
row; it gets NTI's settings here, since both decode from the same DDIM inversion with a null
unconditional input (NTI's optimised, DDIM's the empty prompt).

Words, as iCD's ``edit.py`` picks them (``is_replacement`` False, the benchmark's path):
- amplify: the target prompt's words (split on spaces) that the source prompt lacks, English
  stopwords removed (``STOPWORDS``: nltk's English list, copied here so no corpus is
  downloaded);
- local blend: PIE-Bench's ``blended_word`` "source_word target_word" -> ((source,), (target,)),
  none when it does not hold exactly two words.
A word the prompt does not contain (P2P's word matching cannot place it) is dropped rather than
stopping the benchmark; ``run.json`` counts the items whose blend was dropped.

Images: the source picture (512 x 512 uint8) maps to [-1, 1]; an edit comes back in [-1, 1] at
the VAE's size and is saved as a 512 x 512 PNG (a VAE of another size, like the tiny fabricated
one's 128, is resized back with bicubic antialiasing, so the metrics always see PIE-Bench's size).
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..attention import AlignmentError, word_positions
from ..editing import Edit, P2PSettings, baseline_edit, icd_edit
from . import pie_bench

EDITORS = ("icd", "ddim", "npi", "nti")
SEED = 30  # iCD's launchers: the noise that takes the latent to t = 19
BASELINE_STEPS = 50
NTI_INNER_STEPS = 10
# nltk's English stopwords (nltk_data corpora/stopwords/english, 179 words), which iCD's edit.py
# removes from the amplify words.
STOPWORDS = frozenset("""i me my myself we our ours ourselves you you're you've you'll you'd your
yours yourself yourselves he him his himself she she's her hers herself it it's its itself they
them their theirs themselves what which who whom this that that'll these those am is are was were
be been being have has had having do does did doing a an the and but if or because as until while
of at by for with about against between into through during before after above below to from up
down in out on off over under again further then once here there when where why how all any both
each few more most other some such no nor not only own same so than too very s t can will just
don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn didn't doesn
doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't needn
needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't""".split())


@dataclass(frozen=True)
class EditorSettings:
    """One editor's benchmark settings. ``w``: classical guidance (1 = unguided; the code unit
    is w - 1); ``tau``: iCD's dynamic guidance (guided only for t <= 1000 tau), None for the
    teacher baselines (constant CFG)."""

    label: str  # the method's name in the tables
    w: float
    p2p: P2PSettings
    tau: float | None = None


SETTINGS = {
    "icd": EditorSettings("iCD + P2P", 20.0, P2PSettings(0.3, 0.6, 4.0, 0.3), tau=0.8),
    "ddim": EditorSettings("DDIM50 + P2P", 8.0, P2PSettings(0.4, 0.8, 3.0, 0.3)),
    "npi": EditorSettings("NPI + P2P", 8.0, P2PSettings(0.2, 0.5, 3.0, 0.3)),
    "nti": EditorSettings("NTI + P2P", 8.0, P2PSettings(0.4, 0.8, 3.0, 0.3)),
}


# --- the data and the words ------------------------------------------------------------------

def load_items(data, subset: str = "icd140", limit: int | None = None
               ) -> list[pie_bench.PieItem]:
    """The PIE-Bench entries of ``subset`` ("all", "icd140", "icd420"), the first ``limit`` of
    them if given. Raises FileNotFoundError / ValueError (``pie_bench``) for a bad folder."""
    items = pie_bench.select(pie_bench.load_pie_bench(data), subset)
    return items[:limit] if limit else items


def _placeable(tokenizer, prompt: str, words: tuple[str, ...]) -> bool:
    """Whether P2P can find every word of ``words`` in ``prompt`` (its own matching rule)."""
    try:
        word_positions(tokenizer, prompt, words)
        return True
    except AlignmentError:
        return False


def amplify_words(item, tokenizer) -> tuple[str, ...]:
    """The target words to reweight: those the source lacks, stopwords removed (iCD's rule),
    keeping the ones P2P can place in the target prompt."""
    source = item.original_prompt.split(" ")
    words = [w for w in item.editing_prompt.split(" ")
             if w and w not in source and w.lower() not in STOPWORDS]
    return tuple(w for w in words if _placeable(tokenizer, item.editing_prompt, (w,)))


def blend_words(item, tokenizer):
    """((source word,), (target word,)) from PIE-Bench's ``blended_word``, or None when it
    does not hold two words or P2P cannot place them in their prompts."""
    words = item.blended_word.split()
    if len(words) != 2:
        return None
    pair = ((words[0],), (words[1],))
    if not (_placeable(tokenizer, item.original_prompt, pair[0])
            and _placeable(tokenizer, item.editing_prompt, pair[1])):
        return None
    return pair


# --- images ----------------------------------------------------------------------------------

def source_image(item, device) -> torch.Tensor:
    """The source picture as the editors take it: float [1, 3, 512, 512] in [-1, 1]."""
    return (item.image().float() / 127.5 - 1)[None].to(device)


def pie_image(images: torch.Tensor) -> torch.Tensor:
    """The edit of a batch of one, [1, 3, S, S] in [-1, 1], as float [3, 512, 512] in [0, 1]
    (resized, bicubic with antialiasing, when S is not 512)."""
    image = ((images[0].detach().float().cpu() + 1) / 2).clamp(0, 1)  # (3, S, S)
    if tuple(image.shape[-2:]) != (pie_bench.SIZE, pie_bench.SIZE):
        image = F.interpolate(image[None], size=(pie_bench.SIZE, pie_bench.SIZE),
                              mode="bicubic", antialias=True, align_corners=False)[0]
    return image.clamp(0, 1)


# --- the editors -----------------------------------------------------------------------------

def make_editors(pipe, names: Sequence[str] = EDITORS, seed: int = SEED,
                 baseline_steps: int = BASELINE_STEPS,
                 nti_inner_steps: int = NTI_INNER_STEPS) -> dict[str, Callable]:
    """{name: edit(item) -> editing.Edit} on an ``SD15Pipeline`` with ``SETTINGS``: iCD on the
    students, the baselines on ``pipe.base`` (plain SD1.5, two-pass CFG, ``baseline_steps``
    DDIM steps). ValueError for an unknown name."""
    unknown = [name for name in names if name not in SETTINGS]
    if unknown:
        raise ValueError(f"unknown editor {unknown[0]!r}; choose from {', '.join(EDITORS)}")
    return {name: _editor(pipe, name, seed, baseline_steps, nti_inner_steps) for name in names}


def _editor(pipe, name: str, seed: int, steps: int, nti_inner_steps: int) -> Callable:
    settings, tokenizer = SETTINGS[name], pipe.base.tokenizer

    def edit(item) -> Edit:
        image = source_image(item, pipe.device)  # (1, 3, 512, 512)
        words = dict(blend_words=[blend_words(item, tokenizer)],
                     amplify_words=[amplify_words(item, tokenizer)])
        if name == "icd":
            return icd_edit(pipe, image, item.original_prompt, item.editing_prompt, settings.w,
                            settings.tau, settings.p2p, seed=seed, **words)
        return baseline_edit(pipe.base, image, item.original_prompt, item.editing_prompt, name,
                             settings.w, steps, settings.p2p, nti_inner_steps=nti_inner_steps,
                             **words)
    return edit


# --- the run ---------------------------------------------------------------------------------

def run_edits(items, editors: Mapping[str, Callable], folder) -> tuple[dict, dict]:
    """Run each editor over the items, saving ``<folder>/<editor>/<image path>.png`` (existing
    files are kept: a rerun resumes). Returns ({editor: {id: path}}, {editor: timing of the
    edits made in this call: count, mean seconds, NFE per edit})."""
    edited, timing = {}, {}
    for name, editor in editors.items():
        done = []

        def edit(item, editor=editor, done=done):
            result = editor(item)
            done.append((result.seconds, result.nfe))
            return pie_image(result.images)

        edited[name] = pie_bench.save_edits(items, edit, Path(folder) / name)
        timing[name] = {"edited_now": len(done), "skipped": len(items) - len(done),
                        "mean_seconds": sum(s for s, _ in done) / len(done) if done else None,
                        "nfe": done[0][1] if done else None}
        print(f"{name}: {len(done)} edited, {len(items) - len(done)} already there", flush=True)
    return edited, timing


TITLES = {"pnp": "PnPInversion's metrics (PIE-Bench Table 1; structure x10^3, background on "
                 "(1 - mask) images, CLIP = 100 max(cos, 0))",
          "icd": "iCD's metrics (Fig. 9; CLIP score and CLIP-I raw cosine, DINOv2 pooled "
                 "cosine, ImageReward NaN when not installed)"}


def score_edits(items, edited: Mapping[str, Mapping], suites, folder,
                labels: Mapping[str, str] | None = None) -> dict:
    """Score with each suite and write ``<suite>_per_image.csv``, ``<suite>_table.csv`` (one row
    per method), ``<suite>_by_edit_type.csv`` and ``<suite>_table.txt``; print each table.
    ``labels`` maps editor names to the tables' method names. Returns {suite name: table}."""
    folder, tables = Path(folder), {}
    labels = labels or {name: SETTINGS[name].label if name in SETTINGS else name
                        for name in edited}
    named = {labels[name]: paths for name, paths in edited.items()}
    for suite in suites:
        per_image, summary = pie_bench.evaluate(items, named, suite)
        per_image.to_csv(folder / f"{suite.name}_per_image.csv", index=False)
        summary.to_csv(folder / f"{suite.name}_table.csv")
        pie_bench.summary_table(per_image, suite, "edit_type").to_csv(
            folder / f"{suite.name}_by_edit_type.csv")
        text = (f"{TITLES.get(suite.name, suite.name)}, {len(items)} images\n"
                f"{pie_bench.format_table(summary)}\n")
        (folder / f"{suite.name}_table.txt").write_text(text)
        print(text, flush=True)
        tables[suite.name] = summary
    return tables


def run_pie(items, editors: Mapping[str, Callable], suites, out, settings: dict | None = None
            ) -> dict:
    """Edit (resumable), then score: see the module docstring for the files.

    ``suites``: the metric suites, or a zero-argument function that builds them, called after
    the edits (so a GPU holds the editing models and the metric models one after the other).
    ``settings`` are recorded in ``run.json``. Returns {suite name: table}."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    begin = time.perf_counter()
    edited, timing = run_edits(items, editors, out / "edits")
    edit_seconds = time.perf_counter() - begin
    suites = suites() if callable(suites) else suites
    tables = score_edits(items, edited, suites, out)
    record = {"items": len(items),
              "editors": {name: {**(asdict(SETTINGS[name]) if name in SETTINGS else {}),
                                 **timing[name]} for name in editors},
              "edit_seconds": round(edit_seconds, 1),
              "score_seconds": round(time.perf_counter() - begin - edit_seconds, 1),
              **(settings or {})}
    (out / "run.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
    return tables


def dropped_blends(items, tokenizer) -> int:
    """How many items have a two-word ``blended_word`` that P2P cannot place (no blend)."""
    return sum(1 for item in items
               if len(item.blended_word.split()) == 2 and blend_words(item, tokenizer) is None)


# --- from the command line -------------------------------------------------------------------

def build_suites(device="cpu", clip: str | None = None, dino: str | None = None,
                 dinov2: str | None = None, image_reward: bool = False, lpips: bool = True):
    """(PnPSuite, ICDSuite) from hub ids or local folders (defaults: ``sd15.metrics``'
    CLIP ViT-L/14, DINO ViT-B/8, DINOv2-base). ``lpips=False`` leaves PnP's LPIPS column NaN
    (it needs torchvision); ``image_reward`` needs the optional package (ImportError otherwise)."""
    from ..sd15 import metrics as M

    clip = clip or M.CLIP_ID
    pnp = pie_bench.PnPSuite(M.ClipScore.from_pretrained(clip, "torchmetrics", device),
                             M.DinoStructureDistance.from_pretrained(dino or M.DINO_VITB8_ID,
                                                                     device),
                             M.LPIPS.pnp(device) if lpips else None)
    icd = pie_bench.ICDSuite(M.ClipScore.from_pretrained(clip, "cosine", device),
                             M.DinoV2Similarity.from_pretrained(dinov2 or M.DINOV2_ID, device),
                             M.ImageReward.from_pretrained(device=device) if image_reward
                             else None)
    return pnp, icd


def run_command(items, out, sources: dict, editors: Sequence[str] = EDITORS, device="auto",
                baseline_steps: int = BASELINE_STEPS, nti_inner_steps: int = NTI_INNER_STEPS,
                metric_models: dict | None = None) -> dict:
    """``python -m icd_lite.bench pie``: load the SD1.5 pipeline from ``sources`` (the keyword
    arguments of ``load_sd15_pipeline``: release, base, teacher, loras, cond_proj...), run
    ``editors``, then move it off the GPU and score with ``build_suites(**metric_models)``."""
    from ..device import resolve_device
    from ..sd15.loading import load_sd15_pipeline

    device = resolve_device(device)
    pipe = load_sd15_pipeline(device=device, **sources)

    def suites():
        pipe.to("cpu")  # the editing models make room for the metric models
        if device.type == "cuda":
            torch.cuda.empty_cache()
        return build_suites(device, **(metric_models or {}))

    settings = {"sources": {k: str(v) for k, v in sources.items()}, "device": str(device),
                "dtype": str(pipe.vae.dtype), "seed": SEED, "baseline_steps": baseline_steps,
                "nti_inner_steps": nti_inner_steps,
                "blend_dropped": dropped_blends(items, pipe.base.tokenizer)}
    return run_pie(items, make_editors(pipe, editors, SEED, baseline_steps, nti_inner_steps),
                   suites, out, settings)
