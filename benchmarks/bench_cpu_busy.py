"""How busy torch keeps the CPU's cores during a bare inference loop: wall time per batch and
(user + system CPU) / wall, from ``getrusage``. Shows why nothing can overlap the model on a
2-core CPU: OpenMP threads spin between ops, so the cores read fully busy. Run it again with
``OMP_WAIT_POLICY=PASSIVE`` (threads sleep when idle) to see the real load and its cost.

    python benchmarks/bench_cpu_busy.py
    OMP_WAIT_POLICY=PASSIVE python benchmarks/bench_cpu_busy.py
"""

from __future__ import annotations

import argparse
import resource
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="tf_efficientnet_lite0")
    parser.add_argument("--weights", default="packaged")
    parser.add_argument("--img-size", type=int, default=160)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    import torch

    from helpers.core import runtime
    from helpers.modeling import models

    runtime.tune_allocator()  # as the project's entry points run
    torch.manual_seed(0)
    model = models.create_embedder(args.backbone, 256, weights=args.weights, head="bn", img_size=args.img_size)
    model = model.eval().to(memory_format=torch.channels_last)
    x = torch.randn(args.batch, 3, args.img_size, args.img_size).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        for _ in range(5):  # warm-up
            model(x)
        cpu0, wall0 = cpu_seconds(), time.perf_counter()
        for _ in range(args.steps):
            model(x)
        wall, cpu = time.perf_counter() - wall0, cpu_seconds() - cpu0
    print(
        f"{args.backbone} {args.img_size} px batch {args.batch}, {torch.get_num_threads()} threads: "
        f"{wall / args.steps * 1000:.0f} ms per batch, {cpu / wall:.2f} cores busy"
    )


if __name__ == "__main__":
    main()
