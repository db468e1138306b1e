"""Items (image paths or texts) -> model outputs in a resumable :class:`~zsl_utils.cache.ShardedCache` (the encoder's
fingerprint); unreadable items are *skipped* (zero rows, ``ok`` False, reasons kept): one bad file never stops a run."""
from __future__ import annotations

import functools
import hashlib
import io
import itertools
import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import time
import warnings
import zlib
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from sklearn.feature_extraction.text import TfidfVectorizer
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.functional import pil_to_tensor
from tqdm.auto import tqdm

from zsl_utils import config
from zsl_utils.cache import ShardedCache, normalise_fingerprint
from zsl_utils.classifiers import DEFAULT_CLASSIFIER, load_classifier
from zsl_utils.data.images import load_image_rgb
from zsl_utils.device import autocast, pick_device, torch_dtype
from zsl_utils.errors import AssetUnavailableError, ParameterError, ZslError
from zsl_utils.semantic import MINILM_SPACE, load_sentence_encoder

KINDS = ("probs", "image_features", "text_features")
TEXT_MODELS = ("minilm", "bert", "tfidf")
STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
AUTOCAST_DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16}
# "pil": the exact path; "pil_draft": JPEGs decoded at a reduced DCT scale (identical below twice the resize size);
# "torchvision": decode_jpeg + tensor transforms on the model's device (nvJPEG on a GPU). Tolerances: bench_extract.
DECODERS = ("pil", "pil_draft", "torchvision")
JPEG_START, JPEG_END = b"\xff\xd8\xff", b"\xff\xd9"
TFIDF_FEATURES = 512  # vocabulary size of the "tfidf" text model
SALIENT_WORDS = 512  # words kept per text before the "bert" text model
BERT_LAYERS = 4  # last hidden layers the "bert" text model concatenates
# "This file is bad", not "the code is wrong": any other error (TypeError, ...) stops the run, as a bug should.
LOAD_ERRORS: tuple[type[BaseException], ...] = (  # OSError includes PIL.UnidentifiedImageError, truncated, missing
    OSError, ValueError, SyntaxError, EOFError, IndexError, RuntimeError, struct.error, zlib.error,
    Image.DecompressionBombError)
_MAX_REASON_CHARS = 200
UNALIGNED_ARRAYS = ("skipped_rows", "skipped_reasons")  # per-shard arrays, not row-aligned
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]  # row-aligned output arrays: name -> (shape of one row, dtype)


class ExtractionError(ZslError):
    """Extraction cannot proceed (bad encoder output, nothing loadable, failed scale-out run)."""


class UnreadableItems(ExtractionError):
    """Raised by an encoder that decodes itself: ``reasons`` maps batch positions to why (they are skipped)."""

    def __init__(self, reasons: dict[int, str]) -> None:
        super().__init__(f"{len(reasons)} item(s) of the batch could not be decoded: {reasons}")
        self.reasons = reasons


@dataclass
class CachedOutputs:
    """A filled cache, its unreadable items (row, item, reason), this run's work and the main array ``name``."""
    cache: ShardedCache
    skipped: pd.DataFrame
    computed_shards: list[int]
    reused_shards: int
    seconds: float
    name: str = ""

    def __str__(self) -> str:
        return (f"{self.cache.n_items} items in {self.cache.n_shards} shards: computed {len(self.computed_shards)}, "
                f"reused {self.reused_shards} from cache; {len(self.skipped)} skipped as unreadable; "
                f"{self.seconds:.1f} s")

    def load(self) -> np.ndarray:
        """Every row of the main array (the zero rows of skipped items included)."""
        return self.cache.load(self.name)

    @property
    def ok(self) -> np.ndarray:
        return self.cache.load("ok").astype(bool)


def _load_image(preprocess: Callable[[Image.Image], Any], path: str | os.PathLike, draft: bool = False) -> Any:
    return preprocess(load_image_rgb(path, preprocess.resize_size if draft else None))


def image_loader(preprocess: Callable[[Image.Image], Any], decode: str = "pil") -> Callable[[str | os.PathLike], Any]:
    """Picklable ``path -> preprocess(load_image_rgb(path))`` for DataLoader workers (``decode``: see DECODERS)."""
    if decode == "torchvision":
        return read_for_device
    return functools.partial(_load_image, preprocess, draft=decode == "pil_draft")


def read_for_device(path: str | os.PathLike) -> torch.Tensor:
    """The bytes (1-D uint8) of a file with JPEG start and end markers, decoded later where the model runs; any other
    file (PNG, truncated JPEG, ...) decoded here by PIL to ``uint8 [3, H, W]``, or raising as on the "pil" path."""
    data = Path(path).read_bytes()
    if data.startswith(JPEG_START) and data.endswith(JPEG_END):
        return torch.frombuffer(bytearray(data), dtype=torch.uint8)
    return pil_to_tensor(load_image_rgb(path))


def _load(load_item: Callable[[Any], Any], item: Any) -> tuple[Any, str]:
    """``(value, "")``, or ``(None, reason)`` for an unreadable item instead of raising."""
    try:
        value = load_item(item)
    except LOAD_ERRORS as error:
        return None, f"{type(error).__name__}: {error}"[:_MAX_REASON_CHARS]
    return (None, "load_item returned None") if value is None else (value, "")


class _Batch:
    """``rows`` loaded in the DataLoader's workers; ``stack``: same-shaped tensors as one (pinned once per batch)."""

    def __init__(self, items: Sequence, load_item: Callable[[Any], Any], stack: bool, rows: list[int]) -> None:
        loaded = [(row, *_load(load_item, items[row])) for row in rows]
        self.first_row = rows[0]
        self.rows = [row for row, value, _ in loaded if value is not None]
        self.skipped = [(row, reason) for row, value, reason in loaded if value is None]
        values = [value for _, value, _ in loaded if value is not None]
        self.values: list | torch.Tensor = _stack_if_uniform(values) if stack else values

    def pin_memory(self) -> "_Batch":
        """Called by the DataLoader's pinning step (``pin_memory=True`` on CUDA)."""
        if isinstance(self.values, torch.Tensor):
            self.values = self.values.pin_memory()
        return self


def _stack_if_uniform(values: list) -> list | torch.Tensor:
    tensors = bool(values) and all(isinstance(v, torch.Tensor) for v in values)
    return torch.stack(values) if tensors and len({(v.shape, v.dtype) for v in values}) == 1 else values


def _batches_for_shards(cache: ShardedCache, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches that never cross a shard boundary (so any rank encodes a shard the same way)."""
    bounds = [cache.shard_bounds(shard) for shard in shards]
    return [list(range(i, min(i + batch_size, stop))) for start, stop in bounds for i in range(start, stop, batch_size)]


def _encoded_shards(loader: torch.utils.data.DataLoader, encode_batch: Callable,
                    shard_size: int) -> Iterator[tuple[int, list, list]]:
    """``(shard, [(rows, outputs)], [(row, reason)])`` per shard: an in-order loader yields its batches in a row."""
    for shard, batches in itertools.groupby(loader, lambda batch: batch.first_row // shard_size):
        parts, skipped = [], []
        for batch in batches:
            skipped.extend(batch.skipped)
            if batch.rows:
                parts.extend(_encode_readable(encode_batch, batch.values, batch.rows, skipped))
        yield shard, parts, skipped


def _encode_readable(encode_batch: Callable, values: list | torch.Tensor, rows: list[int], skipped: list) -> list:
    """``[(rows, outputs)]`` for one batch; items the encoder finds unreadable are added to ``skipped`` instead."""
    try:
        return [(rows, _encode(encode_batch, values, rows))]
    except UnreadableItems as error:
        skipped.extend((rows[i], reason) for i, reason in error.reasons.items())
        keep = [i for i in range(len(rows)) if i not in error.reasons]
        rest = [rows[i] for i in keep]
        return _encode_readable(encode_batch, [values[i] for i in keep], rest, skipped) if keep else []


def _write_shard(cache: ShardedCache, layout: Layout, shard: int, parts: list, skipped: list) -> None:
    """Assemble the encoded batches of ``shard`` (zero rows and ``ok`` False for skipped items) and write it."""
    start, stop = cache.shard_bounds(shard)
    arrays = {k: np.zeros((stop - start, *shape), dtype) for k, (shape, dtype) in layout.items()}
    ok = np.zeros(stop - start, bool)
    for rows, outputs in parts:
        local = np.asarray(rows) - start
        ok[local] = True
        for key, value in outputs.items():
            arrays[key][local] = value
    skipped = sorted(skipped)
    unaligned = {"skipped_rows": np.asarray([row for row, _ in skipped], np.int64),
                 "skipped_reasons": np.asarray([reason for _, reason in skipped], dtype=str)}
    cache.write_shard(shard, ok=ok, unaligned=unaligned, **arrays)


def normalise_layout(layout: Mapping[str, tuple[Sequence[int], Any]]) -> Layout:
    """``{name: (row shape, dtype)}`` with tuple shapes and numpy dtypes; raises on nonsense."""
    try:
        normal = {str(k): (tuple(int(n) for n in shape), np.dtype(dtype)) for k, (shape, dtype) in layout.items()}
    except (TypeError, ValueError) as error:
        raise ParameterError(f"output_layout must map array names to (row shape, dtype), e.g. {{'probs': ((1000,), "
                             f"'float16')}}; got {layout!r} ({error}).") from error
    reserved = sorted(set(normal) & {"ok", *UNALIGNED_ARRAYS})
    if not normal or reserved:
        raise ParameterError(f"output_layout {layout!r} must name at least one output array and none of {reserved}.")
    return normal


def _layout_of(rows: list[int], outputs: Mapping[str, np.ndarray], declared: Layout | None) -> Layout:
    """The layout of the first real output, which must be the declared one (if any)."""
    found = {k: (tuple(v.shape[1:]), v.dtype) for k, v in outputs.items()}
    if declared is not None and found != declared:
        raise ExtractionError(f"output_layout {_describe(declared)} passed to extract_to_cache differs from "
                              f"encode_batch's output for rows {rows[0]}..{rows[-1]}: {_describe(found)}; fix the "
                              f"declared layout (array name -> (row shape, dtype)).")
    return found


def _describe(layout: Layout) -> str:
    return "{" + ", ".join(f"{k}: {shape} {dtype}" for k, (shape, dtype) in sorted(layout.items())) + "}"


def _encode(encode_batch: Callable, values: list | torch.Tensor, rows: list[int]) -> dict[str, np.ndarray]:
    outputs = encode_batch(values)
    if not isinstance(outputs, Mapping) or not outputs:
        raise ExtractionError(f"encode_batch must return a non-empty dict name -> array, got {type(outputs).__name__}.")
    arrays = {str(k): v.detach().cpu().numpy() if isinstance(v, torch.Tensor) else np.asarray(v)
              for k, v in outputs.items()}
    for key, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != len(values):
            raise ExtractionError(f"encode_batch output {key!r} has shape {value.shape} for a batch of {len(values)} "
                                  f"items (rows {rows[0]}..{rows[-1]}); its first axis must be the batch size.")
    return arrays


def _read_skipped(cache: ShardedCache, items: Sequence) -> pd.DataFrame:
    """Skipped items (row, item, reason) recorded in the shards written so far, reused ones included."""
    skipped = []
    for shard in (s for s in range(cache.n_shards) if cache.has_shard(s)):
        arrays = cache.read_shard(shard, list(UNALIGNED_ARRAYS))
        for row, reason in zip(arrays["skipped_rows"].tolist(), arrays["skipped_reasons"].tolist()):
            skipped.append((row, str(items[row])[:_MAX_REASON_CHARS], reason))
    return pd.DataFrame(skipped, columns=["row", "item", "reason"])


def extract_to_cache(
    items: Sequence, load_item: Callable[[Any], Any | None], encode_batch: Callable[[list], Mapping[str, np.ndarray]],
    cache: ShardedCache, batch_size: int = 64, num_workers: int = 0, desc: str = "extracting",
    shards: Sequence[int] | None = None, progress: bool = True, pin_memory: bool = False,
    output_layout: Mapping[str, tuple[Sequence[int], Any]] | None = None) -> CachedOutputs:
    """Fill the missing ``shards`` of ``cache`` with ``encode_batch`` outputs for ``items``; an item whose (picklable)
    ``load_item`` returns None or raises :data:`LOAD_ERRORS` is skipped and listed (``output_layout``: if all are)."""
    _check_extraction_arguments(items, cache, batch_size, num_workers)
    declared = normalise_layout(output_layout) if output_layout is not None else None
    began = time.perf_counter()
    missing_before = cache.missing_shards()
    todo = sorted(missing_before if shards is None else set(shards) & set(missing_before))
    loader = torch.utils.data.DataLoader(
        range(len(items)), batch_sampler=_batches_for_shards(cache, todo, batch_size), num_workers=num_workers,
        collate_fn=functools.partial(_Batch, items, load_item, bool(pin_memory)),
        pin_memory=bool(pin_memory) and torch.cuda.is_available())
    layout, waiting = None, []  # waiting: shards of unreadable items only, seen before any layout was known
    for shard, parts, skipped in tqdm(_encoded_shards(loader, encode_batch, cache.shard_size), total=len(todo),
                                      desc=desc, unit="shard", disable=not progress):
        layout = layout or (_layout_of(*parts[0], declared) if parts else None)
        waiting.append((shard, parts, skipped))
        while layout is not None and waiting:
            _write_shard(cache, layout, *waiting.pop())
    if waiting and declared is None:
        reasons = [reason for _, _, skipped in waiting for _, reason in skipped][:3]
        raise ExtractionError(f"none of the {cache.n_items} items of cache {cache.directory} could be loaded, so the "
                              f"output shape is unknown; check the paths and the loader (first reasons: {reasons}), "
                              f"or pass output_layout=... to extract_to_cache.")
    for args in waiting:
        _write_shard(cache, declared, *args)
    return CachedOutputs(cache, _read_skipped(cache, items), todo, cache.n_shards - len(missing_before),
                         time.perf_counter() - began)


def _check_extraction_arguments(items: Sequence, cache: ShardedCache, batch_size: int, num_workers: int) -> None:
    if len(items) != cache.n_items:
        raise ExtractionError(f"got {len(items)} items but cache {cache.directory} was opened for "
                              f"n_items={cache.n_items}; open the cache with n_items=len(items).")
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ParameterError(f"num_workers must be an int >= 0, got {num_workers!r}.")


def dataset_fingerprint(paths: Sequence[str | os.PathLike]) -> str:
    """SHA-256 of the paths (relative to their common folder: a moved dataset keeps it) and sizes (not contents)."""
    paths = [Path(p) for p in paths]
    root = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path(".")
    root = paths[0].parent if len(paths) == 1 else root
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1  # missing: it will be skipped at load time, but still changes the hash
        digest.update(f"{os.path.relpath(path, root)}\t{size}\n".encode())
    return digest.hexdigest()


def texts_fingerprint(texts: Sequence[str]) -> str:
    """SHA-256 of the texts in row order (the cache rows are aligned to it)."""
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", errors="replace") + b"\x00")
    return digest.hexdigest()


def _compute_record(compute_dtype: str) -> dict[str, str]:  # float32 caches keep their key
    return {} if compute_dtype == "float32" else {"compute_dtype": compute_dtype}


def _storage_dtype(dtype: str) -> str:
    if dtype not in STORAGE_DTYPES:
        raise ParameterError(f"dtype must be one of {sorted(STORAGE_DTYPES)}, got {dtype!r}.")
    return dtype


class _ImageEncoder:
    """Preprocessed CHW images (``decode="torchvision"``: what :func:`read_for_device` gives) -> ``{output: (B, D)}``
    on the classifier's device, eval mode, no grad; out of GPU memory, it halves its batches and goes on."""
    kind = output = ""
    default_dtype, batch_size, shard_size = "float32", 64, 1024

    def __init__(self, classifier: Any, dtype: str | None = None, autocast_dtype: str | None = None,
                 compute_dtype: str = "float32", decode: str = "pil") -> None:
        if autocast_dtype is not None and autocast_dtype not in AUTOCAST_DTYPES:
            raise ParameterError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}.")
        if decode not in DECODERS:
            raise ParameterError(f"decode={decode!r}; choose one of {DECODERS} (the first is exact, the others fast).")
        self.classifier, self.model_name = classifier, classifier.name
        self.device = torch.device(classifier.device)
        self.dtype = _storage_dtype(dtype or self.default_dtype)
        if torch_dtype(compute_dtype) == torch.float64 and autocast_dtype is not None:
            raise ParameterError(f"compute_dtype='float64' and autocast_dtype={autocast_dtype!r} contradict each "
                                 "other; choose one (float64 for identical CPU results, autocast for GPU speed).")
        self.autocast_dtype = autocast_dtype if self.device.type == "cuda" else None  # autocast: CUDA only
        self.compute_dtype, self.decode = compute_dtype, decode
        self.load_item = image_loader(classifier.preprocess, decode)
        self.pin_memory = self.device.type == "cuda"
        self.max_batch = sys.maxsize  # lowered by the out-of-memory back-off

    def rows(self, paths: Sequence) -> list[str]:
        return [str(p) for p in paths]

    def _fingerprint(self, paths: Sequence, dataset_id: str) -> dict[str, Any]:
        value = getattr(self.classifier, "fingerprint", None)
        if value is None:
            raise ExtractionError(f"classifier {self.model_name!r} has no fingerprint; load it with "
                                  f"zsl_utils.classifiers.load_classifier so that its cache can be validated.")
        return {"classifier": value if isinstance(value, (str, int, float, list, dict)) else str(value),
                "dataset_id": dataset_id, "dataset": dataset_fingerprint(self.rows(paths)),
                "alpha_background": "white", **_compute_record(self.compute_dtype),
                **({"decode": self.decode} if self.decode != "pil" else {})}  # "pil" caches keep their key

    def output_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {self.output: ((self.width(),), self.dtype)}

    def cli_args(self) -> list[str]:
        """Arguments of the scale-out CLI that rebuild this encoder."""
        weights = (self.classifier.fingerprint.get("weights") or {}).get("path")  # see classifiers._fingerprint
        return ["--classifier", self.model_name, *(["--weights", weights] if weights else []),
                "--autocast", self.autocast_dtype or "none", "--compute-dtype", self.compute_dtype,
                "--decode", self.decode]

    @torch.inference_mode()
    def __call__(self, values: list) -> dict[str, np.ndarray]:
        batch, parts, start = self._on_device(values), [], 0
        while start < len(batch):
            part = batch[start : start + self.max_batch]
            try:
                parts.append(self._forward_part(part))
            except torch.cuda.OutOfMemoryError:
                self._halve_batches(len(part))
                continue
            start += len(part)
        return {self.output: np.concatenate(parts)}

    def _on_device(self, values: list | torch.Tensor) -> torch.Tensor:
        if self.decode == "torchvision":
            values = [self.classifier.preprocess.from_uint8(image) for image in self._decoded(values)]
        batch = values if isinstance(values, torch.Tensor) else torch.stack(values)  # stacked, pinned by the loader
        return batch.to(self.device, torch_dtype(self.compute_dtype), non_blocking=True)

    def _decoded(self, values: list[torch.Tensor]) -> list[torch.Tensor]:
        """uint8 images on the device: JPEG bytes (1-D) decoded there in one call; if that fails, one by one, by PIL
        where the device cannot (nvJPEG has no CMYK), and :class:`UnreadableItems` for what PIL cannot read either."""
        images = [value if value.ndim == 1 else value.to(self.device) for value in values]
        encoded = [i for i, value in enumerate(values) if value.ndim == 1]
        if not encoded:
            return images
        try:
            decoded = decode_jpeg([images[i] for i in encoded], mode=ImageReadMode.RGB, device=self.device)
        except torch.cuda.OutOfMemoryError:
            raise
        except RuntimeError:
            decoded, reasons = [], {}
            for i in encoded:
                decoded.append(self._decoded_alone(images[i]))
                if isinstance(decoded[-1], str):
                    reasons[i] = decoded[-1]
            if reasons:
                raise UnreadableItems(reasons) from None
        for i, image in zip(encoded, decoded):
            images[i] = image
        return images

    def _decoded_alone(self, data: torch.Tensor) -> torch.Tensor | str:
        """One JPEG decoded on the device, else by PIL; a string says why neither could."""
        try:
            return decode_jpeg(data, mode=ImageReadMode.RGB, device=self.device)
        except RuntimeError as error:
            pixels, reason = _load(lambda raw: pil_to_tensor(load_image_rgb(io.BytesIO(raw))), data.numpy().tobytes())
            if reason:
                return f"decode_jpeg: {error}; PIL: {reason.split(':')[0]}"[:_MAX_REASON_CHARS]
            return pixels.to(self.device)

    def _forward_part(self, batch: torch.Tensor) -> np.ndarray:
        # channels_last: 1.75x faster in float32 on a CPU (bench_extract), slower in float64, so float32 only.
        layout = torch.channels_last if batch.dtype == torch.float32 else torch.contiguous_format
        self.classifier.model.to(batch.dtype, memory_format=layout)  # for this batch only: f32 -> f64 -> f32 is exact
        try:
            with autocast(self.device, AUTOCAST_DTYPES.get(self.autocast_dtype), self.autocast_dtype is not None):
                output = self.forward(batch.contiguous(memory_format=layout))
        finally:
            self.classifier.model.to(torch.float32, memory_format=torch.contiguous_format)
        return output.float().cpu().numpy().astype(STORAGE_DTYPES[self.dtype])

    def _halve_batches(self, size: int) -> None:
        if size == 1:
            raise ExtractionError(f"one image does not fit in the memory of {self.device} with {self.model_name}; "
                                  "free the GPU (other processes), or use autocast_dtype='bfloat16' or the CPU.")
        self.max_batch = size // 2
        torch.cuda.empty_cache()
        warnings.warn(f"out of memory on {self.device} at batch {size}: continuing with batches of {self.max_batch}")


class ProbsEncoder(_ImageEncoder):
    """``probs``: the softmax over all of the classifier's outputs, columns in ``classifier.wnids`` order."""
    kind, output, default_dtype = "probs", "probs", "float16"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.classifier.model(batch).to(torch_dtype(self.compute_dtype)), dim=1)

    def width(self) -> int:
        return len(self.classifier.wnids)

    def fingerprint(self, paths: Sequence, dataset_id: str) -> dict[str, Any]:
        return {"kind": "classifier_softmax", **self._fingerprint(paths, dataset_id), "n_classes": self.width(),
                "dtype": self.dtype, "autocast_dtype": self.autocast_dtype}


class PooledFeaturesEncoder(_ImageEncoder):
    """``image_features``: the classifier's globally pooled penultimate layer."""
    kind, output = "image_features", "features"

    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        return self.classifier.pooled_features(batch)

    def width(self) -> int:
        """Measured on one blank image: it fixes the shape of shards whose images are all unreadable."""
        size = self.classifier.preprocess.config.get("input_size", (3, 224, 224))
        return int(self.classifier.pooled_features(torch.zeros(1, *size)).shape[-1])

    def fingerprint(self, paths: Sequence, dataset_id: str) -> dict[str, Any]:
        # dtype and autocast recorded only when not the defaults, so that float32 caches keep their fingerprint.
        return {"kind": "pooled_image_features", **self._fingerprint(paths, dataset_id),
                **({"dtype": self.dtype} if self.dtype != "float32" else {}),
                **({"autocast_dtype": self.autocast_dtype} if self.autocast_dtype else {})}


def non_empty_text(text: str) -> str | None:
    """Loader for texts: an empty or blank text is unusable (skipped, listed)."""
    return text if isinstance(text, str) and text.strip() else None


def _as_texts(texts: Sequence[Any]) -> list[str]:
    """Non-strings (NaN from a CSV, None) become empty texts, which are skipped and listed."""
    return [t if isinstance(t, str) else "" for t in texts]


def salient_words(text: str, vectorizer: TfidfVectorizer, max_words: int = SALIENT_WORDS) -> str:
    """``text`` cut to its ``max_words`` highest TF-IDF words in their order (unknown words 0, ties: the earlier)."""
    words = text.split()
    if len(words) <= max_words:
        return text
    analyzer, vocabulary = vectorizer.build_analyzer(), vectorizer.vocabulary_
    weights = vectorizer.transform([text])
    row = dict(zip(weights.indices.tolist(), weights.data.tolist()))
    scores = np.array([max((row.get(vocabulary.get(t, -1), 0.0) for t in analyzer(w)), default=0.0) for w in words])
    keep = np.sort(np.argsort(-scores, kind="stable")[:max_words])
    return " ".join(words[i] for i in keep)


class _BertStyleEncoder:
    """Texts -> mean over non-padding tokens of the last ``BERT_LAYERS`` hidden states, concatenated."""

    def __init__(self, model_dir: Path, device: torch.device, dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModel, AutoTokenizer  # lazy: transformers takes seconds to import
        self.tokenizer = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
        self.model = AutoModel.from_pretrained(str(model_dir), local_files_only=True).eval().to(device, dtype)
        self.device = device
        self.max_length = min(512, getattr(self.model.config, "max_position_embeddings", 512))

    @torch.inference_mode()
    def __call__(self, texts: list[str]) -> np.ndarray:
        batch = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        tokens = torch.cat(self.model(**batch, output_hidden_states=True).hidden_states[-BERT_LAYERS:], dim=-1)
        mask = batch["attention_mask"].unsqueeze(-1).to(tokens.dtype)
        return ((tokens * mask).sum(dim=1) / mask.sum(dim=1).clamp_min(1)).float().cpu().numpy()


def _bert_dir(bert_model: str | Path | None) -> Path:
    if bert_model is None:
        raise ParameterError("text model 'bert' needs bert_model=<folder with config.json and weights>.")
    path = Path(bert_model).expanduser()
    if not (path / "config.json").is_file():
        raise AssetUnavailableError(f"BERT-style features: {path} has no config.json; pass a local Hugging Face model "
                                    "folder (config.json, tokenizer files and weights), e.g. bert-base-uncased saved "
                                    "with save_pretrained(). Nothing is downloaded. Without such weights use 'minilm'.")
    return path


class TextEncoder:
    """``text_features``: ``minilm``, ``tfidf`` (fit on ``fit_texts``) or ``bert`` (local folder); ``rows`` first."""
    kind, output, batch_size, shard_size, pin_memory = "text_features", "features", 128, 4096, False
    load_item = staticmethod(non_empty_text)

    def __init__(self, model: str = "minilm", device: torch.device = torch.device("cpu"), dtype: str | None = None,
                 fit_texts: Sequence[str] | None = None, bert_model: str | Path | None = None,
                 max_words: int = SALIENT_WORDS, compute_dtype: str = "float32") -> None:
        if model not in TEXT_MODELS:
            raise ParameterError(f"text model={model!r}; choose one of {TEXT_MODELS}.")
        self.model_name, self.device, self.dtype = model, device, _storage_dtype(dtype or "float32")
        torch_dtype(compute_dtype)  # raises on an unknown name
        self.compute_dtype = compute_dtype
        self.fit_texts = None if fit_texts is None else _as_texts(fit_texts)
        self.bert_dir = _bert_dir(bert_model) if model == "bert" else None
        self.max_words, self._fitting, self._encode = max_words, None, None

    def rows(self, texts: Sequence) -> list[str]:
        """The texts the model reads: strings, and for ``bert`` cut to their salient words."""
        texts = _as_texts(texts)
        self._fitting = self.fit_texts if self.fit_texts is not None else texts
        if self.model_name != "bert":
            return texts
        vectorizer = TfidfVectorizer().fit(self._fitting)
        return [salient_words(t, vectorizer, self.max_words) for t in texts]

    def fingerprint(self, texts: Sequence, dataset_id: str) -> dict[str, Any]:
        texts = _as_texts(texts)
        fit = texts_fingerprint(self.fit_texts if self.fit_texts is not None else texts)
        fingerprint: dict[str, Any] = {"kind": f"text_{self.model_name}", "dataset_id": dataset_id,
                                       "texts": texts_fingerprint(texts)}
        if self.model_name == "minilm":
            fingerprint["model"] = MINILM_SPACE
        elif self.model_name == "tfidf":
            fingerprint.update(fit=fit, max_features=TFIDF_FEATURES)
        else:
            files = [[p.name, p.stat().st_size] for p in sorted(self.bert_dir.iterdir()) if p.is_file()]
            fingerprint.update(model=str(self.bert_dir.resolve()), weights=files, fit=fit,
                               max_words=self.max_words, layers=BERT_LAYERS)
        if self.dtype != "float32":  # recorded only when it differs: float32 caches keep their fingerprint
            fingerprint["dtype"] = self.dtype
        return {**fingerprint, **({} if self.model_name == "tfidf" else _compute_record(self.compute_dtype))}

    def output_layout(self) -> dict[str, tuple[tuple[int, ...], str]]:
        return {"features": ((int(self(["a"])["features"].shape[1]),), self.dtype)}

    def cli_args(self) -> list[str] | None:  # the scale-out CLI encodes MiniLM only
        return ["--compute-dtype", self.compute_dtype] if self.model_name == "minilm" else None

    def __call__(self, texts: list[str]) -> dict[str, np.ndarray]:
        self._encode = self._encode or self._load()
        return {"features": np.asarray(self._encode(list(texts)), np.float32).astype(STORAGE_DTYPES[self.dtype])}

    def _load(self) -> Callable[[list[str]], Any]:
        if self.model_name == "minilm":
            model = load_sentence_encoder(str(self.device), self.compute_dtype)
            return lambda texts: model.encode(texts, batch_size=len(texts), convert_to_numpy=True)
        if self.model_name == "tfidf":  # lower-cased words, smooth idf, L2-normalised rows
            vectorizer = TfidfVectorizer(max_features=TFIDF_FEATURES).fit(self._fitting)
            return lambda texts: vectorizer.transform(texts).toarray()
        return _BertStyleEncoder(self.bert_dir, self.device, torch_dtype(self.compute_dtype))


def make_encoder(kind: str, model: Any = None, weights: str | Path | None = None,
                 device: str | torch.device = "auto", dtype: str | None = None, autocast_dtype: str | None = None,
                 compute_dtype: str = "float32", decode: str = "pil",
                 **text_settings: Any) -> _ImageEncoder | TextEncoder:
    """The encoder of ``kind`` for ``model`` (classifier, name, text model); ``compute_dtype="float64"``: CPU-exact;
    ``decode``: how images are decoded (:data:`DECODERS`)."""
    if kind not in KINDS:
        raise ParameterError(f"kind={kind!r}; choose one of {KINDS}.")
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    if kind == "text_features" and decode != "pil":
        raise ParameterError(f"decode={decode!r} applies to images; leave it out for kind='text_features'.")
    if kind == "text_features":
        return TextEncoder(model or "minilm", torch_device, dtype, compute_dtype=compute_dtype, **text_settings)
    if model is None or isinstance(model, str):
        model = load_classifier(model or DEFAULT_CLASSIFIER, weights=weights, device=torch_device)
    elif not hasattr(model, "fingerprint") or not hasattr(model, "preprocess"):
        raise ParameterError(f"cached_outputs({kind!r}, model={model!r}): pass a classifier name (e.g. "
                             f"{DEFAULT_CLASSIFIER!r}) or a classifier from zsl_utils.classifiers.load_classifier.")
    elif weights is not None:
        raise ParameterError("weights= applies to a classifier name only; this classifier is already loaded "
                             "(pass weights to load_classifier instead).")
    encoder = ProbsEncoder if kind == "probs" else PooledFeaturesEncoder
    return encoder(model, dtype, autocast_dtype, compute_dtype, decode)


def cache_folder(kind: str, model_name: str, dataset_id: str, fingerprint: Mapping[str, Any], shard_size: int,
                 root: str | os.PathLike | None = None) -> Path:
    """Where a cache lives: ``<root or config.CACHE_DIR>/<dataset_id>/<kind>_<model>_<fingerprint+shard size hash>``."""
    payload = json.dumps(normalise_fingerprint({**fingerprint, "shard_size": shard_size}), sort_keys=True)
    safe = functools.partial(re.sub, r"[^A-Za-z0-9_.-]+", "_")
    name = f"{safe(f'{kind}_{model_name}')}_{hashlib.sha256(payload.encode()).hexdigest()[:10]}"
    return Path(root if root else config.CACHE_DIR) / safe(dataset_id) / name


def cached_outputs(
    kind: str, items: Sequence, model: Any = None, cache_dir: str | os.PathLike | None = None, *, dataset_id: str,
    processes: int = 1, cache_root: str | os.PathLike | None = None, batch_size: int | None = None,
    shard_size: int | None = None, num_workers: int = 0, progress: bool = True, shards: Sequence[int] | None = None,
    **encoder_settings: Any) -> CachedOutputs:
    """The ``kind`` outputs of ``model`` for ``items`` (paths or texts), computed once into ``cache_dir`` (another
    model's: StaleCacheError); ``processes > 1``: torchrun workers (MiniLM texts, images); ``shards``: only those."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ParameterError(f"processes (extraction_processes) must be a positive int, got {processes!r}.")
    if len(items) == 0:
        raise ParameterError(f"cached_outputs({kind!r}): no items to encode; check the item list.")
    encoder = make_encoder(kind, model, **encoder_settings)
    shard_size, batch_size = shard_size or encoder.shard_size, batch_size or encoder.batch_size
    fingerprint = encoder.fingerprint(items, dataset_id)
    directory = cache_dir or cache_folder(kind, encoder.model_name, dataset_id, fingerprint, shard_size, cache_root)
    cache = ShardedCache(directory, fingerprint, len(items), shard_size)
    if not cache.is_complete():  # rows first: a text encoder's layout needs them; row bytes: outputs and "ok"
        rows, layout = encoder.rows(items), encoder.output_layout()
        cache.check_free_space(1 + sum(int(np.prod(s)) * np.dtype(d).itemsize for s, d in layout.values()), shards)
    if processes > 1 and encoder.cli_args() is not None and not cache.is_complete():
        _fill_on_processes(encoder, items, cache, dataset_id, processes, batch_size, num_workers, progress)
    report = CachedOutputs(cache, pd.DataFrame(), [], cache.n_shards, 0.0)
    if not cache.is_complete():
        report = extract_to_cache(rows, encoder.load_item, encoder, cache, batch_size, num_workers,
                                  desc=f"{encoder.model_name} {kind} on {dataset_id}", shards=shards,
                                  progress=progress, pin_memory=encoder.pin_memory, output_layout=layout)
        if progress:
            print(report)
    # The items as given (not as the model read them, e.g. cut to salient words) name the skipped rows.
    return replace(report, name=encoder.output, skipped=_read_skipped(cache, items))


def _fill_on_processes(encoder: Any, items: Sequence, cache: ShardedCache, dataset_id: str, processes: int,
                       batch_size: int, num_workers: int, progress: bool) -> None:
    """Run ``python -m zsl_utils.scale.extract ... --processes N`` (a subprocess: the core never imports scale)."""
    settings = {"kind": encoder.kind, "cache-dir": cache.directory, "dataset-id": dataset_id, "dtype": encoder.dtype,
                "batch-size": batch_size, "shard-size": cache.shard_size, "num-workers": num_workers,
                "device": encoder.device, "processes": processes}
    with tempfile.TemporaryDirectory(prefix="zsl_extract_") as folder:
        if encoder.kind == "text_features":
            settings["texts-file"] = listing = Path(folder) / "texts.jsonl"  # JSON lines: texts may hold newlines
            listing.write_text("".join(json.dumps(t) + "\n" for t in _as_texts(items)), encoding="utf-8")
        else:
            paths = [os.path.abspath(p) for p in items]
            root = os.path.commonpath(paths)
            settings["images-root"] = root if os.path.isdir(root) else os.path.dirname(root)
            settings["file-list"] = listing = Path(folder) / "files.txt"
            listing.write_text("".join(p + "\n" for p in paths), encoding="utf-8")
        command = [sys.executable, "-m", "zsl_utils.scale.extract", *encoder.cli_args(),
                   *(str(x) for key, value in settings.items() for x in (f"--{key}", value))]
        parent = str(Path(__file__).resolve().parents[1])  # the workers import this package; a notebook runs elsewhere
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [parent, os.environ.get("PYTHONPATH")]))}
        done = subprocess.run(command, capture_output=True, text=True, env=env)
    if progress and done.stdout:
        print(done.stdout, end="")
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise ExtractionError(f"the extraction on {processes} processes failed (exit code {done.returncode}); "
                              f"rerun to resume, finished shards are kept:\n{tail}")
