"""Training, evaluation, index and search end to end on a tiny synthetic tree (fixture profile)."""

import json
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from handmade import write_tree

from helpers.apps.cli import main
from helpers.core import config, schema
from helpers.core.errors import InputError
from helpers.data import datasets, sampling, store, transforms
from helpers.evaluation import gallery, inference, metrics
from helpers.experiments import artifacts
from helpers.modeling import checkpoints
from helpers.training import train


@pytest.fixture(scope="module")
def prepared(small_tree):
    return small_tree


def fixture_cfg(**overrides):
    return replace(config.get_config("fixture"), **{"epochs": 2, **overrides})


def state_dicts_equal(a, b) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_fit_writes_a_complete_run_and_evaluate_run_adds_test(prepared, tmp_path):
    root, table = prepared
    run = tmp_path / "run"
    result = train.fit(fixture_cfg(), table, root, run, progress=False)
    for name in ("config.json", "history.csv", "best.pt", "last.pt", "val_ranks.csv", "fit.json"):
        assert (run / name).is_file()
    assert not (run / "metrics.json").exists()  # a fit never looks at test
    history = pd.read_csv(run / "history.csv")
    assert list(history.epoch) == [0, 1, 2] and np.isfinite(history.loss[1:]).all()  # 0: untrained
    assert set(result) == {"best_epoch", "val", "stopped"}
    assert result == json.loads((run / "fit.json").read_text())
    assert result["best_epoch"] == checkpoints.read_checkpoint(run / "best.pt")["epoch"] + 1
    assert (result["val"]["protocol"], result["val"]["split"]) == ("official", "val")
    assert result["val"]["recall@5"] == history["val_recall@5"][1:].max()
    recorded = json.loads((run / "config.json").read_text())
    assert recorded["env"]["torch"] == torch.__version__
    assert recorded["model"]["data_config"]["input_size"] == [3, 64, 64]

    # metrics.json as fit wrote it before: test (official protocol) of best.pt, then fit's result.
    tested = train.evaluate_run(run, table, root, progress=False)
    assert tested == json.loads((run / "metrics.json").read_text())
    embedder, cfg = checkpoints.load_embedder(run / "best.pt")
    expected = inference.evaluate(cfg, embedder, schema.read_table(table), root, "test", progress=False)
    assert tested == json.loads(json.dumps({**expected, **result}))
    assert train.ensure_test_metrics(run, table, root) == tested
    changed = tmp_path / "images.csv"
    schema.read_table(table).iloc[:-1].to_csv(changed, index=False)
    with pytest.raises(InputError, match="differs from the table"):
        train.evaluate_run(run, changed, root, progress=False)


def test_a_run_written_before_fit_json_is_still_finished(prepared, tmp_path, monkeypatch):
    """Before fit.json, fit wrote metrics.json (test, best_epoch, val, stopped) last: such a run
    is read back, not retrained, and its test metrics are not evaluated again."""
    root, table = prepared
    run = tmp_path / "run"
    cfg = fixture_cfg(epochs=1)
    fitted = artifacts.ensure_trained(cfg, table, root, run, progress=False)
    assert fitted == json.loads((run / "fit.json").read_text())
    tested = train.evaluate_run(run, table, root, progress=False)
    (run / "fit.json").unlink()
    monkeypatch.setattr(train, "fit", lambda *a, **k: pytest.fail("retrained a finished run"))
    monkeypatch.setattr(train, "evaluate_run", lambda *a, **k: pytest.fail("evaluated test again"))
    assert artifacts.is_trained(run) and artifacts.ensure_trained(cfg, table, root, run) == fitted
    assert train.ensure_test_metrics(run, table, root) == tested


def test_a_fit_embeds_val_once_per_epoch_and_never_reads_test(prepared, tmp_path, monkeypatch):
    """Every image a fit reads goes through a crop store or a TableEmbedder: spy on both."""
    root, table = prepared
    embedded, decoded = [], []
    embed, ensure_store = inference.TableEmbedder.__call__, store.ensure_store

    def spy_embed(self, *args, **kwargs):
        embedded.append(self.loader.dataset.table)
        return embed(self, *args, **kwargs)

    def spy_store(rows, *args, **kwargs):
        decoded.append(rows)
        return ensure_store(rows, *args, **kwargs)

    monkeypatch.setattr(inference.TableEmbedder, "__call__", spy_embed)
    monkeypatch.setattr(store, "ensure_store", spy_store)
    train.fit(fixture_cfg(epochs=3, patience=5), table, root, tmp_path / "run", progress=False)
    assert len(embedded) == 4  # the untrained baseline, then one pass per epoch
    val_rows = inference.ProtocolEvaluator.protocol_rows(schema.read_table(table), "val", "official")
    assert all(rows.path.tolist() == val_rows.path.tolist() for rows in embedded)
    assert [sorted(rows.split.unique()) for rows in decoded] == [["train"], ["val"]]


def _val_ranks_from_scratch(run, table, root, items=None) -> pd.DataFrame:
    """best.pt on val (official protocol) as the study computed it: JPEGs decoded, one pass;
    ``items``: only these val items' consumer photos as queries (the gallery: every val shop photo)."""
    embedder, cfg = checkpoints.load_embedder(run / "best.pt")
    rows = schema.read_table(table)
    if items is not None:
        rows = rows.loc[(rows.split != "val") | (rows.domain == "shop") | rows.item_id.isin(items)]
    queries, shop = metrics.protocol_sets(rows, "val", "official")
    embedded = inference.embed_table(cfg, embedder, pd.concat([queries, shop]), root, "cpu", progress=False)
    result = metrics.retrieval_metrics(
        embedded[: len(queries)], queries.item_id.to_numpy(), embedded[len(queries) :], shop.item_id.to_numpy()
    )
    return metrics.ranks_table(queries, result)


def test_val_ranks_are_a_from_scratch_evaluation_of_best_pt(prepared, tmp_path):
    root, table = prepared
    run = tmp_path / "run"
    result = train.fit(fixture_cfg(epochs=3, patience=5), table, root, run, progress=False)
    written = pd.read_csv(run / "val_ranks.csv")
    assert list(written.columns) == ["path", "item_id", "first_hit_rank", "average_precision"]
    pd.testing.assert_frame_equal(written, _val_ranks_from_scratch(run, table, root), check_dtype=False)
    assert (written.first_hit_rank < 5).mean() == result["val"]["recall@5"]
    assert written.average_precision.mean() == pytest.approx(result["val"]["map"])
    assert result["val"]["n_queries"] == len(written)


def test_stop_items_choose_the_epoch_and_the_other_val_items_report_it(prepared, tmp_path):
    root, table = prepared
    run = tmp_path / "run"
    result = train.fit(fixture_cfg(epochs=3, patience=5, stop_items=2), table, root, run, progress=False)
    rows = schema.read_table(table)
    val_items = set(rows.loc[rows.split == "val", "item_id"])
    stop = pd.read_csv(run / "stop_ranks.csv")
    compare = pd.read_csv(run / "val_ranks.csv")
    # Two disjoint sets of val queries: 2 items' choose the epoch, the rest are measured on best.pt,
    # both against every val shop photo.
    assert stop.item_id.nunique() == 2 and not set(stop.item_id) & set(compare.item_id)
    assert set(stop.item_id) | set(compare.item_id) <= val_items
    expected = _val_ranks_from_scratch(run, table, root, items=val_items - set(stop.item_id))
    pd.testing.assert_frame_equal(compare, expected, check_dtype=False)
    assert (compare.first_hit_rank < 5).mean() == result["val"]["recall@5"]
    history = pd.read_csv(run / "history.csv")
    assert history.loc[result["best_epoch"], "val_recall@5"] == result["stop"]["recall@5"]
    assert (stop.first_hit_rank < 5).mean() == result["stop"]["recall@5"]
    pd.testing.assert_frame_equal(
        stop, _val_ranks_from_scratch(run, table, root, items=set(stop.item_id)), check_dtype=False
    )


def test_train_fraction_and_epoch_images_set_what_an_epoch_holds(prepared, tmp_path):
    root, table = prepared
    cfg = fixture_cfg(epochs=1, train_fraction=0.5, epoch_images=24)
    run = train._build(cfg, table, root, tmp_path, None, progress=False)
    train_items = schema.read_table(table).query("split == 'train'").item_id.nunique()
    assert len(set(run.batches.batch_sampler.items)) <= round(train_items * 0.5)
    assert len(run.batches.batch_sampler) == 24 // (cfg.p_items * cfg.k_images)


def test_same_seed_same_run_and_exact_resume(prepared, tmp_path):
    root, table = prepared
    train.fit(fixture_cfg(), table, root, tmp_path / "a", progress=False)
    train.fit(fixture_cfg(), table, root, tmp_path / "b", progress=False)
    history_a = pd.read_csv(tmp_path / "a/history.csv").drop(columns="train_images_per_s")
    history_b = pd.read_csv(tmp_path / "b/history.csv").drop(columns="train_images_per_s")
    pd.testing.assert_frame_equal(history_a, history_b)
    last_a = checkpoints.read_checkpoint(tmp_path / "a/last.pt")["model"]
    assert state_dicts_equal(last_a, checkpoints.read_checkpoint(tmp_path / "b/last.pt")["model"])

    # Interrupted after one epoch, then resumed: the same weights as the uninterrupted run.
    assert train.fit(fixture_cfg(), table, root, tmp_path / "c", progress=False, stop_after_epoch=1) is None
    assert not (tmp_path / "c/fit.json").exists()
    train.fit(fixture_cfg(), table, root, tmp_path / "c", resume=True, progress=False)
    assert state_dicts_equal(last_a, checkpoints.read_checkpoint(tmp_path / "c/last.pt")["model"])
    history_c = pd.read_csv(tmp_path / "c/history.csv").drop(columns="train_images_per_s")
    pd.testing.assert_frame_equal(history_a, history_c)
    for name in ("val_ranks.csv", "fit.json"):
        assert (tmp_path / "c" / name).read_bytes() == (tmp_path / "a" / name).read_bytes()


def test_resume_repairs_val_ranks_lost_in_a_crash(prepared, tmp_path):
    """A crash after the last epoch's best.pt, before its val_ranks.csv: the resume writes it
    from last.pt, and finishes the run as the uninterrupted one."""
    root, table = prepared
    train.fit(fixture_cfg(), table, root, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    assert train.fit(fixture_cfg(), table, root, run, progress=False, stop_after_epoch=2) is None
    (run / "val_ranks.csv").unlink()
    train.fit(fixture_cfg(), table, root, run, resume=True, progress=False)
    for name in ("val_ranks.csv", "fit.json"):
        assert (run / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    # A last.pt written before fit kept the val ranks is refused, not resumed without them.
    state = checkpoints.read_checkpoint(run / "last.pt")
    del state["val_ranks"]
    checkpoints.save_checkpoint(run / "last.pt", state)
    with pytest.raises(InputError, match="before fit kept the val ranks"):
        train.fit(fixture_cfg(), table, root, run, resume=True, progress=False)


def test_a_run_directory_is_never_silently_reused(prepared, tmp_path):
    root, table = prepared
    train.fit(fixture_cfg(epochs=1), table, root, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match="already holds a run"):
        train.fit(fixture_cfg(epochs=1), table, root, tmp_path / "run", progress=False)
    with pytest.raises(InputError, match=r"another config \(lr: 0.001 → 0.0003\)"):
        train.fit(fixture_cfg(epochs=1, lr=3e-4), table, root, tmp_path / "run", resume=True, progress=False)
    with pytest.raises(InputError, match="nothing to resume"):
        train.fit(fixture_cfg(), table, root, tmp_path / "empty", resume=True, progress=False)


def test_checkpoints_load_with_weights_only(prepared, tmp_path):
    root, table = prepared
    train.fit(fixture_cfg(epochs=1), table, root, tmp_path / "run", progress=False)
    embedder, cfg = checkpoints.load_embedder(tmp_path / "run/best.pt")
    assert cfg == fixture_cfg(epochs=1)
    (tmp_path / "bad.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="bad.pt: not a readable checkpoint"):
        checkpoints.load_embedder(tmp_path / "bad.pt")


def test_cli_train_evaluate_index_search(prepared, tmp_path, capsys):
    root, table = prepared
    run = tmp_path / "run"
    common = ["--table", str(table), "--data-root", str(root), "--quiet"]
    assert main(["train", *common, "--out", str(run), "--profile", "fixture", "--epochs", "1"]) == 0
    assert (
        main(
            [
                "evaluate",
                *common,
                "--checkpoint",
                str(run / "best.pt"),
                "--split",
                "test",
                "--protocol",
                "split",
                "--out",
                str(tmp_path / "m.json"),
            ]
        )
        == 0
    )
    metrics = json.loads((tmp_path / "m.json").read_text())
    frame = schema.read_table(table)
    assert metrics["n_gallery"] == ((frame.split == "test") & (frame.domain == "shop")).sum()
    assert (
        main(
            [
                "index",
                *common,
                "--checkpoint",
                str(run / "best.pt"),
                "--out",
                str(tmp_path / "index"),
                "--num-workers",
                "0",
            ]
        )
        == 0
    )
    query = frame.loc[(frame.split == "test") & (frame.domain == "consumer")].iloc[0]
    capsys.readouterr()
    box = f"{query.x_1},{query.y_1},{query.x_2},{query.y_2}"
    assert (
        main(["search", "--index", str(tmp_path / "index"), str(root / query.path), "--box", box, "-k", "3", "--json"])
        == 0
    )
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3]
    assert all(h["path"] in set(frame.path) for h in hits)
    # The index's embedding of a gallery image finds that image first.
    index = gallery.GalleryIndex.load(tmp_path / "index")
    shop = index.gallery.iloc[0]
    top = index.search_image(root / shop.path, box=(shop.x_1, shop.y_1, shop.x_2, shop.y_2), k=1)
    assert top[0]["path"] == shop.path
    # bad input: one line, exit 2
    assert main(["search", "--index", str(tmp_path / "nowhere"), str(root / query.path)]) == 2
    assert main(["search", "--index", str(tmp_path / "index"), str(root / query.path), "--box", "5,5,1,1"]) == 2
    assert main(["evaluate", *common, "--checkpoint", str(run / "best.pt"), "--protocol", "nope"]) == 2
    assert main(["train", *common, "--out", str(run), "--profile", "fixture"]) == 2
    assert main(["train", *common, "--out", str(tmp_path / "r2"), "--profile", "fixture", "--loss", "arcface"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 5 and all(line.startswith("error: ") for line in err)


def test_zero_shot_counts_match_the_official_protocol_on_a_hand_written_tree(tmp_path, capsys):
    """Counts by hand from tests/handmade.py: test consumer images 3 (id 4: 2, id 5: 1);
    gallery = shop images of val + test = 2 (id 3) + 1 (id 4) + 1 (id 5) = 4."""
    root = write_tree(tmp_path / "c2s")
    sampling.prepare(root, tmp_path / "prep", categories=None, sample=None, progress=False)
    out = tmp_path / "zero.json"
    assert (
        main(
            [
                "evaluate",
                "--table",
                str(tmp_path / "prep/images.csv"),
                "--data-root",
                str(root),
                "--quiet",
                "--backbone",
                "tf_efficientnet_lite0",
                "--weights",
                "packaged",
                "--num-workers",
                "0",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    metrics = json.loads(out.read_text())
    assert (metrics["n_queries"], metrics["n_excluded_queries"], metrics["n_gallery"]) == (3, 0, 4)
    assert metrics["model"]["weights_source"] == "packaged" and metrics["model"]["head"] == "pooled"


def test_resume_from_the_baseline_checkpoint_and_repair_history(prepared, tmp_path):
    """last.pt is saved right after the epoch-0 baseline, so a crash in epoch 1 is resumable;
    history.csv is rebuilt from last.pt, so a row lost or half-written by a crash comes back."""
    root, table = prepared
    train.fit(fixture_cfg(), table, root, tmp_path / "whole", progress=False)
    run = tmp_path / "run"
    assert train.fit(fixture_cfg(), table, root, run, progress=False, stop_after_epoch=0) is None
    assert checkpoints.read_checkpoint(run / "last.pt")["epoch"] == -1 and not (run / "best.pt").exists()
    assert not (run / "val_ranks.csv").exists()  # the untrained baseline selects nothing
    (run / "history.csv").write_text("epoch,loss\n0,")  # a crash mid-write
    train.fit(fixture_cfg(), table, root, run, resume=True, progress=False)
    assert state_dicts_equal(
        checkpoints.read_checkpoint(tmp_path / "whole/last.pt")["model"],
        checkpoints.read_checkpoint(run / "last.pt")["model"],
    )
    assert list(pd.read_csv(run / "history.csv").epoch) == [0, 1, 2]


def test_resume_refuses_a_changed_table(prepared, tmp_path):
    root, table = prepared
    run = tmp_path / "run"
    train.fit(fixture_cfg(), table, root, run, progress=False, stop_after_epoch=0)
    changed = tmp_path / "images.csv"
    frame = schema.read_table(table)
    frame.iloc[:-1].to_csv(changed, index=False)
    with pytest.raises(InputError, match="differs from the table"):
        train.fit(fixture_cfg(), changed, root, run, resume=True, progress=False)


def test_resume_refuses_a_checkpoint_from_before_the_tie_break(prepared, tmp_path):
    root, table = prepared
    run = tmp_path / "run"
    train.fit(fixture_cfg(), table, root, run, progress=False, stop_after_epoch=0)
    state = checkpoints.read_checkpoint(run / "last.pt")
    del state["best_map"]  # as fit wrote it before ties on Recall@5 were broken by mAP
    checkpoints.save_checkpoint(run / "last.pt", state)
    with pytest.raises(InputError, match=r"last\.pt: written before ties on val Recall@5 were broken by val mAP"):
        train.fit(fixture_cfg(), table, root, run, resume=True, progress=False)


@pytest.mark.parametrize(
    "recall, mean_ap, better",
    [
        (0.625, 0.40, True),  # a higher Recall@5 wins whatever its mAP
        (0.620, 0.50, True),  # a tie on Recall@5 (one query's step), a higher mAP: still improving
        (0.620, 0.45, False),  # a tie and the same mAP: no improvement
        (0.620, 0.44, False),
        (0.617, 0.60, False),  # a lower Recall@5 loses whatever its mAP
    ],
)
def test_an_epoch_is_better_by_recall_at_5_then_by_map(recall, mean_ap, better):
    assert train.better_epoch({"recall@5": recall, "map": mean_ap}, 0.620, 0.45) is better


def test_the_history_replays_the_stopping_rule(prepared, tmp_path):
    """Its early stop, replayed from history.csv by an explicit loop: the best epoch is the last that
    raised Recall@5 or tied it with a higher mAP, and the run stops `patience` epochs after it."""
    root, table = prepared
    cfg = fixture_cfg(epochs=6, patience=2)
    result = train.fit(cfg, table, root, tmp_path / "run", progress=False)
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    best, best_map, best_epoch, bad = -1.0, -1.0, 0, 0
    for row in history.to_dict("records")[1:]:  # epoch 0: the untrained model
        recall, mean_ap = row["val_recall@5"], row["val_map"]
        if recall > best or (recall == best and mean_ap > best_map):
            best, best_map, best_epoch, bad = recall, mean_ap, row["epoch"], 0
        else:
            bad += 1
            if bad >= cfg.patience:
                break
    assert result["best_epoch"] == best_epoch and history.epoch.max() == row["epoch"]


@pytest.mark.parametrize(
    "override, message",
    [
        ({"epochs": 0}, "epochs must be at least 1"),
        ({"patience": 0}, "patience must be at least 1"),
        ({"amp": "fp8"}, "unknown amp"),
        ({"device": "gpu"}, "device must be auto"),
        ({"k_images": 1}, "k_images must be at least 2"),
        ({"lr": float("nan")}, "lr must be a positive number"),
    ],
)
def test_config_rejects_unusable_values(override, message):
    with pytest.raises(InputError, match=message):
        config.get_config("fixture", **override)


def test_cli_demo_on_the_fixture_profile(tmp_path, monkeypatch, capsys):
    """`python -m helpers demo` end to end; a second call reuses every finished step."""
    monkeypatch.setattr(config, "OUTPUTS", tmp_path)
    assert main(["demo", "--profile", "fixture", "--quiet"]) == 0
    out = capsys.readouterr().out
    assert "synthetic data (helpers.data.synthetic), not DeepFashion" in out and "trained (best.pt" in out
    assert "trained at most 1 epoch\n" in out
    for name in ("run/metrics.json", "index/index.json", "retrieval.png", "sample_pairs.png", "zero_shot_metrics.json"):
        assert (tmp_path / "fixture" / name).is_file()
    stamp = (tmp_path / "fixture/run/metrics.json").stat().st_mtime_ns
    assert main(["demo", "--profile", "fixture", "--quiet"]) == 0
    assert (tmp_path / "fixture/run/metrics.json").stat().st_mtime_ns == stamp
    assert capsys.readouterr().out == out


def _augmented_batches(dataset, workers: int) -> list[torch.Tensor]:
    batches = datasets.SampleSeeds(datasets.PKSampler((dataset.labels, dataset.domains), 2, 2, seed=3), seed=3)
    # The loader's own seed differs per call on purpose: the pixels must not depend on it.
    loader = datasets.make_loader(dataset, batch_sampler=batches, num_workers=workers, seed=100 + workers)
    images = []
    for epoch in (0, 1):
        batches.set_epoch(epoch)
        images += [batch for batch, _, _ in loader]
    return images


def test_augmented_pixels_do_not_depend_on_the_worker_count(prepared):
    root, table = prepared
    rows = schema.read_table(table)
    transform = transforms.C2STransform(48, (0.5,) * 3, (0.5,) * 3, augment="super_strong")
    dataset = datasets.C2SDataset(rows[rows.split == "train"], root, transform)
    reference = _augmented_batches(dataset, 0)
    for workers in (1, 2):
        got = _augmented_batches(dataset, workers)
        assert len(got) == len(reference) and all(torch.equal(a, b) for a, b in zip(reference, got))
    # The draws are random all the same: the same rows in another epoch look different.
    first = datasets.SampleSeeds(datasets.PKSampler((dataset.labels, dataset.domains), 2, 2, seed=3), seed=3)
    first.set_epoch(0)
    batch = next(iter(first))
    row, draw = batch[0]
    assert not torch.equal(dataset[(row, draw)][0], dataset[(row, draw + 1)][0])
    assert torch.equal(dataset[(row, draw)][0], dataset[(row, draw)][0])


def test_runs_and_resume_do_not_depend_on_the_worker_count(prepared, tmp_path):
    root, table = prepared
    cfg = fixture_cfg(augment="strong")
    train.fit(replace(cfg, num_workers=0), table, root, tmp_path / "w0", progress=False)
    train.fit(replace(cfg, num_workers=2), table, root, tmp_path / "w2", progress=False)
    history = [pd.read_csv(tmp_path / f"{run}/history.csv").drop(columns="train_images_per_s") for run in ("w0", "w2")]
    pd.testing.assert_frame_equal(*history)
    weights = checkpoints.read_checkpoint(tmp_path / "w0/last.pt")["model"]
    assert state_dicts_equal(weights, checkpoints.read_checkpoint(tmp_path / "w2/last.pt")["model"])
    # Interrupted with one worker count, resumed with another: the same run.
    train.fit(replace(cfg, num_workers=1), table, root, tmp_path / "mixed", progress=False, stop_after_epoch=1)
    train.fit(replace(cfg, num_workers=0), table, root, tmp_path / "mixed", resume=True, progress=False)
    assert state_dicts_equal(weights, checkpoints.read_checkpoint(tmp_path / "mixed/last.pt")["model"])


def test_cli_help_lists_choices_and_profile_defaults(capsys):
    assert main(["train", "--help"]) == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--loss {semi_hard,batch_hard,infonce}" in text
    assert "{none,flip,weak,medium,strong,super_strong}" in text
    assert "input side in px; None: the backbone's pretrained input size; default 160 (fixture 64, full None)" in text
    assert "--xbm-size" in text and "--no-deterministic" in text
