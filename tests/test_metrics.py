"""Flat hit@k, tree distance and hierarchical precision@k on hand-built cases."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from zsl_utils.errors import ParameterError
from zsl_utils.metrics import (
    Hierarchy,
    clearly_different,
    correct_sets,
    difference_counts,
    flat_hit_at_k,
    hierarchical_precision_at_k,
    hierarchical_precision_sums,
    mean_sd_text,
    seed_spread,
)

# root -> fruit -> apple, pear ; root -> veg -> kale, leek, okra
CLASSES = ["apple", "pear", "kale", "leek", "okra"]
PARENTS = {"apple": ["fruit"], "pear": ["fruit"], "kale": ["veg"], "leek": ["veg"], "okra": ["veg"],
           "fruit": ["root"], "veg": ["root"]}

# A DAG where "down then up" would be a shortcut: x has two parents a and b.
#   root -> a -> a1 ; root -> m -> n -> b ; a -> x ; b -> x
DAG = {"a": ["root"], "a1": ["a"], "m": ["root"], "n": ["m"], "b": ["n"], "x": ["a", "b"]}


def distances_from(hierarchy, label, max_distance=None):
    """Tree distance from ``label`` to every node within ``max_distance`` (node index -> d), by rings."""
    return {n: d for d, ring in hierarchy.rings(label) if max_distance is None or d <= max_distance for n in ring}


def test_flat_hit_at_k_hand_case():
    top = np.array([[2, 0, 1], [0, 1, 2], [1, 2, 0], [1, 2, 1]])
    true = [0, 0, 0, 0]  # ranks 2, 1, 3, absent
    assert flat_hit_at_k(top, true, ks=(1, 2, 3)) == {1: 0.25, 2: 0.5, 3: 0.75}


def test_flat_hit_rejects_k_beyond_ranking_and_shape_mismatch():
    with pytest.raises(ParameterError, match="ks=.*1..3"):
        flat_hit_at_k(np.zeros((2, 3), int), [0, 0], ks=(1, 5))
    with pytest.raises(ParameterError, match="one row per true label"):
        flat_hit_at_k(np.zeros((2, 3), int), [0], ks=(1,))


def test_tree_distances_on_a_tree():
    tree = Hierarchy.from_parents(PARENTS)
    by_name = {tree.nodes[n]: d for n, d in distances_from(tree, "apple").items()}
    assert by_name == {"apple": 0, "fruit": 1, "pear": 2, "root": 2, "veg": 3, "kale": 4, "leek": 4, "okra": 4}
    limited = {tree.nodes[n] for n in distances_from(tree, "apple", max_distance=2)}
    assert limited == {"apple", "fruit", "pear", "root"}


def test_tree_distance_ignores_down_then_up_paths():
    dag = Hierarchy.from_parents(DAG)
    d = {dag.nodes[n]: v for n, v in distances_from(dag, "a1").items()}
    # a1 -> a -> x -> b would be 3 steps but goes down then up; the climb through root is 5.
    assert d["x"] == 2 and d["b"] == 5
    # From x both parents are one step up.
    d_x = {dag.nodes[n]: v for n, v in distances_from(dag, "x").items()}
    assert d_x["a"] == d_x["b"] == 1 and d_x["a1"] == 2 and d_x["root"] == 2 and d_x["n"] == 2


def test_any_path_reading_allows_down_then_up():
    d = {n: v for n, v in distances_from(Hierarchy.from_parents(DAG).any_path(), "a1").items()}
    index = Hierarchy.from_parents(DAG).index
    # a1 -> a -> x -> b is now allowed: 3 steps (5 when only climb-then-descend counts)
    assert d[index["x"]] == 2 and d[index["b"]] == 3 and d[index["n"]] == 4


def test_vectorised_nearest_source_distance_matches_single_source_search():
    rng = np.random.default_rng(0)
    parents = {f"n{i}": [f"n{j}" for j in rng.choice(i, size=min(i, rng.integers(1, 3)), replace=False)]
               for i in range(1, 60)}
    dag = Hierarchy.from_parents(parents)
    sources = ["n5", "n17", "n40"]
    vectorised = dag.distance_to_nearest(sources)
    for node in range(len(dag)):
        expected = min(distances_from(dag, s).get(node, 10**9) for s in sources)
        assert vectorised[node] == (expected if expected < 10**9 else -1)


def test_correct_set_rings():
    tree = Hierarchy.from_parents(PARENTS)
    sets = correct_sets("apple", CLASSES, tree, ks=(1, 2, 3, 6))
    assert sets.radius == {1: 0, 2: 2, 3: 4, 6: 4}  # 6 > 5 reachable candidates: stop at the last ring
    assert sets.members(1) == {0} and sets.members(2) == {0, 1} and sets.members(3) == {0, 1, 2, 3, 4}
    # A label outside the hierarchy only counts itself.
    assert correct_sets("moon", CLASSES + ["moon"], tree, ks=(1, 5)).members(5) == {5}


def test_hierarchical_precision_hand_case():
    tree = Hierarchy.from_parents(PARENTS)
    # image 1: true apple, ranked pear, apple, kale   -> hp@1 0, hp@2 2/2, hp@3 3/3
    # image 2: true kale,  ranked kale, apple, leek   -> hp@1 1, hp@2 1/2, hp@3 2/3
    top = np.array([[1, 0, 2], [2, 0, 3]])
    hp = hierarchical_precision_at_k(top, ["apple", "kale"], CLASSES, tree, ks=(1, 2, 3))
    assert hp[1] == pytest.approx(0.5) and hp[2] == pytest.approx(0.75) and hp[3] == pytest.approx(5 / 6)
    sums = hierarchical_precision_sums(top, ["apple", "kale"], CLASSES, tree, ks=(1, 2, 3))
    assert sums[3] == pytest.approx(1 + 2 / 3)


def test_hp_at_1_equals_hit_at_1_and_hp_bounds():
    tree = Hierarchy.from_parents(PARENTS)
    rng = np.random.default_rng(1)
    top = np.stack([rng.permutation(5) for _ in range(200)])
    true_idx = rng.integers(0, 5, size=200)
    hp = hierarchical_precision_at_k(top, [CLASSES[i] for i in true_idx], CLASSES, tree, ks=(1, 2, 5))
    assert hp[1] == pytest.approx(flat_hit_at_k(top, true_idx, ks=(1,))[1])
    assert hp[5] == pytest.approx(1.0)  # every permutation holds all 5 labels, S_5 = all 5
    assert hp[2] >= flat_hit_at_k(top, true_idx, ks=(2,))[2] / 2


def test_hp_requires_true_labels_among_candidates():
    tree = Hierarchy.from_parents(PARENTS)
    with pytest.raises(ParameterError, match="not among the 2 candidates"):
        hierarchical_precision_at_k(np.array([[0]]), ["kale"], ["apple", "pear"], tree, ks=(1,))


def test_seed_spread_and_clear_differences_by_hand():
    first = seed_spread([pd.Series({"a": 10.0, "b": 5.0}), pd.Series({"a": 12.0, "b": 7.0})])  # sd sqrt(2) each
    second = seed_spread([pd.Series({"a": 6.0, "b": 6.0}), pd.Series({"a": 6.0, "b": 6.0})])  # sd 0
    assert first.loc["a", "mean"] == 11.0 and first.loc["a", "sd"] == pytest.approx(2 ** 0.5)
    assert first.loc["a", "seeds"] == 2
    # a: 11 vs 6, gap 5 > sqrt(2) + 0 -> different; b: 6 vs 6 -> not.
    assert clearly_different(first, second).tolist() == [True, False]
    assert clearly_different(first.loc["a"], second.loc["a"])
    assert difference_counts(first, second) == (1, 0, 1)
    assert difference_counts(second, first) == (0, 1, 1)
    assert mean_sd_text(first).tolist() == ["11.0 ± 1.4", "6.0 ± 1.4"]
