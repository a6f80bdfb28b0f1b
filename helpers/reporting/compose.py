"""``report/`` from ``results/`` and the written sections of ``report/prose/``: ``report.md``, its HTML
rendering, the talk (``slides.md`` / ``slides.html``: the written ``prose/talk.md`` with its figures
and tables filled in, one ``---`` per slide) and the figures (:func:`build`), so the written story
and the talk can never disagree with the runs; :func:`helpers.reporting.render.render_pdfs` then
prints ``report.pdf`` and ``slides.pdf``.

``report.md`` reads as a paper (:func:`paper`): title and authors, the sections a person writes
(:func:`helpers.reporting.prose.prose_names`) around the generated method, data, results (the ranked
effects, the original study's claims: :mod:`helpers.reporting.claims`, one line per experiment),
the full study's plan ("Running on DeepFashion"), the References (:mod:`helpers.reporting.references`:
``[@key]`` citations numbered from ``report/prose/references.bib``) and Appendix A with every
experiment's table and figures, each numbered (prose refers to them as ``{tab:crop}`` /
``{fig:crop_curves}``; :func:`unreferenced_labels` lists any never referred to). The prose is held to
the results by :mod:`helpers.reporting.check`, on :func:`results_text`.

Every number printed comes from a file under ``results/<profile>/`` (``data_summary.json``,
each experiment's ``comparison.csv`` / ``decision.json`` written by :mod:`helpers.experiments.study`,
``final_config.json`` and ``final/metrics.json`` written by ``04_demo``), formatted, never
computed anew. Nothing under ``results/`` is written here: the whole family's Holm values are added
by the study when its last experiment finishes (:func:`helpers.experiments.family.finalise`),
and shown when present.
"""

from __future__ import annotations

import re
from pathlib import Path

from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.core.files import write_text_atomic
from helpers.evaluation import plots
from helpers.experiments import study
from helpers.reporting import references
from helpers.reporting.claims import claims_lines
from helpers.reporting.prose import AUTHORS, PROSE_DIR, TALK, TITLE, prose_lines, read_prose, resolve_labels
from helpers.reporting.render import render_html, render_slides_html
from helpers.reporting.results_section import experiment_lines, final_lines, overview_lines
from helpers.reporting.sections import (
    data_lines,
    deepfashion_lines,
    experiment_summary,
    load_profile,
    method_lines,
    reproduction_lines,
    save_figure,
)
from helpers.reporting.talk import talk_slides

PROFILE_ORDER = ("full", "demo", "fixture")  # the real study first when it exists
BIBLIOGRAPHY = "{bibliography}"  # where paper() leaves the References for build() to fill in
# The sections whose numbers come from elsewhere than results/: the literature (a published figure is
# recorded in the bibliography entry its sentence cites: references.unsourced_numbers), the bibliography
# itself, and the full study's plan (counted from the catalogue, bounded from docs/benchmarks.md's
# measured throughput: sections.deepfashion_lines), and the claims table, whose claims are the original
# study's (docs/original_study.md; its verdict column is read from results/, as tests/test_paper.py checks).
# :func:`results_text` leaves them out.
OUTSIDE_RESULTS = ("Related work", "The original study's claims", "Running on DeepFashion", "References")


def profiles(results: Path) -> list[Path]:
    """The profile folders under ``results`` (or ``results`` itself when it is one, e.g. the
    fixture's ``outputs/fixture/results``)."""
    if (results / "data_summary.json").is_file():
        return [results]
    found = [results / p for p in PROFILE_ORDER if (results / p / "data_summary.json").is_file()]
    if not found:
        raise InputError(f"{results}: no study results (no <profile>/data_summary.json); run `make study` first")
    return found


def _without_block(lines: list[str], heading: str) -> tuple[list[str], list[str]]:
    """``(lines without the block, the block)``: the block runs from the line starting with
    ``heading`` to the next heading of its level or above."""
    starts = [i for i, line in enumerate(lines) if line.startswith(heading)]
    if not starts:
        return lines, []
    level = len(heading) - len(heading.lstrip("#"))
    start = starts[0]
    end = next(
        (
            i
            for i in range(start + 1, len(lines))
            if lines[i].startswith("#") and len(lines[i]) - len(lines[i].lstrip("#")) <= level
        ),
        len(lines),
    )
    return lines[:start] + lines[end:], lines[start:end]


def results_main(loaded: dict, tag: str, figures: Path, texts: dict, level: str, roots: dict) -> list[str]:
    """Section 5 for one profile: the study's effects in one figure, the original study's claims,
    per stage its findings and a line per experiment (its table, figure and curves in Appendix A),
    the final configuration and the test. The post-processing table goes to the appendix too."""
    lines = overview_lines(loaded, tag, figures)
    lines += [f"{level} The original study's claims", "", *claims_lines(roots, loaded["source"], tag)]
    results = dict((e.name, r) for e, r in loaded["finished"])
    for stage in study.STAGES:
        lines += [f"{level} Stage `{stage}`", ""]  # in backticks: a name, not a number
        lines += prose_lines(texts, f"findings_{stage}")
        lines += [
            experiment_summary(loaded, e, results.get(e.name), tag)
            for e in study.experiments(loaded["profile"])
            if e.stage == stage
        ] + [""]
    final = final_lines(loaded, tag, figures, level)
    rest, post = _without_block(final, f"{level} Post-processing")
    if post:  # its table in Appendix A; here, where it stood, its summary
        result = study.load_experiment(loaded["root"], study.POSTPROCESS)
        at = final.index(post[0])
        rest[at:at] = [post[0], "", experiment_summary(loaded, study.POSTPROCESS, result, tag), ""]
    return lines + rest


def results_appendix(loaded: dict, tag: str, figures: Path, level: str) -> list[str]:
    """Appendix A for one profile: each experiment's table, adopted variant, differences and
    learning curves (and the post-processing experiment's), as Section 5 summarises them."""
    lines = []
    results = dict((e.name, r) for e, r in loaded["finished"])
    for stage in study.STAGES:
        lines += [f"{level} Stage `{stage}`", ""]
        for experiment in (e for e in study.experiments(loaded["profile"]) if e.stage == stage):
            lines += experiment_lines(loaded, experiment, results.get(experiment.name), tag, figures, level)
    _, post = _without_block(final_lines(loaded, tag, figures, level), f"{level} Post-processing")
    return lines + post


def paper(loaded: list[dict], texts: dict, figures: Path) -> list[str]:
    """The report's lines: prose sections around the generated data, method and results, with
    ``{tab:x}`` / ``{fig:x}`` labels and ``[@key]`` citations unresolved and :data:`BIBLIOGRAPHY`
    where the References go. The first profile is the one the prose describes (its labels are
    bare: ``{tab:crop}``); a further profile's labels carry its name (``{tab:full_crop}``) and its
    findings are not repeated."""
    tags = ["" if i == 0 else f"{p['profile']}_" for i, p in enumerate(loaded)]
    level = "####" if tags[1:] else "###"
    roots = {p["profile"]: p["root"] for p in loaded}

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
        AUTHORS,
        "",
        "Generated by `python -m helpers report` from `results/` and the prose in `report/prose/`; do not edit by "
        "hand. Every number below is read from a file under `results/`, except those of Related work (the "
        "literature), the original study's claims (its own numbers), Running on DeepFashion (a plan: counted from "
        "the study's catalogue, bounded from measured throughput) and the References. Selection used val only: the study reads no test number (a run trained "
        "before `fit` stopped evaluating test still holds that metrics.json; nothing reads it), only the final "
        "configuration's runs are evaluated on test, once.",
        "",
    ]
    lines += ["## Abstract", "", *prose_lines(texts, "abstract"), "## 1 Introduction", ""]
    lines += prose_lines(texts, "introduction")
    lines += ["## 2 Related work", "", *prose_lines(texts, "related_work")]
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
    lines += ["## 4 Data", "", *per_profile(lambda p, tag: data_lines(p, tag, figures))]
    lines += ["## 5 Results", ""]
    lines += per_profile(
        lambda p, tag: results_main(
            p, tag, figures, texts if tag == "" else {}, level, roots if tag == "" else {p["profile"]: p["root"]}
        )
    )
    for number, section in ((6, "discussion"), (7, "limitations")):
        lines += [f"## {number} {section.capitalize()}", "", *prose_lines(texts, section)]
    lines += ["## 8 Running on DeepFashion", "", *prose_lines(texts, "running"), *deepfashion_lines()]
    lines += ["## 9 Conclusion", "", *prose_lines(texts, "conclusion")]
    lines += [BIBLIOGRAPHY, ""]
    lines += ["## Appendix A: the experiments' tables", ""]
    lines += per_profile(lambda p, tag: results_appendix(p, tag, figures, level))
    return lines + [
        "## Appendix B: reproducing the numbers",
        "",
        *per_profile(lambda p, _: reproduction_lines(p["root"])),
    ]


def cite(text: str, entries: list[references.Entry]) -> str:
    """``text`` with its citations numbered and the References section (when anything is cited)
    in place of :data:`BIBLIOGRAPHY`."""
    text, numbers = references.resolve_citations(text, entries)
    bibliography = ["## References", "", *references.bibliography_lines(entries, numbers)] if numbers else []
    return text.replace(BIBLIOGRAPHY + "\n", "\n".join(bibliography).rstrip() + "\n" if bibliography else "")


_LABEL_USE = re.compile(r"(?<!def:)\{(tab|fig):(\w+)\}")
_LABEL_DEF = re.compile(r"\{def:(tab|fig):(\w+)\}")


def unreferenced_labels(text: str) -> list[str]:
    """The tables and figures ``text`` (a paper before :func:`helpers.reporting.prose.resolve_labels`)
    defines (``{def:tab:x}``) but never refers to (``{tab:x}``) outside their own caption: every
    table and figure must be cited by the text, e.g. ``['tab:data']``."""
    used = set()
    for line in text.splitlines():
        defined = set(_LABEL_DEF.findall(line))
        used |= {label for label in _LABEL_USE.findall(line) if label not in defined}
    return [f"{k}:{n}" for k, n in dict.fromkeys(_LABEL_DEF.findall(text)) if (k, n) not in used]


_CITATION_NUMBERS = re.compile(r"\[\d+(?:, \d+)*\]")


def results_text(text: str) -> str:
    """The paper without the sections of :data:`OUTSIDE_RESULTS` and without its citation numbers
    (``[3]``, ``[2, 5]``): the text whose every number must trace to ``results/``
    (:func:`helpers.reporting.check.untraceable_numbers`)."""
    kept, skipping, depth = [], False, 0
    for line in text.splitlines():
        heading = re.match(r"(#+) (?:\d+ )?(.*)$", line)
        if heading and skipping and len(heading[1]) <= depth:
            skipping = False
        if heading and not skipping and heading[2] in OUTSIDE_RESULTS:
            skipping, depth = True, len(heading[1])
        if not skipping:
            kept.append(line)
    return _CITATION_NUMBERS.sub("", "\n".join(kept))


def build(
    results: Path | None = None,
    out: Path | None = None,
    profile_dirs: list[Path] | None = None,
    prose: Path | None = None,
) -> list[Path]:
    """Write ``report.md``, ``report.html`` and ``figures/`` under ``out``, with the written sections of
    ``prose`` (:func:`helpers.reporting.prose.prose_names`; default ``report/prose/`` of the repository,
    whatever ``out`` is), and then the talk (``slides.md``, ``slides.html``:
    :func:`helpers.reporting.talk.talk_slides`). PDFs: :func:`helpers.reporting.render.render_pdfs`."""
    results, out = Path(results or REPO_ROOT / "results"), Path(out or REPO_ROOT / "report")
    texts = read_prose(Path(prose or PROSE_DIR))
    bib, entries = references.read(Path(prose or PROSE_DIR))
    references.check_citations(texts, bib, entries)
    figures = out / "figures"
    figures.mkdir(parents=True, exist_ok=True)
    loaded = [load_profile(root) for root in profile_dirs or profiles(results)]
    save_figure(plots.plot_pipeline(), figures / "pipeline.png")
    text = resolve_labels(cite("\n".join(paper(loaded, texts, figures)).rstrip() + "\n", entries), texts)
    written = [
        write_text_atomic(out / "report.md", text),
        write_text_atomic(out / "report.html", render_html(text, TITLE.lstrip("# "))),
    ]
    deck = talk_slides(texts[TALK.removesuffix(".md")], loaded[0], figures)
    written += [
        write_text_atomic(
            out / "slides.md", "---\nmarp: true\npaginate: true\n---\n\n" + "\n\n---\n\n".join(deck) + "\n"
        ),
        write_text_atomic(out / "slides.html", render_slides_html(deck, TITLE.lstrip("# "))),
    ]
    return written + sorted(figures.glob("*.png")) + sorted(figures.glob("*.jpg"))
