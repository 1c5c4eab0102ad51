"""Shared test setup: offline Hugging Face hub, a headless matplotlib, seeded torch."""

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
