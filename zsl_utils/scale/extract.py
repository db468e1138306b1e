"""Distributed extraction of classifier outputs and features into sharded caches.

One command fills the same :class:`~zsl_utils.cache.ShardedCache` that the notebooks
fill in-process, on 1 process or on N processes of one or several machines::

    torchrun --nproc_per_node 4 -m zsl_utils.scale.extract --kind probs \\
        --images-root /data/imagenet21k --cache-dir /scratch/cache/probs_21k

Kinds, and the in-process function whose cache each one fills (same fingerprint, same
bytes; tested): ``probs`` = ``extract.classifier_outputs`` (ConSE notebooks),
``image_features`` = ``features.image_features`` and ``text_features`` =
``features.text_features(kind="minilm")`` (HUSE notebook).

How the work is split: shard ``s`` of the cache belongs to rank ``s % world_size``
(:meth:`ShardedCache.shards_for_rank`), so ranks never write the same file and the
split is a pure function of the shard index. Each rank lists the dataset itself; the
ranks first check that they all computed the same listing hash (:func:`agree_on`), so
nodes that see a different file system fail before any work instead of mixing rows.
After a barrier, rank 0 re-reads every shard (:func:`verify_cache`): all present,
readable, row counts, shapes and dtypes consistent, fingerprint as expected.

Why a 1-process and an N-process run give *identical* caches: a shard's rows are
encoded in the same batches whichever rank owns it (batches never cross a shard
boundary), with the same model and preprocessing, so the bytes written are the same.

Resume: a shard file exists completely or not at all (atomic rename), so rerunning the
same command computes exactly the missing shards -- whatever the number of processes
of the interrupted run. Unreadable files (corrupt, empty, not an image) are skipped,
stored as ``ok == False`` rows and listed in the summary.

GPU path: each rank drives the GPU of its ``LOCAL_RANK`` (NCCL backend), batches are
copied from pinned host memory, and with ``--autocast auto`` the classifier forward
runs in bfloat16 on CUDA (float32 on CPU). bfloat16 changes the numbers in the third
significant digit, so it is part of the cache fingerprint: a CPU cache and a bf16 GPU
cache of the same images are different caches.
"""
from __future__ import annotations

import argparse
import errno
import hashlib
import json
import os
import shutil
import socket
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import pandas as pd
import torch

from zsl_utils.atomic import temporary_sibling, write_text_atomically
from zsl_utils.cache import CacheError, ShardedCache, fingerprint_differences, normalise_fingerprint, read_meta
from zsl_utils.scale.launch import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    agree_on,
    all_gather_objects,
    barrier,
    default_num_workers,
    die_with_parent,
    init_distributed,
    launch_torchrun,
    rank_failure_guard,
    shutdown_distributed,
)
from zsl_utils.errors import DataLayoutError, ParameterError, ZslError
from zsl_utils.extract import ImageLoader, classifier_outputs_fingerprint, extract_to_cache

KINDS = ("probs", "image_features", "text_features")
_DEFAULT_DTYPE = {"probs": "float16", "image_features": "float32", "text_features": "float32"}
_STORAGE_DTYPES = {"float16": np.float16, "float32": np.float32}
_UNALIGNED = ("skipped_rows", "skipped_reasons")
# Shard files are uncompressed .npz: the payload plus a zip/npy header per array.
_SHARD_OVERHEAD_BYTES = 64 * 1024


class CacheFullError(CacheError):
    """The cache's disk has (or had) too little free space for the shards still to write."""


class CacheVerificationError(CacheError):
    """A finished cache failed the final consistency check."""


# ---------------------------------------------------------------------- the job
@dataclass
class ExtractionSpec:
    """Everything that defines one extraction: what to encode, with what, into which cache.

    ``processes`` and ``num_workers`` do not change the cache; everything that does
    (model, weights, preprocessing, dataset listing, storage dtype, autocast) is in the
    cache fingerprint.
    """

    kind: str  # "probs", "image_features" or "text_features"
    cache_dir: str
    images_root: str | None = None  # image kinds: folder to list (recursively, sorted)
    file_list: str | None = None  # optional text file, one path per line (relative to images_root)
    extensions: tuple[str, ...] | None = None  # e.g. (".png",); None = every non-hidden file
    texts_file: str | None = None  # text_features: one text per line (.txt) or JSON string per line (.jsonl)
    classifier: str = "efficientnet_lite0"  # any name zsl_utils.classifiers.load_classifier accepts
    weights: str | None = None  # local checkpoint overriding the classifier's default weights
    dataset_id: str | None = None  # default: the folder / file name
    batch_size: int = 64
    shard_size: int = 1024
    dtype: str | None = None  # storage dtype; default float16 for probs, float32 for features
    autocast: str = "auto"  # "auto" (bfloat16 on CUDA, none on CPU), "bfloat16", "none"
    num_workers: int | None = None  # DataLoader workers per rank; None = from the machine
    device: str = "auto"
    # Testing aids (used by the fault tests; harmless otherwise).
    debug_batch_delay_s: float = 0.0  # sleep after each batch, to widen the window for a kill
    debug_fail_rank: int | None = None  # this rank raises after debug_fail_after_batches batches
    debug_fail_after_batches: int = 0

    def __post_init__(self) -> None:
        self.cache_dir, self.device = str(self.cache_dir), str(self.device)
        if self.extensions is not None:
            self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)
        self.validate()

    def validate(self) -> None:
        """Raise :class:`ParameterError` naming the first bad field."""
        if self.kind not in KINDS:
            raise ParameterError(f"kind={self.kind!r}; choose one of {KINDS}.")
        if self.kind == "text_features" and not self.texts_file:
            raise ParameterError("kind='text_features' needs texts_file (--texts-file), one text per line.")
        if self.kind != "text_features" and not self.images_root:
            raise ParameterError(f"kind={self.kind!r} needs images_root (--images-root), the image folder.")
        for name in ("batch_size", "shard_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ParameterError(f"{name} must be a positive int, got {value!r}.")
        if self.dtype is not None and self.dtype not in _STORAGE_DTYPES:
            raise ParameterError(f"dtype={self.dtype!r}; choose one of {sorted(_STORAGE_DTYPES)}.")
        if self.autocast not in ("auto", "bfloat16", "none"):
            raise ParameterError(f"autocast={self.autocast!r}; choose 'auto', 'bfloat16' or 'none'.")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ParameterError(f"num_workers must be None (from the machine) or an int >= 0, got {self.num_workers!r}.")

    @property
    def storage_dtype(self) -> str:
        return self.dtype or _DEFAULT_DTYPE[self.kind]

    def autocast_dtype(self, device: torch.device) -> str | None:
        """The autocast dtype actually used on ``device`` (recorded in the fingerprint)."""
        if self.kind == "text_features" or self.autocast == "none":
            return None
        # "auto" and "bfloat16" both mean bf16 on CUDA; on CPU the forward stays float32.
        return "bfloat16" if device.type == "cuda" else None

    def to_args(self) -> list[str]:
        """Command-line arguments of :func:`main` that reproduce this spec."""
        args: list[str] = []
        for spec_field in fields(self):
            value = getattr(self, spec_field.name)
            if value is None:
                continue
            flag = "--" + spec_field.name.replace("_", "-")
            if isinstance(value, tuple):
                args += [flag, ",".join(value)]
            else:
                args += [flag, str(value)]
        return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m zsl_utils.scale.extract",
        description="Fill a sharded cache with classifier probabilities or features, on 1..N processes. "
        "Rerunning the same command resumes: only missing shards are computed.",
    )
    parser.add_argument("--kind", required=True, choices=KINDS)
    parser.add_argument("--cache-dir", required=True, help="cache folder (created; reused on resume)")
    parser.add_argument("--images-root", help="image folder, listed recursively in sorted order")
    parser.add_argument("--file-list", help="text file of image paths (one per line, relative to --images-root)")
    parser.add_argument("--extensions", help="comma-separated suffixes to keep, e.g. .png,.jpg (default: all files)")
    parser.add_argument("--texts-file", help="text_features: one text per line, or one JSON string per line (.jsonl)")
    parser.add_argument("--classifier", default="efficientnet_lite0", help="efficientnet_lite0 | timm:<arch> | torchvision:<arch>")
    parser.add_argument("--weights", help="local weights file for the classifier")
    parser.add_argument("--dataset-id", help="name recorded in the cache fingerprint (default: folder name)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--shard-size", type=int, default=1024, help="rows per shard file")
    parser.add_argument("--dtype", choices=sorted(_STORAGE_DTYPES), help="storage dtype (default float16 probs, float32 features)")
    parser.add_argument("--autocast", default="auto", choices=("auto", "bfloat16", "none"))
    parser.add_argument("--num-workers", type=int, help="DataLoader workers per rank (default: from the CPU count)")
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (under torchrun: GPU = LOCAL_RANK)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="limit for collectives and the final barrier")
    parser.add_argument("--summary-json", help="rank 0 writes the run summary here")
    parser.add_argument("--error-dir", help="each failing rank writes its error here (set by the Python launcher)")
    parser.add_argument("--debug-batch-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    parser.add_argument("--debug-fail-rank", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--debug-fail-after-batches", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def spec_from_args(namespace: argparse.Namespace) -> ExtractionSpec:
    values = {f.name: getattr(namespace, f.name) for f in fields(ExtractionSpec)}
    if values["extensions"]:
        values["extensions"] = tuple(e.strip() for e in values["extensions"].split(",") if e.strip())
    return ExtractionSpec(**values)


# ---------------------------------------------------------------------- items
def list_image_files(
    root: str | os.PathLike, file_list: str | os.PathLike | None = None, extensions: Sequence[str] | None = None
) -> list[str]:
    """The dataset's rows: image paths in a deterministic order.

    Without ``file_list``: every regular, non-hidden file under ``root`` (recursively),
    sorted by relative path, optionally only those ending in ``extensions``. Non-image
    files are kept on purpose: they are skipped and *listed*, not silently ignored.
    With ``file_list``: its lines, in file order (paths relative to ``root`` or absolute).
    """
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataLayoutError(f"images_root {root} is not a folder; pass the folder that holds the images.")
    if file_list is not None:
        try:
            lines = Path(file_list).read_text(encoding="utf-8").splitlines()
        except OSError as error:
            raise DataLayoutError(f"cannot read file_list {file_list} ({error.strerror}).") from error
        paths = [str(root / line.strip()) for line in lines if line.strip()]
    else:
        suffixes = tuple(s.lower() for s in extensions) if extensions else None
        found = []
        for folder, subfolders, files in os.walk(root):
            subfolders[:] = [d for d in subfolders if not d.startswith(".")]
            for name in files:
                if not name.startswith(".") and (suffixes is None or name.lower().endswith(suffixes)):
                    found.append(os.path.relpath(os.path.join(folder, name), root))
        paths = [str(root / rel) for rel in sorted(found, key=lambda p: Path(p).as_posix())]
    if not paths:
        raise DataLayoutError(
            f"no files to extract under {root}" + (f" with extensions {list(extensions)}" if extensions else "")
            + (f" listed in {file_list}" if file_list else "") + "; check the path."
        )
    return paths


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a ``.jsonl`` file (one JSON string per line, so texts may hold newlines)
    or of any other UTF-8 file (one text per line). The line order is the row order."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
        texts = [json.loads(line) for line in lines] if path.suffix == ".jsonl" else lines
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise DataLayoutError(f"cannot read texts_file {path} ({error}); write UTF-8, one text per line "
                              f"(or one JSON string per line in a .jsonl file).") from error
    if not texts:
        raise DataLayoutError(f"texts_file {path} is empty; write one text per line.")
    return [t if isinstance(t, str) else "" for t in texts]


def spec_items(spec: ExtractionSpec) -> list[str]:
    """The rows of ``spec``'s cache: image paths or texts."""
    if spec.kind == "text_features":
        return read_texts(spec.texts_file)
    return list_image_files(spec.images_root, spec.file_list, spec.extensions)


def _listing_hash(items: Sequence[str]) -> str:
    digest = hashlib.sha256()
    for item in items:
        digest.update(item.encode("utf-8", "surrogateescape") + b"\n")
    return digest.hexdigest()


# ---------------------------------------------------------------------- cache directory checks
def check_cache_dir_writable(cache_dir: str | os.PathLike) -> Path:
    """Create ``cache_dir`` and prove a file can be written there, before any expensive step."""
    directory = Path(cache_dir).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(directory / "write_probe")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        raise CacheError(
            f"cache directory {directory} is not writable ({error.strerror or error}); pass a writable "
            f"--cache-dir (cache_dir=...) or set ZSL_CACHE_DIR. Nothing was computed."
        ) from error
    return directory


def check_free_space(cache_dir: str | os.PathLike, needed_bytes: int) -> None:
    """Raise :class:`CacheFullError` when the disk of ``cache_dir`` has less than ``needed_bytes`` free."""
    free = shutil.disk_usage(cache_dir).free
    if needed_bytes > free:
        raise CacheFullError(
            f"cache directory {cache_dir} has {free / 1e9:.2f} GB free but the shards still to write need "
            f"about {needed_bytes / 1e9:.2f} GB; free space or pass another --cache-dir. Nothing was computed."
        )


def _missing_rows(cache: ShardedCache) -> int:
    return sum(stop - start for start, stop in map(cache.shard_bounds, cache.missing_shards()))


# ---------------------------------------------------------------------- encoders
class _BatchEncoder:
    """``list of CHW tensors -> {name: array}``: pinned copy, device, optional autocast, storage dtype.

    Also implements the testing aids (a delay per batch, a fault on one rank).
    """

    def __init__(self, forward: Callable[[torch.Tensor], torch.Tensor], name: str, device: torch.device,
                 dtype: str, autocast_dtype: str | None, rank: int, spec: ExtractionSpec) -> None:
        self.forward, self.name, self.device = forward, name, device
        self.dtype = _STORAGE_DTYPES[dtype]
        self.autocast_dtype = getattr(torch, autocast_dtype) if autocast_dtype else None
        self.rank, self.spec, self.batches = rank, spec, 0

    @torch.inference_mode()
    def __call__(self, values: list) -> dict[str, np.ndarray]:
        self._maybe_fail()
        batch = self._to_device(values)
        if self.autocast_dtype is not None and self.device.type == "cuda":
            with torch.autocast("cuda", dtype=self.autocast_dtype):
                output = self.forward(batch)
        else:
            output = self.forward(batch)
        result = {self.name: output.float().cpu().numpy().astype(self.dtype)}
        self.batches += 1
        if self.spec.debug_batch_delay_s:
            time.sleep(self.spec.debug_batch_delay_s)
        return result

    def _to_device(self, values: list) -> Any:
        if not isinstance(values[0], torch.Tensor):
            return values  # texts: the sentence encoder tokenises itself
        batch = getattr(values, "stacked", None)  # extract_to_cache(pin_memory=True) stacked it
        if batch is None:
            batch = torch.stack(values)
        if self.device.type == "cuda" and not batch.is_pinned():  # pinned pages: asynchronous copy
            batch = batch.pin_memory()
        return batch.to(self.device, non_blocking=True)

    def _maybe_fail(self) -> None:
        if self.spec.debug_fail_rank == self.rank and self.batches >= self.spec.debug_fail_after_batches:
            raise RuntimeError(
                f"injected fault on rank {self.rank} after {self.batches} batches (debug_fail_rank)"
            )


def _softmax_of(model: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    return lambda batch: torch.softmax(model(batch).float(), dim=1)


@dataclass
class _Job:
    fingerprint: dict
    load_item: Callable[[Any], Any] | None
    encoder: _BatchEncoder
    output_layout: dict[str, tuple[tuple[int, ...], str]]  # lets a rank write all-unreadable shards
    desc: str

    @property
    def row_bytes(self) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.output_layout.values())


def _image_job(spec: ExtractionSpec, items: list[str], ctx: DistContext) -> _Job:
    from zsl_utils.classifiers import load_classifier

    classifier = load_classifier(spec.classifier, spec.weights, device=ctx.device)
    autocast_dtype = spec.autocast_dtype(ctx.device)
    dataset_id = spec.dataset_id or Path(spec.images_root).expanduser().resolve().name
    if spec.kind == "probs":
        # The fingerprint of extract.classifier_outputs: this cache is the notebooks' cache.
        fingerprint = classifier_outputs_fingerprint(classifier, items, dataset_id, spec.storage_dtype, autocast_dtype)
        forward, name, width = _softmax_of(classifier.model), "probs", len(classifier.wnids)
    else:
        # The fingerprint of features.image_features: this cache is the HUSE notebook's cache.
        from zsl_utils.features import image_features_fingerprint

        fingerprint = image_features_fingerprint(classifier, items, dataset_id, spec.storage_dtype, autocast_dtype)
        forward, name, width = classifier.pooled_features, "features", _feature_width(classifier)
    encoder = _BatchEncoder(forward, name, ctx.device, spec.storage_dtype, autocast_dtype, ctx.rank, spec)
    return _Job(fingerprint, ImageLoader(classifier.preprocess), encoder, {name: ((width,), spec.storage_dtype)},
                f"rank {ctx.rank}: {classifier.name} {spec.kind} on {dataset_id}")


def _feature_width(classifier: Any) -> int:
    """Width of ``classifier.pooled_features``, measured on one blank image of the model's input size.

    Measured rather than read from module attributes, because it fixes the array shape of
    shards whose images are all unreadable (``output_layout``), not just a disk estimate.
    """
    size = classifier.preprocess.config.get("input_size", (3, 224, 224))
    with torch.inference_mode():
        return int(classifier.pooled_features(torch.zeros(1, *size)).shape[-1])


def _text_job(spec: ExtractionSpec, items: list[str], ctx: DistContext) -> _Job:
    """MiniLM sentence features, the cache of ``features.text_features(kind="minilm")``."""
    from zsl_utils.features import non_empty_text, text_features_fingerprint
    from zsl_utils.semantic import MINILM_SPACE, load_sentence_encoder

    encoder_model = load_sentence_encoder(str(ctx.device))
    dataset_id = spec.dataset_id or Path(spec.texts_file).stem
    fingerprint = text_features_fingerprint(items, dataset_id, kind="minilm", dtype=spec.storage_dtype)

    def forward(texts: list[str]) -> torch.Tensor:
        return torch.as_tensor(encoder_model.encode(texts, batch_size=len(texts), convert_to_numpy=True))

    # sentence-transformers renamed this method; ask whichever exists, else measure one text.
    dimension = getattr(encoder_model, "get_embedding_dimension", None) or encoder_model.get_sentence_embedding_dimension
    width = dimension() or int(forward(["a"]).shape[-1])
    encoder = _BatchEncoder(forward, "features", ctx.device, spec.storage_dtype, None, ctx.rank, spec)
    return _Job(fingerprint, non_empty_text, encoder, {"features": ((width,), spec.storage_dtype)},
                f"rank {ctx.rank}: {MINILM_SPACE} on {dataset_id}")


# ---------------------------------------------------------------------- one rank's work
@dataclass
class RankReport:
    """What one rank did: the shards it computed, how many rows, how long it took."""

    rank: int
    computed_shards: list[int]
    rows: int
    seconds: float  # whole rank: listing, model loading, extraction
    extract_seconds: float  # extract_to_cache only (images/s = rows / extract_seconds)
    host: str = field(default_factory=socket.gethostname)


def run_extraction(
    spec: ExtractionSpec, ctx: DistContext | None = None, progress: bool = True
) -> tuple[RankReport, dict, list[str]]:
    """This rank's share of ``spec``: every missing shard ``s`` with ``s % world_size == rank``.

    Outside torchrun (``ctx`` None or world size 1) that is every missing shard: the
    same code, in-process, is what the notebooks run for the demo profile. Returns the
    rank's report, the cache fingerprint and the cache's items (paths or texts).
    """
    from zsl_utils.device import pick_device

    ctx = ctx or DistContext(device=pick_device(spec.device))
    began = time.perf_counter()
    items = spec_items(spec)
    agree_on(ctx, _listing_hash(items), f"the listing of {spec.images_root or spec.texts_file}")
    check_cache_dir_writable(spec.cache_dir)  # before loading a model
    job = _text_job(spec, items, ctx) if spec.kind == "text_features" else _image_job(spec, items, ctx)
    cache = ShardedCache(spec.cache_dir, job.fingerprint, len(items), spec.shard_size)
    check_free_space(cache.directory, _missing_rows(cache) * job.row_bytes + cache.n_shards * _SHARD_OVERHEAD_BYTES)
    shards = cache.shards_for_rank(ctx.rank, ctx.world_size)
    num_workers = spec.num_workers if spec.num_workers is not None else default_num_workers(ctx.local_world_size)
    extract_began = time.perf_counter()
    try:
        report = extract_to_cache(items, job.load_item, job.encoder, cache, spec.batch_size, num_workers,
                                  desc=job.desc, shards=shards, progress=progress,
                                  pin_memory=ctx.device.type == "cuda", output_layout=job.output_layout)
    except OSError as error:
        if error.errno in (errno.ENOSPC, errno.EDQUOT):
            raise CacheFullError(
                f"the disk of cache directory {cache.directory} filled up while writing shards ({error}); free "
                f"space and rerun: completed shards are kept, the interrupted one is recomputed."
            ) from error
        raise
    rows = sum(stop - start for start, stop in map(cache.shard_bounds, report.computed_shards))
    now = time.perf_counter()
    return RankReport(ctx.rank, list(report.computed_shards), rows, now - began, now - extract_began), job.fingerprint, items


# ---------------------------------------------------------------------- verification
@dataclass
class CacheCheck:
    """Result of :func:`verify_cache`: the cache's layout, its skipped rows and any problems."""

    directory: str
    n_items: int
    n_shards: int
    arrays: dict[str, list]  # name -> [trailing shape, dtype] of row-aligned arrays
    skipped: list[dict]  # {"row", "item", "reason"}
    problems: list[str]
    temporary_files: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise CacheVerificationError(
                f"cache {self.directory} failed verification ({len(self.problems)} problem(s)):\n  "
                + "\n  ".join(self.problems[:20]) + "\nDelete the listed shard files and rerun to recompute them."
            )


def verify_cache(
    cache_dir: str | os.PathLike, expected_fingerprint: dict | None = None, items: Sequence[str] | None = None
) -> CacheCheck:
    """Re-read every shard of a finished cache and check it is complete and consistent.

    Checks: ``meta.json`` readable and (if given) equal to ``expected_fingerprint``; every
    shard present and readable; every row-aligned array has the shard's row count and the
    same trailing shape and dtype in every shard; the same array names everywhere; the
    ``ok`` mask is False exactly at the recorded skipped rows. Reads all data once.
    """
    meta = read_meta(cache_dir)
    problems: list[str] = []
    if expected_fingerprint is not None:
        differences = fingerprint_differences(meta.get("fingerprint", {}), normalise_fingerprint(expected_fingerprint))
        problems += [f"fingerprint differs: {line}" for line in differences]
    cache = ShardedCache.open_existing(cache_dir, read_only=True)
    missing = cache.missing_shards()
    if missing:
        problems.append(f"{len(missing)} of {cache.n_shards} shards missing: {missing[:10]}")
    layout: dict[str, tuple] | None = None
    skipped: list[dict] = []
    for shard in range(cache.n_shards):
        if shard in missing:
            continue
        try:
            arrays = cache.read_shard(shard)
        except CacheError as error:
            problems.append(f"shard {shard}: {error}")
            continue
        shard_layout, shard_problems, shard_skipped = _check_shard(cache, shard, arrays, items)
        layout = layout or shard_layout
        if shard_layout != layout:
            shard_problems.append(f"arrays {shard_layout} differ from the first shard's {layout}")
        problems += [f"shard {shard}: {p}" for p in shard_problems]
        skipped += shard_skipped
    temporary = sorted(p.name for p in cache.directory.glob(".*.tmp-*"))
    return CacheCheck(str(cache.directory), cache.n_items, cache.n_shards,
                      {k: [list(v[0]), v[1]] for k, v in (layout or {}).items()}, skipped, problems, temporary)


def _check_shard(cache: ShardedCache, shard: int, arrays: dict, items: Sequence[str] | None):
    start, stop = cache.shard_bounds(shard)
    problems = []
    aligned = {k: v for k, v in arrays.items() if k not in _UNALIGNED}
    for key, value in aligned.items():
        if value.ndim == 0 or value.shape[0] != stop - start:
            problems.append(f"array {key!r} has {value.shape[0] if value.ndim else 0} rows, expected {stop - start}")
    layout = {k: (tuple(v.shape[1:]), str(v.dtype)) for k, v in aligned.items()}
    rows = arrays.get("skipped_rows", np.zeros(0, np.int64)).tolist()
    reasons = arrays.get("skipped_reasons", np.zeros(0, str)).tolist()
    if any(not start <= r < stop for r in rows):
        problems.append(f"skipped rows {rows} outside the shard's rows {start}..{stop - 1}")
    elif "ok" in arrays and arrays["ok"].shape == (stop - start,):
        not_ok = (np.flatnonzero(~arrays["ok"].astype(bool)) + start).tolist()
        if sorted(rows) != not_ok:
            problems.append(f"ok mask is False at rows {not_ok} but the skipped rows are {sorted(rows)}")
    skipped = [{"row": r, "item": items[r] if items is not None else str(r), "reason": str(reason)}
               for r, reason in zip(rows, reasons)]
    return layout, problems, skipped


# ---------------------------------------------------------------------- summaries
@dataclass
class ExtractionSummary:
    """What a whole (1- or N-process) extraction did, and the verified state of its cache."""

    cache_dir: str
    processes: int
    n_items: int
    n_shards: int
    computed_shards: dict[int, list[int]]  # rank -> shards it computed in this run
    arrays: dict[str, list]
    skipped: list[dict]
    seconds_per_rank: dict[int, float]  # whole rank, including model loading
    extract_seconds_per_rank: dict[int, float]  # extract_to_cache only
    wall_seconds: float
    fingerprint: dict

    @property
    def n_computed(self) -> int:
        return sum(len(s) for s in self.computed_shards.values())

    @property
    def n_reused(self) -> int:
        return self.n_shards - self.n_computed

    def skipped_frame(self) -> pd.DataFrame:
        """Skipped rows (unreadable files) with their reasons."""
        return pd.DataFrame(self.skipped, columns=["row", "item", "reason"])

    def open_cache(self) -> ShardedCache:
        return ShardedCache.open_existing(self.cache_dir, read_only=True)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "ExtractionSummary":
        data = json.loads(text)
        data["computed_shards"] = {int(k): v for k, v in data["computed_shards"].items()}
        for key in ("seconds_per_rank", "extract_seconds_per_rank"):
            data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)

    def __str__(self) -> str:
        return (
            f"{self.n_items} items in {self.n_shards} shards on {self.processes} process(es): computed "
            f"{self.n_computed}, reused {self.n_reused}; {len(self.skipped)} unreadable item(s) skipped; "
            f"{self.wall_seconds:.1f} s"
        )


def _summarise(spec: ExtractionSpec, reports: list[dict], fingerprint: dict, items: list[str], began: float) -> ExtractionSummary:
    check = verify_cache(spec.cache_dir, fingerprint, items)
    check.raise_if_problems()
    return ExtractionSummary(
        spec.cache_dir, len(reports), check.n_items, check.n_shards,
        {r["rank"]: r["computed_shards"] for r in reports}, check.arrays, check.skipped,
        {r["rank"]: r["seconds"] for r in reports}, {r["rank"]: r["extract_seconds"] for r in reports},
        time.perf_counter() - began, fingerprint,
    )


# ---------------------------------------------------------------------- entry points
def extract(spec: ExtractionSpec, processes: int = 1, progress: bool = True, timeout_s: float | None = None) -> ExtractionSummary:
    """Fill ``spec``'s cache on ``processes`` processes (1: in this process, e.g. a notebook).

    This is what the notebooks call, with ``processes`` = their ``extraction_processes``
    parameter. ``processes > 1`` launches torchrun on this machine via
    :func:`run_distributed_extraction`; for several machines run the documented
    ``torchrun`` command on each (docs/DISTRIBUTED.md).
    """
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ParameterError(f"processes (extraction_processes) must be a positive int, got {processes!r}.")
    if processes > 1:
        return run_distributed_extraction(processes, spec, timeout_s=timeout_s, echo=progress)
    began = time.perf_counter()
    report, fingerprint, items = run_extraction(spec, progress=progress)
    return _summarise(spec, [asdict(report)], fingerprint, items, began)


def fill_cache(
    kind: str, items: Sequence[str | os.PathLike], cache_dir: str | os.PathLike, dataset_id: str, processes: int,
    timeout_s: float | None = None, progress: bool = True, **spec_fields: Any,
) -> ExtractionSummary:
    """Fill, on ``processes`` processes, the cache that a notebook's in-process call then reads.

    ``items`` are the exact rows the notebook passes to ``classifier_outputs`` /
    ``features.image_features`` (image paths) or ``features.text_features`` (texts), and
    ``dataset_id`` / ``cache_dir`` / model settings the same values: the fingerprints then
    match, so the notebook's own call finds the cache complete and only reads it. Other
    :class:`ExtractionSpec` fields (``classifier``, ``weights``, ``batch_size``,
    ``shard_size``, ``device``...) go in ``spec_fields``.
    """
    items = [str(item) for item in items]
    if not items:
        raise ParameterError(f"fill_cache({kind!r}): no items to extract.")
    listing = Path(tempfile.mkdtemp(prefix="zsl_fill_cache_"))
    if kind == "text_features":
        texts_file = listing / "texts.jsonl"
        texts_file.write_text("".join(json.dumps(t) + "\n" for t in items), encoding="utf-8")
        spec = ExtractionSpec(kind, str(cache_dir), texts_file=str(texts_file), dataset_id=dataset_id, **spec_fields)
    else:
        file_list = listing / "files.txt"
        file_list.write_text("".join(os.path.abspath(item) + "\n" for item in items), encoding="utf-8")
        root = os.path.commonpath([os.path.abspath(item) for item in items])
        root = root if os.path.isdir(root) else os.path.dirname(root)
        spec = ExtractionSpec(kind, str(cache_dir), images_root=root, file_list=str(file_list),
                              dataset_id=dataset_id, **spec_fields)
    try:
        return extract(spec, processes, progress, timeout_s)
    finally:
        shutil.rmtree(listing, ignore_errors=True)


def run_distributed_extraction(
    nproc: int,
    spec: ExtractionSpec,
    timeout_s: float | None = None,
    echo: bool = False,
    run_dir: str | os.PathLike | None = None,
    collective_timeout_s: float = DEFAULT_TIMEOUT_S,
) -> ExtractionSummary:
    """Launch ``torchrun --standalone --nproc_per_node nproc -m zsl_utils.scale.extract`` for ``spec``.

    Checks that the cache directory is writable first (no process is started otherwise).
    Raises :class:`~zsl_utils.scale.launch.DistributedRunError` with the failing rank's
    error if any rank fails; ``timeout_s`` bounds the whole run (None: no limit).
    """
    check_cache_dir_writable(spec.cache_dir)
    began = time.perf_counter()
    run_dir = Path(run_dir) if run_dir is not None else Path(tempfile.mkdtemp(prefix="zsl_dist_extract_"))
    summary_path = run_dir / "summary.json"
    summary_path.unlink(missing_ok=True)
    args = [*spec.to_args(), "--summary-json", str(summary_path), "--timeout-s", str(collective_timeout_s)]
    launch_torchrun("zsl_utils.scale.extract", args, nproc, run_dir, timeout_s, echo)
    summary = ExtractionSummary.from_json(summary_path.read_text())
    summary.wall_seconds = time.perf_counter() - began
    return summary


def distributed_main(spec: ExtractionSpec, timeout_s: float = DEFAULT_TIMEOUT_S,
                     summary_json: str | None = None, error_dir: str | None = None) -> ExtractionSummary | None:
    """Body of one torchrun worker: extract this rank's shards, wait for all, rank 0 verifies."""
    die_with_parent()
    with rank_failure_guard(error_dir):
        began = time.perf_counter()
        ctx = init_distributed(spec.device, timeout_s)
        report, fingerprint, items = run_extraction(spec, ctx, progress=ctx.is_main)
        barrier(ctx, timeout_s, "every rank finished its shards")
        reports = all_gather_objects(ctx, asdict(report))
        summary = None
        if ctx.is_main:
            summary = _summarise(spec, reports, fingerprint, items, began)
            summary.processes = ctx.world_size
            if summary_json:
                write_text_atomically(Path(summary_json), summary.to_json())
            print(summary, flush=True)
            if summary.skipped:
                print(summary.skipped_frame().to_string(index=False), flush=True)
        shutdown_distributed()
        return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        with rank_failure_guard(args.error_dir):  # a bad argument is reported like any rank error
            spec = spec_from_args(args)
        distributed_main(spec, args.timeout_s, args.summary_json, args.error_dir)
    except ZslError as error:  # a problem the user can fix: one readable message, no traceback
        print(f"zsl_utils.scale.extract, rank {os.environ.get('RANK', '0')}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
