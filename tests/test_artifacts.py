"""helpers.experiments.artifacts: a finished thing is reused only for exactly the same inputs,
a different one is refused or rebuilt, never silently mixed in."""

from __future__ import annotations

import json
from dataclasses import replace

import pandas as pd
import pytest

from helpers.core import config
from helpers.core.errors import InputError
from helpers.data import synthetic
from helpers.experiments import artifacts
from helpers.modeling import checkpoints


@pytest.fixture(scope="module")
def trained(small_tree, tmp_path_factory):
    """One finished fixture run (1 epoch) on the shared small tree."""
    root, table = small_tree
    run_dir = tmp_path_factory.mktemp("artifacts") / "run"
    cfg = config.get_config("fixture", epochs=1)
    result = artifacts.ensure_trained(cfg, table, root, run_dir, progress=False)
    return cfg, run_dir, result


def test_a_finished_run_is_read_back_not_retrained(small_tree, trained, monkeypatch):
    root, table = small_tree
    cfg, run_dir, first = trained
    monkeypatch.setattr(artifacts.train, "fit", lambda *a, **k: pytest.fail("retrained a finished run"))
    again = artifacts.ensure_trained(cfg, table, root, run_dir, progress=False)
    assert again["val"]["recall@5"] == first["val"]["recall@5"] and again["best_epoch"] == first["best_epoch"]
    # Runtime fields never change a result: a finished run is the same run on another machine.
    assert artifacts.ensure_trained(replace(cfg, num_workers=1), table, root, run_dir) == again


def test_a_finished_run_of_another_recipe_is_refused(small_tree, trained):
    root, table = small_tree
    cfg, run_dir, _ = trained
    with pytest.raises(InputError, match=r"another recipe \(embed_dim: 32 → 16\)"):
        artifacts.ensure_trained(config.get_config("fixture", epochs=1, embed_dim=16), table, root, run_dir)


def test_a_finished_run_on_another_table_is_refused(small_tree, trained, tmp_path):
    root, table = small_tree
    cfg, run_dir, _ = trained
    other = tmp_path / "images.csv"
    other.write_text(table.read_text() + "\n")  # same rows, other bytes: another table for the hash
    with pytest.raises(InputError, match=r"table: changed since the run \(sha256\)"):
        artifacts.ensure_trained(cfg, other, root, run_dir)


def test_an_index_is_reused_for_the_same_checkpoint_and_rebuilt_for_another(small_tree, trained, tmp_path):
    root, table = small_tree
    cfg, run_dir, _ = trained
    index_dir = tmp_path / "index"
    artifacts.ensure_index(run_dir / "best.pt", table, root, index_dir, progress=False)
    meta = json.loads((index_dir / "index.json").read_text())
    built = (index_dir / "embeddings.npy").stat().st_mtime_ns
    artifacts.ensure_index(run_dir / "best.pt", table, root, index_dir, progress=False)
    assert (index_dir / "embeddings.npy").stat().st_mtime_ns == built  # reused

    # Another checkpoint (one weight changed): the index keys on the checkpoint's content.
    state = checkpoints.read_checkpoint(run_dir / "best.pt")
    first_weight = next(iter(state["model"]))
    state["model"][first_weight] = state["model"][first_weight] + 0.5
    checkpoints.save_checkpoint(tmp_path / "other.pt", state)
    artifacts.ensure_index(tmp_path / "other.pt", table, root, index_dir, progress=False)
    rebuilt = json.loads((index_dir / "index.json").read_text())
    assert rebuilt["checkpoint_sha256"] != meta["checkpoint_sha256"] and rebuilt["checkpoint"].endswith("other.pt")
    artifacts.ensure_index(tmp_path / "other.pt", table, root, index_dir, split="val", progress=False)
    assert json.loads((index_dir / "index.json").read_text())["split"] == "val"  # another gallery: rebuilt


def test_an_index_folder_holding_something_else_is_never_replaced(small_tree, trained, tmp_path):
    root, table = small_tree
    _, run_dir, _ = trained
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("a user's file")
    with pytest.raises(InputError, match="holds no index.json"):
        artifacts.ensure_index(run_dir / "best.pt", table, root, folder, progress=False)
    assert (folder / "notes.txt").read_text() == "a user's file"


def test_a_zero_shot_row_is_computed_once(small_tree, tmp_path, monkeypatch):
    root, table = small_tree
    out = tmp_path / "zero.json"
    cfg = config.get_config("fixture")
    first = artifacts.ensure_zero_shot(cfg, table, root, out, progress=False)
    monkeypatch.setattr(artifacts.inference, "evaluate_zero_shot", lambda *a, **k: pytest.fail("recomputed"))
    assert artifacts.ensure_zero_shot(cfg, table, root, out, progress=False) == first
    assert 0.0 <= first["recall@1"] <= first["recall@5"] <= 1.0


def test_comparison_table_shows_values_with_their_intervals():
    rows = [
        {"model": "a", "result": {"recall@1": 0.5, "recall@1_ci": [0.25, 0.75], "n_queries": 8, "n_gallery": 4}},
        {"model": "b", "protocol": "split", "result": {"recall@5": 0.125}},
    ]
    table = artifacts.comparison_table(rows)
    assert table.loc["a", "recall@1"] == "0.500 [0.250, 0.750]"
    assert table.loc["b", "recall@5"] == "0.125" and table.loc["b", "recall@1"] == "—"
    assert table.loc["a", "n_queries"] == 8 and table.loc["b", "n_gallery"] == "—"
    assert list(table.columns[:1]) == ["protocol"]


def test_a_tree_without_measured_nuisances_gets_them_redrawn_never_written_into_it(tmp_path, monkeypatch):
    monkeypatch.setattr(config, "OUTPUTS", tmp_path / "outputs")
    cfg = config.get_config("fixture")
    root = tmp_path / "tree"
    synthetic.generate_tree(
        root, cfg.synthetic_items, seed=cfg.synthetic_seed, progress=False, splits=cfg.synthetic_splits
    )
    written = synthetic.read_nuisance(root)
    pd.testing.assert_frame_equal(artifacts.measured_nuisance(cfg, root), written)

    (root / synthetic.NUISANCE_FILE).unlink()  # as a tree written before the generator measured
    redrawn = artifacts.measured_nuisance(cfg, root)
    assert 0 < len(redrawn) < len(written) and redrawn.path.str.contains("comsumer").all()
    expected = written.set_index("path").loc[redrawn.path].reset_index()
    pd.testing.assert_frame_equal(redrawn, expected, check_exact=False, atol=1e-6)  # the file holds 6 decimals
    kept = cfg.work_dir / f"test_{synthetic.NUISANCE_FILE}"
    assert kept.is_file() and not (root / synthetic.NUISANCE_FILE).exists()

    kept.unlink()
    changed = root / redrawn.path[0]
    photo = bytearray(changed.read_bytes())
    photo[len(photo) // 2] ^= 0xFF
    changed.write_bytes(bytes(photo))  # another photo under the same name
    with pytest.raises(InputError, match=f"{changed}: not the photo the generator draws for this tree"):
        artifacts.measured_nuisance(cfg, root)
    changed.unlink()  # a photo missing: the same one-line reason, no traceback
    with pytest.raises(InputError, match=f"{changed}: not the photo the generator draws for this tree"):
        artifacts.measured_nuisance(cfg, root)
    assert artifacts.measured_nuisance(replace(cfg, data_root=str(root)), root) is None  # real data: none
