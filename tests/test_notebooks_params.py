"""A guard of the chain `make figures DEVICE=... PARAMS=...` -> papermill -> every notebook's
parameters cell: each notebook declares where it runs (device, preset, threads), resolves the
device in the next cell, never hard-codes a thread count, and a parameters file with a key that
no notebook declares is refused before anything runs."""

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from icd_lite import notebook_params

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))


def code_cells(notebook: Path) -> list[dict]:
    return [c for c in json.loads(notebook.read_text())["cells"] if c["cell_type"] == "code"]


def defaults(notebook: Path) -> dict:
    """name -> value of the parameters cell's literal assignments."""
    tree = ast.parse(notebook_params.parameters_cell(notebook))
    return {node.targets[0].id: ast.literal_eval(node.value) for node in tree.body
            if isinstance(node, ast.Assign) and isinstance(node.targets[0], ast.Name)}


def test_the_six_notebooks_of_the_course_are_found():
    assert [nb.name[:2] for nb in NOTEBOOKS] == ["01", "02", "03", "04", "05", "06"]
    assert notebook_params.default_notebooks() == NOTEBOOKS


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_parameters_cell_declares_where_to_run(notebook):
    # exactly one cell tagged parameters (parameters_cell raises otherwise), right after the
    # Colab install cell
    cells = code_cells(notebook)
    assert "parameters" in cells[1]["metadata"].get("tags", [])
    values = defaults(notebook)
    assert values["device"] == "auto" and values["preset"] == "toy"
    assert isinstance(values["threads"], int) and values["threads"] >= 1
    assert {"device", "preset", "threads"} <= set(notebook_params.declared_parameters(notebook))


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_next_cell_resolves_the_device_and_sets_threads_from_the_parameter(notebook):
    # papermill injects its values after the parameters cell, so what derives from them (the
    # torch.device, the thread count) is computed in the next cell
    setup = "".join(code_cells(notebook)[2]["source"])
    assert "resolve_device(device)" in setup
    assert "configure_threads(device, threads)" in setup
    for cell in code_cells(notebook):
        assert "set_num_threads" not in "".join(cell["source"]), "thread counts come from threads"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_models_are_loaded_on_the_device(notebook):
    source = "\n".join("".join(c["source"]) for c in code_cells(notebook))
    source = "\n".join(line for line in source.splitlines() if not line.lstrip().startswith("!"))
    calls = [node for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Call)
             and getattr(node.func, "id", getattr(node.func, "attr", None)) == "load_components"]
    for call in calls:
        assert ast.unparse(call) == "load_components(preset, device=device)"


def write_yaml(tmp_path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_check_accepts_declared_keys(tmp_path):
    assert notebook_params.check(write_yaml(tmp_path, "device: cuda\nn_eval: 20\nseed: 3\n")) is None
    assert notebook_params.check(write_yaml(tmp_path, "")) is None
    assert notebook_params.main(["check", str(write_yaml(tmp_path, "preset: toy\n"))]) == 0


def test_check_refuses_an_unknown_key_listing_the_known_names(tmp_path, capsys):
    params = write_yaml(tmp_path, "device: cuda\nn_evl: 20\n")
    assert notebook_params.main(["check", str(params)]) == 2
    message = capsys.readouterr().err.strip()
    assert "\n" not in message  # one line
    assert "unknown parameter 'n_evl'" in message
    known = message.split("declare: ")[1].split(", ")
    assert {"device", "preset", "threads", "n_eval", "distill_steps", "per_type"} <= set(known)
    assert known == sorted(notebook_params.known_parameters())


def test_check_refuses_a_file_that_is_not_a_mapping(tmp_path, capsys):
    assert notebook_params.main(["check", str(write_yaml(tmp_path, "- device\n"))]) == 2
    assert "must be a YAML mapping" in capsys.readouterr().err


def test_missing_parameters_cell_is_an_error(tmp_path):
    notebook = tmp_path / "99_none.ipynb"
    notebook.write_text(json.dumps({"cells": [
        {"cell_type": "code", "metadata": {}, "source": ["device = 'auto'\n"]}]}))
    with pytest.raises(ValueError, match="0 cells tagged 'parameters'"):
        notebook_params.declared_parameters(notebook)


def make(*args, cwd=ROOT):
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    # STAMP= keeps make from (re)building the virtual environment; PY runs this interpreter
    return subprocess.run(["make", "--no-print-directory", *args, "STAMP=", f"PY={sys.executable}"],
                          cwd=cwd, capture_output=True, text=True, timeout=120)


def test_make_figures_passes_device_params_and_the_figures_folder(tmp_path):
    params = write_yaml(tmp_path, "n_eval: 20\n")
    out = make("-n", "figures", "DEVICE=cuda", f"PARAMS={params}").stdout
    assert f"icd_lite.notebook_params check {params}" in out
    assert f"icd_lite.notebook_params section {params}" in out
    assert "-f build/params/$name.yaml -p device cuda" in out
    assert f"ICD_LITE_FIGURES={ROOT}/figures" in out
    assert "-p device auto" in make("-n", "figures").stdout  # the default


def test_make_figures_refuses_an_unknown_key_before_running_anything(tmp_path):
    # a one-cell notebook stands in for the real ones: were the key let through, papermill would
    # run only this
    notebook = tmp_path / "00_stand_in.ipynb"
    notebook.write_text(json.dumps({
        "cells": [{"cell_type": "code", "metadata": {"tags": ["parameters"]}, "outputs": [],
                   "execution_count": None, "source": ["device = 'auto'\n", "preset = 'toy'"]}],
        "metadata": {"kernelspec": {"name": "python3", "display_name": "Python 3",
                                    "language": "python"}},
        "nbformat": 4, "nbformat_minor": 5}))
    params = write_yaml(tmp_path, "presett: sd15\n")
    result = make("figures", f"PARAMS={params}", f"NOTEBOOKS={notebook}")
    assert result.returncode != 0
    assert "unknown parameter 'presett'" in result.stderr
    assert "declare: device, preset" in result.stderr
    assert "==" not in result.stdout  # no notebook started


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda nb: nb.name)
def test_papermill_reads_every_parameter(notebook):
    """papermill's own reader (``papermill --help-notebook``) skips, with a warning, any line
    with two '=' - e.g. a comment "(w = 8)" - so it must find every name the cell declares."""
    from papermill.translators import PythonTranslator

    cell = {"source": notebook_params.parameters_cell(notebook)}
    names = [parameter.name for parameter in PythonTranslator.inspect(cell)]
    assert names == notebook_params.declared_parameters(notebook)


def test_a_notebooks_section_reaches_only_that_notebook(tmp_path):
    first, second = NOTEBOOKS[0], NOTEBOOKS[-1]
    shared = notebook_params.declared_parameters(first)[0]
    own = notebook_params.declared_parameters(second)[-1]
    params = {shared: "x", second.stem: {own: 3}}
    assert notebook_params.params_for(params, second)[own] == 3
    assert notebook_params.params_for(params, first).get(own) != 3  # a section is private
    assert notebook_params.params_for(params, first)[shared] == "x"  # a top-level key is shared


def test_check_refuses_a_section_key_its_notebook_does_not_declare(tmp_path, capsys):
    nb = NOTEBOOKS[0]
    params = write_yaml(tmp_path, f"{nb.stem}:\n  no_such_name: 1\n")
    assert notebook_params.main(["check", str(params)]) == 2
    assert f"'{nb.stem}.no_such_name'" in capsys.readouterr().err


def test_prepare_injects_each_notebooks_parameters_without_running(tmp_path):
    nb = NOTEBOOKS[-1]
    name = notebook_params.declared_parameters(nb)[-1]
    params = write_yaml(tmp_path, f"{nb.stem}:\n  {name}: 12345\n")
    (target,) = notebook_params.prepare(params, tmp_path / "out", [nb])
    cells = json.loads(target.read_text())["cells"]
    injected = [c for c in cells if "injected-parameters" in c["metadata"].get("tags", [])]
    assert len(injected) == 1 and f"{name} = 12345" in "".join(injected[0]["source"])
    assert all(not c.get("outputs") for c in cells if c["cell_type"] == "code")


def test_ci_parameters_file_is_valid():
    assert notebook_params.check(ROOT / "params" / "ci.yaml") is None


def test_prepare_one_notebook_with_a_file_that_has_sections_for_the_others(tmp_path):
    first, last = NOTEBOOKS[0], NOTEBOOKS[-1]
    name = notebook_params.declared_parameters(first)[-1]
    params = write_yaml(tmp_path, f"{first.stem}:\n  {name}: 7\n{last.stem}:\n  device: cpu\n")
    (target,) = notebook_params.prepare(params, tmp_path / "out", [last])
    assert target.name == last.name


def test_the_prepare_command_takes_one_notebook_of_a_file_with_every_section(tmp_path):
    out = tmp_path / "out"
    assert notebook_params.main(["prepare", str(ROOT / "params" / "ci.yaml"), str(out),
                                 str(NOTEBOOKS[-1])]) == 0
    assert [p.name for p in out.iterdir()] == [NOTEBOOKS[-1].name]
