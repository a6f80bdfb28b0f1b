"""helpers.reporting.consistency: the repository's prose (README, docs, report/prose, the notebooks'
markdown) held to the config and the committed results. The repository as committed passes; each
rule catches a planted problem and lets the true statement beside it pass."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest

from helpers.core.config import REPO_ROOT
from helpers.reporting import consistency

RESULTS = REPO_ROOT / "results"
REPORT = "# R\n\n## 4 Results\n\n*Table 1: a table.*\n\n*Figure 1: a figure.*\n"


def test_the_repository_as_committed_has_no_stale_statement():
    assert consistency.stale_statements(REPO_ROOT, RESULTS) == []


def _repo(tmp_path: Path, readme: str = "", notebook_cells: tuple[str, ...] = ()) -> Path:
    (tmp_path / "report").mkdir()
    (tmp_path / "report" / "report.md").write_text(REPORT)
    (tmp_path / "README.md").write_text(readme)
    if notebook_cells:
        (tmp_path / "02_preprocessing").mkdir()
        cells = [{"cell_type": "markdown", "metadata": {}, "source": text} for text in notebook_cells]
        (tmp_path / "02_preprocessing" / "02_1.ipynb").write_text(json.dumps({"cells": cells}))
    return tmp_path


def _flagged(repo: Path, results: Path = RESULTS) -> list[str]:
    return consistency.stale_statements(repo, results)


def _needs_committed_results():
    if not (RESULTS / "demo" / "data_summary.json").is_file():
        pytest.skip("no committed results/demo")


# ----------------------------------------------------------------------------- rule 1: settings


def test_a_stale_setting_is_caught_and_a_true_one_passes(tmp_path):
    _needs_committed_results()
    repo = _repo(
        tmp_path,
        "The study trained 19 seeds for 57 epochs at 96 px.\n\n"
        "It compared 77 val items and 999 queries.\n\n"
        "The committed study: 5 seeds, 30 epochs, 160 px, 800 val items, 2,868 val queries, 523 test queries.\n",
    )
    flagged = "\n".join(_flagged(repo))
    for stale in ("'19 seeds'", "'57 epochs'", "'96 px'", "'77 val items'", "'999 queries'"):
        assert stale in flagged
    assert "README.md:1:" in flagged and "README.md:3:" in flagged and "README.md:5:" not in flagged


def test_a_notebook_header_stating_old_settings_is_caught(tmp_path):
    _needs_committed_results()
    header = "# 02.1\n\nThe committed run: 2 seeds, 96 px.\n"
    flagged = _flagged(_repo(tmp_path, notebook_cells=("# fine\n", header)))
    assert [f.split(": ", 1)[0] for f in flagged] == ["02_preprocessing/02_1.ipynb:cell1:3"] * 2


def test_the_original_study_and_other_profiles_are_checked_against_their_own_facts(tmp_path):
    _needs_committed_results()
    repo = _repo(
        tmp_path,
        "The original study squashed every crop to 224 px and trained at most 40 epochs on 1221 train items.\n\n"
        "The original study sampled 500 test items.\n\n"
        "Under the `full` profile EfficientNet-B3 runs at 288 px for at most 40 epochs.\n\n"
        "Under the `full` profile EfficientNet-B3 runs at 170 px.\n\n"
        "The `fixture` profile has 24 synthetic items.\n\n"
        "The demo recipe runs at 224 px.\n\n"
        "The recipe was chosen on an independent tree (`tests/independent_tree.py`), 2 seeds.\n\n"
        "* plain: 8 epochs.\n",
    )
    flagged = _flagged(repo)
    assert [f.split(": ", 1)[0] for f in flagged] == ["README.md:3", "README.md:7", "README.md:11"]
    assert "'500 test items'" in flagged[0] and "'170 px'" in flagged[1] and "'224 px'" in flagged[2]


def test_non_settings_are_not_read_as_settings():
    sentences = consistency.sentences(
        "Box corners at most 2 px past the edge, images smaller than 16 px, 1–7 queries per item.\n"
        "```\npython -m helpers study --seeds 7\n2 seeds\n```\n",
        "x.md",
    )
    known = consistency.facts(RESULTS)
    assert [p for s in sentences for p in consistency.stale_settings(s, known)] == []


def test_the_original_study_table_matches_its_page():
    page = (REPO_ROOT / "docs" / "original_study.md").read_text()
    for value in ("0.6402", "0.7280", "0.7751", "224 px", "margin 0.5"):
        assert value in page
    assert consistency.ORIGINAL_STUDY["published"]["recall@5"] == 0.7280


def test_pretrained_sides_are_timms():
    timm = pytest.importorskip("timm")
    for name, side in consistency.PRETRAINED_SIDES.items():
        assert timm.models.get_pretrained_cfg(name).input_size[-1] == side


# ----------------------------------------------------------------------------- rule 2: dismissals


def _table(low, high, mde, role="primary"):
    row = {
        "variant": "img_size=192",
        "verdict_recall@5": "within noise",
        "role_recall@5": role,
        "low_recall@5": low,
        "high_recall@5": high,
        "low_adj_recall@5": low * 2,
        "high_adj_recall@5": high * 2,
        "mde_recall@5": mde,
    }
    return {"resolution": pd.DataFrame([row]).set_index("variant")}


@pytest.mark.parametrize(
    "sentence",
    [
        "160 px sits on a plateau.",
        "The input side makes no difference.",
        "`img_size=192` has no effect.",
        "The study confirmed that `resolution` does not matter.",
    ],
)
def test_a_dismissal_wider_than_its_interval_allows_is_caught(sentence):
    assert consistency.unsupported_dismissals(sentence, _table(-0.05, 0.05, 0.08))  # adjusted: ±0.10


def test_a_dismissal_the_interval_supports_passes():
    assert consistency.unsupported_dismissals("The input side makes no difference.", _table(-0.03, 0.03, 0.08)) == []
    exploratory = _table(-0.05, 0.05, 0.08, role="exploratory")  # read at its raw interval, ±0.05
    assert consistency.unsupported_dismissals("The input side makes no difference.", exploratory) == []
    stated = "The input side makes no difference larger than 0.2."
    assert consistency.unsupported_dismissals(stated, _table(-0.05, 0.05, 0.08)) == []


@pytest.mark.parametrize(
    "sentence",
    [
        "`img_size=192` is within noise.",
        '"Within noise" is not "no effect" for the input side.',
        "Training stops short of its plateau.",  # names no comparison
    ],
)
def test_what_is_no_dismissal_passes(sentence):
    assert consistency.unsupported_dismissals(sentence, _table(-0.3, 0.3, 0.08)) == []


def test_the_committed_comparisons_catch_the_known_dismissals(tmp_path):
    _needs_committed_results()
    repo = _repo(
        tmp_path,
        "Colour normalisation does not bridge the domain gap.\n\n160 px sits on a plateau.\n\n"
        "The whole photo makes no difference.\n\nCLAHE plus gray-world is within noise.\n",
    )
    flagged = _flagged(repo)
    assert [f.split(": ", 1)[0] for f in flagged if "dismisses" in f] == [
        "README.md:1",
        "README.md:3",
        "README.md:3",
        "README.md:5",
    ]


# ----------------------------------------------------------------------------- rule 3: references


def test_broken_links_and_report_references_are_caught(tmp_path):
    repo = _repo(
        tmp_path,
        "See [the figure](report/figures/none.png) and ![x](report/report.md#top), [web](https://example.org).\n\n"
        "Figure 1 and Table 1 of the report, its Section 4; Figure 7 and Table 3 and Section 9 do not exist.\n",
    )
    (repo / "docs").mkdir()
    (repo / "docs" / "a.md").write_text("[up](../README.md) [gone](../nothing/)\n")
    flagged = _flagged(repo, tmp_path / "no_results")
    reasons = sorted(f.split(": ", 1)[1] for f in flagged)
    assert reasons == [
        "'Figure 7' is not in report/report.md",
        "'Section 9' is not in report/report.md",
        "'Table 3' is not in report/report.md",
        "link target '../nothing/' does not exist",
        "link target 'report/figures/none.png' does not exist",
    ]
