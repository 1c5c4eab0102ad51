"""One set of version ranges (pyproject.toml: the runtime dependencies and two extras), mirrored
by environment.yml, pinned by the lock; and one repository URL, used by the notebooks' Colab
install cell and the README's Open-in-Colab badges."""

import ast
import importlib.metadata as metadata
import json
import re
import sys
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from icd_lite import _versions
from icd_lite._versions import check_versions, declared_requirements

ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
EXTRAS = {"notebooks": {"papermill", "ipywidgets", "ipykernel", "matplotlib", "pandas"},
          "dev": {"pytest", "nbval"}, "metrics": {"torchmetrics"},
          "train": {"webdataset"}}
# import name -> the distribution that provides it, where they differ
DISTRIBUTION = {"PIL": "pillow", "yaml": "pyyaml", "IPython": "ipykernel"}  # the kernel brings IPython


def key(requirement: Requirement):
    return canonicalize_name(requirement.name), str(requirement.specifier)


def pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return tomllib.load(file)


def pyproject_requirements() -> list[Requirement]:
    """The runtime dependencies."""
    return [Requirement(r) for r in pyproject()["project"]["dependencies"]]


def pyproject_groups() -> dict[str, list[Requirement]]:
    """{"runtime": dependencies, <extra>: its requirements, ...}"""
    project = pyproject()["project"]
    groups = {"runtime": project["dependencies"], **project.get("optional-dependencies", {})}
    return {name: [Requirement(r) for r in group] for name, group in groups.items()}


def conda_pip_requirements() -> list[Requirement]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert len(pip) == 1, "environment.yml needs exactly one pip section"
    return [Requirement(r) for r in pip[0]]


def conda_pip_groups() -> dict[str, list[Requirement]]:
    """The pip section of environment.yml, split at its comments "# runtime ..." and
    "# extra: <name>" (YAML drops comments, so this reads the lines)."""
    groups: dict[str, list[Requirement]] = {}
    lines = (ROOT / "environment.yml").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == "- pip:")
    group = None
    for line in lines[start + 1:]:
        text = line.strip()
        if match := re.fullmatch(r"# extra: (\S+)", text):
            group = match.group(1)
        elif text.startswith("# runtime"):
            group = "runtime"
        elif text.startswith("- "):
            assert group is not None, f"environment.yml: {text!r} comes before any group comment"
            groups.setdefault(group, []).append(Requirement(text[2:]))
    return groups


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def third_party_imports(tree: ast.AST, module_level: bool) -> set[str]:
    """Top-level names of the absolute imports in ``tree`` that are not the standard library or
    icd_lite; with ``module_level``, only those run at import time (not inside a function, not
    under ``if TYPE_CHECKING``)."""
    found = set()

    def visit(node):
        if module_level and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            return
        if (module_level and isinstance(node, ast.If)
                and "TYPE_CHECKING" in ast.unparse(node.test)):
            return
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return {name for name in found
            if name not in sys.stdlib_module_names and name not in ("__future__", "icd_lite")}


def distribution(import_name: str) -> str:
    return canonicalize_name(DISTRIBUTION.get(import_name, import_name))


def test_environment_yml_mirrors_pyproject():
    ours, conda = pyproject_groups(), conda_pip_groups()
    assert set(conda) == set(ours), "environment.yml needs one comment per group: runtime, extras"
    for name, group in ours.items():
        assert len({key(r) for r in group}) == len(group), f"duplicate in {name}"
        assert {key(r) for r in conda[name]} == {key(r) for r in group}, name
    everything = [r for group in ours.values() for r in group]
    assert {key(r) for r in conda_pip_requirements()} == {key(r) for r in everything}


def test_two_extras_and_no_package_in_two_groups():
    groups = pyproject_groups()
    assert set(groups) == {"runtime", *EXTRAS}
    for extra, needed in EXTRAS.items():
        assert needed <= {canonicalize_name(r.name) for r in groups[extra]}, extra
    names = [canonicalize_name(r.name) for group in groups.values() for r in group]
    assert len(names) == len(set(names))


def test_torch_has_a_lower_bound_only():
    # Colab's preinstalled CUDA torch (and any CPU build) must satisfy it: pip then downloads none.
    torch = [r for r in pyproject_requirements() if canonicalize_name(r.name) == "torch"]
    assert len(torch) == 1 and {s.operator for s in torch[0].specifier} == {">="}


def test_library_imports_are_declared():
    # `import icd_lite` and the commands need only the runtime dependencies: what a module
    # imports when it is loaded is a runtime dependency; an import inside a function (run only
    # by make figures or the notebooks, e.g. yaml) may come from an extra.
    groups = pyproject_groups()
    runtime = {canonicalize_name(r.name) for r in groups["runtime"]}
    declared = {canonicalize_name(r.name) for group in groups.values() for r in group}
    for path in sorted((ROOT / "icd_lite").rglob("*.py")):
        tree = ast.parse(path.read_text())
        at_import = {distribution(n) for n in third_party_imports(tree, module_level=True)}
        assert at_import <= runtime, f"{path.name} imports {at_import - runtime} when loaded"
        anywhere = {distribution(n) for n in third_party_imports(tree, module_level=False)}
        assert anywhere <= declared, f"{path.name} imports undeclared {anywhere - declared}"


def test_notebook_imports_are_runtime_or_notebooks_extra():
    groups = pyproject_groups()
    allowed = {canonicalize_name(r.name) for r in groups["runtime"] + groups["notebooks"]}
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        source = "\n".join("".join(c["source"]) for c in cells if c["cell_type"] == "code")
        source = "\n".join(line for line in source.splitlines()
                           if not line.lstrip().startswith(("!", "%")))  # IPython shell lines
        imported = {distribution(n) for n in third_party_imports(ast.parse(source), False)}
        assert imported <= allowed, f"{notebook.name} imports {imported - allowed}"


def test_runtime_reads_the_same_ranges():
    assert {key(r) for r in declared_requirements()} == {key(r) for r in pyproject_requirements()}
    assert {"torch", "diffusers", "transformers"} <= set(_versions.CHECKED)


def test_lock_satisfies_pyproject_ranges():
    pins = lock_pins()
    for group, requirements in pyproject_groups().items():
        for requirement in requirements:
            name = canonicalize_name(requirement.name)
            if name == "torch":
                continue
            assert name in pins, f"{name} ({group}) is not pinned in requirements/lock.txt"
            assert requirement.specifier.contains(pins[name], prereleases=True), \
                f"lock pins {name}=={pins[name]}, outside {requirement.specifier}"


def test_lock_leaves_torch_to_the_makefile():
    assert "torch" not in lock_pins()


def test_lock_has_one_pin_per_line():
    lines = [line for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines()
             if line.strip() and not line.startswith("#")]
    assert all(line.count("==") == 1 for line in lines)
    assert len({canonicalize_name(line.split("==")[0]) for line in lines}) == len(lines)


def test_check_versions_names_package_found_and_needed():
    found = metadata.version("diffusers")
    with pytest.raises(ImportError) as error:
        check_versions([Requirement("diffusers>=999")])
    message = str(error.value)
    assert "diffusers>=999" in message and f"diffusers {found}" in message


def test_check_versions_passes_when_satisfied():
    found = metadata.version("transformers")
    check_versions([Requirement(f"transformers=={found}"), Requirement("diffusers>=0.1")])
    check_versions()  # the declared ranges hold in this environment


def test_check_versions_missing_package(monkeypatch):
    monkeypatch.setattr(_versions, "CHECKED", ("icd-lite-no-such-package",))
    with pytest.raises(ImportError, match="needs icd-lite-no-such-package>=1.*not installed"):
        check_versions([Requirement("icd-lite-no-such-package>=1")])


def test_check_versions_ignores_unchecked_packages():
    check_versions([Requirement("matplotlib>=999")])  # only torch/diffusers/transformers


def test_installed_metadata_gives_the_runtime_ranges_without_the_extras(monkeypatch, tmp_path):
    # Installed from git (Colab), there is no pyproject.toml beside the package: the metadata
    # lists the extras too, as `name; extra == "..."`, and check_versions must skip them.
    monkeypatch.setattr(_versions, "__file__", str(tmp_path / "icd_lite" / "_versions.py"))
    monkeypatch.setattr(_versions.metadata, "requires", lambda name: [
        "torch>=2.1", 'matplotlib>=3.8,<4; extra == "notebooks"', "numpy>=1.24"])
    assert [str(r) for r in declared_requirements()] == ["torch>=2.1", "numpy>=1.24"]


# The repository URL: declared once, used by every Colab entry point.

def repository_url() -> str:
    urls = pyproject()["project"]["urls"]
    assert list(urls) == ["Repository"], "declare the repository URL once, as Repository"
    return urls["Repository"]


def test_repository_url_declared_once():
    url = repository_url()
    assert re.fullmatch(r"https://github\.com/[\w.-]+/[\w.-]+", url)
    assert (ROOT / "pyproject.toml").read_text().count(url) == 1


def test_notebook_install_cell_uses_the_url():
    url = repository_url()
    for notebook in NOTEBOOKS:
        cells = json.loads(notebook.read_text())["cells"]
        first = "".join(next(c for c in cells if c["cell_type"] == "code")["source"])
        # installs on Colab only, the notebooks' extras, from exactly the declared URL
        assert 'if "google.colab" in sys.modules:' in first, notebook.name
        assert f'ICD_LITE_REPO = "{url}"' in first, notebook.name
        assert '!pip install -q "icd-lite[notebooks] @ git+{ICD_LITE_REPO}"' in first, notebook.name
        assert "git+" not in first.replace("git+{ICD_LITE_REPO}", ""), notebook.name


def test_readme_has_one_colab_badge_per_notebook_with_the_url():
    url = repository_url()
    colab = url.replace("https://github.com/", "https://colab.research.google.com/github/")
    readme = (ROOT / "README.md").read_text()
    badges = re.findall(r"https://colab\.research\.google\.com/github/[^)\s\"']+", readme)
    assert sorted(badges) == [f"{colab}/blob/main/notebooks/{nb.name}" for nb in NOTEBOOKS]
    for link in re.findall(r"https://github\.com/[\w.-]+/icd-lite\b", readme):
        assert link == url


def test_notebook_links_work_on_colab():
    # On Colab a notebook stands alone: a relative link (../README.md, figures/x.png) is dead.
    url = repository_url()
    for notebook in NOTEBOOKS:
        for cell in json.loads(notebook.read_text())["cells"]:
            if cell["cell_type"] != "markdown":
                continue
            text = "".join(cell["source"])
            for target in re.findall(r"\]\(([^)\s]+)|(?:src|href)=\"([^\"]+)", text):
                target = next(t for t in target if t)
                assert target.startswith(("https://", "http://", "#")), \
                    f"{notebook.name}: relative link {target!r}; use {url}/blob/main/..."
                if "github.com" in target and "icd-lite" in target:
                    assert target.startswith(url + "/"), f"{notebook.name}: {target}"
