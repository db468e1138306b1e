"""DeViSE training speed on cached features: the library's vectorised hinge rank loss against a per-pair loop.

One training step (forward M v, loss over every negative, backward, Adam) at batch 1,024 with 1,000 training labels
(999 negatives per image), measured side by side in one run on the same device and the same batches:

* vectorised: ``zsl_utils.conse.devise.rank_loss`` (one [batch, labels] score matrix);
* per pair: the same loss written as a Python loop over images and negatives (what the formula reads like).

The per-pair loop is slow (a million Python-level terms per step), so it is timed on the first ``--loop-images``
images of the batch and its step time scaled to the whole batch (its cost is linear in the number of images); both
are reported in steps per second at the full batch, with the ratio.
Features are random (a step's cost does not depend on their values) with the demo's shapes: EfficientNet-Lite0's
1,280-d pooled features into 50-d GloVe.

    python benchmarks/bench_devise.py --device cpu
    python benchmarks/bench_devise.py --device cuda --steps 200
"""
from __future__ import annotations

import argparse
import time

import torch

from zsl_utils.conse.devise import DeViSE, rank_loss
from zsl_utils.device import pick_device, seed_everything


def per_pair_loss(projected: torch.Tensor, unit_labels: torch.Tensor, targets: torch.Tensor, margin: float):
    total = projected.new_zeros(())
    for i in range(len(projected)):
        true_score = unit_labels[targets[i]] @ projected[i]
        for j in range(len(unit_labels)):
            if j != int(targets[i]):
                total = total + torch.clamp(margin - true_score + unit_labels[j] @ projected[i], min=0)
    return total / len(projected)


def steps_per_second(loss_fn, steps: int, features, labels, targets, device) -> float:
    """Training steps per second of ``loss_fn`` on this batch (after one warm-up step)."""
    model = DeViSE(features.shape[1], labels.shape[1]).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    for step in range(steps + 1):
        if step == 1:  # the first step warms up kernels and allocations
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            started = time.perf_counter()
        loss = loss_fn(model(features), labels, targets, 0.1)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch", type=int, default=1024)
    parser.add_argument("--labels", type=int, default=1000)
    parser.add_argument("--feature-dim", type=int, default=1280)
    parser.add_argument("--dim", type=int, default=50)
    parser.add_argument("--steps", type=int, default=50, help="vectorised steps timed")
    parser.add_argument("--loop-steps", type=int, default=1, help="per-pair steps timed")
    parser.add_argument("--loop-images", type=int, default=8, help="images of the batch the per-pair loop runs on")
    args = parser.parse_args()
    seed_everything(0)
    device = pick_device(args.device)
    features = torch.randn(args.batch, args.feature_dim, device=device)
    labels = torch.nn.functional.normalize(torch.randn(args.labels, args.dim, device=device), dim=1)
    targets = torch.randint(0, args.labels, (args.batch,), device=device)
    with torch.no_grad():  # the two losses agree before anything is timed
        projected = torch.randn(8, args.dim, device=device)
        assert torch.allclose(rank_loss(projected, labels, targets[:8], 0.1),
                              per_pair_loss(projected, labels, targets[:8], 0.1), rtol=1e-4)
    fast = steps_per_second(rank_loss, args.steps, features, labels, targets, device)
    part = slice(0, args.loop_images)
    slow = steps_per_second(per_pair_loss, args.loop_steps, features[part], labels, targets[part], device)
    slow *= args.loop_images / args.batch  # scaled to the full batch
    print(f"device={device}, batch={args.batch}, labels={args.labels} ({args.labels - 1} negatives per image), "
          f"features {args.feature_dim} -> {args.dim}")
    print(f"vectorised rank loss: {fast:,.1f} steps/s ({fast * args.batch:,.0f} images/s)")
    print(f"per-pair loop:        {slow:,.5f} steps/s (timed on {args.loop_images} images, scaled to {args.batch})")
    print(f"ratio vectorised / per-pair: {fast / slow:,.0f}x")


if __name__ == "__main__":
    main()
