"""Tests for zsl_utils.extract: skipping bad images, resume, the classifier softmax cache."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from zsl_utils import extract as extract_module
from zsl_utils.data.images import load_image_rgb
from zsl_utils.cache import ShardedCache, normalise_fingerprint, read_meta
from zsl_utils.errors import ParameterError, StaleCacheError
from zsl_utils.extract import (ExtractionError, ProbsEncoder, cached_outputs, dataset_fingerprint, extract_to_cache,
                               image_loader)


def _png(path, value, alpha=255, size=(6, 4)):
    Image.new("RGBA", size, (value, value, value, alpha)).save(path)
    return path


@pytest.fixture
def image_folder(tmp_path):
    """Ten items: 7 good PNGs (grey value 10*i) and 3 bad files at rows 2, 5, 6."""
    folder = tmp_path / "imgs"
    folder.mkdir()
    paths = []
    for i in range(10):
        path = folder / f"img{i}.png"
        if i == 2:
            path.write_bytes(b"")  # zero-byte
        elif i == 5:
            path.write_text("this is not an image")
        elif i == 6:
            _png(folder / "full.png", 60)
            path.write_bytes((folder / "full.png").read_bytes()[:40])  # truncated
            (folder / "full.png").unlink()
        else:
            _png(path, 10 * i)
        paths.append(str(path))
    return paths


def _grey_level(image: Image.Image) -> float:
    return float(np.asarray(image, np.float32).mean())


class _CountingEncoder:
    def __init__(self, fail_on_call: int | None = None):
        self.calls, self.fail_on_call, self.n_values = 0, fail_on_call, 0

    def __call__(self, values):
        self.calls += 1
        if self.fail_on_call is not None and self.calls == self.fail_on_call:
            raise KeyboardInterrupt("simulated interrupt")
        self.n_values += len(values)
        return {"grey": np.asarray(values, np.float32), "twice": np.asarray(values, np.float32)[:, None] * [1, 2]}


def test_alpha_is_composited_on_white(tmp_path):
    transparent = load_image_rgb(_png(tmp_path / "t.png", 0, alpha=0))
    assert transparent.mode == "RGB" and _grey_level(transparent) == 255.0
    half = load_image_rgb(_png(tmp_path / "h.png", 0, alpha=128))
    # 0 * 128/255 + 255 * (1 - 128/255) = 127 (PIL rounds to 127)
    assert np.asarray(half)[0, 0].tolist() == [127, 127, 127]
    opaque = load_image_rgb(_png(tmp_path / "o.png", 40))
    assert _grey_level(opaque) == 40.0


def test_bad_images_are_skipped_counted_and_listed(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    encoder = _CountingEncoder()
    report = extract_to_cache(image_folder, image_loader(_grey_level), encoder, cache, batch_size=3, progress=False)
    assert len(report.skipped) == 3
    assert report.skipped["row"].tolist() == [2, 5, 6]
    assert report.skipped["item"][0].endswith("img2.png")
    assert report.skipped["reason"].all()
    assert "UnidentifiedImageError" in report.skipped["reason"][1]
    ok = cache.load("ok")
    assert ok.tolist() == [i not in (2, 5, 6) for i in range(10)]
    grey = cache.load("grey")
    np.testing.assert_allclose(grey, [0 if i in (2, 5, 6) else 10 * i for i in range(10)])
    np.testing.assert_allclose(cache.load("twice")[:, 1], 2 * grey)
    assert encoder.n_values == 7
    assert report.skipped.shape == (3, 3)


def test_resume_after_interrupt_computes_only_missing_shards(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        # batch_size=4 -> call 1 fills shard 0, call 2 (shard 1) is interrupted
        extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(2), cache, 4, progress=False)
    assert cache.missing_shards() == [1, 2]
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []

    loaded = []

    def tracking_loader(path):
        loaded.append(path)
        return image_loader(_grey_level)(path)

    report = extract_to_cache(image_folder, tracking_loader, _CountingEncoder(), cache, 4, progress=False)
    assert loaded == image_folder[4:]  # shard 0 never reloaded
    assert report.computed_shards == [1, 2] and report.reused_shards == 1
    assert report.skipped["row"].tolist() == [2, 5, 6]  # row 2 comes from the reused shard
    assert cache.is_complete()


def test_explicit_shard_subset_for_one_rank(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    mine = cache.shards_for_rank(1, 2)
    report = extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), cache, 4, shards=mine, progress=False)
    assert mine == [1] and report.computed_shards == [1] and cache.missing_shards() == [0, 2]


def test_shard_with_only_bad_images_is_still_written(tmp_path, image_folder):
    items = image_folder[5:7] + image_folder[7:9]  # shard 0 = two bad files, shard 1 = good
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 4, shard_size=2)
    report = extract_to_cache(items, image_loader(_grey_level), _CountingEncoder(), cache, 2, progress=False)
    assert cache.is_complete()
    np.testing.assert_allclose(cache.load("grey"), [0, 0, 70, 80])
    assert len(report.skipped) == 2


def test_nothing_loadable_is_an_error(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 2, shard_size=2)
    with pytest.raises(ExtractionError, match="none of the 2 items"):
        extract_to_cache(image_folder[5:7], image_loader(_grey_level), _CountingEncoder(), cache, 2, progress=False)


def test_encoder_output_shape_checked(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 10, shard_size=4)
    with pytest.raises(ExtractionError, match="first axis must be the batch size"):
        extract_to_cache(image_folder, image_loader(_grey_level), lambda v: {"x": np.zeros(1)}, cache, 4,
                         progress=False)


def test_worker_processes_give_same_result(tmp_path, image_folder):
    serial = ShardedCache(tmp_path / "a", {"t": 1}, 10, shard_size=4)
    extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), serial, 3, progress=False)
    parallel = ShardedCache(tmp_path / "b", {"t": 1}, 10, shard_size=4)
    report = extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), parallel, 3, num_workers=2, progress=False)
    np.testing.assert_array_equal(serial.load("grey"), parallel.load("grey"))
    assert len(report.skipped) == 3


def test_dataset_fingerprint_tracks_order_and_size_not_location(tmp_path, image_folder):
    base = dataset_fingerprint(image_folder)
    assert dataset_fingerprint(image_folder[::-1]) != base
    moved = tmp_path / "moved"
    shutil.copytree(tmp_path / "imgs", moved)
    assert dataset_fingerprint([str(moved / p.split("/")[-1]) for p in image_folder]) == base
    _png(image_folder[0], 0, size=(30, 30))  # same name, different bytes
    assert dataset_fingerprint(image_folder) != base


# ---------------------------------------------------------------------- classifier cache
class _TinyNet(torch.nn.Module):
    """Logits = W @ mean colour of the image; 3 classes."""

    def __init__(self):
        super().__init__()
        self.linear = torch.nn.Linear(3, 3)
        torch.nn.init.eye_(self.linear.weight)
        torch.nn.init.zeros_(self.linear.bias)
        self.forward_calls = 0

    def forward(self, batch):
        self.forward_calls += 1
        return self.linear(batch.mean(dim=(2, 3)) * 4)


def _to_tensor(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, np.float32) / 255.0).permute(2, 0, 1)


@dataclass
class _FakeClassifier:
    model: torch.nn.Module = field(default_factory=_TinyNet)
    preprocess: object = _to_tensor
    wnids: list = field(default_factory=lambda: ["n00000001", "n00000002", "n00000003"])
    name: str = "tiny"
    fingerprint: dict = field(default_factory=lambda: {"arch": "tiny", "weights": "eye"})
    device: torch.device = torch.device("cpu")


def _probs(classifier, items, cache_dir, **settings):
    settings = {"shard_size": 4, "progress": False, **settings}
    return cached_outputs("probs", items, classifier, cache_dir, dataset_id="toy", **settings)


def test_probs_softmax_cached_and_reused(tmp_path, image_folder):
    classifier = _FakeClassifier()
    outputs = _probs(classifier, image_folder, tmp_path / "c", batch_size=4, dtype="float32")
    probs, ok = outputs.load(), outputs.ok
    assert probs.shape == (10, 3) and probs.dtype == np.float32
    grey = np.array([10 * i / 255 for i in range(10)], np.float32)
    expected = torch.softmax(torch.from_numpy(np.repeat(grey[:, None] * 4, 3, axis=1)), 1).numpy()
    np.testing.assert_allclose(probs[ok], expected[ok], rtol=1e-6)  # equal logits -> 1/3 each
    assert np.all(probs[~ok] == 0)
    assert outputs.skipped["row"].tolist() == [2, 5, 6]
    calls = classifier.model.forward_calls
    again = _probs(classifier, image_folder, tmp_path / "c", dtype="float32")
    assert classifier.model.forward_calls == calls and again.cache.is_complete()


def test_probs_float16_rows_sum_to_one(tmp_path, image_folder):
    classifier = _FakeClassifier()
    with torch.no_grad():
        classifier.model.linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, -3]]))
    outputs = _probs(classifier, image_folder, tmp_path / "c")
    probs = outputs.load()
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs[outputs.ok].astype(np.float32).sum(1), 1.0, atol=2e-3)


def test_probs_cache_refuses_other_model_or_dataset(tmp_path, image_folder):
    _probs(_FakeClassifier(), image_folder, tmp_path / "c")
    other = _FakeClassifier(fingerprint={"arch": "tiny", "weights": "other"})
    with pytest.raises(StaleCacheError, match="classifier"):
        _probs(other, image_folder, tmp_path / "c")
    with pytest.raises(StaleCacheError, match="dataset"):
        _probs(_FakeClassifier(), image_folder[:9] + image_folder[:1], tmp_path / "c")
    with pytest.raises(ParameterError, match="no items"):
        _probs(_FakeClassifier(), [], tmp_path / "empty")
    with pytest.raises(ParameterError, match="extraction_processes"):
        _probs(_FakeClassifier(), image_folder, tmp_path / "c", processes=0)


def test_encoder_fingerprint_is_what_cached_outputs_stores(tmp_path, image_folder):
    classifier = _FakeClassifier()
    outputs = _probs(classifier, image_folder, tmp_path / "c", dtype="float32")
    stored = read_meta(outputs.cache.directory)["fingerprint"]
    assert stored == normalise_fingerprint(ProbsEncoder(classifier, "float32").fingerprint(image_folder, "toy"))
    assert stored["n_classes"] == 3 and stored["dataset"] == dataset_fingerprint(image_folder)
    assert stored != normalise_fingerprint(ProbsEncoder(classifier, "float16").fingerprint(image_folder, "toy"))
    # The fields of the fingerprint that caches made before the encoders were merged carry.
    assert sorted(stored) == ["alpha_background", "autocast_dtype", "classifier", "dataset", "dataset_id", "dtype",
                              "kind", "n_classes"]
    with pytest.raises(ParameterError, match="autocast_dtype"):
        ProbsEncoder(classifier, "float16", autocast_dtype="int8")
    with pytest.raises(ParameterError, match="dtype must be one of"):
        ProbsEncoder(classifier, "int8")
    # Autocast runs on CUDA only, so on the CPU it is not recorded: the numbers are float32.
    on_cpu = ProbsEncoder(classifier, autocast_dtype="bfloat16")
    assert on_cpu.fingerprint(image_folder, "toy")["autocast_dtype"] is None
    on_gpu = ProbsEncoder(_FakeClassifier(device=torch.device("cuda")), autocast_dtype="bfloat16")
    assert on_gpu.fingerprint(image_folder, "toy")["autocast_dtype"] == "bfloat16"


def test_cached_outputs_computes_only_the_requested_shards(tmp_path, image_folder):
    classifier = _FakeClassifier()
    outputs = _probs(classifier, image_folder, tmp_path / "c", shards=[1])
    assert outputs.cache.missing_shards() == [0, 2] and classifier.model.forward_calls == 1  # 4 rows, batch 64
    rest = _probs(classifier, image_folder, tmp_path / "c", shards=[0, 2])
    whole = _probs(classifier, image_folder, tmp_path / "whole")
    np.testing.assert_array_equal(rest.load(), whole.load())


# ---------------------------------------------------------------------- pinned memory
class _RecordingDataLoader(torch.utils.data.DataLoader):
    """Records the ``pin_memory`` it was asked for, then loads without pinning (no GPU in CI)."""

    requested: list = []

    def __init__(self, *args, pin_memory=False, **kwargs):
        type(self).requested.append(pin_memory)
        super().__init__(*args, pin_memory=False, **kwargs)


@pytest.mark.parametrize(("flag", "cuda", "expected"), [(False, True, False), (True, False, False), (True, True, True)])
def test_pin_memory_reaches_the_dataloader_only_with_cuda(tmp_path, image_folder, monkeypatch, flag, cuda, expected):
    monkeypatch.setattr(_RecordingDataLoader, "requested", [])
    monkeypatch.setattr(torch.utils.data, "DataLoader", _RecordingDataLoader)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), cache, 3, pin_memory=flag,
                     progress=False)
    assert _RecordingDataLoader.requested == [expected]


def _grey_tensor(image: Image.Image) -> torch.Tensor:
    return torch.full((2,), _grey_level(image))


class _StackRecordingEncoder:
    def __init__(self):
        self.stacked = []

    def __call__(self, values):  # a list, or one tensor when the loader stacked the batch
        self.stacked.append(values if isinstance(values, torch.Tensor) else None)
        return {"grey": (values if isinstance(values, torch.Tensor) else torch.stack(values))[:, 0]}


@pytest.mark.parametrize("num_workers", [0, 1])
def test_pin_memory_stacks_each_batch_once_with_the_same_result(tmp_path, image_folder, num_workers):
    plain, stacked = _StackRecordingEncoder(), _StackRecordingEncoder()
    caches = [ShardedCache(tmp_path / name, {"t": 1}, 10, shard_size=4) for name in ("a", "b")]
    extract_to_cache(image_folder, image_loader(_grey_tensor), plain, caches[0], 3, progress=False)
    extract_to_cache(image_folder, image_loader(_grey_tensor), stacked, caches[1], 3, num_workers=num_workers,
                     pin_memory=True, progress=False)
    # Shards of 4, batches of 3: rows [0 1 2] [3] [4 5 6] [7] [8 9]; rows 2, 5, 6 are unreadable.
    assert plain.stacked == [None] * 5
    assert [tuple(s.shape) for s in stacked.stacked] == [(2, 2), (1, 2), (1, 2), (1, 2), (2, 2)]
    np.testing.assert_array_equal(caches[0].load("grey"), caches[1].load("grey"))
    np.testing.assert_array_equal(caches[0].load("ok"), caches[1].load("ok"))


def test_dataloader_pinning_pins_the_stacked_batch(monkeypatch):
    from torch.utils.data._utils.pin_memory import pin_memory as dataloader_pin

    pinned_shapes = []

    def fake_pin(tensor, *args, **kwargs):  # CPU-only torch cannot pin: record and copy instead
        pinned_shapes.append(tuple(tensor.shape))
        return tensor.clone()

    monkeypatch.setattr(torch.Tensor, "pin_memory", fake_pin)
    items = [torch.ones(3), None, torch.zeros(3)]
    batch = extract_module._Batch(items, lambda item: item, True, [0, 1, 2])
    batch = dataloader_pin(batch)
    assert pinned_shapes == [(2, 3)]  # one page-locked copy per batch, not per image
    values = batch.values
    assert batch.rows == [0, 2] and batch.skipped == [(1, "load_item returned None")] and values.shape == (2, 3)
    assert values.tolist() == [[1, 1, 1], [0, 0, 0]]


def test_image_kinds_pin_on_cuda_only(tmp_path, image_folder, monkeypatch):
    requested = []

    def recording_extract(items, load_item, encoder, cache, *args, pin_memory=False, **settings):
        requested.append(pin_memory)
        return extract_module.CachedOutputs(cache, None, [], 0, 0.0)

    monkeypatch.setattr(extract_module, "extract_to_cache", recording_extract)
    for device in (torch.device("cpu"), torch.device("cuda")):  # the classifier's device (no GPU needed here)
        _probs(_FakeClassifier(device=device), image_folder, tmp_path / str(device))
    assert requested == [False, True]


# ---------------------------------------------------------------------- output_layout
_LAYOUT = {"grey": ((), "float32"), "twice": ((2,), np.float64)}  # what _CountingEncoder returns


def test_output_layout_lets_a_rank_write_shards_of_unreadable_files_only(tmp_path, image_folder):
    items = image_folder[5:7] + image_folder[7:9]  # shard 0 = two bad files (rank 0 of 2), shard 1 = good
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 4, shard_size=2)
    with pytest.raises(ExtractionError, match="output_layout"):  # no layout: shapes unknown
        extract_to_cache(items, image_loader(_grey_level), _CountingEncoder(), cache, 2, shards=[0], progress=False)
    encoder = _CountingEncoder()
    report = extract_to_cache(items, image_loader(_grey_level), encoder, cache, 2, shards=[0], progress=False,
                              output_layout=_LAYOUT)
    assert report.computed_shards == [0] and encoder.calls == 0 and cache.missing_shards() == [1]
    shard = cache.read_shard(0)
    assert shard["grey"].shape == (2,) and shard["twice"].shape == (2, 2) and shard["twice"].dtype == np.float64
    assert not shard["ok"].any() and shard["skipped_rows"].tolist() == [0, 1]
    extract_to_cache(items, image_loader(_grey_level), _CountingEncoder(), cache, 2, shards=[1], progress=False,
                     output_layout=_LAYOUT)  # rank 1: its real outputs agree with the declared layout
    second = cache.read_shard(1)
    for key in ("grey", "twice", "ok"):  # the row-aligned arrays agree across the two ranks' shards
        assert (second[key].shape, second[key].dtype) == (shard[key].shape, shard[key].dtype), key
    np.testing.assert_allclose(cache.load("twice"), [[0, 0], [0, 0], [70, 140], [80, 160]])


def test_output_layout_is_checked_against_the_real_outputs(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 10, shard_size=4)
    wrong = {"grey": ((), "float32"), "twice": ((3,), "float64")}
    with pytest.raises(ExtractionError, match=r"twice: \(3,\) float64.*twice: \(2,\) float64"):
        extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), cache, 4, progress=False,
                         output_layout=wrong)
    with pytest.raises(ParameterError, match="output_layout"):
        extract_to_cache(image_folder, image_loader(_grey_level), _CountingEncoder(), cache, 4, progress=False,
                         output_layout={"ok": ((), "bool")})
