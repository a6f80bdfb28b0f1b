"""helpers.experiments.statistics: the nested seed × item bootstrap against exact enumerations and
a loop-by-loop reimplementation, Holm against statsmodels, the MDE's pieces, the per-comparison
streams, and verdicts from the Holm-adjusted interval."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from statsmodels.stats.multitest import multipletests

from helpers.core.errors import InputError
from helpers.experiments import statistics, study


def _bootstrap(diff, items, n_boot=statistics.N_BOOT, seed=0) -> statistics.PairedBootstrap:
    """The bootstrap of a grid of paired differences (baseline 0, variant ``diff``)."""
    diff = np.asarray(diff, dtype=np.float64)
    return statistics.paired_bootstrap(np.zeros_like(diff), diff, items, np.random.default_rng(seed), n_boot)


def _exact(diff: np.ndarray, items) -> tuple[np.ndarray, np.ndarray]:
    """``(values, probabilities)`` of the replicate mean, by enumerating every ordered draw of
    seeds and of items (each equally likely): the expanded (seed, query) cells averaged."""
    n_seeds, labels = diff.shape[0], sorted(set(items))
    queries = {label: [q for q, item in enumerate(items) if item == label] for label in labels}
    draws = list(itertools.product(range(n_seeds), repeat=n_seeds))
    item_draws = list(itertools.product(labels, repeat=len(labels)))
    means = [
        np.mean([diff[s, q] for s in seeds for item in drawn for q in queries[item]])
        for seeds in draws
        for drawn in item_draws
    ]
    values, counts = np.unique(np.round(means, 12), return_counts=True)
    return values, counts / counts.sum()


def test_one_seed_two_items_by_hand():
    # Item A has one query (difference -1), item B two (+1, +1). Drawing two items: AA (1/4)
    # gives -1; BB (1/4) gives +1; AB or BA (1/2) gives the mean of the expanded queries
    # (-1 + 1 + 1) / 3 = 1/3 (an unweighted mean of item means would give 0).
    test = _bootstrap([[-1.0, 1.0, 1.0]], ["A", "B", "B"], n_boot=200_000)
    values, probabilities = _exact(np.array([[-1.0, 1.0, 1.0]]), ["A", "B", "B"])
    assert values.tolist() == pytest.approx([-1, 1 / 3, 1]) and probabilities.tolist() == [0.25, 0.5, 0.25]
    assert test.diff == pytest.approx(1 / 3) and test.seed_diffs == pytest.approx((1 / 3,))
    for value, probability in zip(values, probabilities):
        share = np.mean(np.isclose(test.replicates, value))
        assert share == pytest.approx(probability, abs=4 * math.sqrt(probability * (1 - probability) / 200_000))
    # 95 % interval: the 2.5 % and 97.5 % quantiles lie inside the masses at -1 and +1; a 40 %
    # interval (30 % and 70 % quantiles) inside the mass at 1/3.
    assert test.interval(0.05) == (-1.0, 1.0)
    assert test.interval(0.6) == pytest.approx((1 / 3, 1 / 3))
    # p = 2 · min(P(≤ 0), P(≥ 0)) = 2 · 1/4; its Monte-Carlo SD is 2 · sqrt(1/4 · 3/4 / n).
    assert test.p_value == pytest.approx(0.5, abs=4 * 2 * math.sqrt(0.25 * 0.75 / 200_000))
    # SD of {-1: 1/4, 1/3: 1/2, 1: 1/4}: mean 1/6, E[x²] = 5/9, variance 5/9 - 1/36 = 19/36.
    assert test.se == pytest.approx(math.sqrt(19 / 36), rel=0.01)


def test_seeds_and_items_against_an_exact_enumeration():
    """Two seeds × three items (1, 2 and 3 queries): all 4 × 27 ordered draws enumerated."""
    diff = np.array([[1.0, 0.0, -1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0, 0.0, 1.0]])
    items = ["a", "b", "b", "c", "c", "c"]
    values, probabilities = _exact(diff, items)
    test = _bootstrap(diff, items, n_boot=200_000, seed=3)
    mean = float(values @ probabilities)
    sd = math.sqrt(float((values - mean) ** 2 @ probabilities))
    assert test.replicates.mean() == pytest.approx(mean, abs=4 * sd / math.sqrt(200_000))
    assert test.se == pytest.approx(sd, rel=0.01)
    for cut in (-0.2, 0.0, 0.25, 0.5):  # the distribution function at a few points
        exact = float(probabilities[values <= cut + 1e-12].sum())
        share = float(np.mean(test.replicates <= cut + 1e-12))
        assert share == pytest.approx(exact, abs=4 * math.sqrt(exact * (1 - exact) / 200_000) + 1e-9)
    below = float(probabilities[values <= 1e-12].sum())
    above = float(probabilities[values >= -1e-12].sum())
    assert test.p_value == pytest.approx(min(1.0, 2 * min(below, above)), abs=0.01)


def _loop_bootstrap(diff: np.ndarray, items: list, n_boot: int, rng: np.random.Generator) -> np.ndarray:
    """The resampling written out: per replicate draw seeds, then items (one draw for all drawn
    seeds), expand each drawn item into its queries, average the (seed, query) cells."""
    labels = sorted(set(items))
    queries = {label: [q for q, item in enumerate(items) if item == label] for label in labels}
    means = []
    for _ in range(n_boot):
        seeds = [int(rng.integers(diff.shape[0])) for _ in range(diff.shape[0])]
        drawn = [labels[int(rng.integers(len(labels)))] for _ in labels]
        cells = []
        for s in seeds:
            for item in drawn:
                for q in queries[item]:
                    cells.append(diff[s, q])
        means.append(sum(cells) / len(cells))
    return np.array(means)


def test_vectorised_bootstrap_agrees_with_the_loops():
    rng = np.random.default_rng(7)
    items = [f"id_{i}" for i in rng.integers(0, 12, 40)]
    # hit indicators whose difference depends on the seed and the item, so both matter
    effect = {label: rng.normal(0, 0.4) for label in sorted(set(items))}  # sorted: the same draws in every process
    base = rng.integers(0, 2, (3, 40)).astype(float)
    variant = np.array(
        [[float(rng.random() < 0.5 + effect[item] + 0.1 * s) for item in items] for s in range(3)], dtype=float
    )
    diff = variant - base
    fast = statistics.paired_bootstrap(base, variant, items, np.random.default_rng(1), 20_000).replicates
    slow = _loop_bootstrap(diff, items, 3_000, np.random.default_rng(2))
    sd = slow.std(ddof=1)
    assert sd > 0.02  # a grid with real spread, so the comparison can fail
    assert fast.mean() == pytest.approx(slow.mean(), abs=4 * sd * math.sqrt(1 / 3_000 + 1 / 20_000))
    # the SD's relative Monte-Carlo error is about 1 / sqrt(2n)
    assert fast.std(ddof=1) == pytest.approx(sd, abs=4 * sd * math.sqrt(1 / 6_000 + 1 / 40_000))
    # Centred near the estimate, not on it: a mean over a random number of queries (items differ in
    # their query counts) is a ratio estimator, whose bootstrap mean carries a bias of order 1/items.
    assert fast.mean() == pytest.approx(diff.mean(), abs=0.25 * sd)


def test_query_sd_is_each_seeds_item_bootstrap_sd_by_enumeration():
    """Per seed, the exact SD over every ordered draw of items (the seed held fixed), then the root
    mean square over the seeds."""
    diff = np.array([[1.0, 0.0, -1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, -1.0, 0.0, 1.0]])
    items = ["a", "b", "b", "c", "c", "c"]
    variances = []
    for row in diff:
        values, probabilities = _exact(row[None, :], items)
        mean = float(values @ probabilities)
        variances.append(float((values - mean) ** 2 @ probabilities))
    expected = math.sqrt(sum(variances) / 2)
    found = statistics.query_sd(np.zeros_like(diff), diff, items, np.random.default_rng(5), 200_000)
    assert found == pytest.approx(expected, rel=0.01)
    # one query per item: the plain bootstrap of a mean, SD sqrt(population variance / n)
    values = np.random.default_rng(9).normal(0, 1, (1, 400))
    found = statistics.query_sd(np.zeros_like(values), values, list(range(400)), np.random.default_rng(6), 40_000)
    assert found == pytest.approx(values.std() / math.sqrt(400), rel=0.02)
    # no seed spread enters it: two seeds with the same differences shifted by a constant
    shifted = np.vstack([values, values + 0.3])
    again = statistics.query_sd(np.zeros_like(shifted), shifted, list(range(400)), np.random.default_rng(6), 40_000)
    assert again == pytest.approx(found, rel=0.02)


@pytest.mark.parametrize("delta, expected", [(1, "better"), (-1, "worse"), (0, "within noise")])
def test_constant_differences_have_degenerate_intervals(delta, expected):
    test = _bootstrap(np.full((2, 5), float(delta)), list("aabbc"), n_boot=100)
    assert (test.diff, *test.interval()) == (delta, delta, delta) and test.se == 0
    assert statistics.verdict(*test.interval()) == expected
    # every replicate on one side of 0: p is the smallest the replicates can give, (0 + 1) / (n + 1), doubled
    assert test.p_value == (1.0 if delta == 0 else 2 / 101)


def test_seeds_are_resampled():
    # Two seeds, one query: only resampling seeds gives any spread.
    test = _bootstrap([[1.0], [0.0]], ["a"], n_boot=4000)
    assert test.interval() == (0.0, 1.0) and test.seed_diffs == (1.0, 0.0)


def test_shapes_are_checked():
    with pytest.raises(InputError, match="shape"):
        statistics.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)), list("abc"), np.random.default_rng(0))
    with pytest.raises(InputError, match="2 item labels for 3 queries"):
        statistics.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 3)), list("ab"), np.random.default_rng(0))


# --------------------------------------------------------------------------- Holm


def test_holm_against_statsmodels():
    rng = np.random.default_rng(0)
    for m in (1, 2, 5, 19, 40):
        p = rng.uniform(0, 0.2, m) ** 2
        p[: m // 4] = p[m // 4 : 2 * (m // 4)]  # ties
        reject, adjusted, _, _ = multipletests(p, alpha=0.05, method="holm")
        assert statistics.holm(p) == pytest.approx(adjusted, abs=1e-12)
        family = statistics.holm_family(p)
        assert family.m == m and ((family.p_holm < 0.05) == reject).all()
        # Holm rejects the tests up to the first whose p exceeds its step's level alpha / (m - rank + 1)
        order = np.argsort(p, kind="stable")
        passes = np.cumprod(p[order] <= family.alpha_step[order]).astype(bool)
        assert (passes == reject[order]).all()


def test_pending_tests_count_as_p_one_and_only_make_it_stricter():
    rng = np.random.default_rng(1)
    final = rng.uniform(0, 0.05, 12)
    oracle = multipletests(final, method="holm")[1]
    for finished in (3, 7, 12):
        interim = statistics.holm_family(final[:finished], pending=12 - finished)
        assert interim.m == 12
        assert interim.p_holm == pytest.approx(
            multipletests([*final[:finished], *[1] * (12 - finished)], method="holm")[1][:finished]
        )
        assert (interim.p_holm >= oracle[:finished] - 1e-12).all()  # an early decision stays valid
        assert (interim.alpha_step <= statistics.holm_family(final).alpha_step[:finished] + 1e-15).all()
    # a test without pairs (NaN) counts as p = 1
    assert statistics.holm_family([0.01, math.nan]).p_holm == pytest.approx([0.02, 1.0])


def test_ties_share_the_stricter_step():
    family = statistics.holm_family([0.01, 0.01, 0.5], alpha=0.06)
    assert family.rank.tolist() == [1, 1, 3] and family.alpha_step.tolist() == pytest.approx([0.02, 0.02, 0.06])


# --------------------------------------------------------------------------- MDE


def test_mde_is_z_sum_times_the_bootstrap_sd():
    assert statistics.mde(1.0) == pytest.approx(1.959964 + 0.841621, abs=1e-6)
    assert statistics.mde(0.02, alpha=0.05 / 19) == pytest.approx((3.007787 + 0.841621) * 0.02, abs=1e-6)
    rng = np.random.default_rng(5)
    items = list(np.repeat(np.arange(30), 2))
    quiet = _bootstrap(rng.choice([0.0, 1.0], (2, 60), p=[0.8, 0.2]), items)
    noisy = _bootstrap(rng.choice([-1.0, 0.0, 1.0], (2, 60)), items)
    assert quiet.se == np.std(quiet.replicates, ddof=1)  # SE is the replicates' SD
    assert statistics.mde(noisy.se) > statistics.mde(quiet.se) > 0  # more variance, larger MDE
    assert statistics.mde(quiet.se, alpha=0.005) > statistics.mde(quiet.se)  # stricter level, larger MDE


# --------------------------------------------------------------------------- streams


def test_each_comparison_has_its_own_stream():
    draw = statistics.stream("crop", "crop=False", "recall@5").random(4)
    assert (statistics.stream("crop", "crop=False", "recall@5").random(4) == draw).all()  # the same comparison
    for other in (("crop", "crop=False", "recall@1"), ("resize", "crop=False", "recall@5"), ("crop", "x", "recall@5")):
        assert not (statistics.stream(*other).random(4) == draw).any()
    expected = np.random.SeedSequence(
        entropy=statistics.STUDY_ENTROPY, spawn_key=(statistics.spawn_key("crop", "crop=False", "recall@5"),)
    )
    assert (np.random.default_rng(expected).random(4) == draw).all()
    # every comparison the study can plan, in any profile, has its own key
    comparisons = {
        (e.name, variant, f"recall@{k}")
        for profile in ("fixture", "demo", "full")
        for e in study.experiments(profile)
        for variant in e.variants
        for k in study.KS
    }
    assert len({statistics.spawn_key(*c) for c in comparisons}) == len(comparisons) > 90


# --------------------------------------------------------------------------- verdicts


def test_significant_raw_but_not_after_holm_is_within_noise():
    # replicates N(0.1, 0.04²): raw p ≈ 2 Φ(-2.5) ≈ 0.012, the raw 95 % interval excludes 0; as the
    # first of 19 tests Holm's level is 0.05 / 19, whose interval 0.1 ± 3.01 · 0.04 holds 0.
    replicates = np.random.default_rng(0).normal(0.1, 0.04, 100_000)
    test = statistics.PairedBootstrap(0.1, (0.1,), replicates)
    assert statistics.verdict(*test.interval()) == "better" and test.p_value < 0.05
    family = statistics.holm_family([test.p_value], pending=18)
    assert family.alpha_step[0] == pytest.approx(0.05 / 19) and family.p_holm[0] > 0.05
    columns = study.holm_columns(test, family, 0, final=False)
    assert columns["low_adj_recall@5"] < 0 < columns["high_adj_recall@5"]
    assert columns["verdict_recall@5"] == "within noise"
    alone = study.holm_columns(test, statistics.holm_family([test.p_value]), 0, final=False)
    assert alone["verdict_recall@5"] == "better" and alone["low_adj_recall@5"] == test.interval()[0]


def test_holm_stopping_early_overrides_an_interval_that_excludes_zero():
    """Holm steps down: a test whose own level would pass is not rejected after a failed one."""
    assert statistics.holm_verdict(0.01, 0.2, p_holm=0.06) == "within noise"
    assert statistics.holm_verdict(0.01, 0.2, p_holm=0.01) == "better"
    assert statistics.holm_verdict(-0.2, -0.01, p_holm=0.01) == "worse"


@pytest.mark.parametrize(
    "low, high, expected",
    [(0.01, 0.2, "better"), (-0.2, -0.01, "worse"), (0.0, 0.2, "within noise"), (-0.1, 0.1, "within noise")],
)
def test_verdict(low, high, expected):
    assert statistics.verdict(low, high) == expected
