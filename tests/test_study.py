"""helpers.experiments.study: the statistics against hand-computed cases, the grid and the carried
configuration, and the runner's reuse / skip / resume logic on real fixture runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from helpers.apps.cli import main
from helpers.core import config
from helpers.core.errors import InputError
from helpers.experiments import artifacts, statistics, study

# --------------------------------------------------------------------------- statistics


def _runs(values: dict[str, list[float]]) -> pd.DataFrame:
    """runs.csv-like rows: one per (variant, seed), ``val_recall@5`` from ``values``."""
    rows = [{"variant": v, "seed": s, "val_recall@5": x} for v, xs in values.items() for s, x in enumerate(xs)]
    return pd.DataFrame(rows)


def test_seed_summary_mean_and_sample_std():
    summary = study.seed_summary(_runs({"baseline": [0.5, 0.7], "one_seed": [0.4]}), columns=("val_recall@5",))
    assert summary.loc["baseline", "n_seeds"] == 2
    assert summary.loc["baseline", "val_recall@5_mean"] == pytest.approx(0.6)
    # sample std (ddof 1): sqrt(((0.5-0.6)^2 + (0.7-0.6)^2) / 1) = sqrt(0.02)
    assert summary.loc["baseline", "val_recall@5_std"] == pytest.approx(math.sqrt(0.02))
    assert math.isnan(summary.loc["one_seed", "val_recall@5_std"])
    assert list(summary.index) == ["baseline", "one_seed"]


def _ranks(ranks: list[int], items: list[str] | None = None) -> pd.DataFrame:
    """val_ranks.csv rows; by default every query its own item."""
    return pd.DataFrame(
        {
            "path": [f"q{i:03d}.jpg" for i in range(len(ranks))],
            "item_id": items or [f"id_{i}" for i in range(len(ranks))],
            "first_hit_rank": ranks,
            "average_precision": 0.5,
        }
    )


def _runs_of(ranks: dict) -> pd.DataFrame:
    """runs.csv rows whose val metrics are those of the given per-query ranks."""
    return pd.DataFrame(
        [
            {"variant": v, "seed": s, **{f"val_{m}": x for m, x in study.metrics_from_ranks(r).items()}}
            for (v, s), r in ranks.items()
        ]
    )


def test_compare_by_hand():
    items = ["a", "a", "b", "c"]
    ranks = {
        ("baseline", 0): _ranks([0, 3, 7, 12], items),
        ("baseline", 1): _ranks([0, 0, 7, 12], items),
        ("wide", 0): _ranks([0, 0, 0, 12], items),
        ("wide", 1): _ranks([1, 0, 3, 4], items),
    }
    runs = _runs_of(ranks)
    table = study.compare(runs, ranks, "exp", n_boot=300)
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
    assert list(table.loc["wide", ["role_recall@1", "role_recall@5", "role_recall@10"]]) == [
        "exploratory",
        "primary",
        "exploratory",
    ]
    # alone in its family (m = 1), Holm changes nothing: its level is alpha, its p the raw p
    wide = table.loc["wide"]
    assert (wide["holm_m_recall@5"], wide["holm_rank_recall@5"], wide["alpha_step_recall@5"]) == (1, 1, 0.05)
    assert wide["p_holm_recall@5"] == wide["p_recall@5"] and wide["low_adj_recall@5"] == wide["low_recall@5"]
    assert wide["mde_recall@5"] == pytest.approx(statistics.mde(wide["se_recall@5"]))
    assert "p_holm_recall@1" not in table.columns  # exploratory metrics have no correction


def test_compare_draws_items_from_the_comparisons_own_stream():
    rng = np.random.default_rng(0)
    items = [f"id_{i}" for i in rng.integers(0, 15, 40)]
    ranks = {(v, s): _ranks(list(rng.integers(0, 9, 40)), items) for v in ("baseline", "v") for s in (0, 1)}
    runs = _runs_of(ranks)
    table = study.compare(runs, ranks, "exp")
    grids = [study.hit_grid({s: ranks[(v, s)] for s in (0, 1)}, (0, 1), 5) for v in ("baseline", "v")]
    expected = statistics.paired_bootstrap(*grids, items, statistics.stream("exp", "v", "recall@5"))
    assert table.loc["v", "p_recall@5"] == expected.p_value and table.loc["v", "se_recall@5"] == expected.se
    assert table.loc["v", "spawn_key_recall@5"] == statistics.spawn_key("exp", "v", "recall@5")
    pd.testing.assert_frame_equal(study.compare(runs, ranks, "exp"), table)  # a rerun gives the same numbers
    # another experiment's comparison of the same runs draws another stream
    assert study.compare(runs, ranks, "other").loc["v", "p_recall@5"] != table.loc["v", "p_recall@5"]


def test_compare_refuses_runs_on_different_queries():
    ranks = {("baseline", 0): _ranks([0, 1]), ("v", 0): _ranks([0, 1, 2])}
    with pytest.raises(InputError, match="different queries"):
        study.compare(_runs_of(ranks), ranks, "exp")
    ranks = {("baseline", 0): _ranks([0, 1], ["a", "b"]), ("v", 0): _ranks([0, 1], ["a", "a"])}
    with pytest.raises(InputError, match="different queries"):
        study.compare(_runs_of(ranks), ranks, "exp")


def test_raw_significant_but_not_after_holm_is_within_noise():
    # One seed, 100 single-query items, 20 gained hits and 7 lost: +0.13 with SE ≈ 0.05, raw p ≈ 0.01.
    base = [9] * 20 + [0] * 7 + [9] * 73
    variant = [0] * 20 + [9] * 7 + [9] * 73
    ranks = {("baseline", 0): _ranks(base), ("v", 0): _ranks(variant)}
    runs = _runs_of(ranks)
    alone = study.compare(runs, ranks, "exp")
    assert alone.loc["v", "low_recall@5"] > 0 and alone.loc["v", "verdict_recall@5"] == "better"
    among = study.compare(runs, ranks, "exp", pending=18)  # one of 19 tests, the others not run yet
    row = among.loc["v"]
    assert row["low_recall@5"] > 0 and row["p_recall@5"] < 0.05  # the raw interval excludes 0
    assert row["holm_m_recall@5"] == 19 and row["alpha_step_recall@5"] == pytest.approx(0.05 / 19)
    assert row["low_adj_recall@5"] < 0 < row["high_adj_recall@5"] and row["p_holm_recall@5"] > 0.05
    assert row["verdict_recall@5"] == "within noise" and study.decide(among)[0] == "baseline"
    assert row["mde_recall@5"] > alone.loc["v", "mde_recall@5"]  # a stricter level needs a larger effect
    # the other experiments' finished tests take part in the ranking
    ranked = study.compare(runs, ranks, "exp", others=[1e-4, 0.5], pending=2).loc["v"]
    assert (ranked["holm_m_recall@5"], ranked["holm_rank_recall@5"]) == (5, 2)


def test_metrics_from_ranks():
    out = study.metrics_from_ranks(_ranks([0, 4, 9, 25]))
    assert (out["recall@1"], out["recall@5"], out["recall@10"], out["recall@20"]) == (0.25, 0.5, 0.75, 0.75)
    assert out["map"] == 0.5 and out["n_queries"] == 4


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
    winner, why = study.decide(table)
    assert winner == "b" and "[+0.070, +0.090]" in why  # the larger `better` difference; c's larger one is noise
    table = _comparison({"baseline": (math.nan, "baseline"), "c": (0.2, "within noise"), "d": (-0.1, "worse")})
    winner, why = study.decide(table)
    assert winner == "baseline" and "kept" in why


# --------------------------------------------------------------------------- the family of Recall@5 tests


def _write_study(root, names=None):
    """Every (or the named) fixture experiment finished by write_experiment on made-up val ranks,
    each a run folder with its val_ranks.csv; the variants of crop, head and loss clearly better."""
    rng = np.random.default_rng(11)
    items = [f"id_{i:02d}" for i in np.repeat(np.arange(30), rng.integers(1, 4, 30))]
    baseline = {s: list(rng.integers(0, 12, len(items))) for s in (0, 1)}
    base = config.get_config("fixture")
    results = {}
    for experiment in study.experiments("fixture"):
        if names is not None and experiment.name not in names:
            continue
        configs = study.resolve_variants(experiment, base)
        rows, ranks = [], {}
        for variant in configs:
            for seed in (0, 1):
                better = variant != "baseline" and experiment.name in ("crop", "head", "loss")
                values = [0] * len(items) if better else baseline[seed] if variant == "baseline" else None
                values = values if values is not None else list(rng.integers(0, 12, len(items)))
                run_dir = f"{experiment.name}/{study._slug(variant)}_seed{seed}"
                (root / run_dir).mkdir(parents=True, exist_ok=True)
                frame = _ranks(values, items)
                frame.to_csv(root / run_dir / "val_ranks.csv", index=False)
                ranks[(variant, seed)] = frame
                metrics = {f"val_{m}": x for m, x in study.metrics_from_ranks(frame).items()}
                # the learning curves the report draws: the untrained epoch 0, then the best epoch
                history = {
                    "epoch": [0, 1],
                    "loss": [float("nan"), 0.5],
                    "val_recall@5": [0.25, metrics["val_recall@5"]],
                }
                pd.DataFrame(history).to_csv(root / run_dir / "history.csv", index=False)
                (root / run_dir / "config.json").write_text(json.dumps({"config": {"epochs": 2}}))
                rows.append(
                    {
                        "experiment": experiment.name,
                        "variant": variant,
                        "seed": seed,
                        "action": "trained",
                        "run_dir": run_dir,
                        "best_epoch": 1,
                        "epochs_run": 1,  # of 2: every run stopped early, at its best epoch
                        "wall_s": 90.0,
                        **metrics,
                    }
                )
        results[experiment.name] = study.write_experiment(
            experiment, "fixture", pd.DataFrame(rows), ranks, configs, root
        )
    return results


def test_family_interim_then_final(tmp_path):
    results = _write_study(tmp_path)
    planned = sum(study.planned_tests("fixture").values())
    first = results["crop"]["decision"]["family"]
    # crop decided first: its own test, every other planned test counted as p = 1
    assert (first["m"], first["pending"], first["planned"]) == (planned, planned - 1, planned)
    assert results["backbone"]["decision"]["family"]["pending"] == 0
    # the fixture drops a variant equal to its baseline in several experiments: the final family is smaller
    tables = {name: study.load_experiment(tmp_path, name)["comparison"] for name in results}
    rows = pd.concat([t.drop(index="baseline").assign(experiment=n) for n, t in tables.items()])
    assert len(rows) == 10 < planned and (rows["holm_m_final_recall@5"] == 10).all()
    # final Holm over every finished test, as statsmodels computes it
    assert rows["p_holm_final_recall@5"].to_numpy() == pytest.approx(
        multipletests(rows["p_recall@5"].to_numpy(), method="holm")[1]
    )
    # decisions taken early stay valid: the final values are never stricter than the decision's
    assert (rows["p_holm_final_recall@5"] <= rows["p_holm_recall@5"] + 1e-12).all()
    assert (rows["alpha_step_final_recall@5"] >= rows["alpha_step_recall@5"] - 1e-15).all()
    early = rows[rows["verdict_recall@5"] == "better"]
    assert set(early.experiment) == {"crop", "head", "loss"} and (early["verdict_final_recall@5"] == "better").all()
    for name, result in results.items():
        assert result["decision"]["winner"] == study.decide(tables[name])[0]  # the decision-time verdicts stay
    assert tables["crop"].loc["baseline", "verdict_final_recall@5"] == "baseline"
    # the integers come back as integers, the stream keys to the last digit
    assert tables["crop"].loc["crop=False", "spawn_key_recall@5"] == statistics.spawn_key(
        "crop", "crop=False", "recall@5"
    )
    # a second pass recomputes the same replicates and rewrites nothing
    stamps = {n: (tmp_path / n / "comparison.csv").stat().st_mtime_ns for n in results}
    assert study.finalise_family("fixture", tmp_path) is not None
    assert {n: (tmp_path / n / "comparison.csv").stat().st_mtime_ns for n in results} == stamps


def test_final_family_waits_for_every_experiment(tmp_path):
    _write_study(tmp_path, names={"crop", "resize"})
    assert study.finalise_family("fixture", tmp_path) is None
    table = study.load_experiment(tmp_path, "resize")["comparison"]
    assert "p_holm_final_recall@5" not in table.columns
    # resize decided after crop: crop's finished test in its family, the rest pending
    decision = study.load_experiment(tmp_path, "resize")["decision"]
    assert decision["family"]["pending"] == sum(study.planned_tests("fixture").values()) - 2
    assert table.loc["resize=squash", "holm_m_recall@5"] == decision["family"]["m"]


def test_report_shows_the_holm_columns(tmp_path):
    from helpers.experiments import report

    _write_study(tmp_path)
    summary = {"profile": "fixture", "data_source": "synthetic, not DeepFashion", "table_sha256": "ab12cd34ef56"}
    splits = {"val": {"items": 30, "consumer_images": 60, "shop_images": 30, "pairs": 60}}
    (tmp_path / "data_summary.json").write_text(json.dumps({**summary, "splits": splits}))
    before = {p: p.read_bytes() for p in tmp_path.rglob("comparison.csv")}
    report.build(tmp_path, tmp_path / "report")
    assert {p: p.read_bytes() for p in tmp_path.rglob("comparison.csv")} == before  # the report only reads
    study.finalise_family("fixture", tmp_path)  # what the study does when its last experiment finishes
    report.build(tmp_path, tmp_path / "report")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "ΔR@5 [Holm CI] | p / Holm p | MDE R@5 | Holm p, whole family" in text
    assert "ΔR@1 [95 % CI, exploratory]" in text and "Holm-corrected at decision time over 17 Recall@5 tests" in text
    crop = study.load_experiment(tmp_path, "crop")["comparison"].loc["crop=False"]
    assert f"{crop['p_recall@5']:.4f} / {crop['p_holm_recall@5']:.4f}" in text
    assert f"[{crop['low_adj_recall@5']:+.3f}, {crop['high_adj_recall@5']:+.3f}] better" in text
    assert report.untraceable_numbers(text, tmp_path) == []


def test_noise_table_splits_seed_and_query_noise(tmp_path):
    """noise.csv's two columns for crop=False, recomputed here: the sample SD of the two per-seed
    Recall@5 differences, and an item bootstrap per seed written as a loop; the report's paragraph
    states which of the two is smaller."""
    from helpers.experiments import report

    assert study.noise_table("fixture", tmp_path) is None  # nothing finished
    _write_study(tmp_path)
    noise = study.noise_table("fixture", tmp_path).set_index("variant")
    assert len(noise) == 10  # every finished comparison (2 seeds each)
    runs = pd.read_csv(tmp_path / "crop" / "runs.csv")
    frames = {(r.variant, r.seed): pd.read_csv(tmp_path / r.run_dir / "val_ranks.csv") for r in runs.itertuples()}
    items = frames[("baseline", 0)].item_id.tolist()
    diffs = [
        (frames[("crop=False", s)].first_hit_rank < 5).to_numpy(float)
        - (frames[("baseline", s)].first_hit_rank < 5).to_numpy(float)
        for s in (0, 1)
    ]
    row = noise.loc["crop=False"]
    assert (row.n_seeds, row.n_items, row.n_queries) == (2, len(set(items)), len(items))
    assert row["seed_sd_recall@5"] == pytest.approx(abs(diffs[0].mean() - diffs[1].mean()) / math.sqrt(2))
    rng, labels = np.random.default_rng(4), sorted(set(items))
    variances = []
    for diff in diffs:
        means = []
        for _ in range(3_000):
            drawn = [labels[int(rng.integers(len(labels)))] for _ in labels]
            cells = [d for item in drawn for d, own in zip(diff, items) if own == item]
            means.append(sum(cells) / len(cells))
        variances.append(np.var(means, ddof=1))
    assert row["query_sd_recall@5"] == pytest.approx(math.sqrt(np.mean(variances)), rel=0.06)
    noise.reset_index().to_csv(tmp_path / study.NOISE, index=False)
    text = " ".join(report.noise_lines(tmp_path))
    below = int((noise["query_sd_recall@5"] < noise["seed_sd_recall@5"]).sum())
    assert f"The query noise is below the seed noise in {below} of the 10 comparisons" in text
    assert report.untraceable_numbers(text, tmp_path) == []


# --------------------------------------------------------------------------- the grid


@pytest.mark.parametrize("profile", ["fixture", "demo", "full"])
def test_experiments_of_a_stage_change_disjoint_fields(profile):
    for stage in study.STAGES:
        fields = [e.fields for e in study.experiments(profile) if e.stage == stage]
        assert sum(len(f) for f in fields) == len(set().union(*fields)), stage
    names = [e.name for e in study.experiments(profile)]
    assert len(names) == len(set(names)) == 10


def test_every_variant_is_a_valid_config():
    for profile in ("fixture", "demo"):
        base = config.get_config(profile)
        for experiment in study.experiments(profile):
            study.resolve_variants(experiment, base)  # check() raises on a bad value


def test_variant_equal_to_the_baseline_is_dropped():
    experiment = study.get_experiment("demo", "augment")
    base = config.get_config("demo")
    assert base.augment == "flip"  # the default recipe's: the preset asked about is a variant
    assert list(study.resolve_variants(experiment, base)) == ["baseline", "augment=medium"]
    medium = replace(base, augment="medium")
    assert list(study.resolve_variants(experiment, medium)) == ["baseline"]
    ladder = study.get_experiment("fixture", "augment")  # weak (the fixture's own) and strong
    configs = study.resolve_variants(ladder, config.get_config("fixture"))
    assert list(configs) == ["baseline", "augment=strong"]
    assert study.changed_fields(configs) == ["augment"]


def test_demo_budget_and_backbones():
    """The demo study as stated in helpers.experiments.study: 3 seeds, the resolution bracketing
    the default recipe's from both sides, and backbones with packaged weights."""
    from helpers.modeling import models

    assert study.STUDY_SEEDS["demo"] >= 3
    sides = [o["img_size"] for o in study.get_experiment("demo", "resolution").variants.values()]
    assert min(sides) < config.PROFILES["demo"].img_size < max(sides)
    backbones = study.get_experiment("demo", "backbone").variants
    for overrides in backbones.values():
        assert overrides["backbone"] in models.PACKAGED_WEIGHTS and overrides["weights"] == "packaged"
    full = study.get_experiment("full", "backbone").variants
    assert {o["backbone"] for o in full.values()} == {"resnet34", "efficientnet_b3"}
    assert all(o["img_size"] is None for o in full.values())  # native resolution


def test_run_key():
    cfg = config.get_config("fixture")
    key = study.run_key(cfg, "sha")
    assert study.run_key(replace(cfg, num_workers=3, device="cpu"), "sha") == key  # runtime fields
    assert study.run_key(replace(cfg, seed=1), "sha") != key
    assert study.run_key(replace(cfg, crop=False), "sha") != key
    assert study.run_key(cfg, "other table") != key


def test_later_stages_need_the_earlier_decisions(tmp_path):
    with pytest.raises(InputError, match="run `python -m helpers study crop"):
        study.stage_overrides("fixture", "02_2", tmp_path)
    assert study.stage_overrides("fixture", "02_1", tmp_path) == {}
    winners = {"crop": {}, "resize": {"resize": "squash"}, "resolution": {"img_size": 48}}
    for name, overrides in winners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "decision.json").write_text(json.dumps({"winner_overrides": overrides}))
    assert study.stage_overrides("fixture", "02_2", tmp_path) == {"resize": "squash", "img_size": 48}
    with pytest.raises(InputError, match="run `python -m helpers study augment"):
        study.stage_overrides("fixture", "03", tmp_path)


def test_final_config_by_the_rule(tmp_path, monkeypatch):
    winners = {"resize": {"resize": "squash"}, "head": {"head": "bnneck"}, "loss": {"loss": "infonce"}}
    for experiment in study.experiments("fixture"):
        (tmp_path / experiment.name).mkdir()
        decision = {
            "experiment": experiment.name,
            "stage": experiment.stage,
            "winner": "w",
            "why": "because",
            "winner_overrides": winners.get(experiment.name, {}),
        }
        (tmp_path / experiment.name / "decision.json").write_text(json.dumps(decision))
        # one run each, the first also listed by the second experiment (a shared baseline: counted once)
        runs = [{"experiment": experiment.name, "run_dir": f"{experiment.name}/r", "best_epoch": 3, "epochs_run": 3}]
        if experiment.name == "resize":
            runs.append({"experiment": "resize", "run_dir": "crop/r", "best_epoch": 2, "epochs_run": 5})
        (tmp_path / experiment.name / "r").mkdir()
        (tmp_path / experiment.name / "r" / "config.json").write_text(json.dumps({"config": {"epochs": 5}}))
        pd.DataFrame(runs).assign(wall_s=360.0).to_csv(tmp_path / experiment.name / "runs.csv", index=False)
    record = study.write_final_config("fixture", tmp_path)
    assert json.loads((tmp_path / "final_config.json").read_text()) == record
    # 10 distinct runs of 3 epochs (best at the last, none at the budget of 5), 1 h summed
    assert record["runs"] == {
        "distinct_runs": 10,
        "best_at_last_epoch": 10,
        "best_at_last_epoch_percent": 100.0,
        "stopped_early": 10,
        "wall_hours": 1.0,
    }
    assert record["config"]["resize"] == "squash" and record["config"]["loss"] == "infonce"
    assert record["config"]["head"] == "bnneck" and record["config"]["augment"] == "weak"  # fixture's own
    assert set(record["config"]) == set(study.decided_fields("fixture"))
    # the same decisions written again by a later commit keep the first stamp; new decisions take the new one
    from helpers.core import repro

    first = record["code_commit"]
    monkeypatch.setattr(repro, "git_commit", lambda: "later")
    assert study.write_final_config("fixture", tmp_path)["code_commit"] == first
    (tmp_path / "loss" / "decision.json").write_text(
        json.dumps({"experiment": "loss", "stage": "03", "winner": "baseline", "why": "b", "winner_overrides": {}})
    )
    assert study.write_final_config("fixture", tmp_path)["code_commit"] == "later"


# --------------------------------------------------------------------------- the runner, on real fixture runs


@pytest.fixture(scope="module")
def prepared():
    cfg = config.get_config("fixture")
    return artifacts.ensure_prepared(cfg, progress=False)


def test_ensure_run_resumes_then_reuses(tmp_path, prepared):
    data_root, table = prepared
    cfg = config.get_config("fixture", epochs=2)
    first = tmp_path / "exp_a" / "run"
    found, action = study.ensure_run(cfg, table, data_root, first, tmp_path, progress=False, stop_after_epoch=1)
    assert (found, action) == (first, "interrupted")
    assert (first / "last.pt").is_file() and not study.is_finished(first)

    # Asked for again under another experiment: the half-finished run is found by its key and resumed in place.
    found, action = study.ensure_run(cfg, table, data_root, tmp_path / "exp_b" / "run", tmp_path, progress=False)
    assert (found, action) == (first, "resumed")
    assert not (tmp_path / "exp_b").exists()
    assert study.is_finished(first) and not (first / "last.pt").exists() and (first / "best.pt").is_file()
    history = pd.read_csv(first / "history.csv")
    assert list(history.epoch) == [0, 1, 2]
    # The val ranks reproduce the val numbers the run selected its best epoch on.
    row = study.run_row(first, tmp_path)
    best = history.loc[history.epoch == row["best_epoch"]].iloc[0]
    for k in (1, 5, 10):
        assert row[f"val_recall@{k}"] == pytest.approx(best[f"val_recall@{k}"])
    assert row["run_dir"] == "exp_a/run" and row["wall_s"] > 0 and row["images_per_s"] > 0

    # Finished: reused, nothing retrained (the history file is untouched).
    stamp = (first / "history.csv").stat().st_mtime_ns
    found, action = study.ensure_run(cfg, table, data_root, tmp_path / "exp_c" / "run", tmp_path, progress=False)
    assert (found, action) == (first, "reused") and (first / "history.csv").stat().st_mtime_ns == stamp


def test_experiments_share_their_baseline_and_write_runs_csv(tmp_path, prepared, capsys):
    crop = study.run_experiment(
        study.get_experiment("fixture", "crop"), "fixture", n_seeds=1, root=tmp_path, progress=False
    )
    assert "projected" in capsys.readouterr().out
    runs = pd.read_csv(tmp_path / "crop" / "runs.csv")
    assert list(runs.variant) == ["baseline", "crop=False"] and list(runs.crop) == [True, False]
    for column in (
        "seed",
        "run_dir",
        "best_epoch",
        "val_recall@1",
        "val_recall@5",
        "val_recall@10",
        "wall_s",
        "images_per_s",
    ):
        assert column in runs.columns
    assert json.loads((tmp_path / "crop" / "decision.json").read_text())["winner"] in ("baseline", "crop=False")
    assert (tmp_path / "data_summary.json").is_file()
    assert crop["comparison"].loc["crop=False", "verdict_recall@5"] in ("better", "worse", "within noise")

    resize = study.run_experiment(
        study.get_experiment("fixture", "resize"), "fixture", n_seeds=1, root=tmp_path, progress=False
    )
    baseline = resize["runs"].set_index("variant").loc["baseline"]
    assert baseline.action == "reused" and baseline.run_dir.startswith("crop/")  # trained once, by crop
    assert not any(p.name.startswith("baseline") for p in (tmp_path / "resize").iterdir())
    again = study.run_experiment(
        study.get_experiment("fixture", "resize"), "fixture", n_seeds=1, root=tmp_path, progress=False
    )
    assert set(again["runs"].action) == {"reused"}  # finished runs are skipped
    pd.testing.assert_frame_equal(again["comparison"], resize["comparison"])


def test_cli_errors_are_one_line(capsys):
    assert main(["study", "nope", "--profile", "fixture"]) == 2
    assert main(["study", "crop", "--profile", "fixture", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "unknown experiment 'nope'" in err[0] and "--seeds must be at least 1" in err[1]


def test_demo_backbones_load_their_packaged_weights():
    """The demo backbone experiment runs offline: each backbone's ImageNet weights come from its package."""
    from helpers.modeling import models

    for overrides in study.get_experiment("demo", "backbone").variants.values():
        embedder = models.create_embedder(overrides["backbone"], 8, weights=overrides["weights"], img_size=64)
        assert embedder.config["weights_source"] == "packaged"


def test_crop_false_feeds_the_whole_photo():
    """The `crop` experiment's field: crop=False ignores the box (and its margin) everywhere."""
    import torch
    from PIL import Image

    from helpers.data import transforms

    image = Image.new("RGB", (40, 20), (255, 0, 0))
    image.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    box = (0, 0, 20, 20)  # the red half
    data_config = {"input_size": [3, 16, 16], "mean": [0.0] * 3, "std": [1.0] * 3, "interpolation": "bilinear"}
    cropped = transforms.create_transform(config.get_config("fixture"), data_config)(image, box)
    whole = transforms.create_transform(config.get_config("fixture", crop=False, box_margin=0.2), data_config)
    assert torch.allclose(cropped[:, 8, 8], torch.tensor([1.0, 0.0, 0.0]))  # the crop is all red
    assert torch.equal(whole(image, box), whole(image, None))  # the box is ignored
    assert whole(image, box)[2].max() == 1.0  # the blue half is in the picture
