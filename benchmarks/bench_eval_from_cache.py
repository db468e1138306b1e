"""Benchmark: ConSE evaluation from cached classifier outputs over the 20,842 candidates.

For each size N (default 10^4 and 10^5 images) a child process
1. writes N synthetic softmax rows (1,000 classes, float16, shards of 1,024) to a
   temporary ShardedCache, with true labels drawn from the 20,842 candidates;
2. evaluates ConSE(1), ConSE(10) and ConSE(1000) on the "all" test set, zero-shot and
   generalised (+1K), flat hit@k and hierarchical precision@k, streaming shard by shard;
3. reports evaluation images/s and its peak resident memory (ru_maxrss).

Memory should stay flat from 10^4 to 10^5 images (everything is streamed); the first
evaluation of a label also builds its hp@k rings, which grows with the number of
*distinct* labels (at most 20,842), not with N. The parent process then measures the
classifier's forward pass (EfficientNet-Lite0, synthetic 224x224 batches, no JPEG
decoding: a lower bound on the cost of recomputing outputs) and prints the ratio.

    .venv/bin/python benchmarks/bench_eval_from_cache.py            # 10^4 and 10^5
    .venv/bin/python benchmarks/bench_eval_from_cache.py --sizes 2000 20000
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from zsl_utils.cache import ShardedCache  # noqa: E402
from zsl_utils.classifiers import load_classifier  # noqa: E402
from zsl_utils.conse import imagenet  # noqa: E402
from zsl_utils.data.wnids import wnid_lemmas  # noqa: E402
from zsl_utils.semantic import label_embeddings, load_word_vectors  # noqa: E402

T_VALUES = (1, 10, 1000)


def _synthetic_probs(rng: np.random.Generator, n: int) -> np.ndarray:
    """Peaked softmax rows, like a trained classifier's: logits with a few large entries."""
    logits = rng.normal(0, 1, size=(n, 1000)).astype(np.float32)
    logits[np.arange(n)[:, None], rng.integers(0, 1000, size=(n, 3))] += rng.uniform(3, 8, size=(n, 3))
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    return (probs / probs.sum(axis=1, keepdims=True)).astype(np.float16)


def child(n_images: int, batch_size: int) -> dict:
    """Fill a cache with ``n_images`` rows and time one evaluation; return the measurements."""
    rng = np.random.default_rng(0)
    hierarchy = imagenet.wordnet_hierarchy()
    label_sets = imagenet.build_label_sets(hierarchy)
    words = load_word_vectors()
    train = label_embeddings(words, wnid_lemmas(label_sets.training), on_missing="ignore")
    labels = label_embeddings(words, wnid_lemmas(label_sets.training + label_sets.candidates), on_missing="ignore")
    tasks = imagenet.paper_tasks(label_sets, names=("all",))
    true = rng.choice(label_sets.candidates, size=n_images).tolist()
    with tempfile.TemporaryDirectory() as folder:
        cache = ShardedCache(folder, {"bench": n_images}, n_images, shard_size=1024)
        started = time.perf_counter()
        for shard in cache.missing_shards():
            start, stop = cache.shard_bounds(shard)
            cache.write_shard(shard, probs=_synthetic_probs(rng, stop - start), ok=np.ones(stop - start, bool))
        write_s = time.perf_counter() - started
        rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        started = time.perf_counter()
        result = imagenet.evaluate_conse(cache, true, train, labels, tasks, T_values=T_VALUES,
                                         hierarchy=hierarchy, batch_size=batch_size, progress=False)
        eval_s = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"images": n_images, "write_s": write_s, "eval_s": eval_s,
            "eval_images_per_s": n_images / eval_s, "peak_rss_mib": peak_kib / 1024,
            "rss_before_eval_mib": rss_before / 1024, "hit@1_all_T10": float(result.table.iloc[1]["hit@1"])}


def classifier_images_per_s(batch_size: int = 32, batches: int = 4) -> float:
    """EfficientNet-Lite0 forward passes per second on CPU (synthetic inputs, no decoding)."""
    classifier = load_classifier("efficientnet_lite0", device=torch.device("cpu"))
    batch = torch.randn(batch_size, 3, 224, 224)
    classifier.probabilities(batch)  # warm-up
    started = time.perf_counter()
    for _ in range(batches):
        classifier.probabilities(batch)
    return batch_size * batches / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=4096, help="rows ranked at once")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.batch_size)))
        return
    rows = []
    for n in args.sizes:  # one process per size, so each peak-memory figure is its own
        output = subprocess.run([sys.executable, __file__, "--child", str(n), "--batch-size", str(args.batch_size)],
                                capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"N={n:>7,}: evaluation {rows[-1]['eval_s']:.1f} s = {rows[-1]['eval_images_per_s']:,.0f} images/s "
              f"(3 T x zero-shot and +1K, hit@k and hp@k), peak RSS {rows[-1]['peak_rss_mib']:,.0f} MiB "
              f"(before evaluation {rows[-1]['rss_before_eval_mib']:,.0f} MiB); cache written in {rows[-1]['write_s']:.1f} s",
              flush=True)
    forward = classifier_images_per_s()
    print(f"classifier forward pass (EfficientNet-Lite0, CPU, no decoding): {forward:,.1f} images/s")
    first, last = rows[0], rows[-1]
    print(f"peak memory ratio N={last['images']:,} / N={first['images']:,}: "
          f"{last['peak_rss_mib'] / first['peak_rss_mib']:.2f} for {last['images'] / first['images']:.0f}x the images")
    for row in rows:
        print(f"N={row['images']:>7,}: evaluating from cache is {row['eval_images_per_s'] / forward:,.0f}x faster "
              f"than recomputing the classifier outputs")


if __name__ == "__main__":
    main()
