"""Distributed extraction and DDP training: equivalence, resume after real kills, bad input.

Everything runs on CPU with the Gloo backend and real ``torchrun`` subprocesses. The
classifier is timm's tiny ``test_efficientnet`` (356 k parameters, 160 px) with seeded
random weights saved to a local file, loaded through the normal ``load_classifier``
path (``timm:<arch>`` + ``weights=``).
"""
from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image

from zsl_utils.cache import CacheError, CacheFullError, ShardedCache
from zsl_utils.checkpoint import (
    CheckpointError,
    StaleCheckpointError,
    capture_rng_state,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    restore_rng_state,
    save_checkpoint,
)
from zsl_utils.scale.extract import (
    CacheVerificationError,
    ExtractionSpec,
    extract,
    list_image_files,
    run_distributed_extraction,
    run_extraction,
    verify_cache,
)
from zsl_utils.scale.launch import (DistContext, DistributedRunError, read_rank_errors, torchrun_command,
                                    write_rank_error)
from zsl_utils.errors import StaleCacheError
from zsl_utils.huse.model import HuseArchitecture, HuseSplit
from zsl_utils.scale.ddp import (
    GlobalBatchDropout,
    RowSlice,
    run_distributed_training,
    train_huse_ddp,
    write_training_job,
)
from zsl_utils.huse.losses import LossWeights
from zsl_utils.huse.training import ResumableBatches, TrainConfig, train_huse

N_GOOD, SHARD_SIZE = 12, 2
BAD_FILES = {"img_03_corrupt.jpg": "truncated JPEG", "img_07_empty.png": "zero bytes", "img_10_notes.txt": "text"}


# ---------------------------------------------------------------------- fixtures
@pytest.fixture(scope="module")
def tiny_weights(tmp_path_factory) -> Path:
    import timm

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "test_efficientnet.pth"
    torch.save(timm.create_model("test_efficientnet").state_dict(), path)
    return path


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory) -> Path:
    """12 random-noise images (PNG and JPEG) plus a truncated JPEG, a zero-byte PNG and a text file."""
    folder = tmp_path_factory.mktemp("images")
    rng = np.random.default_rng(0)
    for i in range(N_GOOD):
        pixels = rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(folder / (f"img_{i:02d}.jpg" if i % 2 else f"img_{i:02d}.png"))
    (folder / "img_03_corrupt.jpg").write_bytes((folder / "img_03.jpg").read_bytes()[:60])
    (folder / "img_07_empty.png").write_bytes(b"")
    (folder / "img_10_notes.txt").write_text("this is not an image\n")
    return folder


def _spec(cache_dir, image_folder, tiny_weights, **overrides) -> ExtractionSpec:
    settings = dict(kind="probs", cache_dir=str(cache_dir), images_root=str(image_folder),
                    classifier="timm:test_efficientnet", weights=str(tiny_weights), dataset_id="tiny",
                    batch_size=2, shard_size=SHARD_SIZE, num_workers=0, device="cpu")
    return ExtractionSpec(**{**settings, **overrides})


@pytest.fixture(scope="module")
def reference(tmp_path_factory, image_folder, tiny_weights):
    """The cache built in this process (the notebooks' path), and its summary."""
    cache_dir = tmp_path_factory.mktemp("reference") / "probs"
    summary = extract(_spec(cache_dir, image_folder, tiny_weights), processes=1, progress=False)
    return cache_dir, summary


def _assert_same_cache(left: Path, right: Path) -> None:
    assert (left / "meta.json").read_text() == (right / "meta.json").read_text()
    a, b = ShardedCache.open_existing(left), ShardedCache.open_existing(right)
    assert a.is_complete() and b.is_complete()
    for shard in range(a.n_shards):
        x, y = a.read_shard(shard), b.read_shard(shard)
        assert sorted(x) == sorted(y)
        for key in x:
            assert x[key].dtype == y[key].dtype and np.array_equal(x[key], y[key]), (shard, key)


def _shard_files(cache_dir: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in cache_dir.glob("shard_*.npz")}


def _running(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _kill_agent_and_wait_for_workers(agent: subprocess.Popen, timeout_s: float = 20.0) -> list[int]:
    """SIGKILL the torchrun agent; its workers must die too (PR_SET_PDEATHSIG). Returns their pids."""
    workers = [child.pid for child in psutil.Process(agent.pid).children(recursive=True)]
    assert workers, "torchrun had not started its workers"
    agent.send_signal(signal.SIGKILL)
    agent.wait(timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and any(map(_running, workers)):
        time.sleep(0.1)
    alive = [pid for pid in workers if _running(pid)]
    for pid in alive:  # do not leak processes even when the assertion below fails
        os.kill(pid, signal.SIGKILL)
    assert not alive, f"workers {alive} outlived the killed torchrun agent"
    return workers


def _wait_for(predicate, process: subprocess.Popen, timeout_s: float = 90.0, what: str = "") -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if process.poll() is not None:
            pytest.fail(f"the job ended (rc={process.returncode}) before {what}")
        if time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


# ---------------------------------------------------------------------- extraction
def test_listing_keeps_non_images_in_sorted_order(image_folder):
    names = [Path(p).name for p in list_image_files(image_folder)]
    assert names == sorted(names) and len(names) == N_GOOD + len(BAD_FILES)
    assert set(BAD_FILES) <= set(names)
    assert [Path(p).name for p in list_image_files(image_folder, extensions=[".txt"])] == ["img_10_notes.txt"]


def test_bad_files_are_skipped_and_listed(reference, image_folder):
    cache_dir, summary = reference
    listed = {Path(item["item"]).name: item for item in summary.skipped}
    assert set(listed) == set(BAD_FILES)
    assert all(item["reason"] for item in listed.values())
    ok = ShardedCache.open_existing(cache_dir).load("ok")
    rows = sorted(item["row"] for item in summary.skipped)
    assert np.flatnonzero(~ok).tolist() == rows
    probs = ShardedCache.open_existing(cache_dir).load("probs").astype(np.float32)
    assert probs.shape == (N_GOOD + len(BAD_FILES), 1000)
    np.testing.assert_allclose(probs[ok].sum(axis=1), 1.0, atol=5e-3)  # float16 storage
    assert not probs[~ok].any()


def _in_process(kind, items, cache_dir, tiny_weights, **settings):
    """The notebooks' call, zsl_utils.extract.cached_outputs, with the settings of _spec."""
    from zsl_utils.extract import cached_outputs

    model = "timm:test_efficientnet" if kind != "text_features" else None
    weights = tiny_weights if kind != "text_features" else None
    settings = {"batch_size": 2, "shard_size": SHARD_SIZE, "device": "cpu", "progress": False, **settings}
    return cached_outputs(kind, items, model, cache_dir, dataset_id="tiny", weights=weights, **settings)


def test_in_process_cache_is_the_cache_of_cached_outputs(reference, tmp_path, monkeypatch, image_folder, tiny_weights):
    """Same fingerprint and bytes as extract.cached_outputs, which the notebooks call."""
    cache_dir, _ = reference
    paths = list_image_files(image_folder)
    fresh = _in_process("probs", paths, tmp_path / "co", tiny_weights)
    _assert_same_cache(cache_dir, fresh.cache.directory)
    # ... so the notebook's own call reads a cache we filled without recomputing anything.
    shutil.copytree(cache_dir, tmp_path / "ours")
    before = _shard_files(tmp_path / "ours")
    _in_process("probs", paths, tmp_path / "ours", tiny_weights, batch_size=64)
    assert _shard_files(tmp_path / "ours") == before
    # Without a cache_dir both name the same folder (extract.cache_folder).
    from zsl_utils import config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache_root")
    named = extract(ExtractionSpec(**{**vars(_spec(tmp_path, image_folder, tiny_weights)), "cache_dir": None}),
                    progress=False)
    assert Path(named.cache_dir) == _in_process("probs", paths, None, tiny_weights).cache.directory


def test_image_features_cache_is_the_cache_of_cached_image_features(tmp_path, image_folder, tiny_weights):
    """The HUSE notebook's feature cache and ours are one cache."""
    summary = extract(_spec(tmp_path / "ours", image_folder, tiny_weights, kind="image_features"), progress=False)
    theirs = _in_process("image_features", list_image_files(image_folder), tmp_path / "theirs", tiny_weights)
    _assert_same_cache(tmp_path / "ours", theirs.cache.directory)
    assert summary.arrays["features"] == [[256], "float32"] and len(summary.skipped) == len(BAD_FILES)


@pytest.mark.parametrize("kind", ["probs", "image_features"])
def test_a_rank_whose_files_are_all_unreadable_writes_its_shards_first(tmp_path, image_folder, tiny_weights, kind):
    """Rank 0 of 2 owns shard 0, whose two files are both unreadable, and runs before rank 1
    has written anything: its shard must still get the arrays of the in-process cache."""
    folder = tmp_path / "images"
    folder.mkdir()
    for bad in ("img_03_corrupt.jpg", "img_07_empty.png"):  # sorted first: rows 0-1 = shard 0
        shutil.copy(image_folder / bad, folder / f"a_{bad}")
    for good in ("img_00.png", "img_01.jpg"):
        shutil.copy(image_folder / good, folder / f"b_{good}")
    spec = _spec(tmp_path / "ranks", folder, tiny_weights, kind=kind)
    for rank in (0, 1):
        report, fingerprint, items = run_extraction(spec, DistContext(rank=rank, world_size=2), progress=False)
        assert report.computed_shards == [rank]
    assert verify_cache(spec.cache_dir, fingerprint, items).ok
    reference = _in_process(kind, list_image_files(folder), tmp_path / "in_process", tiny_weights)
    _assert_same_cache(reference.cache.directory, Path(spec.cache_dir))


@pytest.mark.slow  # loads the MiniLM sentence encoder (~10 s on 2 busy cores)
def test_text_features_cache_is_the_cache_of_cached_text_features(tmp_path):
    texts = ["a bowl of ramen", "chocolate cake\nwith berries", "", "fried rice", "apple pie"]
    (tmp_path / "texts.jsonl").write_text("\n".join(json.dumps(t) for t in texts) + "\n", encoding="utf-8")
    spec = ExtractionSpec("text_features", str(tmp_path / "ours"), texts_file=str(tmp_path / "texts.jsonl"),
                          dataset_id="tiny", batch_size=2, shard_size=3, device="cpu")
    summary = extract(spec, progress=False)
    theirs = _in_process("text_features", texts, tmp_path / "theirs", None, shard_size=3)
    _assert_same_cache(tmp_path / "ours", theirs.cache.directory)
    assert [item["row"] for item in summary.skipped] == [2]  # the empty text


def test_two_gloo_processes_build_the_single_process_cache(reference, tmp_path, image_folder, tiny_weights):
    cache_dir, single = reference
    summary = run_distributed_extraction(2, _spec(tmp_path / "probs", image_folder, tiny_weights), timeout_s=240)
    _assert_same_cache(cache_dir, tmp_path / "probs")
    assert summary.processes == 2
    assert summary.computed_shards == {0: [0, 2, 4, 6], 1: [1, 3, 5, 7]}  # shard s -> rank s % 2
    assert summary.skipped == single.skipped


def test_notebook_call_with_two_processes_builds_the_single_process_cache(reference, tmp_path, image_folder,
                                                                           tiny_weights):
    """The notebooks' route: cached_outputs(processes=2) runs the scale-out CLI as a subprocess."""
    cache_dir, single = reference
    paths = list_image_files(image_folder)
    outputs = _in_process("probs", paths, tmp_path / "probs", tiny_weights, processes=2, num_workers=0)
    _assert_same_cache(cache_dir, tmp_path / "probs")
    assert outputs.skipped.to_dict("records") == single.skipped


def test_killed_extraction_resumes_and_recomputes_nothing(reference, tmp_path, image_folder, tiny_weights):
    cache_dir = tmp_path / "probs"
    spec = _spec(cache_dir, image_folder, tiny_weights, debug_batch_delay_s=0.4)
    agent = subprocess.Popen(torchrun_command("zsl_utils.scale.extract", spec.to_args(), 2),
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: any(cache_dir.glob("shard_*.npz")), agent, what="the first shard")
    _kill_agent_and_wait_for_workers(agent)
    before = _shard_files(cache_dir)
    n_shards = ShardedCache.open_existing(cache_dir).n_shards
    assert 0 < len(before) < n_shards, f"kill was not mid-way: {len(before)} of {n_shards} shards"
    # Every shard file that exists is complete (atomic rename): readable, right row count.
    for name in before:
        shard = int(name[6:12])
        assert ShardedCache.open_existing(cache_dir).read_shard(shard)["ok"].shape == (SHARD_SIZE,)

    resumed = extract(_spec(cache_dir, image_folder, tiny_weights), processes=1, progress=False)
    missing_at_kill = sorted(set(range(n_shards)) - {int(n[6:12]) for n in before})
    assert resumed.computed_shards == {0: missing_at_kill}
    after = _shard_files(cache_dir)
    assert {name: after[name] for name in before} == before  # untouched: same inode, same mtime
    assert not list(cache_dir.glob(".*.tmp-*"))  # the killed writers' temporaries were cleaned
    _assert_same_cache(reference[0], cache_dir)


def test_a_failing_rank_fails_the_run_with_its_error(tmp_path, image_folder, tiny_weights):
    spec = _spec(tmp_path / "probs", image_folder, tiny_weights, debug_fail_rank=1, debug_fail_after_batches=1)
    began = time.monotonic()
    with pytest.raises(DistributedRunError, match=r"rank 1 .*injected fault on rank 1") as caught:
        run_distributed_extraction(2, spec, timeout_s=240)
    assert time.monotonic() - began < 200  # torchrun tore down rank 0 instead of letting it wait
    assert caught.value.rank_errors[0]["rank"] == 1
    assert caught.value.rank_errors[0]["type"] == "RuntimeError"


_READ_ONLY_PROBE = """
import json, sys, time
from zsl_utils.scale.extract import ExtractionSpec, extract, run_distributed_extraction
spec = ExtractionSpec(**json.loads(sys.argv[1]))
results = []
for call in (lambda: run_distributed_extraction(2, spec), lambda: extract(spec, progress=False)):
    began = time.monotonic()
    try:
        call()
        results.append(["no error", "", 0.0])
    except Exception as error:
        results.append([type(error).__name__, str(error), time.monotonic() - began])
print(json.dumps(results))
"""


def _drop_root_privileges() -> list[str]:
    """A command prefix under which root obeys permission bits (no CAP_DAC_OVERRIDE), or [] for users."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0:
        return []
    setpriv = shutil.which("setpriv")
    if setpriv is None:
        pytest.skip("running as root without setpriv(1): root ignores permission bits")
    return [setpriv, "--inh-caps=-all", "--bounding-set=-dac_override,-dac_read_search,-fowner"]


def test_read_only_cache_dir_fails_before_any_process_starts(tmp_path, image_folder, tiny_weights):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    spec = _spec(locked / "probs", image_folder, tiny_weights)
    settings = {k: v for k, v in vars(spec).items()}
    command = [*_drop_root_privileges(), sys.executable, "-c", _READ_ONLY_PROBE, json.dumps(settings)]
    try:
        output = subprocess.run(command, capture_output=True, text=True, timeout=120, check=True).stdout
    finally:
        locked.chmod(0o755)
    (launcher_type, launcher_message, launcher_s), (in_process_type, in_process_message, _) = json.loads(output)
    assert launcher_type == in_process_type == "CacheError"
    assert "locked/probs is not writable (Permission denied)" in launcher_message
    assert "Nothing was computed" in launcher_message and in_process_message == launcher_message
    assert launcher_s < 1.0  # refused before torchrun or any model was started
    assert not (locked / "probs").exists()


def test_uncreatable_cache_dir_fails_before_any_process_starts(tmp_path, image_folder, tiny_weights):
    blocker = tmp_path / "a_file"
    blocker.write_text("a file where the cache folder's parent should be")
    began = time.monotonic()
    with pytest.raises(CacheError, match=r"a_file/probs is not writable"):
        run_distributed_extraction(2, _spec(blocker / "probs", image_folder, tiny_weights))
    assert time.monotonic() - began < 2.0


def test_full_disk_is_refused_before_work_and_reported_during_it(tmp_path, monkeypatch, image_folder, tiny_weights):
    cache_dir = tmp_path / "probs"
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=10_000))
    # 15 rows x 1000 float16 probabilities = 30 kB > 10 kB free.
    with pytest.raises(CacheFullError, match=r"10\.0 kB free.*Nothing was computed"):
        extract(_spec(cache_dir, image_folder, tiny_weights), progress=False)
    assert not list(cache_dir.glob("shard_*.npz"))
    monkeypatch.setattr(shutil, "disk_usage", real_usage)

    def disk_full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(np, "savez", disk_full)  # the disk fills up at the write call, as on a real volume
    with pytest.raises(CacheFullError, match="filled up while writing shard.*completed shards are kept"):
        extract(_spec(cache_dir, image_folder, tiny_weights), progress=False)


def test_verification_catches_missing_corrupt_and_inconsistent_shards(reference, tmp_path):
    source, _ = reference
    cache_dir = tmp_path / "copy"
    shutil.copytree(source, cache_dir)
    fingerprint = ShardedCache.open_existing(cache_dir).fingerprint
    assert verify_cache(cache_dir, fingerprint).ok
    (cache_dir / "shard_000003.npz").unlink()
    corrupt = cache_dir / "shard_000001.npz"
    corrupt.write_bytes(corrupt.read_bytes()[:100])
    cache = ShardedCache(cache_dir, fingerprint, 15, SHARD_SIZE)
    arrays = cache.read_shard(5)
    arrays["ok"][:] = False  # claims skipped rows that are not recorded as skipped
    cache.write_shard(5, unaligned={k: arrays.pop(k) for k in ("skipped_rows", "skipped_reasons")}, **arrays)
    check = verify_cache(cache_dir, {**fingerprint, "dataset_id": "other"})
    text = "\n".join(check.problems)
    assert "shards missing: [3]" in text
    assert "shard 1:" in text and "unreadable" in text
    assert "shard 5: ok mask is False at rows [10, 11]" in text
    assert "fingerprint differs: dataset_id" in text
    with pytest.raises(CacheVerificationError, match="4 problem"):
        check.raise_if_problems()


def test_stale_cache_is_refused(reference, tmp_path, image_folder, tiny_weights):
    cache_dir = tmp_path / "copy"
    shutil.copytree(reference[0], cache_dir)
    with pytest.raises(StaleCacheError, match="dataset_id: cached='tiny' requested='renamed'"):
        extract(_spec(cache_dir, image_folder, tiny_weights, dataset_id="renamed"), progress=False)


def test_rank_errors_are_reported_earliest_first(tmp_path):
    for rank, message in ((0, "consequence"), (1, "root cause")):
        try:
            raise RuntimeError(message)
        except RuntimeError as error:
            write_rank_error(tmp_path, rank, error)
        time.sleep(0.01)
    (tmp_path / "rank_0.error.json").touch()  # touching must not reorder: the time is inside
    records = read_rank_errors(tmp_path)
    assert [r["rank"] for r in records] == [0, 1]
    assert records[1]["message"] == "root cause" and "RuntimeError" in records[1]["traceback"]


# ---------------------------------------------------------------------- training
def _toy_problem(n_items: int = 40, n_classes: int = 5):
    generator = torch.Generator().manual_seed(1)
    split = HuseSplit(torch.randn(n_items, 12, generator=generator), torch.randn(n_items, 7, generator=generator),
                      torch.randint(0, n_classes, (n_items,), generator=generator))
    distance = torch.rand(n_classes, n_classes, generator=generator)
    distance = ((distance + distance.T) / 2).fill_diagonal_(0.0)
    architecture = HuseArchitecture(embedding_dim=8, hidden_dim=16, image_hidden_layers=3, text_hidden_layers=2,
                                    dropout=0.2)
    # Batch 15 of 40 items: uneven rank slices (8 + 7) and a short last batch (10) per epoch.
    config = TrainConfig(num_steps=12, batch_size=15, learning_rate=1e-2, log_every=5, seed=3)
    return split, distance, LossWeights(margin=1.0), config, architecture


def test_global_batch_dropout_reproduces_nn_dropout_and_slices_it():
    x = torch.randn(9, 6)
    torch.manual_seed(5)
    expected = torch.nn.functional.dropout(x, 0.3, training=True)
    pieces = []
    for start, stop in ((0, 5), (5, 9)):  # two ranks, each drawing the whole batch's mask
        torch.manual_seed(5)
        pieces.append(GlobalBatchDropout(0.3, RowSlice(9, start, stop))(x[start:stop]))
    assert torch.equal(torch.cat(pieces), expected)
    assert torch.equal(GlobalBatchDropout(0.3, RowSlice(9, 0, 9)).eval()(x), x)


def test_resumable_batches_are_seeded_epoch_permutations_and_restore_mid_epoch():
    generator = torch.Generator().manual_seed(3)
    reference = iter([part for _ in range(4) for part in torch.randperm(40, generator=generator).split(15)])
    stream = ResumableBatches(40, 15, seed=3)
    for _ in range(4):  # into the second epoch
        assert torch.equal(next(reference), stream.next())
    saved = stream.state_dict()
    expected = [next(reference) for _ in range(5)]
    restored = ResumableBatches(40, 15, seed=99)
    restored.load_state_dict(saved)
    assert all(torch.equal(e, restored.next()) for e in expected)


def test_one_process_ddp_trainer_is_bitwise_train_huse():
    split, distance, weights, config, architecture = _toy_problem()
    expected = train_huse(split, distance, weights, config, architecture, progress=False)
    got = train_huse_ddp(split, distance, weights, config, architecture, progress=False)
    for key, value in expected.model.state_dict().items():
        assert torch.equal(value, got.model.state_dict()[key]), key
    assert expected.history.equals(got.history)
    assert str(expected.model) == str(got.model)  # plain nn.Dropout again, same module tree


def test_interrupted_training_resumes_bitwise_from_the_last_checkpoint(tmp_path):
    split, distance, weights, config, architecture = _toy_problem()
    uninterrupted = train_huse_ddp(split, distance, weights, config, architecture, progress=False)

    def interrupt_at_7(step):
        if step == 7:
            raise KeyboardInterrupt("simulated Ctrl-C")

    with pytest.raises(KeyboardInterrupt):
        train_huse_ddp(split, distance, weights, config, architecture, checkpoint_dir=tmp_path, checkpoint_every=4,
                       progress=False, step_callback=interrupt_at_7)
    assert [step for step, _ in list_checkpoints(tmp_path)] == [4]
    resumed = train_huse_ddp(split, distance, weights, config, architecture, checkpoint_dir=tmp_path,
                             checkpoint_every=4, progress=False)
    assert resumed.extras["resumed_from_step"] == 4
    for key, value in uninterrupted.model.state_dict().items():
        assert torch.equal(value, resumed.model.state_dict()[key]), key
    assert uninterrupted.history.equals(resumed.history)
    with pytest.raises(StaleCheckpointError, match="loss.margin"):
        train_huse_ddp(split, distance, LossWeights(margin=0.5), config, architecture, checkpoint_dir=tmp_path,
                       progress=False)


def test_checkpoints_are_atomic_pruned_and_fingerprinted(tmp_path):
    fingerprint = {"model": "a", "size": (2, 3)}
    for step in (5, 10, 15):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, fingerprint, keep_last=2)
    (tmp_path / ".step_000000020.pt.tmp-host-1-x").write_bytes(b"half a checkpoint")
    assert [s for s, _ in list_checkpoints(tmp_path)] == [10, 15]
    step, state = load_checkpoint(latest_checkpoint(tmp_path), {"size": [2, 3], "model": "a"})
    assert step == 15 and state["w"].tolist() == [15.0, 15.0]
    with pytest.raises(StaleCheckpointError, match="model: cached='a' requested='b'"):
        load_checkpoint(latest_checkpoint(tmp_path), {"model": "b", "size": (2, 3)})
    latest_checkpoint(tmp_path).write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="unreadable.*delete it"):
        load_checkpoint(latest_checkpoint(tmp_path))
    assert latest_checkpoint(tmp_path / "absent") is None


def test_rng_state_round_trip():
    import random

    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    state = capture_rng_state()
    first = (torch.rand(3), np.random.rand(3), random.random())
    restore_rng_state(state)
    second = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(first[0], second[0]) and np.array_equal(first[1], second[1]) and first[2] == second[2]


def test_two_process_ddp_training_killed_resumed_equals_single_process(tmp_path):
    split, distance, weights, config, architecture = _toy_problem()
    single = train_huse(split, distance, weights, config, architecture, progress=False)
    job = write_training_job(tmp_path / "job", split, distance, weights, config, architecture)
    command = torchrun_command("zsl_utils.scale.ddp", ["--job-dir", job, "--checkpoint-every", "4", "--device", "cpu",
                                                      "--debug-step-delay-s", "0.3"], 2)
    agent = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    _wait_for(lambda: latest_checkpoint(job / "checkpoints") is not None, agent, what="the first checkpoint")
    _kill_agent_and_wait_for_workers(agent)
    killed_at = list_checkpoints(job / "checkpoints")[-1][0]
    assert 4 <= killed_at < config.num_steps

    trained = run_distributed_training(2, job, checkpoint_every=4, device="cpu", timeout_s=240)
    assert trained.extras["world_size"] == 2 and trained.extras["resumed_from_step"] == killed_at
    # Only summation order differs from one process: tolerance documented in docs/DISTRIBUTED.md.
    for key, value in single.model.state_dict().items():
        torch.testing.assert_close(trained.model.state_dict()[key], value, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(trained.history.to_numpy(), single.history.to_numpy(), rtol=1e-4, atol=1e-5)
