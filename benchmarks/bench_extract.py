"""Where the time goes from a JPEG on disk to a cached softmax row: each stage alone, and the whole path.

On the same images, in one run:

* **read**: the file's bytes from disk (page cache warm after the first pass: this is the best case);
* **decode**: ``PIL.Image.open(...).convert("RGB")`` from those bytes, as ``data.images.load_image_rgb`` does;
* **preprocess**: resize, centre crop, normalise (the classifier's own transform) on decoded images;
* **copy**: host-to-device copy of preprocessed batches (pinned memory on CUDA; a no-op on CPU);
* **forward**: the classifier on preprocessed batches already on the device, ``torch.inference_mode``;
* **cache write**: one shard of float16 softmax rows written atomically;
* **end to end**: ``extract.cached_outputs("probs", ...)`` into an empty cache, with ``--num-workers`` DataLoader
  workers, which overlaps decoding and preprocessing with the forward when there are spare cores.

Reported: images per second per stage, and the ratio end-to-end / forward-only. Inputs: the ImageNet sample photos
(``$ZSL_IMAGENET_SAMPLE``, else ``data/raw/imagenet_sample``; shorter side 256 px in the development copy) and,
with ``--full-size``, the same photos upscaled to 500 x 375 px (about ImageNet's average), written once to a
temporary folder.

    python benchmarks/bench_extract.py --images 256
    python benchmarks/bench_extract.py --images 1000 --full-size --num-workers 2
    python benchmarks/bench_extract.py --device cuda --batch-size 256 --num-workers 8   # the GPU run
"""
from __future__ import annotations

import argparse
import io
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsl_utils.atomic import write_atomically  # noqa: E402
from zsl_utils.classifiers import load_classifier  # noqa: E402
from zsl_utils.data.images import imagenet_sample_photos  # noqa: E402
from zsl_utils.device import pick_device  # noqa: E402
from zsl_utils.extract import cached_outputs  # noqa: E402


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def full_size_copies(paths: list[str], folder: Path) -> list[str]:
    """The photos upscaled to 500 x 375 (bicubic, JPEG quality 90): ImageNet-sized inputs."""
    copies = []
    for path in paths:
        target = folder / Path(path).name
        Image.open(path).convert("RGB").resize((500, 375), Image.Resampling.BICUBIC).save(target, quality=90)
        copies.append(str(target))
    return copies


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stage_rates(paths: list[str], classifier, device: torch.device, batch_size: int) -> dict[str, float]:
    """Images per second of each stage alone, on ``paths``."""
    n = len(paths)
    seconds, raw = timed(lambda: [Path(p).read_bytes() for p in paths])
    rates = {"read": n / seconds}
    seconds, images = timed(lambda: [Image.open(io.BytesIO(b)).convert("RGB") for b in raw])
    rates["decode"] = n / seconds
    seconds, tensors = timed(lambda: [classifier.preprocess(image) for image in images])
    rates["preprocess"] = n / seconds
    batches = [torch.stack(tensors[i : i + batch_size]) for i in range(0, n, batch_size)]
    if device.type == "cuda":
        batches = [b.pin_memory() for b in batches]
    synchronize(device)
    seconds, on_device = timed(lambda: [b.to(device, non_blocking=True) for b in batches])
    synchronize(device)
    rates["copy"] = n / seconds
    with torch.inference_mode():
        classifier.model(on_device[0])  # warm-up: kernels, allocator
        synchronize(device)
        started = time.perf_counter()
        probs = [classifier.model(b).softmax(dim=1).cpu() for b in on_device]
        synchronize(device)
    rates["forward"] = n / (time.perf_counter() - started)
    rows = torch.cat(probs).numpy().astype(np.float16)
    with tempfile.TemporaryDirectory() as folder:
        seconds, _ = timed(lambda: write_atomically(Path(folder) / "shard.npz",
                                                    lambda handle: np.savez(handle, probs=rows)))
    rates["cache write"] = n / seconds
    return rates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="how many of the sample photos")
    parser.add_argument("--full-size", action="store_true", help="upscale them to 500 x 375 first")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--num-workers", type=int, default=0, help="DataLoader workers on the end-to-end path")
    args = parser.parse_args()
    root = os.environ.get("ZSL_IMAGENET_SAMPLE")
    paths = imagenet_sample_photos(root or None)["path"].tolist()[: args.images]
    device = pick_device(args.device)
    classifier = load_classifier("efficientnet_lite0", device=device)
    with tempfile.TemporaryDirectory() as folder:
        if args.full_size:
            paths = full_size_copies(paths, Path(folder))
        rates = stage_rates(paths, classifier, device, args.batch_size)
        seconds, _ = timed(lambda: cached_outputs("probs", paths, classifier, dataset_id="bench", cache_root=folder,
                                                  batch_size=args.batch_size, num_workers=args.num_workers,
                                                  progress=False))
        rates["end to end"] = len(paths) / seconds
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{len(paths)} photos ({'500 x 375' if args.full_size else 'as stored'}), batch {args.batch_size}, "
          f"{args.num_workers} loader workers, {torch.get_num_threads()} torch threads, {name}")
    for stage, rate in rates.items():
        print(f"{stage:>12}: {rate:10,.1f} img/s")
    slowest = min((s for s in rates if s != "end to end"), key=rates.get)
    print(f"end to end / forward only: {rates['end to end'] / rates['forward']:.2f}; slowest single stage: {slowest}")


if __name__ == "__main__":
    main()
