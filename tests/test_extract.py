"""Tests for zsl_utils.extract: skipping bad images, resume, classifier softmax cache."""
from __future__ import annotations

import shutil
from dataclasses import dataclass, field

import numpy as np
import pytest
import torch
from PIL import Image

from zsl_utils.cache import ShardedCache
from zsl_utils.errors import StaleCacheError
from zsl_utils.extract import (
    ExtractionError,
    ImageLoader,
    classifier_outputs,
    dataset_fingerprint,
    extract_to_cache,
    load_image_rgb,
    read_skipped,
)


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
    report = extract_to_cache(image_folder, ImageLoader(_grey_level), encoder, cache, batch_size=3, progress=False)
    assert report.n_skipped == 3 and report.n_ok == 7
    assert [s.row for s in report.skipped] == [2, 5, 6]
    assert report.skipped[0].item.endswith("img2.png")
    assert all(s.reason for s in report.skipped)
    assert "UnidentifiedImageError" in report.skipped[1].reason
    ok = cache.load("ok")
    assert ok.tolist() == [i not in (2, 5, 6) for i in range(10)]
    grey = cache.load("grey")
    np.testing.assert_allclose(grey, [0 if i in (2, 5, 6) else 10 * i for i in range(10)])
    np.testing.assert_allclose(cache.load("twice")[:, 1], 2 * grey)
    assert encoder.n_values == 7
    assert report.skipped_frame().shape == (3, 3)


def test_resume_after_interrupt_computes_only_missing_shards(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    with pytest.raises(KeyboardInterrupt):
        # batch_size=4 -> call 1 fills shard 0, call 2 (shard 1) is interrupted
        extract_to_cache(image_folder, ImageLoader(_grey_level), _CountingEncoder(2), cache, 4, progress=False)
    assert cache.missing_shards() == [1, 2]
    assert [p.name for p in (tmp_path / "c").iterdir() if p.name.startswith(".")] == []

    loaded = []

    def tracking_loader(path):
        loaded.append(path)
        return ImageLoader(_grey_level)(path)

    report = extract_to_cache(image_folder, tracking_loader, _CountingEncoder(), cache, 4, progress=False)
    assert loaded == image_folder[4:]  # shard 0 never reloaded
    assert report.computed_shards == [1, 2] and report.reused_shards == 1
    assert [s.row for s in report.skipped] == [2, 5, 6]  # row 2 comes from the reused shard
    assert cache.is_complete()


def test_explicit_shard_subset_for_one_rank(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, len(image_folder), shard_size=4)
    mine = cache.shards_for_rank(1, 2)
    report = extract_to_cache(image_folder, ImageLoader(_grey_level), _CountingEncoder(), cache, 4, shards=mine, progress=False)
    assert mine == [1] and report.computed_shards == [1] and cache.missing_shards() == [0, 2]


def test_shard_with_only_bad_images_is_still_written(tmp_path, image_folder):
    items = image_folder[5:7] + image_folder[7:9]  # shard 0 = two bad files, shard 1 = good
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 4, shard_size=2)
    extract_to_cache(items, ImageLoader(_grey_level), _CountingEncoder(), cache, 2, progress=False)
    assert cache.is_complete()
    np.testing.assert_allclose(cache.load("grey"), [0, 0, 70, 80])
    assert len(read_skipped(cache)) == 2


def test_nothing_loadable_is_an_error(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 2, shard_size=2)
    with pytest.raises(ExtractionError, match="none of the 2 items"):
        extract_to_cache(image_folder[5:7], ImageLoader(_grey_level), _CountingEncoder(), cache, 2, progress=False)


def test_encoder_output_shape_checked(tmp_path, image_folder):
    cache = ShardedCache(tmp_path / "c", {"t": 1}, 10, shard_size=4)
    with pytest.raises(ExtractionError, match="first axis must be the batch size"):
        extract_to_cache(image_folder, ImageLoader(_grey_level), lambda v: {"x": np.zeros(1)}, cache, 4, progress=False)


def test_worker_processes_give_same_result(tmp_path, image_folder):
    serial = ShardedCache(tmp_path / "a", {"t": 1}, 10, shard_size=4)
    extract_to_cache(image_folder, ImageLoader(_grey_level), _CountingEncoder(), serial, 3, progress=False)
    parallel = ShardedCache(tmp_path / "b", {"t": 1}, 10, shard_size=4)
    report = extract_to_cache(image_folder, ImageLoader(_grey_level), _CountingEncoder(), parallel, 3, num_workers=2, progress=False)
    np.testing.assert_array_equal(serial.load("grey"), parallel.load("grey"))
    assert report.n_skipped == 3


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


def test_classifier_outputs_softmax_cached_and_reused(tmp_path, image_folder):
    classifier = _FakeClassifier()
    cache = classifier_outputs(
        classifier, image_folder, tmp_path / "c", "toy", batch_size=4, device="cpu",
        shard_size=4, dtype="float32", progress=False,
    )
    probs, ok = cache.load("probs"), cache.load("ok")
    assert probs.shape == (10, 3) and probs.dtype == np.float32
    grey = np.array([10 * i / 255 for i in range(10)], np.float32)
    expected = torch.softmax(torch.from_numpy(np.repeat(grey[:, None] * 4, 3, axis=1)), 1).numpy()
    np.testing.assert_allclose(probs[ok], expected[ok], rtol=1e-6)  # equal logits -> 1/3 each
    assert np.all(probs[~ok] == 0)
    calls = classifier.model.forward_calls
    again = classifier_outputs(classifier, image_folder, tmp_path / "c", "toy", device="cpu",
                               shard_size=4, dtype="float32", progress=False)
    assert classifier.model.forward_calls == calls and again.is_complete()


def test_classifier_outputs_float16_rows_sum_to_one(tmp_path, image_folder):
    classifier = _FakeClassifier()
    with torch.no_grad():
        classifier.model.linear.weight.copy_(torch.tensor([[1.0, 0, 0], [0, 2, 0], [0, 0, -3]]))
    cache = classifier_outputs(classifier, image_folder, tmp_path / "c", "toy", device="cpu",
                               shard_size=4, progress=False)
    probs = cache.load("probs")
    assert probs.dtype == np.float16
    np.testing.assert_allclose(probs[cache.load("ok")].astype(np.float32).sum(1), 1.0, atol=2e-3)


def test_classifier_outputs_refuses_other_model_or_dataset(tmp_path, image_folder):
    classifier_outputs(_FakeClassifier(), image_folder, tmp_path / "c", "toy", device="cpu",
                       shard_size=4, progress=False)
    other = _FakeClassifier(fingerprint={"arch": "tiny", "weights": "other"})
    with pytest.raises(StaleCacheError, match="classifier"):
        classifier_outputs(other, image_folder, tmp_path / "c", "toy", device="cpu", shard_size=4, progress=False)
    with pytest.raises(StaleCacheError, match="dataset"):
        classifier_outputs(_FakeClassifier(), image_folder[:9] + image_folder[:1], tmp_path / "c", "toy",
                           device="cpu", shard_size=4, progress=False)
