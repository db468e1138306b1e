"""Extraction throughput on 1 and 2 processes, and the cost of the shard bookkeeping.

Measured side by side in one run, on one synthetic image folder, with the same
classifier and batch size:

* ``plain loop``: load, preprocess, forward and softmax in a Python loop, outputs kept
  in a list (no cache, no skipping, no files) -- the floor.
* ``in-process``: :func:`zsl_utils.scale.extract.extract` with ``processes=1`` (sharded
  cache, atomic fsync-ed shards, skipped-file bookkeeping, final verification).
* ``torchrun xN``: the same through ``torchrun`` with N Gloo processes.

Every variant runs ``--threads`` CPU threads per process (default 1), so ``torchrun x2``
uses twice the cores of ``torchrun x1`` and their ratio is the scaling.

Images per second use the extraction time of the slowest rank (model loading and
process start-up excluded); the wall column includes them. Run from the repository
root: ``.venv/bin/python benchmarks/bench_distributed.py [--n-images 256]``.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsl_utils.classifiers import load_classifier  # noqa: E402
from zsl_utils.scale.extract import ExtractionSpec, extract, list_image_files, run_distributed_extraction  # noqa: E402
from zsl_utils.extract import image_loader  # noqa: E402


def make_images(folder: Path, n_images: int, size: tuple[int, int] = (256, 192)) -> list[str]:
    """Smooth random JPEGs (noise would make JPEG decoding unrealistically slow)."""
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n_images):
        small = rng.integers(0, 255, (6, 8, 3), dtype=np.uint8)
        Image.fromarray(small).resize(size, Image.BILINEAR).save(folder / f"img_{i:05d}.jpg", quality=90)
    return list_image_files(folder)


@torch.inference_mode()
def plain_loop(classifier, paths: list[str], batch_size: int) -> float:
    """Seconds for the bare load-forward-softmax loop over ``paths``."""
    loader = image_loader(classifier.preprocess)
    began = time.perf_counter()
    outputs = []
    for start in range(0, len(paths), batch_size):
        batch = torch.stack([loader(p) for p in paths[start : start + batch_size]])
        outputs.append(torch.softmax(classifier.model(batch).float(), dim=1).numpy().astype(np.float16))
    np.concatenate(outputs)
    return time.perf_counter() - began


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n-images", type=int, default=256)
    parser.add_argument("--classifier", default="efficientnet_lite0")
    parser.add_argument("--weights", help="local weights file for --classifier (e.g. a timm test model)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--shard-size", type=int, default=64)
    parser.add_argument("--processes", default="1,2", help="comma-separated torchrun process counts")
    parser.add_argument("--repeats", type=int, default=3, help="alternating repeats of the two in-process variants")
    parser.add_argument("--threads", type=int, default=1,
                        help="CPU threads per process, every variant (1: torchrun xN then uses N cores, x1 one)")
    args = parser.parse_args()
    # Same threads per process everywhere, so that 1 -> 2 processes measures scaling and not
    # OpenMP's behaviour under oversubscription; torchrun workers inherit the variable.
    os.environ["OMP_NUM_THREADS"] = str(args.threads)
    torch.set_num_threads(args.threads)
    work = Path(tempfile.mkdtemp(prefix="bench_distributed_"))
    try:
        paths = make_images(work / "images", args.n_images)
        classifier = load_classifier(args.classifier, weights=args.weights, device="cpu")
        plain_loop(classifier, paths[: args.batch_size], args.batch_size)  # warm-up
        threads = torch.get_num_threads()

        def spec(name: str) -> ExtractionSpec:
            return ExtractionSpec("probs", str(work / name), images_root=str(work / "images"),
                                  classifier=args.classifier, weights=args.weights, batch_size=args.batch_size,
                                  shard_size=args.shard_size, num_workers=0, device="cpu")

        # Alternate the two in-process variants and keep each one's best time, so that a
        # burst of load from other jobs does not decide the bookkeeping overhead.
        plain_times, sharded_times, sharded_walls = [], [], []
        for repeat in range(args.repeats):
            plain_times.append(plain_loop(classifier, paths, args.batch_size))
            began = time.perf_counter()
            summary = extract(spec(f"in_process_{repeat}"), processes=1, progress=False)
            sharded_walls.append(time.perf_counter() - began)
            sharded_times.append(_extract_seconds(summary))
        plain_s = min(plain_times)
        rows = [
            {"method": "plain loop", "threads_per_process": threads, "wall_s": plain_s, "extract_s": plain_s},
            {"method": "in-process (1 process)", "threads_per_process": threads, "wall_s": min(sharded_walls),
             "extract_s": min(sharded_times)},
        ]
        for nproc in (int(p) for p in args.processes.split(",")):
            began = time.perf_counter()
            summary = run_distributed_extraction(nproc, spec(f"torchrun_{nproc}"))
            rows.append({"method": f"torchrun x{nproc}", "threads_per_process": threads,
                         "wall_s": time.perf_counter() - began,
                         "extract_s": _extract_seconds(summary)})
        table = pd.DataFrame(rows)
        table["images_per_s"] = args.n_images / table["extract_s"]
        table["vs_plain_loop"] = table["extract_s"] / plain_s
        print(f"{args.n_images} images, {args.classifier}, batch {args.batch_size}, shard {args.shard_size}, "
              f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} (other jobs skew timings)")
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3f}"))
        overhead = table.loc[1, "extract_s"] / plain_s - 1
        print(f"shard bookkeeping overhead (in-process vs plain loop): {overhead:+.1%}")
        print(f"scaling 1 -> 2 processes: x{table.loc[2, 'extract_s'] / table.loc[3, 'extract_s']:.2f} images/s"
              if len(table) >= 4 else "")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _extract_seconds(summary) -> float:
    """Extraction time of the slowest rank, from the per-rank reports kept in the summary."""
    return max(summary.extract_seconds_per_rank.values())


if __name__ == "__main__":
    main()
