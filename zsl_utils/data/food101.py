"""HUSE items ``item_id, image_path, text, label`` of UPMC Food-101 (both layouts) or Tux Paint, splits, taxonomies."""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from zsl_utils import config
from zsl_utils.data import tuxpaint
from zsl_utils.data.images import image_is_readable
from zsl_utils.data.wnids import is_wnid
from zsl_utils.data.wordnet import WordNet
from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.metrics import hierarchy_correct_sets

FOOD101_CLASSES: tuple[str, ...] = tuple(
    """apple_pie baby_back_ribs baklava beef_carpaccio beef_tartare beet_salad beignets bibimbap bread_pudding
    breakfast_burrito bruschetta caesar_salad cannoli caprese_salad carrot_cake ceviche cheese_plate cheesecake
    chicken_curry chicken_quesadilla chicken_wings chocolate_cake chocolate_mousse churros clam_chowder club_sandwich
    crab_cakes creme_brulee croque_madame cup_cakes deviled_eggs donuts dumplings edamame eggs_benedict escargots
    falafel filet_mignon fish_and_chips foie_gras french_fries french_onion_soup french_toast fried_calamari fried_rice
    frozen_yogurt garlic_bread gnocchi greek_salad grilled_cheese_sandwich grilled_salmon guacamole gyoza hamburger
    hot_and_sour_soup hot_dog huevos_rancheros hummus ice_cream lasagna lobster_bisque lobster_roll_sandwich
    macaroni_and_cheese macarons miso_soup mussels nachos omelette onion_rings oysters pad_thai paella pancakes
    panna_cotta peking_duck pho pizza pork_chop poutine prime_rib pulled_pork_sandwich ramen ravioli red_velvet_cake
    risotto samosa sashimi scallops seaweed_salad shrimp_and_grits spaghetti_bolognese spaghetti_carbonara spring_rolls
    steak strawberry_shortcake sushi tacos takoyaki tiramisu tuna_tartare waffles""".split())
WORDNET_TABLE = config.TABLES_DIR / "food101_wordnet.csv"
# Coarse groups for colouring plots: a class is in the first (most specific) group among its WordNet ancestors.
FOOD101_SUPERCLASSES: tuple[tuple[str, str], ...] = (
    ("soup", "n07583197"), ("salad", "n07806221"), ("sandwich", "n07695965"), ("dessert", "n07609840"),
    ("pasta & dumplings", "n07863374"), ("pasta & dumplings", "n07698915"), ("baked goods", "n07622061"),
    ("seafood", "n07776866"), ("seafood", "n07775375"), ("meat", "n07649854"),  # the second seafood: fish (as food)
    ("starters & spreads", "n07581346"), ("starters & spreads", "n07810907"),  # appetizer; condiment (dips, pate)
    ("vegetables", "n07705711"), ("other dishes", "n07557434"))
OTHER_FOOD = "other food"  # classes under none of the groups above (cheese, rice)
SPLITS = ("train", "test")
ITEM_COLUMNS = ["item_id", "image_path", "text", "label"]
SKIP_COLUMNS = ["item_id", "image_path", "reason"]

MIRROR_TREE = """<root>/
  images/train/<class>/<class>_<n>.jpg
  images/test/<class>/<class>_<n>.jpg
  texts/train_titles.csv   (no header: image file name, text, class)
  texts/test_titles.csv"""
ORIGINAL_TREE = """<root>/
  images/train/<class>/<class>_<n>.jpg
  images/test/<class>/<class>_<n>.jpg
  texts_txt/<class>/<class>_<n>.txt"""


@dataclass
class ReadResult:
    """Usable items and the rows that were skipped (with why)."""
    items: pd.DataFrame
    skipped: pd.DataFrame


def clean_text(text: str) -> str:
    """Collapse runs of whitespace (titles and web text carry newlines and tabs)."""
    return re.sub(r"\s+", " ", text or "").strip()


def _skip_reason(path: Path, text: str | None, label: str, verify_images: bool) -> str:
    if text is None:
        return "missing text file"
    if label not in FOOD101_CLASSES:
        return f"unknown class {label!r}"
    if not clean_text(text):
        return "empty text"
    if not path.is_file():
        return "missing image"
    if path.stat().st_size == 0 or (verify_images and not image_is_readable(path)):
        return "unreadable image"
    return ""


def _collect(candidates: Iterator[tuple], verify_images: bool, skipped: Iterable[tuple] = ()) -> ReadResult:
    """Items from ``(item_id, image path, text or None, label)`` candidates; the others skipped with why."""
    rows, skipped = [], list(skipped)
    for item_id, path, text, label in candidates:
        if reason := _skip_reason(path, text, label, verify_images):
            skipped.append((item_id, str(path), reason))
        else:
            rows.append((item_id, str(path), clean_text(text), label))
    return ReadResult(pd.DataFrame(rows, columns=ITEM_COLUMNS), pd.DataFrame(skipped, columns=SKIP_COLUMNS))


def _read_titles_csv(path: Path) -> tuple[list[list[str]], list[str]]:
    """Rows of a headerless 3-column UTF-8 CSV and the raw text of malformed lines."""
    data = path.read_bytes()
    try:
        lines = [line for line in csv.reader(io.StringIO(data.decode("utf-8"), newline="")) if line]
    except UnicodeDecodeError as error:
        raise DataLayoutError(f"{path} is not UTF-8: line {data.count(10, 0, error.start) + 1} holds byte "
                              f"{data[error.start]:#04x}; re-save it as UTF-8, e.g. iconv -f latin1 -t utf-8 "
                              f"{path.name} > fixed.csv, then replace the file.") from None
    rows = [line for line in lines if len(line) == 3]
    if not rows:
        raise DataLayoutError(f"{path} is empty or has no line of 3 fields; expected one line per item: image file "
                              "name, text, class. Re-extract or re-download it.")
    bad = [",".join(line) for line in lines if len(line) != 3]
    if not re.search(r"\.(jpe?g|png)$", rows[0][0], re.I) and rows[0][2] not in FOOD101_CLASSES:
        rows = rows[1:]  # a header line some copies carry
    return rows, bad


def _read_mirror(root: Path, images: Path, split: str, verify_images: bool) -> ReadResult:
    """The mirror layout: the rows of ``texts/<split>_titles.csv``."""
    csv_rows, bad_lines = _read_titles_csv(root / "texts" / f"{split}_titles.csv")
    candidates = ((f"{split}/{label}/{Path(name).stem}", images / label / name, text, label)
                  for name, text, label in tqdm(csv_rows, desc=f"UPMC {split} rows", disable=len(csv_rows) < 5000))
    return _collect(candidates, verify_images, skipped=[(line[:80], "", "malformed CSV line") for line in bad_lines])


def _read_original(root: Path, images: Path, split: str, verify_images: bool) -> ReadResult:
    """The original layout: each ``images/<split>/<class>/X.jpg`` with ``texts_txt/<class>/X.txt``."""
    paths = sorted(p for p in images.glob("*/*") if p.suffix.lower() in (".jpg", ".jpeg", ".png"))

    def candidate(path: Path) -> tuple:
        text_path = root / "texts_txt" / path.parent.name / f"{path.stem}.txt"
        text = text_path.read_text(encoding="utf-8", errors="replace") if text_path.is_file() else None
        return f"{split}/{path.parent.name}/{path.stem}", path, text, path.parent.name

    return _collect(map(candidate, tqdm(paths, desc=f"UPMC {split} files", disable=len(paths) < 5000)), verify_images)


def read_upmc_food101(root: Path | str, split: str, verify_images: bool = False) -> ReadResult:
    """UPMC Food-101 items of ``split`` in either layout; ``verify_images``: open every image (slow on 90k files)."""
    if split not in SPLITS:
        raise ParameterError(f"split={split!r}; UPMC Food-101 splits are {SPLITS}.")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(
            f"UPMC Food-101 folder {root} does not exist; expected\n{MIRROR_TREE}\nor\n{ORIGINAL_TREE}")
    if (root / "texts" / f"{split}_titles.csv").is_file():
        read, tree = _read_mirror, MIRROR_TREE
    elif (root / "texts_txt").is_dir():
        read, tree = _read_original, ORIGINAL_TREE
    else:
        raise DataLayoutError(f"{root} is not a UPMC Food-101 folder: found neither texts/{split}_titles.csv nor "
                              f"texts_txt/.\nExpected the mirror layout\n{MIRROR_TREE}\nor the original release\n"
                              f"{ORIGINAL_TREE}\nPass the folder that contains images/ (set data_root in the profile).")
    images = root / "images" / split
    if not images.is_dir():
        raise DataLayoutError(f"{images} is missing; expected\n{tree}")
    result = read(root, images, split, verify_images)
    if result.items.empty:  # before any expensive step
        found = result.skipped["reason"].value_counts().to_dict() if len(result.skipped) else "no images or rows"
        raise DataLayoutError(f"{root} has no usable {split} item (found: {found}); expected\n{tree}")
    return result


def stratified_holdout(labels: Sequence[str], fraction: float, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (kept, held out): ``fraction`` of each class of 2+ held out, >= 1 each side; seeded by ``seed``."""
    if not 0 < fraction < 1:
        raise ParameterError(f"held-out fraction={fraction!r} must lie strictly between 0 and 1.")
    labels = np.asarray(labels)
    rng = np.random.default_rng(seed)
    held: list[int] = []
    for label in sorted(set(labels.tolist())):
        members = np.flatnonzero(labels == label)
        if len(members) < 2:
            continue
        n_held = min(max(1, int(round(fraction * len(members)))), len(members) - 1)
        held.extend(rng.permutation(members)[:n_held].tolist())
    held_mask = np.zeros(len(labels), dtype=bool)
    held_mask[held] = True
    return np.flatnonzero(~held_mask), np.flatnonzero(held_mask)


def assign_splits(items: pd.DataFrame, val_fraction: float, test_fraction: float | None = None,
                  seed: int = 0) -> pd.DataFrame:
    """Add ``split``: ``test`` (if ``test_fraction``; else the items' own split) then ``val`` from train, per class."""
    items = items.copy()
    if test_fraction is not None:
        _, test = stratified_holdout(items["label"], test_fraction, seed)
        items["split"] = "train"
        items.loc[items.index[test], "split"] = "test"
    elif "split" not in items:
        raise ParameterError("items have no 'split' column; pass test_fraction to carve a test split.")
    train_rows = items.index[items["split"] == "train"]
    _, val = stratified_holdout(items.loc[train_rows, "label"], val_fraction, seed + 1)
    items.loc[train_rows[val], "split"] = "val"
    return items


@dataclass(frozen=True)
class ClassTaxonomy:
    """A class hierarchy: ``parents`` (node -> parent nodes; classes are leaves), a ``superclass`` per class (plots)."""
    classes: tuple[str, ...]
    parents: Mapping[str, tuple[str, ...]]
    superclass: Mapping[str, str]

    def correct_sets(self, ks: Iterable[int] = (2, 5, 10)) -> dict[int, list[frozenset[int]]]:
        """``{k: [S_k(c) for c in classes]}``: the classes H@k counts right, per class."""
        return {int(k): hierarchy_correct_sets(self.classes, self.parents, int(k)) for k in ks}


def load_food101_wordnet_table(path: Path | None = None) -> pd.DataFrame:
    """The reviewed class -> WNID table (``class_name, wnid, lemma, match, note``), checked."""
    path = Path(path) if path else WORDNET_TABLE
    table = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = sorted(set(FOOD101_CLASSES) - set(table["class_name"]))
    bad = table[~table["wnid"].map(is_wnid)]
    if missing or len(table) != len(FOOD101_CLASSES) or len(bad):
        raise DataLayoutError(f"{path} must map each of the 101 Food-101 classes once to a WNID 'n' + 8 digits; "
                              f"missing {missing[:5]}, {len(table)} rows, malformed WNIDs {bad['wnid'].tolist()[:5]}.")
    return table.set_index("class_name").loc[list(FOOD101_CLASSES)].reset_index()


def food101_taxonomy(wordnet: WordNet | None = None, table: pd.DataFrame | None = None) -> ClassTaxonomy:
    """Food-101 classes as leaves under their mapped synsets, then WordNet's hypernym graph."""
    wordnet = wordnet or WordNet.load()
    table = load_food101_wordnet_table() if table is None else table
    parents: dict[str, tuple[str, ...]] = {}
    superclass: dict[str, str] = {}
    for row in table.itertuples(index=False):
        parents[row.class_name] = (row.wnid,)
        lineage = wordnet.ancestors(row.wnid) | {row.wnid}
        for wnid in lineage:
            parents.setdefault(wnid, tuple(wordnet.hypernyms(wnid)))
        superclass[row.class_name] = next((name for name, s in FOOD101_SUPERCLASSES if s in lineage), OTHER_FOOD)
    return ClassTaxonomy(tuple(table["class_name"]), parents, superclass)


def class_phrase(name: str) -> str:
    """Text to embed for a class name: ``apple_pie`` -> ``apple pie``; ``animals/mammals`` -> ``mammals (animals)``."""
    if "/" in name:
        top, sub = name.split("/", 1)
        sub = sub.replace("_", " ")
        return top if sub == "misc" else f"{sub} ({top})"
    return name.replace("_", " ")


@dataclass
class HuseDataset:
    """Items with a ``split`` column, classes, phrases for the semantic graph, the H@k taxonomy, skipped rows (why)."""
    name: str
    items: pd.DataFrame
    classes: tuple[str, ...]
    phrases: tuple[str, ...]
    taxonomy: ClassTaxonomy
    skipped: pd.DataFrame

    def split_counts(self) -> pd.DataFrame:
        """Items per split, and how many classes each split covers."""
        grouped = self.items.groupby("split", sort=False)
        return pd.DataFrame({"items": grouped.size(), "classes": grouped["label"].nunique()}).loc[
            [s for s in ("train", "val", "test") if s in set(self.items["split"])]]


def load_huse_dataset(dataset: str = "tuxpaint", data_root: str | Path = "", seed: int = 0,
                      val_fraction: float = 0.2, test_fraction: float = 0.25, min_items_per_class: int = 6,
                      verify_images: bool = False) -> HuseDataset:
    """Tux Paint or UPMC Food-101 (at ``data_root``; its own test split), with seeded, class-stratified splits."""
    if dataset == "tuxpaint":
        stamps = tuxpaint.load_stamps(Path(data_root) if str(data_root) else None)
        items, skipped = tuxpaint.tuxpaint_items(stamps, min_items_per_class)
        items = assign_splits(items, val_fraction, test_fraction, seed)
        classes = tuple(sorted(items["label"].unique()))
        taxonomy = ClassTaxonomy(classes, *tuxpaint.category_tree(classes))
    elif dataset == "upmc_food101":
        if not str(data_root):
            raise ParameterError(
                "dataset='upmc_food101' needs data_root=<folder with images/ and texts/ or texts_txt/>.")
        parts = [read_upmc_food101(data_root, split, verify_images=verify_images) for split in SPLITS]
        items = pd.concat([p.items.assign(split=s) for p, s in zip(parts, SPLITS)], ignore_index=True)
        skipped = pd.concat([p.skipped for p in parts], ignore_index=True)
        items = assign_splits(items, val_fraction, seed=seed)
        classes = tuple(c for c in FOOD101_CLASSES if c in set(items["label"]))
        full = food101_taxonomy()
        taxonomy = ClassTaxonomy(classes, full.parents, full.superclass)  # H@k over the classes present
    else:
        raise ParameterError(f"dataset={dataset!r}; choose one of ('tuxpaint', 'upmc_food101').")
    return HuseDataset(dataset, items, classes, tuple(class_phrase(c) for c in classes), taxonomy, skipped)
