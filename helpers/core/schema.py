"""The image table (``images.csv``, one row per image): its columns, splits and domains, and
the one reader that checks them. Every module that touches the table takes its names from
here (as open-metric-learning's ``const.py`` does).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core.errors import InputError

SPLITS = ("train", "val", "test")
DOMAINS = ("consumer", "shop")
BOX_COLUMNS = ("x_1", "y_1", "x_2", "y_2")
# The columns `prepare` writes, in order.
TABLE_COLUMNS = (
    "path",
    "item_id",
    "domain",
    "split",
    "category",
    "subcategory",
    "clothes_type",
    *BOX_COLUMNS,
    "width",
    "height",
    "variation_type",
)
# What a dataset needs to load and batch images; a hand-made table may hold only these.
IMAGE_COLUMNS = ("path", "item_id", "domain", *BOX_COLUMNS)
_TEXT_COLUMNS = {"path": str, "item_id": str, "domain": str, "split": str, "category": str, "subcategory": str}


def check_columns(table: pd.DataFrame, needed: Sequence[str], where: str = "image table") -> None:
    missing = [c for c in needed if c not in table.columns]
    if missing:
        raise InputError(f"{where} lacks column(s) {', '.join(missing)}")


def read_table(path: str | Path) -> pd.DataFrame:
    """Read an ``images.csv`` written by ``prepare``, checking columns, domains and splits;
    a bad row is reported by its line number (the header is line 1)."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: image table not found (run `python -m helpers prepare` first)")
    try:
        table = pd.read_csv(path, dtype=_TEXT_COLUMNS)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as error:
        raise InputError(f"{path}: not an image table written by prepare ({type(error).__name__})") from None
    missing = [c for c in TABLE_COLUMNS if c not in table.columns]
    if missing:
        raise InputError(f"{path}:1: missing columns {','.join(missing)}")
    if table.empty:
        raise InputError(f"{path}: the image table is empty")
    bad = table[list(TABLE_COLUMNS)].isna().any(axis=1)
    bad |= ~table.domain.isin(DOMAINS) | ~table.split.isin(SPLITS)
    if bad.any():
        row = int(np.flatnonzero(bad.to_numpy())[0])
        raise InputError(f"{path}:{row + 2}: empty field, or domain/split not {'|'.join(DOMAINS)} / {'|'.join(SPLITS)}")
    return table
