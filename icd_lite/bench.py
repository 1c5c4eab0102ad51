"""Benchmarks that print figures: ``python -m icd_lite.bench world | inversion | editing | sd15 |
pie | table2 | table4``.

``world`` measures the shipped toy world against its quality bars and writes
``build/bench/world.json``:

* VAE reconstruction PSNR on held-out scenes (bar: >= 30 dB);
* the toy CLIP's zero-shot attribute accuracy on *real* held-out images and on their VAE
  reconstructions (how far the metric itself can be trusted; every generated image is decoded,
  so the second is the ceiling of any generator's score);
* the teacher, DDIM 50 steps with CFG w = 8 (classical) on random single-object prompts:
  attribute accuracy for shape, object colour and background colour (bar: >= 95 % each), CLIP-T,
  and the Frechet distance to real images next to the distance between two real sets of the
  same size (the floor);
* the training time of each stage of the world (CLIP, VAE, teacher), from the weights manifest.

``inversion`` prints the analogues of the paper's Table 2 (reconstruction of held-out images by
every shipped student pair and by DDIM50) and Table 6 (seconds and NFE per inversion of one
image for iCD, DDIM50, NPI and NTI, measured side by side in this process, as ratios to iCD), and
writes ``build/bench/inversion.json``.

``editing`` runs every editor (iCD 4 and 3 steps with P2P, iCD with prompt switching, DDIM50 +
P2P, NPI + P2P, NTI + P2P; the teacher baselines at the paper's w = 7.5, and DDIM50 / NPI also
at w = 2, where they edit best here) on the same ToyBench cases in one process: the
PIE-Bench-style table per editor (NTI on a stratified subset, the table says how many cases
each saw), attribute
accuracy per edit type, and seconds / NFE per edit, one edit at a time, as ratios to iCD, with
iCD's wall time against the bare cost of its network evaluations. Writes
``build/bench/editing.json``.

``sd15`` (its own options: ``python -m icd_lite.bench sd15 --help``, module
``icd_lite.sd15.bench``) times one 512x512 edit at SD1.5 scale: iCD (8 NFE) against DDIM50 /
NPI / NTI + P2P, iCD's wall time over the bare cost of its UNet passes, peak GPU memory; on a
folder written by ``python -m icd_lite.sd15.fabricate`` or on the real files
(``tools/sd15_gpu_bench.sh``, ``make sd15-bench``).

``pie`` runs every editor (iCD + P2P, DDIM50 / NPI / NTI + P2P, iCD's benchmark settings) on
PIE-Bench at SD1.5 scale and writes PnPInversion's and iCD's metric tables, kept apart
(``icd_lite.experiments.pie_run``)::

    python -m icd_lite.bench pie --data DIR --preset sd15 [--subset all|icd140|icd420]
        [--out DIR] [--editors icd,ddim,npi,nti] [--limit N] [--image-reward] [--no-lpips]
        [--release R | --release none --cond-proj DIR] [--model DIR | --base --teacher --loras]
        [--clip ID --dino ID --dinov2 ID] [--device D]

``table2`` and ``table4`` are the paper's Tables 2 (inversion of COCO images: LPIPS, DINOv2,
PSNR) and 4 (generation at w = 8 from COCO prompts: FID, CLIP score, ImageReward) at SD1.5
scale, the paper's numbers beside (``icd_lite.experiments.sd15_tables``)::

    python -m icd_lite.bench table2 --data CSV_OR_FOLDER [--images DIR] [--limit N] [--out DIR]
        [--fit resize|crop] [--no-lpips] [--dinov2 ID] [source options as pie]
    python -m icd_lite.bench table4 --prompts CSV --fid-reference NPZ [--limit N] [--out DIR]
        [--release3 3step|none] [--image-reward] [--clip ID] [source options as pie]

``--device`` (default auto: CUDA when available, else the CPU) picks where the models run; the
seeded noise is drawn on the CPU either way, so a seed gives the same samples on both, within
float tolerance. ``--threads`` sets the CPU threads (on the CPU only). ``--n``, ``--timing`` and
``--nti-per-type`` make a quick run smaller (e.g. ``tools/gpu_check.sh``).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import sys
from pathlib import Path

import torch

from . import metrics
from .components import load_components
from .device import add_device_arguments, configure_threads, resolve_device
from .experiments import editing_evaluation, evaluation, toybench
from .experiments.world_quality import measure_world
from .pipeline import load_pipelines
from .world.scenes import make_dataset

OUT_DIR = Path("build/bench")


def print_world(results: dict) -> None:
    acc = results["teacher_attribute_accuracy"]
    rows = [
        ("VAE reconstruction PSNR (dB), held-out", f"{results['vae_psnr_db']['mean']:.2f} "
         f"(5th percentile {results['vae_psnr_db']['p05']:.2f})", ">= 30"),
        *[(f"teacher attribute accuracy: {k}", f"{100 * v:.1f} %", ">= 95 %")
          for k, v in acc.items()],
        *[(f"CLIP zero-shot accuracy on {kind} images: {k}", f"{100 * v:.1f} %",
           "(metric check)")
          for kind in ("real", "decoded")
          for k, v in results[f"clip_accuracy_on_{kind}_images"].items()],
        ("teacher CLIP-T / real images' CLIP-T", f"{results['teacher_clip_t']:.3f} / "
         f"{results['real_clip_t']:.3f}", ""),
        ("Frechet distance teacher vs real / real vs real",
         f"{results['fd_teacher_vs_real']:.4f} / {results['fd_real_vs_real_floor']:.4f}", ""),
        *[(f"training minutes, {k} (summed over its runs)", f"{v} min",
           "stages overlap: the 45 min bar is make train-world's wall clock")
          for k, v in results["train_minutes"].items()],
    ]
    width = max(len(r[0]) for r in rows)
    print(f"toy world, n = {results['n']}, teacher DDIM{results['settings']['ddim_steps']} "
          f"w = {results['settings']['w_classical']:g} ({results['teacher_seconds']:.0f} s)")
    for name, value, bar in rows:
        print(f"  {name:<{width}}  {value:<28} {bar}")


def bench_inversion(n: int = 200, timing_images: int = 3, device: str | torch.device = "cpu",
                    recipes=None, steps: int = 50, nti_inner_steps: int = 10) -> dict:
    """Tables 2 and 6 on ``n`` held-out images; ``recipes`` (default: every shipped pair; "G"
    is needed for Table 6), ``steps`` of the DDIM baselines and ``nti_inner_steps`` shrink a
    quick run."""
    components = load_components("toy", device=device)
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    pipes = load_pipelines(components, recipes)
    images, captions, _ = make_dataset(n, seed=21)
    images = images.to(components.device)
    table2 = evaluation.table2(pipes, components, images, captions, perception, steps=steps)
    timing = evaluation.timing(pipes["G"], components, images[:timing_images],
                               captions[:timing_images], nti_inner_steps, steps=steps)
    return {"n": n, "table2": table2, "table6": timing}


def format_table(rows: list[dict], columns: dict[str, str]) -> str:
    """Rows of dicts as aligned text; ``columns`` maps a key to its format (e.g. ".2f")."""
    cells = [[f"{row[key]:{fmt}}" if row[key] is not None else "-"
              for key, fmt in columns.items()] for row in rows]
    widths = [max(len(key), *(len(line[i]) for line in cells))
              for i, key in enumerate(columns)]
    lines = ["  ".join(key.ljust(w) for key, w in zip(columns, widths))]
    lines += ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in cells]
    return "\n".join(lines)


def print_inversion(results: dict) -> None:
    print(f"Table 2 analogue: reconstruction of {results['n']} held-out toy images "
          f"(PSNR up, LPIPS-like down, DinoV2-like up)")
    print(format_table(results["table2"], {"config": "s", "nfe": "d", "psnr": ".2f",
                                           "lpips_like": ".4f", "dino_like": ".4f"}))
    print(f"\nTable 6 analogue: one image at a time, w = 8, mean of "
          f"{results['table6'][0]['images']} images, this process")
    print(format_table(results["table6"], {"method": "s", "nfe": ".0f", "seconds": ".3f",
                                           "time_ratio_to_icd": ".1f", "psnr": ".2f"}))


def bench_editing(per_type: int | None = None, nti_per_type: int = 6,
                  device: str | torch.device = "cpu", timing_cases: int | None = None,
                  fast_repeats: int = 5, steps: int = 50, nti_inner_steps: int = 10) -> dict:
    """Every editor on ToyBench (``per_type`` cases per edit type, default all; NTI on
    ``nti_per_type``, 0 leaves NTI out), then edit timing on one case per edit type (the first
    ``timing_cases`` of them if given); ``steps`` of the teacher baselines and
    ``nti_inner_steps`` shrink a quick run."""
    components = load_components("toy", device=device)
    perception = metrics.ToyPerception(components.clip, components.tokenizer)
    pipes = load_pipelines(components, ["G", "G3"])
    cases = toybench.load_toybench()
    if per_type:
        cases = toybench.stratified_subset(cases, per_type)
    editors = editing_evaluation.make_editors(components, pipes, steps=steps,
                                              nti_inner_steps=nti_inner_steps)
    if not nti_per_type:
        del editors["NTI + P2P"]
    # The paper's baselines guide with w = 7.5; on ToyBench they preserve far more near w = 2,
    # where NPI also edits best (notebook 05's sweep), so the table shows the two fast ones there.
    low_w = editing_evaluation.make_editors(components, pipes, w_teacher=2.0, steps=steps)
    tuned = {f"{name}, w = 2": low_w[name] for name in ("DDIM50 + P2P", "NPI + P2P")}
    results = editing_evaluation.toybench_results(perception, editors | tuned, cases,
                                                  per_type={"NTI + P2P": nti_per_type})
    timed = toybench.stratified_subset(cases, 1)[:timing_cases]
    timing = editing_evaluation.edit_timing(editors, timed, pipes["G"], fast_repeats)
    return {"cases": len(cases),
            "settings": {"w_icd": editing_evaluation.W_ICD, "tau": editing_evaluation.TAU_ICD,
                         "w_teacher": editing_evaluation.W_TEACHER},
            "toybench": {name: {key: r[key] for key in ("cases", "nfe", "summary", "rows")}
                         for name, r in results.items()},
            "timing": timing}


EDIT_COLUMNS = {"editor": "s", "cases": "d", "nfe": "d", "attribute_ok": ".3f", "clip_t": ".3f",
                "clip_t_edited": ".3f", "dino_like": ".3f", "structure": ".4f", "bg_psnr": ".2f",
                "bg_lpips": ".4f", "bg_ssim": ".3f", "psnr_target": ".2f"}


def print_editing(results: dict) -> None:
    table = results["toybench"]
    print(f"ToyBench ({results['cases']} cases; w = {results['settings']['w_icd']:g} for iCD, "
          f"{results['settings']['w_teacher']:g} for the teacher baselines unless the row says "
          f"otherwise)")
    rows = [{"editor": name, "cases": r["cases"], "nfe": r["nfe"], **r["summary"]["all"]}
            for name, r in table.items()]
    print(format_table(rows, EDIT_COLUMNS))
    print("\nattribute accuracy per edit type")
    types = [t for t in next(iter(table.values()))["summary"] if t != "all"]
    rows = [{"editor": name, **{t: r["summary"][t]["attribute_ok"] for t in types}}
            for name, r in table.items()]
    print(format_table(rows, {"editor": "s", **{t: ".2f" for t in types}}))
    timing = results["timing"]
    print(f"\nseconds per edit, one at a time, {timing[0]['edits']} edits each, this process")
    print(format_table(timing, {"editor": "s", "nfe": ".0f", "seconds": ".3f",
                                "ratio_to_icd": ".1f"}))
    icd = timing[0]
    print(f"iCD wall time / bare cost of its {icd['nfe']:.0f} network evaluations (timed in "
          f"turn): "
          f"{icd['paired_edit_seconds']:.4f} / {icd['bare_network_seconds']:.4f} s = "
          f"{icd['overhead_ratio']:.2f}x (target <= 1.5x)")


def pie_parser() -> argparse.ArgumentParser:
    """The options of ``python -m icd_lite.bench pie``."""
    from .experiments.pie_run import BASELINE_STEPS, EDITORS, NTI_INNER_STEPS

    parser = argparse.ArgumentParser(
        prog="python -m icd_lite.bench pie",
        description="Every editor on PIE-Bench at SD1.5 scale; PnPInversion's and iCD's "
                    "metric tables (icd_lite.experiments.pie_run).")
    parser.add_argument("--data", type=Path, required=True,
                        help="the PIE-Bench folder (mapping_file.json, annotation_images/)")
    parser.add_argument("--preset", choices=["sd15"], default="sd15",
                        help="sd15 only: the toy world's benchmark is python -m icd_lite.bench "
                             "editing (ToyBench)")
    parser.add_argument("--subset", choices=["all", "icd140", "icd420"], default="icd140",
                        help="all 700, iCD's 140 (type 0) or 420 (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("build/pie-bench"), metavar="DIR",
                        help="edits, CSVs and tables (default: %(default)s; reruns resume)")
    parser.add_argument("--editors", default=",".join(EDITORS),
                        help="comma-separated, from %(default)s")
    parser.add_argument("--limit", type=int, default=None, metavar="N",
                        help="only the first N images of the subset (a quick run)")
    parser.add_argument("--image-reward", action="store_true",
                        help="score ImageReward too (needs the optional image-reward package)")
    parser.add_argument("--no-lpips", action="store_true",
                        help="leave PnP's LPIPS column empty (LPIPS needs torchvision)")
    for name, default in (("clip", "openai/clip-vit-large-patch14"),
                          ("dino", "facebook/dino-vitb8"), ("dinov2", "facebook/dinov2-base")):
        parser.add_argument(f"--{name}", default=None, metavar="ID_OR_DIR",
                            help=f"metric model, hub id or local folder (default {default})")
    add_source_arguments(parser)
    parser.add_argument("--steps", type=int, default=BASELINE_STEPS,
                        help="the baselines' DDIM steps (default: %(default)s)")
    parser.add_argument("--nti-inner", type=int, default=NTI_INNER_STEPS,
                        help="NTI's Adam steps per timestep (default: %(default)s)")
    add_device_arguments(parser)
    return parser


def pie_sources(args) -> dict:
    """The keyword arguments of ``load_sd15_pipeline`` from the parsed options."""
    from .sd15.fabricate import fabricated_sources

    sources = fabricated_sources(args.model) if args.model else {}
    for name in ("base", "teacher", "loras", "cond_proj"):
        if getattr(args, name):
            sources[name] = getattr(args, name)
    if args.cond_proj:  # plain SD1.5 under the students: a --model folder's teacher is not read
        sources.pop("teacher", None)
    release = None if args.release == "none" else args.release
    return {**sources, "release": release, "lora_alpha": args.lora_alpha,
            **({"rank": None} if release is None else {})}


def pie_main(argv) -> int:
    """Parse and check the options (one-line errors, exit status 2), load the PIE-Bench items,
    then ``pie_run.run_command``."""
    from .experiments import pie_run

    parser = pie_parser()
    args = parser.parse_args(argv)
    editors = [name.strip() for name in args.editors.split(",") if name.strip()]
    unknown = [name for name in editors if name not in pie_run.EDITORS]
    if unknown or not editors:
        parser.error(f"--editors: unknown editor {unknown[0] if unknown else '(none)'!r}; "
                     f"choose from {','.join(pie_run.EDITORS)}")
    for name in ("limit", "steps", "nti_inner"):
        value = getattr(args, name)
        if value is not None and value < (0 if name == "nti_inner" else 1):
            parser.error(f"--{name.replace('_', '-')} must be at least "
                         f"{0 if name == 'nti_inner' else 1}, got {value}")
    if args.cond_proj and args.teacher:
        parser.error("--cond-proj loads LoRAs distilled with a real-CFG teacher onto plain "
                     "SD1.5: drop --teacher")
    try:
        device = resolve_device(args.device)
        configure_threads(device, args.threads)
        items = pie_run.load_items(args.data, args.subset, args.limit)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    # the metric models load after the edits: refuse missing packages before hours of editing
    if args.image_reward and importlib.util.find_spec("ImageReward") is None:
        parser.error("--image-reward needs the image-reward package (it does not co-install "
                     "with this project's diffusers; use a separate environment), or drop it")
    if not args.no_lpips and importlib.util.find_spec("torchvision") is None:
        parser.error("PnP's LPIPS needs torchvision (a build matching your torch); install it, "
                     "or pass --no-lpips to leave that column empty")
    metric_models = {"clip": args.clip, "dino": args.dino, "dinov2": args.dinov2,
                     "image_reward": args.image_reward, "lpips": not args.no_lpips}
    pie_run.run_command(items, args.out, pie_sources(args), editors, device, args.steps,
                        args.nti_inner, metric_models)
    print(f"wrote {args.out}")
    return 0


def add_source_arguments(parser: argparse.ArgumentParser) -> None:
    """The SD1.5 model options of ``pie``, ``table2`` and ``table4`` (``pie_sources`` reads
    them)."""
    from .sd15.loading import RELEASES

    parser.add_argument("--release", choices=[*RELEASES, "none"], default="4step-v1",
                        help="the LoRA release (default: %(default)s); none: LoRAs you "
                             "distilled (rank read from the files)")
    parser.add_argument("--model", help="a folder written by python -m icd_lite.sd15.fabricate")
    parser.add_argument("--base", help="SD1.5 (hub id or folder)")
    parser.add_argument("--teacher", help="CFG-distilled teacher (hub id, folder or .pt)")
    parser.add_argument("--loras", help="LoRA repository or folder")
    parser.add_argument("--cond-proj", help="for LoRAs distilled with a real-CFG teacher: "
                        "their cond_proj.safetensors or training output folder")
    parser.add_argument("--lora-alpha", type=float, default=8.0,
                        help="the LoRAs' alpha (the release: %(default)s)")


def add_table_arguments(parser: argparse.ArgumentParser, out: str) -> None:
    """Options shared by ``table2`` and ``table4``: size of the run, seed, batch, steps."""
    from .experiments import sd15_tables as T

    parser.add_argument("--limit", type=int, default=T.LIMIT, metavar="N",
                        help="the first N items (default: %(default)s, the paper's 5k)")
    parser.add_argument("--out", type=Path, default=Path(out), metavar="DIR",
                        help="images, CSVs and the table (default: %(default)s; reruns resume)")
    parser.add_argument("--seed", type=int, default=T.SEED,
                        help="item i's noise is seeded SEED + i (default: %(default)s, the "
                             "authors')")
    parser.add_argument("--batch", type=int, default=8, metavar="B",
                        help="images per batch (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=T.BASELINE_STEPS,
                        help="the DDIM rows' steps (default: %(default)s)")
    add_source_arguments(parser)
    add_device_arguments(parser)


def table2_parser() -> argparse.ArgumentParser:
    """The options of ``python -m icd_lite.bench table2``."""
    parser = argparse.ArgumentParser(
        prog="python -m icd_lite.bench table2",
        description="The paper's Table 2 at SD1.5 scale: reconstruction of COCO images by "
                    "fDDIM50 / DDIM50 and the iCD pair; LPIPS, DINOv2, PSNR "
                    "(icd_lite.experiments.sd15_tables).")
    parser.add_argument("--data", type=Path, required=True, metavar="CSV_OR_FOLDER",
                        help="COCO's layout: a CSV with file_name and caption columns (e.g. the "
                             "authors' generation_coco.csv), or a folder of images with "
                             "same-stem .txt captions")
    parser.add_argument("--images", type=Path, metavar="DIR",
                        help="the CSV's image folder (default: the CSV's stem beside it)")
    parser.add_argument("--fit", choices=["resize", "crop"], default="resize",
                        help="resize: the authors' plain 512x512 resize (default); crop: "
                             "Resize(512) + CenterCrop(512)")
    parser.add_argument("--no-lpips", action="store_true",
                        help="leave LPIPS empty (it needs torchvision)")
    parser.add_argument("--dinov2", default=None, metavar="ID_OR_DIR",
                        help="DINOv2 model, hub id or folder (default facebook/dinov2-base)")
    add_table_arguments(parser, "build/sd15-table2")
    return parser


def table4_parser() -> argparse.ArgumentParser:
    """The options of ``python -m icd_lite.bench table4``."""
    parser = argparse.ArgumentParser(
        prog="python -m icd_lite.bench table4",
        description="The paper's Table 4 at SD1.5 scale: generation at w = 8 by DDIM50, CD4 "
                    "(+ d.CFG .8 / .7) and the 3-step release; FID, CLIP score, ImageReward "
                    "(icd_lite.experiments.sd15_tables).")
    parser.add_argument("--prompts", type=Path, required=True, metavar="CSV",
                        help="a CSV with a caption (COCO's layout, the authors' "
                             "generation_coco.csv) or prompt column, or a text file, one a line")
    parser.add_argument("--fid-reference", type=Path, required=True, metavar="NPZ",
                        help="pytorch-fid statistics (mu, sigma), e.g. the authors' "
                             "fid_stats_mscoco512_val.npz")
    parser.add_argument("--release3", choices=["3step", "none"], default="3step",
                        help="the 3-step pair of the CD3 rows, from the same LoRA source "
                             "(default: %(default)s); none leaves them out")
    parser.add_argument("--image-reward", action="store_true",
                        help="score ImageReward too (needs the optional image-reward package)")
    parser.add_argument("--clip", default=None, metavar="ID_OR_DIR",
                        help="CLIP model, hub id or folder (default "
                             "openai/clip-vit-large-patch14)")
    add_table_arguments(parser, "build/sd15-table4")
    return parser


def check_table_arguments(parser, args) -> torch.device:
    """One-line errors (exit status 2) for the options both tables share; the device."""
    for name in ("limit", "batch", "steps"):
        if getattr(args, name) < 1:
            parser.error(f"--{name} must be at least 1, got {getattr(args, name)}")
    if args.cond_proj and args.teacher:
        parser.error("--cond-proj loads LoRAs distilled with a real-CFG teacher onto plain "
                     "SD1.5: drop --teacher")
    try:
        device = resolve_device(args.device)
        configure_threads(device, args.threads)
    except ValueError as error:
        parser.error(str(error))
    return device


def table2_main(argv) -> int:
    """Parse and check (data, packages) before any model loads, then ``run_table2_command``."""
    from .experiments import sd15_tables as T

    parser = table2_parser()
    args = parser.parse_args(argv)
    device = check_table_arguments(parser, args)
    try:
        paths, captions = T.read_pairs(args.data, args.images, args.limit)
    except (FileNotFoundError, ValueError) as error:
        parser.error(str(error))
    if not args.no_lpips and importlib.util.find_spec("torchvision") is None:
        parser.error("LPIPS needs torchvision (a build matching your torch); install it, or "
                     "pass --no-lpips to leave that column empty")
    T.run_table2_command(paths, captions, args.out, pie_sources(args), device, args.seed,
                         args.steps, args.batch, args.fit,
                         {"dinov2": args.dinov2, "lpips": not args.no_lpips})
    print(f"wrote {args.out}")
    return 0


def table4_main(argv) -> int:
    """Parse and check (prompts, FID reference, packages) before any model loads, then
    ``run_table4_command``."""
    from .experiments import sd15_tables as T

    parser = table4_parser()
    args = parser.parse_args(argv)
    device = check_table_arguments(parser, args)
    release3 = None if args.release3 == "none" else args.release3
    if release3 and args.release == "none":
        parser.error("--release none (your LoRAs) has no 3-step release beside it: pass "
                     "--release3 none")
    try:
        prompts = T.read_prompts(args.prompts, args.limit)
        T.check_fid_reference(args.fid_reference)
    except ValueError as error:
        parser.error(str(error))
    missing = [name for name in ("torchvision", "torch_fidelity")
               if importlib.util.find_spec(name) is None]
    if missing:
        parser.error(f"FID's Inception needs {' and '.join(missing)} (pip install "
                     f"torch-fidelity, and a torchvision matching your torch)")
    if args.image_reward and importlib.util.find_spec("ImageReward") is None:
        parser.error("--image-reward needs the image-reward package (it does not co-install "
                     "with this project's diffusers; use a separate environment), or drop it")
    T.run_table4_command(prompts, args.fid_reference, args.out, pie_sources(args), release3,
                         device, args.seed, args.steps, args.batch,
                         {"clip": args.clip, "image_reward": args.image_reward})
    print(f"wrote {args.out}")
    return 0


TABLE_COMMANDS = {"table2": table2_main, "table4": table4_main}


def main(argv=None) -> int | None:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] and argv[0] in TABLE_COMMANDS:  # the paper's Tables 2 and 4 at SD1.5 scale
        return TABLE_COMMANDS[argv[0]](argv[1:])
    if argv[:1] == ["sd15"]:  # SD1.5 scale, its own options: python -m icd_lite.sd15.bench
        from .sd15.bench import main as sd15_main

        return sd15_main(argv[1:])
    if argv[:1] == ["pie"]:  # PIE-Bench at SD1.5 scale, its own options
        return pie_main(argv[1:])
    parser = argparse.ArgumentParser(prog="python -m icd_lite.bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("suite", choices=["world", "inversion", "editing", "sd15", "pie",
                                          "table2", "table4"],
                        help="sd15: seconds and memory per 512x512 edit (python -m "
                             "icd_lite.bench sd15 --help); pie: PIE-Bench tables (python -m "
                             "icd_lite.bench pie --help); table2 / table4: the paper's Tables "
                             "2 and 4 at SD1.5 scale (each with --help)")
    parser.add_argument("--n", type=int, default=None,
                        help="images / prompts per measurement (world: 500, inversion: 200; "
                             "editing: cases per edit type, default all 50)")
    parser.add_argument("--timing", type=int, default=None, metavar="N",
                        help="inversion: images timed one by one (default 3); editing: cases "
                             "timed one at a time per editor (default 6, one per edit type)")
    parser.add_argument("--nti-per-type", type=int, default=6, metavar="N",
                        help="editing: ToyBench cases per edit type for NTI + P2P, the slow "
                             "editor; 0 leaves it out (default: %(default)s)")
    parser.add_argument("--out-dir", type=Path, default=OUT_DIR, metavar="DIR",
                        help="where <suite>.json is written (default: %(default)s)")
    add_device_arguments(parser)
    args = parser.parse_args(argv)
    try:
        device = resolve_device(args.device)
        configure_threads(device, args.threads)
    except ValueError as error:  # one line naming the fix, no traceback
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        raise SystemExit(2) from None
    torch.manual_seed(0)
    if args.suite == "world":
        results = measure_world(args.n or 500, device=device)
        print_world(results)
    elif args.suite == "inversion":
        timing = 3 if args.timing is None else args.timing
        results = bench_inversion(args.n or 200, timing, device=device)
        print_inversion(results)
    else:
        results = bench_editing(args.n, args.nti_per_type, device=device,
                                timing_cases=args.timing)
        print_editing(results)
    args.out_dir.mkdir(parents=True, exist_ok=True)
    path = args.out_dir / f"{args.suite}.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    sys.exit(main())  # sd15, pie, table2 and table4 return their exit status
