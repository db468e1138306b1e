"""The Tux Paint stamps: a small, real image + text + category data set, with WordNet labels.

A stamp is ``<root>/<category>/<sub>/.../NAME.png`` (``NAME_mirror.png``: a flipped copy) with an English description
on ``NAME.txt``'s first line; the two first folders give its class (``animals/mammals``, or ``<top>/misc``). A
normalised name's WNID comes from the reviewed ``tables/tuxpaint_wnids.csv`` (names ambiguous in ImageNet, compounds
WordNet cannot find; empty WNID = excluded), else from its (or its singular's) one noun sense in the label space."""
from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Collection, Iterable, Sequence

import numpy as np
import pandas as pd

from zsl_utils import config
from zsl_utils.data import wnids
from zsl_utils.data.wordnet import WordNet
from zsl_utils.errors import DataLayoutError, ParameterError

MIRROR_SUFFIX = "_mirror"
TUXPAINT_TABLE = config.TABLES_DIR / "tuxpaint_wnids.csv"


def read_description(text_path: Path) -> str:
    """First line of a stamp's ``NAME.txt``, whitespace collapsed; '' when absent."""
    if not text_path.is_file():
        return ""
    with open(text_path, encoding="utf-8", errors="replace") as handle:
        return " ".join(handle.readline().split())


def load_stamps(root: Path | None = None) -> pd.DataFrame:
    """One row per PNG stamp, sorted by path: ``path, name, description, category, top_category``; never downloads."""
    root = Path(root) if root else config.TUXPAINT_DIR
    if not root.is_dir():
        raise DataLayoutError(f"Tux Paint stamps folder {root} does not exist; run `make data` (or `python -m "
                              "zsl_utils.data.assets`) or pass the folder that holds <category>/<sub>/NAME.png.")
    rows = []
    for png in sorted(root.rglob("*.png")):
        if png.stem.endswith(MIRROR_SUFFIX):
            continue
        top, sub = [*png.relative_to(root).parts[:-1], "misc", "misc"][:2]  # a missing folder level is "misc"
        rows.append((png, png.stem, read_description(png.with_suffix(".txt")), f"{top}/{sub}", top))
    if not rows:
        raise DataLayoutError(f"No NAME.png stamps found under {root}; expected <category>/<sub>/NAME.png.")
    return pd.DataFrame(rows, columns=["path", "name", "description", "category", "top_category"])


def normalise_stamp_name(name: str) -> str:
    """Lower case, ``-`` -> ``_``, a trailing number dropped: ``'Rainbow-lorikeet-2'`` -> ``'rainbow_lorikeet'``."""
    text = name.strip().lower().replace("-", "_").replace(" ", "_")
    return re.sub(r"_?\d+$", "", text) or text


def _singular_forms(word: str) -> list[str]:
    endings = (("ies", "y"), ("es", ""), ("s", ""))
    return [word[: -len(end)] + repl for end, repl in endings if word.endswith(end)]


def load_tuxpaint_table(path: str | os.PathLike | None = None) -> pd.DataFrame:
    """The reviewed name -> WNID table (columns ``name, wnid, note``; empty wnid = excluded)."""
    path = Path(path) if path else TUXPAINT_TABLE
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False)
    except FileNotFoundError as error:
        raise DataLayoutError(f"reviewed Tux Paint table {path} is missing; reinstall the package.") from error
    if list(table.columns[:3]) != ["name", "wnid", "note"]:
        raise DataLayoutError(f"{path} must have the columns name, wnid, note; found {list(table.columns)}.")
    bad = table[(table["wnid"] != "") & ~table["wnid"].map(wnids.is_wnid)]
    if len(bad):
        raise DataLayoutError(f"{path}: malformed WNIDs {bad['wnid'].tolist()[:5]} (expected n + 8 digits).")
    if duplicated := table["name"][table["name"].duplicated()].tolist():
        raise DataLayoutError(f"{path}: names listed twice: {duplicated[:5]}; keep one row per name.")
    return table


def map_name_to_wnid(name: str, wordnet, label_space: Collection[str],
                     table: pd.DataFrame) -> tuple[str | None, str, str]:
    """``(wnid or None, how, detail)``; ``how``: ``table, excluded, lookup, ambiguous`` (review it), ``unmapped``."""
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


def tuxpaint_by_wnid(stamps: pd.DataFrame | None = None, wordnet: WordNet | None = None,
                     label_space: Collection[str] | None = None,
                     seen_wnids: Iterable[str] | None = None) -> pd.DataFrame:
    """Every stamp plus its WNID decision: ``wnid`` (None: unmapped), ``how``, ``detail``, ``lemma``, ``seen``."""
    stamps = load_stamps() if stamps is None else stamps
    wordnet = WordNet.load() if wordnet is None else wordnet
    seen = set(wnids.imagenet_wnids("1k") if seen_wnids is None else seen_wnids)
    space = set(label_space) if label_space is not None else set(wnids.imagenet_wnids("21k")) | seen
    table = load_tuxpaint_table().set_index("name")
    decisions = [map_name_to_wnid(name, wordnet, space, table) for name in stamps["name"]]
    labels = [d[0] for d in decisions]
    lemmas = [wordnet.synset(w).lemmas[0] if w else None for w in labels]
    return stamps.assign(wnid=pd.Series(labels, index=stamps.index, dtype=object), how=[d[1] for d in decisions],
                         detail=[d[2] for d in decisions], lemma=pd.Series(lemmas, index=stamps.index, dtype=object),
                         seen=[w is not None and w in seen for w in labels])


def filter_stamps(frame: pd.DataFrame, photos_only: bool = True, top_categories: Sequence[str] | None = None,
                  under: str | None = None, wordnet: WordNet | None = None) -> pd.DataFrame:
    """The rows that pass every filter, re-indexed from 0. ``photos_only`` drops the drawings (``cartoon/`` folders);
    ``under`` keeps rows whose ``wnid`` is that synset or below it (``under=animal`` drops the animals' teddy bear)."""
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
            raise ParameterError(
                f"filter_stamps: under={under!r} needs wordnet= (zsl_utils.data.wordnet.WordNet.load()).")
        if under not in wordnet:
            raise ParameterError(f"filter_stamps: under={under!r} is not a WordNet 3.0 noun synset (n + 8 digits).")
        keep &= np.array([isinstance(w, str) and (w == under or under in wordnet.ancestors(w))
                          for w in frame["wnid"]], dtype=bool)
    return frame[keep].reset_index(drop=True)


def tuxpaint_items(stamps: pd.DataFrame, min_items_per_class: int = 6) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(items, skipped)``: stamps as HUSE items (``item_id, image_path, text, label``; label = class); stamps without
    a description and classes of fewer than ``min_items_per_class`` (too few to split three ways) are skipped."""
    rows = [(str(Path(s.category) / s.name), str(s.path), s.description or "", s.category)
            for s in stamps.itertuples(index=False)]
    items = pd.DataFrame(rows, columns=["item_id", "image_path", "text", "label"])
    empty = items["text"] == ""
    class_size = items[~empty].groupby("label")["label"].transform("size").reindex(items.index, fill_value=0)
    small = ~empty & (class_size < min_items_per_class)
    skipped = pd.concat([items[empty].assign(reason="empty text"),
                         items[small].assign(reason=f"class has < {min_items_per_class} items")])
    skipped = skipped[["item_id", "image_path", "reason"]].reset_index(drop=True)
    return items[~empty & ~small].reset_index(drop=True), skipped


def category_tree(classes: Sequence[str]) -> tuple[dict[str, tuple[str, ...]], dict[str, str]]:
    """``(parents, superclass)`` of the stamps' folder tree: ``animals/mammals`` -> ``animals`` -> ``stamps``."""
    parents: dict[str, tuple[str, ...]] = {}
    for name in classes:
        top = name.split("/")[0]
        parents[name] = (top,)
        parents[top] = ("stamps",)
    return parents, {c: c.split("/")[0] for c in classes}
