"""Figure helpers shared by the notebooks.

Every figure a notebook draws is saved under ``figures/`` with a name that starts
with the notebook's number, so README links and the notebook stay in step.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

from . import config


def save_figure(fig: "matplotlib.figure.Figure", name: str, directory: Path | None = None) -> Path:
    """Save ``fig`` as ``<directory>/<name>.png`` (default ``figures/``) and return the path."""
    target_dir = config.ensure_dir(Path(directory) if directory else config.FIGURES_DIR)
    path = target_dir / f"{name}.png"
    fig.savefig(path, dpi=110, bbox_inches="tight")
    return path
