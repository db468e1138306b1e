"""HUSE training speed on cached features, and the semantic-graph loss's share of a step.

Measured side by side in one run, on the same device and the same batches:

* full step: forward, the three losses (alpha = beta = gamma = 1), backward, RMSProp;
* the same step without the graph loss (beta = 0);
* the graph loss alone (forward + backward on fixed embeddings).

The graph loss's share is reported two ways: ``1 - t(no graph) / t(full)`` and
``t(graph alone) / t(full)``.

Features: by default random tensors with the full profile's shapes (EfficientNet-Lite0
1280-d images, MiniLM 384-d texts, 101 classes); a step's cost does not depend on
the feature values. ``--cache-dir`` points at a finished feature cache pair instead.

    python benchmarks/bench_huse.py --device cpu --steps 20
    python benchmarks/bench_huse.py --device cuda --steps 200
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from zsl_utils.cache import ShardedCache
from zsl_utils.device import pick_device, seed_everything
from zsl_utils.huse.model import HuseArchitecture, HuseModel
from zsl_utils.huse.losses import LossWeights, class_distance_matrix, huse_loss, semantic_graph_loss


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def load_features(args: argparse.Namespace) -> tuple[torch.Tensor, torch.Tensor]:
    if args.cache_dir is None:
        return torch.randn(args.items, args.image_dim), torch.randn(args.items, args.text_dim)
    image = ShardedCache.open_existing(Path(args.cache_dir) / "image").load("features")
    text = ShardedCache.open_existing(Path(args.cache_dir) / "text").load("features")
    return torch.as_tensor(image, dtype=torch.float32), torch.as_tensor(text, dtype=torch.float32)


def time_steps(step, n_steps: int, device: torch.device, warmup: int = 3) -> float:
    """Seconds per call of ``step`` (after ``warmup`` untimed calls)."""
    for _ in range(warmup):
        step()
    synchronize(device)
    began = time.perf_counter()
    for _ in range(n_steps):
        step()
    synchronize(device)
    return (time.perf_counter() - began) / n_steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--items", type=int, default=8192)
    parser.add_argument("--image-dim", type=int, default=1280)
    parser.add_argument("--text-dim", type=int, default=384)
    parser.add_argument("--classes", type=int, default=101)
    parser.add_argument("--cache-dir", default=None, help="folder with image/ and text/ feature caches")
    args = parser.parse_args()

    device = pick_device(args.device)
    seed_everything(0)
    image, text = (x.to(device) for x in load_features(args))
    labels = torch.randint(0, args.classes, (len(image),), device=device)
    class_distance = class_distance_matrix(torch.randn(args.classes, 384)).to(device)
    model = HuseModel({"image": image.shape[1], "text": text.shape[1]}, args.classes, HuseArchitecture()).to(device)
    optimizer = torch.optim.RMSprop(model.parameters(), lr=1.6192e-5, momentum=0.9)
    generator = torch.Generator().manual_seed(0)

    def training_step(weights: LossWeights):
        def step() -> None:
            index = torch.randint(0, len(image), (args.batch_size,), generator=generator).to(device)
            embeddings, logits = model({"image": image[index], "text": text[index]})
            loss = huse_loss(embeddings, logits, labels[index], class_distance, weights)["total"]
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return step

    fixed = {m: torch.nn.functional.normalize(torch.randn(args.batch_size, 512, device=device), dim=1).requires_grad_()
             for m in ("image", "text")}
    fixed_labels = labels[: args.batch_size]

    def graph_only() -> None:
        loss, _ = semantic_graph_loss([fixed["image"], fixed["text"]], fixed_labels, class_distance,
                                      LossWeights().margin, LossWeights().graph_variant)
        loss.backward()

    full = time_steps(training_step(LossWeights(1.0, 1.0, 1.0)), args.steps, device)
    no_graph = time_steps(training_step(LossWeights(1.0, 0.0, 1.0)), args.steps, device)
    graph = time_steps(graph_only, args.steps, device)
    print(f"device={device} batch={args.batch_size} features={tuple(image.shape[1:])}+{tuple(text.shape[1:])} "
          f"classes={args.classes} steps timed={args.steps}")
    print(f"full step          {1 / full:8.2f} steps/s  ({1000 * full:7.2f} ms)")
    print(f"without graph loss {1 / no_graph:8.2f} steps/s  ({1000 * no_graph:7.2f} ms)")
    print(f"graph loss alone   {1000 * graph:7.2f} ms (forward + backward on a {2 * args.batch_size}^2 pair matrix)")
    print(f"graph loss share of a step: {1 - no_graph / full:6.1%} (difference), {graph / full:6.1%} (alone / full)")
    print(f"paper schedule (250k steps) at this speed: {250_000 * full / 3600:.1f} h")


if __name__ == "__main__":
    main()
