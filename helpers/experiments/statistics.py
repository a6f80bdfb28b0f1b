"""The study's paired statistics (pure functions): a crossed seed × item random-effects test of a
mean paired difference, its variance components, the minimum detectable effect and the sizes that
reach it, and Holm's correction over the family of primary-metric tests.

**Model.** A comparison holds two ``[seeds, queries]`` grids (baseline and variant, e.g. hit@5
indicators) paired by seed and by query, and the item of each query (several consumer photos show
one item). The statistic is the mean paired difference over all (seed, query) cells. Its noise has
three crossed parts: the seed (a training run's luck, shared by all items), the item (which items
the val split happens to hold, shared by all seeds) and their interaction (counted once; the old
nested bootstrap, seeds then items, counted it twice). In the units of :class:`Components`,
``Var(mean) = seed / S + item / I + interaction / (S · I)``.

**Estimation.** Per seed, the differences are summed per item (``T[s, i]`` over the item's ``n_i``
queries) and the ratio mean ``D = Σ T / (S · Σ n)`` is linearised: ``z[s, i] = (T[s, i] - n_i D) /
n̄`` with ``n̄`` the mean number of queries per item, so a cell weighs as many queries as its item
has and ``D`` is the plain mean over all (seed, query) cells. A two-way seed × item ANOVA without
replication on ``z`` gives the mean squares ``MS_seed, MS_item, MS_resid`` with
``E MS_seed = inter + I · seed``, ``E MS_item = inter + S · item``, ``E MS_resid = inter`` and
``Var(D) = (E MS_seed + E MS_item - E MS_resid) / (S · I)``. The components are the method of moments
estimates truncated at 0 (equal to REML's when positive), so the variance used is
``(max(MS_seed, MS_resid) + max(MS_item, MS_resid) - MS_resid) / (S · I) >= MS_resid / (S · I)``:
the untruncated total can be negative or implausibly small when the 2-df seed mean square falls
below the residual one (a third of all studies at 3 seeds × 300 items); flooring each component
at 0 keeps the SE positive (zero only when every linearised cell is equal, e.g. constant
differences) and removes part of the plain estimator's under-coverage (the df below does the rest).

**Degrees of freedom (the small-sample correction).** The t reference takes Satterthwaite's df over
all three mean squares, with the floored variance in the numerator and the sampling variance of the
unfloored combination in the denominator: a floored component is not known to be zero, so its mean
square keeps its share of the df (dropping it hands the test the item term's df exactly when the
seed part was underestimated). Why this variant, the candidates it beat, its coverage and power at
the committed components (``benchmarks/bench_statistics_coverage.py``) and its limits:
``docs/statistics.md``.

**One seed.** With ``S == 1`` the seed part cannot be estimated and the interaction cannot be told
apart from the item part: the SE is the items' alone (``MS_item / I``, the seed's luck not counted,
so the test is of that one training run), ``df = I - 1``, and every component is reported as NaN
(:func:`pooled_components` leaves such comparisons out).

**Planning.** :func:`planned_mde` is the effect the test itself detects with the stated power, its
rejection probability integrated over the mean squares' sampling distribution
(:func:`planned_power`). The shortcut ``(t_{df,1-α/2} + t_{df,power}) · se`` (:func:`mde`; a finished
comparison reports :func:`planned_mde` at its estimated components, the shortcut only with one seed) ignores that the SE is estimated from a 2-df seed term and promises
about 75 % power where 80 % was asked at 3 seeds.

**Family.** The study's confirmatory tests are its Recall@5 comparisons; Holm's step-down controls
their family-wise error at :data:`ALPHA`. A decision taken before the whole family has run uses
Holm over the finished tests with every planned test not run yet counted as p = 1
(:func:`holm_family` with ``pending``): adjusted p-values only fall when such a p = 1 becomes a real
p-value, so an early decision stays valid under the final family. Each finished test's interval is
taken at the level of the step that decided it (:class:`HolmFamily`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

from helpers.core.errors import InputError

ALPHA = 0.05
POWER = 0.8  # the minimum detectable effect is stated at this power
# Quantile nodes per mean square (seed, item, residual) of the power integral in planned_power:
# the seed's few df need the most; the item and residual mean squares barely move.
_POWER_NODES = (96, 24, 6)


# --------------------------------------------------------------------------- components


@dataclass(frozen=True)
class Components:
    """Variance components of one paired difference, in the units where
    ``Var(mean) = seed / S + item / I + interaction / (S · I)``."""

    seed: float
    item: float
    interaction: float

    def variance(self, n_seeds: int, n_items: int) -> float:
        """The variance of the mean difference over ``n_seeds`` seeds × ``n_items`` items."""
        return self.seed / n_seeds + self.item / n_items + self.interaction / (n_seeds * n_items)

    def se(self, n_seeds: int, n_items: int) -> float:
        """The standard error of the mean difference at that size."""
        return float(np.sqrt(self.variance(n_seeds, n_items)))

    def shares(self, n_seeds: int, n_items: int) -> dict[str, float]:
        """Each part's share of :meth:`variance` (NaN when the variance is 0)."""
        parts = {
            "seed": self.seed / n_seeds,
            "item": self.item / n_items,
            "interaction": self.interaction / (n_seeds * n_items),
        }
        total = sum(parts.values())
        return {name: part / total if total > 0 else float("nan") for name, part in parts.items()}


def _dfs(n_seeds: int, n_items: int) -> np.ndarray:
    """Degrees of freedom of the seed, item and residual mean squares."""
    return np.array([n_seeds - 1, n_items - 1, (n_seeds - 1) * (n_items - 1)], dtype=np.float64)


def _expected_mean_squares(components: Components, n_seeds: int, n_items: int) -> np.ndarray:
    """``E MS`` of seed, item and residual: ``inter + I·seed``, ``inter + S·item``, ``inter``."""
    inter = components.interaction
    return np.array([inter + n_items * components.seed, inter + n_seeds * components.item, inter])


def _floored_total(ms: np.ndarray) -> np.ndarray:
    """``S · I · V̂`` from mean squares ``[..., 3]``, each component floored at 0."""
    seed, item, resid = np.moveaxis(ms, -1, 0)
    return np.maximum(seed, resid) + np.maximum(item, resid) - resid


def _variance_and_df(ms: np.ndarray, n_seeds: int, n_items: int) -> tuple[np.ndarray, np.ndarray]:
    """The estimated variance of the mean and its df from mean squares ``[..., 3]`` (see the module
    docstring; one seed: the items' variance alone with ``I - 1`` df). A zero variance gets df = inf."""
    if n_seeds == 1:
        return ms[..., 1] / n_items, np.full(ms.shape[:-1], n_items - 1.0)
    total = _floored_total(ms)
    spread = (ms**2 / _dfs(n_seeds, n_items)).sum(axis=-1)
    with np.errstate(divide="ignore", invalid="ignore"):
        df = np.where(spread > 0, total**2 / spread, np.inf)
    return total / (n_seeds * n_items), df


def _components_of(ms: np.ndarray, n_seeds: int, n_items: int) -> Components:
    """Method-of-moments components from one comparison's mean squares, truncated at 0."""
    if n_seeds == 1:
        return Components(float("nan"), float("nan"), float("nan"))
    seed, item, resid = (float(x) for x in ms)
    return Components(max(seed - resid, 0.0) / n_items, max(item - resid, 0.0) / n_seeds, resid)


# --------------------------------------------------------------------------- estimation


def item_sums(diff: np.ndarray, items) -> tuple[np.ndarray, np.ndarray]:
    """``(sums [seeds, items], queries per item [items])``: the grid's differences summed per item."""
    _, inverse, counts = np.unique(np.asarray(items), return_inverse=True, return_counts=True)
    sums = np.zeros((diff.shape[0], len(counts)))
    np.add.at(sums.T, inverse.ravel(), diff.T)
    return sums, counts.astype(np.float64)


def _linearised(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(D [...], z [..., S, I])``: the ratio mean over all cells and the linearised item sums
    ``(T - n_i D) / n̄``, for item sums ``[..., S, I]``."""
    diff = sums.sum(axis=(-2, -1)) / (sums.shape[-2] * counts.sum())
    return diff, (sums - counts * diff[..., None, None]) / counts.mean()


def _mean_squares(z: np.ndarray) -> np.ndarray:
    """Two-way ANOVA without replication of ``z [..., S, I]``: ``[..., 3]`` mean squares of seed,
    item and residual (seed and residual NaN with one seed)."""
    n_seeds, n_items = z.shape[-2:]
    grand = z.mean(axis=(-2, -1), keepdims=True)
    seed_means, item_means = z.mean(axis=-1, keepdims=True), z.mean(axis=-2, keepdims=True)
    ms_item = n_seeds * ((item_means - grand) ** 2).sum(axis=(-2, -1)) / (n_items - 1)
    if n_seeds == 1:
        return np.stack([np.full_like(ms_item, np.nan), ms_item, np.full_like(ms_item, np.nan)], axis=-1)
    ms_seed = n_items * ((seed_means - grand) ** 2).sum(axis=(-2, -1)) / (n_seeds - 1)
    resid = z - seed_means - item_means + grand
    ms_resid = (resid**2).sum(axis=(-2, -1)) / ((n_seeds - 1) * (n_items - 1))
    return np.stack([ms_seed, ms_item, ms_resid], axis=-1)


def mean_squares(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``(diff [...], mean squares [..., 3])`` for a batch of studies given as item sums
    ``[..., S, I]`` of one design (queries per item ``counts [I]``): the cell mean and the
    seed, item and residual mean squares of the linearised sums."""
    diff, z = _linearised(np.asarray(sums, dtype=np.float64), np.asarray(counts, dtype=np.float64))
    return diff, _mean_squares(z)


def crossed_batch(sums: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(diff, se, df)`` of :func:`crossed_test` for a batch of studies (item sums ``[..., S, I]``,
    as :func:`mean_squares`); what the coverage benchmark runs on thousands of studies at once."""
    diff, ms = mean_squares(sums, counts)
    variance, df = _variance_and_df(ms, *np.shape(sums)[-2:])
    return diff, np.sqrt(variance), df


def estimate_components(diff: np.ndarray, items) -> Components:
    """The variance components of a ``[seeds, queries]`` grid of paired differences (NaN with one seed)."""
    sums, counts = item_sums(np.asarray(diff, dtype=np.float64), items)
    return _components_of(mean_squares(sums, counts)[1], *sums.shape)


def pooled_components(components: Sequence[Components], weights=None) -> Components:
    """The (weighted) mean of per-comparison components, to plan with; comparisons with a NaN
    component (one seed) are left out, and all-NaN components come back when none is left."""
    values = np.array([(c.seed, c.item, c.interaction) for c in components], dtype=np.float64).reshape(-1, 3)
    w = np.ones(len(values)) if weights is None else np.asarray(weights, dtype=np.float64)
    if w.shape != (len(values),) or (w < 0).any():
        raise InputError(f"need one non-negative weight per comparison, got {w.shape} for {len(values)}")
    keep = np.isfinite(values).all(axis=1) & (w > 0)
    if not keep.any():
        return Components(float("nan"), float("nan"), float("nan"))
    return Components(*(float(x) for x in np.average(values[keep], axis=0, weights=w[keep])))


# --------------------------------------------------------------------------- the test


@dataclass(frozen=True)
class CrossedTest:
    """The mean paired difference, its per-seed values, the design's size, the variance components
    and the SE with the df of its t reference (module docstring)."""

    diff: float
    seed_diffs: tuple[float, ...]
    n_seeds: int
    n_items: int
    n_queries: int
    components: Components
    se: float
    df: float

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """``diff ± t_{df, 1-alpha/2} · se``."""
        half = float(stats.t.ppf(1 - alpha / 2, self.df)) * self.se
        return self.diff - half, self.diff + half

    @property
    def p_value(self) -> float:
        """Two-sided t p-value of "no difference"; ``p < alpha`` exactly when :meth:`interval`
        excludes 0 (with ``se == 0``: 0 for a nonzero difference, else 1)."""
        if self.se == 0:
            return 0.0 if self.diff != 0 else 1.0
        return float(2 * stats.t.sf(abs(self.diff) / self.se, self.df))

    def mde(self, alpha: float = ALPHA, power: float = POWER) -> float:
        """The shortcut minimum detectable effect at this comparison's SE and df (:func:`mde`)."""
        return mde(self.se, self.df, alpha, power)


def _checked_grids(baseline: np.ndarray, variant: np.ndarray, items) -> np.ndarray:
    """The grid of differences ``variant - baseline``; InputError on a bad shape or labels."""
    base, var = np.asarray(baseline, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    if base.shape != var.shape or base.ndim != 2 or 0 in base.shape:
        raise InputError(
            f"paired values need one equal, non-empty [seeds, queries] shape, got {base.shape} and {var.shape}"
        )
    if len(items) != base.shape[1]:
        raise InputError(f"{len(items)} item labels for {base.shape[1]} queries")
    if not (np.isfinite(base).all() and np.isfinite(var).all()):
        raise InputError("paired values must be finite")
    if len(set(np.asarray(items).tolist())) < 2:
        raise InputError("a crossed test needs at least 2 items")
    return var - base


def crossed_test(baseline: np.ndarray, variant: np.ndarray, items) -> CrossedTest:
    """The crossed seed × item test of ``mean(variant - baseline)`` over ``[seeds, queries]`` grids
    paired by seed and query, ``items`` naming each query's item (module docstring)."""
    diff = _checked_grids(baseline, variant, items)
    sums, counts = item_sums(diff, items)
    mean, ms = mean_squares(sums, counts)
    variance, df = _variance_and_df(ms, *sums.shape)
    return CrossedTest(
        diff=float(mean),
        seed_diffs=tuple(float(d) for d in diff.mean(axis=1)),
        n_seeds=sums.shape[0],
        n_items=sums.shape[1],
        n_queries=diff.shape[1],
        components=_components_of(ms, *sums.shape),
        se=float(np.sqrt(variance)),
        df=float(df),
    )


# --------------------------------------------------------------------------- power and sizes


def mde(se: float, df: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """The shortcut minimum detectable effect of a two-sided t test: ``(t_{df,1-alpha/2} + t_{df,power}) · se``."""
    return float((stats.t.ppf(1 - alpha / 2, df) + stats.t.ppf(power, df)) * se)


def expected_df(components: Components, n_seeds: int, n_items: int) -> float:
    """The df the test gives with the true components: Satterthwaite on the expected mean squares."""
    ems = _expected_mean_squares(components, n_seeds, n_items)
    return float(_variance_and_df(ems, n_seeds, n_items)[1])


def _check_plan(components: Components, n_seeds: int, n_items: int) -> None:
    """InputError unless the components are finite and non-negative and the size has ≥ 2 seeds and items."""
    values = np.array([components.seed, components.item, components.interaction])
    if not (np.isfinite(values).all() and (values >= 0).all() and values.sum() > 0):
        raise InputError(f"planning needs finite, non-negative, not all zero components, got {components}")
    if n_seeds < 2 or n_items < 2:
        raise InputError(f"planning needs at least 2 seeds and 2 items, got {n_seeds} × {n_items}")


def _half_widths(components: Components, n_seeds: int, n_items: int, alpha: float) -> np.ndarray:
    """The test's interval half-width ``t_{df,1-alpha/2} · se`` at quantile nodes of the mean
    squares' joint distribution (independent ``E MS · χ²_f / f``, Gaussian model), flattened."""
    ems, dfs = _expected_mean_squares(components, n_seeds, n_items), _dfs(n_seeds, n_items)
    axes = [stats.chi2.ppf((np.arange(n) + 0.5) / n, f) / f * e for n, f, e in zip(_POWER_NODES, dfs, ems)]
    ms = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, 3)
    variance, df = _variance_and_df(ms, n_seeds, n_items)
    return stats.t.ppf(1 - alpha / 2, df) * np.sqrt(variance)


def _power_at(effect: float, half: np.ndarray, sd: float) -> float:
    """Rejection probability at ``effect`` given the half-widths at the nodes and the mean's true SD."""
    return float(np.mean(stats.norm.sf((half - effect) / sd) + stats.norm.cdf((-half - effect) / sd)))


def planned_power(components: Components, n_seeds: int, n_items: int, effect: float, alpha: float = ALPHA) -> float:
    """The test's probability of rejecting "no difference" at level ``alpha`` when the true
    difference is ``effect``: the normal mean's tail beyond the interval's half-width, averaged
    over the mean squares' sampling distribution (a quantile-node quadrature; Gaussian model)."""
    _check_plan(components, n_seeds, n_items)
    half = _half_widths(components, n_seeds, n_items, alpha)
    return _power_at(effect, half, components.se(n_seeds, n_items))


def planned_mde(
    components: Components, n_seeds: int, n_items: int, m: int = 1, alpha: float = ALPHA, power: float = POWER
) -> dict:
    """``{"se", "df", "mde"}`` at ``n_seeds`` × ``n_items`` and level ``alpha / m`` (Holm's first,
    strictest step; ``m = 1``: unadjusted): the true SE, :func:`expected_df` and the effect at
    which :func:`planned_power` equals ``power``."""
    _check_plan(components, n_seeds, n_items)
    sd = components.se(n_seeds, n_items)
    half = _half_widths(components, n_seeds, n_items, alpha / m)
    high = 2 * float(np.max(half)) + 10 * sd  # every node rejects at this effect with probability ~1
    effect = optimize.brentq(lambda e: _power_at(e, half, sd) - power, 0.0, high, xtol=1e-12 * high)
    return {"se": sd, "df": expected_df(components, n_seeds, n_items), "mde": float(effect)}


def holm(pvalues) -> np.ndarray:
    """Holm's step-down adjusted p-values: ``max_{j<=i} min(1, (m - j + 1) p_(j))`` in sorted order."""
    p = np.asarray(pvalues, dtype=np.float64)
    order = np.argsort(p, kind="stable")
    steps = (len(p) - np.arange(len(p))) * p[order]
    adjusted = np.empty(len(p))
    adjusted[order] = np.minimum(1.0, np.maximum.accumulate(steps))
    return adjusted


def holm_ranks(pvalues) -> np.ndarray:
    """1-based rank of each p-value in ascending order; ties share the smallest rank (the stricter step)."""
    p = np.asarray(pvalues, dtype=np.float64)
    return np.searchsorted(np.sort(p), p, side="left") + 1


@dataclass(frozen=True)
class HolmFamily:
    """Holm over ``m`` tests, for the finished ones (in the order given): adjusted p-value, rank,
    Holm's decision, and the level of each one's interval. A test of rank r gets
    ``alpha / (m - min(r, s) + 1)`` with s the rank at which the step-down stops (the first
    not-rejected rank; ``m + 1`` when all are rejected): a rejected test's interval, at the level
    of the step that rejected it, excludes 0; every later test takes the stopping step's level, so
    its interval holds 0 and none is narrower than the stopping step's."""

    m: int
    pending: int
    p_holm: np.ndarray
    rank: np.ndarray
    alpha_step: np.ndarray
    rejected: np.ndarray


def holm_family(pvalues, pending: int = 0, alpha: float = ALPHA) -> HolmFamily:
    """Holm over the finished tests' ``pvalues`` (NaN, a test without pairs, counts as 1) and
    ``pending`` planned tests not run yet, each counted as p = 1."""
    if pending < 0:
        raise InputError(f"pending tests must be at least 0, got {pending}")
    finished = np.nan_to_num(np.asarray(pvalues, dtype=np.float64).reshape(-1), nan=1.0)
    p = np.concatenate([finished, np.ones(pending)])
    m, n = len(p), len(finished)
    adjusted, rank = holm(p), holm_ranks(p)
    rejected = adjusted < alpha
    stop = int(rank[~rejected].min()) if (~rejected).any() else m + 1
    alpha_step = alpha / (m - np.minimum(rank, stop) + 1)
    return HolmFamily(m, pending, adjusted[:n], rank[:n], alpha_step[:n], rejected[:n])


def verdict(low: float, high: float) -> str:
    """``better`` when the whole interval lies above 0, ``worse`` below 0, else ``within noise``."""
    if low > 0:
        return "better"
    if high < 0:
        return "worse"
    return "within noise"


def holm_verdict(low_adjusted: float, high_adjusted: float, p_holm: float, alpha: float = ALPHA) -> str:
    """The verdict from the Holm-adjusted interval; ``within noise`` once Holm's step-down has
    stopped before this test (adjusted p-value at or above ``alpha``), whatever its own interval."""
    return verdict(low_adjusted, high_adjusted) if p_holm < alpha else "within noise"
