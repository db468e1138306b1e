"""The three HUSE losses (Narayana et al., 2019, Section 3.4), vectorised.

``u_i`` / ``v_i``: unit image / text embeddings of item ``i`` of class ``c_i``; ``A``: cosine
distances between class-name embeddings (the semantic graph, Eq. 4); ``d``: cosine distance.

* classification: softmax cross-entropy of the shared layer on ``u_i`` and on ``v_i``.
* graph (Eq. 10-11): over all ordered pairs of the ``2N`` stacked embeddings,
  ``mean sigma_mn * (d_mn - A[c_m, c_n])^2``; which pairs ``sigma`` keeps is the variant (``GRAPH_VARIANTS``).
* gap (Eq. 12): ``mean_i d(u_i, v_i)``. Total: ``alpha * cls + beta * graph + gamma * gap``."""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsl_utils.errors import ParameterError

# sigma_mn = 1 when ... "equation": Eq. 10 as printed, A < zeta and d < zeta (a related pair already far apart gets
# no gradient); "prose": A < zeta or d < zeta, the paper's sentence that every embedding distance should equal its
# classes' edge weight, kept local: related pairs always, unrelated ones once they come closer than zeta.
GRAPH_VARIANTS = ("equation", "prose")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three HUSE losses and the graph margin ``zeta`` (the paper publishes none). Defaults: chosen on
    the demo's validation split (notebook 03's grid); the graph term is then >= 10 % of the demo's loss (asserted)."""

    alpha: float = 1.0  # classification weight
    beta: float = 3.0  # semantic-graph weight
    gamma: float = 0.0  # cross-modal gap weight
    margin: float = 0.8  # zeta in Eq. 10, a cosine distance in (0, 2]
    graph_variant: str = "prose"  # one of GRAPH_VARIANTS

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


def graph_pair_mask(distance: torch.Tensor, target: torch.Tensor, margin: float, variant: str) -> torch.Tensor:
    """``sigma`` of Eq. 10 (bool, one per pair) for embedding distances ``d`` and class distances ``A``."""
    if variant not in GRAPH_VARIANTS:
        raise ParameterError(f"graph variant {variant!r}; choose one of {GRAPH_VARIANTS}.")
    # The mask is a selection, not a function to differentiate through.
    similar_classes, within_margin = target < margin, distance.detach() < margin
    return similar_classes & within_margin if variant == "equation" else similar_classes | within_margin


def semantic_graph_loss(embeddings: list[torch.Tensor], labels: torch.Tensor, class_distance: torch.Tensor,
                        margin: float, variant: str = "equation") -> tuple[torch.Tensor, torch.Tensor]:
    """Eq. 11 over all ordered pairs of the stacked ``(N, D)`` embeddings of every modality, and the share of
    off-diagonal pairs that the mask keeps."""
    stacked = torch.cat(embeddings, dim=0)
    stacked_labels = labels.repeat(len(embeddings))
    distance = cosine_distance_matrix(stacked, stacked)
    target = class_distance[stacked_labels][:, stacked_labels]
    kept = graph_pair_mask(distance, target, margin, variant)
    n = len(stacked)
    kept_share = (kept.sum() - kept.diagonal().sum()) / max(n * (n - 1), 1)
    return (kept * (distance - target) ** 2).mean(), kept_share.float()


def gap_loss(image_embeddings: torch.Tensor, text_embeddings: torch.Tensor) -> torch.Tensor:
    """Eq. 12: mean cosine distance between the image and the text of the same item."""
    return (1.0 - F.cosine_similarity(image_embeddings, text_embeddings, dim=1)).mean()


def huse_loss(embeddings: dict[str, torch.Tensor], logits: dict[str, torch.Tensor], labels: torch.Tensor,
              class_distance: torch.Tensor, weights: LossWeights) -> dict[str, torch.Tensor]:
    """The weighted HUSE objective (``"total"``), its parts and per-modality monitors (``classification_<m>``,
    ``accuracy_<m>``, ``graph_pairs_kept``), from ``{modality: tensor}`` maps. At weight 0 the graph term is
    skipped (0: no pair matrix); the cheap gap term is always measured (for the curves)."""
    modalities = list(embeddings)
    per_modality = {m: F.cross_entropy(logits[m], labels) for m in modalities}
    classification = torch.stack(list(per_modality.values())).mean()
    graph, kept = semantic_graph_loss([embeddings[m] for m in modalities], labels, class_distance, weights.margin,
                                      weights.graph_variant) if weights.beta else (classification.new_zeros(()),) * 2
    gap = gap_loss(embeddings["image"], embeddings["text"]) if len(modalities) == 2 else graph.new_zeros(())
    total = weights.alpha * classification + weights.beta * graph + weights.gamma * gap
    parts = {"total": total, "classification": classification, "graph": graph, "gap": gap, "graph_pairs_kept": kept}
    for m in modalities:
        parts[f"classification_{m}"] = per_modality[m]
        parts[f"accuracy_{m}"] = (logits[m].detach().argmax(dim=1) == labels).float().mean()
    return parts
