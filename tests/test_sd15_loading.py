"""The SD1.5 loader on a fabricated release: layout checks, alpha, fusing, teacher, BPE tokenizer.

The fabricated folder (``icd_lite.sd15.fabricate``, tiny size) has the released files' exact
layout: peft keys ``unet.base_model.model.<module>.lora_A.weight``, rank 64, no alpha tensors.
"""

import copy
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from icd_lite.editing import icd_edit
from icd_lite.schedule import Boundaries
from icd_lite.sd15 import fabricate_model, fabricated_sources, load_sd15_pipeline
from icd_lite.sd15.fabricate import LORA_DIR, TEACHER_DIR, TEACHER_PT
from icd_lite.sd15.loading import (LORA_ALPHA, RELEASES, LoRAFileError, boundaries_from_names,
                                   load_teacher, lora_files, lora_modules, parse_lora_name,
                                   read_lora)
from icd_lite.students import SD15_LORA_TARGETS


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return fabricate_model(tmp_path_factory.mktemp("sd15") / "tiny", "tiny")


@pytest.fixture(scope="module")
def teacher(folder):
    return load_teacher(folder / TEACHER_DIR)


@pytest.fixture(scope="module")
def pipe(folder):
    return load_sd15_pipeline(**fabricated_sources(folder), device="cpu")


def forward_file(folder, release="4step-v1"):
    return folder / LORA_DIR / RELEASES[release].files[0]


def peft_merge(teacher, path, alpha=None):
    """The reference: peft's own model with the file's state dict, merged and unloaded."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    config = LoraConfig(r=64, target_modules=SD15_LORA_TARGETS)  # peft's default alpha: 8
    if alpha is not None:
        config = LoraConfig(r=64, lora_alpha=alpha, target_modules=SD15_LORA_TARGETS)
    model = get_peft_model(copy.deepcopy(teacher), config)
    state = {key.removeprefix("unet."): value for key, value in load_file(str(path)).items()}
    result = set_peft_model_state_dict(model, state)
    assert not result.unexpected_keys
    return model.merge_and_unload()


def max_weight_difference(a, b) -> float:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return max((sa[k].float() - sb[k].float()).abs().max().item() for k in sa)


def test_fabricated_files_have_the_released_layout(folder, teacher):
    state = load_file(str(forward_file(folder)))
    assert all(k.startswith("unet.base_model.model.") for k in state)
    assert not any(k.endswith(".alpha") for k in state)
    modules = lora_modules(teacher)
    assert len(state) == 2 * len(modules) > 500  # 556 at full size, 554 here (one shortcut less)
    assert {v.shape[0] for k, v in state.items() if ".lora_A." in k} == {64}
    assert teacher.config.time_cond_proj_dim == 512
    for release in RELEASES.values():
        assert all((folder / LORA_DIR / name).exists() for name in release.files)


def test_loader_equals_peft_merge(pipe, folder, teacher):
    """The round trip: the fused forward student is peft's merge_and_unload within 1e-6."""
    reference = peft_merge(teacher, forward_file(folder))
    assert max_weight_difference(pipe.forward_unet, reference) <= 1e-6
    assert max_weight_difference(pipe.forward_unet, teacher) > 1e-3  # the LoRA did something
    reverse = peft_merge(teacher, folder / LORA_DIR / RELEASES["4step-v1"].files[1])
    assert max_weight_difference(pipe.reverse_unet, reverse) <= 1e-6


def test_alpha_matters_and_a_missing_alpha_is_refused(pipe, folder, teacher):
    # What a loader that ignores the missing alpha builds (diffusers assumes alpha = rank):
    # another model, far beyond the round trip's 1e-6, so the test above would catch it.
    unscaled = peft_merge(teacher, forward_file(folder), alpha=64)
    assert max_weight_difference(pipe.forward_unet, unscaled) > 1e-2
    with pytest.raises(LoRAFileError, match="missing alpha.*lora_alpha=8"):
        load_sd15_pipeline(**fabricated_sources(folder), device="cpu", lora_alpha=None)
    assert LORA_ALPHA == 8


def edited_file(tmp_path, folder, name, edit):
    state = load_file(str(forward_file(folder)))
    path = tmp_path / name
    save_file(edit(state), str(path))
    return path


def test_wrong_prefix_is_caught(tmp_path, folder, teacher):
    def kohya(state):
        return {k.replace("unet.base_model.model.", "lora_unet_").replace("lora_A", "lora_down"):
                v for k, v in state.items()}
    path = edited_file(tmp_path, folder, "forward-19-259-519-779.safetensors", kohya)
    with pytest.raises(LoRAFileError, match="wrong key prefix.*unet.base_model.model"):
        read_lora(path, teacher)

    def diffusers_names(state):
        return {k.replace("unet.base_model.model.", "unet."): v for k, v in state.items()}
    path = edited_file(tmp_path, folder, "forward-19-259-519-779.safetensors", diffusers_names)
    with pytest.raises(LoRAFileError, match="wrong key prefix"):
        read_lora(path, teacher)


def test_alpha_tensors_missing_key_and_wrong_rank_are_caught(tmp_path, folder, teacher):
    name = "forward-19-259-519-779.safetensors"

    def with_alpha(state):
        key = next(iter(state)).rsplit(".lora_", 1)[0] + ".alpha"
        return {**state, key: torch.tensor(8.0)}
    with pytest.raises(LoRAFileError, match="alpha tensors"):
        read_lora(edited_file(tmp_path, folder, name, with_alpha), teacher)

    def drop_one(state):
        return {k: v for k, v in state.items() if "up_blocks.1.attentions.0.proj_out" not in k}
    with pytest.raises(LoRAFileError, match="missing key: 2 of .*proj_out"):
        read_lora(edited_file(tmp_path, folder, name, drop_one), teacher)

    def rank_4(state):
        return {k: (v[:4] if ".lora_A." in k else v[:, :4]).contiguous() for k, v in state.items()}
    path = edited_file(tmp_path, folder, name, rank_4)
    with pytest.raises(LoRAFileError, match="wrong rank.*rank 4.*expected 64.*rank=None"):
        read_lora(path, teacher)
    _, rank = read_lora(path, teacher, rank=None)  # a LoRA of your own: the rank is read
    assert rank == 4


def test_boundaries_come_from_the_names_and_are_checked(folder):
    assert parse_lora_name("iCD-SD15-reverse_259_519_779_999.safetensors") == (
        "reverse", (259, 519, 779, 999))
    for release in RELEASES.values():
        assert boundaries_from_names(*release.files) == release.boundaries
    assert RELEASES["4step-v1"].boundaries == Boundaries((0, 259, 519, 779), (259, 519, 779, 999))
    assert RELEASES["3step"].boundaries == Boundaries((0, 339, 699), (339, 699, 999))
    v1, v2 = RELEASES["4step-v1"].files, RELEASES["4step-v2"].files
    with pytest.raises(LoRAFileError, match="different boundaries"):
        boundaries_from_names(v1[0], v2[1])
    with pytest.raises(LoRAFileError, match="boundaries mismatch.*'3step'"):
        load_sd15_pipeline("3step", **{**fabricated_sources(folder), "loras": (
            folder / LORA_DIR / v1[0], folder / LORA_DIR / v1[1])}, device="cpu")
    with pytest.raises(LoRAFileError, match="cannot read boundaries"):
        parse_lora_name("pytorch_lora_weights.safetensors")
    with pytest.raises(ValueError, match="unknown release"):
        load_sd15_pipeline("5step", device="cpu")
    assert lora_files(folder / LORA_DIR, "4step-v2") == tuple(folder / LORA_DIR / f for f in v2)


def test_own_loras_as_adapters_match_the_fused_release(tmp_path, folder, pipe):
    """LoRAs you distilled: any boundaries in the names, rank read from the file, and peft
    adapters (fuse=False) computing what the fused students compute."""
    own = tmp_path / "own"
    own.mkdir()
    files = RELEASES["4step-v1"].files
    shutil.copy(folder / LORA_DIR / files[0], own / "my-forward-19-300-600-800.safetensors")
    shutil.copy(folder / LORA_DIR / files[1], own / "my-reverse-300-600-800-999.safetensors")
    adapters = load_sd15_pipeline(None, folder, folder / TEACHER_DIR, own, device="cpu",
                                  rank=None, fuse=False, with_base_unet=False)
    assert adapters.boundaries == Boundaries((0, 300, 600, 800), (300, 600, 800, 999))
    assert adapters.base.unet is None
    x = torch.randn(1, 4, 16, 16)
    cond = adapters.base.encode_prompt(["a photo of a cat"])
    w = torch.randn(1, 512)
    for role in ("forward_unet", "reverse_unet", "forward_unet"):  # switching back and forth
        mine = getattr(adapters, role)(x, torch.tensor([500]), encoder_hidden_states=cond,
                                       timestep_cond=w).sample
        fused = getattr(pipe, role)(x, torch.tensor([500]), encoder_hidden_states=cond,
                                    timestep_cond=w).sample
        torch.testing.assert_close(mine, fused, atol=1e-5, rtol=1e-5)
    assert not any(p.requires_grad for p in adapters.forward_unet.parameters())
    size = adapters.base.image_size
    edit = icd_edit(adapters, torch.rand(1, 3, size, size) * 2 - 1, "a photo of a cat",
                    "a photo of a dog", w=20.0, blend_words=[(("cat",), ("dog",))])
    assert edit.nfe == 8 and torch.isfinite(edit.images).all()  # P2P hooks the shared UNet


def test_teacher_from_the_pt_state_dict(folder, teacher):
    from_pt = load_teacher(folder / TEACHER_PT, base=folder)
    assert from_pt.config.time_cond_proj_dim == 512
    assert max_weight_difference(from_pt, teacher) == 0.0
    with pytest.raises(ValueError, match="no guidance embedding"):
        load_teacher(folder / "unet")  # plain SD1.5 is not the CFG-distilled teacher


def test_float16_on_cpu_and_the_offline_hub_get_one_line_errors(folder):
    with pytest.raises(ValueError, match="float16 on a CPU.*float32"):
        load_sd15_pipeline(**fabricated_sources(folder), device="cpu", dtype=torch.float16)
    with pytest.raises(OSError, match="Hugging Face hub.*folder"):
        load_sd15_pipeline(device="cpu")  # the default hub repositories, offline here


def test_full_size_architecture_matches_the_released_counts():
    """SD1.5's exact configs, counted on the meta device: the sizes of the released files."""
    from icd_lite.sd15.bench import architecture_table

    table = architecture_table()
    counts = table["parameters_millions"]
    assert table["lora_modules"] == 278  # 556 tensors
    assert counts["lora"] == pytest.approx(67.3, abs=0.1)  # 269 MB in float32
    assert counts["teacher"] == pytest.approx(859.7, abs=0.1)  # 3.44 GB in float32
    assert counts["teacher"] - counts["unet"] == pytest.approx(512 * 320 / 1e6, abs=0.01)
    assert counts["vae"] == pytest.approx(83.7, abs=0.1)
    assert counts["text"] == pytest.approx(123.1, abs=0.1)
    assert table["adapters_GB"] < table["fused_GB"] < 16  # both fit a T4 in float16
