"""ImageNet label spaces, ConSE's zero-shot test sets and evaluation from cached outputs. We read "n-hop" as n nodes on
the WordNet 3.0 path to the nearest training label: "2-hop" <= 1 edge, "3-hop" <= 2 (1,548 and 5,982 labels; published
1,549 and 7,860, via ImageNet's 2011 is-a file); for the exact benchmark pass the published lists (text, or the JSON
with keys "2-hops", "3-hops", "all" that circulates with the SynC code; load_wnid_list reads both)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from functools import lru_cache, partial
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from zsl_utils import config
from zsl_utils.cache import ShardedCache
from zsl_utils.conse.model import ConSE, check_probabilities
from zsl_utils.data.wnids import candidate_wnids, imagenet_wnids, load_wnid_list
from zsl_utils.data.wordnet import WordNet
from zsl_utils.errors import ParameterError
from zsl_utils.metrics import PAPER_KS, Hierarchy, correct_sets, hierarchical_precision_sums

# 2-hop, 3-hop: the ConSE paper; "all": the list distributed with the SynC code (Changpinyo et al., CVPR 2016), which is
# the 2011 release minus the training labels. 21,841 - 1,000 = 20,841 would need every training label in the release,
# and one (teddy bear) is not.
PUBLISHED_TEST_SET_SIZES = {"2-hop": 1549, "3-hop": 7860, "all": 20842}
PUBLISHED_JSON_KEYS = {"2-hop": "2-hops", "3-hop": "3-hops", "all": "all"}  # keys of the published JSON file
PAPER_HOP_EDGES = {"2-hop": 1, "3-hop": 2}  # our reading of "n-hop" as a maximum tree distance in edges (see above)
PAPER_TABLE = config.TABLES_DIR / "paper_conse_imagenet.csv"


def wordnet_hierarchy(wordnet: WordNet | None = None) -> Hierarchy:
    """The WordNet 3.0 noun is-a DAG (hypernym and instance-hypernym links) as a Hierarchy."""
    if wordnet is None:
        return _default_hierarchy()
    return Hierarchy.from_parents({w: wordnet.synset(w).hypernyms for w in wordnet.wnids()})


@lru_cache(maxsize=1)
def _default_hierarchy() -> Hierarchy:
    return wordnet_hierarchy(WordNet.load())


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
        training = set(self.training) if generalised else set()
        return (self.training if generalised else []) + [w for w in self.test_sets[name] if w not in training]

    def sizes(self) -> pd.DataFrame:
        """Our test-set sizes beside the published ones, with the rule used for each."""
        return pd.DataFrame([{"test set": name, "labels (ours)": len(labels),
                              "labels (published)": PUBLISHED_TEST_SET_SIZES.get(name, np.nan),
                              "rule": self.rules.get(name, "")} for name, labels in self.test_sets.items()])

    def distance_counts(self, max_distance: int = 6) -> pd.DataFrame:
        """Number of candidates within each tree distance of the training labels."""
        d = self.distance
        return pd.DataFrame([{"max distance (edges)": r, "candidates": int(((d >= 1) & (d <= r)).sum())}
                             for r in range(1, max_distance + 1)])


def build_label_sets(hierarchy: Hierarchy | None = None, training: Sequence[str] | None = None,
                     release: Sequence[str] | None = None, hop_edges: Mapping[str, int] = PAPER_HOP_EDGES,
                     published_lists: Mapping[str, str | os.PathLike] | None = None) -> LabelSets:
    """Test sets: ``hop_edges``: name -> largest tree distance (edges); ``published_lists``: name -> WNID file."""
    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    training = imagenet_wnids("1k") if training is None else list(training)
    candidates = candidate_wnids(training, release)
    nearest = hierarchy.distance_to_nearest(training)
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
        test_sets[name] = load_wnid_list(path, known=set(candidates) | set(training), key=PUBLISHED_JSON_KEYS.get(name))
        rules[name] = f"published list {Path(path).name}"
    return LabelSets(list(training), candidates, distance, test_sets, rules)


def correct_set_example(label: str, candidates: Sequence[str], k: int, hierarchy: Hierarchy | None = None) -> list[str]:
    """The hp@k correct set ``S_k(label)`` over ``candidates`` as WNIDs (for display)."""
    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    return [candidates[j] for j in sorted(correct_sets(label, candidates, hierarchy, [k]).members(k))]


def paper_results() -> pd.DataFrame:
    """The paper's numbers (``zsl_utils/tables/paper_conse_imagenet.csv``), NaN where not entered."""
    return pd.read_csv(PAPER_TABLE, comment="#")


def with_paper_numbers(ours: pd.DataFrame, metric: str = "hit", ks: Sequence[int] = PAPER_KS) -> pd.DataFrame:
    """Our rows and the paper's rows for ``metric`` ('hit' or 'hp') in one table, by test set."""
    columns = [f"{metric}@{k}" for k in ks]
    mine = ours[["test set", "model", *columns]].assign(source="ours")
    paper = paper_results()
    paper = paper[paper["metric"] == metric].rename(columns={f"at{k}": f"{metric}@{k}" for k in ks})
    paper = paper[["test set", "model", *columns]].assign(source="paper")
    order = {name: i for i, name in enumerate(dict.fromkeys(list(ours["test set"]) + list(paper["test set"])))}
    rank = {"test set": order, "source": {"paper": 0, "ours": 1}}  # paper rows first, models in given order
    table = pd.concat([paper, mine], ignore_index=True)
    table = table.sort_values(["test set", "source"], key=lambda column: column.map(rank[column.name]), kind="stable")
    return table.reset_index(drop=True)


@dataclass
class EvalTask:
    """One ranking problem: images whose label is in ``test_labels``, ranked over ``candidates``."""
    name: str
    candidates: list[str]
    test_labels: frozenset[str]


def paper_tasks(label_sets: LabelSets, names: Sequence[str] = ("2-hop", "3-hop", "all"),
                generalised: bool = True, seen_images: bool = False) -> list[EvalTask]:
    """Each test set alone, with the training labels (+1K) if ``generalised``, and on seen images if ``seen_images``."""
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
    """Softmax hit@k (%) on images labelled by a classifier output: the seen-image reference for the +1K rows (ConSE(1)
    differs from it only where labels lack or share a vector; see ``conse.model.softmax_vs_conse1``)."""
    position = {w: j for j, w in enumerate(output_wnids)}
    image_wnids = np.asarray(image_wnids, dtype=object)
    hits, count = np.zeros(len(ks)), 0
    for start, probs, ok in _probability_batches(probs_source, batch_size):
        labels = image_wnids[start : start + len(probs)]
        select = np.flatnonzero(ok & np.array([w in position for w in labels], dtype=bool))
        true = np.array([position[w] for w in labels[select]], dtype=np.int64)
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
        """Random hits and misses of ConSE(T) on ``task`` (needs ``keep_top``): row, true, predicted, rank (0: miss)."""
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


class _TaskState:
    """One task during evaluation: ConSE(T) over its embeddable candidates, and running sums."""

    def __init__(self, task: EvalTask, train_embeddings, label_embeddings, T_values, ks, device, hierarchy,
                 keep_top: int, unit_train: bool) -> None:
        row_of = {w: i for i, w in enumerate(label_embeddings.labels)}
        missing = [c for c in task.candidates if c not in row_of]
        if missing:
            raise ParameterError(f"task {task.name!r}: {len(missing)} candidates have no row in label_embeddings, "
                                 f"e.g. {missing[:5]}; build the embeddings for every candidate (missing vectors "
                                 "are allowed).")
        found = np.array([bool(label_embeddings.found[row_of[c]]) for c in task.candidates])
        self.usable = np.flatnonzero(found)  # position in task.candidates of each ranked label
        if len(self.usable) < max(ks):
            raise ParameterError(f"task {task.name!r} has {len(self.usable)} embeddable candidates, fewer than "
                                 f"k={max(ks)}; lower ks or add candidates.")
        vectors = label_embeddings.vectors[[row_of[task.candidates[i]] for i in self.usable]]
        first_T = min([T for T in T_values if isinstance(T, int)] or [1])  # named embedders (DeViSE) need no T
        base = ConSE(train_embeddings.vectors, vectors, T=first_T, train_mask=train_embeddings.found,
                     candidate_labels=[task.candidates[i] for i in self.usable], device=device, unit_train=unit_train)
        self.task, self.ks, self.hierarchy, self.keep_top = task, ks, hierarchy, keep_top
        self.n_unembedded = int((~found).sum())
        self.ranker = base  # ranking depends on the candidates only, not on T
        self.models = {T: base.with_T(T) if isinstance(T, int) else base for T in T_values}
        self.position = {c: j for j, c in enumerate(task.candidates)}
        self.count, self.rows, self.correct_cache = 0, [], {}
        self.hits = {T: np.zeros(len(ks)) for T in T_values}
        self.hp = {T: np.zeros(len(ks)) for T in T_values}
        self.kept: dict[int, list[np.ndarray]] = {T: [] for T in T_values}

    def add(self, rows: np.ndarray, true_position: np.ndarray, true_labels: list[str], embedded) -> None:
        """Rank the already embedded images ``rows`` (``embedded[T] = (f(x), norms)``) and add up."""
        self.count += len(rows)
        self.rows.append(rows)
        for T in self.models:
            ranked = self.usable[self.ranker.predict_embedded(*embedded[T], k=max(self.ks)).indices]
            match = ranked == true_position[:, None]
            self.hits[T] += [match[:, :k].any(axis=1).sum() for k in self.ks]
            sums = hierarchical_precision_sums(ranked, true_labels, self.task.candidates, self.hierarchy, self.ks,
                                               self.correct_cache, self.position)
            self.hp[T] += [sums[int(k)] for k in self.ks]
            if self.keep_top:
                self.kept[T].append(ranked[:, : self.keep_top])

    def table_rows(self) -> list[dict]:
        n = self.count
        return [{"test set": self.task.name, "model": f"ConSE({T})" if isinstance(T, int) else T, "images": n,
                 "candidates": len(self.task.candidates), "unembedded candidates": self.n_unembedded,
                 **{f"hit@{k}": 100 * h / n if n else np.nan for k, h in zip(self.ks, self.hits[T])},
                 **{f"hp@{k}": 100 * h / n if n else np.nan for k, h in zip(self.ks, self.hp[T])}}
                for T in self.models]


def evaluate_conse(probs_source, image_wnids: Sequence[str], train_embeddings, label_embeddings,
                   tasks: Sequence[EvalTask], T_values: Sequence[int] = (1, 10, 1000), ks: Sequence[int] = PAPER_KS,
                   hierarchy: Hierarchy | None = None, batch_size: int = 4096, device: str = "cpu",
                   keep_top: int = 0, progress: bool = True, unit_train: bool = False,
                   embedders: Mapping[str, Callable] | None = None, source_key: str = "probs") -> EvalResult:
    """Hit@k and hierarchical precision@k (%) of ConSE(T) per (task, T), streaming ``probs_source`` (a cache with
    ``probs`` and ``ok``, or an array). A candidate without a vector stays in hp@k sets but is never predicted;
    ``unit_train`` as in :class:`ConSE`. ``embedders`` (name -> rows -> ``(embeddings, norms)``, e.g. DeViSE's
    ``embed``) replace ConSE(T): the rows then come from the cache's ``source_key`` (e.g. ``"features"``)."""
    hierarchy = _default_hierarchy() if hierarchy is None else hierarchy
    image_wnids = np.asarray(image_wnids, dtype=object)
    keys = list(embedders) if embedders else list(T_values)
    states = {t.name: _TaskState(t, train_embeddings, label_embeddings, keys, ks, device, hierarchy, keep_top,
                                 unit_train) for t in tasks}
    # Where each image's label sits in each task's candidates (-1: not evaluated), once (np.isin would, every batch).
    true_position = {t.name: np.array([states[t.name].position.get(w, -1) if w in t.test_labels else -1
                                       for w in image_wnids], dtype=np.int64) for t in tasks}
    groups: dict[bytes, list[EvalTask]] = {}  # tasks by the exact set of images they evaluate
    for task in tasks:
        groups.setdefault(np.packbits(true_position[task.name] >= 0).tobytes(), []).append(task)
    # f(x) depends on the training vectors and T only, which every task shares: any task's models embed.
    embed = embedders or {T: partial(model.embed, validate=False)  # the batch is checked once below
                          for T, model in (states[tasks[0].name].models if tasks else {}).items()}
    n_batches = -(-len(image_wnids) // batch_size)
    for start, probs, ok in tqdm(_probability_batches(probs_source, batch_size, source_key), total=n_batches,
                                 desc="evaluating", unit="batch", disable=not progress):
        labels = image_wnids[start : start + len(probs)]
        selects = [np.flatnonzero(ok & (true_position[group[0].name][start : start + len(probs)] >= 0))
                   for group in groups.values()]
        if not any(len(select) for select in selects):
            continue
        if not embedders:
            check_probabilities(probs[np.unique(np.concatenate(selects))], len(train_embeddings.labels))
        for group, select in zip(groups.values(), selects):
            if len(select):
                selected = torch.from_numpy(probs[select])
                embedded = {key: embed[key](selected) for key in keys}
                for task in group:
                    states[task.name].add(start + select, true_position[task.name][start + select],
                                          labels[select].tolist(), embedded)
    result = EvalResult(pd.DataFrame([row for state in states.values() for row in state.table_rows()]),
                        candidates={t.name: list(t.candidates) for t in tasks})
    if keep_top:
        result.top_predictions = {(name, T): np.concatenate(kept) if kept else np.zeros((0, keep_top), int)
                                  for name, state in states.items() for T, kept in state.kept.items()}
        result.rows = {name: np.concatenate(s.rows) if s.rows else np.zeros(0, int) for name, s in states.items()}
    return result


def _probability_batches(source, batch_size: int, key: str = "probs"):
    """Yield ``(start_row, rows float32, ok bool)`` from a cache's ``key`` (shard by shard) or an array."""
    if isinstance(source, ShardedCache):
        shards = ((start, arrays[key], arrays["ok"]) for _, start, arrays in source.iter_shards([key, "ok"]))
    else:
        shards = [(0, source, np.ones(len(source), bool))]
    for start, probs, ok in shards:
        for offset in range(0, len(probs), batch_size):
            block = np.asarray(probs[offset : offset + batch_size], dtype=np.float32)
            yield start + offset, block, ok[offset : offset + batch_size]
