"""Scale-out extraction: ``torchrun --nproc_per_node 4 -m zsl_utils.scale.extract --kind probs --images-root D``.

Encoders, fingerprints, dtypes and folder names are :mod:`zsl_utils.extract`'s, so a kind fills the very cache
``cached_outputs`` reads (same bytes; tested). Shard ``s`` belongs to rank ``s % world_size`` and batches never cross
shards, so bytes do not depend on who computed them. Ranks first agree on their listing's hash; after a barrier rank 0
re-reads every shard (:func:`verify_cache`). Rerunning computes exactly the missing shards. On CUDA each rank drives
the GPU of its ``LOCAL_RANK``; ``--autocast auto`` means bfloat16 there."""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import pandas as pd

from zsl_utils import config
from zsl_utils.atomic import write_text_atomically
from zsl_utils.cache import (CacheError, ShardedCache, check_writable_directory, fingerprint_differences,
                             normalise_fingerprint, read_meta)
from zsl_utils.device import COMPUTE_DTYPES, pick_device
from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.extract import (DECODERS, KINDS, STORAGE_DTYPES, UNALIGNED_ARRAYS, cache_folder, extract_to_cache,
                               make_encoder)
from zsl_utils.scale.launch import (DEFAULT_TIMEOUT_S, DistContext, agree_on, all_gather_objects, barrier,
                                    default_num_workers, die_with_parent, init_distributed, launch_torchrun,
                                    rank_failure_guard, run_cli, shutdown_distributed)

AUTOCAST_CHOICES = ("auto", "bfloat16", "float16", "none")  # auto: bfloat16 on CUDA


class CacheVerificationError(CacheError):
    """A finished cache failed the final consistency check."""


@dataclass
class ExtractionSpec:
    """One extraction: what to encode, with what, into which cache (default: ``extract.cache_folder``). Whatever
    changes the cache is in its fingerprint; ``debug_*`` fields are the fault tests' aids."""

    kind: str  # "probs", "image_features" or "text_features" (MiniLM)
    cache_dir: str | None = None
    images_root: str | None = None  # image kinds: folder to list (recursively, sorted)
    file_list: str | None = None  # optional text file, one path per line (relative to images_root)
    extensions: tuple[str, ...] | None = None  # e.g. (".png",) or ".png,.jpg"; None = every non-hidden file
    texts_file: str | None = None  # text_features: one text per line (.txt) or JSON string per line (.jsonl)
    classifier: str = "efficientnet_lite0"  # any name zsl_utils.classifiers.load_classifier accepts
    weights: str | None = None  # local checkpoint overriding the classifier's default weights
    dataset_id: str | None = None  # default: the folder / file name
    batch_size: int = 64
    shard_size: int = 1024
    dtype: str | None = None  # storage dtype; default float16 for probs, float32 for features
    autocast: str = "auto"
    compute_dtype: str = "float32"  # "float64": CPU results that do not depend on the instruction set
    decode: str = "pil"  # images: one of extract.DECODERS ("torchvision" decodes JPEGs on the GPU)
    num_workers: int | None = None  # DataLoader workers per rank; None = from the machine
    device: str = "auto"
    debug_batch_delay_s: float = 0.0
    debug_fail_rank: int | None = None  # this rank raises after debug_fail_after_batches batches
    debug_fail_after_batches: int = 0

    def __post_init__(self) -> None:  # normalise, then raise ParameterError naming the first bad field
        self.cache_dir = None if self.cache_dir is None else str(self.cache_dir)
        self.device = str(self.device)
        if isinstance(self.extensions, str):  # the CLI's comma-separated suffixes
            self.extensions = tuple(e.strip() for e in self.extensions.split(",") if e.strip()) or None
        if self.extensions is not None:
            self.extensions = tuple(e.lower() if e.startswith(".") else f".{e.lower()}" for e in self.extensions)
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
        if self.dtype is not None and self.dtype not in STORAGE_DTYPES:
            raise ParameterError(f"dtype={self.dtype!r}; choose one of {sorted(STORAGE_DTYPES)}.")
        if self.decode not in DECODERS:
            raise ParameterError(f"decode={self.decode!r}; choose one of {DECODERS}.")
        if self.autocast not in AUTOCAST_CHOICES:
            raise ParameterError(f"autocast={self.autocast!r}; choose one of {AUTOCAST_CHOICES}.")
        if self.num_workers is not None and (not isinstance(self.num_workers, int) or self.num_workers < 0):
            raise ParameterError(f"num_workers must be None (from the machine) or an int >= 0, "
                                 f"got {self.num_workers!r}.")

    def to_args(self) -> list[str]:
        """Command-line arguments of :func:`main` that reproduce this spec."""
        args: list[str] = []
        for name in (f.name for f in fields(self) if getattr(self, f.name) is not None):
            value = getattr(self, name)
            args += ["--" + name.replace("_", "-"), ",".join(value) if isinstance(value, tuple) else str(value)]
        return args


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m zsl_utils.scale.extract",
                                     description="Fill a sharded cache with classifier probabilities or features, on "
                                     "1..N processes. Rerunning the same command resumes: only missing shards are "
                                     "computed.")
    add = parser.add_argument
    add("--kind", required=True, choices=KINDS)
    add("--cache-dir", help="cache folder (created; reused on resume); default: named by zsl_utils.extract")
    add("--images-root", help="image folder, listed recursively in sorted order")
    add("--file-list", help="text file of image paths (one per line, relative to --images-root)")
    add("--extensions", help="comma-separated suffixes to keep, e.g. .png,.jpg (default: all files)")
    add("--texts-file", help="text_features: one text per line, or one JSON string per line (.jsonl)")
    add("--classifier", default="efficientnet_lite0", help="efficientnet_lite0 | timm:<arch> | torchvision:<arch>")
    add("--weights", help="local weights file for the classifier")
    add("--dataset-id", help="name recorded in the cache fingerprint (default: folder name)")
    add("--batch-size", type=int, default=64)
    add("--shard-size", type=int, default=1024, help="rows per shard file")
    add("--dtype", choices=sorted(STORAGE_DTYPES), help="storage dtype (default float16 probs, float32 features)")
    add("--autocast", default="auto", choices=AUTOCAST_CHOICES, help="auto: bfloat16 on CUDA; CPU stays float32")
    add("--compute-dtype", default="float32", choices=sorted(COMPUTE_DTYPES), help="float64: same bytes on any CPU")
    add("--decode", default="pil", choices=DECODERS, help="pil: exact; pil_draft, torchvision: faster (GPU decode)")
    add("--num-workers", type=int, help="DataLoader workers per rank (default: from the CPU count)")
    add("--device", default="auto", help="auto | cuda | cpu (under torchrun: GPU = LOCAL_RANK)")
    add("--processes", type=int, default=1, help="outside torchrun: start torchrun with this many processes here")
    add("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S, help="limit for collectives and the final barrier")
    add("--summary-json", help="rank 0 writes the run summary here")
    add("--error-dir", help="each failing rank writes its error here (set by the Python launcher)")
    add("--debug-batch-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    add("--debug-fail-rank", type=int, help=argparse.SUPPRESS)
    add("--debug-fail-after-batches", type=int, default=0, help=argparse.SUPPRESS)
    return parser


def list_image_files(root: str | os.PathLike, file_list: str | os.PathLike | None = None,
                     extensions: Sequence[str] | None = None) -> list[str]:
    """The dataset's rows: ``file_list``'s lines in order (relative to ``root`` or absolute), else every non-hidden file
    under ``root`` by relative path (only ``extensions``, if given); non-images stay, to be skipped *and listed*."""
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
            found += [os.path.relpath(os.path.join(folder, name), root) for name in files
                      if not name.startswith(".") and (suffixes is None or name.lower().endswith(suffixes))]
        paths = [str(root / rel) for rel in sorted(found, key=lambda p: Path(p).as_posix())]
    if not paths:
        with_extensions = f" with extensions {list(extensions)}" if extensions else ""
        raise DataLayoutError(f"no files to extract under {root}{with_extensions}"
                              + (f" listed in {file_list}" if file_list else "") + "; check the path.")
    return paths


def read_texts(path: str | os.PathLike) -> list[str]:
    """The texts of a ``.jsonl`` file (one JSON string per line: texts may hold newlines), else one per UTF-8 line."""
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


def check_cache_dir_writable(cache_dir: str | os.PathLike | None) -> Path:
    """Create the cache folder (default: the cache root) and prove it writable, before any expensive step."""
    advice = "pass a writable --cache-dir (cache_dir=...) or set ZSL_CACHE_DIR. Nothing was computed."
    return check_writable_directory(cache_dir or config.CACHE_DIR, advice)


class _DebugEncoder:
    """The core encoder plus the fault tests' aids: a delay after each batch, a fault on one rank."""

    def __init__(self, encoder: Any, rank: int, spec: ExtractionSpec) -> None:
        self.encoder, self.rank, self.spec, self.batches = encoder, rank, spec, 0

    def __call__(self, values: Any) -> dict[str, np.ndarray]:
        if self.spec.debug_fail_rank == self.rank and self.batches >= self.spec.debug_fail_after_batches:
            raise RuntimeError(f"injected fault on rank {self.rank} after {self.batches} batches (debug_fail_rank)")
        result = self.encoder(values)
        self.batches += 1
        time.sleep(self.spec.debug_batch_delay_s)
        return result


@dataclass
class RankReport:
    """What one rank did: the shards it computed, how many rows, how long it took."""

    rank: int
    computed_shards: list[int]
    rows: int
    seconds: float  # whole rank: listing, model loading, extraction
    extract_seconds: float  # extract_to_cache only (images/s = rows / extract_seconds)


def run_extraction(spec: ExtractionSpec, ctx: DistContext | None = None,
                   progress: bool = True) -> tuple[RankReport, dict, list[str]]:
    """This rank's missing shards of ``spec`` (all outside torchrun); names ``spec.cache_dir`` when unset.
    Returns the rank's report, the cache fingerprint and the cache's items (paths or texts)."""
    ctx = ctx or DistContext(device=pick_device(spec.device))
    began, text = time.perf_counter(), spec.kind == "text_features"
    items = read_texts(spec.texts_file) if text else list_image_files(spec.images_root, spec.file_list, spec.extensions)
    agree_on(ctx, hashlib.sha256("\n".join(items).encode("utf-8", "surrogateescape")).hexdigest(),
             f"the listing of {spec.images_root or spec.texts_file}")
    check_cache_dir_writable(spec.cache_dir)  # before loading a model
    autocast = {"auto": "bfloat16", "none": None}.get(spec.autocast, spec.autocast)  # float64: no autocast
    autocast = None if spec.compute_dtype == "float64" else autocast
    encoder = make_encoder(spec.kind, "minilm" if text else spec.classifier, None if text else spec.weights,
                           ctx.device, spec.dtype, None if text else autocast, spec.compute_dtype,
                           "pil" if text else spec.decode)
    dataset_id = spec.dataset_id or (Path(spec.texts_file).stem if text else Path(spec.images_root).resolve().name)
    fingerprint = encoder.fingerprint(items, dataset_id)
    if spec.cache_dir is None:  # every rank names the same folder: same fingerprint
        spec.cache_dir = str(cache_folder(spec.kind, encoder.model_name, dataset_id, fingerprint, spec.shard_size))
    cache = ShardedCache(spec.cache_dir, fingerprint, len(items), spec.shard_size)
    rows, layout = encoder.rows(items), encoder.output_layout()
    cache.check_free_space(1 + sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in layout.values()))
    num_workers = spec.num_workers if spec.num_workers is not None else default_num_workers(ctx.local_world_size)
    extract_began = time.perf_counter()
    report = extract_to_cache(rows, encoder.load_item, _DebugEncoder(encoder, ctx.rank, spec), cache, spec.batch_size,
                              num_workers, f"rank {ctx.rank}: {encoder.model_name} {spec.kind} on {dataset_id}",
                              cache.shards_for_rank(ctx.rank, ctx.world_size), progress, encoder.pin_memory, layout)
    done = sum(stop - start for start, stop in map(cache.shard_bounds, report.computed_shards))
    now = time.perf_counter()
    return RankReport(ctx.rank, report.computed_shards, done, now - began, now - extract_began), fingerprint, items


@dataclass
class CacheCheck:
    """Result of :func:`verify_cache`: the cache's layout, its skipped rows and any problems."""

    directory: str
    n_items: int
    n_shards: int
    arrays: dict[str, list]  # name -> [trailing shape, dtype] of row-aligned arrays
    skipped: list[dict]  # {"row", "item", "reason"}
    problems: list[str]

    @property
    def ok(self) -> bool:
        return not self.problems

    def raise_if_problems(self) -> None:
        if self.problems:
            raise CacheVerificationError(f"cache {self.directory} failed verification ({len(self.problems)} "
                                         "problem(s)):\n  " + "\n  ".join(self.problems[:20])
                                         + "\nDelete the listed shard files and rerun to recompute them.")


def verify_cache(cache_dir: str | os.PathLike, expected_fingerprint: dict | None = None,
                 items: Sequence[str] | None = None) -> CacheCheck:
    """Re-read every shard: the expected fingerprint, every shard present and readable with its row count,
    the same array names, shapes and dtypes everywhere, ``ok`` False exactly at the skipped rows."""
    meta = read_meta(cache_dir)
    problems: list[str] = []
    if expected_fingerprint is not None:
        differences = fingerprint_differences(meta.get("fingerprint", {}), normalise_fingerprint(expected_fingerprint))
        problems += [f"fingerprint differs: {line}" for line in differences]
    cache = ShardedCache.open_existing(cache_dir, read_only=True)
    if missing := cache.missing_shards():
        problems.append(f"{len(missing)} of {cache.n_shards} shards missing: {missing[:10]}")
    layout: dict[str, tuple] | None = None
    skipped: list[dict] = []
    for shard in (s for s in range(cache.n_shards) if s not in missing):
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
    return CacheCheck(str(cache.directory), cache.n_items, cache.n_shards,
                      {k: [list(v[0]), v[1]] for k, v in (layout or {}).items()}, skipped, problems)


def _check_shard(cache: ShardedCache, shard: int, arrays: dict, items: Sequence[str] | None):
    start, stop = cache.shard_bounds(shard)
    aligned = {k: v for k, v in arrays.items() if k not in UNALIGNED_ARRAYS}
    problems = [f"array {k!r} has {v.shape[0] if v.ndim else 0} rows, expected {stop - start}"
                for k, v in aligned.items() if v.ndim == 0 or v.shape[0] != stop - start]
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

    def skipped_frame(self) -> pd.DataFrame:
        """Skipped rows (unreadable files) with their reasons."""
        return pd.DataFrame(self.skipped, columns=["row", "item", "reason"])

    @classmethod
    def from_json(cls, text: str) -> "ExtractionSummary":
        data = json.loads(text)
        for key in ("computed_shards", "seconds_per_rank", "extract_seconds_per_rank"):
            data[key] = {int(k): v for k, v in data[key].items()}
        return cls(**data)

    def __str__(self) -> str:
        computed = sum(len(s) for s in self.computed_shards.values())
        return (f"{self.n_items} items in {self.n_shards} shards on {self.processes} process(es): computed "
                f"{computed}, reused {self.n_shards - computed}; {len(self.skipped)} unreadable item(s) skipped; "
                f"{self.wall_seconds:.1f} s")


def _summarise(spec: ExtractionSpec, reports: list[dict], fingerprint: dict, items: list[str],
               began: float) -> ExtractionSummary:
    check = verify_cache(spec.cache_dir, fingerprint, items)
    check.raise_if_problems()
    by_rank = {key: {r["rank"]: r[key] for r in reports} for key in ("computed_shards", "seconds", "extract_seconds")}
    return ExtractionSummary(spec.cache_dir, len(reports), check.n_items, check.n_shards, by_rank["computed_shards"],
                             check.arrays, check.skipped, by_rank["seconds"], by_rank["extract_seconds"],
                             time.perf_counter() - began, fingerprint)


def extract(spec: ExtractionSpec, processes: int = 1, progress: bool = True,
            timeout_s: float | None = None) -> ExtractionSummary:
    """Fill ``spec``'s cache in this process (``processes=1``) or with torchrun on this machine."""
    if not isinstance(processes, int) or isinstance(processes, bool) or processes < 1:
        raise ParameterError(f"processes (extraction_processes) must be a positive int, got {processes!r}.")
    if processes > 1:
        return run_distributed_extraction(processes, spec, timeout_s=timeout_s, echo=progress)
    began = time.perf_counter()
    report, fingerprint, items = run_extraction(spec, progress=progress)
    return _summarise(spec, [asdict(report)], fingerprint, items, began)


def run_distributed_extraction(nproc: int, spec: ExtractionSpec, timeout_s: float | None = None, echo: bool = False,
                               collective_timeout_s: float = DEFAULT_TIMEOUT_S) -> ExtractionSummary:
    """Run this module under single-node torchrun once the cache folder proved writable; raises DistributedRunError."""
    check_cache_dir_writable(spec.cache_dir)
    began = time.perf_counter()
    summary_path = Path(tempfile.mkdtemp(prefix="zsl_dist_extract_")) / "summary.json"
    args = [*spec.to_args(), "--summary-json", str(summary_path), "--timeout-s", str(collective_timeout_s)]
    launch_torchrun("zsl_utils.scale.extract", args, nproc, summary_path.parent, timeout_s, echo)
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
            summary = _summarise(spec, reports, fingerprint, items, began)  # processes = len(reports) = world size
            if summary_json:
                write_text_atomically(Path(summary_json), json.dumps(asdict(summary), indent=2))
            print(summary, flush=True)
            if summary.skipped:
                print(summary.skipped_frame().to_string(index=False), flush=True)
        shutdown_distributed()
        return summary


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)

    def work() -> None:
        with rank_failure_guard(args.error_dir):  # a bad argument is reported like any rank error
            spec = ExtractionSpec(**{f.name: getattr(args, f.name) for f in fields(ExtractionSpec)})
        if args.processes > 1 and "RANK" not in os.environ:  # what cached_outputs(processes=N) runs
            print(run_distributed_extraction(args.processes, spec, collective_timeout_s=args.timeout_s), flush=True)
        else:
            distributed_main(spec, args.timeout_s, args.summary_json, args.error_dir)

    return run_cli("zsl_utils.scale.extract", work)


if __name__ == "__main__":
    sys.exit(main())
