"""ImageNet label spaces and ConSE's zero-shot test sets, and evaluation from cached outputs.

**Label spaces.** Training labels: the 1,000 ILSVRC-2012 synsets. Release: the 21,841
synsets of the ImageNet fall-2011 release (timm ships both lists). Candidates: the
release minus the training labels, 20,842 synsets (one ILSVRC class, n04399382 *teddy
bear*, is not in the 2011 release; the ConSE paper's 20,841 is 21,841 - 1,000).

**Test sets by hop distance.** For each candidate ``c`` we take its tree distance to the
nearest training label in the WordNet 3.0 is-a graph (climb to a common ancestor, then
descend; see :mod:`zsl_utils.metrics`). Our reading of the papers' names is

    "2-hop" = candidates at distance <= 1 (a parent or a child of a training label),
    "3-hop" = candidates at distance <= 2, "all" = every candidate.

The papers say "within two / three tree hops"; counting edges literally (distance <= 2
for "2-hop") gives 5,982 labels, nearly four times the published 1,549, while distance
<= 1 gives 1,548. We therefore read "n hops" as n nodes on the path (n - 1 edges). Our
3-hop set has 5,982 labels against 7,860 published: the published lists were made with
ImageNet's own 2011 is-a file, which differs from WordNet 3.0 (restricting WordNet to the
ImageNet synsets gives 7,452 instead). For the exact benchmark, pass the published WNID
lists (:func:`load_wnid_list`), e.g. the 2-hop / 3-hop / all lists distributed with the
SynC code (github.com/pujols/zero-shot-learning, ``ImageNet_w2v.zip``), which the later
literature uses.

**Generalised ("+1K") variants** rank the training labels as candidates too.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from zsl_utils import config
from zsl_utils.data.wnids import candidate_wnids, ilsvrc2012_wnids, load_wnid_list
from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.metrics import PAPER_KS, Hierarchy, correct_sets

PUBLISHED_TEST_SET_SIZES = {"2-hop": 1549, "3-hop": 7860, "all": 20841}
# Our reading of "n-hop" as a maximum tree distance in edges (see module docstring).
PAPER_HOP_EDGES = {"2-hop": 1, "3-hop": 2}
PAPER_TABLE = config.TABLES_DIR / "paper_conse_imagenet.csv"


# ----------------------------------------------------------------------------- hierarchy
def wordnet_hierarchy(wordnet=None) -> Hierarchy:
    """The WordNet 3.0 noun is-a DAG (hypernym and instance-hypernym links) as a Hierarchy."""
    if wordnet is None:
        return _default_hierarchy()
    return Hierarchy.from_parents({w: wordnet.synset(w).hypernyms for w in wordnet.wnids()})


@lru_cache(maxsize=1)
def _default_hierarchy() -> Hierarchy:
    from zsl_utils.data.wordnet import WordNet

    return wordnet_hierarchy(WordNet.load())


# ----------------------------------------------------------------------------- label sets
@dataclass
class LabelSets:
    """Training labels, candidates, their hop distances and the named test sets."""

    training: list[str]
    candidates: list[str]
    distance: np.ndarray  # tree distance of candidates[i] to the nearest training label, -1 if none
    test_sets: dict[str, list[str]]
    rules: dict[str, str] = field(default_factory=dict)

    def test_set(self, name: str, generalised: bool = False) -> list[str]:
        """The labels of test set ``name``; with ``generalised`` the training labels come first."""
        if name not in self.test_sets:
            raise ParameterError(f"unknown test set {name!r}; choose from {sorted(self.test_sets)}.")
        labels = self.test_sets[name]
        return self.training + [w for w in labels if w not in set(self.training)] if generalised else list(labels)

    def sizes(self) -> pd.DataFrame:
        """Our test-set sizes beside the published ones, with the rule used for each."""
        rows = []
        for name, labels in self.test_sets.items():
            rows.append({"test set": name, "labels (ours)": len(labels),
                         "labels (published)": PUBLISHED_TEST_SET_SIZES.get(name, np.nan),
                         "rule": self.rules.get(name, "")})
        return pd.DataFrame(rows)

    def distance_counts(self, max_distance: int = 6) -> pd.DataFrame:
        """Number of candidates within each tree distance of the training labels."""
        d = self.distance
        rows = [{"max distance (edges)": r, "candidates": int(((d >= 1) & (d <= r)).sum())}
                for r in range(1, max_distance + 1)]
        return pd.DataFrame(rows)


def build_label_sets(
    hierarchy: Hierarchy | None = None,
    training: Sequence[str] | None = None,
    release: Sequence[str] | None = None,
    hop_edges: Mapping[str, int] = PAPER_HOP_EDGES,
    published_lists: Mapping[str, str | os.PathLike] | None = None,
) -> LabelSets:
    """Derive the 2-hop / 3-hop / all test sets (or read published lists instead).

    ``hop_edges`` maps a test-set name to the largest tree distance (in edges) it
    admits. ``published_lists`` maps names to WNID files that replace the derived sets
    (e.g. ``{"2-hop": ".../2-hops.txt"}``); their labels must be release synsets.
    """
    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    training = ilsvrc2012_wnids() if training is None else list(training)
    candidates = candidate_wnids(training, release)
    nearest = hierarchy.distance_to_nearest(training, max_distance=64)
    distance = np.array([nearest[hierarchy.index[c]] if c in hierarchy else -1 for c in candidates])
    test_sets, rules = {}, {}
    for name, edges in hop_edges.items():
        if edges < 1:
            raise ParameterError(f"hop_edges[{name!r}]={edges}: a test set needs a distance >= 1.")
        test_sets[name] = [c for c, d in zip(candidates, distance) if 1 <= d <= edges]
        rules[name] = f"tree distance <= {edges} edge(s) to a training label (WordNet 3.0)"
    test_sets["all"] = list(candidates)
    rules["all"] = "release minus training labels"
    for name, path in (published_lists or {}).items():
        test_sets[name] = load_wnid_list(path, known=set(candidates) | set(training))
        rules[name] = f"published list {Path(path).name}"
    return LabelSets(list(training), candidates, distance, test_sets, rules)


# ----------------------------------------------------------------------------- paper numbers
def paper_results() -> pd.DataFrame:
    """The paper's numbers (``zsl_utils/tables/paper_conse_imagenet.csv``), NaN where not entered."""
    table = pd.read_csv(PAPER_TABLE, comment="#")
    return table


# ----------------------------------------------------------------------------- evaluation
@dataclass
class EvalTask:
    """One ranking problem: images whose label is in ``test_labels``, ranked over ``candidates``."""

    name: str
    candidates: list[str]
    test_labels: frozenset[str]


def paper_tasks(label_sets: LabelSets, names: Sequence[str] = ("2-hop", "3-hop", "all"),
                generalised: bool = True, seen_images: bool = False) -> list[EvalTask]:
    """The paper's tasks: each test set alone and, if ``generalised``, with the training labels (+1K).

    ``seen_images`` adds, per test set, the +1K ranking evaluated on images of the
    *training* classes (``"<name> +1K, seen images"``): how often ConSE still names a
    seen class correctly once unseen labels compete with it.
    """
    tasks = []
    for name in names:
        labels = label_sets.test_set(name)
        tasks.append(EvalTask(name, labels, frozenset(labels)))
        if generalised:
            tasks.append(EvalTask(f"{name} +1K", label_sets.test_set(name, generalised=True), frozenset(labels)))
        if seen_images:
            tasks.append(EvalTask(f"{name} +1K, seen images", label_sets.test_set(name, generalised=True),
                                  frozenset(label_sets.training)))
    return tasks


def classifier_hit_at_k(probs_source, image_wnids: Sequence[str], output_wnids: Sequence[str],
                        ks: Sequence[int] = (1, 5), batch_size: int = 4096) -> pd.Series:
    """Plain softmax hit@k (percent) on the images whose label is a classifier output.

    The supervised reference point for the seen images: ConSE(1) with the training
    labels as the only candidates cannot do better than this.
    """
    position = {w: j for j, w in enumerate(output_wnids)}
    image_wnids = np.asarray(image_wnids, dtype=object)
    hits, count = np.zeros(len(ks)), 0
    for start, probs, ok in _probability_batches(probs_source, batch_size):
        labels = image_wnids[start : start + len(probs)]
        select = np.flatnonzero(ok & np.array([w in position for w in labels], dtype=bool))
        if not len(select):
            continue
        true = np.array([position[w] for w in labels[select]])
        top = np.argsort(-probs[select], axis=1, kind="stable")[:, : max(ks)]
        hits += [(top[:, :k] == true[:, None]).any(axis=1).sum() for k in ks]
        count += len(select)
    values = {f"hit@{k}": (100 * h / count if count else np.nan) for k, h in zip(ks, hits)}
    return pd.Series({"images": count, **values})


@dataclass
class EvalResult:
    """Metrics per (task, T) and, optionally, the top predictions of every evaluated image."""

    table: pd.DataFrame
    top_predictions: dict[tuple[str, int], np.ndarray] = field(default_factory=dict)
    rows: dict[str, np.ndarray] = field(default_factory=dict)  # image rows evaluated per task
    candidates: dict[str, list[str]] = field(default_factory=dict)  # candidate list per task

    def examples(self, task: str, T: int, image_wnids: Sequence[str], n_hits: int = 4, n_misses: int = 4,
                 seed: int = 0) -> pd.DataFrame:
        """Random hits and misses of ConSE(T) on ``task`` (needs ``keep_top``): image row, true
        WNID, predicted WNIDs best first, and the rank of the true label (0 = miss)."""
        if (task, T) not in self.top_predictions:
            raise ParameterError(f"no kept predictions for ({task!r}, T={T}); run evaluate_conse with keep_top > 0.")
        rows, top, labels = self.rows[task], self.top_predictions[(task, T)], self.candidates[task]
        predicted = [[labels[j] for j in ranked] for ranked in top]
        truth = [image_wnids[r] for r in rows]
        rank = np.array([p.index(t) + 1 if t in p else 0 for p, t in zip(predicted, truth)], dtype=int)
        rng = np.random.default_rng(seed)
        hits, misses = np.flatnonzero(rank > 0), np.flatnonzero(rank == 0)
        chosen = np.concatenate([rng.permutation(hits)[:n_hits], rng.permutation(misses)[:n_misses]]).astype(int)
        return pd.DataFrame({"row": rows[chosen], "true": [truth[i] for i in chosen],
                             "predicted": [predicted[i] for i in chosen], "rank": rank[chosen]})


class _TaskModels:
    """ConSE models for one task: ranks only embeddable candidates, maps back to full positions."""

    def __init__(self, task: EvalTask, train_embeddings, label_embeddings, T_values, device) -> None:
        from zsl_utils.conse.model import ConSE

        position = {w: i for i, w in enumerate(label_embeddings.labels)}
        missing = [c for c in task.candidates if c not in position]
        if missing:
            raise ParameterError(
                f"task {task.name!r}: {len(missing)} candidates have no row in label_embeddings, e.g. "
                f"{missing[:5]}; build the embeddings for every candidate (missing vectors are allowed)."
            )
        found = np.array([bool(label_embeddings.found[position[c]]) for c in task.candidates])
        self.usable = np.flatnonzero(found)  # position in task.candidates of each ranked label
        vectors = label_embeddings.vectors[[position[task.candidates[i]] for i in self.usable]]
        base = ConSE(train_embeddings.vectors, vectors, T=min(T_values), train_mask=train_embeddings.found,
                     candidate_labels=[task.candidates[i] for i in self.usable], device=device)
        self.models = {T: base.with_T(T) for T in T_values}
        self.n_unembedded = int((~found).sum())


def evaluate_conse(
    probs_source,
    image_wnids: Sequence[str],
    train_embeddings,
    label_embeddings,
    tasks: Sequence[EvalTask],
    T_values: Sequence[int] = (1, 10, 1000),
    ks: Sequence[int] = PAPER_KS,
    hierarchy: Hierarchy | None = None,
    batch_size: int = 4096,
    device: str = "cpu",
    keep_top: int = 0,
    progress: bool = True,
) -> EvalResult:
    """Flat hit@k and hierarchical precision@k of ConSE(T) for every task, streaming the outputs.

    Args:
        probs_source: a :class:`~zsl_utils.cache.ShardedCache` holding ``probs`` (and ``ok``),
            or an array ``[n_images, n_train]``. Read one shard / batch at a time, so memory
            does not grow with the number of images.
        image_wnids: true label of every row. Rows whose image was unreadable (``ok`` False)
            or whose label is in no task's test set are not evaluated.
        train_embeddings: ``LabelEmbeddings`` of the classifier's outputs, in output order.
        label_embeddings: ``LabelEmbeddings`` covering every candidate of every task. A
            candidate without a vector stays in the candidate list (it counts for hp@k
            sets) but is never predicted, so its images are misses.
        tasks: see :func:`paper_tasks`.
        hierarchy: for hp@k (default: WordNet 3.0). ``None`` and ``hp=False`` are not
            distinguished: hp@k is always computed.
        keep_top: keep the ``keep_top`` best predictions (label strings via the task's
            candidates) of every evaluated image, for examples; 0 keeps none (flat memory).

    Tasks that evaluate the same images (a test set and its +1K twin) share ``f(x)``: each
    batch is checked once and embedded once per T per group of such tasks, then ranked
    per task, which gives exactly the numbers of embedding it for every task.

    Returns:
        :class:`EvalResult` whose ``table`` has one row per (task, T): ``images``,
        ``hit@k`` and ``hp@k`` in percent, and ``unembedded candidates``.
    """
    import torch

    from zsl_utils.conse.model import check_probabilities
    from zsl_utils.metrics import hierarchical_precision_sums

    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    k_max = max(ks)
    image_wnids = np.asarray(image_wnids, dtype=object)
    models = {t.name: _TaskModels(t, train_embeddings, label_embeddings, T_values, device) for t in tasks}
    for task in tasks:
        if len(models[task.name].usable) < k_max:
            raise ParameterError(
                f"task {task.name!r} has {len(models[task.name].usable)} embeddable candidates, fewer than "
                f"k={k_max}; lower ks or add candidates."
            )
    positions = {t.name: {c: j for j, c in enumerate(t.candidates)} for t in tasks}
    hits = {(t.name, T): np.zeros(len(ks)) for t in tasks for T in T_values}
    hp = {(t.name, T): {int(k): 0.0 for k in ks} for t in tasks for T in T_values}
    counts = {t.name: 0 for t in tasks}
    kept: dict[tuple[str, int], list[np.ndarray]] = {(t.name, T): [] for t in tasks for T in T_values}
    kept_rows: dict[str, list[np.ndarray]] = {t.name: [] for t in tasks}
    correct_cache: dict[str, dict] = {t.name: {} for t in tasks}
    # Which images each task evaluates, and where their labels sit in its candidate list:
    # computed once with set lookups (np.isin on strings would redo it every batch).
    true_position = {t.name: np.array([positions[t.name].get(w, -1) if w in t.test_labels else -1
                                       for w in image_wnids], dtype=np.int64) for t in tasks}
    groups = _tasks_by_images(tasks, true_position)
    # f(x) depends on the training vectors and T only, which every task shares: any task's models embed.
    embedders = models[tasks[0].name].models if tasks else {}
    n_train = len(train_embeddings.labels)
    n_batches = -(-len(image_wnids) // batch_size)
    for start, probs, ok in tqdm(_probability_batches(probs_source, batch_size), total=n_batches,
                                 desc="evaluating", unit="batch", disable=not progress):
        labels = image_wnids[start : start + len(probs)]
        selects = [np.flatnonzero(ok & (true_position[group[0].name][start : start + len(probs)] >= 0))
                   for group in groups]
        if not any(len(select) for select in selects):
            continue
        check_probabilities(probs[np.unique(np.concatenate(selects))], n_train)  # once per batch
        for group, select in zip(groups, selects):
            if not len(select):
                continue
            # The same rows as before the grouping, embedded once per T for all tasks of the group.
            selected = torch.from_numpy(probs[select])
            embedded = {T: embedders[T].embed(selected, validate=False) for T in T_values}
            true_labels = labels[select].tolist()
            for task in group:
                counts[task.name] += len(select)
                kept_rows[task.name].append(start + select)
                true_pos = true_position[task.name][start + select]
                entry = models[task.name]
                for T, model in entry.models.items():
                    ranked = entry.usable[model.predict_embedded(*embedded[T], k=k_max).indices]
                    match = ranked == true_pos[:, None]
                    hits[(task.name, T)] += [match[:, :k].any(axis=1).sum() for k in ks]
                    sums = hierarchical_precision_sums(ranked, true_labels, task.candidates, hierarchy, ks,
                                                       correct_cache[task.name], positions[task.name])
                    for k in sums:
                        hp[(task.name, T)][k] += sums[k]
                    if keep_top:
                        kept[(task.name, T)].append(ranked[:, :keep_top])
    rows = []
    for task in tasks:
        n = counts[task.name]
        for T in T_values:
            row = {"test set": task.name, "model": f"ConSE({T})", "images": n,
                   "candidates": len(task.candidates), "unembedded candidates": models[task.name].n_unembedded}
            for i, k in enumerate(ks):
                row[f"hit@{k}"] = 100 * hits[(task.name, T)][i] / n if n else np.nan
            for k in ks:
                row[f"hp@{k}"] = 100 * hp[(task.name, T)][int(k)] / n if n else np.nan
            rows.append(row)
    result = EvalResult(pd.DataFrame(rows), candidates={t.name: list(t.candidates) for t in tasks})
    if keep_top:
        result.top_predictions = {key: np.concatenate(v) if v else np.zeros((0, keep_top), int) for key, v in kept.items()}
        result.rows = {name: np.concatenate(v) if v else np.zeros(0, int) for name, v in kept_rows.items()}
    return result


def _tasks_by_images(tasks: Sequence[EvalTask], true_position: dict[str, np.ndarray]) -> list[list[EvalTask]]:
    """Tasks grouped by the exact set of images they evaluate (a test set and its +1K twin),
    in first-appearance order, so each group's images are embedded once per T."""
    groups: dict[bytes, list[EvalTask]] = {}
    for task in tasks:
        groups.setdefault(np.packbits(true_position[task.name] >= 0).tobytes(), []).append(task)
    return list(groups.values())


def _probability_batches(source, batch_size: int):
    """Yield ``(start_row, probs float32, ok bool)`` from a cache (shard by shard) or an array."""
    from zsl_utils.cache import ShardedCache

    if isinstance(source, ShardedCache):
        for _, start, arrays in source.iter_shards(["probs", "ok"]):
            probs = arrays["probs"]
            for offset in range(0, len(probs), batch_size):
                block = probs[offset : offset + batch_size].astype(np.float32)
                yield start + offset, block, arrays["ok"][offset : offset + batch_size]
        return
    for start in range(0, len(source), batch_size):
        block = np.asarray(source[start : start + batch_size], dtype=np.float32)
        yield start, block, np.ones(len(block), bool)


def with_paper_numbers(ours: pd.DataFrame, metric: str = "hit", ks: Sequence[int] = PAPER_KS) -> pd.DataFrame:
    """Our rows and the paper's rows for ``metric`` ('hit' or 'hp') in one table, by test set."""
    columns = [f"{metric}@{k}" for k in ks]
    mine = ours[["test set", "model", *columns]].assign(source="ours")
    paper = paper_results()
    paper = paper[paper["metric"] == metric].rename(columns={f"at{k}": f"{metric}@{k}" for k in ks})
    paper = paper[["test set", "model", *columns]].assign(source="paper")
    order = {name: i for i, name in enumerate(dict.fromkeys(list(ours["test set"]) + list(paper["test set"])))}
    table = pd.concat([paper, mine], ignore_index=True)
    table["_order"] = table["test set"].map(order)
    table["_source"] = table["source"].map({"paper": 0, "ours": 1})
    table = table.sort_values(["_order", "_source"], kind="stable")  # paper rows first, models in given order
    return table.drop(columns=["_order", "_source"]).reset_index(drop=True)


def correct_set_example(label: str, candidates: Sequence[str], k: int, hierarchy: Hierarchy | None = None) -> list[str]:
    """The hp@k correct set ``S_k(label)`` over ``candidates`` as WNIDs (for display)."""
    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    sets = correct_sets(label, candidates, hierarchy, [k])
    return [candidates[j] for j in sorted(sets.members(k))]
