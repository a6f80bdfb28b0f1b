"""What ``bench_train.py`` and ``bench_embed.py`` share: timing a pass, the per-step record
(wall, system CPU, minor page faults), the other-process load, the sweep of bare
configurations in fresh subprocesses, the loader profile and the report with its goal.

A bare variant runs in a subprocess of its own because the allocator setting is
process-wide and cannot be undone (glibc ``mallopt``, ``MALLOC_*_`` variables) and a process's
allocation history changes its page-fault count. The parent starts the same script with
``--bare-variant '<json>'``; the child measures one bare pass and prints one line
``BENCH_RESULT <json>`` (:func:`child_report`).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

RESULT_MARK = "BENCH_RESULT "
QUIET_LIMIT = 0.15  # cores used by other processes above which a run is flagged
# glibc reads these at start-up; a "default" variant must not inherit them from the shell.
ALLOCATOR_ENV = ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_")


# --------------------------------------------------------------------------- arguments


def add_common_args(parser: argparse.ArgumentParser) -> None:
    """Flags both benchmarks take (model, threads, repeats, profile, the sweep's common axes)."""
    parser.add_argument("--backbone", default=None, help="default: the demo profile's (tf_efficientnet_lite0)")
    parser.add_argument("--weights", default=None, help="auto | hub | packaged | none (default: the demo profile's)")
    parser.add_argument("--img-size", type=int, default=None, help="default: the demo profile's (160)")
    parser.add_argument(
        "--num-workers",
        type=int,
        default=None,
        help="the project's loader workers (default: runtime.resolve_num_workers on the CPU)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in the main process (default: torch's own choice, as the project)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed bare steps/batches before timing")
    parser.add_argument(
        "--repeats",
        type=int,
        default=1,
        help="rounds: each round runs every method and every bare variant once; best kept",
    )
    parser.add_argument("--profile-images", type=int, default=128, help="images for the loader profile (0: skip it)")
    parser.add_argument(
        "--sweep-allocator",
        default="default,tuned",
        help="bare variants' allocator: default (C2S_MALLOPT=0, no MALLOC_* env) and/or tuned (runtime.tune_allocator)",
    )
    parser.add_argument("--sweep-channels-last", default="off,on", help="bare variants' memory format")
    parser.add_argument(
        "--no-sweep",
        action="store_true",
        help="no subprocess variants: the best bare is the bare loop at the project's settings",
    )
    parser.add_argument("--bare-variant", default=None, help=argparse.SUPPRESS)  # internal: child mode


def parse_list(text: str, kind=str) -> list:
    values = [kind(v.strip()) for v in str(text).split(",") if v.strip()]
    return list(dict.fromkeys(values))  # order kept, duplicates dropped


def on_off(text: str) -> bool:
    if text not in ("on", "off"):
        raise SystemExit(f"expected on or off, got {text!r}")
    return text == "on"


def grid(**axes: list) -> list[dict]:
    """Every combination of the axes' values, as dicts, first axis slowest."""
    names = list(axes)
    return [dict(zip(names, values)) for values in itertools.product(*(axes[n] for n in names))]


def threads_axis(text: str) -> list[int]:
    """``auto``: torch's thread count and half of it; ``own``: torch's count; else a list."""
    import torch

    n = torch.get_num_threads()
    if text == "auto":
        return sorted({n, max(1, n // 2)}, reverse=True)
    if text == "own":
        return [n]
    return parse_list(text, int)


def describe(variant: dict) -> str:
    parts = []
    if "batch" in variant:
        parts.append(f"batch={variant['batch']:<3}")
    parts.append(f"alloc={variant['allocator']:<7}")
    parts.append(f"channels_last={'on ' if variant['channels_last'] else 'off'}")
    parts.append(f"threads={variant['threads']}")
    return " ".join(parts)


# --------------------------------------------------------------------------- the allocator


def project_allocator() -> str:
    """Apply the allocator setting the project's training entry points apply
    (``runtime.tune_allocator``; off with ``C2S_MALLOPT=0``) and name the result."""
    from helpers.core import runtime

    if runtime.tune_allocator():
        return "tuned"
    if any(os.environ.get(name) for name in ALLOCATOR_ENV):
        return "env"  # not tuned by the project, but MALLOC_*_ variables set in the shell
    return "default"


def variant_env(allocator: str) -> dict:
    env = os.environ.copy()
    for name in ALLOCATOR_ENV:
        env.pop(name, None)
    env["C2S_MALLOPT"] = "0" if allocator == "default" else "1"
    return env


# --------------------------------------------------------------------------- load and timing


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
    only (reads ``/proc/stat``); ``result`` stays None elsewhere."""

    def __enter__(self) -> OtherLoad:
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
        self.result = {
            "other": max(0.0, ((busy - self._start[1][0]) / hz - (own - self._start[2])) / wall),
            "steal": (steal - self._start[1][1]) / hz / wall,
        }


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


class Recorded:
    """A loader seen through :func:`record_steps`, keeping what the project's code reads from
    a loader (``dataset``, ``len``): the project's own loop then runs unchanged on it."""

    def __init__(self, loader, out: list):
        self.loader, self.out, self.dataset = loader, out, getattr(loader, "dataset", None)

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        return record_steps(self.loader, self.out)


def summarise_steps(steps_seen: list) -> dict:
    """The first step's (wall, system, faults) and, over the others, median wall and mean system/faults."""
    if not steps_seen:  # a pass whose loader could not be observed
        return {}
    wall, system, faults = (np.array(column, dtype=float) for column in zip(*steps_seen))
    rest = slice(1, None) if len(wall) > 1 else slice(None)
    return {
        "first": (float(wall[0]), float(system[0]), float(faults[0])),
        "rest": (float(np.median(wall[rest])), float(system[rest].mean()), float(faults[rest].mean())),
    }


def timed(run_pass) -> dict:
    """Time ``run_pass(steps_seen) -> images`` (which records its steps into ``steps_seen``)
    under :class:`OtherLoad`: images/s, seconds, the other load and the step summary."""
    steps_seen: list = []
    with OtherLoad() as load:
        started = time.perf_counter()
        images = run_pass(steps_seen)
        seconds = time.perf_counter() - started
    return {
        "images/s": images / seconds,
        "seconds": seconds,
        "images": images,
        "load": load.result,
        **summarise_steps(steps_seen),
    }


# --------------------------------------------------------------------------- subprocess variants


def run_variant(script: str, argv: list[str], variant: dict, timeout: float = 1800) -> dict:
    """One bare pass of ``variant`` in a fresh ``python script argv --bare-variant …``, with the
    variant's allocator environment; the child's result dict, or ``{"error": …}``."""
    command = [sys.executable, script, *argv, "--bare-variant", json.dumps(variant)]
    try:
        done = subprocess.run(
            command,
            env=variant_env(variant["allocator"]),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=str(ROOT),
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    for line in reversed(done.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK) :])
    tail = (done.stderr or done.stdout).strip().splitlines()[-3:]
    return {"error": f"exit {done.returncode}: " + " | ".join(tail)}


def sweep_argv(argv: list[str]) -> list[str]:
    """The parent's command line without its own ``--bare-variant`` (the children get theirs)."""
    out, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == "--bare-variant":
            skip = True
        elif not item.startswith("--bare-variant="):
            out.append(item)
    return out


def sweep_round(script: str, variants: list[dict], rows: dict[str, list[dict]]) -> None:
    """One bare pass of every variant, each in a fresh process, appended to ``rows["bare " + describe(v)]``."""
    argv = sweep_argv(sys.argv[1:])
    for n, variant in enumerate(variants, 1):
        print(f"  [{n}/{len(variants)}] bare {describe(variant)}", file=sys.stderr, flush=True)
        result = run_variant(script, argv, variant)
        if variant["allocator"] == "tuned" and result.get("allocator_applied", "tuned") != "tuned":
            result["note"] = "mallopt not applied (no glibc?)"
        rows["bare " + describe(variant)].append(result)


def child_setup(variant: dict) -> dict:
    """In a child: the variant's threads and allocator (before any model is built)."""
    import torch

    torch.set_num_threads(int(variant["threads"]))
    applied = project_allocator() if variant["allocator"] == "tuned" else "default"
    return {"allocator_applied": applied}


def child_report(result: dict) -> None:
    print(RESULT_MARK + json.dumps(result), flush=True)


# --------------------------------------------------------------------------- report


def print_header(what: str, threads_note: str = "") -> None:
    import torch

    print(what)
    print(
        f"cores={os.cpu_count()} torch {torch.__version__}, threads={torch.get_num_threads()} (interop "
        f"{torch.get_num_interop_threads()}){threads_note}"
    )
    print("load average before: {:.2f} {:.2f} {:.2f} (1/5/15 min; the machine may be shared)".format(*os.getloadavg()))


def best_run(runs: list[dict]) -> dict | None:
    ok = [r for r in runs if "error" not in r]
    return max(ok, key=lambda r: r["images/s"]) if ok else None


def print_rows(rows: dict[str, list[dict]], batch_of, unit: str, repeats: int) -> dict[str, dict]:
    """One line per method: best images/s, all runs, ms per step/batch; returns the best run of each."""
    best = {}
    width = max(len(name) for name in rows)
    for name, runs in rows.items():
        r = best_run(runs)
        if r is None:
            errors = "; ".join(x.get("error", "?") for x in runs)
            print(f"  {name:<{width}}  FAILED: {errors}")
            continue
        best[name] = r
        values = ", ".join(f"{x['images/s']:.1f}" if "error" not in x else "failed" for x in runs)
        how = f"  (runs: {values})" if repeats > 1 else ""
        note = f"  [{r['note']}]" if r.get("note") else ""
        print(
            f"  {name:<{width}}  {r['images/s']:8.1f} images/s  {1e3 * batch_of(name) / r['images/s']:6.0f} ms/{unit}"
            f"{how}{note}"
        )
    return best


def print_steps(best: dict[str, dict], unit: str) -> None:
    print(
        f"\nmain process per {unit}: wall ms / system CPU ms / minor page faults "
        f"(first {unit}; median wall and mean of the others)"
    )
    width = max(len(name) for name in best)
    for name, r in best.items():
        if "first" not in r:
            print(f"  {name:<{width}}  (not recorded per {unit})")
            continue
        (w0, s0, f0), (w, s_, f_) = r["first"], r["rest"]
        print(
            f"  {name:<{width}}  first {1e3 * w0:5.0f} / {1e3 * s0:5.0f} / {f0:7.0f};  others {1e3 * w:5.0f} / "
            f"{1e3 * s_:5.0f} / {f_:7.0f}"
        )


def print_other_load(kept: list[dict], every: list[dict]) -> bool:
    """Other processes' load during the runs kept (those the ratios use) and during all runs;
    a WARNING when a kept run was disturbed. Returns whether it warned."""

    def worst(runs: list) -> tuple[float, float] | None:
        loads = [r["load"] for r in runs if r and r.get("load")]
        return (max(x["other"] for x in loads), max(x["steal"] for x in loads)) if loads else None

    kept_load, every_load = worst(kept), worst(every)
    if kept_load is None:
        print("\nother processes: not measured (no /proc/stat)")
        return False
    line = (
        f"\nother processes during the timed runs kept: at most {kept_load[0]:.2f} cores busy, "
        f"{kept_load[1]:.2f} cores stolen by the hypervisor (of {os.cpu_count()})"
    )
    if every_load != kept_load:
        line += f"; during all runs: {every_load[0]:.2f} busy, {every_load[1]:.2f} stolen"
    print(line)
    if max(kept_load) > QUIET_LIMIT:
        print("WARNING: the machine was not quiet; these numbers are disturbed, rerun when it is idle")
        return True
    return False


def print_goal(label: str, project: dict, own: dict, best_name: str, best: dict, goal: float) -> None:
    """The two ratios and the verdict against the goal (which applies to the ratio vs the best bare)."""
    vs_own = project["images/s"] / own["images/s"]
    vs_best = project["images/s"] / best["images/s"]
    verdict = "PASS" if vs_best >= goal else "MISS"
    print(f"ratio {label} / bare at the project's own settings: {vs_own:.2f}")
    print(f"ratio {label} / best bare ({' '.join(best_name.split())}): {vs_best:.2f}   goal >= {goal}: {verdict}")


def print_footer(started: float) -> None:
    peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(
        f"(total {time.perf_counter() - started:.0f} s; peak RSS of the main process {peak_mib:.0f} MiB; "
        "load average after: " + " ".join(f"{v:.2f}" for v in os.getloadavg()) + ")"
    )


# --------------------------------------------------------------------------- loader profile


def profile_stages(dataset, n: int) -> dict[str, float]:
    """Mean ms per image of each preprocessing stage, on one thread (as in a DataLoader worker)."""
    import torch

    from helpers.data import transforms

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
            image = transforms.open_rgb(path)
            t1 = time.perf_counter()
            image = transforms.crop_box(image, dataset._boxes[i], transform.margin)
            t2 = time.perf_counter()
            image = transforms.photometric(image, transform.photometric)
            t3 = time.perf_counter()
            x = transforms.resize_image(
                image, transform.img_size, transform.resize, transform.interpolation, transform.fill
            )
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


def print_loader_profile(dataset, n: int, batch: int, model_ms: float, new_loader, unit: str) -> None:
    """Per-stage cost, the cost of one batch against the model's time for it, and a new
    loader of the project's settings alone (no model): its first batch and its throughput."""
    import torch

    print("\nwhere the loader's time goes (ms per image, one thread, after a warm-up):")
    stages = profile_stages(dataset, n)
    for name, ms in stages.items():
        print(f"  {name:>24}: {ms:6.2f}")
    print(
        f"  => one {unit} of {batch} costs {stages['whole __getitem__'] * batch:.0f} ms of one core to load vs "
        f"{model_ms:.0f} ms for the model at the project's settings on {torch.get_num_threads()} thread(s)"
    )
    loader = new_loader()
    started = time.perf_counter()
    iterator = iter(loader)
    first = next(iterator)
    images = len(first[0])
    first_s = time.perf_counter() - started
    for item in iterator:
        images += len(item[0])
    alone = images / (time.perf_counter() - started)
    print(
        f"  new loader at the project's settings ({loader.num_workers} workers): first batch after "
        f"{1e3 * first_s:.0f} ms; alone (no model) {alone:.0f} images/s"
    )
    del iterator, loader
