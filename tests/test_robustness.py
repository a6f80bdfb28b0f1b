"""The robustness dose-response: trained fixture runs evaluated on val trees with scaled nuisances."""

from __future__ import annotations

import hashlib
import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from helpers.core import schema
from helpers.core.config import get_config
from helpers.core.errors import InputError
from helpers.data import sampling, synthetic
from helpers.evaluation import inference, metrics
from helpers.experiments import artifacts, robustness
from helpers.modeling import checkpoints
from helpers.training import train

STRENGTHS = {"clutter": (1.0, 0.0), "box_jitter": (0.0, 1.0)}
VARIANTS = {"final": True, "whole_photo": False}  # the variant's crop
SEEDS = (0, 1)


def fixture_cfg(**overrides):
    # 14 val items: 4 choose each run's epoch, 10 are compared (a gallery big enough to miss in).
    base = dict(synthetic_items=28, synthetic_splits=(10, 14, 4), stop_items=4, epochs=1)
    return replace(get_config("fixture"), **(base | overrides))


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    """``(folder, {variant: [run_dir, ...]}, data_root, images.csv, Robustness)``: 1-epoch runs of
    two variants × two seeds on the tree their config names, evaluated at every dose."""
    folder = tmp_path_factory.mktemp("robustness")
    cfg = fixture_cfg()
    root = artifacts.ensure_synthetic_tree(
        folder / "data", cfg.synthetic_items, cfg.synthetic_seed, False, cfg.synthetic_splits
    )
    sampling.prepare(root, folder / "prepared", categories=cfg.categories, sample=cfg.sample, progress=False)
    table = folder / "prepared" / "images.csv"
    runs = {variant: [] for variant in VARIANTS}
    for variant, crop in VARIANTS.items():
        for seed in SEEDS:
            run = folder / f"{variant}_{seed}"
            train.fit(fixture_cfg(crop=crop, seed=seed), table, root, run, progress=False)
            runs[variant].append(run)
    result = robustness.evaluate_robustness(runs, STRENGTHS, folder / "cache", device="cpu", progress=False)
    return folder, runs, root, table, result


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def _ranks(result, nuisance, strength, variant, seed) -> pd.DataFrame:
    r = result.ranks
    chosen = r.loc[(r.nuisance == nuisance) & (r.strength == strength) & (r.variant == variant) & (r.seed == seed)]
    return chosen[list(robustness.RANK_COLUMNS)].reset_index(drop=True)


def test_one_row_per_dose_variant_and_seed_with_its_queries(study):
    _, _, _, _, result = study
    doses = [(n, s) for n, values in STRENGTHS.items() for s in values]
    assert len(result.summary) == len(doses) * len(VARIANTS) * len(SEEDS)
    assert set(result.summary.groupby(["nuisance", "strength", "variant", "seed"]).size()) == {1}
    assert (result.summary.n_queries == result.summary.n_queries[0]).all()
    per_run = result.ranks.groupby(["nuisance", "strength", "variant", "seed"], sort=False).size()
    assert per_run.tolist() == result.summary.n_queries.tolist()


def test_strength_one_on_the_trained_tree_reproduces_each_runs_own_val(study):
    """The clutter-1 tree is the training tree's val: best.pt evaluated on it gives fit's numbers and
    val_ranks.csv exactly, which is why that dose reads each run's val_ranks.csv instead."""
    folder, runs, _, _, result = study
    for variant, run_dirs in runs.items():
        for run in run_dirs:
            embedder, cfg = checkpoints.load_embedder(run / "best.pt")
            root, table = robustness.nuisance_tree(cfg, "clutter", 1.0, folder / "cache", progress=False)
            evaluator = inference.ProtocolEvaluator(
                cfg,
                embedder.data_config,
                robustness.compare_table(cfg, schema.read_table(table)),
                root,
                "val",
                "official",
                "cpu",
                cache=False,
            )
            evaluated, per_query = evaluator.with_ranks(embedder, progress=False)
            fitted = json.loads((run / "fit.json").read_text())["val"]
            keys = ("recall@1", "recall@5", "recall@10", "map", "n_queries")
            assert {k: evaluated[k] for k in keys} == {k: fitted[k] for k in keys}
            written = pd.read_csv(run / "val_ranks.csv")
            pd.testing.assert_frame_equal(
                per_query[list(robustness.RANK_COLUMNS)].reset_index(drop=True), written, check_dtype=False
            )
            row = result.summary.set_index(["nuisance", "strength", "variant", "seed"]).loc[
                ("clutter", 1.0, variant, cfg.seed)
            ]
            assert {k: row[k] for k in keys} == pytest.approx({k: fitted[k] for k in keys}, abs=1e-12)
            pd.testing.assert_frame_equal(_ranks(result, "clutter", 1.0, variant, cfg.seed), written, check_dtype=False)


def test_the_val_trees_are_the_training_trees_val_items(study):
    """Box jitter 0 writes the clutter-1 tree, whose images are the training tree's val images."""
    folder, _, root, table, _ = study
    for nuisance, strength in (("clutter", 1.0), ("box_jitter", 0.0), ("box_jitter", 1.0)):
        robustness.nuisance_tree(fixture_cfg(), nuisance, strength, folder / "cache", progress=False)
    doses = folder / "cache" / "items28_seed0_splits10-14-4"
    exact, jitter_0 = (tree_digest(doses / name / "data") for name in ("clutter_1.0", "box_jitter_0.0"))
    marker = robustness.MARKER
    assert {p: d for p, d in exact.items() if p != marker} == {p: d for p, d in jitter_0.items() if p != marker}
    val = schema.read_table(table).query("split == 'val'")
    images = {p: d for p, d in exact.items() if p.endswith(".jpg")}
    assert sorted(images) == sorted(val.path)
    assert images == {p: d for p, d in tree_digest(root).items() if p in images}
    moved = (doses / "box_jitter_1.0" / "data" / "Anno/list_bbox_consumer2shop.txt").read_text()
    assert moved != (doses / "clutter_1.0" / "data" / "Anno/list_bbox_consumer2shop.txt").read_text()


def test_box_jitter_moves_only_the_runs_that_crop(study):
    _, _, _, _, result = study
    for seed in SEEDS:
        exact, moved = (_ranks(result, "box_jitter", s, "whole_photo", seed) for s in (0.0, 1.0))
        pd.testing.assert_frame_equal(exact, moved)  # the whole photo never reads the box
    rows = result.summary.set_index(["nuisance", "strength", "variant", "seed"])
    cropped = [rows.loc[("box_jitter", s, "final", seed), "map"] for s in (0.0, 1.0) for seed in SEEDS]
    assert cropped[:2] != cropped[2:]


def test_ranks_agree_with_a_brute_force_evaluation(study):
    folder, runs, _, _, result = study
    run = runs["final"][1]
    embedder, cfg = checkpoints.load_embedder(run / "best.pt")
    root, table_path = robustness.nuisance_tree(cfg, "clutter", 0.0, folder / "cache", progress=False)
    rows = sampling.split_stop_items(schema.read_table(table_path), cfg.stop_items, cfg.split_seed)[1]
    queries = rows.loc[rows.domain == "consumer"].sort_values("path").reset_index(drop=True)
    shop = rows.loc[rows.domain == "shop"].reset_index(drop=True)
    embedded = inference.embed_table(cfg, embedder, pd.concat([queries, shop]), root, "cpu", progress=False)
    scores = embedded[: len(queries)] @ embedded[len(queries) :].T
    order = np.argsort(-scores, axis=1, kind="stable")
    relevant = shop.item_id.to_numpy()[order] == queries.item_id.to_numpy()[:, None]
    found = _ranks(result, "clutter", 0.0, "final", cfg.seed)
    assert found.path.tolist() == queries.path.tolist()
    assert found.first_hit_rank.tolist() == relevant.argmax(axis=1).tolist()
    precision = np.cumsum(relevant, axis=1) / np.arange(1, relevant.shape[1] + 1)
    expected_ap = (precision * relevant).sum(axis=1) / relevant.sum(axis=1)
    np.testing.assert_allclose(found.average_precision, expected_ap, rtol=1e-12)


@pytest.mark.parametrize("k", [1, 5])
def test_paired_differences_are_the_crossed_test_of_the_seed_grids(study, k):
    _, _, _, _, result = study
    table = robustness.paired_differences(result, "final", "whole_photo", k=k)
    assert list(zip(table.nuisance, table.strength)) == [(n, s) for n, values in STRENGTHS.items() for s in values]
    rows = result.summary.set_index(["nuisance", "strength", "variant", "seed"])
    for _, row in table.iterrows():
        per_seed = [
            rows.loc[(row.nuisance, row.strength, "final", s), f"recall@{k}"]
            - rows.loc[(row.nuisance, row.strength, "whole_photo", s), f"recall@{k}"]
            for s in SEEDS
        ]
        assert row["diff"] == pytest.approx(np.mean(per_seed), abs=1e-12)
        assert (row.n_seeds, row.n_items) == (2, 10) and row.low <= row["diff"] <= row.high
        assert (row.p < 0.05) == (row.low > 0 or row.high < 0)
        base = np.stack(
            [(_ranks(result, row.nuisance, row.strength, "whole_photo", s).first_hit_rank < k) for s in SEEDS]
        )
        final = np.stack([(_ranks(result, row.nuisance, row.strength, "final", s).first_hit_rank < k) for s in SEEDS])
        items = _ranks(result, row.nuisance, row.strength, "final", 0).item_id
        expected = robustness.statistics.crossed_test(base.astype(float), final.astype(float), items)
        assert (row.se, row.df) == pytest.approx((expected.se, expected.df))


def test_recall_intervals_and_the_dose_response_plot(study):
    _, _, _, _, result = study
    table = robustness.recall_intervals(result, k=5)
    means = result.summary.groupby(["nuisance", "strength", "variant"], sort=False)["recall@5"].mean()
    np.testing.assert_allclose(table["recall@5"], means.to_numpy(), atol=1e-12)
    assert ((table.low <= table["recall@5"]) & (table["recall@5"] <= table.high)).all()
    figure = robustness.plot_dose_response(robustness.recall_intervals(result))
    assert [ax.get_title() for ax in figure.axes] == ["clutter", "box jitter"]
    lines = [line for line in figure.axes[0].get_lines() if line.get_marker() == "o"]
    assert [line.get_label() for line in lines] == list(VARIANTS)
    assert sorted(lines[0].get_xdata()) == sorted(STRENGTHS["clutter"])
    # the talk's layout: a grid of panels, a row at most ncols wide
    grid = robustness.plot_dose_response(robustness.recall_intervals(result), ncols=1, figsize=(6, 6))
    assert [ax.get_title() for ax in grid.axes] == ["clutter", "box jitter"]
    assert grid.axes[0].get_position().y0 > grid.axes[1].get_position().y1  # stacked, not side by side


def test_the_cache_is_reused_and_never_overwrites(study, monkeypatch, tmp_path):
    folder, runs, _, _, result = study
    monkeypatch.setattr(synthetic, "generate_tree", lambda *a, **k: pytest.fail("wrote a cached tree again"))
    monkeypatch.setattr(sampling, "prepare", lambda *a, **k: pytest.fail("prepared a cached table again"))
    again = robustness.evaluate_robustness({"final": runs["final"]}, {"clutter": [0.0]}, folder / "cache", "cpu", False)
    expected = result.summary.query("variant == 'final' and nuisance == 'clutter' and strength == 0.0")
    pd.testing.assert_frame_equal(again.summary, expected.reset_index(drop=True))
    cfg = fixture_cfg()
    user = tmp_path / "items28_seed0_splits10-14-4" / "clutter_0.5" / "data"
    user.mkdir(parents=True)
    (user / "mine.txt").write_text("user data")
    with pytest.raises(InputError, match="without robustness_cache.json"):
        robustness.nuisance_tree(cfg, "clutter", 0.5, tmp_path, progress=False)
    assert [p.name for p in user.iterdir()] == ["mine.txt"]
    (user / "mine.txt").unlink()
    (user / robustness.MARKER).write_text(json.dumps({"items": 99}))
    with pytest.raises(InputError, match="holds"):
        robustness.nuisance_tree(cfg, "clutter", 0.5, tmp_path, progress=False)


def test_stored_ranks_stand_in_for_the_checkpoints(study, tmp_path):
    """With a store, every evaluated dose is kept per run as it is computed; runs whose checkpoints
    are gone (a study continued on another machine) then give the same result from it alone."""
    folder, runs, _, _, result = study
    store = tmp_path / "store"
    first = robustness.evaluate_robustness(runs, STRENGTHS, folder / "cache", "cpu", False, store=store)
    pd.testing.assert_frame_equal(first.summary, result.summary)
    pd.testing.assert_frame_equal(first.ranks, result.ranks)
    names = sorted(p.name for p in store.glob("*.csv.gz"))
    assert names == sorted(f"{run.name}.csv.gz" for dirs in runs.values() for run in dirs)
    one = pd.read_csv(store / names[0])
    # the trained tree's doses (clutter 1, box jitter 0) are each run's val_ranks.csv, never stored
    assert sorted(set(zip(one.nuisance, one.strength))) == [("box_jitter", 1.0), ("clutter", 0.0)]
    times = json.loads((store / robustness.WALL_TIMES).read_text())
    assert set(times) == set(names) and all(t > 0 for t in times.values())
    before = {name: (store / name).read_bytes() for name in names}

    # The runs' committed files only: no best.pt, nothing to evaluate with; the cache is not read.
    copies = {}
    for variant, dirs in runs.items():
        for run in dirs:
            copy = tmp_path / "committed" / run.name
            copy.mkdir(parents=True)
            for name in ("config.json", "val_ranks.csv", "fit.json"):
                (copy / name).write_bytes((run / name).read_bytes())
            copies.setdefault(variant, []).append(copy)
    again = robustness.evaluate_robustness(copies, STRENGTHS, tmp_path / "no_cache", "cpu", False, store=store)
    pd.testing.assert_frame_equal(again.ranks, result.ranks)
    pd.testing.assert_frame_equal(again.summary.drop(columns="run"), result.summary.drop(columns="run"))
    assert not (tmp_path / "no_cache").exists()
    assert {name: (store / name).read_bytes() for name in names} == before  # nothing re-written
    # A dose never stored, and no checkpoint to evaluate it with: a one-line reason naming the run.
    with pytest.raises(
        InputError, match=rf"{copies['final'][0].name}: no best.pt and no stored ranks at occlusion 0.0"
    ):
        robustness.evaluate_robustness(copies, {"occlusion": [0.0]}, tmp_path / "no_cache", "cpu", False, store=store)


def test_refuses_runs_whose_val_queries_would_not_pair(study, tmp_path):
    _, runs, _, _, _ = study
    with pytest.raises(InputError, match="two runs of seed"):
        robustness.evaluate_robustness({"final": runs["final"] * 2}, {"clutter": [1.0]}, tmp_path, "cpu", False)
    other = tmp_path / "other"
    other.mkdir()
    recorded = json.loads((runs["final"][0] / "config.json").read_text())
    recorded["config"]["stop_items"] = 3
    (other / "config.json").write_text(json.dumps(recorded))
    with pytest.raises(InputError, match="different data or stop items"):
        robustness.evaluate_robustness({"a": runs["final"], "b": [other]}, {"clutter": [1.0]}, tmp_path, "cpu", False)
    for bad in (fixture_cfg(data_root="/data/c2s"), fixture_cfg(resplit=(8.0, 1.0, 1.0))):
        with pytest.raises(InputError, match="robustness needs"):
            robustness.nuisance_tree(bad, "clutter", 1.0, tmp_path, progress=False)
    with pytest.raises(InputError, match="unknown nuisance"):
        robustness.nuisance_tree(fixture_cfg(), "blur", 1.0, tmp_path, progress=False)
    assert not any(tmp_path.glob("items*"))


def test_metrics_rank_base_is_the_first_hit(study):
    """Recall@K in the summary counts first_hit_rank < K, as the study's metrics do."""
    _, _, _, _, result = study
    for (nuisance, strength, variant, seed), ranks in result.ranks.groupby(["nuisance", "strength", "variant", "seed"]):
        row = result.summary.set_index(["nuisance", "strength", "variant", "seed"]).loc[
            (nuisance, strength, variant, seed)
        ]
        assert row["recall@5"] == metrics.recall_at_k(ranks.first_hit_rank.to_numpy())[5]


def test_the_study_contrasts_pair_each_variant_with_its_experiments_baseline(tmp_path):
    from helpers.experiments import robustness_study
    from helpers.experiments.study import Study

    def runs_csv(experiment, rows):
        (tmp_path / experiment).mkdir()
        pd.DataFrame(rows, columns=["variant", "seed", "run_dir"]).to_csv(
            tmp_path / experiment / "runs.csv", index=False
        )

    base = [("baseline", s, f"crop/base{s}") for s in range(5)]
    runs_csv("crop", [*base, *(("crop=False", s, f"crop/whole{s}") for s in range(3))])
    runs_csv("photometric", [*base, *(("photometric=grayworld", s, f"photometric/gw{s}") for s in range(5))])
    runs, pairs = robustness_study.contrast_runs(Study("fixture", root=tmp_path))
    assert pairs == [("crop=False", "baseline"), ("photometric=grayworld", "baseline")]  # one shared baseline
    assert runs["baseline"] == [tmp_path / f"crop/base{s}" for s in range(3)]  # at most 3 seeds each
    assert runs["photometric=grayworld"] == [tmp_path / f"photometric/gw{s}" for s in range(3)]
    (tmp_path / "photometric" / "runs.csv").unlink()
    with pytest.raises(InputError, match="photometric/runs.csv: missing; run `python -m helpers study photometric`"):
        robustness_study.contrast_runs(Study("fixture", root=tmp_path))


def test_each_contrast_run_is_stored_as_it_finishes_and_only_those(tmp_path, monkeypatch):
    """The runs a contrast reads are known by their run keys once their stage's baseline is: the
    crop experiment's from the start, the photometric one's once the stages before it decided. A
    run without its checkpoint or stored ranks is said, never raised, so the study goes on."""
    from dataclasses import asdict

    from helpers.core import identity
    from helpers.core.files import sha256_file
    from helpers.experiments import catalogue, robustness_study
    from helpers.experiments.catalogue import get_experiment
    from helpers.experiments.study import Study

    study = Study("fixture", root=tmp_path, progress=False)
    crop = study.configs(get_experiment("fixture", "crop"))
    sha = sha256_file(study.prepared()[1])

    def run(name, cfg, seed):
        folder = tmp_path / "crop" / name
        folder.mkdir(parents=True)
        (folder / "config.json").write_text(json.dumps({"config": asdict(replace(cfg, seed=seed))}, default=str))
        key = identity.run_key(replace(cfg, seed=seed), sha)
        (folder / "study_run.json").write_text(json.dumps({"key": key, "seed": seed, "finished": True}))
        return folder

    whole = run("crop=False_0", crop["crop=False"], 0)
    late = run("crop=False_3", crop["crop=False"], robustness_study.MAX_SEEDS)  # beyond the seeds a contrast reads
    keys = robustness_study.contrast_keys(study)
    assert len(keys) == 2 * robustness_study.MAX_SEEDS  # crop's two variants; photometric's stage undecided
    said = robustness_study.store_while_checkpoint_exists(study, whole, cache=tmp_path / "cache")
    assert said.startswith(f"not stored: {whole}: no best.pt and no stored ranks at clutter 0.0")
    assert robustness_study.store_while_checkpoint_exists(study, late, cache=tmp_path / "cache") is None
    assert not (tmp_path / "cache").exists()  # nothing to evaluate with: no tree written
    evaluated = []
    monkeypatch.setattr(robustness, "evaluate_robustness", lambda runs, *args: evaluated.append((runs, args[-1])))
    assert robustness_study.store_while_checkpoint_exists(study, whole) == "its ranks at every strength are stored"
    assert evaluated == [({"run": [whole]}, tmp_path / "robustness" / "ranks")]
    # once the stages before photometric have decided (nothing adopted), its variant's runs are known
    # too; its baseline is crop's
    for experiment in catalogue.earlier("fixture", get_experiment("fixture", "photometric").stage):
        (tmp_path / experiment.name).mkdir(exist_ok=True)
        (tmp_path / experiment.name / "decision.json").write_text(json.dumps({"winner_overrides": {}}))
    photometric = study.configs(get_experiment("fixture", "photometric"))
    assert photometric["baseline"] == crop["baseline"]
    grayworld = {identity.run_key(replace(photometric["photometric=grayworld"], seed=s), sha) for s in range(3)}
    assert robustness_study.contrast_keys(study) == keys | grayworld and len(grayworld) == 3
