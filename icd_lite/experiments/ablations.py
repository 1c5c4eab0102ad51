r"""The ablation sweeps of notebook 06, so that the notebook reads as a lab report.

**Dynamic guidance** (paper Fig. 2, Fig. 5). A guidance schedule $w_{code}(u)$, $u = t / T$,
reaches a consistency decoder only at its m decoding steps: the reverse student CD_4 evaluates it
at $t = 999, 779, 519, 259$, so a schedule *is* the vector of its m values there (``w_at_steps``).
Different $(\tau_1, \tau_2)$ that give the same vector give the same images, and ``guidance_sweep``
measures each distinct vector once. For every schedule of ``schedule_grid`` (step, ramp and
interval forms, with unguided w = 1 and constant w = 8 as the two ends) it measures, on the same
images and the same noise for every schedule (so differences are paired):

* generation quality at w = 8, from seeded noise with single-object prompts: the attributes right
  (shape, colour and background all read correctly by the toy CLIP, the stand-in for
  ImageReward), CLIP-T with the prompt, and the Frechet distance of the toy CLIP's image
  embeddings to a separate set of real images (the FID formula);
* reconstruction: MSE on the [0, 1] scale between a real image and its encode -> decode round
  trip, the forward student unguided, the reverse one under the schedule (paper Fig. 4a, 5a).

**Attention control** (paper Fig. 12). P2P controls step i of n while
``i < int(fraction * n)`` (``attention.controlled_steps``), so one fraction controls different
shares of the trajectory at 3 and at 4 steps (the authors' cross fraction 0.3 controls the first
step of 4, and no step of 3). ``trajectory_share`` is the share of the time axis that the first k
decoding steps sweep; ``matched_levels`` pairs a number of controlled steps at 3 steps with one at
4 steps of nearly the same share; ``fraction_for`` turns k controlled steps back into the fraction
in the middle of those that ``int(fraction * n)`` reads as k (a third typed as 0.33 controls no step
of 3: int(0.99) = 0).
``attention_sweep`` edits ToyBench cases at each setting and step count and scores them with
``toybench.evaluate``.

``paired_se`` and ``dominated_by`` give the verdict rules their noise level: the standard error
of a mean difference over the same images or cases.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from . import toybench
from .editing_evaluation import wilson_interval
from .. import metrics
from ..attention import controlled_steps
from ..consistency import decode as consistency_decode
from ..editing import P2PSettings, icd_edit
from ..guidance import (GuidanceSchedule, constant_guidance, interval_guidance, ramp_guidance,
                        step_guidance)
from ..pipeline import ICDPipeline
from .world_quality import single_object_scenes

DEFAULT_TAUS = (0.0, 0.2, 0.4, 0.6, 0.7, 0.8, 0.9, 1.0)
FORMS = ("unguided", "constant", "step", "ramp", "interval")


# ------------------------------------------------------------------------- dynamic guidance

def schedule_grid(w_code: float, taus=DEFAULT_TAUS) -> list[dict]:
    """The schedules of the sweep, as rows {"form", "tau1", "tau2", "schedule"}: unguided
    (w_code 0) and constant ``w_code`` (CODE unit: 7 is the paper's w = 8), then the step form
    for every tau, and the ramp and interval forms for every pair tau1 < tau2 of ``taus``."""
    taus = sorted(set(float(t) for t in taus))
    rows = [{"form": "unguided", "tau1": math.nan, "tau2": math.nan,
             "schedule": constant_guidance(0.0)},
            {"form": "constant", "tau1": math.nan, "tau2": math.nan,
             "schedule": constant_guidance(w_code)}]
    rows += [{"form": "step", "tau1": tau, "tau2": tau, "schedule": step_guidance(w_code, tau)}
             for tau in taus]
    for form, make in (("ramp", ramp_guidance), ("interval", interval_guidance)):
        rows += [{"form": form, "tau1": a, "tau2": b, "schedule": make(w_code, a, b)}
                 for i, a in enumerate(taus) for b in taus[i + 1:]]
    return rows


def w_at_steps(schedule: GuidanceSchedule, pipe: ICDPipeline) -> tuple[float, ...]:
    """w_code (code unit) at each of the pair's decoding steps t (999, 779, 519, 259 for m = 4):
    all the decoder ever sees of a schedule."""
    return tuple(round(float(schedule(t)), 6) for t, _ in pipe.boundaries.decoding_steps())


@dataclass
class GuidanceBench:
    """What every schedule is measured on: n single-object scenes, their prompts and rendered
    images [n, 3, 32, 32], the prompts' embeddings, the images encoded to x_999 (once: encoding
    is unguided), seeded generation noise, and the CLIP embeddings of a separate real set for
    the Frechet distance, with the distance between two real sets (its floor at this n)."""

    scenes: list
    prompts: list[str]
    images: torch.Tensor
    cond: torch.Tensor
    x_T: torch.Tensor
    noise: torch.Tensor
    reference_features: torch.Tensor
    fd_floor: float

    @property
    def n(self) -> int:
        return len(self.prompts)


@torch.no_grad()
def guidance_bench(pipe: ICDPipeline, perception: metrics.ToyPerception, n: int,
                   seed: int = 0) -> GuidanceBench:
    """The bench of ``n`` images: scenes from ``seed``, the reference real set from seed + 1,
    the encoding noise from ``seed`` and the generation noise from seed + 2 (CPU generators)."""
    scenes, prompts, images = single_object_scenes(n, seed)
    _, _, reference = single_object_scenes(n, seed + 1)
    images = images.to(pipe.device)
    cond = pipe.base.encode_prompt(prompts)                                  # [n, L, D]
    x_T, _ = pipe.encode_latents(pipe.base.encode_images(images), cond, seed)  # [n, C, h, w]
    generator = torch.Generator().manual_seed(seed + 2)
    noise = torch.randn((n, *pipe.latent_shape), generator=generator).to(pipe.device)
    reference_features = perception.image_embeddings(reference.to(pipe.device))
    floor = metrics.frechet_distance(perception.image_embeddings(images), reference_features)
    return GuidanceBench(scenes, prompts, images, cond, x_T, noise, reference_features, floor)


def attributes_correct(perception: metrics.ToyPerception, images: torch.Tensor,
                       scenes) -> torch.Tensor:
    """float [N]: 1 where the toy CLIP reads shape, object colour and background all as asked."""
    predicted = perception.predict_attributes(images)
    return torch.tensor([float(p["shape"] == s.objects[0].shape and p["color"] == s.objects[0].color
                               and p["background"] == s.background)
                         for p, s in zip(predicted, scenes)])


@torch.no_grad()
def decode_with(pipe: ICDPipeline, x_T: torch.Tensor, cond: torch.Tensor,
                schedule: GuidanceSchedule) -> torch.Tensor:
    """Images [B, 3, H, W] in [-1, 1] decoded from x_T by the reverse student under any
    ``GuidanceSchedule`` (``pipe.decode`` takes only the step form)."""
    latents = consistency_decode(pipe.reverse_student, x_T, pipe.boundaries, cond, schedule)
    return pipe.base.decode_latents(latents)


@torch.no_grad()
def measure_schedule(pipe: ICDPipeline, perception: metrics.ToyPerception, bench: GuidanceBench,
                     schedule: GuidanceSchedule) -> dict:
    """Per image [n] (CPU): "mse" of the round trip, "correct" and "clip_t" of the generated
    image; and "fd" of the generated set to the reference set."""
    reconstructed = decode_with(pipe, bench.x_T, bench.cond, schedule)
    generated = decode_with(pipe, bench.noise, bench.cond, schedule)
    return {"mse": metrics.mse(reconstructed, bench.images).cpu(),
            "correct": attributes_correct(perception, generated, bench.scenes),
            "clip_t": perception.clip_t(generated, bench.prompts).cpu(),
            "fd": metrics.frechet_distance(perception.image_embeddings(generated),
                                           bench.reference_features)}


def _mean_se(values: torch.Tensor) -> tuple[float, float]:
    values = values.double()
    return float(values.mean()), float(values.std() / math.sqrt(len(values)))


def guidance_sweep(pipe: ICDPipeline, perception: metrics.ToyPerception, bench: GuidanceBench,
                   grid: list[dict], progress: bool = True) -> tuple[list[dict], dict]:
    """Measure every schedule of ``grid``, each distinct ``w_at_steps`` vector once.

    Returns (rows, per_image): a row per grid entry with its form, tau1, tau2, the w_code vector
    ("w_steps", also "key"), and the mean and standard error over the n images of "mse",
    "correct" and "clip_t", and "fd"; ``per_image`` maps each key to ``measure_schedule``'s
    result, for paired comparisons (``paired_se``)."""
    keys = [w_at_steps(row["schedule"], pipe) for row in grid]
    distinct = list(dict.fromkeys(keys))
    per_image = {}
    for key, row in tqdm(list(zip(keys, grid)), desc="schedules", disable=not progress,
                         leave=False):
        if key not in per_image:
            per_image[key] = measure_schedule(pipe, perception, bench, row["schedule"])
    rows = []
    for key, row in zip(keys, grid):
        measured = per_image[key]
        out = {"form": row["form"], "tau1": row["tau1"], "tau2": row["tau2"],
               "w_steps": "/".join(f"{w:g}" for w in key), "key": key, "n": bench.n}
        for name in ("mse", "correct", "clip_t"):
            out[name], out[f"{name}_se"] = _mean_se(measured[name])
        out["fd"] = measured["fd"]
        rows.append(out)
    assert len(per_image) == len(distinct)
    return rows, per_image


def paired_se(a, b) -> float:
    """The standard error of mean(a - b) over paired samples (the same images or cases)."""
    difference = torch.as_tensor(a, dtype=torch.float64) - torch.as_tensor(b, dtype=torch.float64)
    difference = difference[~torch.isnan(difference)]
    return float(difference.std() / math.sqrt(len(difference)))


def not_worse(row: dict, reference: dict, per_item: dict, better: dict, z: float = 2.0) -> bool:
    """True when ``row`` is below ``reference`` by at most z paired standard errors on every
    metric of ``better`` (metric -> +1 if higher is better, -1 if lower is)."""
    return all(sign * (row[m] - reference[m]) >=
               -z * paired_se(per_item[row["key"]][m], per_item[reference["key"]][m])
               for m, sign in better.items())


def clearly_better(row: dict, reference: dict, per_item: dict, metric: str, sign: int = 1,
                   z: float = 2.0) -> bool:
    """True when ``row`` beats ``reference`` on ``metric`` by more than z paired standard errors."""
    return sign * (row[metric] - reference[metric]) > z * paired_se(
        per_item[row["key"]][metric], per_item[reference["key"]][metric])


def dominated_by(candidate: dict, others: list[dict], per_item: dict, better: dict,
                 z: float = 2.0) -> list[dict]:
    """The rows of ``others`` that beat ``candidate`` on every metric of ``better`` by more than
    z paired standard errors. ``better`` maps a metric to +1 (higher is better) or -1; rows and
    ``per_item`` are keyed by "key" (``per_item[row["key"]][metric]`` is the per-item tensor)."""
    beaten_by = []
    for other in others:
        if other["key"] == candidate["key"]:
            continue
        wins = all(sign * (other[m] - candidate[m]) >
                   z * paired_se(per_item[other["key"]][m], per_item[candidate["key"]][m])
                   for m, sign in better.items())
        if wins:
            beaten_by.append(other)
    return beaten_by


# ------------------------------------------------------------------------- attention control

def trajectory_share(pipe: ICDPipeline, k: int) -> float:
    """The share of the time axis swept by the first k decoding steps: (t_0 - s_k) / t_0, from
    t_0 = 999 down to the boundary the k-th step lands on (0 for k = 0, 1 for k = m)."""
    steps = pipe.boundaries.decoding_steps()
    if not 0 <= k <= len(steps):
        raise ValueError(f"k must be between 0 and {len(steps)} steps, got {k}")
    start = steps[0][0]
    return 0.0 if k == 0 else (start - steps[k - 1][1]) / start


def fraction_for(k: int, n: int) -> float:
    """A control fraction that ``attention.controlled_steps`` reads as exactly k of n steps:
    (k + 1/2) / n, capped at 1, the middle of the fractions that control k steps, so a rounded
    copy of it still does (k / n sits on the edge: a third typed as 0.33 controls 0 of 3)."""
    fraction = min(1.0, (k + 0.5) / n)
    assert controlled_steps(fraction, n) == k
    return fraction


def matched_levels(pipes: dict[int, ICDPipeline]) -> list[dict[int, int]]:
    """Control levels at which two pairs (keys: their step counts) control nearly the same share
    of the trajectory: the mutual nearest pairs of (k at one count, k at the other) by
    ``trajectory_share``, as [{m_a: k_a, m_b: k_b}, ...] from no control to every step."""
    (m_a, pipe_a), (m_b, pipe_b) = sorted(pipes.items())
    share_a = [trajectory_share(pipe_a, k) for k in range(m_a + 1)]
    share_b = [trajectory_share(pipe_b, k) for k in range(m_b + 1)]

    def nearest(share, shares):
        return min(range(len(shares)), key=lambda k: (abs(shares[k] - share), k))

    levels = []
    for k_a in range(m_a + 1):
        k_b = nearest(share_a[k_a], share_b)
        if nearest(share_b[k_b], share_a) == k_a:  # each is the other's nearest
            levels.append({m_a: k_a, m_b: k_b})
    return levels


def nearest_level(levels: list[dict[int, int]], pipes: dict[int, ICDPipeline],
                  share: float) -> int:
    """The index of the matched level whose mean share is nearest to ``share``."""
    def mean_share(level):
        return sum(trajectory_share(pipes[m], k) for m, k in level.items()) / len(level)
    return min(range(len(levels)), key=lambda i: abs(mean_share(levels[i]) - share))


def attention_settings(pipes: dict[int, ICDPipeline], levels: list[dict[int, int]],
                       reference_cross: int, reference_self: int, amplifies, thresholds,
                       base: P2PSettings = P2PSettings()) -> list[dict]:
    """One-at-a-time sweeps around a reference, per step count: rows {"knob", "value", "m",
    "share", "p2p", "blend"}. The reference controls cross-attention at ``levels
    [reference_cross]`` and self-attention at ``levels[reference_self]``, with ``base``'s amplify
    and blend threshold; each sweep moves one knob: "cross" and "self" over the levels (value:
    the level's index), "amplify" over ``amplifies``, "blend" over ``thresholds`` (None: no
    local blend). Two more rows per m: knob "fractions as given" is ``base`` itself, its
    fractions read at m steps (the trap of the module docstring), and knob "none" is no
    attention control at all (no injection, amplify 1, no blend)."""
    rows = []
    for m in sorted(pipes):
        def settings(cross_level, self_level, **changes):
            p2p = replace(base, cross_fraction=fraction_for(levels[cross_level][m], m),
                          self_fraction=fraction_for(levels[self_level][m], m))
            return replace(p2p, **changes)

        def row(knob, value, p2p, blend=True):
            return {"knob": knob, "value": value, "m": m, "p2p": p2p, "blend": blend,
                    "cross_steps": controlled_steps(p2p.cross_fraction, m),
                    "self_steps": controlled_steps(p2p.self_fraction, m),
                    "cross_share": trajectory_share(pipes[m],
                                                    controlled_steps(p2p.cross_fraction, m)),
                    "self_share": trajectory_share(pipes[m],
                                                   controlled_steps(p2p.self_fraction, m))}

        rows += [row("cross", i, settings(i, reference_self)) for i in range(len(levels))]
        rows += [row("self", i, settings(reference_cross, i)) for i in range(len(levels))]
        rows += [row("amplify", a, settings(reference_cross, reference_self, amplify=a))
                 for a in amplifies]
        rows += [row("blend", t, settings(reference_cross, reference_self,
                                          blend_threshold=base.blend_threshold if t is None else t),
                     blend=t is not None) for t in thresholds]
        rows.append(row("fractions as given", None, base))
        rows.append(row("none", None, replace(base, cross_fraction=0.0, self_fraction=0.0,
                                              amplify=1.0), blend=False))
    return rows


def setting_key(row: dict) -> tuple:
    """Rows with equal keys edit identically (the controlled step counts, not the fractions)."""
    p2p = row["p2p"]
    return (row["m"], row["cross_steps"], row["self_steps"], p2p.amplify,
            p2p.blend_threshold if row["blend"] else None)


PRESERVATION = ("dino_like", "bg_psnr", "structure")
SCORES = ("attribute_ok", "clip_t") + PRESERVATION


def attention_sweep(pipes: dict[int, ICDPipeline], perception: metrics.ToyPerception,
                    cases: list, settings: list[dict], w: float, tau: float,
                    batch: int = 64, progress: bool = True) -> tuple[list[dict], dict]:
    """Edit ``cases`` under every setting (each distinct ``setting_key`` once) with iCD + P2P at
    classical w and dynamic-CFG tau; returns (rows, per_case): each settings row with the mean
    and standard error of ``SCORES`` over the cases, and per key the per-case tensors."""
    per_case = {}
    for row in tqdm(settings, desc="attention settings", disable=not progress, leave=False):
        key = setting_key(row)
        if key in per_case:
            continue
        edited = []
        for start in range(0, len(cases), batch):
            chunk = cases[start:start + batch]
            source, _, _, sources, targets = toybench.case_batch(chunk)
            blend = ([(c.source_blend, c.target_blend) for c in chunk] if row["blend"]
                     else None)
            edited.append(icd_edit(pipes[row["m"]], source.to(pipes[row["m"]].device), sources,
                                   targets, w, tau, row["p2p"], blend).images)
        scores = toybench.evaluate(perception, cases, torch.cat(edited))
        per_case[key] = {name: torch.tensor([float(s[name]) for s in scores])
                         for name in SCORES}
    rows = []
    for row in settings:
        key = setting_key(row)
        out = {k: v for k, v in row.items() if k != "p2p"} | {
            "cross_fraction": row["p2p"].cross_fraction, "self_fraction": row["p2p"].self_fraction,
            "amplify": row["p2p"].amplify,
            "blend_threshold": row["p2p"].blend_threshold if row["blend"] else math.nan,
            "key": key, "cases": len(cases)}
        for name in SCORES:
            values = per_case[key][name]
            values = values[~torch.isnan(values)]
            out[name], out[f"{name}_se"] = _mean_se(values)
        rows.append(out)
    return rows, per_case


def wilson(p: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a proportion p measured on n items:
    ``editing_evaluation.wilson_interval`` given the proportion instead of the count."""
    return wilson_interval(p * n, n, z)


def as_array(rows: list[dict], key: str) -> np.ndarray:
    return np.array([row[key] for row in rows], dtype=float)
