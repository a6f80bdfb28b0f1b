"""onnxruntime against PyTorch on the CPU, side by side in one run, as ratios onnx / torch:

* gallery embedding (what ``index`` does): images/s of ``inference.embed_table`` over the demo
  profile's test gallery, each runtime at torch's thread count, rounds alternating;
* query latency (what ``search`` and the live demo do): ``Retriever.search`` of one test consumer
  photo (decode, crop, resize, embed, rank), each runtime at one thread as the app runs
  (``app.QUERY_THREADS``), queries alternating between the runtimes; median ms;
* agreement: whether every test query's top-5 is identical with both runtimes.

The model is the checkpoint ``make demo`` trains (``outputs/demo_450items/run/best.pt``), or
``--checkpoint``; without one, a stand-in of the same architecture (Lite0 with its packaged
ImageNet weights, untrained head): speed depends on the architecture, not on the weights.

    .venv/bin/python benchmarks/bench_onnx.py [--checkpoint RUN/best.pt] [--repeats 3] [--threads N]
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _timing import OtherLoad, print_footer, print_header  # noqa: E402

from helpers.apps import app  # noqa: E402
from helpers.core import config  # noqa: E402
from helpers.core.config import REPO_ROOT  # noqa: E402
from helpers.core.schema import read_table  # noqa: E402
from helpers.evaluation import gallery, inference, metrics  # noqa: E402
from helpers.evaluation.retriever import Retriever  # noqa: E402
from helpers.experiments import artifacts  # noqa: E402
from helpers.modeling import checkpoints, export, models  # noqa: E402
from helpers.modeling.onnx_embedder import load_onnx  # noqa: E402

DEMO_CHECKPOINT = REPO_ROOT / "outputs" / "demo_450items" / "run" / "best.pt"


def stand_in(cfg: config.Config, path: Path) -> Path:
    """A checkpoint of the demo architecture: packaged ImageNet backbone, untrained head."""
    embedder = models.create_embedder(cfg.backbone, cfg.embed_dim, "packaged", cfg.head, cfg.pooling, cfg.img_size)
    checkpoints.save_checkpoint(
        path, {"model": embedder.state_dict(), "model_config": embedder.config, "config": asdict(cfg)}
    )
    return path


def embedding_throughput(cfg, embedders: dict, rows, root, repeats: int) -> dict[str, list[float]]:
    """images/s of each runtime's ``embed_table`` over ``rows``, rounds alternating (best kept later)."""
    speeds = {name: [] for name in embedders}
    for _ in range(repeats):
        for name, embedder in embedders.items():
            with OtherLoad() as load:
                started = time.perf_counter()
                inference.embed_table(cfg, embedder, rows, root, "cpu", progress=False)
                seconds = time.perf_counter() - started
            speeds[name].append(len(rows) / seconds)
            print(
                f"  {name:>5}: {len(rows) / seconds:6.1f} images/s (other processes {load.result['other']:.2f} cores)"
            )
    return speeds


def query_latency(retrievers: dict, queries, root) -> tuple[dict[str, list[float]], int]:
    """Per-query seconds of each runtime (alternating per query) and how many top-5s agree."""
    seconds = {name: [] for name in retrievers}
    agree = 0
    for row in queries.itertuples(index=False):
        box = (row.x_1, row.y_1, row.x_2, row.y_2)
        tops = []
        for name, retriever in retrievers.items():
            started = time.perf_counter()
            hits = retriever.search(root / row.path, box=box, k=5)
            seconds[name].append(time.perf_counter() - started)
            tops.append([hit["path"] for hit in hits])
        agree += tops[0] == tops[1]
    return seconds, agree


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", type=Path, help=f"default {DEMO_CHECKPOINT.relative_to(REPO_ROOT)} if trained")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of gallery embedding per runtime; default 3")
    parser.add_argument("--threads", type=int, help="threads of the gallery embedding (both runtimes); default torch's")
    args = parser.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    started = time.perf_counter()
    print_header("bench_onnx: onnxruntime vs PyTorch, gallery embedding and query latency (CPU)")
    cfg = config.get_config("demo")
    root, table = artifacts.ensure_prepared(cfg, progress=False)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx."))
    checkpoint = args.checkpoint or (DEMO_CHECKPOINT if DEMO_CHECKPOINT.is_file() else None)
    if checkpoint is None:
        checkpoint = stand_in(cfg, work / "best.pt")
        print("model: no trained demo checkpoint here; a stand-in of its architecture (Lite0, packaged ImageNet")
        print("       weights, untrained head): speed depends on the architecture, not on the weights")
    else:
        print(f"model: {checkpoint}")
    record = export.export_onnx(checkpoint, work / "model.onnx", table, root)
    print(
        f"export: {record['backbone']}, input {record['input']['shape']}, min cosine {record['check']['min_cosine']:.7f}"
    )

    embedder, run_cfg = checkpoints.load_embedder(checkpoint)
    gallery_rows = metrics.protocol_sets(read_table(table), "test", "official")[1]
    print(f"\ngallery embedding: {len(gallery_rows)} shop images, embed_table, {torch.get_num_threads()} threads")
    embedders = {"torch": embedder, "onnx": load_onnx(work / "model.onnx")[0]}
    speeds = embedding_throughput(run_cfg, embedders, gallery_rows, root, args.repeats)

    for name in embedders:
        gallery.build_index(
            checkpoint,
            table,
            root,
            work / name,
            progress=False,
            runtime=name,
            onnx_model=work / "model.onnx" if name == "onnx" else None,
        )
    torch.set_num_threads(app.QUERY_THREADS)  # as the live demo serves queries (sessions are made after this)
    retrievers = {name: Retriever.load(work / name, runtime=name) for name in embedders}
    queries = app.listed_queries(table, "test", retrievers["torch"].gallery, limit=10**6)
    print(f"\nquery latency: {len(queries)} test consumer photos, Retriever.search, k=5, {app.QUERY_THREADS} thread")
    query_latency(retrievers, queries.head(3), root)  # warm-up: first calls allocate and initialise
    with OtherLoad() as load:
        seconds, agree = query_latency(retrievers, queries, root)
    for name, values in seconds.items():
        print(f"  {name:>5}: median {1e3 * np.median(values):5.1f} ms, p90 {1e3 * np.percentile(values, 90):5.1f} ms")
    print(f"  other processes during the queries: {load.result['other']:.2f} cores")

    best = {name: max(values) for name, values in speeds.items()}
    print("\nratios onnx / torch (same run):")
    print(
        f"  gallery embedding throughput: {best['onnx'] / best['torch']:.2f} "
        f"({best['onnx']:.1f} vs {best['torch']:.1f} images/s, best of {args.repeats})"
    )
    medians = {name: float(np.median(values)) for name, values in seconds.items()}
    print(
        f"  query latency (median): {medians['onnx'] / medians['torch']:.2f} "
        f"({1e3 * medians['onnx']:.1f} vs {1e3 * medians['torch']:.1f} ms)"
    )
    print(f"  identical top-5: {agree} of {len(queries)} test queries")
    print_footer(started)


if __name__ == "__main__":
    main()
