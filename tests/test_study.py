"""helpers.experiments.study: the Study object on real fixture runs (reuse, skip, resume, the shared
baseline, runs.csv), the carried configuration and final_config.json, and the study's CLI."""

from __future__ import annotations

import json
import time

import numpy as np
import pandas as pd
import pytest

from helpers.apps.cli import main
from helpers.core import config, identity
from helpers.core.errors import InputError
from helpers.experiments import catalogue, runs
from helpers.experiments.study import Study


def test_later_stages_need_the_earlier_decisions(tmp_path):
    study = Study("fixture", root=tmp_path)
    with pytest.raises(InputError, match="run `python -m helpers study crop"):
        study.stage_overrides("02_2")
    assert study.stage_overrides("02_1") == {}
    winners = {"crop": {}, "resize": {"resize": "squash"}, "resolution": {"img_size": 48}}
    for name, overrides in winners.items():
        (tmp_path / name).mkdir()
        (tmp_path / name / "decision.json").write_text(json.dumps({"winner_overrides": overrides}))
    assert study.stage_overrides("02_2") == {"resize": "squash", "img_size": 48}
    with pytest.raises(InputError, match="run `python -m helpers study augment"):
        study.stage_overrides("03")
    assert study.stage_overrides("03", strict=False) == {"resize": "squash", "img_size": 48}


def test_final_config_by_the_rule(tmp_path, monkeypatch):
    winners = {"resize": {"resize": "squash"}, "head": {"head": "bnneck"}, "loss": {"loss": "infonce"}}
    for experiment in catalogue.experiments("fixture"):
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
        listed = [{"experiment": experiment.name, "run_dir": f"{experiment.name}/r", "best_epoch": 3, "epochs_run": 3}]
        if experiment.name == "resize":
            listed.append({"experiment": "resize", "run_dir": "crop/r", "best_epoch": 2, "epochs_run": 5})
        (tmp_path / experiment.name / "r").mkdir()
        (tmp_path / experiment.name / "r" / "config.json").write_text(json.dumps({"config": {"epochs": 5}}))
        pd.DataFrame({"epoch": range(4), "val_recall@5": [0.1, 0.2, 0.3, 0.35]}).to_csv(
            tmp_path / experiment.name / "r" / "history.csv", index=False
        )
        pd.DataFrame(listed).assign(wall_s=360.0).to_csv(tmp_path / experiment.name / "runs.csv", index=False)
    study = Study("fixture", root=tmp_path)
    record = study.write_final_config()
    assert json.loads((tmp_path / "final_config.json").read_text()) == record
    # 13 distinct runs of 3 epochs (best at the last, none at the budget of 5), 1.3 h summed
    assert record["runs"] == {
        "distinct_runs": 13,
        "shortened_runs": 0,
        "best_at_last_epoch": 13,
        "best_at_last_epoch_percent": 100.0,
        "best_in_last_two_epochs": 13,
        "best_in_last_two_epochs_percent": 100.0,
        "stopped_early": 13,
        "wall_hours": 1.3,
        "stop_gap": None,  # every run stopped early: no configuration has a run at the cap to compare with
        "end_slope": None,  # no run trained the 5 epochs the slope is measured over
        # per experiment the run it added (resize's listing of crop's run counted in crop only): 360 s each
        "costs": [
            {"experiment": e.name, "runs": 1, "wall_hours": 0.1, "median_epochs": 3.0}
            for e in catalogue.experiments("fixture")
        ],
    }
    assert record["config"]["resize"] == "squash" and record["config"]["loss"] == "infonce"
    assert record["config"]["head"] == "bnneck" and record["config"]["augment"] == "weak"  # fixture's own
    assert set(record["config"]) == set(catalogue.decided_fields("fixture"))
    assert study.final_config().loss == "infonce"
    # the same decisions written again by a later commit keep the first stamp; new decisions take the new one
    from helpers.core import repro

    first = record["code_commit"]
    monkeypatch.setattr(repro, "git_commit", lambda: "later")
    assert study.write_final_config()["code_commit"] == first
    (tmp_path / "loss" / "decision.json").write_text(
        json.dumps({"experiment": "loss", "stage": "03", "winner": "baseline", "why": "b", "winner_overrides": {}})
    )
    assert study.write_final_config()["code_commit"] == "later"


def test_stop_gap_against_least_squares_with_a_mean_per_configuration(tmp_path):
    """Early-stopped runs against the runs of their configuration that reached the cap: a hand
    computed case, then statsmodels' OLS (one mean per configuration plus an early-stop offset)."""
    import statsmodels.formula.api as smf

    def write(rows):
        for i, (lr, seed, _, _) in enumerate(rows):
            folder = tmp_path / f"r{i}"
            folder.mkdir(exist_ok=True)
            # runtime fields never split a configuration
            cfg = {"profile": "fixture", "lr": lr, "seed": seed, "epochs": 30, "num_workers": seed % 2}
            (folder / "config.json").write_text(json.dumps({"config": cfg}))
        return pd.DataFrame(
            [{"run_dir": f"r{i}", "epochs_run": e, "val_recall@5": r} for i, (_, _, e, r) in enumerate(rows)]
        )

    # One configuration: the gap is the difference of the two means; no df left for an interval.
    assert runs.stop_gap(tmp_path, write([(1e-3, 0, 30, 0.60), (1e-3, 1, 18, 0.54)])) == {
        "gap": pytest.approx(-0.06),
        "configurations": 1,
        "early_runs": 1,
        "capped_runs": 1,
        "df": 0,
        "low": None,
        "high": None,
    }
    rows = [
        (1e-3, 0, 30, 0.60),
        (1e-3, 1, 18, 0.55),
        (1e-3, 2, 30, 0.63),
        (1e-3, 3, 21, 0.57),
        (1e-4, 0, 30, 0.41),
        (1e-4, 1, 25, 0.40),
        (1e-4, 2, 16, 0.36),
        (1e-2, 0, 30, 0.20),  # only runs at the cap: adds to the residual variance, not to the gap
        (1e-2, 1, 30, 0.23),
        (1e-5, 0, 12, 0.10),  # only early runs: likewise
    ]
    frame = write(rows)
    gap = runs.stop_gap(tmp_path, frame)
    data = pd.DataFrame(rows, columns=["lr", "seed", "epochs_run", "y"]).assign(early=lambda d: d.epochs_run < 30)
    fit = smf.ols("y ~ C(lr) + early", data=data.assign(early=data.early.astype(float))).fit()
    low, high = fit.conf_int(0.05).loc["early"]
    assert gap["gap"] == pytest.approx(fit.params["early"], abs=1e-6)  # rounded to 6 decimals
    assert (gap["low"], gap["high"]) == (pytest.approx(low, abs=1e-6), pytest.approx(high, abs=1e-6))
    assert (gap["configurations"], gap["early_runs"], gap["capped_runs"], gap["df"]) == (2, 4, 3, 5)
    # No configuration with both kinds: nothing to say.
    assert runs.stop_gap(tmp_path, frame.iloc[7:]) is None


def test_end_slope_against_per_run_regressions_and_a_t_interval(tmp_path):
    """Each run at the epoch cap: its slope over its last 5 epochs (scipy's linregress); their mean
    and 95 % t interval (statsmodels' DescrStatsW). An early-stopped run (levelled off by its
    rule) and a run shorter than the window are left out."""
    from scipy.stats import linregress
    from statsmodels.stats.weightstats import DescrStatsW

    rng = np.random.default_rng(3)
    curves = {"a": 0.4 + 0.01 * np.arange(12), "b": 0.5 + rng.normal(0, 0.02, 9), "c": 0.6 - 0.002 * np.arange(7)}
    curves |= {"stopped": 0.3 + 0.02 * np.arange(8), "short": np.array([0.1, 0.2, 0.3])}
    caps = {"a": 12, "b": 9, "c": 7, "stopped": 20, "short": 3}
    for name, curve in curves.items():
        (tmp_path / name).mkdir()
        history = pd.DataFrame({"epoch": range(len(curve) + 1), "val_recall@5": [0.05, *curve]})
        history.to_csv(tmp_path / name / "history.csv", index=False)
        (tmp_path / name / "config.json").write_text(json.dumps({"config": {"epochs": caps[name]}}))
    table = pd.DataFrame({"run_dir": list(curves), "epochs_run": [len(c) for c in curves.values()]})
    found = runs.end_slope(tmp_path, table)
    slopes = [linregress(np.arange(len(c) - 4, len(c) + 1), c[-5:]).slope for c in list(curves.values())[:3]]
    low, high = DescrStatsW(slopes).tconfint_mean(0.05)
    assert slopes[0] == pytest.approx(0.01) and slopes[2] == pytest.approx(-0.002)
    assert found == {
        "epochs": 5,
        "runs": 3,
        "slope": pytest.approx(np.mean(slopes), abs=1e-6),
        "low": pytest.approx(low, abs=1e-6),
        "high": pytest.approx(high, abs=1e-6),
    }
    assert runs.end_slope(tmp_path, table[table.run_dir.isin(["a", "stopped", "short"])]) is None


def test_runs_summary_reads_the_plateau_from_the_runs_at_the_full_budget(tmp_path):
    """The `length` experiment's shorter schedule ends at its own cap by design: it counts in the
    runs and their cost, not in whether the study's budget let runs level off; the report says so."""
    from helpers.reporting.results_section import shortened_sentence

    rows = []
    for name, budget, best, curve in [
        ("a", 30, 21, [0.50, 0.52, 0.53, 0.53, 0.52]),  # levelled off
        ("b", 30, 30, [0.40, 0.42, 0.44, 0.46, 0.48]),  # still rising at its cap
        ("c", 30, 12, [0.30] * 5),  # stopped early after its patience
        ("short", 10, 10, [0.10, 0.15, 0.20, 0.25, 0.30]),  # length's epochs=10: rising, left out
    ]:
        (tmp_path / name).mkdir()
        epochs_run = 22 if name == "c" else budget
        history = pd.DataFrame({"epoch": range(epochs_run - 4, epochs_run + 1), "val_recall@5": curve})
        history.to_csv(tmp_path / name / "history.csv", index=False)
        (tmp_path / name / "config.json").write_text(
            json.dumps({"config": {"profile": "fixture", "epochs": budget, "seed": 0}})
        )
        experiment = "length" if name == "short" else "crop"
        rows.append({"experiment": experiment, "run_dir": name, "best_epoch": best, "epochs_run": epochs_run})
    for experiment in ("crop", "length"):
        (tmp_path / experiment).mkdir()
        table = pd.DataFrame([r for r in rows if r["experiment"] == experiment]).assign(wall_s=900.0)
        table.assign(**{"val_recall@5": 0.5}).to_csv(tmp_path / experiment / "runs.csv", index=False)
    summary = runs.runs_summary(tmp_path)
    assert (summary["distinct_runs"], summary["shortened_runs"], summary["wall_hours"]) == (4, 1, 1.0)
    # of a, b and c: b at its last epoch (1 of 3), none more in the last two, c stopped early
    assert (summary["best_at_last_epoch"], summary["best_at_last_epoch_percent"]) == (1, 33.3)
    assert (summary["best_in_last_two_epochs"], summary["stopped_early"]) == (1, 1)
    # a's and b's slopes over their last 5 epochs (c stopped early, short left out): 0.005 and 0.02
    assert summary["end_slope"]["runs"] == 2
    assert summary["end_slope"]["slope"] == pytest.approx((0.005 + 0.02) / 2, abs=1e-6)
    assert shortened_sentence(4, 0) == ""
    assert (
        shortened_sentence(4, 1)
        == ", 3 trained to its full epoch budget (the `length` experiment's 1 shorter one aside); of these"
    )
    assert shortened_sentence(9, 3).endswith("the `length` experiment's 3 shorter ones aside); of these")


# --------------------------------------------------------------------------- the runner, on real fixture runs


@pytest.fixture(scope="module")
def prepared():
    return Study("fixture").prepared()


def test_ensure_run_resumes_then_reuses(tmp_path, prepared):
    data_root, table = prepared
    cfg = config.get_config("fixture", epochs=2)
    first = tmp_path / "exp_a" / "run"
    found, action = runs.ensure_run(cfg, table, data_root, first, tmp_path, progress=False, stop_after_epoch=1)
    assert (found, action) == (first, "interrupted")
    assert (first / "last.pt").is_file() and not runs.is_finished(first)

    # Asked for again under another experiment: the half-finished run is found by its key and resumed in place.
    found, action = runs.ensure_run(cfg, table, data_root, tmp_path / "exp_b" / "run", tmp_path, progress=False)
    assert (found, action) == (first, "resumed")
    assert not (tmp_path / "exp_b").exists()
    assert runs.is_finished(first) and not (first / "last.pt").exists() and (first / "best.pt").is_file()
    assert not (first / "metrics.json").exists()  # a study run never evaluates test
    history = pd.read_csv(first / "history.csv")
    assert list(history.epoch) == [0, 1, 2]
    # The val ranks reproduce the val numbers the run selected its best epoch on.
    row = runs.run_row(first, tmp_path)
    best = history.loc[history.epoch == row["best_epoch"]].iloc[0]
    for k in (1, 5, 10):
        assert row[f"val_recall@{k}"] == pytest.approx(best[f"val_recall@{k}"])
    assert row["run_dir"] == "exp_a/run" and row["wall_s"] > 0 and row["images_per_s"] > 0
    assert runs.marker(first)["key"] == identity.run_key(cfg, runs.marker(first)["table_sha256"])

    # Finished: reused, nothing retrained (the history file is untouched).
    stamp = (first / "history.csv").stat().st_mtime_ns
    found, action = runs.ensure_run(cfg, table, data_root, tmp_path / "exp_c" / "run", tmp_path, progress=False)
    assert (found, action) == (first, "reused") and (first / "history.csv").stat().st_mtime_ns == stamp


def test_experiments_share_their_baseline_and_write_runs_csv(tmp_path, prepared, capsys):
    study = Study("fixture", root=tmp_path, n_seeds=1, progress=False)
    crop = study.run_experiment("crop")
    assert "projected" in capsys.readouterr().out
    table = pd.read_csv(tmp_path / "crop" / "runs.csv")
    assert list(table.variant) == ["baseline", "crop=False"] and list(table.crop) == [True, False]
    for column in ("seed", "run_dir", "best_epoch", "val_recall@1", "val_recall@5", "val_recall@10", "wall_s"):
        assert column in table.columns
    assert json.loads((tmp_path / "crop" / "decision.json").read_text())["winner"] in ("baseline", "crop=False")
    assert (tmp_path / "data_summary.json").is_file()
    assert crop["comparison"].loc["crop=False", "verdict_recall@5"] in ("better", "worse", "within noise")

    # The projection of 4 more runs of at most 10 epochs, from the 2 finished ones: the bound from
    # their median seconds per epoch, the expectation from their median run.
    walls = table.wall_s.to_numpy()
    per_epoch = walls / [pd.read_csv(tmp_path / d / "history.csv").epoch.max() for d in table.run_dir]
    seconds, how = runs.projected_seconds(tmp_path, "fixture", 4, 10)
    assert seconds == pytest.approx(4 * 10 * np.median(per_epoch))
    assert f"median of 2 finished runs); expected ~{4 * np.median(walls) / 60:.0f} min" in how

    finished = []
    resize = study.run_experiment("resize", on_run=finished.append)
    assert finished == [tmp_path / d for d in resize["runs"].run_dir]  # each run as it is finished, reused or trained
    baseline = resize["runs"].set_index("variant").loc["baseline"]
    assert baseline.run_dir.startswith("crop/")  # trained once, by crop
    assert not any(p.name.startswith("baseline") for p in (tmp_path / "resize").iterdir())
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("history.csv")}
    again = study.run_experiment("resize")
    assert {p: p.stat().st_mtime_ns for p in tmp_path.rglob("history.csv")} == stamps  # finished runs are skipped
    pd.testing.assert_frame_equal(again["comparison"], resize["comparison"])
    plan = study.plan()
    assert plan.set_index("experiment").loc["crop", "to_train"] == 0
    # statistics only: the same tables from the finished runs; a missing run is an error, never trained
    pd.testing.assert_frame_equal(study.run_experiment("crop", train=False)["comparison"], crop["comparison"])
    with pytest.raises(InputError, match="2 of its runs are not finished"):
        Study("fixture", root=tmp_path, n_seeds=2, progress=False).run_experiment("crop", train=False)
    assert study.runs_of(study.config) == {0: tmp_path / table.run_dir[0]}


def test_cli_errors_are_one_line(capsys):
    assert main(["study", "nope", "--profile", "fixture"]) == 2
    assert main(["study", "crop", "--profile", "fixture", "--seeds", "0"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2 and all(line.startswith("error: ") for line in err)
    assert "unknown experiment 'nope'" in err[0] and "--seeds must be at least 1" in err[1]


def test_a_terminated_study_records_the_wall_time_of_its_run_and_exits_130(tmp_path, monkeypatch, capsys):
    import os
    import signal

    from helpers.apps import cli
    from helpers.experiments import artifacts, runs

    table = tmp_path / "images.csv"
    table.write_text("path\n")

    def killed(*args, **kwargs):  # what a closing session does in the middle of an epoch
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(artifacts, "ensure_trained", killed)
    monkeypatch.setattr(
        cli,
        "_study",
        lambda args: runs.ensure_run(config.get_config("fixture"), table, tmp_path, tmp_path / "exp" / "run", tmp_path),
    )
    before = signal.getsignal(signal.SIGTERM)
    assert cli.main(["study", "crop", "--profile", "fixture"]) == 130
    assert "interrupted: run the same command again to resume" in capsys.readouterr().err
    record = runs.marker(tmp_path / "exp" / "run")
    assert record["finished"] is False and record["wall_s"] >= 0.0
    assert signal.getsignal(signal.SIGTERM) is before  # the handler is the study's only


def test_a_training_run_keeps_its_wall_time_up_to_date_in_case_it_is_killed(tmp_path, monkeypatch):
    """A machine taken back kills without a signal: the marker already holds the time spent."""
    from helpers.experiments import artifacts

    table = tmp_path / "images.csv"
    table.write_text("path\n")
    seen = []

    def training(*args, **kwargs):  # reads its own marker as a killed process would leave it
        start = time.perf_counter()
        time.sleep(0.35)
        seen.append((runs.marker(tmp_path / "exp" / "run"), time.perf_counter() - start))

    monkeypatch.setattr(artifacts, "ensure_trained", training)
    monkeypatch.setattr(runs, "WALL_CLOCK_S", 0.05)
    assert runs.ensure_run(config.get_config("fixture"), table, tmp_path, tmp_path / "exp" / "run", tmp_path)[1] == (
        "interrupted"
    )
    during, elapsed = seen[0]
    assert during["finished"] is False and 0 < during["wall_s"] <= elapsed + 0.05  # written while it trained
    final = runs.marker(tmp_path / "exp" / "run")
    assert final["finished"] is False and final["wall_s"] >= elapsed and final["key"] == during["key"]


def test_a_resized_test_runs_more_seeds_in_both_arms_and_the_final_model_keeps_the_study_s(tmp_path, monkeypatch):
    monkeypatch.setitem(config.RESIZED_SEEDS, "fixture", {"resize": 3})
    study = Study("fixture", root=tmp_path, progress=False)
    jobs = {
        name: [(v, s) for v, s, _ in study.jobs(catalogue.get_experiment("fixture", name), strict=False)]
        for name in ("crop", "resize")
    }
    assert jobs["resize"] == [(v, s) for s in range(3) for v in ("baseline", "resize=squash")]
    assert jobs["crop"] == [("baseline", 0), ("crop=False", 0)]  # the stage's other comparison keeps its seeds
    # a study asked for another seed count runs that count everywhere
    asked = Study("fixture", root=tmp_path, n_seeds=2, progress=False)
    assert {s for _, s, _ in asked.jobs(catalogue.get_experiment("fixture", "resize"), strict=False)} == {0, 1}
    # the resized test's extra runs of the final configuration are not the final model's
    monkeypatch.setattr(Study, "final_config", lambda self: self.config)
    monkeypatch.setattr(Study, "runs_of", lambda self, cfg: {s: tmp_path / f"r{s}" for s in range(3)})
    assert study.final_runs() == {0: tmp_path / "r0"}
