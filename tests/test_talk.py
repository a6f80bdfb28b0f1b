"""The talk (report/prose/talk.md → slides): built from the committed results/demo as they are,
10 to 14 slides with one title each, a data tag on every slide showing results, every number
traceable to results/, the DeepFashion commands ones the CLI takes, a missing result a one-line
note; and each slide laid out by headless Chromium at 1280×720 without overflow, with text of
at least 14 pt and figures drawn at a legible size (planted failures show that the checks bite).
"""

from __future__ import annotations

import json
import re
import shlex
import shutil
from pathlib import Path

import pandas as pd
import pytest
from PIL import Image

from helpers.apps.cli import build_parser
from helpers.core.config import REPO_ROOT
from helpers.experiments import catalogue, family, study
from helpers.reporting import check, render, sections, talk
from helpers.reporting.prose import PROSE_DIR, TALK

RESULTS = REPO_ROOT / "results"
DEMO = RESULTS / "demo"
TAG = '<p class="tag">synthetic data (profile <code>demo</code>), not DeepFashion</p>'


def build_talk(root: Path, talk_text: str, out: Path) -> list[str]:
    """The deck of ``talk_text`` from the results folder ``root``, with its figures and
    ``slides.html`` under ``out`` (the talk alone: the paper's prose is not needed)."""
    (out / "figures").mkdir(parents=True, exist_ok=True)
    deck = talk.talk_slides((PROSE_DIR / TALK, talk_text), sections.load_profile(root), out / "figures")
    (out / "slides.md").write_text("\n\n---\n\n".join(deck) + "\n")
    (out / "slides.html").write_text(render.render_slides_html(deck, "talk"))
    return deck


@pytest.fixture(scope="module")
def deck(tmp_path_factory):
    if not (DEMO / "data_summary.json").is_file():
        pytest.skip("no committed results/demo")
    out = tmp_path_factory.mktemp("talk")
    return build_talk(DEMO, (PROSE_DIR / TALK).read_text(), out), out


def _title(slide: str) -> str:
    return re.match(r"#{1,2} (.+)", slide)[1]


def _slide(deck: list[str], title_start: str) -> str:
    found = [s for s in deck if _title(s).startswith(title_start)]
    assert len(found) == 1, (title_start, [_title(s) for s in deck])
    return found[0]


def test_ten_to_fourteen_slides_one_title_each(deck):
    slides, _ = deck
    assert 10 <= len(slides) <= 14
    for slide in slides:
        words = re.sub(r"^```.*?^```", "", slide, flags=re.MULTILINE | re.DOTALL)  # a shell comment is no title
        assert len(re.findall(r"^#{1,2} ", words, flags=re.MULTILINE)) == 1, slide[:80]
        assert re.match(r"#{1,2} ", slide), slide[:80]  # the title first: the slide's message


def test_every_results_slide_is_tagged_and_only_those(deck):
    """The tag is generated: a slide gets it when it holds a figure, table or list from results,
    never when it holds only words or the pipeline drawing."""
    slides, _ = deck
    written = (PROSE_DIR / TALK).read_text().split("\n---\n")
    assert len(written) == len(slides)
    for source, slide in zip(written, slides):
        shown = {(kind, name) for kind, name in re.findall(r"^\[\[(\w+) (\w+)\]\]$", source, flags=re.MULTILINE)}
        from_results = bool(shown - talk.NOT_FROM_RESULTS)
        assert (TAG in slide) == from_results, _title(slide)
        assert TAG not in source  # never typed by hand
        assert "[[" not in slide


def test_the_required_slides(deck):
    slides, out = deck
    overview = _slide(slides, "Ranked effects")
    assert (
        "![overview](figures/demo_overview_slide.png)" in overview
        and (out / "figures/demo_overview_slide.png").is_file()
    )
    failures = _slide(slides, "Where the model fails")
    if (DEMO / "final" / "failures_by_category.csv").is_file():
        assert "![failures](figures/demo_failures_slide.png)" in failures
    else:  # the failure analysis's tables are not there yet: words
        assert "Test Recall@5 by category, hardest first: CLOTHING 0.656 (32 queries)" in failures
        assert "- Hardest test queries" in failures
    cost = _slide(slides, "What the study cost")
    assert "This study: 84 distinct training runs, 16.62 h of summed wall time" in cost
    assert "19 of them (23.5 %) had their best val Recall@5 in their last two epochs, 12 at the last" in cost
    if (DEMO / "power_plan.csv").is_file():
        assert "Planned before the runs, primary comparisons: 5 seeds × 800 val items, detecting 0.041" in cost
    deepfashion = _slide(slides, "On DeepFashion")
    assert "--profile full" in deepfashion
    final = _slide(slides, "The final model")
    assert "confirm" not in final.lower()  # not rejecting the default recipe is no confirmation of it


def test_every_number_is_in_results_and_no_sentence_contradicts_a_verdict(deck):
    slides, out = deck
    text = (out / "slides.md").read_text()
    assert check.untraceable_numbers(text, RESULTS) == []
    assert check.contradictions(text, check.verdicts(DEMO)) == []
    planted = text + "\n- A typed number: 42.4242\n"
    assert check.untraceable_numbers(planted, RESULTS) == ["42.4242"]


def test_the_deepfashion_commands_are_ones_the_cli_takes():
    """Each `python -m helpers ...` of the DeepFashion slide parses with the CLI's own parser, names a
    study target that exists, and every file it reads is there."""
    text = (PROSE_DIR / TALK).read_text()
    slide = next(s for s in text.split("\n---\n") if "## On DeepFashion" in s)
    commands = re.findall(r"python -m helpers ([^)\n#]+)", slide)
    assert len(commands) >= 6
    parser = build_parser()
    for command in commands:
        args = parser.parse_args(shlex.split(command.strip()))
        if args.command == "study":
            assert args.profile == "full"
            if args.experiment not in ("plan", "power", "robustness", catalogue.POSTPROCESS):
                assert catalogue.select("full", args.experiment)
            if args.noise:
                assert (REPO_ROOT / args.noise).is_file(), args.noise
    notebooks = re.findall(r"--inplace (\S+\.ipynb)", slide)
    assert notebooks and all((REPO_ROOT / n).is_file() for n in notebooks)


def test_results_not_there_yet_are_a_note_not_an_error(tmp_path):
    """An older or partial study: one experiment, no final model, no cost record, no plan. The
    slides naming what is missing say so in one line; a name no results could give stays an error."""
    root = tmp_path / "results" / "demo"
    root.mkdir(parents=True)
    shutil.copy(DEMO / "data_summary.json", root)
    shutil.copytree(DEMO / "crop", root / "crop", ignore=shutil.ignore_patterns("*.pt"))
    text = (
        "# A talk\n\n---\n\n## Ranked\n\n[[figure overview]]\n\n---\n\n## Batch\n\n[[figure batch_curves]]\n\n---\n\n"
        "## Fails\n\n[[figure failures]]\n\n---\n\n## Test\n\n[[table final]]\n\n---\n\n## Cost\n\n[[list cost]]\n"
    )
    slides = build_talk(root, text, tmp_path / "out")
    assert "![overview](figures/demo_overview_slide.png)" in slides[1] and TAG in slides[1]
    for slide, what in zip(slides[2:5], ("figure <code>batch_curves</code>", "figure <code>failures</code>", "table")):
        assert f"Not run yet: the {what}" in slide, slide
    assert "not run yet (`final_config.json` has no `runs`)" in slides[5]
    assert "The next study's plan: not written yet" in slides[5]
    with pytest.raises(Exception, match=r"unknown figure 'batch_curve'"):
        build_talk(root, text.replace("batch_curves", "batch_curve"), tmp_path / "out")


def test_the_failures_slide_draws_04_demos_tables_at_the_slides_size(tmp_path):
    root = tmp_path / "results" / "demo"
    (root / "final").mkdir(parents=True)
    shutil.copy(DEMO / "data_summary.json", root)
    (root / "final" / "metrics.json").write_text(
        '{"protocols": {"official": {"recall@1": 0.3, "recall@5": 0.61, "recall@10": 0.7}}}'
    )
    for name, groups in (("category", ["DRESSES", "TOPS"]), ("box_area", ["< 0.3", "0.3-0.6", ">= 0.6"])):
        n = len(groups)
        table = pd.DataFrame(
            {"recall@5": [0.5] * n, "low": [0.4] * n, "high": [0.6] * n, "n_queries": [40] * n, "n_items": [12] * n},
            index=pd.Index(groups, name=name),
        ).assign(few_items=False)
        table.to_csv(root / "final" / f"failures_by_{name}.csv")
    slides = build_talk(root, "# A talk\n\n---\n\n## Fails\n\n[[figure failures]]\n", tmp_path / "out")
    assert slides[1].startswith("## Fails\n\n![failures](figures/demo_failures_slide.png)") and TAG in slides[1]
    with Image.open(tmp_path / "out" / "figures" / "demo_failures_slide.png") as image:  # drawn for the slide
        assert abs(image.width - talk.SLIDE_FIGURE_PX[0]) <= 2 and image.height <= talk.SLIDE_FIGURE_PX[1] + 2


def test_the_verdicts_list_is_read_from_the_comparisons(monkeypatch):
    effects = pd.DataFrame(
        [
            ("crop", "crop=False", "exploratory", 3, -0.150, -0.210, -0.090, "worse", 0.051),
            ("batch", "P×K=16×2", "primary", 5, 0.061, 0.012, 0.110, "better", 0.047),
            ("resize", "resize=squash", "primary", 5, -0.004, -0.040, 0.032, "within noise", 0.046),
            ("length", "epochs=10", "exploratory", 3, -0.020, -0.070, 0.030, "within noise", 0.055),
        ],
        columns=["experiment", "variant", "role", "n_seeds", "diff", "low", "high", "verdict", "mde"],
    )
    monkeypatch.setattr(talk.family, "effects", lambda profile, root: effects)
    assert talk.verdict_lines({"profile": "demo", "root": DEMO}) == [
        "- Primary (2 tests, at Holm's level): 1 better, 1 within noise: `P×K=16×2` +0.061 [+0.012, +0.110]",
        "- The primary tests could see 0.046 to 0.047 of Recall@5 (at Holm's strictest level): smaller effects stay open",
        "- Exploratory (2 tests, uncorrected 95 %): 1 worse, 1 within noise: `crop=False` -0.150 [-0.210, -0.090]",
        "- The exploratory tests could see 0.051 to 0.055 of Recall@5 (at level 0.05): smaller effects stay open",
    ]


# --------------------------------------------------------------------------- rendered by Chromium


def _browser_ready() -> str | None:
    if not render.chromium_installed():
        return "Chromium not installed (apt-get install chromium; CI installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright not installed (requirements.txt)"
    return None


browser = pytest.mark.skipif(_browser_ready() is not None, reason=str(_browser_ready()))


@browser
def test_every_slide_fits_its_page_with_legible_text_and_figures(deck):
    slides, out = deck
    layout = render.slide_layout(out / "slides.html")
    assert len(layout) == len(slides)
    assert render.layout_problems(layout) == []
    overview = next(s for s in layout if s["title"].startswith("Ranked effects"))
    (figure,) = overview["figures"]
    assert figure["drawn"][0] >= 0.8 * figure["native"][0]  # the forest plot fills the slide, drawn near its own size
    # printed: one page per slide
    render.render_pdf(out / "slides.html", out / "slides.pdf")
    assert render.pdf_pages(out / "slides.pdf") == len(slides)


@browser
def test_the_layout_checks_catch_planted_failures(tmp_path):
    """An overflowing list, a figure squeezed by its text, a tall narrow figure, small text and a line
    too wide: each is named with its slide; a sound slide is not."""
    Image.new("RGB", (704, 768), "white").save(tmp_path / "portrait.png")  # like the pairs figure
    Image.new("RGB", (300, 1500), "white").save(tmp_path / "tall.png")
    Image.new("RGB", (800, 272), "white").save(tmp_path / "wide.png")
    bullets = "\n".join(f"- point {i}" for i in range(40))
    deck = [
        "## Sound: a figure and one line\n\n![wide](wide.png)\n\nOne line under it",
        f"## Overflowing list\n\n{bullets}",
        "## A figure squeezed by its text\n\n![portrait](portrait.png)\n\n"
        + "\n".join(f"- line {i}" for i in range(6)),
        "## A tall narrow figure\n\n![tall](tall.png)",
        '## Small text\n\n<p style="font-size:12px">a footnote</p>',
        "## A line too wide\n\n`" + "x" * 150 + "`",
    ]
    (tmp_path / "planted.html").write_text(render.render_slides_html(deck, "planted"))
    problems = render.layout_problems(render.slide_layout(tmp_path / "planted.html"))
    assert not [p for p in problems if p.startswith("slide 1 ")], problems
    assert any(p.startswith("slide 2 ") and "overflows" in p and "tall" in p for p in problems), problems
    assert any(p.startswith("slide 3 ") and "portrait.png drawn" in p for p in problems), problems
    assert any(p.startswith("slide 4 ") and "tall.png drawn" in p for p in problems), problems
    assert any(p.startswith("slide 5 ") and "text at 12.0 px" in p for p in problems), problems
    assert any(p.startswith("slide 6 ") and "px wide on a 1280 px slide" in p for p in problems), problems
    assert len(problems) == 5, problems


def test_the_cost_slide_names_the_costliest_questions(tmp_path):
    costs = [
        {"experiment": "crop", "runs": 8, "wall_hours": 1.6, "median_epochs": 30.0},
        {"experiment": "resize", "runs": 5, "wall_hours": 1.0, "median_epochs": 30.0},
        {"experiment": "length", "runs": 3, "wall_hours": 0.2, "median_epochs": 10.0},
        {"experiment": "augment", "runs": 11, "wall_hours": 2.25, "median_epochs": 29.0},
    ]
    runs = {"distinct_runs": 27, "wall_hours": 5.05, "best_at_last_epoch": 3, "best_at_last_epoch_percent": 11.1}
    (tmp_path / "final_config.json").write_text(json.dumps({"runs": {**runs, "stopped_early": 4, "costs": costs}}))
    lines = talk.cost_lines({"root": tmp_path})
    assert (
        "- The costliest questions: `augment` 2.25 h (11 runs), `crop` 1.60 h (8 runs), `resize` 1.00 h (5 runs)"
        in lines
    )


def test_the_cost_slide_says_whose_plan_it_shows(tmp_path):
    """A plan sized for the val items the runs were compared on is this study's own; any other
    (or a study that did not record them) is the next study's."""
    plan = pd.DataFrame(
        {
            "experiment": ["resize"],
            "variant": ["resize=squash"],
            "role": ["primary"],
            "seeds": [5],
            "val_items": [800],
            "level": [0.00625],
            f"mde_{study.PRIMARY}": [0.0405],
        }
    )
    plan.to_csv(tmp_path / family.POWER_PLAN, index=False)
    lines = {}
    for compared in (800, 75, None):
        summary = {"profile": "demo"} if compared is None else {"profile": "demo", "val_compare_items": compared}
        (tmp_path / "data_summary.json").write_text(json.dumps(summary))
        lines[compared] = "\n".join(talk.cost_lines({"root": tmp_path}))
    assert "- Planned before the runs, primary comparisons: 5 seeds × 800 val items, detecting 0.041" in lines[800]
    assert "- Planned next, primary comparisons: 5 seeds" in lines[75]
    assert "- Planned next, primary comparisons: 5 seeds" in lines[None]
