"""helpers.experiments.study: the statistics against hand-computed cases, the grid and the carried
configuration, and the runner's reuse / skip / resume logic on real fixture runs."""

from __future__ import annotations

import json
import math
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from helpers.apps.cli import main
from helpers.core import config
from helpers.core.errors import InputError
from helpers.experiments import artifacts, study

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


def test_paired_difference_point_estimate_by_hand():
    base = np.array([[1, 0, 0, 1], [0, 0, 1, 1]])
    variant = np.array([[1, 1, 0, 1], [1, 0, 1, 1]])
    diff, low, high = study.paired_bootstrap(base, variant, n_boot=200)
    assert diff == pytest.approx(2 / 8)  # two more hits among 8 (seed, query) pairs
    assert low <= diff <= high


@pytest.mark.parametrize("delta, expected", [(1, "better"), (-1, "worse"), (0, "within noise")])
def test_constant_differences_have_degenerate_intervals(delta, expected):
    base = np.zeros((2, 5))
    variant = base + delta
    diff, low, high = study.paired_bootstrap(base, variant, n_boot=100)
    assert (diff, low, high) == (delta, delta, delta)
    assert study.verdict(low, high) == expected


def test_bootstrap_resamples_queries():
    # One seed, two queries, differences 1 and 0: a resample of the two queries holds
    # {1,1}, {1,0}/{0,1}, {0,0} with probabilities 1/4, 1/2, 1/4 → means 1, 0.5, 0.
    diff, low, high = study.paired_bootstrap(np.zeros((1, 2)), np.array([[1.0, 0.0]]), n_boot=4000, seed=1)
    assert (diff, low, high) == (0.5, 0.0, 1.0)


def test_bootstrap_resamples_seeds():
    # Two seeds, one query: only resampling seeds gives any spread (queries alone would give [0.5, 0.5]).
    diff, low, high = study.paired_bootstrap(np.zeros((2, 1)), np.array([[1.0], [0.0]]), n_boot=4000, seed=1)
    assert (diff, low, high) == (0.5, 0.0, 1.0)
    assert study.verdict(low, high) == "within noise"


def test_bootstrap_replicate_distribution_matches_hand_computation():
    # The share of replicates with mean 0.5 in the two-query case is 1/2 (see above).
    rng_means = []
    for seed in range(400):
        _, low, high = study.paired_bootstrap(np.zeros((1, 2)), np.array([[1.0, 0.0]]), n_boot=1, seed=seed)
        rng_means.append(low)
    assert np.mean(np.isclose(rng_means, 0.5)) == pytest.approx(0.5, abs=0.08)


def test_bootstrap_is_seeded_and_checks_shapes():
    rng = np.random.default_rng(0)
    base, variant = rng.integers(0, 2, (3, 50)), rng.integers(0, 2, (3, 50))
    assert study.paired_bootstrap(base, variant, seed=3) == study.paired_bootstrap(base, variant, seed=3)
    with pytest.raises(InputError, match="shape"):
        study.paired_bootstrap(np.zeros((2, 3)), np.zeros((2, 4)))


@pytest.mark.parametrize(
    "low, high, expected",
    [(0.01, 0.2, "better"), (-0.2, -0.01, "worse"), (0.0, 0.2, "within noise"), (-0.1, 0.1, "within noise")],
)
def test_verdict(low, high, expected):
    assert study.verdict(low, high) == expected


def _ranks(ranks: list[int]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "path": [f"q{i}.jpg" for i in range(len(ranks))],
            "item_id": "x",
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
    ranks = {
        ("baseline", 0): _ranks([0, 3, 7, 12]),
        ("baseline", 1): _ranks([0, 0, 7, 12]),
        ("wide", 0): _ranks([0, 0, 0, 12]),
        ("wide", 1): _ranks([1, 0, 3, 4]),
    }
    runs = _runs_of(ranks)
    table = study.compare(runs, ranks, n_boot=300)
    # hits@1: baseline 1+2 of 8, variant 3+1 of 8 → +1/8; hits@5: 4 vs 7 → +3/8; hits@10: 6 vs 7 → +1/8
    assert table.loc["wide", "diff_recall@1"] == pytest.approx(1 / 8)
    assert table.loc["wide", "diff_recall@5"] == pytest.approx(3 / 8)
    assert table.loc["wide", "diff_recall@10"] == pytest.approx(1 / 8)
    assert table.loc["baseline", "val_recall@5_mean"] == pytest.approx(0.5)
    assert table.loc["wide", "val_recall@5_mean"] == pytest.approx(7 / 8)
    assert table.loc["wide", "val_recall@5_std"] == pytest.approx(math.sqrt(2 * (1 / 8) ** 2))  # 3/4 and 1
    assert table.loc["baseline", "verdict_recall@5"] == "baseline"
    assert table.loc["wide", "low_recall@5"] <= 3 / 8 <= table.loc["wide", "high_recall@5"]


def test_compare_refuses_runs_on_different_queries():
    ranks = {("baseline", 0): _ranks([0, 1]), ("v", 0): _ranks([0, 1, 2])}
    runs = _runs_of(ranks)
    with pytest.raises(InputError, match="different queries"):
        study.compare(runs, ranks)


def test_metrics_from_ranks():
    out = study.metrics_from_ranks(_ranks([0, 4, 9, 25]))
    assert (out["recall@1"], out["recall@5"], out["recall@10"], out["recall@20"]) == (0.25, 0.5, 0.75, 0.75)
    assert out["map"] == 0.5 and out["n_queries"] == 4


def _comparison(diffs: dict[str, tuple[float, str]]) -> pd.DataFrame:
    return pd.DataFrame(
        {
            "diff_recall@5": {v: d for v, (d, _) in diffs.items()},
            "low_recall@5": {v: d - 0.01 for v, (d, _) in diffs.items()},
            "high_recall@5": {v: d + 0.01 for v, (d, _) in diffs.items()},
            "verdict_recall@5": {v: verdict for v, (_, verdict) in diffs.items()},
        }
    )


def test_decide_by_the_rule():
    table = _comparison(
        {"baseline": (math.nan, "baseline"), "a": (0.05, "better"), "b": (0.08, "better"), "c": (0.2, "within noise")}
    )
    assert study.decide(table)[0] == "b"  # the larger `better` difference; c's larger one is noise
    table = _comparison({"baseline": (math.nan, "baseline"), "c": (0.2, "within noise"), "d": (-0.1, "worse")})
    winner, why = study.decide(table)
    assert winner == "baseline" and "kept" in why


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
        base = config.get_config(profile, **study.BUDGET[profile])
        for experiment in study.experiments(profile):
            study.resolve_variants(experiment, base)  # check() raises on a bad value


def test_variant_equal_to_the_baseline_is_dropped():
    experiment = study.get_experiment("demo", "augment")
    base = config.get_config("demo", **study.BUDGET["demo"])
    assert base.augment == "flip"  # the default recipe's: every preset of the ladder is a variant
    assert list(study.resolve_variants(experiment, base)) == ["baseline", *experiment.variants]
    medium = replace(base, augment="medium")
    configs = study.resolve_variants(experiment, medium)
    assert list(configs) == ["baseline", "augment=weak", "augment=strong", "augment=super_strong"]
    assert study.changed_fields(configs) == ["augment"]


def test_demo_budget_and_backbones():
    """The demo study's size as stated in helpers.experiments.study, and backbones with packaged weights."""
    from helpers.modeling import models

    cfg = config.get_config("demo", **study.BUDGET["demo"])
    assert study.DEFAULT_SEEDS["demo"] >= 2 and cfg.img_size < config.PROFILES["demo"].img_size
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
    assert study.stage_overrides("fixture", "02_1", tmp_path) == study.BUDGET["fixture"]
    winners = {"crop": {}, "resize": {"resize": "squash"}, "resolution": {"img_size": 48}}
    for name, overrides in winners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "decision.json").write_text(json.dumps({"winner_overrides": overrides}))
    assert study.stage_overrides("fixture", "02_2", tmp_path) == {"resize": "squash", "img_size": 48}
    with pytest.raises(InputError, match="run `python -m helpers study augment"):
        study.stage_overrides("fixture", "03", tmp_path)


def test_final_config_by_the_rule(tmp_path):
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
    record = study.write_final_config("fixture", tmp_path)
    assert json.loads((tmp_path / "final_config.json").read_text()) == record
    assert record["config"]["resize"] == "squash" and record["config"]["loss"] == "infonce"
    assert record["config"]["head"] == "bnneck" and record["config"]["augment"] == "weak"  # fixture's own
    assert set(record["config"]) == set(study.decided_fields("fixture"))


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
