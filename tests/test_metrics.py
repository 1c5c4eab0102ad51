"""Image metrics (PSNR, MSE, SSIM, masked versions), the Frechet distance, latent NLL, and the
perceptual analogues computed from the toy CLIP (randomly initialised: formulas, not quality)."""

import math

import numpy as np
import pytest
import torch

from icd_lite import metrics
from icd_lite.world.models import build_clip
from icd_lite.world.scenes import (BACKGROUND_COLORS, OBJECT_COLORS, PATTERNS, SHAPES, SIZES,
                                   caption, make_dataset, random_scene, render)
from icd_lite.world.text import build_tokenizer


def images(batch=2, size=16, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(batch, 3, size, size, generator=generator) * 2 - 1


def test_psnr_and_mse():
    a = images()
    assert metrics.psnr(a, a).shape == (2,)
    assert (metrics.psnr(a, a) >= 90).all()  # MSE 0, clamped at 1e-10: 100 dB
    zeros = torch.zeros(3, 3, 8, 8)
    offset = zeros + 0.2  # 0.1 on the [0, 1] scale: MSE 0.01, PSNR 20 dB
    torch.testing.assert_close(metrics.mse(zeros, offset), torch.full((3,), 0.01))
    torch.testing.assert_close(metrics.psnr(zeros, offset), torch.full((3,), 20.0))
    half = offset.clone()
    half[1] = 0.02  # per image: 0.01 on the [0, 1] scale -> 40 dB
    torch.testing.assert_close(metrics.psnr(zeros, half), torch.tensor([20.0, 40.0, 20.0]))


def test_psnr_clamps_to_the_image_range():
    a = torch.full((1, 3, 4, 4), 1.0)
    assert metrics.psnr(a, a + 5).item() >= 90  # both clamp to 1


def test_masked_metrics_ignore_pixels_outside_keep():
    a = images(batch=2, size=8)
    keep = torch.zeros(2, 8, 8, dtype=torch.bool)
    keep[:, :, :4] = True  # the left half
    b = a.clone()
    b[:, :, :, 4:] += 1.0  # large differences only outside `keep`
    assert torch.equal(metrics.masked_mse(a, b, keep), torch.zeros(2))
    assert (metrics.masked_psnr(a, b, keep) >= 90).all()
    b[:, :, :, :4] += 0.2  # and 0.1 on the [0, 1] scale inside: an average over kept pixels only
    torch.testing.assert_close(metrics.masked_mse(a, b, keep), torch.full((2,), 0.01))
    a, b = torch.zeros(2, 3, 8, 8), torch.zeros(2, 3, 8, 8)
    b[:, :, :, :4] = 0.2
    torch.testing.assert_close(metrics.masked_psnr(a, b, keep), torch.full((2,), 20.0))
    everything = torch.ones(2, 8, 8, dtype=torch.bool)
    torch.testing.assert_close(metrics.masked_mse(a, b, everything), metrics.mse(a, b))


def test_ssim():
    a = images(batch=2, size=16)
    torch.testing.assert_close(metrics.ssim(a, a), torch.ones(2), rtol=0, atol=1e-6)
    noisy = (a + 0.3 * torch.randn(a.shape)).clamp(-1, 1)
    assert (metrics.ssim(a, noisy) < 0.99).all()
    assert (metrics.ssim(a, (a + 0.05 * torch.randn(a.shape)).clamp(-1, 1))
            > metrics.ssim(a, noisy)).all()  # more noise, less similar


def test_ssim_respects_keep():
    a = images(batch=1, size=32)
    b = a.clone()
    b[..., 20:] = torch.rand(1, 3, 32, 12) * 2 - 1  # the right 12 columns replaced
    keep = torch.zeros(1, 32, 32, dtype=torch.bool)
    keep[..., :16] = True  # 4 columns clear of the 7-pixel windows that reach the change
    torch.testing.assert_close(metrics.ssim(a, b, keep), torch.ones(1), rtol=0, atol=1e-6)
    assert metrics.ssim(a, b).item() < 0.9


def test_frechet_distance_of_identical_sets_is_zero():
    features = torch.randn(500, 8, dtype=torch.float64) @ torch.randn(8, 8, dtype=torch.float64)
    assert abs(metrics.frechet_distance(features, features)) < 1e-6


def test_frechet_distance_of_shifted_gaussians():
    generator = torch.Generator().manual_seed(0)
    mixing = torch.randn(4, 4, generator=generator, dtype=torch.float64) * 0.5
    d = torch.tensor([1.0, -1.0, 0.5, 1.5], dtype=torch.float64)  # ||d||^2 = 4.5
    a = torch.randn(20000, 4, generator=generator, dtype=torch.float64) @ mixing
    b = torch.randn(20000, 4, generator=generator, dtype=torch.float64) @ mixing + d
    assert metrics.frechet_distance(a, b) == pytest.approx(4.5, rel=0.1)
    assert metrics.frechet_distance(b, a) == pytest.approx(metrics.frechet_distance(a, b),
                                                           rel=1e-6)


def test_frechet_distance_of_scaled_gaussians():
    # N(0, I) vs N(0, 4 I) in D dims: Tr(I + 4I - 2 * 2I) = D
    generator = torch.Generator().manual_seed(1)
    a = torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    b = 2 * torch.randn(20000, 3, generator=generator, dtype=torch.float64)
    assert metrics.frechet_distance(a, b) == pytest.approx(3.0, rel=0.1)


def test_frechet_distance_rejects_bad_shapes():
    with pytest.raises(ValueError):
        metrics.frechet_distance(torch.randn(10), torch.randn(10, 1))
    with pytest.raises(ValueError):
        metrics.frechet_distance(torch.randn(10, 3), torch.randn(10, 4))
    with pytest.raises(ValueError, match="two samples"):
        metrics.frechet_distance(torch.randn(1, 3), torch.randn(10, 3))


def test_latent_nll():
    z = torch.randn(100_000, generator=torch.Generator().manual_seed(0))
    assert metrics.latent_nll(z) == pytest.approx(0.5 * (1 + math.log(2 * math.pi)), abs=0.02)
    assert metrics.latent_nll(torch.zeros(4, 4, 8, 8)) == pytest.approx(0.5 * math.log(2 * math.pi))
    assert metrics.latent_nll(2 * z) > metrics.latent_nll(z)


def test_check_images_rejects_bad_shapes():
    a = images()
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        metrics.mse(torch.zeros(2, 4, 16, 16), torch.zeros(2, 4, 16, 16))  # RGBA
    with pytest.raises(ValueError, match=r"\[B, 3, H, W\]"):
        metrics.psnr(a[0], a[0])  # no batch dimension
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.ssim(a, images(size=8))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics.mse(a, a[:1])


# ------------------------------------------------------------------------ perceptual analogues


@pytest.fixture(scope="module")
def perception():
    torch.manual_seed(0)
    tokenizer = build_tokenizer()
    return metrics.ToyPerception(build_clip(tokenizer), tokenizer)


@pytest.fixture(scope="module")
def scene_images():
    rng = np.random.default_rng(0)
    scenes = [random_scene(rng, p_two_objects=0.0) for _ in range(4)]
    return scenes, torch.from_numpy(np.stack([render(s)[0] for s in scenes]))


def test_lpips_and_dino_like(perception, scene_images):
    _, a = scene_images
    b = a.flip(0)
    assert torch.equal(perception.lpips_like(a, a), torch.zeros(4))
    distance = perception.lpips_like(a, b)
    assert distance.shape == (4,) and (distance > 0).all()
    torch.testing.assert_close(distance, perception.lpips_like(b, a))  # symmetric
    torch.testing.assert_close(perception.dino_like(a, a), torch.ones(4), rtol=0, atol=1e-5)
    assert (perception.dino_like(a, b) < 1).all()


def test_clip_t_and_embeddings(perception, scene_images):
    scenes, a = scene_images
    prompts = [caption(s) for s in scenes]
    embeddings = perception.image_embeddings(a)
    assert embeddings.shape == (4, 64)
    torch.testing.assert_close(embeddings.norm(dim=-1), torch.ones(4))
    score = perception.clip_t(a, prompts)
    assert score.shape == (4,) and (score.abs() <= 1 + 1e-6).all()
    expected = (embeddings * perception.text_embeddings(prompts)).sum(-1)
    torch.testing.assert_close(score, expected)


def test_predict_attributes_returns_grammar_words(perception, scene_images):
    _, a = scene_images
    allowed = {"size": SIZES, "color": OBJECT_COLORS, "shape": SHAPES,
               "background": BACKGROUND_COLORS, "pattern": PATTERNS}
    predictions = perception.predict_attributes(a)
    assert len(predictions) == 4
    for prediction in predictions:
        assert set(prediction) == set(allowed)
        for key, value in prediction.items():
            assert value in allowed[key], (key, value)
        assert prediction["color"] != prediction["background"]


def test_attribute_table_matches_the_caption_grammar(perception, scene_images, monkeypatch):
    """An image embedded exactly like its caption is predicted to have the caption's attributes:
    the zero-shot prompts are written in the grammar of ``scenes.caption``."""
    rng = np.random.default_rng(1)
    scenes = [random_scene(rng, p_two_objects=0.0, p_striped=p) for p in (0.0, 1.0, 0.5, 0.5)]
    monkeypatch.setattr(perception, "image_embeddings",
                        lambda images: perception.text_embeddings([caption(s) for s in scenes]))
    predictions = perception.predict_attributes(torch.zeros(4, 3, 32, 32))
    for scene, prediction in zip(scenes, predictions):
        obj = scene.objects[0]
        assert prediction == {"size": obj.size, "color": obj.color, "shape": obj.shape,
                              "background": scene.background, "pattern": scene.pattern}
    accuracy = perception.attribute_accuracy(torch.zeros(4, 3, 32, 32), scenes)
    assert accuracy == {"shape": 1.0, "color": 1.0, "background": 1.0}


def test_attribute_accuracy(perception, scene_images):
    scenes, a = scene_images
    accuracy = perception.attribute_accuracy(a, scenes)
    assert set(accuracy) == {"shape", "color", "background"}
    predictions = perception.predict_attributes(a)
    for key, value in accuracy.items():
        assert value == sum(p[key] == (s.background if key == "background" else
                                       getattr(s.objects[0], key))
                            for p, s in zip(predictions, scenes)) / len(scenes)
    images2, _, scenes2 = make_dataset(40, seed=0)
    two = [i for i, s in enumerate(scenes2) if len(s.objects) == 2][:2]
    assert two
    with pytest.raises(ValueError, match="single-object"):
        perception.attribute_accuracy(images2[two], [scenes2[i] for i in two])


def test_perception_checks_images(perception):
    with pytest.raises(ValueError):
        perception.image_embeddings(torch.zeros(2, 4, 32, 32))
    with pytest.raises(ValueError, match="differ in shape"):
        metrics._check_images(torch.zeros(2, 3, 32, 32), torch.zeros(3, 3, 32, 32))
