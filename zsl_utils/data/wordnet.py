"""A small, fast reader for the WordNet 3.0 noun database: lemmas, gloss, is-a graph (*instance* links included).

ImageNet labels are WordNet noun synsets named by WNID: ``"n"`` + the synset's eight-digit byte offset in ``data.noun``
(``n02123045`` is *tabby cat*)."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Iterator

from zsl_utils import config
from zsl_utils.errors import AssetUnavailableError

_HYPERNYM_POINTERS = {"@", "@i"}
_HYPONYM_POINTERS = {"~", "~i"}


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
        if pos == "n" and symbol in _HYPERNYM_POINTERS:
            hypernyms.append(offset_to_wnid(target))
        elif pos == "n" and symbol in _HYPONYM_POINTERS:
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

    def __init__(self, synsets: dict[str, Synset], index: dict[str, list[str]]):
        self._synsets, self._index = synsets, index

    @classmethod
    def load(cls, path: Path | None = None) -> "WordNet":
        """WordNet from the folder holding ``data.noun`` and ``index.noun`` (default ``data/raw/wordnet``), read once
        per process (parsing takes a second). No on-disk cache on purpose: unpickling a writable cache can run code."""
        return _read(Path(path or config.WORDNET_DIR).resolve())

    def __contains__(self, wnid: object) -> bool:
        return wnid in self._synsets

    def __len__(self) -> int:
        return len(self._synsets)

    def wnids(self) -> Iterator[str]:
        return iter(self._synsets)

    def synset(self, wnid: str) -> Synset:
        try:
            return self._synsets[wnid]
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

    def display_names(self, wnids: Iterable[str]) -> dict[str, str]:
        """``{wnid: name}``, distinct over ``wnids``: the first lemma (``'tabby'``); where several share it, the first
        hypernym's lemma in brackets (``'king (chessman)'``), where that still clashes another lemma of the synset
        or the gloss's first words (``'tabby (tabby cat)'``), then the WNID. Synsets outside WordNet keep their WNID."""
        base = {w: self.lemma(w) for w in dict.fromkeys(wnids)}
        names = dict(base)
        for qualifier in (self._hypernym_lemma, self._synonym_or_gloss, str):
            counts = Counter(names.values())
            names.update({w: f"{base[w]} ({qualifier(w)})" for w, name in names.items() if counts[name] > 1})
        return names

    def lemma(self, wnid: str) -> str:
        """The first lemma, spaces for underscores (the WNID itself outside WordNet)."""
        return self.synset(wnid).lemmas[0].replace("_", " ") if wnid in self else wnid

    def _hypernym_lemma(self, wnid: str) -> str:
        parents = self.hypernyms(wnid) if wnid in self else ()
        return self.lemma(parents[0]) if parents else wnid

    def _synonym_or_gloss(self, wnid: str) -> str:
        if wnid not in self:
            return wnid
        others = [lemma.replace("_", " ") for lemma in self.synset(wnid).lemmas[1:]]
        gloss = self.synset(wnid).gloss.split(";")[0].split()
        return others[0] if others else " ".join(gloss[:4]) + (" ..." if len(gloss) > 4 else "")

    def lookup(self, word: str) -> list[str]:
        """Noun WNIDs whose lemma is ``word`` (case-insensitive; spaces or underscores), in sense order."""
        key = word.strip().lower().replace(" ", "_")
        return list(self._index.get(key, []))


@lru_cache(maxsize=4)
def _read(directory: Path) -> WordNet:
    data_path, index_path = directory / "data.noun", directory / "index.noun"
    for path in (data_path, index_path):
        if not path.is_file():
            raise AssetUnavailableError(
                f"WordNet file {path} is missing. Run `make data` (or `python -m zsl_utils.data.assets`) to fetch "
                "WordNet 3.0, or point WordNet.load(path=...) to a folder holding data.noun and index.noun.")
    # WordNet offsets are byte offsets, so the file must be read as bytes -> latin-1 text.
    with open(data_path, encoding="latin-1") as handle:
        synsets = {s.wnid: s for s in map(parse_data_line, handle) if s is not None}
    with open(index_path, encoding="latin-1") as handle:
        index = dict(entry for entry in map(parse_index_line, handle) if entry is not None)
    return WordNet(synsets, index)
