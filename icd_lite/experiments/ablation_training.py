r"""The trained ablations of notebook 06: a training-budget study and three sweeps (issue 22).

    make train-ablations                                   # both lanes side by side, resumable
    python -m icd_lite.experiments.ablation_training --run budget/G --threads 2   # one run

**Budget.** The shipped pairs stop at 400 iterations (batch 32; the paper trains 6000 at batch
512). ``budget/<recipe>`` continues the shipped pair of recipes A, B, C and G to 1200 iterations:
the same recipe, the same batches (``distill`` re-seeds each step), fresh AdamW moments. Each run
is measured by ``Probe`` every 200 iterations, so its curve starts at the shipped pair.

**Sweeps.** Each sweep point is a pair of rank-8 LoRA adapters on the teacher (plus the guidance
projection), trained 200 iterations at learning rate 1e-3, as the paper distils SD1.5 with LoRA.
The reference point, ``sweep/lambda_1.5``, is recipe G trained the same way, and every sweep
changes one thing from it:

- ``sweep/lambda_*``: $\lambda_f = \lambda_r \in \{0, 0.5, 1.5, 3\}$ (eq. 5);
- ``sweep/w_1`` and ``sweep/w_wide``: the guidance scales sampled in distillation, only w = 1, or
  {1, 4, 8, ..., 28} against the paper's {1, 8, 12, 16, 20} (classical w; code unit w - 1);
- ``sweep/v2``: the released "4-step v2" boundaries [249, 499, 699, 999] against the default
  m = 4 boundaries [259, 519, 779, 999] (``docs/sd15.md``).

Weights go to ``icd_lite/world/weights/ablations/<run>/`` with their sha256 in the toy world's
manifest: float16 full pairs for ``budget/C`` and ``budget/G`` (about 7 MB each), the LoRA
adapters of every sweep (about 1 MB a pair). ``budget/A`` and ``budget/B`` ship their curves
only, to stay within the 30 MB the issue allows. Every run also writes ``curve.json`` (the
probe's rows) and ``run.json`` (what was trained, and for how many minutes).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from safetensors.torch import load_file, save_file

from .. import metrics
from ..components import Components, load_components
from ..device import add_device_arguments, configure_threads, resolve_device
from ..distill import (EVAL_SEED, NUM_TRAIN, RECIPES, TRAIN_SEED, Recipe, build_students,
                       distill, encode_dataset)
from ..pipeline import ICDPipeline, load_pair, load_pipeline, save_students
from ..students import merged_unet, trainable_parameters
from ..world import checkpoints
from ..world.scenes import make_dataset
from .ablations import attributes_correct

ABLATIONS_DIR = "ablations"
CHECKPOINT_DIR = Path("build/train/ablations")
SHIPPED_STEPS = 400  # where the shipped pairs stopped
PAPER_W = (1, 8, 12, 16, 20)  # the guidance scales the paper samples in distillation
WIDE_W = (1, 4, 8, 12, 16, 20, 24, 28)
W_PROBE, TAU_PROBE = 8.0, 0.8


def w_codes(ws) -> tuple[float, ...]:
    """Classical w -> the code unit w - 1 that ``ICDConfig.w_code_choices`` takes."""
    return tuple(float(w) - 1.0 for w in ws)


@dataclass(frozen=True)
class Run:
    """One trained ablation: what changes (``sweep``, ``value``) and how it trains."""

    name: str
    sweep: str  # "budget", "lambda", "guidance set" or "boundaries"
    value: str
    recipe: Recipe
    steps: int
    lora_rank: int | None = None
    lr: float = 1e-4
    continue_from: str | None = None  # the shipped recipe the run starts from, at SHIPPED_STEPS
    ship_weights: bool = True
    eval_every: int = 200

    @property
    def folder(self) -> Path:
        return checkpoints.WEIGHTS_DIR / ABLATIONS_DIR / self.name


def _budget(recipe: str, ship_weights: bool) -> Run:
    return Run(f"budget/{recipe}", "budget", recipe, RECIPES[recipe], steps=1200,
               continue_from=recipe, ship_weights=ship_weights)


def _sweep(name: str, sweep: str, value: str, **changes) -> Run:
    recipe = replace(RECIPES["G"], about=f"G with {value}", **changes)
    return Run(f"sweep/{name}", sweep, value, recipe, steps=200, lora_rank=8, lr=1e-3,
               eval_every=100)


RUNS = {run.name: run for run in [
    _budget("G", True), _budget("C", True), _budget("A", False), _budget("B", False),
    *[_sweep(f"lambda_{v:g}", "lambda", f"lambda_f = lambda_r = {v:g}", lambda_f=v, lambda_r=v)
      for v in (0.0, 0.5, 1.5, 3.0)],
    _sweep("w_1", "guidance set", "w in {1}", w_code_choices=w_codes((1,))),
    _sweep("w_wide", "guidance set", f"w in {{{', '.join(map(str, WIDE_W))}}}",
           w_code_choices=w_codes(WIDE_W)),
    _sweep("v2", "boundaries", "boundaries 249, 499, 699, 999",
           forward_boundaries=(249, 499, 699, 999)),
]}
REFERENCE = "sweep/lambda_1.5"  # the paper's settings, trained as the sweeps are
# Two one-thread lanes of about equal length for `make train-ablations`; the runs each question
# needs most come first.
LANES = (["budget/G", "sweep/lambda_1.5", "sweep/lambda_3", "sweep/lambda_0.5", "sweep/w_1"],
         ["budget/C", "sweep/lambda_0", "sweep/v2", "sweep/w_wide", "budget/A", "budget/B"])


def get_run(name: str) -> Run:
    if name not in RUNS:
        raise ValueError(f"unknown ablation run {name!r}; choose one of {', '.join(RUNS)}")
    return RUNS[name]


class Probe:
    """What every ablation run is measured by, on ``n`` held-out scenes (seed ``EVAL_SEED``):
    mean PSNR (dB, images in [-1, 1]) of encode -> decode at w = 1, at w = 8 and at w = 8 with
    dynamic CFG (tau 0.8); and, for images generated from the same captions at w = 8 with dynamic
    CFG, the Frechet distance of their toy-CLIP features to the real images' and the share with
    shape, colour and background all right. Returns a dict of floats."""

    def __init__(self, components: Components, n: int = 64, seed: int = EVAL_SEED):
        self.components = components
        self.perception = metrics.ToyPerception(components.clip, components.tokenizer)
        images, self.captions, self.scenes = make_dataset(n, seed)
        self.images = images.to(components.device)  # [n, 3, 32, 32] in [-1, 1]
        self.real_features = self.perception.image_embeddings(self.images)

    @torch.no_grad()
    def __call__(self, forward, reverse, boundaries) -> dict:
        pipe = ICDPipeline.from_components(self.components, forward.unet, reverse.unet,
                                           boundaries)
        return self.measure(pipe)

    @torch.no_grad()
    def per_image(self, pipe: ICDPipeline) -> dict:
        """Per-image tensors [n] of "psnr_w1", "psnr_w8", "psnr_w8_dcfg" (dB), "attributes_right"
        (0 / 1) and "clip_t" (cosine) of the generated images, and the scalar
        "frechet_distance" of the generated set."""
        values = {}
        for key, w, tau in (("psnr_w1", 1.0, None), ("psnr_w8", W_PROBE, None),
                            ("psnr_w8_dcfg", W_PROBE, TAU_PROBE)):
            images = pipe.reconstruct(self.images, self.captions, w=w, tau=tau).images
            values[key] = metrics.psnr(images, self.images)                     # [n]
        return values | self.generation(pipe, W_PROBE, TAU_PROBE)

    @torch.no_grad()
    def generation(self, pipe: ICDPipeline, w: float, tau: float | None = TAU_PROBE) -> dict:
        """Images generated from the probe's captions (noise seed 1) at classical ``w`` with
        dynamic CFG below ``tau``: "attributes_right" [n] (0 / 1), "clip_t" [n] and the scalar
        "frechet_distance" to the probe's real images."""
        generated = pipe.generate(self.captions, w=w, tau=tau, seed=1).images    # [n, 3, H, W]
        features = self.perception.image_embeddings(generated)                    # [n, D]
        return {"frechet_distance": metrics.frechet_distance(features, self.real_features),
                "attributes_right": attributes_correct(self.perception, generated, self.scenes),
                "clip_t": self.perception.clip_t(generated, self.captions)}       # [n]

    def measure(self, pipe: ICDPipeline) -> dict:
        """The means of ``per_image`` (a row of a run's curve)."""
        values = self.per_image(pipe)
        return {key: values[key] if key == "frechet_distance" else values[key].mean().item()
                for key in CURVE_KEYS}


CURVE_KEYS = ("psnr_w1", "psnr_w8", "psnr_w8_dcfg", "frechet_distance", "attributes_right")
PAIRED_KEYS = ("psnr_w1", "psnr_w8", "psnr_w8_dcfg", "attributes_right", "clip_t")


def measure_pairs(pipes: dict, probe: Probe) -> tuple[list[dict], dict]:
    """``Probe.per_image`` for each named pipeline: (rows, per_item). A row holds "key" (the
    name), the mean and standard error ("<metric>_se") of every per-image metric and
    "frechet_distance"; ``per_item[name][metric]`` is the tensor [n], for the paired rules of
    ``ablations.not_worse`` / ``clearly_better``."""
    rows, per_item = [], {}
    for name, pipe in pipes.items():
        values = probe.per_image(pipe)
        per_item[name] = values
        row = {"key": name, "frechet_distance": values["frechet_distance"]}
        for metric in PAIRED_KEYS:
            row[metric] = values[metric].double().mean().item()
            row[f"{metric}_se"] = (values[metric].double().std() / len(values[metric]) ** 0.5
                                   ).item()
        rows.append(row)
    return rows, per_item


@torch.no_grad()
def round_trip_psnr(encoder: ICDPipeline, decoder: ICDPipeline, images: torch.Tensor,
                    captions: list[str]) -> torch.Tensor:
    """PSNR [n] (dB) of images [n, 3, H, W] in [-1, 1] encoded by ``encoder``'s forward student
    and decoded at w = 1 by ``decoder``'s reverse student: an encoder and a decoder with
    different boundaries (m) meet only at x_999."""
    noise = encoder.encode(images, captions).latents             # [n, C, h, w] at t = 999
    decoded = decoder.decode(noise, captions, w=1.0).images      # [n, 3, H, W]
    return metrics.psnr(decoded, images)


TOWARD, AWAY, FLAT = "moves towards the paper", "moves away from the paper", "no clear change"


def trend(steps, margin, early_step: int = SHIPPED_STEPS, late_from: int = 800,
          z: float = 2.0) -> dict:
    r"""How a claim's margin (positive exactly when the claim holds) moves with the budget.

    ``steps`` [K] are the probe's iterations and ``margin`` [K] the margin there. Returns
    "early" $d_{400}$ (the margin at ``early_step``, the shipped pair), "late" $\bar d_{late}$
    (its mean over the k probes at steps >= ``late_from``), "jitter" $s$ and "threshold".

    The jitter treats the probes as a smooth curve plus independent noise of standard deviation
    $s$: successive differences then have standard deviation $s\sqrt 2$, so
    $s = \mathrm{sd}(d_{j+1} - d_j)/\sqrt 2$ (a steady trend adds to it, which only makes the
    rule stricter). $\bar d_{late} - d_{400}$ has standard deviation $s\sqrt{1 + 1/k}$, and the
    threshold is ``z`` of those. "direction" is ``TOWARD`` when late - early > threshold,
    ``AWAY`` when it is below -threshold, ``FLAT`` otherwise. Raises ``ValueError`` when the
    curve has no probe at ``early_step``, none from ``late_from`` on, or fewer than 3 probes."""
    steps, margin = np.asarray(steps), np.asarray(margin, dtype=float)
    if early_step not in steps or not (steps >= late_from).any() or len(steps) < 3:
        raise ValueError(f"the curve needs a probe at {early_step}, one at >= {late_from} and "
                         f"3 in all, got steps {steps.tolist()}; train the run to the end")
    early = float(margin[steps == early_step][0])
    late_points = margin[steps >= late_from]
    late = float(late_points.mean())
    jitter = float(np.diff(margin).std(ddof=1) / np.sqrt(2))
    threshold = z * jitter * float(np.sqrt(1 + 1 / len(late_points)))
    change = late - early
    direction = TOWARD if change > threshold else AWAY if change < -threshold else FLAT
    return {"early": early, "late": late, "jitter": jitter, "threshold": threshold,
            "direction": direction}


def _save_adapters(student, path: Path) -> None:
    """The student's LoRA weights and guidance projection, float16, in one safetensors file."""
    unet = student.unet
    state = {f"lora.{k}": v for k, v in get_peft_model_state_dict(unet).items()}
    state["time_embedding.cond_proj.weight"] = unet.time_embedding.cond_proj.weight
    expected = len(trainable_parameters(student))
    if len(state) != expected:   # every trained tensor, and nothing else, goes to the file
        raise RuntimeError(f"{len(state)} tensors to save, but the student trains {expected}")
    save_file({k: v.detach().half().contiguous().cpu() for k, v in state.items()}, path)


def _load_adapters(student, path: Path) -> None:
    state = load_file(path)
    unet = student.unet
    lora = {k.removeprefix("lora."): v for k, v in state.items() if k.startswith("lora.")}
    result = set_peft_model_state_dict(unet, lora)
    if getattr(result, "unexpected_keys", None):
        raise checkpoints.CheckpointError(f"{path} has keys this LoRA does not: "
                                          f"{result.unexpected_keys[:3]}; {checkpoints.REBUILD}")
    with torch.no_grad():
        unet.time_embedding.cond_proj.weight.copy_(state["time_embedding.cond_proj.weight"])


def _ship(run: Run, components: Components, forward, reverse, history, command: str,
          minutes: float) -> None:
    run.folder.mkdir(parents=True, exist_ok=True)
    paths = []
    if run.ship_weights and run.lora_rank:
        for role, student in (("forward", forward), ("reverse", reverse)):
            paths.append(run.folder / f"{role}_lora.safetensors")
            _save_adapters(student, paths[-1])
    elif run.ship_weights:
        pipe = ICDPipeline.from_components(components, merged_unet(forward).half(),
                                           merged_unet(reverse).half(), run.recipe.boundaries)
        paths = save_students(pipe, run.folder)
    for path in paths:
        checkpoints.record(str(path.relative_to(checkpoints.WEIGHTS_DIR)), command,
                           train_minutes=minutes, run=run.name)
    curve = [entry for entry in history if "psnr_w1" in entry]
    (run.folder / "curve.json").write_text(json.dumps(curve, indent=1) + "\n")
    about = {"name": run.name, "sweep": run.sweep, "value": run.value,
             "steps": history[-1]["step"],  # the iterations trained, which is_trained checks
             "lora_rank": run.lora_rank, "lr": run.lr, "continue_from": run.continue_from,
             "train_minutes": minutes, "command": command, "weights_shipped": bool(paths),
             "recipe": asdict(run.recipe)}
    (run.folder / "run.json").write_text(json.dumps(about, indent=1) + "\n")


def is_trained(name: str) -> bool:
    """True when ``run.json`` records the run's full number of steps."""
    path = get_run(name).folder / "run.json"
    return path.exists() and json.loads(path.read_text())["steps"] == get_run(name).steps


def load_curve(name: str) -> list[dict]:
    """The probe's rows (``Probe``: step, seconds, psnr_w1, ...) recorded while ``name`` trained."""
    path = get_run(name).folder / "curve.json"
    if not path.exists():
        raise checkpoints.CheckpointError(f"no curve {path}: run `make train-ablations`")
    return json.loads(path.read_text())


def load_run_info(name: str) -> dict:
    """``run.json`` of a trained run: its settings and training minutes."""
    path = get_run(name).folder / "run.json"
    if not path.exists():
        raise checkpoints.CheckpointError(f"no {path}: run `make train-ablations`")
    return json.loads(path.read_text())


def load_ablation(name: str, components: Components) -> ICDPipeline:
    """The trained pair of ablation run ``name`` as an ``ICDPipeline`` on ``components``'s
    device, its files checked against the manifest first.

    Raises ``ValueError`` for an unknown name or a run whose weights do not ship (budget/A, B:
    use ``load_curve``) and ``CheckpointError`` for missing or altered files.
    """
    run = get_run(name)
    if not run.ship_weights:
        raise ValueError(f"{name} ships its curve only (the 30 MB weight budget); use "
                         f"load_curve({name!r}), or train it: python -m "
                         f"icd_lite.experiments.ablation_training --run {name}")
    relative = f"{ABLATIONS_DIR}/{name}"
    if not run.lora_rank:
        for role in ("forward_unet", "reverse_unet"):
            checkpoints.verified_path(f"{relative}/{role}/diffusion_pytorch_model.safetensors")
        return load_pair(run.folder, components)
    forward, reverse = build_students(components.unet, run.lora_rank)
    for role, student in (("forward", forward), ("reverse", reverse)):
        _load_adapters(student, checkpoints.verified_path(f"{relative}/{role}_lora.safetensors"))
    unets = [merged_unet(student).eval().requires_grad_(False) for student in (forward, reverse)]
    pipe = ICDPipeline.from_components(components, *unets, run.recipe.boundaries)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def train(run: Run, components: Components, data, probe: Probe, command: str) -> None:
    """Train (or resume) one run under ``build/train/ablations/`` and ship it."""
    init_pair, first_step = None, 0
    if run.continue_from:
        shipped = load_pipeline(run.continue_from, components)
        init_pair, first_step = (shipped.forward_unet, shipped.reverse_unet), SHIPPED_STEPS
    stem = CHECKPOINT_DIR / run.name.replace("/", "_")
    stem.parent.mkdir(parents=True, exist_ok=True)
    forward, reverse, history = distill(components, run.recipe, data, run.steps, lr=run.lr,
                                        lora_rank=run.lora_rank, checkpoint=stem,
                                        save_every=50, curve=probe,
                                        eval_every=run.eval_every, init_pair=init_pair,
                                        first_step=first_step)
    minutes = round(checkpoints.saved_seconds(Path(f"{stem}_reverse.safetensors")) / 60, 1)
    _ship(run, components, forward, reverse, history, command, minutes)
    print(f"{run.name} ({run.recipe.about}): {minutes} min, {history[-1]}")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.experiments.ablation_training",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--run", default="all",
                        help=f"comma-separated runs ({', '.join(RUNS)}), 'all', or lane0 / lane1")
    add_device_arguments(parser, threads=1)
    args = parser.parse_args(argv)
    lanes = {"all": list(RUNS), "lane0": LANES[0], "lane1": LANES[1]}
    names = lanes.get(args.run) or args.run.split(",")
    runs = [get_run(name) for name in names]
    device = resolve_device(args.device)
    configure_threads(device, args.threads)
    command = "python -m icd_lite.experiments.ablation_training " + " ".join(
        argv if argv is not None else sys.argv[1:])
    components = load_components("toy", device=device)
    images, captions, _ = make_dataset(NUM_TRAIN, TRAIN_SEED)
    data = encode_dataset(components, images, captions)
    probe = Probe(components)
    for run in runs:
        if is_trained(run.name):
            print(f"{run.name}: already trained ({run.folder / 'run.json'})")
            continue
        train(run, components, data, probe, f"{command} ({run.name})")


if __name__ == "__main__":
    main()
