"""Benchmark: exact chunked top-k (``helpers.evaluation.search.exact_topk``) vs ``faiss.IndexFlatIP``.

Prints the time ratio exact / FAISS (goal: <= 1.5x) and each method's peak extra memory,
on random L2-normalised float32 embeddings. Asserts nothing: it is a measurement.

How memory is measured (tracemalloc cannot see torch / FAISS buffers): each method runs in
its own fresh subprocess, which builds the data, runs a tiny warm-up search (so library
initialisation is in the baseline), then records

* ``ru_maxrss`` (the kernel's peak resident set size of the process) after the timed
  search, minus the RSS just before it: the search's extra peak, exact whenever the search
  set a new process peak (the data is generated in float32 so nothing earlier peaks
  higher; the output says if ru_maxrss did not grow, making the number an upper bound); and
* a psutil RSS sample every 5 ms during the search, minus the RSS just before it, as a
  cross-check (sampling can miss a short spike; ru_maxrss cannot).

Both numbers include the ``[Q, k]`` results and allocator slack, not only the score blocks.

    python benchmarks/bench_search.py                      # 20k x 100k x 256, k=20
    python benchmarks/bench_search.py --queries 2000 --gallery 10000 --dim 64
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def make_data(n: int, dim: int, seed: int) -> np.ndarray:
    """Random unit vectors, generated in float32 directly so no float64 copy inflates the
    baseline peak RSS."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, dim), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def worker(args: argparse.Namespace) -> None:
    """Run one method in this (fresh) process and print one JSON line of measurements."""
    import faiss  # noqa: F401  (imported by both workers, so both baselines include it)
    import torch

    from helpers.evaluation.search import exact_topk, faiss_topk

    query = make_data(args.queries, args.dim, seed=1)
    gallery = make_data(args.gallery, args.dim, seed=2)
    if args.worker == "exact":

        def search(q):
            return exact_topk(q, gallery, args.k, memory_budget_mb=args.budget_mb, matmul=args.matmul)
    else:

        def search(q):
            return faiss_topk(q, gallery, args.k)

    # Warm-up with 64 queries (FAISS switches to its BLAS path at >= 20): thread pools,
    # BLAS buffers and lazy imports then belong to the baseline, not to the search.
    search(query[:64])

    baseline_peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    baseline_rss = _rss_mb()
    samples: list[float] = []
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            samples.append(_rss_mb())
            time.sleep(0.005)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    scores, indices = search(query)
    elapsed = time.perf_counter() - t0
    done.set()
    sampler.join()
    peak_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    np.save(args.save, indices)
    print(
        json.dumps(
            {
                "method": args.worker,
                "seconds": elapsed,
                # Peak RSS during the search minus RSS at its start. Exact when the search set a new
                # process peak (ru_maxrss grew); otherwise only an upper bound (flagged).
                "ru_maxrss_extra_mb": peak_kb / 1024 - baseline_rss,
                "ru_maxrss_grew": peak_kb > baseline_peak_kb,
                "psutil_peak_delta_mb": max(samples, default=baseline_rss) - baseline_rss,
                "baseline_rss_mb": baseline_rss,
                "torch_threads": torch.get_num_threads(),
                "faiss_threads": __import__("faiss").omp_get_max_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=20_000)
    parser.add_argument("--gallery", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("-k", "--k", type=int, default=20)
    parser.add_argument("--budget-mb", type=float, default=256, help="exact_topk memory budget")
    parser.add_argument("--matmul", choices=["numpy", "torch"], default="numpy", help="exact_topk backend")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per method; min time kept")
    parser.add_argument("--worker", choices=["exact", "faiss"], help=argparse.SUPPRESS)
    parser.add_argument("--save", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(
        f"queries={args.queries} gallery={args.gallery} dim={args.dim} k={args.k} "
        f"budget={args.budget_mb} MiB, matmul={args.matmul}, cores={os.cpu_count()}"
    )
    full_mb = args.queries * args.gallery * 4 / 2**20
    print(f"(a full Q x G float32 score matrix would be {full_mb:,.0f} MiB)")
    parser_note = "min over" if args.repeats > 1 else "one run of"
    results: dict[str, dict] = {}
    times: dict[str, list[float]] = {"exact": [], "faiss": []}
    with tempfile.TemporaryDirectory() as tmp:
        # Methods alternate in fresh processes, so background load on a shared machine hits
        # both alike; with --repeats > 1 the minimum time of each is compared.
        for _ in range(args.repeats):
            for method in ("faiss", "exact"):
                save = os.path.join(tmp, f"{method}.npy")
                cmd = [
                    sys.executable,
                    __file__,
                    "--worker",
                    method,
                    "--save",
                    save,
                    "--queries",
                    str(args.queries),
                    "--gallery",
                    str(args.gallery),
                    "--dim",
                    str(args.dim),
                    "--k",
                    str(args.k),
                    "--budget-mb",
                    str(args.budget_mb),
                    "--matmul",
                    args.matmul,
                ]
                out = subprocess.run(cmd, check=True, capture_output=True, text=True, cwd=ROOT)
                r = json.loads(out.stdout.strip().splitlines()[-1])
                times[method].append(r["seconds"])
                if method not in results:  # memory of the first run
                    results[method] = r
                    results[method]["indices"] = np.load(save)
    for method in ("exact", "faiss"):
        r = results[method]
        r["seconds"] = min(times[method])
        flag = "" if r["ru_maxrss_grew"] else " (upper bound: no new peak)"
        print(
            f"{method:>6}: {r['seconds']:7.2f} s ({parser_note} {args.repeats}: "
            f"{', '.join(f'{t:.2f}' for t in times[method])})   peak extra RSS: ru_maxrss "
            f"{r['ru_maxrss_extra_mb']:7.1f} MiB{flag}, psutil {r['psutil_peak_delta_mb']:7.1f} MiB"
            f"   (baseline RSS {r['baseline_rss_mb']:.0f} MiB, torch threads {r['torch_threads']},"
            f" faiss threads {r['faiss_threads']})"
        )
    agree = float((results["exact"]["indices"] == results["faiss"]["indices"]).mean())
    print(f"index agreement exact vs faiss: {agree:.6f} (differences only from float rounding near ties)")
    ratio = results["exact"]["seconds"] / results["faiss"]["seconds"]
    print(f"ratio exact_topk / faiss IndexFlatIP time: {ratio:.2f}x (goal <= 1.5x)")


if __name__ == "__main__":
    main()
