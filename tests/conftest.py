"""Shared test setup: offline Hugging Face hub, a headless matplotlib, seeded torch, and the
shipped toy world's components and a handful of its latents (loaded once per test module)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import matplotlib  # noqa: E402

matplotlib.use("Agg")

import pytest  # noqa: E402
import torch  # noqa: E402

# The test tensors are tiny: one thread is faster than two, and far faster when the machine's
# two cores are busy with something else (OpenMP workers then wait on each other, up to 60x).
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="module")
def components():
    """The shipped toy world on the CPU (``load_components("toy")``)."""
    from icd_lite.components import load_components

    return load_components("toy")


@pytest.fixture(scope="module")
def data(components):
    """A distillation set of 8 scenes (seed 9): ``distill.LatentCaptions`` with z0 [8, 4, 8, 8]."""
    from icd_lite import distill
    from icd_lite.world.scenes import make_dataset

    images, captions, _ = make_dataset(8, seed=9)
    return distill.encode_dataset(components, images, captions)
