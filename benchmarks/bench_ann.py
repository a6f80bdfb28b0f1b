"""Benchmark: every gallery index kind of ``helpers.evaluation.ann`` on a synthetic 1M × 256 gallery.

For each kind (exact, ivf_flat, ivf_pq, hnsw) it prints build time, memory, per-query
latency (one batch of queries, and queries one at a time) and recall@10 against exact
search. Asserts nothing: it is a measurement.

Data: clustered unit vectors (``--centres`` random unit centres, each vector a centre plus
Gaussian noise of norm ≈ ``--noise``, re-normalised), generated chunk by chunk straight into
a memory-mapped ``.npy`` in a temporary folder (1 GiB at 1M × 256), so the generator never
holds the gallery in memory. Queries are fresh draws from the same mixture (not gallery rows).

Method: the exact kind runs first, in its own process, and its top-10 of the queries is the
ground truth for every other kind's recall. Each kind then runs in a fresh subprocess that
memory-maps the gallery (mode ``r``), so its memory numbers are its own:

* ``peak RSS``: the process's ``ru_maxrss`` (kernel peak resident set), which also counts
  the gallery's memory-mapped pages that were read (page cache, up to 1 GiB, reclaimable);
* ``peak anon``: the peak of ``RssAnon`` (/proc/self/status) sampled every 20 ms: the
  process's own allocations (index structures, buffers), what grows with the gallery when
  the index is held in memory. Sampling can miss a spike shorter than 20 ms.
  ``(Δ)`` is that peak minus the anon RSS after the imports (torch, faiss), before building.
* ``index file``: the bytes ``faiss.write_index`` writes (what a saved index folder holds
  besides ``embeddings.npy``; 0 for exact, which searches the embeddings).

Latency: ``batch`` = one ``search`` call with all queries, divided by their number;
``single`` = the median of one ``search`` call per query (``--single`` of them).

    python benchmarks/bench_ann.py                        # 1M × 256, 200 queries
    python benchmarks/bench_ann.py --n 100000 --kinds ivf_flat,hnsw
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

CHUNK = 65_536


def unit_rows(rng: np.random.Generator, centres: np.ndarray, n: int, noise: float) -> np.ndarray:
    dim = centres.shape[1]
    x = centres[rng.integers(0, len(centres), n)]
    x += rng.standard_normal((n, dim), dtype=np.float32) * np.float32(noise / np.sqrt(dim))
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def generate(
    path: Path, query_path: Path, n: int, dim: int, n_queries: int, n_centres: int, noise: float, seed: int
) -> None:
    """Gallery memmap + queries, chunk by chunk (memory: one chunk, 64 MiB at dim 256)."""
    from numpy.lib.format import open_memmap

    from helpers.core.progress import progress_bar

    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_centres, dim), dtype=np.float32)
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    gallery = open_memmap(path, mode="w+", dtype=np.float32, shape=(n, dim))
    for start in progress_bar(range(0, n, CHUNK), desc="generating gallery", unit="chunk", mininterval=2.0):
        stop = min(start + CHUNK, n)
        gallery[start:stop] = unit_rows(rng, centres, stop - start, noise)
    gallery.flush()
    del gallery
    np.save(query_path, unit_rows(rng, centres, n_queries, noise))


def _anon_mb() -> float:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def worker(args: argparse.Namespace) -> None:
    """One kind in this fresh process; prints one JSON line."""
    import faiss

    import helpers.evaluation.search  # noqa: F401  (torch and the exact search: imported before the baseline)
    from helpers.evaluation.ann import AnnIndex, AnnParams, recall_at_k

    gallery = np.load(args.gallery_file, mmap_mode="r")
    queries = np.load(args.query_file)
    params = AnnParams(
        args.worker,
        nlist=args.nlist,
        nprobe=args.nprobe,
        m=args.m,
        nbits=args.nbits,
        hnsw_m=args.hnsw_m,
        ef_construction=args.ef_construction,
        ef_search=args.ef_search,
        seed=args.seed,
    )
    peak_anon = [_anon_mb()]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak_anon[0] = max(peak_anon[0], _anon_mb())
            time.sleep(0.02)

    baseline_anon = _anon_mb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    t0 = time.perf_counter()
    index = AnnIndex.build(
        gallery, params, exact_search=helpers.evaluation.search.exact_topk, n_recall=0, progress=False
    )
    build_s = time.perf_counter() - t0

    index.search(queries[:2], 10)  # warm-up: lazy allocations, thread pools
    t0 = time.perf_counter()
    _, found = index.search(queries, 10)
    batch_s = time.perf_counter() - t0
    single = []
    for q in queries[: args.single]:
        t0 = time.perf_counter()
        index.search(q[None, :], 10)
        single.append(time.perf_counter() - t0)
    done.set()
    sampler.join()

    if args.worker == "exact":
        np.save(args.truth_file, found)
        recall = 1.0
    else:
        recall = recall_at_k(found, np.load(args.truth_file), 10)
    file_bytes = 0
    if index.index is not None:
        saved = index.save(Path(args.truth_file).with_name(f"{args.worker}.faiss"))
        file_bytes = saved.stat().st_size
        saved.unlink()
    print(
        json.dumps(
            {
                "kind": args.worker,
                "params": index.meta,
                "build_s": build_s,
                "batch_ms_per_query": 1000 * batch_s / len(queries),
                "single_ms_median": 1000 * float(np.median(single)),
                "n_single": len(single),
                "recall_at_10": recall,
                "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                "peak_anon_mb": peak_anon[0],
                "baseline_anon_mb": baseline_anon,
                "index_file_mb": file_bytes / 2**20,
                "faiss_threads": faiss.omp_get_max_threads(),
            }
        )
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=1_000_000, help="gallery vectors")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--single", type=int, default=20, help="queries timed one at a time")
    parser.add_argument("--centres", type=int, default=10_000)
    parser.add_argument("--noise", type=float, default=0.6)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--kinds", default="exact,ivf_flat,ivf_pq,hnsw")
    parser.add_argument(
        "--nlist", type=int, default=None, help="IVF lists (default: helpers.evaluation.ann's, 1024 at 1M)"
    )
    parser.add_argument("--nprobe", type=int, default=16)
    parser.add_argument("--m", type=int, default=32, help="IVF-PQ sub-quantizers")
    parser.add_argument("--nbits", type=int, default=8)
    # HNSW's build is the slowest step here (its cost grows with M · efConstruction): 12 / 32
    # keep the whole benchmark near 10 minutes on 2 cores (16 / 40 took 925 s alone under load).
    parser.add_argument("--hnsw-m", type=int, default=12)
    parser.add_argument("--ef-construction", type=int, default=32)
    parser.add_argument("--ef-search", type=int, default=64)
    parser.add_argument("--workdir", help="keep the generated data here (default: a temporary folder)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--gallery-file", help=argparse.SUPPRESS)
    parser.add_argument("--query-file", help=argparse.SUPPRESS)
    parser.add_argument("--truth-file", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    from helpers.evaluation.ann import KINDS

    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        sys.exit(f"error: unknown kind(s) {', '.join(unknown)}; choose from {', '.join(KINDS)}")
    if "exact" not in kinds:
        kinds.insert(0, "exact")  # the ground truth for every recall
    kinds.sort(key=lambda k: k != "exact")
    started = time.perf_counter()
    print(
        f"gallery {args.n:,} × {args.dim} float32 ({args.n * args.dim * 4 / 2**30:.2f} GiB, memory-mapped), "
        f"{args.queries} queries, {args.centres} centres, noise {args.noise}, seed {args.seed}, "
        f"cores {os.cpu_count()}"
    )
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        tmp = Path(tmp)
        gallery_file, query_file, truth_file = tmp / "gallery.npy", tmp / "queries.npy", tmp / "truth.npy"
        t0 = time.perf_counter()
        generate(gallery_file, query_file, args.n, args.dim, args.queries, args.centres, args.noise, args.seed)
        print(f"generated in {time.perf_counter() - t0:.1f} s")
        rows = []
        for kind in kinds:
            cmd = [
                sys.executable,
                __file__,
                "--worker",
                kind,
                "--gallery-file",
                str(gallery_file),
                "--query-file",
                str(query_file),
                "--truth-file",
                str(truth_file),
                "--single",
                str(args.single),
                "--nprobe",
                str(args.nprobe),
                "--m",
                str(args.m),
                "--nbits",
                str(args.nbits),
                "--hnsw-m",
                str(args.hnsw_m),
                "--ef-construction",
                str(args.ef_construction),
                "--ef-search",
                str(args.ef_search),
                "--seed",
                str(args.seed),
            ]
            if args.nlist is not None:
                cmd += ["--nlist", str(args.nlist)]
            out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
            if out.returncode:
                sys.exit(f"error: {kind} worker failed:\n{out.stderr[-2000:]}")
            row = json.loads(out.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(f"  {kind}: done ({row['build_s']:.1f} s build)", flush=True)

    print()
    print(
        "| kind | parameters | build s | peak RSS MiB | peak anon MiB (Δ) | index file MiB | batch ms/query "
        "| single ms (median) | recall@10 vs exact |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        p = r["params"]
        shown = {
            k: p[k]
            for k in ("nlist", "nprobe", "m", "nbits", "train_size", "hnsw_m", "ef_construction", "ef_search")
            if k in p
        }
        described = ", ".join(f"{k}={v}" for k, v in shown.items()) or "exact_topk (chunked)"
        print(
            f"| {r['kind']} | {described} | {r['build_s']:.1f} | {r['peak_rss_mb']:.0f} | {r['peak_anon_mb']:.0f} ({r['peak_anon_mb'] - r['baseline_anon_mb']:+.0f}) "
            f"| {r['index_file_mb']:.0f} | {r['batch_ms_per_query']:.3f} | {r['single_ms_median']:.2f} "
            f"| {r['recall_at_10']:.3f} |"
        )
    print(
        f"\n{args.queries} queries in the batch, {rows[0]['n_single']} timed singly; faiss threads "
        f"{rows[0]['faiss_threads']}; total wall time {time.perf_counter() - started:.0f} s"
    )


if __name__ == "__main__":
    main()
