"""Coverage and power of the crossed seed × item test (``helpers.experiments.statistics``) on
simulated studies with known variance components and a known effect.

Each cell (seeds × val items) draws one design, the queries per item ``1 + Binomial(6, 0.43)``
(1-7, mean 3.6 as the committed val split's 268 queries / 75 items), then simulates studies whose
per-(seed, query) differences are Gaussian: ``δ + a_s + b_i + e_sq`` with a seed effect, an item
effect shared by the item's queries and independent per-query noise, scaled so that the
linearised components are the committed ones (seed 2.17e-4, item 7.98e-3, interaction 4.53e-2) and
``Var(mean) = seed / S + item / I + interaction / (S · I)`` holds exactly for the drawn design.
The test only sees the per-item sums, so they are drawn directly (the sum of ``n_i`` Gaussian
query terms is Gaussian), thousands of studies at once (``statistics.crossed_batch``).

The true effect is the planned MDE (``planned_mde(..., m=1)``): coverage is the share of 95 %
intervals holding it, power the share rejecting "no difference" at 0.05. Goals: coverage in
[0.93, 0.975] in every cell and power within 5 points of 80 %. The contrast rows reuse the same
studies' mean squares: the normal reference, plain Satterthwaite, and Satterthwaite with unbiased
estimates of the squared expected mean squares (df floored at 1), each on the unfloored
method-of-moments variance (an impossible negative variance counts as a miss); Satterthwaite on the
truncated components alone (what lmerTest does at a boundary). Every row's power is taken at the
module's planned MDE; the last two columns are the shortcut MDE ``(t + t) · se`` and the power
there.

    python benchmarks/bench_statistics_coverage.py                 # 20,000 studies per cell
    python benchmarks/bench_statistics_coverage.py --studies 2000  # a quick look
"""

from __future__ import annotations

import argparse
import shlex
import sys
import time
from pathlib import Path

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from helpers.experiments import statistics  # noqa: E402

COMPONENTS = statistics.Components(seed=2.17e-4, item=7.98e-3, interaction=4.53e-2)
CELLS = ((3, 75), (3, 300), (5, 75), (5, 300))
COVERAGE_GOAL = (0.93, 0.975)
POWER_TOLERANCE = 0.05
OUT = ROOT / "benchmarks" / "results" / "statistics" / "coverage.txt"
CHUNK = 2_000  # studies simulated at once


def design(n_items: int, rng: np.random.Generator) -> np.ndarray:
    """Queries per item, 1-7 with mean 3.6."""
    return 1.0 + rng.binomial(6, 0.43, n_items)


def simulate(counts: np.ndarray, n_seeds: int, effect: float, n: int, rng: np.random.Generator) -> np.ndarray:
    """Item sums ``[n, S, I]`` of ``n`` studies: per query ``effect + a_s + b_i + e``, with
    ``Var a = seed``, ``Var b = item · I n̄² / Σ n_i²`` and ``Var e = interaction · n̄`` (so the
    linearised components are exactly ``COMPONENTS`` for this design)."""
    n_items, mean_n = len(counts), counts.mean()
    item_sd = np.sqrt(COMPONENTS.item * n_items * mean_n**2 / (counts**2).sum())
    seed = rng.normal(0, np.sqrt(COMPONENTS.seed), (n, n_seeds, 1))
    item = rng.normal(0, item_sd, (n, 1, n_items))
    noise = rng.normal(0, 1, (n, n_seeds, n_items)) * np.sqrt(counts * COMPONENTS.interaction * mean_n)
    return counts * (effect + seed + item) + noise


def contrasts(ms: np.ndarray, n_seeds: int, n_items: int, alpha: float) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``{name: (se, quantile)}`` of the contrast methods from mean squares ``[n, 3]``."""
    dfs = np.array([n_seeds - 1, n_items - 1, (n_seeds - 1) * (n_items - 1)], dtype=np.float64)
    raw = ms[:, 0] + ms[:, 1] - ms[:, 2]
    raw_se = np.sqrt(np.maximum(raw, 0) / (n_seeds * n_items))
    raw_df = np.maximum(raw, 1e-300) ** 2 / (ms**2 / dfs).sum(axis=1)
    kept = np.stack([ms[:, 0] > ms[:, 2], ms[:, 1] > ms[:, 2]], axis=1)
    signs = np.column_stack([kept, (~kept).sum(axis=1) - 1.0])  # a floored component's MS becomes MS_resid
    floored = (signs * ms).sum(axis=1)
    lmer_df = floored**2 / ((signs * ms) ** 2 / dfs).sum(axis=1)
    # E[MS²] = (E MS)² (1 + 2 / f): unbiased squares in the numerator's square and the denominator
    unbiased_df = (raw**2 - (2 * ms**2 / (dfs + 2)).sum(axis=1)) / (ms**2 / (dfs + 2)).sum(axis=1)
    return {
        "normal reference, unfloored SE": (raw_se, np.full(len(ms), stats.norm.ppf(1 - alpha / 2))),
        "Satterthwaite, unfloored SE": (raw_se, stats.t.ppf(1 - alpha / 2, raw_df)),
        "Satterthwaite, unbiased squares, unfloored SE": (
            raw_se,
            stats.t.ppf(1 - alpha / 2, np.maximum(unbiased_df, 1.0)),
        ),
        "Satterthwaite on truncated components only": (
            np.sqrt(floored / (n_seeds * n_items)),
            stats.t.ppf(1 - alpha / 2, lmer_df),
        ),
    }


def run_cell(n_seeds: int, n_items: int, studies: int, rng: np.random.Generator, alpha: float) -> list[dict]:
    """Coverage and power of the module's test and of the contrasts in one cell."""
    counts = design(n_items, rng)
    plan = statistics.planned_mde(COMPONENTS, n_seeds, n_items)
    effect = plan["mde"]
    shortcut = statistics.mde(plan["se"], plan["df"], alpha)
    rows: dict[str, dict[str, list]] = {}
    for start in range(0, studies, CHUNK):
        sums = simulate(counts, n_seeds, effect, min(CHUNK, studies - start), rng)
        diff, ms = statistics.mean_squares(sums, counts)
        _, se, df = statistics.crossed_batch(sums, counts)
        methods = {"crossed t (this module)": (se, stats.t.ppf(1 - alpha / 2, df))}
        methods |= contrasts(ms, n_seeds, n_items, alpha)
        for name, (method_se, quantile) in methods.items():
            half = quantile * method_se
            row = rows.setdefault(name, {"covered": [], "rejects": [], "rejects_shortcut": []})
            row["covered"].append(np.abs(diff - effect) <= half)
            row["rejects"].append(np.abs(diff) > half)
            row["rejects_shortcut"].append(np.abs(diff - effect + shortcut) > half)
    return [
        {
            "seeds": n_seeds,
            "items": n_items,
            "queries": int(counts.sum()),
            "method": name,
            "coverage": float(np.concatenate(r["covered"]).mean()),
            "mde": effect,
            "power": float(np.concatenate(r["rejects"]).mean()),
            "shortcut_mde": shortcut,
            "shortcut_power": float(np.concatenate(r["rejects_shortcut"]).mean()),
        }
        for name, r in rows.items()
    ]


def table(rows: list[dict], studies: int) -> list[str]:
    """The result lines: one per cell and method, then each goal's verdict."""
    lines = [
        f"{'S':>2} {'I':>4} {'Q':>5}  {'method':<46} {'coverage':>8} {'MDE':>7} {'power':>6}  "
        f"{'(t+t)se':>7} {'power':>6}"
    ]
    for r in rows:
        lines.append(
            f"{r['seeds']:>2} {r['items']:>4} {r['queries']:>5}  {r['method']:<46} {r['coverage']:>8.4f} "
            f"{r['mde']:>7.4f} {r['power']:>6.3f}  {r['shortcut_mde']:>7.4f} {r['shortcut_power']:>6.3f}"
        )
    ours = [r for r in rows if r["method"].endswith("(this module)")]
    covered = all(COVERAGE_GOAL[0] <= r["coverage"] <= COVERAGE_GOAL[1] for r in ours)
    powered = all(abs(r["power"] - statistics.POWER) <= POWER_TOLERANCE for r in ours)
    sd = np.sqrt(0.95 * 0.05 / studies)
    lines += [
        "",
        f"binomial SD of a coverage near 0.95 with {studies:,} studies: {sd:.4f}; of a power near 0.8: "
        f"{np.sqrt(0.8 * 0.2 / studies):.4f}",
        f"{'PASS' if covered else 'MISS'}: coverage of the module's 95 % intervals in "
        f"[{COVERAGE_GOAL[0]}, {COVERAGE_GOAL[1]}] in every cell",
        f"{'PASS' if powered else 'MISS'}: power at planned_mde(m=1) within {POWER_TOLERANCE:.2f} of {statistics.POWER}",
    ]
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--studies", type=int, default=20_000, help="simulated studies per cell")
    parser.add_argument("--seed", type=int, default=20_251_104, help="the simulation's random seed")
    parser.add_argument("--out", type=Path, default=OUT, help="where the table is written")
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    start = time.perf_counter()
    rows = [row for cell in CELLS for row in run_cell(*cell, args.studies, rng, statistics.ALPHA)]
    command = shlex.join(["python", "benchmarks/bench_statistics_coverage.py", *sys.argv[1:]])
    header = [
        f"$ {command}",
        f"{args.studies:,} simulated studies per cell, seed {args.seed}; Gaussian per-query differences, "
        f"1-7 queries per item; components seed {COMPONENTS.seed:g}, item {COMPONENTS.item:g}, "
        f"interaction {COMPONENTS.interaction:g}; true effect = planned_mde(m=1); alpha {statistics.ALPHA}",
        "",
    ]
    text = "\n".join([*header, *table(rows, args.studies), f"({time.perf_counter() - start:.0f} s)", ""])
    print(text, end="")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)


if __name__ == "__main__":
    main()
