"""HUSE training with DistributedDataParallel on cached features, resumable from checkpoints.

Goal: N processes train the *same* model as :func:`zsl_utils.huse.training.train_huse` in
one process, up to floating-point summation order. Three things make that true:

1. **Same global batches.** Every rank draws the same seeded permutation (the batches
   of ``huse_train.batch_indices``) and takes a contiguous slice of each global batch
   (rank ``r`` of ``W`` gets rows ``tensor_split(batch, W)[r]``).
2. **The loss sees the whole global batch.** The semantic-graph loss (Eq. 11) sums over
   *all pairs* of the batch; per-rank losses on slices would drop the pairs that span
   two ranks and change the objective. Each rank therefore all-gathers the embeddings
   and logits of every rank (:func:`gather_rows`, differentiable) and computes the
   single-process loss on the full global batch. Every rank then holds the identical
   loss; the backward of the gather hands each rank the gradient of its own rows, times
   ``W`` because DDP *averages* parameter gradients over ranks -- so the averaged
   gradient is exactly the full-batch gradient.
3. **Same dropout masks.** The towers' dropout is replaced by :class:`GlobalBatchDropout`,
   which draws the mask of the *whole* global batch from the (identically seeded)
   generator of every rank and applies this rank's rows. On CPU this reproduces
   ``nn.Dropout``'s masks bit for bit (tested), and keeps the RNG streams of all ranks
   and of a single-process run in step.

What differs is only the order of floating-point sums (matrix products over a slice
instead of the whole batch; gradient all-reduce), so parameters agree to about 1e-6
relative after tens of steps; the tests check ``atol=1e-5, rtol=1e-4`` on parameters
and loss history after 12 RMSProp steps. One process (``ctx`` None) is bit-identical to
``train_huse``.

Resume: rank 0 writes an atomic checkpoint (model, optimizer, step, batch-stream and
RNG states, loss history; the same state as ``train_huse``'s checkpoints, built by the
helpers of ``huse_train``) every ``checkpoint_every`` steps. A restarted run loads the
latest one and continues: on one process the result is bit-identical to an
uninterrupted run. ``num_steps`` is not part of the checkpoint fingerprint, so a
finished run can be extended; everything else (settings, loss weights, architecture,
training data) is.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import pandas as pd
import torch
import torch.distributed as dist
import torch.nn as nn
from tqdm.auto import tqdm

from zsl_utils.atomic import write_atomically
from zsl_utils.checkpoint import latest_checkpoint, save_checkpoint
from zsl_utils.scale.launch import (
    DEFAULT_TIMEOUT_S,
    DistContext,
    agree_on,
    die_with_parent,
    init_distributed,
    launch_torchrun,
    rank_failure_guard,
    shutdown_distributed,
)
from zsl_utils.errors import DataLayoutError, ParameterError, ZslError
from zsl_utils.huse.model import HuseArchitecture, HuseModel, HuseSplit
from zsl_utils.huse.losses import LossWeights, huse_loss
from zsl_utils.huse.training import (  # noqa: F401 - ResumableBatches and training_fingerprint are part of this API too
    LOSS_PARTS,
    ResumableBatches,
    TrainConfig,
    TrainedHuse,
    TrainingRun,
    check_training_inputs,
    checkpoint_state,
    log_step,
    restore_checkpoint,
    training_fingerprint,
)

DEFAULT_CHECKPOINT_EVERY = 1000


# ---------------------------------------------------------------------- global batch
@dataclass
class RowSlice:
    """This rank's rows ``[start, stop)`` of the current global batch of ``global_rows`` rows."""

    global_rows: int = 0
    start: int = 0
    stop: int = 0


def rank_row_counts(n_rows: int, world_size: int) -> list[int]:
    """Rows per rank for a global batch of ``n_rows`` (``torch.tensor_split`` sizes)."""
    base, extra = divmod(n_rows, world_size)
    return [base + (1 if rank < extra else 0) for rank in range(world_size)]


class GlobalBatchDropout(nn.Module):
    """Dropout whose mask is drawn for the whole global batch and sliced to this rank's rows.

    Draws exactly what ``nn.Dropout`` draws for the full batch (``bernoulli_(1 - p)``
    then ``/ (1 - p)``), so every rank consumes the same random numbers and a 1-rank
    run equals ``nn.Dropout``.
    """

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

    def extra_repr(self) -> str:
        return f"p={self.p}"


def use_global_batch_dropout(model: nn.Module, rows: RowSlice) -> int:
    """Replace every ``nn.Dropout`` inside ``model`` by :class:`GlobalBatchDropout`; return how many."""
    replaced = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if type(child) is nn.Dropout:
                setattr(parent, name, GlobalBatchDropout(child.p, rows))
                replaced += 1
    return replaced


def restore_dropout(model: nn.Module) -> int:
    """Undo :func:`use_global_batch_dropout` (plain ``nn.Dropout`` again); return how many."""
    restored = 0
    for parent in model.modules():
        for name, child in list(parent.named_children()):
            if isinstance(child, GlobalBatchDropout):
                setattr(parent, name, nn.Dropout(child.p))
                restored += 1
    return restored


class _GatherRows(torch.autograd.Function):
    """All-gather row blocks of unequal sizes; backward returns this rank's rows of the gradient x W.

    Every rank computes the same loss on the gathered tensor, so the incoming gradient is
    identical on all ranks and no collective is needed in backward. The factor W undoes
    DDP's averaging of parameter gradients (see the module docstring).
    """

    @staticmethod
    def forward(ctx, local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:  # type: ignore[override]
        width = max(sizes)
        padded = local
        if local.shape[0] < width:
            padded = torch.cat([local, local.new_zeros((width - local.shape[0], *local.shape[1:]))])
        blocks = [torch.empty_like(padded) for _ in sizes]
        dist.all_gather(blocks, padded.contiguous())
        ctx.sizes, ctx.rank = sizes, rank
        return torch.cat([block[:n] for block, n in zip(blocks, sizes)])

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # type: ignore[override]
        offset = sum(ctx.sizes[: ctx.rank])
        own = grad[offset : offset + ctx.sizes[ctx.rank]]
        return own * len(ctx.sizes), None, None


def gather_rows(local: torch.Tensor, sizes: list[int], rank: int) -> torch.Tensor:
    """Differentiable all-gather of every rank's rows, in rank order (see :class:`_GatherRows`)."""
    return _GatherRows.apply(local, sizes, rank)


def _gather_outputs(embeddings: dict, logits: dict, sizes: list[int], rank: int) -> tuple[dict, dict]:
    """One collective per step: concatenate every output along columns, gather, split back."""
    names = [("e", m) for m in embeddings] + [("l", m) for m in logits]
    tensors = [embeddings[m] if kind == "e" else logits[m] for kind, m in names]
    widths = [t.shape[1] for t in tensors]
    gathered = gather_rows(torch.cat(tensors, dim=1), sizes, rank).split(widths, dim=1)
    out_embeddings = {m: g for (kind, m), g in zip(names, gathered) if kind == "e"}
    out_logits = {m: g for (kind, m), g in zip(names, gathered) if kind == "l"}
    return out_embeddings, out_logits


# ---------------------------------------------------------------------- resume
def _resume(run: TrainingRun, checkpoint_dir: Path | None, fingerprint: dict, ctx: DistContext, num_steps: int) -> int:
    """Load the latest checkpoint into ``run`` (all ranks the same one); return its step (0: fresh)."""
    path = latest_checkpoint(checkpoint_dir) if checkpoint_dir is not None else None
    agree_on(ctx, path.name if path else "<none>", f"the latest checkpoint in {checkpoint_dir}")
    return restore_checkpoint(run, path, fingerprint, num_steps) if path is not None else 0


def train_huse_ddp(
    train: HuseSplit,
    class_distance: torch.Tensor,
    weights: LossWeights | None = None,
    config: TrainConfig | None = None,
    architecture: HuseArchitecture | None = None,
    ctx: DistContext | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    keep_last: int = 2,
    progress: bool = True,
    step_callback: Callable[[int], None] | None = None,
) -> TrainedHuse:
    """Train HUSE on ``ctx.world_size`` ranks (DDP) or in this process (``ctx`` None), resumably.

    Same arguments and result as :func:`zsl_utils.huse.training.train_huse`, plus:
        ctx: from :func:`zsl_utils.scale.launch.init_distributed`; None = one process on CPU.
        checkpoint_dir: where rank 0 writes checkpoints; if it holds one for the same
            fingerprint, training continues from it (nothing recomputed).
        checkpoint_every: steps between checkpoints (one is always written at the end).
        step_callback: called with each finished step number (after any checkpoint).
    """
    weights, config, architecture = weights or LossWeights(), config or TrainConfig(), architecture or HuseArchitecture()
    ctx = ctx or DistContext()
    if not isinstance(checkpoint_every, int) or checkpoint_every < 1:
        raise ParameterError(f"checkpoint_every must be a positive int (steps), got {checkpoint_every!r}.")
    class_distance = torch.as_tensor(class_distance, dtype=torch.float32)
    check_training_inputs(train, class_distance, config)
    fingerprint = training_fingerprint(train, class_distance, weights, config, architecture)
    checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else None
    device = ctx.device
    torch.manual_seed(config.seed)  # initial weights and dropout masks, as train_huse
    features = {m: x.to(device) for m, x in train.features(config.modalities).items()}
    labels, class_distance = train.labels.to(device), class_distance.to(device)
    model = HuseModel({m: x.shape[1] for m, x in features.items()}, class_distance.shape[0], architecture).to(device)
    rows = RowSlice()
    use_global_batch_dropout(model, rows)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=config.learning_rate, momentum=config.momentum)
    run = TrainingRun(model, optimizer, ResumableBatches(len(train), config.batch_size, config.seed))
    start = _resume(run, checkpoint_dir, fingerprint, ctx, config.num_steps)
    net = _wrap_ddp(model, ctx)
    model.train()
    steps = range(start + 1, config.num_steps + 1)
    for step in tqdm(steps, desc=f"HUSE DDP x{ctx.world_size}", disable=not (progress and ctx.is_main), mininterval=1.0):
        index = run.batches.next()
        sizes = rank_row_counts(len(index), ctx.world_size)
        rows.global_rows, rows.start = len(index), sum(sizes[: ctx.rank])
        rows.stop = rows.start + sizes[ctx.rank]
        local = index[rows.start : rows.stop].to(device)
        embeddings, logits = net({m: x[local] for m, x in features.items()})
        if ctx.is_distributed:
            embeddings, logits = _gather_outputs(embeddings, logits, sizes, ctx.rank)
        parts = huse_loss(embeddings, logits, labels[index.to(device)], class_distance, weights)
        optimizer.zero_grad(set_to_none=True)
        parts["total"].backward()
        optimizer.step()
        log_step(run, parts, step, config)
        if checkpoint_dir is not None and ctx.is_main and (step % checkpoint_every == 0 or step == config.num_steps):
            save_checkpoint(checkpoint_dir, step, checkpoint_state(run), fingerprint, keep_last)
        if step_callback is not None:
            step_callback(step)
    restore_dropout(model)  # hand back an ordinary HuseModel
    model.eval()
    extras = {"world_size": ctx.world_size, "resumed_from_step": start,
              "checkpoint_dir": str(checkpoint_dir) if checkpoint_dir else None}
    return TrainedHuse(model, pd.DataFrame(run.history, columns=["step", *LOSS_PARTS]), weights, config, architecture, extras)


def _wrap_ddp(model: nn.Module, ctx: DistContext) -> nn.Module:
    if not ctx.is_distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    # No buffers in HUSE; broadcast_buffers=False saves a collective per forward.
    return DistributedDataParallel(model, device_ids=device_ids, broadcast_buffers=False)


# ---------------------------------------------------------------------- job folders (CLI)
INPUTS_NAME, CONFIG_NAME, RESULT_NAME = "inputs.npz", "config.json", "result.pt"


def write_training_job(
    job_dir: str | os.PathLike, train: HuseSplit, class_distance: torch.Tensor, weights: LossWeights | None = None,
    config: TrainConfig | None = None, architecture: HuseArchitecture | None = None,
) -> Path:
    """Write the inputs (features, labels, class distances) and settings of a training job."""
    job_dir = Path(job_dir)
    job_dir.mkdir(parents=True, exist_ok=True)
    arrays = {"labels": train.labels.numpy(), "class_distance": torch.as_tensor(class_distance, dtype=torch.float32).numpy()}
    arrays.update({m: x.numpy() for m, x in train.features().items()})
    np.savez(job_dir / INPUTS_NAME, **arrays)
    settings = {"train": asdict(config or TrainConfig()), "loss": asdict(weights or LossWeights()),
                "architecture": asdict(architecture or HuseArchitecture())}
    (job_dir / CONFIG_NAME).write_text(json.dumps(settings, indent=2))
    return job_dir


def read_training_job(job_dir: str | os.PathLike) -> tuple[HuseSplit, torch.Tensor, LossWeights, TrainConfig, HuseArchitecture]:
    """Inverse of :func:`write_training_job`, with clear errors for a missing or malformed job."""
    job_dir = Path(job_dir)
    try:
        with np.load(job_dir / INPUTS_NAME, allow_pickle=False) as data:
            arrays = {k: data[k] for k in data.files}
        settings = json.loads((job_dir / CONFIG_NAME).read_text())
    except (OSError, ValueError) as error:
        raise DataLayoutError(
            f"training job {job_dir} needs {INPUTS_NAME} and {CONFIG_NAME} ({error}); create it with "
            f"zsl_utils.scale.ddp.write_training_job."
        ) from error
    split = HuseSplit(arrays.get("image"), arrays.get("text"), arrays["labels"])
    train_settings = dict(settings["train"], modalities=tuple(settings["train"]["modalities"]))
    return (split, torch.as_tensor(arrays["class_distance"]), LossWeights(**settings["loss"]),
            TrainConfig(**train_settings), HuseArchitecture(**settings["architecture"]))


def _write_result(job_dir: Path, trained: TrainedHuse) -> None:
    payload = {"model": trained.model.state_dict(), "history": trained.history.to_dict("records"),
               "input_dims": dict(trained.model.input_dims), "num_classes": trained.model.classifier.out_features,
               "extras": json.dumps(trained.extras)}
    write_atomically(job_dir / RESULT_NAME, lambda handle: torch.save(payload, handle))


def load_training_result(job_dir: str | os.PathLike) -> TrainedHuse:
    """The :class:`TrainedHuse` written by a finished job (model on CPU, eval mode)."""
    _, _, weights, config, architecture = read_training_job(job_dir)
    payload = torch.load(Path(job_dir) / RESULT_NAME, map_location="cpu", weights_only=True)
    model = HuseModel(payload["input_dims"], payload["num_classes"], architecture)
    model.load_state_dict(payload["model"])
    return TrainedHuse(model.eval(), pd.DataFrame(payload["history"]), weights, config, architecture,
                       json.loads(payload["extras"]))


def run_distributed_training(
    nproc: int, job_dir: str | os.PathLike, checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY,
    device: str = "auto", timeout_s: float | None = None, echo: bool = False,
) -> TrainedHuse:
    """Launch ``torchrun --standalone --nproc_per_node nproc -m zsl_utils.scale.ddp`` on a job folder.

    Checkpoints go to ``<job_dir>/checkpoints``, so calling this again after an
    interruption resumes. Raises ``DistributedRunError`` with the failing rank's error.
    """
    job_dir = Path(job_dir)
    read_training_job(job_dir)  # fail here, not in N processes, if the job is malformed
    args = ["--job-dir", str(job_dir), "--checkpoint-every", str(checkpoint_every), "--device", device]
    launch_torchrun("zsl_utils.scale.ddp", args, nproc, Path(tempfile.mkdtemp(prefix="zsl_huse_ddp_")), timeout_s, echo)
    return load_training_result(job_dir)


def distributed_main(job_dir: str, checkpoint_every: int, device: str, timeout_s: float,
                     error_dir: str | None, debug_step_delay_s: float = 0.0) -> None:
    """Body of one torchrun worker: train on the job folder; rank 0 writes the result."""
    die_with_parent()
    with rank_failure_guard(error_dir):
        ctx = init_distributed(device, timeout_s)
        train, class_distance, weights, config, architecture = read_training_job(job_dir)
        delay = (lambda _step: time.sleep(debug_step_delay_s)) if debug_step_delay_s else None
        trained = train_huse_ddp(train, class_distance, weights, config, architecture, ctx,
                                 Path(job_dir) / "checkpoints", checkpoint_every, step_callback=delay)
        if ctx.is_main:
            _write_result(Path(job_dir), trained)
        shutdown_distributed()


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="torchrun --nproc_per_node N -m zsl_utils.scale.ddp",
        description="Train HUSE with DDP on a job folder written by write_training_job; rerun to resume.",
    )
    parser.add_argument("--job-dir", required=True, help="folder with inputs.npz and config.json")
    parser.add_argument("--checkpoint-every", type=int, default=DEFAULT_CHECKPOINT_EVERY)
    parser.add_argument("--device", default="auto", help="auto | cuda | cpu (under torchrun: GPU = LOCAL_RANK)")
    parser.add_argument("--timeout-s", type=float, default=DEFAULT_TIMEOUT_S / 4, help="limit for each collective")
    parser.add_argument("--error-dir", help="each failing rank writes its error here (set by the Python launcher)")
    parser.add_argument("--debug-step-delay-s", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    try:
        distributed_main(args.job_dir, args.checkpoint_every, args.device, args.timeout_s, args.error_dir,
                         args.debug_step_delay_s)
    except ZslError as error:  # a problem the user can fix: one readable message, no traceback
        print(f"zsl_utils.scale.ddp, rank {os.environ.get('RANK', '0')}: error: {error}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
