"""The study: experiments × seeds → run directories, ``runs.csv``, paired statistics, and the
configuration carried forward from stage to stage by a written rule.

An **experiment** is a named baseline configuration plus variants (each a few config
overrides), run for N seeds. The baseline of an experiment is its **stage baseline**: the
profile's own config (its default recipe) plus the winners of every earlier stage, so stage 2
builds on what stage 1 adopted and ``03`` on both. Stages and their experiments:

========  =====================================================================
stage     experiments (:data:`EXPERIMENTS`)
========  =====================================================================
``02_1``  ``crop`` (box crop vs whole photo), ``resize`` (letterbox vs squash),
          ``resolution`` (input side)
``02_2``  ``augment`` (weak … super_strong), ``margin`` (box margin 0 / 0.1 / 0.2),
          ``photometric`` (none / clahe / grayworld / both), ``head`` (bn / bnneck)
``03``    ``loss`` (batch_hard / semi_hard / infonce), ``embed_dim`` (128 / 256 / 512),
          ``backbone`` (profile-specific, see :func:`experiments`)
========  =====================================================================

**The rule** (:data:`RULE`): a variant is adopted only if its paired verdict on val
Recall@5 (the model-selection metric) against its own experiment's baseline is ``better``;
among several ``better`` variants the one with the largest mean difference; otherwise the
baseline is kept. Within a stage the experiments change disjoint fields, so their winners
combine. After the last stage the carried configuration is written to
``results/<profile>/final_config.json``.

**Runs.** One run directory per (variant, seed): ``results/<profile>/<experiment>/
<variant>_seed<N>_<key>/`` (fixture: under the git-ignored ``outputs/fixture/results``).
``key`` is a hash of the resolved config (runtime fields aside, seed included) and the
table's sha256, so a run identical to one finished anywhere in the study (e.g. the baseline
that every experiment of a stage shares) is reused, not retrained; a finished run is skipped;
a half-finished one is resumed explicitly with ``train.fit(..., resume=True)`` (which itself
refuses a checkpoint of another config). After training, ``best.pt`` is evaluated once on
val and every query's first-hit rank written to ``val_ranks.csv``: the paired statistics
resample those. Test is never read here (the original study reported validation numbers that had also selected its models): ``fit`` writes it to
``metrics.json``, the study and the report ignore it except for the final configuration.

**Post-processing** (:func:`run_postprocess`, after the study, no training): flip TTA, αQE,
DBA and k-reciprocal re-ranking (:mod:`helpers.evaluation.postprocess`) on every seed's run of the
final configuration, each against plain cosine (`none`) with the same statistics, in
``results/<profile>/postprocess/``.

**Statistics**: :func:`seed_summary` (mean ± sample std over seeds) and :func:`compare` (per
Recall@K the paired difference with :mod:`helpers.experiments.statistics`' bootstrap over seeds
and items, its p-value and minimum detectable effect; Recall@5 tests Holm-corrected over the
study's family: :func:`family_so_far` at decision time, :func:`finalise_family` once all have run).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core import repro, runtime
from helpers.core.config import PROFILES, RUNTIME_FIELDS, STUDY_SEEDS, Config, check, get_config
from helpers.core.errors import InputError
from helpers.core.files import sha256_bytes, sha256_file, write_text_atomic
from helpers.core.progress import progress_bar
from helpers.core.schema import read_table
from helpers.evaluation import inference, metrics, postprocess
from helpers.evaluation.metrics import METRICS
from helpers.experiments import artifacts, statistics
from helpers.experiments.statistics import ALPHA, N_BOOT
from helpers.modeling import checkpoints

STAGES = ("02_1", "02_2", "03")
KS = (1, 5, 10)
PRIMARY_K = 5  # Recall@5, the model-selection metric of train.fit, so the study decides on it too
PRIMARY = f"recall@{PRIMARY_K}"
# results/<profile>/noise.csv: where each Recall@5 comparison's noise comes from (:func:`noise_table`).
NOISE = "noise.csv"
RULE = (
    "adopt a variant only if its paired verdict on val Recall@5 against the experiment's own baseline is "
    "`better` (Holm-corrected over the study's Recall@5 tests: adjusted p below 0.05 and the whole "
    "Holm-adjusted bootstrap interval of the difference above 0); among several `better` variants the one "
    "with the largest mean difference; otherwise keep the baseline"
)

# The study's size per profile. Every run starts from the profile's own config, unchanged.
#
# demo: the stage-1 baseline is the demo profile's default recipe exactly (160 px, 10
# epochs, early stopping after 3), so the final configuration is trained under the recipe
# `make demo` ships, and when nothing is adopted the final configuration *is* that recipe.
# `make study` must run every question of 02 and 03 with 3 seeds in <= 3 hours on a 2-core CPU.
# A run of the recipe measured ~270 s here (10 epochs of ~23 s of training and ~3 s of val pass,
# then the val-rank and test passes), so 3 h hold ~40 runs, 13 configurations. The grid is cut
# to fit by variants, never by seeds (:func:`experiments`): one variant per question, the
# resolution bracketing the default from both sides (128 / 192, 0.64x and 1.44x the pixels):
# 11 variants + the shared baseline = 36 runs ≈ 2.7 h, ~2.9 h with the dearer 192 px and Lite1,
# when no stage adopts anything (a stage that adopts 192 px makes the later ones ~1.4x dearer;
# the study prints its projection from the runs it has measured before each experiment).
# fixture: CI, every code path in seconds: the fixture profile's 1 epoch at 64 px.
# full: the original study's sizes on a GPU: the full profile as it is (EfficientNet-B3 at its
# native resolution, 40 epochs, patience 5), 3 seeds: at most ~7.6 GPU-hours at the rate the GPU
# card measured on an H200 (02_1 ≤ 1.5 h, 02_2 ≤ 3.8 h, 03 ≤ 2.3 h; docs/scaling.md).
# The training budget of the profile's recipe, recorded in final_config.json beside the decisions.
RECIPE_FIELDS = ("img_size", "epochs", "patience", "p_items", "k_images", "optimizer", "lr", "schedule")
# Stated per-epoch estimates (train + val pass, seconds) for the projected-time print, used
# until runs of the study have been measured: fixture from 5–17 s per 1-epoch run measured on
# the shared 2-core machine (most of it evaluation); demo from the measured `make demo`
# (docs/benchmarks.md: 8 epochs of the default recipe in 167 s) and this study's first run;
# full a guess for EfficientNet-B3 on a Colab T4 with the 10 % TOPS+DRESSES sample.
SECONDS_PER_EPOCH = {"fixture": 10.0, "demo": 27.0, "full": 60.0}


@dataclass(frozen=True)
class Experiment:
    """A named comparison: ``variants`` maps a variant's name to its config overrides on the
    stage baseline (the baseline itself is the variant ``"baseline"``, no overrides)."""

    name: str
    stage: str
    question: str
    variants: dict

    @property
    def fields(self) -> set[str]:
        return {name for overrides in self.variants.values() for name in overrides}


def _levels(field: str, values) -> dict:
    """``{"field=value": {field: value}}`` for each value (the one equal to the baseline's
    value is dropped later, by :func:`resolve_variants`)."""
    return {f"{field}={value}": {field: value} for value in values}


def experiments(profile: str) -> list[Experiment]:
    """Every experiment of the study, in the order they run, for ``profile``.

    Resolution and backbone depend on the profile: under ``demo`` the offline-pretrained
    EfficientNet-Lite0 vs Lite1 (packaged ImageNet weights; no hub), under ``full`` ResNet-34
    vs EfficientNet-B3 at its native resolution (hub weights), under ``fixture`` two tiny
    random-init timm test networks.
    """
    resolution = {"fixture": (48, 64), "demo": (128, 192), "full": (224, None)}[profile]
    backbone = {
        "fixture": {"backbone=test_resnet": {"backbone": "test_resnet"}},
        "demo": {"backbone=tf_efficientnet_lite1": {"backbone": "tf_efficientnet_lite1", "weights": "packaged"}},
        # img_size None: each backbone at its own pretrained (native) input size
        "full": {
            "backbone=resnet34": {"backbone": "resnet34", "weights": "hub", "img_size": None},
            "backbone=efficientnet_b3": {"backbone": "efficientnet_b3", "weights": "hub", "img_size": None},
        },
    }[profile]
    # Variants per profile. full (a GPU) runs the whole ladder. demo keeps every question within
    # its 3-hour CPU budget with 3 seeds by asking each yes/no question once: the project's
    # former default augmentation (medium) against the recipe's flip, one box margin (10 % of the
    # box side on each edge), both photometric corrections together, the original study's loss
    # question (semi-hard against batch-hard; InfoNCE only under full) and the smaller dimension
    # (128 against 256; 512 only under full).
    # fixture (CI) runs every code path with one variant per experiment, within seconds; its
    # levels include the baseline's value, which is dropped, so its planned family is larger than
    # the family that runs (a path the statistics must handle).
    augment = {"fixture": ("weak", "strong"), "demo": ("medium",), "full": ("weak", "medium", "strong", "super_strong")}
    margin = {"fixture": (0.0, 0.1), "demo": (0.1,), "full": (0.1, 0.2)}
    photometric = {"fixture": ("none", "grayworld"), "demo": ("both",), "full": ("clahe", "grayworld", "both")}
    loss = {"fixture": ("batch_hard", "infonce"), "demo": ("semi_hard",), "full": ("semi_hard", "infonce")}
    embed_dim = {"fixture": (32, 64), "demo": (128,), "full": (128, 512)}
    augment, margin, photometric, loss, embed_dim = (
        levels[profile] for levels in (augment, margin, photometric, loss, embed_dim)
    )
    return [
        Experiment(
            "crop", "02_1", "Does cropping to the garment box beat the whole photo?", {"crop=False": {"crop": False}}
        ),
        Experiment(
            "resize",
            "02_1",
            "Does letterbox (aspect kept) beat the original study's squash resize?",
            _levels("resize", ("squash",)),
        ),
        Experiment("resolution", "02_1", "Which input side?", _levels("img_size", resolution)),
        Experiment("augment", "02_2", "Which augmentation preset?", _levels("augment", augment)),
        Experiment(
            "margin", "02_2", "Does growing the box (the consumer/shop 'box gap') help?", _levels("box_margin", margin)
        ),
        Experiment(
            "photometric", "02_2", "Does photometric 'domain normalisation' help?", _levels("photometric", photometric)
        ),
        Experiment(
            "head",
            "02_2",
            "BatchNorm in the head (bn, the original study's) or BNNeck? (L2 is always on: cosine retrieval needs it)",
            _levels("head", ("bn", "bnneck")),
        ),
        Experiment("loss", "03", "Which metric loss?", _levels("loss", loss)),
        Experiment("embed_dim", "03", "Which embedding dimension?", _levels("embed_dim", embed_dim)),
        Experiment("backbone", "03", "Which backbone?", backbone),
    ]


def get_experiment(profile: str, name: str) -> Experiment:
    found = {e.name: e for e in experiments(profile)}
    if name not in found:
        raise InputError(
            f"unknown experiment {name!r}; choose one of: {', '.join(found)}, a stage ({', '.join(STAGES)}) or all"
        )
    return found[name]


def select(profile: str, name: str) -> list[Experiment]:
    """The experiments an argument names: one experiment, a stage, or ``all``."""
    if name == "all":
        return experiments(profile)
    if name in STAGES:
        return [e for e in experiments(profile) if e.stage == name]
    return [get_experiment(profile, name)]


# --------------------------------------------------------------------------- where results live


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "._-" else "-" for c in text)


def run_key(cfg: Config, table_sha256: str) -> str:
    """What makes two runs the same run: the resolved config (runtime fields aside: they never
    change results) including the seed, and the table."""
    values = {k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS}
    text = json.dumps({"config": values, "table": table_sha256}, sort_keys=True, default=str)
    return sha256_bytes(text.encode())[:12]


def find_runs(root: Path) -> dict[str, Path]:
    """key → run directory, for every run the study started anywhere under ``root``."""
    found = {}
    for marker in sorted(Path(root).glob("*/*/study_run.json")):
        found.setdefault(json.loads(marker.read_text())["key"], marker.parent)
    return found


def is_finished(run_dir: Path) -> bool:
    marker = run_dir / "study_run.json"
    return marker.is_file() and json.loads(marker.read_text()).get("finished", False)


# --------------------------------------------------------------------------- one run


def val_ranks(run_dir: Path, table: pd.DataFrame, data_root: Path, progress: bool = False) -> pd.DataFrame:
    """``best.pt`` evaluated once on val (official protocol): one row per scored query with its
    0-based first-hit rank and average precision, sorted by path."""
    queries, gallery, query_emb, gallery_emb = val_embeddings(run_dir, table, data_root, progress=progress)
    result = metrics.retrieval_metrics(query_emb, queries.item_id.to_numpy(), gallery_emb, gallery.item_id.to_numpy())
    scored = queries.iloc[result.query_index]
    ranks = pd.DataFrame(
        {
            "path": scored.path.to_numpy(),
            "item_id": scored.item_id.to_numpy(),
            "first_hit_rank": result.first_hit_rank,
            "average_precision": result.average_precision,
        }
    )
    return ranks.sort_values("path", kind="stable").reset_index(drop=True)


def val_embeddings(
    run_dir: Path, table: pd.DataFrame, data_root: Path, flip_tta: bool | None = None, progress: bool = False
) -> tuple[pd.DataFrame, pd.DataFrame, np.ndarray, np.ndarray]:
    """``(val queries, val gallery, their embeddings)`` under the official protocol, embedded in
    one pass with the run's ``best.pt``; ``flip_tta`` True / False overrides the run's own
    setting of the flip test-time augmentation."""
    embedder, cfg = checkpoints.load_embedder(run_dir / "best.pt")
    cfg = cfg if flip_tta is None else replace(cfg, flip_tta=flip_tta)
    device = runtime.resolve_device(cfg.device)
    queries, gallery = metrics.protocol_sets(table, "val", "official")
    embed = inference.embed_table(
        cfg, embedder.to(device), pd.concat([queries, gallery]), data_root, device, progress=progress, desc="val ranks"
    )
    return queries, gallery, embed[: len(queries)], embed[len(queries) :]


def metrics_from_ranks(ranks: pd.DataFrame) -> dict:
    """Val Recall@K and mAP of one run from its per-query ranks (the numbers the statistics use)."""
    out = {f"recall@{k}": float((ranks.first_hit_rank < k).mean()) for k in (1, 5, 10, 20)}
    return {**out, "map": float(ranks.average_precision.mean()), "n_queries": int(len(ranks))}


def _write_marker(run_dir: Path, record: dict) -> None:
    write_text_atomic(run_dir / "study_run.json", json.dumps(record, indent=2) + "\n")


def ensure_run(
    cfg: Config,
    table_path: Path,
    data_root: Path,
    run_dir: Path,
    root: Path,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> tuple[Path, str]:
    """``(the run directory holding this run, what was done)``: ``reused`` (finished anywhere
    under ``root``), ``resumed`` (a half-finished one continued), or ``trained``.

    ``stop_after_epoch`` interrupts training after that epoch (as a disconnect would); the
    next call resumes it.
    """
    table_sha = sha256_file(table_path)
    key = run_key(cfg, table_sha)
    existing = find_runs(root).get(key)
    if existing is not None and is_finished(existing):
        return existing, "reused"
    run_dir = existing or run_dir
    run_dir.mkdir(parents=True, exist_ok=True)
    marker = (
        json.loads((run_dir / "study_run.json").read_text())
        if existing
        else {"key": key, "table_sha256": table_sha, "seed": cfg.seed, "finished": False, "wall_s": 0.0}
    )
    resume = (run_dir / "last.pt").is_file()
    _write_marker(run_dir, marker)
    started = time.perf_counter()
    try:
        result = artifacts.ensure_trained(cfg, table_path, data_root, run_dir, progress, stop_after_epoch)
        if result is None:
            return run_dir, "interrupted"
        ranks = val_ranks(run_dir, read_table(table_path), data_root, progress)
        write_text_atomic(run_dir / "val_ranks.csv", ranks.to_csv(index=False, lineterminator="\n"))
        marker["finished"] = True
    finally:  # wall time adds up over every session that worked on the run
        marker["wall_s"] = round(marker["wall_s"] + time.perf_counter() - started, 1)
        _write_marker(run_dir, marker)
    # last.pt (weights + optimiser state) only serves a resume; best.pt stays for analysis.
    (run_dir / "last.pt").unlink(missing_ok=True)
    return run_dir, "resumed" if resume else "trained"


def run_row(run_dir: Path, root: Path) -> dict:
    """One finished run's line of ``runs.csv`` (without experiment / variant / changed fields)."""
    history = pd.read_csv(run_dir / "history.csv")
    result = json.loads((run_dir / "metrics.json").read_text())
    ranks = pd.read_csv(run_dir / "val_ranks.csv")
    marker = json.loads((run_dir / "study_run.json").read_text())
    trained = history.loc[history.epoch >= 1, "train_images_per_s"]
    return {
        "run_dir": str(run_dir.relative_to(root)),
        "best_epoch": int(result["best_epoch"]),
        "epochs_run": int(history.epoch.max()),
        **{f"val_{m}": v for m, v in metrics_from_ranks(ranks).items()},
        "wall_s": marker["wall_s"],
        "images_per_s": round(float(trained.mean()), 1) if len(trained) else math.nan,
    }


# --------------------------------------------------------------------------- statistics


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
    queries = [frame.sort_values("path", kind="stable")[["path", "item_id"]].astype(str) for frame in ranks.values()]
    if any(not q.reset_index(drop=True).equals(queries[0].reset_index(drop=True)) for q in queries[1:]):
        raise InputError("val_ranks.csv files hold different queries: the runs used different tables")


def hit_grid(ranks_by_seed: dict[int, pd.DataFrame], seeds, k: int) -> np.ndarray:
    """``[seeds, queries]`` hit@K indicators, the queries aligned by path (see :func:`check_same_queries`)."""
    frames = [ranks_by_seed[s].sort_values("path", kind="stable") for s in seeds]
    return np.stack([(f.first_hit_rank.to_numpy() < k).astype(np.float64) for f in frames])


def query_items(ranks: pd.DataFrame) -> np.ndarray:
    """Each query's item, in :func:`hit_grid`'s order of queries (by path): the bootstrap's clusters."""
    return ranks.sort_values("path", kind="stable").item_id.astype(str).to_numpy()


def paired_tests(
    runs: pd.DataFrame,
    ranks: dict[tuple[str, int], pd.DataFrame],
    experiment: str,
    ks=KS,
    n_boot: int = N_BOOT,
) -> dict[tuple[str, int], statistics.PairedBootstrap | None]:
    """``(variant, K) → bootstrap of its Recall@K difference from baseline`` on the seeds both
    have (None: no common seed), each from the comparison's own stream."""
    check_same_queries(ranks)
    items = query_items(next(iter(ranks.values())))
    tests = {}
    for variant in runs.variant.unique():
        if variant == "baseline":
            continue
        for k in ks:
            paired = paired_grids(runs, ranks, variant, k)
            rng = statistics.stream(experiment, variant, f"recall@{k}")
            tests[(variant, k)] = None if paired is None else statistics.paired_bootstrap(*paired, items, rng, n_boot)
    return tests


def paired_grids(
    runs: pd.DataFrame, ranks: dict[tuple[str, int], pd.DataFrame], variant: str, k: int
) -> tuple[np.ndarray, np.ndarray] | None:
    """The baseline's and ``variant``'s ``[seeds, queries]`` hit@K grids on the seeds both have
    (:func:`hit_grid`); None when they share no seed."""
    seeds = sorted(set(runs.loc[runs.variant == "baseline", "seed"]) & set(runs.loc[runs.variant == variant, "seed"]))
    if not seeds:
        return None
    baseline, other = (hit_grid({s: ranks[(v, s)] for s in seeds}, seeds, k) for v in ("baseline", variant))
    return baseline, other


def holm_columns(test: statistics.PairedBootstrap, family: statistics.HolmFamily, i: int, final: bool) -> dict:
    """The primary metric's Holm columns of one test (the ``i``-th finished test of ``family``);
    ``final``: the ``_final`` set written once the whole family has run."""
    infix, alpha_step, p_holm = "_final" if final else "", float(family.alpha_step[i]), float(family.p_holm[i])
    low, high = test.interval(alpha_step)
    return {
        f"holm_m{infix}_{PRIMARY}": family.m,
        f"holm_rank{infix}_{PRIMARY}": int(family.rank[i]),
        f"alpha_step{infix}_{PRIMARY}": alpha_step,
        f"p_holm{infix}_{PRIMARY}": p_holm,
        f"low_adj{infix}_{PRIMARY}": low,
        f"high_adj{infix}_{PRIMARY}": high,
        f"mde{infix}_{PRIMARY}": statistics.mde(test.se, alpha_step),
        f"verdict{infix}_{PRIMARY}": statistics.holm_verdict(low, high, p_holm),
    }


def compare(
    runs: pd.DataFrame,
    ranks: dict[tuple[str, int], pd.DataFrame],
    experiment: str,
    others=(),
    pending: int = 0,
    n_boot: int = N_BOOT,
) -> pd.DataFrame:
    """One row per variant: its seeds' mean ± std and, against ``baseline`` on the seeds both
    have, per Recall@K the paired difference (observed, per seed), its bootstrap standard error,
    raw percentile interval and p-value, and the minimum detectable effect.

    Recall@5 is the primary metric: its tests join Holm's family with ``others`` (the raw
    p-values of the other experiments' finished Recall@5 tests) and ``pending`` planned tests
    counted as p = 1 (:func:`family_so_far`), and its verdict comes from the Holm-adjusted
    interval. Recall@1 and @10 are exploratory: verdicts from the raw interval, no correction.
    """
    summary = seed_summary(runs)
    tests = paired_tests(runs, ranks, experiment, n_boot=n_boot)
    primary = [v for v in summary.index if v != "baseline"]
    family = statistics.holm_family(
        [*others, *(np.nan if tests[(v, PRIMARY_K)] is None else tests[(v, PRIMARY_K)].p_value for v in primary)],
        pending,
    )
    rows = {}
    for variant in summary.index:
        row = {}
        for k in KS:
            metric = f"recall@{k}"
            test = tests.get((variant, k))
            if test is None:
                row[f"verdict_{metric}"] = "baseline" if variant == "baseline" else "no pairs"
                continue
            low, high = test.interval()
            row.update(
                {
                    f"diff_{metric}": test.diff,
                    f"seed_diffs_{metric}": json.dumps(test.seed_diffs),
                    f"se_{metric}": test.se,
                    f"low_{metric}": low,
                    f"high_{metric}": high,
                    f"p_{metric}": test.p_value,
                    f"mde_{metric}": statistics.mde(test.se),
                    f"verdict_{metric}": statistics.verdict(low, high),
                    f"role_{metric}": "primary" if metric == PRIMARY else "exploratory",
                    f"spawn_key_{metric}": statistics.spawn_key(experiment, variant, metric),
                }
            )
            if metric == PRIMARY:  # the MDE and verdict at Holm's level replace the raw ones
                row.update(holm_columns(test, family, len(others) + primary.index(variant), final=False))
        rows[variant] = row
    return summary.join(comparison_frame(rows))


# Per Recall@K in this order (Holm's only for the primary metric); finalise_family appends the _final set.
TEST_COLUMNS = ("diff", "seed_diffs", "se", "low", "high", "p")
HOLM_COLUMNS = ("holm_m", "holm_rank", "alpha_step", "p_holm", "low_adj", "high_adj")
LABEL_COLUMNS = ("mde", "verdict", "role", "spawn_key")
INTEGER_PREFIXES = ("spawn_key_", "holm_m_", "holm_rank_")


def comparison_columns() -> list[str]:
    """The statistics' columns of a comparison table, in order."""
    return [
        f"{c}_recall@{k}"
        for k in KS
        for c in (*TEST_COLUMNS, *(HOLM_COLUMNS if k == PRIMARY_K else ()), *LABEL_COLUMNS)
    ]


def comparison_frame(rows: dict[str, dict]) -> pd.DataFrame:
    """``{variant: {column: value}}`` as a table of :func:`comparison_columns`, integers built as
    integers (through a float, a 63-bit stream key would lose digits)."""
    columns = {
        c: pd.Series(
            {v: row[c] for v, row in rows.items() if c in row},
            dtype="Int64" if c.startswith(INTEGER_PREFIXES) else None,
        )
        for c in comparison_columns()
    }
    return pd.DataFrame(columns, index=list(rows))


def integer_columns(table: pd.DataFrame) -> pd.DataFrame:
    """Counts, ranks and stream keys as nullable integers (the baseline row has none), so they
    are written as integers."""
    return table.astype({c: "Int64" for c in table.columns if c.startswith(INTEGER_PREFIXES)})


def decide(comparison: pd.DataFrame) -> tuple[str, str]:
    """``(winner, why)`` by :data:`RULE` from a :func:`compare` table."""
    better = comparison[comparison[f"verdict_{PRIMARY}"] == "better"]
    if better.empty:
        return "baseline", f"no variant is `better` on val {PRIMARY}: the baseline is kept"
    winner = better[f"diff_{PRIMARY}"].idxmax()
    row = better.loc[winner]
    return winner, (
        f"{winner} is `better` on val {PRIMARY} by {row[f'diff_{PRIMARY}']:+.3f}, Holm-adjusted interval "
        f"[{row[f'low_adj_{PRIMARY}']:+.3f}, {row[f'high_adj_{PRIMARY}']:+.3f}], Holm p {row[f'p_holm_{PRIMARY}']:.4f}"
    )


# --------------------------------------------------------------------------- the family of primary tests


def planned_tests(profile: str) -> dict[str, int]:
    """Recall@5 tests each experiment plans: one per listed variant (an upper bound: a variant
    equal to its stage baseline is dropped when the experiment runs)."""
    return {e.name: len(e.variants) for e in experiments(profile)}


def read_comparison(path: Path) -> pd.DataFrame:
    """A ``comparison.csv`` as written: its integer columns read as integers (a 63-bit stream key
    would lose digits as a float)."""
    names = pd.read_csv(path, nrows=0).columns
    return pd.read_csv(path, index_col="variant", dtype={c: "Int64" for c in names if c.startswith(INTEGER_PREFIXES)})


def finished_pvalues(root: Path, name: str) -> list[float] | None:
    """The raw Recall@5 p-values of experiment ``name`` (NaN: a variant without pairs), or None
    when it has not finished with these statistics (no ``decision.json``, or one written before
    them, without a ``family``)."""
    decision = Path(root) / name / "decision.json"
    if not decision.is_file() or "family" not in json.loads(decision.read_text()):
        return None
    table = read_comparison(Path(root) / name / "comparison.csv")
    return table[f"p_{PRIMARY}"].drop(index="baseline").tolist() if f"p_{PRIMARY}" in table.columns else []


def family_so_far(profile: str, root: Path, current: str) -> tuple[list[float], int]:
    """``(raw Recall@5 p-values of the other experiments finished with these statistics, planned
    tests of the others)``: the experiments not finished count all their planned tests as p = 1."""
    others, pending = [], 0
    for name, planned in planned_tests(profile).items():
        found = None if name == current else finished_pvalues(root, name)
        if found is not None:
            others += found
        elif name != current:
            pending += planned
    return others, pending


def run_ranks(root: Path, runs: pd.DataFrame) -> dict[tuple[str, int], pd.DataFrame]:
    """``(variant, seed) → val_ranks.csv`` of every run listed in a ``runs.csv``."""
    ranks = {}
    for run in runs.itertuples():
        path = Path(root) / run.run_dir / "val_ranks.csv"
        if not path.is_file():
            raise InputError(f"{path}: missing; the final Holm values need every run's val ranks")
        ranks[(run.variant, run.seed)] = pd.read_csv(path)
    return ranks


def finished_study(profile: str, root: Path) -> list[str] | None:
    """Every experiment of ``profile``, once each has finished with these statistics; else None."""
    names = list(planned_tests(profile))
    return None if any(finished_pvalues(root, name) is None for name in names) else names


def finalise_family(profile: str, root: Path | None = None) -> pd.DataFrame | None:
    """Holm over every finished Recall@5 comparison once every experiment of ``profile`` has
    finished: each ``comparison.csv`` gains the ``_final`` Holm columns (rewritten only when they
    change; the decision-time columns and verdicts stay: the decisions used them). The replicates
    are recomputed from each run's ``val_ranks.csv`` with the comparison's own stream, so they are
    the decision's. Returns the family, one row per test, or None while an experiment has not
    finished with these statistics (then nothing is written)."""
    root = Path(root or artifacts.results_root(profile))
    names = finished_study(profile, root)
    if names is None:
        return None
    found = []
    for name in names:
        runs = pd.read_csv(root / name / "runs.csv")
        table = read_comparison(root / name / "comparison.csv")
        for (variant, _), test in paired_tests(runs, run_ranks(root, runs), name, ks=(PRIMARY_K,)).items():
            if test is None:
                continue
            if not np.isclose(test.p_value, table.loc[variant, f"p_{PRIMARY}"]):
                raise InputError(f"{root / name / 'runs.csv'}: {variant}'s runs no longer give its p-value; rerun it")
            found.append((name, variant, test))
    family = statistics.holm_family([test.p_value for _, _, test in found])
    for name in names:
        path = root / name / "comparison.csv"
        table = read_comparison(path)
        for i, (experiment, variant, test) in enumerate(found):
            if experiment == name:
                for column, value in holm_columns(test, family, i, final=True).items():
                    table.loc[variant, column] = value
        # the baseline and variants without pairs keep their label
        untested = ~table.index.isin([variant for experiment, variant, _ in found if experiment == name])
        table.loc[untested, f"verdict_final_{PRIMARY}"] = table.loc[untested, f"verdict_{PRIMARY}"]
        text = integer_columns(table).to_csv(index_label="variant", lineterminator="\n")
        if text != path.read_text():
            write_text_atomic(path, text)
    return pd.DataFrame(
        {
            "experiment": [name for name, _, _ in found],
            "variant": [variant for _, variant, _ in found],
            f"p_{PRIMARY}": [test.p_value for _, _, test in found],
            f"holm_rank_final_{PRIMARY}": family.rank,
            f"alpha_step_final_{PRIMARY}": family.alpha_step,
            f"p_holm_final_{PRIMARY}": family.p_holm,
        }
    )


def noise_table(profile: str, root: Path) -> pd.DataFrame | None:
    """Where each Recall@5 comparison's noise comes from, one row per variant with at least 2
    seeds: the spread of its per-seed differences (``seed_sd``) and, a seed held fixed, of its
    difference under resampled val items (``query_sd``, :func:`statistics.query_sd`), with the
    val split's items and queries. None while an experiment has not finished."""
    names = finished_study(profile, root)
    if names is None:
        return None
    rows = []
    for name in names:
        runs = pd.read_csv(root / name / "runs.csv")
        ranks = run_ranks(root, runs)
        items = query_items(next(iter(ranks.values())))
        for variant in runs.variant.unique():
            grids = None if variant == "baseline" else paired_grids(runs, ranks, variant, PRIMARY_K)
            if grids is None or len(grids[0]) < 2:
                continue
            rng = statistics.stream(name, variant, f"query_sd_{PRIMARY}")
            rows.append(
                {
                    "experiment": name,
                    "variant": variant,
                    "n_seeds": len(grids[0]),
                    "n_items": len(set(items)),
                    "n_queries": len(items),
                    f"seed_sd_{PRIMARY}": float(np.std((grids[1] - grids[0]).mean(axis=1), ddof=1)),
                    f"query_sd_{PRIMARY}": statistics.query_sd(*grids, items, rng),
                }
            )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- stages and the carried config


def stage_overrides(profile: str, stage: str, root: Path, strict: bool = True) -> dict:
    """The overrides every run of ``stage`` starts from on the profile's config: the adopted variants
    of every earlier stage (from their ``decision.json``). An earlier experiment not finished
    yet is an error (its winner is not known), or, with ``strict=False`` (projections only),
    assumed to keep its baseline."""
    overrides: dict = {}
    for experiment in experiments(profile):
        if STAGES.index(experiment.stage) >= STAGES.index(stage):
            continue
        decision = Path(root) / experiment.name / "decision.json"
        if not decision.is_file() and not strict:
            continue
        if not decision.is_file():
            raise InputError(
                f"stage {stage} builds on the winners of stage {experiment.stage}: run "
                f"`python -m helpers study {experiment.name} --profile {profile}` first"
            )
        overrides.update(json.loads(decision.read_text())["winner_overrides"])
    return overrides


def resolve_variants(experiment: Experiment, base: Config) -> dict[str, Config]:
    """``{"baseline": base, variant: config}``; a variant identical to the baseline (e.g.
    ``augment=medium`` when the baseline already uses it) is the baseline and is dropped."""
    out = {"baseline": base}
    for name, overrides in experiment.variants.items():
        cfg = check(replace(base, **overrides))
        if all(getattr(base, k) == v for k, v in overrides.items()):
            continue
        out[name] = cfg
    return out


def changed_fields(configs: dict[str, Config]) -> list[str]:
    """Config fields (seed aside) on which any variant differs from the baseline."""
    base = asdict(configs["baseline"])
    return sorted({k for cfg in configs.values() for k, v in asdict(cfg).items() if k != "seed" and base[k] != v})


def projected_seconds(root: Path, profile: str, n_runs: int, epochs: int) -> tuple[float, str]:
    """``(seconds, where the per-epoch time came from)`` for training ``n_runs`` runs of at most
    ``epochs`` epochs: measured from this study's finished runs when there are any (their
    median wall time per epoch run), else :data:`SECONDS_PER_EPOCH`'s stated estimate."""
    per_epoch = []
    for run_dir in find_runs(root).values():
        if is_finished(run_dir):
            history = pd.read_csv(run_dir / "history.csv")
            per_epoch.append(
                json.loads((run_dir / "study_run.json").read_text())["wall_s"] / max(1, history.epoch.max())
            )
    if per_epoch:
        seconds = float(np.median(per_epoch))
        return n_runs * epochs * seconds, f"{seconds:.1f} s/epoch measured (median of {len(per_epoch)} finished runs)"
    seconds = SECONDS_PER_EPOCH[profile]
    return n_runs * epochs * seconds, f"{seconds:.1f} s/epoch stated estimate (no finished run measured yet)"


def plan(
    profile: str,
    n_seeds: int | None = None,
    data_root: str | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> pd.DataFrame:
    """Per experiment: configurations, runs, and runs still to train (not finished anywhere in
    the study), with the projected time. Stages whose earlier winners are not known yet are
    counted as if the baselines were kept, plus one new baseline per seed for each later
    stage (it changes when a variant is adopted), so the total is an upper bound."""
    root = Path(root or artifacts.results_root(profile))
    n_seeds = n_seeds_for(profile, n_seeds)
    profile_cfg = base_config(profile, data_root)
    _, table_path = artifacts.ensure_prepared(profile_cfg, progress)
    table_sha, known, rows = sha256_file(table_path), find_runs(root), []
    for experiment in experiments(profile):
        base = check(replace(profile_cfg, **stage_overrides(profile, experiment.stage, root, strict=False)))
        configs = resolve_variants(experiment, base)
        keys = {run_key(replace(cfg, seed=seed), table_sha) for cfg in configs.values() for seed in range(n_seeds)}
        rows.append(
            {
                "stage": experiment.stage,
                "experiment": experiment.name,
                "configs": len(configs),
                "runs": len(configs) * n_seeds,
                "new_keys": keys,
                "to_train": {k for k in keys if not is_finished(known.get(k, root / "-"))},
            }
        )
    table = pd.DataFrame(rows)
    seen: set = set()  # a run shared by several experiments (a stage's baseline) is trained once
    for i, row in table.iterrows():
        table.at[i, "to_train"] = len(row.to_train - seen)
        seen |= row.new_keys
    undecided = sum(
        1
        for s in STAGES[1:]
        if not all(
            (root / e.name / "decision.json").is_file()
            for e in experiments(profile)
            if STAGES.index(e.stage) < STAGES.index(s)
        )
    )
    table["to_train"] = table.to_train.astype(int)
    total = int(table.to_train.sum()) + undecided * n_seeds
    epochs = profile_cfg.epochs
    seconds, source = projected_seconds(root, profile, total, epochs)
    print(
        f"study on profile {profile}, {n_seeds} seeds: ≤ {total} runs to train (incl. {undecided * n_seeds} "
        f"baselines of stages whose earlier winners are not known yet); projected ≤ {seconds / 60:.0f} min "
        f"({total} × ≤ {epochs} epochs × {source})",
        flush=True,
    )
    return table.drop(columns="new_keys")


def n_seeds_for(profile: str, n_seeds: int | None) -> int:
    """The number of seeds asked for, or the profile's default (:data:`helpers.core.config.STUDY_SEEDS`)."""
    if n_seeds is None:
        return STUDY_SEEDS[profile]
    if n_seeds < 1:
        raise InputError(f"--seeds must be at least 1, got {n_seeds}")
    return n_seeds


def base_config(profile: str, data_root: str | None = None) -> Config:
    return get_config(profile, data_root=data_root if profile == "full" else None)


def run_experiment(
    experiment: Experiment,
    profile: str,
    n_seeds: int | None = None,
    data_root: str | None = None,
    root: Path | None = None,
    progress: bool = True,
    stop_after_epoch: int | None = None,
) -> dict:
    """Train (or reuse / resume) every (variant, seed) of ``experiment``, then write its
    ``runs.csv``, ``comparison.csv`` and ``decision.json``. Returns them as a dict."""
    root = Path(root or artifacts.results_root(profile))
    n_seeds = n_seeds_for(profile, n_seeds)
    profile_cfg = base_config(profile, data_root)
    data_root_path, table_path = artifacts.ensure_prepared(profile_cfg, progress)
    write_data_summary(profile_cfg, table_path, root)
    base = check(replace(profile_cfg, **stage_overrides(profile, experiment.stage, root)))
    configs = resolve_variants(experiment, base)
    jobs = [(variant, seed, replace(cfg, seed=seed)) for seed in range(n_seeds) for variant, cfg in configs.items()]
    table_sha, known = sha256_file(table_path), find_runs(root)
    todo = [j for j in jobs if not is_finished(known.get(run_key(j[2], table_sha), root / "-"))]
    seconds, source = projected_seconds(root, profile, len(todo), base.epochs)
    print(
        f"{experiment.name}: {len(jobs)} runs ({len(configs)} variants × {n_seeds} seed{'s' * (n_seeds != 1)}), "
        f"{len(todo)} to train; "
        f"projected ≤ {seconds / 60:.1f} min ({len(todo)} × ≤ {base.epochs} epochs × {source})",
        flush=True,
    )
    rows, ranks = [], {}
    fields = changed_fields(configs)
    for variant, seed, cfg in progress_bar(jobs, desc=f"study {experiment.name}", disable=not progress):
        run_dir = root / experiment.name / f"{_slug(variant)}_seed{seed}_{run_key(cfg, table_sha)}"
        found, action = ensure_run(
            cfg, table_path, data_root_path, run_dir, root, progress=progress, stop_after_epoch=stop_after_epoch
        )
        if action == "interrupted":
            raise InputError(f"{found}: interrupted after epoch {stop_after_epoch}; run the study again to resume it")
        rows.append(
            {
                "experiment": experiment.name,
                "variant": variant,
                "seed": seed,
                **{k: getattr(cfg, k) for k in fields},
                "action": action,
                **run_row(found, root),
            }
        )
        ranks[(variant, seed)] = pd.read_csv(found / "val_ranks.csv")
    return write_experiment(experiment, profile, pd.DataFrame(rows), ranks, configs, root)


def statistics_record(planned: int, m: int, pending: int) -> dict:
    """How an experiment's comparisons were made, as decision.json records it."""
    return {
        "ci_percent": round(100 * (1 - ALPHA)),
        "n_boot": N_BOOT,
        "resampling": "seeds, then items with all their queries (one item draw for every drawn seed)",
        "study_entropy": statistics.STUDY_ENTROPY,
        "family": {
            "metric": PRIMARY,
            "method": "holm",
            "alpha": ALPHA,
            "power": statistics.POWER,
            "planned": planned,
            "m": m,
            "pending": pending,
        },
        "exploratory": [f"recall@{k}" for k in KS if k != PRIMARY_K],
    }


def _write_tables(out: Path, runs: pd.DataFrame, comparison: pd.DataFrame, decision: dict) -> None:
    write_text_atomic(out / "runs.csv", runs.to_csv(index=False, lineterminator="\n"))
    write_text_atomic(out / "comparison.csv", comparison.to_csv(index_label="variant", lineterminator="\n"))
    write_text_atomic(out / "decision.json", json.dumps(decision, indent=2, default=str) + "\n")


def write_experiment(
    experiment: Experiment, profile: str, runs: pd.DataFrame, ranks: dict, configs: dict, root: Path
) -> dict:
    """``runs.csv``, ``comparison.csv`` and ``decision.json`` of a finished experiment."""
    out = root / experiment.name
    out.mkdir(parents=True, exist_ok=True)
    others, pending = family_so_far(profile, root, experiment.name)
    comparison = compare(runs, ranks, experiment.name, others, pending)
    winner, why = decide(comparison)
    overrides = {k: getattr(configs[winner], k) for k in experiment.fields} if winner != "baseline" else {}
    seeds = sorted(runs.seed.unique().tolist())
    decision = {
        "experiment": experiment.name,
        "stage": experiment.stage,
        "question": experiment.question,
        "profile": profile,
        "protocol": "official",
        "split": "val",
        "seeds": seeds,
        "primary": PRIMARY,
        "rule": RULE,
        "winner": winner,
        "why": why,
        "winner_overrides": overrides,
        "baseline": {k: getattr(configs["baseline"], k) for k in changed_fields(configs)},
        **statistics_record(
            planned=sum(planned_tests(profile).values()), m=len(others) + len(comparison) - 1 + pending, pending=pending
        ),
    }
    _write_tables(out, runs.drop(columns="action"), comparison, decision)
    if all((root / e.name / "decision.json").is_file() for e in experiments(profile)):
        write_final_config(profile, root)
    return {"runs": runs, "comparison": comparison, "decision": decision}


def decided_fields(profile: str) -> list[str]:
    """The config fields the study decides (those its experiments vary)."""
    return sorted({f for e in experiments(profile) for f in e.fields})


def runs_summary(root: Path) -> dict:
    """Over the study's distinct runs (a run shared by several experiments counted once): how many
    had their best val Recall@5 at their last epoch (still rising: the budget may be short), how
    many stopped early, and the summed wall time."""
    runs = pd.concat([pd.read_csv(p) for p in sorted(Path(root).glob("*/runs.csv"))]).drop_duplicates("run_dir")
    runs = runs[runs.experiment != POSTPROCESS]
    at_last = int((runs.best_epoch == runs.epochs_run).sum())
    budget = [json.loads((Path(root) / d / "config.json").read_text())["config"]["epochs"] for d in runs.run_dir]
    return {
        "distinct_runs": len(runs),
        "best_at_last_epoch": at_last,
        "best_at_last_epoch_percent": round(100 * at_last / len(runs), 1),
        "stopped_early": int((runs.epochs_run.to_numpy() < np.array(budget)).sum()),
        "wall_hours": round(float(runs.wall_s.sum()) / 3600, 2),
    }


def write_final_config(profile: str, root: Path | None = None) -> dict:
    """``final_config.json``: every decided field's value after the last stage, by the rule
    (never typed by hand), the summary of the study's runs and the commit of the code that wrote
    it; ``04_demo`` tests the study's runs of it (``helpers.experiments.final``)."""
    root = Path(root or artifacts.results_root(profile))
    # The profile's own config (no data root needed: nothing is trained here) + every stage's winners.
    carried = check(replace(PROFILES[profile], **stage_overrides(profile, "03", root)))
    decisions = [json.loads((root / e.name / "decision.json").read_text()) for e in experiments(profile)]
    carried = replace(
        carried, **{k: v for d in decisions if d["stage"] == "03" for k, v in d["winner_overrides"].items()}
    )
    record = {
        "profile": profile,
        "config": {k: getattr(carried, k) for k in decided_fields(profile)},
        "rule": RULE,
        "baseline_recipe": {k: getattr(PROFILES[profile], k) for k in RECIPE_FIELDS},
        "runs": runs_summary(root),
        "code_commit": repro.git_commit(),
        "decisions": [{k: d[k] for k in ("experiment", "stage", "winner", "why")} for d in decisions],
    }
    path = root / "final_config.json"
    previous = json.loads(path.read_text()) if path.is_file() else {}

    # The same decisions from a later commit keep the stamp of the code that first wrote them.
    def decided(entry: dict) -> dict:
        return {k: v for k, v in json.loads(json.dumps(entry, default=str)).items() if k != "code_commit"}

    if previous.get("code_commit") and decided(previous) == decided(record):
        record["code_commit"] = previous["code_commit"]
    write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
    finalise_family(profile, root)
    noise = noise_table(profile, root)
    if noise is not None:
        write_text_atomic(root / NOISE, noise.to_csv(index=False, lineterminator="\n"))
    return record


def write_data_summary(cfg: Config, table_path: Path, root: Path) -> dict:
    """``data_summary.json`` beside the experiments, so the report needs nothing but results/."""
    summary = json.loads((Path(table_path).parent / "summary.json").read_text())
    source = (
        f"synthetic ({cfg.synthetic_items} items from helpers.data.synthetic, seed {cfg.synthetic_seed}), not DeepFashion"
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
    }
    root.mkdir(parents=True, exist_ok=True)
    write_text_atomic(root / "data_summary.json", json.dumps(record, indent=2) + "\n")
    return record


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


HISTORY_COLUMNS = ("loss", f"val_{PRIMARY}")


def experiment_history(root: Path, name: str) -> pd.DataFrame:
    """Every run's ``history.csv`` of experiment ``name``, tidy: one row per (variant, seed, epoch)
    with ``experiment``, ``variant``, ``seed``, ``epoch``, ``loss`` (NaN at epoch 0, the untrained
    model), ``val_recall@5`` and ``best`` (the epoch whose weights became the run's ``best.pt``).
    The runs are those its ``runs.csv`` lists, in that order, wherever they live (a shared baseline
    sits in the experiment that trained it first)."""
    runs_path = Path(root) / name / "runs.csv"
    if not runs_path.is_file():
        raise InputError(f"{runs_path}: missing; run `python -m helpers study {name}` first")
    frames = []
    for run in pd.read_csv(runs_path).itertuples(index=False):
        path = Path(root) / run.run_dir / "history.csv"
        if not path.is_file():
            raise InputError(f"{path}: missing; {runs_path} lists its run")
        history = pd.read_csv(path)
        missing = [c for c in ("epoch", *HISTORY_COLUMNS) if c not in history.columns]
        if missing:
            raise InputError(f"{path}: no column {', '.join(missing)}")
        frames.append(
            history[["epoch", *HISTORY_COLUMNS]].assign(
                experiment=name, variant=run.variant, seed=run.seed, best=history.epoch == run.best_epoch
            )
        )
    return pd.concat(frames, ignore_index=True)[["experiment", "variant", "seed", "epoch", *HISTORY_COLUMNS, "best"]]


def learned(result: dict) -> str:
    """A sentence on one experiment computed from its numbers, so it cannot contradict them."""
    comparison, decision = result["comparison"], result["decision"]
    reference = "baseline" if "baseline" in comparison.index else "none"  # post-processing compares to `none`
    parts = []
    # Tables written before the Holm correction hold raw intervals only.
    holm = f"p_holm_{PRIMARY}" in comparison.columns
    low, high = (f"low_adj_{PRIMARY}", f"high_adj_{PRIMARY}") if holm else (f"low_{PRIMARY}", f"high_{PRIMARY}")
    for variant, row in comparison.drop(index=reference).iterrows():
        parts.append(
            f"{variant}: {row[f'diff_{PRIMARY}']:+.3f} val R@5 [{row[low]:+.3f}, {row[high]:+.3f}"
            + (f"] Holm-adjusted, Holm p {row[f'p_holm_{PRIMARY}']:.4f}" if holm else "]")
            + f", {row[f'verdict_{PRIMARY}']}"
        )
    base = comparison.loc[reference]
    n = int(base.n_seeds)
    head = (
        f"{decision['experiment']} ({reference} val R@5 {base[f'val_{PRIMARY}_mean']:.3f}, {n} seed{'s' * (n != 1)}): "
    )
    return (
        head
        + ("; ".join(parts) if parts else "no variant differs from the baseline")
        + f". Adopted: {decision['winner']}."
    )


# --------------------------------------------------------------------------- what the notebooks call


def ensure_earlier_stages(
    profile: str,
    stage: str,
    n_seeds: int | None = None,
    data_root: str | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> list[str]:
    """Run every experiment of an earlier stage that has no decision yet (a notebook opened on
    its own still builds on its predecessors' winners); returns their names."""
    root = Path(root or artifacts.results_root(profile))
    missing = [
        e
        for e in experiments(profile)
        if STAGES.index(e.stage) < STAGES.index(stage) and not (root / e.name / "decision.json").is_file()
    ]
    for experiment in missing:
        run_experiment(experiment, profile, n_seeds, data_root, root, progress)
    return [e.name for e in missing]


def grid(profile: str, stage: str, root: Path | None = None) -> pd.DataFrame:
    """The stage's grid: one row per (experiment, variant) with the values it runs; the
    baseline rows show the stage baseline's values of the fields the experiment varies."""
    root = Path(root or artifacts.results_root(profile))
    base = check(replace(PROFILES[profile], **stage_overrides(profile, stage, root)))
    rows = []
    for experiment in (e for e in experiments(profile) if e.stage == stage):
        configs = resolve_variants(experiment, base)
        fields = changed_fields(configs)
        for variant, cfg in configs.items():
            rows.append(
                {
                    "experiment": experiment.name,
                    "variant": variant,
                    "runs with": ", ".join(f"{k}={getattr(cfg, k)}" for k in fields),
                }
            )
    return pd.DataFrame(rows)


def run_stage(
    profile: str,
    stage: str,
    n_seeds: int | None = None,
    data_root: str | None = None,
    root: Path | None = None,
    progress: bool = True,
) -> dict[str, dict]:
    """Every experiment of ``stage`` (finished runs reused, a half-finished one resumed)."""
    return {
        e.name: run_experiment(e, profile, n_seeds, data_root, root, progress)
        for e in experiments(profile)
        if e.stage == stage
    }


def carried(profile: str, stage: str, root: Path | None = None) -> dict:
    """What ``stage`` hands on: its stage baseline's overrides plus its own winners."""
    root = Path(root or artifacts.results_root(profile))
    overrides = stage_overrides(profile, stage, root)
    for experiment in (e for e in experiments(profile) if e.stage == stage):
        overrides.update(load_experiment(root, experiment.name)["decision"]["winner_overrides"])
    return overrides


# --------------------------------------------------------------------------- post-processing, no training

POSTPROCESS = "postprocess"
# Each method alone against `none` (plain cosine on the plain embeddings). αQE / DBA: k = 2
# neighbours because a C2S item has few shop photos in the gallery (a larger k adds other items),
# α = 3 as Radenović et al.; k-reciprocal: the paper's k1 = 20, k2 = 6, λ = 0.3.
POSTPROCESS_METHODS: dict[str, dict] = {
    "none": {},
    "flip_tta": {},
    "aqe": {"k": 2, "alpha": 3.0},
    "dba": {"k": 2, "alpha": 3.0},
    "k_reciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.3},
}
POSTPROCESS_QUESTION = "Does post-processing the final configuration's rankings (no training) help?"
POSTPROCESS_RULE = (
    "adopt a method only if its paired verdict on val Recall@5 against `none` is `better` (Holm-corrected "
    "over this experiment's Recall@5 tests: adjusted p below 0.05 and the whole Holm-adjusted bootstrap "
    "interval of the difference above 0); among several `better` methods the one with the largest mean "
    "difference; otherwise keep `none`"
)


def final_config(base: Config, root: Path) -> Config:
    """The final configuration: ``final_config.json``'s decided fields on ``base`` (the profile's
    config, :func:`base_config`)."""
    path = Path(root) / "final_config.json"
    if not path.is_file():
        raise InputError(
            f"{path}: missing; finish the study first (`python -m helpers study all --profile {base.profile}`)"
        )
    chosen = json.loads(path.read_text())["config"]
    return check(replace(base, **chosen))


def runs_of(cfg: Config, root: Path, table_path: Path) -> dict[int, Path]:
    """seed → finished run directory of ``cfg`` (any seed) among every run of the study, found by
    run key wherever an experiment put it."""
    table_sha = sha256_file(table_path)
    found = {}
    for key, run_dir in find_runs(root).items():
        seed = json.loads((run_dir / "study_run.json").read_text())["seed"]
        if is_finished(run_dir) and key == run_key(replace(cfg, seed=seed), table_sha):
            found[seed] = run_dir
    return dict(sorted(found.items()))


def final_runs(base: Config, root: Path, table_path: Path, need_checkpoints: bool = True) -> dict[int, Path]:
    """seed → finished run directory of the final configuration (:func:`runs_of`). Checkpoints
    are local, not committed: ``need_checkpoints`` makes a missing ``best.pt`` an error."""
    found = runs_of(final_config(base, root), root, table_path)
    if not found:
        raise InputError(f"{root / 'final_config.json'}: no finished run of this configuration under {root}")
    missing = [str(run_dir / "best.pt") for run_dir in found.values() if not (run_dir / "best.pt").is_file()]
    if missing and need_checkpoints:
        raise InputError(f"{missing[0]}: missing (checkpoints are local, not committed); rerun its experiment here")
    return found


def postprocess_scores(method: str, plain: tuple, flipped: tuple) -> np.ndarray:
    """``[Q, G]`` scores of ``method`` from the plain and the flip-TTA ``(query, gallery)`` embeddings."""
    parameters = POSTPROCESS_METHODS[method]
    if method == "flip_tta":
        return postprocess.cosine_scores(*flipped)
    scorer = {
        "none": postprocess.cosine_scores,
        "aqe": postprocess.alpha_query_expansion,
        "dba": postprocess.database_augmentation,
        "k_reciprocal": postprocess.k_reciprocal_scores,
    }[method]
    return scorer(*plain, **parameters)


def postprocess_ranks(run_dir: Path, table: pd.DataFrame, data_root: Path, progress: bool = False) -> dict:
    """method → ``(val_ranks.csv``-like frame, seconds of post-processing)`` for one run: val
    embedded once plainly and once with flip TTA, every method ranked from them."""
    queries, gallery, *plain = val_embeddings(run_dir, table, data_root, flip_tta=False, progress=progress)
    flipped = val_embeddings(run_dir, table, data_root, flip_tta=True, progress=progress)[2:]
    out = {}
    for method in POSTPROCESS_METHODS:
        started = time.perf_counter()
        scores = postprocess_scores(method, tuple(plain), tuple(flipped))
        kept, first_hit, average_precision = postprocess.ranking(scores, queries.item_id, gallery.item_id)
        ranks = pd.DataFrame(
            {
                "path": queries.path.to_numpy()[kept],
                "item_id": queries.item_id.to_numpy()[kept],
                "first_hit_rank": first_hit,
                "average_precision": average_precision,
            }
        ).sort_values("path", kind="stable")
        out[method] = (ranks.reset_index(drop=True), time.perf_counter() - started)
    return out


def run_postprocess(profile: str, root: Path | None = None, progress: bool = True) -> dict:
    """Every post-processing method on every seed's run of the final configuration, each against
    ``none`` with the study's paired statistics (Holm over this experiment's own tests: they do
    not change training, so they are not in the study's family), adopted by :data:`POSTPROCESS_RULE`
    (:data:`RULE` with `none` as the baseline).
    Writes ``postprocess/{runs.csv, comparison.csv, decision.json}``; returns them as a dict."""
    root = Path(root or artifacts.results_root(profile))
    data_root, table_path = artifacts.ensure_prepared(base_config(profile), progress)
    table = read_table(table_path)
    runs, ranks = [], {}
    for seed, run_dir in progress_bar(
        final_runs(base_config(profile), root, table_path).items(), desc="post-processing", disable=not progress
    ):
        result = json.loads((run_dir / "metrics.json").read_text())
        for method, (frame, seconds) in postprocess_ranks(run_dir, table, data_root, progress).items():
            # the statistics name the reference "baseline"; the files call it `none`
            ranks[("baseline" if method == "none" else method, seed)] = frame
            runs.append(
                {
                    "experiment": POSTPROCESS,
                    "variant": method,
                    "seed": seed,
                    "parameters": json.dumps(POSTPROCESS_METHODS[method], sort_keys=True),
                    "run_dir": str(run_dir.relative_to(root)),
                    "best_epoch": int(result["best_epoch"]),
                    **{f"val_{m}": v for m, v in metrics_from_ranks(frame).items()},
                    "postprocess_s": round(seconds, 3),
                }
            )
    runs = pd.DataFrame(runs)
    comparison = compare(runs.replace({"variant": {"none": "baseline"}}), ranks, POSTPROCESS)
    comparison = comparison.rename(index={"baseline": "none"})
    winner, why = decide(comparison)
    decision = {
        "experiment": POSTPROCESS,
        "question": POSTPROCESS_QUESTION,
        "profile": profile,
        "protocol": "official",
        "split": "val",
        "seeds": sorted(runs.seed.unique().tolist()),
        "primary": PRIMARY,
        "rule": POSTPROCESS_RULE,
        "winner": "none" if winner == "baseline" else winner,
        "why": why.replace("the baseline is kept", "`none` is kept"),
        "winner_parameters": POSTPROCESS_METHODS["none" if winner == "baseline" else winner],
        "final_config": json.loads((root / "final_config.json").read_text())["config"],
        **statistics_record(planned=len(POSTPROCESS_METHODS) - 1, m=len(comparison) - 1, pending=0),
    }
    out = root / POSTPROCESS
    out.mkdir(parents=True, exist_ok=True)
    _write_tables(out, runs, comparison, decision)
    return {"runs": runs, "comparison": comparison, "decision": decision}
