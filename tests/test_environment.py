"""One set of version ranges (pyproject.toml), mirrored by environment.yml, pinned by the lock."""

import importlib.metadata as metadata
import tomllib
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from icd_lite import _versions
from icd_lite._versions import check_versions, declared_requirements

ROOT = Path(__file__).resolve().parent.parent


def key(requirement: Requirement):
    return canonicalize_name(requirement.name), str(requirement.specifier)


def pyproject_requirements() -> list[Requirement]:
    with open(ROOT / "pyproject.toml", "rb") as file:
        return [Requirement(r) for r in tomllib.load(file)["project"]["dependencies"]]


def conda_pip_requirements() -> list[Requirement]:
    environment = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip = [entry["pip"] for entry in environment["dependencies"] if isinstance(entry, dict)]
    assert len(pip) == 1, "environment.yml needs exactly one pip section"
    return [Requirement(r) for r in pip[0]]


def lock_pins() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "requirements" / "lock.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def test_environment_yml_mirrors_pyproject():
    ours, conda = pyproject_requirements(), conda_pip_requirements()
    assert len({key(r) for r in ours}) == len(ours)  # no duplicates
    assert {key(r) for r in conda} == {key(r) for r in ours}


def test_runtime_reads_the_same_ranges():
    assert {key(r) for r in declared_requirements()} == {key(r) for r in pyproject_requirements()}
    assert {"torch", "diffusers", "transformers"} <= set(_versions.CHECKED)


def test_lock_satisfies_pyproject_ranges():
    pins = lock_pins()
    for requirement in pyproject_requirements():
        name = canonicalize_name(requirement.name)
        if name == "torch":
            continue
        assert name in pins, f"{name} is not pinned in requirements/lock.txt"
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
