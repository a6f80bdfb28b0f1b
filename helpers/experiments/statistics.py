"""The study's paired statistics (pure functions): an item-level bootstrap nested with seeds,
bootstrap p-values, Holm's correction over the family of primary-metric tests, adjusted
intervals and the minimum detectable effect.

**Resampling.** A comparison holds a ``[seeds, queries]`` grid of paired differences (variant
minus baseline, e.g. of hit@K indicators) and the item of each query. Val queries are not
independent: several consumer photos show one item, so each replicate draws seeds with
replacement, then items with replacement (one item draw for every drawn seed: the queries are
paired across runs), and takes the mean difference over the drawn (seed, query) cells, every
query of a drawn item included (an item weighs as many queries as it has). The interval thus
holds both sources of noise: which items the val split happens to have, and the seed-to-seed
spread of training (the original study's same-seed reruns differed by 0.01–0.03 R@5). Every comparison draws from its own random stream, derived from the study's
fixed entropy and a stable hash of (experiment, variant, metric) (:func:`spawn_key`), so a
borderline verdict does not hinge on sharing one stream with every other comparison, and a rerun
gives the same numbers.

**Family.** The study's confirmatory tests are its Recall@5 comparisons, one per planned variant
of every experiment; Holm's step-down controls their family-wise error at :data:`ALPHA`. The
study decides experiment by experiment, so a decision uses Holm over the tests finished so far
with every planned test not run yet counted as p = 1 (:func:`holm_family` with ``pending``): Holm's
adjusted p-values only fall when such a p = 1 becomes a real p-value or a planned test is dropped,
so every decision taken early stays valid under the final family, recomputed once all have run.
Recall@1 and Recall@10 are exploratory: raw intervals, no correction.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from statistics import NormalDist

import numpy as np

from helpers.core.errors import InputError
from helpers.core.files import sha256_bytes

N_BOOT = 10_000
ALPHA = 0.05
POWER = 0.8  # the minimum detectable effect is stated at this power
# The study's fixed entropy: every comparison's stream is spawned from it (see spawn_key).
STUDY_ENTROPY = 20_251_104
# Elements of the per-batch arrays ([batch, seeds] and [batch, items] counts and products).
_BATCH_ELEMENTS = 2_000_000


def spawn_key(experiment: str, variant: str, metric: str) -> int:
    """A stable 63-bit hash of the comparison, the spawn key of its random stream."""
    digest = sha256_bytes(json.dumps([experiment, variant, metric]).encode())
    return int(digest[:16], 16) >> 1


def stream(experiment: str, variant: str, metric: str) -> np.random.Generator:
    """The comparison's own random stream: ``SeedSequence(STUDY_ENTROPY, spawn_key=(key,))``."""
    sequence = np.random.SeedSequence(entropy=STUDY_ENTROPY, spawn_key=(spawn_key(experiment, variant, metric),))
    return np.random.default_rng(sequence)


@dataclass(frozen=True)
class PairedBootstrap:
    """The observed mean paired difference, its value per seed, and the bootstrap replicates."""

    diff: float
    seed_diffs: tuple[float, ...]
    replicates: np.ndarray

    @property
    def se(self) -> float:
        """The bootstrap standard error: the replicates' standard deviation."""
        return float(np.std(self.replicates, ddof=1))

    def interval(self, alpha: float = ALPHA) -> tuple[float, float]:
        """The percentile interval at level ``1 - alpha``."""
        low, high = np.quantile(self.replicates, [alpha / 2, 1 - alpha / 2])
        return float(low), float(high)

    @property
    def p_value(self) -> float:
        """Two-sided bootstrap p-value of "no difference": twice the smaller share of replicates
        on one side of 0 (each share ``(count + 1) / (n + 1)``, so never 0), at most 1."""
        n = len(self.replicates)
        below = (np.count_nonzero(self.replicates <= 0) + 1) / (n + 1)
        above = (np.count_nonzero(self.replicates >= 0) + 1) / (n + 1)
        return float(min(1.0, 2 * min(below, above)))


def item_sums(diff: np.ndarray, items) -> tuple[np.ndarray, np.ndarray]:
    """``(sums [seeds, items], queries per item [items])``: the grid's differences summed per item."""
    _, inverse, counts = np.unique(np.asarray(items), return_inverse=True, return_counts=True)
    sums = np.zeros((diff.shape[0], len(counts)))
    np.add.at(sums.T, inverse, diff.T)
    return sums, counts.astype(np.float64)


def paired_bootstrap(
    baseline: np.ndarray, variant: np.ndarray, items, rng: np.random.Generator, n_boot: int = N_BOOT
) -> PairedBootstrap:
    """Bootstrap of ``mean(variant - baseline)`` over a ``[seeds, queries]`` grid paired by seed
    and query, ``items`` naming each query's item (see the module docstring).

    A replicate's draw is held as multiplicities: ``c_s`` times seed s and ``w_i`` times item i
    give the mean ``Σ c_s w_i S[s, i] / (n_seeds · Σ w_i n_i)`` with ``S`` the per-item sums
    and ``n_i`` the queries of item i, the same number as averaging the expanded cells.
    """
    base, var = np.asarray(baseline, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    if base.shape != var.shape or base.ndim != 2 or 0 in base.shape:
        raise InputError(f"paired values need one equal [seeds, queries] shape, got {base.shape} and {var.shape}")
    if len(items) != base.shape[1]:
        raise InputError(f"{len(items)} item labels for {base.shape[1]} queries")
    if n_boot < 2:
        raise InputError(f"n_boot must be at least 2, got {n_boot}")
    diff = var - base
    sums, queries = item_sums(diff, items)
    n_seeds, n_items = sums.shape
    replicates = np.empty(n_boot)
    batch = max(1, _BATCH_ELEMENTS // (n_seeds + 2 * n_items))
    for b0 in range(0, n_boot, batch):
        b1 = min(n_boot, b0 + batch)
        seeds = rng.multinomial(n_seeds, np.full(n_seeds, 1 / n_seeds), size=b1 - b0)
        drawn = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=b1 - b0)
        replicates[b0:b1] = ((seeds @ sums) * drawn).sum(axis=1) / (n_seeds * (drawn @ queries))
    return PairedBootstrap(float(diff.mean()), tuple(float(d) for d in diff.mean(axis=1)), replicates)


def query_sd(baseline: np.ndarray, variant: np.ndarray, items, rng: np.random.Generator, n_boot: int = N_BOOT) -> float:
    """The query part of a paired difference's noise: per seed, the standard deviation of that
    seed's mean difference when the items (with all their queries) are resampled and the seed is
    held fixed; the root mean square over seeds. Beside the seeds' own spread
    (``std(seed_diffs)``) it says which more of would narrow the intervals: val items or seeds."""
    base, var = np.asarray(baseline, dtype=np.float64), np.asarray(variant, dtype=np.float64)
    if base.shape != var.shape or base.ndim != 2 or 0 in base.shape or len(items) != base.shape[1]:
        raise InputError(
            f"paired values need one equal [seeds, queries] shape and one item per query, got {base.shape}"
        )
    if n_boot < 2:
        raise InputError(f"n_boot must be at least 2, got {n_boot}")
    sums, queries = item_sums(var - base, items)
    n_items = len(queries)
    drawn = rng.multinomial(n_items, np.full(n_items, 1 / n_items), size=n_boot)
    replicates = (drawn @ sums.T) / (drawn @ queries)[:, None]  # [n_boot, seeds]
    return float(np.sqrt(np.mean(np.var(replicates, axis=0, ddof=1))))


def mde(se: float, alpha: float = ALPHA, power: float = POWER) -> float:
    """Minimum detectable effect of a two-sided test at level ``alpha`` with ``power``:
    ``(z_{1-alpha/2} + z_{power}) · se``."""
    normal = NormalDist()
    return (normal.inv_cdf(1 - alpha / 2) + normal.inv_cdf(power)) * se


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
    """Holm over ``m`` tests for the finished ones (in the order given): adjusted p-value, rank and
    the level ``alpha / (m - rank + 1)`` that Holm's step assigns to each."""

    m: int
    pending: int
    p_holm: np.ndarray
    rank: np.ndarray
    alpha_step: np.ndarray


def holm_family(pvalues, pending: int = 0, alpha: float = ALPHA) -> HolmFamily:
    """Holm over the finished tests' ``pvalues`` (NaN, a test without pairs, counts as 1) and
    ``pending`` planned tests not run yet, each counted as p = 1."""
    if pending < 0:
        raise InputError(f"pending tests must be at least 0, got {pending}")
    finished = np.nan_to_num(np.asarray(pvalues, dtype=np.float64), nan=1.0)
    p = np.concatenate([finished, np.ones(pending)])
    m, n = len(p), len(finished)
    rank = holm_ranks(p)[:n]
    return HolmFamily(m, pending, holm(p)[:n], rank, alpha / (m - rank + 1))


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
