"""Figures shared by the notebooks, the demo and the report. Each returns a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle
from matplotlib.ticker import MaxNLocator
from PIL import Image

DOMAIN_COLOURS = {"consumer": "tab:orange", "shop": "tab:blue"}


def box_geometry(table: pd.DataFrame) -> pd.DataFrame:
    """Per image: the box's share of the image area and its aspect (height / width)."""
    width, height = table.x_2 - table.x_1, table.y_2 - table.y_1
    return pd.DataFrame(
        {
            "domain": table.domain,
            "box_area_share": (width * height) / (table.width * table.height),
            "box_aspect": height / width,
            "image_aspect": table.height / table.width,
        }
    )


def images_per_item(table: pd.DataFrame) -> pd.DataFrame:
    """Items × domain → number of images (0 where an item has none of a domain)."""
    return table.groupby(["item_id", "domain"]).size().unstack(fill_value=0)


def plot_images_per_item(table: pd.DataFrame) -> plt.Figure:
    counts = images_per_item(table)
    fig, axes = plt.subplots(1, 2, figsize=(8, 2.8), sharey=True)
    for ax, domain in zip(axes, ("consumer", "shop")):
        values = counts.get(domain, pd.Series(dtype=int))
        bins = np.arange(0.5, max(int(values.max()), 1) + 1.5)
        ax.hist(values, bins=bins, color=DOMAIN_COLOURS[domain])
        ax.set(title=f"{domain} images per item", xlabel="images", ylabel="items")
    fig.tight_layout()
    return fig


def plot_box_geometry(table: pd.DataFrame) -> plt.Figure:
    """The 'box gap' between domains: how much of the photo the garment fills, and its shape."""
    geometry = box_geometry(table)
    fig, axes = plt.subplots(1, 2, figsize=(9, 3))
    for ax, column, label in zip(
        axes, ("box_area_share", "box_aspect"), ("box area / image area", "box height / width")
    ):
        sns.histplot(
            geometry,
            x=column,
            hue="domain",
            stat="density",
            common_norm=False,
            element="step",
            palette=DOMAIN_COLOURS,
            ax=ax,
        )
        ax.set(xlabel=label)
    fig.tight_layout()
    return fig


def _show(ax, data_root: Path, row, title: str) -> None:
    with Image.open(Path(data_root) / row.path) as image:
        ax.imshow(image.convert("RGB"))
    ax.add_patch(
        Rectangle(
            (row.x_1, row.y_1),
            row.x_2 - row.x_1,
            row.y_2 - row.y_1,
            fill=False,
            edgecolor=DOMAIN_COLOURS[row.domain],
            linewidth=2,
        )
    )
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_pairs(
    table: pd.DataFrame, data_root: str | Path, n_items: int = 4, consumers_per_item: int = 3, seed: int = 0
) -> plt.Figure:
    """Rows of items: the shop image(s) then consumer images, boxes drawn; items drawn at random."""
    rng = np.random.default_rng(seed)
    items = rng.choice(np.sort(table.item_id.unique()), size=min(n_items, table.item_id.nunique()), replace=False)
    columns = 1 + consumers_per_item
    fig, axes = plt.subplots(len(items), columns, figsize=(2.2 * columns, 2.4 * len(items)), squeeze=False)
    for axes_row, item in zip(axes, items):
        images = table.loc[table.item_id == item]
        shop = images.loc[images.domain == "shop"].head(1)
        consumers = images.loc[images.domain == "consumer"].head(consumers_per_item)
        shown = list(pd.concat([shop, consumers]).itertuples(index=False))
        for ax in axes_row:
            ax.axis("off")
        for ax, row in zip(axes_row, shown):
            _show(ax, data_root, row, f"{item} {row.domain}\n{row.category}/{row.subcategory}")
    fig.tight_layout()
    return fig


def plot_retrieval(queries: pd.DataFrame, hits: list[list[dict]], data_root: str | Path) -> plt.Figure:
    """One row per query: the consumer photo (box drawn), then its top-k shop images; a green
    frame marks a gallery image of the query's own item, red any other."""
    k = max(len(h) for h in hits)
    fig, axes = plt.subplots(len(queries), k + 1, figsize=(1.9 * (k + 1), 2.3 * len(queries)), squeeze=False)
    for axes_row, query, row_hits in zip(axes, queries.itertuples(index=False), hits):
        for ax in axes_row:
            ax.axis("off")
        _show(axes_row[0], data_root, query, f"query {query.item_id}")
        for ax, hit in zip(axes_row[1:], row_hits):
            with Image.open(Path(data_root) / hit["path"]) as image:
                ax.imshow(image.convert("RGB"))
            colour = "tab:green" if hit["item_id"] == query.item_id else "tab:red"
            ax.set_title(f"#{hit['rank']} {hit['item_id']}\n{hit['score']:.3f}", fontsize=8, color=colour)
            _framed(ax, colour)
    fig.tight_layout()
    return fig


def _framed(ax, colour: str) -> None:
    ax.axis("on")
    ax.set_xticks([])
    ax.set_yticks([])
    for spine in ax.spines.values():
        spine.set_edgecolor(colour)
        spine.set_linewidth(3)


def plot_success_failure(
    groups: dict[str, pd.DataFrame], hits: dict[str, list[list[dict]]], data_root: str | Path
) -> plt.Figure:
    """One row per query: its garment crop, titled with its rank of first hit, then its top-k
    shop images with scores; green frames the query's own item, red any other.

    ``groups`` maps a label ("success", "failure") to rows of a per-query table (``path``,
    ``item_id``, box columns, ``rank_of_first_hit``); ``hits`` the same labels to each row's
    ``search_image`` results. The caller chooses the rows by rank, never by hand.
    """
    rows = [
        (label, query, row_hits)
        for label, frame in groups.items()
        for query, row_hits in zip(frame.itertuples(index=False), hits[label])
    ]
    k = max((len(h) for _, _, h in rows), default=1)
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.9 * (k + 1), 2.3 * len(rows)), squeeze=False)
    for axes_row, (label, query, row_hits) in zip(axes, rows):
        for ax in axes_row:
            ax.axis("off")
        with Image.open(Path(data_root) / query.path) as image:
            axes_row[0].imshow(image.convert("RGB").crop((query.x_1, query.y_1, query.x_2, query.y_2)))
        axes_row[0].set_title(f"{label}: {query.item_id}\nfirst hit at rank {query.rank_of_first_hit}", fontsize=8)
        for ax, hit in zip(axes_row[1:], row_hits):
            with Image.open(Path(data_root) / hit["path"]) as image:
                ax.imshow(image.convert("RGB"))
            colour = "tab:green" if hit["item_id"] == query.item_id else "tab:red"
            mark = " ✓" if hit["item_id"] == query.item_id else ""
            ax.set_title(f"#{hit['rank']} {hit['item_id']}{mark}\n{hit['score']:.3f}", fontsize=8, color=colour)
            _framed(ax, colour)
    fig.tight_layout()
    return fig


def plot_experiment(comparison: pd.DataFrame, title: str, ks=(1, 5, 10)) -> plt.Figure:
    """One study experiment (a ``helpers.experiments.study.compare`` table): left, each variant's val
    Recall@K as mean ± std over seeds; right, its paired difference from the baseline with the
    bootstrap interval (seeds and queries resampled), a dashed line at 0."""
    variants = list(comparison.index)
    y = np.arange(len(variants))
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 0.5 * len(variants) + 1.6), sharey=True)
    for j, k in enumerate(ks):
        offset = (j - (len(ks) - 1) / 2) * 0.22
        spread = comparison[f"val_recall@{k}_std"].fillna(0)  # one seed: no spread to draw
        left.errorbar(
            comparison[f"val_recall@{k}_mean"], y + offset, xerr=spread, fmt="o", capsize=3, label=f"Recall@{k}"
        )
        diff = comparison[f"diff_recall@{k}"]
        low, high = diff - comparison[f"low_recall@{k}"], comparison[f"high_recall@{k}"] - diff
        right.errorbar(diff, y + offset, xerr=[low.fillna(0), high.fillna(0)], fmt="o", capsize=3)
    right.axvline(0, color="grey", linestyle="--", linewidth=1)
    left.set(yticks=y, yticklabels=variants, xlabel="val Recall@K, mean ± std over seeds", title=title)
    right.set(xlabel="paired difference vs baseline, 95 % bootstrap interval", title="variant − baseline")
    left.invert_yaxis()
    # One legend below both panels: the K of each colour is the same left and right.
    fig.legend(*left.get_legend_handles_labels(), loc="lower center", ncol=len(ks), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.1, 1, 1))
    return fig


CURVE_METRIC = "val_recall@5"  # the study's model-selection metric, drawn per epoch beside the loss


def learning_curve_summary(history: pd.DataFrame, columns=("loss", CURVE_METRIC)) -> pd.DataFrame:
    """Per (variant, epoch) of a tidy history (``helpers.experiments.study.experiment_history``):
    ``n_seeds`` that reached the epoch and, per column, the mean over them (``_mean``) and the
    band from the lowest to the highest seed (``_low``, ``_high``); NaN (epoch 0's loss) skipped.
    Variants keep their first-appearance order, epochs ascend."""
    grouped = history.groupby(["variant", "epoch"])
    out = pd.DataFrame({"n_seeds": grouped.seed.nunique()})
    for column in columns:
        out[f"{column}_mean"] = grouped[column].mean()
        out[f"{column}_low"] = grouped[column].min()
        out[f"{column}_high"] = grouped[column].max()
    return out.reindex(list(dict.fromkeys(history.variant)), level="variant")


def plot_learning_curves(history: pd.DataFrame, title: str) -> plt.Figure:
    """One study experiment's runs per epoch (a tidy history, ``helpers.experiments.study.
    experiment_history``): left train loss, right val Recall@5; per variant a line at the mean
    over its seeds and a band from the lowest to the highest seed, so every seed's curve lies
    inside it (with 2–3 seeds a standard deviation says little); a dot marks each run's best
    epoch (``best``) at its own value. Epoch 0 is the untrained model: no loss. Where a run
    stopped early, later epochs average the seeds still training."""
    summary = learning_curve_summary(history, ("loss", CURVE_METRIC))
    variants = summary.index.unique("variant")
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4), sharex=True)
    for i, variant in enumerate(variants):
        colour = f"C{i % 10}"
        curve = summary.loc[variant]
        for ax, column in zip(axes, ("loss", CURVE_METRIC)):
            ax.plot(curve.index, curve[f"{column}_mean"], color=colour, marker=".", label=variant)
            ax.fill_between(
                curve.index, curve[f"{column}_low"], curve[f"{column}_high"], color=colour, alpha=0.2, linewidth=0
            )
        best = history.loc[(history.variant == variant) & history.best]
        axes[1].scatter(best.epoch, best[CURVE_METRIC], color=colour, edgecolor="black", s=30, zorder=3)
    axes[0].set(xlabel="epoch", ylabel="train loss", title="train loss")
    axes[1].set(xlabel="epoch", ylabel="val Recall@5", title="val Recall@5 (dot: a run's best epoch)")
    for ax in axes:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"{title}: line = mean over seeds, band = min–max over seeds", fontsize=10)
    columns = min(len(variants), 5)
    fig.legend(*axes[0].get_legend_handles_labels(), loc="lower center", ncol=columns, fontsize=8, frameon=False)
    rows = -(-len(variants) // columns)  # legend rows below the panels
    fig.tight_layout(rect=(0, 0.02 + 0.06 * rows, 1, 1))
    return fig


VERDICT_COLOURS = {"better": "tab:green", "worse": "tab:red", "within noise": "tab:grey"}


def plot_effects(effects: pd.DataFrame, metric: str = "Recall@5") -> plt.Figure:
    """Every effect of a study ranked in one forest plot (``effects``: one row per comparison, as
    :func:`helpers.experiments.family.effects` gives them, largest difference first): the paired
    difference from the experiment's baseline in val ``metric`` points with the interval that
    decides its verdict, coloured by the verdict; a filled dot for a primary test (Holm-corrected),
    a hollow one for an exploratory test (uncorrected); a grey bar spans ± the test's minimum
    detectable effect, so a dot inside its bar is a difference the design could not have told
    from noise."""
    y = np.arange(len(effects))
    points = 100 * effects[["diff", "low", "high", "mde"]].astype(float)
    fig, ax = plt.subplots(figsize=(8.5, 0.32 * len(effects) + 1.4))
    mde = points["mde"].fillna(0)  # a table written before the MDE was recorded: no bar
    ax.barh(y, 2 * mde, left=-mde, height=0.6, color="0.9", label="± minimum detectable effect")
    for verdict, colour in VERDICT_COLOURS.items():
        for role, face in (("primary", colour), ("exploratory", "white")):
            chosen = ((effects.verdict == verdict) & (effects.role == role)).to_numpy()
            if not chosen.any():
                continue
            part = points[chosen]
            ax.errorbar(
                part["diff"],
                y[chosen],
                xerr=[part["diff"] - part["low"], part["high"] - part["diff"]],
                fmt="o",
                capsize=3,
                color=colour,
                markerfacecolor=face,
                label=f"{verdict} ({role})",
            )
    ax.axvline(0, color="grey", linestyle="--", linewidth=1)
    labels = [f"{e}: {v}" for e, v in zip(effects.experiment, effects.variant)]
    ax.set(yticks=y, yticklabels=labels, xlabel=f"val {metric}, variant − its baseline (points)")
    ax.invert_yaxis()
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    fig.tight_layout()
    return fig


PIPELINE_STEPS = (
    "consumer photo\n+ garment box",
    "crop to the box\n(+ margin)",
    "letterbox to\nthe input side",
    "backbone\n(timm, pretrained)",
    "head: Linear-BN\n→ L2, 256-d",
    "cosine search\nin the shop gallery",
    "top-K shop photos\nof the same item",
)


def plot_pipeline() -> plt.Figure:
    """The retrieval pipeline as a row of boxes, with training's P×K batches and metric loss
    drawn under the embedding they shape."""
    steps = PIPELINE_STEPS
    fig, ax = plt.subplots(figsize=(13, 2.0))
    ax.set(xlim=(-0.6, len(steps) - 0.4), ylim=(-1.2, 0.4))
    ax.axis("off")
    style = {"boxstyle": "round,pad=0.4", "facecolor": "#eef3fb", "edgecolor": "tab:blue"}
    for x, text in enumerate(steps):
        ax.text(x, 0, text, ha="center", va="center", fontsize=9, bbox=style)
        if x:
            ax.annotate("", xy=(x - 0.42, 0), xytext=(x - 0.58, 0), arrowprops={"arrowstyle": "->"})
    head = 4  # the embedding the loss shapes
    ax.text(
        head - 0.5,
        -0.95,
        "training: P items × K images per batch (consumer and shop), metric loss (batch-hard triplet)",
        ha="center",
        va="center",
        fontsize=9,
        bbox={**style, "facecolor": "#fdf1e6", "edgecolor": "tab:orange"},
    )
    ax.annotate("", xy=(head, -0.3), xytext=(head - 0.2, -0.75), arrowprops={"arrowstyle": "->", "color": "tab:orange"})
    fig.tight_layout()
    return fig
