"""Learning curves of a study experiment: the tidy per-epoch history read from each run's
history.csv (helpers.experiments.study.experiment_history) and the figure drawn from it
(helpers.evaluation.plots.plot_learning_curves), checked against means and min–max bands
worked out by hand below."""

from __future__ import annotations

import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from matplotlib.collections import PathCollection, PolyCollection

from helpers.core.errors import InputError
from helpers.evaluation import plots
from helpers.experiments.runs import experiment_history

NAN = math.nan
# (variant, seed) -> (train loss per epoch, val Recall@5 per epoch, best epoch); epoch 0 is the
# untrained model (no loss). crop=False seed 1 stopped early after epoch 2.
RUNS = {
    ("baseline", 0): ([NAN, 0.8, 0.6, 0.5], [0.1, 0.3, 0.5, 0.4], 2),
    ("crop=False", 0): ([NAN, 1.2, 1.0, 0.9], [0.1, 0.2, 0.3, 0.35], 3),
    ("baseline", 1): ([NAN, 1.0, 0.7, 0.4], [0.2, 0.4, 0.4, 0.6], 3),
    ("crop=False", 1): ([NAN, 1.4, 1.1], [0.1, 0.25, 0.2], 1),
    ("baseline", 2): ([NAN, 0.9, 0.8, 0.6], [0.3, 0.2, 0.6, 0.5], 2),
}
# By hand, per epoch 0..3: mean over the seeds that reached it, then (lowest, highest) seed.
EXPECTED = {
    "baseline": {
        "loss": ([NAN, 0.9, 0.7, 0.5], [(0.8, 1.0), (0.6, 0.8), (0.4, 0.6)]),
        "val_recall@5": ([0.2, 0.3, 0.5, 0.5], [(0.1, 0.3), (0.2, 0.4), (0.4, 0.6), (0.4, 0.6)]),
    },
    "crop=False": {
        "loss": ([NAN, 1.3, 1.05, 0.9], [(1.2, 1.4), (1.0, 1.1), (0.9, 0.9)]),
        "val_recall@5": ([0.1, 0.225, 0.25, 0.35], [(0.1, 0.1), (0.2, 0.25), (0.2, 0.3), (0.35, 0.35)]),
    },
}


def history_frame() -> pd.DataFrame:
    """The tidy frame of RUNS, as experiment_history returns it."""
    rows = [
        {
            "experiment": "crop",
            "variant": variant,
            "seed": seed,
            "epoch": epoch,
            "loss": loss,
            "val_recall@5": recall,
            "best": epoch == best,
        }
        for (variant, seed), (losses, recalls, best) in RUNS.items()
        for epoch, (loss, recall) in enumerate(zip(losses, recalls))
    ]
    return pd.DataFrame(rows)


def write_runs(root) -> None:
    """RUNS as study folders: the baseline's runs trained by another experiment (resolution), as a
    shared stage baseline is; crop's runs.csv points at them."""
    listed = []
    for (variant, seed), (losses, recalls, best) in RUNS.items():
        run_dir = f"{'resolution' if variant == 'baseline' else 'crop'}/{variant}_seed{seed}_k{seed}"
        (root / run_dir).mkdir(parents=True)
        pd.DataFrame(
            {"epoch": range(len(losses)), "loss": losses, "lr": 0.001, "val_recall@5": recalls, "val_map": 0.5}
        ).to_csv(root / run_dir / "history.csv", index=False)
        listed.append({"experiment": "crop", "variant": variant, "seed": seed, "run_dir": run_dir, "best_epoch": best})
    pd.DataFrame(listed).to_csv(root / "crop" / "runs.csv", index=False)


def test_experiment_history_reads_every_listed_run(tmp_path):
    write_runs(tmp_path)
    history = experiment_history(tmp_path, "crop")
    pd.testing.assert_frame_equal(history, history_frame())
    assert len(history) == 19 and history.best.sum() == 5


def test_experiment_history_names_a_missing_file(tmp_path):
    with pytest.raises(InputError, match="runs.csv: missing"):
        experiment_history(tmp_path, "crop")
    write_runs(tmp_path)
    pd.DataFrame({"epoch": [0], "loss": [NAN]}).to_csv(tmp_path / "crop" / "crop=False_seed0_k0" / "history.csv")
    with pytest.raises(InputError, match=r"crop=False_seed0_k0/history\.csv: no column val_recall@5"):
        experiment_history(tmp_path, "crop")
    (tmp_path / "crop" / "crop=False_seed0_k0" / "history.csv").unlink()
    with pytest.raises(InputError, match=r"crop=False_seed0_k0/history\.csv: missing"):
        experiment_history(tmp_path, "crop")


def test_summary_is_the_mean_and_min_max_over_seeds():
    summary = plots.learning_curve_summary(history_frame())
    assert list(summary.index.unique("variant")) == ["baseline", "crop=False"]  # runs.csv order, not sorted
    assert summary.loc["baseline", "n_seeds"].tolist() == [3, 3, 3, 3]
    assert summary.loc["crop=False", "n_seeds"].tolist() == [2, 2, 2, 1]  # seed 1 stopped after epoch 2
    for variant, columns in EXPECTED.items():
        for column, (means, bands) in columns.items():
            curve = summary.loc[variant]
            np.testing.assert_allclose(curve[f"{column}_mean"], means)
            drawn = curve[[f"{column}_low", f"{column}_high"]].dropna()
            np.testing.assert_allclose(drawn.to_numpy(), bands)


def _band(collection: PolyCollection) -> dict[float, tuple[float, float]]:
    """epoch -> (lower, upper) edge of a fill_between band, from its polygon's vertices."""
    vertices = collection.get_paths()[0].vertices
    return {x: (vertices[vertices[:, 0] == x, 1].min(), vertices[vertices[:, 0] == x, 1].max()) for x in vertices[:, 0]}


def test_figure_draws_the_hand_computed_means_bands_and_best_epochs():
    fig = plots.plot_learning_curves(history_frame(), "crop (test)")
    loss_ax, recall_ax = fig.axes
    for ax, column in ((loss_ax, "loss"), (recall_ax, "val_recall@5")):
        lines = ax.get_lines()
        bands = [c for c in ax.collections if isinstance(c, PolyCollection)]
        assert [line.get_label() for line in lines] == ["baseline", "crop=False"]
        for line, band, variant in zip(lines, bands, EXPECTED):
            means, expected_band = EXPECTED[variant][column]
            np.testing.assert_array_equal(line.get_xdata(), [0, 1, 2, 3])
            np.testing.assert_allclose(line.get_ydata(), means)
            drawn = _band(band)
            epochs = sorted(drawn)
            assert epochs == ([1, 2, 3] if column == "loss" else [0, 1, 2, 3])  # no loss at epoch 0
            np.testing.assert_allclose([drawn[e] for e in epochs], expected_band)
            # each band in its line's colour
            np.testing.assert_allclose(band.get_facecolor()[0][:3], plt.matplotlib.colors.to_rgb(line.get_color()))
    dots = [c.get_offsets().tolist() for c in recall_ax.collections if isinstance(c, PathCollection)]
    assert dots == [[[2, 0.5], [3, 0.6], [2, 0.6]], [[3, 0.35], [1, 0.25]]]  # each run's best epoch, its own value
    assert not [c for c in loss_ax.collections if isinstance(c, PathCollection)]
    plt.close(fig)
