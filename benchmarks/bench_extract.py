"""Where the time goes from a JPEG on disk to a cached softmax row, stage by stage and end to end, and whether a
faster path stores the same numbers as the exact one.

On the same images, in one run:

* **read**: the files' bytes (page cache warm after the first pass: the best case);
* **decode**: ``--decode pil`` PIL in full (the exact path), ``pil_draft`` PIL at the JPEG's reduced DCT scale, or
  ``torchvision`` ``decode_jpeg`` on the device in batches (nvJPEG on a GPU);
* **preprocess**: resize, centre crop, normalise: the classifier's PIL transform, or
  ``ImagePreprocess.from_uint8`` on the device for ``torchvision``;
* **copy**: host-to-device copy of preprocessed batches (pinned on CUDA; a no-op on CPU);
* **forward**: the extraction encoder on batches already on the device (channels_last in float32, ``--autocast``),
  softmax and float16 rows back on the host included;
* **forward before**: the forward as it was before (contiguous, float32, no autocast), the reference;
* **cache write**: one shard of float16 softmax rows written atomically;
* **end to end**: ``extract.cached_outputs("probs", ...)`` into an empty cache with ``--num-workers`` DataLoader
  workers (default: the cores beyond the forward's threads on a CPU, all but one with a GPU).

Printed: images per second per stage (the forwards and end to end: ``--repeats`` rounds of the three in turn, the
median and each round), end to end / forward and forward / forward before (per round, then the median), the
end-to-end rows against the reference path's (PIL in full, forward before: max |difference|, share of float16
values that differ, top-1 agreement) and the wall time projected for the ImageNet-21K test sets at the end-to-end
rate. Inputs: the ImageNet sample photos (``$ZSL_IMAGENET_SAMPLE``, else ``data/raw/imagenet_sample``), as stored
or resized with ``--size``.

    python benchmarks/bench_extract.py --images 256
    python benchmarks/bench_extract.py --images 256 --size 500x375 --threads 1
    python benchmarks/bench_extract.py --gpu --size 500x375 --images 1000     # the GPU run
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
from torchvision.io import ImageReadMode, decode_jpeg

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsl_utils.atomic import write_atomically  # noqa: E402
from zsl_utils.classifiers import load_classifier  # noqa: E402
from zsl_utils.data.images import imagenet_sample_photos, load_image_rgb  # noqa: E402
from zsl_utils.device import pick_device  # noqa: E402
from zsl_utils.extract import DECODERS, cached_outputs, make_encoder  # noqa: E402

# Approximate image counts, for the projection only (the figures; the test sets are defined in conse.imagenet).
TEST_SET_IMAGES = {"2-hop": 1.5e6, "all": 13e6}


def timed(function) -> tuple[float, object]:
    started = time.perf_counter()
    value = function()
    return time.perf_counter() - started, value


def resized_copies(paths: list[str], folder: Path, size: tuple[int, int]) -> list[str]:
    """The photos resized to ``size`` (bicubic, JPEG quality 90), written once."""
    copies = []
    for path in paths:
        target = folder / Path(path).name
        Image.open(path).convert("RGB").resize(size, Image.Resampling.BICUBIC).save(target, quality=90)
        copies.append(str(target))
    return copies


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def in_batches(values: list, batch_size: int) -> list[list]:
    return [values[i : i + batch_size] for i in range(0, len(values), batch_size)]


def decode_and_preprocess(raw: list[bytes], classifier, decode: str, device: torch.device,
                          batch_size: int) -> tuple[dict[str, float], list[torch.Tensor]]:
    """Seconds of the decode and preprocess stages, and the preprocessed batches (on the device for torchvision)."""
    if decode == "torchvision":
        encoded = [torch.frombuffer(bytearray(b), dtype=torch.uint8) for b in raw]
        seconds, images = timed(lambda: [image for part in in_batches(encoded, batch_size) for image in
                                         decode_jpeg(part, mode=ImageReadMode.RGB, device=device)])
        synchronize(device)
        times = {"decode": seconds}
        seconds, tensors = timed(lambda: [classifier.preprocess.from_uint8(image) for image in images])
        synchronize(device)
    else:
        draft = classifier.preprocess.resize_size if decode == "pil_draft" else None
        seconds, images = timed(lambda: [load_image_rgb(io.BytesIO(b), draft) for b in raw])
        times = {"decode": seconds}
        seconds, tensors = timed(lambda: [classifier.preprocess(image) for image in images])
    times["preprocess"] = seconds
    return times, [torch.stack(part) for part in in_batches(tensors, batch_size)]


def stage_rates(paths: list[str], classifier, encoder, decode: str, device: torch.device, batch_size: int,
                end_to_end, repeats: int) -> tuple[dict[str, float], dict[str, list[float]], np.ndarray, np.ndarray]:
    """Images per second of each stage alone; the forwards and ``end_to_end`` (a callable returning the cached
    rows) timed ``repeats`` times in turn (rates per repeat, so that ratios pair timings of the same minute); the
    end-to-end rows and the reference path's."""
    n = len(paths)
    seconds, raw = timed(lambda: [Path(p).read_bytes() for p in paths])
    times, batches = decode_and_preprocess(raw, classifier, decode, device, batch_size)
    times["read"] = seconds
    if decode != "pil":  # the reference rows start from PIL's full decode
        _, exact = decode_and_preprocess(raw, classifier, "pil", device, batch_size)
    batches = [b.cpu().pin_memory() if device.type == "cuda" else b for b in batches]
    synchronize(device)
    times["copy"], on_device = timed(lambda: [b.to(device, non_blocking=True) for b in batches])
    synchronize(device)
    reference = exact if decode != "pil" else on_device
    encoder(on_device[0])  # warm-up: kernels, allocator
    with torch.inference_mode():
        classifier.model(reference[0].to(device))
    synchronize(device)
    repeated: dict[str, list[float]] = {"forward": [], "forward before": [], "end to end": []}
    for _ in range(repeats):
        seconds, rows = timed(lambda: [encoder(b)["probs"] for b in on_device])
        repeated["forward"].append(n / seconds)
        with torch.inference_mode():
            seconds, before = timed(
                lambda: [classifier.model(b.to(device)).softmax(dim=1).float().cpu() for b in reference])
        repeated["forward before"].append(n / seconds)
        seconds, cached = timed(end_to_end)
        repeated["end to end"].append(n / seconds)
    rows = np.concatenate(rows)
    with tempfile.TemporaryDirectory() as folder:
        times["cache write"], _ = timed(lambda: write_atomically(Path(folder) / "shard.npz",
                                                                 lambda handle: np.savez(handle, probs=rows)))
    rates = {stage: n / times[stage] for stage in ("read", "decode", "preprocess", "copy", "cache write")}
    return rates, repeated, cached, torch.cat(before).numpy().astype(np.float16)


def default_workers(device: torch.device) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(0, cores - 1) if device.type == "cuda" else max(0, cores - torch.get_num_threads())


def compare(rows: np.ndarray, reference: np.ndarray) -> str:
    a, b = rows.astype(np.float32), reference.astype(np.float32)
    return (f"max |difference| {np.abs(a - b).max():.2e}, {np.mean(rows != reference):.3%} of float16 values differ, "
            f"top-1 agrees on {np.mean(a.argmax(1) == b.argmax(1)):.1%} of {len(a)} photos")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=256, help="how many of the sample photos")
    parser.add_argument("--size", help="resize the photos first, e.g. 500x375 (ImageNet's average) or 1024x768")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", default="pil", choices=DECODERS)
    parser.add_argument("--autocast", choices=("bfloat16", "float16"), help="mixed precision (CUDA only)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, help="torch threads of the forward (default: torch's)")
    parser.add_argument("--num-workers", type=int, help="DataLoader workers on the end-to-end path")
    parser.add_argument("--repeats", type=int, default=3, help="timings of the forwards and of end to end (median)")
    parser.add_argument("--gpu", action="store_true", help="the GPU path: --device cuda --decode torchvision "
                        "--autocast bfloat16, and --batch-size 256 unless given")
    args = parser.parse_args()
    if args.gpu:
        args.device, args.decode, args.autocast = "cuda", "torchvision", "bfloat16"
        args.batch_size = 256 if args.batch_size == parser.get_default("batch_size") else args.batch_size
    if args.threads:
        torch.set_num_threads(args.threads)
    root = os.environ.get("ZSL_IMAGENET_SAMPLE")
    paths = imagenet_sample_photos(root or None)["path"].tolist()[: args.images]
    device = pick_device(args.device)
    workers = default_workers(device) if args.num_workers is None else args.num_workers
    classifier = load_classifier("efficientnet_lite0", device=device)
    settings = {"autocast_dtype": args.autocast, "decode": args.decode}
    encoder = make_encoder("probs", classifier, autocast_dtype=args.autocast)  # forward only: tensors in
    with tempfile.TemporaryDirectory() as folder:
        if args.size:
            paths = resized_copies(paths, Path(folder), tuple(int(n) for n in args.size.lower().split("x")))
        caches = iter(range(args.repeats))

        def end_to_end() -> np.ndarray:  # into an empty cache each time
            return cached_outputs("probs", paths, classifier, dataset_id="bench", cache_root=Path(folder) /
                                  f"cache{next(caches)}", batch_size=args.batch_size, num_workers=workers,
                                  progress=False, **settings).load()

        rates, repeated, rows, reference = stage_rates(paths, classifier, encoder, args.decode, device,
                                                       args.batch_size, end_to_end, args.repeats)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {os.cpu_count()} cores"
    print(f"{len(paths)} photos ({args.size or 'as stored'}), decode {args.decode}, autocast {args.autocast}, "
          f"batch {args.batch_size}, {workers} loader workers, {torch.get_num_threads()} torch threads, {name}")
    for stage, rate in rates.items():
        print(f"{stage:>14}: {rate:10,.1f} img/s")
    for stage, values in repeated.items():
        each = ", ".join(f"{v:,.1f}" for v in values)
        print(f"{stage:>14}: {np.median(values):10,.1f} img/s (median of {len(values)}: {each})")
    ratios = {"end to end / forward": np.divide(repeated["end to end"], repeated["forward"]),
              "forward / forward before": np.divide(repeated["forward"], repeated["forward before"])}
    for name, values in ratios.items():
        print(f"{name}: {np.median(values):.2f} (per repeat: {', '.join(f'{v:.2f}' for v in values)})")
    alone = {**rates, "forward": np.median(repeated["forward"])}
    print(f"slowest single stage: {min(alone, key=alone.get)}")
    print(f"end-to-end rows vs the reference path (PIL in full, forward before): {compare(rows, reference)}")
    print("projected at the end-to-end rate: " + ", ".join(
        f"{test_set} (~{count / 1e6:g} M images) {count / np.median(repeated['end to end']) / 3600:,.1f} h"
        for test_set, count in TEST_SET_IMAGES.items()))


if __name__ == "__main__":
    main()
