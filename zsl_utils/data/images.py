"""Image files: folders of images labelled by WNID, and decoding them to RGB."""
from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Collection

import numpy as np
import pandas as pd
from PIL import Image

from zsl_utils import config
from zsl_utils.atomic import write_atomically
from zsl_utils.data.wnids import is_wnid
from zsl_utils.errors import DataLayoutError, ParameterError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})


def _entries(folder: str | os.PathLike, kind: str, skipped: list[str]) -> list[os.DirEntry]:
    """Sub-folders (``kind="dir"``) or files of ``folder`` by name; unreadable ones and bad links go to ``skipped``."""
    try:
        with os.scandir(folder) as scan:
            entries = sorted(scan, key=lambda e: e.name)
    except OSError as error:
        skipped.append(f"{folder} ({error.strerror or error})")
        return []
    kept = []
    for entry in entries:
        try:
            ok = getattr(entry, f"is_{kind}")()
            reason = "" if ok or not entry.is_symlink() or os.path.exists(entry.path) else "dangling link"
        except OSError as error:
            ok, reason = False, error.strerror or str(error)
        if ok:
            kept.append(entry)
        if reason:
            skipped.append(f"{entry.path} ({reason})")
    return kept


def image_folder_by_wnid(root: str | os.PathLike, wnids: Collection[str] | None = None,
                         max_per_class: int | None = None,
                         extensions: Collection[str] = IMAGE_EXTENSIONS) -> pd.DataFrame:
    """Images under ``<root>/<wnid>/`` (``wnids`` only, ``max_per_class`` first by name) as a DataFrame ``path, wnid``;
    ``attrs``: ``ignored_folders``, ``missing_wnids``, and (warned) ``skipped`` unreadable entries and bad links."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"image folder {root} does not exist; pass the folder that holds one sub-folder per "
                              "WNID (<root>/n01440764/*.JPEG), e.g. an extracted ImageNet release or ILSVRC-2012 val.")
    if max_per_class is not None and max_per_class < 1:
        raise DataLayoutError(f"max_per_class must be >= 1 or None, got {max_per_class}.")
    wanted = set(wnids) if wnids is not None else None
    rows, skipped = [], []
    folders = _entries(root, "dir", skipped)
    ignored = [f.name for f in folders if not is_wnid(f.name)]
    for folder in (f for f in folders if is_wnid(f.name) and (wanted is None or f.name in wanted)):
        names = [f.name for f in _entries(folder.path, "file", skipped) if Path(f.name).suffix.lower() in extensions]
        rows.extend((os.path.join(folder.path, n), folder.name) for n in names[:max_per_class])
    if not rows:
        asked = f" for the {len(wanted)} WNIDs asked for" if wanted else ""
        raise DataLayoutError(f"no images found under {root}{asked}: expected sub-folders named by WNID (n + 8 digits) "
                              f"holding images with suffixes {sorted(extensions)}; {len(folders) - len(ignored)} WNID "
                              f"folders, found folders {[f.name for f in folders[:5]]}"
                              f"{f', unreadable: {skipped[:3]}' if skipped else ''}.")
    if skipped:
        warnings.warn(f"{len(skipped)} entries under {root} could not be read and were skipped (frame.attrs['skipped'])"
                      f": {skipped[:3]}", stacklevel=2)
    frame = pd.DataFrame(rows, columns=["path", "wnid"])
    frame.attrs.update(ignored_folders=ignored, skipped=skipped,
                       missing_wnids=sorted(wanted - set(frame["wnid"])) if wanted is not None else [])
    return frame


def imagenet_sample_photos(root: str | os.PathLike | None = None) -> pd.DataFrame:
    """Photos named ``<wnid>_<name>.JPEG`` in ``root`` (None: the copy ``make data`` fetched), by file name, as a
    DataFrame ``path, wnid, name`` (``n01440764_great_white.JPEG`` -> ``great white``); other files are ignored."""
    root = Path(config.IMAGENET_SAMPLE_DIR if root is None else root).expanduser()
    files = sorted(p for p in root.iterdir() if p.suffix.lower() in (".jpeg", ".jpg")) if root.is_dir() else []
    rows = [(str(p), *p.stem.partition("_")[::2]) for p in files if is_wnid(p.stem.partition("_")[0])]
    if not rows:
        raise DataLayoutError(f"no photos named <wnid>_<name>.JPEG (e.g. n01440764_tench.JPEG) in {root}; pass the "
                              "folder of a clone of EliSchwartz/imagenet-sample-images, or run `make data` (python -m zsl_utils.data.assets).")
    frame = pd.DataFrame(rows, columns=["path", "wnid", "name"])
    return frame.assign(name=frame["name"].str.replace("_", " "))


def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any image as RGB: alpha onto ``background`` (``convert('RGB')`` turns it black), 16-bit grey scaled to 8 bits."""
    if image.mode.startswith("I"):
        image = Image.fromarray((np.asarray(image, dtype=np.float64) / 257).clip(0, 255).round().astype(np.uint8))
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image_rgb(path: str | os.PathLike, draft_size: int | None = None) -> Image.Image:
    """Decode ``path`` fully (truncated files fail here, not later) as RGB, alpha on white; ``draft_size``: a JPEG
    is decoded at the smallest DCT scale (1/2 .. 1/8) keeping both sides >= it (PIL's draft mode; others: as is)."""
    with Image.open(path) as image:
        if draft_size is not None:
            image.draft("RGB", (draft_size, draft_size))
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


VIEWS = ("original", "mirrored", "centre crop", "mirrored centre crop")  # fixed views: the same files everywhere


def augmented_views(photos: pd.DataFrame, folder: str | os.PathLike, n_views: int = 3) -> pd.DataFrame:
    """``photos`` (``path``, ``wnid``) repeated once per view (:data:`VIEWS`, first ``n_views``): the original,
    its mirror image, the central 80 % and its mirror, written once as JPEG (quality 95) into ``folder``."""
    if not 1 <= n_views <= len(VIEWS):
        raise ParameterError(f"n_views={n_views}: choose 1 to {len(VIEWS)} ({', '.join(VIEWS)}).")
    rows = []
    for view in range(n_views):
        for _, photo in photos.iterrows():
            target = Path(folder) / f"{Path(photo.path).stem}_view{view}.jpg"
            if view and not target.is_file():
                image = load_image_rgb(photo.path)
                if view >= 2:
                    width, height = image.size
                    image = image.crop((width // 10, height // 10, width - width // 10, height - height // 10))
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if view % 2 else image
                config.ensure_dir(target.parent)
                write_atomically(target, lambda handle: image.save(handle, format="JPEG", quality=95))
            rows.append({"path": str(target) if view else str(photo.path), "wnid": photo.wnid, "view": VIEWS[view]})
    return pd.DataFrame(rows)
