"""Retrieval recall@K and hierarchical precision H@k (HUSE evaluation) on hand-built cases."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from zsl_utils.errors import ParameterError
from zsl_utils.metrics import (
    hierarchy_correct_sets,
    retrieval_hierarchical_precision_at_k,
    retrieval_neighbours,
    retrieval_recall_at_k,
)


def at_angles(*degrees: float) -> torch.Tensor:
    return torch.tensor([[math.cos(math.radians(d)), math.sin(math.radians(d))] for d in degrees])


# Four items at 0, 10, 100 and 95 degrees with classes 0, 1, 1, 0. Excluding each item from
# its own ranking, the neighbours by angle are:
#   item 0 -> 1 (10), 3 (95), 2 (100): labels 1, 0, 1 -> first hit at rank 2
#   item 1 -> 0 (10), 3 (85), 2 (90):  labels 0, 0, 1 -> first hit at rank 3
#   item 2 -> 3 (5),  1 (90), 0 (100): labels 0, 1, 0 -> first hit at rank 2
#   item 3 -> 2 (5),  1 (85), 0 (95):  labels 1, 1, 0 -> first hit at rank 3
ITEMS = at_angles(0, 10, 100, 95)
ITEM_LABELS = [0, 1, 1, 0]


def test_neighbours_exclude_the_item_itself():
    neighbours = retrieval_neighbours(ITEMS, ITEMS, k=3, exclude_same_index=True)
    assert neighbours.tolist() == [[1, 3, 2], [0, 3, 2], [3, 1, 0], [2, 1, 0]]
    with_self = retrieval_neighbours(ITEMS, ITEMS, k=1)
    assert with_self[:, 0].tolist() == [0, 1, 2, 3]


def test_recall_at_k_hand_case():
    recall = retrieval_recall_at_k(ITEMS, ITEMS, ITEM_LABELS, ITEM_LABELS, ks=(1, 2, 3), exclude_same_index=True)
    assert recall == {1: 0.0, 2: 0.5, 3: 1.0}


def test_recall_chunking_does_not_change_results():
    generator = torch.Generator().manual_seed(0)
    queries, gallery = torch.randn(37, 5, generator=generator), torch.randn(37, 5, generator=generator)
    labels = torch.randint(0, 4, (37,), generator=generator)
    whole = retrieval_recall_at_k(queries, gallery, labels, labels, ks=(1, 5), exclude_same_index=True, chunk_size=1000)
    chunked = retrieval_recall_at_k(queries, gallery, labels, labels, ks=(1, 5), exclude_same_index=True, chunk_size=4)
    assert whole == chunked


def test_cross_modal_recall_with_numpy_inputs():
    query = np.asarray(at_angles(0))
    gallery = np.asarray(at_angles(50, 20, -10))
    assert retrieval_neighbours(query, gallery, k=3).tolist() == [[2, 1, 0]]
    recall = retrieval_recall_at_k(query, gallery, [0], [0, 1, 1], ks=(1, 2, 3))
    assert recall == {1: 0.0, 2: 0.0, 3: 1.0}


def test_retrieval_rejects_bad_shapes_and_k():
    with pytest.raises(ParameterError, match="same D"):
        retrieval_neighbours(torch.zeros(2, 3), torch.zeros(2, 4), k=1)
    with pytest.raises(ParameterError, match="k=4"):
        retrieval_neighbours(ITEMS, ITEMS, k=4, exclude_same_index=True)
    with pytest.raises(ParameterError, match="as many queries"):
        retrieval_neighbours(ITEMS[:2], ITEMS, k=1, exclude_same_index=True)


# root -> fruit -> apple, pear ; root -> veg -> kale, leek, okra
CLASSES = ["apple", "pear", "kale", "leek", "okra"]
PARENTS = {"apple": ["fruit"], "pear": ["fruit"], "kale": ["veg"], "leek": ["veg"], "okra": ["veg"],
           "fruit": ["root"], "veg": ["root"]}


def test_correct_sets_grow_by_hierarchy_distance():
    assert hierarchy_correct_sets(CLASSES, PARENTS, 1) == [frozenset({i}) for i in range(5)]
    k2 = hierarchy_correct_sets(CLASSES, PARENTS, 2)
    assert k2[0] == {0, 1}  # apple: its sibling at distance 2
    assert k2[2] == {2, 3, 4}  # kale: radius 2 brings both siblings at once
    k3 = hierarchy_correct_sets(CLASSES, PARENTS, 3)
    assert k3[0] == {0, 1, 2, 3, 4}  # radius 2 gives 2 < 3 classes, radius 4 gives all
    assert k3[3] == {2, 3, 4}


def test_correct_sets_stop_at_reachable_classes():
    # "moon" is not in the hierarchy: it can only ever count itself.
    sets = hierarchy_correct_sets(CLASSES + ["moon"], PARENTS, 10)
    assert sets[5] == {5} and sets[0] == {0, 1, 2, 3, 4}


def test_hierarchical_precision_hand_case():
    correct = {1: hierarchy_correct_sets(CLASSES, PARENTS, 1), 2: hierarchy_correct_sets(CLASSES, PARENTS, 2)}
    query = at_angles(0)
    gallery = at_angles(10, 20, 30)
    gallery_labels = [1, 2, 0]  # pear, kale, apple
    precision = retrieval_hierarchical_precision_at_k(query, gallery, [0], gallery_labels, correct)
    # top-1 = pear: not apple -> 0; top-2 = pear, kale: pear is in apple's k=2 set -> 1/2.
    assert precision == {1: 0.0, 2: 0.5}
    # A kale query over the same gallery: top-2 = pear, kale; kale's k=2 set is the vegetables.
    precision_kale = retrieval_hierarchical_precision_at_k(query, gallery, [2], gallery_labels, correct)
    assert precision_kale == {1: 0.0, 2: 0.5}
