"""Where a trained model fails: its per-query test ranks joined to the image table, Recall@K by
group (category, box-geometry bins) with intervals over items, and figures of the worst queries.

Inputs are what the evaluation already writes, so no model is needed here:

* **ranks**: one row per scored query with ``path`` and ``item_id`` and either the 0-based
  ``first_hit_rank`` (:func:`helpers.evaluation.metrics.ranks_table`, ``val_ranks.csv``) or the
  1-based ``rank_of_first_hit`` (``helpers.experiments.final.evaluate_final``'s per-query table,
  ``per_query_ranks.csv``); ``average_precision`` and ``n_relevant`` are kept when present.
* **table**: the image table (``images.csv``), joined by ``path``. Box columns ``x_1 .. y_2`` are
  needed; ``width`` / ``height`` (written by ``prepare``) are read from the image headers under
  ``data_root`` when the table lacks them.

Definitions, as in :mod:`helpers.evaluation.metrics`: a query is a hit at K when its 0-based
first-hit rank is < K; Recall@K of a group is the mean hit over its queries; the 95 % interval
is a percentile bootstrap over the group's *items* (all its queries of a drawn item together).

On a synthetic tree each consumer photo's nuisances were measured as it was drawn
(:data:`helpers.data.synthetic.NUISANCE_FILE`: the share of the garment an arm hides, the
background's contrast, the colour cast's spread); :func:`join_measured` adds them, and
:data:`GROUPS` names every grouping :func:`recall_by_groups` computes. Turning a nuisance up on
the same photos is :mod:`helpers.experiments.robustness`'s dose-response.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from helpers.core.errors import InputError
from helpers.core.schema import BOX_COLUMNS, check_columns
from helpers.evaluation.metrics import bootstrap_ci
from helpers.evaluation.plots import _framed, _show

MIN_ITEMS = 10  # a group with fewer items gets ``few_items``: its interval says little
MEASURED = ("occluded_share", "background_contrast", "colour_cast")  # synthetic.ConsumerNuisance's fields
# name → (column of the failure table, bins: None groups by value, an int by quantiles, a panel's
# title in a figure of several, what it is in words for the caption).
GROUPS = {
    "category": ("category", None, "category", "the category of the query's item"),
    "box_area": ("box_area_share", 4, "box area share", "the share of the photo its box covers"),
    "occlusion": ("occluded_share", 4, "occluded share", "the share of the garment an arm or strap hides"),
    "clutter": ("background_contrast", 4, "background contrast", "the background's contrast (clutter)"),
    "colour_cast": ("colour_cast", 4, "colour cast", "the colour cast's spread (log gain)"),
}


# ----------------------------------------------------------------------------------------
# The per-query table
# ----------------------------------------------------------------------------------------


def _zero_based_ranks(ranks: pd.DataFrame) -> np.ndarray:
    if "first_hit_rank" in ranks.columns:
        return ranks["first_hit_rank"].to_numpy(dtype=np.int64)
    if "rank_of_first_hit" in ranks.columns:
        return ranks["rank_of_first_hit"].to_numpy(dtype=np.int64) - 1
    raise InputError("ranks lack first_hit_rank (0-based) and rank_of_first_hit (1-based)")


def _image_sizes(paths: Sequence[str], data_root: str | Path | None) -> tuple[np.ndarray, np.ndarray]:
    """``(width, height)`` of each image, read from its header only (PIL decodes nothing)."""
    if data_root is None:
        raise InputError("image table lacks width, height: pass data_root to read the image sizes")
    widths, heights = np.empty(len(paths)), np.empty(len(paths))
    for i, path in enumerate(paths):
        file = Path(data_root) / path
        try:
            with Image.open(file) as image:
                widths[i], heights[i] = image.size
        except (OSError, ValueError):
            raise InputError(f"{file}: cannot read the image size") from None
    return widths, heights


def failure_table(
    ranks: pd.DataFrame,
    table: pd.DataFrame,
    ks: Sequence[int] = (1, 5),
    data_root: str | Path | None = None,
) -> pd.DataFrame:
    """One row per query of ``ranks`` (in its order), joined to ``table`` by ``path``.

    Columns: ``path``, ``item_id``, ``first_hit_rank`` (0-based), ``average_precision`` and
    ``n_relevant`` when ``ranks`` has them, the table's ``domain``, ``split``, ``category``,
    ``subcategory`` when present, the box ``x_1 .. y_2``, ``width``, ``height``,
    ``box_area_share`` (box area / image area, the box clipped to the image first: DeepFashion
    boxes may overshoot by a pixel), ``box_aspect`` (box height / width) and ``hit@K`` (bool) per K.

    ``data_root`` is read only when ``table`` lacks ``width`` / ``height`` (the image headers of
    the queries, nothing else). Raises a one-line :class:`InputError` naming the first query whose
    path is not in ``table`` (or whose item differs there), on missing columns or an empty ranks.
    """
    check_columns(ranks, ("path", "item_id"), "ranks")
    check_columns(table, ("path", "item_id", *BOX_COLUMNS))
    if len(ranks) == 0:
        raise InputError("ranks hold no query")
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    rank0 = _zero_based_ranks(ranks)

    images = table.drop_duplicates("path").set_index("path")
    paths = ranks["path"].astype(str).to_numpy()
    missing = ~pd.Index(paths).isin(images.index)
    if missing.any():
        raise InputError(
            f"query {paths[missing][0]!r} is not in the image table "
            f"({int(missing.sum())} of {len(paths)} queries missing)"
        )
    rows = images.loc[paths]
    other_item = rows["item_id"].astype(str).to_numpy() != ranks["item_id"].astype(str).to_numpy()
    if other_item.any():
        i = int(np.flatnonzero(other_item)[0])
        raise InputError(
            f"query {paths[i]!r} is item {ranks['item_id'].iloc[i]!r} in the ranks but "
            f"{rows['item_id'].iloc[i]!r} in the image table"
        )

    out = pd.DataFrame({"path": paths, "item_id": ranks["item_id"].astype(str).to_numpy(), "first_hit_rank": rank0})
    for column in ("average_precision", "n_relevant"):
        if column in ranks.columns:
            out[column] = ranks[column].to_numpy()
    for column in ("domain", "split", "category", "subcategory"):
        if column in rows.columns:
            out[column] = rows[column].to_numpy()
    for column in BOX_COLUMNS:
        out[column] = rows[column].to_numpy(dtype=np.float64)
    if "width" in rows.columns and "height" in rows.columns:
        out["width"], out["height"] = rows["width"].to_numpy(np.float64), rows["height"].to_numpy(np.float64)
    else:
        out["width"], out["height"] = _image_sizes(paths, data_root)

    box_w = out.x_2.clip(upper=out.width) - out.x_1.clip(lower=0)
    box_h = out.y_2.clip(upper=out.height) - out.y_1.clip(lower=0)
    out["box_area_share"] = (box_w.clip(lower=0) * box_h.clip(lower=0)) / (out.width * out.height)
    out["box_aspect"] = (out.y_2 - out.y_1) / (out.x_2 - out.x_1)
    for k in ks:
        out[f"hit@{k}"] = rank0 < k
    return out


def join_measured(failures: pd.DataFrame, measured: pd.DataFrame) -> pd.DataFrame:
    """``failures`` with the :data:`MEASURED` columns of ``measured`` (one row per consumer photo,
    by ``path``: :func:`helpers.data.synthetic.read_nuisance`); InputError naming the first query
    the measures lack."""
    check_columns(measured, ("path", *MEASURED), "measured nuisances")
    rows = measured.drop_duplicates("path").set_index("path").reindex(failures["path"])
    missing = rows[list(MEASURED)].isna().any(axis=1).to_numpy()
    if missing.any():
        raise InputError(
            f"query {failures['path'].iloc[int(np.flatnonzero(missing)[0])]!r} has no measured nuisances "
            f"({int(missing.sum())} of {len(failures)} queries)"
        )
    return failures.assign(**{c: rows[c].to_numpy(np.float64) for c in MEASURED})


# ----------------------------------------------------------------------------------------
# Recall@K by group
# ----------------------------------------------------------------------------------------


def _edge(value: float) -> str:
    return f"{value:.3g}"


def group_labels(failures: pd.DataFrame, column: str, bins: int | Sequence[float] | None = None) -> pd.Series:
    """The group of every query (a Series aligned with ``failures``): the value of ``column``
    (``bins=None``), its quantile bin (``bins`` an int: that many bins of equal query counts,
    fewer where values tie) or its bin between the given edges (a sequence; the lowest edge
    included). Bins are labelled by their edges, ``"0.12–0.35"``, as an ordered categorical
    (lowest bin first). Every query gets a group, or :class:`InputError` says how many do not."""
    check_columns(failures, (column,), "failure table")
    values = failures[column]
    if values.isna().any():
        raise InputError(f"{int(values.isna().sum())} queries have no {column}")
    if bins is None:
        return values.astype(str)
    numbers = pd.to_numeric(values, errors="coerce")
    if numbers.isna().any():
        raise InputError(f"bins need numbers: column {column} holds {values[numbers.isna()].iloc[0]!r}")
    if isinstance(bins, (int, np.integer)):
        if bins < 1:
            raise InputError(f"bins must be >= 1, got {bins}")
        if numbers.nunique() == 1:  # qcut would leave every query without a bin
            name = _edge(float(numbers.iloc[0]))
            return pd.Series(pd.Categorical([name] * len(numbers), categories=[name], ordered=True), index=values.index)
        cut = pd.qcut(numbers, int(bins), duplicates="drop")
    else:
        edges = np.asarray(bins, dtype=np.float64)
        if edges.size < 2 or np.any(np.diff(edges) <= 0):
            raise InputError(f"bin edges must be at least two increasing numbers, got {list(bins)}")
        cut = pd.cut(numbers, edges, include_lowest=True)
        outside = cut.isna()
        if outside.any():
            raise InputError(
                f"{int(outside.sum())} queries have {column} outside the bins "
                f"[{_edge(edges[0])}, {_edge(edges[-1])}], e.g. {numbers[outside].iloc[0]:.4g}"
            )
    # pandas widens the lowest interval's left edge a little to include its lowest value: the
    # label shows the edge asked for (quantile bins: the smallest value).
    lowest = float(numbers.min()) if isinstance(bins, (int, np.integer)) else float(edges[0])
    intervals = cut.cat.categories
    names = [f"{_edge(i.left if j else lowest)}–{_edge(i.right)}" for j, i in enumerate(intervals)]
    return cut.cat.rename_categories(names).cat.as_ordered()


def recall_by(
    failures: pd.DataFrame,
    column: str,
    bins: int | Sequence[float] | None = None,
    k: int = 5,
    n_boot: int = 2000,
    seed: int = 0,
    alpha: float = 0.05,
    min_items: int = MIN_ITEMS,
) -> pd.DataFrame:
    """Recall@K per group of :func:`failure_table`'s queries (see :func:`group_labels` for
    ``column`` and ``bins``), one row per non-empty group, indexed by the group (named
    ``column``; bins in ascending order, values sorted).

    Columns: ``n_queries``, ``n_items``, ``recall@K``, ``low`` and ``high`` (the ``1 - alpha``
    percentile bootstrap interval over the group's items, each drawn item bringing all its queries
    in the group: :func:`helpers.evaluation.metrics.bootstrap_ci` with ``items``, ``n_boot``
    replicates seeded with ``seed`` for every group), ``few_items`` (``n_items < min_items``:
    the interval of so few items is not to be trusted)."""
    check_columns(failures, ("item_id", "first_hit_rank"), "failure table")
    if int(k) < 1:
        raise InputError(f"k must be >= 1, got {k}")
    k = int(k)
    labels = group_labels(failures, column, bins)
    hits = (failures["first_hit_rank"].to_numpy() < k).astype(np.float64)
    items = failures["item_id"].astype(str).to_numpy()
    order = labels.cat.categories if isinstance(labels.dtype, pd.CategoricalDtype) else sorted(labels.unique())
    records = []
    for group in order:
        mask = (labels == group).to_numpy()
        if not mask.any():
            continue
        low, high = bootstrap_ci(hits[mask], n_boot=n_boot, seed=seed, alpha=alpha, items=items[mask])
        n_items = len(set(items[mask]))
        records.append(
            {
                column: group,
                "n_queries": int(mask.sum()),
                "n_items": n_items,
                f"recall@{k}": float(hits[mask].mean()),
                "low": low,
                "high": high,
                "few_items": n_items < min_items,
            }
        )
    return pd.DataFrame.from_records(records).set_index(column)


def recall_by_groups(failures: pd.DataFrame, k: int = 5, **kwargs) -> dict[str, pd.DataFrame]:
    """:func:`recall_by` for every grouping of :data:`GROUPS` whose column ``failures`` has
    (the measured nuisances only after :func:`join_measured`), name → table."""
    return {
        name: recall_by(failures, column, bins=bins, k=k, **kwargs)
        for name, (column, bins, _, _) in GROUPS.items()
        if column in failures.columns
    }


def _recall_column(summary: pd.DataFrame) -> str:
    found = [c for c in summary.columns if str(c).startswith("recall@")]
    if len(found) != 1:
        raise InputError("not a recall_by table: it needs exactly one recall@K column")
    return found[0]


def plot_recall_by(
    summary: pd.DataFrame, title: str | None = None, overall: float | None = None, ax: plt.Axes | None = None
) -> plt.Figure:
    """A :func:`recall_by` table as points with their intervals, one row per group, ``n_items``
    / ``n_queries`` beside each; a group with ``few_items`` is drawn hollow and grey. ``overall``
    (e.g. the split's Recall@K) is drawn as a dashed line."""
    metric = _recall_column(summary)
    y = np.arange(len(summary))
    if ax is None:
        fig, ax = plt.subplots(figsize=(6.5, 0.4 * len(summary) + 1.3))
    else:
        fig = ax.figure
    value = summary[metric].to_numpy(float)
    few = summary["few_items"].to_numpy(bool)
    for chosen, colour, face, label in ((~few, "tab:blue", "tab:blue", None), (few, "tab:grey", "white", "few items")):
        if chosen.any():
            ax.errorbar(
                value[chosen],
                y[chosen],
                xerr=[
                    value[chosen] - summary["low"].to_numpy(float)[chosen],
                    summary["high"].to_numpy(float)[chosen] - value[chosen],
                ],
                fmt="o",
                capsize=3,
                color=colour,
                markerfacecolor=face,
                label=label,
            )
    for yi, (n_items, n_queries) in enumerate(zip(summary["n_items"], summary["n_queries"])):
        ax.annotate(
            f"{n_items} items / {n_queries} q",
            (1.02, yi),
            xycoords=("axes fraction", "data"),
            va="center",
            fontsize="small",
            annotation_clip=False,
        )
    if overall is not None:
        ax.axvline(overall, color="grey", linestyle="--", linewidth=1, label="overall")
    k = metric.split("@", 1)[1]
    ax.set(
        yticks=y,
        yticklabels=[str(g) for g in summary.index],
        ylabel=summary.index.name or "",
        xlabel=f"Recall@{k}, 95 % bootstrap interval over items",
        xlim=(-0.02, 1.02),
        title=title or f"Recall@{k} by {summary.index.name}",
    )
    ax.invert_yaxis()
    if few.any() or overall is not None:
        ax.legend(loc="lower left", fontsize="small", frameon=False)
    fig.tight_layout()
    return fig


def plot_recall_by_groups(
    summaries: dict[str, pd.DataFrame],
    overall: float | None = None,
    figsize: tuple[float, float] | None = None,
    ncols: int = 2,
) -> plt.Figure:
    """Several :func:`recall_by` tables (title → table), one panel each, ``ncols`` a row,
    sharing the dashed ``overall`` line: the failure analysis at a glance (``figsize``
    default: 11 inches wide, 2.6 a row of panels)."""
    ncols = min(ncols, len(summaries))
    nrows = -(-len(summaries) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=figsize or (11, 0.6 + 2.6 * nrows), squeeze=False)
    for i, (ax, (title, summary)) in enumerate(zip(axes.flat, summaries.items())):
        plot_recall_by(summary, title=title, overall=overall, ax=ax)
        ax.set(xlabel=f"Recall@{_recall_column(summary).split('@', 1)[1]}", ylabel="")
        if i and ax.get_legend():  # one legend for the figure: the first panel's
            ax.get_legend().remove()
    for ax in axes.flat[len(summaries) :]:
        ax.set_visible(False)
    fig.tight_layout(w_pad=4)
    return fig


# ----------------------------------------------------------------------------------------
# The worst queries
# ----------------------------------------------------------------------------------------


def worst_queries(failures: pd.DataFrame, n: int = 6, one_per_item: bool = True) -> pd.DataFrame:
    """The ``n`` queries with the worst first-hit rank (ties broken by path), at most one per item
    unless ``one_per_item`` is False: chosen by the metric, never by hand."""
    check_columns(failures, ("path", "item_id", "first_hit_rank"), "failure table")
    ordered = failures.sort_values(["first_hit_rank", "path"], ascending=[False, True], kind="stable")
    if one_per_item:
        ordered = ordered.drop_duplicates("item_id")
    return ordered.head(int(n))


def _top1_of(entry) -> dict:
    """A top-1 as ``{"path": ..., maybe "item_id", "score"}`` from a gallery path, a
    ``search_image`` hit dict, or a list of hits (its first)."""
    if isinstance(entry, (list, tuple)):
        if not entry:
            raise InputError("a query has no retrieved gallery image")
        entry = entry[0]
    if isinstance(entry, Mapping):
        if "path" not in entry:
            raise InputError(f"a top-1 hit lacks its path: {dict(entry)}")
        return dict(entry)
    return {"path": str(entry)}


def plot_failures(
    queries: pd.DataFrame,
    table: pd.DataFrame,
    data_root: str | Path,
    top1: Sequence | Mapping,
) -> plt.Figure:
    """One row per query (e.g. :func:`worst_queries`): the consumer photo with its box, a shop
    photo of its own item (the first by path in ``table``), and what the model put first, its
    box drawn when ``table`` has the image, framed red when of another item (green otherwise).

    ``top1``: per query, the top-1 gallery image as a path, a hit dict (``path``; ``item_id`` and
    ``score`` shown when given: ``GalleryIndex.search_image``'s) or a list of hits (its first),
    either aligned with ``queries`` or a mapping from query path."""
    check_columns(queries, ("path", "item_id", "first_hit_rank"), "queries")
    images = table.drop_duplicates("path").set_index("path", drop=False)
    if isinstance(top1, Mapping):
        absent = [p for p in queries["path"] if p not in top1]
        if absent:
            raise InputError(f"no top-1 given for query {absent[0]!r}")
        tops = [_top1_of(top1[p]) for p in queries["path"]]
    else:
        if len(top1) != len(queries):
            raise InputError(f"{len(top1)} top-1 entries for {len(queries)} queries")
        tops = [_top1_of(t) for t in top1]
    shops = table[table["domain"] == "shop"].sort_values("path", kind="stable") if "domain" in table else table[:0]

    fig, axes = plt.subplots(len(queries), 3, figsize=(6.6, 2.4 * len(queries)), squeeze=False)
    for axes_row, query, top in zip(axes, queries.itertuples(index=False), tops):
        for ax in axes_row:
            ax.axis("off")
        row = images.loc[query.path] if query.path in images.index else None
        if row is None:
            raise InputError(f"query {query.path!r} is not in the image table")
        category = f" {row.category}" if "category" in images.columns else ""
        _show(
            axes_row[0],
            data_root,
            row,
            f"query {query.item_id}{category}\nfirst hit at rank {query.first_hit_rank + 1}",
        )
        own = shops[shops["item_id"].astype(str) == str(query.item_id)]
        if len(own):
            _show(
                axes_row[1],
                data_root,
                next(own.itertuples(index=False)),
                f"its item's shop photo\n{own.path.iloc[0].rsplit('/', 1)[-1]}",
            )
        else:
            axes_row[1].set_title("no shop photo of its item\nin the table", fontsize=8)
        item = top.get("item_id")
        if item is None and top["path"] in images.index:
            item = images.loc[top["path"], "item_id"]
        colour = "tab:green" if item is not None and str(item) == str(query.item_id) else "tab:red"
        score = f" {top['score']:.3f}" if "score" in top else ""
        title = f"top-1 {item if item is not None else '?'}{score}"
        if top["path"] in images.index:
            _show(axes_row[2], data_root, images.loc[top["path"]], title)
        else:
            with Image.open(Path(data_root) / top["path"]) as image:
                axes_row[2].imshow(image.convert("RGB"))
            axes_row[2].set_title(title, fontsize=8)
        axes_row[2].title.set_color(colour)
        _framed(axes_row[2], colour)
    fig.tight_layout()
    return fig
