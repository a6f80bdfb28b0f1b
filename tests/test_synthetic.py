"""The synthetic generator writes the official Consumer-to-Shop layout, quirks and domain gap included."""

from __future__ import annotations

import hashlib
import json
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from helpers.core.errors import InputError
from helpers.data import synthetic
from helpers.data.synthetic import CATEGORIES, SUBCATEGORIES, Nuisance, generate_tree

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
    """sha256 of every image and list (the measured nuisances beside them aside)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != synthetic.NUISANCE_FILE
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


# sha256 of the 12-item tree (seed 3) as the generator wrote it before nuisances could be scaled
# and items rendered in worker processes: each list, and one hash over every file's hash.
LISTS_BEFORE_NUISANCES = {
    "Anno/list_bbox_consumer2shop.txt": "65b12d46de6e10f02af9a90324cd6bd2eab19185a83d47b0cd36abef1d4edd12",
    "Anno/list_item_consumer2shop.txt": "d259e2b35f46e1f230172f03dd000c8eefa7eb6352e373cb1543e6557314d12f",
    "Eval/list_eval_partition.txt": "2dac7621eea59990d20ca192af60da081a61d2686a51df5c4a395da8c655885b",
}
FILES_BEFORE_NUISANCES = "09b6d9747960777f63bce45ea077929e036f5826b92e262361bfbe110516271b"


def generate_tree_at(root: Path, **kwargs) -> Path:
    generate_tree(root, 12, seed=3, progress=False, **kwargs)
    return root


@pytest.mark.parametrize("nuisance", [None, {"clutter": 1.0, "occlusion": 1, "colour_cast": 1.0, "box_jitter": 0.0}])
def test_the_default_strengths_write_the_tree_written_before_nuisances(tmp_path, nuisance):
    """The committed study's tree identity: the default path draws and writes exactly as before."""
    digest = tree_digest(generate_tree_at(tmp_path / "t", nuisance=nuisance, workers=2))
    assert len(digest) == 65 and {name: digest[name] for name in LISTS_BEFORE_NUISANCES} == LISTS_BEFORE_NUISANCES
    assert hashlib.sha256(json.dumps(digest, sort_keys=True).encode()).hexdigest() == FILES_BEFORE_NUISANCES


def test_one_or_two_workers_write_the_same_files(tmp_path):
    nuisance = {"clutter": 0.5, "box_jitter": 1.0}
    one = tree_digest(generate_tree_at(tmp_path / "one", nuisance=nuisance, workers=1))
    two = tree_digest(generate_tree_at(tmp_path / "two", nuisance=nuisance, workers=2))
    assert one == two and len(one) == 65


def test_only_splits_writes_those_items_exactly_as_the_whole_tree_does(tree, lists, tmp_path):
    root, _ = tree
    bbox, _, pairs = lists
    counts = generate_tree(tmp_path / "val", N_ITEMS, seed=0, progress=False, only_splits=("val",))
    val_items = {item for _, _, item, split in pairs if split == "val"}
    val_bbox, val_items_listed, val_pairs = (
        read_list(tmp_path / "val/Anno/list_bbox_consumer2shop.txt", BBOX_HEADER, 7),
        read_list(tmp_path / "val/Anno/list_item_consumer2shop.txt", None, 1),
        read_list(tmp_path / "val/Eval/list_eval_partition.txt", PARTITION_HEADER, 4),
    )
    assert val_bbox == [row for row in bbox if PATH_RE.match(row[0]).group(3) in val_items]
    assert {row[0] for row in val_items_listed} == val_items
    assert val_pairs == [row for row in pairs if row[3] == "val"]
    written = tree_digest(tmp_path / "val")
    whole = tree_digest(root)
    assert {path for path in written if path.endswith(".jpg")} == {row[0] for row in val_bbox}
    assert all(whole[path] == digest for path, digest in written.items() if path.endswith(".jpg"))
    assert counts["items"] == len(val_items) and counts["per_split"]["train"]["items"] == 0


def _consumer_pixels(root: Path) -> dict[str, np.ndarray]:
    return {
        str(p.relative_to(root)): np.asarray(Image.open(p).convert("RGB"), np.float32)
        for p in sorted(root.rglob("comsumer_*.jpg"))
    }


@pytest.mark.parametrize("nuisance", ["clutter", "occlusion", "colour_cast"])
def test_an_image_nuisance_grows_with_its_strength_and_leaves_the_rest(tmp_path, nuisance):
    roots = {
        s: generate_tree_at(tmp_path / str(s), nuisance={nuisance: s}, only_splits=("val",)) for s in (0, 0.5, 1, 2)
    }
    digests = {s: tree_digest(r) for s, r in roots.items()}
    shop = {s: {p: d for p, d in digest.items() if "shop_" in p} for s, digest in digests.items()}
    assert shop[0] and all(found == shop[0] for found in shop.values())  # shop photos have no nuisance
    lists = {s: {p: d for p, d in digest.items() if p.endswith(".txt")} for s, digest in digests.items()}
    assert all(found == lists[0] for found in lists.values())  # the box is the garment's, occluded or not
    pixels = {s: _consumer_pixels(r) for s, r in roots.items()}
    # The same photo, further from its nuisance-free version at every step of strength.
    distance = {s: np.mean([np.abs(pixels[s][p] - pixels[0][p]).mean() for p in pixels[0]]) for s in (0.5, 1, 2)}
    assert 0 < distance[0.5] < distance[1] < distance[2], distance


def test_box_jitter_moves_the_consumer_boxes_only(tmp_path):
    exact = generate_tree_at(tmp_path / "exact", only_splits=("val",))
    moved = generate_tree_at(tmp_path / "moved", nuisance={"box_jitter": 1.0}, only_splits=("val",))
    a, b = tree_digest(exact), tree_digest(moved)
    assert {p: d for p, d in a.items() if p.endswith(".jpg")} == {p: d for p, d in b.items() if p.endswith(".jpg")}
    rows_a, rows_b = (read_list(r / "Anno/list_bbox_consumer2shop.txt", BBOX_HEADER, 7) for r in (exact, moved))
    ious = []
    for row_a, row_b in zip(rows_a, rows_b, strict=True):
        assert row_a[:3] == row_b[:3]
        if row_a[2] == "1":
            assert row_a == row_b  # shop boxes stay exact
            continue
        (x1, y1, x2, y2), (u1, v1, u2, v2) = map(int, row_a[3:]), map(int, row_b[3:])
        with Image.open(moved / row_b[0]) as image:
            assert 0 <= u1 < u2 <= image.width and 0 <= v1 < v2 <= image.height
        inter = max(0, min(x2, u2) - max(x1, u1)) * max(0, min(y2, v2) - max(y1, v1))
        ious.append(inter / ((x2 - x1) * (y2 - y1) + (u2 - u1) * (v2 - v1) - inter))
    assert len(ious) >= 5 and 0.5 < np.median(ious) < 0.95 and max(ious) < 1


def test_refuses_unknown_nuisances_strengths_and_splits(tmp_path):
    for bad in ({"blur": 1.0}, {"clutter": -1.0}, {"occlusion": float("nan")}, {"colour_cast": True}, {"clutter": "2"}):
        with pytest.raises(InputError, match="nuisance"):
            generate_tree(tmp_path / "new", 4, progress=False, nuisance=bad)
    for bad in ((), ("dev",)):
        with pytest.raises(InputError, match="only_splits"):
            generate_tree(tmp_path / "new", 4, progress=False, only_splits=bad)
    assert not (tmp_path / "new").exists()
    assert Nuisance.from_strengths(None) == Nuisance() and Nuisance().box_jitter == 0.0


def test_each_consumer_photo_has_its_nuisances_measured(tmp_path):
    """The sidecar lists every consumer photo once (no shop photo); each measure is 0 where its
    nuisance is turned off, grows with its strength on the same photos, and the photos' own
    files do not depend on it being written."""
    default = generate_tree_at(tmp_path / "default")
    measured = synthetic.read_nuisance(default)
    bbox = read_list(default / "Anno/list_bbox_consumer2shop.txt", BBOX_HEADER, 7)
    assert sorted(measured.path) == sorted(row[0] for row in bbox if row[2] == "2")
    assert list(measured.columns) == ["path", "occluded_share", "background_contrast", "colour_cast"]
    assert (measured.occluded_share > 0).all() and (measured.occluded_share < 0.5).all()
    assert (measured.background_contrast > 0.02).all() and (measured.colour_cast > 0).all()

    off = synthetic.read_nuisance(
        generate_tree_at(tmp_path / "off", nuisance={"clutter": 0, "occlusion": 0, "colour_cast": 0})
    )
    assert (off.occluded_share == 0).all() and (off.background_contrast == 0).all() and (off.colour_cast == 0).all()
    strong = synthetic.read_nuisance(
        generate_tree_at(tmp_path / "strong", nuisance={"clutter": 2, "occlusion": 2, "colour_cast": 2})
    )
    assert (strong.path == measured.path).all()
    for column in ("occluded_share", "background_contrast", "colour_cast"):
        assert (strong[column] > measured[column]).all(), column
    assert synthetic.read_nuisance(tmp_path) is None  # a tree without the file: DeepFashion's
