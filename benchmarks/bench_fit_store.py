"""Wall time of one study-sized run, ``train.fit`` of the demo recipe (seed 0) on the prepared
demo table, with the decoded-crop store (as ``fit`` runs) or without it (``--no-store``: the
dataset is built without the store, so every epoch decodes the JPEGs again, as before the
store). Prints the wall time and each epoch's training images/s. Run both, alternating, on an
idle machine; the figures are in docs/benchmarks.md.

    python benchmarks/bench_fit_store.py               # 10 epochs with the store
    python benchmarks/bench_fit_store.py --no-store    # the same without it
    python benchmarks/bench_fit_store.py --epochs 4    # stop after 4 epochs (no test pass)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _timing  # noqa: E402, F401  (puts the repository root on sys.path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--no-store", action="store_true", help="decode every image every epoch")
    parser.add_argument("--epochs", type=int, default=None, help="stop after this many epochs (default: the recipe's)")
    args = parser.parse_args()

    import pandas as pd

    from helpers.core.config import get_config
    from helpers.data import datasets
    from helpers.experiments import artifacts
    from helpers.training import train

    if args.no_store:
        with_store = datasets.C2SDataset.__init__

        def without_store(self, *rows_root_transform, store=None, store_rows=None):
            with_store(self, *rows_root_transform)  # the rows fit kept, read from their JPEGs

        datasets.C2SDataset.__init__ = without_store
    cfg = get_config("demo")
    data_root, table_path = artifacts.ensure_prepared(cfg, progress=False)
    with tempfile.TemporaryDirectory() as run_dir:
        started = time.perf_counter()
        train.fit(cfg, table_path, data_root, run_dir, progress=False, stop_after_epoch=args.epochs)
        wall = time.perf_counter() - started
        rates = pd.read_csv(Path(run_dir) / "history.csv").train_images_per_s.dropna().round(1).tolist()
    print(
        f"{'without' if args.no_store else 'with'} the store: fit wall {wall:.1f} s; training images/s per epoch {rates}"
    )


if __name__ == "__main__":
    main()
