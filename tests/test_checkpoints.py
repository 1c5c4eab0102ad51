"""Safetensors checkpoints (resumable, no pickle) and the sha256 manifest of shipped weights."""

import json
import struct
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open

from icd_lite.world.checkpoints import (CheckpointError, load_state, read_manifest, record,
                                        save_state, sha256, verified_path)


def small_model():
    return torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 2))


def adamw(model):
    return torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)


def train(model, optimizer, steps, start=0):
    for step in range(start, start + steps):
        generator = torch.Generator().manual_seed(step)
        x = torch.randn(16, 4, generator=generator)
        loss = (model(x) - x[:, :2].sin()).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def test_resume_equals_uninterrupted_training(tmp_path):
    torch.manual_seed(0)
    reference = small_model()
    torch.manual_seed(0)
    model = small_model()
    reference_optimizer, optimizer = adamw(reference), adamw(model)
    train(reference, reference_optimizer, 6)

    train(model, optimizer, 3)
    path = tmp_path / "ckpt" / "model.safetensors"  # save_state creates the folder
    save_state(path, model, optimizer, step=3, kind="toy")

    torch.manual_seed(123)  # a fresh model with other weights
    resumed = small_model()
    resumed_optimizer = adamw(resumed)
    assert load_state(path, resumed, resumed_optimizer, kind="toy") == 3
    for a, b in zip(resumed.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)
    train(resumed, resumed_optimizer, 3, start=3)

    for a, b in zip(resumed.state_dict().values(), reference.state_dict().values()):
        assert torch.equal(a, b)
    moments = resumed_optimizer.state_dict()["state"]
    for index, state in reference_optimizer.state_dict()["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(moments[index][name]), torch.as_tensor(value))

    # the AdamW moments matter: resuming from the weights alone does not reproduce the run
    fresh = small_model()
    load_state(path, fresh, kind="toy")
    fresh_optimizer = adamw(fresh)
    train(fresh, fresh_optimizer, 3, start=3)
    assert not torch.equal(fresh[0].weight, reference[0].weight)


def test_weights_only_load_keeps_the_optimizer_untouched(tmp_path):
    model = small_model()
    path = tmp_path / "weights.safetensors"
    save_state(path, model, step=7, kind="toy")  # no optimizer: weights only
    other = small_model()
    optimizer = adamw(other)
    assert load_state(path, other, optimizer) == 7
    assert optimizer.state_dict()["state"] == {}
    for a, b in zip(other.state_dict().values(), model.state_dict().values()):
        assert torch.equal(a, b)


SAVE_IN_A_NEW_PROCESS = """
import sys
from pathlib import Path

import torch
from icd_lite.world.checkpoints import save_state
torch.manual_seed(0)
save_state(Path(sys.argv[1]), torch.nn.Linear(4, 2), kind="toy")
"""


def test_final_weights_are_byte_identical_across_processes(tmp_path):
    """Each process orders safetensors' metadata keys at random; final weights carry one key, so
    two processes saving the same weights write the same bytes (and the manifest's sha256)."""
    paths = [tmp_path / "first.safetensors", tmp_path / "second.safetensors"]
    for path in paths:
        subprocess.run([sys.executable, "-c", SAVE_IN_A_NEW_PROCESS, str(path)], check=True)
    assert paths[0].read_bytes() == paths[1].read_bytes()
    with safe_open(str(paths[0]), "pt") as file:
        assert file.metadata() == {"kind": "toy"}
    assert load_state(paths[0], torch.nn.Linear(4, 2), kind="toy") == 0


def test_file_is_safetensors_without_pickle(tmp_path):
    model, path = small_model(), tmp_path / "model.safetensors"
    optimizer = adamw(model)
    train(model, optimizer, 1)
    save_state(path, model, optimizer, step=1, kind="vae")
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata()
        keys = set(file.keys())
    assert metadata["kind"] == "vae" and metadata["step"] == "1"
    assert json.loads(metadata["param_groups"])[0]["lr"] == 1e-2
    assert {f"model.{k}" for k in model.state_dict()} <= keys
    assert any(k.startswith("optimizer.") for k in keys)

    data = path.read_bytes()
    assert data[:1] != b"\x80"  # a pickle (torch.save) starts with the PROTO opcode
    (header_length,) = struct.unpack("<Q", data[:8])  # safetensors: u64 little-endian length
    assert 8 + header_length <= len(data)
    header = json.loads(data[8:8 + header_length])
    assert header["__metadata__"]["kind"] == "vae"
    assert set(header) - {"__metadata__"} == keys  # every tensor is described by the JSON header


def test_wrong_kind_is_refused(tmp_path):
    path = tmp_path / "vae.safetensors"
    save_state(path, small_model(), kind="vae")
    with pytest.raises(CheckpointError) as info:
        load_state(path, small_model(), kind="unet")
    message = str(info.value)
    assert "'vae'" in message and "'unet'" in message and "make train" in message


def test_other_architecture_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "model.safetensors"
    save_state(path, small_model(), kind="toy")
    wider = torch.nn.Sequential(torch.nn.Linear(4, 9), torch.nn.ReLU(), torch.nn.Linear(9, 2))
    with pytest.raises(CheckpointError, match="make train"):
        load_state(path, wider, kind="toy")
    with pytest.raises(CheckpointError, match="different"):  # other parameter names
        load_state(path, torch.nn.Linear(4, 2))


@pytest.fixture
def shipped(tmp_path):
    """A weights folder with one recorded file, as `make train` leaves it."""
    manifest = tmp_path / "weights" / "manifest.json"
    save_state(manifest.parent / "clip.safetensors", small_model(), kind="clip")
    record("clip.safetensors", "python -m icd_lite.world.train", manifest=manifest,
           train_minutes=1.5)
    return manifest


def test_record_writes_the_entry(shipped):
    path = shipped.parent / "clip.safetensors"
    entry = read_manifest(shipped)["clip.safetensors"]
    assert entry["sha256"] == sha256(path) and entry["bytes"] == path.stat().st_size
    assert entry["command"] == "python -m icd_lite.world.train"
    assert entry["train_minutes"] == 1.5 and entry["commit"]
    save_state(shipped.parent / "vae.safetensors", small_model(), kind="vae")
    record("vae.safetensors", "make train", manifest=shipped, scaling_factor=0.5)
    assert set(read_manifest(shipped)) == {"clip.safetensors", "vae.safetensors"}  # appended


def test_verified_path_accepts_the_recorded_file(shipped):
    path = verified_path("clip.safetensors", manifest=shipped)
    assert path == shipped.parent / "clip.safetensors"


def test_a_changed_byte_is_caught(shipped):
    path = shipped.parent / "clip.safetensors"
    data = bytearray(path.read_bytes())
    data[-1] ^= 1  # one bit of the last weight
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="sha256") as info:
        verified_path("clip.safetensors", manifest=shipped)
    assert "make train" in str(info.value)


def test_missing_file_unknown_name_and_missing_manifest(shipped, tmp_path):
    (shipped.parent / "clip.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        verified_path("clip.safetensors", manifest=shipped)
    with pytest.raises(CheckpointError, match="not in the manifest"):
        verified_path("unet.safetensors", manifest=shipped)
    with pytest.raises(CheckpointError, match="make train"):
        verified_path("clip.safetensors", manifest=tmp_path / "nowhere" / "manifest.json")


def test_git_lfs_pointer_is_recognised(shipped):
    pointer = ("version https://git-lfs.github.com/spec/v1\n"
               "oid sha256:" + "0" * 64 + "\nsize 123456\n")
    (shipped.parent / "clip.safetensors").write_text(pointer)
    with pytest.raises(CheckpointError, match="git lfs pull"):
        verified_path("clip.safetensors", manifest=shipped)
