"""The DeepFashion C2S reader on hand-written lists: every quirk, every error, exact counts."""

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from handmade import BBOX, EXPECTED_ALL, EXPECTED_TOPS_DRESSES_TEST, PARTITION, bbox_records, format_list, write_tree

from helpers.apps.cli import main
from helpers.core import schema
from helpers.core.errors import InputError
from helpers.data import deepfashion, sampling

BBOX_HEADER = "image_name  clothes_type  source_type  x_1  y_1  x_2  y_2"
PARTITION_HEADER = "image_pair_name_1  image_pair_name_2  item_id  evaluation_status"


def tree_digest(root: Path) -> dict:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def tree(tmp_path):
    return write_tree(tmp_path / "c2s")


def test_table_from_hand_written_lists(tree):
    table, pairs, counts = deepfashion.build_image_table(tree)
    assert len(table) == 13 and len(pairs) == 8
    assert counts["images_not_in_partition"] == 1  # comsumer_09 of id_00000002
    assert counts["items_under_two_subcategories"] == 1
    assert list(table.columns) == list(schema.TABLE_COLUMNS)
    row = table.set_index("path").loc["img/TOPS/Summer_Wear/id_00000002/comsumer_01.jpg"]
    assert (row.item_id, row.domain, row.split, row.category, row.subcategory) == (
        "id_00000002",
        "consumer",
        "train",
        "TOPS",
        "Summer_Wear",
    )
    # One item across two subcategory folders is one item.
    assert table.loc[table.item_id == "id_00000002", "subcategory"].tolist() == ["Summer_Wear", "T_Shirt"]
    assert table.groupby("split").item_id.nunique().to_dict() == {"test": 2, "train": 2, "val": 1}


def test_domain_comes_from_source_type_not_file_name(tmp_path):
    """A consumer photo whose file is named shop_09.jpg is still a consumer photo."""
    old, new = BBOX[0][0], "img/TOPS/T_Shirt/id_00000001/shop_09.jpg"
    bbox = [(new if b[0] == old else b[0], *b[1:]) for b in BBOX]
    partition = [tuple(new if v == old else v for v in row) for row in PARTITION]
    table, _, _ = deepfashion.build_image_table(write_tree(tmp_path, bbox=bbox, partition=partition))
    assert table.set_index("path").loc[new, "domain"] == "consumer"


def test_partition_roles_must_match_source_type(tmp_path):
    bbox = list(BBOX)
    name, ct, _, box, size = bbox[2]  # shop_01.jpg of id_00000001, now source_type 2 (consumer)
    bbox[2] = (name, ct, 2, box, size)
    with pytest.raises(
        InputError,
        match=r"list_eval_partition.txt:3: image .*shop_01.jpg is listed as shop here "
        r"but its source_type .* says consumer",
    ):
        deepfashion.build_image_table(write_tree(tmp_path, bbox=bbox))


def test_prepare_counts_and_clipping(tree, tmp_path):
    summary = sampling.prepare(tree, tmp_path / "out", categories=None, sample=None, progress=False)
    assert summary["splits"] == EXPECTED_ALL
    assert summary["image_check"]["clipped_boxes"] == 1
    table = schema.read_table(tmp_path / "out/images.csv")
    clipped = table.set_index("path").loc["img/TOPS/T_Shirt/id_00000001/comsumer_02.jpg"]
    assert (clipped.x_2, clipped.width, clipped.height) == (200, 200, 300)
    assert summary["table_sha256"] == hashlib.sha256((tmp_path / "out/images.csv").read_bytes()).hexdigest()


def test_prepare_categories_filter(tree, tmp_path):
    summary = sampling.prepare(tree, tmp_path / "out", categories=("TOPS", "DRESSES"), sample=None, progress=False)
    assert summary["splits"]["test"] == EXPECTED_TOPS_DRESSES_TEST
    assert summary["dropped_rows"]["other_category"] == 2
    assert summary["categories"] == {"DRESSES": 2, "TOPS": 2}


def test_prepare_never_modifies_the_data(tree, tmp_path):
    before = tree_digest(tree)
    sampling.prepare(tree, tmp_path / "out", categories=None, sample=None, progress=False)
    assert tree_digest(tree) == before


def test_prepare_refuses_to_overwrite(tree, tmp_path):
    sampling.prepare(tree, tmp_path / "out", categories=None, sample=None, progress=False)
    with pytest.raises(InputError, match="already exists"):
        sampling.prepare(tree, tmp_path / "out", categories=None, sample=None, progress=False)


def replace_record(records, index, **changes):
    fields = list(records[index])
    for position, value in changes.items():
        fields[int(position[1:])] = value
    records = list(records)
    records[index] = tuple(fields)
    return records


# (raw text builder, expected message fragment, expected line)
BBOX_ERRORS = [
    (lambda r: format_list(replace_record(r, 0, c3="1.5"), BBOX_HEADER), "x_1 must be an integer", 3),
    (lambda r: format_list(replace_record(r, 1, c3=250), BBOX_HEADER), "inverted or zero-area box", 4),
    (lambda r: format_list(replace_record(r, 2, c4=260), BBOX_HEADER), "inverted or zero-area box", 5),
    (lambda r: format_list(replace_record(r, 3, c2=3), BBOX_HEADER), "source_type must be 1", 6),
    (lambda r: format_list(replace_record(r, 3, c1=7), BBOX_HEADER), "clothes_type must be 1, 2 or 3", 6),
    (lambda r: format_list(r, BBOX_HEADER).replace(str(len(r)), str(len(r) + 1), 1), "count line says", 1),
    (lambda r: format_list(r, "image_name clothes_type x_1 y_1 x_2 y_2 source_type"), "expected header", 2),
    (lambda r: format_list(replace_record(r, 4, c0="img/TOPS/shop_01.jpg"), BBOX_HEADER), "is not img/CATEGORY", 7),
]


@pytest.mark.parametrize("make_text, message, line", BBOX_ERRORS)
def test_bbox_list_errors_name_file_and_line(tmp_path, make_text, message, line):
    root = write_tree(tmp_path, bbox_text=make_text(bbox_records()))
    with pytest.raises(InputError) as error:
        deepfashion.build_image_table(root)
    text = str(error.value)
    assert message in text and "list_bbox_consumer2shop.txt:" in text
    if line is not None:
        assert f"list_bbox_consumer2shop.txt:{line}:" in text
    assert "\n" not in text


def test_wrong_column_count_names_the_line(tmp_path):
    records = bbox_records()
    text = format_list(records, BBOX_HEADER).split("\r\n")
    text[5] = text[5] + "  99"  # line 6 gets an eighth column
    root = write_tree(tmp_path, bbox_text="\r\n".join(text))
    with pytest.raises(InputError, match=r"list_bbox_consumer2shop.txt:6: expected 7 columns, got 8"):
        deepfashion.build_image_table(root)


PARTITION_ERRORS = [
    (replace_record(PARTITION, 0, c3="training"), "evaluation_status must be train, val or test", 3),
    (replace_record(PARTITION, 1, c3="val"), "item id_00000001 is in val here but in train on line 3", 4),
    (replace_record(PARTITION, 3, c1="img/DRESSES/Lace_Dress/id_00000003/shop_07.jpg"), "is not in Anno/list_bbox", 6),
    (replace_record(PARTITION, 2, c2="id_00000003"), "does not belong to item id_00000003", 5),
]


@pytest.mark.parametrize("records, message, line", PARTITION_ERRORS)
def test_partition_errors_name_file_and_line(tmp_path, records, message, line):
    root = write_tree(tmp_path, partition_text=format_list(records, PARTITION_HEADER))
    with pytest.raises(InputError) as error:
        deepfashion.build_image_table(root)
    assert f"list_eval_partition.txt:{line}: " in str(error.value)
    assert message in str(error.value)


def test_missing_list_file(tmp_path):
    root = write_tree(tmp_path)
    (root / "Eval/list_eval_partition.txt").unlink()
    with pytest.raises(InputError, match="list_eval_partition.txt: list file not found"):
        deepfashion.build_image_table(root)


def test_landmarks_are_optional_and_validated(tree):
    header = "image_name clothes_type variation_type " + " ".join(
        f"landmark_visibility_{i} landmark_location_x_{i} landmark_location_y_{i}" for i in range(1, 9)
    )
    upper = (BBOX[0][0], 1, 4) + (0, 10, 20) * 6
    lower = (BBOX[12][0], 2, 2) + (0, 10, 20) * 4
    path = tree / deepfashion.LANDMARK_LIST
    path.write_text(format_list([upper, lower], header))
    table, _, _ = deepfashion.build_image_table(tree)
    variation = table.set_index("path").variation_type
    assert (variation[BBOX[0][0]], variation[BBOX[12][0]], variation[BBOX[2][0]]) == (4, 2, 0)
    path.write_text(format_list([upper[:-3]], header))  # 5 landmarks: not 4, 6 or 8
    with pytest.raises(InputError, match="list_landmarks_consumer2shop.txt:3: expected 15 or 21 or 27 columns"):
        deepfashion.build_image_table(tree)


def test_image_checks_exclude_count_and_list_bad_images(tree, tmp_path):
    (tree / BBOX[6][0]).unlink()  # the only consumer image of id_00000003 (val): item incomplete
    (tree / BBOX[10][0]).write_bytes(b"\xff\xd8\xff\xe0 not a jpeg")  # id_00000004 comsumer_02: corrupt
    records = replace_record(bbox_records(), 12, c5=260)  # box 60 px past a 200-px-wide image
    write_tree(tree, bbox_text=format_list(records, BBOX_HEADER))
    summary = sampling.prepare(tree, tmp_path / "out", categories=None, sample=(1, 0, 1), progress=False)
    assert summary["image_check"]["bad"] == {"missing": 0, "corrupt": 1, "box_outside": 1}
    assert summary["splits"]["test"] == {"items": 1, "consumer_images": 1, "shop_images": 1, "pairs": 1}
    bad = (tmp_path / "out/bad_images.txt").read_text().splitlines()
    assert bad == [f"{BBOX[10][0]}\tcorrupt", f"{BBOX[12][0]}\tbox_outside"]
    assert summary["dropped_rows"]["item_incomplete_after_image_check"] == 1  # shop_01 of id_00000005

    with pytest.raises(InputError, match=r"comsumer_02.jpg: corrupt \(strict image check\)"):
        sampling.prepare(tree, tmp_path / "strict", categories=None, sample=(1, 0, 1), strict=True, progress=False)


def test_missing_image_and_empty_split(tree, tmp_path):
    (tree / BBOX[6][0]).unlink()
    summary = sampling.prepare(tree, tmp_path / "a", categories=None, sample=(1, 0, 1), progress=False)
    assert summary["image_check"]["bad"]["missing"] == 0  # val was not sampled, so never checked
    with pytest.raises(InputError, match="split 'val' is empty"):
        sampling.prepare(tree, tmp_path / "b", categories=None, sample=None, progress=False)


def test_empty_after_filtering(tree, tmp_path):
    with pytest.raises(InputError, match="unknown categories SHOES"):
        sampling.prepare(tree, tmp_path / "out", categories=("SHOES",), sample=None, progress=False)
    with pytest.raises(InputError, match="split 'train' is empty"):
        sampling.prepare(tree, tmp_path / "out2", categories=("TROUSERS",), sample=None, progress=False)


def test_cli_prepare_exit_codes(tree, tmp_path, capsys):
    assert (
        main(
            [
                "prepare",
                "--data-root",
                str(tree),
                "--out",
                str(tmp_path / "ok"),
                "--categories",
                "all",
                "--sample",
                "all",
                "--quiet",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "ok/summary.json").read_text())["splits"] == EXPECTED_ALL
    broken = write_tree(
        tmp_path / "broken", partition_text=format_list(replace_record(PARTITION, 4, c3="tset"), PARTITION_HEADER)
    )
    capsys.readouterr()
    assert main(["prepare", "--data-root", str(broken), "--out", str(tmp_path / "bad"), "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "list_eval_partition.txt:7: evaluation_status" in err
    assert len(err.splitlines()) == 1
    assert main(["prepare", "--data-root", str(tmp_path / "nowhere"), "--out", str(tmp_path / "x")]) == 2


def test_cli_is_a_real_process_with_nonzero_exit(tmp_path):
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "helpers",
            "prepare",
            "--data-root",
            str(tmp_path / "none"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: {tmp_path / 'none'}: data root not found"


def test_read_table_checks_columns(tmp_path):
    pd.DataFrame({"path": ["a"], "item_id": ["id_1"]}).to_csv(tmp_path / "t.csv", index=False)
    with pytest.raises(InputError, match=r"t.csv:1: missing columns domain,split"):
        schema.read_table(tmp_path / "t.csv")


def test_partition_without_records_is_named(tmp_path):
    empty = write_tree(tmp_path / "empty", partition_text=format_list([], PARTITION_HEADER))
    with pytest.raises(InputError, match=r"list_eval_partition.txt: no pair records"):
        sampling.prepare(empty, tmp_path / "out", progress=False)
