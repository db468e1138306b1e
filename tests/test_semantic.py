"""Semantic spaces: loaders, synonym/phrase averaging on a tiny vocabulary, real GloVe/MiniLM."""
from __future__ import annotations

import numpy as np
import pytest
from gensim.models import FastText, KeyedVectors
from gensim.models.fasttext import save_facebook_model

from zsl_utils.data.wnids import imagenet_wnids, wnid_lemmas
from zsl_utils.conse.model import label_collisions
from zsl_utils.errors import AssetUnavailableError, DataLayoutError, ParameterError
from zsl_utils.semantic import (
    embed_labels,
    guess_vector_kind,
    label_embeddings,
    lemma_vector,
    load_word_vectors,
    sentence_label_embeddings,
)

TINY = {
    "tabby": [1.0, 0.0, 0.0],
    "cat": [0.0, 1.0, 0.0],
    "tabby_cat": [0.0, 0.0, 1.0],
    "house": [0.0, 2.0, 0.0],
    "jack": [4.0, 0.0, 0.0],
    "lantern": [0.0, 0.0, 4.0],
}


@pytest.fixture()
def tiny_kv() -> KeyedVectors:
    kv = KeyedVectors(3)
    kv.add_vectors(list(TINY), np.array(list(TINY.values()), dtype=np.float32))
    return kv


def test_phrase_token_word_mean_and_case_fallback(tiny_kv):
    np.testing.assert_allclose(lemma_vector(tiny_kv, "tabby_cat"), [0, 0, 1])  # phrase token wins
    np.testing.assert_allclose(lemma_vector(tiny_kv, "house_cat"), [0, 1.5, 0])  # mean of house, cat
    np.testing.assert_allclose(lemma_vector(tiny_kv, "Tabby"), [1, 0, 0])  # lowercase fallback
    assert lemma_vector(tiny_kv, "jack-o'-lantern") is None  # pieces jack, o, lantern: 'o' is unknown
    assert lemma_vector(tiny_kv, "tabby_dog") is None  # a half-known phrase is not embedded


def test_jack_o_lantern_needs_every_piece(tiny_kv):
    # With 'o' known, the hyphenated word is the mean of its three pieces.
    tiny_kv.add_vectors(["o"], np.zeros((1, 3), dtype=np.float32))
    np.testing.assert_allclose(lemma_vector(tiny_kv, "jack-o'-lantern"), [4 / 3, 0, 4 / 3])


def test_synonym_averaging_and_missing_labels_are_reported(tiny_kv):
    table = {"n1": ["tabby_cat", "house_cat"], "n2": ["tabby_dog", "cat"], "n3": ["zebra_fish"]}
    with pytest.warns(UserWarning, match="2/3 labels embedded, 1 missing: n3 \\(zebra fish\\)"):
        emb = label_embeddings(tiny_kv, table, space="tiny")
    # n1 = mean((0,0,1), (0,1.5,0)); n2 uses only 'cat' because 'tabby_dog' cannot be embedded.
    np.testing.assert_allclose(emb.vectors, [[0, 0.75, 0.5], [0, 1, 0], [0, 0, 0]])
    assert emb.found.tolist() == [True, True, False]
    assert emb.missing == ["n3"]
    assert emb.only_found().labels == ["n1", "n2"]
    assert emb.take([1, 0]).labels == ["n2", "n1"] and emb.take([1, 0]).vectors[0].tolist() == [0, 1, 0]


def test_missing_policy_and_list_input(tiny_kv):
    with pytest.raises(DataLayoutError, match="1 missing"):
        label_embeddings(tiny_kv, [["cat"], ["nothing"]], on_missing="raise")
    with pytest.raises(DataLayoutError, match="None of the 1 labels"):
        label_embeddings(tiny_kv, [["nothing"]], on_missing="ignore")
    with pytest.raises(ParameterError, match="on_missing"):
        label_embeddings(tiny_kv, [["cat"]], on_missing="zero")
    emb = label_embeddings(tiny_kv, ["cat", ["tabby", "tabby_cat"]])  # a bare string is one lemma
    assert emb.labels == ["cat", "tabby"]
    np.testing.assert_allclose(emb.vectors[1], [0.5, 0, 0.5])


@pytest.mark.parametrize("kind,filename", [
    ("word2vec-text", "v.txt"), ("word2vec-bin", "v.bin"), ("glove-text", "g.txt"), ("keyedvectors", "v.kv"),
])
def test_file_formats_round_trip(tiny_kv, tmp_path, kind, filename):
    path = tmp_path / filename
    if kind == "keyedvectors":
        tiny_kv.save(str(path))
    elif kind == "glove-text":
        path.write_text("".join(f"{w} {' '.join(map(str, v))}\n" for w, v in TINY.items()))
    else:
        tiny_kv.save_word2vec_format(str(path), binary=kind == "word2vec-bin")
    assert guess_vector_kind(path) == kind
    loaded = load_word_vectors(path, trust_pickle=kind == "keyedvectors")  # a pickle needs explicit trust
    np.testing.assert_allclose(loaded["house"], TINY["house"])
    assert len(loaded.index_to_key) == len(TINY)


def test_fasttext_binary(tmp_path):
    model = FastText(sentences=[["tabby", "cat", "sat"], ["house", "cat", "ran"]] * 5, vector_size=4,
                     min_count=1, epochs=1, seed=0, workers=1)
    save_facebook_model(model, str(tmp_path / "ft.bin"))
    assert guess_vector_kind(tmp_path / "ft.bin") == "fasttext-bin"
    loaded = load_word_vectors(tmp_path / "ft.bin")
    np.testing.assert_allclose(loaded["cat"], model.wv["cat"], rtol=1e-5)


def test_loader_errors(tmp_path):
    with pytest.raises(AssetUnavailableError, match="no such file"):
        load_word_vectors(tmp_path / "absent.bin")
    bad = tmp_path / "bad.txt"
    bad.write_text("2 3\nword 1 2\n")
    with pytest.raises(DataLayoutError, match="Could not read"):
        load_word_vectors(bad)
    with pytest.raises(ParameterError, match="kind"):
        load_word_vectors(bad, kind="elmo")


# --------------------------------------------------------------------------- real assets

@pytest.fixture(scope="module")
def glove():
    return load_word_vectors()


def test_packaged_glove_analogy(glove):
    assert glove.vector_size == 50 and len(glove.index_to_key) == 400_000
    top3 = [word for word, _ in glove.most_similar(positive=["king", "woman"], negative=["man"], topn=3)]
    assert "queen" in top3


def test_imagenet_1k_label_embeddings(glove):
    emb = label_embeddings(glove, wnid_lemmas(imagenet_wnids("1k")), on_missing="ignore")
    assert len(emb) == 1000 and emb.dim == 50
    assert 0 < len(emb.missing) < 30  # rare breeds such as kuvasz are not in GloVe's vocabulary
    assert "n02104029" in emb.missing  # kuvasz
    assert f"{len(emb.missing)} missing" in emb.report()
    assert not np.any(emb.vectors[~emb.found])
    # The two 'crane' synsets (bird, machine) have the same single lemma, hence the same vector.
    assert ["n02012849", "n03126707"] in label_collisions(emb)


def test_wnid_lemmas_use_wordnet_spelling():
    lemmas = wnid_lemmas(["n02123045", "n02012849"])
    assert lemmas == {"n02123045": ("tabby", "tabby_cat"), "n02012849": ("crane",)}
    with pytest.raises(ParameterError, match="no lemmas"):
        wnid_lemmas(["n99999999"])
    wnids_1k, wnids_21k = imagenet_wnids("1k"), imagenet_wnids("21k")
    assert len(wnids_1k) == 1000 and wnids_1k == sorted(wnids_1k)
    assert len(wnids_21k) == 21841
    # The fall-2011 release lacks one ILSVRC class (teddy bear); every other 1K class is in it.
    assert set(wnids_1k) - set(wnids_21k) == {"n04399382"}


def test_minilm_sentence_embeddings():
    emb = sentence_label_embeddings({"cat": ["tabby_cat", "kitten"], "truck": ["truck"], "kitty": ["kitty"]})
    assert emb.vectors.shape == (3, 384) and emb.found.all()
    singles = sentence_label_embeddings(["tabby cat", "kitten"])
    np.testing.assert_allclose(emb.vectors[0], singles.vectors.mean(axis=0), atol=1e-5)
    unit = emb.vectors / np.linalg.norm(emb.vectors, axis=1, keepdims=True)
    assert unit[0] @ unit[2] > unit[0] @ unit[1]  # a cat is closer to a kitty than to a truck


def test_embed_labels_dispatches_on_the_space_name(tmp_path):
    table = {"n1": ["tabby_cat"], "n2": ["truck"]}
    glove = embed_labels("glove-6b-50d", table)
    assert glove.dim == 50 and glove.found.all()
    np.testing.assert_allclose(glove.vectors[1], load_word_vectors()["truck"])
    assert embed_labels("minilm", table).dim == 384
    with pytest.raises(AssetUnavailableError, match="no such file"):
        embed_labels(str(tmp_path / "vectors.bin"), table)
