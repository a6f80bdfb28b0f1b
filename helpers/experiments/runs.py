"""The study's runs: where each lives, whether it can be reused, training the missing ones, and
reading back what they wrote.

**Runs.** One run directory per (variant, seed): ``<results>/<experiment>/<variant>_seed<N>_<key>/``
with ``key`` the run's identity (:func:`helpers.core.identity.run_key`: the config without its
runtime fields, seed included, and the table's sha256). A run identical to one finished anywhere
in the study (the baseline that every experiment of a stage shares) is reused, not retrained; a
half-finished one is resumed explicitly (``fit`` itself refuses a checkpoint of another run).
``fit`` keeps ``best.pt`` and writes ``val_ranks.csv`` (every val query's first-hit rank and
average precision, from the validation pass that selected ``best.pt``); the paired statistics
read those. A study run never evaluates test: the final evaluation (``04_demo``) does, once.
``study_run.json`` marks a run of the study: its key, seed, whether it finished, and its wall
time summed over every session that worked on it.
"""

from __future__ import annotations

import json
import math
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats

from helpers.core import identity
from helpers.core.config import Config, config_from_dict
from helpers.core.errors import InputError
from helpers.core.files import sha256_file, write_text_atomic
from helpers.evaluation.metrics import DEFAULT_KS
from helpers.experiments import artifacts
from helpers.experiments.catalogue import POSTPROCESS, PRIMARY, SECONDS_PER_EPOCH
from helpers.training import train

MARKER = "study_run.json"
VAL_RANKS = "val_ranks.csv"
# While a run trains, its marker's wall time is brought up to date this often (seconds): a
# process killed without warning (a machine taken back) loses at most this much of it.
WALL_CLOCK_S = 30.0
HISTORY_COLUMNS = ("loss", f"val_{PRIMARY}")


def slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def _keep_wall_time(path: Path, record: dict, started: float, stop: threading.Event) -> None:
    """Every :data:`WALL_CLOCK_S` until ``stop``: ``record`` (unfinished) with its wall time so far."""
    while not stop.wait(WALL_CLOCK_S):
        wall_s = round(record["wall_s"] + time.perf_counter() - started, 1)
        write_text_atomic(path, json.dumps(record | {"wall_s": wall_s}, indent=2) + "\n")


def find_runs(root: Path) -> dict[str, Path]:
    """key → run directory, for every run the study started anywhere under ``root``."""
    found = {}
    for marker in sorted(Path(root).glob(f"*/*/{MARKER}")):
        found.setdefault(json.loads(marker.read_text())["key"], marker.parent)
    return found


def marker(run_dir: Path) -> dict:
    return json.loads((Path(run_dir) / MARKER).read_text())


def is_finished(run_dir: Path) -> bool:
    return (Path(run_dir) / MARKER).is_file() and marker(run_dir).get("finished", False)


def ensure_run(
    cfg: Config,
    table_path: Path,
    data_root: Path,
    run_dir: Path,
    root: Path,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> tuple[Path, str]:
    """``(the run directory holding this run, what was done)``: ``reused`` (finished anywhere
    under ``root``), ``resumed`` (a half-finished one continued), ``trained``, or
    ``interrupted`` (``stop_after_epoch`` ended it after that epoch, as a disconnect would; the
    next call resumes it)."""
    table_sha = sha256_file(table_path)
    key = identity.run_key(cfg, table_sha)
    existing = find_runs(root).get(key)
    if existing is not None and is_finished(existing):
        return existing, "reused"
    run_dir = existing or run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    record = marker(run_dir) if existing else {"key": key, "table_sha256": table_sha, "seed": cfg.seed}
    record.update(finished=False, wall_s=record.get("wall_s", 0.0))
    resume = (run_dir / "last.pt").is_file()
    write_text_atomic(run_dir / MARKER, json.dumps(record, indent=2) + "\n")
    started, stop = time.perf_counter(), threading.Event()
    clock = threading.Thread(target=_keep_wall_time, args=(run_dir / MARKER, dict(record), started, stop), daemon=True)
    clock.start()
    try:
        result = artifacts.ensure_trained(cfg, table_path, data_root, run_dir, progress, stop_after_epoch)
        if result is None:
            return run_dir, "interrupted"
        if not (run_dir / VAL_RANKS).is_file():
            raise InputError(f"{run_dir / VAL_RANKS}: missing after a finished fit")
        record["finished"] = True
    finally:  # wall time adds up over every session that worked on the run
        stop.set()
        clock.join()
        record["wall_s"] = round(record["wall_s"] + time.perf_counter() - started, 1)
        write_text_atomic(run_dir / MARKER, json.dumps(record, indent=2) + "\n")
    # last.pt (weights + optimiser state) only serves a resume; best.pt stays for analysis.
    (run_dir / "last.pt").unlink(missing_ok=True)
    return run_dir, "resumed" if resume else "trained"


# history.csv's columns a retrain must give back to the digit (train_images_per_s is a timing)
REPRODUCED_COLUMNS = ("epoch", "loss", "lr", "val_recall@1", f"val_{PRIMARY}", "val_recall@10", "val_map")


def same_run(retrained: Path, recorded: Path) -> bool:
    """Whether ``retrained`` gave the run ``recorded`` back to the digit: every epoch of its
    ``history.csv`` (:data:`REPRODUCED_COLUMNS`) and every compared val query's rank."""
    try:
        here, there = (pd.read_csv(Path(d) / "history.csv") for d in (retrained, recorded))
        ranks_here, ranks_there = (pd.read_csv(Path(d) / VAL_RANKS) for d in (retrained, recorded))
    except (OSError, ValueError):
        return False
    columns = [c for c in REPRODUCED_COLUMNS if c in there.columns]
    return set(columns) <= set(here.columns) and here[columns].equals(there[columns]) and ranks_here.equals(ranks_there)


def runs_of(cfg: Config, root: Path, table_sha256: str) -> dict[int, Path]:
    """seed → finished run directory of ``cfg`` (any seed) among every run of the study, found by
    run key wherever an experiment put it."""
    found = {}
    for key, run_dir in find_runs(root).items():
        seed = marker(run_dir)["seed"]
        if is_finished(run_dir) and key == identity.run_key(replace(cfg, seed=seed), table_sha256):
            found[seed] = run_dir
    return dict(sorted(found.items()))


def metrics_from_ranks(ranks: pd.DataFrame) -> dict:
    """Val Recall@K and mAP of one run from its per-query ranks (the numbers the statistics use)."""
    out = {f"recall@{k}": float((ranks.first_hit_rank < k).mean()) for k in DEFAULT_KS}
    return {**out, "map": float(ranks.average_precision.mean()), "n_queries": int(len(ranks))}


def run_row(run_dir: Path, root: Path) -> dict:
    """One finished run's line of ``runs.csv`` (without experiment / variant / changed fields)."""
    history = pd.read_csv(run_dir / "history.csv")
    ranks = pd.read_csv(run_dir / VAL_RANKS)
    trained = history.loc[history.epoch >= 1, "train_images_per_s"]
    return {
        "run_dir": str(run_dir.relative_to(root)),
        "best_epoch": int(train.fit_record(run_dir)["best_epoch"]),
        "epochs_run": int(history.epoch.max()),
        **{f"val_{m}": v for m, v in metrics_from_ranks(ranks).items()},
        "wall_s": marker(run_dir)["wall_s"],
        "images_per_s": round(float(trained.mean()), 1) if len(trained) else math.nan,
    }


def run_ranks(root: Path, runs: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """``(variant, seed) → val_ranks.csv`` of every run listed in a ``runs.csv``."""
    ranks = {}
    for run in runs.itertuples():
        path = Path(root) / run.run_dir / VAL_RANKS
        if not path.is_file():
            raise InputError(f"{path}: missing; the statistics need every run's val ranks")
        ranks[(run.variant, run.seed)] = pd.read_csv(path)
    return ranks


def experiment_history(root: Path, name: str) -> pd.DataFrame:
    """Every run's ``history.csv`` of experiment ``name``, tidy: one row per (variant, seed, epoch)
    with ``experiment``, ``variant``, ``seed``, ``epoch``, ``loss`` (NaN at epoch 0, the untrained
    model), ``val_recall@5`` and ``best`` (the epoch whose weights became the run's ``best.pt``).
    The runs are those its ``runs.csv`` lists, in that order, wherever they live (a shared baseline
    sits in the experiment that trained it first)."""
    runs_path = Path(root) / name / "runs.csv"
    if not runs_path.is_file():
        raise InputError(f"{runs_path}: missing; run `python -m helpers study {name}` first")
    frames = []
    for run in pd.read_csv(runs_path).itertuples(index=False):
        path = Path(root) / run.run_dir / "history.csv"
        if not path.is_file():
            raise InputError(f"{path}: missing; {runs_path} lists its run")
        history = pd.read_csv(path)
        missing = [c for c in ("epoch", *HISTORY_COLUMNS) if c not in history.columns]
        if missing:
            raise InputError(f"{path}: no column {', '.join(missing)}")
        frames.append(
            history[["epoch", *HISTORY_COLUMNS]].assign(
                experiment=name, variant=run.variant, seed=run.seed, best=history.epoch == run.best_epoch
            )
        )
    return pd.concat(frames, ignore_index=True)[["experiment", "variant", "seed", "epoch", *HISTORY_COLUMNS, "best"]]


def projected_seconds(root: Path, profile: str, n_runs: int, epochs: int) -> tuple[float, str]:
    """``(seconds, how)`` for training ``n_runs`` runs of at most ``epochs`` epochs: an upper bound
    from the per-epoch time of this study's finished runs when there are any (their median wall
    time per epoch run), else :data:`SECONDS_PER_EPOCH`'s stated estimate; ``how`` says where it
    came from and, once runs have finished, adds the expected time (``n_runs`` × their median wall
    time: early stopping ends most runs well before ``epochs``)."""
    done = [d for d in find_runs(root).values() if is_finished(d)]
    finished = np.array([marker(d)["wall_s"] for d in done])
    epochs_run = np.array([max(1, pd.read_csv(d / "history.csv").epoch.max()) for d in done])
    if len(done):
        seconds = float(np.median(finished / epochs_run))
        expected = n_runs * float(np.median(finished)) / 60
        return n_runs * epochs * seconds, (
            f"{seconds:.1f} s/epoch measured (median of {len(finished)} finished runs); expected ~{expected:.0f} min "
            f"at their median run of {np.median(finished) / 60:.1f} min"
        )
    seconds = SECONDS_PER_EPOCH[profile]
    return n_runs * epochs * seconds, f"{seconds:.1f} s/epoch stated estimate (no finished run measured yet)"


def recorded_configs(root: Path, runs: pd.DataFrame) -> list[dict]:
    """Each listed run's recorded config (its ``config.json``), in ``runs.run_dir`` order."""
    return [json.loads((Path(root) / d / "config.json").read_text())["config"] for d in runs.run_dir]


def stop_gap(root: Path, runs: pd.DataFrame) -> dict | None:
    """Early-stopped runs against their configuration's runs that reached the epoch cap: within
    each configuration (a run's recorded config without its seed and runtime fields) that has both,
    the compared val Recall@5 of the first minus the second, pooled by least squares with one mean
    per configuration and one early-stop offset (``gap``); its 95 % t interval from the residual
    variance over every configuration. ``None`` when no configuration has both kinds of run. An
    association, not a cost: the runs the rule stops are those whose stop items stalled, so a gap
    below zero says stopped runs end lower, not by how much more training would have lifted them."""
    configs = recorded_configs(root, runs)
    early = runs.epochs_run.to_numpy() < np.array([c["epochs"] for c in configs])
    if early.all() or not early.any():
        return None
    # the run's identity without its seed: runs that differ only in seed share it
    keys = [json.dumps(identity.recipe(replace(config_from_dict(c), seed=0)), sort_keys=True) for c in configs]
    both = {k for k in keys if {bool(e) for kk, e in zip(keys, early) if kk == k} == {True, False}}
    if not both:
        return None
    names = sorted(set(keys))
    design = np.column_stack([np.array(keys) == k for k in names] + [early]).astype(np.float64)
    y = runs[f"val_{PRIMARY}"].to_numpy(dtype=np.float64)
    coef, _, rank, _ = np.linalg.lstsq(design, y, rcond=None)
    df = len(y) - rank
    gap = round(float(coef[-1]), 6)
    out = {
        "gap": gap,
        "configurations": len(both),
        "early_runs": int(sum(e for k, e in zip(keys, early) if k in both)),
        "capped_runs": int(sum(not e for k, e in zip(keys, early) if k in both)),
        "df": int(df),
        "low": None,  # no residual df: one run per configuration and kind
        "high": None,
    }
    if df > 0:
        sigma2 = float(np.sum((y - design @ coef) ** 2)) / df
        se = math.sqrt(sigma2 * np.linalg.inv(design.T @ design)[-1, -1])
        half = float(stats.t.ppf(0.975, df)) * se
        out.update(low=round(gap - half, 6), high=round(gap + half, 6))
    return out


PLATEAU_EPOCHS = 5  # the window over which end_slope measures whether a run had levelled off


def end_slope(root: Path, runs: pd.DataFrame, window: int = PLATEAU_EPOCHS) -> dict | None:
    """Whether the runs that reached the epoch cap had levelled off (an early-stopped run had, by
    its rule): per such run, the least-squares slope of its val Recall@5 (the items that choose its
    epoch, ``history.csv``) over its last ``window`` epochs; their mean per epoch with a 95 % t
    interval. ``None`` with fewer than two such runs."""
    slopes = []
    for run_dir, epochs_run, cfg in zip(runs.run_dir, runs.epochs_run, recorded_configs(root, runs)):
        history = pd.read_csv(Path(root) / run_dir / "history.csv")
        last = history[history.epoch >= 1].tail(window)
        if epochs_run >= cfg["epochs"] and len(last) == window:
            slopes.append(float(np.polyfit(last.epoch, last[f"val_{PRIMARY}"], 1)[0]))
    if len(slopes) < 2:
        return None
    mean, sd = float(np.mean(slopes)), float(np.std(slopes, ddof=1))
    half = float(stats.t.ppf(0.975, len(slopes) - 1)) * sd / math.sqrt(len(slopes))
    return {
        "epochs": window,
        "runs": len(slopes),
        "slope": round(mean, 6),
        "low": round(mean - half, 6),
        "high": round(mean + half, 6),
    }


def experiment_costs(root: Path, names: list[str]) -> list[dict]:
    """What each question cost, in running order (``names``, the experiments that have a
    ``runs.csv``): the runs it trained (a run an earlier experiment listed, such as a stage's shared
    baseline, counted there only), their summed wall time in hours and the median epochs they ran."""
    seen, rows = set(), []
    for name in names:
        path = Path(root) / name / "runs.csv"
        if not path.is_file():
            continue
        table = pd.read_csv(path).drop_duplicates("run_dir")
        new = table[~table.run_dir.isin(seen)]
        seen |= set(table.run_dir)
        rows.append(
            {
                "experiment": name,
                "runs": len(new),
                "wall_hours": round(float(new.wall_s.sum()) / 3600, 2),
                "median_epochs": float(new.epochs_run.median()) if len(new) else None,
            }
        )
    return rows


def runs_summary(root: Path) -> dict:
    """Over the study's distinct runs (a run shared by several experiments counted once): how many
    there are and their summed wall time; and over those trained to the study's full epoch budget
    (the ``length`` experiment's shorter schedules end early by design, so they say nothing of
    whether that budget let runs level off) how many had their best val Recall@5 at their last
    epoch, or among their last two (still rising: the budget may be short; a run stopped early
    after its patience has its best further back), how many stopped early, how early-stopped runs
    compare with those at the cap (:func:`stop_gap`) and whether the runs at the cap had levelled
    off (:func:`end_slope`)."""
    runs = pd.concat([pd.read_csv(p) for p in sorted(Path(root).glob("*/runs.csv"))])
    runs = runs[runs.experiment != POSTPROCESS].drop_duplicates("run_dir")  # postprocess lists the final runs again
    budget = np.array([c["epochs"] for c in recorded_configs(root, runs)])
    full = runs[budget == budget.max()]
    at_last = int((full.best_epoch == full.epochs_run).sum())
    last_two = int((full.best_epoch >= full.epochs_run - 1).sum())
    return {
        "distinct_runs": len(runs),
        "shortened_runs": int((budget < budget.max()).sum()),
        "best_at_last_epoch": at_last,
        "best_at_last_epoch_percent": round(100 * at_last / len(full), 1),
        "best_in_last_two_epochs": last_two,
        "best_in_last_two_epochs_percent": round(100 * last_two / len(full), 1),
        "stopped_early": int((full.epochs_run.to_numpy() < budget.max()).sum()),
        "wall_hours": round(float(runs.wall_s.sum()) / 3600, 2),
        "stop_gap": stop_gap(root, full),
        "end_slope": end_slope(root, full),
    }
