"""The Tux Paint stamps as a small, real image + text + category data set.

Each stamp is ``<root>/<category>/<sub>/.../NAME.png`` with ``NAME.txt`` beside it,
whose first line is an English description ("A badger."). The two first folder
levels give the class (``animals/mammals``); the first alone gives the superclass.
Stamps that sit directly in a top-level folder get ``<top>/misc`` as their class.
``NAME_mirror.png`` files are Tux Paint's pre-flipped copies of another stamp, not new
items, so they are left out.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd

from zsl_utils.data import assets
from zsl_utils.errors import DataLayoutError

MIRROR_SUFFIX = "_mirror"
COLUMNS = ("path", "name", "description", "category", "top_category")


def read_description(text_path: Path) -> str:
    """First line of a stamp's ``NAME.txt`` (English), stripped; '' when absent."""
    if not text_path.is_file():
        return ""
    with open(text_path, encoding="utf-8", errors="replace") as handle:
        return handle.readline().strip()


def _category(relative: Path) -> str:
    parts = relative.parts[:-1]
    if not parts:
        return "misc/misc"
    return f"{parts[0]}/{parts[1]}" if len(parts) > 1 else f"{parts[0]}/misc"


def load_stamps(root: Path | None = None) -> pd.DataFrame:
    """One row per PNG stamp, sorted by path: ``path, name, description, category, top_category``."""
    root = Path(root) if root else assets.ensure_tuxpaint()
    if not root.is_dir():
        raise DataLayoutError(
            f"Tux Paint stamps folder {root} does not exist; run `python -m zsl_utils.data.assets` "
            "or pass the folder that holds <category>/<sub>/NAME.png."
        )
    rows = []
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith(MIRROR_SUFFIX):
            continue
        relative = png.relative_to(root)
        category = _category(relative)
        rows.append((png, png.stem, read_description(png.with_suffix(".txt")), category, category.split("/")[0]))
    if not rows:
        raise DataLayoutError(f"No NAME.png stamps found under {root}; expected <category>/<sub>/NAME.png.")
    return pd.DataFrame(rows, columns=list(COLUMNS))
