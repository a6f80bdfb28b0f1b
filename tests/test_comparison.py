"""helpers.experiments.comparison: one experiment's table against hand-computed cases, its Holm
columns against statsmodels and Holm's step-down, and the decision by the rule."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from helpers.core.errors import InputError
from helpers.experiments import comparison, statistics
from helpers.experiments.runs import metrics_from_ranks


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """runs.csv-like rows: one per (variant, seed), ``val_recall@5`` from ``values``."""
    rows = [{"variant": v, "seed": s, "val_recall@5": x} for v, xs in values.items() for s, x in enumerate(xs)]
    return pd.DataFrame(rows)


def test_seed_summary_mean_and_sample_std():
    summary = comparison.seed_summary(_runs({"baseline": [0.5, 0.7], "one_seed": [0.4]}), columns=("val_recall@5",))
    assert summary.loc["baseline", "n_seeds"] == 2
    assert summary.loc["baseline", "val_recall@5_mean"] == pytest.approx(0.6)
    # sample std (ddof 1): sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = sqrt(0.02)
    assert summary.loc["baseline", "val_recall@5_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary.loc["one_seed", "val_recall@5_std"])
    assert list(summary.index) == ["baseline", "one_seed"]


def ranks_frame(ranks: list[int], items: list[str] | None = None) -> pd.DataFrame:
    """val_ranks.csv rows; by default every query its own item."""
    return pd.DataFrame(
        {
            "path": [f"q{i:03d}.jpg" for i in range(len(ranks))],
            "item_id": items or [f"id_{i}" for i in range(len(ranks))],
            "first_hit_rank": ranks,
            "average_precision": 0.5,
        }
    )


def runs_of(ranks: dict) -> pd.DataFrame:
    """runs.csv rows whose val metrics are those of the given per-query ranks."""
    return pd.DataFrame(
        [
            {"variant": v, "seed": s, **{f"val_{m}": x for m, x in metrics_from_ranks(r).items()}}
            for (v, s), r in ranks.items()
        ]
    )


def test_compare_by_hand():
    items = ["a", "a", "b", "c"]
    ranks = {
        ("baseline", 0): ranks_frame([0, 3, 7, 12], items),
        ("baseline", 1): ranks_frame([0, 0, 7, 12], items),
        ("wide", 0): ranks_frame([0, 0, 0, 12], items),
        ("wide", 1): ranks_frame([1, 0, 3, 4], items),
    }
    table, family = comparison.compare(runs_of(ranks), ranks)
    # hits@1: baseline 1+2 of 8, variant 3+1 of 8 → +1/8; hits@5: 4 vs 7 → +3/8; hits@10: 6 vs 7 → +1/8
    assert table.loc["wide", "diff_recall@1"] == pytest.approx(1 / 8)
    assert table.loc["wide", "diff_recall@5"] == pytest.approx(3 / 8)
    assert table.loc["wide", "diff_recall@10"] == pytest.approx(1 / 8)
    # per seed, R@5: seed 0 hits 2 → 3 of 4, seed 1 hits 2 → 4 of 4
    assert json.loads(table.loc["wide", "seed_diffs_recall@5"]) == pytest.approx([1 / 4, 2 / 4])
    assert table.loc["baseline", "val_recall@5_mean"] == pytest.approx(0.5)
    assert table.loc["wide", "val_recall@5_mean"] == pytest.approx(7 / 8)
    assert table.loc["wide", "val_recall@5_std"] == pytest.approx(math.sqrt(2 * (1 / 8) ** 2))  # 3/4 and 1
    assert table.loc["baseline", "verdict_recall@5"] == "baseline"
    assert table.loc["wide", "low_recall@5"] <= 3 / 8 <= table.loc["wide", "high_recall@5"]
    roles = table.loc["wide", ["role_recall@1", "role_recall@5", "role_recall@10"]]
    assert list(roles) == ["exploratory", "primary", "exploratory"]
    # the test's numbers are the statistics module's crossed test of the two grids
    grids = [comparison.hit_grid({s: ranks[(v, s)] for s in (0, 1)}, (0, 1), 5) for v in ("baseline", "wide")]
    test = statistics.crossed_test(*grids, comparison.query_items(ranks[("baseline", 0)]))
    wide = table.loc["wide"]
    assert (wide["se_recall@5"], wide["df_recall@5"], wide["p_recall@5"]) == (test.se, test.df, test.p_value)
    assert wide["var_inter_recall@5"] == test.components.interaction
    planned = statistics.planned_mde(test.components, 2, 3, 1)["mde"]  # the design's power, not t + t shortcut
    assert wide["mde_recall@5"] == pytest.approx(planned)
    # alone in its family (m = 1), Holm changes nothing: its level is alpha, its p the raw p
    assert (wide["holm_m_recall@5"], wide["holm_rank_recall@5"], wide["alpha_step_recall@5"]) == (1, 1, 0.05)
    assert wide["p_holm_recall@5"] == wide["p_recall@5"] and wide["low_adj_recall@5"] == wide["low_recall@5"]
    assert wide["mde_holm_recall@5"] == pytest.approx(wide["mde_recall@5"])
    assert "p_holm_recall@1" not in table.columns and "var_seed_recall@1" not in table.columns
    assert family.m == 1


def test_compare_refuses_runs_on_different_queries():
    ranks = {("baseline", 0): ranks_frame([0, 1]), ("v", 0): ranks_frame([0, 1, 2])}
    with pytest.raises(InputError, match="different queries"):
        comparison.compare(runs_of(ranks), ranks)
    ranks = {("baseline", 0): ranks_frame([0, 1], ["a", "b"]), ("v", 0): ranks_frame([0, 1], ["a", "a"])}
    with pytest.raises(InputError, match="different queries"):
        comparison.compare(runs_of(ranks), ranks)


def _clear_gain(n_seeds: int = 3) -> dict:
    """Three seeds, 100 single-query items: the baseline hits 7 of them; the variant hits 20, 25
    and 30 others (+0.18 on average, a clear gain)."""
    ranks = {}
    for s in range(n_seeds):
        base = [9] * 20 + [0] * 7 + [9] * 73
        variant = [0] * (20 + 5 * s) + [9] * 7 + [9] * (73 - 5 * s)
        ranks[("baseline", s)], ranks[("v", s)] = ranks_frame(base), ranks_frame(variant)
    return ranks


def test_raw_significant_but_not_after_holm_is_within_noise():
    ranks = _clear_gain()
    runs = runs_of(ranks)
    alone, _ = comparison.compare(runs, ranks)
    assert alone.loc["v", "low_recall@5"] > 0 and alone.loc["v", "verdict_recall@5"] == "better"
    p = alone.loc["v", "p_recall@5"]
    pending = int(np.ceil(0.05 / p)) + 5  # enough planned tests that the first Holm step misses it
    among, family = comparison.compare(runs, ranks, pending=pending)
    row = among.loc["v"]
    m = pending + 1
    assert row["low_recall@5"] > 0 and row["p_recall@5"] < 0.05  # the raw interval excludes 0
    assert row["holm_m_recall@5"] == m and row["alpha_step_recall@5"] == pytest.approx(0.05 / m)
    assert row["p_holm_recall@5"] == pytest.approx(min(1.0, m * p))
    assert row["low_adj_recall@5"] < 0 < row["high_adj_recall@5"]
    assert row["verdict_recall@5"] == "within noise" and comparison.decide(among)[0] == "baseline"
    assert row["mde_holm_recall@5"] > row["mde_recall@5"]  # a stricter level needs a larger effect
    assert row["mde_recall@5"] == pytest.approx(alone.loc["v", "mde_recall@5"])  # the fixed level's stays
    # the other experiments' finished tests take part in the ranking
    ranked = comparison.compare(runs, ranks, others=[1e-6, 0.5], pending=2)[0].loc["v"]
    assert (ranked["holm_m_recall@5"], ranked["holm_rank_recall@5"]) == (5, 2)
    assert ranked["p_holm_recall@5"] == pytest.approx(multipletests([1e-6, 0.5, p, 1, 1], method="holm")[1][2])


def test_interval_never_narrower_than_the_step_that_decided():
    """After Holm's step-down stops, every later test's interval is taken at the stopping step's
    level, not at its own looser one, so it holds 0 like the test that stopped the procedure."""
    ranks = _clear_gain()
    runs = runs_of(ranks)
    p = comparison.compare(runs, ranks)[0].loc["v", "p_recall@5"]
    assert p < 0.05 / 3  # rejected at Holm's first step of three
    table, family = comparison.compare(runs, ranks, others=[0.5, 0.9])
    row = table.loc["v"]
    assert row["holm_rank_recall@5"] == 1 and row["alpha_step_recall@5"] == pytest.approx(0.05 / 3)
    assert row["verdict_recall@5"] == "better" and row["low_adj_recall@5"] > 0
    # p = 0.5 stops the step-down at step 2 (level 0.05 / 2); p = 0.9 (rank 3) keeps that level, not 0.05
    assert family.alpha_step[:2] == pytest.approx([0.05 / 2, 0.05 / 2])
    assert list(family.rejected) == [False, False, True]


def _comparison(diffs: dict[str, tuple[float, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "diff_recall@5": {v: d for v, (d, _) in diffs.items()},
            "low_adj_recall@5": {v: d - 0.01 for v, (d, _) in diffs.items()},
            "high_adj_recall@5": {v: d + 0.01 for v, (d, _) in diffs.items()},
            "p_holm_recall@5": {v: 0.01 for v in diffs},
            "verdict_recall@5": {v: verdict for v, (_, verdict) in diffs.items()},
        }
    )


def test_decide_by_the_rule():
    table = _comparison(
        {"baseline": (math.nan, "baseline"), "a": (0.05, "better"), "b": (0.08, "better"), "c": (0.2, "within noise")}
    )
    winner, why = comparison.decide(table)
    assert winner == "b" and "[+0.070, +0.090]" in why  # the larger `better` difference; c's larger one is noise
    table = _comparison({"baseline": (math.nan, "baseline"), "c": (0.2, "within noise"), "d": (-0.1, "worse")})
    winner, why = comparison.decide(table)
    assert winner == "baseline" and "kept" in why


def test_comparison_round_trips_through_csv(tmp_path):
    ranks = _clear_gain()
    table, _ = comparison.compare(runs_of(ranks), ranks, pending=3)
    path = tmp_path / "comparison.csv"
    path.write_text(comparison.integer_columns(table).to_csv(index_label="variant", lineterminator="\n"))
    back = comparison.read_comparison(path)
    assert back.loc["v", "holm_m_recall@5"] == 4 and str(back["holm_m_recall@5"].dtype) == "Int64"
    assert back.loc["v", "p_recall@5"] == pytest.approx(table.loc["v", "p_recall@5"], rel=1e-12)
