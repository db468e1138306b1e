"""Is a tower collapsed? Effective dimension of its embeddings and the share of its ReLU units still alive."""
from __future__ import annotations

import pandas as pd
import torch
import torch.nn as nn

from zsl_utils.huse.model import HuseModel, HuseSplit


def participation_ratio(embeddings: torch.Tensor) -> float:
    """Effective dimension ``(sum l)^2 / sum l^2`` over the eigenvalues ``l`` of the ``(N, D)`` rows' covariance:
    ``D`` for isotropic points, 1 when all variance lies along one direction."""
    rows = torch.as_tensor(embeddings, dtype=torch.float64)
    eigenvalues = torch.linalg.eigvalsh(torch.cov(rows.T)).clamp_min(0)
    return float(eigenvalues.sum() ** 2 / (eigenvalues**2).sum())


@torch.no_grad()
def active_unit_fractions(tower: nn.Sequential, features: torch.Tensor) -> list[float]:
    """Per ReLU layer of ``tower`` (in eval mode), the share of units positive for at least one row of
    ``features``; a unit that is zero on every item is dead: it passes no signal and gets no gradient."""
    fractions, hidden = [], features
    for layer in tower.eval():
        hidden = layer(hidden)
        if isinstance(layer, nn.ReLU):
            fractions.append(float((hidden > 0).any(dim=0).float().mean()))
    return fractions


def tower_diagnostics(model: HuseModel, split: HuseSplit) -> pd.DataFrame:
    """One row per modality of ``model``: effective dimension of the inputs and of the embeddings, active-unit share
    per hidden layer (lowest too) and accuracy of the shared classifier on ``split`` (use the training split)."""
    rows, weight = {}, model.classifier.weight
    for modality, features in split.features(model.modalities).items():
        active = active_unit_fractions(model.towers[modality], features.to(weight))  # also sets eval mode
        with torch.no_grad():
            embedded = model.embed(modality, features.to(weight))
            accuracy = (model.classifier(embedded).argmax(dim=1).cpu() == split.labels).float().mean()
        rows[modality] = {"input effective dim": participation_ratio(features),
                          "embedding effective dim": participation_ratio(embedded.cpu()),
                          "lowest active-unit share": min(active), "accuracy (%)": 100 * float(accuracy),
                          **{f"active units, layer {i + 1}": a for i, a in enumerate(active)}}
    return pd.DataFrame.from_dict(rows, orient="index").rename_axis("tower")
