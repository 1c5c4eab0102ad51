"""The claims table of notebook 04 and the bench's table printer (pure functions of the numbers)."""

from icd_lite.bench import format_table
from icd_lite.experiments.evaluation import TABLE2_ROWS, inversion_claims


def table2_with(psnr: dict) -> list[dict]:
    """Table 2 rows whose PSNR is psnr[(method, w, tau)]."""
    return [{"config": r.label, "method": r.method, "w": r.w, "tau": r.tau,
             "psnr": psnr[(r.method, r.w, r.tau)]} for r in TABLE2_ROWS]


PAPER_LIKE = {("DDIM50", 1.0, None): 23.0, ("A", 1.0, None): 17.8, ("B", 1.0, None): 18.4,
              ("C", 1.0, None): 19.2, ("E", 1.0, None): 16.4, ("F", 1.0, None): 20.0,
              ("G", 1.0, None): 22.3, ("G3", 1.0, None): 22.2, ("DDIM50", 8.0, None): 14.1,
              ("DDIM50", 8.0, 0.8): 19.6, ("C", 8.0, None): 13.9, ("C", 8.0, 0.8): 16.7,
              ("F", 8.0, 0.8): 18.0, ("G", 8.0, 0.8): 19.7, ("G3", 8.0, 0.8): 19.8}
TABLE1 = {"latent_nll": {"no CFG": 1.401, "d.CFG tau=.6": 1.409, "d.CFG tau=.8": 1.415,
                         "CFG": 1.428},
          "frechet_distance": {d: {"no CFG": 11.0, "d.CFG tau=.6": 36.6, "d.CFG tau=.8": 63.4,
                                   "CFG": 100.5} for d in ("no CFG", "CFG")}}


def test_the_papers_own_numbers_agree_with_every_claim():
    claims = inversion_claims(table2_with(PAPER_LIKE), TABLE1)
    assert len(claims) == 9 and all(c["agrees"] is True for c in claims), claims


def test_a_contradicting_number_flips_exactly_its_claim():
    numbers = {**PAPER_LIKE, ("B", 1.0, None): 19.5}  # B better than C
    claims = inversion_claims(table2_with(numbers), TABLE1)
    disagree = [c["claim"] for c in claims if not c["agrees"]]
    assert disagree == ["More boundaries help (A < B < C)"]


def test_a_missing_configuration_is_not_measured_rather_than_wrong():
    rows = [r for r in table2_with(PAPER_LIKE) if r["method"] != "E"]
    claim = [c for c in inversion_claims(rows, TABLE1) if c["claim"].startswith("L_f alone")][0]
    assert claim["agrees"] is None and "not all measured" in claim["toy_result"]


def test_format_table_aligns_columns():
    text = format_table([{"name": "iCD", "s": 0.5}, {"name": "NTI", "s": 12.25}],
                        {"name": "s", "s": ".2f"})
    assert text.splitlines() == ["name  s    ", "iCD   0.50 ", "NTI   12.25"]
