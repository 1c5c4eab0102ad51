"""A claim of the paper, the rule that tests it on the toy world, and the verdict the rule gives.

Every notebook ends with a table of the claims it touched. A row is made by ``check``: the claim
in words, where the paper makes it, the paper's numbers, the toy's measured numbers, the rule in
words and as a function of the toy's numbers. The verdict is computed, never typed:

* ``agrees``        - the rule holds on the toy's numbers;
* ``disagrees``     - it does not;
* ``not measured``  - a number the rule needs was not measured in this run (NaN or None).

``claims_table`` renders rows as a pandas DataFrame (for the notebook) and ``save_claims`` writes
them as ``<name>.csv`` next to the figures, where ``docs/results.md`` is generated from.

A later experiment can explain an earlier notebook's disagreement (notebook 06's budget study
follows notebook 04's): ``save_followups`` writes ``<name>.csv`` with the columns of
``FOLLOWUP_COLUMNS``, keyed by the earlier notebook and the claim's exact text, and the report
puts the explanation in that claim's row.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path
from typing import Callable, Mapping

from ..figures import figures_dir

GROUPS = ("theory", "generation", "inversion", "editing")
COLUMNS = ("group", "source", "claim", "paper", "toy", "rule", "verdict", "figure", "why")
FOLLOWUP_COLUMNS = ("notebook", "claim", "direction", "explanation", "figure")


def _number(value) -> str:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return str(value)
    return f"{value:.4g}"


def describe(values: Mapping[str, object]) -> str:
    """``{"G": 21.5, "DDIM50": 23.8}`` -> ``"G 21.5; DDIM50 23.8"`` (4 significant digits)."""
    return "; ".join(f"{name} {_number(value)}" for name, value in values.items())


def _missing(value) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def check(group: str, source: str, claim: str, paper: Mapping[str, object] | str,
          toy: Mapping[str, object], rule: str, holds: Callable[[Mapping], bool],
          figure: str = "", why: str = "") -> dict:
    """One claim row. ``holds(toy)`` is the rule as code (it sees the ``toy`` dict).

    ``figure`` names the figure file that shows it (e.g. ``"04_table2"``); ``why`` is the
    experiment that explains a disagreement, if one does (the report says "unexplained"
    otherwise). Raises ValueError for an unknown ``group`` (one of ``GROUPS``)."""
    if group not in GROUPS:
        raise ValueError(f"group must be one of {GROUPS}, got {group!r}")
    if any(_missing(v) for v in toy.values()):
        verdict = "not measured"
    else:
        verdict = "agrees" if holds(toy) else "disagrees"
    paper_text = paper if isinstance(paper, str) else describe(paper)
    return {"group": group, "source": source, "claim": claim, "paper": paper_text,
            "toy": describe(toy), "rule": rule, "verdict": verdict, "figure": figure, "why": why}


def claims_table(rows: list[dict]):
    """The rows as a pandas DataFrame with the columns of ``COLUMNS`` (pandas: ``[notebooks]``)."""
    import pandas as pd

    return pd.DataFrame(rows, columns=list(COLUMNS))


def save_claims(rows: list[dict], name: str, directory: str | Path | None = None) -> Path:
    """Write the rows to ``<name>.csv`` in the figures folder (``figures.figures_dir()``)."""
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    return path


def save_followups(rows: list[dict], name: str, directory: str | Path | None = None) -> Path:
    """Write follow-ups of earlier claims to ``<name>.csv`` (name it ``<notebook>_followups``)
    in the figures folder; each row has the keys of ``FOLLOWUP_COLUMNS``, "notebook" being the
    two digits of the notebook that made the claim. Raises ``ValueError`` for a missing key."""
    for row in rows:
        missing = [c for c in FOLLOWUP_COLUMNS if c not in row]
        if missing:
            raise ValueError(f"follow-up {row.get('claim', row)!r} lacks {missing}")
    out = Path(directory) if directory is not None else figures_dir()
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}.csv"
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, fieldnames=FOLLOWUP_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    return path


def verdict_counts(rows: list[dict]) -> dict[str, int]:
    """How many rows agree, disagree, or were not measured."""
    return {v: sum(row["verdict"] == v for row in rows)
            for v in ("agrees", "disagrees", "not measured")}
