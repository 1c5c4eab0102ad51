"""Safetensors checkpoints (never pickles) and the manifest of the shipped toy weights.

* ``save_state`` / ``load_state``: a model's weights, plus optionally its AdamW state and the
  step, in one ``.safetensors`` file, so that training can resume where it stopped.
* ``manifest.json`` records, for every shipped file, its sha256, the command that produced it and
  the git commit of the code; ``verified_path`` checks a file against it before anything loads.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import subprocess
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST = WEIGHTS_DIR / "manifest.json"
REBUILD = "run `make train` to rebuild the toy world's weights"


class CheckpointError(RuntimeError):
    """A weights file is missing, corrupt, or belongs to another model."""


def save_state(path: Path, model: torch.nn.Module, optimizer=None, step: int = 0,
               kind: str = "", seconds: float = 0.0) -> None:
    """Write the model's weights (and the optimizer's moments, if given) to a safetensors file;
    ``seconds`` is the training time so far, carried across resumed runs.

    Final weights (no optimizer, step 0) carry only their ``kind``: safetensors writes metadata
    keys in a random order, so a file with several keys gets new bytes, and a new sha256, on
    every run. With one key a rerun of the training reproduces the shipped file byte for byte.
    """
    tensors = {f"model.{k}": v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    metadata = {"kind": kind}
    if optimizer is not None or step or seconds:
        metadata.update(step=str(step), seconds=f"{seconds:.3f}")
    if optimizer is not None:
        state = optimizer.state_dict()
        for index, moments in state["state"].items():
            for name, value in moments.items():
                tensors[f"optimizer.{index}.{name}"] = torch.as_tensor(value).contiguous()
        metadata["param_groups"] = json.dumps(state["param_groups"])
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path), metadata=metadata)


def saved_seconds(path: Path) -> float:
    """The training time recorded in a checkpoint (0 if none)."""
    with safe_open(str(path), "pt") as file:
        return float((file.metadata() or {}).get("seconds", 0.0))


def load_state(path: Path, model: torch.nn.Module, optimizer=None, kind: str = "") -> int:
    """Load weights (and optimizer state) saved by ``save_state``; return the step."""
    with safe_open(str(path), "pt") as file:
        metadata = file.metadata() or {}
    if kind and metadata.get("kind") != kind:
        raise CheckpointError(f"{path} holds a {metadata.get('kind') or 'unknown'!r} model, "
                              f"not {kind!r}; {REBUILD}")
    tensors = load_file(str(path))
    weights = {k[len("model."):]: v for k, v in tensors.items() if k.startswith("model.")}
    try:
        model.load_state_dict(weights)
    except RuntimeError as error:
        raise CheckpointError(f"{path} does not fit this {kind or 'model'} (different "
                              f"architecture?): {str(error)[:300]}; {REBUILD}") from None
    if optimizer is not None and "param_groups" in metadata:
        state = {}
        for key, value in tensors.items():
            if key.startswith("optimizer."):
                _, index, name = key.split(".", 2)
                state.setdefault(int(index), {})[name] = value
        optimizer.load_state_dict({"state": state,
                                   "param_groups": json.loads(metadata["param_groups"])})
    return int(metadata.get("step", 0))


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                             cwd=Path(__file__).resolve().parent, check=True)
        # the package's code, from the repository root, less the weights being written now
        paths = [":/icd_lite", ":(top,exclude)icd_lite/world/weights"]
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths],
                               capture_output=True, text=True, check=True,
                               cwd=Path(__file__).resolve().parent).stdout.strip()
        return out.stdout.strip() + ("+uncommitted-changes" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def read_manifest(manifest: Path | None = None) -> dict:
    manifest = MANIFEST if manifest is None else manifest
    if not manifest.exists():
        raise CheckpointError(f"no manifest at {manifest}; {REBUILD}")
    return json.loads(manifest.read_text())


def record(name: str, command: str, manifest: Path | None = None, **extra) -> None:
    """Add (or refresh) the entry of ``WEIGHTS_DIR / name`` in the manifest."""
    manifest = MANIFEST if manifest is None else manifest
    path = manifest.parent / name
    entry = {"sha256": sha256(path), "bytes": path.stat().st_size, "command": command,
             "commit": git_commit(), **extra}
    # Locked: `make train-ablations` runs two trainings that may finish at the same moment.
    with open(manifest.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = read_manifest(manifest) if manifest.exists() else {}
        entries[name] = entry
        manifest.write_text(json.dumps(entries, indent=2, sort_keys=True) + "\n")


def verified_path(name: str, manifest: Path | None = None) -> Path:
    """The path of a shipped weights file, after checking it exists and matches its sha256."""
    manifest = MANIFEST if manifest is None else manifest
    entries = read_manifest(manifest)
    if name not in entries:
        raise CheckpointError(f"{name} is not in the manifest {manifest}; {REBUILD}")
    path = manifest.parent / name
    if not path.exists():
        raise CheckpointError(f"missing weights file {path}; {REBUILD}")
    if path.stat().st_size < 1024 and path.read_bytes().startswith(b"version https://git-lfs"):
        raise CheckpointError(f"{path} is a git-lfs pointer, not the weights; run "
                              f"`git lfs pull`, or {REBUILD}")
    if sha256(path) != entries[name]["sha256"]:
        raise CheckpointError(f"{path} is corrupt or was changed: its sha256 does not match "
                              f"the manifest; {REBUILD} (or restore it with git checkout)")
    return path
