"""The synthetic generator writes the official Consumer-to-Shop layout, quirks and domain gap included."""

from __future__ import annotations

import hashlib
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.core.errors import InputError
from helpers.data.synthetic import CATEGORIES, SUBCATEGORIES, generate_tree

N_ITEMS = 16  # >= 12 guarantees every quirk; >= 16 guarantees four families, so all categories

BBOX_HEADER = "image_name clothes_type source_type x_1 y_1 x_2 y_2"
PARTITION_HEADER = "image_pair_name_1 image_pair_name_2 item_id evaluation_status"
PATH_RE = re.compile(r"^img/([A-Z]+)/(\w+)/(id_\d{8})/(comsumer|shop)_(\d\d)\.jpg$")


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    root = tmp_path_factory.mktemp("c2s") / "tree"
    counts = generate_tree(root, N_ITEMS, seed=0, progress=False)
    return root, counts


def read_list(path: Path, header: str | None, columns: int) -> list[list[str]]:
    """Rows of a list file, after checking its count line, header and column count."""
    lines = path.read_text(encoding="utf-8").splitlines()
    body = lines[1:]
    if header is not None:
        assert lines[1] == header
        body = lines[2:]
    assert int(lines[0]) == len(body)
    rows = [line.split() for line in body]
    assert all(len(row) == columns for row in rows)
    return rows


@pytest.fixture(scope="module")
def lists(tree):
    root, _ = tree
    bbox = read_list(root / "Anno/list_bbox_consumer2shop.txt", BBOX_HEADER, 7)
    items = read_list(root / "Anno/list_item_consumer2shop.txt", None, 1)
    pairs = read_list(root / "Eval/list_eval_partition.txt", PARTITION_HEADER, 4)
    return bbox, [row[0] for row in items], pairs


def tree_digest(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def test_lists_are_space_aligned_like_the_release(tree):
    root, _ = tree
    record = (root / "Anno/list_bbox_consumer2shop.txt").read_text().splitlines()[2]
    # The name is padded with a run of spaces and the numbers are zero-padded, as released.
    assert re.match(r"^img/\S+\.jpg {2,}[123] +[12] +\d{3} \d{3} \d{3} \d{3}$", record)


def test_paths_follow_the_official_layout_and_codes(lists):
    bbox, _, _ = lists
    for path, clothes_type, source_type, *_ in bbox:
        match = PATH_RE.match(path)
        assert match, path
        category, subcategory, _, stem, number = match.groups()
        assert SUBCATEGORIES[subcategory][0] == category
        assert int(clothes_type) == CATEGORIES[category][0]
        assert int(source_type) == (2 if stem == "comsumer" else 1)  # 2 consumer, 1 shop
        assert int(number) >= 1


def test_images_exist_decode_have_long_side_300_and_boxes_inside(tree, lists):
    root, _ = tree
    bbox, _, _ = lists
    overshoots = 0
    for path, _, _, *box in bbox:
        with Image.open(root / path) as image:
            assert image.format == "JPEG"
            image.load()
            width, height = image.size
        assert max(width, height) == 300 and min(width, height) >= 200
        x1, y1, x2, y2 = map(int, box)
        assert 0 <= x1 < x2 <= width + 1 and 0 <= y1 < y2 <= height + 1
        overshoots += (x2 == width + 1) + (y2 == height + 1)
    assert overshoots >= 1  # the real lists' one-pixel overshoot is exercised


def test_every_image_on_disk_is_listed_once(tree, lists):
    root, _ = tree
    bbox, _, _ = lists
    listed = [row[0] for row in bbox]
    on_disk = sorted(str(p.relative_to(root)) for p in (root / "img").rglob("*.jpg"))
    assert len(set(listed)) == len(listed)
    assert sorted(listed) == on_disk


def test_numbering_starts_at_01_per_item(lists):
    bbox, _, _ = lists
    numbers = defaultdict(list)
    for path, *_ in bbox:
        _, _, item_id, stem, number = PATH_RE.match(path).groups()
        numbers[item_id, stem].append(int(number))
    for (item_id, stem), found in numbers.items():
        assert sorted(found) == list(range(1, len(found) + 1)), (item_id, stem)
    for item_id in {key[0] for key in numbers}:
        assert 1 <= len(numbers[item_id, "comsumer"]) <= 6
        assert 1 <= len(numbers[item_id, "shop"]) <= 3


def test_partition_is_consumer_times_shop_per_item_in_one_split(lists):
    bbox, item_ids, pairs = lists
    consumer, shop = defaultdict(set), defaultdict(set)
    for path, _, source_type, *_ in bbox:
        item_id = PATH_RE.match(path).group(3)
        (consumer if source_type == "2" else shop)[item_id].add(path)
    assert sorted(item_ids) == sorted(consumer) == sorted(shop)

    split_of = defaultdict(set)
    listed = defaultdict(list)
    for c, s, item_id, split in pairs:
        assert split in {"train", "val", "test"}
        split_of[item_id].add(split)
        listed[item_id].append((c, s))
    assert all(len(splits) == 1 for splits in split_of.values())
    for item_id in item_ids:
        expected = sorted((c, s) for c in consumer[item_id] for s in shop[item_id])
        assert sorted(listed[item_id]) == expected

    per_split = {s: sum(1 for v in split_of.values() if s in v) for s in ("train", "val", "test")}
    assert per_split == {"train": N_ITEMS // 2, "val": N_ITEMS // 4, "test": N_ITEMS // 4}


def test_returned_counts_match_the_files(tree, lists):
    _, counts = tree
    bbox, item_ids, pairs = lists
    split_of = {row[2]: row[3] for row in pairs}
    assert counts["items"] == len(item_ids) == N_ITEMS
    assert counts["consumer_images"] == sum(row[2] == "2" for row in bbox)
    assert counts["shop_images"] == sum(row[2] == "1" for row in bbox)
    assert counts["pairs"] == len(pairs)
    for split, c in counts["per_split"].items():
        rows = [row for row in bbox if split_of[PATH_RE.match(row[0]).group(3)] == split]
        assert c["items"] == sum(1 for s in split_of.values() if s == split)
        assert c["consumer_images"] == sum(row[2] == "2" for row in rows)
        assert c["shop_images"] == sum(row[2] == "1" for row in rows)
        assert c["pairs"] == sum(row[3] == split for row in pairs)
    categories = defaultdict(set)
    for row in bbox:
        category, _, item_id = PATH_RE.match(row[0]).groups()[:3]
        categories[category].add(item_id)
    assert counts["categories"] == {c: len(categories[c]) for c in CATEGORIES}


def test_categories_are_mostly_tops_and_dresses_but_all_present(tree):
    _, counts = tree
    cats = counts["categories"]
    assert all(cats[c] >= 1 for c in CATEGORIES)
    assert cats["TOPS"] + cats["DRESSES"] > cats["TROUSERS"] + cats["CLOTHING"]


@pytest.mark.parametrize("n_items", [12, N_ITEMS])
def test_release_quirks_are_present(tmp_path, n_items, lists):
    if n_items == N_ITEMS:
        bbox = lists[0]
    else:  # the smallest tree that promises every quirk
        generate_tree(tmp_path / "t", n_items, seed=3, progress=False)
        bbox = read_list(tmp_path / "t/Anno/list_bbox_consumer2shop.txt", BBOX_HEADER, 7)
    folders, shops = defaultdict(set), defaultdict(int)
    for path, _, source_type, *_ in bbox:
        category, subcategory, item_id = PATH_RE.match(path).groups()[:3]
        folders[item_id].add((category, subcategory))
        shops[item_id] += source_type == "1"
    two_folder = [i for i, f in folders.items() if len(f) == 2]
    assert two_folder and all(len({c for c, _ in folders[i]}) == 1 for i in two_folder)
    assert any(n >= 2 for n in shops.values())


def test_same_seed_is_byte_identical_and_another_seed_differs(tmp_path):
    generate_tree(tmp_path / "a", 4, seed=7, progress=False)
    generate_tree(tmp_path / "b", 4, seed=7, progress=False)
    generate_tree(tmp_path / "c", 4, seed=8, progress=False)
    a, b, c = (tree_digest(tmp_path / name) for name in "abc")
    assert a == b
    images = {path: digest for path, digest in a.items() if path.endswith(".jpg")}
    assert images and set(images.values()).isdisjoint(c.values())


def test_refuses_non_empty_root_and_bad_item_counts(tmp_path):
    (tmp_path / "keep.txt").write_text("user data")
    with pytest.raises(InputError, match="not an empty folder"):
        generate_tree(tmp_path, 6, progress=False)
    assert [p.name for p in tmp_path.iterdir()] == ["keep.txt"]
    with pytest.raises(InputError, match="not an empty folder"):
        generate_tree(tmp_path / "keep.txt", 6, progress=False)
    for bad in (3, 0, -5, 4.5, "10", True):
        with pytest.raises(InputError):
            generate_tree(tmp_path / "new", bad, progress=False)
    assert not (tmp_path / "new").exists()


def test_accepts_an_existing_empty_folder(tmp_path):
    counts = generate_tree(tmp_path, 4, seed=1, progress=False)
    assert counts["items"] == 4
    assert all(counts["per_split"][s]["items"] >= 1 for s in ("train", "val", "test"))


def _box_crop(root: Path, row: list[str]) -> np.ndarray:
    with Image.open(root / row[0]) as image:
        crop = image.convert("RGB").crop(tuple(map(int, row[3:7])))
        return np.asarray(crop.resize((64, 64), Image.BILINEAR), np.float32)


def _border_std(root: Path, row: list[str]) -> float:
    with Image.open(root / row[0]) as image:
        gray = np.asarray(image.convert("L"), np.float32)
    return float(np.concatenate([gray[:8].ravel(), gray[-8:].ravel(), gray[:, :8].ravel(), gray[:, -8:].ravel()]).std())


def test_consumer_images_carry_a_real_domain_gap(tree, lists):
    root, _ = tree
    bbox, _, _ = lists
    by_item = defaultdict(lambda: {"1": [], "2": []})
    for row in bbox:
        by_item[PATH_RE.match(row[0]).group(3)][row[2]].append(row)
    cross, within_shop = [], []
    for rows in by_item.values():
        reference = _box_crop(root, rows["1"][0])
        cross += [np.abs(reference - _box_crop(root, r)).mean() for r in rows["2"]]
        within_shop += [np.abs(reference - _box_crop(root, r)).mean() for r in rows["1"][1:]]
    # Two shop shots of one item differ by a few grey levels; a consumer shot of it by far more.
    assert within_shop and np.mean(within_shop) < 10
    assert np.mean(cross) > 5 * np.mean(within_shop)
    # Shop backgrounds are plain, consumer backgrounds cluttered.
    shop_border = [_border_std(root, r) for r in bbox if r[2] == "1"]
    consumer_border = [_border_std(root, r) for r in bbox if r[2] == "2"]
    assert max(shop_border) < 5 and np.mean(consumer_border) > 20
