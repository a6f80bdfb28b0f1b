"""The study: experiments × seeds → run directories, ``runs.csv``, paired statistics, and the
configuration carried forward from stage to stage by a written rule.

One :class:`Study` (profile, results root, data root, seeds, progress) is what the CLI,
``make study``, the notebooks and ``04_demo`` use; its jobs live in modules named by role:

- :mod:`helpers.experiments.catalogue`: the experiments, stages and the rule;
- :mod:`helpers.experiments.runs`: run identity, reuse, training, what runs wrote;
- :mod:`helpers.experiments.comparison`: one experiment's tests, verdicts and decision;
- :mod:`helpers.experiments.family`: Holm over the study, its noise and the power calculator;
- :mod:`helpers.experiments.postprocessing`: post-processing on the final configuration's runs.

Files, under ``results/<profile>/`` (fixture: the git-ignored ``outputs/fixture/results``):
``<experiment>/{runs.csv, comparison.csv, decision.json}`` and one folder per run,
``data_summary.json``, ``final_config.json`` (every decided field after the last stage, by the
rule, never typed by hand) and ``noise.csv``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

import pandas as pd

from helpers.core import identity, repro
from helpers.core.config import EXPLORATORY_SEEDS, PROFILES, RESIZED_SEEDS, STUDY_SEEDS, Config, check, get_config
from helpers.core.errors import InputError
from helpers.core.files import copy_atomic, portable_path, sha256_file, write_text_atomic
from helpers.core.progress import progress_bar
from helpers.experiments import artifacts, catalogue, comparison, family, runs
from helpers.experiments.catalogue import (
    KS,
    POSTPROCESS,
    PRIMARY,
    RECIPE_FIELDS,
    RULE,
    STAGES,
    Experiment,
    decided_fields,
    experiments,
    get_experiment,
)
from helpers.experiments.comparison import decide, learned, read_comparison
from helpers.experiments.family import NOISE
from helpers.experiments.runs import experiment_history
from helpers.training.train import fit_record

__all__ = [
    "KS",
    "NOISE",
    "POSTPROCESS",
    "PRIMARY",
    "RULE",
    "STAGES",
    "Experiment",
    "Study",
    "experiment_history",
    "experiments",
    "learned",
    "load_experiment",
    "n_seeds_for",
    "retrained_dir",
]


def n_seeds_for(profile: str, n_seeds: int | None) -> int:
    """The number of seeds asked for, or the profile's default (:data:`helpers.core.config.STUDY_SEEDS`)."""
    if n_seeds is None:
        return STUDY_SEEDS[profile]
    if n_seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {n_seeds}")
    return n_seeds


def retrained_dir(run_dir: Path) -> Path:
    """Where a study run whose checkpoint is not here (checkpoints are local, never committed)
    is retrained under its recorded configuration: ``final_runs/<run folder>`` in the study's own
    folder (``<study>/<experiment>/<run folder>``), one copy for ``04_demo`` and the post-processing
    experiment alike. Its records are results like the study's (committed; ``*.pt`` stay local):
    a retrain on another machine kind is another run of the same configuration, and a fresh
    clone reads its test result from there."""
    return Path(run_dir).parent.parent / "final_runs" / Path(run_dir).name


def load_experiment(root: Path, name: str) -> dict:
    """``runs``, ``comparison`` and ``decision`` of a finished experiment, read back from disk."""
    folder = Path(root) / name
    if not (folder / "decision.json").is_file():
        raise InputError(f"{folder}: no finished experiment (no decision.json); run `python -m helpers study {name}`")
    return {
        "runs": pd.read_csv(folder / "runs.csv"),
        "comparison": read_comparison(folder / "comparison.csv"),
        "decision": json.loads((folder / "decision.json").read_text()),
    }


@dataclass
class Study:
    """The study of one profile: where its results live, which data it reads, how many seeds."""

    profile: str = "demo"
    root: Path | None = None
    data_root: str | None = None
    n_seeds: int | None = None
    progress: bool = True
    # (data root, images.csv) when the caller has prepared them already; else prepared on first use
    tables: tuple[Path, Path] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.root = Path(self.root or artifacts.results_root(self.profile))
        self.n_seeds = n_seeds_for(self.profile, self.n_seeds)

    # ----------------------------------------------------------------- data and configurations

    @property
    def config(self) -> Config:
        """The profile's own config (its default recipe); a data root only under ``full``."""
        return get_config(self.profile, data_root=self.data_root if self.profile == "full" else None)

    def prepared(self) -> tuple[Path, Path]:
        """``(data root, images.csv)``, prepared once per study object."""
        if self.tables is None:
            self.tables = artifacts.ensure_prepared(self.config, self.progress)
        return self.tables

    def stage_overrides(self, stage: str, strict: bool = True) -> dict:
        """The adopted variants of every stage before ``stage`` (from their ``decision.json``).
        An earlier experiment not finished yet is an error, or with ``strict=False`` (projections
        only) assumed to keep its baseline."""
        overrides: dict = {}
        for experiment in catalogue.earlier(self.profile, stage):
            decision = self.root / experiment.name / "decision.json"
            if decision.is_file():
                overrides.update(json.loads(decision.read_text())["winner_overrides"])
            elif strict:
                raise InputError(
                    f"stage {stage} builds on the winners of stage {experiment.stage}: run "
                    f"`python -m helpers study {experiment.name} --profile {self.profile}` first"
                )
        return overrides

    def configs(self, experiment: Experiment, strict: bool = True) -> dict[str, Config]:
        """The experiment's variants on its stage baseline (:func:`catalogue.resolve_variants`)."""
        base = check(replace(self.config, **self.stage_overrides(experiment.stage, strict)))
        return catalogue.resolve_variants(experiment, base)

    def final_config(self) -> Config:
        """The final configuration: ``final_config.json``'s decided fields on the profile's config."""
        path = self.root / "final_config.json"
        if not path.is_file():
            raise InputError(
                f"{path}: missing; finish the study first (`python -m helpers study all --profile {self.profile}`)"
            )
        return check(replace(self.config, **json.loads(path.read_text())["config"]))

    def runs_of(self, cfg: Config) -> dict[int, Path]:
        """seed → finished run directory of ``cfg`` anywhere in the study (:func:`runs.runs_of`)."""
        return runs.runs_of(cfg, self.root, sha256_file(self.prepared()[1]))

    def final_runs(self) -> dict[int, Path]:
        """seed → the study's finished run of the final configuration (its committed record; its
        checkpoint is local: :meth:`final_checkpoints`). The extra seeds of a test re-sized for
        power (:data:`helpers.core.config.RESIZED_SEEDS`) run the same configuration but are not
        the final model's."""
        extra = range(self.n_seeds, max(self.seeds_of(e, "baseline") for e in experiments(self.profile)))
        found = {s: d for s, d in self.runs_of(self.final_config()).items() if s not in extra}
        if not found:
            raise InputError(
                f"{self.root / 'final_config.json'}: no finished run of this configuration under {self.root}"
            )
        return found

    def final_checkpoints(self) -> dict[int, Path]:
        """seed → the folder whose ``best.pt`` stands for the study's run of the final configuration.

        Where the run's checkpoint is not here (a fresh clone), the run is retrained under its
        recorded configuration into :func:`retrained_dir` (resumable). A retrain that gives the
        recorded run back to the digit (every epoch of ``history.csv``, and ``val_ranks.csv``) is
        that run: its checkpoint is restored into the run's folder (git-ignored, as the study left
        it), so the test results and the demo seed's weights that ``04_demo`` writes there can be
        committed. One that only reaches the same best epoch (another machine kind) stands in from
        its own folder, and so does one that chose another epoch: another run of the same
        configuration (the study's checkpoints gone, a machine kind whose kernels round otherwise),
        which the post-processing experiment compares within itself like any run of it."""
        data_root, table = self.prepared()
        folders = {}
        for seed, run_dir in self.final_runs().items():
            if (run_dir / "best.pt").is_file():
                folders[seed] = run_dir
                continue
            local = retrained_dir(run_dir)
            if self.progress and not artifacts.is_trained(local):
                print(
                    f"seed {seed}: no checkpoint here ({portable_path(run_dir / 'best.pt')}); retraining it under "
                    f"its recorded configuration into {portable_path(local)}",
                    flush=True,
                )
            cfg = replace(self.final_config(), seed=seed)
            artifacts.ensure_trained(cfg, table, data_root, local, progress=self.progress)
            recorded, retrained = fit_record(run_dir)["best_epoch"], fit_record(local)["best_epoch"]
            exact = retrained == recorded and runs.same_run(local, run_dir)
            if exact:
                copy_atomic(local / "best.pt", run_dir / "best.pt")
            folders[seed] = run_dir if exact else local
            if self.progress:
                said = (
                    f"the recorded run to the digit: its checkpoint restored into {portable_path(run_dir)}"
                    if exact
                    else f"the recorded best epoch, not every epoch to the digit: {portable_path(local)} stands in"
                    if retrained == recorded
                    else f"another run (best epoch {retrained}, the study's {recorded}): {portable_path(local)} stands in"
                )
                print(f"seed {seed}: the retrain gave {said}", flush=True)
        return folders

    # ----------------------------------------------------------------- planning and running

    def seeds_of(self, experiment: Experiment, variant: str) -> int:
        """How many seeds a variant runs: the study's, at most EXPLORATORY_SEEDS for an exploratory
        one, and RESIZED_SEEDS for both arms of a primary test re-sized for power (only at the
        profile's own seeds: a study asked for another count runs that count everywhere)."""
        if variant in experiment.exploratory:
            return min(self.n_seeds, EXPLORATORY_SEEDS[self.profile])
        if self.n_seeds == STUDY_SEEDS[self.profile]:
            return max(self.n_seeds, RESIZED_SEEDS[self.profile].get(experiment.name, 0))
        return self.n_seeds

    def jobs(self, experiment: Experiment, strict: bool = True) -> list[tuple[str, int, Config]]:
        configs = self.configs(experiment, strict)
        return [
            (v, s, replace(cfg, seed=s))
            for s in range(max(self.seeds_of(experiment, v) for v in configs))
            for v, cfg in configs.items()
            if s < self.seeds_of(experiment, v)
        ]

    def plan(self) -> pd.DataFrame:
        """Per experiment: configurations, runs, and runs still to train (not finished anywhere in
        the study), with the projected time printed. Stages whose earlier winners are not known
        yet are counted as if the baselines were kept, plus one new baseline per seed for each later
        stage (it changes when a variant is adopted), so the total is an upper bound."""
        table_sha, known, seen, rows = sha256_file(self.prepared()[1]), runs.find_runs(self.root), set(), []
        for experiment in experiments(self.profile):
            keys = {identity.run_key(cfg, table_sha) for _, _, cfg in self.jobs(experiment, strict=False)}
            todo = {k for k in keys if not runs.is_finished(known.get(k, self.root / "-"))} - seen
            seen |= keys  # a run shared by several experiments (a stage's baseline) is trained once
            configs = len(self.configs(experiment, strict=False))
            rows.append({"stage": experiment.stage, "experiment": experiment.name, "configs": configs})
            rows[-1].update(runs=len(keys), to_train=len(todo))
        undecided = sum(
            1
            for s in STAGES[1:]
            if not all((self.root / e.name / "decision.json").is_file() for e in catalogue.earlier(self.profile, s))
        )
        total = sum(r["to_train"] for r in rows) + undecided * self.n_seeds
        seconds, source = runs.projected_seconds(self.root, self.profile, total, self.config.epochs)
        print(
            f"study on profile {self.profile}, {self.n_seeds} seeds: ≤ {total} runs to train (incl. "
            f"{undecided * self.n_seeds} baselines of stages whose earlier winners are not known yet); projected ≤ "
            f"{seconds / 60:.0f} min ({total} × ≤ {self.config.epochs} epochs × {source})",
            flush=True,
        )
        return pd.DataFrame(rows)

    def run_experiment(
        self,
        experiment: Experiment | str,
        stop_after_epoch: int | None = None,
        train: bool = True,
        on_run: Callable[[Path], None] | None = None,
    ) -> dict:
        """Train (or reuse / resume) every (variant, seed) of ``experiment``, then write its
        ``runs.csv``, ``comparison.csv`` and ``decision.json``. Returns them as a dict. With
        ``train=False`` only the statistics are recomputed from the finished runs' val ranks; a
        run that is not finished is an error, never trained. ``on_run(run folder)`` is called as
        each run is finished (trained or found), while its checkpoint is here."""
        experiment = get_experiment(self.profile, experiment) if isinstance(experiment, str) else experiment
        data_root, table_path = self.prepared()
        self.write_data_summary()
        configs, jobs = self.configs(experiment), self.jobs(experiment)
        table_sha, known = sha256_file(table_path), runs.find_runs(self.root)
        todo = [j for j in jobs if not runs.is_finished(known.get(identity.run_key(j[2], table_sha), self.root / "-"))]
        if todo and not train:
            raise InputError(
                f"{experiment.name}: {len(todo)} of its runs are not finished (the first: variant {todo[0][0]}, seed "
                f"{todo[0][1]}); recomputing the statistics needs every run: run the study without --statistics-only"
            )
        if train:
            epochs = configs["baseline"].epochs
            seconds, source = runs.projected_seconds(self.root, self.profile, len(todo), epochs)
            seeds = sorted({self.seeds_of(experiment, v) for v in configs}, reverse=True)
            print(
                f"{experiment.name}: {len(jobs)} runs ({len(configs)} variants × {' or '.join(map(str, seeds))} "
                f"seeds), {len(todo)} to train; projected ≤ {seconds / 60:.1f} min "
                f"({len(todo)} × ≤ {epochs} epochs × {source})",
                flush=True,
            )
        rows, ranks, fields = [], {}, catalogue.changed_fields(configs)
        for variant, seed, cfg in progress_bar(jobs, desc=f"study {experiment.name}", disable=not self.progress):
            name = f"{runs.slug(variant)}_seed{seed}_{identity.run_key(cfg, table_sha)}"
            found, action = runs.ensure_run(
                cfg,
                table_path,
                data_root,
                self.root / experiment.name / name,
                self.root,
                self.progress,
                stop_after_epoch,
            )
            if action == "interrupted":
                raise InputError(
                    f"{found}: interrupted after epoch {stop_after_epoch}; run the study again to resume it"
                )
            if on_run is not None:
                on_run(found)
            rows.append({"experiment": experiment.name, "variant": variant, "seed": seed})
            rows[-1].update({k: getattr(cfg, k) for k in fields} | runs.run_row(found, self.root))
            ranks[(variant, seed)] = pd.read_csv(found / runs.VAL_RANKS)
        return self.write_experiment(experiment, pd.DataFrame(rows), ranks, configs)

    def write_experiment(self, experiment: Experiment, table: pd.DataFrame, ranks: dict, configs: dict) -> dict:
        """``runs.csv``, ``comparison.csv`` and ``decision.json`` of a finished experiment (its
        statistics from the runs' val ranks: rerunning an experiment whose runs all exist only
        recomputes them)."""
        tests, pending = family.family_at_decision(self.profile, self.root, experiment.name)
        table_cmp, holm = comparison.compare(
            table, ranks, [t[f"p_{PRIMARY}"] for t in tests], pending, exploratory=experiment.exploratory
        )
        winner, why = decide(table_cmp)
        decision = {
            "experiment": experiment.name,
            "stage": experiment.stage,
            "question": experiment.question,
            "profile": self.profile,
            "protocol": "official",
            "split": "val",
            "seeds": sorted(table.seed.unique().tolist()),
            "primary": PRIMARY,
            "rule": RULE,
            "winner": winner,
            "why": why,
            "winner_overrides": {k: getattr(configs[winner], k) for k in experiment.fields}
            if winner != "baseline"
            else {},
            "baseline": {k: getattr(configs["baseline"], k) for k in catalogue.changed_fields(configs)},
            **family.family_record(tests, pending, holm, sum(catalogue.planned_tests(self.profile).values())),
        }
        write_tables(self.root / experiment.name, table, table_cmp, decision)
        if all((self.root / e.name / "decision.json").is_file() for e in experiments(self.profile)):
            self.write_final_config()
        return {"runs": table, "comparison": table_cmp, "decision": decision}

    def run(self, name: str, train: bool = True, on_run: Callable[[Path], None] | None = None):
        """One experiment, a stage or ``all`` (:func:`catalogue.select`), in running order: each
        experiment's result as it finishes (``on_run``: :meth:`run_experiment`)."""
        for experiment in catalogue.select(self.profile, name):
            yield self.run_experiment(experiment, train=train, on_run=on_run)

    def run_stage(self, stage: str) -> dict[str, dict]:
        """Every experiment of ``stage`` (finished runs reused, a half-finished one resumed)."""
        return {e.name: self.run_experiment(e) for e in experiments(self.profile) if e.stage == stage}

    def ensure_earlier_stages(self, stage: str) -> list[str]:
        """Run every experiment of an earlier stage that has no decision yet (a notebook opened on
        its own still builds on its predecessors' winners); returns their names."""
        missing = [
            e for e in catalogue.earlier(self.profile, stage) if not (self.root / e.name / "decision.json").is_file()
        ]
        for experiment in missing:
            self.run_experiment(experiment)
        return [e.name for e in missing]

    # ----------------------------------------------------------------- reading back

    def load(self, name: str) -> dict:
        return load_experiment(self.root, name)

    def history(self, name: str) -> pd.DataFrame:
        return experiment_history(self.root, name)

    def grid(self, stage: str) -> pd.DataFrame:
        """The stage's grid: one row per (experiment, variant) with the values it runs; the
        baseline rows show the stage baseline's values of the fields the experiment varies."""
        rows = []
        for experiment in (e for e in experiments(self.profile) if e.stage == stage):
            configs = catalogue.resolve_variants(
                experiment, check(replace(PROFILES[self.profile], **self.stage_overrides(stage)))
            )
            fields = catalogue.changed_fields(configs)
            for variant, cfg in configs.items():
                shown = ", ".join(f"{k}={getattr(cfg, k)}" for k in fields)
                rows.append({"experiment": experiment.name, "variant": variant, "runs with": shown})
        return pd.DataFrame(rows)

    def carried(self, stage: str) -> dict:
        """What ``stage`` hands on: its stage baseline's overrides plus its own winners."""
        overrides = self.stage_overrides(stage)
        for experiment in (e for e in experiments(self.profile) if e.stage == stage):
            overrides.update(self.load(experiment.name)["decision"]["winner_overrides"])
        return overrides

    # ----------------------------------------------------------------- study-wide files

    def write_final_config(self) -> dict:
        """``final_config.json``: every decided field's value after the last stage, by the rule,
        the summary of the study's runs and the commit of the code that wrote it; then the final
        Holm columns and ``noise.csv``."""
        carried = check(replace(PROFILES[self.profile], **self.stage_overrides(STAGES[-1])))
        decisions = [json.loads((self.root / e.name / "decision.json").read_text()) for e in experiments(self.profile)]
        last = {k: v for d in decisions if d["stage"] == STAGES[-1] for k, v in d["winner_overrides"].items()}
        carried = replace(carried, **last)
        record = {
            "profile": self.profile,
            "config": {k: getattr(carried, k) for k in decided_fields(self.profile)},
            "rule": RULE,
            "baseline_recipe": {k: getattr(PROFILES[self.profile], k) for k in RECIPE_FIELDS},
            "runs": {
                **runs.runs_summary(self.root),
                "costs": runs.experiment_costs(self.root, [e.name for e in experiments(self.profile)]),
            },
            "code_commit": repro.git_commit(),
            "decisions": [{k: d[k] for k in ("experiment", "stage", "winner", "why")} for d in decisions],
        }
        path = self.root / "final_config.json"
        previous = json.loads(path.read_text()) if path.is_file() else {}

        def decided(entry: dict) -> dict:  # the same decisions from a later commit keep the first stamp
            return {k: v for k, v in json.loads(json.dumps(entry, default=str)).items() if k != "code_commit"}

        if previous.get("code_commit") and decided(previous) == decided(record):
            record["code_commit"] = previous["code_commit"]
        write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
        family.finalise(self.profile, self.root)
        family.write_noise(self.profile, self.root)
        return record

    def compare_items(self) -> int:
        """The val items the study compares runs on: val's items less the early-stopping ones."""
        table = pd.read_csv(self.prepared()[1], usecols=["item_id", "split"])
        return int(table.loc[table.split == "val", "item_id"].nunique()) - self.config.stop_items

    def write_power_plan(self, noise: Path | None = None, interim: Path | None = None) -> pd.DataFrame:
        """``power_plan.csv``: each planned comparison's minimum detectable Recall@5 difference at this
        study's seeds and val items, from the pooled variance components of an earlier study's
        ``noise.csv`` (default: this profile's committed one), or of an interim look at the finished
        experiments of an earlier design of this study (``interim``: components only, never an
        effect, so the revised plan stays blind to the results). ``components_from`` names the
        source. Written once, before the runs: an existing plan is read back, never recomputed from
        the study's own, later noise."""
        path = self.root / family.POWER_PLAN
        if path.is_file():
            return pd.read_csv(path)
        components, source = family.planning_components(self.profile, noise, interim)
        plan = family.study_plan(
            self.profile, components, self.n_seeds, EXPLORATORY_SEEDS[self.profile], self.compare_items()
        ).assign(components_from=source)
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(path, plan.to_csv(index=False, lineterminator="\n"))
        return plan

    def write_data_summary(self) -> dict:
        """``data_summary.json`` beside the experiments, so the report needs nothing but results/."""
        cfg, table_path = self.config, self.prepared()[1]
        summary = json.loads((Path(table_path).parent / "summary.json").read_text())
        source = (
            f"synthetic ({cfg.synthetic_items} items from helpers.data.synthetic, seed {cfg.synthetic_seed}), "
            "not DeepFashion"
            if cfg.data_root is None
            else "DeepFashion Consumer-to-Shop"
        )
        record = {
            "profile": cfg.profile,
            "data_source": source,
            "splits": summary["splits"],
            "categories": summary.get("categories"),
            "parameters": summary.get("parameters"),
            "table_sha256": summary.get("table_sha256"),
            "val_stop_items": cfg.stop_items,
            "val_compare_items": self.compare_items(),
        }
        self.root.mkdir(parents=True, exist_ok=True)
        write_text_atomic(self.root / "data_summary.json", json.dumps(record, indent=2) + "\n")
        return record


def write_tables(out: Path, table: pd.DataFrame, table_cmp: pd.DataFrame, decision: dict) -> None:
    """An experiment's three files, each written atomically."""
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "runs.csv", table.to_csv(index=False, lineterminator="\n"))
    text = comparison.integer_columns(table_cmp).to_csv(index_label="variant", lineterminator="\n")
    write_text_atomic(out / "comparison.csv", text)
    write_text_atomic(out / "decision.json", json.dumps(decision, indent=2, default=str) + "\n")
