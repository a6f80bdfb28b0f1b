"""Figures shared by the notebooks, the demo and the report. Each returns a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.patches import Rectangle
from PIL import Image

DOMAIN_COLOURS = {"consumer": "tab:orange", "shop": "tab:blue"}


def box_geometry(table: pd.DataFrame) -> pd.DataFrame:
    """Per image: the box's share of the image area and its aspect (height / width)."""
    width, height = table.x_2 - table.x_1, table.y_2 - table.y_1
    return pd.DataFrame({
        "domain": table.domain,
        "box_area_share": (width * height) / (table.width * table.height),
        "box_aspect": height / width,
        "image_aspect": table.height / table.width,
    })


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
    for ax, column, label in zip(axes, ("box_area_share", "box_aspect"),
                                 ("box area / image area", "box height / width")):
        sns.histplot(geometry, x=column, hue="domain", stat="density", common_norm=False, element="step",
                     palette=DOMAIN_COLOURS, ax=ax)
        ax.set(xlabel=label)
    fig.tight_layout()
    return fig


def _show(ax, data_root: Path, row, title: str) -> None:
    with Image.open(Path(data_root) / row.path) as image:
        ax.imshow(image.convert("RGB"))
    ax.add_patch(Rectangle((row.x_1, row.y_1), row.x_2 - row.x_1, row.y_2 - row.y_1, fill=False,
                           edgecolor=DOMAIN_COLOURS[row.domain], linewidth=2))
    ax.set_title(title, fontsize=8)
    ax.axis("off")


def plot_pairs(table: pd.DataFrame, data_root: str | Path, n_items: int = 4, consumers_per_item: int = 3,
               seed: int = 0) -> plt.Figure:
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
            ax.axis("on")
            ax.set_xticks([])
            ax.set_yticks([])
            for spine in ax.spines.values():
                spine.set_edgecolor(colour)
                spine.set_linewidth(3)
    fig.tight_layout()
    return fig
