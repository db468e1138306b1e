r"""ConSE: a zero-shot model made from any classifier and any semantic space, with no training.

Given softmax probabilities :math:`p(y \mid x)` over ``n`` training labels and one semantic
vector :math:`s(y)` per label, ConSE (Norouzi et al., ICLR 2014) embeds an image as the
probability-weighted average of its ``T`` most probable labels' vectors,

.. math:: f(x) = \frac{1}{Z} \sum_{t=1}^{T} p(\hat y_t \mid x)\, s(\hat y_t), \qquad
          Z = \sum_{t=1}^{T} p(\hat y_t \mid x),

and ranks any set of candidate labels by cosine similarity between :math:`f(x)` and
their vectors. Unseen labels only is zero-shot learning; training + unseen labels is the
generalised setting (the paper's "+1K" rows). :math:`\lVert f(x) \rVert_2` shrinks when the
top labels point in different semantic directions, which the paper reads as a confidence.

Everything works on a cached probability matrix (numpy, memmap or torch), in chunks so
memory stays bounded, on any torch device.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np
import torch

from zsl_utils.errors import ParameterError
from zsl_utils.semantic import LabelEmbeddings

PAPER_T_VALUES = (1, 10, 1000)
# Small T gathers T vectors per image; large T multiplies by a sparse-as-dense weight matrix.
_GATHER_MAX_T = 32
_RANK_BUDGET_BYTES = 64 * 2**20  # similarity block [rows, candidates] held at once


# --------------------------------------------------------------------------- helpers

def _to_tensor(array, device: torch.device) -> torch.Tensor:
    if isinstance(array, torch.Tensor):
        return array.to(device=device, dtype=torch.float32)
    return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)


def _like_input(result: torch.Tensor, reference):
    return result if isinstance(reference, torch.Tensor) else result.cpu().numpy()


def _resolve_device(device, reference) -> torch.device:
    if device is not None:
        from zsl_utils.device import pick_device

        return device if isinstance(device, torch.device) else pick_device(device)
    if isinstance(reference, torch.Tensor):
        return reference.device
    return torch.device("cpu")


def _check_T(T: int, n_train: int) -> int:
    if isinstance(T, bool) or not isinstance(T, (int, np.integer)) or not 1 <= T <= n_train:
        raise ParameterError(
            f"ConSE T={T!r}: expected an integer between 1 and the number of training labels ({n_train}); "
            f"the paper uses T in {PAPER_T_VALUES}."
        )
    return int(T)


def _check_probs_shape(probs, n_train: int) -> None:
    if probs.ndim != 2 or probs.shape[1] != n_train:
        raise ParameterError(
            f"ConSE: probabilities have shape {tuple(probs.shape)} but there are {n_train} training label "
            "vectors; pass softmax outputs [N, n_train] in the order of the training labels (LoadedClassifier.wnids)."
        )


def check_probabilities(probs, n_train: int) -> None:
    """Raise :class:`ParameterError` unless ``probs`` (numpy or torch) is ``[N, n_train]``,
    finite and non-negative.

    One min/max pass: a NaN makes both NaN and fails ``min >= 0``, ``-inf`` or a negative
    value fails it too, ``+inf`` fails ``max < inf``. (``torch.isfinite(...).all()`` plus a
    minimum costs several times more.) Callers that embed the same rows several times
    check once here and pass ``validate=False`` to :func:`conse_embed` / :meth:`ConSE.embed`.
    """
    _check_probs_shape(probs, n_train)
    if isinstance(probs, torch.Tensor):
        if not probs.numel():
            return
        low, high = (float(v) for v in torch.aminmax(probs.detach()))
    else:
        array = np.asarray(probs)
        if not array.size:
            return
        low, high = float(array.min()), float(array.max())
    if not (low >= 0.0 and high < math.inf):
        raise ParameterError(
            "ConSE: probabilities contain negative or non-finite values; pass softmax probabilities "
            "(LoadedClassifier.probabilities), not logits."
        )


def unit_rows(vectors: torch.Tensor, eps: float = 1e-12) -> torch.Tensor:
    """Rows scaled to unit L2 norm; all-zero rows stay zero (cosine 0 with everything)."""
    return vectors / vectors.norm(dim=-1, keepdim=True).clamp_min(eps)


# --------------------------------------------------------------------------- functional API

def _embed_block(probs: torch.Tensor, train: torch.Tensor, T: int, train_mask: torch.Tensor | None):
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
    """ConSE image embeddings ``f(x)`` and their L2 norms for a probability matrix.

    ``probs``: ``[N, n_train]`` softmax outputs (numpy, memmap or torch). ``train_vectors``:
    ``[n_train, d]``, row ``j`` the semantic vector of classifier output ``j``. ``train_mask``:
    optional boolean ``[n_train]``, False for labels without an embedding. ``validate=False``
    skips the value check (the shape is always checked) for callers that already ran
    :func:`check_probabilities` on ``probs``. Returns ``(embeddings [N, d], norms [N])`` of
    the same kind (numpy/torch) as ``probs``.
    """
    dev = _resolve_device(device, probs)
    train = _to_tensor(train_vectors, dev)
    T = _check_T(T, train.shape[0])
    mask = None if train_mask is None else _to_tensor(train_mask, dev)
    embeddings, norms = [], []
    for start in range(0, len(probs), max(1, chunk_size)):
        block = _to_tensor(probs[start : start + chunk_size], dev)
        if validate:
            check_probabilities(block, train.shape[0])
        else:
            _check_probs_shape(block, train.shape[0])
        emb, norm = _embed_block(block, train, T, mask)
        embeddings.append(emb)
        norms.append(norm)
    if not embeddings:
        return _like_input(torch.zeros(0, train.shape[1]), probs), _like_input(torch.zeros(0), probs)
    return _like_input(torch.cat(embeddings), probs), _like_input(torch.cat(norms), probs)


def _rank_block(emb: torch.Tensor, unit_candidates: torch.Tensor, k: int):
    scores = unit_rows(emb) @ unit_candidates.T
    top_scores, top_indices = scores.topk(k, dim=1)
    return top_indices, top_scores


def rank(embeddings, candidate_vectors, k: int = 5, chunk_size: int | None = None, device=None):
    """Top-``k`` candidates by cosine similarity to each embedding.

    Returns ``(indices [N, k] int64, scores [N, k] cosine)`` of the same kind as
    ``embeddings``; indices point into ``candidate_vectors``. Rows are processed in chunks
    (default: a similarity block of about 64 MiB) so memory stays bounded.
    """
    dev = _resolve_device(device, embeddings)
    candidates = unit_rows(_to_tensor(candidate_vectors, dev))
    return _rank_with_unit(embeddings, candidates, k, chunk_size, dev)


def _rank_with_unit(embeddings, unit_candidates: torch.Tensor, k: int, chunk_size: int | None, dev):
    n_candidates = unit_candidates.shape[0]
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or not 1 <= k <= n_candidates:
        raise ParameterError(f"rank: k={k!r} must be an integer between 1 and the number of candidates ({n_candidates}).")
    if embeddings.ndim != 2 or embeddings.shape[1] != unit_candidates.shape[1]:
        raise ParameterError(
            f"rank: embeddings {tuple(embeddings.shape)} and candidate vectors {tuple(unit_candidates.shape)} "
            "must share the semantic dimension; build both from the same semantic space."
        )
    chunk = chunk_size or max(1, _RANK_BUDGET_BYTES // (4 * n_candidates))
    indices, scores = [], []
    for start in range(0, len(embeddings), chunk):
        idx, score = _rank_block(_to_tensor(embeddings[start : start + chunk], dev), unit_candidates, int(k))
        indices.append(idx)
        scores.append(score)
    if not indices:
        return _like_input(torch.zeros(0, k, dtype=torch.int64), embeddings), _like_input(torch.zeros(0, k), embeddings)
    return _like_input(torch.cat(indices), embeddings), _like_input(torch.cat(scores), embeddings)


# --------------------------------------------------------------------------- the model

@dataclass
class ConSEPrediction:
    """Top-``k`` candidate positions and cosine scores per image, plus ``||f(x)||``.

    A row of all-zero probabilities (an image the extractor skipped) gives ``f(x) = 0``,
    norm 0 and meaningless ranks: filter such rows with the cache's ``ok`` mask.
    """

    indices: np.ndarray  # [N, k] positions in ConSE.candidate_labels
    scores: np.ndarray  # [N, k] cosine similarities, descending
    norms: np.ndarray  # [N] L2 norm of f(x)
    candidate_labels: list[str]

    def labels(self, row: int) -> list[str]:
        """Predicted labels of image ``row``, best first."""
        return [self.candidate_labels[j] for j in self.indices[row]]


class ConSE:
    """A ConSE model: training-label vectors, a candidate set and ``T``.

    ``train_vectors[j]`` embeds classifier output ``j``; ``train_mask`` (optional) marks
    the rows that are real embeddings. ``candidate_vectors`` are the labels to rank
    (unseen labels for zero-shot, training + unseen for the generalised setting).
    """

    def __init__(
        self,
        train_vectors,
        candidate_vectors,
        T: int = 10,
        train_mask=None,
        candidate_labels: Sequence[str] | None = None,
        device: str | torch.device = "cpu",
    ) -> None:
        from zsl_utils.device import pick_device

        self.device = device if isinstance(device, torch.device) else pick_device(device)
        self.train = _to_tensor(train_vectors, self.device)
        self.T = _check_T(T, self.train.shape[0])
        self.train_mask = None if train_mask is None else _to_tensor(train_mask, self.device)
        if self.train_mask is not None and self.train_mask.shape != (self.train.shape[0],):
            raise ParameterError(f"ConSE: train_mask has shape {tuple(self.train_mask.shape)}, "
                                 f"expected ({self.train.shape[0]},).")
        self.unit_candidates = unit_rows(_to_tensor(candidate_vectors, self.device))
        if self.unit_candidates.ndim != 2 or self.unit_candidates.shape[1] != self.train.shape[1]:
            raise ParameterError(
                f"ConSE: candidate vectors {tuple(self.unit_candidates.shape)} must be [n, {self.train.shape[1]}] "
                "like the training label vectors; build both from the same semantic space."
            )
        n = self.unit_candidates.shape[0]
        self.candidate_labels = list(candidate_labels) if candidate_labels is not None else [str(i) for i in range(n)]
        if len(self.candidate_labels) != n:
            raise ParameterError(f"ConSE: {len(self.candidate_labels)} candidate labels for {n} candidate vectors.")

    @classmethod
    def from_embeddings(
        cls, train: LabelEmbeddings, candidates: LabelEmbeddings, T: int = 10, device: str | torch.device = "cpu"
    ) -> "ConSE":
        """Build from :class:`LabelEmbeddings`: missing training labels are masked out and
        missing candidates dropped (both are listed by ``.report()`` of the inputs)."""
        usable = candidates.only_found()
        return cls(train.vectors, usable.vectors, T, train.found, usable.labels, device)

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
        from tqdm.auto import tqdm

        chunks = []
        starts = range(0, len(probs), max(1, batch_size))
        for start in tqdm(starts, desc=f"ConSE(T={self.T})", disable=len(starts) < 4):
            block = _to_tensor(probs[start : start + batch_size], self.device)
            check_probabilities(block, self.train.shape[0])
            emb, norm = _embed_block(block, self.train, self.T, self.train_mask)
            chunks.append(self._rank_block(emb, norm, k))
        return self._prediction(chunks, k)

    def predict_embedded(self, embeddings, norms, k: int = 5, batch_size: int = 8192) -> ConSEPrediction:
        """Rank the candidates for image embeddings ``f(x)`` already computed by :meth:`embed`.

        With ``(embeddings, norms) = m.embed(probs)`` from any model ``m`` with the same
        training vectors, mask and ``T`` (e.g. this model with another candidate set), the
        result equals ``self.predict(probs)`` exactly (same blocks, same arithmetic), so
        several candidate sets over the same images embed them only once.
        """
        if len(embeddings) != len(norms):
            raise ParameterError(f"ConSE.predict_embedded: {len(embeddings)} embeddings but {len(norms)} norms; "
                                 "pass both outputs of ConSE.embed for the same rows.")
        chunks = []
        for start in range(0, len(embeddings), max(1, batch_size)):
            emb = _to_tensor(embeddings[start : start + batch_size], self.device)
            chunks.append(self._rank_block(emb, norms[start : start + batch_size], k))
        return self._prediction(chunks, k)

    def _rank_block(self, emb: torch.Tensor, norm, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        idx, score = _rank_with_unit(emb, self.unit_candidates, k, None, self.device)
        norm = norm.cpu().numpy() if isinstance(norm, torch.Tensor) else np.asarray(norm, dtype=np.float32)
        return idx.cpu().numpy(), score.cpu().numpy(), norm

    def _prediction(self, chunks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], k: int) -> ConSEPrediction:
        if not chunks:
            return ConSEPrediction(np.zeros((0, k), np.int64), np.zeros((0, k), np.float32),
                                   np.zeros(0, np.float32), self.candidate_labels)
        indices, scores, norms = (np.concatenate(parts) for parts in zip(*chunks))
        return ConSEPrediction(indices, scores, norms, self.candidate_labels)


# --------------------------------------------------------------------------- candidate sets

def generalised_candidates(train: LabelEmbeddings, unseen: LabelEmbeddings) -> LabelEmbeddings:
    """Training labels followed by the unseen labels not already among them (the "+1K" setting)."""
    seen = set(train.labels)
    extra = [i for i, label in enumerate(unseen.labels) if label not in seen]
    return train.concat(unseen.take(extra))


def label_collisions(embeddings: LabelEmbeddings, decimals: int = 5) -> list[list[str]]:
    """Groups of embedded labels whose vectors point the same way (cosine 1 to ``decimals``).

    Synonym averaging gives two synsets the same vector when they share all their
    embeddable lemmas (ImageNet has two *crane* classes: the bird and the machine).
    Among such labels ConSE cannot tell which is meant, so ConSE(1) over the training
    labels differs from the softmax top-1 exactly there.
    """
    found = np.flatnonzero(embeddings.found)
    unit = unit_rows(torch.as_tensor(embeddings.vectors[found], dtype=torch.float32)).numpy()
    _, inverse, counts = np.unique(np.round(unit, decimals), axis=0, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1)
    groups = [found[inverse == g] for g in np.flatnonzero(counts > 1)]
    return sorted([[embeddings.labels[i] for i in group] for group in groups])


# The paper's remark on its 1,000-class validation set (ConSE(1) vs. the softmax, hit@1 in %),
# as summarised in the project's issue 3; see Norouzi et al. (2014), 1000-class experiments.
# Not verified against the paper's text: the stored copies found (https://www.arxiv-vanity.com/papers/1312.5650/ ,
# https://hyper.ai/en/papers/1312.5650) only returned the abstract and opening of the introduction, so 55.6 / 55.1
# remain as remembered in issue 3 (see also the header of tables/paper_conse_imagenet.csv).
PAPER_1K_HIT1 = {"softmax": 55.6, "ConSE(1)": 55.1}


def softmax_vs_conse1(probs, train: LabelEmbeddings, true_labels: Sequence[str] | None = None):
    """The 1,000-class sanity check, one row per image: softmax top-1 vs. ConSE(1) top-1.

    With T = 1 and the training labels as candidates, ConSE returns the label whose vector
    is closest to the top-1 label's own vector, i.e. the top-1 label itself, unless another
    label has the same vector (a collision) or the top-1 label has no embedding (ConSE then
    uses the best embedded label). Column ``case`` says which; ``true_label`` is added when
    given. Summarise with :func:`summarise_conse1_check`.
    """
    import pandas as pd

    probs_np = np.asarray(probs, dtype=np.float32)
    prediction = ConSE.from_embeddings(train, train, T=1).predict(probs_np, k=1)
    table = pd.DataFrame({
        "softmax_top1": [train.labels[j] for j in probs_np.argmax(axis=1)],
        "conse1_top1": [prediction.candidate_labels[j] for j in prediction.indices[:, 0]],
    })
    group_of = {label: g for g, group in enumerate(label_collisions(train)) for label in group}
    missing = set(train.missing)

    def case(soft: str, con: str) -> str:
        if soft == con:
            return "agree"
        if soft in missing:
            return "softmax top-1 has no embedding"
        if soft in group_of and group_of.get(con) == group_of[soft]:
            return "collision (same vector)"
        return "other"

    table["case"] = [case(a, b) for a, b in zip(table.softmax_top1, table.conse1_top1)]
    if true_labels is not None:
        if len(true_labels) != len(table):
            raise ParameterError(f"softmax_vs_conse1: {len(true_labels)} true labels for {len(table)} images.")
        table["true_label"] = list(true_labels)
    return table


def summarise_conse1_check(per_image) -> "pd.DataFrame":
    """Counts per case and, with true labels, hit@1 (%) of both beside the paper's numbers."""
    import pandas as pd

    rows = [{"quantity": f"images: {name}", "ours": float(count), "paper": np.nan}
            for name, count in per_image["case"].value_counts().items()]
    if "true_label" in per_image:
        for method, column in (("softmax", "softmax_top1"), ("ConSE(1)", "conse1_top1")):
            hit = 100.0 * float((per_image[column] == per_image["true_label"]).mean())
            rows.append({"quantity": f"hit@1 % {method}", "ours": hit, "paper": PAPER_1K_HIT1[method]})
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- analysis helpers

def classifier_confidence(probs) -> "pd.DataFrame":
    """Per-image max probability and entropy (nats) of softmax outputs ``[N, n]``."""
    import pandas as pd

    p = np.asarray(probs, dtype=np.float64)
    entropy = -np.sum(np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0), axis=1)
    return pd.DataFrame({"max_prob": p.max(axis=1), "entropy": entropy})


def top_training_labels(probs_row, names: Sequence[str], n: int = 5, mask=None) -> list[tuple[str, float]]:
    """The ``n`` most probable training labels of one image as ``(name, probability)``.

    With ``mask`` (e.g. ``LabelEmbeddings.found``) only labels where it is True are
    considered: exactly the labels ConSE(T = n) combines.
    """
    row = np.asarray(probs_row, dtype=np.float64)
    if mask is not None:
        row = np.where(np.asarray(mask, dtype=bool), row, -np.inf)
    order = np.argsort(-row, kind="stable")[:n]
    return [(names[j], float(row[j])) for j in order]


def predictions_by_T(model: ConSE, probs, T_values: Sequence[int], k: int) -> dict[int, ConSEPrediction]:
    """The same probabilities ranked by ConSE(T) for each ``T`` (vectors are shared)."""
    return {int(T): model.with_T(int(T)).predict(probs, k=k) for T in T_values}


def hit_at_k_by_T(predictions: dict[int, ConSEPrediction], true_labels: Sequence[str],
                  ks: Sequence[int] = (1, 2, 5, 10)) -> "pd.DataFrame":
    """Flat hit@k (%) per ``T``; a true label absent from the candidates is never a hit."""
    import pandas as pd

    from zsl_utils.metrics import flat_hit_at_k

    rows = []
    for T, prediction in predictions.items():
        position = {label: i for i, label in enumerate(prediction.candidate_labels)}
        true_index = [position.get(label, -1) for label in true_labels]
        hits = flat_hit_at_k(prediction.indices, true_index, ks)
        rows.append({"T": T, **{f"hit@{k} %": 100.0 * hits[k] for k in ks}})
    return pd.DataFrame(rows).set_index("T")


def top1_by_T(predictions: dict[int, ConSEPrediction], row_names: Sequence[str],
              label_names: Mapping[str, str] | None = None) -> "pd.DataFrame":
    """Table of ConSE's top-1 label (rows: images, columns: T)."""
    import pandas as pd

    label_names = label_names or {}
    columns = {f"T={T}": [label_names.get(l, l) for l in (p.candidate_labels[i] for i in p.indices[:, 0])]
               for T, p in predictions.items()}
    return pd.DataFrame(columns, index=list(row_names))
