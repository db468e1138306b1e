"""Images (or texts) -> model outputs in a :class:`~zsl_utils.cache.ShardedCache`.

``extract_to_cache`` is the generic engine: it walks the cache's missing shards only,
loads the items of each shard (in DataLoader worker processes when ``num_workers > 0``),
encodes them in batches and writes the shard atomically. Items that cannot be loaded
(corrupt, truncated, zero-byte or non-image files) are *skipped*: their rows hold zeros,
the row-aligned ``ok`` mask is False, and the shard also stores which rows were
skipped and why (``skipped_rows``, ``skipped_reasons``), so a resumed run, or an
evaluation months later, still reports them. A run over millions of images therefore
never stops for one bad file.

``classifier_outputs`` applies that engine to a pretrained classifier and stores its
softmax probabilities over its output classes (all of them: ConSE(1000) needs the full
distribution).

Storage choice: probabilities are stored as **float16** by default. That halves the disk
(ImageNet-21K, ~14 M images x 1000 classes: 28 GB instead of 56 GB). float16 keeps
about 3 significant digits, so two classes whose probabilities differ by less than
~0.05 % relative may swap rank, and probabilities below ~6e-8 flush to zero; both
change a ConSE embedding by a negligible amount (the weights involved are that small).
Pass ``dtype="float32"`` for bit-faithful storage.
"""
from __future__ import annotations

import hashlib
import os
import struct
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from PIL import Image
from tqdm.auto import tqdm

from zsl_utils.cache import ShardedCache
from zsl_utils.data.images import load_image_rgb
from zsl_utils.errors import ParameterError, ZslError

# Errors that mean "this file is bad" rather than "the code is wrong". Anything else
# (TypeError, AttributeError, ...) stops the run: silently skipping every image because
# of a bug would be far worse than a traceback.
LOAD_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # includes PIL.UnidentifiedImageError, truncated files, missing files
    ValueError,
    SyntaxError,  # PIL raises it for some malformed headers
    EOFError,
    IndexError,
    RuntimeError,
    struct.error,
    zlib.error,
    Image.DecompressionBombError,
)
_MAX_REASON_CHARS = 200
# Row-aligned output arrays of a cache: name -> (shape of one row, dtype).
Layout = dict[str, tuple[tuple[int, ...], np.dtype]]


class ExtractionError(ZslError):
    """Extraction cannot proceed (bad encoder output, nothing loadable, bad parameter)."""


@dataclass(frozen=True)
class SkippedItem:
    """One item that could not be loaded: its row in the cache, the item and why."""

    row: int
    item: str
    reason: str


@dataclass
class ExtractionReport:
    """What ``extract_to_cache`` did: shards computed vs reused and the skipped items."""

    n_items: int
    n_shards: int
    computed_shards: list[int] = field(default_factory=list)
    reused_shards: int = 0
    skipped: list[SkippedItem] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def n_skipped(self) -> int:
        return len(self.skipped)

    @property
    def n_ok(self) -> int:
        return self.n_items - self.n_skipped

    def skipped_frame(self) -> pd.DataFrame:
        """Skipped items as a DataFrame with columns ``row``, ``item``, ``reason``."""
        return pd.DataFrame([vars(s) for s in self.skipped], columns=["row", "item", "reason"])

    def __str__(self) -> str:
        return (
            f"{self.n_items} items in {self.n_shards} shards: computed {len(self.computed_shards)}, "
            f"reused {self.reused_shards} from cache; {self.n_skipped} skipped as unreadable; "
            f"{self.seconds:.1f} s"
        )


# ---------------------------------------------------------------------- image loading
class ImageLoader:
    """Picklable ``path -> preprocess(load_image_rgb(path))`` for DataLoader workers."""

    def __init__(self, preprocess: Callable[[Image.Image], Any] | None = None) -> None:
        self.preprocess = preprocess

    def __call__(self, path: str | os.PathLike) -> Any:
        image = load_image_rgb(path)
        return self.preprocess(image) if self.preprocess is not None else image


# ---------------------------------------------------------------------- the engine
class _LoadingDataset(torch.utils.data.Dataset):
    """Wraps ``load_item`` so a bad item yields ``(row, None, reason)`` instead of raising."""

    def __init__(self, items: Sequence, load_item: Callable[[Any], Any]) -> None:
        self.items = items
        self.load_item = load_item

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, row: int) -> tuple[int, Any, str]:
        try:
            value = self.load_item(self.items[row])
        except LOAD_ERRORS as error:
            return row, None, f"{type(error).__name__}: {error}"[:_MAX_REASON_CHARS]
        if value is None:
            return row, None, "load_item returned None"
        return row, value, ""


class LoadedBatch(list):
    """The loadable values of one batch: the list that ``encode_batch`` receives.

    With ``extract_to_cache(..., pin_memory=True)`` and values that are tensors of one
    shape, ``stacked`` also holds them as one ``[B, ...]`` tensor, stacked in the loading
    worker and pinned by the DataLoader (on CUDA): an encoder can copy it to the GPU with
    ``non_blocking=True`` instead of stacking again (the list items are views of it).
    Otherwise ``stacked`` is None.
    """

    stacked: torch.Tensor | None = None


class _Batch:
    """One loaded batch: its first row, the loaded rows/values and the skipped rows."""

    def __init__(self, loaded: list[tuple[int, Any, str]], stack: bool) -> None:
        self.first_row = loaded[0][0]
        self.rows = [row for row, value, _ in loaded if value is not None]
        values = [value for _, value, _ in loaded if value is not None]
        self.skipped = [(row, reason) for row, value, reason in loaded if value is None]
        self.stacked = _stack_if_uniform(values) if stack else None
        self.values = None if self.stacked is not None else values  # no second copy to ship

    def pin_memory(self) -> "_Batch":
        """Called by the DataLoader's pinning step (``pin_memory=True`` on CUDA)."""
        if self.stacked is not None:
            self.stacked = self.stacked.pin_memory()
        return self

    def encoder_input(self) -> LoadedBatch:
        values = LoadedBatch(self.values if self.stacked is None else self.stacked.unbind(0))
        values.stacked = self.stacked
        return values


def _stack_if_uniform(values: list) -> torch.Tensor | None:
    tensors = [v for v in values if isinstance(v, torch.Tensor)]
    if not tensors or len(tensors) != len(values) or len({(v.shape, v.dtype) for v in tensors}) != 1:
        return None
    return torch.stack(tensors)


class _Collate:
    """Picklable collate_fn: ``[(row, value, reason)] -> _Batch``."""

    def __init__(self, stack: bool) -> None:
        self.stack = stack

    def __call__(self, loaded: list[tuple[int, Any, str]]) -> _Batch:
        return _Batch(loaded, self.stack)


def _batches_for_shards(cache: ShardedCache, shards: Sequence[int], batch_size: int) -> list[list[int]]:
    """Row batches that never cross a shard boundary, in shard order."""
    batches = []
    for shard in shards:
        start, stop = cache.shard_bounds(shard)
        batches.extend(list(range(i, min(i + batch_size, stop))) for i in range(start, stop, batch_size))
    return batches


def _to_numpy(value: Any) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class _ShardAssembler:
    """Collects encoded batches of one shard and writes it when its last row arrives."""

    def __init__(self, cache: ShardedCache, items: Sequence, declared_layout: Layout | None = None) -> None:
        self.cache, self.items = cache, items
        self.declared_layout = declared_layout  # extract_to_cache(output_layout=...), checked against outputs
        self.layout: Layout | None = None
        self.pending: dict[int, dict] = {}
        self.deferred: list[int] = []  # shards with no loadable item seen before any layout

    def add(self, shard: int, rows: list[int], outputs: Mapping[str, np.ndarray] | None, skipped: list) -> bool:
        state = self.pending.setdefault(shard, {"seen": 0, "rows": [], "outputs": [], "skipped": []})
        state["seen"] += len(rows) + len(skipped)
        if outputs is not None:
            state["rows"].append(rows)
            state["outputs"].append(outputs)
            if self.layout is None:
                self.layout = {k: (tuple(v.shape[1:]), v.dtype) for k, v in outputs.items()}
                self._check_declared(self.layout, f"encode_batch's output for rows {rows[0]}..{rows[-1]}")
        state["skipped"].extend(skipped)
        start, stop = self.cache.shard_bounds(shard)
        if state["seen"] < stop - start:
            return False
        if self.layout is None:
            self.deferred.append(shard)
            return True
        self._write(shard, self.pending.pop(shard))
        self._flush_deferred()
        return True

    def _write(self, shard: int, state: dict) -> None:
        start, stop = self.cache.shard_bounds(shard)
        arrays = {k: np.zeros((stop - start, *shape), dtype) for k, (shape, dtype) in self.layout.items()}
        ok = np.zeros(stop - start, bool)
        for rows, outputs in zip(state["rows"], state["outputs"]):
            local = np.asarray(rows) - start
            ok[local] = True
            for key, value in outputs.items():
                arrays[key][local] = value
        skipped = sorted(state["skipped"])
        unaligned = {
            "skipped_rows": np.asarray([row for row, _ in skipped], np.int64),
            "skipped_reasons": np.asarray([reason for _, reason in skipped], dtype=str),
        }
        self.cache.write_shard(shard, ok=ok, unaligned=unaligned, **arrays)

    def _flush_deferred(self) -> None:
        while self.deferred and self.layout is not None:
            shard = self.deferred.pop()
            self._write(shard, self.pending.pop(shard))

    def finish(self) -> None:
        """Write shards whose every item was unreadable, once a layout is known."""
        if self.deferred and self.layout is None:
            # Another rank (or an earlier run) may have written a shard meanwhile.
            self.layout = _layout_from_existing_shard(self.cache)
            if self.layout is not None:
                self._check_declared(self.layout, "the cache's existing shards")
        if self.deferred and self.layout is None:
            self.layout = self.declared_layout
        if self.deferred and self.layout is None:
            raise ExtractionError(
                f"none of the {len(self.items)} items of cache {self.cache.directory} could be "
                f"loaded, so the output shape is unknown; check the paths and the loader "
                f"(first reasons: {[r for s in self.pending.values() for _, r in s['skipped']][:3]}), "
                f"or pass output_layout=... to extract_to_cache."
            )
        self._flush_deferred()

    def _check_declared(self, found: Layout, source: str) -> None:
        if self.declared_layout is not None and found != self.declared_layout:
            raise ExtractionError(
                f"output_layout {_describe(self.declared_layout)} passed to extract_to_cache differs from "
                f"{source}: {_describe(found)}; fix the declared layout (array name -> (row shape, dtype))."
            )


def normalise_layout(layout: Mapping[str, tuple[Sequence[int], Any]]) -> Layout:
    """``{name: (row shape, dtype)}`` with tuple shapes and numpy dtypes; raises on nonsense."""
    try:
        normal = {str(k): (tuple(int(n) for n in shape), np.dtype(dtype)) for k, (shape, dtype) in layout.items()}
    except (TypeError, ValueError) as error:
        raise ParameterError(
            f"output_layout must map array names to (row shape, dtype), e.g. {{'probs': ((1000,), 'float16')}}; "
            f"got {layout!r} ({error})."
        ) from error
    reserved = sorted(set(normal) & {"ok", "skipped_rows", "skipped_reasons"})
    if not normal or reserved:
        raise ParameterError(f"output_layout {layout!r} must name at least one output array and none of {reserved}.")
    return normal


def _describe(layout: Layout) -> str:
    return "{" + ", ".join(f"{k}: {shape} {dtype}" for k, (shape, dtype) in sorted(layout.items())) + "}"


def _layout_from_existing_shard(cache: ShardedCache) -> Layout | None:
    done = [s for s in range(cache.n_shards) if cache.has_shard(s)]
    if not done:
        return None
    arrays = cache.read_shard(done[0])
    skip = {"ok", "skipped_rows", "skipped_reasons"}
    return {k: (tuple(v.shape[1:]), v.dtype) for k, v in arrays.items() if k not in skip}


def _encode(encode_batch: Callable, values: list, rows: list[int]) -> dict[str, np.ndarray]:
    outputs = encode_batch(values)
    if not isinstance(outputs, Mapping) or not outputs:
        raise ExtractionError(
            f"encode_batch must return a non-empty dict name -> array, got {type(outputs).__name__}."
        )
    arrays = {str(k): _to_numpy(v) for k, v in outputs.items()}
    for key, value in arrays.items():
        if value.ndim == 0 or value.shape[0] != len(values):
            raise ExtractionError(
                f"encode_batch output {key!r} has shape {value.shape} for a batch of {len(values)} "
                f"items (rows {rows[0]}..{rows[-1]}); its first axis must be the batch size."
            )
    return arrays


def read_skipped(cache: ShardedCache, items: Sequence | None = None) -> list[SkippedItem]:
    """Skipped items recorded in the shards written so far (works on resumed caches)."""
    skipped = []
    for shard in range(cache.n_shards):
        if not cache.has_shard(shard):
            continue
        arrays = cache.read_shard(shard, ["skipped_rows", "skipped_reasons"])
        for row, reason in zip(arrays["skipped_rows"].tolist(), arrays["skipped_reasons"].tolist()):
            skipped.append(SkippedItem(row, str(items[row]) if items is not None else str(row), reason))
    return skipped


def extract_to_cache(
    items: Sequence,
    load_item: Callable[[Any], Any | None],
    encode_batch: Callable[[list], Mapping[str, np.ndarray]],
    cache: ShardedCache,
    batch_size: int = 64,
    num_workers: int = 0,
    desc: str = "extracting",
    shards: Sequence[int] | None = None,
    progress: bool = True,
    pin_memory: bool = False,
    output_layout: Mapping[str, tuple[Sequence[int], Any]] | None = None,
) -> ExtractionReport:
    """Fill the missing shards of ``cache`` with ``encode_batch`` outputs for ``items``.

    Args:
        items: the cache's rows, in order (``len(items) == cache.n_items``); e.g. paths.
        load_item: ``item -> value`` (runs in worker processes when ``num_workers > 0``,
            so it must be picklable). Return ``None`` or raise one of :data:`LOAD_ERRORS`
            for an unreadable item: it is skipped, counted and listed.
        encode_batch: ``list of values -> {name: array}`` with first axis ``len(values)``.
        cache: the target cache; only its missing shards are computed.
        batch_size: items per ``encode_batch`` call (batches never cross shards).
        num_workers: DataLoader worker processes for loading (0 = in this process).
        shards: compute only these shards (default: all missing) -- e.g.
            ``cache.shards_for_rank(rank, world_size)`` for one rank of a distributed job.
        progress: show a tqdm bar over shards.
        pin_memory: for a GPU encoder: the loaded tensors of a batch are stacked in the
            loading worker and the DataLoader pins that batch (page-locked memory, so the
            host-to-GPU copy can be asynchronous); the encoder finds it as
            ``values.stacked`` (see :class:`LoadedBatch`). Pinning happens only when CUDA is
            available; without CUDA the flag only moves the stacking into the loader.
        output_layout: ``{name: (row shape, dtype)}`` of ``encode_batch``'s outputs, e.g.
            ``{"probs": ((1000,), "float16")}``. Needed only when every item of the shards
            to compute is unreadable and no shard of the cache exists yet (say, one rank
            of a distributed job whose files are all corrupt): without it the array shapes
            of such shards are unknown. When given, it is checked against the real outputs.

    Returns:
        An :class:`ExtractionReport`; its ``skipped`` list also covers reused shards.
    """
    _check_extraction_arguments(items, cache, batch_size, num_workers)
    declared = normalise_layout(output_layout) if output_layout is not None else None
    began = time.perf_counter()
    missing_before = cache.missing_shards()
    todo = sorted(missing_before if shards is None else set(shards) & set(missing_before))
    loader = torch.utils.data.DataLoader(
        _LoadingDataset(items, load_item),
        batch_sampler=_batches_for_shards(cache, todo, batch_size),
        num_workers=num_workers,
        collate_fn=_Collate(stack=bool(pin_memory)),
        pin_memory=bool(pin_memory) and torch.cuda.is_available(),
    )
    assembler = _ShardAssembler(cache, items, declared)
    bar = tqdm(total=len(todo), desc=desc, unit="shard", disable=not progress)
    for batch in loader:
        outputs = _encode(encode_batch, batch.encoder_input(), batch.rows) if batch.rows else None
        if assembler.add(batch.first_row // cache.shard_size, batch.rows, outputs, batch.skipped):
            bar.update(1)
    assembler.finish()
    bar.close()
    report = ExtractionReport(cache.n_items, cache.n_shards, todo, cache.n_shards - len(missing_before))
    report.skipped = read_skipped(cache, items)
    report.seconds = time.perf_counter() - began
    return report


def _check_extraction_arguments(items: Sequence, cache: ShardedCache, batch_size: int, num_workers: int) -> None:
    if len(items) != cache.n_items:
        raise ExtractionError(
            f"got {len(items)} items but cache {cache.directory} was opened for n_items={cache.n_items}; "
            f"open the cache with n_items=len(items)."
        )
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ParameterError(f"batch_size must be a positive int, got {batch_size!r}.")
    if not isinstance(num_workers, int) or num_workers < 0:
        raise ParameterError(f"num_workers must be an int >= 0, got {num_workers!r}.")


# ---------------------------------------------------------------------- classifiers
def dataset_fingerprint(paths: Sequence[str | os.PathLike], root: str | os.PathLike | None = None) -> str:
    """SHA-256 of the files' relative paths and byte sizes, **in row order**.

    Row order matters because cache rows are aligned to it: the same files listed in a
    different order are a different cache. Paths are made relative to ``root`` (default:
    their common folder), so moving a dataset to another disk keeps its fingerprint.
    Sizes catch a file replaced in place; contents are not hashed (too slow for 14 M files).
    """
    paths = [Path(p) for p in paths]
    if root is None:
        root = Path(os.path.commonpath([str(p) for p in paths])) if paths else Path(".")
        if len(paths) == 1:
            root = paths[0].parent
    digest = hashlib.sha256()
    for path in paths:
        try:
            size = path.stat().st_size
        except OSError:
            size = -1  # missing: it will be skipped at load time, but still changes the hash
        digest.update(f"{os.path.relpath(path, root)}\t{size}\n".encode())
    return digest.hexdigest()


def _classifier_fingerprint(classifier: Any) -> Any:
    value = getattr(classifier, "fingerprint", None)
    if value is None:
        raise ExtractionError(
            f"classifier {getattr(classifier, 'name', classifier)!r} has no fingerprint; load it with "
            f"zsl_utils.classifiers.load_classifier so that its cache can be validated."
        )
    return value if isinstance(value, (str, int, float, list, dict)) else str(value)


class _SoftmaxEncoder:
    """``list of CHW tensors -> {'probs': (B, C)}`` on ``device``, in eval mode, no grad."""

    def __init__(self, model: torch.nn.Module, device: torch.device, dtype: np.dtype, autocast_dtype) -> None:
        self.model, self.device, self.dtype, self.autocast_dtype = model, device, dtype, autocast_dtype

    @torch.inference_mode()
    def __call__(self, tensors: list) -> dict[str, np.ndarray]:
        batch = getattr(tensors, "stacked", None)  # stacked (and pinned on CUDA) by the loader
        if batch is None:
            batch = torch.stack(tensors)
        batch = batch.to(self.device, non_blocking=True)
        if self.autocast_dtype is not None and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                logits = self.model(batch)
        else:
            logits = self.model(batch)
        probs = torch.softmax(logits.float(), dim=1)
        return {"probs": probs.cpu().numpy().astype(self.dtype)}


_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
_AUTOCAST_DTYPES = {None: None, "bfloat16": torch.bfloat16, "float16": torch.float16}


def classifier_outputs_fingerprint(
    classifier: Any,
    image_paths: Sequence[str | os.PathLike],
    dataset_id: str,
    dtype: str,
    autocast_dtype: str | None = None,
    dataset_root: str | os.PathLike | None = None,
) -> dict:
    """The cache fingerprint of :func:`classifier_outputs` for these arguments.

    The one definition of it: ``classifier_outputs`` and the distributed extraction
    (``dist_extract --kind probs``) both call this, so both fill the same cache. It
    combines ``classifier.fingerprint`` (model, weights, preprocessing), the number of
    classes, ``dataset_id``, the :func:`dataset_fingerprint` of the paths (row order and
    file sizes), the storage ``dtype`` ("float16"/"float32") and the ``autocast_dtype``
    (None, "bfloat16" or "float16"), which change the stored numbers.
    """
    if dtype not in _STORAGE_DTYPES:
        raise ParameterError(f"dtype must be one of {sorted(_STORAGE_DTYPES)}, got {dtype!r}.")
    if autocast_dtype not in _AUTOCAST_DTYPES:
        raise ParameterError(f"autocast_dtype must be None, 'bfloat16' or 'float16', got {autocast_dtype!r}.")
    return {
        "kind": "classifier_softmax",
        "classifier": _classifier_fingerprint(classifier),
        "n_classes": len(classifier.wnids),
        "dataset_id": dataset_id,
        "dataset": dataset_fingerprint([str(p) for p in image_paths], dataset_root),
        "dtype": dtype,
        "autocast_dtype": autocast_dtype,
        "alpha_background": "white",
    }


def classifier_outputs(
    classifier: Any,
    image_paths: Sequence[str | os.PathLike],
    cache_dir: str | os.PathLike,
    dataset_id: str,
    batch_size: int = 64,
    device: str | torch.device = "auto",
    num_workers: int = 0,
    shard_size: int = 1024,
    dtype: str = "float16",
    autocast_dtype: str | None = None,
    dataset_root: str | os.PathLike | None = None,
    progress: bool = True,
    shards: Sequence[int] | None = None,
    pin_memory: bool | None = None,
) -> ShardedCache:
    """Softmax probabilities of ``classifier`` over ``image_paths``, cached in ``cache_dir``.

    The cache holds ``probs`` (n_images x n_classes, ``dtype``, columns in the order of
    ``classifier.wnids``) and ``ok`` (False for unreadable images, whose rows are zero).
    Its fingerprint (:func:`classifier_outputs_fingerprint`) combines
    ``classifier.fingerprint``, ``dataset_id``, the :func:`dataset_fingerprint` of the
    paths, the storage dtype and the autocast dtype, so a rerun reuses finished shards and
    a different model/dataset is refused.
    Batch size, workers and device are *not* in the fingerprint: they do not change the
    numbers beyond float32 round-off (``autocast_dtype="bfloat16"`` would, hence it is).
    Unreadable images are listed by :func:`read_skipped` (and printed when progress=True).

    ``shards`` computes only those shards (default: every missing one); the returned
    cache is then incomplete. ``pin_memory`` (default: True when ``device`` is CUDA)
    pins each loaded batch for an asynchronous host-to-GPU copy.
    """
    from zsl_utils.device import pick_device

    paths = [str(p) for p in image_paths]
    fingerprint = classifier_outputs_fingerprint(classifier, paths, dataset_id, dtype, autocast_dtype, dataset_root)
    torch_device = device if isinstance(device, torch.device) else pick_device(device)
    cache = ShardedCache(cache_dir, fingerprint, len(paths), shard_size)
    if cache.is_complete():
        return cache
    model = classifier.model
    home = next(iter(model.parameters()), torch.empty(0)).device
    encoder = _SoftmaxEncoder(model.to(torch_device).eval(), torch_device, _STORAGE_DTYPES[dtype],
                              _AUTOCAST_DTYPES[autocast_dtype])
    try:
        report = extract_to_cache(
            paths, ImageLoader(classifier.preprocess), encoder, cache, batch_size, num_workers,
            desc=f"{getattr(classifier, 'name', 'classifier')} on {dataset_id}", shards=shards, progress=progress,
            pin_memory=torch_device.type == "cuda" if pin_memory is None else pin_memory,
            output_layout={"probs": ((len(classifier.wnids),), _STORAGE_DTYPES[dtype])},
        )
    finally:
        model.to(home)  # leave the caller's classifier where it was
    if progress:
        print(report)
    return cache
