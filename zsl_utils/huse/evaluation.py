"""Evaluating HUSE: tables in percent, the paper's numbers beside ours, the 2-D projection, retrieval examples.

Retrieval as in the paper: every test item queries all *other* ones (not its own image/text pair); a hit has its class.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch

from zsl_utils import config
from zsl_utils.data.images import load_image_rgb
from zsl_utils.errors import ParameterError
from zsl_utils.huse.model import DIRECTIONS, MODALITIES, SplitOutputs
from zsl_utils.metrics import retrieval_hierarchical_precision_at_k, retrieval_neighbours, retrieval_recall_at_k

PAPER_TABLE = config.TABLES_DIR / "paper_huse.csv"


def fuse_probabilities(image_probs: torch.Tensor, text_probs: torch.Tensor, image_weight: float) -> torch.Tensor:
    """Weighted average ``w * p_image + (1 - w) * p_text`` of the two softmax scores."""
    if not 0 <= image_weight <= 1:
        raise ParameterError(f"fusion image_weight={image_weight!r} must lie in [0, 1].")
    return image_weight * image_probs + (1 - image_weight) * text_probs


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    return float((probabilities.argmax(dim=1) == labels).float().mean())


def choose_fusion_weight(outputs: SplitOutputs, candidates: Sequence[float] | None = None) -> float:
    """The image weight (``candidates``, default 0, 0.05 .. 1) with the best fused accuracy; ties go to the one
    closest to 0.5, so they do not silently favour one modality."""
    candidates = np.linspace(0, 1, 21) if candidates is None else np.asarray(candidates, dtype=float)
    probs = outputs.probabilities
    scores = [accuracy(fuse_probabilities(probs["image"], probs["text"], w), outputs.labels) for w in candidates]
    best = max(scores)
    tied = [w for w, s in zip(candidates, scores) if s == best]
    return float(min(tied, key=lambda w: abs(w - 0.5)))


def classification_table(outputs: SplitOutputs, image_weight: float) -> pd.DataFrame:
    """Accuracy (%) of the image softmax, the text softmax and their weighted fusion."""
    probs = outputs.probabilities
    rows = {m: accuracy(probs[m], outputs.labels) for m in MODALITIES if m in probs}
    if set(MODALITIES) <= set(probs):
        rows["fusion"] = accuracy(fuse_probabilities(probs["image"], probs["text"], image_weight), outputs.labels)
    return pd.DataFrame({"accuracy": {k: 100 * v for k, v in rows.items()}}).rename_axis("input")


def direction_table(outputs: SplitOutputs, metric: Callable[..., dict[int, float]], prefix: str) -> pd.DataFrame:
    """``metric(queries, gallery, labels, labels)`` (%) for every query -> gallery direction present."""
    rows = {}
    for query, gallery in DIRECTIONS:
        if query in outputs.embeddings and gallery in outputs.embeddings:
            values = metric(outputs.embeddings[query], outputs.embeddings[gallery], outputs.labels, outputs.labels)
            rows[f"{query}->{gallery}"] = {f"{prefix}@{k}": 100 * v for k, v in values.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("direction")


@dataclass
class HuseEvaluation:
    """The three result tables of one model on one split."""

    classification: pd.DataFrame
    retrieval: pd.DataFrame
    hierarchical: pd.DataFrame

    def headline(self) -> pd.Series:
        """Accuracy per input, R@(first K) and every H@k per direction: the numbers the comparisons use."""
        rows = {f"accuracy {k}": v for k, v in self.classification["accuracy"].items()}
        rows.update({f"{self.retrieval.columns[0]} {d}": v for d, v in self.retrieval.iloc[:, 0].items()})
        for column in self.hierarchical.columns:
            rows.update({f"{column} {d}": v for d, v in self.hierarchical[column].items()})
        return pd.Series(rows, dtype=float)

    def summary(self) -> dict[str, float]:
        """A few headline numbers (accuracies, mean R@1 and mean H@ smallest k)."""
        out = {f"accuracy_{k}": float(v) for k, v in self.classification["accuracy"].items()}
        out["mean_R@1"] = float(self.retrieval.iloc[:, 0].mean())
        if len(self.hierarchical):
            out[f"mean_{self.hierarchical.columns[0]}"] = float(self.hierarchical.iloc[:, 0].mean())
        return out


def evaluate_huse(outputs: SplitOutputs, image_weight: float,
                  correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None,
                  ks: Sequence[int] = (1, 5, 10)) -> HuseEvaluation:
    """Classification, retrieval and hierarchical-precision tables (``correct_sets[k][c]``: right at H@k for c)."""
    recall = partial(retrieval_recall_at_k, ks=ks, exclude_same_index=True)
    precision = partial(retrieval_hierarchical_precision_at_k, correct_sets=correct_sets, exclude_same_index=True)
    return HuseEvaluation(classification_table(outputs, image_weight), direction_table(outputs, recall, "R"),
                          direction_table(outputs, precision, "H") if correct_sets else pd.DataFrame())


def project_2d(embeddings: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """A shared 2-D PCA of all modalities' embeddings; each axis's largest loading is positive (fixed signs)."""
    stacked = np.concatenate([np.asarray(x, dtype=np.float64) for x in embeddings.values()])
    centred = stacked - stacked.mean(axis=0)
    _, _, components = np.linalg.svd(centred, full_matrices=False)
    axes = components[:2]
    axes *= np.sign(axes[np.arange(len(axes)), np.abs(axes).argmax(axis=1)])[:, None]
    coords = centred @ axes.T
    bounds = np.cumsum([0] + [len(x) for x in embeddings.values()])
    return {m: coords[bounds[i] : bounds[i + 1]] for i, m in enumerate(embeddings)}


def retrieval_examples(outputs: SplitOutputs, items: pd.DataFrame, n_queries: int = 3, k: int = 5,
                       seed: int = 0) -> tuple[list, list]:
    """Examples for ``plots.plot_huse_retrievals``: for ``n_queries`` seeded rows of ``items`` (``HuseSplit.items``),
    the image retrieves the ``k`` nearest texts and the text the ``k`` nearest images, its own pair excluded."""
    chosen = np.random.default_rng(seed).choice(len(items), size=min(n_queries, len(items)), replace=False)
    image_to_text = retrieval_neighbours(outputs.embeddings["image"], outputs.embeddings["text"], k, True)
    text_to_image = retrieval_neighbours(outputs.embeddings["text"], outputs.embeddings["image"], k, True)
    texts, labels, paths = items["text"].tolist(), items["label"].tolist(), items["image_path"].tolist()
    image_queries = [(load_image_rgb(paths[q]), labels[q], [(texts[j], labels[j]) for j in image_to_text[q].tolist()])
                     for q in chosen.tolist()]
    text_queries = [(texts[q], labels[q], [(load_image_rgb(paths[j]), labels[j]) for j in text_to_image[q].tolist()])
                    for q in chosen.tolist()]
    return image_queries, text_queries


def paper_numbers() -> pd.DataFrame:
    """HUSE's published numbers (``table, row, metric, value, source, note``); unverified values are NaN."""
    table = pd.read_csv(PAPER_TABLE)
    expected = {"table", "row", "metric", "value", "source", "note"}
    if not expected <= set(table.columns):
        raise ParameterError(f"{PAPER_TABLE} must have columns {sorted(expected)}; has {list(table.columns)}.")
    return table


def side_by_side(ours: pd.DataFrame, table: str, paper: pd.DataFrame | None = None) -> pd.DataFrame:
    """Our results (rows x metrics) with the paper's value (or NaN) after each metric; ``table`` as in the CSV."""
    paper = paper_numbers() if paper is None else paper
    published = paper[paper["table"] == table].pivot_table(index="row", columns="metric", values="value",
                                                           aggfunc="first", dropna=False)
    out = pd.DataFrame(index=ours.index)
    for metric in ours.columns:
        out[f"{metric} (ours)"] = ours[metric]
        column = published[metric] if metric in published else pd.Series(dtype=float)
        out[f"{metric} (paper)"] = column.reindex(ours.index).astype(float)
    return out


def seed_table(tables: Sequence[pd.DataFrame], paper_table: str | None = None, digits: int = 1) -> pd.DataFrame:
    """Cell by cell ``"mean ± sd"`` over seeds of same-shaped result tables (one per seed), with the paper's value
    after each metric when ``paper_table`` names one of ``paper_numbers()``'s tables."""
    values = np.stack([t.to_numpy(dtype=float) for t in tables])
    mean, sd = values.mean(axis=0), values.std(axis=0, ddof=1) if len(tables) > 1 else np.full(values.shape[1:], np.nan)
    first = tables[0]
    out = pd.DataFrame([[f"{m:.{digits}f} ± {s:.{digits}f}" for m, s in zip(*row)] for row in zip(mean, sd)],
                       index=first.index, columns=[f"{c} (ours, {len(tables)} seeds)" for c in first.columns])
    if paper_table is not None:
        paper = side_by_side(first, paper_table)
        for column in first.columns:
            out.insert(out.columns.get_loc(f"{column} (ours, {len(tables)} seeds)") + 1, f"{column} (paper)",
                       paper[f"{column} (paper)"])
    return out
