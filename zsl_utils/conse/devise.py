r"""DeViSE (Frome et al., NIPS 2013), the model ConSE is compared with: a linear map :math:`M` from a frozen
classifier's pooled features :math:`v` into the word space, trained so that the true label's unit vector
:math:`s_y` scores above every other training label's by a margin (the hinge rank loss)

.. math:: \ell(v, y) = \sum_{j \ne y} \max\big(0,\ \mathrm{margin} - s_y^\top M v + s_j^\top M v\big).

A candidate label ``u`` is scored by :math:`s_u^\top M v`; with unit :math:`s_u` that ranks like the cosine, so
prediction and evaluation reuse ConSE's ranking (``ConSE.predict_embedded``) and ``evaluate_conse(embedders=...)``.
Training is batched over all negatives at once, resumable from checkpoints, on any torch device."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm.auto import tqdm

from zsl_utils.checkpoint import ResumableBatches, latest_checkpoint, load_checkpoint, save_checkpoint
from zsl_utils.conse.model import unit_rows
from zsl_utils.device import torch_dtype
from zsl_utils.errors import ParameterError
from zsl_utils.semantic import LabelEmbeddings


@dataclass(frozen=True)
class DeViSEConfig:
    margin: float = 0.1  # DeViSE's margin
    learning_rate: float = 1e-3  # Adam
    num_steps: int = 1000
    batch_size: int = 256
    seed: int = 0
    compute_dtype: str = "float32"  # "float64": the same weights on every CPU


def rank_loss(projected: torch.Tensor, unit_labels: torch.Tensor, targets: torch.Tensor,
              margin: float) -> torch.Tensor:
    """The hinge rank loss above, averaged over the batch: ``projected`` [B, d] = M v, ``unit_labels`` [n, d]."""
    scores = projected @ unit_labels.T
    violations = (margin - scores.gather(1, targets[:, None]) + scores).clamp_min(0)
    return violations.scatter(1, targets[:, None], 0.0).sum(dim=1).mean()  # j = y is no negative


class DeViSE(nn.Module):
    """``M``: features [N, f] -> semantic space [N, d], no bias (as in DeViSE)."""

    def __init__(self, in_features: int, dim: int) -> None:
        super().__init__()
        self.map = nn.Linear(in_features, dim, bias=False)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.map(features)

    @torch.inference_mode()
    def embed(self, features) -> tuple[torch.Tensor, torch.Tensor]:
        """``(M v, ||M v||)`` as float32, the form ``ConSE.predict_embedded`` takes."""
        weight = self.map.weight
        projected = self(torch.as_tensor(np.asarray(features), device=weight.device, dtype=weight.dtype)).float()
        return projected, projected.norm(dim=1)


def training_pairs(features, image_wnids, train: LabelEmbeddings) -> tuple[torch.Tensor, torch.Tensor]:
    """Features and label indices into ``train.only_found()`` for the images whose label has a vector."""
    position = {w: j for j, w in enumerate(train.only_found().labels)}
    keep = np.array([w in position for w in image_wnids], dtype=bool)
    if not keep.any():
        raise ParameterError("DeViSE: no training image has a label with a vector; check the image labels (WNIDs of "
                             "training classes) and the semantic space.")
    targets = torch.tensor([position[w] for w, k in zip(image_wnids, keep) if k], dtype=torch.long)
    return torch.as_tensor(np.asarray(features)[keep]), targets


def train_devise(features, image_wnids, train: LabelEmbeddings, config: DeViSEConfig = DeViSEConfig(),
                 device: str | torch.device = "cpu", checkpoint_dir: str | os.PathLike | None = None,
                 checkpoint_every: int = 0, progress: bool = True) -> tuple[DeViSE, pd.DataFrame]:
    """Train M on ``features`` [N, f] of images labelled ``image_wnids`` (training labels; those without a vector are
    left out) against ``train``'s unit label vectors. ``(model, history)``; with ``checkpoint_dir`` and
    ``checkpoint_every`` a rerun resumes from the newest checkpoint of the same run, bit for bit."""
    dtype, device = torch_dtype(config.compute_dtype), torch.device(device)
    x, y = (t.to(device) for t in training_pairs(features, image_wnids, train))
    x = x.to(dtype)
    labels = unit_rows(torch.as_tensor(train.only_found().vectors, device=device, dtype=dtype))
    torch.manual_seed(config.seed)
    model = DeViSE(x.shape[1], labels.shape[1]).to(device, dtype)
    optimizer = torch.optim.Adam(model.parameters(), lr=config.learning_rate)
    batches, history, start = ResumableBatches(len(x), config.batch_size, config.seed), [], 0
    fingerprint = {**asdict(config), "items": len(x), "dim": labels.shape[1],
                   "data": hashlib.sha256(np.asarray(features).tobytes() + repr(list(image_wnids)).encode()).hexdigest()}
    folder = None
    if checkpoint_dir is not None and checkpoint_every > 0:
        folder = Path(checkpoint_dir) / f"devise_{hashlib.sha256(json.dumps(fingerprint).encode()).hexdigest()[:12]}"
        if (path := latest_checkpoint(folder)) is not None:
            start, state = load_checkpoint(path, fingerprint)
            model.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            batches.load_state_dict(state["batches"])
            history = list(state["history"])
    for step in tqdm(range(start + 1, config.num_steps + 1), desc="DeViSE training", disable=not progress):
        index = batches.next().to(device)
        loss = rank_loss(model(x[index]), labels, y[index], config.margin)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        history.append({"step": step, "loss": float(loss.detach())})
        if folder is not None and (step % checkpoint_every == 0 or step == config.num_steps):
            state = {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                     "batches": batches.state_dict(), "history": history}
            save_checkpoint(folder, step, state, fingerprint)
    return model.eval(), pd.DataFrame(history)
