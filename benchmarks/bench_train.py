"""Benchmark: the training loop ``fit()`` runs vs the best bare training step of the same model
on this machine, found by a small sweep in the same run.

Prints images/s of each, two ratios and a verdict: the project's loop / the bare loop at the
project's own settings, and the project's loop / the best bare configuration, against the
goal **>= 0.95 × the best bare step** (PASS / MISS). It asserts nothing: it is a measurement.

* **project: fit loop**: what ``train.fit()`` builds (``train._build``: the demo config's model,
  ``create_criterion``, ``create_optimizer``, the ``lr_factor`` schedule, one persistent
  DataLoader over ``datasets.SampleSeeds(PKSampler)`` at ``runtime.resolve_num_workers``, reading the
  decoded-crop store ``_build`` makes beside the table (``helpers.data.store``: decoded, cropped and
  letterboxed once, before the timed passes) and drawing the augmentation preset), run as ``fit()`` runs an epoch:
  ``set_epoch``, then ``train.train_one_epoch``. The allocator is tuned as ``fit()`` tunes it
  (``runtime.tune_allocator``; ``C2S_MALLOPT=0`` turns it off). Epoch 1 includes the loader's
  start-up; the goal applies to the later epochs (the steady state of a run).
* **project: fit loop decoding JPEGs (no store)**: the same loop, model, sampler, seeds and
  batches over the same rows, with a second persistent loader whose dataset has no store, so
  every image is read, decoded, cropped and letterboxed again each epoch, as ``fit()`` did
  before the store. Timed in this process, alternating with the project's loop, so the ratio
  of the two is what the store buys on this machine (they give identical tensors).
* **bare, project settings, this process**: the same ``train_one_epoch`` with the same model,
  loss, optimizer, schedule and batch (P × K), on batches already in memory (real images of
  the demo table through the same transform, prepared once): no decoding, no sampler, no
  worker. Timed in this process, alternating with the project's loop.
* **bare sweep**: the same bare loop, each variant in a fresh subprocess (the allocator setting
  is process-wide and cannot be undone): allocator default (``C2S_MALLOPT=0``, no ``MALLOC_*_``
  variables) or tuned (``runtime.tune_allocator``), ``channels_last`` off or on (model and
  batches), and torch threads (default: all of torch's and half of them). The batch is fixed
  by P × K. The best bare is the fastest of these and the in-process bare loop.

With ``--repeats > 1`` every method and variant runs once per round and keeps its best run.
The output also gives, per method, the first step and the others (wall, system CPU, minor page
faults), the CPU other processes used (a WARNING when over 0.15 cores) and a loader profile.

    python benchmarks/bench_train.py                           # demo: lite0, 160 px, P=8 x K=4
    python benchmarks/bench_train.py --sweep-threads own --sweep-channels-last off   # smaller sweep
    python benchmarks/bench_train.py --backbone test_efficientnet --weights none --img-size 64 --steps 3
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing as T  # noqa: E402  (also puts the repository root on sys.path)

GOAL = 0.95  # the decoded-crop store leaves the loop only augmentation and collation to add
PROJECT = "project: fit loop, later epochs"
PROJECT_FIRST = "project: fit loop, epoch 1 (loader start-up)"
OWN_BARE = "bare, project settings, this process"
JPEG = "project: fit loop decoding JPEGs (no store)"


def make_config(args: argparse.Namespace):
    from helpers.core import config

    return config.get_config(
        "demo",
        backbone=args.backbone,
        weights=args.weights,
        img_size=args.img_size,
        p_items=args.p,
        k_images=args.k,
        augment=args.augment,
        num_workers=args.num_workers,
        device="cpu",
    )


def build(args: argparse.Namespace):
    """What ``fit()`` builds for a new run (``train._build``), with the epoch cut to ``steps``."""
    from helpers.experiments import artifacts
    from helpers.training import train

    cfg = make_config(args)
    data_root, table_path = artifacts.ensure_prepared(cfg, progress=False)
    run = train._build(cfg, table_path, data_root, Path(tempfile.gettempdir()), None)  # writes nothing
    steps = args.steps or len(run.batches)
    run.batches.batch_sampler.epoch_len = steps
    return run, steps


def in_memory_batches(run, steps: int, channels_last: bool = False) -> list:
    """``steps`` real batches (the same transform, sampler and per-sample seeds as the run,
    loaded once without workers; at most 8 distinct, cycled)."""
    import torch

    from helpers.data import datasets

    dataset = run.loader.dataset
    distinct = min(steps, 8)
    sampler = datasets.PKSampler(
        (dataset.labels, dataset.domains), run.cfg.p_items, run.cfg.k_images, epoch_len=distinct, seed=run.cfg.seed
    )
    seeds = datasets.SampleSeeds(sampler, run.cfg.seed)
    seeds.set_epoch(99)  # not an epoch the timed passes use
    prepared = list(datasets.make_loader(dataset, batch_sampler=seeds, num_workers=0, seed=run.cfg.seed))
    if channels_last:
        prepared = [(x.contiguous(memory_format=torch.channels_last), y, i) for x, y, i in prepared]
    return [prepared[i % distinct] for i in range(steps)]


def bare_pass(run, batches: list, desc: str = "bare"):
    from helpers.training.train import train_one_epoch

    def go(seen: list) -> int:
        return train_one_epoch(
            run.embedder,
            T.record_steps(batches, seen),
            _criterion(run, 1),
            run.optimizer,
            run.scheduler,
            run.scaler,
            run.device,
            run.amp,
            run.cfg.grad_clip,
            progress=False,
            desc=desc,
        )[1]

    return go


def _criterion(run, epoch: int):
    """The criterion ``fit()`` uses at ``epoch`` (the plain loss before ``xbm_start_epoch``)."""
    if epoch >= run.cfg.xbm_start_epoch:
        return run.criterion
    return getattr(run.criterion, "loss", run.criterion)


def jpeg_loader(run):
    """A loader like the run's, over the same rows and batches, that decodes every image again."""
    from helpers.data import datasets

    dataset = run.loader.dataset
    plain = datasets.C2SDataset(dataset.table, dataset.data_root, dataset.transform)
    return datasets.make_loader(plain, batch_sampler=run.batches, num_workers=run.loader.num_workers, seed=run.cfg.seed)


def project_epoch(run, epoch: int, loader=None):
    """One epoch as ``train._train_epoch`` runs it, without validation and checkpointing
    (over ``loader`` instead of the run's own when given)."""
    import torch

    from helpers.modeling import losses
    from helpers.training.train import train_one_epoch

    def go(seen: list) -> int:
        torch.manual_seed(run.cfg.seed * 100_003 + epoch)
        run.batches.set_epoch(epoch)
        if isinstance(run.criterion, losses.CrossBatchMemory):
            run.criterion.reset()
        return train_one_epoch(
            run.embedder,
            T.Recorded(run.loader if loader is None else loader, seen),
            _criterion(run, epoch),
            run.optimizer,
            run.scheduler,
            run.scaler,
            run.device,
            run.amp,
            run.cfg.grad_clip,
            progress=False,
            desc=f"epoch {epoch + 1}",
        )[1]

    return go


def child(args: argparse.Namespace) -> None:
    """One bare variant (``--bare-variant``), in its own process."""
    import torch

    variant = json.loads(args.bare_variant)
    info = T.child_setup(variant)
    run, steps = build(args)
    # fit() builds the model channels_last; the "off" variants turn it back
    run.embedder.to(memory_format=torch.channels_last if variant["channels_last"] else torch.contiguous_format)
    batches = in_memory_batches(run, steps, variant["channels_last"])
    bare_pass(run, batches[: max(2, args.warmup)], "warm-up")([])
    T.child_report({**T.timed(bare_pass(run, batches)), **info})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    T.add_common_args(parser)
    parser.add_argument("--p", type=int, default=None, help="items per batch (default: the demo profile's, 8)")
    parser.add_argument("--k", type=int, default=None, help="images per item (default: the demo profile's, 4)")
    parser.add_argument("--augment", default=None, help="augmentation preset (default: the demo profile's)")
    parser.add_argument(
        "--steps", type=int, default=None, help="steps per timed pass (default: one demo epoch, n_eligible_items // P)"
    )
    parser.add_argument(
        "--sweep-threads",
        default="auto",
        help="bare variants' torch threads: auto (torch's count and half of it), own, or a list",
    )
    args = parser.parse_args()
    if args.bare_variant:
        child(args)
        return

    import torch

    from helpers.core import runtime
    from helpers.data import datasets

    started = time.perf_counter()
    allocator = T.project_allocator()  # as fit() does, before anything is built
    if args.threads:
        torch.set_num_threads(args.threads)
    run, steps = build(args)
    cfg, batch = run.cfg, run.cfg.p_items * run.cfg.k_images
    own = {"allocator": allocator, "channels_last": True, "threads": torch.get_num_threads()}
    variants = (
        []
        if args.no_sweep
        else T.grid(
            allocator=T.parse_list(args.sweep_allocator),
            channels_last=[T.on_off(v) for v in T.parse_list(args.sweep_channels_last)],
            threads=T.threads_axis(args.sweep_threads),
        )
    )

    T.print_header(
        f"training: backbone={cfg.backbone} weights={run.embedder.config['weights_source']} "
        f"img_size={cfg.img_size} batch={batch} (P={cfg.p_items} x K={cfg.k_images}) augment={cfg.augment} "
        f"loss={cfg.loss} optimizer={cfg.optimizer} steps/pass={steps} "
        f"train images={len(run.loader.dataset)}"
    )
    print(
        f"project settings: num_workers={run.loader.num_workers} (resolve_num_workers), allocator {allocator} "
        f"(runtime.tune_allocator), channels_last on (as fit() builds it), threads {own['threads']}"
    )
    print(
        f"bare sweep: {len(variants)} variant(s) in fresh processes (allocator x channels_last x threads), "
        f"{args.repeats} round(s)"
    )

    bare_batches = in_memory_batches(run, steps, channels_last=True)
    bare_pass(run, bare_batches[: max(2, args.warmup)], "warm-up")([])  # kernels, optimizer state
    first = T.timed(project_epoch(run, 0))  # the loader's start-up, as a run's first epoch

    jpegs = jpeg_loader(run)
    T.timed(project_epoch(run, 0, jpegs))  # warms the second loader up; not kept (epoch 1 has its own row)

    rows: dict[str, list[dict]] = {PROJECT: [], PROJECT_FIRST: [first], JPEG: [], OWN_BARE: []}
    rows.update({"bare " + T.describe(v): [] for v in variants})
    for round_ in range(args.repeats):
        rows[OWN_BARE].append(T.timed(bare_pass(run, bare_batches)))
        rows[PROJECT].append(T.timed(project_epoch(run, 1 + round_)))
        rows[JPEG].append(T.timed(project_epoch(run, 1 + round_, jpegs)))  # the same epoch's batches
        T.sweep_round(__file__, variants, rows)

    print()
    best = T.print_rows(rows, lambda name: batch, "step", args.repeats)
    bare_names = [name for name in best if name.startswith("bare")]
    best_bare = max(bare_names, key=lambda name: best[name]["images/s"])
    T.print_steps(best, "step")
    T.print_other_load(
        [best[n] for n in (PROJECT, OWN_BARE, best_bare) if n in best], [r for runs in rows.values() for r in runs]
    )

    if args.profile_images > 0:

        def new_loader():
            dataset = run.loader.dataset
            sampler = datasets.PKSampler(
                (dataset.labels, dataset.domains), cfg.p_items, cfg.k_images, epoch_len=steps, seed=cfg.seed
            )
            return datasets.make_loader(
                dataset,
                batch_sampler=datasets.SampleSeeds(sampler, cfg.seed),
                num_workers=runtime.resolve_num_workers(cfg, "cpu"),
                seed=cfg.seed,
            )

        T.print_loader_profile(
            run.loader.dataset, args.profile_images, batch, 1e3 * batch / best[OWN_BARE]["images/s"], new_loader, "step"
        )

    print()
    print(
        f"ratio training loop with the store / the same loop decoding JPEGs: "
        f"{best[PROJECT]['images/s'] / best[JPEG]['images/s']:.2f} (what the store buys here)"
    )
    T.print_goal("training loop", best[PROJECT], best[OWN_BARE], best_bare, best[best_bare], GOAL)
    T.print_footer(started)


if __name__ == "__main__":
    main()
