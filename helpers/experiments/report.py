"""``report/`` from ``results/`` only: ``report.md``, its HTML rendering, a markdown slide deck
(``slides.md``, one ``---`` per slide) and the figures, so the written story and the talk can
never disagree with the runs.

Every number printed comes from a file under ``results/<profile>/`` (``data_summary.json``,
each experiment's ``comparison.csv`` / ``decision.json`` written by :mod:`helpers.experiments.study`,
``final_config.json`` and ``final/metrics.json`` written by ``04_demo``), formatted, never
computed anew; :func:`untraceable_numbers` checks that. Every table says its protocol, split,
data source, profile and seeds. The one write into ``results/``: once every experiment of a
profile has finished, :func:`helpers.experiments.study.finalise_family` adds the whole family's
Holm values to the comparisons (a no-op before, and for tables written without the correction).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.core.files import write_text_atomic
from helpers.evaluation import plots
from helpers.experiments import study

PROFILE_ORDER = ("full", "demo", "fixture")  # the real study first when it exists
VAL_PROTOCOL = (
    "official protocol on val: queries = unique val consumer images, gallery = unique val shop images "
    "(model selection never sees test)"
)


# --------------------------------------------------------------------------- formatting


def md_table(frame: pd.DataFrame) -> str:
    """A GitHub-flavoured markdown table of ``frame`` (index dropped; cells as strings)."""
    header = "| " + " | ".join(map(str, frame.columns)) + " |"
    rule = "|" + "|".join("---" for _ in frame.columns) + "|"
    body = ["| " + " | ".join(str(v).replace("|", "\\|") for v in row) + " |" for row in frame.itertuples(index=False)]
    return "\n".join([header, rule, *body])


def mean_std(mean: float, std: float) -> str:
    """``0.376 ± 0.012``; one seed has no spread: ``0.376``."""
    return f"{mean:.3f}" if pd.isna(std) else f"{mean:.3f} ± {std:.3f}"


def difference(diff: float, low: float, high: float, verdict: str) -> str:
    """``+0.012 [-0.010, +0.034] within noise``; the baseline row: ``baseline``."""
    if pd.isna(diff):
        return verdict
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}] {verdict}"


def with_ci(result: dict, metric: str) -> str:
    ci = result.get(f"{metric}_ci")
    return f"{result[metric]:.3f}" + (f" [{ci[0]:.3f}, {ci[1]:.3f}]" if ci else "")


# --------------------------------------------------------------------------- tables


def _label(variant: str, decision: dict) -> str:
    if variant != "baseline":
        return variant
    return "baseline (" + ", ".join(f"{k}={v}" for k, v in decision["baseline"].items()) + ")"


def experiment_table(comparison: pd.DataFrame, decision: dict) -> pd.DataFrame:
    """Per variant: seeds, val Recall@1/5/10 mean ± std, paired differences with intervals and
    verdicts against the experiment's own baseline (Holm-corrected for Recall@5 when the table
    has the correction: :func:`holm_table`)."""
    if f"p_holm_{study.PRIMARY}" in comparison.columns:
        return holm_table(comparison, decision)
    rows = []
    for variant, row in comparison.iterrows():
        rows.append(
            {
                "variant": _label(variant, decision),
                "seeds": int(row.n_seeds),
                **{f"R@{k}": mean_std(row[f"val_recall@{k}_mean"], row[f"val_recall@{k}_std"]) for k in study.KS},
                **{
                    f"ΔR@{k} [{decision['ci_percent']} % CI]": difference(
                        row[f"diff_recall@{k}"],
                        row[f"low_recall@{k}"],
                        row[f"high_recall@{k}"],
                        row[f"verdict_recall@{k}"],
                    )
                    for k in study.KS
                },
            }
        )
    return pd.DataFrame(rows)


def _interval(diff: float, low: float, high: float, label: str) -> str:
    """``+0.012 [-0.010, +0.034]``; a row without a difference: its label (``baseline``, ``no pairs``)."""
    return label if pd.isna(diff) else f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]"


def holm_table(comparison: pd.DataFrame, decision: dict) -> pd.DataFrame:
    """:func:`experiment_table` of a table with Holm's correction: Recall@5's raw interval, its
    Holm-adjusted interval and verdict, raw and Holm p-values and minimum detectable effect as
    the decision used them, and Holm over the whole family once every experiment has finished;
    Recall@1 and @10 with raw intervals, exploratory."""
    primary, percent, final = study.PRIMARY, decision["ci_percent"], f"p_holm_final_{study.PRIMARY}"
    rows = []
    for variant, row in comparison.iterrows():
        label, tested = row[f"verdict_{primary}"], not pd.isna(row[f"p_{primary}"])
        rows.append(
            {
                "variant": _label(variant, decision),
                "seeds": int(row.n_seeds),
                **{f"R@{k}": mean_std(row[f"val_recall@{k}_mean"], row[f"val_recall@{k}_std"]) for k in study.KS},
                f"ΔR@5 [{percent} % CI]": _interval(
                    row[f"diff_{primary}"], row[f"low_{primary}"], row[f"high_{primary}"], label
                ),
                "ΔR@5 [Holm CI]": difference(
                    row[f"diff_{primary}"], row[f"low_adj_{primary}"], row[f"high_adj_{primary}"], label
                ),
                "p / Holm p": f"{row[f'p_{primary}']:.4f} / {row[f'p_holm_{primary}']:.4f}" if tested else "—",
                "MDE R@5": f"{row[f'mde_{primary}']:.3f}" if tested else "—",
                **(
                    {"Holm p, whole family": f"{row[final]:.4f} {row[f'verdict_final_{primary}']}" if tested else "—"}
                    if final in comparison.columns
                    else {}
                ),
                **{
                    f"ΔR@{k} [{percent} % CI, exploratory]": difference(
                        row[f"diff_recall@{k}"],
                        row[f"low_recall@{k}"],
                        row[f"high_recall@{k}"],
                        row[f"verdict_recall@{k}"],
                    )
                    for k in study.KS
                    if f"recall@{k}" != primary
                },
            }
        )
    return pd.DataFrame(rows)


def caption(decision: dict, data_source: str, comparison: pd.DataFrame | None = None) -> str:
    """The table's caption (Holm's correction described when the decision used it); ``comparison``
    names the whole-family column when it has one."""
    if "family" in decision:
        return holm_caption(decision, data_source, comparison)
    seeds = ", ".join(map(str, decision["seeds"]))
    return (
        f"*{VAL_PROTOCOL}; split val; data: {data_source}; profile `{decision['profile']}`; seeds {seeds}. "
        f"Mean ± sample std over seeds; Δ = variant − baseline, paired by seed and query, "
        f"{decision['ci_percent']} % percentile bootstrap resampling seeds and queries together "
        f"(n_boot {decision['n_boot']}); verdict `better` / `worse` when the interval excludes 0.*"
    )


def holm_caption(decision: dict, data_source: str, comparison: pd.DataFrame | None) -> str:
    seeds = ", ".join(map(str, decision["seeds"]))
    family = decision["family"]
    final = f"holm_m_final_{study.PRIMARY}"
    sizes = comparison[final].dropna() if comparison is not None and final in comparison.columns else []
    return (
        f"*{VAL_PROTOCOL}; split val; data: {data_source}; profile `{decision['profile']}`; seeds {seeds}. "
        "Mean ± sample std over seeds; Δ = variant − baseline, paired by seed and query; bootstrap "
        f"(n_boot {decision['n_boot']}) resampling seeds, then items with all their queries; two-sided bootstrap "
        f"p-values. Recall@5 decides, Holm-corrected at decision time over {family['m']} Recall@5 tests: those "
        f"finished and the planned ones not run yet ({family['pending']}, counted as p = 1, which only makes the "
        "correction stricter): "
        "the Holm CI is the percentile interval at the level Holm's step gives the test, the verdict `better` / "
        f"`worse` when it excludes 0 and Holm p < {family['alpha']}; MDE: the difference detected with power "
        f"{family['power']} at that level."
        + (
            f" Whole family: Holm over all {int(sizes.iloc[0])} Recall@5 tests of the finished study, never above "
            "the decision's Holm p."
            if len(sizes)
            else ""
        )
        + f" Recall@1 and Recall@10 are exploratory: raw {decision['ci_percent']} % intervals, no correction.*"
    )


def data_table(summary: dict) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "split": split,
                "items": v["items"],
                "consumer images": v["consumer_images"],
                "shop images": v["shop_images"],
                "consumer × shop pairs": v["pairs"],
            }
            for split, v in summary["splits"].items()
        ]
    )


def final_rows(final: dict, data_source: str, profile: str) -> pd.DataFrame:
    """The final configuration's test rows (every protocol) and the original study's published row."""
    rows = [
        {
            "model": "final configuration (this study)",
            "protocol": protocol,
            "split": "test",
            "data": data_source,
            "profile": profile,
            **{m: with_ci(result, m) for m in ("recall@1", "recall@5", "recall@10")},
            "queries": result["n_queries"],
            "gallery": result["n_gallery"],
        }
        for protocol, result in final["protocols"].items()
    ]
    original = final.get("original_published")
    if original:
        rows.append(
            {
                "model": original["model"],
                "protocol": original["protocol"],
                "split": "test",
                "data": original["data"],
                "profile": "—",
                **{m: f"{original[m]:.4f}" for m in ("recall@1", "recall@5", "recall@10")},
                "queries": "—",
                "gallery": "—",
            }
        )
    return pd.DataFrame(rows)


# --------------------------------------------------------------------------- one profile


def profile_section(root: Path, figures: Path, level: str = "##") -> tuple[list[str], list[list[str]]]:
    """``(report lines, slides)`` for one ``results/<profile>`` folder."""
    summary_path = root / "data_summary.json"
    if not summary_path.is_file():
        raise InputError(f"{summary_path}: missing; run `python -m helpers study` first")
    summary = json.loads(summary_path.read_text())
    profile = summary["profile"]
    source = summary["data_source"]
    study.finalise_family(profile, root)  # the whole family's Holm values, once every experiment has finished
    lines = [
        f"{level} Profile `{profile}`: {source}",
        "",
        f"{level}# Data",
        "",
        f"*Image table `images.csv` (sha256 `{summary['table_sha256'][:12]}…`); data: {source}; profile `{profile}`.*",
        "",
        md_table(data_table(summary)),
        "",
    ]
    slides = [[f"# Profile `{profile}`", "", f"Data: {source}", "", md_table(data_table(summary))]]
    for stage in study.STAGES:
        lines += [f"{level}# Stage `{stage}`", ""]  # in backticks: a name, not a number
        for experiment in (e for e in study.experiments(profile) if e.stage == stage):
            lines += experiment_lines(root, profile, experiment, source, figures, level, slides)
    lines += final_lines(root, source, profile, level, slides)
    lines += reproduction_lines(root, level)
    return lines, slides


def reproduction_lines(root: Path, level: str = "##") -> list[str]:
    """What a rerun of the study must give, from the machines and switches the runs recorded
    (each run's ``config.json``: its config and ``env``)."""
    runs = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/config.json"))]
    if not runs:
        return []
    deterministic = all(run["config"].get("deterministic") for run in runs)
    machines = sorted(
        {
            f"`torch {e.get('torch')}`, `timm {e.get('timm')}`, `Python {e.get('python')}` on "
            f"{e.get('device')} with {e.get('cpu_count')} cores"
            for e in (run.get("env", {}) for run in runs)
        }
    )
    lines = [f"{level}# Reproducing these numbers", ""]
    if deterministic:
        lines.append(
            "Every run above was trained with deterministic kernels (`deterministic: true`) and seeded model "
            "initialisation, batches and per-sample augmentation; its `config.json` records the machine and "
            f"library versions: {'; '.join(machines)}. On the same machine kind with the same versions, `make "
            "study` retrains identical runs: **tolerance zero**, every loss and metric equal to all its digits "
            "(a run reused from this study or retrained in another process gives the same `history.csv`). On "
            "another CPU, on a GPU or with other library versions float rounding differs, and so do rankings: "
            "expect differences of the order of the seed-to-seed std shown in each table, not beyond."
        )
    else:
        lines.append(
            "Some runs above were trained without deterministic kernels, so reruns differ by float rounding "
            "even on the same machine: expect differences of the order of the seed-to-seed std in each table. "
            f"Machines and versions recorded: {'; '.join(machines)}."
        )
    return lines + [""]


def experiment_lines(
    root: Path, profile: str, experiment: study.Experiment, source: str, figures: Path, level: str, slides: list
) -> list[str]:
    head = [f"{level}## {experiment.name}: {experiment.question}", ""]
    if not (root / experiment.name / "decision.json").is_file():
        return head + ["Not run yet (no `decision.json`).", ""]
    result = study.load_experiment(root, experiment.name)
    comparison, decision = result["comparison"], result["decision"]
    figure = figures / f"{profile}_{experiment.name}.png"
    plots.plot_experiment(comparison, f"{experiment.name} ({profile})").savefig(
        figure, dpi=80, metadata={"Software": None}
    )  # no version stamp: a rebuild is byte-identical
    curves = figures / f"{profile}_{experiment.name}_curves.png"
    plots.plot_learning_curves(
        study.experiment_history(root, experiment.name), f"{experiment.name} ({profile})"
    ).savefig(curves, dpi=80, metadata={"Software": None})
    table = md_table(experiment_table(comparison, decision))
    adopted = f"**Adopted: {decision['winner']}.** {decision['why']}."
    slides.append(
        [
            f"## {experiment.name} ({profile})",
            "",
            experiment.question,
            "",
            table,
            "",
            adopted,
            "",
            f"![{experiment.name}](figures/{figure.name})",
        ]
    )
    return head + [
        caption(decision, source, comparison),
        "",
        table,
        "",
        adopted,
        "",
        f"![{experiment.name}](figures/{figure.name})",
        "",
        f"How the runs got there, epoch by epoch: the learning curves of `{experiment.name}` (figure below).",
        "",
        f"![{experiment.name}: learning curves](figures/{curves.name})",
        "",
        curves_caption(decision),
        "",
    ]


def curves_caption(decision: dict) -> str:
    """The learning-curve figure's one-line caption."""
    seeds = ", ".join(map(str, decision["seeds"]))
    return (
        f"*Learning curves of `{decision['experiment']}`, read from each run's `history.csv`: train loss (left; none "
        f"at epoch 0, the untrained model) and val Recall@5 (right) per epoch. Line: mean over seeds {seeds} (after "
        "a seed stopped early, over the seeds still training); band: lowest to highest seed; dot: the epoch of each "
        "run's `best.pt`.*"
    )


def final_lines(root: Path, source: str, profile: str, level: str, slides: list) -> list[str]:
    lines = [f"{level}# Final configuration", ""]
    final_config = root / "final_config.json"
    if not final_config.is_file():
        return lines + ["Not decided yet: `final_config.json` is written when every experiment has finished.", ""]
    record = json.loads(final_config.read_text())
    config = pd.DataFrame([{"field": k, "value": v} for k, v in record["config"].items()])
    decisions = pd.DataFrame(record["decisions"])[["stage", "experiment", "winner"]]
    decisions["stage"] = "`" + decisions.stage + "`"
    lines += [f"Rule: {record['rule']}.", "", md_table(config), "", md_table(decisions), ""]
    slides.append([f"## Final configuration ({profile})", "", md_table(config)])
    metrics_path = root / "final" / "metrics.json"
    if not metrics_path.is_file():
        return lines + ["Test: not evaluated yet (`04_demo` writes `final/metrics.json`).", ""]
    final = json.loads(metrics_path.read_text())
    table = md_table(final_rows(final, source, profile))
    lines += [
        f"{level}# Test: the final configuration, evaluated once",
        "",
        f"*Split test; data: {source}; profile `{profile}`; one training run of the final configuration; "
        "95 % percentile bootstrap intervals over queries. The original study's row is its published number under its "
        "own pair-row protocol on DeepFashion.*",
        "",
        table,
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
    slides.append([f"## Test ({profile})", "", table])
    return lines


# --------------------------------------------------------------------------- the whole report


def profiles(results: Path) -> list[Path]:
    """The profile folders under ``results`` (or ``results`` itself when it is one, e.g. the
    fixture's ``outputs/fixture/results``)."""
    if (results / "data_summary.json").is_file():
        return [results]
    found = [results / p for p in PROFILE_ORDER if (results / p / "data_summary.json").is_file()]
    if not found:
        raise InputError(f"{results}: no study results (no <profile>/data_summary.json); run `make study` first")
    return found


def render_html(markdown_text: str, title: str) -> str:
    import mistune

    body = mistune.create_markdown(plugins=["table"], escape=False)(markdown_text)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n<style>body{{font-family:'
        f"sans-serif;max-width:72em;margin:auto}} table{{border-collapse:collapse;font-size:90%}} td,th{{border:"
        f"1px solid #ccc;padding:2px 6px}} img{{max-width:100%}}</style></head><body>\n{body}</body></html>\n"
    )


def build(results: Path | None = None, out: Path | None = None, profile_dirs: list[Path] | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html``, ``slides.md`` and ``figures/`` under ``out``."""
    results, out = Path(results or REPO_ROOT / "results"), Path(out or REPO_ROOT / "report")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    lines = [
        "# C2S retrieval: the study",
        "",
        "Generated by `python -m helpers report` from `results/` only; do not edit by hand. Every number below "
        "is read from a file there. Selection used val only: no test number of an ablation run is read "
        "(training writes one to each run's metrics.json; the study ignores it), only the final "
        "configuration's.",
        "",
    ]
    deck = [
        "---",
        "marp: true",
        "paginate: true",
        "---",
        "",
        "# C2S retrieval: the study",
        "",
        "Generated from `results/` by `python -m helpers report`",
    ]
    for root in profile_dirs or profiles(results):
        section, slides = profile_section(root, figures)
        lines += section
        for slide in slides:
            deck += ["", "---", "", *slide]
    text = "\n".join(lines).rstrip() + "\n"
    written = [
        write_text_atomic(out / "report.md", text),
        write_text_atomic(out / "report.html", render_html(text, "C2S retrieval: the study")),
        write_text_atomic(out / "slides.md", "\n".join(deck).rstrip() + "\n"),
    ]
    return written + sorted(figures.glob("*.png"))


# --------------------------------------------------------------------------- traceability


# A number standing alone: not part of a word, identifier, path or version ("R@5", "02_1",
# "lite0", "2.14.1", "sha256"), optionally signed.
_NUMBER = re.compile(r"(?<![\w.@/`])[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?(?![\w@/`]|\.\d)")


def _forms(value: float) -> set[str]:
    """The ways a number may be printed: rounded to 0..6 decimals, with and without a sign."""
    out = set()
    for digits in range(7):
        text = f"{value:.{digits}f}"
        out |= {text, text.lstrip("+"), f"{value:+.{digits}f}"}
    return out


def result_numbers(results: Path) -> set[str]:
    """Every printed form of every number in the CSV and JSON files under ``results``."""
    found: set[str] = set()
    for path in sorted(Path(results).rglob("*")):
        if path.suffix in (".csv", ".json") and path.is_file():
            for token in set(_NUMBER.findall(path.read_text())):
                found |= _forms(float(token))
    return found


def untraceable_numbers(text: str, results: Path) -> list[str]:
    """The numbers in ``text`` that occur in no file under ``results`` at the precision printed."""
    known = result_numbers(results)
    return [token for token in _NUMBER.findall(text) if token not in known and token.lstrip("+") not in known]
