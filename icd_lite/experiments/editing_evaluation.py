r"""The editing experiments: every editor on the same ToyBench cases, its speed, and trade-offs.

* ``make_editors``: iCD (4 and 3 steps, with P2P; 4 steps with prompt switching) and the teacher
  baselines DDIM50 + P2P, NPI + P2P, NTI + P2P, all with the same signature;
* ``toybench_results``: the PIE-Bench-style metrics of ``toybench.evaluate`` per editor, per edit
  type and overall;
* ``edit_timing``: seconds and NFE of one edit at a time, side by side in this process, as ratios
  to iCD; and iCD's wall time against the bare cost of its network evaluations (the same 8
  student calls on the same shapes, without hooks, VAE or text encoder), the two timed in turn;
* ``tradeoff``: text alignment vs preservation of an editor over guidance scales (Fig. 9a,
  Fig. 12);
* ``matched_p2p`` / ``control_table``: attention control that covers the same *steps* of a
  3-step and a 4-step decoding (P2P counts steps as int(fraction * n), so cross 0.3 controls
  none of 3 steps), for the 3- vs 4-step comparison of Fig. 12;
* ``trace_icd_edit``: one iCD edit opened up, step by step: x0_hat of both branches, the
  cross-attention maps per token and the local-blend mask (notebook 05 draws them);
* ``wilson_interval`` / ``mean_interval``: the 95 % intervals drawn on the bar charts.
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from . import toybench
from ..attention import AlignmentError, attention_control, controlled_steps, word_positions
from ..consistency import encode as consistency_encode
from ..consistency import sample_consistency
from ..editing import Edit, P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from ..checks import check_finite
from ..metrics import ToyPerception
from ..pipeline import TAU_FIX, W_FIX, ICDPipeline, guidance_schedule

# The authors' benchmark scripts use w = 20 (w_code 19), tau 0.8 (method.md section 5). The toy
# students edit best near w = 4: on 48 ToyBench cases CLIP-T 0.732 / 0.721 / 0.706 at w = 4 / 8 /
# 20, DinoV2-like 0.701 / 0.642 / 0.618, background PSNR 24.3 / 21.9 / 20.8 dB (notebook 05).
W_ICD, TAU_ICD = 4.0, 0.8
W_TEACHER = 7.5  # P2P's CFG scale for the 50-step baselines (method.md section 6)
W_SWITCH, TAU_SWITCH = 8.0, 0.7  # the paper's SDXL recipe (tau 0.7)
ICD = "iCD 4 steps + P2P"
ICD3 = "iCD 3 steps + P2P"
SWITCH = "iCD 4 steps, prompt switch"
TEACHERS = ("DDIM50 + P2P", "NPI + P2P", "NTI + P2P")
# Attention control matched between 3 and 4 decoding steps: cross-attention on the first step,
# self-attention on the first two, for both (int(0.34 n) = 1 and int(0.67 n) = 2 for n = 3, 4).
# With 4 steps this is exactly the default P2PSettings (0.3 -> 1 step, 0.6 -> 2 steps).
MATCHED_CROSS, MATCHED_SELF = 0.34, 0.67


def matched_p2p(cross_fraction: float = MATCHED_CROSS, self_fraction: float = MATCHED_SELF,
                **knobs) -> P2PSettings:
    """P2P settings whose fractions control the same number of steps with 3 and with 4 decoding
    steps (ValueError otherwise): e.g. cross 0.34 -> 1 of 3 and 1 of 4."""
    for name, fraction in (("cross_fraction", cross_fraction), ("self_fraction", self_fraction)):
        counts = {n: controlled_steps(fraction, n) for n in (3, 4)}
        if counts[3] != counts[4]:
            raise ValueError(f"{name} {fraction:g} controls {counts[3]} of 3 steps but {counts[4]}"
                             f" of 4; choose one that controls as many of both (e.g. 0.34: 1, "
                             f"0.67: 2)")
    return P2PSettings(cross_fraction, self_fraction, **knobs)


def control_table(settings: dict[str, P2PSettings], pipes: dict[str, ICDPipeline]) -> list[dict]:
    """One row per (label, recipe): the decoding steps and which of them P2P controls, with the
    part of the trajectory (t from 999 down to) that the controlled steps cover."""
    rows = []
    for label, p2p in settings.items():
        for recipe, pipe in pipes.items():
            steps = pipe.boundaries.decoding_steps()
            cross = controlled_steps(p2p.cross_fraction, len(steps))
            self_ = controlled_steps(p2p.self_fraction, len(steps))
            rows.append({"control": label, "recipe": recipe, "steps": len(steps),
                         "cross_fraction": p2p.cross_fraction, "cross_steps": cross,
                         "cross_until_t": steps[cross - 1][1] if cross else None,
                         "self_fraction": p2p.self_fraction, "self_steps": self_,
                         "self_until_t": steps[self_ - 1][1] if self_ else None})
    return rows


def make_editors(components, pipes: dict[str, ICDPipeline], w_icd: float = W_ICD,
                 tau: float = TAU_ICD, w_teacher: float = W_TEACHER,
                 p2p: P2PSettings = P2PSettings(), nti_inner_steps: int = 10,
                 steps: int = 50, p2p_icd: P2PSettings | None = None) -> dict:
    """name -> editor(images, sources, targets, blend_words) -> editing.Edit; the iCD editors
    guide with ``w_icd``, the teacher baselines with ``w_teacher`` over ``steps`` DDIM steps
    (the paper's 50; fewer only for quick checks). ``p2p`` controls the teachers' attention and,
    unless ``p2p_icd`` is given (e.g. ``matched_p2p()``), the students'. The numbers are checked
    here (finite, in range), before any editor runs."""
    check_finite("w_icd", w_icd, 1, fix=W_FIX)
    check_finite("tau", tau, 0, 1, fix=TAU_FIX)
    check_finite("w_teacher", w_teacher, 1, fix=W_FIX)
    check_finite("nti_inner_steps", nti_inner_steps, 0, integer=True, fix="e.g. 10")
    check_finite("steps", steps, 1, 1000, integer=True, fix="DDIM steps of the baselines, e.g. 50")

    p2p_icd = p2p if p2p_icd is None else p2p_icd

    def icd(recipe):
        return lambda x, s, t, b: icd_edit(pipes[recipe], x, s, t, w_icd, tau, p2p_icd, b)

    def teacher(method):
        return lambda x, s, t, b: baseline_edit(components, x, s, t, method, w_teacher, steps,
                                                p2p=p2p, blend_words=b,
                                                nti_inner_steps=nti_inner_steps)

    return {ICD: icd("G"), ICD3: icd("G3"),
            SWITCH: lambda x, s, t, b: prompt_switch_edit(pipes["G"], x, s, t, W_SWITCH,
                                                          TAU_SWITCH),
            "DDIM50 + P2P": teacher("ddim"), "NPI + P2P": teacher("npi"),
            "NTI + P2P": teacher("nti")}


def editor_at(components, pipes: dict[str, ICDPipeline], name: str, **settings):
    """w -> the editor ``name`` of ``make_editors`` guided with w (iCD and teachers alike), for
    ``tradeoff``; ``settings`` are the other arguments of ``make_editors``."""
    return lambda w: make_editors(components, pipes, w_icd=w, w_teacher=w, **settings)[name]


def default_point(results: dict, name: str, w: float) -> dict:
    """The ToyBench result of ``name`` (``toybench_results``) as a point of a sweep at w."""
    summary = results[name]["summary"]["all"]
    return {"editor": name, "w": w, **{key: summary[key] for key in (
        "clip_t", "dino_like", "bg_psnr", "attribute_ok", "skipped")}}


def blend_words(cases: list[toybench.EditCase]) -> list:
    return [(case.source_blend, case.target_blend) for case in cases]


def run_editor(editor, cases: list[toybench.EditCase], batch: int = 50, desc: str = "edit"):
    """Edit every case, ``batch`` at a time: (edited images [N, 3, 32, 32], NFE per edit)."""
    edited, nfe = [], 0
    for start in tqdm(range(0, len(cases), batch), desc=desc, leave=False):
        chunk = cases[start:start + batch]
        source, _, _, sources, targets = toybench.case_batch(chunk)
        edit = editor(source, sources, targets, blend_words(chunk))
        edited.append(edit.images)
        nfe = edit.nfe
    return torch.cat(edited), nfe


def run_one_at_a_time(editor, cases: list[toybench.EditCase], desc: str = "edit"):
    """Edit every case alone: (edited images [N, 3, 32, 32], NFE per edit, seconds per edit).
    For the slow editors (seconds per edit), whose ToyBench run then doubles as their timing."""
    edited, seconds, nfe = [], [], 0
    for case in tqdm(cases, desc=desc, leave=False):
        source, _, _, sources, targets = toybench.case_batch([case])
        edit = editor(source, sources, targets, blend_words([case]))
        edited.append(edit.images)
        seconds.append(edit.seconds)
        nfe = edit.nfe
    return torch.cat(edited), nfe, seconds


def toybench_results(perception: ToyPerception, editors: dict, cases, per_type: dict | None = None,
                     batch: int = 50, subsets: dict | None = None,
                     one_at_a_time: tuple = ()) -> dict:
    """name -> {"cases", "nfe", "summary" (``toybench.summarize``), "rows", "images"}.

    ``per_type`` maps an editor to the cases per edit type it sees (a stratified subset, for the
    slow ones); ``subsets`` maps an editor to its own list of cases; the others see every case.
    The editors named in ``one_at_a_time`` edit one case at a time and their result also holds
    "edit_seconds", the wall time of each edit (``edit_timing`` reuses it).
    """
    results = {}
    for name, editor in editors.items():
        subset = cases
        if per_type and name in per_type:
            subset = toybench.stratified_subset(cases, per_type[name])
        if subsets and name in subsets:
            subset = subsets[name]
        extra = {}
        if name in one_at_a_time:
            edited, nfe, extra["edit_seconds"] = run_one_at_a_time(editor, subset, desc=name)
        else:
            edited, nfe = run_editor(editor, subset, batch, desc=name)
        rows = toybench.evaluate(perception, subset, edited)
        results[name] = {"cases": len(subset), "nfe": nfe, "summary": toybench.summarize(rows),
                         "rows": rows, "images": edited, **extra}
    return results


def seconds_of(run) -> float:
    """The wall time of one call of ``run()``."""
    begin = time.perf_counter()
    run()
    return time.perf_counter() - begin


def median_seconds(run, repeats: int) -> float:
    """The median wall time of ``repeats`` calls of ``run()``."""
    return statistics.median(seconds_of(run) for _ in range(repeats))


@torch.no_grad()
def bare_network_calls(pipe: ICDPipeline, image: torch.Tensor, prompt: str):
    """A function making the 2m student calls of one iCD edit alone: m encoder calls on one
    latent, m decoder calls on a batch of two, on the same inputs as an edit, without hooks, VAE
    or text encoder."""
    latents = pipe.base.encode_images(image)
    cond = pipe.base.encode_prompt([prompt])
    device = latents.device
    pair, zero = torch.cat([cond, cond]), torch.zeros(1, device=device)

    @torch.no_grad()
    def calls():
        for t, _ in pipe.boundaries.encoding_steps():
            pipe.forward_student(latents, torch.tensor([t], device=device), None, cond, zero)
        for t, _ in pipe.boundaries.decoding_steps():
            pipe.reverse_student(latents.repeat(2, 1, 1, 1), torch.tensor([t, t], device=device),
                                 None, pair, torch.tensor([0.0, 19.0], device=device))
    return calls


def overhead_of_edits(editor, cases: list[toybench.EditCase], pipe: ICDPipeline,
                      repeats: int) -> dict:
    """iCD's wall time per edit against the bare cost of its network calls. The two are timed in
    turn, edit then bare calls, ``repeats`` times per case, so that a change in the machine's load
    moves both alike instead of biasing their ratio."""
    edit_seconds, bare_seconds = [], []
    for case in cases:
        source, _, _, sources, targets = toybench.case_batch([case])
        blend = blend_words([case])
        network_calls = bare_network_calls(pipe, source, case.source_prompt)
        network_calls()  # warm-up
        pairs = [(seconds_of(lambda: editor(source, sources, targets, blend)),
                  seconds_of(network_calls)) for _ in range(repeats)]
        edit_seconds.append(statistics.median(edit for edit, _ in pairs))
        bare_seconds.append(statistics.median(calls for _, calls in pairs))
    edit, bare = sum(edit_seconds) / len(cases), sum(bare_seconds) / len(cases)
    return {"paired_edit_seconds": edit, "bare_network_seconds": bare,
            "overhead_ratio": edit / bare}


def edit_timing(editors: dict, cases: list[toybench.EditCase], pipe: ICDPipeline,
                fast_repeats: int = 5, measured: dict | None = None) -> list[dict]:
    """Seconds and NFE per edit, one edit at a time, each editor on the same cases after one
    warm-up edit, with the ratio to iCD. An edit that takes under half a second is timed as the
    median of ``fast_repeats`` runs after it (single runs of a 0.1 s edit vary by ~30 % here);
    a slower edit counts as timed by that first run (its one-off costs are small beside
    seconds of network passes, and a second run would double the bench's time). ``measured``:
    name -> a ``toybench_results`` entry with "edit_seconds" (edits already timed one at a time,
    e.g. NTI's): those are used instead of editing again. Each row holds "edits" (n), the
    per-edit "edit_seconds" and their standard deviation "sd". iCD's row (the first) also gives
    the bare cost of its network evaluations (``overhead_of_edits``)."""
    rows = []
    measured = measured or {}
    for name, editor in editors.items():
        if name in measured and "edit_seconds" in measured[name]:
            seconds, nfe = list(measured[name]["edit_seconds"]), [measured[name]["nfe"]]
        else:
            seconds, nfe = [], []
            for case in cases:
                source, _, _, sources, targets = toybench.case_batch([case])
                edit = editor(source, sources, targets, blend_words([case]))  # warm-up, NFE
                nfe.append(edit.nfe)
                seconds.append(edit.seconds if edit.seconds >= 0.5 else median_seconds(
                    lambda: editor(source, sources, targets, blend_words([case])), fast_repeats))
        rows.append({"editor": name, "seconds": sum(seconds) / len(seconds),
                     "nfe": sum(nfe) / len(nfe), "edits": len(seconds),
                     "sd": statistics.stdev(seconds) if len(seconds) > 1 else float("nan"),
                     "edit_seconds": seconds})
    for row in rows:
        row["ratio_to_icd"] = row["seconds"] / rows[0]["seconds"]
    rows[0].update(overhead_of_edits(next(iter(editors.values())), cases, pipe, fast_repeats))
    return rows


def tradeoff(perception: ToyPerception, cases, editor_at, ws, label: str,
             keep_rows: bool = False) -> list[dict]:
    """Text alignment (CLIP-T with the target) vs preservation (DinoV2-like to the source, and
    background PSNR) of one editor over guidance scales: ``editor_at(w)`` is the editor at w.
    "skipped" counts the cases left out of a mean (an empty background region, see
    ``toybench.summarize``); ``keep_rows`` adds "rows", the per-case metrics (for intervals)."""
    rows = []
    for w in ws:
        edited, _ = run_editor(editor_at(w), cases, desc=f"{label}, w = {w:g}")
        per_case = toybench.evaluate(perception, cases, edited)
        summary = toybench.summarize(per_case)["all"]
        rows.append({"editor": label, "w": w, **{key: summary[key] for key in (
            "clip_t", "dino_like", "bg_psnr", "attribute_ok", "skipped")}})
        if keep_rows:
            rows[-1]["rows"] = per_case
    return rows


# ------------------------------------------------------------------- one edit, opened up


@dataclass
class EditTrace:
    """One iCD edit step by step (``trace_icd_edit``). Latents are [C, h, w]-shaped per image.

    * ``encoding``: per encoding jump {"t", "s", "x0_hat" [1, C, h, w]};
    * ``decoding``: per decoding jump {"t", "s", "w_code" (the target branch's), "cross" / "self"
      (whether P2P controlled that attention), "x0_hat" [2, C, h, w] (source, target; before the
      blend), "maps" [2, L, h, w] (cross-attention per token, averaged over layers and heads, or
      None when no layer kept its map), "mask" [1, 1, h, w] (the local blend, ones = no blend)};
    * ``edit``: the edited image and the reconstruction, exactly as ``editing.icd_edit``;
    * ``tokens``: (source words, target words) with their positions in the maps.
    """

    encoding: list[dict]
    decoding: list[dict]
    edit: Edit
    tokens: tuple[list[tuple[str, int]], list[tuple[str, int]]]


def cross_attention_maps(controller, size) -> torch.Tensor | None:
    """The cross-attention maps the controller kept in this step, [2B, L, h, w]: each layer's
    map (averaged over heads) resized to the latent grid, then averaged over layers, as the
    local blend computes them (``PromptToPrompt.step_maps``)."""
    maps = controller.step_maps
    if not maps:
        return None
    return torch.stack([F.interpolate(m, size=size, mode="bilinear") for m in maps]).mean(0)


def blend_mask(controller, x: torch.Tensor) -> torch.Tensor:
    """The local-blend mask M [B, 1, h, w] of this step, through the public ``blend_latents``:
    blending a source branch of zeros with a target branch of ones returns
    0 + M * (1 - 0) = M as the target branch (all ones when the step does not blend)."""
    half = x[: len(x) // 2, :1]
    return controller.blend_latents(torch.cat([torch.zeros_like(half),
                                               torch.ones_like(half)])).chunk(2)[1]


def prompt_tokens(tokenizer, prompt: str) -> list[tuple[str, int]]:
    """(word, position of its first token) for every word of a prompt, as the cross-attention
    maps index it; a word the tokenizer splits differently in context (BPE punctuation) is
    left out."""
    words = prompt.split()
    out = []
    for word, k in _occurrences(words):
        try:
            positions = word_positions(tokenizer, prompt, (word,)).nonzero().flatten()
        except AlignmentError:
            continue
        per_occurrence = max(1, len(positions) // words.count(word))
        if k * per_occurrence < len(positions):
            out.append((word, int(positions[k * per_occurrence])))
    return out


def _occurrences(words: list[str]) -> list[tuple[str, int]]:
    seen: dict[str, int] = {}
    out = []
    for word in words:
        out.append((word, seen.get(word, 0)))
        seen[word] = seen.get(word, 0) + 1
    return out


@torch.no_grad()
def trace_icd_edit(pipe: ICDPipeline, image: torch.Tensor, source: str, target: str,
                   w: float = W_ICD, tau: float = TAU_ICD, p2p: P2PSettings = P2PSettings(),
                   blend_words=None, seed: int = 0) -> EditTrace:
    """``editing.icd_edit`` of one image [1, 3, H, W], the same computation, with its
    intermediate states kept (``EditTrace``): the encoding and decoding jumps run through
    ``consistency.sample_consistency`` one at a time, whose callback hands out x0_hat."""
    begin = time.perf_counter()
    components = pipe.base
    guidance = guidance_schedule(w, tau)
    sources, targets = components.clean_prompts([source]), components.clean_prompts([target])
    controller = p2p.controller(components.tokenizer, sources, targets, pipe.boundaries.m,
                                blend_words)
    cond = components.encode_prompt(sources + targets)           # [2, L, D]: source, target
    z0 = components.encode_images(image)                          # [1, C, h, w]
    encoding = []
    generator = torch.Generator().manual_seed(seed)  # the noise to t = 19, as icd_edit
    x_T = consistency_encode(pipe.forward_student, z0, pipe.boundaries, cond[:1],
                             generator=generator, callback=lambda d: encoding.append(
                                 {"t": d["t"], "s": d["s"], "x0_hat": d["x0_hat"]}))
    x = x_T.repeat(2, 1, 1, 1)                                    # [2, C, h, w]
    decoding = []
    with attention_control(pipe.reverse_student.unet, controller):
        for i, (t, s) in enumerate(pipe.boundaries.decoding_steps()):
            controller.begin_step(i)
            w_code = torch.tensor([0.0, guidance(t)], device=x.device)  # source, target
            step = {"t": t, "s": s, "w_code": float(w_code[1]),
                    "cross": i < controller.cross_steps, "self": i < controller.self_steps}
            x = sample_consistency(pipe.reverse_student, x, [(t, s)], cond, lambda _: w_code,
                                   callback=lambda d: step.update(x0_hat=d["x0_hat"]),
                                   disable=True)
            step["maps"] = cross_attention_maps(controller, x.shape[-2:])
            step["mask"] = blend_mask(controller, x)
            x = controller.blend_latents(x)
            decoding.append(step)
        controller.finish()
    reconstructed, edited = components.decode_latents(x).chunk(2)
    edit = Edit(edited, reconstructed, 2 * pipe.boundaries.m, time.perf_counter() - begin)
    tokens = (prompt_tokens(components.tokenizer, sources[0]),
              prompt_tokens(components.tokenizer, targets[0]))
    return EditTrace(encoding, decoding, edit, tokens)


# ------------------------------------------------------------------- intervals and tables


def wilson_interval(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval of a proportion (95 % for z = 1.96); (nan, nan) for n = 0.
    Unlike p +- z sqrt(p(1-p)/n) it stays in [0, 1] and is not empty at p = 0 or 1."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def mean_interval(values, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(mean, low, high): the mean and its 95 % bootstrap percentile interval (``resamples``
    draws of the values with replacement, seeded; NaN values left out; the interval is NaN for
    fewer than two values)."""
    values = np.asarray([v for v in values if not math.isnan(v)], dtype=np.float64)
    if not values.size:
        return float("nan"), float("nan"), float("nan")
    mean = float(values.mean())
    if values.size < 2:
        return mean, float("nan"), float("nan")
    draws = np.random.default_rng(seed).choice(values, (resamples, values.size)).mean(1)
    low, high = np.quantile(draws, [0.025, 0.975])
    return mean, float(low), float(high)


def attribute_rates(results: dict, edit_types=None) -> list[dict]:
    """Per editor and edit type (and "all"): attribute accuracy k / n with its Wilson interval."""
    edit_types = list(edit_types or toybench.EDIT_TYPES) + ["all"]
    rows = []
    for name, result in results.items():
        for edit_type in edit_types:
            oks = [row["attribute_ok"] for row in result["rows"]
                   if edit_type == "all" or row["edit_type"] == edit_type]
            k, n = int(sum(oks)), len(oks)
            low, high = wilson_interval(k, n)
            rows.append({"editor": name, "edit_type": edit_type, "n": n, "correct": k,
                         "rate": k / n if n else float("nan"), "low": low, "high": high})
    return rows


def on_cases(result: dict, ids) -> dict:
    """The means of a ``toybench_results`` entry over the cases ``ids`` only (a paired
    comparison of editors that ran on different numbers of cases)."""
    rows = [row for row in result["rows"] if row["id"] in set(ids)]
    return toybench.summarize(rows)["all"] if rows else {}
