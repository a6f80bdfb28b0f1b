"""Item-level sampling and splits: the parsed image table → ``images.csv`` + ``summary.json``.

Sampling is by item, never by image, so an item's consumer and shop photos stay together
and items never cross splits. Two modes:

* ``sample``: keep a fraction of the items of each official split (the original study's
  10 % / 2 % / 2 %, seed 42), or all of them;
* ``resplit``: pool the items and split them afresh by ratio (e.g. 8:1:1).

The same inputs and seed give a byte-identical ``images.csv``.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core.errors import InputError
from helpers.core.files import sha256_bytes, write_bytes_atomic
from helpers.core.schema import SPLITS, TABLE_COLUMNS
from helpers.data import deepfashion

ORIGINAL_SAMPLE = (0.1, 0.02, 0.02)  # the original study's fractions of train / val / test items


def parse_fractions(text: str, name: str) -> tuple[float, float, float]:
    """``"0.1,0.02,0.02"`` → a triple; ``"all"`` → (1, 1, 1) for ``--sample``."""
    if name == "--sample" and text.strip().lower() == "all":
        return (1.0, 1.0, 1.0)
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise InputError(f"{name} expects three comma-separated numbers, got {text!r}") from None
    if len(values) != 3 or not all(math.isfinite(v) for v in values) or min(values) < 0 or sum(values) <= 0:
        raise InputError(f"{name} expects three non-negative numbers (train,val,test), got {text!r}")
    if name == "--sample" and max(values) > 1:
        raise InputError(f"--sample fractions must be at most 1, got {text!r}")
    return values


def parse_categories(text: str | None) -> tuple[str, ...] | None:
    """``"TOPS,DRESSES"`` → a tuple; ``"all"`` or None → None (keep every category)."""
    if text is None or text.strip().lower() == "all":
        return None
    return tuple(c.strip().upper() for c in text.split(",") if c.strip())


def _items_with_both_domains(table: pd.DataFrame) -> pd.Index:
    domains = table.groupby("item_id").domain.nunique()
    return domains.index[domains == 2]


def _sample_items(items: np.ndarray, fraction: float, rng: np.random.Generator) -> np.ndarray:
    if fraction >= 1:
        return items
    count = max(1, int(round(fraction * len(items)))) if fraction > 0 and len(items) else 0
    return np.sort(rng.choice(items, size=count, replace=False))


def select_items(
    table: pd.DataFrame,
    categories: tuple[str, ...] | None = ("TOPS", "DRESSES"),
    sample: tuple[float, float, float] | None = ORIGINAL_SAMPLE,
    resplit: tuple[float, float, float] | None = None,
    seed: int = 42,
) -> tuple[pd.DataFrame, dict]:
    """Filter categories, keep items with both domains, then sample or re-split by item.

    Returns the new table (sorted by path) and the dropped-row counts by reason.
    """
    if sample is not None and resplit is not None:
        raise InputError("choose either --sample or --resplit, not both")
    dropped = {}
    if categories is not None:
        unknown = sorted(set(categories) - set(table.category))
        if unknown:
            raise InputError(
                f"unknown categories {','.join(unknown)}; the data has {','.join(sorted(set(table.category)))}"
            )
        keep = table.category.isin(categories)
        dropped["other_category"] = int((~keep).sum())
        table = table.loc[keep]
    both = table.item_id.isin(_items_with_both_domains(table))
    dropped["item_lacks_consumer_or_shop"] = int((~both).sum())
    dropped["items_lacking_consumer_or_shop"] = int(table.loc[~both].item_id.nunique())
    table = table.loc[both]

    rng = np.random.default_rng(seed)
    if resplit is not None:
        items = np.sort(table.item_id.unique())
        shuffled = rng.permutation(items)
        bounds = np.floor(np.cumsum(resplit) / sum(resplit) * len(items)).astype(int)
        new_split = {item: SPLITS[int(np.searchsorted(bounds, i, side="right"))] for i, item in enumerate(shuffled)}
        table = table.assign(split=table.item_id.map(new_split))
    else:
        fractions = sample or (1.0, 1.0, 1.0)
        chosen = []
        for split, fraction in zip(SPLITS, fractions):
            items = np.sort(table.loc[table.split == split].item_id.unique())
            chosen.append(_sample_items(items, fraction, rng))
        keep = table.item_id.isin(np.concatenate(chosen))
        dropped["not_sampled"] = int((~keep).sum())
        table = table.loc[keep]
    if table.empty:
        raise InputError("no image left after filtering and sampling: check --categories and --sample")
    return table.sort_values("path", kind="stable").reset_index(drop=True), dropped


def split_stats(table: pd.DataFrame, pairs: pd.DataFrame | None = None) -> pd.DataFrame:
    """Per split: items, consumer images, shop images and pairs (from the partition if given).

    Without the partition's pairs, pairs count every consumer × shop combination of an item.
    """
    rows = {}
    for split in SPLITS:
        part = table.loc[table.split == split]
        if pairs is not None:
            paths = set(part.path)
            n_pairs = int((pairs.consumer.isin(paths) & pairs.shop.isin(paths)).sum())
        else:
            per_item = part.groupby(["item_id", "domain"]).size().unstack(fill_value=0)
            n_pairs = int((per_item.get("consumer", 0) * per_item.get("shop", 0)).sum()) if len(part) else 0
        rows[split] = {
            "items": int(part.item_id.nunique()),
            "consumer_images": int((part.domain == "consumer").sum()),
            "shop_images": int((part.domain == "shop").sum()),
            "pairs": n_pairs,
        }
    return pd.DataFrame(rows).T[["items", "consumer_images", "shop_images", "pairs"]]


def table_bytes(table: pd.DataFrame) -> bytes:
    """The CSV bytes of a table: fixed columns, ``\\n`` line ends, so equal tables hash equal."""
    return table[list(TABLE_COLUMNS)].to_csv(index=False, lineterminator="\n").encode("utf-8")


def prepare(
    data_root: str | Path,
    out_dir: str | Path,
    categories: tuple[str, ...] | None = ("TOPS", "DRESSES"),
    sample: tuple[float, float, float] | None = ORIGINAL_SAMPLE,
    resplit: tuple[float, float, float] | None = None,
    seed: int = 42,
    strict: bool = False,
    overwrite: bool = False,
    progress: bool = True,
) -> dict:
    """Parse, check, sample and write ``out_dir/images.csv`` and ``out_dir/summary.json``.

    Refuses to replace an existing ``images.csv`` unless ``overwrite``. Returns the summary.
    """
    data_root, out_dir = Path(data_root), Path(out_dir)
    if not data_root.is_dir():
        raise InputError(f"{data_root}: data root not found")
    table_path = out_dir / "images.csv"
    if table_path.exists() and not overwrite:
        raise InputError(f"{table_path}: already exists (pass --overwrite to replace it)")
    table, pairs, read_counts = deepfashion.build_image_table(data_root)
    out_dir.mkdir(parents=True, exist_ok=True)
    selected, dropped = select_items(table, categories, sample, resplit, seed)
    selected, report = deepfashion.check_images(
        selected, data_root, out_dir / "bad_images.txt", strict=strict, progress=progress
    )
    for reason, count in report.bad.items():
        dropped[f"bad_image_{reason}"] = count
    # An item can lose its only consumer or shop image to the image checks: drop it too.
    complete = selected.item_id.isin(_items_with_both_domains(selected))
    dropped["item_incomplete_after_image_check"] = int((~complete).sum())
    selected = selected.loc[complete].reset_index(drop=True)
    requested = resplit or sample or (1.0, 1.0, 1.0)
    for split, share in zip(SPLITS, requested):
        if share > 0 and not (selected.split == split).any():
            raise InputError(f"{data_root}: split {split!r} is empty after filtering; use larger --sample fractions")
    if resplit is not None:
        pairs = None  # the partition's pairs no longer describe re-split items
    data = table_bytes(selected)
    stats = split_stats(selected, pairs)
    summary = {
        "data_root": str(data_root),
        "parameters": {
            "categories": list(categories) if categories else "all",
            "sample": list(sample) if sample and resplit is None else None,
            "resplit": list(resplit) if resplit else None,
            "seed": seed,
            "strict": strict,
        },
        "read": read_counts,
        "splits": stats.to_dict(orient="index"),
        "categories": {
            k: int(v) for k, v in selected.drop_duplicates("item_id").category.value_counts().sort_index().items()
        },
        "dropped_rows": dropped,
        "image_check": report.as_dict(),
        "images": len(selected),
        "table_sha256": sha256_bytes(data),
    }
    write_bytes_atomic(table_path, data)
    write_bytes_atomic(out_dir / "summary.json", (json.dumps(summary, indent=2) + "\n").encode("utf-8"))
    return summary


# --------------------------------------------------------------------------- subsets a run uses


def _ordered_items(table: pd.DataFrame, split: str, seed: int) -> np.ndarray:
    """The split's item ids in a seeded random order (sorted first, so the order depends on the
    ids and the seed only, never on row order)."""
    items = np.sort(table.loc[table.split == split, "item_id"].unique())
    return items[np.random.default_rng(seed).permutation(len(items))]


def train_subset(table: pd.DataFrame, fraction: float, seed: int) -> pd.DataFrame:
    """The table with only ``fraction`` of its train items (at least 2) kept, val and test whole.
    The kept items are a prefix of one seeded order, so smaller fractions are nested in larger
    ones: the data-size question compares subsets, not different draws.

    >>> t = pd.DataFrame({"item_id": ["a", "a", "b", "c", "d", "v"], "split": ["train"] * 5 + ["val"]})
    >>> small, large = (set(train_subset(t, f, seed=0).item_id) - {"v"} for f in (0.5, 0.75))
    >>> small <= large, len(small), len(large)
    (True, 2, 3)
    """
    if fraction >= 1:
        return table
    order = _ordered_items(table, "train", seed)
    keep = order[: max(2, round(len(order) * fraction))]
    return table.loc[(table.split != "train") | table.item_id.isin(keep)].reset_index(drop=True)


def split_stop_items(table: pd.DataFrame, n_stop: int, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    """``(stop, compare)``: the table with only the consumer photos of ``n_stop`` seeded val items
    left as val queries, and the table with only the other val items' consumer photos; both keep
    every val shop photo (the official val gallery), train and test. Early stopping and the
    checkpoint's choice look at ``stop``; the numbers that compare runs come from ``compare``,
    whose queries no choice has seen (selecting and reporting on one set flatters the selected
    epoch), against the same gallery, so the two measure the same task."""
    order = _ordered_items(table, "val", seed)
    if not 1 <= n_stop < len(order):
        raise InputError(
            f"stop_items must be between 1 and {len(order) - 1} (val has {len(order)} items), got {n_stop}"
        )
    in_stop = table.item_id.isin(set(order[:n_stop]))
    val_query = (table.split == "val") & (table.domain == "consumer")
    return (
        table.loc[~val_query | in_stop].reset_index(drop=True),
        table.loc[~val_query | ~in_stop].reset_index(drop=True),
    )
