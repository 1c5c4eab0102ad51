"""One helper to save every figure of the notebooks: ``figures/<name>.png`` plus the CSV of the
numbers drawn in it, so a figure can be checked, re-plotted or compared without re-running.

Where figures go: ``$ICD_LITE_FIGURES`` if set (``make figures`` sets it to the committed
``figures/``); otherwise a scratch folder, so that a notebook run by hand never overwrites the
committed figures: ``build/scratch-figures/`` in a source checkout, else ``./icd-lite-figures``
(on Colab, ``/content/icd-lite-figures``). The first save prints where it writes.

This module never imports matplotlib (it only calls methods of the figure and axes it is given),
so ``import icd_lite`` and the command line do not need it: it comes with the ``[notebooks]``
extra.
"""

from __future__ import annotations

import csv
import os
import re
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Sequence

if TYPE_CHECKING:  # for the annotations only
    import matplotlib.pyplot as plt

SCRATCH = "scratch-figures"             # under build/ in a source checkout
INSTALLED_SCRATCH = "icd-lite-figures"  # under the working directory elsewhere
_announced: set[Path] = set()


def _source_root() -> Path | None:
    """The root of the source checkout this module lives in, or None for an installed copy."""
    root = Path(__file__).resolve().parent.parent
    return root if (root / "pyproject.toml").exists() else None


def figures_dir() -> Path:
    """``$ICD_LITE_FIGURES`` if set, else a scratch folder (never the committed ``figures/``)."""
    if os.environ.get("ICD_LITE_FIGURES"):
        return Path(os.environ["ICD_LITE_FIGURES"])
    root = _source_root()
    out = root / "build" / SCRATCH if root is not None else Path.cwd() / INSTALLED_SCRATCH
    if out not in _announced:
        _announced.add(out)
        print(f"figures -> {out} (a scratch folder; `make figures` writes the committed "
              f"figures/ by setting ICD_LITE_FIGURES)")
    return out


def _rows(table) -> tuple[list[str], list[list]]:
    """Columns and rows from a dict of equal-length columns or a list of row dicts."""
    if isinstance(table, Mapping):
        columns = list(table)
        lengths = {len(values) for values in table.values()}
        if len(lengths) > 1:
            raise ValueError(f"columns have different lengths: "
                             f"{ {k: len(v) for k, v in table.items()} }")
        return columns, [list(row) for row in zip(*table.values())]
    rows = list(table)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        raise ValueError("table must be a dict of columns or a non-empty list of row dicts")
    columns = list(dict.fromkeys(key for row in rows for key in row))
    return columns, [[row.get(c, "") for c in columns] for row in rows]


def _format(value):
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float):
        return f"{value:.6g}"
    return value


def save_figure(fig: plt.Figure, name: str, table: Mapping | Sequence[Mapping],
                directory: str | os.PathLike | None = None) -> Path:
    """Write ``<name>.png`` (150 dpi) and ``<name>.csv`` (the numbers behind it); return the PNG."""
    if not re.fullmatch(r"[a-z0-9][a-z0-9_\-]*", name):
        raise ValueError(f"figure name {name!r} must be lower-case letters, digits, '_' or '-'")
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    columns, rows = _rows(table)
    with open(out / f"{name}.csv", "w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(columns)
        writer.writerows([[_format(v) for v in row] for row in rows])
    png = out / f"{name}.png"
    fig.savefig(png, dpi=150, bbox_inches="tight", metadata={"Software": None})
    return png


def show_image(ax: plt.Axes, image, title: str | None = None, fontsize: int = 7) -> None:
    """Draw one [3, H, W] image in [-1, 1] without ticks, with an optional small title."""
    ax.imshow(((image.detach().clamp(-1, 1) + 1) / 2).permute(1, 2, 0).cpu().numpy())
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title, fontsize=fontsize)
