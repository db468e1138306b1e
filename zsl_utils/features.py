"""Frozen image and text features for HUSE, computed once and kept in a ``ShardedCache``.

HUSE never fine-tunes its encoders; it trains small towers on fixed features. So each
feature set is extracted once per (model, data) and reused across runs. The caches
follow the project's rules (``zsl_utils.cache``): atomic shards, resumable after an
interrupt, and fingerprinted, so features of another model or another item list are
refused (``StaleCacheError``) instead of silently mixed.

Image features: the globally pooled penultimate layer of a pretrained classifier
(``zsl_utils.classifiers``; default the packaged EfficientNet-Lite0, 1280-d; any
``timm:<arch>`` for full runs). The paper used 64-d Graph-RISE embeddings, which are not
public.

Text features (``kind``):

* ``"minilm"`` (default) — the packaged all-MiniLM-L6-v2 sentence embedding (384-d, unit norm).
* ``"bert"`` — the paper's recipe for any local BERT-type encoder: hidden states of the
  last four layers concatenated per token, averaged over the text's (non-padding)
  tokens (``4 x hidden`` dims). Texts longer than ``max_words`` words are first cut down
  to their ``max_words`` most salient words by TF-IDF, kept in their original order
  (the paper keeps 512 salient tokens this way because BERT reads at most 512).
* ``"tfidf"`` — a weight-free baseline: the TF-IDF vector over the 512 most frequent
  terms of the fitting texts (the training split).

Rows that cannot be encoded (unreadable image, empty text) are zero with ``ok=False``
and are listed in ``FeatureSet.skipped``.

The cache fingerprints (:func:`image_features_fingerprint`, :func:`text_features_fingerprint`)
and default folders (:func:`image_features_cache_dir`, :func:`text_features_cache_dir`) are
public and defined once: ``zsl_utils.scale.extract`` fills the very same caches on N
processes, and a notebook names the folder once for both paths.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd
import torch

from zsl_utils import config
from zsl_utils.cache import ShardedCache
from zsl_utils.errors import AssetUnavailableError, ParameterError

TEXT_KINDS = ("minilm", "bert", "tfidf")
DEFAULT_IMAGE_MODEL = "efficientnet_lite0"
TFIDF_FEATURES = 512  # vocabulary size of the "tfidf" kind
SALIENT_WORDS = 512  # words kept per text before the BERT-style encoder
TEXT_BATCH_SIZE = 128  # texts per encoder call (default of text_features)
TEXT_SHARD_SIZE = 4096  # texts per cache shard (default of text_features)


@dataclass
class FeatureSet:
    """Row-aligned features (``(N, D)`` float32), the ``ok`` mask and the skipped rows."""

    features: np.ndarray
    ok: np.ndarray
    skipped: pd.DataFrame
    cache_dir: Path

    @property
    def dim(self) -> int:
        return int(self.features.shape[1])


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of the texts in row order (the cache rows are aligned to it)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace") + b"\x00")
    return digest.hexdigest()


def default_cache_dir(dataset_id: str, what: str, fingerprint: dict | None = None) -> Path:
    """``<CACHE_DIR>/huse/<dataset_id>/<what>[_<hash>]``.

    ``what`` names the model and kind; the short hash of the fingerprint (when given, with
    the shard size) keeps caches of different weights, item lists, fitting texts or
    shard sizes apart, so switching back and forth reuses each instead of tripping
    over a stale one.
    """
    safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", what)
    if fingerprint is not None:
        from zsl_utils.cache import normalise_fingerprint

        digest = hashlib.sha256(json.dumps(normalise_fingerprint(fingerprint), sort_keys=True).encode()).hexdigest()
        safe = f"{safe}_{digest[:10]}"
    return config.CACHE_DIR / "huse" / dataset_id / safe


def _cached(
    items: Sequence[Any], load_item, encode_batch, cache_dir: Path, fingerprint: dict, batch_size: int,
    num_workers: int, shard_size: int, desc: str, progress: bool, shards: Sequence[int] | None = None,
) -> FeatureSet | None:
    """Fill (or reuse) the cache, then read ``features`` / ``ok`` / skipped rows back.

    With ``shards``, only those are computed; None is returned while others are missing.
    """
    from zsl_utils.extract import extract_to_cache, read_skipped

    if len(items) == 0:
        raise ParameterError(f"no items to encode for {desc}; check the item table.")
    cache = ShardedCache(cache_dir, fingerprint, len(items), shard_size)
    if not cache.is_complete():
        report = extract_to_cache(items, load_item, encode_batch, cache, batch_size, num_workers, desc=desc,
                                  shards=shards, progress=progress)
        if progress:
            print(report)
        if shards is not None and not cache.is_complete():
            return None
    skipped = pd.DataFrame([vars(s) for s in read_skipped(cache, [str(i)[:200] for i in items])],
                           columns=["row", "item", "reason"])
    return FeatureSet(cache.load("features").astype(np.float32), cache.load("ok").astype(bool), skipped, cache.directory)


# ---------------------------------------------------------------------------- images
class _PooledEncoder:
    """``list of CHW tensors -> {'features': (B, D)}`` from a classifier's pooled layer."""

    def __init__(self, classifier) -> None:
        self.classifier = classifier

    def __call__(self, tensors: list) -> dict[str, np.ndarray]:
        return {"features": self.classifier.pooled_features(torch.stack(tensors)).cpu().numpy().astype(np.float32)}


_STORAGE_DTYPES = ("float32", "float16")
_AUTOCAST_DTYPES = (None, "bfloat16", "float16")


def image_features_fingerprint(
    classifier: Any,
    image_paths: Sequence[str | Path],
    dataset_id: str,
    dtype: str = "float32",
    autocast_dtype: str | None = None,
) -> dict[str, Any]:
    """The cache fingerprint of :func:`image_features` for these images and this loaded classifier.

    The one definition of it: ``image_features`` and the distributed extraction
    (``dist_extract --kind image_features``) both call this, so both fill the same cache.
    It combines ``classifier.fingerprint`` (model, weights, preprocessing), ``dataset_id``
    and the ``extract.dataset_fingerprint`` of the paths (row order and file sizes).
    ``image_features`` itself stores float32 from a float32 forward; a float16 storage
    ``dtype`` or an ``autocast_dtype`` ("bfloat16"/"float16", GPU extraction) change the
    numbers and are then recorded, so such a cache is a different cache.
    """
    from zsl_utils.extract import dataset_fingerprint

    if dtype not in _STORAGE_DTYPES:
        raise ParameterError(f"image features dtype must be one of {_STORAGE_DTYPES}, got {dtype!r}.")
    if autocast_dtype not in _AUTOCAST_DTYPES:
        raise ParameterError(f"autocast_dtype must be one of {_AUTOCAST_DTYPES}, got {autocast_dtype!r}.")
    fingerprint: dict[str, Any] = {
        "kind": "pooled_image_features",
        "classifier": classifier.fingerprint,
        "dataset_id": dataset_id,
        "dataset": dataset_fingerprint([str(p) for p in image_paths]),
        "alpha_background": "white",
    }
    if dtype != "float32":  # recorded only when it differs, so existing float32 caches keep their fingerprint
        fingerprint["dtype"] = dtype
    if autocast_dtype is not None:
        fingerprint["autocast_dtype"] = autocast_dtype
    return fingerprint


def image_features_cache_dir(
    classifier: Any, image_paths: Sequence[str | Path], dataset_id: str, shard_size: int = 1024
) -> Path:
    """The folder :func:`image_features` uses when no ``cache_dir`` is given.

    Public so that a notebook can name the folder once and hand it both to
    ``dist_extract.fill_cache`` (N processes) and to ``image_features`` (which then only reads).
    """
    return _image_cache_dir(image_features_fingerprint(classifier, image_paths, dataset_id), dataset_id,
                            classifier.name, shard_size)


def _image_cache_dir(fingerprint: dict, dataset_id: str, model_name: str, shard_size: int) -> Path:
    return default_cache_dir(dataset_id, f"image_{model_name}", {**fingerprint, "shard_size": shard_size})


def image_features(
    image_paths: Sequence[str | Path],
    dataset_id: str,
    model: Any = DEFAULT_IMAGE_MODEL,
    weights: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = 64,
    num_workers: int = 0,
    shard_size: int = 1024,
    progress: bool = True,
    shards: Sequence[int] | None = None,
) -> FeatureSet | None:
    """Pooled features of ``model`` for every image, cached; unreadable images are skipped and listed.

    ``model``: a name ``classifiers.load_classifier`` accepts (loaded here with ``weights``
    on ``device``), or an already loaded ``LoadedClassifier`` (used as it is; then
    ``weights`` must be None). ``cache_dir``: default :func:`image_features_cache_dir`.
    ``shards``: compute only these shards (default: every missing one), e.g. one
    process's share of a distributed job; returns None when the cache is still
    incomplete afterwards.
    """
    from zsl_utils.extract import ImageLoader

    classifier = _classifier(model, weights, device)
    paths = [str(p) for p in image_paths]
    fingerprint = image_features_fingerprint(classifier, paths, dataset_id)
    directory = Path(cache_dir) if cache_dir else _image_cache_dir(fingerprint, dataset_id, classifier.name, shard_size)
    return _cached(paths, ImageLoader(classifier.preprocess), _PooledEncoder(classifier), directory, fingerprint,
                   batch_size, num_workers, shard_size, f"{classifier.name} features", progress, shards)


def _classifier(model: Any, weights: str | Path | None, device: str):
    """``model`` if it is a loaded classifier, else ``load_classifier(model, weights, device)``."""
    from zsl_utils.classifiers import load_classifier

    if isinstance(model, str):
        return load_classifier(model, weights=weights, device=device)
    if not hasattr(model, "fingerprint") or not hasattr(model, "pooled_features"):
        raise ParameterError(
            f"image_features(model={model!r}): pass a classifier name (e.g. {DEFAULT_IMAGE_MODEL!r}) or a "
            "classifier from zsl_utils.classifiers.load_classifier."
        )
    if weights is not None:
        raise ParameterError("image_features: weights= applies to a classifier name only; this classifier is "
                             "already loaded (pass weights to load_classifier instead).")
    return model


# ---------------------------------------------------------------------------- texts
def non_empty_text(text: str) -> str | None:
    """Loader for texts: an empty or blank text is unusable (skipped, listed)."""
    return text if isinstance(text, str) and text.strip() else None


class _SentenceEncoder:
    def __init__(self, device: str) -> None:
        from zsl_utils.semantic import load_sentence_encoder

        self.model = load_sentence_encoder(device)

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"features": self.model.encode(texts, batch_size=len(texts), convert_to_numpy=True).astype(np.float32)}


def fit_tfidf(texts: Sequence[str], max_features: int | None = TFIDF_FEATURES):
    """A scikit-learn ``TfidfVectorizer`` (lower-cased words, smooth idf, L2 rows) fitted on ``texts``."""
    from sklearn.feature_extraction.text import TfidfVectorizer

    return TfidfVectorizer(max_features=max_features, lowercase=True).fit(list(texts))


class _TfidfEncoder:
    def __init__(self, vectorizer) -> None:
        self.vectorizer = vectorizer

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {"features": self.vectorizer.transform(texts).toarray().astype(np.float32)}


def salient_words(text: str, vectorizer, max_words: int = SALIENT_WORDS) -> str:
    """``text`` cut to its ``max_words`` highest TF-IDF words, in their original order.

    Texts that already fit are returned unchanged. A word's score is its TF-IDF weight
    in this text under ``vectorizer`` (unknown words score 0); ties keep the earlier word.
    """
    words = text.split()
    if len(words) <= max_words:
        return text
    analyzer = vectorizer.build_analyzer()
    weights = vectorizer.transform([text])
    vocabulary = vectorizer.vocabulary_
    row = dict(zip(weights.indices.tolist(), weights.data.tolist()))

    def score(word: str) -> float:
        tokens = analyzer(word)
        return max((row.get(vocabulary.get(t, -1), 0.0) for t in tokens), default=0.0)

    scores = np.array([score(w) for w in words])
    keep = np.sort(np.argsort(-scores, kind="stable")[:max_words])
    return " ".join(words[i] for i in keep)


class _BertStyleEncoder:
    """Mean over non-padding tokens of the last ``n_layers`` hidden states, concatenated."""

    def __init__(self, model_dir: Path, device: torch.device, n_layers: int = 4, max_length: int = 512) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device)
        self.device, self.n_layers = device, n_layers
        self.max_length = min(max_length, getattr(self.model.config, "max_position_embeddings", max_length))

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        hidden = self.model(**batch, output_hidden_states=True).hidden_states[-self.n_layers :]
        tokens = torch.cat(hidden, dim=-1)  # (B, T, n_layers * H)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        mean = (tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)
        return {"features": mean.float().cpu().numpy()}


def _bert_dir(bert_model: str | Path | None) -> Path:
    if bert_model is None:
        raise ParameterError("text kind 'bert' needs bert_model=<folder with config.json and weights>.")
    path = Path(bert_model).expanduser()
    if not (path / "config.json").is_file():
        raise AssetUnavailableError(
            f"BERT-style features: {path} has no config.json; pass a local Hugging Face model folder "
            "(config.json, tokenizer files and weights), e.g. bert-base-uncased saved with save_pretrained(). "
            "Nothing is downloaded. Without such weights use text_kind='minilm'."
        )
    return path


def text_features_fingerprint(
    texts: Sequence[str],
    dataset_id: str,
    kind: str = "minilm",
    fit_texts: Sequence[str] | None = None,
    bert_model: str | Path | None = None,
    max_words: int = SALIENT_WORDS,
    dtype: str = "float32",
) -> dict[str, Any]:
    """The cache fingerprint of :func:`text_features` for these arguments (the one definition of it).

    Always: the kind, ``dataset_id`` and the SHA-256 of the texts in row order. ``"minilm"``
    adds the model name; ``"tfidf"`` the fitting texts' hash and vocabulary size;
    ``"bert"`` the model folder, its files' names and sizes, the fitting texts' hash and
    ``max_words``. A float16 storage ``dtype`` (distributed extraction only) is recorded
    when used. Nothing is loaded or fitted here.
    """
    if kind not in TEXT_KINDS:
        raise ParameterError(f"text kind={kind!r}; choose one of {TEXT_KINDS}.")
    if dtype not in _STORAGE_DTYPES:
        raise ParameterError(f"text features dtype must be one of {_STORAGE_DTYPES}, got {dtype!r}.")
    texts = _as_texts(texts)
    fitting = _as_texts(fit_texts) if fit_texts is not None else texts
    fingerprint: dict[str, Any] = {"kind": f"text_{kind}", "dataset_id": dataset_id, "texts": texts_fingerprint(texts)}
    if kind == "minilm":
        from zsl_utils.semantic import MINILM_SPACE

        fingerprint["model"] = MINILM_SPACE
    elif kind == "tfidf":
        fingerprint.update(fit=texts_fingerprint(fitting), max_features=TFIDF_FEATURES)
    else:
        model_dir = _bert_dir(bert_model)
        fingerprint.update(model=str(model_dir.resolve()), weights=_folder_signature(model_dir),
                           fit=texts_fingerprint(fitting), max_words=max_words, layers=4)
    if dtype != "float32":  # recorded only when it differs, so existing float32 caches keep their fingerprint
        fingerprint["dtype"] = dtype
    return fingerprint


def text_features_cache_dir(
    texts: Sequence[str],
    dataset_id: str,
    kind: str = "minilm",
    fit_texts: Sequence[str] | None = None,
    bert_model: str | Path | None = None,
    max_words: int = SALIENT_WORDS,
    shard_size: int = TEXT_SHARD_SIZE,
) -> Path:
    """The folder :func:`text_features` uses when no ``cache_dir`` is given (see :func:`image_features_cache_dir`)."""
    fingerprint = text_features_fingerprint(texts, dataset_id, kind, fit_texts, bert_model, max_words)
    return _text_cache_dir(fingerprint, dataset_id, kind, shard_size)


def _text_cache_dir(fingerprint: dict, dataset_id: str, kind: str, shard_size: int) -> Path:
    return default_cache_dir(dataset_id, f"text_{kind}", {**fingerprint, "shard_size": shard_size})


def _as_texts(texts: Sequence[Any]) -> list[str]:
    """Non-strings (NaN from a CSV, None) become empty texts, which are skipped and listed."""
    return [t if isinstance(t, str) else "" for t in texts]


def text_features(
    texts: Sequence[str],
    dataset_id: str,
    kind: str = "minilm",
    fit_texts: Sequence[str] | None = None,
    bert_model: str | Path | None = None,
    cache_dir: str | Path | None = None,
    device: str = "auto",
    batch_size: int = TEXT_BATCH_SIZE,
    shard_size: int = TEXT_SHARD_SIZE,
    max_words: int = SALIENT_WORDS,
    progress: bool = True,
    shards: Sequence[int] | None = None,
) -> FeatureSet | None:
    """Text features of ``kind`` (see the module docstring) for every text, cached.

    ``fit_texts``: the texts the TF-IDF statistics come from ("tfidf" vocabulary, "bert"
    salient-word selection): pass the training split's texts so that no test text
    influences the features; default: ``texts`` themselves. ``cache_dir``: default
    :func:`text_features_cache_dir`. ``shards``: compute only these shards (default:
    every missing one); returns None when the cache is still incomplete afterwards.
    """
    from zsl_utils.device import pick_device

    fingerprint = text_features_fingerprint(texts, dataset_id, kind, fit_texts, bert_model, max_words)
    texts = _as_texts(texts)
    fitting = _as_texts(fit_texts) if fit_texts is not None else texts
    torch_device = pick_device(device)
    items: list[str] = texts
    if kind == "minilm":
        encoder: Any = _SentenceEncoder(str(torch_device))
    elif kind == "tfidf":
        encoder = _TfidfEncoder(fit_tfidf(fitting))
    else:
        vectorizer = fit_tfidf(fitting, max_features=None)
        items = [salient_words(t, vectorizer, max_words) for t in texts]
        encoder = _BertStyleEncoder(_bert_dir(bert_model), torch_device)
    directory = Path(cache_dir) if cache_dir else _text_cache_dir(fingerprint, dataset_id, kind, shard_size)
    return _cached(items, non_empty_text, encoder, directory, fingerprint, batch_size, 0, shard_size,
                   f"{kind} text features", progress, shards)


def _folder_signature(folder: Path) -> list[list]:
    """Names and sizes of a model folder's files: changes when the weights are replaced."""
    return [[p.name, p.stat().st_size] for p in sorted(folder.iterdir()) if p.is_file()]
