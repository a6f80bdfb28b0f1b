"""Section 4 of the paper, the results, for one ``results/<profile>`` folder: the whole study in one
figure and its budget, then per stage its findings (written) and each experiment's table, adopted
variant, differences and learning curves, then the post-processing experiment, the final
configuration and its one evaluation on test. Markdown lines with ``{def:tab:x}`` / ``{def:fig:x}``
labels, like :mod:`helpers.reporting.sections`.
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from helpers.evaluation import failures, plots
from helpers.experiments import family, robustness, robustness_study, study
from helpers.reporting.sections import copied_figure, save_figure
from helpers.reporting.tables import experiment_table, final_rows, md_table, seed_rows


def overview_lines(loaded: dict, tag: str, figures: Path) -> list[str]:
    """The baseline's learning curve (how long to train), the whole study in one ranked figure, and
    what its runs say about the budget."""
    lines = curve_lines(loaded, tag, figures)
    rows = family.effects(loaded["profile"], loaded["root"])
    if len(rows):
        target = save_figure(plots.plot_effects(rows), figures / f"{loaded['profile']}_overview.png")
        lines += [
            f"![the study's effects, ranked](figures/{target.name})",
            "",
            f"*{{def:fig:{tag}overview}}: every effect of the study, ranked: each variant's difference in val "
            "Recall@5 points from its experiment's baseline with the interval that decides its verdict (filled: "
            "primary, at the level of its Holm step; hollow: exploratory, uncorrected 95 %); grey: ± the "
            "comparison's minimum detectable effect.*",
            "",
        ]
    record = loaded["root"] / "final_config.json"
    summary = json.loads(record.read_text()).get("runs") if record.is_file() else None
    if summary:
        lines += [
            f"**Budget.** Of the study's {summary['distinct_runs']} distinct runs"
            + shortened_sentence(summary["distinct_runs"], summary.get("shortened_runs", 0))
            + f", {summary['best_at_last_epoch']} "
            f"({summary['best_at_last_epoch_percent']} %) had their best val Recall@5 at their last epoch and "
            f"{summary.get('best_in_last_two_epochs', summary['best_at_last_epoch'])} "
            f"({summary.get('best_in_last_two_epochs_percent', summary['best_at_last_epoch_percent'])} %) in their "
            f"last two, i.e. were still improving when they ended; {summary['stopped_early']} stopped early. "
            f"Their summed wall time was {summary['wall_hours']} h"
            + (f" (all {summary['distinct_runs']} runs)." if summary.get("shortened_runs") else ".")
            + stop_gap_sentence(summary.get("stop_gap"))
            + end_slope_sentence(summary.get("end_slope"))
            + robustness_cost_sentence(loaded["root"])
            + (f" {{tab:{tag}costs}} gives what each question cost." if summary.get("costs") else ""),
            "",
        ]
        if summary.get("costs"):
            lines += [cost_table(summary["costs"]), "", f"*{{def:tab:{tag}costs}}: {COST_CAPTION}*", ""]
    return lines


def shortened_sentence(distinct: int, shortened: int) -> str:
    """Which runs the plateau counts read: all, or all but the ``length`` experiment's shorter schedules."""
    if not shortened:
        return ""
    return (
        f", {distinct - shortened} trained to its full epoch budget "
        f"(the `length` experiment's {shortened} shorter {'one' if shortened == 1 else 'ones'} aside); of these"
    )


COST_CAPTION = (
    "what each question cost: the training runs each experiment added (a stage's baseline counted in the "
    "first experiment that trained it), their summed wall time on the study's machine and the median "
    "number of epochs they ran, from `final_config.json`."
)


def cost_table(costs: list[dict]) -> str:
    return md_table(
        pd.DataFrame(
            {
                "experiment": [f"`{c['experiment']}`" for c in costs],
                "runs trained": [c["runs"] for c in costs],
                "summed wall time (h)": [f"{c['wall_hours']:.2f}" for c in costs],
                "median epochs": ["—" if c["median_epochs"] is None else f"{c['median_epochs']:g}" for c in costs],
            }
        )
    )


def robustness_cost_sentence(root: Path) -> str:
    """The robustness experiment's evaluation time (its ``run.json``), which trains nothing."""
    path = Path(root) / robustness_study.ROBUSTNESS / "run.json"
    seconds = json.loads(path.read_text()).get("wall_s") if path.is_file() else None
    return "" if seconds is None else f" Evaluating the robustness experiment, which trains nothing, took {seconds} s."


def end_slope_sentence(slope: dict | None) -> str:
    """Whether the runs at the cap had levelled off (:func:`helpers.experiments.runs.end_slope`), as a sentence."""
    if not slope:
        return ""
    return (
        f" Over the last {slope['epochs']} epochs of the {slope['runs']} runs that reached the epoch cap, val "
        f"Recall@5 (stop items) moved {slope['slope']:+.4f} an epoch on average, 95 % interval "
        f"[{slope['low']:+.4f}, {slope['high']:+.4f}]."
    )


def stop_gap_sentence(gap: dict | None) -> str:
    """Early-stopped runs against those at the cap (:func:`helpers.experiments.runs.stop_gap`), as a
    sentence of the budget paragraph; empty when no configuration had both."""
    if not gap:
        return ""
    interval = "" if gap["low"] is None else f", 95 % interval [{gap['low']:+.3f}, {gap['high']:+.3f}]"
    return (
        f" In the {gap['configurations']} configurations that had runs stopped early and runs that reached the "
        f"epoch cap, the {gap['early_runs']} stopped early compared {gap['gap']:+.3f} val Recall@5{interval} "
        f"against the {gap['capped_runs']} at the cap (a stopped run is one whose stop items stalled: an "
        "association, not what further epochs would have added)."
    )


def curve_lines(loaded: dict, tag: str, figures: Path) -> list[str]:
    """The study's first figure: its baseline recipe's learning curve over seeds, which answers how
    long the recipe needs to train by itself."""
    first = study.experiments(loaded["profile"])[0].name
    if not (loaded["root"] / first / "runs.csv").is_file():
        return []
    history = study.experiment_history(loaded["root"], first)
    history = history[history.variant == "baseline"]
    best = history[history.best].epoch
    target = save_figure(
        plots.plot_learning_curves(history, "the baseline recipe"), figures / f"{loaded['profile']}_baseline_curve.png"
    )
    return [
        f"![the baseline recipe's learning curve](figures/{target.name})",
        "",
        f"*{{def:fig:{tag}curve}}: how long to train: the baseline recipe over its {history.seed.nunique()} seeds, "
        "train loss and val Recall@5 per epoch (val: the items that choose each run's epoch); each run stops "
        "after its patience without a better val Recall@5, and its best epochs range from "
        f"{best.min()} to {best.max()}.*",
        "",
    ]


def experiment_lines(
    loaded: dict, experiment: study.Experiment, result: dict | None, tag: str, figures: Path, level: str
) -> list[str]:
    head = [f"{level}# {experiment.name}: {experiment.question}", ""]
    if result is None:
        return head + ["Not run yet (no `decision.json`).", ""]
    profile = loaded["profile"]
    comparison, decision = result["comparison"], result["decision"]
    figure = figures / f"{profile}_{experiment.name}.png"
    curves = figures / f"{profile}_{experiment.name}_curves.png"
    save_figure(plots.plot_experiment(comparison, f"{experiment.name} ({profile})"), figure)
    history = study.experiment_history(loaded["root"], experiment.name)
    save_figure(plots.plot_learning_curves(history, f"{experiment.name} ({profile})"), curves)
    table = md_table(experiment_table(comparison, decision))
    adopted = f"**Adopted: {decision['winner']}.** {decision['why']}."
    name = f"{tag}{experiment.name}"
    return head + [
        f"*{{def:tab:{name}}}: `{experiment.name}`, val Recall@K per variant and its difference with the baseline "
        "(columns defined in Section 3)"
        + (
            f"; Holm-corrected at decision time over {decision['family']['m']} Recall@5 tests, "
            f"{decision['family']['pending']} of them planned and not run yet.*"
            if "family" in decision
            else ".*"
        ),
        "",
        table,
        "",
        adopted,
        "",
        f"![{experiment.name}](figures/{figure.name})",
        "",
        f"*{{def:fig:{name}}}: `{experiment.name}`, the differences of {{tab:{name}}} with their intervals.*",
        "",
        f"![{experiment.name}: learning curves](figures/{curves.name})",
        "",
        f"*{{def:fig:{name}_curves}}: learning curves of `{experiment.name}` (definition: Section 3).*",
        "",
    ]


def postprocess_lines(loaded: dict, tag: str, figures: Path, level: str) -> list[str]:
    """The post-processing experiment on the final configuration's runs (no training), when it has run."""
    root, profile = loaded["root"], loaded["profile"]
    if not (root / study.POSTPROCESS / "decision.json").is_file():
        return []
    result = study.load_experiment(root, study.POSTPROCESS)
    comparison = result["comparison"].rename(index={"none": "baseline"})
    decision = {**result["decision"], "baseline": {"postprocess": "none"}}
    figure = figures / f"{profile}_{study.POSTPROCESS}.png"
    save_figure(plots.plot_experiment(comparison, f"{study.POSTPROCESS} ({profile})"), figure)
    name = f"{tag}{study.POSTPROCESS}"
    return [
        f"{level} Post-processing: {decision['question']}",
        "",
        f"*{{def:tab:{name}}}: `{study.POSTPROCESS}`, every seed's run of the final configuration ranked without "
        "post-processing (baseline) and with each method, paired by seed and query as in the experiments; Holm "
        f"over this experiment's {decision['family']['m']} Recall@5 tests (no training changed, so they are not "
        "in the study's family).*",
        "",
        md_table(experiment_table(comparison, decision)),
        "",
        f"**Adopted: {decision['winner']}.** {decision['why']}.",
        "",
        f"![{study.POSTPROCESS}](figures/{figure.name})",
        "",
        f"*{{def:fig:{name}}}: `{study.POSTPROCESS}`, the differences of {{tab:{name}}} with their intervals.*",
        "",
    ]


def final_lines(loaded: dict, tag: str, figures: Path, level: str) -> list[str]:
    root, source, profile = loaded["root"], loaded["source"], loaded["profile"]
    lines = [f"{level} Final configuration", ""]
    final_config = root / "final_config.json"
    if not final_config.is_file():
        return lines + ["Not decided yet: `final_config.json` is written when every experiment has finished.", ""]
    record = json.loads(final_config.read_text())
    config = pd.DataFrame([{"field": k, "value": v} for k, v in record["config"].items()])
    decisions = pd.DataFrame(record["decisions"])[["stage", "experiment", "winner"]]
    decisions["stage"] = "`" + decisions.stage + "`"
    lines += [
        f"Rule: {record['rule']}.",
        "",
        f"*{{def:tab:{tag}final_config}}: the final configuration, from `final_config.json`.*",
        "",
        md_table(config),
        "",
        f"*{{def:tab:{tag}decisions}}: the winner of each experiment.*",
        "",
        md_table(decisions),
        "",
    ]
    lines += postprocess_lines(loaded, tag, figures, level)
    metrics_path = root / "final" / "metrics.json"
    if not metrics_path.is_file():
        return lines + ["Test: not evaluated yet (`04_demo` writes `final/metrics.json`).", ""]
    final = json.loads(metrics_path.read_text())
    over = "items" if "over items" in final["protocols"].get("official", {}).get("ci", "over items") else "queries"
    lines += [f"{level} Test: the final configuration, evaluated once", ""]
    if final.get("seeds"):
        lines += [
            f"*{{def:tab:{tag}test_seeds}}: split test, official protocol; data: {source}; profile `{profile}`; "
            "each seed's run of the final configuration (its `best.pt`, chosen on val), with that seed's 95 % "
            f"percentile bootstrap interval over {over}; then mean and sample std over seeds"
            + (
                "; below, the same for the default recipe (the study's baseline)"
                if final.get("default_recipe_seeds")
                else ""
            )
            + ".*",
            "",
            md_table(seed_rows(final)),
            "",
        ]
    lines += [
        f"*{{def:tab:{tag}test}}: split test; data: {source}; profile `{profile}`; "
        + (
            f"the run of seed {final['demo_seed']} (the best on val), "
            if "demo_seed" in final
            else "one training run, "
        )
        + "under every protocol, beside the same backbone untrained (zero-shot); 95 % percentile bootstrap intervals "
        f"over {over}. The original study's row is its published number under its own pair-row protocol on "
        "DeepFashion.*",
        "",
        md_table(final_rows(final, source, profile)),
        "",
        "Protocols: "
        + "; ".join(
            f"`{p}`: {r['protocol_definition']}" for p, r in final["protocols"].items() if "protocol_definition" in r
        )
        + ".",
        "",
        "The original study's numbers are not comparable with `official`: its queries were pair rows and its gallery "
        "repeated each shop image once per pair row, within the split only; only our `original_pairs` "
        "row uses its protocol, and "
        + (
            "on synthetic data, not DeepFashion, so even that row is no comparison of methods."
            if "not DeepFashion" in source
            else "on our sample of DeepFashion."
        ),
        "",
    ]
    categories = final["protocols"].get("official", {}).get("per_category")
    if categories:
        lines += [
            f"*{{def:tab:{tag}categories}}: official protocol on test, per category of the query's item "
            f"(the run of {table_subject(final)}).*",
            "",
            md_table(
                pd.DataFrame(
                    [
                        {
                            "category": c,
                            "queries": v["n_queries"],
                            **{f"R@{k}": f"{v[f'recall@{k}']:.3f}" for k in study.KS},
                        }
                        for c, v in categories.items()
                    ]
                )
            ),
            "",
        ]
    lines += copied_figure(
        root / "final" / "success_failure.png",
        figures / f"{profile}_success_failure.png",
        "successes and failures",
        f"*{{def:fig:{tag}examples}}: test queries with the best and the worst rank of first hit (chosen by rank, "
        f"not by hand; {table_subject(final)}): the garment crop, then its top-5 shop images; green: the query's "
        "own item.*",
    )
    return lines + failure_lines(loaded, tag, figures, final) + robustness_lines(loaded, tag, figures, level)


def failure_summaries(root: Path) -> dict[str, pd.DataFrame]:
    """``04_demo``'s ``final/failures_by_*.csv`` that exist, in :data:`failures.GROUPS`' order:
    group name → Recall@5 per group."""
    paths = {name: Path(root) / "final" / f"failures_by_{name}.csv" for name in failures.GROUPS}
    return {name: pd.read_csv(path, index_col=0) for name, path in paths.items() if path.is_file()}


def failure_panels(summaries: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """:func:`failure_summaries` titled for a figure of panels: a panel's title → table."""
    return {failures.GROUPS[name][2]: summary for name, summary in summaries.items()}


def failure_lines(loaded: dict, tag: str, figures: Path, final: dict) -> list[str]:
    """Where the final model fails on test: one figure, a panel of Recall@5 per grouping of
    ``04_demo``'s ``failures_by_*.csv``."""
    summaries = failure_summaries(loaded["root"])
    if not summaries:
        return []
    measured = {"occlusion", "clutter", "colour_cast"} & set(summaries)
    how = " (the nuisances as measured when each synthetic photo was drawn)" if measured else ""
    groups = ", ".join(f"{failures.GROUPS[n][2]}: {failures.GROUPS[n][3]}" for n in summaries)
    figure = failures.plot_recall_by_groups(
        failure_panels(summaries), overall=final["protocols"]["official"]["recall@5"]
    )
    target = save_figure(figure, figures / f"{loaded['profile']}_failures.png")
    return [
        f"![where the final model fails](figures/{target.name})",
        "",
        f"*{{def:fig:{tag}failures}}: where the final model fails: test Recall@5 ({table_subject(final)}, official "
        f"protocol) by group ({groups}){how}, numbers in quartile bins, with 95 % bootstrap intervals over items; "
        "hollow grey: a group of few items; dashed: the whole test split.*",
        "",
    ]


def robustness_lines(loaded: dict, tag: str, figures: Path, level: str) -> list[str]:
    """The robustness experiment: val Recall@5 as each nuisance is turned up, per contrast."""
    tables = robustness_study.load_robustness(loaded["root"])
    if tables is None:
        return []
    target = save_figure(
        robustness.plot_dose_response(tables["recall"]), figures / f"{loaded['profile']}_robustness.png"
    )
    differences = tables["differences"].assign(
        contrast=lambda t: t.variant + " − " + t.reference,
        cell=lambda t: [
            f"**{d:+.3f}** [{lo:+.3f}, {hi:+.3f}]" if v in ("better", "worse") else f"{d:+.3f} [{lo:+.3f}, {hi:+.3f}]"
            for d, lo, hi, v in zip(t["diff"], t.low, t.high, t.verdict)
        ],
    )
    # One row per contrast and nuisance, one column per strength: the dose-response reads across.
    rows = differences.pivot_table(
        index=["contrast", "nuisance"], columns="strength", values="cell", aggfunc="first", sort=False
    )
    rows = rows[sorted(rows.columns)].rename(columns=lambda s: f"strength {s:g}").fillna("—").reset_index()
    return [
        f"{level} Robustness: when do the crop and the photometric normalisation matter?",
        "",
        f"![robustness](figures/{target.name})",
        "",
        f"*{{def:fig:{tag}robustness}}: val Recall@5 of runs evaluated, without retraining, on val trees whose consumer "
        "photos carry one nuisance at several strengths (synthetic data; the dotted line: the strength the runs "
        "trained on), with intervals over seeds × items.*",
        "",
        f"*{{def:tab:{tag}robustness}}: each contrast's paired difference in val Recall@5 at each strength, with "
        "its uncorrected 95 % interval (exploratory); bold: the interval excludes 0; —: a strength not written for "
        "that nuisance.*",
        "",
        md_table(rows),
        "",
    ]


def table_subject(final: dict) -> str:
    return f"seed {final['demo_seed']}" if "demo_seed" in final else "the final model"
