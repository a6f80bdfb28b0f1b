"""Reuse the finished thing or make it: the one place that decides whether a prepared table, a
training run, a gallery index or a zero-shot row already exists for exactly these inputs.

Every long step of the demo pipeline, the study, ``04_demo`` and the CLI goes through here, so an
interrupted session picks up where it stopped, and a reuse never silently mixes two inputs:

- :func:`ensure_prepared`: the profile's data root (the synthetic tree generated on first use)
  and its ``images.csv``, re-prepared when the sampling parameters or the root changed.
- :func:`ensure_trained`: a finished run is read back only when its recorded config and table
  equal the ones asked for; a half-finished one is resumed (``fit`` refuses a changed config).
- :func:`ensure_index`: a gallery index is reused when it was built from the same checkpoint
  and table (by content, sha256) with the same post-processing, else rebuilt.
- :func:`ensure_zero_shot`: the untrained backbone's row, computed once per output file.
- :func:`comparison_table`: results side by side with their intervals, one row per model.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import asdict
from pathlib import Path

import pandas as pd

from helpers.core import identity
from helpers.core.config import REPO_ROOT, Config, get_config
from helpers.core.errors import InputError
from helpers.core.files import sha256_file, write_text_atomic
from helpers.core.schema import read_table
from helpers.data import sampling, synthetic
from helpers.evaluation import gallery, inference
from helpers.evaluation.metrics import INTERVALS, METRICS
from helpers.evaluation.postprocess import PostProcess, create_postprocess
from helpers.training import train

SYNTHETIC_MARKER = "synthetic.json"


# --------------------------------------------------------------------------- where things live


def results_root(profile: str) -> Path:
    """``results/<profile>`` (committed); fixture runs go under the git-ignored ``outputs/``."""
    return get_config("fixture").work_dir / "results" if profile == "fixture" else REPO_ROOT / "results" / profile


# --------------------------------------------------------------------------- data


def ensure_synthetic_tree(
    root: Path, n_items: int, seed: int, progress: bool = True, splits: tuple[int, int, int] | None = None
) -> Path:
    """Generate the synthetic tree at ``root`` unless the same one is already there."""
    wanted = {"items": n_items, "seed": seed} | ({} if splits is None else {"splits": list(splits)})
    marker = root / SYNTHETIC_MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise InputError(
                f"{marker}: holds a tree generated with {found}, not {wanted}; "
                "remove that folder or choose another outputs folder (C2S_OUTPUTS)"
            )
        return root
    if root.exists() and any(root.iterdir()):
        raise InputError(
            f"{root}: exists without {SYNTHETIC_MARKER} (an interrupted generation?); remove it to regenerate"
        )
    # Generate beside the target and rename, so an interrupted run leaves no half tree behind.
    partial = root.with_name(root.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    synthetic.generate_tree(partial, n_items=n_items, seed=seed, progress=progress, splits=splits)
    (partial / SYNTHETIC_MARKER).write_text(json.dumps(wanted))
    if root.exists():
        root.rmdir()
    partial.rename(root)
    return root


def data_root(cfg: Config, progress: bool = True) -> Path:
    """The data root of a config: the real one if set, else the profile's synthetic tree."""
    if cfg.data_root:
        root = Path(cfg.data_root).expanduser()
        if not root.is_dir():
            raise InputError(f"{root}: data root not found")
        return root
    return ensure_synthetic_tree(
        cfg.work_dir / "data", cfg.synthetic_items, cfg.synthetic_seed, progress, cfg.synthetic_splits
    )


def measured_nuisance(cfg: Config, root: Path, split: str = "test", progress: bool = False) -> pd.DataFrame | None:
    """The measured nuisances of the synthetic tree's consumer photos
    (:func:`helpers.data.synthetic.read_nuisance`); None on real data. A tree generated before the
    generator wrote them gets them back: its ``split`` is drawn again in a temporary folder, each
    redrawn consumer photo must be byte-identical to the tree's (or InputError names the first that
    is not), and the measures are kept in ``outputs/<profile>/`` (the tree is not touched)."""
    if cfg.data_root:
        return None
    found = synthetic.read_nuisance(root)
    if found is not None:
        return found
    kept = cfg.work_dir / f"{split}_{synthetic.NUISANCE_FILE}"
    if kept.is_file():
        return pd.read_csv(kept)
    cfg.work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cfg.work_dir) as scratch:
        redrawn = Path(scratch) / "tree"
        synthetic.generate_tree(
            redrawn,
            n_items=cfg.synthetic_items,
            seed=cfg.synthetic_seed,
            progress=progress,
            splits=cfg.synthetic_splits,
            only_splits=(split,),
        )
        measured = synthetic.read_nuisance(redrawn)
        for path in measured.path:
            mine = root / path
            if not mine.is_file() or (redrawn / path).read_bytes() != mine.read_bytes():
                raise InputError(f"{mine}: not the photo the generator draws for this tree; its nuisances are unknown")
    write_text_atomic(kept, measured.to_csv(index=False, lineterminator="\n"))
    return measured


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


# --------------------------------------------------------------------------- training runs


def run_differences(run_dir: Path, cfg: Config, table_path: Path) -> list[str]:
    """How the finished run in ``run_dir`` differs from ``cfg`` on ``table_path`` (empty: the same
    run, by :func:`helpers.core.identity.differences`)."""
    recorded = json.loads((run_dir / "config.json").read_text())
    return identity.differences(recorded.get("config", {}), recorded.get("table_sha256"), cfg, sha256_file(table_path))


def is_trained(run_dir: Path) -> bool:
    """``fit`` finished in ``run_dir``: it writes ``fit.json`` last (before ``fit.json`` existed,
    it wrote ``metrics.json`` last, with ``best_epoch``)."""
    if not (run_dir / "config.json").is_file():
        return False
    metrics = run_dir / "metrics.json"
    return (run_dir / "fit.json").is_file() or (metrics.is_file() and "best_epoch" in json.loads(metrics.read_text()))


def ensure_trained(
    cfg: Config,
    table_path: Path,
    data_root: Path,
    run_dir: Path,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict | None:
    """``fit``'s result (``best_epoch``, ``val``, ``stopped``) for the run of ``cfg`` in
    ``run_dir``: read back when it finished with the same recipe and table, resumed when
    half-finished, trained when absent. A finished run of another recipe is an error, never a
    silent reuse. ``None``: stopped after ``stop_after_epoch`` (as a disconnect would; the next
    call resumes). Test is not evaluated here (:func:`helpers.training.train.evaluate_run`)."""
    run_dir = Path(run_dir)
    if is_trained(run_dir):
        differs = run_differences(run_dir, cfg, table_path)
        if differs:
            raise InputError(
                f"{run_dir}: holds a finished run of another recipe ({'; '.join(differs)}); "
                "choose another folder or remove it"
            )
        if (run_dir / "fit.json").is_file():
            return json.loads((run_dir / "fit.json").read_text())
        written = json.loads((run_dir / "metrics.json").read_text())  # a run from before fit.json
        return {key: written[key] for key in ("best_epoch", "val", "stopped")}
    resume = (run_dir / "last.pt").is_file()
    return train.fit(
        cfg, table_path, data_root, run_dir, resume=resume, progress=progress, stop_after_epoch=stop_after_epoch
    )


# --------------------------------------------------------------------------- indexes and rows


def ensure_index(
    checkpoint: Path,
    table_path: Path,
    data_root: Path,
    index_dir: Path,
    split: str = "test",
    protocol: str = "official",
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    postprocess: PostProcess | None = None,
) -> Path:
    """The ``split`` gallery embedded once with ``checkpoint``, searched with ``postprocess``
    (default ``none``); rebuilt when the checkpoint, the table, the gallery definition or the
    post-processing changed. Only a folder holding an index is ever replaced."""
    index_dir = Path(index_dir)
    postprocess = postprocess or create_postprocess("none")
    meta_path = index_dir / "index.json"
    if meta_path.is_file():
        meta = json.loads(meta_path.read_text())
        same = (
            meta.get("checkpoint_sha256") == sha256_file(checkpoint)
            and meta.get("table_sha256") == sha256_file(table_path)
            and (meta.get("split"), meta.get("protocol")) == (split, protocol)
            and meta.get("postprocess", {"name": "none", "params": {}}) == postprocess.to_json()
        )
        if same:
            return index_dir
        shutil.rmtree(index_dir)
    elif index_dir.exists() and any(index_dir.iterdir()):
        raise InputError(f"{index_dir}: not empty and holds no index.json; choose another index folder")
    gallery.build_index(
        checkpoint,
        table_path,
        data_root,
        index_dir,
        split=split,
        protocol=protocol,
        device=device,
        num_workers=num_workers,
        progress=progress,
        postprocess=postprocess,
    )
    return index_dir


def ensure_zero_shot(cfg: Config, table_path: Path, data_root: Path, out: Path, progress: bool = True) -> dict:
    """Test metrics (official protocol) of ``cfg``'s backbone untrained: its pooled features,
    no head. Computed once into ``out``; a later call reads it back unless it was made with another
    config or with per-query intervals (then it is computed again)."""
    out = Path(out)
    recorded = json.loads(out.read_text()) if out.is_file() else {}
    made_with = json.loads(json.dumps(asdict(cfg), default=str))
    if recorded.get("config") != made_with or INTERVALS["items"] not in recorded.get("ci", ""):
        result = inference.evaluate_zero_shot(cfg, read_table(table_path), data_root, split="test", progress=progress)
        result["config"] = made_with
        out.parent.mkdir(parents=True, exist_ok=True)
        write_text_atomic(out, json.dumps(result, indent=2) + "\n")
    return json.loads(out.read_text())


def with_interval(result: dict, metric: str) -> str:
    """``0.475 [0.421, 0.530]``: the value with its bootstrap interval where one was computed."""
    if metric not in result:
        return "—"
    interval = result.get(metric + "_ci")
    return f"{result[metric]:.3f}" + (f" [{interval[0]:.3f}, {interval[1]:.3f}]" if interval else "")


def comparison_table(rows: list[dict]) -> pd.DataFrame:
    """One row per entry of ``rows`` (``{"model": name, "result": metrics, **other columns}``):
    the other columns first (in the order they first appear), then each metric with its interval,
    the query and gallery counts."""
    extra = list(dict.fromkeys(k for row in rows for k in row if k not in ("model", "result")))
    table = [
        {
            "model": row["model"],
            **{k: row.get(k, "—") for k in extra},
            **{m: with_interval(row["result"], m) for m in METRICS},
            "n_queries": row["result"].get("n_queries", "—"),
            "n_gallery": row["result"].get("n_gallery", "—"),
        }
        for row in rows
    ]
    return pd.DataFrame(table).set_index("model")
