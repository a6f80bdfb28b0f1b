"""Robustness of trained runs to consumer-photo nuisances, without retraining: a dose-response.

Each run's ``best.pt`` is evaluated on val trees in which one nuisance of the synthetic consumer
photos (:class:`helpers.data.synthetic.Nuisance`: ``clutter``, ``occlusion``, ``colour_cast``,
``box_jitter``) is written at several strengths; the items, poses and shop photos stay the
same, so every run is scored on the same queries at every strength and differences between
variants pair by seed and by query, as in the study (:mod:`helpers.experiments.statistics`).

The val items are those the study compares runs on: with ``stop_items`` > 0, the val items
early stopping did not see (:func:`helpers.data.sampling.split_stop_items`); queries are their
consumer photos, the gallery their shop photos (the official protocol's val). A tree is
written once per (nuisance, strength) under the caller's cache folder, val items only, and
reused; a folder the cache did not write is never touched. The dose that writes the tree the runs
trained on (every nuisance at its default) is not evaluated again: its ranks are each run's own
``val_ranks.csv``. With a ``store`` folder each run's ranks at every dose are kept there as they
are computed (``<run folder name>.csv.gz``) and read back later, so a study continued on another
machine, where the runs' checkpoints are gone, still has them.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from helpers.core import runtime
from helpers.core.config import DATA_FIELDS, Config, config_from_dict
from helpers.core.errors import InputError
from helpers.core.files import portable_path, write_text_atomic
from helpers.core.progress import progress_bar
from helpers.core.schema import read_table
from helpers.data import sampling, synthetic
from helpers.evaluation.inference import ProtocolEvaluator
from helpers.experiments import comparison, statistics
from helpers.experiments import runs as study_runs
from helpers.modeling import checkpoints

NUISANCES = tuple(synthetic.Nuisance().to_dict())
KS = (1, 5, 10)
MARKER = "robustness_cache.json"  # what a cache folder holds (as artifacts.ensure_synthetic_tree's synthetic.json)
RANK_COLUMNS = ("path", "item_id", "first_hit_rank", "average_precision")
WALL_TIMES = "wall_s.json"  # in a store: seconds of evaluation per run


@dataclass(frozen=True)
class Robustness:
    """``summary``: one row per (nuisance, strength, variant, seed) with ``run``, val ``recall@K``,
    ``map`` and ``n_queries``; ``ranks``: the same keys and one row per query (``path``,
    ``item_id``, 0-based ``first_hit_rank``, ``average_precision``), what the paired tests read."""

    summary: pd.DataFrame
    ranks: pd.DataFrame


# --------------------------------------------------------------------------- the trees


def _data_key(cfg: Config) -> tuple:
    """What fixes a run's val queries: its data fields and its stop items."""
    return tuple(getattr(cfg, name) for name in DATA_FIELDS) + (cfg.stop_items,)


def _check_synthetic(cfg: Config) -> None:
    """A nuisance tree re-creates the run's val split only for a synthetic tree whose val items
    the run kept whole (``sample`` keeps all val items; no ``resplit``)."""
    if cfg.data_root:
        raise InputError(f"robustness needs a run trained on the synthetic tree, not on {cfg.data_root}")
    if cfg.resplit is not None or (cfg.sample is not None and cfg.sample[1] < 1):
        raise InputError("robustness needs a run whose val is the tree's whole val split (no resplit, val sample 1)")


def nuisance_tree(
    cfg: Config, nuisance: str, strength: float, cache_dir: str | Path, progress: bool = True
) -> tuple[Path, Path]:
    """``(data_root, images.csv)`` of ``cfg``'s synthetic tree, val items only, with ``nuisance`` at
    ``strength`` (the others at their defaults): written on first use under ``cache_dir``, read
    back after. InputError when the folder holds something else."""
    _check_synthetic(cfg)
    synthetic.Nuisance.from_strengths({nuisance: strength})  # an unknown name or bad strength, now
    splits = cfg.synthetic_splits
    # One folder per source tree and dose; repr keeps distinct strengths in distinct folders.
    tree = f"items{cfg.synthetic_items}_seed{cfg.synthetic_seed}"
    tree += "" if splits is None else "_splits" + "-".join(map(str, splits))
    folder = Path(cache_dir).expanduser() / tree / f"{nuisance}_{float(strength)!r}"
    wanted = {
        "items": cfg.synthetic_items,
        "seed": cfg.synthetic_seed,
        "splits": None if splits is None else list(splits),
        "only_splits": ["val"],
        "nuisance": synthetic.Nuisance.from_strengths({nuisance: strength}).to_dict(),
    }
    root = _ensure_folder(folder / "data", wanted, progress, _write_tree)
    categories = "all" if cfg.categories is None else "-".join(cfg.categories)
    prepared = _ensure_folder(
        folder / f"prepared_{categories}", {"categories": categories}, progress, _prepare, cfg, root
    )
    return root, prepared / "images.csv"


def _write_tree(out: Path, wanted: dict, progress: bool) -> None:
    synthetic.generate_tree(
        out,
        n_items=wanted["items"],
        seed=wanted["seed"],
        progress=progress,
        splits=None if wanted["splits"] is None else tuple(wanted["splits"]),
        nuisance=wanted["nuisance"],
        only_splits=("val",),
    )


def _prepare(out: Path, wanted: dict, progress: bool, cfg: Config, root: Path) -> None:
    # Val whole (the tree holds nothing else): the rows of the run's own val, same paths.
    sampling.prepare(
        root, out, categories=cfg.categories, sample=(0.0, 1.0, 0.0), seed=cfg.split_seed, progress=progress
    )


def _ensure_folder(folder: Path, wanted: dict, progress: bool, write, *args) -> Path:
    """``folder`` made by ``write(partial, wanted, progress, *args)`` unless its marker says it
    holds ``wanted`` already; written beside it and renamed, so an interruption leaves no half
    folder. A folder without the marker, or with another one, is refused, never replaced."""
    marker = folder / MARKER
    if marker.is_file():
        found = json.loads(marker.read_text())
        if found != wanted:
            raise InputError(f"{marker}: holds {found}, not {wanted}; remove that folder or choose another cache")
        return folder
    if folder.exists():
        raise InputError(
            f"{folder}: exists without {MARKER} (not written by this cache); remove it or choose another cache"
        )
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)  # only ever our own interrupted attempt
    write(partial, wanted, progress, *args)
    (partial / MARKER).write_text(json.dumps(wanted))
    partial.rename(folder)
    return folder


def compare_table(cfg: Config, table: pd.DataFrame) -> pd.DataFrame:
    """The val the study compares runs on: without the stop items when ``cfg.stop_items`` > 0."""
    return sampling.split_stop_items(table, cfg.stop_items, cfg.split_seed)[1] if cfg.stop_items else table


# --------------------------------------------------------------------------- evaluating runs


def _load_runs(runs: Mapping[str, Sequence[str | Path]]) -> list[tuple[str, Path, Config]]:
    """``(variant, run_dir, cfg)`` per run (its recorded ``config.json``); InputError when the
    runs' val queries differ (their data fields or stop items) or a variant repeats a seed."""
    loaded, seeds = [], set()
    for variant, run_dirs in runs.items():
        for run_dir in map(Path, run_dirs):
            if not (run_dir / "config.json").is_file():
                raise InputError(f"{run_dir}: no config.json; not a training run")
            cfg = config_from_dict(json.loads((run_dir / "config.json").read_text())["config"])
            if (variant, cfg.seed) in seeds:
                raise InputError(f"variant {variant!r} has two runs of seed {cfg.seed}")
            seeds.add((variant, cfg.seed))
            loaded.append((variant, run_dir, cfg))
    if not loaded:
        raise InputError("no runs to evaluate")
    keys = {_data_key(cfg) for *_, cfg in loaded}
    if len(keys) > 1:
        raise InputError("the runs were trained on different data or stop items: their val queries would not pair")
    return loaded


def is_trained_tree(nuisance: str, strength: float) -> bool:
    """Whether the dose writes the tree the runs trained on (every nuisance at its default), whose
    val ranks each run wrote itself (``val_ranks.csv``)."""
    return synthetic.Nuisance.from_strengths({nuisance: strength}).to_dict() == synthetic.Nuisance().to_dict()


def stored_ranks_path(store: Path, run_dir: Path) -> Path:
    return Path(store) / f"{Path(run_dir).name}.csv.gz"


def _read_stored(store: Path | None, run_dir: Path) -> pd.DataFrame:
    path = None if store is None else stored_ranks_path(store, run_dir)
    if path is None or not path.is_file():
        return pd.DataFrame(columns=["nuisance", "strength", *RANK_COLUMNS])
    found = pd.read_csv(path, float_precision="round_trip")
    missing = [c for c in ("nuisance", "strength", *RANK_COLUMNS) if c not in found.columns]
    if missing:
        raise InputError(f"{path}: no column {', '.join(missing)}")
    return found


def _write_stored(store: Path, run_dir: Path, ranks: pd.DataFrame, seconds: float) -> None:
    """The run's ranks so far, atomically, gzipped without a timestamp (the same ranks give the
    same bytes); ``seconds`` (this dose's evaluation, its tree included) added to the run's entry
    of :data:`WALL_TIMES`."""
    path = stored_ranks_path(store, run_dir)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".tmp")
    ranks.to_csv(partial, index=False, lineterminator="\n", compression={"method": "gzip", "mtime": 0})
    os.replace(partial, path)
    times = stored_wall_times(store)
    times[path.name] = round(times.get(path.name, 0.0) + seconds, 1)
    write_text_atomic(Path(store) / WALL_TIMES, json.dumps(dict(sorted(times.items())), indent=2) + "\n")


def stored_wall_times(store: Path) -> dict[str, float]:
    """Seconds spent evaluating each stored run (by its ranks file's name)."""
    path = Path(store) / WALL_TIMES
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_robustness(
    runs: Mapping[str, Sequence[str | Path]],
    strengths: Mapping[str, Sequence[float]],
    cache_dir: str | Path,
    device: str = "auto",
    progress: bool = True,
    store: str | Path | None = None,
) -> Robustness:
    """Every run (``{variant: [run_dir, ...]}``, the seed read from each run) on the val tree of
    every ``{nuisance: [strength, ...]}``: val Recall@1/5/10 and per-query ranks of ``best.pt``
    (see :class:`Robustness`). Trees are written under ``cache_dir`` once and reused. Ranks come,
    in this order, from ``store`` (a run's earlier doses), the run's ``val_ranks.csv`` (the
    trained tree's dose), or ``best.pt`` evaluated on the dose's tree (then added to ``store``)."""
    loaded = _load_runs(runs)
    device = runtime.resolve_device(device)
    doses = [(n, float(s)) for n, values in strengths.items() for s in values]
    if not doses:
        raise InputError("no (nuisance, strength) to evaluate")
    kept = {run_dir: _read_stored(store, run_dir) for _, run_dir, _ in loaded}
    embedders, summary, ranks = {}, [], []
    bar = progress_bar(total=len(doses) * len(loaded), desc="robustness", unit="run", disable=not progress)
    for nuisance, strength in doses:
        tree = None
        for variant, run_dir, cfg in loaded:
            old = kept[run_dir]
            per_query = old.loc[(old.nuisance == nuisance) & (old.strength == strength), list(RANK_COLUMNS)]
            if per_query.empty and is_trained_tree(nuisance, strength):
                per_query = pd.read_csv(run_dir / study_runs.VAL_RANKS)[list(RANK_COLUMNS)]
            elif per_query.empty:
                if not (run_dir / "best.pt").is_file():
                    raise InputError(
                        f"{run_dir}: no best.pt and no stored ranks at {nuisance} {strength} "
                        f"({stored_ranks_path(store, run_dir) if store else 'no store'}); retrain the run to evaluate it"
                    )
                started = time.perf_counter()
                if tree is None:
                    root, table_path = nuisance_tree(loaded[0][2], nuisance, strength, cache_dir, progress)
                    tree = root, compare_table(loaded[0][2], read_table(table_path))
                if run_dir not in embedders:
                    embedders[run_dir] = checkpoints.load_embedder(run_dir / "best.pt")[0].to(device)
                embedder = embedders[run_dir]
                evaluator = ProtocolEvaluator(
                    cfg, embedder.data_config, tree[1], tree[0], "val", "official", device, cache=False
                )
                per_query = evaluator.with_ranks(embedder, progress=False)[1][list(RANK_COLUMNS)]
                if store is not None:
                    added = per_query.assign(nuisance=nuisance, strength=strength)[old.columns]
                    kept[run_dir] = added if old.empty else pd.concat([old, added], ignore_index=True)
                    _write_stored(Path(store), run_dir, kept[run_dir], time.perf_counter() - started)
            per_query = per_query.reset_index(drop=True)
            key = {"nuisance": nuisance, "strength": strength, "variant": variant, "seed": cfg.seed}
            if ranks and ranks[-1].nuisance.iat[0] == nuisance and ranks[-1].strength.iat[0] == strength:
                if per_query.path.tolist() != ranks[-1].path.tolist():
                    raise InputError(
                        f"{run_dir}: its ranks at {nuisance} {strength} hold other queries than the other runs'"
                    )
            metrics = study_runs.metrics_from_ranks(per_query)
            summary.append(
                {**key, "run": portable_path(run_dir), **{f"recall@{k}": metrics[f"recall@{k}"] for k in KS}}
                | {"map": metrics["map"], "n_queries": metrics["n_queries"]}
            )
            ranks.append(per_query.assign(**key)[[*key, *RANK_COLUMNS]])
            bar.update()
    bar.close()
    return Robustness(pd.DataFrame(summary), pd.concat(ranks, ignore_index=True))


# --------------------------------------------------------------------------- statistics and plot


def _doses(result: Robustness):
    """``((nuisance, strength), its summary rows, its ranks by (variant, seed))`` in summary order."""
    for dose, rows in result.summary.groupby(["nuisance", "strength"], sort=False):
        ranks = result.ranks.loc[(result.ranks.nuisance == dose[0]) & (result.ranks.strength == dose[1])]
        yield dose, rows, {key: frame for key, frame in ranks.groupby(["variant", "seed"], sort=False)}


def _test_row(test: statistics.CrossedTest, alpha: float) -> dict:
    low, high = test.interval(alpha)
    return {"diff": test.diff, "low": low, "high": high, "se": test.se, "df": test.df, "p": test.p_value} | {
        "n_seeds": test.n_seeds,
        "n_items": test.n_items,
        "n_queries": test.n_queries,
    }


def paired_differences(
    result: Robustness, variant: str, reference: str, k: int = 5, alpha: float = statistics.ALPHA
) -> pd.DataFrame:
    """Per (nuisance, strength): ``variant``'s Recall@``k`` minus ``reference``'s on the seeds both
    have, the crossed seed × item test's difference, ``1 - alpha`` interval, SE, df, p-value and
    verdict (:func:`helpers.experiments.statistics.crossed_test`, paired by seed and query)."""
    rows = []
    for (nuisance, strength), runs, ranks in _doses(result):
        grids = comparison.paired_grids(runs, ranks, variant, k, reference)
        if grids is None:
            raise InputError(f"{variant!r} and {reference!r} share no seed at {nuisance} {strength}")
        comparison.check_same_queries(ranks)
        test = statistics.crossed_test(*grids, comparison.query_items(next(iter(ranks.values()))))
        row = {"nuisance": nuisance, "strength": strength, "variant": variant, "reference": reference, "k": k}
        rows.append(row | _test_row(test, alpha))
        rows[-1]["verdict"] = statistics.verdict(rows[-1]["low"], rows[-1]["high"])
    return pd.DataFrame(rows)


def recall_intervals(result: Robustness, k: int = 5, alpha: float = statistics.ALPHA) -> pd.DataFrame:
    """Per (nuisance, strength, variant): Recall@``k`` over its seeds and queries with the crossed
    seed × item interval (the test of its hit@``k`` against an all-miss grid: the same statistics
    as the differences)."""
    rows = []
    for (nuisance, strength), runs, ranks in _doses(result):
        for variant in runs.variant.unique():
            seeds = sorted(runs.loc[runs.variant == variant, "seed"])
            hits = comparison.hit_grid({s: ranks[(variant, s)] for s in seeds}, seeds, k)
            test = statistics.crossed_test(
                np.zeros_like(hits), hits, comparison.query_items(ranks[(variant, seeds[0])])
            )
            test_row = _test_row(test, alpha)
            rows.append({"nuisance": nuisance, "strength": strength, "variant": variant, "k": k} | test_row)
    return pd.DataFrame(rows).rename(columns={"diff": f"recall@{k}"})


def plot_dose_response(
    table: pd.DataFrame,
    k: int = 5,
    variants: Sequence[str] | None = None,
    ncols: int | None = None,
    figsize: tuple[float, float] | None = None,
) -> plt.Figure:
    """One panel per nuisance (``ncols`` a row, default all in one): val Recall@``k`` (y) against
    the nuisance's strength (x), a line per variant with its crossed seed × item 95 % interval
    (``table``: :func:`recall_intervals`' rows, as committed); a dotted line at the strength the
    runs were trained with (1; box jitter 0)."""
    variants = list(variants or table.variant.unique())
    nuisances = list(table.nuisance.unique())
    ncols = min(ncols or len(nuisances), len(nuisances))
    nrows = -(-len(nuisances) // ncols)
    size = figsize or (4 * ncols, 3.4 * nrows)
    fig, axes = plt.subplots(nrows, ncols, figsize=size, sharey=True, squeeze=False)
    for ax in axes.flat[len(nuisances) :]:
        ax.set_visible(False)
    for ax, nuisance in zip(axes.flat, nuisances):
        for variant in variants:
            rows = table.loc[(table.nuisance == nuisance) & (table.variant == variant)].sort_values("strength")
            (line,) = ax.plot(rows.strength, rows[f"recall@{k}"], marker="o", label=variant)
            band = rows.low.clip(0, 1), rows.high.clip(0, 1)
            ax.fill_between(rows.strength, *band, color=line.get_color(), alpha=0.2, linewidth=0)
        ax.axvline(getattr(synthetic.Nuisance(), nuisance), color="grey", linestyle=":", linewidth=1)
        ax.set(title=nuisance.replace("_", " "), xlabel="strength (trained at the dotted line)")
    for row in axes:
        row[0].set_ylabel(f"val Recall@{k}, 95 % CI" if nrows > 1 else f"val Recall@{k}, 95 % interval (seeds × items)")
    axes[0][0].legend(fontsize="small", frameon=False)
    fig.tight_layout()
    return fig
