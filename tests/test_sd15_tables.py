"""Tables 2 and 4 at SD1.5 scale offline (``icd_lite.experiments.sd15_tables``): the tiny
fabricated SD1.5 folder (4-step and 3-step releases), three COCO-layout images and prompts, and
injected tiny metrics (LPIPS with a fake backbone, DINOv2 / CLIP from configs, a colour-statistics
feature net for FID, a fake ImageReward). Checks the rows, columns, NFE per row and the paper's
columns, that a row equals the pipeline's own call with image i's seed 30 + i, that a rerun
resumes (and a longer one makes only the new items), and the command line's one-line errors."""

import csv

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

pytest.importorskip("torchmetrics", reason="the [metrics] extra: pip install -e '.[metrics]'")

from icd_lite import baselines, bench
from icd_lite.experiments import paper
from icd_lite.experiments import sd15_tables as T
from icd_lite.sd15 import fabricate_model, fabricated_sources, load_sd15_pipeline
from icd_lite.sd15 import metrics as M
from pie_fixture import MeanColourFeatures, inject_lpips_backbone, tiny_clip, tiny_dinov2

torch.set_num_threads(1)
STEPS = 5  # the DDIM rows' steps here (50 passes of the tiny UNet take ~0.1 s each on 1 core)
CAPTIONS = ["a cat on a table", "a red bicycle on the road", "a photo of a mountain"]


@pytest.fixture(scope="module")
def model_folder(tmp_path_factory):
    return fabricate_model(tmp_path_factory.mktemp("sd15") / "tiny", "tiny",
                           releases=["4step-v1", "3step"])


@pytest.fixture(scope="module")
def pipe(model_folder):
    return load_sd15_pipeline(**fabricated_sources(model_folder), device="cpu")


@pytest.fixture(scope="module")
def pipe3(model_folder):
    return load_sd15_pipeline("3step", **fabricated_sources(model_folder), device="cpu",
                              with_base_unet=False)


@pytest.fixture(scope="module")
def coco(tmp_path_factory):
    """COCO's layout: ``val.csv`` (idx, file_name, caption) and ``val/`` with 3 non-square
    JPEGs (smooth noise, so reconstructions are not hopeless)."""
    root = tmp_path_factory.mktemp("coco")
    (root / "val").mkdir()
    rng = np.random.default_rng(0)
    with open(root / "val.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["", "file_name", "caption"])
        for i, caption in enumerate(CAPTIONS):
            pixels = rng.integers(0, 256, (6, 8, 3), dtype=np.uint8)
            Image.fromarray(pixels).resize((160, 120), Image.BILINEAR).save(
                root / "val" / f"COCO_{i}.jpg", quality=95)
            writer.writerow([100 + i, f"COCO_{i}.jpg", caption + " "])
    return root


@pytest.fixture(scope="module")
def fid_reference(tmp_path_factory):
    """Statistics of the 6-feature colour net over a few random pictures, as pytorch-fid
    writes them (mu [6], sigma [6, 6])."""
    torch.manual_seed(1)
    features = MeanColourFeatures()((torch.rand(16, 3, 32, 32) * 255).to(torch.uint8)).double()
    path = tmp_path_factory.mktemp("fid") / "reference.npz"
    np.savez(path, mu=features.mean(0).numpy(), sigma=np.cov(features.numpy(), rowvar=False))
    return path


class FakeScorer:
    """ImageReward stand-in: the prompt's length."""

    def score(self, prompt, pictures):
        return float(len(prompt))


def inversion_metrics(monkeypatch):
    inject_lpips_backbone(monkeypatch)
    return T.InversionMetrics(M.LPIPS("squeeze", resize=224), M.DinoV2Similarity(*tiny_dinov2()))


def generation_metrics():
    return T.GenerationMetrics(M.FID(MeanColourFeatures()), M.ClipScore(*tiny_clip()),
                               M.ImageReward(FakeScorer()))


def picture(path) -> torch.Tensor:
    return T.read_pictures([path])[0].float()


def test_table2_rows_nfe_paper_columns_seeds_and_resume(pipe, coco, tmp_path, monkeypatch):
    paths, captions = T.read_pairs(coco / "val.csv", limit=2)
    assert captions == CAPTIONS[:2]  # stripped
    out = tmp_path / "table2"
    table = T.table2(pipe, paths, captions, inversion_metrics(monkeypatch), out, steps=STEPS,
                     batch_size=2, progress=False)
    assert list(table.index) == ["fDDIM5 / DDIM5, w = 1", "fDDIM5 / DDIM5, w = 8",
                                 "fDDIM5 / DDIM5 + d.CFG .8, w = 8",
                                 "fCD4 / CD4 (4step-v1), w = 1",
                                 "fCD4 / CD4 (4step-v1) + d.CFG .8, w = 8"]
    assert list(table.columns) == ["method", "w", "tau", "nfe", "images", "lpips", "dino",
                                   "psnr", "psnr_ci95", "mse", "seconds_per_image",
                                   "paper_lpips", "paper_dino", "paper_psnr"]
    # counted UNet passes per image: inversion 5 + decoding 5, 10 (CFG), 4 + 5 (t = 999
    # unguided); iCD 4 + 4. The count is what expected_nfe says, which at 50 steps is Table 2's
    assert list(table.nfe) == [10, 15, 14, 8, 8]
    assert list(table.nfe) == [T.expected_nfe(row, 4, STEPS) for row in T.TABLE2_ROWS]
    assert [T.expected_nfe(row, 4) for row in T.TABLE2_ROWS] == [100, 150, 140, 8, 8]
    assert (table.images == 2).all() and table[["lpips", "dino", "psnr", "mse",
                                                "seconds_per_image"]].notna().all().all()
    for (_, row), key in zip(table.iterrows(), [("DDIM50", 1), ("DDIM50", 8),
                                                ("DDIM50 + d.CFG", 8), ("G", 1),
                                                ("G + d.CFG", 8)]):
        assert [row.paper_lpips, row.paper_dino, row.paper_psnr] == [
            paper.TABLE2[key][name] for name in ("lpips", "dino", "psnr")]
    # a row is the pipeline's own call on image i with seed 30 + i, whatever the batch
    image = picture(out / "images" / "real" / "00001.png")[None] / 127.5 - 1
    ours = picture(out / "images" / "icd-4step-v1_w8_dcfg0.8" / "00001.png")
    alone = pipe.reconstruct(image, [captions[1]], w=8.0, tau=0.8, seed=31).images
    assert (ours - ((alone[0] + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 2
    ddim = baselines.ddim_reconstruct(pipe.base, image, [captions[1]], w=8.0,
                                      steps=STEPS).images
    ours = picture(out / "images" / "ddim5_w8" / "00001.png")
    assert (ours - ((ddim[0] + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 2
    assert {"table2.csv", "table2.txt", "table2_per_image.csv", "table2_run.json",
            "inputs.csv", "settings.json"} <= {p.name for p in out.iterdir()}
    assert "paper_psnr" in (out / "table2.txt").read_text()
    # a rerun on 3 images makes only the third, once per method (one encode for its rows),
    # and scores the first two as before
    first = pd.read_csv(out / "table2_per_image.csv")
    made = []
    real_seeded, real_invert = T.encode_seeded, baselines.ddim_invert
    monkeypatch.setattr(T, "encode_seeded", lambda p, z0, *a: (
        made.append(("iCD", len(z0))), real_seeded(p, z0, *a))[1])
    monkeypatch.setattr(baselines, "ddim_invert", lambda m, z0, *a, **k: (
        made.append(("DDIM", len(z0))), real_invert(m, z0, *a, **k))[1])
    paths, captions = T.read_pairs(coco / "val.csv")
    again = T.table2(pipe, paths, captions, inversion_metrics(monkeypatch), out, steps=STEPS,
                     progress=False)
    assert sorted(made) == [("DDIM", 1), ("iCD", 1)]
    assert (again.images == 3).all() and list(again.nfe) == list(table.nfe)
    now = pd.read_csv(out / "table2_per_image.csv")
    pd.testing.assert_frame_equal(now[now["index"] < 2].reset_index(drop=True), first)
    made.clear()
    T.table2(pipe, paths, captions, inversion_metrics(monkeypatch), out, steps=STEPS,
             progress=False)
    assert made == []
    with pytest.raises(ValueError, match="seed = 30"):
        T.table2(pipe, paths, captions, inversion_metrics(monkeypatch), out, seed=0)


def test_table4_rows_nfe_paper_columns_and_one_noise_per_prompt(pipe, pipe3, fid_reference,
                                                                tmp_path):
    out = tmp_path / "table4"
    table = T.table4(pipe, CAPTIONS, generation_metrics(), fid_reference, pipe3, out,
                     steps=STEPS, batch_size=3, progress=False)
    assert list(table.index) == ["DDIM5, w = 8", "CD4 (4step-v1), w = 8",
                                 "CD4 (4step-v1) + d.CFG .8, w = 8",
                                 "CD4 (4step-v1) + d.CFG .7, w = 8", "CD3 (3step), w = 8",
                                 "CD3 (3step) + d.CFG .7, w = 8"]
    assert list(table.columns) == ["method", "w", "tau", "nfe", "images", "fid", "clip",
                                   "image_reward", "seconds_per_image", "paper_fid",
                                   "paper_clip", "paper_image_reward"]
    assert list(table.nfe) == [10, 4, 4, 4, 3, 3] and (table.images == 3).all()
    assert [T.expected_nfe(row) for row in T.TABLE4_ROWS] == [100, 4, 4, 4, 3, 3]
    assert np.isfinite(table.fid).all() and table["clip"].between(-1, 1).all()
    assert (table.image_reward == np.mean([len(p) for p in CAPTIONS])).all()
    for (_, row), key in zip(table.iterrows(), ["DDIM50", "CD4", "CD4 + d.CFG .8",
                                                "CD4 + d.CFG .7", "CD3", "CD3 + d.CFG .7"]):
        assert [row.paper_fid, row.paper_clip, row.paper_image_reward] == [
            paper.TABLE4[key][name] for name in ("fid", "clip", "image_reward")]
    # one noise per prompt (not one per batch): prompt i is pipe.generate(..., seed=30 + i)
    noise = T.prompt_noise([0, 1, 2], pipe.latent_shape)
    assert not torch.allclose(noise[0], noise[1])
    alone = pipe.generate(CAPTIONS[2], w=8.0, tau=0.8, seed=32).images[0]
    ours = picture(out / "images" / "cd4-4step-v1_w8_dcfg0.8" / "00002.png")
    assert (ours - ((alone + 1) * 127.5).round().clamp(0, 255)).abs().max() <= 2
    # a rerun generates nothing and scores the same
    again = T.table4(pipe, CAPTIONS, generation_metrics(), fid_reference, pipe3, out,
                     steps=STEPS, progress=False)
    assert again.seconds_per_image.isna().all() and list(again.nfe) == list(table.nfe)
    pd.testing.assert_series_equal(again.fid, table.fid)


def test_table4_without_the_3_step_pair_leaves_its_rows_out(pipe, tmp_path):
    rows = [row for row in T.TABLE4_ROWS if row.method != "DDIM"]
    metrics = T.GenerationMetrics(clip=M.ClipScore(*tiny_clip()))
    table = T.table4(pipe, CAPTIONS[:2], metrics, None, out=tmp_path, rows=rows, progress=False)
    assert list(table.method) == ["CD4"] * 3 and table.fid.isna().all()


def write_csv(path, header, rows):
    with open(path, "w", newline="") as file:
        csv.writer(file).writerows([header, *rows])
    return path


@pytest.mark.parametrize("command, options, message", [
    ("table2", ["--data", "{tmp}/none"], "not a CSV file"),
    ("table2", ["--data", "{coco}/val.csv", "--limit", "0"], "--limit must be at least 1"),
    ("table2", ["--data", "{tmp}/bad.csv", "--images", "{coco}/val"],
     "no column(s) ['caption']"),
    ("table2", ["--data", "{tmp}/bad.csv"], "image folder"),
    ("table2", ["--data", "{tmp}/gone.csv", "--images", "{coco}/val"],
     "1 image(s) of --data not found"),
    ("table2", ["--data", "{coco}/val.csv", "--cond-proj", "x", "--teacher", "y"],
     "drop --teacher"),
    ("table2", ["--data", "{coco}/val.csv", "--fit", "stretch"], "invalid choice: 'stretch'"),
    ("table4", ["--prompts", "{tmp}/none.csv", "--fid-reference", "{fid}"], "not found"),
    ("table4", ["--prompts", "{tmp}/bad.csv", "--fid-reference", "{fid}"],
     "no caption or prompt column"),
    ("table4", ["--prompts", "{coco}/val.csv", "--fid-reference", "{tmp}/none.npz"],
     "FID reference"),
    ("table4", ["--prompts", "{coco}/val.csv", "--fid-reference", "{tmp}/bad.npz"],
     "mu must be [D] and sigma [D, D]"),
    ("table4", ["--prompts", "{coco}/val.csv", "--fid-reference", "{fid}", "--release",
                "none"], "--release3 none"),
    ("table4", ["--prompts", "{coco}/val.csv", "--fid-reference", "{fid}", "--batch", "0"],
     "--batch must be at least 1"),
    ("table4", ["--prompts", "{coco}/val.csv"], "--fid-reference"),
])
def test_command_line_errors_are_one_line(command, options, message, coco, fid_reference,
                                          tmp_path, capsys):
    write_csv(tmp_path / "bad.csv", ["", "file_name", "text"], [[0, "a.jpg", "x"]])
    write_csv(tmp_path / "gone.csv", ["", "file_name", "caption"], [[0, "none.jpg", "x"]])
    np.savez(tmp_path / "bad.npz", mu=np.zeros(3), sigma=np.zeros((2, 2)))
    names = {"tmp": tmp_path, "coco": coco, "fid": fid_reference}
    with pytest.raises(SystemExit) as exit_info:
        bench.main([command, *[option.format(**names) for option in options]])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert message in error and error.startswith(f"python -m icd_lite.bench {command}: error")


def test_command_line_refuses_missing_metric_packages_before_loading(coco, fid_reference,
                                                                     capsys):
    import importlib.util

    for argv, package, message in (
            (["table2", "--data", str(coco / "val.csv")], "torchvision", "pass --no-lpips"),
            (["table4", "--prompts", str(coco / "val.csv"), "--fid-reference",
              str(fid_reference)], "torch_fidelity", "FID's Inception needs")):
        if importlib.util.find_spec(package) is not None:
            continue  # installed here: nothing to refuse
        with pytest.raises(SystemExit):
            bench.main(argv)
        assert message in capsys.readouterr().err


def test_command_line_table2_runs(pipe, model_folder, coco, tmp_path, monkeypatch, capsys):
    """--model, --limit, --steps, --no-lpips and --device reach the run (the module's pipeline
    stands in for the load); the metrics are built after the images."""
    from icd_lite.sd15 import loading

    loads = []
    monkeypatch.setattr(loading, "load_sd15_pipeline", lambda **k: (loads.append(k), pipe)[1])
    monkeypatch.setattr(T.InversionMetrics, "from_pretrained", classmethod(
        lambda cls, device, dinov2=None, lpips=True: cls(None, M.DinoV2Similarity(
            *tiny_dinov2()))))
    out = tmp_path / "cli"
    code = bench.main(["table2", "--data", str(coco / "val.csv"), "--model", str(model_folder),
                       "--limit", "1", "--steps", "2", "--no-lpips", "--device", "cpu",
                       "--out", str(out)])
    assert code == 0
    assert loads[0]["base"] == model_folder and loads[0]["release"] == "4step-v1"
    assert str(loads[0]["device"]) == "cpu"
    table = pd.read_csv(out / "table2.csv", index_col=0)
    assert list(table.nfe) == [4, 6, 5, 8, 8] and table.lpips.isna().all()
    assert (table.images == 1).all() and "fDDIM2 / DDIM2" in capsys.readouterr().out
