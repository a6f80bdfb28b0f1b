"""The final model's runs (``04_demo``'s first half): which configuration is final, its runs of
every seed with their checkpoints, their test numbers, and the seed that serves the demo.

1. :func:`final_choice`: ``results/<profile>/final_config.json`` when the study has written
   it, else the original study's final choice (:data:`ORIGINAL_CHOICE`), saying which;
   :func:`postprocess_choice`: the post-processing the study adopted.
2. :func:`study_runs`: the study's runs of that configuration, every seed. Checkpoints are not
   committed, but the demo seed's model weights are (:data:`WEIGHTS_FILE` in its run folder,
   :func:`export_weights`): where its ``best.pt`` is missing, the demo seed's checkpoint is
   rebuilt from them and its first :data:`CHECK_EPOCHS` epochs are retrained here as a check
   (:func:`from_weights`); a seed without either is retrained, and ``retrain_all`` retrains every
   seed whose ``best.pt`` is missing; :func:`reproduction` compares each retrain with the study's
   history. Without a finished
   study, :func:`ensure_checkpoint`: one run of the choice (the demo pipeline's
   ``outputs/<profile>/run`` if it matches, else ``outputs/<profile>/final_run_<hash>``),
   trained (resumably) only when the caller allows it.
3. :func:`seed_table`: every seed's test numbers, labelled by where they come from: a run with
   its checkpoint here is evaluated once (:func:`test_metrics`, intervals over items, written to
   its ``metrics.json``: in the study's own run folder, committed, on the machine that ran the
   study); a run not retrained here reads that committed ``metrics.json``
   (:func:`committed_test_metrics`). :func:`demo_seed` (best val Recall@5) serves the index, the
   figure and the live demo.
"""

from __future__ import annotations

import json
from dataclasses import fields, replace
from pathlib import Path

import pandas as pd
from safetensors.torch import load_file, save_file

from helpers.core.config import REPO_ROOT, Config
from helpers.core.errors import InputError
from helpers.core.files import portable_path, save_atomic, sha256_bytes, sha256_file, write_text_atomic
from helpers.core.progress import show_bars
from helpers.evaluation import metrics
from helpers.experiments import artifacts
from helpers.experiments.catalogue import POSTPROCESS
from helpers.experiments.runs import runs_of
from helpers.experiments.study import Study, retrained_dir
from helpers.modeling import checkpoints
from helpers.training import train

# The original study's own final choice (docs/original_study.md): used until the study writes
# results/<profile>/final_config.json.
ORIGINAL_CHOICE = {"loss": "batch_hard", "embed_dim": 256}

# Where a seed's test numbers come from (the seed table's ``test result`` column, 04_demo's lines).
EVALUATED = "evaluated on test here"
COMMITTED = "committed study result, not re-evaluated here"
SHORT = {"evaluated here": EVALUATED, "committed": COMMITTED}  # the mean and std rows count them
# The 04_demo switch that retrains (when its checkpoint is missing) and evaluates every seed.
RETRAIN_ALL_SWITCH = "RETRAIN_ALL_SEEDS = True"
# The demo seed's model weights, committed in its study run folder: a fresh clone evaluates the
# final model without a full training run (one takes longer than the grader's path may).
WEIGHTS_FILE = "model.safetensors"
# A checkpoint rebuilt from WEIGHTS_FILE is checked by retraining this many epochs of its run.
CHECK_EPOCHS = 2
FROM_WEIGHTS = "from_weights.json"  # in a rebuilt run folder: where its weights and its check are


def final_choice(profile: str, results_root: Path | None = None) -> tuple[dict, str]:
    """``(config overrides, where they came from)`` for the profile's final model.

    ``final_config.json`` may hold the overrides at its top level or under ``"config"``;
    only :class:`Config` field names are taken, anything else there is reported and ignored.
    """
    path = (results_root or artifacts.results_root(profile)) / "final_config.json"
    if not path.is_file():
        return dict(ORIGINAL_CHOICE), (
            f"fallback: the original study's final choice ({', '.join(f'{k}={v}' for k, v in ORIGINAL_CHOICE.items())}), "
            "because "
            f"{portable_path(path)} "
            "does not exist yet"
        )
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error})") from None
    data = data.get("config", data) if isinstance(data, dict) else None
    if not isinstance(data, dict):
        raise InputError(f"{path}: expected a JSON object of config fields")
    names = {f.name for f in fields(Config)}
    chosen = {k: v for k, v in data.items() if k in names and k != "profile"}
    ignored = sorted(set(data) - names - {"profile"})
    note = portable_path(path) + (f" (ignored, not config fields: {', '.join(ignored)})" if ignored else "")
    return chosen, note


def postprocess_choice(profile: str, results_root: Path | None = None) -> tuple[str, str]:
    """``(the post-processing method the study adopted, why)``, from ``postprocess/decision.json``:
    ``none`` (rank by plain cosine similarity) when that experiment has not run or adopted nothing.
    The final index, its test evaluation (:func:`helpers.experiments.final.evaluate_final`) and the live demo apply it
    (``postprocess.create_postprocess(method)``: the parameters the study measured)."""
    path = (results_root or artifacts.results_root(profile)) / POSTPROCESS / "decision.json"
    if not path.is_file():
        return "none", f"{portable_path(path)} does not exist yet (`python -m helpers study postprocess`)"
    try:
        decision = json.loads(path.read_text())
        return decision["winner"], f"{portable_path(path)}: {decision['why']}"
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise InputError(f"{path}: not a post-processing decision ({error})") from None


def run_mismatch(run_dir: Path, choice: dict) -> list[str]:
    """The fields of ``choice`` on which the run in ``run_dir`` differs (empty: it matches)."""
    config_path = run_dir / "config.json"
    if not (run_dir / "best.pt").is_file() or not config_path.is_file():
        return ["no finished run"]
    used = json.loads(config_path.read_text()).get("config", {})
    return [f"{k}={used.get(k)!r} (want {v!r})" for k, v in choice.items() if used.get(k) != v]


def final_run_dir(cfg: Config, choice: dict) -> Path:
    """``outputs/<profile>/final_run_<hash of the choice>``: a new final configuration trains into
    a new folder, never on top of (or as a resume of) another configuration's run."""
    digest = sha256_bytes(json.dumps(choice, sort_keys=True).encode())[:8]
    return cfg.work_dir / f"final_run_{digest}"


def ensure_checkpoint(
    cfg: Config, choice: dict, table: Path, data_root: Path, train_if_missing: bool, progress: bool | str = True
) -> tuple[Path, str]:
    """``(best.pt, how it was found)`` of a finished run trained with ``choice`` on ``cfg``'s
    profile (:func:`seed_table` evaluates it on test)."""
    looked = []
    for run_dir in (final_run_dir(cfg, choice), cfg.work_dir / "run"):
        mismatch = run_mismatch(run_dir, choice) or ([] if artifacts.is_trained(run_dir) else ["fit not finished"])
        if not mismatch:
            return (
                run_dir / "best.pt",
                f"found: {portable_path(run_dir)} (trained earlier with the chosen configuration)",
            )
        looked.append(f"{run_dir}: {', '.join(mismatch)}")
    if not train_if_missing:
        raise InputError(
            "no trained checkpoint of the chosen configuration ("
            + "; ".join(looked)
            + "); set TRAIN_IF_MISSING = True to train it here"
        )
    run_dir = final_run_dir(cfg, choice)
    if progress and not artifacts.is_trained(run_dir):
        epochs = replace(cfg, **choice).epochs
        print(f"training the chosen configuration (epochs: at most {epochs}) into {portable_path(run_dir)}", flush=True)
    # An interrupted earlier attempt continues exactly (a changed choice is refused by fit).
    artifacts.ensure_trained(replace(cfg, **choice), table, data_root, run_dir, progress=progress)
    return (
        run_dir / "best.pt",
        f"trained now: {portable_path(run_dir)} ({', '.join(f'{k}={v}' for k, v in choice.items())})",
    )


def study_runs(
    cfg: Config,
    choice: dict,
    table: Path,
    data_root: Path,
    train_if_missing: bool,
    progress: bool | str = True,
    retrain_all: bool = False,
) -> tuple[dict[int, Path], dict[int, Path], str]:
    """``(runs, recorded, how)``: seed → the run directory whose numbers stand for that seed of
    the final configuration, seed → the study's own run directory (its history and metrics,
    committed), and a sentence that says which seeds were retrained and which were not.

    When the study has finished, the final model *is* its runs of the final configuration,
    every seed, under the exact budget the study selected it with. Their checkpoints are local,
    not committed. A seed whose ``best.pt`` is missing here is retrained from the run's recorded
    configuration into the study's ``final_runs/`` (deterministic kernels reproduce it on
    the same machine kind; :func:`reproduction` compares the two histories) when it is the
    demo seed (:func:`demo_seed` of the study's record), or every such seed with ``retrain_all``;
    any other seed maps to the study's run folder, without a checkpoint: :func:`seed_table`
    reads its committed test result. A seed whose checkpoint is gone but whose retrain has
    finished (its records committed in ``final_runs/``) is that retrain, wherever it applies.
    ``progress="epochs"`` prints one line per epoch of a retrain and no bar. Without a finished study there is one run of ``choice``
    (:func:`ensure_checkpoint`), and ``recorded`` is empty.
    """
    root = artifacts.results_root(cfg.profile)
    if not (root / "final_config.json").is_file():
        checkpoint, how = ensure_checkpoint(cfg, choice, table, data_root, train_if_missing, progress)
        return {cfg.seed: checkpoint.parent}, {}, how
    the_study = Study(
        cfg.profile, root=root, data_root=cfg.data_root, progress=show_bars(progress), tables=(data_root, table)
    )
    recorded = the_study.final_runs()
    final_cfg, runs, retrained, committed, rebuilt, standing = the_study.final_config(), {}, [], [], [], []
    serving = demo_seed(recorded)
    wanted = set(recorded) if retrain_all else {serving}
    for seed, study_dir in recorded.items():
        local = retrained_dir(study_dir)
        # Where the study's checkpoint and weights are gone and a retrain of it has finished (its
        # records committed beside the study's), the retrain stands for the seed: its checkpoint or
        # weights here, its committed test result on a fresh clone.
        gone = not (study_dir / "best.pt").is_file() and not (study_dir / WEIGHTS_FILE).is_file()
        stands_in = gone and artifacts.is_trained(local)
        run_dir = local if stands_in else study_dir
        standing += [seed] if stands_in else []
        if (run_dir / "best.pt").is_file():
            runs[seed] = run_dir
            if seed == serving and not (run_dir / WEIGHTS_FILE).is_file():
                export_weights(run_dir)  # on the machine that ran the study: committed with its results
            continue
        if seed not in wanted:
            runs[seed], committed = run_dir, [*committed, seed]
            continue
        if not retrain_all and (run_dir / WEIGHTS_FILE).is_file():
            rebuilt_dir = cfg.work_dir / "final_runs" / f"{local.name}.weights"  # never a full retrain's folder
            runs[seed] = from_weights(replace(final_cfg, seed=seed), run_dir, rebuilt_dir, table, data_root, progress)
            rebuilt = [*rebuilt, seed]
            continue
        if not (local / "best.pt").is_file() and not train_if_missing:
            raise InputError(
                f"{run_dir / 'best.pt'}: missing (checkpoints are not committed); set TRAIN_IF_MISSING = True to "
                f"retrain seed {seed} under its recorded configuration"
            )
        if progress and not artifacts.is_trained(local):
            print(
                f"seed {seed}: no checkpoint here ({portable_path(run_dir / 'best.pt')}); retraining it under its "
                f"recorded configuration (epochs: at most {final_cfg.epochs}) into {portable_path(local)}",
                flush=True,
            )
        artifacts.ensure_trained(replace(final_cfg, seed=seed), table, data_root, local, progress=progress)
        runs[seed], retrained = local, [*retrained, seed]
    notes = [f"{_seeds(retrained)} retrained here under the recorded configuration"] if retrained else []
    notes += (
        [
            f"{_seeds(rebuilt)}: the study's checkpoint rebuilt from its committed weights ({WEIGHTS_FILE}), its "
            f"first {_epochs(min(CHECK_EPOCHS, final_cfg.epochs))} retrained here as a check"
        ]
        if rebuilt
        else []
    )
    notes += [f"{_seeds(committed)}: {COMMITTED} ({RETRAIN_ALL_SWITCH} retrains them)"] if committed else []
    notes += (
        [f"{_seeds(standing)}: the study's checkpoints gone, their retrains under the recorded configuration stand in"]
        if standing
        else []
    )
    how = f"the study's runs of the final configuration, {_seeds(list(recorded))}" + (
        f" ({'; '.join(notes)})" if notes else ""
    )
    return runs, recorded, how


def export_weights(run_dir: Path) -> Path:
    """The model weights of ``run_dir/best.pt`` as :data:`WEIGHTS_FILE` beside it (safetensors:
    tensors only, nothing to unpickle), with the checkpoint's epoch and table in its metadata."""
    state = checkpoints.read_checkpoint(Path(run_dir) / "best.pt")
    target = Path(run_dir) / WEIGHTS_FILE
    metadata = {"best_epoch": str(state["epoch"] + 1), "table_sha256": state["table_sha256"]}
    # contiguous: safetensors stores plain row-major tensors (training keeps conv weights channels_last)
    tensors = {name: tensor.contiguous() for name, tensor in state["model"].items()}
    save_atomic(target, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))
    return target


def from_weights(run_cfg: Config, run_dir: Path, local: Path, table: Path, data_root: Path, progress) -> Path:
    """``local``: a run folder for the study's run ``run_dir`` whose ``best.pt`` is rebuilt from
    its committed :data:`WEIGHTS_FILE` and recorded config (its ``config.json``, ``fit.json`` and
    ``history.csv`` copied), and beside it ``<local>.first<N>``: the run retrained for its first
    :data:`CHECK_EPOCHS` epochs, which :func:`reproduction` compares with the study's history
    (deterministic kernels give the same epochs on the same machine kind)."""
    weights = Path(run_dir) / WEIGHTS_FILE
    recorded = json.loads((Path(run_dir) / "config.json").read_text())
    record = local / FROM_WEIGHTS
    if not record.is_file() or json.loads(record.read_text())["sha256"] != sha256_file(weights):
        local.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "fit.json", "history.csv"):
            (local / name).write_bytes((Path(run_dir) / name).read_bytes())
        try:
            state = {"model": load_file(str(weights)), "config": recorded["config"], "model_config": recorded["model"]}
            checkpoints.embedder_from_state(state)  # the weights fit the recorded model
        except Exception as error:
            raise InputError(
                f"{weights}: not the weights of the model its config.json records ({type(error).__name__})"
            ) from None
        checkpoints.save_checkpoint(local / "best.pt", state)
    check = local.with_name(f"{Path(run_dir).name}.first{CHECK_EPOCHS}")
    done = check / "history.csv"
    if not done.is_file() or len(pd.read_csv(done)) <= CHECK_EPOCHS:
        if progress:
            print(f"checking the rebuilt checkpoint: retraining its first epochs into {portable_path(check)}")
        artifacts.ensure_trained(run_cfg, table, data_root, check, progress=progress, stop_after_epoch=CHECK_EPOCHS)
    written = {"weights": portable_path(weights), "sha256": sha256_file(weights), "check": portable_path(check)}
    write_text_atomic(record, json.dumps(written, indent=2) + "\n")
    return local


def _epochs(n: int) -> str:
    return f"{n} epoch" + ("" if n == 1 else "s")


def _seeds(seeds: list[int]) -> str:
    """``seed 1`` or ``seeds 0, 2``."""
    return ("seed " if len(seeds) == 1 else "seeds ") + ", ".join(map(str, seeds))


def reproduction(runs: dict[int, Path], recorded: dict[int, Path]) -> pd.DataFrame:
    """Per seed: the largest difference over epochs between the run used here and the study's
    recorded run, in training loss and val Recall@5 (0 where the study's own run is used, NaN
    where the seed was not retrained here and has no checkpoint: nothing ran to compare)."""
    rows = {}
    for seed, run_dir in runs.items():
        there = pd.read_csv(recorded[seed] / "history.csv")
        if run_dir == recorded[seed] and not (run_dir / "best.pt").is_file():
            rows[seed] = {
                "run": "not retrained here (committed result)",
                "epochs (here / study)": f"- / {len(there)}",
                "max |Δ loss|": float("nan"),
                "max |Δ val R@5|": float("nan"),
            }
            continue
        rebuilt = run_dir / FROM_WEIGHTS
        if rebuilt.is_file():  # the study's weights: its first epochs retrained as the check
            check = REPO_ROOT / json.loads(rebuilt.read_text())["check"]
            here = pd.read_csv(check / "history.csv")
            there = there.iloc[: len(here)]
            rows[seed] = {
                "run": f"committed weights; first {_epochs(len(here) - 1)} retrained here",
                "epochs (here / study)": f"{len(here)} / {len(there)}",
                "max |Δ loss|": float((here.loss - there.loss).abs().max()),
                "max |Δ val R@5|": float((here["val_recall@5"] - there["val_recall@5"]).abs().max()),
            }
            continue
        here = pd.read_csv(run_dir / "history.csv")
        same_length = len(here) == len(there)
        rows[seed] = {
            "run": "the study's own" if run_dir == recorded[seed] else "retrained here",
            "epochs (here / study)": f"{len(here)} / {len(there)}",
            "max |Δ loss|": float((here.loss - there.loss).abs().max()) if same_length else float("nan"),
            "max |Δ val R@5|": float((here["val_recall@5"] - there["val_recall@5"]).abs().max())
            if same_length
            else float("nan"),
        }
    return pd.DataFrame(rows).T.rename_axis("seed")


def recipe_runs(cfg: Config, table: Path, final: dict[int, Path] | None = None) -> dict[int, Path]:
    """seed → the study's finished runs of the profile's own config (the default recipe, the
    study's stage-1 baseline); empty before the study has run it. A run that is also the final
    configuration's (``final``, :func:`study_runs`: the recipe adopted as it is) is taken as
    ``final`` has it, so both tables give that seed the same numbers from the same place; any
    other is replaced by its retrain (the study's ``final_runs/``) where the committed
    folder has no checkpoint. A run left without a checkpoint gives its committed test result; one
    with neither a checkpoint, a finished retrain nor a committed test result is left out (its
    seed is missing from the table)."""
    root = artifacts.results_root(cfg.profile)
    found = runs_of(cfg, root, sha256_file(table)) if root.is_dir() else {}
    runs = {}
    for seed, run_dir in found.items():
        same = (final or {}).get(seed)
        local = retrained_dir(run_dir)
        if same is not None and same.name == run_dir.name:
            runs[seed] = same
        elif not (run_dir / "best.pt").is_file() and artifacts.is_trained(local):
            runs[seed] = local  # its checkpoint here, or its committed test result
        elif (run_dir / "best.pt").is_file() or (run_dir / "metrics.json").is_file():
            runs[seed] = run_dir
    return runs


def test_metrics(run_dir: Path, table: Path, data_root: Path, progress: bool | str = True) -> dict:
    """The run's test ``metrics.json`` (official protocol) with intervals that resample items:
    evaluated once with its ``best.pt`` (:func:`helpers.training.train.evaluate_run`) when missing
    or written with per-query intervals; a run without its checkpoint keeps what it recorded."""
    path = Path(run_dir) / "metrics.json"
    recorded = json.loads(path.read_text()) if path.is_file() else None
    if recorded is not None and metrics.INTERVALS["items"] in recorded.get("ci", ""):
        return recorded
    if (Path(run_dir) / "best.pt").is_file():
        return train.ensure_test_metrics(run_dir, table, data_root, progress=progress)
    if recorded is None:
        raise InputError(f"{path}: missing and no best.pt to evaluate; retrain the run (TRAIN_IF_MISSING = True)")
    return recorded


def committed_test_metrics(run_dir: Path, seed: int) -> dict:
    """The test result committed in the study's run folder (``metrics.json``, written by
    :func:`test_metrics` in ``04_demo`` on the machine that holds the study's checkpoints), for a
    seed not retrained here: test split, intervals over items, the fit's ``best_epoch`` and
    ``val``. Anything else is a one-line error that names the file and the switch to set."""
    path = Path(run_dir) / "metrics.json"
    fix = (
        f"set {RETRAIN_ALL_SWITCH} (with TRAIN_IF_MISSING = True) to retrain and evaluate seed {seed} here, or "
        "run 04_demo where the study's checkpoints are, which writes it"
    )
    if not path.is_file():
        raise InputError(f"{path}: missing, the committed test result of seed {seed} (no best.pt here); {fix}")
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not readable JSON ({error}); {fix}") from None
    usable = (
        isinstance(record, dict)
        and record.get("split") == "test"
        and metrics.INTERVALS["items"] in record.get("ci", "")
        and "best_epoch" in record
        and "val" in record
    )
    if not usable:
        raise InputError(f"{path}: not a test result of seed {seed} with intervals over items; {fix}")
    return record


def seed_table(runs: dict[int, Path], table: Path, data_root: Path, progress: bool | str = True) -> pd.DataFrame:
    """One row per seed: best epoch, val Recall@5 at it, and test Recall@1/5/10 (official
    protocol) with each seed's 95 % bootstrap interval over items, and where the test numbers
    come from (``test result``): :data:`EVALUATED` for a run with its checkpoint here
    (:func:`test_metrics`), :data:`COMMITTED` for one without (:func:`committed_test_metrics`);
    then the mean and the sample std over seeds (their ``test result``: how many of each, e.g.
    ``1 evaluated here, 2 committed``)."""
    rows = {}
    for seed, run_dir in runs.items():
        here = (Path(run_dir) / "best.pt").is_file()
        result = test_metrics(run_dir, table, data_root, progress) if here else committed_test_metrics(run_dir, seed)
        row = {"best_epoch": result["best_epoch"], "val_recall@5": result["val"]["recall@5"]}
        for k in (1, 5, 10):
            low, high = result[f"recall@{k}_ci"]
            row[f"test_recall@{k}"] = result[f"recall@{k}"]
            row[f"test_recall@{k}_ci"] = f"[{low:.3f}, {high:.3f}]"
        rows[seed] = {**row, "test result": EVALUATED if here else COMMITTED}
    frame = pd.DataFrame(rows).T.rename_axis("seed")
    numeric = [c for c in frame.columns if not c.endswith("_ci") and c != "test result"]
    frame[numeric] = frame[numeric].astype(float)
    summary = pd.DataFrame({"mean": frame[numeric].mean(), "std": frame[numeric].std(ddof=1)}).T
    counts = {word: int((frame["test result"] == label).sum()) for word, label in SHORT.items()}
    summary["test result"] = ", ".join(f"{n} {word}" for word, n in counts.items() if n)
    return pd.concat([frame, summary])


def source_line(table: pd.DataFrame) -> str:
    """Which seeds of a :func:`seed_table` were evaluated here and which are committed results,
    e.g. ``seed 1: evaluated on test here; seeds 0, 2: committed study result, ...``."""
    per_seed = table.drop(index=["mean", "std"])["test result"]
    return "; ".join(
        f"{_seeds([s for s, v in per_seed.items() if v == label])}: {label}"
        for label in (EVALUATED, COMMITTED)
        if (per_seed == label).any()
    )


def demo_seed(runs: dict[int, Path]) -> int:
    """The seed whose run serves the index, the figure and the live demo: the best val Recall@5
    (model selection on val, as ``fit`` selects its epoch; the lowest seed on a tie)."""
    val = {seed: train.fit_record(d)["val"]["recall@5"] for seed, d in runs.items()}
    return max(sorted(val), key=lambda seed: val[seed])
