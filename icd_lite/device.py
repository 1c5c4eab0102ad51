"""Where the models run: one ``device`` for every notebook, command and function of icd-lite.

Conventions, kept by every module (``tests/test_device.py`` checks them):

* every tensor a library function creates is made on the device of the model it feeds
  (``torch.zeros(..., device=x.device)``);
* seeded noise is drawn from a CPU ``torch.Generator`` and then moved
  (``torch.randn(shape, generator=g).to(device)``), so a seed gives the same picture on a CPU
  and on a GPU, within float tolerance;
* thread counts are set on the CPU only, from a parameter (``configure_threads``).
"""

from __future__ import annotations

import argparse

import torch

AUTO = "auto"


def resolve_device(device: str | torch.device | None = AUTO) -> torch.device:
    """``"auto"`` (or None) -> ``cuda`` when a CUDA GPU is visible, else ``cpu``; any other name
    (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) is checked and returned as a torch.device.

    Raises ValueError, naming the fix, for an unknown name or a device this machine lacks.
    """
    if device is None or device == AUTO:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"unknown device {device!r}; use 'auto', 'cpu', 'cuda' or 'cuda:N'"
                         ) from None
    if resolved.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r} was asked for but torch sees no CUDA GPU (torch "
                         f"{torch.__version__}); use the device auto or cpu, or install a CUDA "
                         f"build of torch")
    if resolved.type == "cuda" and (resolved.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"device {device!r} does not exist: this machine has "
                         f"{torch.cuda.device_count()} CUDA device(s)")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"device {device!r} was asked for but MPS is not available; use 'cpu'")
    return resolved


def configure_threads(device: str | torch.device, threads: int | None) -> None:
    """On the CPU, use ``threads`` intra-op threads (None keeps torch's default); on a GPU do
    nothing, since the host threads only launch kernels there."""
    if threads is not None and resolve_device(device).type == "cpu":
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(threads)


MAX_THREADS = 1024


def _thread_count(text: str) -> int:
    """``--threads``: a whole number in [1, MAX_THREADS] (argparse reports the message)."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if not 1 <= value <= MAX_THREADS:
        raise argparse.ArgumentTypeError(f"must be a whole number in [1, {MAX_THREADS}], "
                                         f"got {text!r}")
    return value


def add_device_arguments(parser: argparse.ArgumentParser, threads: int | None = None,
                         threads_help: str = "CPU threads for torch, ignored on a GPU") -> None:
    """``--device`` (default auto) and ``--threads N`` (CPU only) for an argparse command."""
    parser.add_argument("--device", default=AUTO,
                        help="where the models run: auto (CUDA if available, else CPU), cpu, "
                             "cuda, cuda:N (default: %(default)s)")
    parser.add_argument("--threads", type=_thread_count, default=threads, metavar="N",
                        help=f"{threads_help} (default: %(default)s)")
