"""HUSE: hierarchical universal semantic embeddings (Narayana et al., 2019).

One L2-normalised space shared by images and texts. Each modality has its own tower
(a stack of ReLU layers over *frozen* input features) that ends in ``D`` units,
L2-normalised; one linear classification layer is shared by both towers and applied to
each embedding separately. Training (``huse_train``) combines a classification loss, a
semantic-graph loss that makes embedding distances mirror class-name distances, and a
gap loss that pulls an item's image and text together (``huse_losses``).

This module holds the data container, the model and the evaluation:

* ``HuseSplit`` — frozen image/text features and class indices of one split.
* ``HuseArchitecture`` / ``HuseModel`` — towers (paper: image 5 x 512, text 2 x 512,
  dropout 0.15 between hidden layers) and the shared classifier.
* ``embed_split`` — embeddings and softmax scores of a split.
* ``classification_table``, ``retrieval_table``, ``hierarchical_table`` and
  ``evaluate_huse`` — the paper's Tables 1-3 as DataFrames.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from .errors import ParameterError

MODALITIES = ("image", "text")
# Retrieval directions in the order of the paper's tables: (query, gallery).
DIRECTIONS = (("image", "image"), ("image", "text"), ("text", "image"), ("text", "text"))


# ---------------------------------------------------------------------------- data
@dataclass
class HuseSplit:
    """Frozen features of one split: row ``i`` of ``image`` and ``text`` is item ``i``.

    ``image`` or ``text`` may be ``None`` for a single-modality source (ETHZ Food-101).
    """

    image: torch.Tensor | None
    text: torch.Tensor | None
    labels: torch.Tensor
    class_names: tuple[str, ...] = field(default=())

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        n_items = len(self.labels)
        for name in MODALITIES:
            value = getattr(self, name)
            if value is None:
                continue
            value = torch.as_tensor(value, dtype=torch.float32)
            if value.ndim != 2 or len(value) != n_items:
                raise ParameterError(
                    f"HuseSplit.{name} has shape {tuple(value.shape)}; expected ({n_items}, feature_dim), "
                    "one row per label. Check that features and labels come from the same item table."
                )
            if not torch.isfinite(value).all():
                raise ParameterError(
                    f"HuseSplit.{name} holds NaN/inf features; re-extract them (delete the feature cache)."
                )
            setattr(self, name, value)
        if self.image is None and self.text is None:
            raise ParameterError("HuseSplit needs image or text features (both are None).")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modalities this split has features for."""
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    def features(self, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{modality: features}`` for ``modalities`` (default: all present)."""
        wanted = tuple(modalities) if modalities else self.modalities
        missing = [m for m in wanted if getattr(self, m, None) is None]
        if missing:
            raise ParameterError(f"this split has no {missing} features; it has {self.modalities}.")
        return {m: getattr(self, m) for m in wanted}

    def subset(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> "HuseSplit":
        """The items at ``index`` (order kept)."""
        index = torch.as_tensor(np.asarray(index), dtype=torch.long)
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return HuseSplit(pick(self.image), pick(self.text), self.labels[index], self.class_names)


# ---------------------------------------------------------------------------- model
@dataclass(frozen=True)
class HuseArchitecture:
    """Tower sizes; defaults are the paper's (Section 4.2)."""

    embedding_dim: int = 512  # D, the size of the universal embedding
    hidden_dim: int = 512  # units per hidden layer
    image_hidden_layers: int = 5
    text_hidden_layers: int = 2
    dropout: float = 0.15  # between consecutive hidden layers

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "hidden_dim", "image_hidden_layers", "text_hidden_layers"):
            if int(getattr(self, name)) < 1:
                raise ParameterError(f"HuseArchitecture.{name}={getattr(self, name)!r} must be >= 1.")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"HuseArchitecture.dropout={self.dropout!r} must lie in [0, 1).")

    def hidden_layers(self, modality: str) -> int:
        return self.image_hidden_layers if modality == "image" else self.text_hidden_layers


def make_tower(input_dim: int, hidden_dim: int, hidden_layers: int, output_dim: int, dropout: float) -> nn.Sequential:
    """``hidden_layers`` x (Linear + ReLU) with dropout between hidden layers, then Linear to ``output_dim``."""
    layers: list[nn.Module] = []
    width = input_dim
    for layer in range(hidden_layers):
        if layer > 0 and dropout > 0:
            layers.append(nn.Dropout(dropout))
        layers += [nn.Linear(width, hidden_dim), nn.ReLU()]
        width = hidden_dim
    layers.append(nn.Linear(width, output_dim))
    return nn.Sequential(*layers)


class HuseModel(nn.Module):
    """Per-modality towers into one L2-normalised space, plus one shared linear classifier.

    Args:
        input_dims: ``{"image": image_feature_dim, "text": text_feature_dim}``; give one
            key only for a single-modality model (the "separate models" ablation).
        num_classes: ``K``.
        architecture: tower sizes.
    """

    def __init__(self, input_dims: Mapping[str, int], num_classes: int, architecture: HuseArchitecture | None = None):
        super().__init__()
        architecture = architecture or HuseArchitecture()
        unknown = set(input_dims) - set(MODALITIES)
        if unknown or not input_dims:
            raise ParameterError(f"input_dims keys must be a non-empty subset of {MODALITIES}, got {list(input_dims)}.")
        if num_classes < 2:
            raise ParameterError(f"num_classes={num_classes}; HUSE needs at least 2 classes.")
        self.architecture = architecture
        self.input_dims = {m: int(input_dims[m]) for m in MODALITIES if m in input_dims}
        self.towers = nn.ModuleDict(
            {
                m: make_tower(dim, architecture.hidden_dim, architecture.hidden_layers(m),
                              architecture.embedding_dim, architecture.dropout)
                for m, dim in self.input_dims.items()
            }
        )
        self.classifier = nn.Linear(architecture.embedding_dim, num_classes)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self.input_dims)

    def embed(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(N, D)`` embeddings of one modality's features."""
        if modality not in self.towers:
            raise ParameterError(f"this model has no {modality!r} tower; it has {self.modalities}.")
        expected = self.input_dims[modality]
        if features.ndim != 2 or features.shape[1] != expected:
            raise ParameterError(
                f"{modality} features have shape {tuple(features.shape)} but the model was built for "
                f"(N, {expected}); features and model must come from the same extractor."
            )
        return F.normalize(self.towers[modality](features), dim=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(embeddings, logits)``, each ``{modality: tensor}`` for the modalities given."""
        embeddings = {m: self.embed(m, x) for m, x in features.items()}
        logits = {m: self.classifier(e) for m, e in embeddings.items()}
        return embeddings, logits


# ---------------------------------------------------------------------------- inference
@dataclass
class SplitOutputs:
    """Embeddings (``(N, D)``, unit norm) and softmax scores (``(N, K)``) per modality."""

    embeddings: dict[str, torch.Tensor]
    probabilities: dict[str, torch.Tensor]
    labels: torch.Tensor


@torch.no_grad()
def embed_split(
    models: HuseModel | Mapping[str, HuseModel],
    split: HuseSplit,
    device: torch.device | str = "cpu",
    batch_size: int = 4096,
) -> SplitOutputs:
    """Embed every item of ``split`` in eval mode; results on CPU.

    ``models`` is one joint model, or ``{"image": model_a, "text": model_b}`` for the
    separate-models ablation (each modality embedded by its own model).
    """
    per_modality = dict(models) if isinstance(models, Mapping) else {m: models for m in models.modalities}
    embeddings, probabilities = {}, {}
    for modality, model in per_modality.items():
        if modality not in split.modalities:
            continue
        model.eval().to(device)
        features = split.features([modality])[modality]
        chunks = [model.embed(modality, features[s : s + batch_size].to(device)) for s in range(0, len(split), batch_size)]
        embedded = torch.cat(chunks).float()
        embeddings[modality] = embedded.cpu()
        probabilities[modality] = model.classifier(embedded).softmax(dim=1).float().cpu()
    return SplitOutputs(embeddings, probabilities, split.labels.cpu())


def fuse_probabilities(image_probs: torch.Tensor, text_probs: torch.Tensor, image_weight: float) -> torch.Tensor:
    """Weighted average ``w * p_image + (1 - w) * p_text`` of the two softmax scores."""
    if not 0 <= image_weight <= 1:
        raise ParameterError(f"fusion image_weight={image_weight!r} must lie in [0, 1].")
    return image_weight * image_probs + (1 - image_weight) * text_probs


def accuracy(probabilities: torch.Tensor, labels: torch.Tensor) -> float:
    """Top-1 accuracy of score rows against labels."""
    return float((probabilities.argmax(dim=1) == labels).float().mean())


def choose_fusion_weight(outputs: SplitOutputs, candidates: Sequence[float] | None = None) -> float:
    """The image weight (from ``candidates``, default 0, 0.05 .. 1) with the best fused accuracy.

    Meant for the validation split. Ties go to the candidate closest to 0.5 (the
    least committal), so equal accuracies do not silently favour one modality.
    """
    candidates = np.linspace(0, 1, 21) if candidates is None else np.asarray(candidates, dtype=float)
    probs = outputs.probabilities
    scores = [accuracy(fuse_probabilities(probs["image"], probs["text"], w), outputs.labels) for w in candidates]
    best = max(scores)
    tied = [w for w, s in zip(candidates, scores) if s == best]
    return float(min(tied, key=lambda w: abs(w - 0.5)))


# ---------------------------------------------------------------------------- tables
def classification_table(outputs: SplitOutputs, image_weight: float) -> pd.DataFrame:
    """Accuracy (%) of the image softmax, the text softmax and their weighted fusion."""
    probs = outputs.probabilities
    rows = {m: accuracy(probs[m], outputs.labels) for m in MODALITIES if m in probs}
    if set(MODALITIES) <= set(probs):
        rows["fusion"] = accuracy(fuse_probabilities(probs["image"], probs["text"], image_weight), outputs.labels)
    return pd.DataFrame({"accuracy": {k: 100 * v for k, v in rows.items()}}).rename_axis("input")


def retrieval_table(outputs: SplitOutputs, ks: Sequence[int] = (1, 5, 10), chunk_size: int = 1024) -> pd.DataFrame:
    """Recall@K (%) for the four query -> gallery directions; each item is excluded from its own gallery."""
    from . import metrics

    rows = {}
    for query, gallery in DIRECTIONS:
        if query in outputs.embeddings and gallery in outputs.embeddings:
            recall = metrics.retrieval_recall_at_k(
                outputs.embeddings[query], outputs.embeddings[gallery], outputs.labels, outputs.labels,
                ks=ks, exclude_same_index=True, chunk_size=chunk_size,
            )
            rows[f"{query}->{gallery}"] = {f"R@{k}": 100 * v for k, v in recall.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("direction")


def hierarchical_table(
    outputs: SplitOutputs,
    correct_sets: Mapping[int, Sequence[frozenset[int]]],
    chunk_size: int = 1024,
) -> pd.DataFrame:
    """Hierarchical precision H@k (%) per direction; ``correct_sets[k][c]`` = classes counted right for class c."""
    from . import metrics

    rows = {}
    for query, gallery in DIRECTIONS:
        if query in outputs.embeddings and gallery in outputs.embeddings:
            precision = metrics.retrieval_hierarchical_precision_at_k(
                outputs.embeddings[query], outputs.embeddings[gallery], outputs.labels, outputs.labels,
                correct_sets, exclude_same_index=True, chunk_size=chunk_size,
            )
            rows[f"{query}->{gallery}"] = {f"H@{k}": 100 * v for k, v in precision.items()}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("direction")


@dataclass
class HuseEvaluation:
    """The three result tables of one model on one split."""

    classification: pd.DataFrame
    retrieval: pd.DataFrame
    hierarchical: pd.DataFrame

    def summary(self) -> dict[str, float]:
        """A few headline numbers (fusion accuracy, mean R@1 and mean H@ smallest k)."""
        out = {f"accuracy_{k}": float(v) for k, v in self.classification["accuracy"].items()}
        if len(self.retrieval):
            out["mean_R@1"] = float(self.retrieval.iloc[:, 0].mean())
        if len(self.hierarchical):
            out[f"mean_{self.hierarchical.columns[0]}"] = float(self.hierarchical.iloc[:, 0].mean())
        return out


def evaluate_huse(
    outputs: SplitOutputs,
    image_weight: float,
    correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None,
    ks: Sequence[int] = (1, 5, 10),
) -> HuseEvaluation:
    """Classification, retrieval and (if ``correct_sets``) hierarchical-precision tables."""
    hierarchical = hierarchical_table(outputs, correct_sets) if correct_sets else pd.DataFrame()
    return HuseEvaluation(classification_table(outputs, image_weight), retrieval_table(outputs, ks), hierarchical)
