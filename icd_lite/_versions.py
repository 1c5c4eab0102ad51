"""Check at import that the libraries icd_lite is written against are recent enough.

The version ranges live in one place, pyproject.toml; this module reads them back (from the
installed package's metadata, or from pyproject.toml in a source checkout) rather than
repeating them.
"""

from __future__ import annotations

import importlib.metadata as metadata
import tomllib
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

CHECKED = ("torch", "diffusers", "transformers")


def declared_requirements() -> list[Requirement]:
    """The runtime dependencies of icd-lite as declared in pyproject.toml (not the extras)."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    if pyproject.exists():
        with open(pyproject, "rb") as file:
            return [Requirement(r) for r in tomllib.load(file)["project"]["dependencies"]]
    requirements = [Requirement(r) for r in metadata.requires("icd-lite") or []]
    # The installed metadata lists the extras too, as `name>=x; extra == "notebooks"`.
    return [r for r in requirements if r.marker is None or "extra" not in str(r.marker)]


def check_versions(requirements: list[Requirement] | None = None) -> None:
    """Raise ImportError naming the package, the version found and the version needed."""
    if requirements is None:
        requirements = declared_requirements()
    for requirement in requirements:
        if canonicalize_name(requirement.name) not in CHECKED:
            continue
        try:
            found = metadata.version(requirement.name)
        except metadata.PackageNotFoundError:
            raise ImportError(f"icd-lite needs {requirement}, which is not installed; "
                              f"run `make venv` or `pip install -e .`") from None
        if not requirement.specifier.contains(found, prereleases=True):
            raise ImportError(f"icd-lite needs {requirement} but found {requirement.name} "
                              f"{found}; run `pip install '{requirement}'` (or `make venv`)")
