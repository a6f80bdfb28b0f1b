"""Benchmark: the full training loop (``helpers.train.train_one_epoch`` over a real DataLoader)
vs the bare training step on in-memory tensors.

Prints the throughput ratio full / bare in images/s (goal: >= 0.85). Asserts nothing: it is a
measurement.

* **bare**: ``train_one_epoch`` over a Python list of batches already prepared in memory
  (real images of the demo table, loaded once before timing): forward, loss, backward, grad
  clipping, AdamW step, scheduler step. No decoding, no sampler, no worker.
* **full (warm workers)**: ``train_one_epoch`` over ``data.make_loader`` on the demo table:
  JPEG decoding, box crop, letterbox, the augmentation preset, ``PKSampler`` batches, collation
  in ``--num-workers`` worker processes. The loader's persistent workers are started and run
  through one pass of the sampler before timing, so only the steady state is measured.
* **full (new loader)**: the same, on a DataLoader built just before the pass, as ``fit()``
  builds one per epoch: its worker start-up and the wait for the first batches are included.

The same code (``train_one_epoch``) and the same model, loss, optimizer and batch size run in
all three; only where the batches come from differs. Each method is timed over ``--steps``
steps (default: one demo epoch, as ``fit()`` runs it), after a warm-up of the model; with
``--repeats > 1`` the methods alternate and each keeps its best throughput, so background load
on a shared machine hits all alike. (With ``--num-workers 0`` there are no workers: "warm" and
"new" then differ only in the DataLoader object.)

Per method the output also gives the main process's first step and its other steps: wall time,
system CPU time and minor page faults. Faults are the kernel handing the process a zero-filled
page (glibc returns big freed blocks to the kernel, so they recur every step) or copying a page
it shares with a worker forked from it (copy-on-write: the first step after a fork pays for
every page it writes). ``--mallopt`` (:func:`tune_malloc`) keeps freed memory in the process, to
show what the recurring faults cost.

A short profile then tells where the loader's time goes: per-image cost of each preprocessing
stage (one thread, as in a worker), the loader alone, and a new loader's time to its first batch.

On a 2-core CPU the loader's workers compete with torch's compute threads for the same cores:
the output prints both counts; try ``--num-workers 0/1/2`` and ``--threads 1/2``.

    python benchmarks/bench_train.py                           # demo: lite0, 128 px, P=8, K=4
    python benchmarks/bench_train.py --num-workers 0 --mallopt --profile-images 0
    python benchmarks/bench_train.py --backbone test_efficientnet --weights none --steps 10
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def tune_malloc() -> bool:
    """glibc only: keep freed memory in the process instead of handing it back to the kernel.

    By default glibc serves large blocks (activations, gradients) with ``mmap`` and returns them
    with ``munmap`` (or trims the heap), so every step the kernel zero-fills the same memory
    again: a minor page fault per 4 KiB page, counted as system CPU time. Equivalent to
    ``MALLOC_MMAP_THRESHOLD_=33554432 MALLOC_TRIM_THRESHOLD_=2147483647`` in the environment.
    """
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    if not name:
        return False
    libc = ctypes.CDLL(name)
    if not hasattr(libc, "mallopt"):
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
    # 32 MiB is glibc's largest mmap threshold on 64-bit; bigger blocks still use mmap.
    return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20)) and bool(libc.mallopt(m_trim_threshold, 2**31 - 1))


def build(args: argparse.Namespace):
    """The demo's training pieces as ``fit()`` builds them, with the benchmark's sizes."""
    import torch

    from helpers import config, data, losses, models, workspace
    from helpers.sampling import read_table

    cfg = config.get_config("demo")
    data_root, table_path = workspace.ensure_prepared(cfg, progress=False)
    table = read_table(table_path)
    train_rows = table.loc[table.split == "train"].reset_index(drop=True)

    torch.manual_seed(0)
    embedder = models.create_embedder(args.backbone, cfg.embed_dim, weights=args.weights, head=cfg.head,
                                      pooling=cfg.pooling, img_size=args.img_size)
    criterion = losses.create_loss(cfg.loss, margin=cfg.margin)
    optimizer = torch.optim.AdamW(models.param_groups(embedder, cfg.lr, cfg.backbone_lr_mult),
                                  weight_decay=cfg.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=False)  # what fit() builds on a CPU
    dc = embedder.data_config
    transform = data.build_transform(dc["input_size"][-1], dc["mean"], dc["std"], dc["interpolation"],
                                     augment=args.augment, resize=cfg.resize, photometric=cfg.photometric,
                                     margin=cfg.box_margin)
    dataset = data.C2SDataset(train_rows, data_root, transform)
    return cfg, embedder, criterion, optimizer, scheduler, scaler, dataset


def sampler_for(dataset, args: argparse.Namespace, epoch: int, steps: int | None):
    from helpers import data

    sampler = data.PKSampler((dataset.labels, dataset.domains), args.p, args.k, epoch_len=steps, seed=0)
    sampler.set_epoch(epoch)
    return sampler


def loader_for(dataset, args: argparse.Namespace, epoch: int, steps: int):
    from helpers import data

    return data.make_loader(dataset, batch_sampler=sampler_for(dataset, args, epoch, steps),
                            num_workers=args.num_workers, seed=epoch, device="cpu")


def _own_cpu_seconds() -> float:
    """CPU seconds of this process and its children: reaped ones (``RUSAGE_CHILDREN``) plus live
    ones such as persistent DataLoader workers (psutil)."""
    import psutil

    own = resource.getrusage(resource.RUSAGE_SELF)
    reaped = resource.getrusage(resource.RUSAGE_CHILDREN)
    total = own.ru_utime + own.ru_stime + reaped.ru_utime + reaped.ru_stime
    for child in psutil.Process().children(recursive=True):
        try:
            times = child.cpu_times()
            total += times.user + times.system
        except psutil.Error:  # exited in between (then counted as reaped, or lost: a few ms)
            pass
    return total


def _machine_ticks() -> tuple[int, int]:
    """(busy, steal) clock ticks of the whole machine since boot, from ``/proc/stat``."""
    with open("/proc/stat") as handle:
        user, nice, system, idle, iowait, irq, softirq, steal = (int(v) for v in handle.readline().split()[1:9])
    return user + nice + system + irq + softirq, steal


class OtherLoad:
    """How many cores other processes (not this one or its workers) kept busy, and how much the
    hypervisor stole, while a measurement ran: a shared machine's noise, made visible. Linux
    only (reads ``/proc/stat``); None elsewhere."""

    def __enter__(self) -> "OtherLoad":
        self.result: dict | None = None
        try:
            self._start = time.perf_counter(), _machine_ticks(), _own_cpu_seconds()
        except (OSError, ValueError, ImportError):
            self._start = None
        return self

    def __exit__(self, *exc) -> None:
        if self._start is None:
            return
        wall = time.perf_counter() - self._start[0]
        (busy, steal), own = _machine_ticks(), _own_cpu_seconds()
        hz = os.sysconf("SC_CLK_TCK")
        self.result = {"other": max(0.0, ((busy - self._start[1][0]) / hz - (own - self._start[2])) / wall),
                       "steal": (steal - self._start[1][1]) / hz / wall}


def print_other_load(results: dict, best: dict) -> None:
    """Other processes' load during the runs kept (``best``) and during all runs; a warning when
    a kept run was disturbed."""
    def worst(runs: list) -> tuple[float, float] | None:
        loads = [r["load"] for r in runs if r.get("load")]
        return (max(x["other"] for x in loads), max(x["steal"] for x in loads)) if loads else None

    kept, every = worst(list(best.values())), worst([r for runs in results.values() for r in runs])
    if kept is None:
        return
    line = (f"other processes during the timed runs kept: at most {kept[0]:.2f} cores busy, {kept[1]:.2f} cores "
            f"stolen by the hypervisor (of {os.cpu_count()})")
    if every != kept:
        line += f"; during all runs: {every[0]:.2f} busy, {every[1]:.2f} stolen"
    print(line)
    if max(kept) > 0.15:
        print("WARNING: the machine was not quiet; these numbers are disturbed, rerun when it is idle")


def record_steps(batches, out: list):
    """Yield ``batches`` unchanged, appending to ``out`` for each one (wall seconds, main-process
    system CPU seconds, minor page faults) from its hand-over to the next request, i.e. the step
    run on it plus the wait for the next batch. Page faults are the kernel zero-filling (fresh
    memory) or copying (copy-on-write after a fork) 4 KiB pages for the process."""
    last = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
    for item in batches:
        yield item
        now = time.perf_counter(), resource.getrusage(resource.RUSAGE_SELF)
        out.append((now[0] - last[0], now[1].ru_stime - last[1].ru_stime, now[1].ru_minflt - last[1].ru_minflt))
        last = now


def summarise_steps(steps_seen: list) -> dict:
    """The first step's (wall, system, faults) and, over the others, median wall and mean system/faults."""
    wall, system, faults = (np.array(column) for column in zip(*steps_seen))
    rest = slice(1, None) if len(wall) > 1 else slice(None)
    return {"first": (wall[0], system[0], faults[0]),
            "rest": (np.median(wall[rest]), system[rest].mean(), faults[rest].mean())}


def print_steps(best: dict, unit: str = "step") -> None:
    print(f"main process per {unit}: wall ms / system CPU ms / minor page faults "
          f"(first {unit}; median wall and mean of the others)")
    for name, r in best.items():
        (w0, s0, f0), (w, s_, f_) = r["first"], r["rest"]
        print(f"{name:>20}: first {1e3 * w0:5.0f} / {1e3 * s0:5.0f} / {f0:7.0f};  others {1e3 * w:5.0f} / "
              f"{1e3 * s_:5.0f} / {f_:7.0f}")


def profile_stages(dataset, n: int) -> dict[str, float]:
    """Mean ms per image of each preprocessing stage, on one thread (as in a DataLoader worker)."""
    import torch

    from helpers import data

    transform = dataset.transform
    ops = list(transform.tensor_ops.transforms)
    names = [type(op).__name__ for op in ops]
    totals = {"read+decode (open_rgb)": 0.0, "crop_box": 0.0, "photometric": 0.0, "letterbox/resize": 0.0}
    totals.update({name: 0.0 for name in names})
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        rows = [i % len(dataset) for i in range(n + 16)]
        for j, i in enumerate(rows):
            path = dataset.data_root / dataset._paths[i]
            t0 = time.perf_counter()
            image = data.open_rgb(path)
            t1 = time.perf_counter()
            image = data.crop_box(image, dataset._boxes[i], transform.margin)
            t2 = time.perf_counter()
            image = data.photometric(image, transform.photometric)
            t3 = time.perf_counter()
            x = data.resize_image(image, transform.img_size, transform.resize, transform.interpolation, transform.fill)
            t4 = time.perf_counter()
            op_times = []
            for op in ops:
                a = time.perf_counter()
                x = op(x)
                op_times.append(time.perf_counter() - a)
            if j < 16:  # warm-up: the first calls initialise lazily (kernels, tables)
                continue
            for key, seconds in zip(totals, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                totals[key] += seconds
            for name, seconds in zip(names, op_times):
                totals[name] += seconds
        start = time.perf_counter()
        for i in rows[16:]:
            dataset[i]
        whole = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    result = {key: 1e3 * seconds / n for key, seconds in totals.items()}
    result["whole __getitem__"] = 1e3 * whole / n
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged", help="auto | hub | packaged | none")
    parser.add_argument("--img-size", type=int, default=128)
    parser.add_argument("--p", type=int, default=8, help="items per batch")
    parser.add_argument("--k", type=int, default=4, help="images per item")
    parser.add_argument("--augment", default="medium", help="augmentation preset (the demo's: medium)")
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads in the main process (default: torch's own choice)")
    parser.add_argument("--mallopt", action="store_true",
                        help="glibc: keep freed memory instead of returning it to the kernel (tune_malloc)")
    parser.add_argument("--steps", type=int, default=None,
                        help="timed steps per method (default: one demo epoch, n_eligible_items // P)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare steps before timing")
    parser.add_argument("--repeats", type=int, default=1, help="alternating runs per method; best kept")
    parser.add_argument("--profile-images", type=int, default=128,
                        help="images for the per-stage profile (0: skip the profile)")
    args = parser.parse_args()

    import torch

    from helpers.train import train_one_epoch

    if args.threads:
        torch.set_num_threads(args.threads)
    malloc_note = ("tuned (mallopt: mmap threshold 32 MiB, no trim)" if tune_malloc() else "mallopt failed") \
        if args.mallopt else "default"
    started = time.perf_counter()
    cfg, embedder, criterion, optimizer, scheduler, scaler, dataset = build(args)
    steps = args.steps or len(sampler_for(dataset, args, 0, None))
    batch = args.p * args.k
    print(f"backbone={args.backbone} weights={embedder.config['weights_source']} img_size={args.img_size} "
          f"batch={batch} (P={args.p} x K={args.k}) augment={args.augment} steps={steps} "
          f"train images={len(dataset)}")
    print(f"cores={os.cpu_count()} torch threads={torch.get_num_threads()} (interop "
          f"{torch.get_num_interop_threads()}) num_workers={args.num_workers} "
          f"(each worker runs torch with 1 thread) torch {torch.__version__}, malloc {malloc_note}")
    print("load average before: {:.2f} {:.2f} {:.2f} (1/5/15 min; the machine may be shared)".format(*os.getloadavg()))

    def run_epoch(loader, desc: str) -> dict:
        """One timed ``train_one_epoch``, with the per-step record of :func:`record_steps`."""
        steps_seen: list = []
        with OtherLoad() as load:
            _, images, seconds = train_one_epoch(embedder, record_steps(loader, steps_seen), criterion, optimizer,
                                                 scheduler, scaler, "cpu", None, cfg.grad_clip, progress=False,
                                                 desc=desc)
        return {"images/s": images / seconds, "load": load.result, **summarise_steps(steps_seen)}

    # In-memory batches: real images through the same transform and sampler, loaded once.
    distinct = min(steps, 8)
    prepared = list(loader_for(dataset, argparse.Namespace(**{**vars(args), "num_workers": 0}), 99, distinct))
    bare_batches = [prepared[i % distinct] for i in range(steps)]

    warm_loader = loader_for(dataset, args, 1, steps)
    t0 = time.perf_counter()
    for _ in warm_loader:  # start the persistent workers and let them initialise
        pass
    warm_pass_seconds = time.perf_counter() - t0
    # After the fork above: the warm-up steps also absorb the copy-on-write faults it causes.
    run_epoch(bare_batches[: max(2, args.warmup)], "warm-up")  # allocator, kernels, optimizer state

    results: dict[str, list[dict]] = {"bare": [], "full (warm workers)": [], "full (new loader)": []}
    for repeat in range(args.repeats):
        results["bare"].append(run_epoch(bare_batches, "bare"))
        results["full (warm workers)"].append(run_epoch(warm_loader, "full"))
        # Built here and dropped after the pass (its workers exit), as fit() does each epoch.
        results["full (new loader)"].append(run_epoch(loader_for(dataset, args, 2 + repeat, steps), "full"))
    del warm_loader

    best = {name: max(runs, key=lambda r: r["images/s"]) for name, runs in results.items()}
    how = f"best of {args.repeats}" if args.repeats > 1 else "one run"
    for name, runs in results.items():
        r, values = best[name], ", ".join(f"{x['images/s']:.1f}" for x in runs)
        print(f"{name:>20}: {r['images/s']:7.1f} images/s  ({how}: {values}; {1e3 * batch / r['images/s']:.0f} ms/step)")
    print_steps(best)
    print_other_load(results, best)

    if args.profile_images > 0:
        print("\nwhere the loader's time goes (ms per image, one thread, after a warm-up):")
        stages = profile_stages(dataset, args.profile_images)
        for name, ms in stages.items():
            print(f"  {name:>24}: {ms:6.2f}")
        per_batch = stages["whole __getitem__"] * batch
        bare_step = 1e3 * batch / best["bare"]["images/s"]
        print(f"  => one batch of {batch} costs {per_batch:.0f} ms of one core to load vs a bare step of "
              f"{bare_step:.0f} ms on {torch.get_num_threads()} thread(s)")
        loader = loader_for(dataset, args, 50, steps)
        t0 = time.perf_counter()
        iterator = iter(loader)
        next(iterator)
        first = time.perf_counter() - t0
        for _ in iterator:
            pass
        alone = (steps * batch) / (time.perf_counter() - t0)
        print(f"  new loader: first batch after {1e3 * first:.0f} ms (worker start-up + one batch); "
              f"loader alone (no model): {alone:.0f} images/s over {steps} steps")
        print(f"  warm-up pass of the persistent loader (start-up + {steps} steps, no model): "
              f"{warm_pass_seconds:.2f} s")

    print(f"\nratio full (warm workers) / bare: {best['full (warm workers)']['images/s'] / best['bare']['images/s']:.2f} (goal >= 0.85)")
    print(f"ratio full (new loader, as fit() per epoch) / bare: {best['full (new loader)']['images/s'] / best['bare']['images/s']:.2f}")
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(f"(total {time.perf_counter() - started:.0f} s; peak RSS of the main process {peak_mib:.0f} MiB; "
          "load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + ")")


if __name__ == "__main__":
    main()
