"""Training HUSE on cached features, the validation grid search, and the ablations.

The paper trains with RMSProp (learning rate 1.6192e-5, momentum 0.9), batch 1024, for
250k steps; those are the defaults of ``TrainConfig``. The demo profile uses far fewer
steps, a smaller batch and a larger learning rate so that it finishes in a minute on a
CPU; the notebook says which values it used.
"""
from __future__ import annotations

import itertools
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from .errors import ParameterError
from .huse import MODALITIES, HuseArchitecture, HuseModel, HuseSplit, embed_split
from .huse_eval import HuseEvaluation, choose_fusion_weight, evaluate_huse
from .huse_losses import LossWeights, huse_loss


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings; defaults are the paper's (Section 4.2)."""

    num_steps: int = 250_000
    batch_size: int = 1024
    learning_rate: float = 1.6192e-5
    momentum: float = 0.9
    log_every: int = 100  # steps per row of the loss history
    seed: int = 0
    modalities: tuple[str, ...] = MODALITIES  # one modality = the separate-models ablation

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ParameterError(f"TrainConfig.{name}={getattr(self, name)!r} must be >= 1.")
        if not self.learning_rate > 0:
            raise ParameterError(f"TrainConfig.learning_rate={self.learning_rate!r} must be > 0.")
        if not 0 <= self.momentum < 1:
            raise ParameterError(f"TrainConfig.momentum={self.momentum!r} must lie in [0, 1).")
        if not self.modalities or set(self.modalities) - set(MODALITIES):
            raise ParameterError(f"TrainConfig.modalities={self.modalities!r}; use a non-empty subset of {MODALITIES}.")


@dataclass
class TrainedHuse:
    """A trained model, its loss history (one row per ``log_every`` steps) and its settings."""

    model: HuseModel
    history: pd.DataFrame
    weights: LossWeights
    config: TrainConfig
    architecture: HuseArchitecture
    extras: dict[str, Any] = field(default_factory=dict)


def batch_indices(n_items: int, batch_size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """Endless mini-batches: a fresh seeded permutation per epoch, cut into ``batch_size`` slices.

    A batch larger than the data set is the whole (shuffled) data set. The last slice of
    an epoch may be shorter, so every item is seen once per epoch.
    """
    batch_size = min(batch_size, n_items)
    while True:
        order = torch.randperm(n_items, generator=generator)
        for start in range(0, n_items, batch_size):
            yield order[start : start + batch_size]


def _check_training_inputs(train: HuseSplit, class_distance: torch.Tensor, config: TrainConfig) -> None:
    missing = [m for m in config.modalities if m not in train.modalities]
    if missing:
        raise ParameterError(f"training asks for {missing} features but the split only has {train.modalities}.")
    n_classes = class_distance.shape[0]
    if class_distance.ndim != 2 or class_distance.shape[1] != n_classes:
        raise ParameterError(f"class_distance must be square (K, K), got {tuple(class_distance.shape)}.")
    if len(train) == 0 or int(train.labels.max()) >= n_classes or int(train.labels.min()) < 0:
        raise ParameterError(
            f"labels must be class indices in [0, {n_classes}); got range "
            f"[{int(train.labels.min()) if len(train) else '-'}, {int(train.labels.max()) if len(train) else '-'}]. "
            "Build class_distance from the same class list as the labels."
        )


def train_huse(
    train: HuseSplit,
    class_distance: torch.Tensor,
    weights: LossWeights | None = None,
    config: TrainConfig | None = None,
    architecture: HuseArchitecture | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> TrainedHuse:
    """Train a HUSE model (or a single-modality one) on cached features.

    Everything random (initial weights, dropout, batch order) follows ``config.seed``,
    so two CPU runs with the same inputs give identical models.
    """
    weights, config, architecture = weights or LossWeights(), config or TrainConfig(), architecture or HuseArchitecture()
    class_distance = torch.as_tensor(class_distance, dtype=torch.float32)
    _check_training_inputs(train, class_distance, config)
    device = torch.device(device)
    torch.manual_seed(config.seed)  # initial weights and dropout masks
    features = {m: x.to(device) for m, x in train.features(config.modalities).items()}
    labels, class_distance = train.labels.to(device), class_distance.to(device)
    model = HuseModel({m: x.shape[1] for m, x in features.items()}, class_distance.shape[0], architecture).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    batches = batch_indices(len(train), config.batch_size, torch.Generator().manual_seed(config.seed))
    history, window = [], []
    model.train()
    for step in tqdm(range(1, config.num_steps + 1), desc="HUSE training", disable=not progress, mininterval=1.0):
        index = next(batches).to(device)
        embeddings, logits = model({m: x[index] for m, x in features.items()})
        parts = huse_loss(embeddings, logits, labels[index], class_distance, weights)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        window.append(torch.stack([parts[k].detach() for k in ("total", "classification", "graph", "gap")]))
        if step % config.log_every == 0 or step == config.num_steps:
            means = torch.stack(window).mean(dim=0).cpu().tolist()
            history.append({"step": step, **dict(zip(("total", "classification", "graph", "gap"), means))})
            window = []
    model.eval()
    return TrainedHuse(model, pd.DataFrame(history), weights, config, architecture)


# ---------------------------------------------------------------------------- validation
def validate(
    models: HuseModel | Mapping[str, HuseModel],
    val: HuseSplit,
    correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None,
    device: torch.device | str = "cpu",
    fusion_weight: float | None = None,
) -> tuple[HuseEvaluation, float]:
    """Evaluate on a split; if ``fusion_weight`` is None it is chosen on this split first."""
    outputs = embed_split(models, val, device)
    if fusion_weight is None:
        fusion_weight = choose_fusion_weight(outputs) if len(outputs.probabilities) == 2 else 0.5
    return evaluate_huse(outputs, fusion_weight, correct_sets), fusion_weight


def _grid(grid: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    allowed = set(LossWeights.__dataclass_fields__)
    unknown = set(grid) - allowed
    if unknown:
        raise ParameterError(f"grid keys {sorted(unknown)} are not loss settings; use some of {sorted(allowed)}.")
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[k] for k in keys))]


def grid_search(
    train: HuseSplit,
    val: HuseSplit,
    class_distance: torch.Tensor,
    grid: Mapping[str, Sequence[Any]],
    base_weights: LossWeights | None = None,
    config: TrainConfig | None = None,
    architecture: HuseArchitecture | None = None,
    correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None,
    selection: str = "mean_R@1",
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> pd.DataFrame:
    """Train one model per combination of ``grid`` values and score it on ``val``.

    ``grid`` maps ``LossWeights`` fields (``alpha``, ``beta``, ``gamma``, ``margin``,
    ``graph_variant``) to candidate values. Each row reports the validation headline
    numbers (``HuseEvaluation.summary``) and the fusion weight chosen on ``val``; rows
    are sorted best first by ``selection`` (default: mean recall@1 over the four
    retrieval directions, the quantity the embedding is for).
    """
    base_weights = base_weights or LossWeights()
    rows = []
    combos = _grid(grid)
    for combo in tqdm(combos, desc="grid search", disable=not progress or len(combos) < 2):
        weights = replace(base_weights, **combo)
        trained = train_huse(train, class_distance, weights, config, architecture, device, progress=False)
        evaluation, fusion_weight = validate(trained.model, val, correct_sets, device)
        rows.append({**asdict(weights), "fusion_weight": fusion_weight, **evaluation.summary()})
    table = pd.DataFrame(rows)
    if selection not in table.columns:
        raise ParameterError(f"selection={selection!r} is not a grid column; choose one of {list(table.columns)}.")
    return table.sort_values(selection, ascending=False, kind="stable").reset_index(drop=True)


def best_weights(grid_table: pd.DataFrame) -> LossWeights:
    """The ``LossWeights`` of the first (best) row of a ``grid_search`` table."""
    row = grid_table.iloc[0]
    return LossWeights(**{k: (row[k].item() if hasattr(row[k], "item") else row[k]) for k in LossWeights.__dataclass_fields__})


def train_separate(
    train: HuseSplit,
    class_distance: torch.Tensor,
    weights: LossWeights | None = None,
    config: TrainConfig | None = None,
    architecture: HuseArchitecture | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
) -> dict[str, TrainedHuse]:
    """The "separate models" ablation: one single-modality HUSE per modality (no gap loss).

    Each model gets the classification and graph losses on its own modality only, so
    the two spaces are never aligned; cross-modal retrieval between them measures what
    the joint training buys.
    """
    config = config or TrainConfig()
    return {
        m: train_huse(train, class_distance, weights, replace(config, modalities=(m,)), architecture, device, progress)
        for m in train.modalities
    }


def seeded_repeat_check(train: HuseSplit, class_distance: torch.Tensor, **kwargs: Any) -> bool:
    """Train twice with the same settings and report whether the final weights are identical."""
    first = train_huse(train, class_distance, progress=False, **kwargs).model.state_dict()
    second = train_huse(train, class_distance, progress=False, **kwargs).model.state_dict()
    return all(torch.equal(first[k], second[k]) for k in first)

