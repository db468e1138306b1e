"""The three HUSE losses (Narayana et al., 2019, Section 3.4), vectorised.

``u_i`` / ``v_i``: unit image / text embeddings of item ``i`` of class ``c_i``; ``A``: cosine
distances between class-name embeddings (the semantic graph, Eq. 4); ``d``: cosine distance.

* classification: softmax cross-entropy of the shared layer on ``u_i`` and on ``v_i``.
* graph (Eq. 10-11): over all ordered pairs of the ``2N`` stacked embeddings,
  ``mean [A[c_m, c_n] < zeta and d_mn < zeta] * (d_mn - A[c_m, c_n])^2``. ``variant="prose"``
  also pushes dissimilar-class pairs (``A >= zeta``) apart: ``+ max(0, zeta - d_mn)^2``.
* gap (Eq. 12): ``mean_i d(u_i, v_i)``. Total: ``alpha * cls + beta * graph + gamma * gap``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsl_utils.errors import ParameterError

GRAPH_VARIANTS = ("equation", "prose")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three HUSE losses and the graph margin ``zeta`` (the paper publishes none).

    The defaults won validation grids on the Tux Paint demo (beta in {0, 1, 3}, gamma in {0, 1}, zeta in {0.6, 0.9},
    both variants; then gamma in {0, 0.3, 1} on two more seeds): gamma=0 won every time, as the shared classifier
    already aligns the modalities. Notebook 03 re-chooses them."""

    alpha: float = 1.0  # classification weight
    beta: float = 1.0  # semantic-graph weight
    gamma: float = 0.0  # cross-modal gap weight
    margin: float = 0.6  # zeta in Eq. 10, a cosine distance in (0, 2]
    graph_variant: str = "equation"  # "equation" (Eq. 10-11 as printed) or "prose"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            if not getattr(self, name) >= 0:
                raise ParameterError(f"loss weight {name}={getattr(self, name)!r} must be a number >= 0.")
        if not 0 < self.margin <= 2:
            raise ParameterError(f"graph margin zeta={self.margin!r} must lie in (0, 2] (cosine distances range 0..2).")
        if self.graph_variant not in GRAPH_VARIANTS:
            raise ParameterError(f"graph_variant={self.graph_variant!r}; choose one of {GRAPH_VARIANTS}.")


def cosine_distance_matrix(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` cosine distances between every row of ``rows`` and of ``columns``."""
    return 1.0 - F.normalize(rows, dim=1) @ F.normalize(columns, dim=1).T


def class_distance_matrix(class_embeddings: torch.Tensor) -> torch.Tensor:
    """The semantic graph ``A`` (Eq. 4); the diagonal is exactly 0 despite float noise."""
    return cosine_distance_matrix(class_embeddings, class_embeddings).clamp_min(0.0).fill_diagonal_(0.0)


def classification_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the ``(N, K)`` logits of every modality present."""
    return torch.stack([F.cross_entropy(modality_logits, labels) for modality_logits in logits]).mean()


def semantic_graph_loss(embeddings: list[torch.Tensor], labels: torch.Tensor, class_distance: torch.Tensor,
                        margin: float, variant: str = "equation") -> torch.Tensor:
    """Eq. 11 over all ordered pairs of the stacked ``(N, D)`` embeddings of every modality."""
    stacked = torch.cat(embeddings, dim=0)
    stacked_labels = labels.repeat(len(embeddings))
    distance = cosine_distance_matrix(stacked, stacked)
    target = class_distance[stacked_labels][:, stacked_labels]
    similar_classes = target < margin
    # Eq. 10: the mask is a selection, not a function to differentiate through.
    within_margin = distance.detach() < margin
    per_pair = (similar_classes & within_margin) * (distance - target) ** 2
    if variant == "prose":
        too_close = ~similar_classes & within_margin
        per_pair = per_pair + too_close * (margin - distance) ** 2
    elif variant != "equation":
        raise ParameterError(f"graph variant {variant!r}; choose one of {GRAPH_VARIANTS}.")
    return per_pair.mean()


def gap_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. 12: mean cosine distance between the image and the text of the same item."""
    return (1.0 - F.cosine_similarity(image_embeddings, text_embeddings, dim=1)).mean()


def huse_loss(embeddings: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], labels: torch.Tensor,
              class_distance: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The weighted HUSE objective (``"total"``) and its parts, from ``{modality: tensor}`` maps. At weight 0 the
    graph term is skipped (0: no pair matrix); the cheap gap term is always computed (for the curves)."""
    zero = labels.new_zeros((), dtype=torch.float32)
    modalities = list(embeddings)
    classification = classification_loss([logits[m] for m in modalities], labels) if weights.alpha else zero
    graph = semantic_graph_loss([embeddings[m] for m in modalities], labels, class_distance, weights.margin,
                                weights.graph_variant) if weights.beta else zero
    gap = gap_loss(embeddings["image"], embeddings["text"]) if len(modalities) == 2 else zero
    total = weights.alpha * classification + weights.beta * graph + weights.gamma * gap
    return {"classification": classification, "graph": graph, "gap": gap, "total": total}
