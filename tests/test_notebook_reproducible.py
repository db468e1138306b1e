"""Running a notebook twice with the same seed on CPU gives identical key numbers.

Each committed notebook runs twice through the runner with the demo profile, each run
with its own empty cache and figures folders (so the second run recomputes rather
than reads the first run's cache); the outputs of the cells marked
``# NBVAL_CHECK_OUTPUT`` must be identical. Slow: minutes per notebook.
"""
from __future__ import annotations

from pathlib import Path

import nbformat
import pytest

from zsl_utils import profiles

MARKER = "# NBVAL_CHECK_OUTPUT"


def checked_outputs(executed: Path) -> list[str]:
    """Text of every output of the marked cells of an executed notebook, in order."""
    nb = nbformat.read(executed, as_version=4)
    texts = []
    for cell in nb.cells:
        if cell.cell_type != "code" or not cell.source.lstrip().startswith(MARKER):
            continue
        for output in cell.outputs:
            texts.append(output.get("text") or output.get("data", {}).get("text/plain", ""))
    return texts


def test_checked_outputs_reads_only_marked_cells(tmp_path):
    nb = nbformat.v4.new_notebook()
    marked = nbformat.v4.new_code_cell(f"{MARKER}\nprint(1)")
    marked.outputs = [nbformat.v4.new_output("stream", text="1\n"),
                      nbformat.v4.new_output("execute_result", data={"text/plain": "0.5"}, execution_count=1)]
    unmarked = nbformat.v4.new_code_cell("print(2)")
    unmarked.outputs = [nbformat.v4.new_output("stream", text="2\n")]
    nb.cells = [marked, unmarked]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert checked_outputs(tmp_path / "x.ipynb") == ["1\n", "0.5"]


NOTEBOOKS = [pytest.param(path.stem, id=path.stem) for path in profiles.list_notebooks()] or [
    pytest.param(None, marks=pytest.mark.skip(reason="no numbered notebooks committed yet"))
]


@pytest.mark.slow
@pytest.mark.parametrize("stem", NOTEBOOKS)
def test_same_seed_same_numbers(stem, tmp_path, monkeypatch):
    outputs = []
    for attempt in ("first", "second"):
        # the kernel inherits these, so each run writes its own cache and figures
        monkeypatch.setenv("ZSL_CACHE_DIR", str(tmp_path / attempt / "cache"))
        monkeypatch.setenv("ZSL_FIGURES_DIR", str(tmp_path / attempt / "figures"))
        runs = profiles.plan_runs("demo", notebooks=[stem], runs_dir=tmp_path / attempt / "runs")
        profiles.execute_plan(runs, progress_bar=False)
        outputs.append(checked_outputs(runs[0].output))
    assert outputs[0], f"{stem} has no '{MARKER}' cell with output to compare"
    assert outputs[0] == outputs[1]
