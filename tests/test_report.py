"""The reproduction report is generated from the figures' CSVs and cannot go stale."""

from pathlib import Path

import pytest

from icd_lite.experiments import claims, report

ROOT = Path(__file__).resolve().parent.parent


def test_docs_results_md_is_what_the_committed_csvs_give():
    assert report.REPORT.read_text() == report.render(), \
        "docs/results.md is stale: run `make report` after `make figures`"


def test_a_claim_gets_its_verdict_and_a_disagreement_says_unexplained(tmp_path):
    rows = [
        claims.check("inversion", "Table 2", "G approaches DDIM50", {"gap dB": 0.7},
                     {"G": 28.4, "DDIM50": 30.6}, "gap < 1 dB",
                     lambda v: v["DDIM50"] - v["G"] < 1, figure="04_table2"),
        claims.check("inversion", "Table 5", "3 steps tie 4", {"gap dB": 0.06},
                     {"G": 28.4, "G3": 28.3}, "gap < 0.5 dB",
                     lambda v: abs(v["G"] - v["G3"]) < 0.5),
        claims.check("editing", "Fig. 9", "humans prefer iCD", {"InfEdit 15": 56},
                     {"preference": float("nan")}, "not measurable on a toy", lambda v: True),
    ]
    claims.save_claims(rows, "04_claims", tmp_path)
    (tmp_path / "04_table2.png").write_bytes(b"png")
    (tmp_path / "04_table2.csv").write_text("a\n1\n")
    text = report.render(tmp_path)
    assert "In all: 3 claims, 1 agree, 1 disagree, 1 not measured." in text
    line = next(l for l in text.splitlines() if "G approaches DDIM50" in l)
    assert "**disagrees**" in line and "unexplained" in line and "04_table2.png" in line
    assert "**agrees**" in next(l for l in text.splitlines() if "3 steps tie 4" in l)
    assert "[04_table2.csv](../figures/04_table2.csv)" in text


def test_a_claims_file_without_the_columns_is_refused(tmp_path):
    (tmp_path / "09_claims.csv").write_text("claim,result\nx,y\n")
    with pytest.raises(ValueError, match="save_claims"):
        report.render(tmp_path)


def test_check_group_is_validated():
    with pytest.raises(ValueError, match="group must be one of"):
        claims.check("speed", "Table 6", "c", {}, {"x": 1.0}, "r", lambda v: True)


def test_the_index_counts_claims_per_table_and_figure(tmp_path):
    rows = [claims.check("inversion", "Fig. 4a, Table 2 (tau = 0.8)", "c1", {}, {"x": 1.0}, "r",
                         lambda v: True),
            claims.check("editing", "Fig. 12", "c2", {}, {"x": 1.0}, "r", lambda v: False)]
    claims.save_claims(rows, "05_claims", tmp_path)
    lines = report.render(tmp_path).splitlines()
    assert "| Fig. 4 | 1 | 1 | 0 | 0 | 05 |" in lines
    assert "| Table 2 | 1 | 1 | 0 | 0 | 05 |" in lines
    assert "| Fig. 12 | 1 | 0 | 1 | 0 | 05 |" in lines
    assert "| Fig. 2 | none yet | | | | |" in lines  # "Fig. 12" does not count as "Fig. 2"
