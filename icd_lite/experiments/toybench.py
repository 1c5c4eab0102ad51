r"""ToyBench: a PIE-Bench-style editing benchmark made from the toy world, with exact ground truth.

An ``EditCase`` is a source scene, its target after one edit of ``scenes.EDIT_TYPES``, their
captions as prompts, the words Prompt-to-Prompt needs and, unlike PIE-Bench, the exact target
image and edit mask. ``world/toybench.json`` holds the 300 default cases with the sha256 of every
rendered image and mask: ``python -m icd_lite.experiments.toybench --write`` regenerates it, and without
``--write`` the command checks it and prints its counts. ``evaluate`` mirrors PIE-Bench's metrics:

* structure distance (self-similarity of DINO ViT tokens) -> ``structure_distance``, the same
  formula on the toy CLIP ViT's last-layer patch tokens;
* background PSNR / MSE / SSIM / LPIPS, outside the edit mask -> the same outside the *exact*
  mask (``metrics.masked_*``, ``ssim``, ``lpips_like``);
* CLIP similarity of the whole / the edited region with the target prompt -> ``clip_t``;
* the paper's editing axis of preservation, DinoV2 similarity to the source -> ``dino_like``;
* and, only here: ``psnr_target`` against the exact target image, and ``attribute_ok``.
"""

from __future__ import annotations

import argparse
import difflib
import hashlib
import json
import math
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from .. import metrics
from ..checks import ImageRangeWarning
from ..world.scenes import (BACKGROUND_COLORS, EDIT_TYPES, OBJECT_COLORS, PATTERNS, SHAPES, SIZES,
                           Scene, SceneObject, add_object, caption, change_background,
                           change_color, change_shape, change_size, edit_mask, random_edit,
                           random_scene, render)

DEFAULT_PATH = Path(__file__).parent.parent / "world" / "toybench.json"
SEED, PER_TYPE = 0, 50
REGENERATE = "regenerate it with `python -m icd_lite.experiments.toybench --write`"
METRICS = ("structure", "bg_psnr", "bg_lpips", "bg_mse", "bg_ssim", "clip_t", "clip_t_edited",
           "dino_like", "psnr_target", "attribute_ok")


@dataclass(frozen=True)
class EditCase:
    """One edit: source and target scenes, prompts (their captions) and Prompt-to-Prompt words.

    ``source_blend`` / ``target_blend``: the shape words of the objects only in the source / only
    in the target (LocalBlend's words; a two-object prompt may hold the same word twice).
    ``changed_words``: the target words that difflib aligns to no equal source word (reweighting).
    """

    id: str
    edit_type: str
    source: Scene
    target: Scene
    source_prompt: str
    target_prompt: str
    source_blend: tuple[str, ...]
    target_blend: tuple[str, ...]
    changed_words: tuple[str, ...]

    @property
    def source_image(self) -> torch.Tensor:
        """float32 [3, 32, 32] in [-1, 1], rendered on each call (~0.2 ms)."""
        return torch.from_numpy(render(self.source)[0])

    @property
    def target_image(self) -> torch.Tensor:
        return torch.from_numpy(render(self.target)[0])

    @property
    def mask(self) -> torch.Tensor:
        """bool [32, 32]: the pixels the edit may change (``scenes.edit_mask``)."""
        return torch.from_numpy(edit_mask(self.source, self.target))


def _edit(source: Scene, target: Scene) -> tuple[str, int | None]:
    """The edit type that turns source into target and the edited object's index in target
    (None for background and remove); ValueError unless it is exactly one such edit."""
    new = [i for i, obj in enumerate(target.objects) if obj not in source.objects]
    old = [obj for obj in source.objects if obj not in target.objects]
    same_background = (source.background, source.pattern) == (target.background, target.pattern)
    if not same_background and not new and not old:
        return "background", None
    if same_background and len(new) == 1 and not old:
        return "add", new[0]
    if same_background and len(old) == 1 and not new:
        return "remove", None
    if same_background and len(new) == len(old) == 1:
        a, b = asdict(old[0]), asdict(target.objects[new[0]])
        changed = [key for key in a if a[key] != b[key]]  # of shape, color, size, x, y
        if len(changed) == 1 and changed[0] in EDIT_TYPES:  # not a move
            return changed[0], new[0]
    raise ValueError(f"{caption(source)!r} -> {caption(target)!r} is not a single edit of one "
                     f"of the types {', '.join(EDIT_TYPES)}")


def make_case(case_id: str, source: Scene, target: Scene) -> EditCase:
    """The EditCase of an edit; its type is read off the two scenes."""
    source_words, target_words = caption(source).split(), caption(target).split()
    matcher = difflib.SequenceMatcher(None, source_words, target_words, autojunk=False)
    changed = [word for tag, _, _, j1, j2 in matcher.get_opcodes() if tag in ("insert", "replace")
               for word in target_words[j1:j2]]
    return EditCase(case_id, _edit(source, target)[0], source, target,
                    " ".join(source_words), " ".join(target_words),
                    tuple(obj.shape for obj in source.objects if obj not in target.objects),
                    tuple(obj.shape for obj in target.objects if obj not in source.objects),
                    tuple(changed))


def _draw_edit(rng: np.random.Generator, edit_type: str) -> tuple[Scene, Scene]:
    """A random scene and a random edit of it, redrawing scenes that allow no such edit."""
    while True:
        source = random_scene(rng)
        try:
            return source, random_edit(source, rng, edit_type)
        except ValueError:  # e.g. "add" to a scene that already has two objects
            continue


def make_cases(per_type: int = PER_TYPE, seed: int = SEED) -> list[EditCase]:
    """per_type cases of every edit type, ids "color-000" ..., ordered by type then index.

    Each case draws from its own stream default_rng([seed, type, index]): sources are
    independent, and make_cases(10) holds the first 10 cases of every type of make_cases(50).
    """
    if not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"per_type must be a positive integer, got {per_type!r}")
    return [make_case(f"{edit_type}-{i:03d}",
                      *_draw_edit(np.random.default_rng([seed, t, i]), edit_type))
            for t, edit_type in enumerate(EDIT_TYPES) for i in range(per_type)]


def stratified_subset(cases: list[EditCase], per_type: int) -> list[EditCase]:
    """The first per_type cases of each edit type, in their order (for slow baselines)."""
    if not isinstance(per_type, int) or per_type < 1:
        raise ValueError(f"per_type must be a positive integer, got {per_type!r}")
    seen, subset = Counter(), []
    for case in cases:
        seen[case.edit_type] += 1
        if seen[case.edit_type] <= per_type:
            subset.append(case)
    return subset


def case_batch(cases: list[EditCase]):
    """(source images [N, 3, 32, 32], target images, masks bool [N, 32, 32], source prompts,
    target prompts); the tensors are rendered on the CPU."""
    if not cases:
        raise ValueError("case_batch needs at least one case")
    return (torch.stack([c.source_image for c in cases]),
            torch.stack([c.target_image for c in cases]), torch.stack([c.mask for c in cases]),
            [c.source_prompt for c in cases], [c.target_prompt for c in cases])


# ------------------------------------------------------------------------------ the manifest


def scene_to_dict(scene: Scene) -> dict:
    return asdict(scene)


def scene_from_dict(data: dict) -> Scene:
    return Scene(data["background"], data["pattern"],
                 tuple(SceneObject(**obj) for obj in data["objects"]))


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.numpy().tobytes()).hexdigest()


def _entry(case: EditCase) -> dict:
    """A case as plain JSON, with the sha256 of its rendered images and mask."""
    entry = asdict(case)  # the scenes too: scene_to_dict
    entry["sha256"] = {"source": _sha256(case.source_image), "target": _sha256(case.target_image),
                       "mask": _sha256(case.mask)}
    return json.loads(json.dumps(entry))  # tuples -> lists, as read back from the file


def write_manifest(cases: list[EditCase], path, *, seed: int | None, per_type: int | None) -> None:
    """Write the cases, one JSON line each (readable diffs); seed / per_type record the
    make_cases call that made them (None for hand-picked cases)."""
    header = json.dumps({"command": "python -m icd_lite.experiments.toybench --write", "seed": seed,
                         "per_type": per_type})[:-1]  # without its closing brace
    lines = ",\n".join(json.dumps(_entry(case)) for case in cases)
    Path(path).write_text(f'{header}, "cases": [\n{lines}\n]}}\n')


def load_toybench(path=DEFAULT_PATH) -> list[EditCase]:
    """The cases of a manifest, rebuilt from its scenes; every prompt, word and sha256 of the
    re-rendered images and mask must match the file, or ValueError says how to regenerate it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ToyBench manifest {path} is missing; {REGENERATE}")
    cases = []
    for entry in json.loads(path.read_text())["cases"]:
        try:
            case = make_case(entry["id"], scene_from_dict(entry["source"]),
                             scene_from_dict(entry["target"]))
        except (KeyError, TypeError, ValueError) as error:
            raise ValueError(f"ToyBench case {entry.get('id')!r} in {path} is not a valid edit "
                             f"({error}); {REGENERATE}") from error
        rebuilt = _entry(case)
        if rebuilt != entry:
            differ = sorted(key for key in rebuilt.keys() | entry.keys()
                            if rebuilt.get(key) != entry.get(key))
            raise ValueError(f"ToyBench case {case.id} in {path} does not match the toy world "
                             f"(differs in: {', '.join(differ)}); {REGENERATE}")
        cases.append(case)
    return cases


# ----------------------------------------------------------------------------------- metrics


@torch.no_grad()
def structure_distance(perception: metrics.ToyPerception, a: torch.Tensor,
                       b: torch.Tensor) -> torch.Tensor:
    """PIE-Bench's structure distance, [B]: there the MSE between the self-similarity matrices of
    DINO ViT tokens; here of the toy CLIP ViT's last-layer patch tokens f_1 ... f_P:
    ``S_ij = cos(f_i, f_j)``, ``d = mean_ij (S_ij(a) - S_ij(b))^2``."""
    def self_similarity(images):
        tokens = perception.clip.vision_model(pixel_values=images.to(perception.device),
                                              output_hidden_states=True)
        patches = F.normalize(tokens.hidden_states[-1][:, 1:], dim=-1)  # [B, P, D], no CLS
        return patches @ patches.transpose(1, 2)

    metrics._check_images(a, b)
    return (self_similarity(a) - self_similarity(b)).pow(2).flatten(1).mean(1)


def candidate_captions(case: EditCase) -> list[str]:
    """The target caption first, then the source's and every caption that differs from the
    target only in the edited attribute (add: the added object's shape and colour)."""
    edit_type, j = _edit(case.source, case.target)
    t = case.target
    variants = {"color": [(change_color, t, j, c) for c in OBJECT_COLORS],
                "shape": [(change_shape, t, j, s) for s in SHAPES],
                "size": [(change_size, t, j, s) for s in SIZES],
                "background": [(change_background, t, b, p) for b in BACKGROUND_COLORS
                               for p in PATTERNS],
                "add": [(add_object, case.source, replace(t.objects[-1], shape=s, color=c))
                        for s in SHAPES for c in OBJECT_COLORS],
                "remove": []}[edit_type]
    scenes = [t, case.source]
    for make, *args in variants:
        try:
            scenes.append(make(*args))
        except ValueError:  # e.g. an object coloured like its background
            continue
    return list(dict.fromkeys(caption(scene) for scene in scenes))  # no repeats, target first


def attribute_correct(perception: metrics.ToyPerception, cases: list[EditCase],
                      edited: torch.Tensor) -> torch.Tensor:
    """bool [N]: the edited image's embedding is closest (cosine) to the target caption among
    ``candidate_captions`` (chance: 1 / number of candidates)."""
    candidates = [candidate_captions(case) for case in cases]
    prompts = list(dict.fromkeys(p for group in candidates for p in group))
    index = {prompt: i for i, prompt in enumerate(prompts)}
    scores = perception.image_embeddings(edited) @ perception.text_embeddings(prompts).T
    return torch.tensor([scores[n, [index[p] for p in group]].argmax().item() == 0
                         for n, group in enumerate(candidates)], device=scores.device)


def evaluate(perception: metrics.ToyPerception, cases: list[EditCase],
             edited: torch.Tensor) -> list[dict]:
    """One row per case: every metric of the module docstring, for edited [N, 3, 32, 32] in
    [-1, 1] (the background ones outside the edit mask, against the source image), on the
    device of ``edited`` (the rendered cases are moved there).

    The background metrics are NaN for a case whose edit mask covers the whole image (no
    background to compare; none of the 300 default cases); ``summarize`` skips and counts them.
    ``edited`` is checked once (finite; an image without a negative value warns, see
    ``metrics``); the masked composites made from it are not re-checked, as a white background
    outside the mask legitimately has no negative value."""
    source, target, mask, _, prompts = case_batch(cases)
    if edited.shape != source.shape:
        raise ValueError(f"edited images must be [{len(cases)}, 3, 32, 32], one per case, got "
                         f"{tuple(edited.shape)}")
    metrics._check_images(edited)
    source, target, mask = (x.to(edited.device) for x in (source, target, mask))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageRangeWarning)
        columns = _columns(perception, cases, edited.float(), source, target, mask, prompts)
    return [{"id": case.id, "edit_type": case.edit_type,
             **{name: column[n].item() for name, column in columns.items()}}
            for n, case in enumerate(cases)]


def _columns(perception, cases, edited, source, target, mask, prompts) -> dict:
    """Every metric of ``evaluate`` as a tensor [N]."""
    keep = ~mask
    # PIE-Bench sets the edit region to 0 in both images, so windows (SSIM, ViT patches) that
    # straddle the mask's edge compare only background.
    bg_edited, bg_source = edited * keep[:, None], source * keep[:, None]
    return {
        "structure": structure_distance(perception, source, edited),
        "bg_psnr": metrics.masked_psnr(edited, source, keep),
        "bg_lpips": perception.lpips_like(bg_edited, bg_source),
        "bg_mse": metrics.masked_mse(edited, source, keep),
        "bg_ssim": metrics.ssim(bg_edited, bg_source, keep=keep),
        "clip_t": perception.clip_t(edited, prompts),
        "clip_t_edited": perception.clip_t(edited * mask[:, None], prompts),
        "dino_like": perception.dino_like(source, edited),
        "psnr_target": metrics.psnr(edited, target),
        "attribute_ok": attribute_correct(perception, cases, edited),
    }


def _nanmean(values) -> float:
    """The mean of the values that are not NaN (NaN: a metric over an empty region); NaN if
    none is. With no NaN it is exactly ``np.mean(values)``."""
    values = np.asarray(values, dtype=np.float64)
    valid = values[~np.isnan(values)]
    return float(np.mean(valid)) if valid.size else float("nan")


def summarize(rows: list[dict]) -> dict[str, dict[str, float]]:
    """The mean of every metric per edit type and over "all" cases, with "cases", the count,
    and "skipped", the cases with a NaN metric (an empty background region: see ``evaluate``);
    each mean is over the cases where that metric is not NaN."""
    if not rows:
        raise ValueError("summarize needs at least one row of evaluate")
    groups = {t: [row for row in rows if row["edit_type"] == t] for t in EDIT_TYPES}
    groups = {name: group for name, group in groups.items() if group} | {"all": rows}
    return {name: {"cases": len(group),
                   "skipped": sum(any(math.isnan(row[key]) for key in METRICS) for row in group),
                   **{key: _nanmean([row[key] for row in group]) for key in METRICS}}
            for name, group in groups.items()}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Check the ToyBench manifest, or regenerate it.")
    parser.add_argument("--write", action="store_true", help="regenerate it with make_cases()")
    if parser.parse_args(argv).write:
        write_manifest(make_cases(PER_TYPE, SEED), DEFAULT_PATH, seed=SEED, per_type=PER_TYPE)
    counts = Counter(case.edit_type for case in load_toybench())
    print(f"{DEFAULT_PATH}: {sum(counts.values())} cases, every hash verified; "
          + ", ".join(f"{t} {counts[t]}" for t in EDIT_TYPES))


if __name__ == "__main__":
    main()
