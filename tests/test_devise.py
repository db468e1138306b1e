"""DeViSE: the hinge rank loss by hand, learning a separable toy, prediction = brute force, resuming."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from zsl_utils.conse.devise import DeViSEConfig, rank_loss, train_devise
from zsl_utils.conse.model import ConSE
from zsl_utils.data.images import augmented_views
from zsl_utils.errors import ParameterError
from zsl_utils.semantic import LabelEmbeddings


def _labels(names, vectors, found=None):
    found = np.ones(len(names), bool) if found is None else np.asarray(found)
    return LabelEmbeddings(list(names), np.asarray(vectors, dtype=np.float32), found, [(n,) for n in names], "toy")


def test_rank_loss_by_hand():
    # s1 = (1, 0), s2 = (0, 1), s3 = (0.6, 0.8); M v = (0.5, 0.2): scores 0.5, 0.2, 0.46
    unit = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.6, 0.8]])
    projected = torch.tensor([[0.5, 0.2], [0.5, 0.2]])
    # y = s1: s2 inactive (0.1 - 0.5 + 0.2 < 0), s3 active: 0.1 - 0.5 + 0.46 = 0.06
    # y = s2: s1: 0.1 - 0.2 + 0.5 = 0.4, s3: 0.1 - 0.2 + 0.46 = 0.36 -> 0.76;   mean 0.41
    assert float(rank_loss(projected[:1], unit, torch.tensor([0]), 0.1)) == pytest.approx(0.06, abs=1e-6)
    assert float(rank_loss(projected, unit, torch.tensor([0, 1]), 0.1)) == pytest.approx(0.41, abs=1e-6)
    assert float(rank_loss(projected[:1], unit, torch.tensor([0]), 0.0)) == 0.0  # no margin: no violation


def _separable(n_per_class=20, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(4, 16)) * 3
    features = np.concatenate([c + rng.normal(size=(n_per_class, 16)) for c in centres]).astype(np.float32)
    wnids = [f"n0000000{c}" for c in range(4) for _ in range(n_per_class)]
    return features, wnids, _labels([f"n0000000{c}" for c in range(4)], rng.normal(size=(4, 5)))


def test_separable_problem_is_learned_to_full_train_accuracy():
    features, wnids, train = _separable()
    model, history = train_devise(features, wnids, train, DeViSEConfig(num_steps=300, batch_size=32, learning_rate=1e-2),
                                  progress=False)
    assert history.loss.iloc[-20:].mean() < history.loss.iloc[:20].mean()
    ranker = ConSE(train.vectors, train.vectors, T=1, candidate_labels=train.labels)
    predicted = ranker.predict_embedded(*model.embed(features), k=1)
    assert [predicted.labels(i)[0] for i in range(len(wnids))] == wnids


def test_prediction_equals_brute_force_scoring():
    features, wnids, train = _separable()
    model, _ = train_devise(features, wnids, train, DeViSEConfig(num_steps=20), progress=False)
    rng = np.random.default_rng(1)
    candidates = rng.normal(size=(30, 5)).astype(np.float32)
    ranker = ConSE(train.vectors, candidates, T=1)
    got = ranker.predict_embedded(*model.embed(features), k=5).indices
    unit = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    scores = features @ model.map.weight.detach().numpy().T @ unit.T  # s_u . M v for every candidate
    np.testing.assert_array_equal(got, np.argsort(-scores, axis=1, kind="stable")[:, :5])


def test_interrupted_training_resumes_bit_for_bit(tmp_path):
    features, wnids, train = _separable()
    config = DeViSEConfig(num_steps=40, batch_size=16, compute_dtype="float64")
    whole, _ = train_devise(features, wnids, train, config, progress=False)
    train_devise(features, wnids, train, config, progress=False, checkpoint_dir=tmp_path, checkpoint_every=10)
    # a run stopped at step 20 (keep its checkpoints up to there), then resumed
    folder = next(tmp_path.iterdir())
    for checkpoint in sorted(folder.iterdir())[-1:]:
        checkpoint.unlink()  # drop step 40: the newest left is step 30
    resumed, history = train_devise(features, wnids, train, config, progress=False, checkpoint_dir=tmp_path,
                                    checkpoint_every=10)
    assert history.step.tolist() == list(range(1, 41))
    assert torch.equal(resumed.map.weight, whole.map.weight)


def test_images_without_a_label_vector_are_left_out_and_none_is_an_error():
    features, wnids, train = _separable()
    missing = _labels(train.labels, train.vectors, [True, False, False, False])
    model, _ = train_devise(features, wnids, missing, DeViSEConfig(num_steps=5), progress=False)
    assert model.map.weight.shape == (5, 16)
    nothing = _labels(train.labels, train.vectors, np.zeros(4, bool))
    with pytest.raises(ParameterError, match="no training image has a label with a vector"):
        train_devise(features, wnids, nothing, DeViSEConfig(num_steps=5), progress=False)


def test_augmented_views_are_written_once_and_fixed(tmp_path):
    from PIL import Image
    source = tmp_path / "n01440764_tench.JPEG"
    Image.fromarray(np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)).save(source, quality=95)
    photos = pd.DataFrame({"path": [str(source)], "wnid": ["n01440764"]})
    views = augmented_views(photos, tmp_path / "views", n_views=3)
    assert views.view.tolist() == ["original", "mirrored", "centre crop"] and views.path[0] == str(source)
    assert Image.open(views.path[2]).size == (24, 16)  # 80 % of 30 x 20
    stamp = [p.stat().st_mtime_ns for p in sorted((tmp_path / "views").iterdir())]
    augmented_views(photos, tmp_path / "views", n_views=3)
    assert [p.stat().st_mtime_ns for p in sorted((tmp_path / "views").iterdir())] == stamp  # not rewritten
    with pytest.raises(ParameterError, match="n_views=9"):
        augmented_views(photos, tmp_path / "views", n_views=9)
