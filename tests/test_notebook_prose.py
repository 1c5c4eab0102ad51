"""No typed numbers in the notebooks' prose: every number a student reads is computed.

A result typed into markdown goes stale the day the code or the weights change (the review of
2026-11-30 found "9-12x" where the CSV said 11.7-17.1x). So a notebook's markdown may hold a
number only where it is not a result:

* inside LaTeX math (``$...$``, ``$$...$$``): definitions such as $c = 0.001$ or $\\tau = 0.8$;
* inside inline code or code blocks (parameter values to type, e.g. ```lambda_f = 0```);
* right after a reference word: Table 4, Fig. 4a, Eq. 3, Section 2, Algorithm 1, notebook 03,
  NeurIPS 2024, arXiv 2406.14539;
* small integers 0-10 (counts and ordinals: "4 steps", "step 1"), and digits that are part of a
  name (fCD4, G3, x0, SD1.5, ViT-L/14, 01_theory).

Any other number (5.7, 9-12x, 56 %, 0.26 s) must come from a code cell: print it, or build the
sentence with ``IPython.display.Markdown(f"...")`` from the values the notebook computed, and take
the paper's numbers from ``icd_lite.experiments.paper``.
"""

import json
import re
from pathlib import Path

import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))

REFERENCE = (r"(?:Tables?|Figs?\.|Figures?|Eqs?\.|Equations?|eq\.|Sections?|§|Algorithms?|"
             r"notebooks?|NeurIPS|arXiv|ICLR|ICML|CVPR|et al\.,?|and|,)")
MATH = re.compile(r"\$\$.*?\$\$|\$[^$\n]+\$", re.S)
CODE = re.compile(r"```.*?```|`[^`\n]+`", re.S)
LINK_TARGET = re.compile(r"\]\([^)]*\)")
HTML_TAG = re.compile(r"<[^>]+>")
# A number standing alone, perhaps with a unit (12x, 56 %, 0.26 s, 3 dB): not glued to letters,
# '_', '/' or a '.' that joins a name (fCD4, x0, ViT-L/14, SD1.5, 01_theory).
NUMBER = re.compile(r"(?<![\w./])(\d+(?:\.\d+)?)(?:x|×|%|dB|ms|s|GB|GiB|MB|min)?(?![\w/]|\.\d)")
REFERENCED = re.compile(rf"{REFERENCE}\s*\(?\s*$")


def typed_numbers(markdown: str) -> list[str]:
    """The numbers of ``markdown`` that are neither math, code, references nor small integers."""
    text = MATH.sub(" ", markdown)
    text = CODE.sub(" ", text)
    text = LINK_TARGET.sub("]", text)
    text = HTML_TAG.sub(" ", text)
    found = []
    for match in NUMBER.finditer(text):
        token = match.group(1)
        if re.fullmatch(r"\d+", token) and int(token) <= 10:
            continue
        # "Tables 1, 2, 5 and 6": walk back over a list of references
        before = text[:match.start()]
        if REFERENCED.search(before) and re.search(
                rf"(?:Tables?|Figs?\.|Figures?|Eqs?\.|eq\.|Sections?|§|Algorithms?|notebooks?|"
                rf"NeurIPS|arXiv|ICLR|ICML|CVPR|et al\.,?)\s*\(?[\d\w.,\s]*$",
                before[-40:]):
            continue
        found.append(token)
    return found


@pytest.mark.parametrize("markdown, expected", [
    ("L_r cuts the error 9-12x, L_f 1.7-2.7x", ["12", "1.7", "2.7"]),
    ("it plateaus at about 5.7 (paper: 0.43)", ["5.7", "0.43"]),
    ("Table 4 and Fig. 4a; Tables 1, 2, 5 and 6; Figs. 9 and 12", []),
    ("the loss $c = 0.001$ and $$x_s = \\alpha_s \\hat x_0 + \\sigma_s \\hat\\epsilon$$", []),
    ("set `lambda_f = 0.0` and `w = 7.5`, then rerun", []),
    ("fCD4 / CD4, G3, x0, SD1.5, ViT-L/14, 01_theory, DDIM50", []),
    ("4 steps, step 1 of 10, notebook 03", []),
    ("[the paper](https://arxiv.org/abs/2406.14539), NeurIPS 2024", []),
    ("preferred in 56 % of cases", ["56"]),
])
def test_typed_numbers_finds_results_and_spares_references(markdown, expected):
    assert typed_numbers(markdown) == expected


def _markdown_cells(notebook: Path):
    cells = json.loads(notebook.read_text())["cells"]
    for index, cell in enumerate(cells):
        if cell["cell_type"] == "markdown":
            source = cell["source"]
            yield index, "".join(source) if isinstance(source, list) else source


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.name)
def test_notebook_markdown_has_no_typed_numbers(notebook):
    typed = [(index, number) for index, text in _markdown_cells(notebook)
             for number in typed_numbers(text)]
    assert not typed, (f"{notebook.name}: numbers typed into markdown (cell, number): {typed}. "
                       f"Compute them in a code cell (see this test's docstring)")
