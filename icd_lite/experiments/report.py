"""The reproduction report: ``docs/results.md``, written from the CSVs in ``figures/``.

``make report`` (``python -m icd_lite.experiments.report``) reads every ``figures/*_claims.csv``
(each notebook's closing table, written by ``claims.save_claims``) and lists, group by group, each
claim of the paper the notebooks test: where the paper makes it, its numbers, the toy's numbers,
the rule, the verdict, the figure that shows it, and for a disagreement the experiment that
explains it (or "unexplained"): the claim's own ``why``, and any follow-up a later notebook wrote
for it (``figures/*_followups.csv``, ``claims.save_followups``). Then every figure, with links to
its PNG and CSV.

Nothing here is typed by hand: change a notebook, run ``make figures`` then ``make report``.
``--check`` exits with 1 when ``docs/results.md`` differs from what the CSVs give, and a test
does the same, so the page cannot go stale.
"""

from __future__ import annotations

import argparse
import csv
import re
import sys
from pathlib import Path

from .claims import COLUMNS, FOLLOWUP_COLUMNS, GROUPS

ROOT = Path(__file__).resolve().parents[2]
FIGURES = ROOT / "figures"
REPORT = ROOT / "docs" / "results.md"
COMMAND = "make report"
# The paper's tables and figures the project touches (issue 22), in the paper's order.
PAPER_ITEMS = ("Table 1", "Table 2", "Table 4", "Table 5", "Table 6", "Fig. 2", "Fig. 3",
               "Fig. 4", "Fig. 5", "Fig. 7", "Fig. 9", "Fig. 11", "Fig. 12")


def read_claims(figures: Path) -> list[dict]:
    """Every claim row of ``figures/*_claims.csv``, with the notebook it came from."""
    rows = []
    for path in sorted(figures.glob("*_claims.csv")):
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                missing = [c for c in ("group", "source", "claim", "verdict") if c not in row]
                if missing:
                    raise ValueError(f"{path}: missing columns {missing}; write it with "
                                     f"icd_lite.experiments.claims.save_claims")
                rows.append({c: row.get(c, "") or "" for c in COLUMNS}
                            | {"notebook": path.name.split("_")[0]})
    return rows


def read_followups(figures: Path, claims: list[dict]) -> dict[tuple[str, str], list[dict]]:
    """``figures/*_followups.csv`` keyed by (notebook, claim); raises ``ValueError`` for a
    follow-up whose claim no claims file holds (a renamed claim would lose its explanation)."""
    known = {(row["notebook"], row["claim"]) for row in claims}
    followups: dict[tuple[str, str], list[dict]] = {}
    for path in sorted(figures.glob("*_followups.csv")):
        with open(path, newline="") as file:
            for row in csv.DictReader(file):
                row = {c: row.get(c, "") or "" for c in FOLLOWUP_COLUMNS}
                key = (row["notebook"], row["claim"])
                if key not in known:
                    raise ValueError(f"{path.name}: no claim {row['claim']!r} in notebook "
                                     f"{row['notebook']}'s claims; fix the follow-up's text")
                followups.setdefault(key, []).append(row | {"from": path.name.split("_")[0]})
    return followups


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ").strip()


def _figure_link(name: str) -> str:
    return f"[{name}](../figures/{name}.png)" if name else ""


def _why(row: dict, followups: dict) -> str:
    if row["verdict"] != "disagrees":
        return ""
    parts = [row["why"]] if row["why"] else []
    for followup in followups.get((row["notebook"], row["claim"]), []):
        parts.append(f"{followup['explanation']} ({followup['from']} "
                     f"{_figure_link(followup['figure'])})")
    return "; ".join(parts) or "unexplained"


def claims_section(rows: list[dict], followups: dict) -> list[str]:
    lines = []
    for group in GROUPS:
        chosen = [row for row in rows if row["group"] == group]
        if not chosen:
            continue
        counts = {v: sum(r["verdict"] == v for r in chosen)
                  for v in ("agrees", "disagrees", "not measured")}
        lines += [f"### {group.capitalize()}", "",
                  f"{counts['agrees']} agree, {counts['disagrees']} disagree, "
                  f"{counts['not measured']} not measured.", "",
                  "| paper | claim | paper's numbers | toy's numbers | rule | verdict | "
                  "notebook, figure | why it disagrees |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in chosen:
            cells = [row["source"], row["claim"], row["paper"], row["toy"], row["rule"],
                     f"**{row['verdict']}**", f"{row['notebook']} {_figure_link(row['figure'])}",
                     _why(row, followups)]
            lines.append("| " + " | ".join(_cell(c) for c in cells) + " |")
        lines.append("")
    return lines


def _mentions(source: str, item: str) -> bool:
    """Whether a claim's source ("Fig. 4a, Table 2 (tau = 0.8)") names ``item`` ("Fig. 4")."""
    return re.search(re.escape(item) + r"(?![0-9])", source) is not None


def index_section(rows: list[dict]) -> list[str]:
    lines = ["| paper | claims | agree | disagree | not measured | notebooks |",
             "|---|---|---|---|---|---|"]
    for item in PAPER_ITEMS:
        chosen = [row for row in rows if _mentions(row["source"], item)]
        if not chosen:
            lines.append(f"| {item} | none yet | | | | |")
            continue
        counts = [sum(r["verdict"] == v for r in chosen)
                  for v in ("agrees", "disagrees", "not measured")]
        notebooks = ", ".join(sorted({r["notebook"] for r in chosen}))
        lines.append(f"| {item} | {len(chosen)} | {counts[0]} | {counts[1]} | {counts[2]} | "
                     f"{notebooks} |")
    return lines + [""]


def figures_section(figures: Path) -> list[str]:
    lines = ["| figure | numbers |", "|---|---|"]
    for png in sorted(figures.glob("*.png")):
        csv_name = png.with_suffix(".csv").name
        numbers = (f"[{csv_name}](../figures/{csv_name})"
                   if (figures / csv_name).exists() else "")
        lines.append(f"| [{png.stem}](../figures/{png.name}) | {numbers} |")
    return lines + [""]


def render(figures: Path = FIGURES) -> str:
    """The report's markdown from the CSVs of ``figures``."""
    rows = read_claims(figures)
    total = {v: sum(r["verdict"] == v for r in rows)
             for v in ("agrees", "disagrees", "not measured")}
    lines = [
        "# Results: the paper's claims on the toy world",
        "",
        f"<!-- Generated by `{COMMAND}` from figures/*.csv: do not edit by hand. -->",
        "",
        "Each row is a claim of the paper that a notebook tests, with the rule that decides it "
        "on the toy world's numbers and the verdict the rule gives. The toy world is a 32x32 "
        "text-to-image model trained on a CPU: it tests whether the paper's mechanisms appear, "
        "not its SD1.5 values. A disagreement is a finding, not a failure; where an experiment "
        "explains it, the last column says which.",
        "",
        f"In all: {len(rows)} claims, {total['agrees']} agree, {total['disagrees']} disagree, "
        f"{total['not measured']} not measured.",
        "",
        "## By table and figure of the paper",
        "",
        *index_section(rows),
        "## Claims",
        "",
        *claims_section(rows, read_followups(figures, rows)),
        "## Figures",
        "",
        *figures_section(figures),
    ]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.experiments.report",
                                     description=__doc__.split("\n\n")[0])
    parser.add_argument("--check", action="store_true",
                        help=f"exit 1 if {REPORT.relative_to(ROOT)} is not what the CSVs give")
    args = parser.parse_args(argv)
    try:
        text = render()
    except ValueError as error:  # a claims file of the old layout: one line, no traceback
        print(f"{parser.prog}: error: {error}", file=sys.stderr)
        return 2
    if args.check:
        if not REPORT.exists() or REPORT.read_text() != text:
            print(f"{REPORT.relative_to(ROOT)} is stale: run `{COMMAND}`", file=sys.stderr)
            return 1
        return 0
    REPORT.write_text(text)
    print(f"wrote {REPORT.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
