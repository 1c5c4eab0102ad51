"""save_figure: a PNG plus the CSV of the numbers drawn in it."""

import csv
from pathlib import Path

import matplotlib.pyplot as plt
import pytest

from icd_lite import figures
from icd_lite.figures import save_figure

ROOT = Path(__file__).resolve().parent.parent

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture
def fig():
    figure, ax = plt.subplots(figsize=(2, 2))
    ax.plot([0, 1, 2], [0.5, 0.25, 0.125])
    yield figure
    plt.close(figure)


def read_csv(path):
    with open(path, newline="") as file:
        return list(csv.reader(file))


def test_save_from_columns(fig, tmp_path):
    png = save_figure(fig, "loss_curve", {"step": [0, 1, 2], "loss": [0.5, 0.25, 1 / 3]},
                      directory=tmp_path)
    assert png == tmp_path / "loss_curve.png"
    assert png.read_bytes()[:8] == PNG_MAGIC
    assert read_csv(tmp_path / "loss_curve.csv") == [
        ["step", "loss"], ["0", "0.5"], ["1", "0.25"], ["2", "0.333333"]]


def test_save_from_rows(fig, tmp_path):
    rows = [{"config": "A", "psnr": 17.75}, {"config": "G", "psnr": 22.27, "lpips": 0.198}]
    save_figure(fig, "table-2", rows, directory=tmp_path / "new" / "dir")
    out = tmp_path / "new" / "dir"
    assert (out / "table-2.png").read_bytes()[:8] == PNG_MAGIC
    assert read_csv(out / "table-2.csv") == [
        ["config", "psnr", "lpips"], ["A", "17.75", ""], ["G", "22.27", "0.198"]]


def test_save_tensor_values(fig, tmp_path):
    torch = pytest.importorskip("torch")
    save_figure(fig, "t", {"x": torch.tensor([1.5, 2.0])}, directory=tmp_path)
    assert read_csv(tmp_path / "t.csv") == [["x"], ["1.5"], ["2"]]


def test_default_directory_from_environment(fig, tmp_path, monkeypatch):
    monkeypatch.setenv("ICD_LITE_FIGURES", str(tmp_path / "env"))
    png = save_figure(fig, "where", {"a": [1]})
    assert png == tmp_path / "env" / "where.png" and png.exists()


def test_without_the_variable_nothing_lands_in_committed_figures(fig, tmp_path, monkeypatch,
                                                                  capsys):
    # A notebook run by hand (not by `make figures`) must not overwrite the committed figures/:
    # in a source checkout it writes to build/scratch-figures/, and says so once.
    monkeypatch.delenv("ICD_LITE_FIGURES", raising=False)
    monkeypatch.setattr(figures, "_announced", set())
    assert figures.figures_dir() == ROOT / "build" / "scratch-figures"  # this checkout
    capsys.readouterr()
    checkout = tmp_path / "checkout"
    monkeypatch.setattr(figures, "_source_root", lambda: checkout)
    first = save_figure(fig, "scratch", {"a": [1]})
    second = save_figure(fig, "scratch2", {"a": [2]})
    assert first.parent == second.parent == checkout / "build" / "scratch-figures"
    assert first.exists() and second.exists()
    assert not (checkout / "figures").exists()
    printed = capsys.readouterr().out
    assert printed.count("figures ->") == 1 and str(first.parent) in printed


def test_installed_copy_writes_to_a_scratch_folder_in_the_working_directory(fig, tmp_path,
                                                                            monkeypatch):
    monkeypatch.delenv("ICD_LITE_FIGURES", raising=False)
    monkeypatch.setattr(figures, "_announced", set())
    monkeypatch.setattr(figures, "_source_root", lambda: None)  # e.g. pip-installed on Colab
    monkeypatch.chdir(tmp_path)
    png = save_figure(fig, "colab", {"a": [1]})
    assert png == tmp_path / "icd-lite-figures" / "colab.png" and png.exists()
    assert not (tmp_path / "figures").exists()


def test_mismatched_columns_raise(fig, tmp_path):
    with pytest.raises(ValueError, match="columns have different lengths"):
        save_figure(fig, "bad", {"a": [1, 2], "b": [1]}, directory=tmp_path)
    assert not (tmp_path / "bad.csv").exists()


@pytest.mark.parametrize("table", [[], [1, 2], "ab"])
def test_bad_tables_raise(fig, tmp_path, table):
    with pytest.raises(ValueError, match="dict of columns or a non-empty list of row dicts"):
        save_figure(fig, "bad", table, directory=tmp_path)


@pytest.mark.parametrize("name", ["Loss", "with space", "", "../escape", "a.png", "_x"])
def test_bad_names_raise(fig, tmp_path, name):
    with pytest.raises(ValueError, match="must be lower-case letters"):
        save_figure(fig, name, {"a": [1]}, directory=tmp_path)
    assert list(tmp_path.iterdir()) == []
