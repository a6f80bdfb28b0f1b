"""The paper's apparatus (helpers.reporting.references, claims, compose, sections): the bibliography
from one source (report/prose/references.bib), every entry cited and every citation resolved; the
related work's numbers sourced from the entries it cites; the claims table read from the committed
verdicts; the full study's run count and cost; every table and figure referred to."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import pytest

from helpers.core import config
from helpers.core.config import REPO_ROOT
from helpers.core.errors import InputError
from helpers.experiments import catalogue
from helpers.reporting import check, claims, compose, prose, references, sections
from tests.test_report import write_prose, write_tree

PROSE = REPO_ROOT / "report" / "prose"
DEMO = REPO_ROOT / "results" / "demo"


@pytest.fixture()
def prose_copy(tmp_path):
    folder = tmp_path / "prose"
    shutil.copytree(PROSE, folder)
    return folder


def _check(folder: Path) -> None:
    references.check_citations(prose.read_prose(folder), *references.read(folder))


def test_the_bibliography_is_cited_and_resolves():
    bib, entries = references.read(PROSE)
    assert len(entries) >= 12
    _check(PROSE)
    texts = "\n".join(body for _, body in prose.read_prose(PROSE).values())
    assert set(references.cited_keys(texts)) == {e.key for e in entries}


def test_a_planted_uncited_entry_fails_naming_the_bib(prose_copy):
    bib = prose_copy / references.BIB
    bib.write_text(
        bib.read_text() + "\n@article{planted2000,\n  author = {A. Nobody},\n  title = {T},\n  year = {2000}\n}\n"
    )
    with pytest.raises(InputError, match=r"references\.bib:\d+: entry 'planted2000' is cited nowhere") as error:
        _check(prose_copy)
    assert "\n" not in str(error.value)


def test_a_planted_unknown_citation_fails_naming_the_prose_file(prose_copy):
    path = prose_copy / "related_work.md"
    path.write_text(path.read_text() + "\nAs shown before [@nobody2099].\n")
    with pytest.raises(InputError, match=r"related_work\.md: unknown citation \[@nobody2099\]") as error:
        _check(prose_copy)
    assert "\n" not in str(error.value)


def test_citations_numbered_in_order_and_the_references_printed(tmp_path):
    """Through the whole build: a prose folder with a bibliography of two entries cited in order."""
    results = tmp_path / "results"
    write_tree(results)
    write_prose(tmp_path / "prose", findings_02_1="Cropping: {tab:crop}, {fig:crop}, {fig:crop_curves} [@b; @a].")
    (tmp_path / "prose" / "abstract.md").write_text("First [@a], see {tab:test}.\n")
    (tmp_path / "prose" / references.BIB).write_text(
        "@article{a,\n  author = {Sture Holm},\n  title = {A {Simple} Test},\n  journal = {J},\n  volume = {6},\n"
        "  pages = {65--70},\n  year = {1979}\n}\n"
        "@inproceedings{b,\n  author = {A. One and B. Two and C. Three},\n  title = {Other},\n"
        "  booktitle = {CVPR},\n  year = {2016}\n}\n"
    )
    compose.build(results, tmp_path / "report", prose=tmp_path / "prose")
    text = (tmp_path / "report" / "report.md").read_text()
    assert "First [1], see Table" in text and "Figure 5 [2, 1]." in text and "[@" not in text
    assert "[1] Sture Holm. A Simple Test. *J*, vol. 6, pp. 65–70, 1979." in text
    assert "[2] A. One, B. Two and C. Three. Other. *CVPR*, 2016." in text
    assert text.index("## References") < text.index("## Appendix A")
    assert check.untraceable_numbers(compose.results_text(text), results) == []
    # an unknown citation through the build: one line, the prose file named
    (tmp_path / "prose" / "conclusion.md").write_text("See [@c].\n")
    with pytest.raises(InputError, match=r"conclusion\.md: unknown citation \[@c\]"):
        compose.build(results, tmp_path / "report", prose=tmp_path / "prose")


def test_the_related_work_states_only_numbers_its_citations_record():
    _, entries = references.read(PROSE)
    text = (PROSE / "related_work.md").read_text()
    assert "0.188" in text and references.unsourced_numbers(text, entries) == []
    assert references.unsourced_numbers("A figure of 0.188 [@hermans2017defense].", entries) == ["0.188"]
    assert references.unsourced_numbers("Table 3 and Section 5 [@hermans2017defense].", entries) == []


def test_the_claims_table_reads_the_committed_verdicts():
    rows = claims.claim_rows({"demo": DEMO}).set_index("claim of the original study")
    assert len(rows) >= 10
    crop = rows.loc["Crop every photo to its garment box (it always cropped)."]
    assert crop["where"] == claims.DEMO
    assert (
        "`crop=False`: worse, -0.232 [-0.262, -0.202] (exploratory, uncorrected 95 %); the claim: supported"
        in crop.iloc[1]
    )
    where = dict(zip(rows.index, rows["where"]))
    assert where["EfficientNet-B3 beat ResNet-34."] == claims.FULL
    assert [w for w in where.values() if w == claims.OFFLINE] == [claims.OFFLINE]
    verdicts = " ".join(rows.iloc[:, 1])
    # a primary test at its Holm level over the whole family, once the study has finished
    assert (
        "`photometric=grayworld`: worse, -0.031 [-0.062, -0.001] (at Holm's level); the claim: contradicted" in verdicts
    )
    assert "exploratory" not in verdicts or "uncorrected 95 %" in verdicts
    # every interval printed is the committed one: traceable to results/; the claims' own numbers are the
    # original study's, as docs/original_study.md gives them
    assert check.untraceable_numbers(" ".join(rows.iloc[:, 1]), REPO_ROOT / "results") == []
    original = (REPO_ROOT / "docs" / "original_study.md").read_text()
    levels = {str(v) for field in catalogue.LEVELS.values() for p in field.values() for vs in p for v in vs}
    assert [n for n in check._NUMBER.findall(" ".join(rows.index)) if n not in original and n not in levels] == []


def test_the_claims_table_without_results_says_not_run_yet(tmp_path):
    rows = claims.claim_rows({"demo": tmp_path})
    tested = rows[rows["where"] == claims.DEMO].iloc[:, 2]
    assert all("not run yet" in cell and "[" not in cell for cell in tested)


def test_the_full_study_run_count_follows_the_catalogue():
    seeds = config.STUDY_SEEDS["full"]
    base = config.PROFILES["full"]
    variants = sum(
        len(catalogue.resolve_variants(e, base)) - 1 for e in catalogue.experiments("full")
    )  # the full profile's levels are all primary
    assert all(not e.exploratory for e in catalogue.experiments("full"))
    fewest, most = sections.study_run_count("full")
    assert (fewest, most) == (variants * seeds + seeds, variants * seeds + len(catalogue.STAGES) * seeds)
    hours = sections.study_gpu_hours("full")
    assert list(hours.stage) == list(catalogue.STAGES) and (hours.gpu_hours_max > 0).all()
    # the rates quoted are the GPU card's measurement in docs/benchmarks.md
    benchmarks = (REPO_ROOT / "docs" / "benchmarks.md").read_text()
    assert f"| eager | 64 | {sections.GPU_CARD['train_images_per_s']} |" in benchmarks
    assert f"{sections.GPU_CARD['embed_images_per_s']} img/s eager" in benchmarks
    lines = "\n".join(sections.deepfashion_lines())
    assert f"{fewest}–{most}" in lines and "not measured on Colab" in lines


def test_labels_defined_but_never_referred_to_are_listed():
    text = "*{def:tab:a}: a table, see {tab:a}.*\n*{def:fig:b}: a figure.*\nProse on {fig:b}.\n*{def:tab:c}: c.*"
    assert compose.unreferenced_labels(text) == ["tab:a", "tab:c"]  # a caption citing itself is no reference


def test_every_table_and_figure_of_the_paper_is_referred_to():
    loaded = [sections.load_profile(p) for p in compose.profiles(REPO_ROOT / "results")]
    with tempfile.TemporaryDirectory() as figures:
        raw = "\n".join(compose.paper(loaded, prose.read_prose(PROSE), Path(figures)))
    assert compose.unreferenced_labels(raw) == []
    assert raw.index("## 2 Related work") < raw.index("## 3 Method")
    assert prose.AUTHORS in raw and "## 8 Running on DeepFashion" in raw


def test_results_text_leaves_out_the_sections_sourced_elsewhere():
    text = "## 1 A\n0.5 [3]\n## 2 Related work\n2016\n### sub\n7.25\n## 3 B\n0.25 [2, 5]\n## References\n[1] X. 1979.\n"
    assert compose.results_text(text) == "## 1 A\n0.5 \n## 3 B\n0.25 "
