"""Evaluation images labelled by WordNet id (WNID).

Two sources, one output shape (a DataFrame with at least ``path`` and ``wnid``):

* :func:`image_folder_by_wnid` -- any folder of images arranged as
  ``<root>/<wnid>/<image>`` (ImageNet fall-2011 extracted per synset, ILSVRC-2012 val
  arranged by class). The label is read from the folder name.
* :func:`tuxpaint_by_wnid` -- the Tux Paint stamps (the offline demo data) whose names
  denote WordNet noun synsets in the ImageNet label space.

How a stamp name becomes a WNID (in this order):

1. The name is normalised: lower case, ``-`` -> ``_``, a trailing number dropped
   (``lion-2`` -> ``lion``, ``Strawberry2`` -> ``strawberry``).
2. If the reviewed table ``zsl_utils/tables/tuxpaint_wnids.csv`` lists the name, its
   WNID is used (an empty WNID there means "reviewed and excluded", with the reason).
   The table covers every name that is ambiguous within ImageNet and compound names
   (``heron_greatblue``) whose synset WordNet cannot find by itself.
3. Otherwise the name (or its singular: ``-ies`` -> ``-y``, ``-es``/``-s`` dropped) is looked
   up in WordNet; if exactly one of its noun senses is in the label space, that is the
   label. Several senses in the label space is ``ambiguous`` (left out and reported: add
   the name to the table), none is ``unmapped``.

:func:`filter_stamps` then narrows the mapped stamps to photos, categories or the synsets
below one WNID (notebook 01 keeps the animal photos; notebook 02 uses every mapped stamp).
"""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np
import pandas as pd
from PIL import Image

from zsl_utils import config
from zsl_utils.data import wnids
from zsl_utils.errors import DataLayoutError, ParameterError

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff"})
WNID_PATTERN = re.compile(r"^n\d{8}$")
TUXPAINT_TABLE = config.TABLES_DIR / "tuxpaint_wnids.csv"


# ----------------------------------------------------------------------------- image folders
def image_folder_by_wnid(
    root: str | os.PathLike,
    wnids: Collection[str] | None = None,
    max_per_class: int | None = None,
    extensions: Collection[str] = IMAGE_EXTENSIONS,
) -> pd.DataFrame:
    """Images under ``<root>/<wnid>/`` as a DataFrame ``path, wnid``, sorted by path.

    Args:
        root: folder whose sub-folders are named by WNID (``n01440764`` ...). Folders
            with other names are ignored and counted in ``frame.attrs['ignored_folders']``.
        wnids: keep only these classes (e.g. a test set); classes without a folder are
            listed in ``frame.attrs['missing_wnids']``.
        max_per_class: keep the first ``n`` images (sorted by name) of every class, for a
            quick run; None keeps everything.
        extensions: file suffixes (lower case) that count as images. Whether a file is a
            readable image is checked later, when it is decoded (bad ones are skipped).
    """
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
        if not WNID_PATTERN.match(folder.name):
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


# ----------------------------------------------------------------------------- Tux Paint
def normalise_stamp_name(name: str) -> str:
    """``'rainbow-lorikeet'`` -> ``'rainbow_lorikeet'``; ``'lion-2'`` -> ``'lion'``; ``'towTruck'`` -> ``'towtruck'``."""
    text = name.strip().lower().replace("-", "_").replace(" ", "_")
    return re.sub(r"_?\d+$", "", text) or text



def to_rgb(image: Image.Image, background: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Any PIL image as RGB; transparent pixels are composited onto ``background`` (white).

    A plain ``convert('RGB')`` would turn the transparent background of a PNG (all Tux
    Paint stamps) black, which no ImageNet photo looks like.
    """
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, background + (255,))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return image.convert("RGB")


def load_image_rgb(path: str | os.PathLike) -> Image.Image:
    """Decode ``path`` fully (truncated files fail here, not later) and return it as RGB (alpha on white)."""
    with Image.open(path) as image:
        image.load()
        return to_rgb(image)

def _singular_forms(word: str) -> list[str]:
    forms = []
    if word.endswith("ies"):
        forms.append(word[:-3] + "y")
    if word.endswith("es"):
        forms.append(word[:-2])
    if word.endswith("s"):
        forms.append(word[:-1])
    return forms


def load_tuxpaint_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The reviewed name -> WNID table (columns ``name, wnid, note``; empty wnid = excluded)."""
    path = Path(path) if path else TUXPAINT_TABLE
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as error:
        raise DataLayoutError(f"reviewed Tux Paint table {path} is missing; reinstall the package.") from error
    if list(table.columns[:3]) != ["name", "wnid", "note"]:
        raise DataLayoutError(f"{path} must have the columns name, wnid, note; found {list(table.columns)}.")
    bad = table[(table["wnid"] != "") & ~table["wnid"].str.match(WNID_PATTERN.pattern)]
    if len(bad):
        raise DataLayoutError(f"{path}: malformed WNIDs {bad['wnid'].tolist()[:5]} (expected n + 8 digits).")
    duplicated = table["name"][table["name"].duplicated()].tolist()
    if duplicated:
        raise DataLayoutError(f"{path}: names listed twice: {duplicated[:5]}; keep one row per name.")
    return table


def map_name_to_wnid(
    name: str, wordnet, label_space: Collection[str], table: pd.DataFrame
) -> tuple[str | None, str, str]:
    """``(wnid or None, how, detail)`` for one stamp name, by the rule in the module docstring.

    ``how`` is one of ``table``, ``excluded``, ``lookup``, ``ambiguous``, ``unmapped``.
    """
    key = normalise_stamp_name(name)
    reviewed = table.set_index("name") if "name" in table.columns else table
    if key in reviewed.index:
        wnid, note = reviewed.at[key, "wnid"], reviewed.at[key, "note"]
        if not wnid:
            return None, "excluded", note
        if wnid not in label_space:
            return None, "excluded", f"reviewed as {wnid}, which is outside the label space"
        return wnid, "table", note
    for word in [key, *_singular_forms(key)]:
        senses = [s for s in wordnet.lookup(word) if s in label_space]
        if len(senses) == 1:
            return senses[0], "lookup", word
        if len(senses) > 1:
            return None, "ambiguous", f"{word}: {', '.join(senses)}"
    return None, "unmapped", ""


def tuxpaint_by_wnid(
    stamps: pd.DataFrame | None = None,
    wordnet=None,
    label_space: Collection[str] | None = None,
    seen_wnids: Iterable[str] | None = None,
    table_path: str | os.PathLike | None = None,
) -> pd.DataFrame:
    """Every Tux Paint stamp with its WNID decision.

    Returns the stamps frame (``path, name, description, category, top_category``) plus
    ``wnid`` (None when not mapped), ``how`` (see :func:`map_name_to_wnid`), ``detail``,
    ``lemma`` (first WordNet lemma) and ``seen`` (the WNID is a training label). Defaults:
    all stamps, WordNet 3.0, the ImageNet fall-2011 release plus the ILSVRC-2012 labels
    as label space, and the ILSVRC-2012 labels as the seen set. Keep the mapped rows with
    ``frame[frame.wnid.notna()]``.
    """
    from zsl_utils.data.tuxpaint import load_stamps
    from zsl_utils.data.wordnet import WordNet

    stamps = load_stamps() if stamps is None else stamps
    wordnet = WordNet.load() if wordnet is None else wordnet
    seen = set(wnids.ilsvrc2012_wnids() if seen_wnids is None else seen_wnids)
    space = set(label_space) if label_space is not None else set(wnids.imagenet21k_wnids()) | seen
    table = load_tuxpaint_table(table_path).set_index("name")
    decisions = [map_name_to_wnid(name, wordnet, space, table) for name in stamps["name"]]
    frame = stamps.copy()
    wnid_column = [d[0] for d in decisions]
    frame["wnid"] = pd.Series(wnid_column, index=frame.index, dtype=object)
    frame["how"] = [d[1] for d in decisions]
    frame["detail"] = [d[2] for d in decisions]
    frame["lemma"] = pd.Series([wordnet.synset(w).lemmas[0] if w else None for w in wnid_column], index=frame.index,
                               dtype=object)
    frame["seen"] = [w is not None and w in seen for w in wnid_column]
    return frame


def filter_stamps(
    frame: pd.DataFrame,
    photos_only: bool = True,
    top_categories: Sequence[str] | None = None,
    under: str | None = None,
    wordnet=None,
) -> pd.DataFrame:
    """The rows of a stamps frame (e.g. from :func:`tuxpaint_by_wnid`) that pass every filter.

    Args:
        frame: needs ``path``; ``top_category`` with ``top_categories``; ``wnid`` with ``under``.
        photos_only: drop the drawings, which Tux Paint keeps in ``cartoon/`` folders.
        top_categories: keep these top-level folders, e.g. ``("animals",)``; None keeps all.
        under: keep rows whose ``wnid`` is this synset or below it (e.g. ``n00015388``,
            animal); rows without a WNID drop. The animals folder also holds things that are
            not animals (a teddy bear), which this removes.
        wordnet: the :class:`~zsl_utils.data.wordnet.WordNet` that ``under`` is resolved in.

    Returns the kept rows, re-indexed from 0.
    """
    keep = pd.Series(True, index=frame.index)
    if photos_only:
        keep &= ~frame["path"].astype(str).str.contains("/cartoon/", regex=False)
    if top_categories is not None:
        if isinstance(top_categories, str):  # ("animals") is a string, not a one-item tuple
            raise ParameterError(f"filter_stamps: top_categories={top_categories!r} must be a list of names, "
                                 f"e.g. [{top_categories!r}].")
        keep &= frame["top_category"].isin(list(top_categories))
    if under is not None:
        if wordnet is None:
            raise ParameterError(f"filter_stamps: under={under!r} needs wordnet= (zsl_utils.data.wordnet.WordNet.load()).")
        if under not in wordnet:
            raise ParameterError(f"filter_stamps: under={under!r} is not a WordNet 3.0 noun synset (n + 8 digits).")
        keep &= np.array([isinstance(w, str) and (w == under or under in wordnet.ancestors(w))
                          for w in frame["wnid"]], dtype=bool)
    return frame[keep].reset_index(drop=True)
