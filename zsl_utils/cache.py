"""Sharded, atomic, resumable array caches, fingerprinted in ``meta.json`` (another one: ``StaleCacheError``)."""
from __future__ import annotations

import errno
import json
import os
import shutil
import socket
import time
import zipfile
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from zsl_utils.atomic import TMP_MARKER, temporary_sibling, write_atomically
from zsl_utils.errors import StaleCacheError, ZslError

FORMAT_VERSION = 1
META_NAME = "meta.json"
_SHARD_PREFIX = "shard_"
_SHARD_SUFFIX = ".npz"
_FOREIGN_TMP_MAX_AGE_S = 24 * 3600  # another host's temporary file (pid not checkable) unchanged this long: writer dead


class CacheError(ZslError):
    """A cache directory cannot be used (not writable, corrupt, wrong arguments)."""


class CacheFullError(CacheError):
    """The cache's disk has (or had) too little free space for the shards still to write."""


def _size(n_bytes: float) -> str:  # 1.5 kB, 12.0 GB
    return next(f"{n_bytes / 10**p:.1f} {unit}" for p, unit in ((9, "GB"), (6, "MB"), (3, "kB"), (0, "B"))
                if n_bytes >= 10**p or not p)


def normalise_fingerprint(fingerprint: Mapping[str, Any]) -> dict[str, Any]:
    """``fingerprint`` as it reads back from JSON (tuples -> lists, sorted keys), for comparisons."""
    if not isinstance(fingerprint, Mapping):
        raise CacheError(f"cache fingerprint must be a dict of JSON-serialisable values, got "
                         f"{type(fingerprint).__name__}; pass e.g. {{'model': name, 'dataset': dataset_id}}.")
    try:
        return json.loads(json.dumps(dict(fingerprint), sort_keys=True))
    except (TypeError, ValueError) as error:
        raise CacheError(f"cache fingerprint is not JSON-serialisable ({error}); convert paths and "
                         f"arrays to str / lists / numbers before building the cache.") from error


def fingerprint_differences(cached: Mapping[str, Any], requested: Mapping[str, Any]) -> list[str]:
    """Human-readable ``key: cached=... requested=...`` lines for keys whose values differ."""
    pairs = ((k, cached.get(k, "<absent>"), requested.get(k, "<absent>")) for k in sorted({*cached, *requested}))
    return [f"{key}: cached={_short(old)} requested={_short(new)}" for key, old, new in pairs if old != new]


def _short(value: Any, limit: int = 80) -> str:
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def check_writable_directory(directory: str | os.PathLike, advice: str) -> Path:
    """Create ``directory`` and prove a file can be written there, before any expensive step."""
    directory = Path(directory).expanduser()
    try:
        directory.mkdir(parents=True, exist_ok=True)
        probe = temporary_sibling(directory / "write_probe")
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as error:
        why = error.strerror or error
        raise CacheError(f"cache directory {directory} is not writable ({why}); {advice}") from error
    return directory


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class ShardedCache:
    """Rows ``0..n_items-1`` of named arrays in atomic shards; ``read_only``: a finished cache, writes refused."""

    def __init__(self, directory: str | os.PathLike, fingerprint: Mapping[str, Any], n_items: int, shard_size: int,
                 read_only: bool = False) -> None:
        if int(n_items) < 0:
            raise CacheError(f"n_items must be >= 0, got {n_items} for cache {directory}.")
        if int(shard_size) < 1:
            raise CacheError(f"shard_size must be >= 1, got {shard_size} for cache {directory}.")
        self.directory = Path(directory).expanduser()
        self.fingerprint = normalise_fingerprint(fingerprint)
        self.n_items, self.shard_size, self.read_only = int(n_items), int(shard_size), read_only
        has_meta = (self.directory / META_NAME).is_file()
        if read_only and not has_meta:
            raise CacheError(f"no cache at {self.directory} (missing {META_NAME}); build it first "
                             f"or open it with read_only=False.")
        try:
            if not read_only:
                check_writable_directory(self.directory, "pass a writable cache_dir, set ZSL_CACHE_DIR, or open a "
                                         "finished cache with read_only=True.")
        except CacheError:  # a finished cache on read-only storage: reading is all it needs
            if not has_meta or not self.is_complete():
                raise
            self.read_only = True
        self._check_or_write_meta()
        if not self.read_only:
            self.clean_temporary_files()

    @classmethod
    def open_existing(cls, directory: str | os.PathLike, read_only: bool = True) -> "ShardedCache":
        """Open a cache using the fingerprint and sizes stored in its ``meta.json``."""
        meta = read_meta(directory)
        return cls(directory, meta["fingerprint"], meta["n_items"], meta["shard_size"], read_only)

    def _meta(self) -> dict[str, Any]:
        return {"format_version": FORMAT_VERSION, "fingerprint": self.fingerprint, "n_items": self.n_items,
                "shard_size": self.shard_size}

    def _check_or_write_meta(self) -> None:
        if (self.directory / META_NAME).exists():
            self._check_meta(read_meta(self.directory))
        elif orphans := sorted(self.directory.glob(f"{_SHARD_PREFIX}*{_SHARD_SUFFIX}")):
            raise StaleCacheError(f"{self.directory} holds {len(orphans)} shard file(s) (e.g. {orphans[0].name}) but "
                                  f"no {META_NAME}, so nothing says which model, dtype or items made them; delete "
                                  "those shards (or the folder) to recompute, or pass another cache directory.")
        elif not self.read_only:  # several ranks may race here; each writes the same content atomically
            payload = json.dumps(self._meta(), indent=2, sort_keys=True).encode()
            write_atomically(self.directory / META_NAME, lambda handle: handle.write(payload))

    def _check_meta(self, stored: Mapping[str, Any]) -> None:
        requested = self._meta()
        lines = fingerprint_differences(stored.get("fingerprint", {}), requested["fingerprint"])
        lines += [f"{key}: cached={stored.get(key)} requested={requested[key]}"
                  for key in ("n_items", "shard_size", "format_version") if stored.get(key) != requested[key]]
        if lines:
            raise StaleCacheError(f"the cache at {self.directory} was made by a different model, preprocessing or "
                                  "dataset:\n  " + "\n  ".join(lines) + "\nDelete that folder to recompute, or pass a "
                                  "different cache directory to keep both.")

    @property
    def n_shards(self) -> int:
        """Number of shards (0 for an empty cache)."""
        return -(-self.n_items // self.shard_size)

    def shard_bounds(self, shard: int) -> tuple[int, int]:
        """Row range ``[start, stop)`` covered by ``shard``."""
        self._check_shard_index(shard)
        start = shard * self.shard_size
        return start, min(start + self.shard_size, self.n_items)

    def shard_path(self, shard: int) -> Path:
        """Final path of ``shard`` (which may not exist yet)."""
        self._check_shard_index(shard)
        return self.directory / f"{_SHARD_PREFIX}{shard:06d}{_SHARD_SUFFIX}"

    def _check_shard_index(self, shard: int) -> None:
        if not 0 <= int(shard) < self.n_shards:
            raise CacheError(f"shard index {shard} out of range for cache {self.directory} "
                             f"({self.n_shards} shards of {self.shard_size} rows, {self.n_items} rows).")

    def has_shard(self, shard: int) -> bool:
        return self.shard_path(shard).is_file()

    def missing_shards(self) -> list[int]:
        """Indices of shards not yet written, in increasing order."""
        present = {p.name for p in self.directory.glob(f"{_SHARD_PREFIX}*{_SHARD_SUFFIX}")}
        return [s for s in range(self.n_shards) if self.shard_path(s).name not in present]

    def shards_for_rank(self, rank: int, world_size: int) -> list[int]:
        """Missing shards assigned to ``rank`` of ``world_size`` writers (round robin)."""
        if world_size < 1 or not 0 <= rank < world_size:
            raise CacheError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}.")
        return [s for s in self.missing_shards() if s % world_size == rank]

    def is_complete(self) -> bool:
        return not self.missing_shards()

    def check_free_space(self, row_bytes: int, shards: Sequence[int] | None = None) -> None:
        """:class:`CacheFullError` unless the disk has room for the missing ``shards`` (default: all), up front."""
        todo = set(self.missing_shards()) & set(range(self.n_shards) if shards is None else shards)
        # 8 kB a shard: the zip and .npy headers of its arrays, and file-system block rounding
        needed = sum((stop - start) * row_bytes + 8192 for start, stop in map(self.shard_bounds, todo))
        if needed > (free := shutil.disk_usage(self.directory).free):
            raise CacheFullError(f"cache directory {self.directory} has {_size(free)} free but the {len(todo)} shards "
                                 f"still to write need about {_size(needed)}; free space or pass another cache "
                                 "directory. Nothing was computed.")

    def write_shard(self, shard: int, /, *, unaligned: Mapping[str, np.ndarray] | None = None,
                    **arrays: np.ndarray) -> Path:
        """Atomically write ``shard``: row-aligned ``arrays``, and ``unaligned`` ones of any length (skipped rows)."""
        if self.read_only:
            raise CacheError(f"cache {self.directory} was opened read_only; reopen it writable to add shards.")
        start, stop = self.shard_bounds(shard)
        if not arrays:
            raise CacheError(f"write_shard({shard}) got no row-aligned arrays for cache {self.directory}.")
        unaligned = dict(unaligned or {})
        if both := sorted(set(unaligned) & set(arrays)):
            raise CacheError(f"write_shard({shard}): names {both} given both aligned and unaligned.")
        payload = {k: np.asarray(v) for k, v in {**arrays, **unaligned}.items()}
        for key, value in payload.items():
            if key in arrays and (value.ndim == 0 or value.shape[0] != stop - start):
                raise CacheError(f"array {key!r} for shard {shard} of {self.directory} has shape {value.shape}; its "
                                 f"first axis must be the shard's {stop - start} rows ({start}..{stop - 1}).")
            if value.dtype == object:
                raise CacheError(f"array {key!r} has dtype object, which needs pickling; store numbers or "
                                 f"fixed-width strings (np.asarray(list_of_str)) instead.")
        try:
            return write_atomically(self.shard_path(shard), lambda handle: np.savez(handle, **payload))
        except OSError as error:
            if error.errno not in (errno.ENOSPC, errno.EDQUOT):
                raise
            raise CacheFullError(f"the disk of cache directory {self.directory} filled up while writing shard {shard} "
                                 f"({error.strerror}); free space and rerun: completed shards are kept, the "
                                 "interrupted one is recomputed.") from error

    def clean_temporary_files(self) -> list[Path]:
        """Delete temporary files of dead writers (this host: pid gone; another host: unchanged for a day)."""
        removed, host = [], socket.gethostname()
        for path in self.directory.glob(f".*{TMP_MARKER}*"):
            writer = path.name.split(TMP_MARKER, 1)[1]  # "<host>-<pid>-<random>"
            writer_host, _, pid_text = writer.rpartition("-")[0].rpartition("-")
            try:
                if writer_host == host:
                    stale = not _pid_alive(int(pid_text))
                else:
                    stale = time.time() - path.stat().st_mtime > _FOREIGN_TMP_MAX_AGE_S
                if stale:
                    path.unlink()
                    removed.append(path)
            except (OSError, ValueError):
                continue  # vanished meanwhile, or not one of ours
        return removed

    def read_shard(self, shard: int, keys: Sequence[str] | None = None) -> dict[str, np.ndarray]:
        """Arrays of ``shard`` (only ``keys`` if given), fully read into memory."""
        path = self.shard_path(shard)
        if not path.is_file():
            raise CacheError(f"shard {shard} of {self.directory} has not been computed yet "
                             f"({len(self.missing_shards())} of {self.n_shards} missing); run the extraction first.")
        try:
            with np.load(path, allow_pickle=False) as data:
                wanted = list(data.files) if keys is None else list(keys)
                absent = [k for k in wanted if k not in data.files]
                if absent:
                    raise CacheError(f"shard {path} has no array(s) {absent}; it holds {sorted(data.files)}.")
                return {key: data[key] for key in wanted}
        except (zipfile.BadZipFile, OSError, ValueError, EOFError) as error:
            message = f"shard {path} is unreadable ({error}); delete that file and rerun to recompute it."
            raise CacheError(message) from error

    def iter_shards(self, keys: Sequence[str] | None = None) -> Iterator[tuple[int, int, dict[str, np.ndarray]]]:
        """Yield ``(shard, start_row, arrays)`` for every shard in order, one in memory at a time."""
        missing = self.missing_shards()
        if missing:
            raise CacheError(f"cache {self.directory} is incomplete: {len(missing)} of {self.n_shards} shards "
                             f"missing (first: {missing[:5]}); finish the extraction before reading it.")
        for shard in range(self.n_shards):
            yield shard, self.shard_bounds(shard)[0], self.read_shard(shard, keys)

    def load(self, key: str) -> np.ndarray:
        """All rows of array ``key`` concatenated (loads everything: prefer ``iter_shards``)."""
        parts = [arrays[key] for _, _, arrays in self.iter_shards([key])]
        if not parts:
            raise CacheError(f"cache {self.directory} holds no rows (n_items=0).")
        return np.concatenate(parts, axis=0)

    def __repr__(self) -> str:
        done = self.n_shards - len(self.missing_shards())
        return f"ShardedCache({str(self.directory)!r}, {done}/{self.n_shards} shards, n_items={self.n_items})"


def read_meta(directory: str | os.PathLike) -> dict[str, Any]:
    """The parsed ``meta.json`` of a cache directory, with a clear error if absent/corrupt."""
    path = Path(directory).expanduser() / META_NAME
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as error:
        raise CacheError(f"no cache at {path.parent} (missing {META_NAME}).") from error
    except (OSError, ValueError) as error:
        message = f"{path} is unreadable ({error}); delete the folder {path.parent} to rebuild the cache."
        raise CacheError(message) from error
