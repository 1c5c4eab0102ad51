"""The encode / decode / generate API and the inversion baselines, on the shipped toy teacher.

Students built from the teacher (not yet distilled) *are* the teacher, so their m-step decoding
must equal m DDIM steps of the teacher over the boundaries: a parity test of the whole path.
"""

import pytest
import torch

from diffusers import DiffusionPipeline

from icd_lite import baselines
from icd_lite.pipeline import ICDPipeline, guidance_schedule
from icd_lite.schedule import default_boundaries
from icd_lite.solver import sample_ddim
from icd_lite.students import student_from_teacher
from icd_lite.world.scenes import make_dataset
from icd_lite.world.text import UnknownWordError


@pytest.fixture(scope="module")
def pipe(components):
    unet = components.unet
    return ICDPipeline.from_components(components, student_from_teacher(unet).unet.eval(),
                                       student_from_teacher(unet).unet.eval(),
                                       default_boundaries(4))


@pytest.fixture(scope="module")
def scenes():
    images, captions, _ = make_dataset(2, seed=5)
    return images, captions


def test_shapes_and_nfe(pipe, scenes):
    images, captions = scenes
    encoded = pipe.encode(images, captions)
    assert encoded.images is None and encoded.latents.shape == (2, *pipe.latent_shape)
    assert encoded.nfe == 4
    decoded = pipe.decode(encoded.latents, captions, w=8.0, tau=0.8)
    assert decoded.nfe == 4 and decoded.images.shape == images.shape
    assert decoded.images.min() >= -1 and decoded.images.max() <= 1
    assert pipe.reconstruct(images, captions).nfe == 8


def test_decoding_with_teacher_copies_is_ddim_over_the_boundaries(pipe, components):
    prompts = ["a large red circle on a blue background"] * 2
    noise = torch.randn(2, *pipe.latent_shape, generator=torch.Generator().manual_seed(0))
    got = pipe.decode(noise, prompts, w=1.0).latents
    cond = components.encode_prompt(prompts)
    expected = sample_ddim(components.eps_model(), noise, [999, 779, 519, 259, 0],
                           extra_args={"cond": cond}, disable=True)
    torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)


def test_generate_is_seeded(pipe):
    a = pipe.generate("a small blue square on a white background", seed=3).images
    b = pipe.generate("a small blue square on a white background", seed=3).images
    c = pipe.generate("a small blue square on a white background", seed=4).images
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_bad_arguments_get_clear_errors(pipe, scenes):
    images, captions = scenes
    with pytest.raises(ValueError, match="one prompt per image"):
        pipe.encode(images, captions + captions)
    with pytest.raises(ValueError, match="noise must have shape"):
        pipe.decode(torch.randn(2, 4, 16, 16), captions)
    with pytest.raises(ValueError, match="must be >= 1"):
        pipe.decode(torch.randn(2, *pipe.latent_shape), captions, w=0.5)
    with pytest.raises(UnknownWordError):
        pipe.generate("a red dragon on a blue background")
    with pytest.raises(ValueError, match="expects 32x32"):
        pipe.encode(torch.zeros(1, 3, 64, 64), "a red circle on a blue background")
    with pytest.raises(ValueError, match="tau"):
        guidance_schedule(8.0, tau=1.5)


def test_baseline_nfe_counts(components, scenes):
    images, captions = scenes
    assert baselines.ddim_reconstruct(components, images, captions, steps=10).nfe == 20
    assert baselines.ddim_reconstruct(components, images, captions, w=8.0, steps=10).nfe == 30
    assert baselines.negative_prompt_reconstruct(components, images, captions, steps=10).nfe == 30


def test_negative_prompt_inversion_equals_unguided_ddim(components, scenes):
    images, captions = scenes
    npi = baselines.negative_prompt_reconstruct(components, images, captions, w=8.0, steps=10)
    ddim = baselines.ddim_reconstruct(components, images, captions, w=1.0, steps=10)
    torch.testing.assert_close(npi.latents, ddim.latents, rtol=0, atol=1e-5)


def test_null_text_inversion_repairs_guided_decoding(components, scenes):
    images, captions = scenes
    guided = baselines.ddim_reconstruct(components, images, captions, w=8.0, steps=10)
    # the paper's 10 inner steps per time step (5 left the 3200-step teacher's error at 0.51x)
    nti = baselines.null_text_reconstruct(components, images, captions, w=8.0, steps=10,
                                          inner_steps=10)
    unguided = baselines.ddim_reconstruct(components, images, captions, w=1.0, steps=10)
    z0 = components.encode_images(images)
    error = {name: (out.latents - z0).pow(2).mean().item() for name, out in [("guided", guided), ("nti", nti), ("unguided", unguided)]}
    assert error["nti"] < 0.5 * error["guided"], error
    assert nti.nfe > 30  # the optimisation's forward passes count


def test_null_text_inversion_keeps_one_embedding_per_step(components, scenes):
    images, captions = scenes
    z0, cond, null = baselines.prepare(components, images, captions)
    _, nulls = baselines.null_text_inversion(components, z0, cond, null, w=8.0, steps=10,
                                             inner_steps=3)
    # each u_t is its own tensor: Adam's in-place updates of later steps must not reach it
    assert len({u.data_ptr() for u in nulls}) == len(nulls) == 10
    assert (nulls[0] - nulls[-1]).abs().max() > 1e-3


def test_is_a_diffusers_pipeline_with_the_six_modules(pipe):
    assert isinstance(pipe, DiffusionPipeline)
    assert set(pipe.components) == {"forward_unet", "reverse_unet", "vae", "text_encoder",
                                    "tokenizer", "scheduler"}
    assert pipe.device == torch.device("cpu") and pipe.dtype == torch.float32


def test_save_pretrained_and_from_pretrained_round_trip(pipe, scenes, tmp_path):
    """Every module and the boundaries survive a save; the loaded pipeline reconstructs the
    same images, and moves with .to(dtype) like any diffusers pipeline."""
    images, captions = scenes
    small = ICDPipeline.from_components(pipe.base, pipe.forward_unet, pipe.reverse_unet,
                                        default_boundaries(2))
    small.save_pretrained(tmp_path)
    loaded = ICDPipeline.from_pretrained(tmp_path)
    assert loaded.boundaries == default_boundaries(2) and loaded.config.preset == "toy"
    expected = small.reconstruct(images, captions, w=8.0, tau=0.8)
    got = loaded.reconstruct(images, captions, w=8.0, tau=0.8)
    assert got.nfe == expected.nfe == 4
    torch.testing.assert_close(got.images, expected.images, rtol=0, atol=1e-6)
    loaded.to(torch.float64)
    assert loaded.reverse_unet.dtype == loaded.vae.dtype == torch.float64


def test_call_as_lcm_users_expect(pipe):
    """pipe(prompt, guidance_scale=...) returns PIL images by default; the seed lives in a CPU
    generator; num_inference_steps must match the boundaries."""
    prompt = "a small blue square on a white background"
    out = pipe(prompt, guidance_scale=8.0, num_images_per_prompt=2,
               generator=torch.Generator().manual_seed(3))
    assert len(out.images) == 2 and out.images[0].size == (32, 32) and out.nfe == 4
    tensors = pipe(prompt, generator=torch.Generator().manual_seed(3), output_type="pt").images
    expected = (pipe.generate(prompt, w=8.0, tau=0.8, seed=3).images + 1) / 2
    torch.testing.assert_close(tensors, expected, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="decodes in m = 4 steps"):
        pipe(prompt, num_inference_steps=50)


def test_the_base_of_a_pipeline_has_no_teacher(pipe, scenes):
    images, captions = scenes
    with pytest.raises(ValueError, match="no teacher UNet"):
        baselines.ddim_reconstruct(pipe.base, images, captions, steps=2)
