"""A DeepFashion-format tree written by hand (not by helpers.data.synthetic), with the quirks of the
real release: count + header lines, space-aligned columns, CRLF, trailing spaces, the
``comsumer_NN.jpg`` spelling, an item under two subcategory folders, a 1-px box overshoot,
an image in the bbox list that the partition does not name.

Expected counts are stated next to the records, so tests compare against numbers written
here, not computed by the code under test.
"""

from __future__ import annotations

from pathlib import Path

from PIL import Image

# image name, clothes_type, source_type (1 shop, 2 consumer), box, image size (w, h)
BBOX = [
    ("img/TOPS/T_Shirt/id_00000001/comsumer_01.jpg", 1, 2, (10, 20, 150, 200), (200, 300)),
    ("img/TOPS/T_Shirt/id_00000001/comsumer_02.jpg", 1, 2, (0, 0, 201, 300), (200, 300)),  # x_2 = w + 1
    ("img/TOPS/T_Shirt/id_00000001/shop_01.jpg", 1, 1, (30, 40, 170, 260), (200, 300)),
    ("img/TOPS/Summer_Wear/id_00000002/comsumer_01.jpg", 1, 2, (5, 5, 100, 120), (300, 240)),
    ("img/TOPS/T_Shirt/id_00000002/shop_01.jpg", 1, 1, (50, 50, 250, 200), (300, 240)),
    ("img/TOPS/T_Shirt/id_00000002/comsumer_09.jpg", 1, 2, (5, 5, 100, 120), (300, 240)),  # not in partition
    ("img/DRESSES/Lace_Dress/id_00000003/comsumer_01.jpg", 3, 2, (20, 10, 180, 290), (200, 300)),
    ("img/DRESSES/Lace_Dress/id_00000003/shop_01.jpg", 3, 1, (40, 10, 160, 290), (200, 300)),
    ("img/DRESSES/Lace_Dress/id_00000003/shop_02.jpg", 3, 1, (40, 10, 160, 290), (200, 300)),
    ("img/DRESSES/Maxi_Dress/id_00000004/comsumer_01.jpg", 3, 2, (20, 10, 180, 290), (200, 300)),
    ("img/DRESSES/Maxi_Dress/id_00000004/comsumer_02.jpg", 3, 2, (20, 10, 180, 290), (200, 300)),
    ("img/DRESSES/Maxi_Dress/id_00000004/shop_01.jpg", 3, 1, (20, 10, 180, 290), (200, 300)),
    ("img/TROUSERS/Pants/id_00000005/comsumer_01.jpg", 2, 2, (60, 30, 140, 280), (200, 300)),
    ("img/TROUSERS/Pants/id_00000005/shop_01.jpg", 2, 1, (60, 30, 140, 280), (200, 300)),
]

# consumer image, shop image, item, split: one row per pair
PARTITION = [
    (
        "img/TOPS/T_Shirt/id_00000001/comsumer_01.jpg",
        "img/TOPS/T_Shirt/id_00000001/shop_01.jpg",
        "id_00000001",
        "train",
    ),
    (
        "img/TOPS/T_Shirt/id_00000001/comsumer_02.jpg",
        "img/TOPS/T_Shirt/id_00000001/shop_01.jpg",
        "id_00000001",
        "train",
    ),
    (
        "img/TOPS/Summer_Wear/id_00000002/comsumer_01.jpg",
        "img/TOPS/T_Shirt/id_00000002/shop_01.jpg",
        "id_00000002",
        "train",
    ),
    (
        "img/DRESSES/Lace_Dress/id_00000003/comsumer_01.jpg",
        "img/DRESSES/Lace_Dress/id_00000003/shop_01.jpg",
        "id_00000003",
        "val",
    ),
    (
        "img/DRESSES/Lace_Dress/id_00000003/comsumer_01.jpg",
        "img/DRESSES/Lace_Dress/id_00000003/shop_02.jpg",
        "id_00000003",
        "val",
    ),
    (
        "img/DRESSES/Maxi_Dress/id_00000004/comsumer_01.jpg",
        "img/DRESSES/Maxi_Dress/id_00000004/shop_01.jpg",
        "id_00000004",
        "test",
    ),
    (
        "img/DRESSES/Maxi_Dress/id_00000004/comsumer_02.jpg",
        "img/DRESSES/Maxi_Dress/id_00000004/shop_01.jpg",
        "id_00000004",
        "test",
    ),
    (
        "img/TROUSERS/Pants/id_00000005/comsumer_01.jpg",
        "img/TROUSERS/Pants/id_00000005/shop_01.jpg",
        "id_00000005",
        "test",
    ),
]
ITEMS = ["id_00000001", "id_00000002", "id_00000003", "id_00000004", "id_00000005"]

# Counts with every category kept, by hand from the lists above.
EXPECTED_ALL = {
    "train": {"items": 2, "consumer_images": 3, "shop_images": 2, "pairs": 3},
    "val": {"items": 1, "consumer_images": 1, "shop_images": 2, "pairs": 2},
    "test": {"items": 2, "consumer_images": 3, "shop_images": 2, "pairs": 3},
}
# With TOPS,DRESSES only, the TROUSERS item of the test split goes.
EXPECTED_TOPS_DRESSES_TEST = {"items": 1, "consumer_images": 2, "shop_images": 1, "pairs": 2}


def format_list(records: list[tuple], header: str | None, line_end: str = "\r\n") -> str:
    """Count line, optional header, records padded into space-aligned columns + trailing spaces."""
    rows = [[str(v) for v in record] for record in records]
    n_columns = max((len(r) for r in rows), default=0)  # landmark rows are ragged
    widths = [max(len(r[i]) for r in rows if len(r) > i) + 3 for i in range(n_columns)]
    lines = [str(len(rows))]
    if header is not None:
        lines.append(header + "  ")
    lines += ["".join(v.ljust(w) for v, w in zip(r, widths)) for r in rows]
    return line_end.join(lines) + line_end


def bbox_records(bbox=BBOX) -> list[tuple]:
    return [(name, ct, st, *box) for name, ct, st, box, _ in bbox]


def write_tree(
    root: Path,
    bbox=BBOX,
    partition=PARTITION,
    items=ITEMS,
    bbox_text: str | None = None,
    partition_text: str | None = None,
) -> Path:
    """Write lists and images under ``root``; ``*_text`` replaces a list with raw text."""
    (root / "Anno").mkdir(parents=True, exist_ok=True)
    (root / "Eval").mkdir(parents=True, exist_ok=True)
    bbox_header = "image_name  clothes_type  source_type  x_1  y_1  x_2  y_2"
    (root / "Anno/list_bbox_consumer2shop.txt").write_bytes(
        (bbox_text if bbox_text is not None else format_list(bbox_records(bbox), bbox_header)).encode()
    )
    (root / "Anno/list_item_consumer2shop.txt").write_bytes(format_list([(i,) for i in items], None).encode())
    partition_header = "image_pair_name_1  image_pair_name_2  item_id  evaluation_status"
    (root / "Eval/list_eval_partition.txt").write_bytes(
        (partition_text if partition_text is not None else format_list(partition, partition_header)).encode()
    )
    for index, (name, _, _, _, size) in enumerate(bbox):
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if not path.exists():
            Image.new("RGB", size, (index * 13 % 255, 90, 160)).save(path, quality=90)
    return root
