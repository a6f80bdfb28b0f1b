"""Latency of one live-demo query: decode → crop → embed → exact search, as the app answers it.

The model is the demo profile's: tf_efficientnet_lite0 with its packaged ImageNet weights, at the
profile's input size and embedding dimension (untrained head here: training changes the weights'
values, not the work per query).
The gallery is 10,000 **random unit vectors** (seeded), not embeddings of real images: search
time depends only on the gallery's size and dimension. Their rows point at the fixture tree's
shop images so that the same index can be served (benchmarks/load_app.py).

    .venv/bin/python benchmarks/bench_app.py [--queries 200] [--gallery 10000] [--out DIR]

Prints p50 / p95 per query (and the parts alone) for a DeepFashion-sized photo with a box and a
1280×960 phone-sized photo without one. Goal: p95 < 100 ms on the 2-core CPU.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from helpers.apps import app
from helpers.core import config
from helpers.experiments import artifacts
from helpers.modeling import models

DEFAULT_INDEX = config.OUTPUTS / "bench" / "app_index_10k"


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def build_bench_index(out: Path, n_gallery: int = 10_000, seed: int = 0) -> Path:
    """A saved index: the demo model + ``n_gallery`` random unit embeddings (rebuilt if the size differs)."""
    if (out / "index.json").is_file() and len(pd.read_csv(out / "gallery.csv", usecols=["path"])) == n_gallery:
        return out
    import shutil

    shutil.rmtree(out, ignore_errors=True)
    demo = config.get_config("demo")
    root, table_path = artifacts.ensure_prepared(config.get_config("fixture"), progress=False)
    shops = pd.read_csv(table_path, dtype={"path": str, "item_id": str})
    shops = shops[shops.domain == "shop"].reset_index(drop=True)
    gallery = shops.iloc[np.arange(n_gallery) % len(shops)].reset_index(drop=True)
    gallery["item_id"] = [f"random_{i:05d}" for i in range(n_gallery)]  # not the pictured items: timing only
    rng = np.random.default_rng(seed)
    embeddings = rng.standard_normal((n_gallery, demo.embed_dim)).astype(np.float32)
    embeddings /= np.linalg.norm(embeddings, axis=1, keepdims=True)
    embedder = models.create_embedder(
        demo.backbone, embed_dim=demo.embed_dim, weights=demo.weights, img_size=demo.img_size
    ).eval()
    meta = {
        "n_gallery": n_gallery,
        "dim": demo.embed_dim,
        "split": "test",
        "protocol": "official",
        "data_root": str(root),
        "table": None,
        "note": "benchmark index: random unit embeddings, rows pointing at fixture shop images",
    }
    gallery.GalleryIndex(
        embeddings, gallery, {"model": embedder.state_dict(), "model_config": embedder.config}, demo.to_dict(), meta
    ).save(out)
    return out


def jpeg(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def percentiles(seconds: list[float]) -> str:
    ms = np.asarray(seconds) * 1000
    return f"p50 {np.percentile(ms, 50):6.1f} ms   p95 {np.percentile(ms, 95):6.1f} ms   max {ms.max():6.1f} ms"


def time_calls(fn, n: int, warmup: int = 10, cpu: list | None = None) -> list[float]:
    """Wall seconds per call; ``cpu`` (if given) collects this process's CPU seconds per call,
    which other processes on a shared machine inflate far less than wall time."""
    for _ in range(warmup):
        fn()
    out = []
    for _ in range(n):
        start, start_cpu = time.perf_counter(), time.process_time()
        fn()
        out.append(time.perf_counter() - start)
        if cpu is not None:
            cpu.append(time.process_time() - start_cpu)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--gallery", type=int, default=10_000)
    parser.add_argument("--out", type=Path, default=DEFAULT_INDEX, help="where the benchmark index is kept")
    args = parser.parse_args()

    index_dir = build_bench_index(args.out, args.gallery)
    demo = app.load_app(str(index_dir))  # loads once and warms up, as the server does
    root = demo.data_root
    consumer = sorted(root.glob("img/*/*/*/comsumer_*.jpg"))[0]
    with Image.open(consumer) as image:
        small, size = consumer.read_bytes(), image.size
    box = f"{size[0] // 8},{size[1] // 8},{size[0] * 7 // 8},{size[1] * 7 // 8}"
    phone = jpeg(Image.open(consumer).convert("RGB").resize((1280, 960)))

    load = os.getloadavg()
    print(
        f"machine: {cpu_name()}, {os.cpu_count()} cores, torch {torch.__version__} with "
        f"{torch.get_num_threads()} thread(s) per query (helpers.apps.app.QUERY_THREADS); load average before: {load[0]:.2f}"
    )
    print(
        f"model: demo (tf_efficientnet_lite0, {demo.index.embed_image.__self__.run_config['weights']} weights, "
        f"{config.get_config('demo').img_size} px, {config.get_config('demo').embed_dim}-d); gallery: "
        f"{demo.n_gallery} random unit embeddings; {args.queries} queries each, top-5\n"
    )

    for name, data, crop in (
        (f"{size[0]}×{size[1]} JPEG ({len(small) // 1024} kB), box crop", small, box),
        (f"1280×960 JPEG ({len(phone) // 1024} kB), whole photo", phone, None),
    ):
        answer = demo.answer(data, box=crop, k=5)
        assert answer.ok, answer.message
        cpu: list[float] = []
        total = time_calls(lambda: demo.answer(data, box=crop, k=5), args.queries, cpu=cpu)
        decode = time_calls(lambda: app.decode_image(data), args.queries)
        picture = app.decode_image(data)
        parsed = app.parse_box(crop, picture.size)
        embed = time_calls(lambda: demo.index.embed_image(picture, box=parsed), args.queries)
        query = demo.index.embed_image(picture, box=parsed)
        search = time_calls(lambda: demo.index.search(query, 5), args.queries)
        print(
            f"{name}\n  whole query  {percentiles(total)}\n  its CPU time {percentiles(cpu)}\n  decode       {percentiles(decode)}\n"
            f"  crop+embed   {percentiles(embed)}\n  search 10k   {percentiles(search)}"
        )
    print(f"\nload average after: {os.getloadavg()[0]:.2f} (other processes share these cores)")


if __name__ == "__main__":
    main()
