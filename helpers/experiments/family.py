"""The study's family of primary tests and its noise: Holm over every Recall@5 comparison, as
it stood at each decision and once all have run, and where the noise of a comparison comes from.

**Sequential family.** The study decides experiment by experiment in running order (a later
stage builds on an earlier stage's winners), so a decision cannot wait for the whole family.
At the decision of experiment e the family holds the raw Recall@5 p-values of the experiments
before e in running order that have finished, e's own, and every other planned test as p = 1
(:func:`family_at_decision`). Holm's adjusted p-values only fall when a p = 1 becomes a real
p-value, so each decision taken then stays valid under the final family (:func:`finalise`),
which adds the ``_final`` columns once every experiment has finished. ``decision.json`` records
the family as it stood at the decision. Running the experiments out of order only counts the
later-in-order ones as pending, which is conservative.

**Noise** (:func:`noise_table`, ``noise.csv``): each comparison's variance components (seed,
item, seed × item) and what doubling the seeds or the val items would do to its standard error,
with a pooled row that the power calculator (:func:`power_plan`) plans from.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pandas as pd

from helpers.core.errors import InputError
from helpers.core.files import portable_path, write_text_atomic
from helpers.experiments import artifacts, comparison, runs, statistics
from helpers.experiments.catalogue import PRIMARY, PRIMARY_K, experiments, get_experiment, planned_tests
from helpers.experiments.statistics import ALPHA, POWER

NOISE = "noise.csv"  # results/<profile>/noise.csv
POWER_PLAN = "power_plan.csv"  # results/<profile>/power_plan.csv, written before the study's runs
TARGET_MDE = 0.05  # every primary Recall@5 comparison must detect this difference with 80 % power
POOLED = "pooled"
SHARE_NAMES = {"seed": "seed", "item": "item", "interaction": "inter"}  # as the var_ columns name them


def finished_pvalues(root: Path, name: str) -> list[float] | None:
    """The raw Recall@5 p-values of experiment ``name`` in table order (NaN: a variant without
    pairs), or None while it has not finished with these statistics (no ``decision.json``, or one
    written before the crossed test, without its ``test``)."""
    folder = Path(root) / name
    if not (folder / "decision.json").is_file() or "test" not in json.loads((folder / "decision.json").read_text()):
        return None
    table = primary_rows(comparison.read_comparison(folder / "comparison.csv"))
    return table[f"p_{PRIMARY}"].tolist() if f"p_{PRIMARY}" in table.columns else []


def primary_rows(table: pd.DataFrame) -> pd.DataFrame:
    """A comparison table's variants in Holm's family (not the baseline, not exploratory ones)."""
    table = table.drop(index="baseline", errors="ignore")
    role = f"role_{PRIMARY}"
    return table[table[role] != "exploratory"] if role in table.columns else table


def family_at_decision(profile: str, root: Path, current: str) -> tuple[list[dict], int]:
    """``(earlier tests, pending)``: the finished Recall@5 tests of the experiments before
    ``current`` in running order (experiment, variant, p), and the planned tests of every other
    experiment counted as p = 1."""
    tests, pending, before = [], 0, True
    for name, planned in planned_tests(profile).items():
        if name == current:
            before = False
            continue
        found = finished_pvalues(root, name) if before else None
        if found is None:
            pending += planned
            continue
        table = primary_rows(comparison.read_comparison(Path(root) / name / "comparison.csv"))
        tests += [{"experiment": name, "variant": v, f"p_{PRIMARY}": p} for v, p in zip(table.index, found)]
    return tests, pending


def _experiment_tests(
    profile: str, root: Path, name: str, primary_only: bool = False
) -> list[tuple[str, str, statistics.CrossedTest, pd.DataFrame]]:
    """:func:`study_tests`'s rows of one finished experiment."""
    table = pd.read_csv(Path(root) / name / "runs.csv")
    tests = comparison.paired_tests(table, runs.run_ranks(root, table), ks=(PRIMARY_K,))
    exploratory = set(get_experiment(profile, name).exploratory) if primary_only else set()
    return [
        (name, variant, test, table)
        for (variant, _), test in tests.items()
        if test is not None and variant not in exploratory
    ]


def interim_components(profile: str, root: Path) -> tuple[statistics.Components, list[str]]:
    """``(pooled components, the comparisons they pool)`` over every finished experiment of a study
    still running: an interim look at the noise, for re-sizing the seeds or items of the tests not
    yet run. Only the components leave this function, never an effect, so a plan revised from
    them stays blind to the results (blinded sample-size re-estimation)."""
    if not Path(root).is_dir():
        raise InputError(f"{root}: no such study folder")
    found = [
        row
        for name in planned_tests(profile)
        if finished_pvalues(root, name) is not None
        for row in _experiment_tests(profile, root, name)
    ]
    if not found:
        raise InputError(f"{root}: no finished experiment of profile {profile} yet, so no noise to look at")
    pooled = statistics.pooled_components([test.components for _, _, test, _ in found])
    return pooled, [f"{name}/{variant}" for name, variant, _, _ in found]


def finished_study(profile: str, root: Path) -> list[str] | None:
    """Every experiment of ``profile``, once each has finished; else None."""
    names = list(planned_tests(profile))
    return None if any(finished_pvalues(root, name) is None for name in names) else names


def study_tests(
    profile: str, root: Path, primary_only: bool = False
) -> list[tuple[str, str, statistics.CrossedTest, pd.DataFrame]]:
    """``(experiment, variant, Recall@5 test, its runs)`` for every test of the finished study
    (``primary_only``: those in Holm's family), recomputed from the runs' ``val_ranks.csv``."""
    found = []
    for name in finished_study(profile, root) or []:
        found += _experiment_tests(profile, root, name, primary_only)
    return found


def finalise(profile: str, root: Path) -> pd.DataFrame | None:
    """Holm over every finished Recall@5 comparison once every experiment has finished: each
    ``comparison.csv`` gains the ``_final`` Holm columns (rewritten only when they change; the
    decision-time columns and verdicts stay: the decisions used them). Returns the family, one
    row per test, or None while an experiment has not finished (then nothing is written)."""
    names = finished_study(profile, root)
    if names is None:
        return None
    found = study_tests(profile, root, primary_only=True)
    family = statistics.holm_family([test.p_value for _, _, test, _ in found])
    for name in names:
        path = Path(root) / name / "comparison.csv"
        table = comparison.read_comparison(path)
        for i, (experiment, variant, test, _) in enumerate(found):
            if experiment != name:
                continue
            if not np_close(test.p_value, table.loc[variant, f"p_{PRIMARY}"]):
                raise InputError(f"{path}: {variant}'s runs no longer give its p-value; rerun `study {name}`")
            for column, value in comparison.holm_columns(test, family, i, final=True).items():
                table.loc[variant, column] = value
        untested = ~table.index.isin([v for e, v, _, _ in found if e == name])  # baseline, exploratory, no pairs
        table.loc[untested, f"verdict_final_{PRIMARY}"] = table.loc[untested, f"verdict_{PRIMARY}"]
        text = comparison.integer_columns(table).to_csv(index_label="variant", lineterminator="\n")
        if text != path.read_text():
            write_text_atomic(path, text)
    return pd.DataFrame(
        {
            "experiment": [name for name, *_ in found],
            "variant": [variant for _, variant, *_ in found],
            f"p_{PRIMARY}": [test.p_value for _, _, test, _ in found],
            f"holm_rank_final_{PRIMARY}": family.rank,
            f"alpha_step_final_{PRIMARY}": family.alpha_step,
            f"p_holm_final_{PRIMARY}": family.p_holm,
        }
    )


def effects(profile: str, root: Path) -> pd.DataFrame:
    """Every finished comparison of the study, one row each (``experiment``, ``variant``, ``role``,
    ``n_seeds``): its val Recall@5 difference from its experiment's baseline, the interval that
    decides its verdict (a primary test's at the level Holm's step gave it, over the whole family
    once every experiment has finished (:func:`finalise`), else at its decision; an exploratory
    test's raw 95 %), the verdict, and the minimum detectable effect at that test's level (a
    primary test's at Holm's strictest, ``mde_holm``; an exploratory test's at 0.05), sorted by
    the difference, largest first: the study's ranked effects."""
    rows = []
    for experiment in experiments(profile):
        path = Path(root) / experiment.name / "comparison.csv"
        if not path.is_file():
            continue
        table = comparison.read_comparison(path).drop(index="baseline", errors="ignore")
        for variant, row in table.dropna(subset=[f"diff_{PRIMARY}"]).iterrows():
            primary = row.get(f"role_{PRIMARY}", "primary") == "primary" and pd.notna(row.get(f"low_adj_{PRIMARY}"))
            final = "_final" if primary and pd.notna(row.get(f"low_adj_final_{PRIMARY}")) else ""
            infix = f"_adj{final}" if primary else ""
            rows.append(
                {
                    "experiment": experiment.name,
                    "variant": variant,
                    "role": "primary" if primary else "exploratory",
                    "n_seeds": int(row.n_seeds),
                    "diff": row[f"diff_{PRIMARY}"],
                    "low": row[f"low{infix}_{PRIMARY}"],
                    "high": row[f"high{infix}_{PRIMARY}"],
                    "verdict": row[f"verdict{final}_{PRIMARY}"],
                    "mde": row.get(f"mde_holm{final}_{PRIMARY}" if primary else f"mde_{PRIMARY}", float("nan")),
                }
            )
    columns = ["experiment", "variant", "role", "n_seeds", "diff", "low", "high", "verdict", "mde"]
    return pd.DataFrame(rows, columns=columns).sort_values("diff", ascending=False, ignore_index=True)


def np_close(a: float, b: float) -> bool:
    return abs(float(a) - float(b)) <= 1e-9 * max(1.0, abs(float(b)))


def noise_row(experiment: str, variant: str, test: statistics.CrossedTest) -> dict:
    """One comparison's components and what doubling its seeds or its val items would buy."""
    parts, s, i = test.components, test.n_seeds, test.n_items
    shares = parts.shares(s, i)
    return {
        "experiment": experiment,
        "variant": variant,
        "n_seeds": s,
        "n_items": i,
        "n_queries": test.n_queries,
        f"var_seed_{PRIMARY}": parts.seed,
        f"var_item_{PRIMARY}": parts.item,
        f"var_inter_{PRIMARY}": parts.interaction,
        **{f"share_{SHARE_NAMES[k]}_{PRIMARY}": v for k, v in shares.items()},
        f"se_{PRIMARY}": parts.se(s, i),
        f"se_2x_seeds_{PRIMARY}": parts.se(2 * s, i),
        f"se_2x_items_{PRIMARY}": parts.se(s, 2 * i),
    }


def noise_table(profile: str, root: Path) -> pd.DataFrame | None:
    """Where each Recall@5 comparison's noise comes from (:func:`noise_row`), plus the pooled
    components over every comparison, exploratory ones included (the row ``pooled``, the mean of
    their estimates, its SE at the study's primary design: the seeds and val items most primary
    tests run on); None while an experiment has not finished."""
    found = study_tests(profile, root)
    if finished_study(profile, root) is None or not found:
        return None
    rows = [noise_row(name, variant, test) for name, variant, test, _ in found]
    pooled = statistics.pooled_components([test.components for _, _, test, _ in found])
    primary = [t for name, variant, t, _ in found if variant not in get_experiment(profile, name).exploratory]
    tests = primary or [t for _, _, t, _ in found]
    # the primary design: the seeds and items most primary tests run on (a re-sized test runs more)
    design = Counter((t.n_seeds, t.n_items) for t in tests).most_common(1)[0][0]
    typical = next(t for t in tests if (t.n_seeds, t.n_items) == design)
    summary = noise_row(POOLED, POOLED, typical) | {
        f"var_seed_{PRIMARY}": pooled.seed,
        f"var_item_{PRIMARY}": pooled.item,
        f"var_inter_{PRIMARY}": pooled.interaction,
        **{f"share_{SHARE_NAMES[k]}_{PRIMARY}": v for k, v in pooled.shares(typical.n_seeds, typical.n_items).items()},
        f"se_{PRIMARY}": pooled.se(typical.n_seeds, typical.n_items),
        f"se_2x_seeds_{PRIMARY}": pooled.se(2 * typical.n_seeds, typical.n_items),
        f"se_2x_items_{PRIMARY}": pooled.se(typical.n_seeds, 2 * typical.n_items),
    }
    return pd.DataFrame([*rows, summary])


def write_noise(profile: str, root: Path) -> pd.DataFrame | None:
    noise = noise_table(profile, root)
    if noise is not None:
        write_text_atomic(Path(root) / NOISE, noise.to_csv(index=False, lineterminator="\n"))
    return noise


def pooled_from(path: Path) -> statistics.Components:
    """The pooled variance components a committed ``noise.csv`` holds."""
    if not Path(path).is_file():
        raise InputError(f"{path}: missing; finish a study first (its noise.csv holds the components)")
    noise = pd.read_csv(path)
    row = noise[noise.experiment == POOLED]
    if row.empty or f"var_seed_{PRIMARY}" not in noise.columns:
        raise InputError(f"{path}: no pooled variance components (written before the crossed statistics?)")
    row = row.iloc[0]
    return statistics.Components(
        float(row[f"var_seed_{PRIMARY}"]), float(row[f"var_item_{PRIMARY}"]), float(row[f"var_inter_{PRIMARY}"])
    )


def planning_components(
    profile: str, noise: Path | None = None, interim: Path | None = None
) -> tuple[statistics.Components, str]:
    """``(components, where they come from)`` for a power plan: pooled over a committed
    ``noise.csv`` (default: the profile's, under ``results/``) or, with ``interim``, over the
    finished experiments of a running (or abandoned) design of a study (:func:`interim_components`)."""
    if interim is not None:
        if noise is not None:
            raise InputError("--interim and --noise are two sources of the components: give one")
        components, pooled = interim_components(profile, Path(interim))
        return components, f"interim look at {portable_path(interim)} ({', '.join(pooled)})"
    noise = Path(noise or artifacts.results_root(profile) / NOISE)
    return pooled_from(noise), f"pooled over {portable_path(noise)}"


def family_size(path: Path) -> int:
    """How many Recall@5 tests the committed study's family held: ``noise.csv``'s comparisons."""
    size = int((pd.read_csv(path).experiment != POOLED).sum())
    if size < 1:
        raise InputError(f"{path}: lists no comparison; give the family's size with --family")
    return size


def power_plan(components: statistics.Components, seeds, items, m: int, target: float | None = None) -> pd.DataFrame:
    """The minimum detectable Recall@5 difference (80 % power) for each seeds × val items, at the
    fixed level 0.05 and at Holm's strictest level 0.05 / m, and whether it meets ``target``."""
    rows = []
    for s in seeds:
        for i in items:
            fixed = statistics.planned_mde(components, s, i, 1)
            holm = statistics.planned_mde(components, s, i, m)
            row = {"seeds": s, "val_items": i, "se": fixed["se"], "df": fixed["df"], "mde_0.05": fixed["mde"]}
            row[f"mde_holm_m{m}"] = holm["mde"]
            if target is not None:
                row["meets_target"] = bool(holm["mde"] <= target)
            rows.append(row)
    return pd.DataFrame(rows)


def study_plan(
    profile: str, components: statistics.Components, n_seeds: int, n_exploratory_seeds: int, n_items: int
) -> pd.DataFrame:
    """The power plan of a study before its runs: one row per planned comparison (experiment,
    variant, role) with its seeds and val items, the level it may have to pass (a primary test:
    Holm's strictest step, ``0.05 / m`` over the planned primary family; an exploratory one:
    ``0.05``, uncorrected), and the minimum detectable Recall@5 difference (80 % power) there,
    from the variance components of an earlier study; ``meets_target``: primary and MDE <= 0.05."""
    m = sum(planned_tests(profile).values())
    rows = []
    for experiment in experiments(profile):
        for variant in experiment.variants:
            exploratory = variant in experiment.exploratory
            seeds = min(n_seeds, n_exploratory_seeds) if exploratory else n_seeds
            plan = statistics.planned_mde(components, seeds, n_items, 1 if exploratory else m)
            rows.append(
                {
                    "experiment": experiment.name,
                    "variant": variant,
                    "role": "exploratory" if exploratory else "primary",
                    "seeds": seeds,
                    "val_items": n_items,
                    "family_m": 0 if exploratory else m,
                    "level": ALPHA if exploratory else ALPHA / m,
                    "se": plan["se"],
                    "df": plan["df"],
                    f"mde_{PRIMARY}": plan["mde"],
                    "meets_target": bool(not exploratory and plan["mde"] <= TARGET_MDE),
                    f"var_seed_{PRIMARY}": components.seed,
                    f"var_item_{PRIMARY}": components.item,
                    f"var_inter_{PRIMARY}": components.interaction,
                }
            )
    return pd.DataFrame(rows)


def family_record(tests: list[dict], pending: int, family: statistics.HolmFamily, planned: int) -> dict:
    """How an experiment's decision was made, as ``decision.json`` records it: the test, the
    noise model and the family as it stood at the decision."""
    return {
        "ci_percent": round(100 * (1 - ALPHA)),
        "test": "paired difference over seeds × val items as crossed random effects (seed, item, seed × item), "
        "t interval with small-sample degrees of freedom (helpers.experiments.statistics)",
        "family": {
            "metric": PRIMARY,
            "method": "holm",
            "alpha": ALPHA,
            "power": POWER,
            "planned": planned,
            "m": family.m,
            "pending": pending,
            "earlier_tests": json.loads(json.dumps(tests)),
        },
        "exploratory": ["recall@1", "recall@10"],
    }
