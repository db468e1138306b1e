r"""Evaluation metrics: flat hit@k, hierarchical precision@k (ConSE / DeViSE), retrieval (HUSE).

**Flat hit@k**: the share of images whose true label is among the first ``k`` ranked candidates.

**Tree distance.** Labels live in an is-a hierarchy (WordNet). The distance between ``u`` and
``v`` is the shortest path that first climbs from ``u`` to a common ancestor ``a`` and then
descends to ``v``:

.. math:: d(u, v) = \min_{a \,\in\, \mathrm{Anc}^*(u) \cap \mathrm{Anc}^*(v)}
          \big[\mathrm{up}(u, a) + \mathrm{up}(v, a)\big],

where :math:`\mathrm{Anc}^*` includes the label itself and :math:`\mathrm{up}(x, a)` is the
fewest parent links from ``x`` to ``a``. In a tree this is the path length; in a DAG like
WordNet it ignores "down then up" paths (through a shared child to a co-parent), which we read
as not expressing similarity: this is our reading of DeViSE's definition, which does not say;
:meth:`Hierarchy.any_path` gives the other one (any shortest path). Labels with no common
ancestor are at infinite distance.

**Hierarchical precision@k** (DeViSE appendix; ConSE Sec. 5). For true label ``y`` and
candidates ``C`` the *correct set* grows in rings around ``y``:

.. math:: S_k(y) = \{v \in C : d(y, v) \le R_k(y)\}, \qquad
          R_k(y) = \min\{R \ge 0 : |\{v \in C : d(y, v) \le R\}| \ge k\},

(:math:`R_k(y)` the largest finite distance if fewer than ``k`` candidates are reachable), and
:math:`\mathrm{hp@}k = \frac{1}{k}\,|\mathrm{top}_k \cap S_k(y)|`, averaged over images. As ``y``
is a candidate, :math:`S_1(y) = \{y\}` and hp@1 = hit@1; a whole ring is added at once, so
:math:`|S_k|` may exceed ``k``.
"""
from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd
import scipy.sparse as sp
import torch
import torch.nn.functional as F

from zsl_utils.errors import ParameterError

PAPER_KS = (1, 2, 5, 10, 20)


# ----------------------------------------------------------------------------- flat hit@k
def _check_ranked(top_indices: np.ndarray, n_true: int, ks: Sequence[int]) -> np.ndarray:
    top = np.asarray(top_indices)
    if top.ndim != 2 or top.shape[0] != n_true:
        raise ParameterError(f"ranked predictions must be [n_images, k_max] with one row per true label; got shape "
                             f"{top.shape} for {n_true} true labels.")
    if not ks or any(int(k) < 1 or int(k) > top.shape[1] for k in ks):
        raise ParameterError(f"ks={tuple(ks)} must be integers in 1..{top.shape[1]} (the number of ranked predictions "
                             f"per image); rank more candidates (e.g. k={max(ks) if ks else 20}) or drop the larger k.")
    return top


def flat_hit_at_k(top_indices: np.ndarray, true_indices: Sequence[int],
                  ks: Sequence[int] = PAPER_KS) -> dict[int, float]:
    """Flat hit@k per ``k``; ``top_indices[i]`` ranks candidate indices, ``true_indices[i]`` is the truth's."""
    top = _check_ranked(top_indices, len(true_indices), ks)
    if len(top) == 0:
        return {int(k): float("nan") for k in ks}
    match = top == np.asarray(true_indices).reshape(-1, 1)
    return {int(k): float(np.mean(match[:, : int(k)].any(axis=1))) for k in ks}


# ----------------------------------------------------------------------------- hierarchy
@dataclass
class Hierarchy:
    """An is-a DAG over string labels (build with :meth:`from_parents`, child -> parents)."""

    nodes: list[str]
    index: dict[str, int]
    parent_lists: list[tuple[int, ...]]
    child_lists: list[tuple[int, ...]]

    @classmethod
    def from_parents(cls, parents: Mapping[str, Sequence[str]]) -> "Hierarchy":
        """Labels that appear only as parents are nodes too; duplicate links are dropped."""
        index: dict[str, int] = {}
        for child, ps in parents.items():
            for name in (child, *ps):
                index.setdefault(name, len(index))
        parent_lists: list[list[int]] = [[] for _ in index]
        child_lists: list[list[int]] = [[] for _ in index]
        for child, ps in parents.items():
            for parent in dict.fromkeys(ps):
                parent_lists[index[child]].append(index[parent])
                child_lists[index[parent]].append(index[child])
        return cls(list(index), index, [tuple(p) for p in parent_lists], [tuple(c) for c in child_lists])

    def any_path(self) -> "Hierarchy":
        """The same graph with every link usable both ways: the distance becomes the shortest path, "down then up"
        included (the other reading of DeViSE's rule)."""
        links = [tuple(dict.fromkeys(p + c)) for p, c in zip(self.parent_lists, self.child_lists)]
        return Hierarchy(self.nodes, self.index, links, links)

    def __len__(self) -> int:
        return len(self.nodes)

    def __contains__(self, label: object) -> bool:
        return label in self.index

    def rings(self, label: str) -> Iterator[tuple[int, list[int]]]:
        """Yield ``(d, nodes first reached at tree distance d)`` for d = 0, 1, 2, ...: breadth-first search
        over (node, phase) states, phase "up" stepping to a parent or turning down to a child, phase "down"
        only to children (climb-then-descend), one ring at a time so a caller stops when it has enough."""
        start = self.index[label]
        reached = {start}
        up_seen, down_seen = {start}, set()
        up_frontier, down_frontier, distance = [start], [], 0
        yield 0, [start]
        while up_frontier or down_frontier:
            distance += 1
            next_up, next_down = [], []
            for node in up_frontier:
                next_up.extend(p for p in self.parent_lists[node] if p not in up_seen)
                up_seen.update(self.parent_lists[node])
            for node in up_frontier + down_frontier:
                next_down.extend(c for c in self.child_lists[node] if c not in down_seen)
                down_seen.update(self.child_lists[node])
            ring = [n for n in dict.fromkeys(next_up + next_down) if n not in reached]
            reached.update(ring)
            up_frontier, down_frontier = next_up, next_down
            if ring:
                yield distance, ring

    def distance_to_nearest(self, sources: Sequence[str], max_distance: int = 64) -> np.ndarray:
        """Tree distance from each node to the nearest of ``sources`` (-1 if unreachable): multi-source
        :meth:`rings`, each step a sparse matrix-vector product over the whole graph (ms for WordNet's 82k nodes)."""
        n = len(self.nodes)
        rows = [p for c, ps in enumerate(self.parent_lists) for p in ps]  # U[p, c] = 1: U @ x moves marks up
        cols = [c for c, ps in enumerate(self.parent_lists) for _ in ps]
        up = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, n))
        down = up.T.tocsr()
        src = np.zeros(n, bool)
        src[[self.index[s] for s in sources if s in self.index]] = True
        distance = np.where(src, 0, -1)
        up_front, up_seen = src.copy(), src.copy()
        down_front, down_seen = np.zeros(n, bool), np.zeros(n, bool)
        for step in range(1, max_distance + 1):
            if not (up_front.any() or down_front.any()):
                break
            new_up = (up @ up_front.astype(np.float32) > 0) & ~up_seen
            new_down = (down @ (up_front | down_front).astype(np.float32) > 0) & ~down_seen
            up_seen |= new_up
            down_seen |= new_down
            distance[(new_up | new_down) & (distance < 0)] = step
            up_front, down_front = new_up, new_down
        return distance


# ----------------------------------------------------------------------------- correct sets
@dataclass(frozen=True)
class CorrectSets:
    """For one true label: candidate index -> tree distance (within the largest radius needed)
    and the radius ``R_k`` per k, so ``S_k = {j : candidate_distance[j] <= radius[k]}``."""

    candidate_distance: Mapping[int, int]
    radius: Mapping[int, int]

    def members(self, k: int) -> frozenset[int]:
        return frozenset(j for j, d in self.candidate_distance.items() if d <= self.radius[k])


def correct_sets(true_label: str, candidates: Sequence[str], hierarchy: Hierarchy, ks: Sequence[int] = PAPER_KS,
                 candidate_index: Mapping[str, int] | None = None) -> CorrectSets:
    """The rings ``S_k(true_label)`` over ``candidates`` for every ``k`` in ``ks``; a label outside
    the hierarchy only ever counts itself (if it is a candidate)."""
    position = candidate_index if candidate_index is not None else {c: j for j, c in enumerate(candidates)}
    if true_label not in hierarchy:
        own = {position[true_label]: 0} if true_label in position else {}
        return CorrectSets(own, {int(k): 0 for k in ks})
    k_max = max(ks)
    found: dict[int, int] = {}
    cumulative: dict[int, int] = {}  # distance -> candidates within it
    for distance, ring in hierarchy.rings(true_label):  # stop at the first ring reaching k_max
        inside = [position[hierarchy.nodes[n]] for n in ring if hierarchy.nodes[n] in position]
        if inside:
            found.update(dict.fromkeys(inside, distance))
            cumulative[distance] = len(found)
            if len(found) >= k_max:
                break
    radius = {}
    for k in ks:
        within = [d for d, total in cumulative.items() if total >= k]
        radius[int(k)] = min(within) if within else max(cumulative, default=0)
    keep = max(radius.values())
    return CorrectSets({j: d for j, d in found.items() if d <= keep}, radius)


def hierarchy_correct_sets(classes: Sequence[str], parents: Mapping[str, Sequence[str]],
                           k: int) -> list[frozenset[int]]:
    """``S_k`` of every class over the class list itself (indices into ``classes``)."""
    hierarchy = Hierarchy.from_parents(parents)
    position = {c: j for j, c in enumerate(classes)}
    return [correct_sets(c, classes, hierarchy, [k], position).members(k) for c in classes]


def hierarchical_precision_at_k(top_indices: np.ndarray, true_labels: Sequence[str], candidates: Sequence[str],
                                hierarchy: Hierarchy, ks: Sequence[int] = PAPER_KS,
                                cache: dict[str, CorrectSets] | None = None) -> dict[int, float]:
    """Hierarchical precision@k averaged over images (see :func:`hierarchical_precision_sums`)."""
    sums = hierarchical_precision_sums(top_indices, true_labels, candidates, hierarchy, ks, cache)
    n = len(true_labels)
    return {k: (total / n if n else float("nan")) for k, total in sums.items()}


def hierarchical_precision_sums(top_indices: np.ndarray, true_labels: Sequence[str], candidates: Sequence[str],
                                hierarchy: Hierarchy, ks: Sequence[int] = PAPER_KS,
                                cache: dict[str, CorrectSets] | None = None,
                                candidate_index: Mapping[str, int] | None = None) -> dict[int, float]:
    """Sum over images of hp@k (stream: add sums, divide by the count); ``top_indices[i]`` ranks
    ``candidates`` for true label ``true_labels[i]`` (a candidate). ``cache`` (a dict you keep) reuses
    the correct sets across calls, e.g. across ConSE(1), ConSE(10) and ConSE(1000)."""
    top = _check_ranked(top_indices, len(true_labels), ks)
    position = candidate_index if candidate_index is not None else {c: j for j, c in enumerate(candidates)}
    missing = sorted({y for y in true_labels if y not in position})
    if missing:
        raise ParameterError(f"{len(missing)} true label(s) are not among the {len(position)} candidates, e.g. "
                             f"{missing[:5]}; hierarchical precision needs every test label to be a candidate.")
    cache = {} if cache is None else cache
    sums = {int(k): 0.0 for k in ks}
    for row, label in enumerate(true_labels):
        sets = cache.get(label)
        if sets is None:
            sets = cache[label] = correct_sets(label, candidates, hierarchy, ks, position)
        for k in sums:
            r = sets.radius[k]
            inside = sum(1 for j in top[row, :k].tolist() if sets.candidate_distance.get(j, r + 1) <= r)
            sums[k] += inside / k
    return sums


# ----------------------------------------------------------------------------- retrieval (HUSE)
# Every query ranks a gallery by cosine similarity; written for HUSE (notebook 03), model-agnostic.

def retrieval_neighbours(queries: torch.Tensor | np.ndarray, gallery: torch.Tensor | np.ndarray, k: int,
                         exclude_same_index: bool = False, chunk_size: int = 1024) -> torch.Tensor:
    """Indices ``(n_queries, k)`` of each query's ``k`` most cosine-similar gallery rows, best first (ties
    as ``torch.topk`` orders them), in query chunks. ``exclude_same_index=True`` drops gallery row ``i``
    from query ``i``'s ranking, for queries and gallery describing the same items."""
    queries = F.normalize(torch.as_tensor(queries, dtype=torch.float32), dim=1)
    gallery = F.normalize(torch.as_tensor(gallery, dtype=torch.float32), dim=1).to(queries.device)
    if queries.ndim != 2 or gallery.ndim != 2 or queries.shape[1] != gallery.shape[1]:
        raise ParameterError(f"retrieval needs (n, D) queries and (m, D) gallery of the same D; got "
                             f"{tuple(queries.shape)} and {tuple(gallery.shape)}.")
    if exclude_same_index and len(queries) != len(gallery):
        raise ParameterError(f"exclude_same_index=True needs as many queries as gallery rows (same items); got "
                             f"{len(queries)} and {len(gallery)}.")
    available = len(gallery) - (1 if exclude_same_index else 0)
    if not 1 <= k <= available:
        raise ParameterError(f"k={k} must lie in [1, {available}] for a gallery of {len(gallery)} rows.")
    parts = []
    for start in range(0, len(queries), chunk_size):
        similarity = queries[start : start + chunk_size] @ gallery.T
        if exclude_same_index:
            rows = torch.arange(len(similarity), device=similarity.device)
            similarity[rows, rows + start] = float("-inf")
        parts.append(similarity.topk(k, dim=1).indices)
    return torch.cat(parts) if parts else torch.empty((0, k), dtype=torch.long)


def _neighbour_labels(queries, gallery, query_labels, gallery_labels, k: int, exclude_same_index: bool,
                      chunk_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(query labels [n], labels of the k nearest gallery rows [n, k])``."""
    query_labels = torch.as_tensor(np.asarray(query_labels), dtype=torch.long)
    gallery_labels = torch.as_tensor(np.asarray(gallery_labels), dtype=torch.long)
    neighbours = retrieval_neighbours(queries, gallery, k, exclude_same_index, chunk_size).cpu()
    return query_labels, gallery_labels[neighbours]


def retrieval_recall_at_k(queries, gallery, query_labels, gallery_labels, ks: Sequence[int] = (1, 5, 10),
                          exclude_same_index: bool = False, chunk_size: int = 1024) -> dict[int, float]:
    """Recall@K as in HUSE: share of queries with at least one same-class item in the top K."""
    query_labels, found = _neighbour_labels(queries, gallery, query_labels, gallery_labels, max(ks),
                                            exclude_same_index, chunk_size)
    hits = found == query_labels[:, None]
    return {int(k): float(hits[:, :k].any(dim=1).float().mean()) for k in ks}


def retrieval_hierarchical_precision_at_k(queries, gallery, query_labels, gallery_labels,
                                          correct_sets: Mapping[int, Sequence[frozenset[int]]],
                                          exclude_same_index: bool = False, chunk_size: int = 1024) -> dict[int, float]:
    """H@k: mean share of the top-k items whose class is in ``correct_sets[k][query_class]``
    (e.g. ``{k: hierarchy_correct_sets(classes, parents, k) for k in (2, 5, 10)}``)."""
    query_labels, found = _neighbour_labels(queries, gallery, query_labels, gallery_labels, max(correct_sets),
                                            exclude_same_index, chunk_size)
    out = {}
    for k, sets in correct_sets.items():
        allowed = torch.zeros((len(sets), len(sets)), dtype=torch.bool)  # allowed[query_class, class]
        for c, members in enumerate(sets):
            allowed[c, list(members)] = True
        out[int(k)] = float(allowed[query_labels[:, None], found[:, :k]].float().mean())
    return out


def seed_spread(per_seed: Sequence[pd.Series]) -> pd.DataFrame:
    """Mean, sample standard deviation and count over seeds (``per_seed``: one Series of metrics per seed)."""
    values = pd.DataFrame(list(per_seed))
    return pd.DataFrame({"mean": values.mean(), "sd": values.std(ddof=1), "seeds": values.count()})


def clearly_different(first: pd.DataFrame | pd.Series, second: pd.DataFrame | pd.Series) -> pd.Series | bool:
    """For ``seed_spread`` rows (tables, or one row each): True where the means differ by more than the two sds
    together (the mean +- sd intervals do not overlap), the rule the notebooks use before calling a difference one."""
    return abs(first["mean"] - second["mean"]) > first["sd"] + second["sd"]


def difference_counts(first: pd.DataFrame, second: pd.DataFrame) -> tuple[int, int, int]:
    """Over the metrics of two aligned ``seed_spread`` tables: how many are clearly higher in ``first``, clearly
    lower, and within the spread."""
    different, higher = clearly_different(first, second), first["mean"] > second["mean"]
    return int((different & higher).sum()), int((different & ~higher).sum()), int((~different).sum())


def mean_sd_text(spread: pd.DataFrame, digits: int = 1) -> pd.Series:
    """``"mean ± sd"`` strings of a ``seed_spread`` table, for display."""
    return pd.Series([f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in spread[["mean", "sd"]].values], spread.index)
