"""Item-level sampling and re-splitting: determinism, disjointness, exact counts."""

import numpy as np
import pandas as pd
import pytest
from handmade import write_tree

from helpers.core import schema
from helpers.core.errors import InputError
from helpers.data import sampling


def make_table(n_items=200, seed=0) -> pd.DataFrame:
    """Items with 1–4 consumer and 1–2 shop images; every 10th item has no shop image."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        item = f"id_{i:08d}"
        split = ("train", "train", "val", "test")[i % 4]
        category = ("TOPS", "DRESSES", "TROUSERS")[i % 3]
        n_shop = 0 if i % 10 == 9 else int(rng.integers(1, 3))
        for domain, count in (("consumer", int(rng.integers(1, 5))), ("shop", n_shop)):
            for j in range(count):
                name = "comsumer" if domain == "consumer" else "shop"
                rows.append(
                    {
                        "path": f"img/{category}/Sub/{item}/{name}_{j + 1:02d}.jpg",
                        "item_id": item,
                        "domain": domain,
                        "split": split,
                        "category": category,
                        "subcategory": "Sub",
                        "clothes_type": 1,
                        "x_1": 0,
                        "y_1": 0,
                        "x_2": 10,
                        "y_2": 10,
                        "width": 10,
                        "height": 10,
                        "variation_type": 0,
                    }
                )
    return pd.DataFrame(rows)


def test_sample_fractions_by_item_and_seed():
    table = make_table()
    selected, dropped = sampling.select_items(table, categories=None, sample=(0.1, 0.2, 0.5), seed=42)
    # 100/50/50 items; items 9, 19, ..., 199 lack a shop image and alternate train / test
    per_split_eligible = {"train": 90, "val": 50, "test": 40}
    counts = selected.groupby("split").item_id.nunique().to_dict()
    assert counts == {s: round(f * per_split_eligible[s]) for s, f in zip(("train", "val", "test"), (0.1, 0.2, 0.5))}
    assert dropped["items_lacking_consumer_or_shop"] == 20
    again, _ = sampling.select_items(table, categories=None, sample=(0.1, 0.2, 0.5), seed=42)
    assert sampling.table_bytes(again) == sampling.table_bytes(selected)
    other, _ = sampling.select_items(table, categories=None, sample=(0.1, 0.2, 0.5), seed=7)
    assert set(other.item_id) != set(selected.item_id)
    # whole items: every image of a chosen item is kept
    chosen = set(selected.item_id)
    assert len(selected) == table.loc[table.item_id.isin(chosen)].shape[0]


def test_every_kept_item_has_both_domains_and_one_split():
    selected, _ = sampling.select_items(make_table(), categories=("TOPS", "DRESSES"), sample=None)
    assert (selected.groupby("item_id").domain.nunique() == 2).all()
    assert (selected.groupby("item_id").split.nunique() == 1).all()
    assert set(selected.category) == {"TOPS", "DRESSES"}


def test_resplit_ratio_and_disjointness():
    table = make_table()
    selected, _ = sampling.select_items(table, categories=None, sample=None, resplit=(8, 1, 1), seed=3)
    items = selected.groupby("split").item_id.unique()
    assert {s: len(v) for s, v in items.items()} == {"train": 144, "val": 18, "test": 18}  # 180 eligible
    assert not (
        set(items["train"]) & set(items["val"])
        or set(items["train"]) & set(items["test"])
        or set(items["val"]) & set(items["test"])
    )
    assert (selected.groupby("item_id").split.nunique() == 1).all()


def test_sample_and_resplit_are_exclusive():
    with pytest.raises(InputError, match="either --sample or --resplit"):
        sampling.select_items(make_table(), sample=(1, 1, 1), resplit=(8, 1, 1))


@pytest.mark.parametrize(
    "text, name, message",
    [
        ("0.1,0.2", "--sample", "three non-negative"),
        ("a,b,c", "--resplit", "three comma-separated numbers"),
        ("2,1,1", "--sample", "at most 1"),
    ],
)
def test_fraction_parsing_errors(text, name, message):
    with pytest.raises(InputError, match=message):
        sampling.parse_fractions(text, name)


def test_fraction_parsing():
    assert sampling.parse_fractions("all", "--sample") == (1.0, 1.0, 1.0)
    assert sampling.parse_fractions("8,1,1", "--resplit") == (8.0, 1.0, 1.0)
    assert sampling.parse_categories("all") is None
    assert sampling.parse_categories("tops, Dresses") == ("TOPS", "DRESSES")


def test_prepare_is_byte_identical(tmp_path):
    tree = write_tree(tmp_path / "c2s")
    for out in ("a", "b"):
        sampling.prepare(tree, tmp_path / out, categories=None, sample=(0.5, 1, 1), seed=5, progress=False)
    assert (tmp_path / "a/images.csv").read_bytes() == (tmp_path / "b/images.csv").read_bytes()
    summary = (tmp_path / "a/summary.json").read_text()
    assert summary.replace(str(tmp_path / "a"), "") == (tmp_path / "b/summary.json").read_text().replace(
        str(tmp_path / "b"), ""
    )


def test_read_table_names_the_bad_line(tmp_path):
    table = make_table(4)
    table.loc[2, "split"] = "training"
    table.to_csv(tmp_path / "images.csv", index=False)
    with pytest.raises(InputError, match=r"images.csv:4: empty field, or domain/split"):
        schema.read_table(tmp_path / "images.csv")
    (tmp_path / "empty.csv").write_text("")
    with pytest.raises(InputError, match="empty.csv: not an image table"):
        schema.read_table(tmp_path / "empty.csv")


@pytest.mark.parametrize("text", ["nan,1,1", "inf,1,1"])
def test_fractions_must_be_finite(text):
    with pytest.raises(InputError, match="three non-negative"):
        sampling.parse_fractions(text, "--resplit")


def test_stop_items_split_the_val_queries_and_share_the_val_gallery():
    items = (("t1", "train"), ("v1", "val"), ("v2", "val"), ("v3", "val"), ("e1", "test"))
    table = pd.DataFrame([{"item_id": i, "split": s, "domain": d} for i, s in items for d in ("consumer", "shop")])
    stop, compare = sampling.split_stop_items(table, 1, seed=0)
    val_queries = [set(t.query("split == 'val' and domain == 'consumer'").item_id) for t in (stop, compare)]
    assert len(val_queries[0]) == 1 and len(val_queries[1]) == 2 and not val_queries[0] & val_queries[1]
    for part in (stop, compare):  # the whole val gallery, train and test in both
        assert set(part.query("split == 'val' and domain == 'shop'").item_id) == {"v1", "v2", "v3"}
        assert set(part.query("split != 'val'").item_id) == {"t1", "e1"}
    assert sampling.split_stop_items(table, 1, seed=0)[0].equals(stop)  # a function of the seed
    with pytest.raises(InputError, match="stop_items must be between 1 and 2 \\(val has 3 items\\), got 3"):
        sampling.split_stop_items(table, 3, seed=0)
