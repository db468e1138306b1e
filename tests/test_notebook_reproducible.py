"""The notebooks print the same key numbers on another CPU: other kernels, other thread counts.

Each notebook runs through the runner with the demo profile, from empty caches, under other CPU
settings: notebooks 01 and 02 with torch's AVX2 kernels forced (on this project's AVX-512
machines that changes the arithmetic of a float32 forward in its last bits) and on one thread,
both in one run; notebook 03, whose HUSE trainings are the slow part, with AVX2 kernels and 2
torch threads instead of the demo's 1. The outputs of the cells marked
``# NBVAL_CHECK_OUTPUT`` must equal the committed ones (which come from the default kernels and
threads), after the same masking nbval applies (``notebooks/nbval_sanitize.cfg``). Why it holds:
the demo extracts features with a float64 forward stored as float32 and trains HUSE in float64
(``compute_dtype="float64"``), where rounding differences stay far below what changes a ranking.
Slow: minutes per run.
"""
from __future__ import annotations

import configparser
import re
from pathlib import Path

import nbformat
import pytest

from zsl_utils import config, profiles

MARKER = "# NBVAL_CHECK_OUTPUT"
AVX2 = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_ENABLE_INSTRUCTIONS": "AVX2", "ONEDNN_MAX_CPU_ISA": "AVX2"}
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def sanitise(text: str) -> str:
    """``text`` with nbval's sanitiser patterns applied, in file order."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(config.NOTEBOOKS_DIR / "nbval_sanitize.cfg")
    for section in parser.sections():
        text = re.sub(parser[section]["regex"], parser[section]["replace"], text)
    return text


def checked_outputs(executed: Path) -> list[str]:
    """Sanitised text of the outputs of each marked cell of an executed notebook, one string per cell (how the
    kernel split a cell's printed text into stream messages varies from run to run)."""
    nb = nbformat.read(executed, as_version=4)
    return [sanitise("".join(output.get("text") or output.get("data", {}).get("text/plain", "")
                             for output in cell.outputs))
            for cell in nb.cells if cell.cell_type == "code" and cell.source.lstrip().startswith(MARKER)]


def test_checked_outputs_reads_only_marked_cells_and_masks_durations(tmp_path):
    nb = nbformat.v4.new_notebook()
    marked = nbformat.v4.new_code_cell(f"{MARKER}\nprint(1)")
    marked.outputs = [nbformat.v4.new_output("stream", text="1 in 0.25 s\n"),
                      nbformat.v4.new_output("execute_result", data={"text/plain": "0.5"}, execution_count=1)]
    unmarked = nbformat.v4.new_code_cell("print(2)")
    unmarked.outputs = [nbformat.v4.new_output("stream", text="2\n")]
    nb.cells = [marked, unmarked]
    nbformat.write(nb, tmp_path / "x.ipynb")
    assert checked_outputs(tmp_path / "x.ipynb") == ["1 in DURATION\n0.5"]


# One run per notebook with both changes at once (each run extracts its images from scratch, minutes apiece).
CPU_VARIANTS = [(path.stem, {**AVX2, **ONE_THREAD}, ()) if path.stem[:2] in ("01", "02")
                else (path.stem, AVX2, ("torch_threads=2",)) for path in profiles.list_notebooks()]


@pytest.mark.slow
@pytest.mark.parametrize(("stem", "variant", "overrides"), CPU_VARIANTS,
                         ids=[f"{stem[:2]}-avx2-{'2-threads' if o else 'one-thread'}" for stem, _, o in CPU_VARIANTS])
def test_key_numbers_do_not_depend_on_the_cpu(stem, variant, overrides, tmp_path, monkeypatch):
    committed = checked_outputs(config.NOTEBOOKS_DIR / f"{stem}.ipynb")
    assert committed, f"{stem} has no '{MARKER}' cell with a committed output to compare"
    for name, value in {**variant, "ZSL_CACHE_DIR": str(tmp_path / "cache"),
                        "ZSL_FIGURES_DIR": str(tmp_path / "figures")}.items():
        monkeypatch.setenv(name, value)  # the kernel inherits these: its own kernels, threads, cache and figures
    runs = profiles.plan_runs("demo", notebooks=[stem], overrides=overrides, runs_dir=tmp_path / "runs")
    profiles.execute_plan(runs, progress_bar=False)
    assert checked_outputs(runs[0].output) == committed
