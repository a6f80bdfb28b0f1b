"""Recall@K / mAP against a plain brute-force loop, bootstrap intervals, and the protocols."""

from __future__ import annotations

import doctest
import json

import numpy as np
import pandas as pd
import pytest

import helpers.evaluation.metrics as metrics
from helpers.core.errors import InputError
from helpers.evaluation.metrics import bootstrap_ci, evaluate_protocol, protocol_sets, recall_at_k, retrieval_metrics


def brute_force_metrics(query, query_labels, gallery, gallery_labels, ks):
    """The definitions, written out one query at a time over the full ranking.

    Ranking: score descending, equal scores by lower gallery position (a stable sort).
    Returns per-query (first-hit rank, AP) of the evaluated queries, the excluded count and
    Recall@K.
    """
    first_hits, aps, evaluated, excluded = [], [], [], 0
    for qi in range(len(query)):
        scores = [
            float(np.dot(query[qi].astype(np.float64), gallery[j].astype(np.float64))) for j in range(len(gallery))
        ]
        ranking = sorted(range(len(gallery)), key=lambda j: (-scores[j], j))
        relevant_ranks = [pos for pos, j in enumerate(ranking) if gallery_labels[j] == query_labels[qi]]
        if not relevant_ranks:
            excluded += 1
            continue
        evaluated.append(qi)
        first_hits.append(relevant_ranks[0])
        precisions = [(i + 1) / (rank + 1) for i, rank in enumerate(relevant_ranks)]
        aps.append(sum(precisions) / len(precisions))
    recall = {k: sum(1 for r in first_hits if r < k) / len(first_hits) for k in ks}
    return np.array(evaluated), np.array(first_hits), np.array(aps), excluded, recall


def integer_data(seed, n_query, n_gallery, dim, n_items, value_range=3):
    """Small-integer embeddings: float32 dot products are exact (no rounding differences
    between chunked and brute-force scores) and ties occur, which exercises the tie rule."""
    rng = np.random.default_rng(seed)
    query = rng.integers(-value_range, value_range + 1, size=(n_query, dim)).astype(np.float32)
    gallery = rng.integers(-value_range, value_range + 1, size=(n_gallery, dim)).astype(np.float32)
    # String item ids with repeats; the query pool has a few items absent from the gallery.
    gallery_labels = np.array([f"id_{i:08d}" for i in rng.integers(0, n_items, n_gallery)])
    query_labels = np.array([f"id_{i:08d}" for i in rng.integers(0, n_items + 3, n_query)])
    return query, query_labels, gallery, gallery_labels


# value_range 1 gives many exact ties; tiny budgets force one-row chunks and tiny slices.
@pytest.mark.parametrize("seed,value_range,budget", [(0, 3, 256), (1, 1, 256), (2, 3, 0.001), (3, 10, 0.0005)])
def test_metrics_match_brute_force_loop(seed, value_range, budget):
    ks = (1, 5, 10, 20)
    query, ql, gallery, gl = integer_data(seed, n_query=60, n_gallery=150, dim=6, n_items=25, value_range=value_range)
    evaluated, first_hits, aps, excluded, recall = brute_force_metrics(query, ql, gallery, gl, ks)
    res = retrieval_metrics(query, ql, gallery, gl, ks=ks, memory_budget_mb=budget)
    np.testing.assert_array_equal(res.query_index, evaluated)
    np.testing.assert_array_equal(res.first_hit_rank, first_hits)
    np.testing.assert_allclose(res.average_precision, aps, rtol=1e-12)
    assert res.n_excluded_queries == excluded > 0
    assert res.n_queries == len(evaluated)
    assert res.n_gallery == 150
    assert res.recall == pytest.approx(recall)
    assert res.map == pytest.approx(float(np.mean(aps)))


@pytest.mark.parametrize("seed,budget", [(0, 256), (1, 0.0005)])
def test_score_metrics_is_the_same_ranking_as_retrieval_metrics(seed, budget):
    query, ql, gallery, gl = integer_data(seed, n_query=60, n_gallery=150, dim=6, n_items=25, value_range=1)
    scores = query.astype(np.float64) @ gallery.T.astype(np.float64)  # float64, many exact ties
    evaluated, first_hits, aps, excluded, recall = brute_force_metrics(query, ql, gallery, gl, (1, 5))
    res = metrics.score_metrics(scores, ql, gl, ks=(1, 5), memory_budget_mb=budget)
    np.testing.assert_array_equal(res.query_index, evaluated)
    np.testing.assert_array_equal(res.first_hit_rank, first_hits)
    np.testing.assert_allclose(res.average_precision, aps, rtol=1e-12)
    assert res.n_excluded_queries == excluded and res.recall == pytest.approx(recall)
    # retrieval_metrics with a scorer goes through score_metrics: the same result
    scored = retrieval_metrics(query, ql, gallery, gl, ks=(1, 5), scorer=lambda q, g: q @ g.T)
    plain = retrieval_metrics(query, ql, gallery, gl, ks=(1, 5))
    for result in (scored, plain):
        np.testing.assert_array_equal(result.first_hit_rank, first_hits)
        np.testing.assert_allclose(result.average_precision, aps, rtol=1e-12)


def test_score_metrics_input_errors():
    with pytest.raises(InputError, match="matrix"):
        metrics.score_metrics(np.zeros(3), ["a"], ["a", "b", "c"])
    with pytest.raises(InputError, match="2 gallery labels for 3 gallery rows"):
        metrics.score_metrics(np.zeros((1, 3)), ["a"], ["a", "b"])
    with pytest.raises(InputError, match="NaN"):
        metrics.score_metrics(np.array([[0.1, np.nan]]), ["a"], ["a", "b"])


def test_metrics_accept_int_labels_and_float_data():
    rng = np.random.default_rng(5)
    query = rng.standard_normal((20, 8)).astype(np.float32)
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    gl, ql = rng.integers(0, 10, 50), rng.integers(0, 10, 20)
    # Scores rounded to a 1/8 grid stay exact in float32: compare with the loop again.
    query, gallery = np.round(query * 2) / 2, np.round(gallery * 2) / 2
    evaluated, first_hits, aps, excluded, _ = brute_force_metrics(query, ql, gallery, gl, (1,))
    res = retrieval_metrics(query, ql, gallery, gl)
    np.testing.assert_array_equal(res.first_hit_rank, first_hits)
    np.testing.assert_allclose(res.average_precision, aps)
    assert res.n_excluded_queries == excluded


def test_excluded_queries_are_counted_not_scored():
    gallery = np.eye(3, dtype=np.float32)
    query = np.eye(3, dtype=np.float32)
    res = retrieval_metrics(query, ["a", "zz", "c"], gallery, ["a", "b", "c"], ks=(1,))
    assert res.n_excluded_queries == 1 and res.n_queries == 2
    assert res.recall == {1: 1.0} and res.map == 1.0
    np.testing.assert_array_equal(res.query_index, [0, 2])


def test_metric_input_errors():
    x = np.zeros((2, 3), np.float32)
    with pytest.raises(InputError, match="labels"):
        retrieval_metrics(x, ["a"], x, ["a", "b"])
    with pytest.raises(InputError, match="ks"):
        retrieval_metrics(x, ["a", "b"], x, ["a", "b"], ks=(0,))


def test_doctests_of_metrics_pass():
    result = doctest.testmod(metrics)
    assert result.attempted > 0 and result.failed == 0


def test_recall_at_k_is_zero_based_cmc():
    assert recall_at_k(np.array([0, 0, 4]), ks=(1, 5)) == {1: pytest.approx(2 / 3), 5: 1.0}


# ----------------------------------------------------------------------------------------
# Bootstrap
# ----------------------------------------------------------------------------------------


def test_bootstrap_ci_is_seeded_and_contains_the_estimate():
    values = np.random.default_rng(0).integers(0, 2, 300).astype(float)
    low, high = bootstrap_ci(values, n_boot=500, seed=7)
    assert (low, high) == bootstrap_ci(values, n_boot=500, seed=7)
    assert (low, high) != bootstrap_ci(values, n_boot=500, seed=8)
    assert low <= values.mean() <= high
    assert 0.0 < high - low < 0.2
    assert bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def _item_bootstrap_loop(values: np.ndarray, items: list, n_boot: int, seed: int) -> np.ndarray:
    """The item bootstrap written out: draw items with the seeded generator (one draw matrix, as
    the vectorised code draws a batch), then add up each drawn item's queries one by one."""
    order = list(dict.fromkeys(items))  # items numbered in order of first appearance
    members = {item: [i for i, it in enumerate(items) if it == item] for item in order}
    draws = np.random.default_rng(seed).integers(0, len(order), size=(n_boot, len(order)))
    means = np.empty((n_boot, values.shape[1]))
    for b, drawn in enumerate(draws):
        for j in range(values.shape[1]):
            total, count = 0.0, 0
            for code in drawn:
                for i in members[order[code]]:
                    total += values[i, j]
                    count += 1
            means[b, j] = total / count
    return means


def test_item_bootstrap_equals_the_explicit_loop():
    rng = np.random.default_rng(3)
    items = [f"item{i}" for i in rng.integers(0, 12, 40)]  # 1 to several queries per item, shuffled
    values = np.column_stack([rng.integers(0, 2, 40), rng.random(40)]).astype(np.float64)
    got = metrics._bootstrap_means(values, 300, 5, items)
    np.testing.assert_allclose(got, _item_bootstrap_loop(values, items, 300, 5), rtol=1e-12)
    low, high = np.quantile(got[:, 0], [0.025, 0.975])
    assert bootstrap_ci(values[:, 0], n_boot=300, seed=5, items=items) == (low, high)


def test_item_bootstrap_by_hand():
    # Item A: three hits, item B: one miss. Drawing two items gives {A, A} = 6/6, {A, B} = 3/4 or
    # {B, B} = 0/2, with chances 1/4, 1/2, 1/4; queries drawn one by one could give 1/4 or 2/4 too.
    values, items = np.array([[1.0], [1.0], [1.0], [0.0]]), ["A", "A", "A", "B"]
    means = metrics._bootstrap_means(values, 4000, 0, items)[:, 0]
    assert set(np.unique(means)) == {0.0, 0.75, 1.0}
    assert [np.mean(means == m) for m in (0.0, 0.75, 1.0)] == pytest.approx([0.25, 0.5, 0.25], abs=0.03)
    # One item: every replicate is the whole set. One query per item: the per-query bootstrap.
    assert bootstrap_ci([1.0, 0.0, 1.0, 1.0], items=["A"] * 4) == (0.75, 0.75)
    spread = np.random.default_rng(1).random(50)
    assert bootstrap_ci(spread, seed=4, items=np.arange(50)) == bootstrap_ci(spread, seed=4)
    with pytest.raises(InputError, match="item labels"):
        bootstrap_ci(spread, items=["A"])


def correlated_table(n_items: int = 60, per_item: int = 5, seed: int = 0) -> tuple[pd.DataFrame, np.ndarray]:
    """Each item: one test shop photo and ``per_item`` consumer photos that all find it or all
    miss it (the item's queries are copies of one vector: perfectly correlated)."""
    rng = np.random.default_rng(seed)
    rows, vectors = [], []
    shop = rng.normal(size=(n_items, 16))
    for i in range(n_items):
        rows.append((f"s{i}", f"I{i}", "shop", "test", "TOPS"))
        vectors.append(shop[i])
        query = shop[i] if rng.random() < 0.5 else shop[(i + 1) % n_items]
        for j in range(per_item):
            rows.append((f"c{i}_{j}", f"I{i}", "consumer", "test", "TOPS"))
            vectors.append(query)
    table = pd.DataFrame(rows, columns=["path", "item_id", "domain", "split", "category"])
    return table, np.asarray(vectors, dtype=np.float32)


def test_item_intervals_are_wider_than_per_query_ones_on_correlated_queries():
    table, embeddings = correlated_table()
    by_item = evaluate_protocol(table, embeddings, n_boot=500, seed=2)
    by_query = evaluate_protocol(table, embeddings, n_boot=500, seed=2, interval="queries")
    assert by_item["ci"] == "percentile bootstrap over items (all queries of an item together), 95%, n_boot=500, seed=2"
    assert by_query["ci"] == "percentile bootstrap over queries, 95%, n_boot=500, seed=2"
    assert by_item["recall@1"] == by_query["recall@1"]  # the same estimates, other intervals
    for name in ("recall@1", "map"):
        item_width = np.diff(by_item[f"{name}_ci"])[0]
        query_width = np.diff(by_query[f"{name}_ci"])[0]
        assert item_width > 1.5 * query_width  # 5 copies per item: about sqrt(5) = 2.2 times wider
    with pytest.raises(InputError, match="unknown interval 'pairs'; choose one of: items, queries"):
        evaluate_protocol(table, embeddings, interval="pairs")


# ----------------------------------------------------------------------------------------
# Protocols on a hand-made table
# ----------------------------------------------------------------------------------------


def hand_table() -> pd.DataFrame:
    """Six items; the comments give what each protocol must pick.

    A (test): 2 consumer, 3 shop      B (test): 1 consumer, 1 shop (its row listed twice)
    C (test): 1 consumer, no shop     D (val):  1 consumer, 2 shop
    E (train): 1 consumer, 1 shop     F (test): no consumer, 1 shop
    """
    rows = [
        ("a_c1", "A", "consumer", "test", "TOPS"),
        ("a_c2", "A", "consumer", "test", "TOPS"),
        ("a_s1", "A", "shop", "test", "TOPS"),
        ("a_s2", "A", "shop", "test", "TOPS"),
        ("a_s3", "A", "shop", "test", "TOPS"),
        ("b_c1", "B", "consumer", "test", "DRESSES"),
        ("b_s1", "B", "shop", "test", "DRESSES"),
        ("b_s1", "B", "shop", "test", "DRESSES"),  # duplicate row: must not duplicate the gallery
        ("c_c1", "C", "consumer", "test", "DRESSES"),
        ("d_c1", "D", "consumer", "val", "TOPS"),
        ("d_s1", "D", "shop", "val", "TOPS"),
        ("d_s2", "D", "shop", "val", "TOPS"),
        ("e_c1", "E", "consumer", "train", "TOPS"),
        ("e_s1", "E", "shop", "train", "TOPS"),
        ("f_s1", "F", "shop", "test", "TOPS"),
    ]
    table = pd.DataFrame(rows, columns=["path", "item_id", "domain", "split", "category"])
    table.index = table.index + 100  # positions, not index labels, must be used
    return table


@pytest.mark.parametrize(
    "protocol,split,queries,gallery",
    [
        # consumer test images; shop images of val + test, de-duplicated by path
        (
            "official",
            "test",
            ["a_c1", "a_c2", "b_c1", "c_c1"],
            ["a_s1", "a_s2", "a_s3", "b_s1", "d_s1", "d_s2", "f_s1"],
        ),
        ("official", "val", ["d_c1"], ["d_s1", "d_s2"]),
        ("official", "train", ["e_c1"], ["e_s1"]),
        ("split", "test", ["a_c1", "a_c2", "b_c1", "c_c1"], ["a_s1", "a_s2", "a_s3", "b_s1", "f_s1"]),
        ("split", "val", ["d_c1"], ["d_s1", "d_s2"]),
        # A: 2 consumer × 3 shop = 6 rows, B: 1 × 1 = 1 row; C and F form no pair → 7 rows.
        # Each consumer image of A appears 3 times, each shop image of A twice.
        ("original_pairs", "test", ["a_c1"] * 3 + ["a_c2"] * 3 + ["b_c1"], ["a_s1", "a_s2", "a_s3"] * 2 + ["b_s1"]),
        ("original_pairs", "val", ["d_c1"] * 2, ["d_s1", "d_s2"]),
    ],
)
def test_protocol_sets_on_hand_table(protocol, split, queries, gallery):
    table = hand_table()
    q_rows, g_rows = protocol_sets(table, split, protocol)
    assert list(q_rows["path"]) == queries
    assert list(g_rows["path"]) == gallery
    # The index is the row position in the table.
    positions = {p: i for i, p in reversed(list(enumerate(table["path"])))}
    assert list(q_rows.index) == [positions[p] for p in queries]
    assert list(g_rows.index) == [positions[p] for p in gallery]


def test_protocol_errors_name_the_choices_and_the_empty_set():
    table = hand_table()
    with pytest.raises(InputError, match="official, split, original_pairs"):
        protocol_sets(table, "test", "pairs")
    with pytest.raises(InputError, match="train, val, test"):
        protocol_sets(table, "testing", "official")
    no_train_shop = table[~((table["split"] == "train") & (table["domain"] == "shop"))]
    with pytest.raises(InputError, match="empty gallery"):
        protocol_sets(no_train_shop, "train", "official")
    no_train = table[table["split"] != "train"]
    with pytest.raises(InputError, match="no queries"):
        protocol_sets(no_train, "train", "split")
    with pytest.raises(InputError, match="no queries"):
        protocol_sets(table[table["item_id"] != "E"], "train", "original_pairs")
    with pytest.raises(InputError, match="lacks column"):
        protocol_sets(table.drop(columns=["domain"]), "test", "official")


def hand_embeddings(table: pd.DataFrame) -> np.ndarray:
    """A images at (1,0,0); b_c1 at (1,0.5,0) scores 1 with every A shop image but only 0.5
    with its own b_s1 (0,1,0); D images at (-1,0,0); C and F at (0,0,1)."""
    vec = {"A": (1, 0, 0), "D": (-1, 0, 0), "C": (0, 0, 1), "F": (0, 0, 1), "E": (0, 1, 1)}
    out = []
    for path, item in zip(table["path"], table["item_id"]):
        if path == "b_c1":
            out.append((1, 0.5, 0))
        elif item == "B":
            out.append((0, 1, 0))
        else:
            out.append(vec[item])
    return np.array(out, dtype=np.float32)


def test_evaluate_protocol_official_by_hand():
    table = hand_table()
    out = evaluate_protocol(table, hand_embeddings(table), split="test", protocol="official", n_boot=200)
    json.dumps(out)  # plain JSON types only
    # Queries a_c1, a_c2 hit at rank 0 (AP 1); b_c1 has the 3 A shop images above b_s1:
    # rank 3 (AP 1/4); c_c1 has no shop image of C in the gallery: excluded.
    assert out["n_queries"] == 3 and out["n_excluded_queries"] == 1 and out["n_gallery"] == 7
    assert out["recall@1"] == pytest.approx(2 / 3)
    assert out["recall@5"] == out["recall@10"] == out["recall@20"] == 1.0
    assert out["map"] == pytest.approx((1 + 1 + 0.25) / 3)
    assert out["protocol"] == "official" and out["split"] == "test"
    low, high = out["recall@1_ci"]
    assert low <= out["recall@1"] <= high
    assert out["per_category"]["TOPS"] == {
        "recall@1": 1.0,
        "recall@5": 1.0,
        "recall@10": 1.0,
        "recall@20": 1.0,
        "map": 1.0,
        "n_queries": 2,
    }
    assert out["per_category"]["DRESSES"]["recall@1"] == 0.0
    assert out["per_category"]["DRESSES"]["n_queries"] == 1


def test_evaluate_protocol_original_pairs_duplicates_move_ranks():
    table = hand_table()
    emb = hand_embeddings(table)
    out = evaluate_protocol(table, emb, split="test", protocol="original_pairs", n_boot=200)
    # 7 query rows (6 from A, 1 from B) against 7 gallery entries (a_s1..a_s3 twice each,
    # b_s1 once). The six A rows hit at rank 0. b_c1 sees the 6 copies of A's shop images
    # (score 1) above b_s1 (score 0.5): rank 6, a miss at K=1 and K=5, a hit at K=10
    # (under `split` it would be rank 3, a hit at K=5).
    # Recall@1 = Recall@5 = 6/7, Recall@10 = 1; mAP = (6·1 + 1/7) / 7.
    assert out["n_queries"] == 7 and out["n_gallery"] == 7 and out["n_excluded_queries"] == 0
    assert out["n_unique_query_images"] == 3 and out["n_unique_gallery_images"] == 4
    assert out["recall@1"] == pytest.approx(6 / 7)
    assert out["recall@5"] == pytest.approx(6 / 7)
    assert out["recall@10"] == 1.0
    assert out["map"] == pytest.approx((6 + 1 / 7) / 7)
    split_out = evaluate_protocol(table, emb, split="test", protocol="split", n_boot=50)
    assert split_out["recall@5"] == 1.0 and split_out["n_gallery"] == 5


def test_evaluate_protocol_rejects_misaligned_embeddings_and_unscorable_sets():
    table = hand_table()
    with pytest.raises(InputError, match="one row per table row"):
        evaluate_protocol(table, np.zeros((3, 3), np.float32))
    only_c = table[table["item_id"].isin(["C", "F"])]
    with pytest.raises(InputError, match="none of the 1 queries"):
        evaluate_protocol(only_c, np.ones((len(only_c), 3), np.float32), split="test")


def test_retrieval_metrics_memory_is_bounded_by_the_budget():
    import importlib.util
    from pathlib import Path

    import torch

    # The allocation tracker lives with the search tests; load it by path so this works
    # under any pytest import mode.
    spec = importlib.util.spec_from_file_location("_search_tests", Path(__file__).with_name("test_retrieval_search.py"))
    search_tests = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(search_tests)
    LiveTorchBytes = search_tests.LiveTorchBytes

    query, ql, gallery, gl = integer_data(4, n_query=200, n_gallery=3000, dim=6, n_items=400)
    q, g = torch.from_numpy(query), torch.from_numpy(gallery)
    budget_mb = 0.25  # 262 kB, while the full 200 × 3000 float32 matrix is 2.4 MB
    with LiveTorchBytes([q, g]) as tracker:
        res = retrieval_metrics(q, ql, g, gl, memory_budget_mb=budget_mb)
    assert tracker.peak <= budget_mb * 1024 * 1024 < 200 * 3000 * 4
    reference = retrieval_metrics(query, ql, gallery, gl)  # default budget: one chunk
    np.testing.assert_array_equal(res.first_hit_rank, reference.first_hit_rank)
    np.testing.assert_allclose(res.average_precision, reference.average_precision)


def test_the_old_protocol_name_is_accepted_and_reported_as_renamed(capsys):
    table = hand_table()
    emb = hand_embeddings(table)
    old = evaluate_protocol(table, emb, split="test", protocol="seed_pairs", n_boot=50)
    assert "'seed_pairs' is now called 'original_pairs'" in capsys.readouterr().err
    new = evaluate_protocol(table, emb, split="test", protocol="original_pairs", n_boot=50)
    assert old["protocol"] == "original_pairs"
    assert {k: old[k] for k in ("recall@1", "recall@5", "map")} == {k: new[k] for k in ("recall@1", "recall@5", "map")}
