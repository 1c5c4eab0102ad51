"""The ablation harness of notebook 06: what a decoder sees of a guidance schedule, the
control levels that match 3 and 4 steps, the paired verdict rules, and one tiny sweep of each
kind on the shipped pairs."""

import math
from types import SimpleNamespace

import pytest
import torch

from icd_lite.attention import controlled_steps
from icd_lite.editing import P2PSettings
from icd_lite.experiments import ablations, toybench
from icd_lite.guidance import constant_guidance, interval_guidance, ramp_guidance, step_guidance
from icd_lite.schedule import Boundaries

G = SimpleNamespace(boundaries=Boundaries((0, 259, 519, 779), (259, 519, 779, 999)))  # 4 steps
G3 = SimpleNamespace(boundaries=Boundaries((0, 339, 679), (339, 679, 999)))          # 3 steps


def test_schedule_grid_holds_both_ends_and_every_form():
    grid = ablations.schedule_grid(7.0, [0.0, 0.5, 0.8, 1.0])
    forms = [row["form"] for row in grid]
    assert forms[:2] == ["unguided", "constant"]
    assert forms.count("step") == 4 and forms.count("ramp") == 6 and forms.count("interval") == 6
    assert all(row["tau1"] == row["tau2"] for row in grid if row["form"] == "step")
    assert all(row["tau1"] < row["tau2"] for row in grid if row["form"] in ("ramp", "interval"))


def test_a_schedule_is_its_values_at_the_decoding_steps():
    # CD4 evaluates w at t = 999, 779, 519, 259 (u = t / 1000)
    assert ablations.w_at_steps(step_guidance(7.0, 0.8), G) == (0.0, 7.0, 7.0, 7.0)
    assert ablations.w_at_steps(step_guidance(7.0, 0.7), G) == (0.0, 0.0, 7.0, 7.0)
    assert ablations.w_at_steps(step_guidance(7.0, 0.6), G) == ablations.w_at_steps(
        step_guidance(7.0, 0.7), G)                                 # no step between 0.6 and 0.7
    assert ablations.w_at_steps(interval_guidance(7.0, 0.3, 1.0), G) == (7.0, 7.0, 7.0, 0.0)
    assert ablations.w_at_steps(constant_guidance(7.0), G) == ablations.w_at_steps(
        step_guidance(7.0, 1.0), G)
    ramp = ablations.w_at_steps(ramp_guidance(7.0, 0.5, 1.0), G)    # 7 (1 - u) / 0.5 between
    assert ramp == pytest.approx((7 * 0.002, 7 * 0.442, 7 * 0.962, 7.0))


def test_trajectory_share_and_fraction_for():
    assert [round(ablations.trajectory_share(G, k), 3) for k in range(5)] == [
        0.0, 0.22, 0.48, 0.741, 1.0]
    assert [round(ablations.trajectory_share(G3, k), 3) for k in range(4)] == [0.0, 0.32, 0.661, 1.0]
    for n in range(1, 9):
        for k in range(n + 1):
            assert controlled_steps(ablations.fraction_for(k, n), n) == k
    with pytest.raises(ValueError, match="between 0 and 4"):
        ablations.trajectory_share(G, 5)


def test_matched_levels_pair_3_and_4_steps_by_share():
    levels = ablations.matched_levels({4: G, 3: G3})
    assert levels == [{3: 0, 4: 0}, {3: 1, 4: 1}, {3: 2, 4: 3}, {3: 3, 4: 4}]
    for level in levels:  # nearly the same share of the trajectory
        shares = [ablations.trajectory_share({4: G, 3: G3}[m], k) for m, k in level.items()]
        assert abs(shares[0] - shares[1]) < 0.11
    pipes = {4: G, 3: G3}
    assert ablations.nearest_level(levels, pipes, 0.3) == 1
    assert ablations.nearest_level(levels, pipes, 0.6) == 2


def test_attention_settings_sweep_one_knob_from_the_reference():
    pipes = {4: G, 3: G3}
    levels = ablations.matched_levels(pipes)
    rows = ablations.attention_settings(pipes, levels, 1, 2, (1.0, 4.0), (None, 0.3))
    for m in (3, 4):
        mine = [r for r in rows if r["m"] == m]
        assert [r["knob"] for r in mine].count("cross") == len(levels)
        reference = next(r for r in mine if r["knob"] == "amplify" and r["value"] == 4.0)
        assert (reference["cross_steps"], reference["self_steps"]) == (levels[1][m], levels[2][m])
        for r in mine:
            if r["knob"] == "self":   # only self-attention moves
                assert r["cross_steps"] == levels[1][m]
        none = next(r for r in mine if r["knob"] == "none")
        assert (none["cross_steps"], none["self_steps"], none["p2p"].amplify, none["blend"]) == (
            0, 0, 1.0, False)
        assert not next(r for r in mine if r["knob"] == "blend" and r["value"] is None)["blend"]
    # the trap: the authors' fractions read as fractions of steps
    given = {r["m"]: r for r in rows if r["knob"] == "fractions as given"}
    assert given[3]["cross_steps"] == 0 and given[4]["cross_steps"] == 1
    # identical edits share a key: the reference appears in several sweeps
    keys = [ablations.setting_key(r) for r in rows]
    assert len(set(keys)) < len(keys)


def test_paired_rules():
    torch.manual_seed(0)
    base = torch.rand(400)
    per = {"a": {"x": base}, "b": {"x": base + 0.05}, "c": {"x": base + 0.001 * torch.randn(400)}}
    rows = {k: {"key": k, "x": float(v["x"].mean())} for k, v in per.items()}
    assert ablations.paired_se(per["a"]["x"], per["b"]["x"]) == pytest.approx(0.0, abs=1e-6)
    assert ablations.clearly_better(rows["b"], rows["a"], per, "x")
    assert not ablations.clearly_better(rows["a"], rows["b"], per, "x")
    assert ablations.not_worse(rows["c"], rows["a"], per, {"x": +1})
    assert not ablations.not_worse(rows["a"], rows["b"], per, {"x": +1})
    assert ablations.dominated_by(rows["a"], list(rows.values()), per, {"x": +1}) == [rows["b"]]
    low, high = ablations.wilson(0.5, 100)
    assert (round(low, 3), round(high, 3)) == (0.404, 0.596)
    assert ablations.wilson(1.0, 10)[1] == 1.0 and ablations.wilson(1.0, 10)[0] < 1.0


@pytest.fixture(scope="module")
def world():
    from icd_lite.components import load_components
    from icd_lite.metrics import ToyPerception
    from icd_lite.pipeline import load_pipelines

    components = load_components("toy", device="cpu")
    pipes = load_pipelines(components, ["G", "G3"])
    return ToyPerception(components.clip, components.tokenizer), {4: pipes["G"], 3: pipes["G3"]}


def test_guidance_sweep_measures_each_distinct_schedule_once(world):
    perception, pipes = world
    bench = ablations.guidance_bench(pipes[4], perception, 4, seed=0)
    assert bench.x_T.shape == bench.noise.shape == (4, *pipes[4].latent_shape)
    grid = ablations.schedule_grid(7.0, [0.0, 0.8])   # step 0 is unguided again
    rows, per_image = ablations.guidance_sweep(pipes[4], perception, bench, grid, progress=False)
    assert len(rows) == len(grid) and len(per_image) == len({r["key"] for r in rows}) < len(grid)
    unguided, step0 = rows[0], next(r for r in rows if r["form"] == "step" and r["tau1"] == 0.0)
    assert step0["w_steps"] == "0/0/0/0" and step0["mse"] == unguided["mse"]
    for row in rows:
        assert 0 <= row["correct"] <= 1 and row["mse"] >= 0 and math.isfinite(row["fd"])
    assert rows[1]["mse"] > unguided["mse"]   # guiding every step costs reconstruction


def test_attention_sweep_edits_each_distinct_setting_once(world):
    perception, pipes = world
    cases = toybench.stratified_subset(toybench.load_toybench(), 1)[:2]
    levels = ablations.matched_levels(pipes)
    settings = [r for r in ablations.attention_settings(pipes, levels, 1, 2, (4.0,), (0.3,),
                                                        P2PSettings())
                if r["knob"] in ("amplify", "blend", "none")]
    rows, per_case = ablations.attention_sweep(pipes, perception, cases, settings, 4.0, 0.8,
                                               progress=False)
    assert len(per_case) == 4  # per step count: the reference (twice) and no control
    for row in rows:
        assert row["cases"] == 2 and 0 <= row["attribute_ok"] <= 1
        assert set(ablations.SCORES) <= set(row)
