"""The robustness experiment of a study (no training): the runs of the crop experiment (box crop
against the whole photo) and of the photometric experiment (its baseline against its primary
normalisation) evaluated on val trees whose consumer photos carry one nuisance at several
strengths (:mod:`helpers.experiments.robustness`), so the dose-response shows when the box crop
and the photometric normalisation matter. Synthetic data only: a real tree cannot be rewritten
with a nuisance turned up.

Writes ``results/<profile>/robustness/``: ``recall.csv`` (per nuisance, strength and variant, val
Recall@5 with its seeds × items interval), ``differences.csv`` (each variant against its
experiment's baseline at each dose, the study's paired test), ``run.json`` (the runs, the
strengths, the wall time) and ``ranks/`` (each run's per-query ranks at every dose, gzipped).
``python -m helpers study`` evaluates each contrast run as soon as it has finished
(:func:`store_while_checkpoint_exists`), while its checkpoint exists: a study continued on
another machine has its committed results, not its checkpoints.
"""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import pandas as pd

from helpers.core import identity
from helpers.core.errors import InputError
from helpers.core.files import portable_path, sha256_file, write_text_atomic
from helpers.experiments import robustness
from helpers.experiments.catalogue import get_experiment
from helpers.experiments.runs import marker
from helpers.experiments.study import Study

ROBUSTNESS = "robustness"
RANKS = "ranks"  # under ROBUSTNESS: <run folder name>.csv.gz per run
# Strengths per nuisance: 1 (box jitter 0) is the tree the runs trained on; 0 removes the nuisance,
# 2 doubles it; box jitter 1 is about a detector's box error (median IoU 0.73 with the true box).
STRENGTHS = {
    "clutter": (0.0, 1.0, 2.0),
    "occlusion": (0.0, 1.0, 2.0),
    "colour_cast": (0.0, 1.0, 2.0),
    "box_jitter": (0.0, 0.5, 1.0, 2.0),
}
# (experiment, variant): each variant against its own experiment's baseline.
CONTRASTS = (("crop", "crop=False"), ("photometric", "photometric=grayworld"))
MAX_SEEDS = 3  # the whole-photo runs are exploratory: 3 seeds; the others are cut to match


def contrast_runs(study: Study) -> tuple[dict[str, list[Path]], list[tuple[str, str]]]:
    """``({variant key: run folders}, [(variant key, reference key)])`` from the finished
    experiments' ``runs.csv``, at most :data:`MAX_SEEDS` seeds each; a baseline two experiments
    share (no stage between them adopted anything) is evaluated once, as ``baseline``. An
    experiment that has not finished is an error."""
    runs, pairs = {}, []
    for experiment, variant in CONTRASTS:
        path = study.root / experiment / "runs.csv"
        if not path.is_file():
            raise InputError(f"{path}: missing; run `python -m helpers study {experiment}` first")
        table = pd.read_csv(path)

        def folders(name: str) -> list[Path]:
            rows = table.loc[table.variant == name].sort_values("seed").head(MAX_SEEDS)
            if rows.empty:
                raise InputError(f"{path}: lists no run of {name!r}")
            return [study.root / d for d in rows.run_dir]

        base = folders("baseline")
        known = [key for key, found in runs.items() if found == base]
        base_key = known[0] if known else "baseline" if "baseline" not in runs else f"{experiment} baseline"
        runs[base_key], runs[variant] = base, folders(variant)
        pairs.append((variant, base_key))
    return runs, pairs


def contrast_keys(study: Study) -> set[str]:
    """The run keys of every run the contrasts read (each one's baseline and variant, seeds 0 to
    :data:`MAX_SEEDS` - 1) whose configuration is known: the earlier stages of its experiment have
    decided (before that, its baseline is not known and none of its runs has trained)."""
    keys, table_sha = set(), sha256_file(study.prepared()[1])
    for experiment, variant in CONTRASTS:
        try:
            configs = study.configs(get_experiment(study.profile, experiment))
        except InputError:  # an earlier stage undecided, or no such experiment in this profile
            continue
        keys |= {
            identity.run_key(replace(configs[name], seed=seed), table_sha)
            for name in ("baseline", variant)
            if name in configs
            for seed in range(MAX_SEEDS)
        }
    return keys


def store_while_checkpoint_exists(study: Study, run_dir: Path, cache: Path | None = None) -> str | None:
    """A finished run that a contrast reads, evaluated at every strength at once, its ranks added to
    ``ranks/`` (a run stored before is read back, not evaluated again), while its checkpoint is
    here: a study continued on another machine has the run's committed results, not its
    checkpoint. Returns what happened, in words (a run that cannot be evaluated is said, never
    raised, so the study goes on); ``None`` for a run no contrast reads."""
    if marker(run_dir).get("key") not in contrast_keys(study):
        return None
    cache = Path(cache or study.config.work_dir / ROBUSTNESS)
    try:
        robustness.evaluate_robustness(
            {"run": [run_dir]}, STRENGTHS, cache, study.config.device, study.progress, study.root / ROBUSTNESS / RANKS
        )
    except InputError as error:
        return f"not stored: {error}"
    return "its ranks at every strength are stored"


def run_robustness(study: Study, cache: Path | None = None) -> dict[str, pd.DataFrame]:
    """Evaluate the contrasts' runs at every strength (their stored ranks reused) and write the
    experiment's tables."""
    runs, pairs = contrast_runs(study)
    cache = Path(cache or study.config.work_dir / ROBUSTNESS)
    store = study.root / ROBUSTNESS / RANKS
    result = robustness.evaluate_robustness(runs, STRENGTHS, cache, study.config.device, study.progress, store)
    started, times = time.perf_counter(), robustness.stored_wall_times(store)
    evaluated = sum(times.get(robustness.stored_ranks_path(store, d).name, 0.0) for d in set().union(*runs.values()))
    recall = robustness.recall_intervals(result)
    differences = pd.concat([robustness.paired_differences(result, v, r) for v, r in pairs], ignore_index=True)
    out = study.root / ROBUSTNESS
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "recall.csv", recall.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "differences.csv", differences.to_csv(index=False, lineterminator="\n"))
    record = {
        "runs": {key: [portable_path(p) for p in folders] for key, folders in runs.items()},
        "contrasts": [{"variant": v, "reference": r} for v, r in pairs],
        "strengths": {k: list(v) for k, v in STRENGTHS.items()},
        # every run's evaluation (ranks/wall_s.json, over every session that evaluated it) plus the tables
        "wall_s": round(evaluated + time.perf_counter() - started, 1),
    }
    write_text_atomic(out / "run.json", json.dumps(record, indent=2) + "\n")
    return {"recall": recall, "differences": differences}


def load_robustness(root: Path) -> dict[str, pd.DataFrame] | None:
    """The committed tables, or None when the experiment has not run."""
    folder = Path(root) / ROBUSTNESS
    if not (folder / "differences.csv").is_file():
        return None
    return {name: pd.read_csv(folder / f"{name}.csv") for name in ("recall", "differences")}
