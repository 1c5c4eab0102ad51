"""``load_components``: the toy world as the diffusers / transformers objects SD1.5 is made of.

The shipped weights are not needed: randomly initialised networks are saved with a manifest in a
temporary folder, and ``icd_lite.world.loading`` is pointed at it.
"""

import functools
import time

import pytest
import torch
from diffusers import (AutoencoderKL, DDIMScheduler, StableDiffusionPipeline,
                       UNet2DConditionModel)
from transformers import CLIPTextModel, PreTrainedTokenizerFast

from icd_lite import components as components_module
from icd_lite.components import Components, ddim_scheduler, load_components
from icd_lite.world import checkpoints, loading
from icd_lite.world.models import build_clip, build_unet, build_vae
from icd_lite.world.text import MAX_LENGTH, UnknownWordError, build_tokenizer

SCALING_FACTOR = 0.37
PROMPT = "a small red circle on a blue background"


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    """load_components("toy") on random-init weights recorded in a temporary manifest."""
    weights = tmp_path_factory.mktemp("weights")
    manifest = weights / "manifest.json"
    torch.manual_seed(0)
    models = {"clip": build_clip(build_tokenizer()), "vae": build_vae(), "unet": build_unet()}
    for kind, model in models.items():
        checkpoints.save_state(weights / f"{kind}.safetensors", model, kind=kind)
        extra = {"scaling_factor": SCALING_FACTOR} if kind == "vae" else {}
        checkpoints.record(f"{kind}.safetensors", "test", manifest=manifest, **extra)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(loading, "verified_path",
                      functools.partial(checkpoints.verified_path, manifest=manifest))
        patch.setattr(loading, "read_manifest",
                      functools.partial(checkpoints.read_manifest, manifest=manifest))
        components = load_components("toy")
    return components, models


def test_ddim_scheduler_conventions():
    scheduler = ddim_scheduler()
    assert scheduler.config.timestep_spacing == "trailing"
    assert scheduler.config.set_alpha_to_one and scheduler.final_alpha_cumprod == 1
    assert scheduler.config.num_train_timesteps == 1000 and not scheduler.config.clip_sample
    scheduler.set_timesteps(50)
    assert scheduler.timesteps.tolist() == list(range(999, 0, -20))  # 999, 979, ..., 19
    assert scheduler.timesteps[-1] == 19 and len(scheduler.timesteps) == 50


def test_load_toy_components_types_and_modes(toy):
    components, _ = toy
    assert isinstance(components, Components) and components.preset == "toy"
    assert isinstance(components.unet, UNet2DConditionModel)
    assert isinstance(components.vae, AutoencoderKL)
    assert isinstance(components.text_encoder, CLIPTextModel)
    assert isinstance(components.tokenizer, PreTrainedTokenizerFast)
    assert isinstance(components.scheduler, DDIMScheduler)
    assert components.image_size == 32 and components.device == torch.device("cpu")
    for module in (components.unet, components.vae, components.text_encoder, components.clip):
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())


def test_load_toy_components_loads_the_recorded_weights(toy):
    components, models = toy
    assert components.vae.config.scaling_factor == SCALING_FACTOR  # from the manifest
    for name, model in (("unet", components.unet), ("vae", components.vae),
                        ("clip", components.clip)):
        for key, value in models[name].state_dict().items():
            assert torch.equal(model.state_dict()[key], value), (name, key)
    tokens = components.tokenizer([PROMPT], padding="max_length", max_length=MAX_LENGTH,
                                  return_tensors="pt")
    with torch.no_grad():  # with the padding masked, as the teacher was trained
        expected = models["clip"].text_model(input_ids=tokens.input_ids,
                                             attention_mask=tokens.attention_mask)
    torch.testing.assert_close(components.encode_prompt([PROMPT]), expected.last_hidden_state,
                               rtol=0, atol=0)
    assert components.text_encoder.config.use_attention_mask  # so the stock pipeline masks too


def test_stock_stable_diffusion_pipeline_runs_the_toy_world(toy):
    components, _ = toy
    pipe = StableDiffusionPipeline(vae=components.vae, text_encoder=components.text_encoder,
                                   tokenizer=components.tokenizer, unet=components.unet,
                                   scheduler=components.scheduler, safety_checker=None,
                                   feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.vae_scale_factor == 4  # 32x32 images <-> 8x8 latents

    def generate():
        return pipe(PROMPT, num_inference_steps=2, guidance_scale=8.0, height=32, width=32,
                    output_type="pt", generator=torch.Generator().manual_seed(0)).images

    images = generate()
    assert images.shape == (1, 3, 32, 32) and torch.isfinite(images).all()
    assert images.min() >= 0 and images.max() <= 1  # "pt" output is on the [0, 1] scale
    assert torch.equal(generate(), images)  # seeded
    # trailing spacing: 2 steps are 999 and 499
    assert pipe.scheduler.timesteps.tolist() == [999, 499]


def test_encode_prompt(toy):
    components, _ = toy
    embeddings = components.encode_prompt([PROMPT, "", "A large BLUE square on a white background"])
    assert embeddings.shape == (3, MAX_LENGTH, 64)
    assert components.encode_prompt(PROMPT).shape == (1, MAX_LENGTH, 64)  # a str is one prompt
    torch.testing.assert_close(  # the prompt is normalised before tokenizing
        components.encode_prompt(["A large BLUE square, on a white background."]),
        embeddings[2:], rtol=0, atol=0)
    with pytest.raises(UnknownWordError, match="circle") as info:
        components.encode_prompt(["a small red dog on a blue background"])
    assert "'dog'" in str(info.value) and "vocabulary" in str(info.value)


def test_encode_and_decode_images(toy):
    components, models = toy
    images = torch.rand(2, 3, 32, 32) * 2 - 1
    latents = components.encode_images(images)
    assert latents.shape == (2, 4, 8, 8)
    with torch.no_grad():
        mean = models["vae"].encode(images).latent_dist.mean
    torch.testing.assert_close(latents, mean * SCALING_FACTOR)
    decoded = components.decode_latents(latents)
    assert decoded.shape == (2, 3, 32, 32)
    assert decoded.min() >= -1 and decoded.max() <= 1
    with torch.no_grad():
        expected = models["vae"].decode(mean).sample.clamp(-1, 1)
    torch.testing.assert_close(decoded, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("images, hint", [
    (torch.zeros(1, 3, 64, 64), "resize"),
    (torch.zeros(1, 4, 32, 32), "RGB"),
    (torch.zeros(1, 1, 32, 32), "RGB"),
    (torch.zeros(3, 32, 32), r"\[B, 3, 32, 32\]"),
    (torch.full((1, 3, 32, 32), 255.0), r"127\.5"),
    (torch.full((1, 3, 32, 32), -2.0), r"\[-1, 1\]"),
])
def test_encode_images_explains_bad_input(toy, images, hint):
    components, _ = toy
    with pytest.raises(ValueError, match=hint):
        components.encode_images(images)


def test_unknown_preset():
    with pytest.raises(ValueError, match="toy"):
        load_components("nope")


@pytest.mark.filterwarnings("ignore:The `local_dir_use_symlinks` argument:UserWarning")
def test_sd15_offline_fails_fast_with_advice():
    import huggingface_hub.constants

    if not huggingface_hub.constants.HF_HUB_OFFLINE:
        pytest.skip("the hub is online in this session (HF_HUB_OFFLINE not set at import)")
    start = time.time()
    with pytest.raises(OSError) as info:
        load_components("sd15", model_id="stable-diffusion-v1-5/stable-diffusion-v1-5")
    elapsed = time.time() - start
    if elapsed > 10:
        pytest.skip(f"loading sd15 offline took {elapsed:.0f} s (> 10 s): not failing fast here")
    message = str(info.value)
    assert "Hugging Face hub" in message and "local copy" in message


def test_sd15_float16_on_cpu_is_refused(monkeypatch):
    monkeypatch.setattr(components_module.torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="float32"):
        load_components("sd15", dtype=torch.float16)
