"""ImageNet WNID lists (1K training labels, 21K release, candidates), lemmas and WNID list files, from the synset
files timm ships in ``timm/data/_info`` (no WordNet needed). The fall-2011 release is the ConSE paper's label space;
it lacks one 1K class, teddy bear ``n04399382``."""
from __future__ import annotations

import json
import os
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import timm.data

from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

_SUBSET_FILES = {"1k": "imagenet_synsets.txt", "21k": "imagenet22k_synsets.txt"}


def timm_info_file(filename: str) -> Path:
    """Path of one of the ImageNet synset files that timm ships in ``timm/data/_info``."""
    path = Path(timm.data.__file__).parent / "_info" / filename
    if not path.is_file():
        raise AssetUnavailableError(
            f"timm's info file {path} is missing; reinstall timm (pip install --force-reinstall timm).")
    return path


@lru_cache(maxsize=2)
def _subset(subset: str) -> tuple[str, ...]:
    if subset not in _SUBSET_FILES:
        raise ParameterError(f"imagenet_wnids(subset={subset!r}): expected one of {sorted(_SUBSET_FILES)}.")
    text = timm_info_file(_SUBSET_FILES[subset]).read_text()
    return tuple(line.strip() for line in text.splitlines() if line.strip())


def imagenet_wnids(subset: str = "1k") -> list[str]:
    """WNIDs of an ImageNet label space: ``"1k"``, the 1,000 ILSVRC-2012 training labels, sorted (the
    classifier output order), or ``"21k"``, the 21,841 synsets of the fall-2011 release in timm's order."""
    return list(_subset(subset))


def candidate_wnids(training: Iterable[str] | None = None, release: Iterable[str] | None = None) -> list[str]:
    """Release synsets that are not training labels (20,842 by default), in release order."""
    seen = set(imagenet_wnids("1k") if training is None else training)
    return [w for w in (imagenet_wnids("21k") if release is None else release) if w not in seen]


@lru_cache(maxsize=1)
def _all_wnid_lemmas() -> dict[str, tuple[str, ...]]:
    table: dict[str, tuple[str, ...]] = {}
    for line in timm_info_file("imagenet_synset_to_lemma.txt").read_text(encoding="utf-8").splitlines():
        wnid, _, names = line.partition("\t")
        # timm writes "tabby, tabby cat"; WordNet spells multi-word lemmas with underscores.
        table[wnid] = tuple(name.strip().replace(" ", "_") for name in names.split(",") if name.strip())
    return table


def wnid_lemmas(wnids: Iterable[str] | None = None) -> dict[str, tuple[str, ...]]:
    """``{wnid: lemmas}`` (WordNet spelling, e.g. ``('tabby', 'tabby_cat')``); None = every synset timm knows."""
    table = _all_wnid_lemmas()
    if wnids is None:
        return dict(table)
    wnids = list(wnids)
    unknown = [w for w in wnids if w not in table]
    if unknown:
        raise ParameterError(f"{len(unknown)} WNID(s) have no lemmas in timm's imagenet_synset_to_lemma.txt, e.g. "
                             f"{unknown[:5]}; use zsl_utils.data.wordnet.WordNet.load().synset(wnid).lemmas for them.")
    return {w: table[w] for w in wnids}


def is_wnid(token: str) -> bool:
    return len(token) == 9 and token[0] == "n" and token[1:].isdigit()


def load_wnid_list(path: str | os.PathLike, known: Iterable[str] | None = None, key: str | None = None) -> list[str]:
    """WNIDs from a text file: each line starts with one; more on the line (comma or space separated) count
    too, names (``n01440764 tench``) and ``#`` comments are ignored. WNIDs not in ``known`` are an error.
    JSON files (``.json``, or text starting with ``{``/``[``): a list, or an object of lists picked by ``key``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataLayoutError(f"WNID list {path} does not exist; pass a text (one WNID a line) or JSON file.")
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text) if path.suffix.lower() == ".json" or text.lstrip()[:1] in ("{", "[") else None
    except ValueError as error:
        raise DataLayoutError(f"{path} is not valid JSON ({error}); fix it, or write one WNID per line.") from None
    if isinstance(data, dict):  # the published form: {"2-hops": [...], "3-hops": [...], "all": [...]}
        if key not in data and (key is not None or len(data) != 1):
            found = f"no list {key!r}" if key is not None else f"{len(data)} lists"
            raise DataLayoutError(f"{path} has {found}: pass load_wnid_list(..., key=) one of its keys {sorted(data)}.")
        data = data[key if key is not None else next(iter(data))]
    bad = [e for e in data if not (isinstance(e, str) and is_wnid(e))] if isinstance(data, list) else [data]
    if data is not None and bad:  # a non-list (a number, an object under key) is bad as a whole
        raise DataLayoutError(f"{path}: expected a JSON list of WNID strings (e.g. \"n01440764\"), found {bad[0]!r}.")
    wnids = list(data or [])
    for number, line in enumerate([] if data is not None else text.splitlines(), 1):
        line = line.split("#", 1)[0].replace(",", " ").strip()
        if not line:
            continue
        tokens = line.split()
        if not is_wnid(tokens[0]):
            raise DataLayoutError(f"{path}:{number}: {tokens[0]!r} is not a WNID (expected n + 8 digits, "
                                  "e.g. n01440764).")
        wnids.extend(t for t in tokens if is_wnid(t))  # other tokens are names: ignored
    if not wnids:
        raise DataLayoutError(f"WNID list {path} holds no WNIDs.")
    if known is not None and (unknown := sorted(set(wnids) - set(known))):
        raise DataLayoutError(f"{path}: {len(unknown)} WNIDs are not in the label space, e.g. {unknown[:5]}.")
    return list(dict.fromkeys(wnids))  # drop repeats, keep order
