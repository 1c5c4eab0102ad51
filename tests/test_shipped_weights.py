"""The weights committed in icd_lite/world/weights/ load, match their manifest, and work."""

import json
import re

import pytest
import torch

from icd_lite.experiments.world_quality import single_object_scenes
from icd_lite.components import load_components
from icd_lite.metrics import ToyPerception
from icd_lite.world import checkpoints
from icd_lite.world.scenes import make_dataset

NAMES = ("clip.safetensors", "vae.safetensors", "unet.safetensors")


@pytest.fixture(scope="module")
def toy():
    return load_components("toy")


def test_manifest_lists_every_shipped_file_with_its_provenance():
    manifest = checkpoints.read_manifest()
    for name in NAMES:
        entry = manifest[name]
        assert checkpoints.sha256(checkpoints.verified_path(name)) == entry["sha256"]
        launcher = r"(python -m|torchrun --nproc_per_node \d+ -m)"
        assert re.match(launcher + r" icd_lite\.world\.train --stage ", entry["command"])
        assert len(entry["commit"]) >= 40 and entry["train_minutes"] > 0
    total = sum(manifest[name]["bytes"] for name in NAMES)
    assert total <= 25 * 2**20, f"shipped weights are {total / 2**20:.1f} MB, over 25 MB"


def test_vae_reconstructs_held_out_scenes(toy):
    images, _, _ = make_dataset(16, seed=123)
    reconstruction = toy.decode_latents(toy.encode_images(images))
    mse = ((reconstruction - images) / 2).pow(2).mean()
    assert -10 * torch.log10(mse) > 25  # the bench measures ~30 dB on 500 images


def test_teacher_predicts_noise_better_than_chance(toy):
    images, captions, _ = make_dataset(32, seed=124)
    x0 = toy.encode_images(images)
    eps = torch.randn(x0.shape, generator=torch.Generator().manual_seed(0))
    t = torch.full((32,), 500)
    from icd_lite.schedule import SD15_SCHEDULE

    x_t = SD15_SCHEDULE.add_noise(x0, eps, t)
    with torch.no_grad():
        prediction = toy.eps_model()(x_t, t, toy.encode_prompt(captions))
    assert (prediction - eps).pow(2).mean() < 0.5  # predicting 0 would score 1.0


def test_clip_reads_decoded_images_almost_as_well_as_real_ones(toy):
    """Every generated image leaves through the VAE decoder; the CLIP's third training stage
    (decoded images) raised its shape accuracy on reconstructions from 86 % to ~94 %."""
    scenes, _, real = single_object_scenes(200, seed=7)
    with torch.no_grad():
        decoded = toy.decode_latents(toy.encode_images(real))
    perception = ToyPerception(toy.clip, toy.tokenizer)
    on_real = perception.attribute_accuracy(real, scenes)
    on_decoded = perception.attribute_accuracy(decoded, scenes)
    assert on_real["shape"] >= 0.95 and on_decoded["shape"] >= 0.9, (on_real, on_decoded)
    assert min(on_decoded["color"], on_decoded["background"]) >= 0.97, on_decoded


def test_every_shipped_student_pair_is_a_verified_save_pretrained_folder():
    """Seven pairs (the paper's ablation recipes), each a diffusers folder whose two weights
    files match the manifest, with the provenance of their distillation run."""
    from icd_lite.distill import RECIPES
    from icd_lite.pipeline import shipped_recipes, student_folder

    assert shipped_recipes() == list(RECIPES)
    manifest = checkpoints.read_manifest()
    for name in RECIPES:
        folder = student_folder(name)  # checks both sha256
        index = json.loads((folder / "model_index.json").read_text())
        assert index["_class_name"] == "ICDPipeline"
        assert len(index["reverse_boundaries"]) == RECIPES[name].m
        for role in ("forward_unet", "reverse_unet"):
            entry = manifest[f"students/{name}/{role}/diffusion_pytorch_model.safetensors"]
            assert entry["recipe"] == name and entry["command"].startswith(
                "python -m icd_lite.distill")
