"""Notebook 06's trained ablations: the run table, continuing a shipped pair, LoRA adapters that
ship and load back, the budget rule, and follow-ups in the report (toy teacher, a step or two)."""

import csv
from dataclasses import asdict, fields

import numpy as np
import pytest
import torch

from icd_lite import distill
from icd_lite.experiments import ablation_training as trained
from icd_lite.experiments import report
from icd_lite.experiments.claims import COLUMNS, save_followups
from icd_lite.schedule import Boundaries
from icd_lite.world import checkpoints
from icd_lite.world.scenes import make_dataset


# ----------------------------------------------------------------------------- the run table

def test_each_sweep_changes_one_setting_of_the_reference():
    reference = asdict(trained.RUNS[trained.REFERENCE].recipe)
    assert reference == asdict(distill.RECIPES["G"]) | {"about": reference["about"]}
    changed = {}
    for name, run in trained.RUNS.items():
        if run.sweep == "budget":
            assert run.continue_from == name.split("/")[1] and run.steps > trained.SHIPPED_STEPS
            assert run.recipe == distill.RECIPES[run.continue_from] and run.lora_rank is None
            continue
        assert (run.lora_rank, run.lr, run.steps) == (8, 1e-3, 200)   # every sweep trained alike
        diff = {f.name for f in fields(run.recipe) if f.name != "about"
                and getattr(run.recipe, f.name) != reference[f.name]}
        changed[name] = diff
    assert changed == {"sweep/lambda_0": {"lambda_f", "lambda_r"},
                       "sweep/lambda_0.5": {"lambda_f", "lambda_r"},
                       "sweep/lambda_1.5": set(),
                       "sweep/lambda_3": {"lambda_f", "lambda_r"},
                       "sweep/w_1": {"w_code_choices"}, "sweep/w_wide": {"w_code_choices"},
                       "sweep/v2": {"forward_boundaries"}}
    assert trained.RUNS["sweep/w_1"].recipe.w_code_choices == (0.0,)
    assert sorted(trained.LANES[0] + trained.LANES[1]) == sorted(trained.RUNS)


def test_recipe_boundaries_of_the_released_v2_pair():
    v2 = trained.RUNS["sweep/v2"].recipe
    assert v2.boundaries == Boundaries(reverse=(0, 249, 499, 699), forward=(249, 499, 699, 999))
    assert distill.RECIPES["G"].boundaries.forward == (259, 519, 779, 999)
    with pytest.raises(ValueError, match="must hold m = 3 endpoints"):
        distill.Recipe(3, forward_boundaries=(249, 499, 699, 999)).boundaries


def test_unknown_run_and_curve_only_runs():
    with pytest.raises(ValueError, match="unknown ablation run 'sweep/x'"):
        trained.get_run("sweep/x")
    with pytest.raises(ValueError, match="ships its curve only"):
        trained.load_ablation("budget/A", components=None)


# ----------------------------------------------------------------------------- training

def test_continuing_a_pair_starts_from_its_weights_and_step(components, data):
    """``init_pair`` loads the given UNets and the first curve row is the given step, measured
    on those weights."""
    shipped_forward, shipped_reverse = distill.build_students(components.unet)
    with torch.no_grad():
        shipped_reverse.unet.conv_out.bias.add_(0.5)   # a pair that differs from the teacher

    def curve(forward, reverse, boundaries):
        return {"bias": reverse.unet.conv_out.bias.sum().item()}

    forward, reverse, history = distill.distill(
        components, distill.RECIPES["C"], data, steps=401, batch=2, curve=curve, eval_every=1,
        init_pair=(shipped_forward.unet, shipped_reverse.unet), first_step=400)
    first = history[0]
    assert first["step"] == 400
    assert first["bias"] == pytest.approx(shipped_reverse.unet.conv_out.bias.sum().item())
    assert [row["step"] for row in history if "bias" in row] == [400, 401]


def test_lora_adapters_ship_and_load_back(components, data, tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(checkpoints, "MANIFEST", tmp_path / "manifest.json")
    run = trained.RUNS["sweep/v2"]
    forward, reverse, history = distill.distill(components, run.recipe, data, steps=1, batch=2,
                                                lr=run.lr, lora_rank=run.lora_rank)
    with torch.no_grad():   # move the adapters off their zero start so a lost B matrix shows
        for name, parameter in reverse.unet.named_parameters():
            if "lora_B" in name:
                parameter.normal_(0, 0.05)
    curve = [{"step": 1, "seconds": 1.0, "psnr_w1": 20.0}]
    trained._ship(run, components, forward, reverse, history + curve, "test", minutes=0.0)
    assert sorted(p.name for p in (tmp_path / "ablations" / "sweep" / "v2").iterdir()) == [
        "curve.json", "forward_lora.safetensors", "reverse_lora.safetensors", "run.json"]
    pipe = trained.load_ablation("sweep/v2", components)
    assert pipe.boundaries == run.recipe.boundaries
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([300]), data.embeddings[1:2]
    with torch.no_grad():
        for parameter in trained.trainable_parameters(reverse):   # adapters ship as float16,
            parameter.copy_(parameter.half().float())                # the teacher's base does not
        expected = reverse(x, t, t, cond, torch.tensor([7.0]))
        got = pipe.reverse_student(x, t, t, cond, torch.tensor([7.0]))
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)
    assert trained.load_curve("sweep/v2") == curve
    assert trained.is_trained("sweep/v2") is False   # run.json records 1 step, the run has 200
    path = tmp_path / "ablations" / "sweep" / "v2" / "reverse_lora.safetensors"
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(checkpoints.CheckpointError, match="sha256 does not match"):
        trained.load_ablation("sweep/v2", components)


def test_round_trip_of_a_pair_with_itself_is_its_reconstruction(components):
    from icd_lite.pipeline import load_pipeline

    pipe = load_pipeline("C", components)
    images, captions, _ = make_dataset(4, seed=3)
    psnr = trained.round_trip_psnr(pipe, pipe, images, captions)
    expected = trained.metrics.psnr(pipe.reconstruct(images, captions, w=1.0).images, images)
    torch.testing.assert_close(psnr, expected)


# ----------------------------------------------------------------------------- the budget rule

def test_trend_directions():
    steps = [400, 600, 800, 1000, 1200]
    rising = trained.trend(steps, [-2.0, -1.0, 0.0, 0.2, 0.1])
    assert rising["direction"] == trained.TOWARD and rising["early"] == -2.0
    assert rising["late"] == pytest.approx(0.1)
    jitter = np.std([1.0, 1.0, 0.2, -0.1], ddof=1) / np.sqrt(2)
    assert rising["jitter"] == pytest.approx(jitter)
    assert rising["threshold"] == pytest.approx(2 * jitter * np.sqrt(1 + 1 / 3))
    assert trained.trend(steps, [2.0, 1.0, 0.0, -0.2, -0.1])["direction"] == trained.AWAY
    assert trained.trend(steps, [0.0, 1.0, -1.0, 1.0, -1.0])["direction"] == trained.FLAT
    with pytest.raises(ValueError, match="needs a probe at 400"):
        trained.trend([0, 100, 200], [1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="3 in all"):
        trained.trend([400, 800], [1.0, 2.0])


# ----------------------------------------------------------------------------- follow-ups

def _claims_file(folder, claim, verdict="disagrees", why=""):
    with open(folder / "04_claims.csv", "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerow({"group": "inversion", "source": "Table 2", "claim": claim, "paper": "",
                         "toy": "", "rule": "", "verdict": verdict, "figure": "", "why": why})


def test_a_followup_explains_a_disagreement_in_the_report(tmp_path):
    _claims_file(tmp_path, "More boundaries help (A < B < C)")
    assert "| unexplained |" in report.render(tmp_path)
    save_followups([{"notebook": "04", "claim": "More boundaries help (A < B < C)",
                     "direction": trained.AWAY, "explanation": "budget: moves away",
                     "figure": "06_budget"}], "06_followups", tmp_path)
    text = report.render(tmp_path)
    assert "budget: moves away (06 [06_budget](../figures/06_budget.png))" in text
    assert "unexplained" not in text


def test_a_followup_of_an_unknown_claim_is_refused(tmp_path):
    _claims_file(tmp_path, "More boundaries help (A < B < C)")
    save_followups([{"notebook": "04", "claim": "a renamed claim", "direction": "",
                     "explanation": "", "figure": ""}], "06_followups", tmp_path)
    with pytest.raises(ValueError, match="no claim 'a renamed claim' in notebook 04"):
        report.render(tmp_path)
    with pytest.raises(ValueError, match="lacks"):
        save_followups([{"notebook": "04", "claim": "x"}], "06_followups", tmp_path)
