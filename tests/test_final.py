"""The final model of 04_demo: the study's runs of the final configuration, every seed, read
back from hand-written run folders (no training here: the notebook run covers that path)."""

import json
import shutil
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from safetensors import safe_open

from helpers.core import config, identity
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.evaluation.metrics import INTERVALS
from helpers.experiments import final, final_runs
from helpers.experiments.catalogue import POSTPROCESS
from helpers.experiments.runs import runs_of
from helpers.experiments.study import Study, retrained_dir
from helpers.modeling import checkpoints, models


def _run(folder, seed, val_r5, test, best_epoch=3, loss=(0.3, 0.2, 0.1)):
    """A finished run folder as fit and the study leave it: metrics.json, history.csv, study_run.json."""
    folder.mkdir(parents=True)
    metrics = {
        "split": "test",
        "best_epoch": best_epoch,
        "val": {"recall@5": val_r5},
        "ci": f"{INTERVALS['items']}, 95%",
    }
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
    unrun = final_runs.reproduction(recorded, recorded)  # no checkpoint here, not retrained: nothing ran
    assert unrun.loc[0, "run"].startswith("not retrained here") and np.isnan(unrun.loc[0, "max |Δ loss|"])
    (recorded[0] / "best.pt").write_bytes(b"weights")
    same = final_runs.reproduction(recorded, recorded)
    assert same.loc[0, "run"] == "the study's own" and same.loc[0, "max |Δ loss|"] == 0
    here = {0: _run(tmp_path / "here", 0, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.25, 0.1))}
    table = final_runs.reproduction(here, recorded)
    assert table.loc[0, "run"] == "retrained here"
    assert table.loc[0, "max |Δ loss|"] == pytest.approx(0.05)
    shorter = {0: _run(tmp_path / "short", 0, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.2))}
    assert np.isnan(final_runs.reproduction(shorter, recorded).loc[0, "max |Δ loss|"])  # different lengths: no pairing


def _finished_study(tmp_path):
    """``(images.csv, results root)`` of a study whose final configuration is ``embed_dim=64``."""
    table = tmp_path / "images.csv"
    table.write_text("made-up table\n")
    root = tmp_path / "results"
    root.mkdir()
    (root / "final_config.json").write_text(json.dumps({"config": {"embed_dim": 64}}))
    return table, root


def _study_run(root, experiment, cfg, seed, table_sha, finished=True, val_r5=0.7, test=(0.4, 0.7, 0.8)):
    """A finished run of the study as committed: fit.json (what fit writes last), study_run.json,
    and metrics.json (the test result 04_demo wrote where the checkpoints were); no best.pt."""
    key = identity.run_key(replace(cfg, seed=seed), table_sha)
    folder = _run(root / experiment / f"baseline_seed{seed}_{key}", seed, val_r5, test)
    (folder / "fit.json").write_text(json.dumps({"best_epoch": 3, "val": {"recall@5": val_r5}, "stopped": None}))
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
    assert the_study.final_runs() == {0: a, 1: b}  # found without their checkpoints (never committed)
    (root / "final_config.json").write_text(json.dumps({"config": {"embed_dim": 128}}))
    with pytest.raises(InputError, match="no finished run of this configuration"):
        the_study.final_runs()


def test_the_final_checkpoints_are_the_runs_own_or_a_copy_retrained_to_the_same_best_epoch(tmp_path, monkeypatch):
    table, root = _finished_study(tmp_path)
    chosen, sha = replace(config.get_config("fixture"), embed_dim=64), sha256_file(table)
    here = _study_run(root, "embed_dim", chosen, 0, sha)
    (here / "best.pt").write_bytes(b"weights")  # the machine that ran the study
    committed = _study_run(root, "embed_dim", chosen, 1, sha)  # a fresh clone's: no checkpoint
    exact = _study_run(root, "embed_dim", chosen, 2, sha)
    for run in (committed, exact):
        (run / "val_ranks.csv").write_text("path,first_hit_rank\nq1.jpg,0\nq2.jpg,3\n")
    monkeypatch.setattr(config, "OUTPUTS", tmp_path / "outputs")
    trained, best_epoch = [], {"value": 3}

    def fake_fit(cfg, table_path, data_root, run_dir, progress=True):
        if not (run_dir / "best.pt").is_file():
            trained.append((cfg.embed_dim, cfg.seed, run_dir))
            _run(run_dir, cfg.seed, 0.7, (0.4, 0.7, 0.8), loss=(0.3, 0.2, 0.1 if cfg.seed == 2 else 0.11))
            (run_dir / "val_ranks.csv").write_text((exact / "val_ranks.csv").read_text())
            (run_dir / "fit.json").write_text(json.dumps({"best_epoch": best_epoch["value"], "val": {}}))
            (run_dir / "best.pt").write_bytes(b"weights %d" % cfg.seed)

    monkeypatch.setattr(final_runs.artifacts, "ensure_trained", fake_fit)
    the_study = Study("fixture", root=root, tables=(tmp_path, table), progress=False)
    local = root / "final_runs" / committed.name  # beside the study's experiments, committed like them
    assert retrained_dir(committed) == local
    # seed 1's retrain differs in its last epoch's loss: it stands in from its own folder; seed 2's
    # gives the recorded run back to the digit: it is that run, its checkpoint restored there
    assert the_study.final_checkpoints() == {0: here, 1: local, 2: exact}
    assert (exact / "best.pt").read_bytes() == b"weights 2" and not (committed / "best.pt").exists()
    assert [t[:2] for t in trained] == [(64, 1), (64, 2)]  # the seeds without a checkpoint, as recorded
    assert trained[0][2] == local
    assert the_study.final_checkpoints() == {0: here, 1: local, 2: exact} and len(trained) == 2  # retrained once
    # a copy that chose another epoch is another run of the configuration: it stands in, never restored
    best_epoch["value"] = 5
    shutil.rmtree(local)
    assert the_study.final_checkpoints() == {0: here, 1: local, 2: exact} and len(trained) == 3
    assert not (committed / "best.pt").exists()


def test_a_missing_checkpoint_is_retrained_under_the_recorded_configuration(tmp_path, monkeypatch):
    table, root = _finished_study(tmp_path)
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
    assert runs[0] == root / "final_runs" / recorded.name
    assert "seed 0 retrained here" in how
    assert final_runs.reproduction(runs, found).loc[0, "max |Δ loss|"] == 0


@pytest.fixture
def three_seed_study(tmp_path, monkeypatch):
    """A finished study of the final configuration (embed_dim 64) over seeds 0, 1, 2 as a fresh
    clone has it (committed run folders, no checkpoint; seed 1 best on val), and a stand-in for
    fit that records what it trains and leaves a run with a checkpoint and its own test numbers."""
    table, root = _finished_study(tmp_path)
    base = config.get_config("fixture")
    chosen, sha = replace(base, embed_dim=64), sha256_file(table)
    recorded = {
        0: _study_run(root, "embed_dim", chosen, 0, sha, val_r5=0.70, test=(0.40, 0.70, 0.80)),
        1: _study_run(root, "embed_dim", chosen, 1, sha, val_r5=0.74, test=(0.50, 0.72, 0.84)),
        2: _study_run(root, "embed_dim", chosen, 2, sha, val_r5=0.72, test=(0.45, 0.74, 0.82)),
    }
    monkeypatch.setattr(config, "OUTPUTS", tmp_path / "outputs")
    monkeypatch.setattr(final_runs.artifacts, "results_root", lambda profile: root)
    trained = []

    def fake_fit(cfg, table_path, data_root, run_dir, progress=True, stop_after_epoch=None):
        if final_runs.artifacts.is_trained(run_dir):  # as ensure_trained: a finished run is read back
            return
        trained.append((cfg.embed_dim, cfg.seed, progress) + ((stop_after_epoch,) if stop_after_epoch else ()))
        if stop_after_epoch:  # epochs 0..stop_after_epoch and no checkpoint of a finished run
            _run(run_dir, cfg.seed, 0.7, (0.5, 0.7, 0.8), loss=(0.3, 0.2, 0.1)[: stop_after_epoch + 1])
            return
        _run(run_dir, cfg.seed, 0.7, (0.5 + cfg.seed / 100, 0.7, 0.8))  # the retrain's own test numbers
        for name in ("best.pt", "config.json", "fit.json", final_runs.WEIGHTS_FILE):
            (run_dir / name).write_text("{}")

    monkeypatch.setattr(final_runs.artifacts, "ensure_trained", fake_fit)
    return {"base": base, "table": table, "data": tmp_path, "recorded": recorded, "trained": trained}


def test_by_default_only_the_demo_seed_is_retrained_and_the_others_are_committed_results(three_seed_study, capsys):
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    assert final_runs.demo_seed(recorded) == 1
    with pytest.raises(InputError, match=r"seed1_.*best\.pt: missing.*TRAIN_IF_MISSING = True to retrain seed 1 "):
        final_runs.study_runs(base, {"embed_dim": 64}, table, data, train_if_missing=False)
    runs, found, how = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True, progress="epochs")
    assert study["trained"] == [(64, 1, "epochs")]  # the demo seed only, quietly
    local = data / "results" / "final_runs" / recorded[1].name
    assert found == recorded and runs == {0: recorded[0], 1: local, 2: recorded[2]}
    assert capsys.readouterr().out == (
        f"seed 1: no checkpoint here ({recorded[1] / 'best.pt'}); retraining it under its recorded configuration "
        f"(epochs: at most {base.epochs}) into {local}\n"
    )
    assert how == (
        "the study's runs of the final configuration, seeds 0, 1, 2 (seed 1 retrained here under the recorded "
        "configuration; seeds 0, 2: committed study result, not re-evaluated here "
        "(RETRAIN_ALL_SEEDS = True retrains them))"
    )
    table_ = final_runs.seed_table(runs, table, data)
    assert list(table_["test result"][:3]) == [final_runs.COMMITTED, final_runs.EVALUATED, final_runs.COMMITTED]
    # seed 1: the retrain's own test result; seeds 0 and 2: the study's committed ones
    assert list(table_["test_recall@1"][:3]) == pytest.approx([0.40, 0.51, 0.45])
    assert table_.loc["mean", "test_recall@1"] == pytest.approx((0.40 + 0.51 + 0.45) / 3)
    assert table_.loc["mean", "test result"] == table_.loc["std", "test result"] == "1 evaluated here, 2 committed"
    assert final_runs.source_line(table_) == (
        "seed 1: evaluated on test here; seeds 0, 2: committed study result, not re-evaluated here"
    )
    reproduced = final_runs.reproduction(runs, found)
    assert list(reproduced.run) == [
        "not retrained here (committed result)",
        "retrained here",
        "not retrained here (committed result)",
    ]
    assert reproduced.loc[1, "max |Δ loss|"] == 0 and np.isnan(reproduced.loc[0, "max |Δ loss|"])
    assert reproduced.loc[0, "epochs (here / study)"] == "- / 3"
    # The default recipe is the final configuration here: its table takes each seed from the same place.
    assert final_runs.recipe_runs(replace(base, embed_dim=64), table, runs) == runs


def test_retrain_all_seeds_retrains_and_evaluates_every_seed(three_seed_study):
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    runs, _, how = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True, retrain_all=True)
    assert study["trained"] == [(64, 0, True), (64, 1, True), (64, 2, True)]
    local = data / "results" / "final_runs"
    assert runs == {seed: local / run_dir.name for seed, run_dir in recorded.items()}
    assert how.endswith("seeds 0, 1, 2 (seeds 0, 1, 2 retrained here under the recorded configuration)")
    table_ = final_runs.seed_table(runs, table, data)
    assert set(table_["test result"][:3]) == {final_runs.EVALUATED}
    assert list(table_["test_recall@1"][:3]) == pytest.approx([0.50, 0.51, 0.52])
    assert list(final_runs.reproduction(runs, recorded).run) == ["retrained here"] * 3


def test_a_committed_retrain_stands_in_where_the_study_s_checkpoint_and_weights_are_gone(three_seed_study):
    """The study's checkpoints lost with its machine: a retrain on another machine kind is another run of
    the same configuration, committed in final_runs/; a fresh clone reads its test result there."""
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    (recorded[0] / "metrics.json").unlink()  # never evaluated on test where the study ran
    retrain = _run(data / "results" / "final_runs" / recorded[0].name, 0, 0.69, (0.42, 0.71, 0.81), best_epoch=2)
    for name in ("config.json", "fit.json"):
        (retrain / name).write_text("{}")
    runs, found, how = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)
    assert found == recorded and runs[0] == retrain and runs[2] == recorded[2]
    assert "seed 0: the study's checkpoints gone, their retrains under the recorded configuration stand in" in how
    seeds = final_runs.seed_table(runs, table, data)
    assert seeds.loc[0, "test_recall@1"] == pytest.approx(0.42) and seeds.loc[0, "best_epoch"] == 2
    assert seeds.loc[0, "test result"] == final_runs.COMMITTED
    assert final_runs.recipe_runs(replace(base, embed_dim=64), table)[0] == retrain
    shutil.rmtree(retrain)  # neither a checkpoint, a retrain nor a test result: the recipe table leaves it out
    assert 0 not in final_runs.recipe_runs(replace(base, embed_dim=64), table)


def test_a_missing_committed_result_is_a_one_line_error_naming_the_file_and_the_switch(three_seed_study):
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    (recorded[2] / "metrics.json").unlink()  # the study ran, 04_demo never evaluated seed 2 where its checkpoint was
    runs, _, _ = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)
    with pytest.raises(InputError) as error:
        final_runs.seed_table(runs, table, data)
    message = str(error.value)
    assert "\n" not in message
    assert message.startswith(f"{recorded[2] / 'metrics.json'}: missing, the committed test result of seed 2")
    assert "set RETRAIN_ALL_SEEDS = True (with TRAIN_IF_MISSING = True) to retrain and evaluate seed 2 here" in message
    # Per-query intervals (written before intervals resampled items) are not a committed result either.
    record = json.loads((recorded[0] / "metrics.json").read_text()) | {"ci": "percentile bootstrap over queries, 95%"}
    (recorded[0] / "metrics.json").write_text(json.dumps(record))
    with pytest.raises(
        InputError,
        match=r"seed0_.*metrics\.json: not a test result of seed 0 with intervals over items; set RETRAIN_ALL_SEEDS",
    ):
        final_runs.committed_test_metrics(recorded[0], 0)
    # With every seed retrained nothing committed is read (seed 1's retrain is reused, not trained again).
    runs, _, _ = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True, retrain_all=True)
    assert [seed for _, seed, _ in study["trained"]] == [1, 0, 2]
    assert list(final_runs.seed_table(runs, table, data)["test_recall@1"][:3]) == pytest.approx([0.50, 0.51, 0.52])


def test_where_the_study_checkpoints_are_each_seed_is_evaluated_into_its_committed_folder(
    three_seed_study, monkeypatch
):
    """``make notebooks`` on the machine that ran the study: the study's own checkpoints are
    evaluated once, into the run folders that are committed; a fresh clone then reads them."""
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    for run_dir in recorded.values():
        (run_dir / "metrics.json").unlink()
        (run_dir / "best.pt").write_bytes(b"weights")
    evaluated = []

    def fake_evaluate(run_dir, table_path, data_root, progress=True):
        evaluated.append(run_dir)
        _run(data / "scratch" / run_dir.name, 0, 0.7, (0.6, 0.7, 0.8))
        (run_dir / "metrics.json").write_text((data / "scratch" / run_dir.name / "metrics.json").read_text())
        return json.loads((run_dir / "metrics.json").read_text())

    monkeypatch.setattr(final_runs.train, "evaluate_run", fake_evaluate)
    exported = []
    monkeypatch.setattr(final_runs, "export_weights", exported.append)
    runs, _, how = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)
    assert runs == recorded and study["trained"] == [] and "retrained" not in how and "committed" not in how
    assert exported == [recorded[1]]  # the demo seed's weights, to be committed with the results
    assert set(final_runs.seed_table(runs, table, data)["test result"][:3]) == {final_runs.EVALUATED}
    assert evaluated == list(recorded.values())
    for run_dir in recorded.values():  # a fresh clone: no checkpoint, the committed result
        (run_dir / "best.pt").unlink()
    fresh = final_runs.seed_table(runs, table, data)
    assert list(fresh["test result"][:3]) == [final_runs.COMMITTED] * 3
    assert list(fresh["test_recall@1"][:3]) == [0.6, 0.6, 0.6] and len(evaluated) == 3


def test_findings_read_every_number_from_the_results(tmp_path):
    runs = {
        0: _run(tmp_path / "a", 0, 0.70, (0.40, 0.70, 0.80)),
        1: _run(tmp_path / "b", 1, 0.74, (0.50, 0.72, 0.84)),
    }
    (runs[1] / "best.pt").write_bytes(b"weights")
    seeds = final_runs.seed_table(runs, tmp_path / "images.csv", tmp_path)
    official = {
        "recall@1": 0.5,
        "recall@5": 0.71,
        "recall@10": 0.85,
        "recall@5_ci": [0.65, 0.77],
        "n_gallery": 194,
    }
    pairs = {"recall@1": 0.6, "recall@5": 0.69}
    recipe = config.get_config("fixture")
    lines = final.findings(
        {"embed_dim": recipe.embed_dim, "loss": "infonce"},
        recipe,
        "none",
        seeds,
        1,
        {"official": official, "original_pairs": pairs},
        {"recall@5": 0.3},
        {"recall@1": 0.55, "n_gallery": 98},
    )
    assert lines == [
        "final configuration: the profile's default recipe with loss=infonce; ranked by plain cosine similarity",
        "test over 2 seeds (official protocol, mean ± sample std): Recall@1 0.450 ± 0.071, Recall@5 0.710 ± 0.014, "
        "Recall@10 0.820 ± 0.028",
        "where each seed's test numbers come from: seed 1: evaluated on test here; seed 0: committed "
        "study result, not re-evaluated here",
        "demo model: seed 1, the best on val; test Recall@5 0.710 [0.650, 0.770] (interval over test items), within "
        "the seeds' range [0.700, 0.720]; the same backbone untrained: 0.300",
        "val against test: a test query searches 194 shop images (val and test), a val query 98; seed 1 scores "
        "Recall@1 0.550 on val and 0.500 on test",
        "original_pairs against official, same embeddings: Recall@1 0.600 against 0.500 (higher), Recall@5 0.690 "
        "against 0.710 (lower); the original study published Recall@1 0.640 under its own protocol "
        f"({final.ORIGINAL_PUBLISHED['data']})",
    ]
    one = final_runs.seed_table({1: runs[1]}, tmp_path / "images.csv", tmp_path)
    unchanged = final.findings(
        {"embed_dim": recipe.embed_dim},
        recipe,
        "flip_tta",
        one,
        1,
        {"official": official | {"recall@5": 0.9}, "original_pairs": pairs},
        {"recall@5": 0.3},
        {"recall@1": 0.55, "n_gallery": 98},
    )
    assert (
        unchanged[0]
        == "final configuration: the profile's default recipe, unchanged; ranked by post-processing flip_tta"
    )
    assert unchanged[1] == "test, one seed (official protocol): Recall@1 0.500, Recall@5 0.720, Recall@10 0.840"
    assert "above the seeds' range [0.720, 0.720]" in unchanged[3]


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


def test_a_fresh_clone_rebuilds_the_demo_seed_from_its_committed_weights_and_checks_its_first_epochs(
    three_seed_study,
):
    study = three_seed_study
    base, table, data, recorded = study["base"], study["table"], study["data"], study["recorded"]
    chosen = replace(base, embed_dim=64, seed=1)
    model = models.create_embedder(chosen.backbone, chosen.embed_dim, chosen.weights, chosen.head)
    model = model.to(memory_format=torch.channels_last)  # as fit trains it
    run = recorded[1]
    (run / "config.json").write_text(json.dumps({"config": chosen.to_dict(), "model": model.config}))
    state = {"model": model.state_dict(), "config": chosen.to_dict(), "model_config": model.config}
    checkpoints.save_checkpoint(run / "best.pt", state | {"epoch": 2, "table_sha256": sha256_file(table)})
    weights = final_runs.export_weights(run)
    (run / "best.pt").unlink()  # as a fresh clone has it: the weights, no checkpoint
    assert safe_open(str(weights), "pt").metadata() == {"best_epoch": "3", "table_sha256": sha256_file(table)}

    runs, _, how = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)
    local = data / "outputs" / "fixture" / "final_runs" / f"{run.name}.weights"  # never a full retrain's folder
    assert runs[1] == local and study["trained"] == [(64, 1, True, final_runs.CHECK_EPOCHS)]  # the check only
    rebuilt, _ = checkpoints.load_embedder(local / "best.pt")
    for name, tensor in model.state_dict().items():
        assert torch.equal(rebuilt.state_dict()[name], tensor), name
    checked = "1 epoch" if base.epochs == 1 else "2 epochs"  # at most the run's length
    assert (
        f"seed 1: the study's checkpoint rebuilt from its committed weights (model.safetensors), its first {checked}"
        in how
    )
    check = final_runs.reproduction(runs, recorded).loc[1]
    assert check["run"] == "committed weights; first 2 epochs retrained here"
    assert check["epochs (here / study)"] == "3 / 3" and check["max |Δ loss|"] == 0
    assert check["max |Δ val R@5|"] == pytest.approx(0.04)  # 0.70 retrained against 0.74 recorded at epoch 2

    final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)  # again: nothing retrained or rebuilt
    assert len(study["trained"]) == 1
    everything, _, _ = final_runs.study_runs(base, {"embed_dim": 64}, table, data, True, retrain_all=True)
    assert everything[1] == data / "results" / "final_runs" / run.name and (64, 1, True) in study["trained"]  # apart
    assert final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)[0][1] == local  # the rebuilt one again
    (run / final_runs.WEIGHTS_FILE).write_bytes(weights.read_bytes()[:-8])  # changed weights: rebuilt, or refused
    with pytest.raises(InputError, match=r"model\.safetensors: not the weights of the model its config\.json records"):
        final_runs.study_runs(base, {"embed_dim": 64}, table, data, True)
