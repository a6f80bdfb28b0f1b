"""Read the official DeepFashion Consumer-to-Shop lists into a one-row-per-image table.

Formats (docs/design.md describes the resulting table): every list starts with a count line,
then a header line (except the item list), then space-aligned records. The domain of an image
is the bbox list's ``source_type`` (1 shop, 2 consumer), never its file name (consumer files
are spelled ``comsumer_NN.jpg``); the item is the ``id_...`` folder, not the full path, because
one item can sit under two subcategory folders. The split comes per item from the partition.

Every problem in a list raises :class:`~helpers.core.errors.InputError` with ``file:line:``.
Image checks (exists, decodes, box inside) exclude bad images, count them and write their
paths to a file; ``strict=True`` makes any of them fatal. Nothing on disk is modified.
"""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
from PIL import Image

from helpers.core.errors import InputError, at
from helpers.core.progress import progress_bar
from helpers.core.schema import SPLITS, TABLE_COLUMNS

BBOX_LIST = "Anno/list_bbox_consumer2shop.txt"
ITEM_LIST = "Anno/list_item_consumer2shop.txt"
LANDMARK_LIST = "Anno/list_landmarks_consumer2shop.txt"
PARTITION_LIST = "Eval/list_eval_partition.txt"

BBOX_HEADER = ("image_name", "clothes_type", "source_type", "x_1", "y_1", "x_2", "y_2")
PARTITION_HEADER = ("image_pair_name_1", "image_pair_name_2", "item_id", "evaluation_status")
SOURCE_TYPES = {1: "shop", 2: "consumer"}
CLOTHES_TYPES = (1, 2, 3)
VARIATION_TYPES = (1, 2, 3, 4, 5)
LANDMARK_COUNTS = (4, 6, 8)
# Real lists put box corners up to a pixel or two past the image edge; such overshoots are
# clipped. Anything further out is an error in the data and the image is excluded.
BOX_OVERSHOOT_PX = 2

_ITEM_ID = re.compile(r"^id_\d+$")


@dataclass
class Record:
    line: int
    fields: list[str]


@dataclass
class ImageCheckReport:
    checked: int = 0
    clipped_boxes: int = 0
    bad: dict[str, int] = field(default_factory=lambda: {"missing": 0, "corrupt": 0, "box_outside": 0})
    bad_paths_file: str | None = None

    def as_dict(self) -> dict:
        return {
            "checked": self.checked,
            "clipped_boxes": self.clipped_boxes,
            "bad": dict(self.bad),
            "bad_paths_file": self.bad_paths_file,
        }


def read_records(path: Path, header: tuple[str, ...] | None, n_columns: int | tuple[int, ...]) -> list[Record]:
    """Records of one list: checks the count line, the header line and each record's width.

    Columns are separated by runs of spaces; CRLF line ends and trailing spaces are tolerated.
    """
    if not path.is_file():
        raise at(path, None, "list file not found")
    widths = (n_columns,) if isinstance(n_columns, int) else n_columns
    # utf-8-sig: a byte-order mark (from some editors) is not part of the count line.
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    while lines and not lines[-1].strip():
        lines.pop()
    if not lines:
        raise at(path, 1, "empty list file (expected a count line)")
    try:
        declared = int(lines[0].strip())
    except ValueError:
        raise at(path, 1, f"expected the record count, got {lines[0].strip()!r}") from None
    first = 1
    if header is not None:
        got = tuple(lines[1].split()) if len(lines) > 1 else ()
        if got != header:
            raise at(path, 2, f"expected header {' '.join(header)!r}, got {' '.join(got)!r}")
        first = 2
    records = []
    for index in range(first, len(lines)):
        fields = lines[index].split()
        if not fields:
            raise at(path, index + 1, "blank line inside the list")
        if len(fields) not in widths:
            expected = " or ".join(str(w) for w in widths)
            raise at(path, index + 1, f"expected {expected} columns, got {len(fields)}")
        records.append(Record(index + 1, fields))
    if declared != len(records):
        raise at(path, 1, f"count line says {declared} records but the file holds {len(records)}")
    return records


def _int(path: Path, record: Record, column: int, name: str) -> int:
    try:
        return int(record.fields[column])
    except ValueError:
        raise at(path, record.line, f"{name} must be an integer, got {record.fields[column]!r}") from None


def item_id_of(image_path: str) -> str | None:
    """The ``id_...`` folder of an image path, which is the item (not the full folder path)."""
    parts = image_path.split("/")
    return parts[-2] if len(parts) >= 2 and _ITEM_ID.match(parts[-2]) else None


def parse_bbox_list(path: Path) -> pd.DataFrame:
    """One row per image: path, domain, category, subcategory, clothes_type, box; validated."""
    rows = []
    seen: dict[str, int] = {}
    for record in read_records(path, BBOX_HEADER, len(BBOX_HEADER)):
        name = record.fields[0]
        if name in seen:
            raise at(path, record.line, f"image {name} already listed on line {seen[name]}")
        seen[name] = record.line
        parts = name.split("/")
        item_id = item_id_of(name)
        if parts[0] != "img" or len(parts) != 5 or item_id is None:
            raise at(path, record.line, f"image name {name!r} is not img/CATEGORY/Subcategory/id_XXXXXXXX/file")
        clothes_type = _int(path, record, 1, "clothes_type")
        source_type = _int(path, record, 2, "source_type")
        x_1, y_1, x_2, y_2 = (_int(path, record, c, n) for c, n in zip(range(3, 7), BBOX_HEADER[3:]))
        if clothes_type not in CLOTHES_TYPES:
            raise at(path, record.line, f"clothes_type must be 1, 2 or 3, got {clothes_type}")
        if source_type not in SOURCE_TYPES:
            raise at(path, record.line, f"source_type must be 1 (shop) or 2 (consumer), got {source_type}")
        if min(x_1, y_1) < 0:
            raise at(path, record.line, f"negative box corner ({x_1}, {y_1})")
        if x_2 <= x_1 or y_2 <= y_1:
            raise at(path, record.line, f"inverted or zero-area box ({x_1}, {y_1}, {x_2}, {y_2})")
        rows.append(
            (
                name,
                item_id,
                SOURCE_TYPES[source_type],
                parts[1],
                parts[2],
                clothes_type,
                x_1,
                y_1,
                x_2,
                y_2,
                record.line,
            )
        )
    return pd.DataFrame(
        rows,
        columns=[
            "path",
            "item_id",
            "domain",
            "category",
            "subcategory",
            "clothes_type",
            "x_1",
            "y_1",
            "x_2",
            "y_2",
            "line",
        ],
    )


def parse_partition(path: Path) -> pd.DataFrame:
    """The pair rows (consumer image, shop image, item, split), with each item in one split."""
    rows = []
    split_of: dict[str, tuple[str, int]] = {}
    for record in read_records(path, PARTITION_HEADER, len(PARTITION_HEADER)):
        consumer, shop, item_id, split = record.fields
        if split not in SPLITS:
            raise at(path, record.line, f"evaluation_status must be train, val or test, got {split!r}")
        if not _ITEM_ID.match(item_id):
            raise at(path, record.line, f"item_id must look like id_00000001, got {item_id!r}")
        for image in (consumer, shop):
            if item_id_of(image) != item_id:
                raise at(path, record.line, f"image {image} does not belong to item {item_id}")
        first = split_of.setdefault(item_id, (split, record.line))
        if first[0] != split:
            raise at(path, record.line, f"item {item_id} is in {split} here but in {first[0]} on line {first[1]}")
        rows.append((consumer, shop, item_id, split, record.line))
    return pd.DataFrame(rows, columns=["consumer", "shop", "item_id", "split", "line"])


def parse_item_list(path: Path) -> set[str]:
    items = set()
    for record in read_records(path, None, 1):
        if not _ITEM_ID.match(record.fields[0]):
            raise at(path, record.line, f"item_id must look like id_00000001, got {record.fields[0]!r}")
        items.add(record.fields[0])
    return items


def parse_landmark_list(path: Path) -> pd.DataFrame:
    """``variation_type`` per image (pose / zoom); the landmark coordinates are validated only."""
    header_width = 3 + 3 * max(LANDMARK_COUNTS)
    widths = tuple(3 + 3 * n for n in LANDMARK_COUNTS)
    if not path.is_file():
        raise at(path, None, "list file not found")
    lines = path.read_text(encoding="utf-8-sig", errors="replace").splitlines()
    if len(lines) < 2 or len(lines[1].split()) != header_width:
        raise at(path, 2, f"expected a header of {header_width} column names")
    header = tuple(lines[1].split())
    rows = []
    seen: dict[str, int] = {}
    for record in read_records(path, header, widths):
        first = seen.setdefault(record.fields[0], record.line)
        if first != record.line:
            raise at(path, record.line, f"image {record.fields[0]} already listed on line {first}")
        values = [_int(path, record, c, "landmark value") for c in range(1, len(record.fields))]
        if values[1] not in VARIATION_TYPES:
            raise at(path, record.line, f"variation_type must be 1..5, got {values[1]}")
        rows.append((record.fields[0], values[1]))
    return pd.DataFrame(rows, columns=["path", "variation_type"])


def build_image_table(root: str | Path) -> tuple[pd.DataFrame, pd.DataFrame, dict]:
    """Join the bbox list and the partition into the image table (before image checks).

    Returns ``(table, pairs, counts)``: the table has one row per image that the partition
    names, ``pairs`` the partition's pair rows, ``counts`` what was read and left out.
    """
    root = Path(root)
    bbox_path, partition_path = root / BBOX_LIST, root / PARTITION_LIST
    boxes = parse_bbox_list(bbox_path)
    pairs = parse_partition(partition_path)
    if pairs.empty:
        raise at(partition_path, None, "no pair records: the partition list names no image to use")
    if boxes.empty:
        raise at(bbox_path, None, "no image records")
    if (root / ITEM_LIST).is_file():
        listed = parse_item_list(root / ITEM_LIST)
        unknown = pairs.loc[~pairs.item_id.isin(listed)]
        if len(unknown):
            row = unknown.iloc[0]
            raise at(partition_path, int(row.line), f"item {row.item_id} is not in {ITEM_LIST}")
    domain_of = boxes.set_index("path").domain
    for column in ("consumer", "shop"):
        domains = pairs[column].map(domain_of)
        absent = pairs.loc[domains.isna()]
        if len(absent):
            row = absent.iloc[0]
            raise at(partition_path, int(row.line), f"image {row[column]} is not in {BBOX_LIST}")
        # Column 1 of a pair is the consumer image and column 2 the shop image.
        swapped = pairs.loc[domains != column]
        if len(swapped):
            row = swapped.iloc[0]
            raise at(
                partition_path,
                int(row.line),
                f"image {row[column]} is listed as {column} here but its "
                f"source_type in {BBOX_LIST} says {domain_of[row[column]]}",
            )

    split_of_item = pairs.drop_duplicates("item_id").set_index("item_id").split
    in_partition = set(pairs.consumer) | set(pairs.shop)
    table = boxes.loc[boxes.path.isin(in_partition)].copy()
    # An image's item is its id folder: if the bbox list and partition disagree, the partition
    # check above has already named the line, so the split lookup below is total.
    table["split"] = table.item_id.map(split_of_item)
    table["width"] = 0
    table["height"] = 0
    table["variation_type"] = 0
    if (root / LANDMARK_LIST).is_file():
        variation = parse_landmark_list(root / LANDMARK_LIST).set_index("path").variation_type
        table["variation_type"] = table.path.map(variation).fillna(0).astype(int)
    table = table.sort_values("path", kind="stable").reset_index(drop=True)
    counts = {
        "bbox_records": len(boxes),
        "partition_pairs": len(pairs),
        "images_not_in_partition": len(boxes) - len(table),
        "items": int(table.item_id.nunique()),
        "items_under_two_subcategories": int((table.groupby("item_id").subcategory.nunique() > 1).sum()),
    }
    return table[list(TABLE_COLUMNS)], pairs.drop(columns="line"), counts


def _inspect_image(root: Path, row) -> tuple[str | None, tuple[int, int] | None]:
    """(problem, (width, height)) for one image: missing, corrupt, or box outside it."""
    file = root / row.path
    if not file.is_file():
        return "missing", None
    try:
        with Image.open(file) as image:
            image.load()  # a full decode: a truncated JPEG opens fine but fails here
            size = image.size
    except Exception:
        return "corrupt", None
    width, height = size
    if (
        row.x_2 > width + BOX_OVERSHOOT_PX
        or row.y_2 > height + BOX_OVERSHOOT_PX
        or row.x_1 >= width
        or row.y_1 >= height
    ):
        return "box_outside", size
    return None, size


def check_images(
    table: pd.DataFrame,
    root: str | Path,
    bad_paths_file: str | Path | None = None,
    strict: bool = False,
    progress: bool = True,
    workers: int = 8,
) -> tuple[pd.DataFrame, ImageCheckReport]:
    """Open every image of the table; drop bad ones, clip 1–2 px box overshoots, add sizes.

    Bad images are counted by reason and written (``path<TAB>reason``) to ``bad_paths_file``;
    with ``strict`` the first bad image raises instead. Decoding runs in threads because PIL
    releases the GIL while it decodes.
    """
    root = Path(root)
    report = ImageCheckReport(checked=len(table))
    rows = list(table.itertuples(index=False))
    with ThreadPoolExecutor(max_workers=workers) as pool:
        results = list(
            progress_bar(
                pool.map(lambda row: _inspect_image(root, row), rows),
                total=len(rows),
                desc="checking images",
                disable=not progress,
                mininterval=1.0,
            )
        )
    keep, bad_lines = [], []
    widths, heights = [], []
    for row, (problem, size) in zip(rows, results):
        if problem is not None:
            if strict:
                raise InputError(f"{root / row.path}: {problem.replace('_', ' ')} (strict image check)")
            report.bad[problem] += 1
            bad_lines.append(f"{row.path}\t{problem}\n")
        keep.append(problem is None)
        widths.append(size[0] if size else 0)
        heights.append(size[1] if size else 0)
    checked = table.assign(width=widths, height=heights).loc[keep].copy()
    clipped_x, clipped_y = checked.x_2 > checked.width, checked.y_2 > checked.height
    report.clipped_boxes = int((clipped_x | clipped_y).sum())
    checked["x_2"] = checked[["x_2", "width"]].min(axis=1)
    checked["y_2"] = checked[["y_2", "height"]].min(axis=1)
    if bad_paths_file is not None:
        Path(bad_paths_file).write_text("".join(bad_lines), encoding="utf-8")
        report.bad_paths_file = str(bad_paths_file)
    return checked.reset_index(drop=True), report
