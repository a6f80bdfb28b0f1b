"""Benchmark: embedding extraction (``helpers.retrieval.extract_embeddings`` over the real eval
loader) vs bare inference (``model(x)`` under ``torch.inference_mode`` on in-memory tensors).

Prints the throughput ratio full / bare in images/s (goal: >= 0.9). Asserts nothing: it is a
measurement.

* **bare**: ``model(x)`` under ``inference_mode``, model in eval mode, on batches already in
  memory (real images of the demo table through the eval transform, loaded once before timing),
  as many batches of ``--batch-size`` as the full pass has.
* **full (new loader)**: what ``helpers.train.embed_table`` does (``evaluate()`` calls it for
  val every epoch and for test at the end): a new ``data.make_loader`` over ``C2SDataset`` with
  the eval transform (decode, box crop, letterbox, ToImage/ToDtype/Normalize) and
  ``--num-workers`` workers, then ``extract_embeddings``; worker start-up is included.
* **full (warm workers)**: the same on a loader whose persistent workers have already made one
  pass, so only the steady state is measured.

Every method runs over the same images (default: every row of the demo table), after a warm-up
of the model; with ``--repeats > 1`` the methods alternate and each keeps its best throughput.
Per method the output also gives the main process's first batch and its other batches: wall
time, system CPU time and minor page faults (see ``bench_train.py``; ``--mallopt`` as there). On
CPU these faults are a large share of inference time, and they depend on the allocation pattern,
so the ratio can exceed 1: it compares two runs of the same model code, not a theoretical bound.
A short profile then tells where the loader's time goes (per-image cost of each stage on one
thread, as in a worker; the loader alone; a new loader's time to its first batch).

On a 2-core CPU the loader's workers compete with torch's compute threads for the same cores:
the output prints both counts; try ``--num-workers 0/1/2`` and ``--threads 1/2``.

    python benchmarks/bench_embed.py                      # demo: lite0, 128 px, batch 64, 2 workers
    python benchmarks/bench_embed.py --batch-size 16 --mallopt --profile-images 0
    python benchmarks/bench_embed.py --backbone test_efficientnet --weights none --images 256
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_train import (OtherLoad, print_other_load, print_steps, profile_stages, record_steps,  # noqa: E402
                         summarise_steps, tune_malloc)  # shared with the training benchmark


class _Batches:
    """An iterable of batches with the ``dataset`` attribute ``extract_embeddings`` reads."""

    def __init__(self, batches, dataset):
        self.batches, self.dataset = batches, dataset

    def __iter__(self):
        return iter(self.batches)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged", help="auto | hub | packaged | none")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64, help="embed_table's batch size is 64")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in the main process (default: torch's own choice)")
    parser.add_argument("--mallopt", action="store_true",
                        help="glibc: keep freed memory instead of returning it to the kernel (see bench_train)")
    parser.add_argument("--images", type=int, default=None, help="rows of the demo table (default: all)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare batches before timing")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per method; best kept")
    parser.add_argument("--profile-images", type=int, default=128,
                        help="images for the per-stage profile (0: skip the profile)")
    args = parser.parse_args()

    import torch

    from helpers import config, data, models, workspace
    from helpers.retrieval import extract_embeddings
    from helpers.sampling import read_table

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_note = ("tuned (mallopt: mmap threshold 32 MiB, no trim)" if tune_malloc() else "mallopt failed") \
        if args.mallopt else "default"
    started = time.perf_counter()
    cfg = config.get_config("demo", num_workers=args.num_workers)
    data_root, table_path = workspace.ensure_prepared(cfg, progress=False)
    table = read_table(table_path)
    if args.images:
        table = table.iloc[: args.images]
    torch.manual_seed(0)
    embedder = models.create_embedder(args.backbone, cfg.embed_dim, weights=args.weights, head=cfg.head,
                                      pooling=cfg.pooling, img_size=args.img_size).eval()
    dc = embedder.data_config
    # The eval transform as helpers.train builds it for embed_table (no augmentation).
    transform = data.build_transform(dc["input_size"][-1], dc["mean"], dc["std"], dc["interpolation"],
                                     augment="none", resize=cfg.resize, photometric=cfg.photometric,
                                     margin=cfg.box_margin)
    dataset = data.C2SDataset(table, data_root, transform)

    def loader(workers: int = args.num_workers):
        # As embed_table builds it (batch 64 there), with this benchmark's batch size.
        return data.make_loader(dataset, batch_size=args.batch_size, num_workers=workers, seed=cfg.seed, device="cpu")

    n_batches = -(-len(dataset) // args.batch_size)
    print(f"backbone={args.backbone} weights={embedder.config['weights_source']} img_size={args.img_size} "
          f"batch={args.batch_size} images={len(dataset)} ({n_batches} batches)")
    print(f"cores={os.cpu_count()} torch threads={torch.get_num_threads()} (interop "
          f"{torch.get_num_interop_threads()}) num_workers={args.num_workers} "
          f"(each worker runs torch with 1 thread) torch {torch.__version__}, malloc {malloc_note}")
    print("load average before: {:.2f} {:.2f} {:.2f} (1/5/15 min; the machine may be shared)".format(*os.getloadavg()))

    # In-memory batches: the first few real batches, cycled to the full pass's batch count
    # (the last one is partial in both).
    distinct = min(n_batches, 4)
    prepared = []
    for images, _, _ in loader(0):
        prepared.append(images)
        if len(prepared) == distinct:
            break
    bare_batches = [prepared[i % distinct] for i in range(n_batches)]
    bare_batches[-1] = bare_batches[-1][: len(dataset) - args.batch_size * (n_batches - 1)]

    def bare() -> dict:
        steps_seen: list = []
        with OtherLoad() as load:
            t0 = time.perf_counter()
            with torch.inference_mode():
                for x in record_steps(bare_batches, steps_seen):
                    embedder(x)
            seconds = time.perf_counter() - t0
        return {"images/s": len(dataset) / seconds, "load": load.result, **summarise_steps(steps_seen)}

    def full(some_loader) -> dict:
        steps_seen: list = []
        recorded = record_steps(some_loader, steps_seen)
        with OtherLoad() as load:
            t0 = time.perf_counter()
            # extract_embeddings needs loader.dataset (for the output's size) beside the batches.
            extract_embeddings(embedder, _Batches(recorded, dataset), "cpu", flip_tta=False, progress=False)
            seconds = time.perf_counter() - t0
        return {"images/s": len(dataset) / seconds, "load": load.result, **summarise_steps(steps_seen)}

    warm_loader = loader()
    t0 = time.perf_counter()
    for _ in warm_loader:  # start the persistent workers and let them initialise
        pass
    warm_pass_seconds = time.perf_counter() - t0
    with torch.inference_mode():  # after that fork, so the warm-up also absorbs its copy-on-write faults
        for x in prepared[: max(2, args.warmup)]:
            embedder(x)

    results: dict[str, list[dict]] = {"bare": [], "full (warm workers)": [], "full (new loader)": []}
    for _ in range(args.repeats):
        results["bare"].append(bare())
        results["full (warm workers)"].append(full(warm_loader))
        results["full (new loader)"].append(full(loader()))  # dropped after the pass, as in embed_table
    del warm_loader

    best = {name: max(runs, key=lambda r: r["images/s"]) for name, runs in results.items()}
    how = f"best of {args.repeats}" if args.repeats > 1 else "one run"
    for name, runs in results.items():
        r, values = best[name], ", ".join(f"{x['images/s']:.1f}" for x in runs)
        print(f"{name:>20}: {r['images/s']:7.1f} images/s  ({how}: {values}; "
              f"{1e3 * args.batch_size / r['images/s']:.0f} ms/batch)")
    print_steps(best, "batch")
    print_other_load(results, best)

    if args.profile_images > 0:
        print("\nwhere the loader's time goes (ms per image, one thread, after a warm-up):")
        stages = profile_stages(dataset, args.profile_images)
        for name, ms in stages.items():
            print(f"  {name:>24}: {ms:6.2f}")
        per_batch = stages["whole __getitem__"] * args.batch_size
        bare_batch = 1e3 * args.batch_size / best["bare"]["images/s"]
        print(f"  => one batch of {args.batch_size} costs {per_batch:.0f} ms of one core to load vs bare "
              f"inference of {bare_batch:.0f} ms on {torch.get_num_threads()} thread(s)")
        t0 = time.perf_counter()
        iterator = iter(loader())
        next(iterator)
        first = time.perf_counter() - t0
        for _ in iterator:
            pass
        alone = len(dataset) / (time.perf_counter() - t0)
        print(f"  new loader: first batch after {1e3 * first:.0f} ms (worker start-up + one batch); "
              f"loader alone (no model): {alone:.0f} images/s")
        print(f"  warm-up pass of the persistent loader (start-up + {n_batches} batches, no model): "
              f"{warm_pass_seconds:.2f} s")

    print(f"\nratio full (warm workers) / bare: {best['full (warm workers)']['images/s'] / best['bare']['images/s']:.2f} (goal >= 0.9)")
    print(f"ratio full (new loader, as embed_table) / bare: {best['full (new loader)']['images/s'] / best['bare']['images/s']:.2f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"(total {time.perf_counter() - started:.0f} s; peak RSS of the main process {peak_mib:.0f} MiB; "
          "load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + ")")


if __name__ == "__main__":
    main()
