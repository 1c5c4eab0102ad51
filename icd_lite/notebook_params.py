"""The notebooks' papermill parameters, read without running anything.

Each notebook has one cell tagged ``parameters`` (papermill); its top-level assignments are the
names a run may set (``papermill -p name value`` or a YAML file ``-f params.yaml``). papermill
itself injects any key, known or not, so a misspelt key in a parameters file would be silently
ignored. ``make figures PARAMS=file.yaml`` therefore checks the file first::

    python -m icd_lite.notebook_params check params.yaml [notebook.ipynb ...]
    python -m icd_lite.notebook_params list [notebook.ipynb ...]
    python -m icd_lite.notebook_params section params.yaml notebook.ipynb   # its YAML, to stdout
    python -m icd_lite.notebook_params prepare params.yaml OUT_DIR          # for make test

A parameters file is a YAML mapping. A top-level key is a parameter for every notebook that
declares it; a key named after a notebook (``04_inversion:``) holds a mapping of parameters for
that notebook only, so that two notebooks may give the same name different values::

    device: cpu
    04_inversion:
      n_images: 16

``prepare`` writes every notebook with its parameters injected (papermill's ``prepare_only``)
without running it: ``make test`` runs those copies under nbval with ``params/ci.yaml``, the
small parameters that keep CI fast, while ``make figures`` runs the notebooks' own defaults.

Without notebooks, both read ``notebooks/[0-9][0-9]_*.ipynb`` of the source checkout.
"""

from __future__ import annotations

import argparse
import ast
import json
import sys
from pathlib import Path

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"


def default_notebooks() -> list[Path]:
    """The numbered notebooks of the source checkout, in order."""
    return sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def parameters_cell(notebook: str | Path) -> str:
    """The source of the one cell tagged ``parameters``; ValueError if there is not exactly one."""
    cells = json.loads(Path(notebook).read_text())["cells"]
    tagged = [cell for cell in cells
              if "parameters" in cell.get("metadata", {}).get("tags", [])]
    if len(tagged) != 1:
        raise ValueError(f"{notebook}: {len(tagged)} cells tagged 'parameters', expected one")
    if tagged[0]["cell_type"] != "code":
        raise ValueError(f"{notebook}: the cell tagged 'parameters' is not a code cell")
    source = tagged[0]["source"]
    return "".join(source) if isinstance(source, list) else source


def declared_parameters(notebook: str | Path) -> list[str]:
    """The names the parameters cell assigns at top level, in order (parsed with ast, not run)."""
    names = []
    for node in ast.parse(parameters_cell(notebook)).body:
        targets = (node.targets if isinstance(node, ast.Assign)
                   else [node.target] if isinstance(node, ast.AnnAssign) else [])
        for target in targets:
            for name in ast.walk(target):
                if isinstance(name, ast.Name) and name.id not in names:
                    names.append(name.id)
    return names


def known_parameters(notebooks=None) -> dict[str, list[str]]:
    """Every declared name -> the notebooks (file names) that declare it."""
    known: dict[str, list[str]] = {}
    for notebook in notebooks or default_notebooks():
        for name in declared_parameters(notebook):
            known.setdefault(name, []).append(Path(notebook).name)
    return dict(sorted(known.items()))


def unknown_keys(params: dict, notebooks=None) -> tuple[list[str], list[str]]:
    """(keys of ``params`` that no notebook declares, every known name). A notebook's section
    (``04_inversion: {...}``) must name a notebook, and its keys must be declared by it."""
    notebooks = list(notebooks or default_notebooks())
    known = known_parameters(notebooks)
    stems = {Path(nb).stem: nb for nb in notebooks}
    unknown = []
    for key, value in params.items():
        if key in stems and isinstance(value, dict):
            declared = declared_parameters(stems[key])
            unknown += [f"{key}.{name}" for name in value if name not in declared]
        elif key not in known:
            unknown.append(key)
    return unknown, list(known)


def params_for(params: dict, notebook: str | Path) -> dict:
    """The parameters one notebook receives: the top-level keys it declares, then its section."""
    declared = declared_parameters(notebook)
    chosen = {key: value for key, value in params.items()
              if key in declared and not isinstance(value, dict)}
    return chosen | params.get(Path(notebook).stem, {})


def prepare(path: str | Path, out_dir: str | Path, notebooks=None) -> list[Path]:
    """Write each notebook to ``out_dir`` with its parameters of ``path`` injected, unexecuted."""
    import papermill

    # the file may hold sections and keys for notebooks not prepared now: check against all
    everyone = sorted(set(default_notebooks()) | {Path(nb) for nb in notebooks or []})
    message = check(path, everyone)
    if message:
        raise ValueError(message)
    params = read_params_file(path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for notebook in notebooks or default_notebooks():
        target = out_dir / Path(notebook).name
        papermill.execute_notebook(str(notebook), str(target), parameters=params_for(params, notebook),
                                   prepare_only=True, kernel_name="python3", log_output=False,
                                   progress_bar=False)
        written.append(target)
    return written


def read_params_file(path: str | Path) -> dict:
    import yaml  # papermill's own dependency; only `make figures PARAMS=...` needs it

    try:
        params = yaml.safe_load(Path(path).read_text())
    except yaml.YAMLError as error:
        raise ValueError(f"{path}: not valid YAML ({error})".replace("\n", " ")) from None
    if params is None:
        return {}
    if not isinstance(params, dict):
        raise ValueError(f"{path}: a parameters file must be a YAML mapping of name: value")
    return params


def check(path: str | Path, notebooks=None) -> str | None:
    """None if every key of the YAML file ``path`` is declared by a notebook, else the one-line
    message that names the unknown keys and lists the known names."""
    unknown, known = unknown_keys(read_params_file(path), notebooks)
    if not unknown:
        return None
    return (f"{path}: unknown parameter{'s' if len(unknown) > 1 else ''} "
            f"{', '.join(map(repr, unknown))}; the notebooks' parameters cells declare: "
            f"{', '.join(known)}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m icd_lite.notebook_params",
                                     description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    check_parser = sub.add_parser("check", help="refuse a parameters file with an unknown key")
    check_parser.add_argument("params", help="YAML file of papermill parameters")
    check_parser.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9][0-9]_*")
    list_parser = sub.add_parser("list", help="print every parameter and who declares it")
    list_parser.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9][0-9]_*")
    section_parser = sub.add_parser("section", help="print the YAML one notebook receives")
    section_parser.add_argument("params", help="YAML file of papermill parameters")
    section_parser.add_argument("notebook")
    prepare_parser = sub.add_parser("prepare", help="write the notebooks with their parameters "
                                                    "injected, unexecuted (for nbval)")
    prepare_parser.add_argument("params", help="YAML file of papermill parameters")
    prepare_parser.add_argument("out_dir")
    prepare_parser.add_argument("notebooks", nargs="*", help="default: notebooks/[0-9][0-9]_*")
    args = parser.parse_args(argv)
    notebooks = getattr(args, "notebooks", None) or None
    if args.command == "list":
        for name, where in known_parameters(notebooks).items():
            print(f"{name:20s} {', '.join(where)}")
        return 0
    try:
        # section and prepare read files that may hold other notebooks' sections: check all
        message = check(args.params, notebooks if args.command == "check" else None)
        if not message and args.command == "section":
            import yaml

            print(yaml.safe_dump(params_for(read_params_file(args.params), args.notebook)), end="")
        elif not message and args.command == "prepare":
            for target in prepare(args.params, args.out_dir, notebooks):
                print(target)
    except (OSError, ValueError) as error:  # no such file, not a mapping, bad notebook
        message = str(error)
    if message:
        print(message, file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
