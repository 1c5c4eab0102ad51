"""ToyBench: deterministic cases with exact ground truth, the committed manifest and its checks,
and the PIE-Bench-style metrics, proven on the exact targets and on unedited sources."""

import json
import math
from collections import Counter

import pytest
import torch

from icd_lite.experiments import toybench
from icd_lite.metrics import ToyPerception
from icd_lite.world.loading import load_clip
from icd_lite.world.scenes import (EDIT_TYPES, Scene, SceneObject, add_object, caption,
                                   change_background, change_color, change_shape, remove_object)
from icd_lite.world.text import build_tokenizer


@pytest.fixture(scope="module")
def cases():
    return toybench.make_cases()


@pytest.fixture(scope="module")
def perception():
    tokenizer = build_tokenizer()
    return ToyPerception(load_clip(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def subset(cases):
    return toybench.stratified_subset(cases, 10)


def red_circle_on_gray():
    return Scene("gray", "plain", (SceneObject("circle", "red", "small", 9, 9),))


# ------------------------------------------------------------------------------------- cases


def test_make_cases_is_deterministic_and_covers_every_type(cases):
    assert len(cases) == 300
    assert Counter(case.edit_type for case in cases) == {t: 50 for t in EDIT_TYPES}
    assert [case.id for case in cases[:2]] == ["color-000", "color-001"]
    assert [case.id for case in cases] == [f"{t}-{i:03d}" for t in EDIT_TYPES for i in range(50)]
    assert toybench.make_cases() == cases
    other = toybench.make_cases(per_type=50, seed=1)
    assert all(a.source != b.source for a, b in zip(cases, other))
    assert len({case.source for case in cases}) == 300  # every source drawn on its own
    assert toybench.stratified_subset(cases, 3) == toybench.make_cases(per_type=3)
    with pytest.raises(ValueError, match="positive integer"):
        toybench.make_cases(per_type=0)


def test_stratified_subset_and_case_batch(cases):
    shuffled = cases[::-1]
    subset = toybench.stratified_subset(shuffled, 2)
    assert [case.id for case in subset[:2]] == ["remove-049", "remove-048"]
    assert Counter(case.edit_type for case in subset) == {t: 2 for t in EDIT_TYPES}
    source, target, mask, source_prompts, target_prompts = toybench.case_batch(subset)
    assert source.shape == target.shape == (12, 3, 32, 32) and source.dtype == torch.float32
    assert mask.shape == (12, 32, 32) and mask.dtype == torch.bool
    assert target_prompts == [case.target_prompt for case in subset]
    assert source_prompts[0] == subset[0].source_prompt
    with pytest.raises(ValueError, match="at least one case"):
        toybench.case_batch([])


def test_targets_change_exactly_inside_the_mask(cases):
    for case in cases:
        changed = (case.target_image != case.source_image).any(0)
        assert not changed[~case.mask].any(), case.id
        assert changed[case.mask].any(), case.id
        assert case.source_image.min() >= -1 and case.source_image.max() <= 1


def test_prompts_and_blend_words(cases):
    arity = {"color": (1, 1), "shape": (1, 1), "size": (1, 1), "background": (0, 0),
             "add": (0, 1), "remove": (1, 0)}
    for case in cases:
        assert case.source_prompt == caption(case.source)
        assert case.target_prompt == caption(case.target)
        assert (len(case.source_blend), len(case.target_blend)) == arity[case.edit_type], case.id
        assert set(case.source_blend) <= set(case.source_prompt.split())
        assert set(case.target_blend) <= set(case.target_prompt.split())
        if case.edit_type == "shape":
            assert case.source_blend != case.target_blend


def test_changed_words_are_the_new_words_of_the_target(cases):
    for case in cases:
        source, target = case.source_prompt.split(), case.target_prompt.split()
        new = Counter(target) - Counter(source)  # words the target has more of
        assert not new - Counter(case.changed_words), case.id
        assert not Counter(case.changed_words) - Counter(target), case.id
        assert bool(case.changed_words) == (case.edit_type != "remove"), case.id


def test_make_case_on_hand_made_edits():
    source = red_circle_on_gray()
    case = toybench.make_case("x", source, change_color(source, 0, "blue"))
    assert (case.edit_type, case.changed_words) == ("color", ("blue",))
    assert (case.source_blend, case.target_blend) == (("circle",), ("circle",))
    case = toybench.make_case("x", source, change_background(source, "black", "striped"))
    assert (case.edit_type, case.changed_words) == ("background", ("striped", "black"))
    assert (case.source_blend, case.target_blend) == ((), ())
    two = add_object(source, SceneObject("square", "green", "small", 25, 25))
    case = toybench.make_case("x", source, two)
    assert case.changed_words == ("and", "a", "small", "green", "square")
    assert (case.edit_type, case.target_blend) == ("add", ("square",))
    case = toybench.make_case("x", two, remove_object(two, 0))
    assert (case.edit_type, case.source_blend, case.changed_words) == ("remove", ("circle",), ())
    moved = Scene("gray", "plain", (SceneObject("circle", "red", "small", 20, 10),))
    with pytest.raises(ValueError, match="not a single edit"):
        toybench.make_case("x", source, moved)
    with pytest.raises(ValueError, match="not a single edit"):
        toybench.make_case("x", source, change_shape(change_color(source, 0, "blue"), 0, "square"))


def test_candidate_captions_vary_only_the_edited_attribute(cases):
    source = red_circle_on_gray()
    case = toybench.make_case("x", source, change_color(source, 0, "blue"))
    assert toybench.candidate_captions(case) == [
        f"a small {c} circle on a gray background" for c in ("blue", "red", "green", "yellow",
                                                              "purple")]
    for case in toybench.stratified_subset(cases, 5):
        candidates = toybench.candidate_captions(case)
        assert candidates[0] == case.target_prompt and case.source_prompt in candidates
        assert len(set(candidates)) == len(candidates) >= 2
        if case.edit_type in ("color", "shape", "size"):
            for other in candidates[1:]:
                differ = [a != b for a, b in zip(other.split(), case.target_prompt.split())]
                assert len(other.split()) == len(case.target_prompt.split()) and sum(differ) == 1


# ---------------------------------------------------------------------------------- manifest


def test_committed_manifest_matches_the_generator(cases):
    data = json.loads(toybench.DEFAULT_PATH.read_text())
    assert (data["seed"], data["per_type"]) == (toybench.SEED, toybench.PER_TYPE)
    assert set(data["cases"][0]["sha256"]) == {"source", "target", "mask"}
    assert toybench.load_toybench() == cases


def test_manifest_round_trip(cases, tmp_path):
    scene = cases[-1].source  # a remove case: two objects
    assert toybench.scene_from_dict(json.loads(json.dumps(toybench.scene_to_dict(scene)))) == scene
    path = tmp_path / "bench.json"
    toybench.write_manifest(cases[::37], path, seed=None, per_type=None)
    assert toybench.load_toybench(path) == cases[::37]


@pytest.mark.parametrize("corrupt, message", [
    (lambda entry: [scene["objects"][0].update(x=scene["objects"][0]["x"] + 1)
                    for scene in (entry["source"], entry["target"])], "differs in: sha256"),
    (lambda entry: entry["source"]["objects"][0].update(x=99.0), "not a valid edit"),
    (lambda entry: entry.update(target_prompt="a small red circle on a gray background"),
     "differs in: target_prompt"),
    (lambda entry: entry["sha256"].update(mask="0" * 64), "differs in: sha256"),
])
def test_corrupted_manifest_raises_a_clear_error(cases, tmp_path, corrupt, message):
    path = tmp_path / "bench.json"
    toybench.write_manifest(cases[:3], path, seed=None, per_type=None)
    data = json.loads(path.read_text())
    corrupt(data["cases"][1])
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match=message) as error:
        toybench.load_toybench(path)
    assert "color-001" in str(error.value)
    assert "python -m icd_lite.experiments.toybench --write" in str(error.value)


def test_missing_manifest_says_how_to_regenerate(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m icd_lite.experiments.toybench --write"):
        toybench.load_toybench(tmp_path / "absent.json")


# ----------------------------------------------------------------------------------- metrics


def test_structure_distance(perception, subset):
    source, target, *_ = toybench.case_batch(subset[:4])
    assert torch.equal(toybench.structure_distance(perception, source, source), torch.zeros(4))
    distance = toybench.structure_distance(perception, source, target)
    assert distance.shape == (4,) and (distance > 0).all()
    torch.testing.assert_close(distance, toybench.structure_distance(perception, target, source))
    flipped = toybench.structure_distance(perception, source, source.flip(-1))
    assert (flipped > 0).all()


def test_metrics_on_exact_targets(perception, subset):
    _, target, *_ = toybench.case_batch(subset)
    rows = toybench.evaluate(perception, subset, target)
    assert [row["id"] for row in rows] == [case.id for case in subset]
    assert set(rows[0]) == {"id", "edit_type", *toybench.METRICS}
    summary = toybench.summarize(rows)
    for name, means in summary.items():
        assert means["bg_psnr"] == pytest.approx(100.0)  # MSE 0, clamped at 1e-10
        assert means["psnr_target"] == pytest.approx(100.0)
        assert means["bg_mse"] == 0 and means["bg_ssim"] == pytest.approx(1.0, abs=1e-5)
        assert means["bg_lpips"] == pytest.approx(0.0, abs=1e-6)
        assert means["structure"] > 0  # the edit changed something
        # measured on these 10 per type: 1.0, but add 0.7 (0.9 on all 50 add cases: the small
        # second object is the hardest read). Chance: 1/2 for size, 1/21 for add (the source and
        # 20 shape-colour variants), 1/5 or less for the others.
        assert means["attribute_ok"] >= (0.6 if name == "add" else 0.9), name
    assert summary["all"]["attribute_ok"] >= 0.9


def test_metrics_on_unedited_sources(perception, subset):
    source, target, *_ = toybench.case_batch(subset)
    summary = toybench.summarize(toybench.evaluate(perception, subset, source))
    exact = toybench.summarize(toybench.evaluate(perception, subset, target))
    for edit_type in ("color", "shape", "background"):
        assert summary[edit_type]["attribute_ok"] <= 0.1, edit_type
    assert summary["all"]["attribute_ok"] <= 0.1
    assert summary["all"]["structure"] == 0 and summary["all"]["bg_psnr"] == pytest.approx(100.0)
    assert all(math.isfinite(means["psnr_target"]) and means["psnr_target"] < 40
               for means in summary.values())
    assert summary["all"]["clip_t"] < exact["all"]["clip_t"] - 0.2
    assert summary["all"]["clip_t_edited"] < exact["all"]["clip_t_edited"]


def test_background_metrics_see_only_the_background(perception, subset):
    source, target, mask, *_ = toybench.case_batch(subset)
    inside = mask[:, None].float()
    noise = 0.5 * torch.randn(target.shape)
    edit_damaged = (target + noise * inside).clamp(-1, 1)
    background_damaged = (target + noise * (1 - inside)).clamp(-1, 1)
    rows = toybench.summarize(toybench.evaluate(perception, subset, edit_damaged))["all"]
    assert rows["bg_psnr"] == pytest.approx(100.0) and rows["bg_mse"] == 0
    assert rows["bg_lpips"] == pytest.approx(0.0, abs=1e-6) and rows["psnr_target"] < 40
    rows = toybench.summarize(toybench.evaluate(perception, subset, background_damaged))["all"]
    assert rows["bg_psnr"] < 25 and rows["bg_mse"] > 1e-3
    assert rows["bg_ssim"] < 0.9 and rows["bg_lpips"] > 0.01
    with pytest.raises(ValueError, match="one per case"):
        toybench.evaluate(perception, subset, target[:-1])


def test_summarize_means_per_type_and_all():
    row = dict.fromkeys(toybench.METRICS, 0.0)
    rows = [{**row, "edit_type": "color", "bg_psnr": 10.0, "attribute_ok": True},
            {**row, "edit_type": "color", "bg_psnr": 20.0, "attribute_ok": False},
            {**row, "edit_type": "add", "bg_psnr": 30.0, "attribute_ok": True}]
    summary = toybench.summarize(rows)
    assert list(summary) == ["color", "add", "all"]
    assert [summary[k]["cases"] for k in summary] == [2, 1, 3]
    assert summary["color"]["bg_psnr"] == 15.0 and summary["all"]["bg_psnr"] == 20.0
    assert summary["color"]["attribute_ok"] == 0.5
    assert summary["all"]["attribute_ok"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="at least one row"):
        toybench.summarize([])


# ------------------------------------------------------- notebook 05's editing helpers


def test_wilson_interval_stays_in_the_unit_interval_and_is_not_empty_at_the_ends():
    from icd_lite.experiments.editing_evaluation import wilson_interval

    low, high = wilson_interval(0, 1)
    assert low == 0.0 and 0.7 < high < 0.8           # one failure: anything up to ~0.79
    low, high = wilson_interval(8, 8)
    assert 0.6 < low < 0.7 and high == 1.0
    low, high = wilson_interval(50, 100)
    assert low == pytest.approx(1 - high) and 0.39 < low < 0.41
    assert all(math.isnan(v) for v in wilson_interval(0, 0))


def test_mean_interval_brackets_the_mean_and_skips_nan():
    from icd_lite.experiments.editing_evaluation import mean_interval

    mean, low, high = mean_interval([1.0, 2.0, 3.0, float("nan")])
    assert mean == 2.0 and 1.0 <= low < mean < high <= 3.0
    assert mean_interval([1.0, 2.0, 3.0]) == (mean, low, high)   # seeded
    assert math.isnan(mean_interval([5.0])[1])


def test_matched_p2p_controls_the_same_steps_with_three_and_four_steps():
    from icd_lite.attention import controlled_steps
    from icd_lite.experiments.editing_evaluation import matched_p2p

    p2p = matched_p2p()
    for fraction, steps in ((p2p.cross_fraction, 1), (p2p.self_fraction, 2)):
        assert controlled_steps(fraction, 3) == controlled_steps(fraction, 4) == steps
    # the default cross fraction 0.3 is the confound: 1 of 4 steps, none of 3
    with pytest.raises(ValueError, match="0 of 3 steps but 1 of 4"):
        matched_p2p(cross_fraction=0.3)


def test_trace_icd_edit_is_icd_edit_with_its_states_kept():
    from icd_lite import editing, load_components, load_pipeline
    from icd_lite.experiments import editing_evaluation as ee

    components = load_components("toy")
    pipe = load_pipeline("G", components)
    case = toybench.stratified_subset(toybench.load_toybench(), 1)[0]      # a colour edit
    image, blend = case.source_image[None], ee.blend_words([case])
    trace = ee.trace_icd_edit(pipe, image, case.source_prompt, case.target_prompt,
                              blend_words=blend)
    edit = editing.icd_edit(pipe, image, case.source_prompt, case.target_prompt, blend_words=blend)
    assert torch.equal(trace.edit.images, edit.images)
    assert torch.equal(trace.edit.reconstructions, edit.reconstructions)
    assert len(trace.encoding) == len(trace.decoding) == 4 and trace.edit.nfe == edit.nfe == 8
    first = trace.decoding[0]
    assert first["cross"] and first["self"] and not trace.decoding[-1]["cross"]
    assert first["x0_hat"].shape == (2, 4, 8, 8) and first["maps"].shape[:2] == (2, 20)
    mask = first["mask"]
    assert mask.shape == (1, 1, 8, 8) and set(mask.unique().tolist()) <= {0.0, 1.0}
    # replace + reweight at step 1: the changed word's map is the source word's times amplify
    (src_tokens, tgt_tokens), amplify = trace.tokens, editing.P2PSettings().amplify
    j = next(i for i, (a, b) in enumerate(zip(src_tokens, tgt_tokens)) if a[0] != b[0])
    assert torch.allclose(first["maps"][1, tgt_tokens[j][1]],
                          amplify * first["maps"][0, src_tokens[j][1]])
