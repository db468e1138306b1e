"""HUSE training with DistributedDataParallel: ``torchrun --nproc_per_node N -m zsl_utils.scale.ddp --job-dir D``.

N ranks train ``train_huse``'s model up to summation order (docs/DISTRIBUTED.md): each takes a slice of the same global
batch; all outputs are all-gathered, so the graph loss (over *all pairs*) is the whole batch's; dropout draws the whole
batch's mask on every rank. One process is bit-identical."""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from torch.nn.parallel import DistributedDataParallel

from zsl_utils.atomic import write_atomically, write_text_atomically
from zsl_utils.checkpoint import latest_checkpoint
from zsl_utils.errors import DataLayoutError, ParameterError
from zsl_utils.huse.losses import LossWeights
from zsl_utils.huse.model import HuseArchitecture, HuseModel, HuseSplit
from zsl_utils.huse.training import (Checkpointing, TrainConfig, TrainedHuse, resume, start_training,
                                     train_steps, training_fingerprint)
from zsl_utils.scale.launch import (DEFAULT_TIMEOUT_S, DistContext, agree_on, die_with_parent, init_distributed,
                                    launch_torchrun, rank_failure_guard, run_cli, shutdown_distributed)

DEFAULT_CHECKPOINT_EVERY = 1000
INPUTS_NAME, CONFIG_NAME, RESULT_NAME = "inputs.npz", "config.json", "result.pt"


@dataclass
class RowSlice:
    """This rank's rows ``[start, stop)`` of the current global batch of ``global_rows`` rows."""

    global_rows: int = 0
    start: int = 0
    stop: int = 0


class GlobalBatchDropout(nn.Module):
    """Dropout drawing ``nn.Dropout``'s mask for the whole global batch (same RNG use on every rank), sliced."""

    def __init__(self, p: float, rows: RowSlice) -> None:
        super().__init__()
        self.p, self.rows = float(p), rows

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.p == 0.0:
            return x
        rows = self.rows
        if x.shape[0] != rows.stop - rows.start:
            raise RuntimeError(f"GlobalBatchDropout got {x.shape[0]} rows, expected {rows.stop - rows.start}.")
        mask = torch.empty((rows.global_rows, *x.shape[1:]), dtype=x.dtype, device=x.device)
        mask.bernoulli_(1.0 - self.p).div_(1.0 - self.p)
        return x * mask[rows.start : rows.stop]


def _replace_dropout(model: nn.Module, kind: type, make: Callable[[float], nn.Module]) -> None:
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is kind:
                setattr(parent, name, make(child.p))


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks of unequal sizes; backward: this rank's rows of the gradient x W.
    Every rank computes the same loss, so backward needs no collective; x W undoes DDP's averaging."""

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        padded = torch.cat([local, local.new_zeros((max(sizes) - local.shape[0], *local.shape[1:]))])
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([block[:n] for block, n in zip(blocks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        offset = sum(ctx.sizes[: ctx.rank])
        return grad[offset : offset + ctx.sizes[ctx.rank]] * len(ctx.sizes), None, None


def _gather_outputs(embeddings: dict, logits: dict, sizes: list[int], rank: int) -> tuple[dict, dict]:
    """One collective per step: every output side by side, gathered over the ranks, split back."""
    tensors = [*embeddings.values(), *logits.values()]
    gathered = _GatherRows.apply(torch.cat(tensors, dim=1), sizes, rank).split([t.shape[1] for t in tensors], dim=1)
    return dict(zip(embeddings, gathered[: len(embeddings)])), dict(zip(logits, gathered[len(embeddings) :]))


def train_huse_ddp(train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights | None = None,
                   config: TrainConfig | None = None, architecture: HuseArchitecture | None = None,
                   ctx: DistContext | None = None, *, checkpoint_dir: str | os.PathLike | None = None,
                   checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY, keep_last: int = 2, progress: bool = True,
                   step_callback: Callable[[int], None] | None = None) -> TrainedHuse:
    """``train_huse`` on ``ctx.world_size`` ranks (None: this process); rank 0 checkpoints where a rerun resumes."""
    ctx = ctx or DistContext()
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ParameterError(f"checkpoint_every must be a positive int (steps), got {checkpoint_every!r}.")
    run = start_training(train, class_distance, weights, config, architecture, ctx.device)
    rows = RowSlice()
    _replace_dropout(run.model, nn.Dropout, lambda p: GlobalBatchDropout(p, rows))
    checkpointing, latest = None, None
    if checkpoint_dir is not None:
        fingerprint = training_fingerprint(train, run)
        checkpointing = Checkpointing(Path(checkpoint_dir), fingerprint, checkpoint_every, keep_last)
        latest = latest_checkpoint(checkpoint_dir)
    agree_on(ctx, latest.name if latest else "<none>", f"the latest checkpoint in {checkpoint_dir}")
    start = resume(run, latest, checkpointing.fingerprint if checkpointing else None)
    net = run.model
    if ctx.is_distributed:  # HUSE has no buffers: broadcast_buffers=False saves a collective per forward
        device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
        net = DistributedDataParallel(run.model, device_ids=device_ids, broadcast_buffers=False)

    def forward(index: torch.Tensor) -> tuple[dict, dict]:
        sizes = [len(part) for part in torch.tensor_split(index, ctx.world_size)]
        rows.global_rows, rows.start = len(index), sum(sizes[: ctx.rank])
        rows.stop = rows.start + sizes[ctx.rank]
        local = index[rows.start : rows.stop].to(ctx.device)
        embeddings, logits = net({m: x[local] for m, x in run.features.items()})
        return _gather_outputs(embeddings, logits, sizes, ctx.rank) if ctx.is_distributed else (embeddings, logits)

    train_steps(run, start, forward, checkpointing if ctx.is_main else None, progress and ctx.is_main,
                f"HUSE DDP x{ctx.world_size}", step_callback)
    _replace_dropout(run.model, GlobalBatchDropout, nn.Dropout)  # hand back an ordinary HuseModel
    return run.result({"world_size": ctx.world_size, "resumed_from_step": start,
                       "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None})


def write_training_job(job_dir: str | os.PathLike, train: HuseSplit, class_distance: torch.Tensor,
                       weights: LossWeights | None = None, config: TrainConfig | None = None,
                       architecture: HuseArchitecture | None = None) -> Path:
    """Write the inputs (features, labels, class distances) and settings of a training job folder."""
    job_dir = Path(job_dir)
    settings = {"train": asdict(config or TrainConfig()), "loss": asdict(weights or LossWeights()),
                "architecture": asdict(architecture or HuseArchitecture())}
    write_text_atomically(job_dir / CONFIG_NAME, json.dumps(settings, indent=2))  # creates job_dir
    arrays = {m: x.numpy() for m, x in train.features().items()}
    np.savez(job_dir / INPUTS_NAME, labels=train.labels.numpy(),
             class_distance=torch.as_tensor(class_distance, dtype=torch.float32).numpy(), **arrays)
    return job_dir


def read_training_job(job_dir: str | os.PathLike) -> tuple[HuseSplit, torch.Tensor, LossWeights, TrainConfig,
                                                          HuseArchitecture]:
    """Inverse of :func:`write_training_job`, with a clear error for a missing or malformed job."""
    job_dir = Path(job_dir)
    try:
        with np.load(job_dir / INPUTS_NAME, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        settings = json.loads((job_dir / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise DataLayoutError(f"training job {job_dir} needs {INPUTS_NAME} and {CONFIG_NAME} ({error}); create it "
                              "with zsl_utils.scale.ddp.write_training_job.") from error
    split = HuseSplit(arrays.get("image"), arrays.get("text"), arrays["labels"])
    train_settings = dict(settings["train"], modalities=tuple(settings["train"]["modalities"]))
    return (split, torch.as_tensor(arrays["class_distance"]), LossWeights(**settings["loss"]),
            TrainConfig(**train_settings), HuseArchitecture(**settings["architecture"]))


def load_training_result(job_dir: str | os.PathLike) -> TrainedHuse:
    """The :class:`TrainedHuse` written by a finished job (model on CPU, eval mode)."""
    _, _, weights, config, architecture = read_training_job(job_dir)
    payload = torch.load(Path(job_dir) / RESULT_NAME, map_location="cpu", weights_only=True)
    model = HuseModel(payload["input_dims"], payload["num_classes"], architecture)
    model.load_state_dict(payload["model"])
    return TrainedHuse(model.eval(), pd.DataFrame(payload["history"]), weights, config, architecture,
                       json.loads(payload["extras"]))


def run_distributed_training(nproc: int, job_dir: str | os.PathLike, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
                             device: str = "auto", timeout_s: float | None = None, echo: bool = False) -> TrainedHuse:
    """Run this module under torchrun on ``nproc`` processes; rerun to resume (from ``<job_dir>/checkpoints``)."""
    read_training_job(job_dir)  # fail here, not in N processes, if the job is malformed
    args = ["--job-dir", str(job_dir), "--checkpoint-every", str(checkpoint_every), "--device", device]
    launch_torchrun("zsl_utils.scale.ddp", args, nproc, timeout_s=timeout_s, echo=echo)  # logs in a fresh temp dir
    return load_training_result(job_dir)


def _worker(args: argparse.Namespace) -> None:
    """One torchrun worker: train on the job folder; rank 0 writes the result."""
    die_with_parent()
    with rank_failure_guard(args.error_dir):
        ctx = init_distributed(args.device, args.timeout_s)
        train, class_distance, weights, config, architecture = read_training_job(args.job_dir)
        delay = (lambda _step: time.sleep(args.debug_step_delay_s)) if args.debug_step_delay_s else None
        trained = train_huse_ddp(train, class_distance, weights, config, architecture, ctx, step_callback=delay,
                                 checkpoint_dir=Path(args.job_dir) / "checkpoints",
                                 checkpoint_every=args.checkpoint_every)
        if ctx.is_main:
            payload = {"model": trained.model.state_dict(), "history": trained.history.to_dict("records"),
                       "input_dims": dict(trained.model.input_dims), "extras": json.dumps(trained.extras),
                       "num_classes": trained.model.classifier.out_features}
            write_atomically(Path(args.job_dir) / RESULT_NAME, lambda handle: torch.save(payload, handle))
        shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="torchrun --nproc_per_node N -m zsl_utils.scale.ddp",
                                     description="Train HUSE with DDP on a job folder; rerun to resume.")
    parser.add_argument("--job-dir", required=True, help="folder with inputs.npz and config.json")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (under torchrun: GPU = LOCAL_RANK)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S / 4, help="limit for each collective")
    parser.add_argument("--error-dir", help="each failing rank writes its error here (set by the Python launcher)")
    parser.add_argument("--debug-step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    return run_cli("zsl_utils.scale.ddp", lambda: _worker(parser.parse_args(argv)))


if __name__ == "__main__":
    sys.exit(main())
