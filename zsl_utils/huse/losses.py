"""The three HUSE losses (Narayana et al., 2019, Section 3.4), vectorised.

Notation used throughout (a batch of ``N`` items, each with an image and a text):

* ``u_i`` / ``v_i`` — the L2-normalised image / text embedding of item ``i`` (``D``-dim).
* ``c_i`` — the class of item ``i``; ``A`` — the ``K x K`` class-distance matrix, where
  ``A[a, b]`` is the cosine distance between the sentence embeddings of the names of
  classes ``a`` and ``b`` (the paper's semantic graph, Eq. 4).
* ``d(x, y) = 1 - <x, y> / (|x| |y|)`` — cosine distance, in ``[0, 2]``.

Losses:

* **classification** — one linear layer ``W`` shared by both modalities; softmax
  cross-entropy of ``W u_i`` and of ``W v_i`` against ``c_i``, averaged over the ``2N``
  predictions (image and text count equally).
* **semantic graph** (Eq. 10-11) — stack the ``2N`` embeddings ``e_1..e_2N`` of the batch
  (images then texts) with their classes. For every ordered pair ``(m, n)``, including
  image-text pairs and ``m = n``::

      sigma_mn = 1  if  A[c_m, c_n] < zeta  and  d(e_m, e_n) < zeta,  else 0     (Eq. 10)
      L_graph  = 1 / (2N)^2 * sum_mn sigma_mn * (d(e_m, e_n) - A[c_m, c_n])^2   (Eq. 11)

  The mask only keeps pairs of *similar* classes that are *already* within the margin
  ``zeta``; pairs of dissimilar classes are ignored by the equation. The paper's prose
  additionally asks dissimilar-class pairs to sit at least ``zeta`` apart. That reading
  is offered as ``variant="prose"``, which adds, for pairs with ``A[c_m, c_n] >= zeta``,
  the hinge ``max(0, zeta - d(e_m, e_n))^2`` to the same sum (same ``1/(2N)^2`` mean).
* **gap** (Eq. 12) — ``mean_i d(u_i, v_i)``: the image and text of one item coincide.

Total: ``alpha * classification + beta * graph + gamma * gap``.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from zsl_utils.errors import ParameterError

GRAPH_VARIANTS = ("equation", "prose")


@dataclass(frozen=True)
class LossWeights:
    """Weights of the three HUSE losses and the graph margin ``zeta``.

    The paper does not publish alpha, beta, gamma or zeta. The defaults were chosen on
    the Tux Paint demo's validation split (EfficientNet-Lite0 + MiniLM features, 400
    steps, batch 128, lr 1e-3) by mean recall@1 over the four retrieval directions:
    a grid over beta in {0, 1, 3}, gamma in {0, 1}, zeta in {0.6, 0.9} and both graph
    variants (seed 0), then gamma in {0, 0.3, 1} at beta=1, zeta=0.6 (seeds 1, 2).
    gamma=0 won every time: on the demo the shared classifier already aligns the two
    modalities, and pulling each image onto its text costs retrieval accuracy. Re-choose
    them on Food-101's validation split for full runs (notebook 03 does).
    """

    alpha: float = 1.0  # classification weight
    beta: float = 1.0  # semantic-graph weight
    gamma: float = 0.0  # cross-modal gap weight (0 on the demo's validation grid; see above)
    margin: float = 0.6  # zeta in Eq. 10, a cosine distance in (0, 2]
    graph_variant: str = "equation"  # "equation" (Eq. 10-11 as printed) or "prose"

    def __post_init__(self) -> None:
        for name in ("alpha", "beta", "gamma"):
            value = getattr(self, name)
            if not value >= 0:
                raise ParameterError(f"loss weight {name}={value!r} must be a number >= 0.")
        if not 0 < self.margin <= 2:
            raise ParameterError(
                f"graph margin zeta={self.margin!r} must lie in (0, 2] (cosine distances range 0..2)."
            )
        if self.graph_variant not in GRAPH_VARIANTS:
            raise ParameterError(f"graph_variant={self.graph_variant!r}; choose one of {GRAPH_VARIANTS}.")


def cosine_distance_matrix(rows: torch.Tensor, columns: torch.Tensor) -> torch.Tensor:
    """``(n, m)`` matrix of cosine distances between every row of ``rows`` and of ``columns``."""
    return 1.0 - F.normalize(rows, dim=1) @ F.normalize(columns, dim=1).T


def class_distance_matrix(class_embeddings: torch.Tensor) -> torch.Tensor:
    """The semantic graph's adjacency ``A`` (Eq. 4): cosine distances between class-name embeddings.

    The diagonal is set to exactly 0 so that float noise cannot put a class at a
    non-zero distance from itself.
    """
    distances = cosine_distance_matrix(class_embeddings, class_embeddings).clamp_min(0.0)
    return distances.fill_diagonal_(0.0)


def classification_loss(logits: list[torch.Tensor], labels: torch.Tensor) -> torch.Tensor:
    """Mean softmax cross-entropy over the predictions of every modality present.

    ``logits`` holds one ``(N, K)`` tensor per modality, all from the shared layer.
    """
    return torch.stack([F.cross_entropy(modality_logits, labels) for modality_logits in logits]).mean()


def semantic_graph_loss(
    embeddings: list[torch.Tensor],
    labels: torch.Tensor,
    class_distance: torch.Tensor,
    margin: float,
    variant: str = "equation",
) -> torch.Tensor:
    """Eq. 11 over all ordered pairs of the stacked embeddings of every modality present.

    Args:
        embeddings: one ``(N, D)`` tensor per modality (item ``i`` is row ``i`` of each).
        labels: ``(N,)`` class indices.
        class_distance: ``(K, K)`` matrix ``A``.
        margin: ``zeta``.
        variant: ``"equation"`` (Eq. 10 mask only) or ``"prose"`` (also push
            dissimilar-class pairs to at least ``zeta``).
    """
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


def huse_loss(
    embeddings: dict[str, torch.Tensor],
    logits: dict[str, torch.Tensor],
    labels: torch.Tensor,
    class_distance: torch.Tensor,
    weights: LossWeights,
) -> dict[str, torch.Tensor]:
    """The weighted HUSE objective and its parts.

    ``embeddings`` / ``logits`` map modality name (``"image"``, ``"text"``) to tensors; a
    single-modality model (the "separate models" ablation) passes one of each, and then
    has no gap term. The graph term is skipped (reported as 0) when its weight is 0, so
    that the no-graph ablation does not pay for the pair matrix; the gap term is cheap and
    always computed for two modalities, so the curves show how close pairs get even when
    gamma = 0.
    """
    zero = labels.new_zeros((), dtype=torch.float32)
    modalities = list(embeddings)
    parts = {
        "classification": classification_loss([logits[m] for m in modalities], labels) if weights.alpha else zero,
        "graph": (
            semantic_graph_loss(
                [embeddings[m] for m in modalities], labels, class_distance, weights.margin, weights.graph_variant
            )
            if weights.beta
            else zero
        ),
        "gap": gap_loss(embeddings["image"], embeddings["text"]) if len(modalities) == 2 else zero,
    }
    parts["total"] = weights.alpha * parts["classification"] + weights.beta * parts["graph"] + weights.gamma * parts["gap"]
    return parts
