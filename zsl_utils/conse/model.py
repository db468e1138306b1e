r"""ConSE: a zero-shot model made from any classifier and any semantic space, with no training.

Given softmax probabilities :math:`p(y \mid x)` over ``n`` training labels and one semantic vector :math:`s(y)` per
label, ConSE (Norouzi et al., ICLR 2014) embeds an image as the probability-weighted average of its ``T`` most
probable labels' vectors, :math:`f(x) = \frac{1}{Z} \sum_{t=1}^{T} p(\hat y_t \mid x)\, s(\hat y_t)` with
:math:`Z = \sum_{t=1}^{T} p(\hat y_t \mid x)`, and ranks candidate labels by cosine similarity to :math:`f(x)`: unseen
labels only (zero-shot) or training + unseen labels (generalised, the paper's "+1K" rows). :math:`\lVert f(x) \rVert_2`
shrinks when the top labels point in different semantic directions, which the paper reads as a confidence; with raw
(not unit) label vectors it also grows with their lengths (``unit_train=True`` normalises them first). Candidates with
identical vectors (synsets with the same lemmas) tie exactly: ConSE ranks them together, in candidate order, so the
order does not depend on the machine. Inputs are numpy, memmap or torch, processed in chunks on any torch device."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from zsl_utils.device import pick_device
from zsl_utils.errors import ParameterError
from zsl_utils.metrics import flat_hit_at_k
from zsl_utils.semantic import LabelEmbeddings

PAPER_T_VALUES = (1, 10, 1000)
# Small T gathers T vectors per image; large T multiplies by a sparse-as-dense weight matrix.
_GATHER_MAX_T = 32
_RANK_BUDGET_BYTES = 64 * 2**20  # similarity block [rows, candidates] held at once


def _to_tensor(array, device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)


def _like_input(result: torch.Tensor, reference):
    return result if isinstance(reference, torch.Tensor) else result.cpu().numpy()


def _resolve_device(device, reference=None) -> torch.device:
    """``device`` if given (a name goes through pick_device), else where ``reference`` lives."""
    if device is None:
        return reference.device if isinstance(reference, torch.Tensor) else torch.device("cpu")
    return device if isinstance(device, torch.device) else pick_device(device)


def _starts(n_rows: int, chunk_size: int) -> range:
    """Block starts; empty input still makes one (empty) block, so outputs keep their shape."""
    return range(0, max(n_rows, 1), max(1, chunk_size))


def _check_count(name: str, value, high: int, of: str, note: str = "") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= high:
        raise ParameterError(f"{name}={value!r}: expected an integer between 1 and the number of {of} ({high}){note}.")
    return int(value)


def _check_T(T: int, n_train: int) -> int:
    return _check_count("ConSE T", T, n_train, "training labels", f"; the paper uses T in {PAPER_T_VALUES}")


def check_probabilities(probs, n_train: int, values: bool = True) -> None:
    """Raise :class:`ParameterError` unless ``probs`` is ``[N, n_train]`` and (if ``values``) finite, non-negative."""
    if probs.ndim != 2 or probs.shape[1] != n_train:
        raise ParameterError(f"ConSE: probabilities have shape {tuple(probs.shape)} but there are {n_train} training "
                             "label vectors; pass softmax outputs [N, n_train] in the order of the training labels "
                             "(LoadedClassifier.wnids).")
    if not values or 0 in probs.shape:
        return
    if isinstance(probs, torch.Tensor):
        low, high = (float(v) for v in torch.aminmax(probs.detach()))
    else:
        low, high = float(np.min(probs)), float(np.max(probs))
    if not (low >= 0.0 and high < np.inf):  # one min/max pass: NaN fails low >= 0, +inf fails high < inf
        raise ParameterError("ConSE: probabilities contain negative or non-finite values; pass softmax probabilities "
                             "(LoadedClassifier.probabilities), not logits.")


def unit_rows(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero (cosine 0 with everything)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)


def vector_groups(vectors) -> np.ndarray:
    """Rows with identical vectors, as ``[n_groups, largest group]`` row indices (ascending, padded with -1),
    the groups in the order of their first row."""
    _, first, group = np.unique(np.asarray(vectors), axis=0, return_index=True, return_inverse=True)
    group = np.argsort(np.argsort(first))[group.reshape(-1)]  # renumbered by first row
    order = np.lexsort((np.arange(len(group)), group))  # by group, then by row
    sizes = np.bincount(group)
    table = np.full((len(sizes), sizes.max()), -1, dtype=np.int64)
    table[group[order], np.arange(len(group)) - np.repeat(np.cumsum(sizes) - sizes, sizes)] = order
    return table


def _embed_block(probs: torch.Tensor, train: torch.Tensor, T: int, train_mask: torch.Tensor | None):
    """``(f(x), ||f(x)||)`` for one block of probabilities: the module docstring's formula."""
    if train_mask is not None:
        # Labels without an embedding cannot take part; the top T are drawn from the rest.
        probs = probs * train_mask
    top_p, top_i = probs.topk(T, dim=1)
    if T <= _GATHER_MAX_T:
        combined = torch.einsum("bt,btd->bd", top_p, train[top_i])
    else:
        weights = torch.zeros_like(probs).scatter_(1, top_i, top_p)
        combined = weights @ train
    z = top_p.sum(dim=1, keepdim=True)
    embedding = torch.where(z > 0, combined / z.clamp_min(1e-30), torch.zeros_like(combined))
    return embedding, embedding.norm(dim=1)


def conse_embed(probs, train_vectors, T: int = 10, train_mask=None, chunk_size: int = 8192, device=None,
                validate: bool = True):
    """``(f(x) [N, d], ||f(x)|| [N])``, numpy or torch like ``probs`` ``[N, n_train]``; ``train_mask[j]``
    is False for a label without a vector. ``validate=False`` skips the value check (the caller ran it)."""
    dev = _resolve_device(device, probs)
    train = _to_tensor(train_vectors, dev)
    T = _check_T(T, train.shape[0])
    mask = None if train_mask is None else _to_tensor(train_mask, dev)
    parts = []
    for start in _starts(len(probs), chunk_size):
        block = _to_tensor(probs[start : start + chunk_size], dev)
        check_probabilities(block, train.shape[0], values=validate)
        parts.append(_embed_block(block, train, T, mask))
    embeddings, norms = (torch.cat(part) for part in zip(*parts))
    return _like_input(embeddings, probs), _like_input(norms, probs)


def rank(embeddings, candidate_vectors, k: int = 5, chunk_size: int | None = None, device=None,
         unit_candidates: bool = False):
    """Top-``k`` candidates by cosine: ``(indices [N, k], scores [N, k])``, in ~64 MiB chunks.
    ``unit_candidates=True`` says the candidate rows have unit norm already (as ConSE stores them)."""
    dev = _resolve_device(device, embeddings)
    candidates = _to_tensor(candidate_vectors, dev)
    unit_candidates = candidates if unit_candidates else unit_rows(candidates)
    n_candidates = unit_candidates.shape[0]
    k = _check_count("rank: k", k, n_candidates, "candidates")
    if embeddings.ndim != 2 or embeddings.shape[1] != unit_candidates.shape[1]:
        raise ParameterError(f"rank: embeddings {tuple(embeddings.shape)} and candidate vectors "
                             f"{tuple(unit_candidates.shape)} must share the semantic dimension; build both from "
                             "the same semantic space.")
    chunk = chunk_size or max(1, _RANK_BUDGET_BYTES // (4 * n_candidates))
    parts = []
    for start in _starts(len(embeddings), chunk):
        block = unit_rows(_to_tensor(embeddings[start : start + chunk], dev))
        parts.append((block @ unit_candidates.T).topk(k, dim=1))  # (scores, indices)
    scores, indices = (torch.cat(part) for part in zip(*parts))
    return _like_input(indices, embeddings), _like_input(scores, embeddings)


@dataclass
class ConSEPrediction:
    """Top-``k`` candidates and cosines per image, plus ``||f(x)||``. All-zero probabilities (an
    image the extractor skipped) give norm 0 and meaningless ranks: filter with the cache's ``ok``."""

    indices: np.ndarray  # [N, k] positions in ConSE.candidate_labels
    scores: np.ndarray  # [N, k] cosine similarities, descending
    norms: np.ndarray  # [N] L2 norm of f(x)
    candidate_labels: list[str]

    def labels(self, row: int) -> list[str]:
        return [self.candidate_labels[j] for j in self.indices[row]]


class ConSE:
    """Training-label vectors (``train_mask``: real ones), ``T``, candidates to rank (unseen, or training + unseen);
    ``unit_train=True`` unit-normalises the training-label vectors before they are combined."""

    def __init__(self, train_vectors, candidate_vectors, T: int = 10, train_mask=None,
                 candidate_labels: Sequence[str] | None = None, device: str | torch.device = "cpu",
                 unit_train: bool = False) -> None:
        self.device = _resolve_device(device)
        self.train = _to_tensor(train_vectors, self.device)
        self.train = unit_rows(self.train) if unit_train else self.train
        self.T = _check_T(T, self.train.shape[0])
        self.train_mask = None if train_mask is None else _to_tensor(train_mask, self.device)
        if self.train_mask is not None and self.train_mask.shape != (self.train.shape[0],):
            raise ParameterError(f"ConSE: train_mask has shape {tuple(self.train_mask.shape)}, "
                                 f"expected ({self.train.shape[0]},).")
        self.unit_candidates = unit_rows(_to_tensor(candidate_vectors, self.device))
        if self.unit_candidates.ndim != 2 or self.unit_candidates.shape[1] != self.train.shape[1]:
            raise ParameterError(f"ConSE: candidate vectors {tuple(self.unit_candidates.shape)} must be "
                                 f"[n, {self.train.shape[1]}] like the training label vectors; build both from the "
                                 "same semantic space.")
        n = self.unit_candidates.shape[0]
        self.candidate_labels = list(candidate_labels) if candidate_labels is not None else [str(i) for i in range(n)]
        if len(self.candidate_labels) != n:
            raise ParameterError(f"ConSE: {len(self.candidate_labels)} candidate labels for {n} candidate vectors.")
        # Identical candidate vectors tie exactly: one row per distinct vector is ranked, then its group is listed.
        self.groups = torch.as_tensor(vector_groups(self.unit_candidates.cpu().numpy()), device=self.device)
        self.distinct = self.unit_candidates[self.groups[:, 0]]

    @classmethod
    def from_embeddings(cls, train: LabelEmbeddings, candidates: LabelEmbeddings, T: int = 10,
                        device: str | torch.device = "cpu", unit_train: bool = False) -> "ConSE":
        """Missing training labels are masked out, missing candidates dropped (see ``.report()``)."""
        usable = candidates.only_found()
        return cls(train.vectors, usable.vectors, T, train.found, usable.labels, device, unit_train)

    def with_T(self, T: int) -> "ConSE":
        """The same model with another ``T`` (shares the stored vectors)."""
        clone = object.__new__(ConSE)
        clone.__dict__.update(self.__dict__)
        clone.T = _check_T(T, self.train.shape[0])
        return clone

    def embed(self, probs, chunk_size: int = 8192, validate: bool = True):
        """``(f(x) [N, d], ||f(x)|| [N])`` for softmax outputs ``[N, n_train]`` (see :func:`conse_embed`)."""
        return conse_embed(probs, self.train, self.T, self.train_mask, chunk_size, self.device, validate)

    def predict(self, probs, k: int = 5, batch_size: int = 8192) -> ConSEPrediction:
        """Rank the candidates for every row of ``probs`` (numpy/memmap/torch), in batches."""
        chunks = []
        starts = _starts(len(probs), batch_size)
        for start in tqdm(starts, desc=f"ConSE(T={self.T})", disable=len(starts) < 4):
            block = _to_tensor(probs[start : start + batch_size], self.device)
            check_probabilities(block, self.train.shape[0])
            chunks.append(self._rank_block(*_embed_block(block, self.train, self.T, self.train_mask), k))
        return self._prediction(chunks)

    def predict_embedded(self, embeddings, norms, k: int = 5, batch_size: int = 8192) -> ConSEPrediction:
        """Rank for ``(embeddings, norms) = m.embed(probs)``: exactly ``self.predict(probs)`` when ``m``
        has the same training vectors, mask and ``T``, so several candidate sets embed images once."""
        if len(embeddings) != len(norms):
            raise ParameterError(f"ConSE.predict_embedded: {len(embeddings)} embeddings but {len(norms)} norms; "
                                 "pass both outputs of ConSE.embed for the same rows.")
        chunks = [self._rank_block(_to_tensor(embeddings[s : s + batch_size], self.device),
                                   norms[s : s + batch_size], k)
                  for s in _starts(len(embeddings), batch_size)]
        return self._prediction(chunks)

    def _rank_block(self, emb: torch.Tensor, norm, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        top, score = rank(emb, self.distinct, min(k, len(self.groups)), device=self.device, unit_candidates=True)
        idx = self.groups[top].flatten(1)  # each ranked vector's candidates, in candidate order
        if idx.shape[1] > k:  # some groups hold several candidates: keep the first k, skipping the padding
            keep = torch.argsort((idx < 0).to(torch.int8), dim=1, stable=True)[:, :k]
            idx, score = idx.gather(1, keep), score.repeat_interleave(self.groups.shape[1], dim=1).gather(1, keep)
        norm = norm.cpu().numpy() if isinstance(norm, torch.Tensor) else np.asarray(norm, dtype=np.float32)
        return idx.cpu().numpy(), score.cpu().numpy(), norm

    def _prediction(self, chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]]) -> ConSEPrediction:
        indices, scores, norms = (np.concatenate(parts) for parts in zip(*chunks))
        return ConSEPrediction(indices, scores, norms, self.candidate_labels)


def generalised_candidates(train: LabelEmbeddings, unseen: LabelEmbeddings) -> LabelEmbeddings:
    """Training labels followed by the unseen labels not already among them (the "+1K" setting)."""
    seen = set(train.labels)
    return train.concat(unseen.take([i for i, label in enumerate(unseen.labels) if label not in seen]))


def label_collisions(embeddings: LabelEmbeddings) -> list[list[str]]:
    """Groups of labels whose vectors point the same way exactly: ConSE ranks each group together, in label order."""
    found = np.flatnonzero(embeddings.found)
    unit = unit_rows(torch.as_tensor(embeddings.vectors[found], dtype=torch.float32)).numpy()
    groups = []
    for members in vector_groups(unit):
        members = members[members >= 0]
        if len(members) > 1:
            groups.append([embeddings.labels[found[i]] for i in members])
    return groups


# hit@1 (%) on the paper's 1K validation set as summarised in issue 3; unverified (tables/paper_conse_imagenet.csv).
PAPER_1K_HIT1 = {"softmax": 55.6, "ConSE(1)": 55.1}


CONSE1_CASES = ("agree", "softmax top-1 has no vector", "same vector as another label", "tied top probabilities",
                "other")


def softmax_vs_conse1(probs, train: LabelEmbeddings, true_labels: Sequence[str] | None = None) -> pd.DataFrame:
    """Softmax vs. ConSE(1) top-1 over the training labels per image; column ``case`` (one of ``CONSE1_CASES``) says
    why they differ: ConSE(1) skips a top-1 label without a vector, lists labels sharing a vector in label order,
    and may order tied probabilities differently from argmax."""
    probs_np = np.asarray(probs, dtype=np.float32)
    prediction = ConSE.from_embeddings(train, train, T=1).predict(probs_np, k=1)
    table = pd.DataFrame({"softmax_top1": [train.labels[j] for j in probs_np.argmax(axis=1)],
                          "conse1_top1": [prediction.candidate_labels[j] for j in prediction.indices[:, 0]]})
    group_of = {label: g for g, group in enumerate(label_collisions(train)) for label in group}
    soft, con = table.softmax_top1, table.conse1_top1
    collision = [a in group_of and group_of.get(b) == group_of[a] for a, b in zip(soft, con)]
    top_two = -np.partition(-probs_np, 1, axis=1)[:, :2]
    tie = top_two[:, 0] == top_two[:, 1]
    table["case"] = np.select([soft == con, soft.isin(train.missing), collision, tie], CONSE1_CASES[:-1], "other")
    if true_labels is not None:
        if len(true_labels) != len(table):
            raise ParameterError(f"softmax_vs_conse1: {len(true_labels)} true labels for {len(table)} images.")
        table["true_label"] = list(true_labels)
    return table


def summarise_conse1_check(per_image: pd.DataFrame) -> pd.DataFrame:
    """Counts per case and, with true labels, hit@1 (%) of both beside the paper's numbers."""
    counts = per_image["case"].value_counts()
    rows = [{"quantity": f"images: {case}", "ours": float(counts.get(case, 0)), "paper": np.nan} for case in CONSE1_CASES]
    if "true_label" in per_image:
        for method, column in (("softmax", "softmax_top1"), ("ConSE(1)", "conse1_top1")):
            hit = 100.0 * float((per_image[column] == per_image["true_label"]).mean())
            rows.append({"quantity": f"hit@1 % {method}", "ours": hit, "paper": PAPER_1K_HIT1[method]})
    return pd.DataFrame(rows)


def classifier_confidence(probs) -> pd.DataFrame:
    """Per-image max probability and entropy (nats) of softmax outputs ``[N, n]``."""
    p = np.asarray(probs, dtype=np.float64)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return pd.DataFrame({"max_prob": p.max(axis=1), "entropy": entropy})


def top_training_labels(probs_row, names: Sequence[str], n: int = 5, mask=None) -> list[tuple[str, float]]:
    """One image's ``n`` likeliest training labels ``(name, probability)``, only where ``mask`` is True (as ConSE)."""
    row = np.asarray(probs_row, dtype=np.float64)
    if mask is not None:
        row = np.where(np.asarray(mask, dtype=bool), row, -np.inf)
    order = np.argsort(-row, kind="stable")[:n]
    return [(names[j], float(row[j])) for j in order]


def predictions_by_T(model: ConSE, probs, T_values: Sequence[int], k: int) -> dict[int, ConSEPrediction]:
    """The same probabilities ranked by ConSE(T) for each ``T`` (vectors are shared)."""
    return {int(T): model.with_T(int(T)).predict(probs, k=k) for T in T_values}


def hit_at_k_by_T(predictions: dict[int, ConSEPrediction], true_labels: Sequence[str],
                  ks: Sequence[int] = (1, 2, 5, 10)) -> pd.DataFrame:
    """Flat hit@k (%) per ``T``; a true label absent from the candidates is never a hit."""
    rows = []
    for T, prediction in predictions.items():
        position = {label: i for i, label in enumerate(prediction.candidate_labels)}
        hits = flat_hit_at_k(prediction.indices, [position.get(label, -1) for label in true_labels], ks)
        rows.append({"T": T, **{f"hit@{k} %": 100.0 * hits[k] for k in ks}})
    return pd.DataFrame(rows).set_index("T")


def top1_by_T(predictions: dict[int, ConSEPrediction], row_names: Sequence[str],
              label_names: Mapping[str, str] | None = None) -> pd.DataFrame:
    """Table of ConSE's top-1 label (rows: images, columns: T)."""
    label_names = label_names or {}
    columns = {f"T={T}": [label_names.get(l, l) for l in (p.candidate_labels[i] for i in p.indices[:, 0])]
               for T, p in predictions.items()}
    return pd.DataFrame(columns, index=list(row_names))
