"""Failure analysis (helpers.evaluation.failures) on hand-made tables: no model, no training."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import pytest
from PIL import Image

from helpers.core.errors import InputError
from helpers.evaluation import failures, metrics

# item, category, consumer photos, (consumer box on a 200 x 100 image): boxes chosen so the
# area shares are easy to state by hand.
ITEMS = [
    ("i0", "TOPS", 3, (0, 0, 100, 100)),  # half the image: share 0.5, aspect 1.0
    ("i1", "TOPS", 1, (0, 0, 200, 100)),  # the whole image: share 1.0, aspect 0.5
    ("i2", "DRESSES", 2, (50, 0, 100, 100)),  # share 0.25, aspect 2.0
    ("i3", "DRESSES", 4, (0, 0, 40, 50)),  # share 0.1, aspect 1.25
    ("i4", "TROUSERS", 1, (10, 10, 211, 110)),  # overshoots by 1 px: clipped, share 0.95 * 0.9
]
W, H = 200, 100


def make_table(with_size: bool = True) -> pd.DataFrame:
    rows = []
    for item, category, n_consumer, box in ITEMS:
        for j in range(n_consumer):
            rows.append((f"img/{item}/comsumer_{j + 1:02d}.jpg", item, "consumer", "test", category, *box))
        rows.append((f"img/{item}/shop_01.jpg", item, "shop", "test", category, 20, 10, 180, 90))
    table = pd.DataFrame(rows, columns=["path", "item_id", "domain", "split", "category", "x_1", "y_1", "x_2", "y_2"])
    if with_size:
        table["width"], table["height"] = W, H
    return table


def make_ranks(table: pd.DataFrame, ranks: dict[str, int] | None = None) -> pd.DataFrame:
    """A ranks_table-like frame of every consumer photo, 0-based first-hit ranks given by path
    (default: the photo's index within its item, so 0, 1, 2, ...)."""
    queries = table[table.domain == "consumer"]
    default = queries.path.str.extract(r"comsumer_(\d+)")[0].astype(int) - 1
    rank = [ranks[p] if ranks and p in ranks else int(d) for p, d in zip(queries.path, default)]
    return pd.DataFrame(
        {"path": queries.path.to_numpy(), "item_id": queries.item_id.to_numpy(), "first_hit_rank": rank}
    ).assign(average_precision=0.5)


def write_images(root, table: pd.DataFrame) -> None:
    for path in table.path:
        file = root / path
        file.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (W, H), (120, 90, 60)).save(file)


# ----------------------------------------------------------------------------------------
# failure_table
# ----------------------------------------------------------------------------------------


def test_failure_table_joins_by_path_with_geometry_and_hits():
    table = make_table()
    ranks = make_ranks(table).iloc[::-1].reset_index(drop=True)  # any order: kept
    out = failures.failure_table(ranks, table, ks=(1, 2))
    assert list(out.path) == list(ranks.path)
    category = {item: c for item, c, _, _ in ITEMS}
    expected_share = {"i0": 0.5, "i1": 1.0, "i2": 0.25, "i3": 0.1, "i4": 0.95 * 0.9}
    expected_aspect = {"i0": 1.0, "i1": 0.5, "i2": 2.0, "i3": 1.25, "i4": 100 / 201}
    for row in out.itertuples():
        assert row.box_area_share == pytest.approx(expected_share[row.item_id])
        assert row.box_aspect == pytest.approx(expected_aspect[row.item_id])
        assert row.category == category[row.item_id]
    by_path = out.set_index("path")
    # ranks 0, 1, 2, 3 by photo number: hit@1 only for photo 1, hit@2 for photos 1 and 2
    assert by_path.loc["img/i3/comsumer_01.jpg", ["hit@1", "hit@2"]].tolist() == [True, True]
    assert by_path.loc["img/i3/comsumer_02.jpg", ["hit@1", "hit@2"]].tolist() == [False, True]
    assert by_path.loc["img/i3/comsumer_03.jpg", ["hit@1", "hit@2"]].tolist() == [False, False]
    assert (out.average_precision == 0.5).all()


def test_failure_table_takes_final_per_query_ranks_one_based():
    table = make_table()
    zero = make_ranks(table)
    one = zero.drop(columns="first_hit_rank").assign(rank_of_first_hit=zero.first_hit_rank + 1)
    pd.testing.assert_frame_equal(failures.failure_table(one, table), failures.failure_table(zero, table))


def test_a_query_missing_from_the_table_is_a_one_line_input_error():
    table = make_table()
    ranks = make_ranks(table)
    ranks.loc[2, "path"] = "img/nowhere/comsumer_07.jpg"
    with pytest.raises(InputError) as error:
        failures.failure_table(ranks, table)
    message = str(error.value)
    assert "img/nowhere/comsumer_07.jpg" in message and "\n" not in message
    assert "1 of 11" in message


def test_a_query_of_another_item_in_the_table_is_an_input_error():
    table = make_table()
    ranks = make_ranks(table)
    ranks.loc[0, "item_id"] = "i9"
    with pytest.raises(InputError, match="i9"):
        failures.failure_table(ranks, table)


def test_image_sizes_come_from_the_headers_when_the_table_lacks_them(tmp_path):
    table = make_table(with_size=False)
    ranks = make_ranks(table)
    with pytest.raises(InputError, match="data_root"):
        failures.failure_table(ranks, table)
    write_images(tmp_path, table)
    read = failures.failure_table(ranks, table, data_root=tmp_path)
    pd.testing.assert_frame_equal(read, failures.failure_table(ranks, make_table()))


def test_it_reads_the_ranks_table_of_a_real_retrieval():
    """ranks_table -> failure_table on toy embeddings: one row per scored query, same hits."""
    table = make_table()
    queries, gallery = metrics.protocol_sets(table, "test", "split")
    rng = np.random.default_rng(0)
    emb = rng.normal(size=(len(table), 8)).astype(np.float32)
    result = metrics.retrieval_metrics(
        emb[queries.index], queries.item_id.to_numpy(), emb[gallery.index], gallery.item_id.to_numpy()
    )
    out = failures.failure_table(metrics.ranks_table(queries, result), table, ks=(1, 5))
    assert len(out) == result.n_queries
    assert out["hit@1"].mean() == pytest.approx(result.recall[1])
    assert out["hit@5"].mean() == pytest.approx(result.recall[5])


# ----------------------------------------------------------------------------------------
# recall_by
# ----------------------------------------------------------------------------------------


def _random_failures(seed: int = 3, n_items: int = 40) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n_items):
        category = ("TOPS", "DRESSES", "TROUSERS")[i % 3]
        for j in range(int(rng.integers(1, 6))):
            rows.append((f"img/{i}/{j}.jpg", f"item{i:02d}", category, int(rng.integers(0, 12)), rng.uniform(0.05, 1)))
    return pd.DataFrame(rows, columns=["path", "item_id", "category", "first_hit_rank", "box_area_share"])


def test_recall_by_category_equals_a_brute_force_loop():
    frame = _random_failures()
    summary = failures.recall_by(frame, "category", k=5, n_boot=200)
    assert list(summary.index) == sorted(frame.category.unique())
    for category in frame.category.unique():
        hits, items, n = 0, set(), 0
        for row in frame.itertuples():
            if row.category == category:
                hits += row.first_hit_rank < 5
                items.add(row.item_id)
                n += 1
        assert summary.loc[category, "recall@5"] == pytest.approx(hits / n)
        assert summary.loc[category, "n_queries"] == n
        assert summary.loc[category, "n_items"] == len(items)
        assert summary.loc[category, "low"] <= hits / n <= summary.loc[category, "high"]
    assert summary.n_queries.sum() == len(frame)


def test_the_interval_resamples_items_as_an_explicit_loop_does():
    """The same rng, drawn item by item (items in order of first appearance in the group), each
    drawn item bringing all its queries of the group: the interval matches exactly."""
    frame = _random_failures()
    n_boot, seed, k = 300, 7, 3
    summary = failures.recall_by(frame, "category", k=k, n_boot=n_boot, seed=seed)
    for category, group in frame.groupby("category"):
        items = list(dict.fromkeys(group.item_id))
        hits = {item: (group[group.item_id == item].first_hit_rank < k).sum() for item in items}
        counts = {item: (group.item_id == item).sum() for item in items}
        rng = np.random.default_rng(seed)
        means = []
        for _ in range(n_boot):
            drawn = [items[i] for i in rng.integers(0, len(items), size=len(items))]
            means.append(sum(hits[d] for d in drawn) / sum(counts[d] for d in drawn))
        low, high = np.quantile(means, [0.025, 0.975])
        assert summary.loc[category, "low"] == pytest.approx(low)
        assert summary.loc[category, "high"] == pytest.approx(high)


def test_an_item_with_many_queries_moves_together():
    """Item a: 9 queries, all hits; item b: 1 query, a miss. Over items a replicate is 1 (a, a),
    0.9 (a, b) or 0 (b, b, a quarter of the draws): the interval reaches 0. Over queries it
    would stay near 0.9."""
    frame = pd.DataFrame(
        {
            "path": [f"q{i}" for i in range(10)],
            "item_id": ["a"] * 9 + ["b"],
            "group": "g",
            "first_hit_rank": [0] * 9 + [50],
        }
    )
    summary = failures.recall_by(frame, "group", k=1, n_boot=2000)
    assert summary.loc["g", "recall@1"] == pytest.approx(0.9)
    assert (summary.loc["g", "low"], summary.loc["g", "high"]) == (0.0, 1.0)
    by_query = metrics.bootstrap_ci((frame.first_hit_rank < 1).astype(float), n_boot=2000)
    assert by_query[0] > 0.5


def test_quantile_bins_cover_every_query_in_ascending_order():
    frame = _random_failures()
    summary = failures.recall_by(frame, "box_area_share", bins=4, n_boot=100)
    assert len(summary) == 4
    assert summary.n_queries.sum() == len(frame)
    labels = failures.group_labels(frame, "box_area_share", bins=4)
    assert labels.notna().all()
    lows = [float(label.split("–")[0]) for label in summary.index]
    assert lows == sorted(lows)
    assert lows[0] == pytest.approx(frame.box_area_share.min(), rel=1e-2)
    # every query sits in the bin whose edges hold it
    for value, label in zip(frame.box_area_share, labels):
        low, high = (float(x) for x in label.split("–"))
        assert low * (1 - 1e-2) <= value <= high * (1 + 1e-2)


def test_tied_values_make_fewer_quantile_bins_not_lost_queries():
    frame = _random_failures()
    frame["box_area_share"] = np.where(np.arange(len(frame)) % 2, 0.5, 0.25)
    summary = failures.recall_by(frame, "box_area_share", bins=4, n_boot=50)
    assert summary.n_queries.sum() == len(frame)
    assert len(summary) <= 2
    frame["box_area_share"] = 0.25  # all tied: one group, not a query lost
    summary = failures.recall_by(frame, "box_area_share", bins=4, n_boot=50)
    assert list(summary.index) == ["0.25"] and summary.n_queries.sum() == len(frame)


def test_explicit_bin_edges_must_cover_the_queries():
    frame = _random_failures()
    summary = failures.recall_by(frame, "box_area_share", bins=[0.0, 0.5, 1.0], n_boot=50)
    assert list(summary.index) == ["0–0.5", "0.5–1"]
    assert summary.n_queries.sum() == len(frame)
    with pytest.raises(InputError, match="outside the bins"):
        failures.recall_by(frame, "box_area_share", bins=[0.3, 1.0])
    with pytest.raises(InputError, match="increasing"):
        failures.recall_by(frame, "box_area_share", bins=[0.5, 0.2])


def test_groups_with_few_items_are_flagged():
    frame = _random_failures(n_items=40)  # categories hold 14, 13, 13 items
    summary = failures.recall_by(frame, "category", n_boot=50, min_items=14)
    assert summary.few_items.to_dict() == {"DRESSES": True, "TOPS": False, "TROUSERS": True}
    assert summary.n_items.to_dict() == {"DRESSES": 13, "TOPS": 14, "TROUSERS": 13}


def test_recall_by_names_a_missing_column():
    with pytest.raises(InputError, match="nuisance"):
        failures.recall_by(_random_failures(), "nuisance")


# ----------------------------------------------------------------------------------------
# Worst queries and figures
# ----------------------------------------------------------------------------------------


def test_worst_queries_are_chosen_by_rank_one_per_item():
    table = make_table()
    out = failures.failure_table(make_ranks(table), table)
    worst = failures.worst_queries(out, n=3)
    assert list(worst.path) == ["img/i3/comsumer_04.jpg", "img/i0/comsumer_03.jpg", "img/i2/comsumer_02.jpg"]
    assert len(failures.worst_queries(out, n=3, one_per_item=False).item_id.unique()) == 2  # i3's 4, 3; i0's 3


def test_plot_recall_by_draws_one_row_per_group():
    frame = _random_failures()
    summary = failures.recall_by(frame, "category", n_boot=50, min_items=14)
    fig = failures.plot_recall_by(summary, overall=0.4)
    assert isinstance(fig, plt.Figure)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(summary.index)
    assert "Recall@5" in ax.get_xlabel()
    plt.close(fig)


def test_measured_nuisances_join_by_path_and_group_like_any_column():
    table = make_table()
    out = failures.failure_table(make_ranks(table), table)
    queries = list(out.path)
    measured = pd.DataFrame(
        {
            "path": queries[::-1] + ["img/other/comsumer_01.jpg"],  # any order; photos not queried are ignored
            "occluded_share": [0.01 * i for i in range(len(queries))][::-1] + [0.9],
            "background_contrast": 0.2,
            "colour_cast": 0.3,
        }
    )
    joined = failures.join_measured(out, measured)
    assert joined.occluded_share.tolist() == pytest.approx([0.01 * i for i in range(len(queries))])
    assert (joined.background_contrast == 0.2).all() and list(joined.path) == queries

    groups = failures.recall_by_groups(joined, n_boot=50)
    assert list(groups) == ["category", "box_area", "occlusion", "clutter", "colour_cast"]
    assert groups["occlusion"].n_queries.sum() == len(queries) and len(groups["occlusion"]) == 4
    pd.testing.assert_frame_equal(groups["category"], failures.recall_by(joined, "category", n_boot=50))
    assert list(failures.recall_by_groups(out, n_boot=50)) == ["category", "box_area"]  # nothing measured: DeepFashion

    with pytest.raises(InputError, match=r"query 'img/i1/comsumer_01.jpg' has no measured nuisances \(1 of 11"):
        failures.join_measured(out, measured[measured.path != "img/i1/comsumer_01.jpg"])


def test_plot_recall_by_groups_draws_a_panel_per_table_and_hides_the_rest():
    frame = _random_failures()
    summary = failures.recall_by(frame, "category", n_boot=50)
    fig = failures.plot_recall_by_groups({"by a": summary, "by b": summary, "by c": summary}, overall=0.4, ncols=2)
    shown = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in shown] == ["by a", "by b", "by c"] and len(fig.axes) == 4
    plt.close(fig)


def test_plot_failures_shows_query_true_shop_and_wrong_top1(tmp_path):
    table = make_table()
    write_images(tmp_path, table)
    out = failures.failure_table(make_ranks(table), table)
    worst = failures.worst_queries(out, n=2)
    hits = [[{"rank": 1, "path": "img/i1/shop_01.jpg", "item_id": "i1", "score": 0.8}], "img/i2/shop_01.jpg"]
    fig = failures.plot_failures(worst, table, tmp_path, hits)
    assert len(fig.axes) == 6
    titles = [ax.get_title() for ax in fig.axes]
    assert titles[0].startswith("query i3") and "rank 4" in titles[0]
    assert "shop photo" in titles[1]
    assert titles[2] == "top-1 i1 0.800" and fig.axes[2].title.get_color() == "tab:red"
    assert titles[5] == "top-1 i2"  # i0's query, i2's shop photo: the item is read from the table
    plt.close(fig)
    by_path = dict(zip(worst.path, ["img/i3/shop_01.jpg", "img/i1/shop_01.jpg"]))
    fig = failures.plot_failures(worst, table, tmp_path, by_path)
    assert fig.axes[2].title.get_color() == "tab:green"  # i3's own shop photo came first
    plt.close(fig)
    with pytest.raises(InputError, match="no top-1"):
        failures.plot_failures(worst, table, tmp_path, {})
