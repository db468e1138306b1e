"""Tests for zsl_utils.cache: atomic shards, resume, stale-cache refusal."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from zsl_utils.cache import CacheError, ShardedCache, read_meta
from zsl_utils.errors import StaleCacheError

FP = {"model": "toy", "weights": "abc123", "dataset": "ten-items", "size": (224, 224)}


def _rows(start: int, stop: int) -> np.ndarray:
    return np.arange(start, stop, dtype=np.float32)[:, None] * np.ones((1, 3), np.float32)


def _fill(cache: ShardedCache, shards=None) -> None:
    for shard in cache.missing_shards() if shards is None else shards:
        start, stop = cache.shard_bounds(shard)
        cache.write_shard(shard, x=_rows(start, stop), ok=np.ones(stop - start, bool))


def test_geometry_and_roundtrip(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, n_items=10, shard_size=4)
    assert cache.n_shards == 3
    assert [cache.shard_bounds(s) for s in range(3)] == [(0, 4), (4, 8), (8, 10)]
    assert cache.missing_shards() == [0, 1, 2] and not cache.is_complete()
    _fill(cache)
    assert cache.is_complete()
    np.testing.assert_array_equal(cache.load("x"), _rows(0, 10))
    starts = [start for _, start, _ in cache.iter_shards(["x"])]
    assert starts == [0, 4, 8]
    meta = read_meta(tmp_path / "c")
    assert meta["n_items"] == 10 and meta["shard_size"] == 4 and meta["fingerprint"]["size"] == [224, 224]


def test_reopen_same_fingerprint_keeps_shards(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    _fill(cache, [0, 2])
    again = ShardedCache(tmp_path / "c", dict(FP, size=[224, 224]), 10, 4)  # tuple == list once stored
    assert again.missing_shards() == [1]


@pytest.mark.parametrize(
    "change, key",
    [({"weights": "zzz"}, "weights"), ({"dataset": "other"}, "dataset"), ({"extra": 1}, "extra")],
)
def test_stale_fingerprint_refused_with_diff(tmp_path, change, key):
    ShardedCache(tmp_path / "c", FP, 10, 4)
    with pytest.raises(StaleCacheError) as info:
        ShardedCache(tmp_path / "c", {**FP, **change}, 10, 4)
    message = str(info.value)
    assert str(tmp_path / "c") in message and key in message and "Delete" in message


def test_stale_geometry_refused(tmp_path):
    ShardedCache(tmp_path / "c", FP, 10, 4)
    with pytest.raises(StaleCacheError, match="n_items: cached=10 requested=11"):
        ShardedCache(tmp_path / "c", FP, 11, 4)
    with pytest.raises(StaleCacheError, match="shard_size"):
        ShardedCache(tmp_path / "c", FP, 10, 5)


def test_write_shard_validates_length_and_dtype(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    with pytest.raises(CacheError, match="first axis must be the shard's 2 rows"):
        cache.write_shard(2, x=np.zeros((4, 3)))
    with pytest.raises(CacheError, match="dtype object"):
        cache.write_shard(0, x=np.array([None] * 4, dtype=object))
    with pytest.raises(CacheError, match="out of range"):
        cache.write_shard(3, x=np.zeros(1))
    assert cache.missing_shards() == [0, 1, 2]


def test_failed_write_leaves_no_partial_shard(tmp_path, monkeypatch):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt  # an interrupt in the middle of serialising

    monkeypatch.setattr(np, "savez", crash)
    with pytest.raises(KeyboardInterrupt):
        cache.write_shard(0, x=_rows(0, 4))
    assert cache.missing_shards() == [0, 1, 2]
    assert [p.name for p in (tmp_path / "c").iterdir()] == ["meta.json"]


def test_killed_writer_leaves_only_ignored_temp_file_which_is_cleaned(tmp_path):
    """A process SIGKILLed mid-write (after the temp file exists) must not publish a shard."""
    directory = tmp_path / "c"
    ShardedCache(directory, FP, 10, 4)
    script = textwrap.dedent(
        f"""
        import os, signal, numpy as np
        from zsl_utils.cache import ShardedCache
        cache = ShardedCache({str(directory)!r}, {FP!r}, 10, 4)
        def die(handle, **arrays):
            handle.write(b"PK partial bytes")
            handle.flush()
            os.kill(os.getpid(), signal.SIGKILL)
        np.savez = die
        cache.write_shard(1, x=np.zeros((4, 3), np.float32))
        """
    )
    env = dict(os.environ, PYTHONPATH=str(_repo_root()))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True)
    assert result.returncode == -9, result.stderr.decode()
    leftovers = [p for p in directory.iterdir() if p.name != "meta.json"]
    assert len(leftovers) == 1 and leftovers[0].name.startswith(".shard_000001.npz.tmp-")
    reopened = ShardedCache(directory, FP, 10, 4)  # the writer is dead -> its temp file goes
    assert reopened.missing_shards() == [0, 1, 2]
    assert [p.name for p in directory.iterdir()] == ["meta.json"]


def test_live_writers_temp_file_is_kept(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    mine = tmp_path / "c" / f".shard_000000.npz.tmp-{socket.gethostname()}-{os.getpid()}-deadbeef"
    mine.write_bytes(b"in progress")
    assert cache.clean_temporary_files() == []
    assert mine.exists()


def test_resume_computes_only_missing_shards(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    _fill(cache, [1])
    written = []
    for shard in cache.missing_shards():
        written.append(shard)
        start, stop = cache.shard_bounds(shard)
        cache.write_shard(shard, x=_rows(start, stop), ok=np.ones(stop - start, bool))
    assert written == [0, 2]
    np.testing.assert_array_equal(cache.load("x"), _rows(0, 10))


def test_ranks_split_missing_shards_disjointly(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 100, 7)  # 15 shards
    _fill(cache, [0, 5])
    parts = [cache.shards_for_rank(r, 3) for r in range(3)]
    flat = sorted(s for part in parts for s in part)
    assert flat == cache.missing_shards() and len(flat) == len(set(flat)) == 13


def test_incomplete_cache_cannot_be_streamed(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    _fill(cache, [0])
    with pytest.raises(CacheError, match="2 of 3 shards missing"):
        cache.load("x")


def test_corrupt_shard_gets_actionable_message(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    _fill(cache)
    cache.shard_path(1).write_bytes(b"not a zip")
    with pytest.raises(CacheError, match="delete that file"):
        cache.read_shard(1)


def test_read_only_directory_refused_up_front(tmp_path):
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    directory = tmp_path / "ro"
    directory.mkdir()
    directory.chmod(0o555)
    try:
        with pytest.raises(CacheError, match="not writable"):
            ShardedCache(directory, FP, 10, 4)
    finally:
        directory.chmod(0o755)


def test_unwritable_location_refused_up_front(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("I am a file, not a folder")
    with pytest.raises(CacheError, match=r"file/cache is not writable \(Not a directory\); pass a writable cache_dir"):
        ShardedCache(blocker / "cache", FP, 10, 4)


def test_read_only_open_of_finished_cache(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    _fill(cache)
    reader = ShardedCache.open_existing(tmp_path / "c")
    assert reader.fingerprint == json.loads(json.dumps(FP))
    np.testing.assert_array_equal(reader.load("x"), _rows(0, 10))
    with pytest.raises(CacheError, match="read_only"):
        reader.write_shard(0, x=_rows(0, 4))


def _repo_root():
    from pathlib import Path

    return Path(__file__).resolve().parents[1]


def test_unaligned_arrays_are_stored_and_concatenated(tmp_path):
    cache = ShardedCache(tmp_path / "c", FP, 10, 4)
    for shard, bad in [(0, [1]), (1, []), (2, [8, 9])]:
        start, stop = cache.shard_bounds(shard)
        cache.write_shard(
            shard,
            x=_rows(start, stop),
            unaligned={"skipped_rows": np.asarray(bad, np.int64)},
        )
    np.testing.assert_array_equal(cache.load("skipped_rows"), [1, 8, 9])
    with pytest.raises(CacheError, match="both aligned and unaligned"):
        cache.write_shard(0, x=_rows(0, 4), unaligned={"x": np.zeros(2)})
