"""A small, fast reader for the WordNet 3.0 noun database.

ImageNet labels are WordNet noun synsets named by WNID: ``"n"`` + the synset's eight-digit
byte offset in ``data.noun`` (``n02123045`` is *tabby cat*). We read lemmas, gloss and the
is-a graph, *instance* links included (a named mountain still hangs under *mountain*).
The parsed graph is pickled under ``data/cache`` (seconds to parse, well under one to reload).
"""
from __future__ import annotations

import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from zsl_utils import config
from zsl_utils.atomic import write_atomically
from zsl_utils.errors import AssetUnavailableError

_HYPERNYM_POINTERS = {"@", "@i"}
_HYPONYM_POINTERS = {"~", "~i"}
_CACHE_VERSION = 2


@dataclass(frozen=True)
class Synset:
    """One noun synset. ``lemmas`` keep WordNet's spelling (underscores join words)."""

    wnid: str
    lemmas: tuple[str, ...]
    gloss: str
    hypernyms: tuple[str, ...]
    hyponyms: tuple[str, ...]


def offset_to_wnid(offset: int | str) -> str:
    return f"n{int(offset):08d}"


def parse_data_line(line: str) -> Synset | None:
    """Parse one ``data.noun`` line (see ``wndb(5WN)``); license header lines give None."""
    if not line or line.startswith(" "):
        return None
    body, _, gloss = line.partition(" | ")
    fields = body.split()
    offset, word_count = fields[0], int(fields[3], 16)
    lemmas = tuple(fields[4 + 2 * i] for i in range(word_count))
    position = 4 + 2 * word_count
    pointer_count = int(fields[position])
    hypernyms, hyponyms = [], []
    for i in range(pointer_count):
        symbol, target, pos = fields[position + 1 + 4 * i : position + 4 + 4 * i]
        if pos != "n":
            continue
        if symbol in _HYPERNYM_POINTERS:
            hypernyms.append(offset_to_wnid(target))
        elif symbol in _HYPONYM_POINTERS:
            hyponyms.append(offset_to_wnid(target))
    return Synset(offset_to_wnid(offset), lemmas, gloss.strip(), tuple(hypernyms), tuple(hyponyms))


def parse_index_line(line: str) -> tuple[str, list[str]] | None:
    """Parse one ``index.noun`` line into (lemma, wnids in sense order)."""
    if not line or line.startswith(" "):
        return None
    fields = line.split()
    synset_count, pointer_count = int(fields[2]), int(fields[3])
    offsets = fields[4 + pointer_count + 2 :]
    if len(offsets) != synset_count:
        raise ValueError(f"index.noun line for {fields[0]!r} lists {len(offsets)} offsets, expected {synset_count}")
    return fields[0], [offset_to_wnid(o) for o in offsets]


class WordNet:
    """The WordNet 3.0 noun graph. Build with :meth:`load`; look up synsets by WNID."""

    def __init__(self, records: dict[str, tuple], index: dict[str, list[str]]):
        # Plain tuples (lemmas, gloss, hypernyms, hyponyms) pickle several times faster
        # than dataclass instances; Synset objects are built on access.
        self._records = records
        self._index = index

    @classmethod
    def from_files(cls, directory: Path) -> "WordNet":
        data_path, index_path = Path(directory) / "data.noun", Path(directory) / "index.noun"
        for path in (data_path, index_path):
            if not path.is_file():
                raise AssetUnavailableError(
                    f"WordNet file {path} is missing. Run `make data` (or "
                    "`python -m zsl_utils.data.assets`) to fetch WordNet 3.0, or point WordNet.load(path=...) "
                    "to a folder holding data.noun and index.noun."
                )
        # WordNet offsets are byte offsets, so the file must be read as bytes -> latin-1 text.
        with open(data_path, encoding="latin-1") as handle:
            synsets = (s for s in map(parse_data_line, handle) if s is not None)
            records = {s.wnid: (s.lemmas, s.gloss, s.hypernyms, s.hyponyms) for s in synsets}
        with open(index_path, encoding="latin-1") as handle:
            index = dict(entry for entry in map(parse_index_line, handle) if entry is not None)
        return cls(records, index)

    @classmethod
    def load(cls, path: Path | None = None, cache_dir: Path | None = None) -> "WordNet":
        """Load WordNet from ``path`` (default: ``data/raw/wordnet``), via a pickle cache."""
        directory = Path(path) if path else config.WORDNET_DIR
        data_path = directory / "data.noun"
        if not data_path.is_file():
            return cls.from_files(directory)  # raises the actionable error
        stat = data_path.stat()
        key = f"wordnet-v{_CACHE_VERSION}-{stat.st_size}-{int(stat.st_mtime)}.pkl"
        cache_path = Path(cache_dir or config.CACHE_DIR) / key
        if cache_path.is_file():
            try:
                with open(cache_path, "rb") as handle:
                    records, index = pickle.load(handle)
                return cls(records, index)
            except (pickle.UnpicklingError, EOFError, ValueError):
                cache_path.unlink(missing_ok=True)  # a damaged cache is rebuilt, not trusted
        wordnet = cls.from_files(directory)
        config.ensure_dir(cache_path.parent)
        payload = (wordnet._records, wordnet._index)
        write_atomically(cache_path, lambda handle: pickle.dump(payload, handle, protocol=pickle.HIGHEST_PROTOCOL))
        return wordnet

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._records

    def __len__(self) -> int:
        return len(self._records)

    def wnids(self) -> Iterator[str]:
        return iter(self._records)

    def synset(self, wnid: str) -> Synset:
        try:
            return Synset(wnid, *self._records[wnid])
        except KeyError:
            raise KeyError(f"{wnid!r} is not a WordNet 3.0 noun synset (expected 'n' + 8 digits).") from None

    def hypernyms(self, wnid: str) -> tuple[str, ...]:
        return self.synset(wnid).hypernyms

    def ancestors(self, wnid: str) -> set[str]:
        """All synsets above ``wnid`` (transitive hypernyms), excluding ``wnid`` itself."""
        seen: set[str] = set()
        frontier = [wnid]
        while frontier:
            for parent in self.hypernyms(frontier.pop()):
                if parent not in seen:
                    seen.add(parent)
                    frontier.append(parent)
        return seen

    def lookup(self, word: str) -> list[str]:
        """Noun WNIDs whose lemma is ``word`` (case-insensitive; spaces or underscores), in sense order."""
        key = word.strip().lower().replace(" ", "_")
        return list(self._index.get(key, []))
