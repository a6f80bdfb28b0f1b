"""helpers.reporting.results_section: the failure analysis and the robustness experiment in the
paper, from the tables 04_demo and `study robustness` commit (written here by hand)."""

from __future__ import annotations

import matplotlib
import pandas as pd

from helpers.reporting import results_section

matplotlib.use("Agg")


def test_failures_and_robustness_sections_read_their_committed_tables(tmp_path):
    root, figures = tmp_path / "results", tmp_path / "figures"
    (root / "final").mkdir(parents=True)
    figures.mkdir()
    loaded = {"root": root, "profile": "demo"}
    final = {"demo_seed": 2, "protocols": {"official": {"recall@5": 0.61}}}
    assert results_section.failure_lines(loaded, "", figures, final) == []  # nothing committed: no section
    summary = pd.DataFrame(
        {"recall@5": [0.5, 0.7], "low": [0.4, 0.6], "high": [0.6, 0.8], "n_queries": [40, 60], "n_items": [12, 3]},
        index=pd.Index(["DRESSES", "TOPS"], name="category"),
    ).assign(few_items=lambda t: t.n_items < 10)
    summary.to_csv(root / "final" / "failures_by_category.csv")
    summary.rename_axis("occluded_share").to_csv(root / "final" / "failures_by_occlusion.csv")
    lines = results_section.failure_lines(loaded, "", figures, final)
    assert lines[0] == "![where the final model fails](figures/demo_failures.png)"
    assert (
        "test Recall@5 (seed 2, official protocol) by group (category: the category of the query's item, occluded "
        "share: the share of the garment an arm or strap hides) (the nuisances as measured" in lines[2]
    )
    assert (figures / "demo_failures.png").is_file()

    assert results_section.robustness_lines(loaded, "", figures, "###") == []
    (root / "robustness").mkdir()
    doses = [("clutter", 0.0), ("clutter", 1.0), ("clutter", 2.0)]
    recall = pd.DataFrame(
        [
            {"nuisance": n, "strength": s, "variant": v, "k": 5, "recall@5": r, "low": r - 0.05, "high": r + 0.05}
            for (n, s), base in zip(doses, (0.7, 0.65, 0.5))
            for v, r in (("baseline", base), ("crop=False", base - 0.2))
        ]
    )
    recall.to_csv(root / "robustness" / "recall.csv", index=False)
    differences = pd.DataFrame(
        [
            {"nuisance": n, "strength": s, "variant": "crop=False", "reference": "baseline", "k": 5}
            | {"diff": -0.2, "low": -0.26, "high": -0.14, "verdict": "worse"}
            for n, s in doses
        ]
        # box jitter has a strength clutter lacks, and is written first
        + [
            {"nuisance": "box_jitter", "strength": 0.5, "variant": "crop=False", "reference": "baseline", "k": 5}
            | {"diff": 0.01, "low": -0.05, "high": 0.07, "verdict": "within noise"}
        ]
    )
    differences.to_csv(root / "robustness" / "differences.csv", index=False)
    lines = results_section.robustness_lines(loaded, "", figures, "###")
    assert lines[0] == "### Robustness: when do the crop and the photometric normalisation matter?"
    table = "\n".join(lines)
    worse = "**-0.200** [-0.260, -0.140]"
    assert "| contrast | nuisance | strength 0 | strength 0.5 | strength 1 | strength 2 |" in table
    assert f"| crop=False − baseline | clutter | {worse} | — | {worse} | {worse} |" in table
    assert "| crop=False − baseline | box_jitter | — | +0.010 [-0.050, +0.070] | — | — |" in table
    assert (figures / "demo_robustness.png").is_file()
