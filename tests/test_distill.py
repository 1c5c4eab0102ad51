"""The distillation loop: it lowers the reconstruction error, resumes exactly, trains LoRA, and
ships pairs that load back (on the shipped toy teacher, a few steps on a handful of latents)."""

import pytest
import torch

from icd_lite import distill, load_pipeline
from icd_lite.metrics import mse
from icd_lite.pipeline import ICDPipeline
from icd_lite.students import add_lora, merged_unet, student_from_teacher
from icd_lite.world import checkpoints
from icd_lite.world.scenes import make_dataset


def test_encode_dataset_puts_the_null_prompt_first(components, data):
    assert data.latents.shape == (8, 4, 8, 8)
    assert data.embeddings.shape[0] == 1 + len(set(data.caption_index.tolist()))
    torch.testing.assert_close(data.embeddings[0], components.encode_prompt([""])[0])
    x0, cond, null = data.batch(3, torch.Generator().manual_seed(0))
    assert x0.shape == (3, 4, 8, 8) and torch.equal(null, data.embeddings[:1].expand_as(cond))


def test_distillation_lowers_the_reconstruction_error(components, data):
    """24 steps of the full recipe make the pair reconstruct its training images better (the
    mean squared error of encode + decode at w = 1: 0.0169 -> 0.0135, measured). The consistency
    losses themselves first rise as the students leave the teacher they start from (reverse CD on
    a fixed batch: 0.070 -> 0.075 in 12 steps), so they are no test of a short run."""
    images, captions, _ = make_dataset(8, seed=9)

    @torch.no_grad()
    def reconstruction_error(forward, reverse, boundaries):
        pipe = ICDPipeline.from_components(components, forward.unet, reverse.unet, boundaries)
        reconstruction = pipe.reconstruct(images, captions, w=1.0).images
        return {"reconstruction_mse": mse(reconstruction, images).mean().item()}

    _, _, history = distill.distill(components, distill.RECIPES["G"], data, steps=24, batch=8,
                                    lr=1e-4, curve=reconstruction_error, eval_every=24)
    steps = [h for h in history if "reverse_cd" in h]
    assert set(steps[0]) == {"step", "reverse_cd", "forward_cd", "forward_preservation",
                             "reverse_preservation"}
    before, after = [h["reconstruction_mse"] for h in history if "seconds" in h]
    assert after < before


def test_recipe_e_trains_the_forward_model_by_l_f_alone(components, data):
    _, _, history = distill.distill(components, distill.RECIPES["E"], data, steps=1, batch=2)
    assert set(history[0]) == {"step", "reverse_cd", "forward_preservation"}


def test_resuming_gives_the_same_weights(components, data, tmp_path):
    recipe = distill.RECIPES["A"]
    straight = distill.distill(components, recipe, data, steps=4, batch=2, lr=1e-3)
    stem = tmp_path / "A"
    distill.distill(components, recipe, data, steps=2, batch=2, lr=1e-3, checkpoint=stem,
                    save_every=2)
    resumed = distill.distill(components, recipe, data, steps=4, batch=2, lr=1e-3,
                              checkpoint=stem, save_every=2)
    for a, b in zip(straight[1].parameters(), resumed[1].parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert [h["step"] for h in resumed[2]] == [1, 2, 3, 4]


def test_lora_distillation_and_merging(components, data):
    forward, reverse, history = distill.distill(components, distill.RECIPES["A"], data, steps=2,
                                                batch=2, lr=1e-2, lora_rank=4)
    assert len(history) == 2
    frozen = dict(components.unet.named_parameters())
    lora = [n for n, p in reverse.unet.named_parameters() if p.requires_grad]
    assert lora and all("lora_" in n or "cond_proj" in n for n in lora)
    x = torch.randn(2, 4, 8, 8)
    t = torch.tensor([500, 900])
    cond = data.embeddings[1:3]
    w = torch.tensor([0.0, 7.0])
    merged = merged_unet(reverse)
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    assert set(dict(merged.named_parameters())) == set(frozen) | {"time_embedding.cond_proj.weight"}
    with torch.no_grad():
        expected = reverse(x, t, t, cond, w)
        got = type(reverse)(merged)(x, t, t, cond, w)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


def test_ship_and_load_round_trip(components, data, tmp_path, monkeypatch):
    """A shipped pair is a save_pretrained folder; load_pipeline reads it back (float16 on disk),
    checked against the manifest."""
    monkeypatch.setattr(checkpoints, "WEIGHTS_DIR", tmp_path)
    monkeypatch.setattr(checkpoints, "MANIFEST", tmp_path / "manifest.json")
    forward, reverse, _ = distill.distill(components, distill.RECIPES["B"], data, steps=1,
                                          batch=2, lr=1e-2)
    history = [{"step": 1, "reconstruction_mse": 0.1, "frechet_distance": 0.2}]
    distill.ship("B", components, forward, reverse, history, "test", minutes=0.0)
    assert (tmp_path / "students" / "B" / "model_index.json").exists()
    pipe = load_pipeline("B", components)
    assert pipe.boundaries == distill.RECIPES["B"].boundaries and pipe.boundaries.m == 3
    x, t, cond = torch.randn(1, 4, 8, 8), torch.tensor([300]), data.embeddings[1:2]
    with torch.no_grad():
        for parameter in reverse.parameters():  # students ship as float16
            parameter.copy_(parameter.half().float())
        a = reverse(x, t, t, cond, torch.tensor([7.0]))
        b = pipe.reverse_student(x, t, t, cond, torch.tensor([7.0]))
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert distill.load_curve("B") == history
    with pytest.raises(ValueError, match="no shipped student pair 'C'; the toy world ships B"):
        load_pipeline("C", components)
    path = tmp_path / "students" / "B" / "reverse_unet" / "diffusion_pytorch_model.safetensors"
    corrupt = bytearray(path.read_bytes())
    corrupt[-1] ^= 0xFF
    path.write_bytes(bytes(corrupt))
    with pytest.raises(checkpoints.CheckpointError, match="sha256 does not match"):
        load_pipeline("B", components)


def test_unknown_recipe():
    with pytest.raises(ValueError, match="choose one of A, B, C"):
        distill.get_recipe("Z")


def test_student_of_a_student_is_rejected(components):
    student = add_lora(student_from_teacher(components.unet), rank=2)
    with pytest.raises(ValueError, match="already has a guidance embedding"):
        student_from_teacher(student.unet)
