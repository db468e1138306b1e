"""Image files: folders of images labelled by WNID, and decoding them to RGB."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Collection

import pandas as pd
from PIL import Image

from zsl_utils.data.wnids import is_wnid
from zsl_utils.errors import DataLayoutError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def image_folder_by_wnid(root: str | os.PathLike, wnids: Collection[str] | None = None,
                         max_per_class: int | None = None,
                         extensions: Collection[str] = IMAGE_EXTENSIONS) -> pd.DataFrame:
    """Images under ``<root>/<wnid>/`` as a DataFrame ``path, wnid``, sorted by path. Folders not named by
    a WNID are ignored (listed in ``frame.attrs['ignored_folders']``); ``wnids`` keeps only those classes
    (absent ones in ``frame.attrs['missing_wnids']``); ``max_per_class`` keeps the first images by name."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(
            f"image folder {root} does not exist; pass the folder that holds one sub-folder per WNID "
            f"(<root>/n01440764/*.JPEG), e.g. an extracted ImageNet release or ILSVRC-2012 val by class."
        )
    if max_per_class is not None and max_per_class < 1:
        raise DataLayoutError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    wanted = set(wnids) if wnids is not None else None
    rows, ignored = [], []
    with os.scandir(root) as entries:
        folders = sorted((e for e in entries if e.is_dir()), key=lambda e: e.name)
    for folder in folders:
        if not is_wnid(folder.name):
            ignored.append(folder.name)
            continue
        if wanted is not None and folder.name not in wanted:
            continue
        with os.scandir(folder.path) as files:
            names = sorted(f.name for f in files if f.is_file() and Path(f.name).suffix.lower() in extensions)
        rows.extend((os.path.join(folder.path, n), folder.name) for n in names[:max_per_class])
    if not rows and not wanted:
        raise DataLayoutError(
            f"no images found under {root}: expected sub-folders named by WNID (n + 8 digits) holding "
            f"images with suffixes {sorted(extensions)}; found folders {[f.name for f in folders[:5]]}."
        )
    frame = pd.DataFrame(rows, columns=["path", "wnid"])
    frame.attrs["ignored_folders"] = ignored
    frame.attrs["missing_wnids"] = sorted(wanted - set(frame["wnid"])) if wanted is not None else []
    return frame


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB, transparent pixels composited onto ``background``. A plain ``convert('RGB')``
    turns a PNG's transparent background (all Tux Paint stamps) black, which no ImageNet photo looks like."""
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully (truncated files fail here, not later) as RGB, alpha on white."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)


def image_is_readable(path: str | os.PathLike) -> bool:
    """True when PIL can identify and verify the file (header + structure, no full decode)."""
    try:
        with Image.open(path) as image:
            image.verify()
        return True
    except Exception:  # noqa: BLE001 - any failure means "unreadable" here
        return False
