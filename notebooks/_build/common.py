"""Shared by the notebook generators: (kind, source) pairs -> an output-free notebook.

Each ``nbNN.py`` lists its cells and calls :func:`write_notebook`. The first code cell is
the papermill ``parameters`` cell; ids are fixed (``cell-NN``) so regenerating a
notebook changes only the cells that were edited.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

import nbformat
from nbformat.v4 import new_code_cell, new_markdown_cell, new_notebook

KERNELSPEC = {"display_name": "Python 3", "language": "python", "name": "python3"}


def build_notebook(cells: Sequence[tuple[str, str]]) -> nbformat.NotebookNode:
    """``cells`` are ("md" | "code", source) pairs, in order."""
    notebook = new_notebook()
    notebook.metadata["kernelspec"] = dict(KERNELSPEC)
    notebook.metadata["language_info"] = {"name": "python"}
    for index, (kind, source) in enumerate(cells):
        cell = new_markdown_cell(source) if kind == "md" else new_code_cell(source)
        cell.id = f"cell-{index:02d}"
        notebook.cells.append(cell)
    first_code = next(cell for cell in notebook.cells if cell.cell_type == "code")
    first_code.metadata["tags"] = ["parameters"]
    return notebook


def write_notebook(cells: Sequence[tuple[str, str]], target: Path) -> None:
    nbformat.write(build_notebook(cells), target)
    print(f"wrote {target}")
