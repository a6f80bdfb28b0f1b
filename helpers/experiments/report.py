"""``report/`` from ``results/`` and the prose of ``report/prose/``: ``report.md``, its HTML rendering,
the talk (``slides.md`` / ``slides.html``: the written ``prose/talk.md`` with its figures and tables
filled in, one ``---`` per slide), the figures and, printed by Chromium, ``report.pdf`` and
``slides.pdf``, so the written story and the talk can never disagree with the runs.

``report.md`` reads as a paper: the sections a person writes (``report/prose/*.md``, :func:`prose_names`)
around the generated data table, training settings, per-experiment tables and figures, each numbered
(prose refers to them as ``{tab:crop}`` / ``{fig:crop_curves}``: :func:`resolve_labels`). The prose is
held to the results twice: its numbers must occur in them (:func:`untraceable_numbers`) and its words
of direction must agree with the verdicts (:func:`contradictions`).

Every number printed comes from a file under ``results/<profile>/`` (``data_summary.json``,
each experiment's ``comparison.csv`` / ``decision.json`` written by :mod:`helpers.experiments.study`,
``final_config.json`` and ``final/metrics.json`` written by ``04_demo``), formatted, never
computed anew; :func:`untraceable_numbers` checks that. Every table says its protocol, split,
data source, profile and seeds. Nothing under ``results/`` is written here: the whole family's
Holm values are added by the study when its last experiment finishes
(:func:`helpers.experiments.study.finalise_family`), and shown when present.
"""

from __future__ import annotations

import json
import logging
import re
import subprocess
from pathlib import Path

import pandas as pd
from matplotlib import pyplot

from helpers.core import runtime
from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.core.files import sha256_file, write_text_atomic
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
        "p-values. Recall@5 decides, Holm-corrected at decision time over m Recall@5 tests (each table's caption "
        "gives m): those finished and the planned ones not run yet (counted as p = 1, which only makes the "
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


# --------------------------------------------------------------------------- prose and numbering

PROSE_SECTIONS = ("abstract", "introduction", "method", "discussion", "limitations", "conclusion")
TALK = "talk.md"  # the slides: written, one message per slide, merged with generated figures and tables
# {tab:crop} / {fig:crop_curves} in prose: a reference; {def:tab:crop} in generated text: where Table N is.
_LABEL = re.compile(r"\{(tab|fig):(\w+)\}")
_DEFINITION = re.compile(r"\{def:(tab|fig):(\w+)\}")
_KIND = {"tab": "Table", "fig": "Figure"}


def prose_names() -> list[str]:
    """The markdown files ``report/prose/`` holds: one per written section, one findings file per
    stage, and the talk (:data:`TALK`)."""
    return [f"{s}.md" for s in PROSE_SECTIONS] + [f"findings_{stage}.md" for stage in study.STAGES] + [TALK]


def read_prose(folder: Path) -> dict[str, tuple[Path, str]]:
    """``{section: (file, text)}`` from ``folder``; no folder: no prose (a report of generated parts only)."""
    if not folder.is_dir():
        return {}
    texts = {}
    for name in prose_names():
        path = folder / name
        if not path.is_file():
            raise InputError(f"{path}: missing; {folder} needs {', '.join(prose_names())}")
        texts[name.removesuffix(".md")] = (path, path.read_text().strip())
    return texts


def prose_lines(texts: dict[str, tuple[Path, str]], section: str) -> list[str]:
    return [texts[section][1], ""] if section in texts else []


def resolve_labels(text: str, texts: dict[str, tuple[Path, str]]) -> str:
    """Number every ``{def:tab:x}`` / ``{def:fig:x}`` in order of appearance (Table 1, Figure 1, ...) and
    replace it and every ``{tab:x}`` / ``{fig:x}`` reference by its number; a prose file referring to a
    label no table or figure defines is an InputError naming that file."""
    numbers: dict[tuple[str, str], str] = {}
    for kind, name in _DEFINITION.findall(text):
        numbers[(kind, name)] = f"{_KIND[kind]} {sum(k == kind for k, _ in numbers) + 1}"
    for path, body in texts.values():
        for kind, name in _LABEL.findall(body):
            if (kind, name) not in numbers:
                known = ", ".join(f"{{{k}:{n}}}" for k, n in numbers)
                raise InputError(f"{path}: unknown label {{{kind}:{name}}}; known: {known}")
    text = _DEFINITION.sub(lambda m: numbers[(m[1], m[2])], text)
    return _LABEL.sub(lambda m: numbers[(m[1], m[2])], text)


# --------------------------------------------------------------------------- one profile


def load_profile(root: Path) -> dict:
    """A ``results/<profile>`` folder's summary and its finished experiments."""
    summary_path = root / "data_summary.json"
    if not summary_path.is_file():
        raise InputError(f"{summary_path}: missing; run `python -m helpers study` first")
    summary = json.loads(summary_path.read_text())
    finished = [
        (e, study.load_experiment(root, e.name))
        for e in study.experiments(summary["profile"])
        if (root / e.name / "decision.json").is_file()
    ]
    return {
        "root": root,
        "summary": summary,
        "profile": summary["profile"],
        "source": summary["data_source"],
        "finished": finished,
    }


# The figures 01_data saves under results/<profile>/data/, with their captions.
DATA_FIGURES = {
    "pairs": "consumer photos (their garment box drawn) beside the shop photos of the same item, items drawn at random",
    "box_geometry": "garment boxes by domain: the share of the photo the box covers and its aspect ratio (width / "
    "height); the gap between the domains is what the crop and the box margin address",
}


def data_lines(loaded: dict, tag: str, figures: Path) -> list[str]:
    summary, profile, source = loaded["summary"], loaded["profile"], loaded["source"]
    lines = [
        f"*{{def:tab:{tag}data}}: the image table `images.csv` (sha256 `{summary['table_sha256'][:12]}…`) per split; "
        f"data: {source}; profile `{profile}`.*",
        "",
        md_table(data_table(summary)),
        "",
    ]
    for name, text in DATA_FIGURES.items():
        lines += copied_figure(
            loaded["root"] / "data" / f"{name}.png",
            figures / f"{profile}_{name}.png",
            name,
            f"*{{def:fig:{tag}{name}}}: {text}; data: {source}.*",
        )
    return lines


def copied_figure(saved: Path, target: Path, alt: str, caption: str) -> list[str]:
    """A figure a notebook saved under results/, copied beside the report and shown with its
    caption; nothing when the notebook has not saved it."""
    if not saved.is_file():
        return []
    target.write_bytes(saved.read_bytes())
    return [f"![{alt}](figures/{target.name})", "", caption, ""]


def final_run_configs(root: Path) -> list[dict]:
    """The recorded ``config.json`` of every run of the final configuration (a study run whose config
    matches ``final_config.json``); before a final configuration exists, the baseline runs."""
    runs = [(p, json.loads(p.read_text())) for p in sorted(root.glob("*/*/config.json"))]
    record = root / "final_config.json"
    if record.is_file():
        chosen = json.loads(record.read_text())["config"]
        return [run for _, run in runs if all(run["config"].get(k) == v for k, v in chosen.items())]
    return [run for path, run in runs if path.parent.name.startswith("baseline_")]


def hyperparameter_table(configs: list[dict]) -> pd.DataFrame:
    """Every training setting of the final configuration's runs, as their ``config.json`` recorded it."""
    c = configs[0]["config"]
    loss = f"{c['loss']}, " + (f"temperature {c['temperature']}" if c["loss"] == "infonce" else f"margin {c['margin']}")
    schedule = c["schedule"] + (f", {c['warmup_epochs']} warm-up epochs" if c.get("warmup_epochs") else "")
    rows = {
        "backbone": c["backbone"],
        "weights": c["weights"],
        "input size": f"{c['img_size']} px square",
        "resize": c["resize"],
        "crop to the garment box": f"{c['crop']}, box margin {c['box_margin']}",
        "augment": c["augment"],
        "photometric": c["photometric"],
        "batch: P items × K images": f"{c['p_items']} × {c['k_images']}",
        "loss": loss,
        "optimizer": c["optimizer"],
        "learning rate": c["lr"],
        "backbone lr multiplier": c["backbone_lr_mult"],
        "weight decay": c["weight_decay"],
        "schedule": schedule,
        "gradient clip (norm)": c["grad_clip"],
        "epochs (at most)": c["epochs"],
        "early-stopping patience (epochs)": c["patience"],
        "embedding dim": c["embed_dim"],
        "head": f"{c['head']}, {c['pooling']} pooling, L2-normalised",
        "seeds": ", ".join(str(s) for s in sorted({run["config"]["seed"] for run in configs})),
        "deterministic kernels": c["deterministic"],
    }
    return pd.DataFrame([{"setting": k, "value": v} for k, v in rows.items()])


def statistics_table(decisions: list[dict]) -> pd.DataFrame:
    """The evaluation protocol and statistical method the decisions recorded."""

    def values(read) -> str:
        return ", ".join(dict.fromkeys(str(read(d)) for d in decisions))

    holm = [d["family"] for d in decisions if "family" in d]
    rows = {
        "selection protocol": values(lambda d: f"{d['protocol']} on {d['split']}"),
        "deciding metric": values(lambda d: d["primary"]),
        "interval": values(lambda d: f"{d['ci_percent']} % percentile bootstrap of the paired difference"),
        "n_boot": values(lambda d: d["n_boot"]),
        "resampling": (
            "seeds, then items with all their queries"
            if holm
            else "seeds and queries together, paired by seed and query"
        ),
        "multiple comparisons": (
            ", ".join(
                dict.fromkeys(
                    f"Holm over the Recall@5 tests (m: each table), alpha {f['alpha']}, power {f['power']}"
                    for f in holm
                )
            )
            if holm
            else "none: each verdict reads its own raw interval"
        ),
        "adoption rule": values(lambda d: d["rule"]),
    }
    return pd.DataFrame([{"item": k, "value": v} for k, v in rows.items()])


def method_lines(loaded: dict, tag: str) -> list[str]:
    lines = []
    configs = final_run_configs(loaded["root"])
    if configs:
        lines += [
            f"*{{def:tab:{tag}hyperparameters}}: training settings of the final configuration, read from the "
            f"`config.json` of its {len(configs)} recorded runs; profile `{loaded['profile']}`.*",
            "",
            md_table(hyperparameter_table(configs)),
            "",
        ]
    if loaded["finished"]:
        experiment, first = loaded["finished"][0]
        decisions = [result["decision"] for _, result in loaded["finished"]]
        lines += [
            f"*{{def:tab:{tag}statistics}}: evaluation protocol and statistical method, read from each "
            f"experiment's `decision.json`; profile `{loaded['profile']}`.*",
            "",
            md_table(statistics_table(decisions)),
            "",
            "**The experiment tables** of Section 4 share one definition: "
            + caption(first["decision"], loaded["source"], first["comparison"]).strip("*"),
            "",
            "**The learning-curve figures** of Section 4 share one definition: " + curves_caption(first["decision"]),
            "",
            *noise_lines(loaded["root"]),
        ]
    return lines


def noise_lines(root: Path) -> list[str]:
    """One paragraph from ``noise.csv``: seed noise against query noise over the study's Recall@5
    comparisons, and which more of (seeds or val items) would narrow the intervals."""
    path = Path(root) / study.NOISE
    if not path.is_file():
        return []
    noise = pd.read_csv(path)
    seed, query = noise[f"seed_sd_{study.PRIMARY}"], noise[f"query_sd_{study.PRIMARY}"]
    below = int((query < seed).sum())
    # the lower median: a value of the file, so the sentence's numbers trace to it
    seed_median, query_median = seed.quantile(0.5, interpolation="lower"), query.quantile(0.5, interpolation="lower")
    more = "seeds, not val items," if below > len(noise) / 2 else "val items, not seeds,"
    return [
        f"**Where the noise comes from** (`{path.parent.name}/{path.name}`). Over the study's {len(noise)} "
        f"Recall@5 comparisons the per-seed differences spread between seeds with a standard deviation of "
        f"{seed_median:.3f} (median; {seed.min():.3f} to {seed.max():.3f}); with the seed held fixed, "
        f"resampling the val split's {noise.n_items.iloc[0]} items ({noise.n_queries.iloc[0]} queries) gives "
        f"{query_median:.3f} ({query.min():.3f} to {query.max():.3f}). The query noise is below the seed "
        f"noise in {below} of the {len(noise)} comparisons, so more {more} would narrow the intervals most.",
        "",
    ]


def overview_rows(loaded: dict) -> pd.DataFrame:
    """Every tested variant of the study: its val Recall@5 difference from its experiment's
    baseline with the interval that decided it (Holm-adjusted where the table has it) and verdict."""
    primary, rows = study.PRIMARY, {}
    for experiment, result in loaded["finished"]:
        table = result["comparison"].drop(index="baseline").dropna(subset=[f"diff_{primary}"])
        low, high = (f"low_adj_{primary}", f"high_adj_{primary}")
        if low not in table.columns:
            low, high = f"low_{primary}", f"high_{primary}"
        for variant, row in table.iterrows():
            rows[f"{experiment.name}: {variant}"] = {
                "diff": row[f"diff_{primary}"],
                "low": row[low],
                "high": row[high],
                "verdict": row[f"verdict_{primary}"],
            }
    return pd.DataFrame(rows).T


def overview_lines(loaded: dict, tag: str, figures: Path) -> list[str]:
    """The whole study in one figure, and what its runs say about the budget."""
    lines = []
    rows = overview_rows(loaded) if loaded["finished"] else pd.DataFrame()
    if len(rows):
        target = save_figure(plots.plot_study_overview(rows), figures / f"{loaded['profile']}_overview.png")
        lines += [
            f"![the study at a glance](figures/{target.name})",
            "",
            f"*{{def:fig:{tag}overview}}: every variant of the study against its experiment's baseline: the "
            "difference in val Recall@5 with the interval that decided its verdict (Holm-adjusted; colour: verdict).*",
            "",
        ]
    record = loaded["root"] / "final_config.json"
    summary = json.loads(record.read_text()).get("runs") if record.is_file() else None
    if summary:
        lines += [
            f"**Budget.** Of the study's {summary['distinct_runs']} distinct runs, {summary['best_at_last_epoch']} "
            f"({summary['best_at_last_epoch_percent']} %) had their best val Recall@5 at their last epoch, i.e. were "
            f"still improving when the epochs ran out; {summary['stopped_early']} stopped early. Their summed wall "
            f"time was {summary['wall_hours']} h.",
            "",
        ]
    return lines


def results_lines(loaded: dict, tag: str, figures: Path, texts: dict, level: str = "###") -> list[str]:
    lines = overview_lines(loaded, tag, figures)
    results = dict((e.name, r) for e, r in loaded["finished"])
    for stage in study.STAGES:
        lines += [f"{level} Stage `{stage}`", ""]  # in backticks: a name, not a number
        lines += prose_lines(texts, f"findings_{stage}")
        for experiment in (e for e in study.experiments(loaded["profile"]) if e.stage == stage):
            lines += experiment_lines(loaded, experiment, results.get(experiment.name), tag, figures, level)
    return lines + final_lines(loaded, tag, figures, level)


def reproduction_lines(root: Path) -> list[str]:
    """What a rerun of the study must give, from the machines and switches the runs recorded
    (each run's ``config.json``: its config and ``env``), and the commit whose code wrote the results."""
    record = root / "final_config.json"
    commit = json.loads(record.read_text()).get("code_commit") if record.is_file() else None
    head = [f"The study's tables and decisions were written by the code at commit `{commit}`.", ""] if commit else []
    runs = [json.loads(p.read_text()) for p in sorted(root.glob("*/*/config.json"))]
    if not runs:
        return head
    deterministic = all(run["config"].get("deterministic") for run in runs)
    machines = sorted(
        {
            f"`torch {e.get('torch')}`, `timm {e.get('timm')}`, `Python {e.get('python')}` on "
            f"{e.get('device')} with {e.get('cpu_count')} cores"
            for e in (run.get("env", {}) for run in runs)
        }
    )
    if deterministic:
        line = (
            "Every run above was trained with deterministic kernels (`deterministic: true`) and seeded model "
            "initialisation, batches and per-sample augmentation; its `config.json` records the machine and "
            f"library versions: {'; '.join(machines)}. On the same machine kind with the same versions, `make "
            "study` retrains identical runs: **tolerance zero**, every loss and metric equal to all its digits "
            "(a run reused from this study or retrained in another process gives the same `history.csv`). On "
            "another CPU, on a GPU or with other library versions float rounding differs, and so do rankings: "
            "expect differences of the order of the seed-to-seed std shown in each table, not beyond."
        )
    else:
        line = (
            "Some runs above were trained without deterministic kernels, so reruns differ by float rounding "
            "even on the same machine: expect differences of the order of the seed-to-seed std in each table. "
            f"Machines and versions recorded: {'; '.join(machines)}."
        )
    return [*head, line, ""]


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


def curves_caption(decision: dict) -> str:
    """The definition shared by every learning-curve figure."""
    seeds = ", ".join(map(str, decision["seeds"]))
    return (
        "read from each run's `history.csv`: train loss (left; none at epoch 0, the untrained model) and val "
        f"Recall@5 (right) per epoch. Line: mean over seeds {seeds} (after a seed stopped early, over the seeds "
        "still training); band: lowest to highest seed; dot: the epoch of each run's `best.pt`."
    )


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
    lines += [f"{level} Test: the final configuration, evaluated once", ""]
    if final.get("seeds"):
        lines += [
            f"*{{def:tab:{tag}test_seeds}}: split test, official protocol; data: {source}; profile `{profile}`; "
            "each seed's run of the final configuration (its `best.pt`, chosen on val), with that seed's 95 % "
            "percentile bootstrap interval over queries; then mean and sample std over seeds"
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
        "over queries. The original study's row is its published number under its own pair-row protocol on "
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
    return lines + copied_figure(
        root / "final" / "success_failure.png",
        figures / f"{profile}_success_failure.png",
        "successes and failures",
        f"*{{def:fig:{tag}examples}}: test queries with the best and the worst rank of first hit (chosen by rank, "
        f"not by hand; {table_subject(final)}): the garment crop, then its top-5 shop images; green: the query's "
        "own item.*",
    )


def table_subject(final: dict) -> str:
    return f"seed {final['demo_seed']}" if "demo_seed" in final else "the final model"


def seed_rows(final: dict) -> pd.DataFrame:
    """Per seed (then mean and std) the test Recall@1/5/10 of the final configuration, and the same
    for the default recipe when ``04_demo`` recorded it."""
    rows = []
    for model, seeds in (
        ("final configuration", final["seeds"]),
        ("default recipe", final.get("default_recipe_seeds")),
    ):
        for seed, row in (seeds or {}).items():
            spread = seed in ("mean", "std")
            rows.append(
                {
                    "model": model,
                    "seed": seed,
                    "best epoch": "—" if spread else int(row["best_epoch"]),
                    "val R@5": "—" if pd.isna(row["val_recall@5"]) else f"{row['val_recall@5']:.3f}",
                    **{
                        f"test R@{k}": ("—" if pd.isna(row[f"test_recall@{k}"]) else f"{row[f'test_recall@{k}']:.3f}")
                        + ("" if spread else f" {row[f'test_recall@{k}_ci']}")
                        for k in study.KS
                    },
                }
            )
    return pd.DataFrame(rows)


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


def paper(loaded: list[dict], texts: dict, figures: Path) -> list[str]:
    """The report's lines: prose sections around the generated data, method and results. The first
    profile is the one the prose describes (its labels are bare: ``{tab:crop}``); a further profile's
    labels carry its name (``{tab:full_crop}``) and its findings are not repeated."""
    tags = ["" if i == 0 else f"{p['profile']}_" for i, p in enumerate(loaded)]

    def per_profile(render) -> list[str]:
        lines = []
        for p, tag in zip(loaded, tags):
            if len(loaded) > 1:
                lines += [f"### Profile `{p['profile']}`: {p['source']}", ""]
            lines += render(p, tag)
        return lines

    lines = [
        TITLE,
        "",
        "Generated by `python -m helpers report` from `results/` and the prose in `report/prose/`; do not edit by "
        "hand. Every number below is read from a file under `results/`. Selection used val only: no test number of "
        "an ablation run is read (training writes one to each run's metrics.json; the study ignores it), only the "
        "final configuration's.",
        "",
    ]
    if texts:
        lines += ["## Abstract", "", *prose_lines(texts, "abstract"), "## 1 Introduction", ""]
        lines += prose_lines(texts, "introduction")
    lines += ["## 2 Data", "", *per_profile(lambda p, tag: data_lines(p, tag, figures))]
    lines += [
        "## 3 Method",
        "",
        "![the retrieval pipeline](figures/pipeline.png)",
        "",
        "*{def:fig:pipeline}: the pipeline: a consumer photo's garment box is cropped, letterboxed to the input side, "
        "embedded and searched by cosine similarity among the shop photos, embedded the same way; training shapes "
        "the embedding with P×K batches and a metric loss.*",
        "",
        *prose_lines(texts, "method"),
        *per_profile(method_lines),
    ]
    lines += ["## 4 Results", ""]
    lines += per_profile(
        lambda p, tag: results_lines(p, tag, figures, texts if tag == "" else {}, "####" if tags[1:] else "###")
    )
    for number, section in ((5, "discussion"), (6, "limitations"), (7, "conclusion")):
        if texts:
            lines += [f"## {number} {section.capitalize()}", "", *prose_lines(texts, section)]
    return lines + [
        "## Appendix: reproducing the numbers",
        "",
        *per_profile(lambda p, _: reproduction_lines(p["root"])),
    ]


TITLE = "# Consumer-to-shop clothing retrieval: re-examining a course study's recipe"


def build(results: Path | None = None, out: Path | None = None, profile_dirs: list[Path] | None = None) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` under ``out``, with the prose of
    ``out/prose/`` when that folder exists (:func:`prose_names`), and then the talk
    (``slides.md``, ``slides.html``: :func:`talk_slides`). PDFs: :func:`render_pdfs`."""
    results, out = Path(results or REPO_ROOT / "results"), Path(out or REPO_ROOT / "report")
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    texts = read_prose(out / "prose")
    loaded = [load_profile(root) for root in profile_dirs or profiles(results)]
    save_figure(plots.plot_pipeline(), figures / "pipeline.png")
    text = resolve_labels("\n".join(paper(loaded, texts, figures)).rstrip() + "\n", texts)
    written = [
        write_text_atomic(out / "report.md", text),
        write_text_atomic(out / "report.html", render_html(text, TITLE.lstrip("# "))),
    ]
    if TALK.removesuffix(".md") in texts:
        deck = talk_slides(texts[TALK.removesuffix(".md")], loaded[0], figures)
        written += [
            write_text_atomic(
                out / "slides.md", "---\nmarp: true\npaginate: true\n---\n\n" + "\n\n---\n\n".join(deck) + "\n"
            ),
            write_text_atomic(out / "slides.html", render_slides_html(deck, TITLE.lstrip("# "))),
        ]
    return written + sorted(figures.glob("*.png")) + sorted(figures.glob("*.jpg"))


def save_figure(figure, path: Path) -> Path:
    """A PNG without a version stamp, so that a rebuild is byte-identical."""
    figure.savefig(path, dpi=80, metadata={"Software": None})
    pyplot.close(figure)
    return path


# --------------------------------------------------------------------------- the talk

# A line of the talk that is only `[[figure NAME]]` or `[[table NAME]]`: replaced by what it names.
_DIRECTIVE = re.compile(r"^\[\[(figure|table) (\w+)\]\]$", re.MULTILINE)
SCREENSHOT = REPO_ROOT / "05_live_demo" / "screenshot.jpg"


def talk_tables(loaded: dict) -> dict[str, pd.DataFrame]:
    """The small tables a slide may show, from the first profile's results."""
    tables = {"data": data_table(loaded["summary"])[["split", "items", "consumer images", "shop images"]]}
    tables["design"] = pd.DataFrame(  # what was run: each finished experiment's variants
        [
            {
                "stage": f"`{e.stage}`",
                "question": e.question.split("?")[0] + "?",
                "variants (vs the baseline)": ", ".join(v for v in result["comparison"].index if v != "baseline"),
                "seeds": len(result["decision"]["seeds"]),
            }
            for e, result in loaded["finished"]
        ]
    )
    metrics_path = loaded["root"] / "final" / "metrics.json"
    if metrics_path.is_file():
        final = json.loads(metrics_path.read_text())
        rows = []
        for model, seeds in (("final", final.get("seeds")), ("default recipe", final.get("default_recipe_seeds"))):
            if seeds:
                mean, std, n = seeds["mean"], seeds["std"], len(seeds) - 2
                rows.append(
                    {
                        "model": f"{model} ({n} seeds)",
                        **{
                            f"test R@{k}": mean_std(mean[f"test_recall@{k}"], std[f"test_recall@{k}"]) for k in study.KS
                        },
                    }
                )
        if not rows:
            official = final["protocols"]["official"]
            rows.append(
                {"model": "final (one run)", **{f"test R@{k}": with_ci(official, f"recall@{k}") for k in study.KS}}
            )
        zero = final.get("zero_shot")
        if zero:
            rows.append(
                {"model": "zero-shot backbone", **{f"test R@{k}": f"{zero[f'recall@{k}']:.3f}" for k in study.KS}}
            )
        tables["final"] = pd.DataFrame(rows)
    return tables


def talk_figures(loaded: dict, figures: Path) -> dict[str, str]:
    """Figure name → its file under ``figures/`` (written by the report before the talk)."""
    found = {"pipeline": "pipeline.png"}
    prefix = f"{loaded['profile']}_"
    for path in sorted(figures.glob(f"{prefix}*.png")):
        found[path.stem.removeprefix(prefix)] = path.name
    if SCREENSHOT.is_file():
        (figures / SCREENSHOT.name).write_bytes(SCREENSHOT.read_bytes())
        found["screenshot"] = SCREENSHOT.name
    return found


def talk_slides(talk: tuple[Path, str], loaded: dict, figures: Path) -> list[str]:
    """The slides of the written talk (``---`` between slides), each ``[[figure NAME]]`` /
    ``[[table NAME]]`` line replaced by that figure or table; a name not known is an
    InputError naming the talk's file and line."""
    path, text = talk
    label = _LABEL.search(text)
    if label:
        raise InputError(f"{path}: {label[0]} is a label of the paper; a slide shows its own: [[figure NAME]]")
    tables, images = talk_tables(loaded), talk_figures(loaded, figures)

    def replace(match: re.Match) -> str:
        kind, name = match[1], match[2]
        known = images if kind == "figure" else tables
        if name not in known:
            line = text[: match.start()].count("\n") + 1
            raise InputError(f"{path}:{line}: unknown {kind} {name!r}; known: {', '.join(sorted(known))}")
        return f"![{name}](figures/{known[name]})" if kind == "figure" else md_table(known[name])

    return [slide.strip() for slide in re.split(r"\n---\n", _DIRECTIVE.sub(replace, text))]


SLIDE_CSS = (
    "@page{size:1280px 720px;margin:0} body{margin:0;font-family:sans-serif} "
    "section{box-sizing:border-box;width:1280px;min-height:720px;padding:36px 60px;break-after:page;"
    "font-size:23px;line-height:1.3} section:last-child{break-after:auto} h1{font-size:46px;margin-top:150px} "
    "h2{font-size:32px;margin:0 0 16px;color:#1f3b73} ul{margin:8px 0} table{border-collapse:collapse;"
    "font-size:16px;margin:8px auto} td,th{border:1px solid #bbb;padding:3px 8px} img{max-width:100%;"
    "max-height:400px;display:block;margin:8px auto} code{font-size:90%}"
)


def render_slides_html(deck: list[str], title: str) -> str:
    """One ``<section>`` per slide on a 1280×720 page; a slide too long for its page runs onto a
    second one, which :func:`pdf_pages` then counts."""
    import mistune

    markdown = mistune.create_markdown(plugins=["table"], escape=False)
    sections = "\n".join(f"<section>\n{markdown(slide)}</section>" for slide in deck)
    return (
        f'<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>{title}</title>\n'
        f"<style>{SLIDE_CSS}</style></head><body>\n{sections}\n</body></html>\n"
    )


def chromium_installed() -> bool:
    return Path(runtime.CHROMIUM).is_file()


def render_pdf(html: Path, pdf: Path) -> bool:
    """``pdf`` printed from ``html`` by headless Chromium, unless ``pdf`` already records the same
    source (its ``/SourceSHA256``): a rebuild leaves an unchanged PDF byte for byte. Returns
    whether it printed."""
    from pypdf import PdfReader, PdfWriter

    # Chromium's PDFs make pypdf warn of a short cross-reference trailer it repairs; not the user's concern
    logging.getLogger("pypdf").setLevel(logging.ERROR)
    digest = sha256_file(html)
    if pdf.is_file() and PdfReader(pdf).metadata.get("/SourceSHA256") == digest:
        return False
    printed = pdf.with_suffix(".printing.pdf")
    subprocess.run(
        [
            runtime.CHROMIUM,
            *runtime.CHROMIUM_ARGS,
            "--no-pdf-header-footer",
            f"--print-to-pdf={printed}",
            html.resolve().as_uri(),
        ],
        check=True,
        capture_output=True,
        timeout=300,
    )
    writer = PdfWriter(clone_from=PdfReader(printed))
    writer.metadata = {"/Title": TITLE.lstrip("# "), "/SourceSHA256": digest}  # no dates: stable bytes
    with open(printed, "wb") as handle:
        writer.write(handle)
    printed.replace(pdf)
    return True


def pdf_pages(pdf: Path) -> int:
    from pypdf import PdfReader

    return len(PdfReader(pdf).pages)


def render_pdfs(out: Path) -> list[Path]:
    """``report.pdf`` and ``slides.pdf`` beside their HTML (headless Chromium; :func:`render_pdf`)."""
    if not chromium_installed():
        raise InputError(
            f"{runtime.CHROMIUM}: not found; install Chromium (apt-get install chromium) to print the PDFs"
        )
    pdfs = []
    for name in ("report", "slides"):
        if (out / f"{name}.html").is_file():
            render_pdf(out / f"{name}.html", out / f"{name}.pdf")
            pdfs.append(out / f"{name}.pdf")
    return pdfs


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


# A reference's number (Table 3, Figure 12, the heading "## 4 Results") counts tables, not results.
_REFERENCE = re.compile(r"\b(?:Table|Figure|Section) \d+\b|^#+ \d+(?= )", re.MULTILINE)


def untraceable_numbers(text: str, results: Path) -> list[str]:
    """The numbers in ``text`` that occur in no file under ``results`` at the precision printed
    (references to tables, figures and sections aside)."""
    known = result_numbers(results)
    tokens = _NUMBER.findall(_REFERENCE.sub("", text))
    return [token for token in tokens if token not in known and token.lstrip("+") not in known]


# --------------------------------------------------------------------------- prose against verdicts

POSITIVE = re.compile(r"\b(?:better|gains?|improve[sd]?|improvements?|helps?|helped|outperform(?:s|ed)?)\b", re.I)
NEGATIVE = re.compile(r"\b(?:worse|hurts?|drops?|dropped|degrade[sd]?)\b", re.I)
_SENTENCE = re.compile(r"(?<=[.!?])\s+|\n\s*\n")
_METRIC = re.compile(r"\b(?:R|Recall)@(\d+)\b")


def verdicts(root: Path) -> dict[str, dict[str, dict[str, str]]]:
    """``{experiment: {variant: {metric: verdict}}}`` of every finished experiment under ``root``."""
    found = {}
    for path in sorted(root.glob("*/decision.json")):
        comparison = study.load_experiment(root, path.parent.name)["comparison"]
        columns = [c for c in comparison.columns if c.startswith("verdict_recall@")]
        found[path.parent.name] = {
            variant: {c.removeprefix("verdict_"): row[c] for c in columns}
            for variant, row in comparison.iterrows()
            if row[f"verdict_{study.PRIMARY}"] != "baseline"  # the reference row, `none` in postprocess
        }
    return found


def contradictions(text: str, table: dict[str, dict[str, dict[str, str]]]) -> list[str]:
    """The sentences of ``text`` whose direction words contradict a verdict. A sentence naming a
    variant (``img_size=128``) or an experiment in backticks (`` `resolution` ``) and a direction word
    (better, gain, improves, helps, outperforms / worse, hurts, drops, degrades) must agree with the
    verdict on every Recall@K the sentence names (Recall@5, the deciding metric, when it names none):
    every named variant must have that verdict, and a named experiment at least one variant with it.
    A `within noise` variant is thus never a gain or a loss, and one sentence holds one direction.
    Strict on purpose: a negation ("not better") counts as the word."""
    wrong = []
    for sentence in (s.strip() for s in _SENTENCE.split(text) if s.strip()):
        up, down = bool(POSITIVE.search(sentence)), bool(NEGATIVE.search(sentence))
        if not (up or down):
            continue
        metrics = [f"recall@{k}" for k in dict.fromkeys(_METRIC.findall(sentence))] or [study.PRIMARY]

        def agrees(verdict: dict[str, str]) -> bool:
            found = {verdict.get(m) for m in metrics}
            return found == {"better"} if up and not down else found == {"worse"} if down and not up else False

        for experiment, variants in table.items():
            named = [v for v in variants if re.search(rf"(?<![\w.=]){re.escape(v)}(?![\w.])", sentence)]
            if named and not all(agrees(variants[v]) for v in named):
                wrong.append(sentence)
                break
            if not named and f"`{experiment}`" in sentence and not any(map(agrees, variants.values())):
                wrong.append(sentence)
                break
    return wrong
