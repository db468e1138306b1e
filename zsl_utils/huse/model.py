"""The HUSE model (Narayana et al., 2019), the feature splits it trains on and ``embed_split``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping, Sequence

import numpy as np
import pandas as pd
import torch
import torch.nn as nn
import torch.nn.functional as F

from zsl_utils.errors import ParameterError
from zsl_utils.huse.losses import class_distance_matrix
from zsl_utils.semantic import sentence_label_embeddings

MODALITIES = ("image", "text")
# Retrieval directions in the order of the paper's tables: (query, gallery).
DIRECTIONS = (("image", "image"), ("image", "text"), ("text", "image"), ("text", "text"))


@dataclass
class HuseSplit:
    """Frozen features of one split: row ``i`` of ``image`` and ``text`` (either may be None) is item ``i``."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    labels: torch.Tensor
    items: pd.DataFrame | None = field(default=None, repr=False)  # the item table rows, aligned

    def __post_init__(self) -> None:
        self.labels = torch.as_tensor(self.labels, dtype=torch.long)
        n_items = len(self.labels)
        for name in self.modalities:
            value = torch.as_tensor(getattr(self, name), dtype=torch.float32)
            if value.ndim != 2 or len(value) != n_items:
                raise ParameterError(f"HuseSplit.{name} has shape {tuple(value.shape)}; expected ({n_items}, "
                                     "feature_dim), one row per label. Check that features and labels come from the "
                                     "same item table.")
            if not torch.isfinite(value).all():
                raise ParameterError(f"HuseSplit.{name} holds NaN/inf features; re-extract them (delete the cache).")
            setattr(self, name, value)
        if self.image is None and self.text is None:
            raise ParameterError("HuseSplit needs image or text features (both are None).")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(m for m in MODALITIES if getattr(self, m) is not None)

    def features(self, modalities: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """``{modality: features}`` for ``modalities`` (default: all present)."""
        wanted = tuple(modalities) if modalities else self.modalities
        missing = [m for m in wanted if getattr(self, m, None) is None]
        if missing:
            raise ParameterError(f"this split has no {missing} features; it has {self.modalities}.")
        return {m: getattr(self, m) for m in wanted}


@dataclass(frozen=True)
class HuseArchitecture:
    """Tower sizes; defaults are the paper's (Section 4.2)."""

    embedding_dim: int = 512  # D, the size of the universal embedding
    hidden_dim: int = 512  # units per hidden layer
    image_hidden_layers: int = 5
    text_hidden_layers: int = 2
    dropout: float = 0.15  # between consecutive hidden layers
    init: str = "he"  # "he" (default) or "torch" (torch's Linear default; collapses the 5-layer tower, see tower())

    def __post_init__(self) -> None:
        for name in ("embedding_dim", "hidden_dim", "image_hidden_layers", "text_hidden_layers"):
            if int(getattr(self, name)) < 1:
                raise ParameterError(f"HuseArchitecture.{name}={getattr(self, name)!r} must be >= 1.")
        if not 0 <= self.dropout < 1:
            raise ParameterError(f"HuseArchitecture.dropout={self.dropout!r} must lie in [0, 1).")
        if self.init not in ("he", "torch"):
            raise ParameterError(f"HuseArchitecture.init={self.init!r}; choose 'he' or 'torch'.")

    def tower(self, modality: str, input_dim: int) -> nn.Sequential:
        """Hidden layers of Linear + ReLU (dropout between them), then Linear to ``embedding_dim``.

        He initialisation, zero biases (``init="he"``): torch's default Linear init divides a ReLU layer's output
        second moment by 6, so after five layers the outputs are no larger than the biases and a third of the last
        layer's units are dead before training starts; on the demo that tower then collapses (notebook 03)."""
        n_hidden = self.image_hidden_layers if modality == "image" else self.text_hidden_layers
        layers: list[nn.Module] = []
        for layer, width in enumerate([input_dim] + [self.hidden_dim] * (n_hidden - 1)):
            if layer > 0 and self.dropout > 0:
                layers.append(nn.Dropout(self.dropout))
            layers += [nn.Linear(width, self.hidden_dim), nn.ReLU()]
        layers.append(nn.Linear(self.hidden_dim, self.embedding_dim))  # the D outputs (the paper lists hidden layers)
        for linear in [m for m in layers if isinstance(m, nn.Linear) and self.init == "he"]:
            nn.init.kaiming_normal_(linear.weight, nonlinearity="relu")
            nn.init.zeros_(linear.bias)
        return nn.Sequential(*layers)


class HuseModel(nn.Module):
    """Per-modality towers over frozen features into one L2-normalised space, plus one shared linear classifier;
    ``input_dims``: feature width per modality (one key: the separate-models ablation)."""

    def __init__(self, input_dims: Mapping[str, int], num_classes: int, architecture: HuseArchitecture | None = None):
        super().__init__()
        if not input_dims or set(input_dims) - set(MODALITIES):
            raise ParameterError(f"input_dims keys must be a non-empty subset of {MODALITIES}, got {list(input_dims)}.")
        if num_classes < 2:
            raise ParameterError(f"num_classes={num_classes}; HUSE needs at least 2 classes.")
        self.architecture = architecture or HuseArchitecture()
        self.input_dims = {m: int(input_dims[m]) for m in MODALITIES if m in input_dims}
        self.modalities = tuple(self.input_dims)
        self.towers = nn.ModuleDict({m: self.architecture.tower(m, dim) for m, dim in self.input_dims.items()})
        self.classifier = nn.Linear(self.architecture.embedding_dim, num_classes)

    def embed(self, modality: str, features: torch.Tensor) -> torch.Tensor:
        """L2-normalised ``(N, D)`` embeddings of one modality's features."""
        if modality not in self.towers:
            raise ParameterError(f"this model has no {modality!r} tower; it has {self.modalities}.")
        expected = self.input_dims[modality]
        if features.ndim != 2 or features.shape[1] != expected:
            raise ParameterError(f"{modality} features have shape {tuple(features.shape)} but the model was built for "
                                 f"(N, {expected}); features and model must come from the same extractor.")
        return F.normalize(self.towers[modality](features.to(self.classifier.weight.dtype)), dim=1)

    def forward(self, features: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
        """``(embeddings, logits)``, each ``{modality: tensor}`` for the modalities given."""
        embeddings = {m: self.embed(m, x) for m, x in features.items()}
        logits = {m: self.classifier(e) for m, e in embeddings.items()}
        return embeddings, logits


@dataclass
class SplitOutputs:
    """Embeddings (``(N, D)``, unit norm) and softmax scores (``(N, K)``) per modality."""

    embeddings: dict[str, torch.Tensor]
    probabilities: dict[str, torch.Tensor]
    labels: torch.Tensor


@torch.no_grad()
def embed_split(models: HuseModel | Mapping[str, HuseModel], split: HuseSplit, device: torch.device | str = "cpu",
                batch_size: int = 4096) -> SplitOutputs:
    """Embed every item of ``split`` in eval mode, results on CPU; ``models``: one joint model, or
    ``{modality: model}`` for the separate-models ablation."""
    per_modality = dict(models) if isinstance(models, Mapping) else {m: models for m in models.modalities}
    embeddings, probabilities = {}, {}
    for modality in [m for m in per_modality if m in split.modalities]:
        model = per_modality[modality].eval().to(device)
        features = split.features([modality])[modality]
        starts = range(0, len(split), batch_size)
        embedded = torch.cat([model.embed(modality, features[s : s + batch_size].to(device)) for s in starts])
        embeddings[modality] = embedded.float().cpu()
        probabilities[modality] = model.classifier(embedded).softmax(dim=1).float().cpu()
    return SplitOutputs(embeddings, probabilities, split.labels.cpu())


def semantic_class_distance(phrases: Sequence[str], device: str = "cpu",
                            compute_dtype: str = "float32") -> torch.Tensor:
    """The semantic graph ``A`` from class-name phrases embedded by MiniLM (the paper: Universal Sentence Encoder)."""
    vectors = sentence_label_embeddings(list(phrases), device=device, compute_dtype=compute_dtype).vectors
    return class_distance_matrix(torch.as_tensor(vectors, dtype=torch.float32))


def build_splits(items: pd.DataFrame, classes: Sequence[str], image_features: np.ndarray | None,
                 text_features: np.ndarray | None, usable: np.ndarray | None = None) -> tuple[dict, pd.DataFrame]:
    """One ``HuseSplit`` per value of ``items["split"]``, rows aligned with ``items``, and the dropped items:
    those not ``usable`` (bool per item; features could not be computed), for the notebook to list."""
    position = {c: i for i, c in enumerate(classes)}
    unknown = sorted(set(items["label"]) - set(position))
    if unknown:
        raise ParameterError(f"{len(unknown)} item labels are not in the class list, e.g. {unknown[:5]}.")
    usable = np.ones(len(items), dtype=bool) if usable is None else np.asarray(usable, dtype=bool)
    labels = items["label"].map(position).to_numpy()
    splits = {}
    for name in items["split"].unique():
        rows = np.flatnonzero((items["split"].to_numpy() == name) & usable)
        pick = lambda x: None if x is None else torch.as_tensor(np.asarray(x)[rows], dtype=torch.float32)  # noqa: E731
        splits[str(name)] = HuseSplit(pick(image_features), pick(text_features), labels[rows],
                                      items.iloc[rows].reset_index(drop=True))
    return splits, items[~usable]
