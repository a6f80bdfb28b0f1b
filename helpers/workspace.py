"""Resolve a profile to data on disk: the real DeepFashion root, or a generated synthetic tree.

Notebooks and ``make demo`` call :func:`ensure_prepared`; it generates the synthetic tree and
the prepared table on first use and reuses them afterwards, refusing to reuse a tree that was
generated with other parameters (a reuse never silently mixes two datasets).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from . import sampling, synthetic
from .config import Config
from .errors import InputError

MARKER = "synthetic.json"


def ensure_synthetic_tree(root: Path, n_items: int, seed: int, progress: bool = True) -> Path:
    """Generate the synthetic tree at ``root`` unless the same one is already there."""
    wanted = {"items": n_items, "seed": seed}
    marker = root / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise InputError(
                f"{marker}: holds a tree generated with {found}, not {wanted}; "
                "remove that folder or choose another outputs folder (C2S_OUTPUTS)"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(f"{root}: exists without {MARKER} (an interrupted generation?); remove it to regenerate")
    # Generate beside the target and rename, so an interrupted run leaves no half tree behind.
    staging = root.with_name(root.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    synthetic.generate_tree(staging, n_items=n_items, seed=seed, progress=progress)
    (staging / MARKER).write_text(json.dumps(wanted))
    if root.exists():
        root.rmdir()
    staging.rename(root)
    return root


def data_root(cfg: Config, progress: bool = True) -> Path:
    """The data root of a config: the real one if set, else the profile's synthetic tree."""
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        if not root.is_dir():
            raise InputError(f"{root}: data root not found")
        return root
    return ensure_synthetic_tree(cfg.work_dir / "data", cfg.synthetic_items, cfg.synthetic_seed, progress)


def ensure_prepared(cfg: Config, progress: bool = True) -> tuple[Path, Path]:
    """``(data_root, images.csv)`` for a config, preparing the table on first use.

    A real data root's table goes under ``outputs/<profile>/prepared`` too; the dataset
    itself is only read.
    """
    root = data_root(cfg, progress)
    table_path = cfg.prepared_dir / "images.csv"
    summary_path = cfg.prepared_dir / "summary.json"
    parameters = {
        "categories": list(cfg.categories) if cfg.categories else "all",
        "sample": list(cfg.sample) if cfg.sample and cfg.resplit is None else None,
        "resplit": list(cfg.resplit) if cfg.resplit else None,
        "seed": cfg.split_seed,
    }
    if summary_path.is_file():
        summary = json.loads(summary_path.read_text())
        found = {k: summary["parameters"][k] for k in parameters}
        if summary["data_root"] == str(root) and found == parameters and table_path.is_file():
            return root, table_path
    sampling.prepare(
        root,
        cfg.prepared_dir,
        categories=cfg.categories,
        sample=None if cfg.resplit else cfg.sample,
        resplit=cfg.resplit,
        seed=cfg.split_seed,
        overwrite=True,
        progress=progress,
    )
    return root, table_path
