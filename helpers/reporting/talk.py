"""The talk: the written ``report/prose/talk.md`` (one ``---`` between slides), each
``[[figure NAME]]`` / ``[[table NAME]]`` / ``[[list NAME]]`` line filled in from the first
profile's results (:func:`talk_slides`), so the talk can never disagree with the runs.

* A **figure** is a PNG the report wrote under ``figures/`` (``<profile>_NAME.png``), the pipeline,
  the live demo's screenshot, or one drawn here for the slide's size (``overview``: the study's
  ranked effects, :func:`helpers.evaluation.plots.plot_effects`; ``failures``: test Recall@5 by
  category, box area and the measured nuisances, from ``04_demo``'s ``final/failures_by_*.csv``);
  until those tables exist the ``failures`` slide shows the list ``failures`` instead.
* A **table** is one of :func:`talk_tables`; a **list** (:func:`talk_lists`) is a few generated
  bullets: the data's source, the study's cost, its verdicts, the worst test queries.
* A name the talk may use whose results do not exist yet (an experiment not run, no test
  evaluation) becomes a one-line "not run yet" note; a name no results could ever give is an
  InputError naming the talk's file and line.
* Every slide showing something from results carries a tag naming the data it comes from
  (:func:`data_tag`): synthetic data is never mistaken for DeepFashion.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
from matplotlib import pyplot

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.evaluation import failures, plots
from helpers.experiments import family, robustness, robustness_study, study
from helpers.reporting.prose import _LABEL
from helpers.reporting.results_section import failure_panels, failure_summaries
from helpers.reporting.tables import data_table, md_table, mean_std, with_ci

# A line of the talk that is only `[[figure NAME]]`, `[[table NAME]]` or `[[list NAME]]`: replaced by what it names.
_DIRECTIVE = re.compile(r"^\[\[(figure|table|list) (\w+)\]\]$", re.MULTILINE)
SCREENSHOT = REPO_ROOT / "05_live_demo" / "screenshot.jpg"

# Figures a slide may name besides each experiment's `NAME` and `NAME_curves`: the report's
# (written under figures/ when their results exist), and the failure analysis's.
FIGURES = (
    "pipeline",
    "screenshot",
    "pairs",
    "box_geometry",
    "baseline_curve",
    "overview",
    "success_failure",
    "robustness",
)
FAILURES = "failures"
TABLES = ("data", "design", "final")
LISTS = ("source", "cost", "verdicts", FAILURES)
NOT_FROM_RESULTS = {("figure", "pipeline"), ("list", "source")}  # a slide holding only these gets no data tag

# The free area a figure fills on a 1280×720 slide, under its title and above one line of text
# (helpers.reporting.render.SLIDE_CSS): a figure drawn here is drawn at about this size, so its
# text reaches the slide at the size matplotlib set it.
SLIDE_FIGURE_PX = (1160, 540)
MIN_SLIDE_DPI = 100  # a 10 pt label at least 14 px tall on the slide


def talk_tables(loaded: dict) -> dict[str, pd.DataFrame]:
    """The small tables a slide may show, from the first profile's results (those whose results
    exist)."""
    tables = {"data": data_table(loaded["summary"])[["split", "items", "consumer images", "shop images"]]}
    if loaded["finished"]:
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


def known_figures(profile: str) -> list[str]:
    """Every figure name a slide may use on ``profile``, whether or not its results exist yet."""
    names = [*FIGURES, FAILURES, study.POSTPROCESS]
    for experiment in study.experiments(profile):
        names += [experiment.name, f"{experiment.name}_curves"]
    return names


def _save(figure, path: Path, dpi: int) -> str:
    """A PNG without a version stamp, so that a rebuild is byte-identical."""
    figure.savefig(path, dpi=dpi, metadata={"Software": None})
    pyplot.close(figure)
    return path.name


def slide_dpi(figure) -> int:
    """The resolution at which ``figure`` is about :data:`SLIDE_FIGURE_PX`, so that it is neither
    shrunk on the slide nor blown up from a coarse raster; a figure too large for the slide at
    :data:`MIN_SLIDE_DPI` (a forest plot of many comparisons) is first made smaller in inches,
    its text kept at its size in points."""
    width, height = figure.get_size_inches()
    fitted = min(width, SLIDE_FIGURE_PX[0] / MIN_SLIDE_DPI), min(height, SLIDE_FIGURE_PX[1] / MIN_SLIDE_DPI)
    if fitted != (width, height):
        figure.set_size_inches(*fitted)
        figure.tight_layout()
        width, height = fitted
    return int(min(200, SLIDE_FIGURE_PX[0] / width, SLIDE_FIGURE_PX[1] / height))


def slide_figures(loaded: dict, wanted: set[str]) -> dict:
    """The figures of ``wanted`` that are drawn again here at the slide's size (the report's are
    drawn for a page): the ranked effects and an experiment's learning curves, when their results
    exist. Name → a function giving the matplotlib figure."""
    profile, root = loaded["profile"], loaded["root"]
    drawn = {}
    if "overview" in wanted:
        effects = family.effects(profile, root)
        if len(effects):
            drawn["overview"] = lambda: plots.plot_effects(effects)
    panels = failure_panels(failure_summaries(root))
    metrics = root / "final" / "metrics.json"
    if FAILURES in wanted and panels and metrics.is_file():
        overall = json.loads(metrics.read_text())["protocols"]["official"]["recall@5"]
        drawn[FAILURES] = lambda: _failures_figure(panels, overall)
    tables = robustness_study.load_robustness(root) if "robustness" in wanted else None
    if tables is not None:
        drawn["robustness"] = lambda: robustness.plot_dose_response(tables["recall"], ncols=2, figsize=(11.6, 5.4))
    for experiment, _ in loaded["finished"]:
        name = f"{experiment.name}_curves"
        if name in wanted:
            drawn[name] = lambda e=experiment.name: plots.plot_learning_curves(
                study.experiment_history(root, e), f"{e} ({profile})"
            )
    return drawn


def _failures_figure(panels: dict[str, pd.DataFrame], overall: float):
    # 12 pt text: the panels' small annotations (10 pt) stay legible at the slide's size.
    with pyplot.rc_context({"font.size": 12}):
        return failures.plot_recall_by_groups(panels, overall, figsize=(11.6, 5.4), ncols=2 if len(panels) <= 2 else 3)


def talk_figures(loaded: dict, figures: Path, wanted: set[str] = frozenset()) -> dict[str, str]:
    """Figure name → its file under ``figures/``: the report's (written before the talk), those of
    ``wanted`` the slides draw at their own size (:func:`slide_figures`, ``<profile>_NAME_slide.png``),
    the screenshot and the failure analysis's, when they exist."""
    profile, root = loaded["profile"], loaded["root"]
    prefix = f"{profile}_"
    if not (figures / "pipeline.png").is_file():  # the talk built without the paper
        _save(plots.plot_pipeline(), figures / "pipeline.png", 80)
    found = {"pipeline": "pipeline.png"}
    for saved in sorted((root / "data").glob("*.png")):  # 01_data's figures, as the paper copies them
        if not (figures / f"{prefix}{saved.name}").is_file():
            (figures / f"{prefix}{saved.name}").write_bytes(saved.read_bytes())
    for path in sorted(figures.glob(f"{prefix}*.png")):
        if not path.stem.endswith("_slide"):
            found[path.stem.removeprefix(prefix)] = path.name
    if SCREENSHOT.is_file():
        (figures / SCREENSHOT.name).write_bytes(SCREENSHOT.read_bytes())
        found["screenshot"] = SCREENSHOT.name
    for name, draw in slide_figures(loaded, wanted).items():
        figure = draw()
        found[name] = _save(figure, figures / f"{prefix}{name}_slide.png", slide_dpi(figure))
    return found


def data_tag(loaded: dict) -> str:
    """The line every results slide carries: which data its numbers come from."""
    source, profile = loaded["source"], loaded["profile"]
    if "synthetic" in source.lower():
        return f'<p class="tag">synthetic data (profile <code>{profile}</code>), not DeepFashion</p>'
    return f'<p class="tag">{source} (profile <code>{profile}</code>)</p>'


def source_lines(loaded: dict) -> list[str]:
    return [f"*Every number on these slides comes from the profile `{loaded['profile']}`: {loaded['source']}.*"]


def cost_lines(loaded: dict) -> list[str]:
    """What the study cost (``final_config.json``'s ``runs``) and what its power plan
    (``power_plan.csv``) planned, for this study's runs or the next study's, every number as
    those files hold it."""
    root, lines = loaded["root"], []
    record = root / "final_config.json"
    runs = json.loads(record.read_text()).get("runs") if record.is_file() else None
    if runs:
        lines += [
            f"- This study: {runs['distinct_runs']} distinct training runs, {runs['wall_hours']} h of summed wall time",
            # best in the last two epochs: recorded since the runs train until they level off
            f"- {runs['best_in_last_two_epochs']} of them ({runs['best_in_last_two_epochs_percent']} %) had their "
            f"best val Recall@5 in their last two epochs, {runs['best_at_last_epoch']} at the last; "
            f"{runs['stopped_early']} stopped early"
            if "best_in_last_two_epochs" in runs
            else f"- {runs['best_at_last_epoch']} of them ({runs['best_at_last_epoch_percent']} %) had their best val "
            f"Recall@5 at their last epoch; {runs['stopped_early']} stopped early",
        ]
        costliest = sorted(runs.get("costs", []), key=lambda c: -c["wall_hours"])[:3]
        if costliest:
            lines.append(
                "- The costliest questions: "
                + ", ".join(f"`{c['experiment']}` {c['wall_hours']:.2f} h ({c['runs']} runs)" for c in costliest)
            )
    else:
        lines += ["- The study's run count and wall time: not run yet (`final_config.json` has no `runs`)"]
    plan_path = root / family.POWER_PLAN
    if plan_path.is_file():
        plan = pd.read_csv(plan_path)
        mde = f"mde_{study.PRIMARY}"
        # The plan is this study's own when its val items are the ones the runs were compared on
        # (data_summary.json); otherwise it plans the next study.
        summary_path = root / "data_summary.json"
        compared = json.loads(summary_path.read_text()).get("val_compare_items") if summary_path.is_file() else None
        when = "Planned before the runs" if compared in set(plan.val_items) else "Planned next"
        roles = sorted(plan.role.unique(), key=lambda role: (role != "primary", role))  # primary first
        for role, rows in ((role, plan[plan.role == role]) for role in roles):
            lines.append(
                f"- {when}, {role} comparisons: {_span(rows.seeds, 'd')} seeds × {_span(rows.val_items, 'd')} "
                f"val items, detecting {_span(rows[mde], '.3f')} of Recall@5 at level {_span(rows.level, 'g')}"
            )
        pending = [e for e in dict.fromkeys(plan.experiment) if not (root / e / "decision.json").is_file()]
        if pending:
            lines.append("- Planned, not run yet: " + ", ".join(f"`{e}`" for e in pending))
    else:
        lines += [f"- The next study's plan: not written yet (`{family.POWER_PLAN}`: `python -m helpers study plan`)"]
    return lines


def verdict_lines(loaded: dict) -> list[str]:
    """The study's verdicts in a few bullets, per role: how many tests, how many of each verdict,
    the variants that left the noise with their intervals, and the range of effects the tests
    could have seen (the minimum detectable effect at each test's level), as ``comparison.csv``
    holds them: no slide types these numbers by hand."""
    rows, lines = family.effects(loaded["profile"], loaded["root"]), []
    for role, level, mde in (
        ("primary", "at Holm's level", "at Holm's strictest level"),
        ("exploratory", "uncorrected 95 %", "at level 0.05"),
    ):
        tests = rows[rows.role == role]
        if not len(tests):
            continue
        found = tests.verdict.value_counts()
        counts = ", ".join(f"{found[v]} {v}" for v in ("better", "worse", "within noise") if v in found)
        decided = [
            f"`{r.variant}` {r.diff:+.3f} [{r.low:+.3f}, {r.high:+.3f}]"
            for r in tests[tests.verdict != "within noise"].itertuples()
        ]
        lines.append(
            f"- {role.capitalize()} ({len(tests)} tests, {level}): {counts}"
            + (": " + "; ".join(decided) if decided else "")
        )
        lines.append(
            f"- The {role} tests could see {_span(tests.mde, '.3f')} of Recall@5 ({mde}): smaller effects stay open"
        )
    return lines


def _span(values: pd.Series, spec: str) -> str:
    """``5`` or ``3 to 5``: the values' range as the file holds them, in ``spec``."""
    low, high = values.min(), values.max()
    return format(low, spec) if low == high else f"{format(low, spec)} to {format(high, spec)}"


def failure_lines(loaded: dict, n: int = 3) -> list[str]:
    """Where the model fails on test, in words, while the failure analysis has drawn no figure:
    the hardest and the easiest category, and the queries whose first correct shop photo came last."""
    final, lines = loaded["root"] / "final", []
    categories = final / "per_category.csv"
    if categories.is_file():
        table = pd.read_csv(categories, index_col=0).sort_values("recall@5")
        lines += [
            "- Test Recall@5 by category, hardest first: "
            + "; ".join(f"{c} {row['recall@5']:.3f} ({row.n_queries:.0f} queries)" for c, row in table.iterrows())
        ]
    ranks = final / "per_query_ranks.csv"
    if ranks.is_file():
        table = pd.read_csv(ranks).sort_values(["rank_of_first_hit", "path"], ascending=[False, True]).head(n)
        lines += ["- Hardest test queries, by the rank of their first correct shop photo:"]
        lines += [f"    - `{row.item_id}` ({row.category}): rank {row.rank_of_first_hit}" for row in table.itertuples()]
    return lines


def talk_lists(loaded: dict) -> dict[str, list[str]]:
    """The generated bullet lists a slide may show (those whose results exist)."""
    lists = {"source": source_lines(loaded), "cost": cost_lines(loaded)}
    verdicts = verdict_lines(loaded)
    if verdicts:
        lists["verdicts"] = verdicts
    worst = failure_lines(loaded)
    if worst:
        lists[FAILURES] = worst
    return lists


def not_run(kind: str, name: str) -> str:
    return f'<p class="note">Not run yet: the {kind} <code>{name}</code> needs results the study has not written.</p>'


def talk_slides(talk: tuple[Path, str], loaded: dict, figures: Path) -> list[str]:
    """The slides of the written talk (``---`` between slides), each ``[[figure NAME]]`` /
    ``[[table NAME]]`` / ``[[list NAME]]`` line replaced by that figure, table or list (a missing
    ``failures`` figure by the list ``failures``; anything else whose results do not exist yet by a
    one-line note), and every slide holding results tagged with their data (:func:`data_tag`). A
    name no results could give is an InputError naming the talk's file and line."""
    path, text = talk
    label = _LABEL.search(text)
    if label:
        raise InputError(f"{path}: {label[0]} is a label of the paper; a slide shows its own: [[figure NAME]]")
    wanted = {m[2] for m in _DIRECTIVE.finditer(text) if m[1] == "figure"}
    images, tables, lists = talk_figures(loaded, figures, wanted), talk_tables(loaded), talk_lists(loaded)
    possible = {
        "figure": set(known_figures(loaded["profile"])) | set(images),
        "table": set(TABLES) | set(tables),
        "list": set(LISTS) | set(lists),
    }

    def replace(match: re.Match) -> str:
        kind, name = match[1], match[2]
        if name not in possible[kind]:
            line = text[: match.start()].count("\n") + 1
            raise InputError(f"{path}:{line}: unknown {kind} {name!r}; known: {', '.join(sorted(possible[kind]))}")
        if kind == "figure" and name in images:
            return f"![{name}](figures/{images[name]})"
        if kind == "figure" and name == FAILURES and FAILURES in lists:
            kind = "list"  # the failure analysis has drawn nothing yet: its findings in words
        if kind == "table" and name in tables:
            return md_table(tables[name])
        if kind == "list" and name in lists:
            return "\n".join(lists[name])
        return not_run(kind, name)

    written = re.split(r"\n---\n", text)
    filled = re.split(r"\n---\n", _DIRECTIVE.sub(replace, text))
    assert len(filled) == len(written), "a table or list broke a slide in two"
    slides = []
    for source, slide in zip(written, filled):
        shown = {(m[1], m[2]) for m in _DIRECTIVE.finditer(source)}
        tag = "\n\n" + data_tag(loaded) if shown - NOT_FROM_RESULTS else ""
        slides.append(slide.strip() + tag)
    return slides
