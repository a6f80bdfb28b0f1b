"""helpers.experiments.family: Holm over the study's Recall@5 tests as it stood at each decision and
once all have run (against statsmodels), the noise table's components and what doubling buys, and
the power calculator."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from statsmodels.stats.multitest import multipletests

from helpers.apps.cli import main
from helpers.core import config
from helpers.core.errors import InputError
from helpers.experiments import catalogue, comparison, family, statistics
from helpers.experiments.runs import metrics_from_ranks, slug
from helpers.experiments.study import Study, load_experiment
from tests.test_comparison import ranks_frame

SEEDS = (0, 1, 2, 3, 4)  # with 3 the seed part has 2 degrees of freedom: no effect survives Holm over 17 tests


def write_study(root, names=None, seeds_of=None) -> dict:
    """Every (or the named) fixture experiment finished by Study.write_experiment on made-up val
    ranks, each a run folder with its val_ranks.csv; the variants of crop, head and loss clearly
    better. ``seeds_of``: experiment → its seeds where not SEEDS."""
    rng = np.random.default_rng(11)
    items = [f"id_{i:02d}" for i in np.repeat(np.arange(30), rng.integers(1, 4, 30))]
    seeds_of = seeds_of or {}
    baseline = {s: list(rng.integers(0, 12, len(items))) for s in range(max(map(len, [SEEDS, *seeds_of.values()])))}
    base, study, results = config.get_config("fixture"), Study("fixture", root=root, n_seeds=len(SEEDS)), {}
    for experiment in catalogue.experiments("fixture"):
        if names is not None and experiment.name not in names:
            continue
        configs = catalogue.resolve_variants(experiment, base)
        rows, ranks = [], {}
        for variant in configs:
            for seed in seeds_of.get(experiment.name, SEEDS):
                better = variant != "baseline" and experiment.name in ("crop", "head", "loss")
                values = [0] * len(items) if better else baseline[seed] if variant == "baseline" else None
                values = values if values is not None else list(rng.integers(0, 12, len(items)))
                run_dir = f"{experiment.name}/{slug(variant)}_seed{seed}"
                (root / run_dir).mkdir(parents=True, exist_ok=True)
                frame = ranks_frame(values, items)
                frame.to_csv(root / run_dir / "val_ranks.csv", index=False)
                ranks[(variant, seed)] = frame
                metrics = {f"val_{m}": x for m, x in metrics_from_ranks(frame).items()}
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
                        "run_dir": run_dir,
                        "best_epoch": 1,
                        "epochs_run": 1,  # of 2: every run stopped early, at its best epoch
                        "wall_s": 90.0,
                        **metrics,
                    }
                )
        results[experiment.name] = study.write_experiment(experiment, pd.DataFrame(rows), ranks, configs)
    return results


def test_family_as_it_stood_at_each_decision_then_final(tmp_path):
    results = write_study(tmp_path)
    planned = sum(catalogue.planned_tests("fixture").values())
    first = results["crop"]["decision"]["family"]
    # crop decided first: its own test, every other planned test counted as p = 1
    assert (first["m"], first["pending"], first["planned"], first["earlier_tests"]) == (
        planned,
        planned - 1,
        planned,
        [],
    )
    # each later decision lists the earlier experiments' tests, in running order, with their p-values
    loss = results["loss"]["decision"]["family"]
    names = [t["experiment"] for t in loss["earlier_tests"]]
    assert names == sorted(names, key=list(catalogue.planned_tests("fixture")).index)
    # only primary tests join the family: augment, margin and photometric ran exploratory variants only
    assert set(names) == {"crop", "resize", "resolution", "head"}
    crop_p = results["crop"]["comparison"].loc["crop=False", "p_recall@5"]
    assert loss["earlier_tests"][0] == {"experiment": "crop", "variant": "crop=False", "p_recall@5": crop_p}
    assert results["batch"]["decision"]["family"]["pending"] == 0  # the last experiment with a primary test
    # the fixture drops a variant equal to its baseline in several experiments: the final family is smaller
    tables = {name: load_experiment(tmp_path, name)["comparison"] for name in results}
    rows = pd.concat([t.drop(index="baseline").assign(experiment=n) for n, t in tables.items()])
    exploratory = rows[rows["role_recall@5"] == "exploratory"]
    assert exploratory["p_holm_final_recall@5"].isna().all() and exploratory["low_adj_recall@5"].isna().all()
    assert set(exploratory.experiment) == {
        "augment",
        "margin",
        "photometric",
        "loss",
        "embed_dim",
        "length",
        "data_size",
    }
    rows = rows[rows["role_recall@5"] == "primary"]
    assert len(rows) == 6 < planned and (rows["holm_m_final_recall@5"] == 6).all()
    # final Holm over every finished test, as statsmodels computes it
    expected = multipletests(rows["p_recall@5"].to_numpy(), method="holm")[1]
    assert rows["p_holm_final_recall@5"].to_numpy() == pytest.approx(expected)
    # decisions taken early stay valid: the final values are never stricter than the decision's
    assert (rows["p_holm_final_recall@5"] <= rows["p_holm_recall@5"] + 1e-12).all()
    assert (rows["alpha_step_final_recall@5"] >= rows["alpha_step_recall@5"] - 1e-15).all()
    early = rows[rows["verdict_recall@5"] == "better"]
    assert set(early.experiment) == {"crop", "head"} and (early["verdict_final_recall@5"] == "better").all()
    # an exploratory variant clearly better on its raw interval is reported, never adopted
    assert tables["loss"].loc["loss=infonce", "verdict_recall@5"] == "better"
    assert results["loss"]["decision"]["winner"] == "baseline"
    for name, result in results.items():
        assert result["decision"]["winner"] == comparison.decide(tables[name])[0]  # the decision-time verdicts stay
    assert tables["crop"].loc["baseline", "verdict_final_recall@5"] == "baseline"
    # a second pass recomputes the same tests and rewrites nothing
    stamps = {n: (tmp_path / n / "comparison.csv").stat().st_mtime_ns for n in results}
    assert family.finalise("fixture", tmp_path) is not None
    assert {n: (tmp_path / n / "comparison.csv").stat().st_mtime_ns for n in results} == stamps


def test_final_family_waits_for_every_experiment(tmp_path):
    write_study(tmp_path, names={"crop", "resize"})
    assert family.finalise("fixture", tmp_path) is None
    table = load_experiment(tmp_path, "resize")["comparison"]
    assert "p_holm_final_recall@5" not in table.columns
    # resize decided after crop: crop's finished test in its family, the rest pending
    decision = load_experiment(tmp_path, "resize")["decision"]
    assert decision["family"]["pending"] == sum(catalogue.planned_tests("fixture").values()) - 2
    assert table.loc["resize=squash", "holm_m_recall@5"] == decision["family"]["m"]


def test_a_later_experiment_run_first_counts_its_predecessors_as_pending(tmp_path):
    """Out of running order, an experiment's family holds only the earlier-in-order finished tests."""
    write_study(tmp_path, names={"resize"})
    write_study(tmp_path, names={"crop"})
    crop = load_experiment(tmp_path, "crop")["decision"]["family"]
    assert crop["earlier_tests"] == [] and crop["pending"] == sum(catalogue.planned_tests("fixture").values()) - 1


def test_noise_table_components_and_what_doubling_buys(tmp_path):
    assert family.noise_table("fixture", tmp_path) is None  # nothing finished
    write_study(tmp_path)
    noise = family.noise_table("fixture", tmp_path)
    assert len(noise) == 14 and noise.iloc[-1].experiment == family.POOLED  # 13 comparisons + pooled
    rows = noise.set_index("variant")
    runs = pd.read_csv(tmp_path / "crop" / "runs.csv")
    frames = {(r.variant, r.seed): pd.read_csv(tmp_path / r.run_dir / "val_ranks.csv") for r in runs.itertuples()}
    grids = [comparison.hit_grid({s: frames[(v, s)] for s in SEEDS}, SEEDS, 5) for v in ("baseline", "crop=False")]
    items = comparison.query_items(frames[("baseline", 0)])
    test = statistics.crossed_test(*grids, items)
    row = rows.loc["crop=False"]
    assert (row.n_seeds, row.n_items, row.n_queries) == (len(SEEDS), len(set(items)), len(items))
    parts = test.components
    assert row["var_seed_recall@5"] == parts.seed and row["var_inter_recall@5"] == parts.interaction
    # SE = sqrt(seed / S + item / I + inter / (S I)); doubling S or I divides the matching parts by 2
    s, i = len(SEEDS), len(set(items))
    assert row["se_recall@5"] == pytest.approx(np.sqrt(parts.seed / s + parts.item / i + parts.interaction / (s * i)))
    halved = np.sqrt(parts.seed / (2 * s) + parts.item / i + parts.interaction / (2 * s * i))
    assert row["se_2x_seeds_recall@5"] == pytest.approx(halved)
    shares = [row[f"share_{k}_recall@5"] for k in ("seed", "item", "inter")]
    assert sum(shares) == pytest.approx(1.0)
    pooled = noise.iloc[-1]
    assert pooled["var_seed_recall@5"] >= 0
    noise.to_csv(tmp_path / family.NOISE, index=False)
    back = family.pooled_from(tmp_path / family.NOISE)
    assert back.seed == pytest.approx(pooled["var_seed_recall@5"])


def test_the_pooled_noise_is_read_at_the_design_most_primary_tests_run_on(tmp_path):
    write_study(tmp_path, seeds_of={"batch": tuple(range(8))})  # one primary test re-sized to 8 seeds
    noise = family.noise_table("fixture", tmp_path).set_index("experiment")
    assert noise.loc["batch", "n_seeds"] == 8
    pooled = noise.loc[family.POOLED]
    assert pooled.n_seeds == len(SEEDS)
    parts = statistics.Components(
        pooled["var_seed_recall@5"], pooled["var_item_recall@5"], pooled["var_inter_recall@5"]
    )
    assert pooled["se_recall@5"] == pytest.approx(parts.se(len(SEEDS), pooled.n_items))


def test_power_plan_and_its_command(tmp_path, monkeypatch, capsys):
    parts = statistics.Components(seed=2.17e-4, item=7.98e-3, interaction=4.53e-2)
    plan = family.power_plan(parts, seeds=[3, 5], items=[75, 300], m=11, target=0.05).set_index(["seeds", "val_items"])
    # more seeds or items never raise the MDE; Holm's level never lowers it
    assert plan.loc[(5, 300), "mde_holm_m11"] < plan.loc[(3, 300), "mde_holm_m11"] < plan.loc[(3, 75), "mde_holm_m11"]
    assert (plan["mde_holm_m11"] > plan["mde_0.05"]).all()
    assert plan.loc[(3, 75), "se"] == pytest.approx(parts.se(3, 75))
    assert plan.loc[(5, 300), "meets_target"] == (plan.loc[(5, 300), "mde_holm_m11"] <= 0.05)
    pd.DataFrame(
        [
            {
                "experiment": family.POOLED,
                "variant": family.POOLED,
                "var_seed_recall@5": parts.seed,
                "var_item_recall@5": parts.item,
                "var_inter_recall@5": parts.interaction,
            }
        ]
    ).to_csv(tmp_path / family.NOISE, index=False)
    from helpers.experiments import artifacts

    monkeypatch.setattr(artifacts, "results_root", lambda profile: tmp_path)
    args = ["study", "power", "--profile", "demo", "--seeds-list", "3,5", "--items", "75,300", "--target", "0.05"]
    assert main(args) == 2  # a noise.csv with the pooled row alone does not say how large the family was
    assert main([*args, "--family", "11"]) == 0
    out = capsys.readouterr().out
    assert "seed x item" in out and "mde_holm_m11" in out and "meets_target" in out
    assert main(["study", "power", "--profile", "demo", "--items", "x"]) == 2
    assert main(["study", "power", "--profile", "demo", "--family", "0"]) == 2


def test_an_interim_look_pools_the_finished_experiments_alone(tmp_path, capsys):
    with pytest.raises(InputError, match="no finished experiment"):
        family.interim_components("fixture", tmp_path)
    write_study(tmp_path, names={"crop", "resize"})
    pooled, compared = family.interim_components("fixture", tmp_path)
    assert compared == ["crop/crop=False", "resize/resize=squash"]
    parts = []  # each comparison's crossed test recomputed from its runs' val ranks
    for name, variant in (("crop", "crop=False"), ("resize", "resize=squash")):
        runs = pd.read_csv(tmp_path / name / "runs.csv")
        frames = {(r.variant, r.seed): pd.read_csv(tmp_path / r.run_dir / "val_ranks.csv") for r in runs.itertuples()}
        grids = [comparison.hit_grid({s: frames[(v, s)] for s in SEEDS}, SEEDS, 5) for v in ("baseline", variant)]
        parts.append(statistics.crossed_test(*grids, comparison.query_items(frames[("baseline", 0)])).components)
    assert pooled == statistics.pooled_components(parts)
    args = ["study", "power", "--profile", "fixture", "--interim", str(tmp_path), "--seeds-list", "3", "--items", "30"]
    assert main(args) == 0
    out = capsys.readouterr().out
    planned = sum(catalogue.planned_tests("fixture").values())
    assert "crop/crop=False, resize/resize=squash" in out and f"Holm's family: {planned} Recall@5 tests" in out
    assert f"mde_holm_m{planned}" in out
    assert main([*args, "--out", str(tmp_path / "look" / "interim_power.csv")]) == 0
    written = pd.read_csv(tmp_path / "look" / "interim_power.csv")
    assert written[f"mde_holm_m{planned}"].to_numpy() == pytest.approx(
        family.power_plan(pooled, [3], [30], planned)[f"mde_holm_m{planned}"].to_numpy()
    )
    assert main([*args, "--noise", str(tmp_path / family.NOISE)]) == 2  # two sources: which one?
    assert main(["study", "power", "--profile", "fixture", "--interim", str(tmp_path / "absent")]) == 2
    assert "no such study folder" in capsys.readouterr().err


def test_the_report_shows_the_holm_columns_and_the_noise(tmp_path):
    from helpers.reporting import check, compose, sections
    from tests.test_report import write_prose

    results = tmp_path / "results"
    write_study(results)
    summary = {"profile": "fixture", "data_source": "synthetic, not DeepFashion", "table_sha256": "ab12cd34ef56"}
    splits = {"val": {"items": 30, "consumer_images": 60, "shop_images": 30, "pairs": 60}}
    (results / "data_summary.json").write_text(json.dumps({**summary, "splits": splits}))
    write_prose(tmp_path / "prose", cite="Section 2")
    before = {p: p.read_bytes() for p in results.rglob("comparison.csv")}
    compose.build(results, tmp_path / "report", prose=tmp_path / "prose")
    assert {p: p.read_bytes() for p in results.rglob("comparison.csv")} == before  # the report only reads
    text = (tmp_path / "report" / "report.md").read_text()
    assert "ΔR@5 [Holm CI] | p / Holm p | MDE R@5 (0.05 / Holm) | Holm p, whole family" in text
    assert "ΔR@1 [95 % CI, exploratory]" in text and "crossed random effects" in text
    crop = load_experiment(results, "crop")["comparison"].loc["crop=False"]
    assert f"{crop['p_recall@5']:.4f} / {crop['p_holm_recall@5']:.4f}" in text
    assert f"[{crop['low_adj_recall@5']:+.3f}, {crop['high_adj_recall@5']:+.3f}] better" in text
    assert check.untraceable_numbers(compose.results_text(text), results) == []
    noise = " ".join(sections.noise_lines(results))
    assert "from their interaction" in noise and "twice the val items" in noise
    assert check.untraceable_numbers(noise, results) == []


def test_effects_rank_every_comparison_with_its_deciding_interval(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    from helpers.evaluation import plots

    write_study(tmp_path)
    effects = family.effects("fixture", tmp_path)
    assert len(effects) == 13 and effects["diff"].is_monotonic_decreasing
    for row in effects.itertuples():
        table = load_experiment(tmp_path, row.experiment)["comparison"].loc[row.variant]
        # a primary test: at its Holm level over the whole family once the study has finished
        final = "_final" if row.role == "primary" and pd.notna(table.get("low_adj_final_recall@5")) else ""
        infix = f"_adj{final}" if row.role == "primary" else ""
        assert (row.low, row.high) == (table[f"low{infix}_recall@5"], table[f"high{infix}_recall@5"])
        assert row.mde == table[f"mde_holm{final}_recall@5" if row.role == "primary" else "mde_recall@5"]
        assert (row.role, row.verdict) == (table["role_recall@5"], table[f"verdict{final}_recall@5"])
    figure = plots.plot_effects(effects)
    assert [t.get_text() for t in figure.axes[0].get_yticklabels()] == [
        f"{e}: {v}" for e, v in zip(effects.experiment, effects.variant)
    ]


def test_the_power_plan_sizes_every_planned_comparison_before_the_runs(tmp_path, monkeypatch):
    components = statistics.Components(2.17e-4, 7.98e-3, 4.53e-2)  # seed, item, seed × item
    plan = family.study_plan("demo", components, 5, 3, 400)
    primary, exploratory = plan[plan.role == "primary"], plan[plan.role == "exploratory"]
    assert len(primary) == sum(catalogue.planned_tests("demo").values()) == 8
    assert (primary.seeds == 5).all() and (exploratory.seeds == 3).all() and (plan.val_items == 400).all()
    assert primary.level.to_numpy() == pytest.approx(0.05 / 8) and (exploratory.level == 0.05).all()
    expected = statistics.planned_mde(components, 5, 400, 8)["mde"]
    assert primary["mde_recall@5"].to_numpy() == pytest.approx(expected) and expected <= family.TARGET_MDE
    assert primary.meets_target.all() and not exploratory.meets_target.any()
    # written once: a second call reads the plan back, whatever noise.csv says by then
    write_study(tmp_path / "earlier")
    family.write_noise("fixture", tmp_path / "earlier")
    study = Study("demo", root=tmp_path / "study", n_seeds=5)
    monkeypatch.setattr(Study, "compare_items", lambda self: 30)
    written = study.write_power_plan(tmp_path / "earlier" / family.NOISE)
    text = (tmp_path / "study" / family.POWER_PLAN).read_text()
    (tmp_path / "earlier" / family.NOISE).unlink()
    pd.testing.assert_frame_equal(study.write_power_plan(tmp_path / "earlier" / family.NOISE), written)
    assert (tmp_path / "study" / family.POWER_PLAN).read_text() == text
    assert written.components_from.iloc[0].startswith("pooled over ") and written.components_from.nunique() == 1


def test_a_revised_power_plan_reads_the_components_of_an_interim_look(tmp_path, monkeypatch, capsys):
    earlier = tmp_path / "earlier_design"
    write_study(earlier, names={"crop", "resize"})
    pooled, _ = family.interim_components("demo", earlier)
    monkeypatch.setattr(Study, "compare_items", lambda self: 700)
    args = ["study", "plan", "--profile", "demo", "--results", str(tmp_path / "study"), "--interim", str(earlier)]
    assert main(args) == 0
    plan = pd.read_csv(tmp_path / "study" / family.POWER_PLAN)
    primary = plan[plan.role == "primary"]
    assert primary["mde_recall@5"].to_numpy() == pytest.approx(statistics.planned_mde(pooled, 5, 700, 8)["mde"])
    assert plan["var_item_recall@5"].to_numpy() == pytest.approx(pooled.item) and (plan.val_items == 700).all()
    assert (
        plan.components_from == "interim look at " + str(earlier) + " (crop/crop=False, resize/resize=squash)"
    ).all()
    assert "components: interim look at" in capsys.readouterr().out
    assert main([*args, "--noise", str(earlier / family.NOISE)]) == 2  # two sources of the components
    assert "not allowed with argument" in capsys.readouterr().err
