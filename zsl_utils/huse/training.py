"""Training HUSE on cached features, the validation grid search, and the ablations.

The paper trains with RMSProp (learning rate 1.6192e-5, momentum 0.9), batch 1024, for
250k steps; those are the defaults of ``TrainConfig``. The demo profile uses far fewer
steps, a smaller batch and a larger learning rate so that it finishes in a minute on a
CPU; the notebook says which values it used.

Resume: with ``checkpoint_dir`` and ``checkpoint_every``, :func:`train_huse` writes an
atomic checkpoint (``zsl_utils.checkpoint``: model, RMSProp state, batch stream, RNG
states, loss history) every ``checkpoint_every`` steps and at the end, into a subfolder
named after a hash of everything that determines the result (settings, loss weights,
architecture, ``num_steps``, the training data). A rerun with the same arguments
continues from the latest checkpoint and ends bit-identical to an uninterrupted run; a
run with other settings gets its own subfolder, so the grid search and the ablations can
share one ``checkpoint_dir``. ``zsl_utils.scale.ddp`` trains with the same state on N
processes.
"""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from zsl_utils.errors import ParameterError
from zsl_utils.huse.model import MODALITIES, HuseArchitecture, HuseModel, HuseSplit, embed_split
from zsl_utils.huse.evaluation import HuseEvaluation, choose_fusion_weight, evaluate_huse
from zsl_utils.huse.losses import LossWeights, huse_loss


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


def check_training_inputs(train: HuseSplit, class_distance: torch.Tensor, config: TrainConfig) -> None:
    """Raise :class:`ParameterError` unless the split has the modalities and labels ``config`` and ``class_distance`` need."""
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


class ResumableBatches:
    """The batches of :func:`batch_indices`, with a state that a checkpoint can hold.

    A fresh seeded permutation per epoch, cut into ``batch_size`` slices (the last one of
    an epoch may be shorter). ``state_dict`` captures the generator, the current epoch's
    permutation and the position in it, which a Python generator function cannot.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int) -> None:
        self.n_items, self.batch_size = n_items, min(batch_size, n_items)
        self.generator = torch.Generator().manual_seed(seed)
        self.order = torch.empty(0, dtype=torch.long)
        self.position = 0

    def next(self) -> torch.Tensor:
        if self.position >= len(self.order):
            self.order = torch.randperm(self.n_items, generator=self.generator)
            self.position = 0
        batch = self.order[self.position : self.position + self.batch_size]
        self.position += self.batch_size
        return batch

    def state_dict(self) -> dict[str, Any]:
        return {"generator": self.generator.get_state(), "order": self.order.clone(), "position": self.position}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        self.generator.set_state(state["generator"])
        self.order, self.position = state["order"].clone(), int(state["position"])


# ---------------------------------------------------------------------------- checkpoints
LOSS_PARTS = ("total", "classification", "graph", "gap")  # columns of the loss history


def training_fingerprint(
    train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights, config: TrainConfig,
    architecture: HuseArchitecture,
) -> dict[str, Any]:
    """What a checkpoint belongs to: settings (except ``num_steps``), losses, architecture, data hash."""
    digest = hashlib.sha256()
    for tensor in [*train.features(config.modalities).values(), train.labels, torch.as_tensor(class_distance)]:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    settings = {k: v for k, v in asdict(config).items() if k != "num_steps"}
    return {"format": 1, "train": settings, "loss": asdict(weights), "architecture": asdict(architecture),
            "data_sha256": digest.hexdigest(), "n_items": len(train)}


@dataclass
class TrainingRun:
    """Everything a training checkpoint holds besides the RNG states."""

    model: HuseModel
    optimizer: torch.optim.Optimizer
    batches: ResumableBatches
    history: list[dict] = field(default_factory=list)  # one row per log_every steps
    window: list[torch.Tensor] = field(default_factory=list)  # loss parts of the steps since the last row


def log_step(run: TrainingRun, parts: Mapping[str, torch.Tensor], step: int, config: TrainConfig) -> None:
    """Add a step's losses to the window; every ``log_every`` steps and at the end, append its means."""
    run.window.append(torch.stack([parts[k].detach() for k in LOSS_PARTS]))
    if step % config.log_every == 0 or step == config.num_steps:
        means = torch.stack(run.window).mean(dim=0).cpu().tolist()
        run.history.append({"step": step, **dict(zip(LOSS_PARTS, means))})
        run.window.clear()


def checkpoint_state(run: TrainingRun) -> dict[str, Any]:
    """The state to save: model, optimizer, batch stream, RNG states, loss history and window."""
    from zsl_utils.checkpoint import capture_rng_state

    window = torch.stack(run.window).cpu() if run.window else torch.zeros((0, len(LOSS_PARTS)))
    return {"model": run.model.state_dict(), "optimizer": run.optimizer.state_dict(), "rng": capture_rng_state(),
            "batches": run.batches.state_dict(), "history": run.history, "window": window}


def restore_checkpoint(run: TrainingRun, path: str | os.PathLike, fingerprint: Mapping[str, Any], num_steps: int) -> int:
    """Load checkpoint ``path`` into ``run`` and the RNGs; return its step.

    Raises ``StaleCheckpointError`` when it belongs to another ``fingerprint``.
    """
    from zsl_utils.checkpoint import load_checkpoint, restore_rng_state

    step, state = load_checkpoint(path, fingerprint, map_location="cpu")
    if step > num_steps:
        raise ParameterError(
            f"checkpoint {path} is at step {step}, beyond num_steps={num_steps}; raise num_steps or use another "
            f"checkpoint_dir."
        )
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.batches.load_state_dict(state["batches"])
    restore_rng_state(state["rng"])
    run.history[:] = list(state["history"])
    device = next(run.model.parameters()).device
    run.window[:] = [row.to(device) for row in state["window"]]
    return step


def run_checkpoint_dir(checkpoint_dir: str | os.PathLike, fingerprint: Mapping[str, Any], num_steps: int) -> Path:
    """``<checkpoint_dir>/huse_<hash>``: one folder per training fingerprint and ``num_steps``."""
    key = json.dumps({**fingerprint, "num_steps": int(num_steps)}, sort_keys=True, default=str)
    return Path(checkpoint_dir) / f"huse_{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _check_checkpoint_arguments(checkpoint_dir: Any, checkpoint_every: Any) -> None:
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ParameterError(f"checkpoint_every must be an int >= 0 (steps; 0: none), got {checkpoint_every!r}.")
    if (checkpoint_dir is None) != (checkpoint_every == 0):
        raise ParameterError(
            f"checkpoint_dir={checkpoint_dir!r} with checkpoint_every={checkpoint_every}: pass both (a folder and "
            "the steps between checkpoints) to make training resumable, or neither."
        )


def train_huse(
    train: HuseSplit,
    class_distance: torch.Tensor,
    weights: LossWeights | None = None,
    config: TrainConfig | None = None,
    architecture: HuseArchitecture | None = None,
    device: torch.device | str = "cpu",
    progress: bool = True,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
    keep_last: int = 2,
) -> TrainedHuse:
    """Train a HUSE model (or a single-modality one) on cached features.

    Everything random (initial weights, dropout, batch order) follows ``config.seed``,
    so two CPU runs with the same inputs give identical models.

    ``checkpoint_dir`` / ``checkpoint_every``: write a checkpoint every that many steps
    and at the end into :func:`run_checkpoint_dir` of ``checkpoint_dir`` (the
    ``keep_last`` newest are kept), and continue from the latest one found there. A run
    interrupted at any moment and started again with the same arguments ends with the
    same parameters and loss history, bit for bit, as one that was never interrupted;
    the steps after the last checkpoint are recomputed. ``extras`` records
    ``resumed_from_step`` and the folder.
    """
    from zsl_utils.checkpoint import latest_checkpoint, save_checkpoint

    weights, config, architecture = weights or LossWeights(), config or TrainConfig(), architecture or HuseArchitecture()
    class_distance = torch.as_tensor(class_distance, dtype=torch.float32)
    check_training_inputs(train, class_distance, config)
    _check_checkpoint_arguments(checkpoint_dir, checkpoint_every)
    folder, fingerprint = None, {}
    if checkpoint_dir is not None:
        fingerprint = training_fingerprint(train, class_distance, weights, config, architecture)
        folder = run_checkpoint_dir(checkpoint_dir, fingerprint, config.num_steps)
    device = torch.device(device)
    torch.manual_seed(config.seed)  # initial weights and dropout masks
    features = {m: x.to(device) for m, x in train.features(config.modalities).items()}
    labels, class_distance = train.labels.to(device), class_distance.to(device)
    model = HuseModel({m: x.shape[1] for m, x in features.items()}, class_distance.shape[0], architecture).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    run = TrainingRun(model, optimizer, ResumableBatches(len(train), config.batch_size, config.seed))
    latest = latest_checkpoint(folder) if folder is not None else None
    start = restore_checkpoint(run, latest, fingerprint, config.num_steps) if latest is not None else 0
    model.train()
    steps = range(start + 1, config.num_steps + 1)
    for step in tqdm(steps, desc="HUSE training", disable=not progress, mininterval=1.0):
        index = run.batches.next().to(device)
        embeddings, logits = model({m: x[index] for m, x in features.items()})
        parts = huse_loss(embeddings, logits, labels[index], class_distance, weights)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        log_step(run, parts, step, config)
        if folder is not None and (step % checkpoint_every == 0 or step == config.num_steps):
            save_checkpoint(folder, step, checkpoint_state(run), fingerprint, keep_last)
    model.eval()
    extras = {"resumed_from_step": start, "checkpoint_dir": str(folder)} if folder is not None else {}
    return TrainedHuse(model, pd.DataFrame(run.history, columns=["step", *LOSS_PARTS]), weights, config, architecture,
                       extras)


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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> pd.DataFrame:
    """Train one model per combination of ``grid`` values and score it on ``val``.

    ``grid`` maps ``LossWeights`` fields (``alpha``, ``beta``, ``gamma``, ``margin``,
    ``graph_variant``) to candidate values. Each row reports the validation headline
    numbers (``HuseEvaluation.summary``) and the fusion weight chosen on ``val``; rows
    are sorted best first by ``selection`` (default: mean recall@1 over the four
    retrieval directions, the quantity the embedding is for).

    ``checkpoint_dir`` / ``checkpoint_every`` are passed to every :func:`train_huse`
    (each combination has its own subfolder): a rerun after an interruption reloads the
    finished combinations' final checkpoints and continues the interrupted one.
    """
    _check_checkpoint_arguments(checkpoint_dir, checkpoint_every)
    base_weights = base_weights or LossWeights()
    rows = []
    combos = _grid(grid)
    for combo in tqdm(combos, desc="grid search", disable=not progress or len(combos) < 2):
        weights = replace(base_weights, **combo)
        trained = train_huse(train, class_distance, weights, config, architecture, device, progress=False,
                             checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
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
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = 0,
) -> dict[str, TrainedHuse]:
    """The "separate models" ablation: one single-modality HUSE per modality (no gap loss).

    Each model gets the classification and graph losses on its own modality only, so
    the two spaces are never aligned; cross-modal retrieval between them measures what
    the joint training buys. Checkpoint arguments as in :func:`train_huse`.
    """
    config = config or TrainConfig()
    return {
        m: train_huse(train, class_distance, weights, replace(config, modalities=(m,)), architecture, device, progress,
                      checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        for m in train.modalities
    }


def seeded_repeat_check(train: HuseSplit, class_distance: torch.Tensor, **kwargs: Any) -> bool:
    """Train twice with the same settings and report whether the final weights are identical."""
    first = train_huse(train, class_distance, progress=False, **kwargs).model.state_dict()
    second = train_huse(train, class_distance, progress=False, **kwargs).model.state_dict()
    return all(torch.equal(first[k], second[k]) for k in first)

