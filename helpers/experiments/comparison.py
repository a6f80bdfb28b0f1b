"""One experiment's comparison and decision: each variant against its baseline on the seeds both
have, per Recall@K, with crossed seed × item statistics (:mod:`helpers.experiments.statistics`),
Holm's correction for the primary metric, the verdicts and the decision by the written rule.

A comparison pairs two ``[seeds, queries]`` grids of hit@K indicators (the baseline's and the
variant's runs of the same seeds, the queries aligned by path) with each query's item. Recall@5
is the primary metric: its tests form Holm's family with the study's other Recall@5 tests
(:mod:`helpers.experiments.family`), its verdict comes from the interval at the level Holm's
step-down gives it, and its minimum detectable effect is stated at the fixed level 0.05
(``mde_``) and at the strictest Holm level ``0.05 / m`` (``mde_holm_``). Recall@1 and @10 are
exploratory: raw intervals, no correction.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from helpers.core.errors import InputError
from helpers.evaluation.metrics import METRICS
from helpers.experiments import statistics
from helpers.experiments.catalogue import KS, PRIMARY, PRIMARY_K
from helpers.experiments.statistics import ALPHA

# Per Recall@K in this order; the primary metric adds its variance components and Holm's columns,
# and the study's final family (family.finalise) appends the ``_final`` Holm set.
TEST_COLUMNS = ("diff", "seed_diffs", "se", "df", "low", "high", "p", "mde")
COMPONENT_COLUMNS = ("var_seed", "var_item", "var_inter")
HOLM_COLUMNS = ("holm_m", "holm_rank", "alpha_step", "p_holm", "low_adj", "high_adj", "mde_holm")
LABEL_COLUMNS = ("verdict", "role")
INTEGER_PREFIXES = ("holm_m_", "holm_rank_")


def seed_summary(runs: pd.DataFrame, columns=tuple(f"val_{m}" for m in METRICS)) -> pd.DataFrame:
    """Per variant: ``n_seeds``, and for each column its mean and sample std (ddof 1; NaN for
    one seed) over seeds. Variants keep their first-appearance order."""
    grouped = runs.groupby("variant", sort=False)
    out = pd.DataFrame({"n_seeds": grouped.seed.nunique()})
    for column in columns:
        out[f"{column}_mean"] = grouped[column].mean()
        out[f"{column}_std"] = grouped[column].std(ddof=1)
    return out


def check_same_queries(ranks: dict) -> None:
    """Paired statistics need every run scored on the same val queries (the same table), each
    query of the same item."""
    keys = list(ranks)
    queries = [ranks[k].sort_values("path", kind="stable")[["path", "item_id"]].astype(str) for k in keys]
    for key, found in zip(keys[1:], queries[1:]):
        if not found.reset_index(drop=True).equals(queries[0].reset_index(drop=True)):
            raise InputError(
                f"val_ranks.csv of (variant, seed) {key} holds different queries from that of {keys[0]}: "
                "the runs used different tables"
            )


def hit_grid(ranks_by_seed: dict[int, pd.DataFrame], seeds, k: int) -> np.ndarray:
    """``[seeds, queries]`` hit@K indicators, the queries aligned by path (see :func:`check_same_queries`)."""
    frames = [ranks_by_seed[s].sort_values("path", kind="stable") for s in seeds]
    return np.stack([(f.first_hit_rank.to_numpy() < k).astype(np.float64) for f in frames])


def query_items(ranks: pd.DataFrame) -> np.ndarray:
    """Each query's item, in :func:`hit_grid`'s order of queries (by path)."""
    return ranks.sort_values("path", kind="stable").item_id.astype(str).to_numpy()


def paired_grids(
    runs: pd.DataFrame, ranks: dict[tuple[str, int], pd.DataFrame], variant: str, k: int, reference: str = "baseline"
) -> tuple[np.ndarray, np.ndarray] | None:
    """The reference's and ``variant``'s ``[seeds, queries]`` hit@K grids on the seeds both have
    (:func:`hit_grid`); None when they share no seed."""
    seeds = sorted(set(runs.loc[runs.variant == reference, "seed"]) & set(runs.loc[runs.variant == variant, "seed"]))
    if not seeds:
        return None
    return tuple(hit_grid({s: ranks[(v, s)] for s in seeds}, seeds, k) for v in (reference, variant))


def paired_tests(
    runs: pd.DataFrame, ranks: dict[tuple[str, int], pd.DataFrame], ks=KS, reference: str = "baseline"
) -> dict[tuple[str, int], statistics.CrossedTest | None]:
    """``(variant, K) → crossed test of its Recall@K difference from the reference`` on the seeds
    both have (None: no common seed)."""
    check_same_queries(ranks)
    items = query_items(next(iter(ranks.values())))
    tests = {}
    for variant in runs.variant.unique():
        if variant == reference:
            continue
        for k in ks:
            grids = paired_grids(runs, ranks, variant, k, reference)
            tests[(variant, k)] = None if grids is None else statistics.crossed_test(*grids, items)
    return tests


def stated_mde(test: statistics.CrossedTest, m: int) -> float:
    """The difference this comparison's design detects with 80 % power at level ``0.05 / m``: the
    test's own power integrated over its estimated components (:func:`statistics.planned_mde`);
    with one seed or no spread at all (nothing to plan from) the ``(t + t) · se`` shortcut."""
    parts = np.array([test.components.seed, test.components.item, test.components.interaction])
    if test.n_seeds < 2 or not np.isfinite(parts).all() or not parts.any():
        return test.mde(ALPHA / m)
    return statistics.planned_mde(test.components, test.n_seeds, test.n_items, m)["mde"]


def test_columns(test: statistics.CrossedTest, metric: str, primary: bool = True) -> dict:
    """The raw (unadjusted) columns of one test of ``metric``; ``primary``: the variant's Recall@5
    test belongs to Holm's family (else it is exploratory on every metric)."""
    low, high = test.interval(ALPHA)
    row = {
        f"diff_{metric}": test.diff,
        f"seed_diffs_{metric}": json.dumps(list(test.seed_diffs)),
        f"se_{metric}": test.se,
        f"df_{metric}": test.df,
        f"low_{metric}": low,
        f"high_{metric}": high,
        f"p_{metric}": test.p_value,
        f"mde_{metric}": stated_mde(test, 1),
        f"verdict_{metric}": statistics.verdict(low, high),
        f"role_{metric}": "primary" if metric == PRIMARY and primary else "exploratory",
    }
    if metric == PRIMARY:
        parts = test.components
        row.update({f"var_seed_{metric}": parts.seed, f"var_item_{metric}": parts.item})
        row[f"var_inter_{metric}"] = parts.interaction
    return row


def holm_columns(test: statistics.CrossedTest, family: statistics.HolmFamily, i: int, final: bool) -> dict:
    """The primary metric's Holm columns of one test (the ``i``-th finished test of ``family``);
    ``final``: the ``_final`` set written once the whole family has run. The interval is taken at
    the level Holm's step-down gives the test (never narrower than the step that decided it), the
    verdict from it; ``mde_holm`` at the strictest level, ``alpha / m``."""
    infix, alpha_step, p_holm = "_final" if final else "", float(family.alpha_step[i]), float(family.p_holm[i])
    low, high = test.interval(alpha_step)
    return {
        f"holm_m{infix}_{PRIMARY}": family.m,
        f"holm_rank{infix}_{PRIMARY}": int(family.rank[i]),
        f"alpha_step{infix}_{PRIMARY}": alpha_step,
        f"p_holm{infix}_{PRIMARY}": p_holm,
        f"low_adj{infix}_{PRIMARY}": low,
        f"high_adj{infix}_{PRIMARY}": high,
        f"mde_holm{infix}_{PRIMARY}": stated_mde(test, family.m),
        f"verdict{infix}_{PRIMARY}": statistics.holm_verdict(low, high, p_holm),
    }


def comparison_columns() -> list[str]:
    """The statistics' columns of a comparison table, in order."""
    columns = []
    for k in KS:
        primary = k == PRIMARY_K
        extra = (*COMPONENT_COLUMNS, *HOLM_COLUMNS) if primary else ()
        columns += [f"{c}_recall@{k}" for c in (*TEST_COLUMNS, *extra, *LABEL_COLUMNS)]
    return columns


def compare(
    runs: pd.DataFrame,
    ranks: dict[tuple[str, int], pd.DataFrame],
    others=(),
    pending: int = 0,
    reference: str = "baseline",
    exploratory=(),
) -> tuple[pd.DataFrame, statistics.HolmFamily]:
    """``(table, Holm family)``: one row per variant with its seeds' mean ± std and, against the
    reference on the seeds both have, per Recall@K the test's columns (:func:`test_columns`).

    The Recall@5 tests join Holm's family with ``others`` (the raw p-values of the study's earlier
    finished Recall@5 tests) and ``pending`` planned tests counted as p = 1 (their p-values can
    only lower the adjusted ones, so a decision taken now stays valid); the family comes back too.
    The ``exploratory`` variants stay out of the family: raw intervals only, labelled so.
    """
    summary = seed_summary(runs)
    tests = paired_tests(runs, ranks, reference=reference)
    tested = [v for v in summary.index if v != reference and v not in exploratory]
    family = statistics.holm_family(
        [*others, *(np.nan if tests[(v, PRIMARY_K)] is None else tests[(v, PRIMARY_K)].p_value for v in tested)],
        pending,
    )
    rows = {}
    for variant in summary.index:
        row = {}
        for k in KS:
            metric, test = f"recall@{k}", tests.get((variant, k))
            if test is None:
                row[f"verdict_{metric}"] = "baseline" if variant == reference else "no pairs"
                continue
            row.update(test_columns(test, metric, primary=variant in tested))
            if k == PRIMARY_K and variant in tested:  # the verdict at Holm's level replaces the raw one
                row.update(holm_columns(test, family, len(others) + tested.index(variant), final=False))
        rows[variant] = row
    return summary.join(comparison_frame(rows)), family


def comparison_frame(rows: dict[str, dict]) -> pd.DataFrame:
    """``{variant: {column: value}}`` as a table of :func:`comparison_columns`, counts and ranks as
    nullable integers (the baseline row has none)."""
    columns = {
        c: pd.Series(
            {v: row[c] for v, row in rows.items() if c in row},
            dtype="Int64" if c.startswith(INTEGER_PREFIXES) else None,
        )
        for c in comparison_columns()
    }
    return pd.DataFrame(columns, index=list(rows))


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Counts and ranks as nullable integers, so they are written as integers."""
    return table.astype({c: "Int64" for c in table.columns if c.startswith(INTEGER_PREFIXES)})


def read_comparison(path) -> pd.DataFrame:
    """A ``comparison.csv`` as written, its integer columns read as integers."""
    names = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, index_col="variant", dtype={c: "Int64" for c in names if c.startswith(INTEGER_PREFIXES)})


def decide(comparison: pd.DataFrame) -> tuple[str, str]:
    """``(winner, why)`` by the rule (:data:`helpers.experiments.catalogue.RULE`) from a :func:`compare` table."""
    primary = comparison.get(f"role_{PRIMARY}", pd.Series("primary", index=comparison.index)) == "primary"
    better = comparison[primary & (comparison[f"verdict_{PRIMARY}"] == "better")]
    if better.empty:
        return "baseline", f"no variant is `better` on val {PRIMARY}: the baseline is kept"
    winner = better[f"diff_{PRIMARY}"].idxmax()
    row = better.loc[winner]
    return winner, (
        f"{winner} is `better` on val {PRIMARY} by {row[f'diff_{PRIMARY}']:+.3f}, interval at Holm's level "
        f"[{row[f'low_adj_{PRIMARY}']:+.3f}, {row[f'high_adj_{PRIMARY}']:+.3f}], Holm p {row[f'p_holm_{PRIMARY}']:.4f}"
    )


def learned(result: dict) -> str:
    """A sentence on one experiment computed from its numbers, so it cannot contradict them."""
    comparison, decision = result["comparison"], result["decision"]
    reference = "baseline" if "baseline" in comparison.index else "none"  # post-processing compares to `none`
    parts = [
        f"{variant}: {row[f'diff_{PRIMARY}']:+.3f} val R@5 [{row[f'low_adj_{PRIMARY}']:+.3f}, "
        f"{row[f'high_adj_{PRIMARY}']:+.3f}] at Holm's level, Holm p {row[f'p_holm_{PRIMARY}']:.4f}, "
        f"{row[f'verdict_{PRIMARY}']}"
        if pd.notna(row.get(f"p_holm_{PRIMARY}"))
        else f"{variant} (exploratory, uncorrected): {row[f'diff_{PRIMARY}']:+.3f} val R@5 "
        f"[{row[f'low_{PRIMARY}']:+.3f}, {row[f'high_{PRIMARY}']:+.3f}], {row[f'verdict_{PRIMARY}']}"
        for variant, row in comparison.drop(index=reference).iterrows()
        if pd.notna(row.get(f"p_holm_{PRIMARY}")) or pd.notna(row.get(f"p_{PRIMARY}"))
    ]
    base = comparison.loc[reference]
    n = int(base.n_seeds)
    head = (
        f"{decision['experiment']} ({reference} val R@5 {base[f'val_{PRIMARY}_mean']:.3f}, {n} seed{'s' * (n != 1)}): "
    )
    body = "; ".join(parts) if parts else "no variant differs from the baseline"
    return head + body + f". Adopted: {decision['winner']}."
