"""Training HUSE on cached features (resumable from checkpoints), the validation grid search, the ablations.

:func:`start_training`, :func:`resume` and :func:`train_steps` also serve ``python -m zsl_utils.scale.ddp``."""
from __future__ import annotations

import hashlib
import itertools
import json
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from zsl_utils.checkpoint import (ResumableBatches, capture_rng_state, latest_checkpoint, load_checkpoint,
                                  restore_rng_state, save_checkpoint)
from zsl_utils.device import torch_dtype
from zsl_utils.errors import ParameterError
from zsl_utils.huse.evaluation import HuseEvaluation, choose_fusion_weight, evaluate_huse
from zsl_utils.huse.losses import LossWeights, huse_loss
from zsl_utils.huse.model import MODALITIES, HuseArchitecture, HuseModel, HuseSplit, embed_split
from zsl_utils.metrics import seed_spread

LOSS_PARTS = ("total", "classification", "graph", "gap", "graph_pairs_kept")  # columns of the loss history


def history_columns(modalities: Sequence[str]) -> list[str]:
    """The loss parts, then each modality's classification loss and batch accuracy (see ``huse_loss``)."""
    return [*LOSS_PARTS, *(f"{kind}_{m}" for kind in ("classification", "accuracy") for m in modalities)]


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
    compute_dtype: str = "float32"  # "float64": the same weights on every CPU (rounding is not amplified)

    def __post_init__(self) -> None:
        for name in ("num_steps", "batch_size", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ParameterError(f"TrainConfig.{name}={getattr(self, name)!r} must be >= 1.")
        if not self.learning_rate > 0:
            raise ParameterError(f"TrainConfig.learning_rate={self.learning_rate!r} must be > 0.")
        if not 0 <= self.momentum < 1:
            raise ParameterError(f"TrainConfig.momentum={self.momentum!r} must lie in [0, 1).")
        torch_dtype(self.compute_dtype)  # checks the name
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


def check_training_inputs(train: HuseSplit, class_distance: torch.Tensor) -> None:
    """Raise :class:`ParameterError` unless ``class_distance`` is square and covers the labels of ``train``."""
    n_classes = class_distance.shape[0]
    if class_distance.ndim != 2 or class_distance.shape[1] != n_classes:
        raise ParameterError(f"class_distance must be square (K, K), got {tuple(class_distance.shape)}.")
    low, high = (int(train.labels.min()), int(train.labels.max())) if len(train) else ("-", "-")
    if len(train) == 0 or high >= n_classes or low < 0:
        raise ParameterError(f"labels must be class indices in [0, {n_classes}); got range [{low}, {high}]. "
                             "Build class_distance from the same class list as the labels.")


@dataclass
class TrainingRun:
    """A training in progress: its inputs on the device, settings, and the state a checkpoint holds."""

    model: HuseModel
    optimizer: torch.optim.Optimizer
    batches: ResumableBatches
    features: dict[str, torch.Tensor]
    labels: torch.Tensor
    class_distance: torch.Tensor
    weights: LossWeights
    config: TrainConfig
    history: list[dict] = field(default_factory=list)  # one row per log_every steps
    window: list[torch.Tensor] = field(default_factory=list)  # loss parts of the steps since the last row

    def checkpoint_state(self) -> dict[str, Any]:
        columns = history_columns(self.config.modalities)
        window = torch.stack(self.window).cpu() if self.window else torch.zeros((0, len(columns)))
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "rng": capture_rng_state(),
                "batches": self.batches.state_dict(), "history": self.history, "window": window}

    def result(self, extras: dict[str, Any]) -> TrainedHuse:
        history = pd.DataFrame(self.history, columns=["step", *history_columns(self.config.modalities)])
        return TrainedHuse(self.model.eval(), history, self.weights, self.config, self.model.architecture, extras)


@dataclass(frozen=True)
class Checkpointing:
    """Save into ``folder`` every ``every`` steps and at the last step, keeping the ``keep_last`` newest."""

    folder: Path
    fingerprint: dict[str, Any]
    every: int
    keep_last: int = 2


def start_training(train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights | None,
                   config: TrainConfig | None, architecture: HuseArchitecture | None,
                   device: torch.device | str) -> TrainingRun:
    """Check the inputs, seed, and build the model, RMSProp and the batch stream on ``device`` (step 0)."""
    weights, config = weights or LossWeights(), config or TrainConfig()
    dtype = torch_dtype(config.compute_dtype)
    class_distance = torch.as_tensor(class_distance, dtype=dtype)
    features = {m: x.to(device, dtype) for m, x in train.features(config.modalities).items()}  # checks modalities
    check_training_inputs(train, class_distance)
    torch.manual_seed(config.seed)  # initial weights and dropout masks
    model = HuseModel({m: x.shape[1] for m, x in features.items()}, class_distance.shape[0], architecture)
    model = model.to(device, dtype)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    return TrainingRun(model, optimizer, ResumableBatches(len(train), config.batch_size, config.seed), features,
                       train.labels.to(device), class_distance.to(device), weights, config)


def training_fingerprint(train: HuseSplit, run: TrainingRun) -> dict[str, Any]:
    """What a checkpoint belongs to: settings (except ``num_steps``), losses, architecture, data hash."""
    digest = hashlib.sha256()
    for tensor in [*train.features(run.config.modalities).values(), train.labels, run.class_distance]:
        array = np.ascontiguousarray(tensor.detach().cpu().numpy())
        digest.update(f"{array.dtype}{array.shape}".encode())
        digest.update(memoryview(array).cast("B"))
    settings = {k: v for k, v in asdict(run.config).items() if k != "num_steps"}
    return {"format": 1, "train": settings, "loss": asdict(run.weights), "architecture": asdict(run.model.architecture),
            "data_sha256": digest.hexdigest(), "n_items": len(train)}


def resume(run: TrainingRun, path: Path | None, fingerprint: Mapping[str, Any] | None) -> int:
    """Load checkpoint ``path`` (None: none) into ``run`` and the RNGs; return its step (StaleCheckpointError)."""
    if path is None:
        return 0
    step, state = load_checkpoint(path, fingerprint, map_location="cpu")
    if step > run.config.num_steps:
        raise ParameterError(f"checkpoint {path} is at step {step}, beyond num_steps={run.config.num_steps}; raise "
                             "num_steps or use another checkpoint_dir.")
    run.model.load_state_dict(state["model"])
    run.optimizer.load_state_dict(state["optimizer"])
    run.batches.load_state_dict(state["batches"])
    restore_rng_state(state["rng"])
    run.history[:] = list(state["history"])
    run.window[:] = [row.to(run.labels.device) for row in state["window"]]
    return step


def train_steps(run: TrainingRun, start: int, forward: Callable[[torch.Tensor], tuple[dict, dict]] | None = None,
                checkpointing: Checkpointing | None = None, progress: bool = True, desc: str = "HUSE training",
                step_callback: Callable[[int], None] | None = None) -> None:
    """Steps ``start + 1 .. num_steps``; ``step_callback(step)`` after each (and its checkpoint).
    ``forward(index)``: the outputs for the whole batch ``index`` (default: ``run.model`` on it)."""
    config, device, columns = run.config, run.labels.device, history_columns(run.config.modalities)
    forward = forward or (lambda index: run.model({m: x[index.to(device)] for m, x in run.features.items()}))
    run.model.train()
    for step in tqdm(range(start + 1, config.num_steps + 1), desc=desc, disable=not progress, mininterval=1.0):
        index = run.batches.next()
        parts = huse_loss(*forward(index), run.labels[index.to(device)], run.class_distance, run.weights)
        run.optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        run.optimizer.step()
        run.window.append(torch.stack([parts[k].detach() for k in columns]))
        if step % config.log_every == 0 or step == config.num_steps:
            means = torch.stack(run.window).mean(dim=0).cpu().tolist()
            run.history.append({"step": step, **dict(zip(columns, means))})
            run.window.clear()
        if checkpointing is not None and (step % checkpointing.every == 0 or step == config.num_steps):
            save_checkpoint(checkpointing.folder, step, run.checkpoint_state(), checkpointing.fingerprint,
                            checkpointing.keep_last)
        if step_callback is not None:
            step_callback(step)


def _check_checkpoint_arguments(checkpoint_dir: Any, checkpoint_every: Any) -> None:
    if not isinstance(checkpoint_every, int) or isinstance(checkpoint_every, bool) or checkpoint_every < 0:
        raise ParameterError(f"checkpoint_every must be an int >= 0 (steps; 0: none), got {checkpoint_every!r}.")
    if (checkpoint_dir is None) != (checkpoint_every == 0):
        raise ParameterError(f"checkpoint_dir={checkpoint_dir!r} with checkpoint_every={checkpoint_every}: pass both "
                             "(a folder and the steps between checkpoints) to make training resumable, or neither.")


def train_huse(train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights | None = None,
               config: TrainConfig | None = None, architecture: HuseArchitecture | None = None,
               device: torch.device | str = "cpu", progress: bool = True,
               checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0,
               keep_last: int = 2) -> TrainedHuse:
    """Train a HUSE model (or a single-modality one) on cached features; ``config.seed`` fixes all randomness.

    With ``checkpoint_dir`` and ``checkpoint_every`` it checkpoints into ``<checkpoint_dir>/huse_<hash>`` (per
    fingerprint and ``num_steps``) and resumes from the latest one there, bit for bit as an uninterrupted run."""
    _check_checkpoint_arguments(checkpoint_dir, checkpoint_every)
    run = start_training(train, class_distance, weights, config, architecture, torch.device(device))
    if checkpoint_dir is None:
        train_steps(run, 0, progress=progress)
        return run.result({})
    fingerprint = training_fingerprint(train, run)
    key = json.dumps({**fingerprint, "num_steps": int(run.config.num_steps)}, sort_keys=True, default=str)
    folder = Path(checkpoint_dir) / f"huse_{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    start = resume(run, latest_checkpoint(folder), fingerprint)
    train_steps(run, start, checkpointing=Checkpointing(folder, fingerprint, checkpoint_every, keep_last),
                progress=progress)
    return run.result({"resumed_from_step": start, "checkpoint_dir": str(folder)})


def grid_search(train: HuseSplit, val: HuseSplit, class_distance: torch.Tensor, grid: Mapping[str, Sequence[Any]],
                base_weights: LossWeights | None = None, config: TrainConfig | None = None,
                architecture: HuseArchitecture | None = None,
                correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None, selection: str = "mean_R@1",
                device: torch.device | str = "cpu", progress: bool = True, seeds: Sequence[int] | None = None,
                checkpoint_dir: str | os.PathLike | None = None, checkpoint_every: int = 0) -> pd.DataFrame:
    """One model per combination of ``grid`` values (``LossWeights`` fields) and seed (default: ``config.seed``): a
    row of its headline numbers on ``val`` averaged over the seeds (``<selection> sd``: their spread), best first by
    ``selection``. With checkpoints a rerun reloads finished trainings."""
    unknown, allowed = set(grid) - set(LossWeights.__dataclass_fields__), sorted(LossWeights.__dataclass_fields__)
    if unknown:
        raise ParameterError(f"grid keys {sorted(unknown)} are not loss settings; use some of {allowed}.")
    config = config or TrainConfig()
    combos = [dict(zip(grid, values)) for values in itertools.product(*grid.values())]
    jobs = [(combo, s) for combo in combos for s in seeds or [config.seed]]
    summaries: dict[str, list[pd.Series]] = {}
    for combo, s in tqdm(jobs, desc="grid search", disable=not progress or len(jobs) < 2):
        weights = replace(base_weights or LossWeights(), **combo)
        trained = train_huse(train, class_distance, weights, replace(config, seed=s), architecture, device,
                             progress=False, checkpoint_dir=checkpoint_dir, checkpoint_every=checkpoint_every)
        outputs = embed_split(trained.model, val, device)
        fusion_weight = choose_fusion_weight(outputs) if len(outputs.probabilities) == 2 else 0.5
        summary = {"fusion_weight": fusion_weight, **evaluate_huse(outputs, fusion_weight, correct_sets).summary()}
        summaries.setdefault(json.dumps(asdict(weights)), []).append(pd.Series(summary))
    spreads = {key: seed_spread(per_seed) for key, per_seed in summaries.items()}
    table = pd.DataFrame([{**json.loads(key), **s["mean"].to_dict(), f"{selection} sd": s["sd"].get(selection)}
                          for key, s in spreads.items()])
    if selection not in table.columns:
        raise ParameterError(f"selection={selection!r} is not a grid column; choose one of {list(table.columns)}.")
    return table.sort_values(selection, ascending=False, kind="stable").reset_index(drop=True)


def best_weights(grid_table: pd.DataFrame, default: LossWeights | None = None,
                 selection: str = "mean_R@1") -> LossWeights:
    """The ``LossWeights`` of the best (first) row of a ``grid_search`` table; with ``default``, that one instead when
    it is a grid row that the best does not lead by more than the two rows' sds together (a lead within the noise)."""
    rows = [LossWeights(**row) for row in grid_table[list(LossWeights.__dataclass_fields__)].to_dict("records")]
    if default in rows:
        best, candidate = grid_table.iloc[0], grid_table.iloc[rows.index(default)]
        if best[selection] - candidate[selection] <= best[f"{selection} sd"] + candidate[f"{selection} sd"]:
            return default
    return rows[0]


def train_separate(train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights | None = None,
                   config: TrainConfig | None = None, **options: Any) -> dict[str, TrainedHuse]:
    """The "separate models" ablation: one single-modality HUSE per modality, never aligned (no gap loss), so
    cross-modal retrieval between them measures what joint training buys. ``options``: for :func:`train_huse`."""
    return {m: train_huse(train, class_distance, weights, replace(config or TrainConfig(), modalities=(m,)), **options)
            for m in train.modalities}


def seeded_repeat_check(train: HuseSplit, class_distance: torch.Tensor, **kwargs: Any) -> bool:
    """Train twice with the same settings and report whether the final weights are identical."""
    first, second = (train_huse(train, class_distance, progress=False, **kwargs).model.state_dict() for _ in range(2))
    return all(torch.equal(first[k], second[k]) for k in first)


def loss_shares(trained: TrainedHuse) -> pd.Series:
    """Each weighted part's (``alpha * classification`` ...) share of the total loss in training's second half."""
    rows = trained.history[trained.history["step"] > trained.config.num_steps // 2]
    weights = {"classification": trained.weights.alpha, "graph": trained.weights.beta, "gap": trained.weights.gamma}
    return pd.Series({part: float((w * rows[part] / rows["total"]).mean()) for part, w in weights.items()})


def fit_and_evaluate(splits: Mapping[str, HuseSplit], class_distance: torch.Tensor, weights: LossWeights,
                     config: TrainConfig, correct_sets: Mapping[int, Sequence[frozenset[int]]] | None = None,
                     ks: Sequence[int] = (1, 5, 10), separate: bool = False,
                     **options: Any) -> tuple[TrainedHuse | dict[str, TrainedHuse], HuseEvaluation]:
    """Train on ``splits["train"]`` (one joint model, or with ``separate`` one per modality), choose the fusion weight
    on ``"val"`` and evaluate on ``"test"``: ``(trained, HuseEvaluation)``. ``options``: for :func:`train_huse`."""
    device = options.get("device", "cpu")
    trained = (train_separate if separate else train_huse)(splits["train"], class_distance, weights, config, **options)
    model = {m: t.model for m, t in trained.items()} if separate else trained.model
    fusion_weight = choose_fusion_weight(embed_split(model, splits["val"], device))
    return trained, evaluate_huse(embed_split(model, splits["test"], device), fusion_weight, correct_sets, ks)


def over_seeds(settings: Mapping[str, Mapping[str, Any]], seeds: Sequence[int], config: TrainConfig,
               progress: bool = True, **common: Any) -> dict[str, list[tuple[Any, Any]]]:
    """``{setting: [fit_and_evaluate(...) per seed]}``; ``settings``: name -> keyword arguments of fit_and_evaluate
    (e.g. ``weights``, ``separate``) over ``common``. Splits stay fixed; the seed sets init, dropout, batch order."""
    jobs = [(name, s) for name in settings for s in seeds]
    results: dict[str, list] = {name: [] for name in settings}
    for name, s in tqdm(jobs, desc="trainings over seeds", disable=not progress):
        kwargs = {**common, **settings[name], "progress": False}
        results[name].append(fit_and_evaluate(config=replace(config, seed=s), **kwargs))
    return results


def seed_spreads(results: Mapping[str, Sequence[tuple[Any, Any]]]) -> dict[str, pd.DataFrame]:
    """``{setting: seed_spread}`` of the headline numbers of an :func:`over_seeds` result."""
    return {name: seed_spread([evaluation.headline() for _, evaluation in runs]) for name, runs in results.items()}
