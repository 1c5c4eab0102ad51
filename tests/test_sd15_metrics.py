"""icd_lite.sd15.metrics on tiny models built from configs (nothing downloaded): each test would
fail if the convention, the scale or the library glue were wrong."""

import copy
import math
import sys

import numpy as np
import pytest
import torch

pytest.importorskip("torchmetrics", reason="the [metrics] extra: pip install -e '.[metrics]'")

from icd_lite import metrics as toy
from icd_lite.sd15 import metrics as M
from pie_fixture import (MeanColourFeatures, inject_lpips_backbone, tiny_clip, tiny_dino_vit,
                         tiny_dinov2)

torch.set_num_threads(1)
PROMPTS = ["a cat on a table", "a red dog", "a photo of the sky", "a watercolor painting",
           "a man with a bicycle", "green grass"]


@pytest.fixture(scope="module")
def images():
    torch.manual_seed(0)
    return torch.rand(len(PROMPTS), 3, 40, 48)  # (B, 3, H, W) in [0, 1]


@pytest.fixture(scope="module")
def clip():
    return tiny_clip()


# --- input checks ---------------------------------------------------------------------------

def test_minus_one_one_images_are_refused_with_the_mapping():
    with pytest.raises(ValueError, match=r"must be in \[0, 1\].*\(x \+ 1\) / 2"):
        M.psnr(torch.rand(1, 3, 8, 8) * 2 - 1, torch.rand(1, 3, 8, 8))


@pytest.mark.parametrize("bad", [torch.rand(3, 8, 8), torch.rand(1, 1, 8, 8), [[0.5]]])
def test_wrong_shape_is_one_line_value_error(bad):
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]") as error:
        M.mse(bad, bad)
    assert "\n" not in str(error.value)


def test_pairs_of_different_shape_are_refused():
    with pytest.raises(ValueError, match="differ in shape"):
        M.psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))


# --- PSNR and MSE ---------------------------------------------------------------------------

def test_psnr_and_mse_known_values():
    a = torch.zeros(2, 3, 4, 4)
    b = torch.full((2, 3, 4, 4), 0.1)
    b[1] = 0.01
    assert torch.allclose(M.mse(a, b), torch.tensor([0.01, 1e-4], dtype=torch.float64))
    assert torch.allclose(M.psnr(a, b), torch.tensor([20.0, 40.0], dtype=torch.float64))
    assert M.psnr(a, a).isinf().all()  # identical: +inf for that image only


def test_psnr_on_uint8_equals_icd_formula_and_float_inputs():
    generator = torch.Generator().manual_seed(1)
    a = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=generator)
    b = torch.randint(0, 256, (3, 3, 16, 16), dtype=torch.uint8, generator=generator)
    # iCD's calculate_psnr: float64 uint8 arrays, 20 log10(255 / sqrt(MSE))
    icd = [20 * math.log10(255 / math.sqrt(np.mean((x.double().numpy() - y.double().numpy())**2)))
           for x, y in zip(a, b)]
    assert torch.allclose(M.psnr(a, b), torch.tensor(icd, dtype=torch.float64))
    assert torch.allclose(M.psnr(a.double() / 255, b.double() / 255), M.psnr(a, b))


# --- CLIP -----------------------------------------------------------------------------------

def negated_text_projection(model):
    """A copy of the CLIP whose text features point the other way: every cosine changes sign."""
    flipped = copy.deepcopy(model)
    with torch.no_grad():
        flipped.text_projection.weight.neg_()
    return flipped


@pytest.fixture(scope="module")
def clip_pair(clip):
    """The tiny CLIP and its negated twin: cosines of both signs, whatever the seed gives."""
    model, processor = clip
    return [(model, processor), (negated_text_projection(model), processor)]


def test_clip_conventions_raw_cosine_and_100_max_cos_0(clip_pair, images):
    (model, processor), (flipped, _) = clip_pair
    cosine = M.ClipScore(model, processor, "cosine").clip_t(images, PROMPTS)
    assert cosine.shape == (len(PROMPTS),) and (cosine.abs() <= 1).all()
    assert torch.allclose(M.ClipScore(flipped, processor).clip_t(images, PROMPTS), -cosine,
                          atol=1e-6)
    for cos in (cosine, -cosine):  # both branches of max(cos, 0)
        model_ = model if cos is cosine else flipped
        scaled = M.ClipScore(model_, processor, "torchmetrics").clip_t(images, PROMPTS)
        assert torch.allclose(scaled, 100 * cos.clamp_min(0), atol=1e-5)


def test_clip_torchmetrics_convention_equals_torchmetrics_clipscore(clip_pair, images):
    from torchmetrics.multimodal.clip_score import CLIPScore

    for model, processor in clip_pair:
        class TensorFeatures(type(model)):  # torchmetrics 1.9 needs tensors from get_*_features
            def get_image_features(self, *args, **kwargs):
                return M._features(super().get_image_features(*args, **kwargs))

            def get_text_features(self, *args, **kwargs):
                return M._features(super().get_text_features(*args, **kwargs))

        reference_model = TensorFeatures(model.config).eval()
        reference_model.load_state_dict(model.state_dict())
        reference = CLIPScore(model_name_or_path=lambda: (reference_model, processor))
        ours = M.ClipScore(model, processor, "torchmetrics").clip_t(images, PROMPTS)
        with torch.no_grad():  # PnP calls it one image at a time, on uint8 CHW tensors
            theirs = torch.stack([reference(image, prompt).detach()
                                  for image, prompt in zip(M.to_uint8(images), PROMPTS)])
        assert torch.allclose(ours, theirs, atol=1e-4)


def test_clip_i_is_one_for_identical_images_and_symmetric(clip, images):
    score = M.ClipScore(*clip)
    assert torch.allclose(score.clip_i(images, images), torch.ones(len(images)), atol=1e-5)
    other = images.flip(0)
    assert torch.allclose(score.clip_i(images, other), score.clip_i(other, images))


def test_clip_features_from_model_output_or_tensor():
    output = type("Output", (), {"pooler_output": torch.ones(2, 4)})()
    assert M._features(output).shape == (2, 4)
    assert M._features(torch.zeros(2, 4)).shape == (2, 4)


def test_clip_needs_one_prompt_per_image(clip, images):
    with pytest.raises(ValueError, match="6 images but 2 prompts"):
        M.ClipScore(*clip).clip_t(images, PROMPTS[:2])


def test_clip_convention_is_checked(clip):
    with pytest.raises(ValueError, match="convention"):
        M.ClipScore(*clip, convention="100cos")


# --- DINOv2 and DINO structure distance -------------------------------------------------------

def test_dinov2_is_cosine_of_pooled_features(images):
    model, processor = tiny_dinov2()
    similarity = M.DinoV2Similarity(model, processor)
    other = images.flip(0)
    with torch.no_grad():
        pooled = [model(pixel_values=processor(images=M.to_pil(x), return_tensors="pt")
                        ["pixel_values"]).pooler_output for x in (images, other)]
    expected = torch.nn.functional.cosine_similarity(*pooled, dim=-1)
    assert torch.allclose(similarity(images, other), expected, atol=1e-5)
    assert torch.allclose(similarity(images, images), torch.ones(len(images)), atol=1e-5)


def test_structure_distance_zero_for_identical_and_feeds_0_255_pixels(images):
    distance = M.DinoStructureDistance(tiny_dino_vit())
    seen = []
    hook = distance.model.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["pixel_values"]), with_kwargs=True)
    white = torch.ones(1, 3, 64, 64)
    try:
        distance(white, white)
    finally:
        hook.remove()
    # PnP's quirk: ImageNet normalisation of 0..255 values: (255 - 0.485) / 0.229 ~ 1111
    assert seen[0].shape == (1, 3, 224, 224)
    assert math.isclose(float(seen[0][0, 0].max()), (255 - 0.485) / 0.229, rel_tol=1e-4)
    values = distance(images[:2], images[:2].flip(0))
    assert values.shape == (2,) and (values > 0).all()
    assert torch.equal(distance(images[:2], images[:2]), torch.zeros(2))


def test_structure_distance_resize_keeps_torchvision_rule():
    distance = M.DinoStructureDistance(tiny_dino_vit())
    assert distance._resize(torch.zeros(1, 3, 512, 1536)).shape[-2:] == (160, 480)  # max_size
    assert distance._resize(torch.zeros(1, 3, 600, 400)).shape[-2:] == (336, 224)


# --- LPIPS (torchmetrics, backbone injected: torchvision does not import here) -----------------

def test_lpips_with_injected_backbone(monkeypatch, images):
    inject_lpips_backbone(monkeypatch)
    lpips = M.LPIPS.pnp()
    far = lpips(images, images.flip(0))
    assert far.shape == (len(images),) and (far > 0).all()
    assert torch.allclose(lpips(images, images), torch.zeros(len(images)), atol=1e-7)
    near = lpips(images, (images + 0.02).clamp(0, 1))
    assert (near < far).all()


def test_lpips_without_torchvision_says_so():
    from torchmetrics.utilities.imports import _TORCHVISION_AVAILABLE

    if _TORCHVISION_AVAILABLE:
        pytest.skip("torchvision imports here: LPIPS runs for real")
    with pytest.raises(ImportError, match="LPIPS needs torchvision"):
        M.LPIPS.icd()


# --- FID (torchmetrics, feature network injected) -------------------------------------------

def test_fid_identical_sets_zero_and_shifted_positive_equal_to_toy_formula(images):
    fid = M.FID(feature=MeanColourFeatures())
    assert abs(fid(images, images)) < 1e-6
    darker = images * 0.6
    shifted = fid(images, darker)
    features = [MeanColourFeatures()(M.fid_resize(x)).double() for x in (images, darker)]
    assert shifted > 0.01
    assert math.isclose(shifted, toy.frechet_distance(*features), rel_tol=1e-4)


def test_fid_resize_is_lanczos_256_centre_crop():
    wide = torch.zeros(1, 3, 100, 300, dtype=torch.uint8)
    wide[..., 150:] = 255  # right half white: the centre crop of 256 x 768 keeps both halves
    out = M.fid_resize(wide)
    assert out.shape == (1, 3, 256, 256) and out.dtype == torch.uint8
    assert out[0, 0, :, 0].max() == 0 and out[0, 0, :, -1].min() == 255


def test_fid_reference_statistics_give_the_same_distance(images, tmp_path):
    features = MeanColourFeatures()(M.fid_resize(images)).double().numpy()
    path = tmp_path / "stats.npz"
    np.savez(path, mu=features.mean(0), sigma=np.cov(features, rowvar=False))
    fid = M.FID(feature=MeanColourFeatures())
    fid.load_reference(str(path), num_samples=len(images))
    fid.update(images * 0.6, real=False)
    assert math.isclose(fid.compute(), M.FID(feature=MeanColourFeatures())(images, images * 0.6),
                        rel_tol=1e-6)


# --- ImageReward (optional) -----------------------------------------------------------------

def test_image_reward_missing_package_is_one_clear_line(monkeypatch):
    monkeypatch.setitem(sys.modules, "ImageReward", None)  # as if not installed
    with pytest.raises(ImportError, match="optional package image-reward") as error:
        M.ImageReward.from_pretrained()
    assert "\n" not in str(error.value)


def test_image_reward_adapter_scores_each_image_with_its_prompt(images):
    class FakeScorer:  # the package's interface: score(prompt, [PIL image]) -> float
        def score(self, prompt, pictures):
            assert len(pictures) == 1 and pictures[0].size == (48, 40)
            return len(prompt) + np.asarray(pictures[0]).mean() / 255

    scores = M.ImageReward(FakeScorer())(images, PROMPTS)
    expected = [len(p) + float(M.to_uint8(x[None]).double().mean()) / 255
                for p, x in zip(PROMPTS, images)]
    assert torch.allclose(scores, torch.tensor(expected))
    with pytest.raises(ValueError, match="prompts"):
        M.ImageReward(FakeScorer())(images, PROMPTS[:1])
