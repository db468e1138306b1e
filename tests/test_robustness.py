"""Issue 13: every bad input of the list stops with a named error, or is skipped and listed; nothing computed is
lost. Each test is the issue's repro on real files (a changed checkpoint, a crafted pickle, a symlink loop, ...)."""
from __future__ import annotations

import errno
import os
import pickle
import shutil

import numpy as np
import papermill
import pytest
import torch
from PIL import Image

from zsl_utils import __main__ as cli
from zsl_utils import config, profiles
from zsl_utils.cache import CacheError, CacheFullError, ShardedCache
from zsl_utils.checkpoint import CheckpointError, latest_checkpoint, list_checkpoints, load_checkpoint, save_checkpoint
from zsl_utils.data.food101 import read_upmc_food101
from zsl_utils.data.images import image_folder_by_wnid, load_image_rgb
from zsl_utils.errors import DataLayoutError, ParameterError, StaleCacheError
from zsl_utils.extract import cached_outputs
from zsl_utils.parameters import check_parameter_types
from zsl_utils.semantic import embed_labels, load_word_vectors


# ---------------------------------------------------------------------------- 1: checkpoint integrity
def _flip_tensor_bytes(path, tensor: torch.Tensor) -> None:
    """Change bytes inside ``tensor``'s stored data in ``path``, keeping the file's size (silent bit rot)."""
    raw, data = bytearray(path.read_bytes()), tensor.contiguous().numpy().tobytes()
    at = raw.find(data)
    assert at > 0 and len(data) >= 16, "the tensor's bytes must be stored verbatim in the checkpoint"
    raw[at + 4 : at + 12] = bytes(b ^ 0x5A for b in raw[at + 4 : at + 12])
    size = path.stat().st_size
    path.write_bytes(bytes(raw))
    assert path.stat().st_size == size


def test_damaged_latest_checkpoint_is_named_and_training_resumes_from_the_newest_intact_one(tmp_path):
    from test_huse import SMALL, _assert_same_training, toy_split

    from zsl_utils.huse.training import TrainConfig, train_huse

    split, class_distance = toy_split()
    config = TrainConfig(num_steps=12, batch_size=6, learning_rate=1e-2, log_every=4, seed=1)
    uninterrupted = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False)
    train_huse(split, class_distance, config=config, architecture=SMALL, progress=False, checkpoint_dir=tmp_path,
               checkpoint_every=3)
    (folder,) = tmp_path.iterdir()
    assert [step for step, _ in list_checkpoints(folder)] == [9, 12]
    latest = latest_checkpoint(folder)
    weight = next(iter(torch.load(latest, weights_only=True)["state"]["model"].values()))
    _flip_tensor_bytes(latest, weight)
    with pytest.raises(CheckpointError, match=r"step_000000012\.pt is damaged.*SHA-256"):
        load_checkpoint(latest)  # a plain load of that file refuses it
    with pytest.warns(UserWarning, match=r"resuming from step_000000009\.pt.*step_000000012\.pt is damaged"):
        resumed = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False,
                             checkpoint_dir=tmp_path, checkpoint_every=3)
    assert resumed.extras["resumed_from_step"] == 9
    _assert_same_training(uninterrupted, resumed)  # bit-identical, as if step 12 had never been damaged


@pytest.mark.parametrize("damage", ["zero bytes", "truncated"])
def test_truncated_or_empty_checkpoint_falls_back_and_all_damaged_is_an_error(tmp_path, damage):
    fingerprint = {"model": "a"}
    for step in (5, 10):
        save_checkpoint(tmp_path, step, {"w": torch.full((4,), float(step))}, fingerprint)
    newest = latest_checkpoint(tmp_path)
    newest.write_bytes(b"" if damage == "zero bytes" else newest.read_bytes()[:300])
    with pytest.warns(UserWarning, match=r"resuming from step_000000005\.pt.*step_000000010\.pt is unreadable"):
        step, state = load_checkpoint(newest, fingerprint)
    assert step == 5 and state["w"].tolist() == [5.0] * 4
    (tmp_path / "step_000000005.pt").write_bytes(b"")
    with pytest.raises(CheckpointError, match="No intact earlier checkpoint"):
        load_checkpoint(newest, fingerprint)


# ---------------------------------------------------------------------------- 2: no code from word-vector files
class _CreatesFile:
    def __init__(self, marker) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")  # unpickling this creates the marker file


@pytest.mark.parametrize("name", ["vectors.kv", "vectors.model", "disguised.bin"])
def test_crafted_pickle_given_as_word_vectors_never_runs(tmp_path, name):
    marker, path = tmp_path / "pwned", tmp_path / name
    path.write_bytes(pickle.dumps(_CreatesFile(marker), protocol=4))
    with pytest.raises(ParameterError, match=r"is a pickle.*runs whatever code.*trust_pickle=True"):
        load_word_vectors(path)
    with pytest.raises(ParameterError, match="trust_pickle"):
        embed_labels(str(path), {"cat": ["cat"]})  # the notebooks' semantic_space switch
    assert not marker.exists()


def test_wordnet_has_no_pickle_cache():
    import zsl_utils.data.wordnet as wordnet_module

    source = open(wordnet_module.__file__, encoding="utf-8").read()
    assert "pickle" not in source.replace("unpickling", "") and "CACHE_DIR" not in source


# ---------------------------------------------------------------------------- 3, 4: ImageNet listing
def test_imagenet_root_without_wnid_folders_is_refused_with_what_was_found(tmp_path):
    (tmp_path / "cats").mkdir()
    (tmp_path / "cats" / "a.jpg").write_bytes(b"x")
    with pytest.raises(DataLayoutError, match=r"for the 2 WNIDs asked for.*sub-folders named by WNID.*"
                                              r"0 WNID folders, found folders \['cats'\]"):
        image_folder_by_wnid(tmp_path, wnids={"n00000001", "n00000002"})  # as the full profile calls it


def test_listing_skips_and_lists_symlink_loops_dangling_links_and_unreadable_folders(tmp_path, monkeypatch):
    good = tmp_path / "n00000001"
    good.mkdir()
    (good / "a.jpg").write_bytes(b"x")
    os.symlink("loop.jpg", good / "loop.jpg")  # a file linking to itself
    os.symlink(tmp_path / "gone.jpg", good / "dangling.jpg")
    os.symlink("n00000002", tmp_path / "n00000002")  # a class folder linking to itself
    (tmp_path / "n00000003").mkdir()
    real_scandir = os.scandir

    def scandir(path):  # root ignores permissions, so n00000003 is made unreadable here
        if str(path).endswith("n00000003"):
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    with pytest.warns(UserWarning, match="4 entries .* could not be read and were skipped"):
        frame = image_folder_by_wnid(tmp_path)
    assert frame["path"].str.endswith("n00000001/a.jpg").tolist() == [True]
    reasons = "\n".join(frame.attrs["skipped"])
    assert "loop.jpg (Too many levels of symbolic links)" in reasons and "dangling.jpg (dangling link)" in reasons
    assert "n00000002 (Too many levels of symbolic links)" in reasons and "n00000003 (Permission denied)" in reasons


# ---------------------------------------------------------------------------- 5: UPMC CSVs
def _upmc(tmp_path, csv_bytes: bytes, with_image: bool = True):
    (tmp_path / "texts").mkdir(parents=True)
    (tmp_path / "texts" / "train_titles.csv").write_bytes(csv_bytes)
    (tmp_path / "images" / "train" / "pho").mkdir(parents=True)
    if with_image:
        Image.new("RGB", (4, 4)).save(tmp_path / "images" / "train" / "pho" / "pho_0.jpg")
    return tmp_path


def test_latin1_upmc_csv_names_file_line_and_fix(tmp_path):
    root = _upmc(tmp_path, "pho_0.jpg,Pho,pho\npho_0.jpg,Phó café,pho\n".encode("latin-1"))
    with pytest.raises(DataLayoutError, match=r"train_titles.csv is not UTF-8: line 2 holds byte 0xf3; re-save it as"):
        read_upmc_food101(root, "train")


def test_empty_upmc_csv_and_csv_without_images_fail_early_and_say_why(tmp_path):
    with pytest.raises(DataLayoutError, match=r"train_titles.csv is empty .*image file name, text, class"):
        read_upmc_food101(_upmc(tmp_path / "a", b""), "train")
    root = _upmc(tmp_path / "b", b"pho_0.jpg,Pho,pho\npho_1.jpg,More pho,pho\n", with_image=False)
    with pytest.raises(DataLayoutError, match=r"(?s)no usable train item \(found: \{'missing image': 2\}\).*images/train"):
        read_upmc_food101(root, "train")


# ---------------------------------------------------------------------------- 6: disk full
TEXTS = [f"text number {i} about food" for i in range(6)]


def _tfidf(cache_dir, **kwargs):
    return cached_outputs("text_features", TEXTS, "tfidf", cache_dir=cache_dir, dataset_id="t", shard_size=2,
                          progress=False, **kwargs)


def test_disk_full_in_process_is_cache_full_error_keeping_finished_shards(tmp_path, monkeypatch):
    reference = _tfidf(tmp_path / "reference").load()
    real_savez, calls = np.savez, []

    def savez_until_full(handle, **arrays):
        calls.append(1)
        if len(calls) == 2:
            handle.write(b"half a shard")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_savez(handle, **arrays)

    monkeypatch.setattr(np, "savez", savez_until_full)
    cache_dir = tmp_path / "full"
    with pytest.raises(CacheFullError, match=f"{cache_dir} filled up while writing shard 1.*completed shards are "):
        _tfidf(cache_dir)
    monkeypatch.setattr(np, "savez", real_savez)
    assert sorted(p.name for p in cache_dir.iterdir()) == ["meta.json", "shard_000000.npz"]  # no half shard
    resumed = _tfidf(cache_dir)
    assert resumed.reused_shards == 1 and resumed.computed_shards == [1, 2]
    np.testing.assert_array_equal(resumed.load(), reference)


def test_free_space_check_is_right_on_small_volumes(tmp_path, monkeypatch):
    real_usage = shutil.disk_usage
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=200_000))
    assert _tfidf(tmp_path / "fits").cache.is_complete()  # 3 shards of 2 x 6 floats fit in 200 kB
    monkeypatch.setattr(shutil, "disk_usage", lambda p: real_usage(p)._replace(free=1_500))
    with pytest.raises(CacheFullError, match=r"has 1\.5 kB free but the 3 shards still to write need about 2\d\.\d kB"):
        _tfidf(tmp_path / "small")
    assert not list((tmp_path / "small").glob("shard_*"))


# ---------------------------------------------------------------------------- 7: shards without meta.json
def test_shards_without_meta_json_are_refused_not_adopted(tmp_path):
    made = ShardedCache(tmp_path, {"dtype": "float16"}, 4, 2)
    for shard in range(2):
        made.write_shard(shard, x=np.ones((2, 3), np.float16))
    (tmp_path / "meta.json").unlink()
    with pytest.raises(StaleCacheError, match=r"holds 2 shard file\(s\).*but no meta.json.*delete those shards"):
        ShardedCache(tmp_path, {"dtype": "float32"}, 4, 2)
    assert len(list(tmp_path.glob("shard_*.npz"))) == 2  # nothing deleted


# ---------------------------------------------------------------------------- 8: the smaller items
def test_non_utf8_profile_is_rejected_input_exit_2(tmp_path, capsys):
    profile = tmp_path / "latin.yaml"
    profile.write_bytes("description: caf\xe9\n".encode("latin-1"))
    assert cli.main(["check-profile", str(profile)]) == 2
    assert "latin.yaml is not UTF-8: line 1 holds byte 0xe9; save the profile as UTF-8" in capsys.readouterr().err


def test_cuda_device_pattern_needs_a_number():
    device = profiles.NotebookParameter("device", "str", '"auto"', '(one of: "auto", "cpu", "cuda", "cuda:*", "mps")')
    assert "cuda:N" in device.broken_rule("cuda:abc")
    assert device.broken_rule("cuda:1") is None and device.broken_rule("cpu") is None


def test_16_bit_png_keeps_its_grey_levels(tmp_path):
    path = tmp_path / "grey16.png"
    Image.fromarray(np.full((4, 4), 32896, np.uint16)).save(path)  # mid grey in 16 bits
    assert load_image_rgb(path).getpixel((0, 0)) == (128, 128, 128)


def test_finished_cache_on_read_only_storage_is_read(tmp_path, monkeypatch):
    import zsl_utils.cache as cache_module

    done = _tfidf(tmp_path / "done").load()
    partial = ShardedCache(tmp_path / "partial", {"a": 1}, 4, 2)
    partial.write_shard(0, x=np.zeros((2, 1)))

    def read_only_fs(directory, advice):
        raise CacheError(f"cache directory {directory} is not writable (Read-only file system); {advice}")

    monkeypatch.setattr(cache_module, "check_writable_directory", read_only_fs)
    np.testing.assert_array_equal(_tfidf(tmp_path / "done").load(), done)
    with pytest.raises(CacheError, match="partial is not writable"):  # unfinished: it needs writing
        ShardedCache(tmp_path / "partial", {"a": 1}, 4, 2)


def test_parameter_of_the_wrong_type_is_named_before_any_work():
    namespace = {"__annotations__": {"num_steps": int, "learning_rate": float, "ks": list[int], "verify": bool},
                 "num_steps": 400, "learning_rate": 1, "ks": [1, 5], "verify": False}
    check_parameter_types(namespace)  # an int where a float is declared is fine
    for name, bad in [("num_steps", "abc"), ("num_steps", True), ("ks", [1, "5"]), ("verify", 1)]:
        with pytest.raises(ParameterError, match=f"{name}="):
            check_parameter_types({**namespace, name: bad})


def test_papermill_p_with_a_string_for_an_int_names_the_parameter(tmp_path):
    # The repro: `papermill notebooks/03_huse_food101.ipynb out.ipynb -p num_steps abc`.
    with pytest.raises(papermill.PapermillExecutionError, match=r"num_steps='abc' \(expected int\)"):
        papermill.execute_notebook(str(config.NOTEBOOKS_DIR / "03_huse_food101.ipynb"), str(tmp_path / "out.ipynb"),
                                   parameters={"num_steps": "abc"}, kernel_name="python3", progress_bar=False)
