r"""The editing experiments: every editor on the same ToyBench cases, its speed, and trade-offs.

* ``make_editors``: iCD (4 and 3 steps, with P2P; 4 steps with prompt switching) and the teacher
  baselines DDIM50 + P2P, NPI + P2P, NTI + P2P, all with the same signature;
* ``toybench_results``: the PIE-Bench-style metrics of ``toybench.evaluate`` per editor, per edit
  type and overall;
* ``edit_timing``: seconds and NFE of one edit at a time, side by side in this process, as ratios
  to iCD; and iCD's wall time against the bare cost of its network evaluations (the same 8
  student calls on the same shapes, without hooks, VAE or text encoder), the two timed in turn;
* ``tradeoff``: text alignment vs preservation of an editor over guidance scales (Fig. 9a,
  Fig. 12).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from . import toybench
from ..editing import P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from ..checks import check_finite
from ..metrics import ToyPerception
from ..pipeline import TAU_FIX, W_FIX, ICDPipeline

# The authors' benchmark scripts use w = 20 (w_code 19), tau 0.8 (method.md section 5). The toy
# students edit best near w = 4: on 48 ToyBench cases CLIP-T 0.732 / 0.721 / 0.706 at w = 4 / 8 /
# 20, DinoV2-like 0.701 / 0.642 / 0.618, background PSNR 24.3 / 21.9 / 20.8 dB (notebook 05).
W_ICD, TAU_ICD = 4.0, 0.8
W_TEACHER = 7.5  # P2P's CFG scale for the 50-step baselines (method.md section 6)
W_SWITCH, TAU_SWITCH = 8.0, 0.7  # the paper's SDXL recipe (tau 0.7)
ICD = "iCD 4 steps + P2P"


def make_editors(components, pipes: dict[str, ICDPipeline], w_icd: float = W_ICD,
                 tau: float = TAU_ICD, w_teacher: float = W_TEACHER,
                 p2p: P2PSettings = P2PSettings(), nti_inner_steps: int = 10,
                 steps: int = 50) -> dict:
    """name -> editor(images, sources, targets, blend_words) -> editing.Edit; the iCD editors
    guide with ``w_icd``, the teacher baselines with ``w_teacher`` over ``steps`` DDIM steps
    (the paper's 50; fewer only for quick checks). The numbers are checked here (finite, in
    range), before any editor runs."""
    check_finite("w_icd", w_icd, 1, fix=W_FIX)
    check_finite("tau", tau, 0, 1, fix=TAU_FIX)
    check_finite("w_teacher", w_teacher, 1, fix=W_FIX)
    check_finite("nti_inner_steps", nti_inner_steps, 0, integer=True, fix="e.g. 10")
    check_finite("steps", steps, 1, 1000, integer=True, fix="DDIM steps of the baselines, e.g. 50")

    def icd(recipe):
        return lambda x, s, t, b: icd_edit(pipes[recipe], x, s, t, w_icd, tau, p2p, b)

    def teacher(method):
        return lambda x, s, t, b: baseline_edit(components, x, s, t, method, w_teacher, steps,
                                                p2p=p2p, blend_words=b,
                                                nti_inner_steps=nti_inner_steps)

    return {ICD: icd("G"), "iCD 3 steps + P2P": icd("G3"),
            "iCD 4 steps, prompt switch": lambda x, s, t, b: prompt_switch_edit(
                pipes["G"], x, s, t, W_SWITCH, TAU_SWITCH),
            "DDIM50 + P2P": teacher("ddim"), "NPI + P2P": teacher("npi"),
            "NTI + P2P": teacher("nti")}


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


def toybench_results(perception: ToyPerception, editors: dict, cases, per_type: dict | None = None,
                     batch: int = 50) -> dict:
    """name -> {"cases", "nfe", "summary" (``toybench.summarize``), "rows", "images"}.

    ``per_type`` maps an editor to the cases per edit type it sees (a stratified subset, for the
    slow ones); the others see every case.
    """
    results = {}
    for name, editor in editors.items():
        subset = cases
        if per_type and name in per_type:
            subset = toybench.stratified_subset(cases, per_type[name])
        edited, nfe = run_editor(editor, subset, batch, desc=name)
        rows = toybench.evaluate(perception, subset, edited)
        results[name] = {"cases": len(subset), "nfe": nfe, "summary": toybench.summarize(rows),
                         "rows": rows, "images": edited}
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
                fast_repeats: int = 5) -> list[dict]:
    """Seconds and NFE per edit, one edit at a time, each editor on the same cases after one
    warm-up edit, with the ratio to iCD. An edit that takes under half a second is timed as the
    median of ``fast_repeats`` runs (single runs of a 0.1 s edit vary by ~30 % here). iCD's row
    (the first) also gives the bare cost of its network evaluations (``overhead_of_edits``)."""
    rows = []
    for name, editor in editors.items():
        seconds, nfe = [], []
        for case in cases:
            source, _, _, sources, targets = toybench.case_batch([case])
            edit = editor(source, sources, targets, blend_words([case]))  # warm-up, NFE
            nfe.append(edit.nfe)
            repeats = fast_repeats if edit.seconds < 0.5 else 1
            seconds.append(median_seconds(
                lambda: editor(source, sources, targets, blend_words([case])), repeats))
        rows.append({"editor": name, "seconds": sum(seconds) / len(cases),
                     "nfe": sum(nfe) / len(cases), "edits": len(cases)})
    for row in rows:
        row["ratio_to_icd"] = row["seconds"] / rows[0]["seconds"]
    rows[0].update(overhead_of_edits(next(iter(editors.values())), cases, pipe, fast_repeats))
    return rows


def tradeoff(perception: ToyPerception, cases, editor_at, ws, label: str) -> list[dict]:
    """Text alignment (CLIP-T with the target) vs preservation (DinoV2-like to the source, and
    background PSNR) of one editor over guidance scales: ``editor_at(w)`` is the editor at w.
    "skipped" counts the cases left out of a mean (an empty background region, see
    ``toybench.summarize``)."""
    rows = []
    for w in ws:
        edited, _ = run_editor(editor_at(w), cases, desc=f"{label}, w = {w:g}")
        summary = toybench.summarize(toybench.evaluate(perception, cases, edited))["all"]
        rows.append({"editor": label, "w": w, **{key: summary[key] for key in (
            "clip_t", "dino_like", "bg_psnr", "attribute_ok", "skipped")}})
    return rows
