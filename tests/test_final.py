"""The final model of 04_demo: the study's runs of the final configuration, every seed, read
back from hand-written run folders (no training here: the notebook run covers that path)."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest

from helpers.core import config, identity
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.evaluation.metrics import INTERVALS
from helpers.experiments import final, final_runs
from helpers.experiments.catalogue import POSTPROCESS
from helpers.experiments.runs import runs_of
from helpers.experiments.study import Study


def _run(folder, seed, val_r5, test, best_epoch=3, loss=(0.3, 0.2, 0.1)):
    """A finished run folder as fit and the study leave it: metrics.json, history.csv, study_run.json."""
    folder.mkdir(parents=True)
    metrics = {"best_epoch": best_epoch, "val": {"recall@5": val_r5}, "ci": f"{INTERVALS['items']}, 95%"}
    for k, value in zip((1, 5, 10), test):
        metrics[f"recall@{k}"] = value
        metrics[f"recall@{k}_ci"] = [value - 0.05, value + 0.05]
    (folder / "metrics.json").write_text(json.dumps(metrics))
    history = {"epoch": range(len(loss)), "loss": loss, "val_recall@5": np.linspace(0.5, val_r5, len(loss))}
    pd.DataFrame(history).to_csv(folder / "history.csv", index=False)
    return folder


def test_seed_table_has_every_seed_then_mean_and_std(tmp_path):
    runs = {
        0: _run(tmp_path / "a", 0, 0.70, (0.40, 0.70, 0.80)),
        1: _run(tmp_path / "b", 1, 0.74, (0.50, 0.72, 0.84)),
        2: _run(tmp_path / "c", 2, 0.72, (0.45, 0.74, 0.82)),
    }
    table = final_runs.seed_table(runs, tmp_path / "images.csv", tmp_path)
    assert list(table.index) == [0, 1, 2, "mean", "std"]
    assert table.loc["mean", "test_recall@1"] == pytest.approx(0.45)
    assert table.loc["std", "test_recall@1"] == pytest.approx(0.05)  # sample std of 0.40, 0.50, 0.45
    assert table.loc[1, "test_recall@1_ci"] == "[0.450, 0.550]"
    assert final_runs.demo_seed(runs) == 1  # the best val Recall@5, never the best test number


def test_test_metrics_resample_items(tmp_path, monkeypatch):
    """A run's recorded test metrics are used when their intervals resample items; per-query ones
    are evaluated again with the run's checkpoint, or kept as recorded when it has none."""
    ready = _run(tmp_path / "items", 0, 0.7, (0.4, 0.7, 0.8))
    assert final_runs.test_metrics(ready, tmp_path / "t.csv", tmp_path)["recall@1"] == 0.4
    old = _run(tmp_path / "queries", 0, 0.7, (0.4, 0.7, 0.8))
    record = json.loads((old / "metrics.json").read_text()) | {"ci": "percentile bootstrap over queries, 95%"}
    (old / "metrics.json").write_text(json.dumps(record))
    assert final_runs.test_metrics(old, tmp_path / "t.csv", tmp_path) == record  # no checkpoint: as recorded
    (old / "best.pt").write_bytes(b"weights")
    monkeypatch.setattr(final_runs.train, "evaluate_run", lambda run_dir, *a, **k: {"evaluated": str(run_dir)})
    assert final_runs.test_metrics(old, tmp_path / "t.csv", tmp_path) == {"evaluated": str(old)}
    with pytest.raises(InputError, match="missing and no best.pt"):
        final_runs.test_metrics(tmp_path, tmp_path / "t.csv", tmp_path)


def test_demo_seed_breaks_a_tie_by_the_lowest_seed(tmp_path):
    runs = {s: _run(tmp_path / str(s), s, 0.7, (0.4, 0.7, 0.8)) for s in (2, 0, 1)}
    assert final_runs.demo_seed(runs) == 0


def test_reproduction_measures_the_largest_difference_per_seed(tmp_path):
    recorded = {0: _run(tmp_path / "study", 0, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.2, 0.1))}
    same = final_runs.reproduction(recorded, recorded)
    assert same.loc[0, "run"] == "the study's own" and same.loc[0, "max |Δ loss|"] == 0
    here = {0: _run(tmp_path / "here", 0, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.25, 0.1))}
    table = final_runs.reproduction(here, recorded)
    assert table.loc[0, "run"] == "retrained here"
    assert table.loc[0, "max |Δ loss|"] == pytest.approx(0.05)
    shorter = {0: _run(tmp_path / "short", 0, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.2))}
    assert np.isnan(final_runs.reproduction(shorter, recorded).loc[0, "max |Δ loss|"])  # different lengths: no pairing


def _study_run(root, experiment, cfg, seed, table_sha, finished=True):
    key = identity.run_key(replace(cfg, seed=seed), table_sha)
    folder = _run(root / experiment / f"baseline_seed{seed}_{key}", seed, 0.7, (0.4, 0.7, 0.8))
    (folder / "study_run.json").write_text(json.dumps({"key": key, "seed": seed, "finished": finished}))
    return folder


def test_the_final_runs_are_found_by_run_key_wherever_the_study_put_them(tmp_path):
    table = tmp_path / "images.csv"
    table.write_text("made-up table\n")
    sha = sha256_file(table)
    root = tmp_path / "results"
    base = config.get_config("fixture")
    chosen = replace(base, embed_dim=64)
    (root).mkdir()
    (root / "final_config.json").write_text(json.dumps({"config": {"embed_dim": 64}}))
    a = _study_run(root, "embed_dim", chosen, 0, sha)
    b = _study_run(root, "backbone", chosen, 1, sha)  # a later stage's baseline: the same run key
    _study_run(root, "crop", base, 0, sha)  # the recipe itself, not the final configuration
    _study_run(root, "embed_dim", chosen, 2, sha, finished=False)  # half-finished: not a result
    assert runs_of(base, root, sha) == {0: root / "crop" / next((root / "crop").iterdir()).name}
    the_study = Study("fixture", root=root, tables=(tmp_path, table))
    assert the_study.final_runs(need_checkpoints=False) == {0: a, 1: b}
    with pytest.raises(InputError, match="best.pt: missing"):
        the_study.final_runs()  # checkpoints are local, never committed
    (root / "final_config.json").write_text(json.dumps({"config": {"embed_dim": 128}}))
    with pytest.raises(InputError, match="no finished run of this configuration"):
        the_study.final_runs(need_checkpoints=False)


def test_a_missing_checkpoint_is_retrained_under_the_recorded_configuration(tmp_path, monkeypatch):
    table = tmp_path / "images.csv"
    table.write_text("made-up table\n")
    root = tmp_path / "results"
    root.mkdir()
    (root / "final_config.json").write_text(json.dumps({"config": {"embed_dim": 64}}))
    base = config.get_config("fixture")
    recorded = _study_run(root, "embed_dim", replace(base, embed_dim=64), 0, sha256_file(table))
    monkeypatch.setattr(config, "OUTPUTS", tmp_path / "outputs")
    monkeypatch.setattr(final_runs.artifacts, "results_root", lambda profile: root)
    with pytest.raises(InputError, match="TRAIN_IF_MISSING"):
        final_runs.study_runs(base, {"embed_dim": 64}, table, tmp_path, train_if_missing=False)
    trained = []

    def fake_fit(cfg, table_path, data_root, run_dir, progress=True):
        trained.append((cfg.embed_dim, cfg.seed))
        _run(run_dir, cfg.seed, 0.7, (0.4, 0.7, 0.8))
        (run_dir / "best.pt").write_bytes(b"weights")

    monkeypatch.setattr(final_runs.artifacts, "ensure_trained", fake_fit)
    runs, found, how = final_runs.study_runs(base, {"embed_dim": 64}, table, tmp_path, train_if_missing=True)
    assert trained == [(64, 0)] and found == {0: recorded}
    assert runs[0] == tmp_path / "outputs" / "fixture" / "final_runs" / recorded.name
    assert "seeds 0 retrained here" in how
    assert final_runs.reproduction(runs, found).loc[0, "max |Δ loss|"] == 0


def test_examples_are_chosen_by_rank_from_distinct_items():
    per_query = pd.DataFrame(
        {
            "path": ["a.jpg", "b.jpg", "c.jpg", "d.jpg", "e.jpg", "f.jpg"],
            "item_id": ["i1", "i1", "i2", "i3", "i3", "i4"],
            "rank_of_first_hit": [1, 1, 2, 9, 7, 3],
        }
    )
    best, worst = final.pick_examples(per_query, n=2)
    assert list(best.path) == ["a.jpg", "c.jpg"]  # b.jpg is i1 again
    assert list(worst.path) == ["d.jpg", "f.jpg"]  # e.jpg is i3 again; nothing of i1 or i2


def test_postprocess_choice_reads_the_study_decision(tmp_path):
    method, why = final_runs.postprocess_choice("demo", tmp_path)
    assert method == "none" and "does not exist yet" in why
    folder = tmp_path / POSTPROCESS
    folder.mkdir()
    (folder / "decision.json").write_text(json.dumps({"winner": "flip_tta", "why": "flip_tta is `better`"}))
    assert final_runs.postprocess_choice("demo", tmp_path) == (
        "flip_tta",
        f"{folder / 'decision.json'}: flip_tta is `better`",
    )
    (folder / "decision.json").write_text("[1, 2]")
    with pytest.raises(InputError, match=r"decision\.json: not a post-processing decision"):
        final_runs.postprocess_choice("demo", tmp_path)


def test_the_recorded_commit_ignores_rewritten_results(tmp_path, monkeypatch):
    """The study records the commit whose code wrote its tables; rewriting results/ is not a change of code."""
    import subprocess

    from helpers.core import files, repro

    def git(*args):
        return subprocess.run(["git", "-C", str(tmp_path), *args], capture_output=True, text=True, check=True).stdout

    git("init", "-q")
    (tmp_path / "results").mkdir()
    (tmp_path / "results" / "table.csv").write_text("a\n1\n")
    (tmp_path / "code.py").write_text("x = 1\n")
    git("add", ".")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "one")
    head = git("rev-parse", "HEAD").strip()
    monkeypatch.setattr(files, "REPO_ROOT", tmp_path)
    assert repro.git_commit() == head
    (tmp_path / "results" / "table.csv").write_text("a\n2\n")
    (tmp_path / "nb").mkdir()
    (tmp_path / "nb" / "story.ipynb").write_text("{}")
    git("add", "nb")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "two")
    head = git("rev-parse", "HEAD").strip()
    (tmp_path / "nb" / "story.ipynb").write_text('{"executed": 1}')  # a notebook re-executed in place
    assert repro.git_commit() == head
    (tmp_path / "code.py").write_text("x = 2\n")
    assert repro.git_commit() == head + "+changes"
