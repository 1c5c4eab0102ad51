"""``python -m icd_lite.bench pie`` offline: the tiny fabricated SD1.5 (icd_lite.sd15.fabricate),
the fabricated PIE-Bench folder (tests/pie_fixture.py) and metric suites of tiny models: every
editor runs with iCD's benchmark settings, the per-image CSVs and both tables are written, a
rerun resumes without editing again; the command line's argument errors are one line each."""

import json

import pandas as pd
import pytest
import torch

pytest.importorskip("torchmetrics", reason="the [metrics] extra: pip install -e '.[metrics]'")

from icd_lite import bench
from icd_lite.experiments import pie_bench as P
from icd_lite.experiments import pie_run
from icd_lite.sd15 import fabricate_model, fabricated_sources, load_sd15_pipeline
from icd_lite.sd15 import metrics as M
from pie_fixture import (inject_lpips_backbone, tiny_clip, tiny_dino_vit, tiny_dinov2,
                         write_pie_folder)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pie_root(tmp_path_factory):
    """The fixture folder, with a PIE-Bench blended_word ("source target") on the cat -> dog
    edit."""
    root = write_pie_folder(tmp_path_factory.mktemp("pie"))
    mapping = json.loads((root / "mapping_file.json").read_text())
    mapping["000000000001"]["blended_word"] = "cat dog"
    (root / "mapping_file.json").write_text(json.dumps(mapping))
    return root


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = fabricate_model(tmp_path_factory.mktemp("sd15") / "tiny", "tiny",
                             releases=["4step-v1"])
    return load_sd15_pipeline(**fabricated_sources(folder), device="cpu")


class FakeScorer:
    """ImageReward stand-in: the prompt's length."""

    def score(self, prompt, pictures):
        return float(len(prompt))


def tiny_suites(monkeypatch):
    inject_lpips_backbone(monkeypatch)
    return (P.PnPSuite(M.ClipScore(*tiny_clip(), convention="torchmetrics"),
                       M.DinoStructureDistance(tiny_dino_vit()), M.LPIPS.pnp()),
            P.ICDSuite(M.ClipScore(*tiny_clip()), M.DinoV2Similarity(*tiny_dinov2()),
                       M.ImageReward(FakeScorer())))


def test_words_follow_icds_rules(pie_root, pipe):
    items = {item.id: item for item in P.load_pie_bench(pie_root)}
    tokenizer = pipe.base.tokenizer
    assert pie_run.amplify_words(items["000000000000"], tokenizer) == ("rusty",)
    assert pie_run.amplify_words(items["914000000002"], tokenizer) == ("watercolor", "painting")
    assert pie_run.blend_words(items["000000000001"], tokenizer) == (("cat",), ("dog",))
    assert pie_run.blend_words(items["000000000000"], tokenizer) is None  # no blended_word
    # "with" is new too, but a stopword
    assert pie_run.amplify_words(items["224000000003"], tokenizer) == ("flowers",)


def test_every_editor_runs_writes_both_tables_and_a_rerun_resumes(pie_root, pipe, tmp_path,
                                                                  monkeypatch):
    items = pie_run.load_items(pie_root, "all", limit=2)
    assert [i.id for i in items] == ["000000000000", "000000000001"]
    calls = []  # (editor, the settings it received)
    real_icd, real_baseline = pie_run.icd_edit, pie_run.baseline_edit
    monkeypatch.setattr(pie_run, "icd_edit", lambda *a, **k: (
        calls.append(("icd", a[4:8], k)), real_icd(*a, **k))[1])
    monkeypatch.setattr(pie_run, "baseline_edit", lambda *a, **k: (
        calls.append((a[4], a[5:8], k)), real_baseline(*a, **k))[1])
    editors = pie_run.make_editors(pipe, baseline_steps=3, nti_inner_steps=1)
    assert list(editors) == ["icd", "ddim", "npi", "nti"]
    out = tmp_path / "run"
    with pytest.warns(UserWarning, match="resized to 128x128"):  # the tiny VAE's size
        tables = pie_run.run_pie(items, editors, tiny_suites(monkeypatch), out)
    # the benchmark settings reached the editors (w classical: iCD's 19 in the code unit)
    icd = next(c for c in calls if c[0] == "icd")
    assert icd[1][:2] == (20.0, 0.8) and icd[1][2] == pie_run.SETTINGS["icd"].p2p
    assert icd[2]["seed"] == 30
    assert {(c[0], c[1][0], c[1][2].cross_fraction, c[1][2].amplify) for c in calls
            if c[0] != "icd"} == {("ddim", 8.0, 0.4, 3.0), ("npi", 8.0, 0.2, 3.0),
                                  ("nti", 8.0, 0.4, 3.0)}
    assert [c[2]["blend_words"] for c in calls if c[0] == "npi"] == [[None], [(("cat",),
                                                                              ("dog",))]]
    assert len(calls) == 4 * len(items)
    # the files: 512 x 512 edits, per-image CSVs, both tables
    for name in pie_run.EDITORS:
        for item in items:
            path = (out / "edits" / name / item.relative_path).with_suffix(".png")
            assert P.load_image(path).shape == (3, 512, 512)
    labels = [pie_run.SETTINGS[name].label for name in pie_run.EDITORS]
    for suite, columns in (("pnp", P.PnPSuite.COLUMNS), ("icd", P.ICDSuite.COLUMNS)):
        per_image = pd.read_csv(out / f"{suite}_per_image.csv")
        assert len(per_image) == 4 * len(items) and set(columns) <= set(per_image.columns)
        assert list(per_image.method.unique()) == labels
        assert list(tables[suite].index) == labels
        assert (out / f"{suite}_table.csv").is_file() and (out / f"{suite}_by_edit_type.csv"
                                                           ).is_file()
        assert labels[0] in (out / f"{suite}_table.txt").read_text()
    assert "CLIP Similarity" in (out / "pnp_table.txt").read_text()
    assert "DINOv2" in (out / "icd_table.txt").read_text()
    assert not pd.read_csv(out / "pnp_per_image.csv").lpips_unedit_part.isna().any()
    record = json.loads((out / "run.json").read_text())
    assert record["editors"]["icd"]["nfe"] == 8 and record["editors"]["icd"]["edited_now"] == 2
    # a rerun edits nothing and scores again
    calls.clear()
    pie_run.run_pie(items, editors, lambda: tiny_suites(monkeypatch), out)
    assert calls == []
    record = json.loads((out / "run.json").read_text())
    assert {e["edited_now"] for e in record["editors"].values()} == {0}


@pytest.mark.parametrize("options, message", [
    (["--editors", "icd,foo"], "unknown editor 'foo'"),
    (["--limit", "0"], "--limit must be at least 1"),
    (["--preset", "toy"], "invalid choice: 'toy'"),
    (["--subset", "icd500"], "invalid choice: 'icd500'"),
    (["--cond-proj", "x", "--teacher", "y"], "drop --teacher"),
    (["--device", "tpu"], "device"),
])
def test_command_line_errors_are_one_line(pie_root, options, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        bench.main(["pie", "--data", str(pie_root), *options])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_command_line_refuses_missing_metric_packages_before_editing(pie_root, capsys):
    import importlib.util

    for options, package, message in (
            (["--image-reward", "--no-lpips"], "ImageReward", "needs the image-reward package"),
            ([], "torchvision", "pass --no-lpips")):
        if importlib.util.find_spec(package) is not None:
            continue  # installed here: nothing to refuse
        with pytest.raises(SystemExit):
            bench.main(["pie", "--data", str(pie_root), *options])
        assert message in capsys.readouterr().err


def test_command_line_names_a_folder_without_pie_bench(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bench.main(["pie", "--data", str(tmp_path)])
    assert "no mapping_file.json" in capsys.readouterr().err


def test_command_line_sources(tmp_path):
    """--model is a fabricated folder; --cond-proj drops its distilled teacher and, with
    --release none, lets the loader read the rank."""
    args = bench.pie_parser().parse_args(["--data", "d", "--model", str(tmp_path),
                                          "--release", "none", "--cond-proj", "out"])
    sources = bench.pie_sources(args)
    assert "teacher" not in sources and sources["cond_proj"] == "out"
    assert sources["release"] is None and sources["rank"] is None
    assert sources["base"] == tmp_path and sources["lora_alpha"] == 8.0
    default = bench.pie_sources(bench.pie_parser().parse_args(["--data", "d"]))
    assert default == {"release": "4step-v1", "lora_alpha": 8.0}
