"""Benchmark: embedding extraction as the project runs it (``inference.TableEmbedder`` /
``embed_table``) vs the best bare inference of the same model on this machine, found by a
small sweep in the same run.

Prints images/s of each, two ratios and a verdict: the project's extraction / bare inference at
the project's own settings, and the project's extraction / the best bare configuration,
against the goal **>= 0.9 × the best bare inference** (PASS / MISS). It asserts nothing: it is
a measurement.

* **project: TableEmbedder**: ``inference.TableEmbedder`` over the demo table (what validation
  runs every epoch): one loader at ``resolve_embed_batch`` (16 on the CPU) and
  ``resolve_num_workers`` that persists between calls, the eval transform (decode, box crop,
  letterbox, normalise), then ``extract_embeddings``. Timed on its second and later calls
  (the steady state: the eval cache, ``inference.CachedBatches``, replays the first call's
  preprocessed batches when they fit ``C2S_EVAL_CACHE_MB``); the goal applies to it.
  ``C2S_EVAL_CACHE_MB=0`` measures it streaming every call.
* **project: embed_table**: ``inference.embed_table`` (a new loader per call, as the test
  evaluation and the gallery index use it); worker start-up included. Not recorded per batch.
* **bare, project settings, this process**: ``model(x)`` under ``torch.inference_mode`` on
  batches already in memory (real images through the same transform, prepared once) at the
  project's batch size, in this process with its allocator setting, alternating with the above.
* **bare sweep**: the same bare inference, each variant in a fresh subprocess (the allocator
  setting is process-wide and cannot be undone): batch size (default 16, 32, 64 and the
  project's), allocator default (``C2S_MALLOPT=0``, no ``MALLOC_*_`` variables) or tuned
  (``runtime.tune_allocator``, as the project's training entry points apply it), and
  ``channels_last`` off or on (model and batches). The best bare is the fastest of these and
  the in-process bare loop. Embeddings do not depend on the batch size in eval mode, so the
  project is free to pick any of them.

With ``--repeats > 1`` every method and variant runs once per round and keeps its best run.
The output also gives, per method, the first batch and the others (wall, system CPU, minor page
faults), the CPU other processes used (a WARNING when over 0.15 cores) and a loader profile.

    python benchmarks/bench_embed.py                         # demo: lite0, 128 px, every demo image
    python benchmarks/bench_embed.py --sweep-batches 16,32 --sweep-channels-last off --images 512
    python benchmarks/bench_embed.py --backbone test_efficientnet --weights none --img-size 64 --images 64
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (also puts the repository root on sys.path)

GOAL = 0.9
PROJECT = "project: TableEmbedder (persistent loader)"
PROJECT_NEW = "project: embed_table (new loader per call)"
OWN_BARE = "bare, project settings, this process"


def build(args: argparse.Namespace):
    """The demo config, its table (first ``--images`` rows), the model in eval mode and the
    eval dataset, as ``inference.TableEmbedder`` builds it."""
    import torch

    from helpers.core import config
    from helpers.core.schema import read_table
    from helpers.data import datasets, transforms
    from helpers.experiments import artifacts
    from helpers.modeling import models

    cfg = config.get_config(
        "demo",
        backbone=args.backbone,
        weights=args.weights,
        img_size=args.img_size,
        num_workers=args.num_workers,
        embed_batch=args.batch_size,
        device="cpu",
    )
    data_root, table_path = artifacts.ensure_prepared(cfg, progress=False)
    table = read_table(table_path)
    if args.images:
        table = table.iloc[: args.images].reset_index(drop=True)
    torch.manual_seed(0)
    embedder = models.create_embedder(
        cfg.backbone, cfg.embed_dim, weights=cfg.weights, head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size
    ).eval()
    dataset = datasets.C2SDataset(table, data_root, transforms.create_transform(cfg, embedder.data_config))
    return cfg, table, data_root, embedder, dataset


def in_memory_batches(dataset, batch: int, channels_last: bool = False) -> list:
    """As many batches of ``batch`` as a full pass has (the last one partial), from the first
    few real ones (at most 4 distinct, cycled), loaded once without workers."""
    import torch

    from helpers.data import datasets

    n_batches = -(-len(dataset) // batch)
    distinct = min(n_batches, 4)
    prepared = []
    for images, _, _ in datasets.make_loader(dataset, batch_size=batch, num_workers=0):
        prepared.append(images.contiguous(memory_format=torch.channels_last) if channels_last else images)
        if len(prepared) == distinct:
            break
    batches = [prepared[i % distinct] for i in range(n_batches)]
    batches[-1] = batches[-1][: len(dataset) - batch * (n_batches - 1)]
    return batches


def bare_pass(embedder, batches: list):
    import torch

    def go(seen: list) -> int:
        with torch.inference_mode():
            for x in T.record_steps(batches, seen):
                embedder(x)
        return sum(len(x) for x in batches)

    return go


def project_pass(embedder_call, embedder, n_images: int):
    """``TableEmbedder.__call__`` as is, its loader seen through :class:`_timing.Recorded`."""

    def go(seen: list) -> int:
        loader = embedder_call.loader
        embedder_call.loader = T.Recorded(loader, seen)
        try:
            embedder_call(embedder, progress=False)
        finally:
            embedder_call.loader = loader
        return n_images

    return go


def child(args: argparse.Namespace) -> None:
    """One bare variant (``--bare-variant``), in its own process."""
    import torch

    variant = json.loads(args.bare_variant)
    info = T.child_setup(variant)
    cfg, table, data_root, embedder, dataset = build(args)
    embedder.to(memory_format=torch.channels_last if variant["channels_last"] else torch.contiguous_format)
    batches = in_memory_batches(dataset, variant["batch"], variant["channels_last"])
    bare_pass(embedder, batches[: max(2, args.warmup)])([])
    T.child_report({**T.timed(bare_pass(embedder, batches)), **info})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(parser)
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the project's embed_batch (default: runtime.resolve_embed_batch on the CPU, 16)",
    )
    parser.add_argument("--images", type=int, default=None, help="rows of the demo table (default: all)")
    parser.add_argument(
        "--sweep-batches", default="16,32,64", help="bare variants' batch sizes (the project's is always added)"
    )
    parser.add_argument(
        "--sweep-threads",
        default="own",
        help="bare variants' torch threads: own (torch's count), auto (it and half of it), or a list",
    )
    args = parser.parse_args()
    if args.bare_variant:
        child(args)
        return

    import torch

    from helpers.data import datasets
    from helpers.evaluation import inference

    started = time.perf_counter()
    allocator = T.project_allocator()  # as the training entry points (fit, helpers train) do
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg, table, data_root, embedder, dataset = build(args)
    project = inference.TableEmbedder(cfg, embedder.data_config, table, data_root, "cpu")
    batch, workers = project.loader.batch_size, project.loader.num_workers
    n = len(table)
    batches = T.parse_list(args.sweep_batches, int)
    variants = (
        []
        if args.no_sweep
        else T.grid(
            batch=batches + ([batch] if batch not in batches else []),
            allocator=T.parse_list(args.sweep_allocator),
            channels_last=[T.on_off(v) for v in T.parse_list(args.sweep_channels_last)],
            threads=T.threads_axis(args.sweep_threads),
        )
    )

    T.print_header(
        f"embedding: backbone={cfg.backbone} weights={embedder.config['weights_source']} "
        f"img_size={cfg.img_size} images={n} flip_tta={cfg.flip_tta}"
    )
    print(
        f"project settings: batch {batch} (resolve_embed_batch), num_workers={workers} (resolve_num_workers), "
        f"allocator {allocator} (runtime.tune_allocator), channels_last on (as extract_embeddings sets it), "
        f"threads {torch.get_num_threads()}"
    )
    print(
        f"bare sweep: {len(variants)} variant(s) in fresh processes (batch x allocator x channels_last x threads), "
        f"{args.repeats} round(s)"
    )

    embedder.to(memory_format=torch.channels_last)  # as extract_embeddings does
    bare_batches = in_memory_batches(dataset, batch, channels_last=True)
    project(embedder, progress=False)  # start its persistent workers (if any), as the first validation does
    bare_pass(embedder, bare_batches[: max(2, args.warmup)])([])  # after that fork: absorbs its copy-on-write

    rows: dict[str, list[dict]] = {PROJECT: [], PROJECT_NEW: [], OWN_BARE: []}
    rows.update({"bare " + T.describe(v): [] for v in variants})
    for _ in range(args.repeats):
        rows[OWN_BARE].append(T.timed(bare_pass(embedder, bare_batches)))
        rows[PROJECT].append(T.timed(project_pass(project, embedder, n)))
        rows[PROJECT_NEW].append(
            T.timed(lambda seen: len(inference.embed_table(cfg, embedder, table, data_root, "cpu", progress=False)))
        )
        T.sweep_round(__file__, variants, rows)
    del project

    def batch_of(name: str) -> int:
        for v in variants:
            if name == "bare " + T.describe(v):
                return v["batch"]
        return batch

    print()
    best = T.print_rows(rows, batch_of, "batch", args.repeats)
    bare_names = [name for name in best if name.startswith("bare")]
    best_bare = max(bare_names, key=lambda name: best[name]["images/s"])
    T.print_steps(best, "batch")
    T.print_other_load(
        [best[k] for k in (PROJECT, OWN_BARE, best_bare) if k in best], [r for runs in rows.values() for r in runs]
    )

    if args.profile_images > 0:
        T.print_loader_profile(
            dataset,
            args.profile_images,
            batch,
            1e3 * batch / best[OWN_BARE]["images/s"],
            lambda: datasets.make_loader(dataset, batch_size=batch, num_workers=workers, seed=cfg.seed),
            "batch",
        )

    print()
    T.print_goal("extraction (TableEmbedder)", best[PROJECT], best[OWN_BARE], best_bare, best[best_bare], GOAL)
    T.print_footer(started)


if __name__ == "__main__":
    main()
