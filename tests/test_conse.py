"""ConSE on hand-computed toys, plus invariants of the vectorised implementation."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsl_utils.conse.model import (
    ConSE,
    check_probabilities,
    classifier_confidence,
    conse_embed,
    generalised_candidates,
    hit_at_k_by_T,
    label_collisions,
    predictions_by_T,
    rank,
    softmax_vs_conse1,
    summarise_conse1_check,
    top1_by_T,
    top_training_labels,
    vector_groups,
)
from zsl_utils.errors import ParameterError
from zsl_utils.semantic import LabelEmbeddings

# Toy: three training labels a, b, c in 2-d and three unseen labels u1, u2, u3.
TRAIN = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]], dtype=np.float32)  # s(a), s(b), s(c)
UNSEEN = np.array([[2.0, 1.0], [3.0, -1.0], [1.0, 2.0]], dtype=np.float32)  # u1, u2, u3
PROBS = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]], dtype=np.float32)

# Image 0 by hand:
#   T=1: f = s(a) = (1, 0)
#   T=2: f = (0.5*(1,0) + 0.3*(0,1)) / 0.8 = (0.625, 0.375),  |f| = sqrt(0.53125)
#   T=3: f = (0.5*(1,0) + 0.3*(0,1) + 0.2*(1,1)) / 1 = (0.7, 0.5), |f| = sqrt(0.74)
# Image 1: T=1: f = s(c) = (1, 1), |f| = sqrt(2).
EXPECTED_F0 = {1: (1.0, 0.0), 2: (0.625, 0.375), 3: (0.7, 0.5)}
# Cosines of image 0's f with u1=(2,1), u2=(3,-1), u3=(1,2):
#   T=1: 2/sqrt5=.8944, 3/sqrt10=.9487, 1/sqrt5=.4472          -> u2, u1, u3
#   T=2: 1.625/(sqrt5*.72887)=.9971, 1.5/(sqrt10*.72887)=.6508,
#        1.375/(sqrt5*.72887)=.8437                             -> u1, u3, u2
#   T=3: 1.9/(sqrt5*.86023)=.9878, 1.6/(sqrt10*.86023)=.5882,
#        1.7/(sqrt5*.86023)=.8838                               -> u1, u3, u2
EXPECTED_ZSL = {
    1: ([1, 0, 2], [3 / math.sqrt(10), 2 / math.sqrt(5), 1 / math.sqrt(5)]),
    2: ([0, 2, 1], [0.99705, 0.84366, 0.65079]),
    3: ([0, 2, 1], [0.98777, 0.88379, 0.58817]),
}
# Generalised (candidates a, b, c, u1, u2, u3 -> positions 0..5), image 0:
#   T=1: a 1, u2 .9487, u1 .8944, c .7071, u3 .4472, b 0
#   T=2: u1 .9971, c 1/(sqrt2*.72887)=.9701, a .625/.72887=.8575, u3 .8437, u2 .6508, b .5145
#   T=3: u1 .9878, c 1.2/(sqrt2*.86023)=.9864, u3 .8838, a .8137, u2 .5882, b .5812
EXPECTED_GZSL = {1: [0, 4, 3, 2, 5, 1], 2: [3, 2, 0, 5, 4, 1], 3: [3, 2, 5, 0, 4, 1]}


@pytest.mark.parametrize("T", [1, 2, 3])
def test_embedding_matches_hand_computation(T):
    emb, norms = conse_embed(PROBS, TRAIN, T=T)
    np.testing.assert_allclose(emb[0], EXPECTED_F0[T], rtol=1e-6)
    assert norms[0] == pytest.approx(math.hypot(*EXPECTED_F0[T]), rel=1e-6)


def test_second_image_top1_is_c():
    emb, norms = conse_embed(PROBS, TRAIN, T=1)
    np.testing.assert_allclose(emb[1], [1.0, 1.0])
    assert norms[1] == pytest.approx(math.sqrt(2))


@pytest.mark.parametrize("T", [1, 2, 3])
def test_zero_shot_ranking_matches_hand_computation(T):
    prediction = ConSE(TRAIN, UNSEEN, T=T, candidate_labels=["u1", "u2", "u3"]).predict(PROBS, k=3)
    order, cosines = EXPECTED_ZSL[T]
    assert prediction.indices[0].tolist() == order
    np.testing.assert_allclose(prediction.scores[0], cosines, atol=2e-5)
    assert prediction.labels(0) == [["u1", "u2", "u3"][j] for j in order]


@pytest.mark.parametrize("T", [1, 2, 3])
def test_generalised_ranking_matches_hand_computation(T):
    candidates = np.concatenate([TRAIN, UNSEEN])
    prediction = ConSE(TRAIN, candidates, T=T).predict(PROBS, k=6)
    assert prediction.indices[0].tolist() == EXPECTED_GZSL[T]


def test_large_T_path_equals_gather_path():
    """T above the gather threshold uses a scatter + matmul; both must give the same f(x)."""
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(100), size=7).astype(np.float32)
    vectors = rng.normal(size=(100, 8)).astype(np.float32)
    emb, _ = conse_embed(probs, vectors, T=40)
    top = np.argsort(-probs, axis=1)[:, :40]
    weights = np.take_along_axis(probs, top, axis=1)
    manual = np.einsum("bt,btd->bd", weights, vectors[top]) / weights.sum(axis=1, keepdims=True)
    np.testing.assert_allclose(emb, manual, rtol=1e-4, atol=1e-5)


def test_T1_is_nearest_candidate_to_top1_label_embedding():
    rng = np.random.default_rng(1)
    train = rng.normal(size=(30, 6)).astype(np.float32)
    candidates = rng.normal(size=(50, 6)).astype(np.float32)
    probs = rng.dirichlet(np.ones(30) * 0.3, size=40).astype(np.float32)
    indices, _ = rank(conse_embed(probs, train, T=1)[0], candidates, k=1)
    top1 = train[probs.argmax(axis=1)]
    cosine = (top1 / np.linalg.norm(top1, axis=1, keepdims=True)) @ (
        candidates / np.linalg.norm(candidates, axis=1, keepdims=True)).T
    assert indices[:, 0].tolist() == cosine.argmax(axis=1).tolist()


def test_chunking_and_input_kinds_agree(tmp_path):
    rng = np.random.default_rng(2)
    probs = rng.dirichlet(np.ones(12), size=25).astype(np.float32)
    train, candidates = rng.normal(size=(12, 4)), rng.normal(size=(9, 4))
    memmap = np.lib.format.open_memmap(tmp_path / "p.npy", mode="w+", dtype=np.float32, shape=probs.shape)
    memmap[:] = probs
    reference = ConSE(train, candidates, T=3).predict(probs, k=4, batch_size=1000)
    chunked = ConSE(train, candidates, T=3).predict(memmap, k=4, batch_size=4)
    assert np.array_equal(reference.indices, chunked.indices)
    np.testing.assert_allclose(reference.norms, chunked.norms, rtol=1e-6)
    emb_t, norm_t = conse_embed(torch.from_numpy(probs), train, T=3, chunk_size=5)
    assert isinstance(emb_t, torch.Tensor) and isinstance(norm_t, torch.Tensor)
    idx_t, _ = rank(emb_t, candidates, k=4, chunk_size=3)
    assert idx_t.numpy().tolist() == reference.indices.tolist()


def test_masked_training_label_is_skipped():
    """A training label without an embedding cannot be a top-T label: the next one is used."""
    emb, _ = conse_embed(PROBS[:1], TRAIN, T=1, train_mask=np.array([False, True, True]))
    np.testing.assert_allclose(emb[0], TRAIN[1])  # b, the best embedded label (0.3)


def test_with_T_shares_vectors_and_changes_answer():
    model = ConSE(TRAIN, UNSEEN, T=1)
    assert model.predict(PROBS, k=1).indices[0, 0] == 1
    assert model.with_T(2).predict(PROBS, k=1).indices[0, 0] == 0
    assert model.T == 1


def test_bad_inputs_raise_parameter_errors():
    with pytest.raises(ParameterError, match="T=0"):
        ConSE(TRAIN, UNSEEN, T=0)
    with pytest.raises(ParameterError, match="between 1 and"):
        conse_embed(PROBS, TRAIN, T=4)
    with pytest.raises(ParameterError, match="not logits"):
        conse_embed(np.log(PROBS), TRAIN, T=1)
    with pytest.raises(ParameterError, match="shape"):
        conse_embed(PROBS[:, :2], TRAIN, T=1)
    with pytest.raises(ParameterError, match="semantic dimension"):
        rank(np.ones((2, 3)), UNSEEN, k=1)
    with pytest.raises(ParameterError, match="k=4"):
        rank(np.ones((2, 2)), UNSEEN, k=4)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf"), -1e-6])
@pytest.mark.parametrize("kind", ["numpy", "torch"])
def test_check_probabilities_rejects_each_kind_of_bad_value(bad, kind):
    probs = PROBS.copy()
    probs[1, 2] = bad
    data = torch.from_numpy(probs) if kind == "torch" else probs
    with pytest.raises(ParameterError, match="not logits"):
        check_probabilities(data, 3)
    check_probabilities(torch.from_numpy(PROBS) if kind == "torch" else PROBS, 3)  # valid: no error
    check_probabilities(np.zeros((0, 3), np.float32), 3)  # empty: nothing to check
    with pytest.raises(ParameterError, match="shape"):
        check_probabilities(data[:, :2], 3)


def test_validate_false_skips_only_the_value_check():
    bad = np.log(PROBS)  # logits: negative values
    emb, norms = conse_embed(bad, TRAIN, T=1, validate=False)  # the caller vouched for the values: no error
    # T=1 weight log(0.5) or log(0.8) < 0, so Z <= 0 and the Z > 0 guard gives f(x) = 0.
    assert emb.shape == (2, 2) and not emb.any() and not norms.any()
    with pytest.raises(ParameterError, match="shape"):
        conse_embed(PROBS[:, :2], TRAIN, T=1, validate=False)
    with pytest.raises(ParameterError, match="not logits"):
        ConSE(TRAIN, UNSEEN, T=1).embed(bad)


@pytest.mark.parametrize("T", [1, 2, 40])
def test_predict_embedded_equals_predict_exactly(T):
    """Embed once, rank over two candidate sets: the same arrays as predicting from probabilities."""
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(60) * 0.2, size=37).astype(np.float32)
    train, zsl, both = rng.normal(size=(60, 5)), rng.normal(size=(80, 5)), rng.normal(size=(140, 5))
    mask = rng.random(60) > 0.1
    embedded = ConSE(train, zsl, T=T, train_mask=mask).embed(probs, chunk_size=10)
    for candidates in (zsl, both):
        model = ConSE(train, candidates, T=T, train_mask=mask)
        direct = model.predict(probs, k=7, batch_size=10)
        reused = model.predict_embedded(*embedded, k=7, batch_size=10)
        for field in ("indices", "scores", "norms"):
            assert np.array_equal(getattr(direct, field), getattr(reused, field)), field
    with pytest.raises(ParameterError, match="37 embeddings but 36 norms"):
        model.predict_embedded(embedded[0], embedded[1][:-1])


def _embeddings(labels, vectors, found=None):
    vectors = np.asarray(vectors, dtype=np.float32)
    found = np.ones(len(labels), bool) if found is None else np.asarray(found)
    lemmas = [(label,) for label in labels]
    return LabelEmbeddings(list(labels), vectors, found, lemmas, "toy")


def test_from_embeddings_drops_missing_candidates_and_generalised_dedups():
    train = _embeddings(["a", "b", "c"], TRAIN)
    unseen = _embeddings(["u1", "u2", "u3", "zz"], np.vstack([UNSEEN, np.zeros((1, 2))]), [1, 1, 1, 0])
    model = ConSE.from_embeddings(train, unseen, T=2)
    assert model.candidate_labels == ["u1", "u2", "u3"]
    both = generalised_candidates(train, unseen.concat(train.take([0])))
    assert both.labels == ["a", "b", "c", "u1", "u2", "u3", "zz"]


def test_collisions_and_conse1_sanity_check():
    # 'crane' (bird) and 'crane' (machine) share their only lemma, so their vectors coincide.
    train = _embeddings(["bird_crane", "machine_crane", "dog", "kuvasz"],
                        [[1, 1], [1, 1], [0, 1], [0, 0]], [1, 1, 1, 0])
    assert label_collisions(train) == [["bird_crane", "machine_crane"]]
    probs = np.array([[0.1, 0.7, 0.1, 0.1],  # machine_crane: ties with bird_crane, first wins
                      [0.1, 0.1, 0.7, 0.1],  # dog: agrees
                      [0.1, 0.1, 0.2, 0.6]], dtype=np.float32)  # kuvasz has no vector
    table = softmax_vs_conse1(probs, train, true_labels=["machine_crane", "dog", "kuvasz"])
    assert table.case.tolist() == ["same vector as another label", "agree", "softmax top-1 has no vector"]
    assert table.conse1_top1.tolist()[1:] == ["dog", "dog"]
    summary = summarise_conse1_check(table).set_index("quantity")
    assert summary.loc["hit@1 % softmax", "ours"] == pytest.approx(100.0)
    assert summary.loc["hit@1 % ConSE(1)", "ours"] == pytest.approx(100.0 / 3)
    assert summary.loc["hit@1 % softmax", "paper"] == 55.6
    assert summary.loc["images: tied top probabilities", "ours"] == 0  # every case is listed, zeros included


def test_identical_candidate_vectors_rank_together_in_candidate_order():
    v, w = [1.0, 0.0], [0.6, 0.8]
    model = ConSE(np.array([v, w]), np.array([w, v, w, v, v]), T=1, candidate_labels=list("abcde"))
    near_v = np.array([[0.9, 0.1]], dtype=np.float32)  # f(x) = v: b, d, e tie at cosine 1, a and c at 0.6
    assert [model.predict(near_v, k=k).labels(0) for k in (1, 3, 4, 5)] == [
        ["b"], ["b", "d", "e"], ["b", "d", "e", "a"], ["b", "d", "e", "a", "c"]]
    np.testing.assert_allclose(model.predict(near_v, k=5).scores[0], [1, 1, 1, 0.6, 0.6], atol=1e-6)
    assert vector_groups(np.array([w, v, w, v, v])).tolist() == [[0, 2, -1], [1, 3, 4]]


def test_ranking_equals_a_stable_sort_by_score_then_candidate():
    rng = np.random.default_rng(0)
    distinct = rng.normal(size=(6, 3))
    candidates = distinct[rng.integers(0, 6, size=40)]  # many exact duplicates
    train = rng.normal(size=(5, 3))
    probs = rng.dirichlet(np.ones(5), size=20).astype(np.float32)
    model = ConSE(train, candidates, T=3)
    got = model.predict(probs, k=12).indices
    embedded, _ = model.embed(probs)
    unit = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    # the group's shared score, so float noise between identical rows cannot reorder them
    cosine = (embedded / np.linalg.norm(embedded, axis=1, keepdims=True)) @ unit[vector_groups(unit)[:, 0]].T
    groups = vector_groups(unit)
    group_of = np.empty(len(candidates), int)
    for g, members in enumerate(groups):
        group_of[members[members >= 0]] = g
    expected = [sorted(range(len(candidates)), key=lambda j: (-round(cosine[i, group_of[j]], 5), j))[:12]
                for i in range(len(probs))]
    assert got.tolist() == expected


def test_unit_train_switch_on_a_2d_toy():
    # a = (2, 0), b = (0, 1), p = (0.5, 0.5), T = 2: raw f(x) = (1, 0.5), unit f(x) = (0.5, 0.5)
    train, probs = np.array([[2.0, 0.0], [0.0, 1.0]]), np.array([[0.5, 0.5]], dtype=np.float32)
    candidates = np.array([[2.0, 1.0], [1.0, 1.0]])
    raw = ConSE(train, candidates, T=2, candidate_labels=["along raw f", "along unit f"])
    unit = ConSE(train, candidates, T=2, candidate_labels=["along raw f", "along unit f"], unit_train=True)
    np.testing.assert_allclose(raw.embed(probs)[0], [[1.0, 0.5]])
    np.testing.assert_allclose(unit.embed(probs)[1], [np.sqrt(0.5)], rtol=1e-6)
    np.testing.assert_allclose(raw.embed(probs)[1], [np.sqrt(1.25)], rtol=1e-6)
    assert raw.predict(probs, k=1).labels(0) == ["along raw f"]
    assert unit.predict(probs, k=1).labels(0) == ["along unit f"]


# --------------------------------------------------------------------------- analysis helpers

def test_classifier_confidence_by_hand():
    table = classifier_confidence(np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.25, 0.25, 0.5]]))
    np.testing.assert_allclose(table.max_prob, [0.5, 1.0, 0.5])
    # H = -sum p ln p: ln 2; 0; 2 * 0.25 ln 4 + 0.5 ln 2 = 1.5 ln 2
    np.testing.assert_allclose(table.entropy, [math.log(2), 0.0, 1.5 * math.log(2)], atol=1e-12)


def test_top_training_labels_respects_mask():
    assert top_training_labels(PROBS[0], ["a", "b", "c"], n=2) == [("a", 0.5), ("b", pytest.approx(0.3))]
    masked = top_training_labels(PROBS[0], ["a", "b", "c"], n=2, mask=[False, True, True])
    assert [name for name, _ in masked] == ["b", "c"]


def test_hit_at_k_and_top1_by_T_on_the_toy():
    model = ConSE(TRAIN, UNSEEN, T=1, candidate_labels=["u1", "u2", "u3"])
    by_T = predictions_by_T(model, PROBS[:1], [1, 2], k=3)
    # Image 0 ranks u2, u1, u3 at T=1 and u1, u3, u2 at T=2 (see EXPECTED_ZSL); truth u1.
    hits = hit_at_k_by_T(by_T, ["u1"], ks=(1, 2))
    assert hits.loc[1].tolist() == [0.0, 100.0] and hits.loc[2].tolist() == [100.0, 100.0]
    assert hit_at_k_by_T(by_T, ["not-a-candidate"], ks=(3,)).loc[2, "hit@3 %"] == 0.0
    table = top1_by_T(by_T, ["img0"], {"u1": "first unseen"})
    assert table.loc["img0"].tolist() == ["u2", "first unseen"]
