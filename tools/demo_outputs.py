"""Execute the numbered notebooks on the demo profile and store the outputs in the committed .ipynb files.

    python tools/demo_outputs.py            # every notebook (what `make notebooks` runs)
    python tools/demo_outputs.py 03         # one notebook

The committed notebooks are what a reader opens on GitHub or in JupyterLab, and the reference
that nbval compares the marked key-number cells with (`make test`). Each executed notebook
records, in its metadata, hashes of its own cell sources and of the library it ran against, so
`tests/test_notebooks_clean.py` can tell when its outputs have gone stale. The demo profile is
the notebooks' defaults; this script refuses to run if `notebooks/profiles/demo.yaml` says
otherwise. Figures go to `figures/` (the committed ones). Run `jupytext --sync` before, so
that each .ipynb holds its paired .py source.
"""
from __future__ import annotations

import hashlib
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parents[1]
METADATA_KEY = "zsl_demo_outputs"


def library_hash() -> str:
    """SHA-256 over the library's sources and tables (relative path and bytes of each file)."""
    digest = hashlib.sha256()
    package = ROOT / "zsl_utils"
    files = sorted(p for p in package.rglob("*") if p.is_file() and p.suffix in (".py", ".csv", ".txt"))
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def sources_hash(nb: nbformat.NotebookNode) -> str:
    digest = hashlib.sha256()
    for cell in nb.cells:
        digest.update(f"{cell.cell_type}\0{cell.source.strip()}\0".encode())
    return digest.hexdigest()


def staleness_problems(nb: nbformat.NotebookNode) -> list[str]:
    """Why ``nb``'s outputs are not the demo run of its current cells on the current library ([] when they are)."""
    record = nb.metadata.get(METADATA_KEY)
    if not record:
        return ["no demo outputs recorded: run `make notebooks`"]
    problems = []
    if record.get("sources_sha256") != sources_hash(nb):
        problems.append("cells were edited after the outputs were made: run `make notebooks`")
    if record.get("library_sha256") != library_hash():
        problems.append("zsl_utils changed after the outputs were made: run `make notebooks`")
    counts = []
    for index, cell in enumerate(nb.cells):
        if cell.cell_type != "code":
            continue
        counts.append(cell.get("execution_count"))
        if any(output.get("output_type") == "error" for output in cell.get("outputs", [])):
            problems.append(f"cell {index} shows an error")
    if None in counts or counts != sorted(counts) or len(set(counts)) != len(counts):
        problems.append(f"code cells were not executed once each, in order: execution counts {counts}")
    return problems


def check_demo_profile_is_the_defaults(notebook: Path) -> None:
    sys.path.insert(0, str(ROOT))
    from zsl_utils import profiles  # lazy: only this tool's main needs the library

    plan = profiles.plan_runs("demo", notebooks=[notebook.stem])
    declared = profiles.read_notebook_parameters(notebook)
    for name, value in plan[0].parameters.items():
        if value != declared[name].default_value():
            raise SystemExit(f"demo.yaml sets {name}={value!r} for {notebook.name} but its default is "
                             f"{declared[name].default!r}: the committed outputs must be the demo profile; "
                             f"make them agree.")


def execute(notebook: Path) -> None:
    check_demo_profile_is_the_defaults(notebook)
    nb = nbformat.read(notebook, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs, cell.execution_count = [], None
    print(f"executing {notebook.name} ...", flush=True)
    NotebookClient(nb, timeout=3600, kernel_name="python3", resources={"metadata": {"path": str(notebook.parent)}},
                   record_timing=False).execute()
    nb.metadata[METADATA_KEY] = {"profile": "demo", "sources_sha256": sources_hash(nb),
                                 "library_sha256": library_hash()}
    nb.metadata.pop("widgets", None)  # progress-bar widget state: noise in a committed file
    nbformat.write(nb, notebook)
    problems = staleness_problems(nb)
    if problems:
        raise SystemExit(f"{notebook.name}: {problems}")
    print(f"wrote {notebook}", flush=True)


def main(argv: list[str]) -> int:
    notebooks = sorted((ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"))
    wanted = [nb for nb in notebooks if not argv or nb.stem[:2] in argv or nb.stem in argv]
    if not wanted:
        raise SystemExit(f"no notebook matches {argv}; notebooks: {[nb.stem for nb in notebooks]}")
    for notebook in wanted:
        execute(notebook)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
