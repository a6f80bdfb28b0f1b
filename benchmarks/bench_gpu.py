"""Benchmark (GPU only): EfficientNet-B3 at 288 px, the full training loop vs a bare
forward + backward + step in the same run, and extraction throughput, in images/s.

For each batch size (default 64 and 128 = P×K with K = 4):

* **bare**: ``helpers.training.train.train_one_epoch`` over batches already on the GPU (one real
  batch of the demo table, preprocessed once, repeated): forward, loss, backward, clipping,
  AdamW step, scheduler step. No decoding, no sampler, no host→device copy.
* **full**: ``train_one_epoch`` over the training DataLoader as ``fit()`` builds it
  (``datasets.make_loader``: PKSampler batches, per-sample augmentation seeds, JPEG decode +
  crop + letterbox + augmentation in ``--num-workers`` persistent workers, pinned memory,
  ``non_blocking`` copies). The workers are warmed by one pass before timing.
* **extraction**: ``helpers.evaluation.inference.extract_embeddings`` over the demo table (eval
  transform, batch ``--embed-batch``), images/s.

Both training variants use bf16 autocast (fp16 + GradScaler where the GPU lacks bf16),
``channels_last`` and, with ``--compile``, ``torch.compile`` of the embedder (the config
flag ``compile``). Weights are random (``--weights none``): throughput does not depend on
them and nothing is downloaded. The data is the synthetic demo tree (generated on first use,
upsampled to 288 px by the letterbox).

Refuses to run without CUDA (exit 2): CPU figures would say nothing about the GPU path.

    python benchmarks/bench_gpu.py                        # B3, 288 px, batches 64 and 128
    python benchmarks/bench_gpu.py --compile --steps 50
    python benchmarks/bench_gpu.py --device cpu --backbone test_efficientnet --img-size 64 \
        --batches 8 --steps 2 --warmup 1 --num-workers 0 --embed-batch 32    # smoke test only
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default="efficientnet_b3")
    parser.add_argument("--img-size", type=int, default=288)
    parser.add_argument("--batches", default="64,128", help="global batch sizes (P×K, K = --k)")
    parser.add_argument("--k", type=int, default=4)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps first (cudnn autotune, compile)")
    parser.add_argument("--num-workers", type=int, default=None, help="default: helpers' rule (cores, max 8)")
    parser.add_argument("--embed-batch", type=int, default=256)
    parser.add_argument("--compile", action="store_true", help="torch.compile the embedder")
    parser.add_argument(
        "--device", default="cuda", help="cuda (the measurement); cpu only to smoke-test this script with tiny settings"
    )
    args = parser.parse_args()

    import torch

    device = args.device
    if device.startswith("cuda") and not torch.cuda.is_available():
        print(
            "error: bench_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False); "
            "CPU throughput is measured by benchmarks/bench_train.py",
            file=sys.stderr,
        )
        return 2
    cuda = device.startswith("cuda")

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize()

    from helpers.core import config, repro, runtime
    from helpers.core.schema import read_table
    from helpers.data import datasets, store, transforms
    from helpers.evaluation import inference
    from helpers.experiments import artifacts
    from helpers.modeling import models
    from helpers.training import train

    torch.backends.cudnn.benchmark = True  # fixed input shapes: let cuDNN pick its fastest kernels
    cfg = replace(
        config.get_config("demo"),
        backbone=args.backbone,
        weights="none",
        img_size=args.img_size,
        embed_dim=256,
        amp="auto",
        device=device,
        num_workers=args.num_workers,
        deterministic=False,
        embed_batch=args.embed_batch,
    )
    data_root, table_path = artifacts.ensure_prepared(cfg, progress=True)
    table = read_table(table_path)
    train_rows = table.loc[table.split == "train"].reset_index(drop=True)
    amp = runtime.amp_dtype(cfg, device)
    workers = runtime.resolve_num_workers(cfg, device)
    print(
        f"{torch.cuda.get_device_name(0) if cuda else 'CPU (smoke test, not a measurement)'}, torch {torch.__version__}, {args.backbone} at {args.img_size} px, "
        f"amp {amp}, channels_last, compile {args.compile}, {workers} workers, "
        f"{len(train_rows)} train images, {len(table)} images in all"
    )
    print(repro.env_info())

    rows = []
    for batch in (int(b) for b in args.batches.split(",")):
        if batch % args.k:
            print(f"error: batch {batch} is not a multiple of K={args.k}", file=sys.stderr)
            return 2
        p = batch // args.k
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        torch.manual_seed(0)
        embedder = models.create_embedder(
            args.backbone, cfg.embed_dim, weights="none", head=cfg.head, pooling=cfg.pooling, img_size=args.img_size
        ).to(device)
        embedder.to(memory_format=torch.channels_last)
        model = torch.compile(embedder) if args.compile else embedder
        criterion = train.create_criterion(cfg).to(device)
        optimizer = train.create_optimizer(cfg, embedder)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
        scaler = torch.amp.GradScaler("cuda", enabled=amp == torch.float16)
        # As fit() feeds it: the decoded-crop store beside the table (built once, then reused).
        transform = transforms.create_transform(cfg, embedder.data_config, cfg.augment)
        crops = store.ensure_store(train_rows, data_root, transform, Path(table_path).parent / "stores")
        dataset = datasets.C2SDataset(train_rows, data_root, transform, store=crops)
        steps = args.steps + args.warmup
        sampler = datasets.SampleSeeds(
            datasets.PKSampler((dataset.labels, dataset.domains), p, args.k, epoch_len=steps, seed=0), 0
        )
        loader = datasets.make_loader(dataset, batch_sampler=sampler, num_workers=workers, seed=0, device=device)

        def run(batches):
            sync()
            _, images, seconds = train.train_one_epoch(
                model, batches, criterion, optimizer, scheduler, scaler, device, amp, cfg.grad_clip
            )
            sync()
            return images / seconds

        # bare: one real batch, already on the GPU, repeated
        images, labels, index = next(iter(loader))
        on_gpu = (images.to(device).contiguous(memory_format=torch.channels_last), labels.to(device), index)
        t0 = time.perf_counter()
        run([on_gpu] * args.warmup)
        print(f"batch {batch}: {args.warmup} warm-up steps {time.perf_counter() - t0:.1f} s", flush=True)
        bare = run([on_gpu] * args.steps)
        # full: the loader, workers warmed by a first pass
        sampler.set_epoch(0)
        for _ in loader:
            pass
        sampler.batch_sampler.epoch_len = args.steps
        sampler.set_epoch(1)
        full = run(loader)
        print(f"batch {batch}: full loop {full:.0f} img/s, bare step {bare:.0f} img/s", flush=True)
        rows.append((batch, full, bare, torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan")))
        del loader

    eval_set = datasets.C2SDataset(table, data_root, transforms.create_transform(cfg, embedder.data_config))
    eval_loader = datasets.make_loader(
        eval_set, batch_size=args.embed_batch, num_workers=workers, seed=0, device=device
    )
    inference.extract_embeddings(model, eval_loader, device, progress=False, amp=amp)  # warm-up pass
    sync()
    t0 = time.perf_counter()
    inference.extract_embeddings(model, eval_loader, device, progress=False, amp=amp)
    sync()
    extract = len(eval_set) / (time.perf_counter() - t0)

    print("\n| batch | full loop img/s | bare step img/s | full / bare | peak GPU memory GiB |")
    print("|---|---|---|---|---|")
    for batch, full, bare, peak in rows:
        print(f"| {batch} | {full:.0f} | {bare:.0f} | {full / bare:.2f} | {peak:.1f} |")
    print(f"\nextraction: {extract:.0f} img/s ({len(eval_set)} images, batch {args.embed_batch})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
