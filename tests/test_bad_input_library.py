"""Bad input to the Python API (issue 18, the library's side of kinds A, E and F).

A. Non-finite numbers: NaN passes every comparison, so every numeric parameter and every input
   image or noise tensor is checked for finiteness, with a one-line ValueError naming it.
E. Images in [0, 1] given as [-1, 1]: an image without a negative value is an error where the
   toy world encodes it (no toy image is like that) and a warning in the metrics.
F. An empty region: the masked metrics return NaN ("no pixel to compare"), and the ToyBench
   summary counts the skipped cases and averages the others.
"""

import dataclasses
import math
import warnings

import numpy as np
import pytest
import torch

from icd_lite import baselines, guidance, load_pipeline, losses, metrics
from icd_lite.experiments import editing_evaluation, toybench
from icd_lite.attention import PromptToPrompt
from icd_lite.checks import ImageRangeWarning, check_finite
from icd_lite.editing import P2PSettings, baseline_edit, icd_edit, prompt_switch_edit
from icd_lite.schedule import default_boundaries
from icd_lite.world.scenes import make_dataset

SOURCE = "a large red circle on a blue background"
TARGET = "a large red square on a blue background"
NAN, INF = float("nan"), float("inf")
NON_FINITE = [NAN, INF, -INF, np.float32("nan"), np.float64("inf"), torch.tensor(NAN),
              torch.tensor(-INF)]
NON_FINITE_IDS = ["nan", "inf", "-inf", "np.float32-nan", "np.float64-inf", "tensor-nan",
                  "tensor--inf"]


@pytest.fixture(scope="module")
def pipe(components):
    return load_pipeline("G", components)


@pytest.fixture(scope="module")
def scenes():
    images, _, _ = make_dataset(500, seed=0)
    return images


@pytest.fixture(scope="module")
def cases():
    return toybench.load_toybench()


@pytest.fixture
def image(scenes):
    return scenes[:1].clone()


def one_line_error(call, match):
    with pytest.raises(ValueError, match=match) as error:
        call()
    assert "\n" not in str(error.value)
    return str(error.value)


# ------------------------------------------------------------- A. non-finite numbers

W = r"w must be >= 1 and finite"
TAU = r"tau must be in \[0, 1\] and finite"
# (what is called with the bad value v, what the message must say); pipe, image and base are
# filled in by the test (base: the pipeline's Components, enough for checks made before work).
NUMBER_CASES = {
    "generate w": (lambda p, x, v: p.generate(SOURCE, w=v), W),
    "generate tau": (lambda p, x, v: p.generate(SOURCE, tau=v), TAU),
    "decode w": (lambda p, x, v: p.decode(torch.randn(1, 4, 8, 8), SOURCE, w=v), W),
    "reconstruct w": (lambda p, x, v: p.reconstruct(x, SOURCE, w=v), W),
    "reconstruct tau": (lambda p, x, v: p.reconstruct(x, SOURCE, tau=v), TAU),
    "__call__ guidance_scale": (lambda p, x, v: p(SOURCE, guidance_scale=v),
                                r"guidance_scale must be >= 1 and finite"),
    "__call__ tau": (lambda p, x, v: p(SOURCE, tau=v), TAU),
    "icd_edit w": (lambda p, x, v: icd_edit(p, x, SOURCE, TARGET, w=v), W),
    "icd_edit tau": (lambda p, x, v: icd_edit(p, x, SOURCE, TARGET, tau=v), TAU),
    "prompt_switch_edit w": (lambda p, x, v: prompt_switch_edit(p, x, SOURCE, TARGET, w=v), W),
    "prompt_switch_edit tau": (lambda p, x, v: prompt_switch_edit(p, x, SOURCE, TARGET, tau=v),
                               TAU),
    "baseline_edit w": (lambda p, x, v: baseline_edit(p.base, x, SOURCE, TARGET, w=v), W),
    "baseline_edit nti_inner_steps": (
        lambda p, x, v: baseline_edit(p.base, x, SOURCE, TARGET, "nti", nti_inner_steps=v),
        r"nti_inner_steps must be an integer >= 0"),
    "ddim_reconstruct w_encode": (
        lambda p, x, v: baselines.ddim_reconstruct(p.base, x, SOURCE, w_encode=v),
        r"w_encode must be >= 1 and finite"),
    "ddim_reconstruct tau_encode": (
        lambda p, x, v: baselines.ddim_reconstruct(p.base, x, SOURCE, tau_encode=v),
        r"tau_encode must be in \[0, 1\] and finite"),
    "negative_prompt_reconstruct w": (
        lambda p, x, v: baselines.negative_prompt_reconstruct(p.base, x, SOURCE, w=v), W),
    "null_text_inversion w": (
        lambda p, x, v: baselines.null_text_inversion(p.base, None, None, None, w=v),
        r"classical guidance scale w must be >= 1 and finite"),
    "null_text_inversion lr": (
        lambda p, x, v: baselines.null_text_inversion(p.base, None, None, None, lr=v),
        r"lr must be > 0 and finite"),
    "null_text_inversion early_stop": (
        lambda p, x, v: baselines.null_text_inversion(p.base, None, None, None, early_stop=v),
        r"early_stop must be >= 0 and finite"),
    "make_editors w_icd": (
        lambda p, x, v: editing_evaluation.make_editors(p.base, {}, w_icd=v), r"w_icd must be"),
    "make_editors tau": (lambda p, x, v: editing_evaluation.make_editors(p.base, {}, tau=v), TAU),
    "make_editors w_teacher": (
        lambda p, x, v: editing_evaluation.make_editors(p.base, {}, w_teacher=v),
        r"w_teacher must be"),
    "classical_to_code": (lambda p, x, v: guidance.classical_to_code(v),
                          r"classical guidance scale w must be >= 1 and finite"),
    "check_w_code": (lambda p, x, v: guidance.check_w_code(v), r"w_code must be >= 0 and finite"),
    "cfg w_code": (lambda p, x, v: guidance.cfg(torch.zeros(2, 3), torch.ones(2, 3), v),
                   r"w_code must be >= 0 and finite"),
    "cfg w_code per sample": (
        lambda p, x, v: guidance.cfg(torch.zeros(2, 3), torch.ones(2, 3),
                                     torch.stack([torch.tensor(2.0), torch.as_tensor(v).float()])),
        r"w_code must be >= 0 and finite, got \[2\.0, -?(nan|inf)\]"),
    "constant_guidance": (lambda p, x, v: guidance.constant_guidance(v), r"w_code must be >= 0"),
    "step_guidance tau": (lambda p, x, v: guidance.step_guidance(7, v),
                          r"tau1 must be in \[0, 1\] and finite"),
    "ramp_guidance tau2": (lambda p, x, v: guidance.ramp_guidance(7, 0.2, v),
                           r"tau2 must be in \[0, 1\] and finite"),
    "interval_guidance tau1": (lambda p, x, v: guidance.interval_guidance(7, v, 0.9),
                               r"tau1 must be in \[0, 1\] and finite"),
    "P2PSettings cross_fraction": (lambda p, x, v: P2PSettings(cross_fraction=v),
                                   r"cross_fraction must be in \[0, 1\] and finite"),
    "P2PSettings self_fraction": (lambda p, x, v: P2PSettings(self_fraction=v),
                                  r"self_fraction must be in \[0, 1\] and finite"),
    "P2PSettings amplify": (lambda p, x, v: P2PSettings(amplify=v),
                            r"amplify must be > 0 and finite"),
    "P2PSettings blend_threshold": (lambda p, x, v: P2PSettings(blend_threshold=v),
                                    r"blend_threshold must be in \[0, 1\] and finite"),
    "PromptToPrompt blend_start": (
        lambda p, x, v: PromptToPrompt(p.tokenizer, [SOURCE], [TARGET], 4, blend_start=v),
        r"blend_start must be in \[0, 1\] and finite"),
    "ICDConfig lambda_f": (lambda p, x, v: losses.ICDConfig(default_boundaries(2), lambda_f=v),
                           r"lambda_f must be >= 0 and finite"),
    "ICDConfig lambda_r": (lambda p, x, v: losses.ICDConfig(default_boundaries(2), lambda_r=v),
                           r"lambda_r must be >= 0 and finite"),
    "ICDConfig huber_c": (lambda p, x, v: losses.ICDConfig(default_boundaries(2), huber_c=v),
                          r"huber_c must be > 0 and finite"),
    "ICDConfig w_code_choices": (
        lambda p, x, v: losses.ICDConfig(default_boundaries(2),
                                         w_code_choices=(0.0, float(v))),
        r"w_code must be >= 0 and finite"),
    "pseudo_huber c": (lambda p, x, v: losses.pseudo_huber(torch.zeros(2), torch.ones(2), c=v),
                       r"pseudo-Huber c must be > 0 and finite"),
}


@pytest.mark.parametrize("value", NON_FINITE, ids=NON_FINITE_IDS)
@pytest.mark.parametrize("name", list(NUMBER_CASES))
def test_non_finite_numbers_get_a_one_line_error(pipe, image, name, value):
    call, match = NUMBER_CASES[name]
    message = one_line_error(lambda: call(pipe, image, value), match)
    assert "nan" in message or "inf" in message  # the value it got


def test_the_issues_examples_of_kind_a(pipe, image):
    one_line_error(lambda: icd_edit(pipe, image, SOURCE, TARGET, w=float("nan")),
                   r"^w must be >= 1 and finite, got nan; the classical guidance scale")
    one_line_error(lambda: pipe.generate(SOURCE, w=float("nan")), r"^w must be >= 1")
    one_line_error(lambda: pipe.generate(SOURCE, w=float("inf")), r"got inf")


@pytest.mark.parametrize("value", [2.0, np.float32(2.0), np.float64(2.0), torch.tensor(2.0), 2])
def test_finite_numbers_of_every_kind_pass(value):
    check_finite("w", value, 1)
    guidance.check_w_code(value)


@pytest.mark.parametrize("value, match", [
    ("8", r"got '8'"), (None, r"got None"), (True, r"got True"), ([], r"got \[\]"),
    (0.5, r"got 0\.5"), (2.5, r"an integer")])
def test_check_finite_rejects_what_is_not_a_number(value, match):
    integer = match == r"an integer"
    with pytest.raises(ValueError, match=match):
        check_finite("x", value, 1, integer=integer)


@pytest.mark.parametrize("pixel", [NAN, INF, -INF], ids=["nan", "inf", "-inf"])
def test_non_finite_pixels_and_noise_are_refused(pipe, scenes, pixel):
    images = scenes[:3].clone()
    images[1, 2, 5, 7] = pixel
    match = r"images contain NaN or infinite values \(image 1 of 3\)"
    one_line_error(lambda: pipe.encode(images, SOURCE), match)
    one_line_error(lambda: icd_edit(pipe, images, SOURCE, TARGET), match)
    one_line_error(lambda: pipe.reconstruct(images, SOURCE), match)
    for metric in (metrics.mse, metrics.psnr, metrics.ssim):
        one_line_error(lambda: metric(images, scenes[:3]), match)
        one_line_error(lambda: metric(scenes[:3], images), match)
    keep = torch.ones(3, 32, 32, dtype=torch.bool)
    one_line_error(lambda: metrics.masked_psnr(images, scenes[:3], keep), match)
    noise = torch.randn(2, 4, 8, 8)
    noise[0, 0, 0, 0] = pixel
    one_line_error(lambda: pipe.decode(noise, SOURCE), r"noise \(latents\) contains NaN")
    one_line_error(lambda: pipe(SOURCE, latents=noise[:1]), r"noise \(latents\) contains NaN")


# ------------------------------------------------------- E. [0, 1] images as [-1, 1]

ZERO_ONE = r"expected in \[-1, 1\].*no negative value.*x \* 2 - 1"


def test_the_issues_example_of_kind_e(pipe, image):
    with pytest.warns(ImageRangeWarning, match=ZERO_ONE):
        icd_edit(pipe, (image + 1) / 2, SOURCE, TARGET)


@pytest.mark.parametrize("make, which", [
    (lambda x: (x + 1) / 2, r"4 of 4 images: 0, 1, 2, \.\.\. have"),  # the whole batch
    (lambda x: torch.cat([x[:2], (x[2:3] + 1) / 2, x[3:]]), r"image 2 of 4 has"),  # one image
    (lambda x: x.clamp(min=0), r"4 of 4 images"),  # [0, 1] with the negatives lost
    (lambda x: torch.ones_like(x), r"4 of 4 images"),  # all white: no toy image is white
    (lambda x: torch.zeros_like(x), r"4 of 4 images"),  # all gray
])
def test_encoding_warns_about_images_without_a_negative_value(pipe, components, scenes, make,
                                                             which):
    images = make(scenes[:4])
    for call in (lambda: pipe.encode(images, SOURCE), lambda: pipe.reconstruct(images, SOURCE),
                 lambda: prompt_switch_edit(pipe, images, SOURCE, TARGET),
                 lambda: baseline_edit(components, images, SOURCE, TARGET, steps=2)):
        with pytest.warns(ImageRangeWarning, match=r"expected in \[-1, 1\], but " + which
                          + r".* no negative value.*x \* 2 - 1"):
            call()


@pytest.mark.parametrize("metric", [
    metrics.mse, metrics.psnr, metrics.ssim,
    lambda a, b: metrics.masked_psnr(a, b, torch.ones(len(a), 32, 32, dtype=torch.bool)),
    lambda a, b: metrics.masked_mse(a, b, torch.ones(len(a), 32, 32, dtype=torch.bool))],
    ids=["mse", "psnr", "ssim", "masked_psnr", "masked_mse"])
@pytest.mark.parametrize("side", ["a", "b", "one image of b"])
def test_metrics_warn_about_images_without_a_negative_value(scenes, metric, side):
    x = scenes[:3]
    a, b = ((x + 1) / 2, x) if side == "a" else (x, (x + 1) / 2)
    if side == "one image of b":
        b = torch.cat([x[:1], (x[1:2] + 1) / 2, x[2:]])
    with pytest.warns(ImageRangeWarning, match=ZERO_ONE):
        metric(a, b)


def test_no_false_alarm_on_the_toy_worlds_images(pipe, scenes, cases):
    """Every scene and every ToyBench source and target has a negative value (measured: 0 of
    2000 scenes of make_dataset(2000, seed=0), 0 of 600 ToyBench images)."""
    source, target, mask, _, _ = toybench.case_batch(cases)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for images in (scenes, source, target):
            assert (images < 0).flatten(1).any(1).all()
            pipe.base.check_images(images)
            metrics.psnr(images, images)
        # the masked metrics of toybench.evaluate, on composites with white backgrounds too
        keep = ~mask
        metrics.masked_psnr(target, source, keep)
        metrics.ssim(target, source, keep=keep)


# ------------------------------------------------------------- F. an empty region

EMPTY_REGION_METRICS = {
    "masked_mse": metrics.masked_mse,
    "masked_psnr": metrics.masked_psnr,
    "ssim": lambda a, b, keep: metrics.ssim(a, b, keep=keep),
}


@pytest.mark.parametrize("name", list(EMPTY_REGION_METRICS))
@pytest.mark.parametrize("empty", [[0], [1], [0, 1, 2]], ids=["first", "middle", "all"])
def test_an_empty_region_scores_nan(scenes, name, empty):
    a, b = scenes[:3], scenes[3:6]
    keep = torch.ones(3, 32, 32, dtype=torch.bool)
    keep[:, :, :16] = False  # half of every image
    keep[empty] = False
    values = EMPTY_REGION_METRICS[name](a, b, keep)
    assert values.shape == (3,)
    assert [math.isnan(v) for v in values.tolist()] == [i in empty for i in range(3)]


def test_the_issues_example_of_kind_f(scenes):
    keep = torch.zeros(2, 32, 32, dtype=torch.bool)
    assert torch.isnan(metrics.masked_psnr(scenes[:2], scenes[2:4], keep)).all()


def test_a_region_of_one_pixel_still_scores(scenes):
    keep = torch.zeros(1, 32, 32, dtype=torch.bool)
    keep[0, 3, 4] = True
    for metric in EMPTY_REGION_METRICS.values():
        assert torch.isfinite(metric(scenes[:1], scenes[1:2], keep)).all()


def row(edit_type, bg_psnr, **others):
    values = {key: 1.0 for key in toybench.METRICS} | {"bg_psnr": bg_psnr} | others
    return {"id": "x", "edit_type": edit_type, **values}


def test_summary_counts_skipped_cases_and_averages_the_others():
    rows = [row("color", 20.0), row("color", NAN, bg_mse=NAN, bg_ssim=NAN), row("color", 30.0),
            row("shape", NAN, bg_mse=NAN)]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no "mean of empty slice"
        summary = toybench.summarize(rows)
    assert summary["color"]["cases"] == 3 and summary["color"]["skipped"] == 1
    assert summary["color"]["bg_psnr"] == 25.0 and summary["color"]["bg_ssim"] == 1.0
    assert summary["shape"]["skipped"] == 1 and math.isnan(summary["shape"]["bg_psnr"])
    assert summary["all"]["skipped"] == 2 and summary["all"]["bg_psnr"] == 25.0
    assert summary["all"]["clip_t"] == 1.0  # never NaN: every case counts


def test_summary_without_nan_is_the_plain_mean():
    rows = [row("color", 20.0 + i / 7, attribute_ok=bool(i % 2)) for i in range(9)]
    summary = toybench.summarize(rows)["all"]
    assert summary["skipped"] == 0
    assert summary["bg_psnr"] == float(np.mean([r["bg_psnr"] for r in rows]))
    assert summary["attribute_ok"] == float(np.mean([r["attribute_ok"] for r in rows]))


def test_no_toybench_case_has_an_empty_background(cases):
    """So the committed ToyBench numbers cannot change: every keep region is non-empty (the
    smallest keeps 72 of 1024 pixels)."""
    _, _, mask, _, _ = toybench.case_batch(cases)
    assert len(cases) == 300
    assert (~mask).flatten(1).sum(1).min() >= 72
