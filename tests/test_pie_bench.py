"""icd_lite.experiments.pie_bench on a fabricated PIE-Bench-format folder (tests/pie_fixture.py):
RLE masks with their frame, bracket stripping, ids, iCD's subsets, both metric suites end to end."""

import math
from collections import Counter
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("torchmetrics", reason="the [metrics] extra: pip install -e '.[metrics]'")

from icd_lite import metrics as toy
from icd_lite.experiments import pie_bench as P
from icd_lite.sd15 import metrics as M
from pie_fixture import (FIXTURE_ITEMS, encode_rle, full_pie_ids, inject_lpips_backbone,
                         tiny_clip, tiny_dino_vit, tiny_dinov2, write_pie_folder)

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def pie_root(tmp_path_factory):
    return write_pie_folder(tmp_path_factory.mktemp("pie"))


@pytest.fixture(scope="module")
def items(pie_root):
    return P.load_pie_bench(pie_root)


# --- masks, prompts, ids ------------------------------------------------------------------

def test_decode_mask_runs_wrap_rows_clip_at_end_and_force_the_frame():
    rle = [512 * 10 + 500, 20,        # row 10, columns 500..511, then row 11, columns 0..7
           512 * 300 + 100, 3,        # row 300, columns 100..102
           512 * 512 - 5, 99]         # the last 5 pixels; the run is clipped at the end
    expected = torch.zeros(512, 512, dtype=torch.bool)
    expected[10, 500:] = True
    expected[11, :8] = True
    expected[300, 100:103] = True
    expected[511, -5:] = True
    expected[0, :] = expected[-1, :] = expected[:, 0] = expected[:, -1] = True  # forced frame
    assert torch.equal(P.decode_mask(rle), expected)


def test_decode_mask_of_nothing_is_the_frame_only():
    mask = P.decode_mask([])
    assert int(mask.sum()) == 4 * 512 - 4 and not mask[1:-1, 1:-1].any()


@pytest.mark.parametrize("bad", [[3], [512 * 512, 2], [5, -1]])
def test_decode_mask_refuses_malformed_runs(bad):
    with pytest.raises(ValueError, match="RLE"):
        P.decode_mask(bad)


def test_fixture_masks_round_trip_through_the_loader(items):
    for item in items:
        top, left, bottom, right = FIXTURE_ITEMS[item.id][3]
        inner = torch.zeros(512, 512, dtype=torch.bool)
        inner[top:bottom, left:right] = True
        assert torch.equal(item.mask()[1:-1, 1:-1], inner[1:-1, 1:-1])
    generator = torch.Generator().manual_seed(0)
    speckled = torch.rand(512, 512, generator=generator) < 0.3
    framed = speckled.clone()
    framed[0, :] = framed[-1, :] = framed[:, 0] = framed[:, -1] = True
    assert torch.equal(P.decode_mask(encode_rle(speckled.numpy())), framed)


def test_brackets_are_stripped_and_kept_marked(items):
    first, second = items[0], items[1]
    assert first.editing_prompt.startswith("a slanted rusty mountain bicycle on the road")
    assert first.editing_prompt_marked.startswith("a slanted [rusty] mountain bicycle")
    assert second.original_prompt == "a cat on a wooden table"  # brackets in the original too
    assert all("[" not in i.original_prompt + i.editing_prompt for i in items)
    assert P.strip_brackets("[a] [b]c") == "a bc"


def test_types_categories_and_subjects_from_ids(items):
    got = {i.id: (i.edit_type, i.category, i.subject, i.edit_type_name) for i in items}
    assert got["000000000000"] == (0, None, None, "random")
    assert got["111000000000"] == (1, "artificial", "animal", "change object")
    assert got["224000000003"] == (2, "natural", "outdoor", "add object")
    assert got["623000000001"] == (6, "natural", "indoor", "change color")
    assert got["914000000002"] == (9, "artificial", "outdoor", "change style")
    assert len(P.EDIT_TYPES) == len(P.TYPE_FOLDERS) == 10


@pytest.mark.parametrize("bad", ["12345", "131000000000", "1a1000000000"])
def test_malformed_ids_are_refused(bad):
    with pytest.raises(ValueError, match="id"):
        P.parse_id(bad)


def test_type_disagreeing_with_id_is_refused(tmp_path):
    root = write_pie_folder(tmp_path)
    text = (root / "mapping_file.json").read_text()
    (root / "mapping_file.json").write_text(
        text.replace('"editing_type_id": "6"', '"editing_type_id": "7"'))
    with pytest.raises(ValueError, match="623000000001 is type 6"):
        P.load_pie_bench(root)


def test_missing_folder_says_where_the_data_comes_from(tmp_path):
    with pytest.raises(FileNotFoundError, match="no mapping_file.json.*PnPInversion"):
        P.load_pie_bench(tmp_path)


# --- iCD's subsets ------------------------------------------------------------------------

def test_icd_subsets_on_the_full_id_layout():
    everything = [SimpleNamespace(id=i) for i in full_pie_ids()]
    assert len(everything) == 700
    assert len(P.select(everything, "all")) == 700
    assert [i.id for i in P.select(everything, "icd140")] == [f"{k:012d}" for k in range(140)]
    icd420 = P.select(everything, "icd420")
    per_type = Counter(i.id[0] for i in icd420)
    assert len(icd420) == 420
    assert [per_type[str(t)] for t in range(10)] == [140, 40, 40, 40, 20, 20, 20, 20, 40, 40]
    assert all(i.id[1] == "2" for i in icd420 if i.id[0] != "0")  # the natural (photo) half
    with pytest.raises(ValueError, match="subset"):
        P.select(everything, "icd500")


def test_subsets_of_the_fixture(items):
    assert [i.id for i in P.select(items, "icd140")] == ["000000000000", "000000000001"]
    assert [i.id for i in P.select(items, "icd420")] == [
        "000000000000", "000000000001", "224000000003", "623000000001"]


# --- PnP's quirks -------------------------------------------------------------------------

def test_rightmost_square_takes_the_edit_of_a_strip():
    strip = torch.zeros(3, 512, 1536, dtype=torch.uint8)
    strip[:, :, 1024:] = 7  # source | reconstruction | edit
    assert torch.equal(P.rightmost_square(strip), torch.full((3, 512, 512), 7, dtype=torch.uint8))
    with pytest.raises(ValueError, match="at least 512"):
        P.rightmost_square(torch.zeros(3, 100, 200, dtype=torch.uint8))


@pytest.fixture(scope="module")
def pnp_suite():
    return P.PnPSuite(M.ClipScore(*tiny_clip(), convention="torchmetrics"),
                      M.DinoStructureDistance(tiny_dino_vit()))


def test_background_psnr_on_zeroed_images_exceeds_the_masked_region_psnr(items, pnp_suite):
    """PnP multiplies both images by (1 - mask) and averages over all pixels: its MSE is the
    background MSE times the background fraction, so its PSNR is higher by exactly
    10 log10(all pixels / background pixels) than PSNR over the background alone."""
    item = next(i for i in items if i.id == "623000000001")  # a 410 x 410 edit box: 64% of it
    source = item.image()
    generator = torch.Generator().manual_seed(0)
    edited = (source.int() + torch.randint(-20, 21, source.shape, generator=generator)
              ).clamp(0, 255).to(torch.uint8)
    row = pnp_suite.score(item, source, edited)
    keep = ~item.mask()
    masked = toy.masked_psnr(source[None].float() / 127.5 - 1, edited[None].float() / 127.5 - 1,
                             keep[None])  # the toy metric: [-1, 1] images, background pixels only
    fraction = float(keep.float().mean())
    assert row["psnr_unedit_part"] > float(masked) + 4  # the quirk's bonus: 4.4 dB here
    assert math.isclose(row["psnr_unedit_part"], float(masked) - 10 * math.log10(fraction),
                        rel_tol=1e-4)


def test_suites_refuse_the_other_clip_convention():
    with pytest.raises(ValueError, match="torchmetrics"):
        P.PnPSuite(M.ClipScore(*tiny_clip()), M.DinoStructureDistance(tiny_dino_vit()))
    with pytest.raises(ValueError, match="cosine"):
        P.ICDSuite(M.ClipScore(*tiny_clip(), convention="torchmetrics"),
                   M.DinoV2Similarity(*tiny_dinov2()))


# --- both suites end to end ----------------------------------------------------------------

def edited_images(items):
    """Two 'editors': one returns the source file itself, one a darkened copy saved as a strip
    (512 x 1024: a grey reconstruction, then the edit) as P2P-style editors save them."""
    strips = {}
    for item in items:
        source = item.image().float() / 255  # (3, 512, 512)
        strips[item.id] = torch.cat([torch.full_like(source, 0.5), source * 0.7], dim=2)
    return {"identity": {i.id: i.image_path for i in items}, "darker": strips}


def test_pnp_suite_end_to_end(items, pnp_suite, monkeypatch):
    inject_lpips_backbone(monkeypatch)
    suite = P.PnPSuite(pnp_suite.clip, pnp_suite.structure, M.LPIPS.pnp())
    per_image, summary = P.evaluate(items, edited_images(items), suite)
    assert len(per_image) == 2 * len(items)
    assert set(P.PnPSuite.COLUMNS) <= set(per_image.columns)
    same = per_image[per_image.method == "identity"]
    darker = per_image[per_image.method == "darker"]
    full_mask = same.id == "914000000002"  # the style edit covers the whole image
    assert same[~full_mask].psnr_unedit_part.map(math.isinf).all()
    assert (same.structure_distance == 0).all()
    assert (same[~full_mask].lpips_unedit_part.abs() < 1e-6).all()
    background = ["psnr_unedit_part", "lpips_unedit_part", "mse_unedit_part", "ssim_unedit_part"]
    assert per_image[per_image.id == "914000000002"][background].isna().all(axis=None)
    assert (darker.structure_distance > 0).all()
    assert (darker[darker.id != "914000000002"][background[1:3]] > 0).all(axis=None)
    assert list(summary.index) == ["identity", "darker"]
    assert list(summary.columns) == [(g, n) for g, n, _, _ in P.PnPSuite.TABLE]
    assert math.isclose(summary.loc["darker", ("Background Preservation", "MSE x10^4")],
                        1e4 * darker.mse_unedit_part.mean(), rel_tol=1e-9)  # NaN skipped
    assert summary.loc["identity", ("Background Preservation", "SSIM x10^2")] == pytest.approx(100)
    assert "CLIP Similarity" in P.format_table(summary)


def test_icd_suite_end_to_end_with_fake_image_reward(items):
    class FakeScorer:
        def score(self, prompt, pictures):
            return float(len(prompt))

    suite = P.ICDSuite(M.ClipScore(*tiny_clip()), M.DinoV2Similarity(*tiny_dinov2()),
                       M.ImageReward(FakeScorer()))
    per_image, summary = P.evaluate(items, edited_images(items), suite, by="edit_type")
    same = per_image[per_image.method == "identity"]
    assert same.clip_i.sub(1).abs().max() < 1e-5 and same.dinov2.sub(1).abs().max() < 1e-5
    assert (per_image[per_image.method == "darker"].dinov2 < 1 - 1e-6).all()
    assert (per_image.clip_t.abs() <= 1).all()  # raw cosine, not x100
    assert list(same.image_reward) == [float(len(i.editing_prompt)) for i in items]
    assert summary.index.names == ["method", "edit_type"] and len(summary) == 2 * 5
    assert list(summary.columns.get_level_values(1)) == [
        "CLIP score", "ImageReward", "DINOv2", "CLIP-I"]


def test_evaluate_names_the_method_missing_images(items):
    suite = P.ICDSuite(M.ClipScore(*tiny_clip()), M.DinoV2Similarity(*tiny_dinov2()))
    partial = {"half-done": {i.id: i.image_path for i in items[:2]}}
    with pytest.raises(ValueError, match="half-done: no edited image for 4 of 6 ids"):
        P.evaluate(items, partial, suite)


def test_saved_edits_are_found_again_and_rerun_resumes(items, tmp_path):
    calls = []

    def darken(item):
        calls.append(item.id)
        return item.image().float() / 255 * 0.5  # (3, 512, 512) in [0, 1]

    saved = P.save_edits(items, darken, tmp_path / "darken")
    assert saved == P.edited_from_folder(items, tmp_path / "darken") and len(calls) == len(items)
    assert saved["111000000000"] == (tmp_path / "darken/1_change_object_80/1_artificial/1_animal"
                                     / "111000000000.png")
    expected = (items[0].image().float() / 255 * 0.5 * 255).round().to(torch.uint8)
    assert torch.equal(P.load_image(saved[items[0].id]), expected)  # lossless PNG
    P.save_edits(items, darken, tmp_path / "darken")
    assert len(calls) == len(items)  # nothing edited twice
    with pytest.raises(FileNotFoundError, match="no edited image for 000000000000"):
        P.edited_from_folder(items, tmp_path / "elsewhere")
