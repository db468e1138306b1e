"""HUSE losses, model, training and evaluation on tiny hand-checked tensors."""
from __future__ import annotations

import math
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsl_utils.errors import ParameterError
from zsl_utils.huse.diagnostics import active_unit_fractions, participation_ratio, tower_diagnostics
from zsl_utils.huse.model import HuseArchitecture, HuseModel, HuseSplit, SplitOutputs, build_splits, embed_split
from zsl_utils.huse.evaluation import (
    choose_fusion_weight,
    classification_table,
    evaluate_huse,
    fuse_probabilities,
    paper_numbers,
    project_2d,
    seed_table,
    side_by_side,
)
from zsl_utils.huse.losses import (
    LossWeights,
    class_distance_matrix,
    classification_loss,
    cosine_distance_matrix,
    gap_loss,
    graph_pair_mask,
    huse_loss,
    semantic_graph_loss,
)
from zsl_utils.huse.training import (
    ResumableBatches,
    TrainConfig,
    TrainedHuse,
    best_weights,
    fit_and_evaluate,
    grid_search,
    loss_shares,
    over_seeds,
    seed_spreads,
    seeded_repeat_check,
    train_huse,
    train_separate,
)


def unit(degrees: float) -> list[float]:
    radians = math.radians(degrees)
    return [math.cos(radians), math.sin(radians)]


def cos_distance(delta_degrees: float) -> float:
    return 1.0 - math.cos(math.radians(delta_degrees))


# Three items, classes 0, 1, 2. Images at 0, 60, 90 degrees; texts at 30, 180, 75 degrees.
IMAGES = torch.tensor([unit(0), unit(60), unit(90)])
TEXTS = torch.tensor([unit(30), unit(180), unit(75)])
LABELS = torch.tensor([0, 1, 2])
CLASS_DISTANCE = torch.tensor([[0.0, 0.3, 1.2], [0.3, 0.0, 1.0], [1.2, 1.0, 0.0]])
ZETA = 0.6


def test_cosine_distance_matrix_hand_values():
    distance = cosine_distance_matrix(IMAGES, TEXTS)
    assert distance.shape == (3, 3)
    assert distance[0, 0].item() == pytest.approx(cos_distance(30), abs=1e-6)
    assert distance[1, 1].item() == pytest.approx(1.5, abs=1e-6)  # 120 degrees apart
    assert distance[0, 1].item() == pytest.approx(2.0, abs=1e-6)  # opposite directions
    assert distance[2, 0].item() == pytest.approx(cos_distance(60), abs=1e-6)


def test_class_distance_matrix_is_symmetric_with_zero_diagonal():
    names = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0]])
    a = class_distance_matrix(names)
    assert torch.equal(torch.diagonal(a), torch.zeros(3))
    assert torch.allclose(a, a.T)
    assert a[0, 1].item() == pytest.approx(1 - 1 / math.sqrt(2), abs=1e-6)
    assert a[0, 2].item() == pytest.approx(1.0, abs=1e-6)


def test_graph_loss_equation_matches_hand_sum():
    # Stacked embeddings e = [u0, u1, u2, v0, v1, v2] at angles [0, 60, 90, 30, 180, 75]
    # with classes [0, 1, 2, 0, 1, 2]. Eq. 10 keeps a pair iff A < 0.6 and d < 0.6.
    # Unordered pairs that pass (all others: d >= 0.6, or A >= 0.6):
    kept = [
        (cos_distance(60), 0.3),  # u0-u1: d=0.5, classes 0/1
        (cos_distance(30), 0.0),  # u0-v0: the paired text, same class
        (cos_distance(30), 0.3),  # u1-v0
        (cos_distance(15), 0.0),  # u2-v2: paired
    ]
    # u1-u2 (d=0.13) and u1-v2 (d=0.03) are close but A=1.0 >= zeta: the mask drops them.
    expected = 2 * sum((d - a) ** 2 for d, a in kept) / 36  # ordered pairs, (2N)^2 = 36
    got, kept_share = semantic_graph_loss([IMAGES, TEXTS], LABELS, CLASS_DISTANCE, ZETA, "equation")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert expected == pytest.approx(0.0048153, rel=1e-4)
    assert kept_share.item() == pytest.approx(8 / 30)  # 4 unordered pairs of the 30 ordered off-diagonal ones


def test_graph_loss_prose_variant_keeps_related_pairs_and_close_pairs():
    # "prose": A < zeta OR d < zeta, each kept pair pulled or pushed to its class distance (d - A)^2.
    related = [  # A < 0.6, whatever their distance
        (cos_distance(30), 0.0), (cos_distance(120), 0.0), (cos_distance(15), 0.0),  # u0-v0, u1-v1, u2-v2
        (cos_distance(60), 0.3), (cos_distance(180), 0.3), (cos_distance(30), 0.3), (cos_distance(150), 0.3),
    ]  # u0-u1, u0-v1, v0-u1, v0-v1 (classes 0 and 1)
    close_unrelated = [(cos_distance(30), 1.0), (cos_distance(15), 1.0),  # u1-u2, u1-v2
                       (cos_distance(60), 1.2), (cos_distance(45), 1.2)]  # u2-v0, v0-v2
    expected = 2 * sum((d - a) ** 2 for d, a in related + close_unrelated) / 36
    got, kept_share = semantic_graph_loss([IMAGES, TEXTS], LABELS, CLASS_DISTANCE, ZETA, "prose")
    assert got.item() == pytest.approx(expected, rel=1e-5)
    assert got.item() == pytest.approx(0.5930536, rel=1e-4)
    assert kept_share.item() == pytest.approx(22 / 30)


def test_graph_pair_mask_counts_on_four_classes():
    # Classes 0..3, one embedding each; A: 0-1 related (0.2), 2-3 related (0.4), every other pair 1.0.
    class_distance = torch.tensor([[0.0, 0.2, 1.0, 1.0], [0.2, 0.0, 1.0, 1.0],
                                   [1.0, 1.0, 0.0, 0.4], [1.0, 1.0, 0.4, 0.0]])
    # Embedding distances: 0-1 close (0.1), 2-3 far (0.9), 1-2 close although unrelated (0.3), others far.
    distance = torch.tensor([[0.0, 0.1, 1.5, 1.5], [0.1, 0.0, 0.3, 1.5],
                             [1.5, 0.3, 0.0, 0.9], [1.5, 1.5, 0.9, 0.0]])
    equation = graph_pair_mask(distance, class_distance, 0.5, "equation")
    prose = graph_pair_mask(distance, class_distance, 0.5, "prose")
    off_diagonal = ~torch.eye(4, dtype=torch.bool)
    # Eq. 10: only 0-1 (related and close); the far related pair 2-3 gets no gradient.
    assert {tuple(p) for p in (equation & off_diagonal).nonzero().tolist()} == {(0, 1), (1, 0)}
    # Prose: 0-1 and 2-3 (related) and 1-2 (closer than the margin).
    assert {tuple(p) for p in (prose & off_diagonal).nonzero().tolist()} == {(0, 1), (1, 0), (2, 3), (3, 2), (1, 2), (2, 1)}
    with pytest.raises(ParameterError):
        graph_pair_mask(distance, class_distance, 0.5, "neither")


def test_graph_loss_mask_follows_distance_not_only_class():
    # Same class pair far apart (d = 1 >= zeta) is ignored by Eq. 10: the loss is 0.
    far, _ = semantic_graph_loss([torch.tensor([unit(0)]), torch.tensor([unit(90)])], torch.tensor([0]),
                                 torch.zeros(1, 1), 0.6)
    assert far.item() == pytest.approx(0.0, abs=1e-7)
    near, _ = semantic_graph_loss([torch.tensor([unit(0)]), torch.tensor([unit(40)])], torch.tensor([0]),
                                  torch.zeros(1, 1), 0.6)
    assert near.item() == pytest.approx(2 * cos_distance(40) ** 2 / 4, rel=1e-5)


def test_graph_loss_single_modality_uses_only_that_modality():
    got, _ = semantic_graph_loss([IMAGES], LABELS, CLASS_DISTANCE, ZETA)
    assert got.item() == pytest.approx(2 * (cos_distance(60) - 0.3) ** 2 / 9, rel=1e-5)  # only u0-u1 passes


def test_gap_loss_pairs_image_and_text_of_same_item():
    expected = (cos_distance(30) + cos_distance(120) + cos_distance(15)) / 3
    assert gap_loss(IMAGES, TEXTS).item() == pytest.approx(expected, rel=1e-6)
    # Swapping the text rows changes the pairing, hence the loss: the term is per item.
    assert gap_loss(IMAGES, TEXTS[[1, 0, 2]]).item() != pytest.approx(expected, rel=1e-3)


def test_classification_loss_averages_modalities():
    image_logits = torch.tensor([[2.0, 0.0], [0.0, 0.0]])
    text_logits = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    labels = torch.tensor([0, 1])
    image_ce = (math.log(1 + math.exp(-2)) + math.log(2)) / 2
    text_ce = math.log(1 + math.e)
    got = classification_loss([image_logits, text_logits], labels).item()
    assert got == pytest.approx((image_ce + text_ce) / 2, rel=1e-6)


def test_huse_loss_weights_and_skipped_terms():
    embeddings = {"image": IMAGES, "text": TEXTS}
    logits = {"image": torch.zeros(3, 3), "text": torch.zeros(3, 3)}
    weights = LossWeights(alpha=2.0, beta=3.0, gamma=0.5, margin=ZETA)
    parts = huse_loss(embeddings, logits, LABELS, CLASS_DISTANCE, weights)
    assert parts["classification"].item() == pytest.approx(math.log(3), rel=1e-6)
    expected = 2 * math.log(3) + 3 * parts["graph"].item() + 0.5 * gap_loss(IMAGES, TEXTS).item()
    assert parts["total"].item() == pytest.approx(expected, rel=1e-6)
    no_graph = huse_loss(embeddings, logits, LABELS, CLASS_DISTANCE, LossWeights(beta=0.0, margin=ZETA))
    assert no_graph["graph"].item() == 0.0 and no_graph["graph_pairs_kept"].item() == 0.0  # skipped at beta=0
    assert no_graph["gap"].item() == pytest.approx(gap_loss(IMAGES, TEXTS).item())  # monitored even at gamma=0
    assert no_graph["total"].item() == pytest.approx(math.log(3), rel=1e-6)  # ...but not in the total
    assert parts["accuracy_image"].item() == pytest.approx(1 / 3)  # all-zero logits: argmax 0, right for item 0
    assert parts["classification_text"].item() == pytest.approx(math.log(3), rel=1e-6)
    single = huse_loss({"image": IMAGES}, {"image": logits["image"]}, LABELS, CLASS_DISTANCE, weights)
    assert single["gap"].item() == 0.0 and "accuracy_text" not in single


@pytest.mark.parametrize("bad", [dict(alpha=-1.0), dict(margin=0.0), dict(margin=2.5), dict(graph_variant="x")])
def test_loss_weights_reject_bad_values(bad):
    with pytest.raises(ParameterError):
        LossWeights(**bad)


SMALL = HuseArchitecture(embedding_dim=8, hidden_dim=16)


def test_model_shapes_unit_norms_and_shared_classifier():
    model = HuseModel({"image": 5, "text": 7}, num_classes=4, architecture=SMALL)
    image_linears = [m for m in model.towers["image"] if isinstance(m, torch.nn.Linear)]
    text_linears = [m for m in model.towers["text"] if isinstance(m, torch.nn.Linear)]
    assert len(image_linears) == 5 + 1 and len(text_linears) == 2 + 1  # hidden layers + output
    assert sum(isinstance(m, torch.nn.Dropout) for m in model.towers["image"]) == 4  # between hidden layers
    embeddings, logits = model({"image": torch.randn(6, 5), "text": torch.randn(6, 7)})
    for modality in ("image", "text"):
        assert embeddings[modality].shape == (6, 8)
        assert torch.allclose(embeddings[modality].norm(dim=1), torch.ones(6), atol=1e-5)
        assert logits[modality].shape == (6, 4)
    model.eval()
    assert torch.allclose(logits["text"], model.classifier(embeddings["text"]), atol=1e-6)
    assert len([m for m in model.modules() if isinstance(m, torch.nn.Linear) and m.out_features == 4]) == 1


def test_model_rejects_wrong_feature_width():
    model = HuseModel({"image": 5, "text": 7}, num_classes=4, architecture=SMALL)
    with pytest.raises(ParameterError, match="same extractor"):
        model({"image": torch.randn(2, 6)})


def test_split_rejects_mismatched_rows_and_nan():
    with pytest.raises(ParameterError, match="one row per label"):
        HuseSplit(torch.zeros(3, 2), torch.zeros(2, 2), torch.tensor([0, 1, 2]))
    with pytest.raises(ParameterError, match="NaN"):
        HuseSplit(torch.tensor([[float("nan")]]), None, torch.tensor([0]))


def toy_split(n_per_class: int = 4, n_classes: int = 4, seed: int = 0) -> tuple[HuseSplit, torch.Tensor]:
    """Features = class prototype + noise; the texts see a different random projection."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(n_per_class)
    prototypes = torch.randn(n_classes, 6, generator=generator)
    image = prototypes[labels] + 0.3 * torch.randn(len(labels), 6, generator=generator)
    text = (prototypes[labels] @ torch.randn(6, 10, generator=generator)) + 0.3 * torch.randn(len(labels), 10, generator=generator)
    class_distance = class_distance_matrix(torch.randn(n_classes, 5, generator=generator))
    return HuseSplit(image, text, labels), class_distance


def test_batches_cover_each_epoch_once():
    batches = ResumableBatches(10, 4, seed=0)
    first_epoch = torch.cat([batches.next() for _ in range(3)])  # 4 + 4 + 2
    assert sorted(first_epoch.tolist()) == list(range(10))


def test_tiny_batch_overfits():
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=150, batch_size=16, learning_rate=2e-3, log_every=50, seed=0)
    no_dropout = HuseArchitecture(embedding_dim=8, hidden_dim=16, dropout=0.0)  # memorising, not generalising
    trained = train_huse(split, class_distance, LossWeights(margin=1.0), config, no_dropout, progress=False)
    history = trained.history
    assert list(history["step"]) == [50, 100, 150]
    assert history["total"].iloc[-1] < 0.05 * history["total"].iloc[0]
    outputs = embed_split(trained.model, split)
    table = classification_table(outputs, image_weight=0.5)
    assert table.loc["image", "accuracy"] == 100.0 and table.loc["text", "accuracy"] == 100.0
    assert outputs.embeddings["image"].shape == (16, 8)


def test_training_is_reproducible_with_a_seed():
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=20, batch_size=8, learning_rate=1e-3, seed=3)
    assert seeded_repeat_check(split, class_distance, config=config, architecture=SMALL)
    a = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False).model
    b = train_huse(split, class_distance, config=TrainConfig(num_steps=20, batch_size=8, learning_rate=1e-3, seed=4),
                   architecture=SMALL, progress=False).model
    assert not torch.equal(a.classifier.weight, b.classifier.weight)


def test_training_rejects_labels_outside_class_distance():
    split, _ = toy_split()
    with pytest.raises(ParameterError, match="class indices"):
        train_huse(split, torch.zeros(2, 2), config=TrainConfig(num_steps=1), architecture=SMALL, progress=False)


def test_separate_models_have_one_tower_each_and_evaluate():
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=5, batch_size=8, learning_rate=1e-3)
    models = train_separate(split, class_distance, config=config, architecture=SMALL, progress=False)
    assert models["image"].model.modalities == ("image",) and models["text"].model.modalities == ("text",)
    assert models["image"].history["gap"].eq(0).all()  # one modality: no pairs, no gap
    outputs = embed_split({m: t.model for m, t in models.items()}, split)
    evaluation = evaluate_huse(outputs, image_weight=0.5)
    assert list(evaluation.retrieval.index) == ["image->image", "image->text", "text->image", "text->text"]


def test_fusion_weight_choice_and_fusion():
    # Item 0 is right only by the image, items 1-2 only by the text.
    image = torch.tensor([[0.9, 0.1], [0.6, 0.4], [0.6, 0.4]])
    text = torch.tensor([[0.2, 0.8], [0.1, 0.9], [0.1, 0.9]])
    labels = torch.tensor([0, 1, 1])
    fused = fuse_probabilities(image, text, 0.25)
    assert torch.allclose(fused[0], torch.tensor([0.375, 0.625]))
    outputs = SplitOutputs({}, {"image": image, "text": text}, labels)
    # Fused, item 0 is right iff 0.8w - 0.6(1-w) > 0 <=> w > 3/7; items 1-2 iff 0.8 - w > 0 <=> w < 0.8.
    # Candidates 0.45 .. 0.75 are all perfect; the tie goes to the one closest to 0.5.
    assert choose_fusion_weight(outputs) == pytest.approx(0.5)
    assert classification_table(outputs, 0.5).loc["fusion", "accuracy"] == pytest.approx(100.0)
    assert classification_table(outputs, 0.0).loc["fusion", "accuracy"] == pytest.approx(200 / 3)


def test_grid_search_ranks_combinations_and_returns_best_weights():
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=10, batch_size=8, learning_rate=1e-3)
    table = grid_search(split, split, class_distance, {"beta": [0.0, 1.0], "margin": [0.5]}, config=config,
                        architecture=SMALL)
    assert len(table) == 2 and set(table["beta"]) == {0.0, 1.0}
    assert table["mean_R@1"].is_monotonic_decreasing
    best = best_weights(table)
    assert isinstance(best, LossWeights) and best.beta == table.loc[0, "beta"]
    with pytest.raises(ParameterError, match="not loss settings"):
        grid_search(split, split, class_distance, {"lr": [1.0]}, config=config, architecture=SMALL)


def test_build_splits_aligns_rows_and_drops_unusable_items():
    import pandas as pd

    items = pd.DataFrame({"label": ["b", "a", "b", "a"], "split": ["train", "train", "test", "train"],
                          "item_id": ["w", "x", "y", "z"]})
    image = np.arange(8, dtype=np.float32).reshape(4, 2)
    text = -image
    splits, dropped = build_splits(items, ["a", "b"], image, text, usable=np.array([True, True, True, False]))
    assert splits["train"].labels.tolist() == [1, 0] and splits["test"].labels.tolist() == [1]
    assert splits["train"].image.tolist() == [[0, 1], [2, 3]] and splits["test"].text.tolist() == [[-4, -5]]
    assert splits["train"].items["item_id"].tolist() == ["w", "x"]
    assert dropped["item_id"].tolist() == ["z"]
    with pytest.raises(ParameterError, match="not in the class list"):
        build_splits(items, ["a"], image, text)


def test_project_2d_shared_axes_hand_case():
    coords = project_2d({"image": torch.tensor([[1.0, 0, 0], [-1.0, 0, 0]]),
                         "text": torch.tensor([[0, 2.0, 0], [0, -2.0, 0]])})
    # PC1 is the y axis (variance 8 vs 2), PC2 the x axis; signs make the largest loading positive.
    assert np.allclose(coords["image"], [[0, 1], [0, -1]], atol=1e-9)
    assert np.allclose(coords["text"], [[2, 0], [-2, 0]], atol=1e-9)


def test_side_by_side_puts_paper_value_after_each_metric():
    import pandas as pd

    ours = pd.DataFrame({"accuracy": {"image": 50.0, "fusion": 80.0}})
    paper = pd.DataFrame({"table": ["classification"], "row": ["fusion"], "metric": ["accuracy"], "value": [92.3],
                          "source": ["x"], "note": [""]})
    table = side_by_side(ours, "classification", paper)
    assert list(table.columns) == ["accuracy (ours)", "accuracy (paper)"]
    assert table.loc["fusion", "accuracy (paper)"] == 92.3 and np.isnan(table.loc["image", "accuracy (paper)"])


def test_committed_paper_table_cites_a_table_for_every_row():
    table = paper_numbers()
    assert set(table["table"]) == {"classification", "retrieval", "hierarchical"}
    assert table["source"].str.contains(r"arXiv:1911\.05978\), Table \d").all()
    assert table["value"].dropna().between(0, 100).all()
    assert (table["note"].str.len() > 0).all()  # every entry says how sure it is


def test_retrieval_examples_exclude_the_query_pair(tmp_path):
    import pandas as pd
    from PIL import Image

    from zsl_utils.huse.evaluation import retrieval_examples

    paths = []
    for i in range(3):
        paths.append(tmp_path / f"{i}.png")
        Image.new("RGB", (4, 4), (80 * i, 0, 0)).save(paths[-1])
    items = pd.DataFrame({"image_path": [str(p) for p in paths], "text": ["t0", "t1", "t2"], "label": ["a", "b", "a"]})
    # Item 0's image is closest to text 0 (excluded), then text 2, then text 1.
    outputs = SplitOutputs({"image": IMAGES[[0, 1, 2]], "text": torch.tensor([unit(0), unit(120), unit(20)])},
                           {}, torch.tensor([0, 1, 0]))
    image_queries, text_queries = retrieval_examples(outputs, items, n_queries=3, k=2, seed=0)
    first = next(q for q in image_queries if q[0].getpixel((0, 0)) == (0, 0, 0))
    assert [t for t, _ in first[2]] == ["t2", "t1"] and first[1] == "a"
    assert len(image_queries) == len(text_queries) == 3
    text_zero = next(q for q in text_queries if q[0] == "t0")  # text 0 (0 deg): images at 60 and 90 deg, own image excluded
    assert [label for _, label in text_zero[2]] == ["b", "a"]


# ---------------------------------------------------------------------------- resume from checkpoints
def _assert_same_training(expected, got) -> None:
    for key, value in expected.model.state_dict().items():
        assert torch.equal(value, got.model.state_dict()[key]), key
    assert expected.history.equals(got.history)


def test_training_interrupted_after_the_midway_checkpoint_resumes_bitwise(tmp_path, monkeypatch):
    import zsl_utils.huse.training as huse_train
    from zsl_utils.checkpoint import list_checkpoints

    split, class_distance = toy_split()
    # 12 steps, checkpoint at 6; loss rows every 4 steps, so the checkpoint holds a half-full window
    # (steps 5-6); batches of 6 of 16 items, so it also falls inside an epoch.
    config = TrainConfig(num_steps=12, batch_size=6, learning_rate=1e-2, log_every=4, seed=1)
    uninterrupted = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False)
    calls, real_loss = [], huse_train.huse_loss

    def loss_then_interrupt(*args, **kwargs):
        calls.append(1)
        if len(calls) == 9:  # step 9: after the checkpoint of step 6, before the next one
            raise KeyboardInterrupt("simulated kill")
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(huse_train, "huse_loss", loss_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        train_huse(split, class_distance, config=config, architecture=SMALL, progress=False,
                   checkpoint_dir=tmp_path, checkpoint_every=6)
    monkeypatch.setattr(huse_train, "huse_loss", real_loss)
    (folder,) = tmp_path.iterdir()
    assert [step for step, _ in list_checkpoints(folder)] == [6]
    torch.manual_seed(12345)  # the resumed run must not depend on the global RNG state it starts from
    resumed = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False,
                         checkpoint_dir=tmp_path, checkpoint_every=6)
    assert resumed.extras == {"resumed_from_step": 6, "checkpoint_dir": str(folder)}
    _assert_same_training(uninterrupted, resumed)
    assert list(resumed.history["step"]) == [4, 8, 12]
    assert [step for step, _ in list_checkpoints(folder)] == [6, 12]
    finished = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False,
                          checkpoint_dir=tmp_path, checkpoint_every=6)  # nothing left to train
    assert finished.extras["resumed_from_step"] == 12
    _assert_same_training(uninterrupted, finished)


def test_checkpoint_folders_are_per_configuration_and_arguments_checked(tmp_path):
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=3, batch_size=8, learning_rate=1e-3)
    for margin in (0.5, 0.7):
        trained = train_huse(split, class_distance, LossWeights(margin=margin), config, SMALL, progress=False,
                             checkpoint_dir=tmp_path, checkpoint_every=2)
        assert trained.extras["resumed_from_step"] == 0  # another margin never resumes the first run
    assert len(list(tmp_path.iterdir())) == 2
    with pytest.raises(ParameterError, match="pass both"):
        train_huse(split, class_distance, config=config, architecture=SMALL, progress=False, checkpoint_every=2)
    with pytest.raises(ParameterError, match="pass both"):
        train_huse(split, class_distance, config=config, architecture=SMALL, progress=False, checkpoint_dir=tmp_path)
    with pytest.raises(ParameterError, match="checkpoint_every"):
        train_huse(split, class_distance, config=config, architecture=SMALL, progress=False, checkpoint_dir=tmp_path,
                   checkpoint_every=-1)


def test_grid_search_rerun_reloads_every_finished_combination(tmp_path):
    split, class_distance = toy_split()
    config = TrainConfig(num_steps=6, batch_size=8, learning_rate=1e-3)
    grid = {"beta": [0.0, 1.0]}
    plain = grid_search(split, split, class_distance, grid, config=config, architecture=SMALL, progress=False)
    first = grid_search(split, split, class_distance, grid, config=config, architecture=SMALL, progress=False,
                        checkpoint_dir=tmp_path, checkpoint_every=4)
    files = sorted(tmp_path.rglob("step_*.pt"))
    assert [p.name for p in files] == ["step_000000004.pt", "step_000000006.pt"] * 2  # two folders
    stamps = [p.stat().st_mtime_ns for p in files]
    again = grid_search(split, split, class_distance, grid, config=config, architecture=SMALL, progress=False,
                        checkpoint_dir=tmp_path, checkpoint_every=4)
    assert [p.stat().st_mtime_ns for p in sorted(tmp_path.rglob("step_*.pt"))] == stamps  # nothing retrained
    pd.testing.assert_frame_equal(plain, first)
    pd.testing.assert_frame_equal(first, again)


_KILLED_TRAINER = """
import sys, time
import numpy as np, torch
import zsl_utils.huse.training as huse_train
from zsl_utils.huse.model import HuseArchitecture, HuseSplit
data = np.load(sys.argv[1])
real_loss = huse_train.huse_loss
def slow_loss(*args, **kwargs):  # widen the window for the kill
    time.sleep(0.05)
    return real_loss(*args, **kwargs)
huse_train.huse_loss = slow_loss
config = huse_train.TrainConfig(num_steps=60, batch_size=6, learning_rate=1e-2, log_every=4, seed=1)
huse_train.train_huse(HuseSplit(data["image"], data["text"], data["labels"]), torch.as_tensor(data["distance"]),
                      config=config, architecture=HuseArchitecture(embedding_dim=8, hidden_dim=16),
                      progress=False, checkpoint_dir=sys.argv[2], checkpoint_every=5)
"""


def test_training_killed_with_sigkill_resumes_bitwise(tmp_path):
    import signal
    import subprocess
    import sys
    import time

    from zsl_utils.checkpoint import list_checkpoints

    split, class_distance = toy_split()
    inputs = tmp_path / "inputs.npz"
    features = split.features()
    np.savez(inputs, image=features["image"].numpy(), text=features["text"].numpy(), labels=split.labels.numpy(),
             distance=class_distance.numpy())
    checkpoints = tmp_path / "checkpoints"
    child = subprocess.Popen([sys.executable, "-c", _KILLED_TRAINER, str(inputs), str(checkpoints)])
    deadline = time.monotonic() + 60
    while not any(step >= 10 for folder in checkpoints.glob("huse_*") for step, _ in list_checkpoints(folder)):
        assert child.poll() is None and time.monotonic() < deadline, "the trainer ended before its second checkpoint"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=30)
    (folder,) = checkpoints.iterdir()
    killed_at = list_checkpoints(folder)[-1][0]
    assert 10 <= killed_at < 60
    config = TrainConfig(num_steps=60, batch_size=6, learning_rate=1e-2, log_every=4, seed=1)
    resumed = train_huse(split, class_distance, config=config, architecture=SMALL, progress=False,
                         checkpoint_dir=checkpoints, checkpoint_every=5)
    assert resumed.extras["resumed_from_step"] == killed_at
    _assert_same_training(train_huse(split, class_distance, config=config, architecture=SMALL, progress=False), resumed)


# ---------------------------------------------------------------- collapse diagnostics, seeds (issue 11)


def test_participation_ratio_by_hand():
    line = torch.tensor([[1.0, 2.0], [2.0, 4.0], [-1.0, -2.0]])
    assert participation_ratio(line) == pytest.approx(1.0)
    isotropic = torch.cat([torch.eye(3), -torch.eye(3)])  # covariance 2/5 * I
    assert participation_ratio(isotropic) == pytest.approx(3.0)
    # Variances 8/3 and 2/3 along the axes: (10/3)^2 / ((8/3)^2 + (2/3)^2) = 100 / 68.
    stretched = torch.tensor([[2.0, 0.0], [-2.0, 0.0], [0.0, 1.0], [0.0, -1.0]])
    assert participation_ratio(stretched) == pytest.approx(100 / 68)


def test_active_unit_fractions_by_hand():
    linear = torch.nn.Linear(2, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0]]))
        linear.bias.copy_(torch.tensor([1.0, -1.0, 0.0]))  # unit 0 always on, unit 1 dead, unit 2 on for x0 > 0
    tower = torch.nn.Sequential(linear, torch.nn.ReLU(), torch.nn.Linear(3, 1), torch.nn.ReLU())
    with torch.no_grad():
        tower[2].weight.fill_(0.0)
        tower[2].bias.fill_(-1.0)  # the output unit is dead
    fractions = active_unit_fractions(tower, torch.tensor([[-1.0, 0.0], [2.0, 0.0]]))
    assert fractions == pytest.approx([2 / 3, 0.0])
    assert active_unit_fractions(tower, torch.tensor([[-1.0, 0.0]])) == pytest.approx([1 / 3, 0.0])


def separable_image_problem(n_classes: int = 6, per_class: int = 10, dim: int = 64, seed: int = 0):
    """Well-separated classes in non-negative, Lite0-sized features (row norm ~16), text a noisy copy."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n_classes).repeat_interleave(per_class)
    prototypes = 4 * torch.rand(n_classes, dim, generator=generator)
    image = (prototypes[labels] + 0.5 * torch.rand(len(labels), dim, generator=generator)).relu()
    text = F.normalize(torch.randn(n_classes, 16, generator=generator)[labels], dim=1)
    return HuseSplit(image, text, labels), class_distance_matrix(torch.randn(n_classes, 8, generator=generator))


def test_five_layer_image_tower_does_not_collapse_on_a_separable_problem():
    split, class_distance = separable_image_problem()
    config = TrainConfig(num_steps=150, batch_size=32, learning_rate=1e-4, seed=0, modalities=("image",))
    trained = train_huse(split, class_distance, LossWeights(beta=0.0), config, HuseArchitecture(embedding_dim=64),
                         progress=False)
    diagnostics = tower_diagnostics(trained.model, split).loc["image"]
    assert diagnostics["accuracy (%)"] == 100.0
    assert diagnostics["embedding effective dim"] >= 3  # 6 classes spread over several directions, not a line
    assert diagnostics["lowest active-unit share"] >= 0.5
    assert len(trained.history.filter(like="accuracy_").columns) == 1  # per-modality monitors: image only


def test_torch_default_init_starves_the_deep_tower_before_training():
    split, _ = separable_image_problem()
    shares = {}
    for init in ("torch", "he"):
        torch.manual_seed(0)
        model = HuseModel({"image": 64}, 6, HuseArchitecture(init=init))
        shares[init] = active_unit_fractions(model.towers["image"], split.image)[-1]
        output = model.towers["image"].eval()(split.image)
        if init == "he":
            assert all(torch.count_nonzero(m.bias) == 0 for m in model.towers["image"] if isinstance(m, nn.Linear))
    assert shares["torch"] < shares["he"]
    with pytest.raises(ParameterError, match="init"):
        HuseArchitecture(init="xavier")
    assert output.shape == (len(split), 512)


def test_loss_shares_over_the_second_half():
    history = pd.DataFrame({"step": [1, 2, 3, 4], "total": [10.0, 10.0, 4.0, 2.0], "classification": [9.0, 9.0, 2.0, 1.0],
                            "graph": [0.5, 0.5, 1.0, 0.25], "gap": [1.0, 1.0, 1.0, 1.0]})
    trained = TrainedHuse(None, history, LossWeights(alpha=1.0, beta=2.0, gamma=0.0), TrainConfig(num_steps=4),
                          HuseArchitecture())
    shares = loss_shares(trained)  # steps 3 and 4: classification 2/4, 1/2; graph 2*1/4, 2*0.25/2
    assert shares["classification"] == pytest.approx(0.5)
    assert shares["graph"] == pytest.approx(0.375)
    assert shares["gap"] == 0.0


def test_over_seeds_and_spreads_on_a_toy():
    split, class_distance = toy_split(n_per_class=6)
    splits = {"train": split, "val": split, "test": split}
    config = TrainConfig(num_steps=10, batch_size=8, learning_rate=1e-3)
    settings = {"joint": dict(weights=LossWeights()), "separate": dict(weights=LossWeights(), separate=True)}
    results = over_seeds(settings, [0, 1], config, progress=False, splits=splits, class_distance=class_distance,
                         ks=(1,), architecture=SMALL)
    assert [len(r) for r in results.values()] == [2, 2]
    assert isinstance(results["separate"][0][0], dict)
    first = fit_and_evaluate(splits, class_distance, LossWeights(), replace(config, seed=1), ks=(1,),
                             architecture=SMALL)
    assert first[1].headline().equals(results["joint"][1][1].headline())  # seed 1 is seed 1
    spreads = seed_spreads(results)
    headlines = [e.headline() for _, e in results["joint"]]
    row = "R@1 image->text"
    assert spreads["joint"].loc[row, "mean"] == pytest.approx((headlines[0][row] + headlines[1][row]) / 2)
    assert spreads["joint"].loc[row, "seeds"] == 2


def test_seed_table_by_hand():
    tables = [pd.DataFrame({"accuracy": [50.0, 70.0]}, index=["image", "text"]),
              pd.DataFrame({"accuracy": [52.0, 70.0]}, index=["image", "text"])]
    table = seed_table(tables)
    assert table.loc["image", "accuracy (ours, 2 seeds)"] == f"51.0 ± {math.sqrt(2):.1f}"
    assert table.loc["text", "accuracy (ours, 2 seeds)"] == "70.0 ± 0.0"


def test_grid_search_averages_over_seeds():
    split, class_distance = toy_split(n_per_class=6)
    config = TrainConfig(num_steps=5, batch_size=8, learning_rate=1e-3)
    table = grid_search(split, split, class_distance, {"beta": [0.0, 1.0]}, config=config, architecture=SMALL,
                        progress=False, seeds=[0, 1])
    assert len(table) == 2 and table["mean_R@1 sd"].notna().all()


def test_best_weights_keeps_the_default_unless_clearly_beaten():
    grid = pd.DataFrame([{**asdict(LossWeights(beta=1.0)), "mean_R@1": 70.0, "mean_R@1 sd": 1.0},
                         {**asdict(LossWeights(beta=3.0)), "mean_R@1": 68.5, "mean_R@1 sd": 1.0},
                         {**asdict(LossWeights(beta=10.0)), "mean_R@1": 60.0, "mean_R@1 sd": 1.0}])
    assert best_weights(grid) == LossWeights(beta=1.0)
    assert best_weights(grid, default=LossWeights(beta=3.0)) == LossWeights(beta=3.0)  # 1.5 <= 1 + 1
    assert best_weights(grid, default=LossWeights(beta=10.0)) == LossWeights(beta=1.0)  # 10 > 2: clearly beaten
    assert best_weights(grid, default=LossWeights(beta=0.5)) == LossWeights(beta=1.0)  # not in the grid
