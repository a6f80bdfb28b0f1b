"""`index --kind …` end to end: streamed embeddings, every search structure recorded with its
recall, `search` / GalleryIndex.load reading any kind, bad parameters refused in one line."""

from __future__ import annotations

import json
import shutil
from dataclasses import asdict, replace

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.apps.cli import main
from helpers.core import config, schema
from helpers.evaluation import gallery, postprocess
from helpers.evaluation.search import exact_topk
from helpers.modeling import checkpoints, models


@pytest.fixture(scope="module")
def setup(tmp_path_factory, small_tree):
    """A synthetic tree, its table and an (untrained) fixture-model checkpoint: indexing does
    not care whether the model was trained."""
    base = tmp_path_factory.mktemp("kinds")
    root, table = small_tree
    cfg = config.get_config("fixture")
    torch.manual_seed(0)
    embedder = models.create_embedder(
        cfg.backbone, cfg.embed_dim, weights="none", head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size
    )
    checkpoints.save_checkpoint(
        base / "best.pt",
        {
            "model": embedder.state_dict(),
            "model_config": embedder.config,
            "config": json.loads(json.dumps(asdict(cfg))),
        },
    )
    return root, table, base / "best.pt"


def common(setup):
    root, table, checkpoint = setup
    return [
        "--table",
        str(table),
        "--data-root",
        str(root),
        "--checkpoint",
        str(checkpoint),
        "--num-workers",
        "0",
        "--quiet",
    ]


@pytest.fixture(scope="module")
def exact_index(setup, tmp_path_factory):
    out = tmp_path_factory.mktemp("exact") / "index"
    assert main(["index", *common(setup), "--out", str(out)]) == 0
    return out


def test_exact_index_streams_embeddings_and_records_the_kind(exact_index):
    meta = json.loads((exact_index / "index.json").read_text())
    assert meta["ann"]["kind"] == "exact" and meta["ann"]["recall_at_10"] == 1.0
    assert sorted(p.name for p in exact_index.iterdir()) == ["embeddings.npy", "gallery.csv", "index.json", "model.pt"]
    assert not list(exact_index.parent.glob("*.partial")) and not list(exact_index.parent.glob("*.embeddings.npy"))
    index = gallery.GalleryIndex.load(exact_index)
    assert isinstance(index.embeddings, np.memmap)  # loaded mapped, not read whole
    # The streamed file equals embedding the gallery in memory (same rows, same order).
    root = json.loads((exact_index / "index.json").read_text())["data_root"]
    from helpers.evaluation import inference

    cfg = config.config_from_dict(index.run_config)
    direct = inference.embed_table(cfg, index.embedder(), index.gallery, root, "cpu", progress=False)
    np.testing.assert_allclose(np.asarray(index.embeddings), direct, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    "kind, extra",
    [
        ("ivf_flat", ["--nlist", "2", "--nprobe", "2"]),  # probes every list: must equal exact
        ("hnsw", ["--hnsw-m", "8", "--ef-search", "200"]),  # efSearch > n: finds every vector here
        ("ivf_pq", ["--nlist", "1", "--m", "4", "--nbits", "3"]),  # lossy codes (2**3 <= 9 images): recall recorded
    ],
)
def test_approximate_kinds_via_cli(setup, exact_index, tmp_path, capsys, kind, extra):
    out = tmp_path / kind
    assert main(["index", *common(setup), "--out", str(out), "--kind", kind, *extra]) == 0
    assert "recall@10 vs exact" in capsys.readouterr().out
    meta = json.loads((out / "index.json").read_text())["ann"]
    assert meta["kind"] == kind and (out / "ann.faiss").is_file()
    assert meta["recall_query_source"] == "gallery_sample" and meta["recall_queries"] == meta["n"]
    loaded = gallery.GalleryIndex.load(out)
    exact = gallery.GalleryIndex.load(exact_index)
    queries = np.asarray(exact.embeddings[:5])
    _, approx = loaded.search(queries, 10)
    _, truth = exact.search(queries, 10)
    if kind in ("ivf_flat", "hnsw"):
        assert meta["recall_at_10"] == 1.0
        np.testing.assert_array_equal(np.sort(approx, axis=1), np.sort(truth, axis=1))
    else:
        assert 0.0 < meta["recall_at_10"] <= 1.0
    # search loads any kind and returns real gallery rows
    root, table, _ = setup
    frame = schema.read_table(table)
    query = frame.loc[(frame.split == "test") & (frame.domain == "consumer")].iloc[0]
    capsys.readouterr()
    assert main(["search", "--index", str(out), str(root / query.path), "-k", "3", "--json"]) == 0
    hits = json.loads(capsys.readouterr().out)
    assert [h["rank"] for h in hits] == [1, 2, 3] and all(h["path"] in set(frame.path) for h in hits)


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--kind", "lsh"], "invalid choice"),
        (["--kind", "ivf_pq", "--m", "7", "--nbits", "3"], "must divide the embedding dimension"),  # after embedding
        (["--kind", "ivf_flat", "--nlist", "100000"], "nlist must be between"),
    ],
)
def test_bad_index_parameters_fail_in_one_line(setup, tmp_path, capsys, extra, message):
    assert main(["index", *common(setup), "--out", str(tmp_path / "bad"), *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 or "invalid choice" in err[-1]
    assert message in err[-1]
    assert not (tmp_path / "bad").exists() and not list(tmp_path.glob("bad*"))


# --------------------------------------------------------------------------- post-processing applied by the index


@pytest.fixture(scope="module")
def query_embeddings(setup, exact_index):
    """Every test consumer photo, embedded one at a time through the index's model as a search is."""
    root, table, _ = setup
    frame = schema.read_table(table)
    rows = frame.loc[(frame.split == "test") & (frame.domain == "consumer")].drop_duplicates("path")
    index = gallery.GalleryIndex.load(exact_index)
    return np.concatenate(
        [index.embed_image(root / r.path, box=(r.x_1, r.y_1, r.x_2, r.y_2)) for r in rows.itertuples(index=False)]
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.mark.parametrize("name", ["aqe", "dba", "k_reciprocal"])
def test_an_index_ranks_as_the_method_scores_the_whole_query_set(exact_index, tmp_path, name):
    """Well-separated random embeddings (the untrained fixture model's are nearly collapsed: there
    a float rounding can swap two neighbours) in an index saved with the method and loaded back."""
    plain = gallery.GalleryIndex.load(exact_index)
    rng = np.random.default_rng(0)
    embeddings, queries = _unit(rng.normal(size=(40, 16))), _unit(rng.normal(size=(12, 16)))
    rows = pd.concat([plain.gallery] * 5, ignore_index=True).head(40)
    method = postprocess.create_postprocess(name)
    meta = {"ann": {"kind": "exact"}, "postprocess": method.to_json()}
    gallery.GalleryIndex(embeddings, rows, plain.model_state, plain.run_config, meta).save(tmp_path / name)
    index = gallery.GalleryIndex.load(tmp_path / name)
    assert index.postprocess == method  # index.json round trip
    expected = postprocess.top_k(method.scores(queries, embeddings), 5)
    assert np.array_equal(index.search(queries, 5)[1], expected)  # the whole set at once
    for query, top in zip(queries, expected):  # and one query at a time, as the app and the CLI search
        assert index.search(query[None], 5)[1][0].tolist() == top.tolist()


def test_a_built_index_records_and_applies_its_post_processing(setup, query_embeddings, tmp_path, capsys):
    root, table, _ = setup
    out = tmp_path / "aqe"
    assert main(["index", *common(setup), "--out", str(out), "--postprocess", "aqe"]) == 0
    assert "post-processing aqe" in capsys.readouterr().out
    method = postprocess.create_postprocess("aqe")
    assert json.loads((out / "index.json").read_text())["postprocess"] == {"name": "aqe", "params": method.params}
    index = gallery.GalleryIndex.load(out)
    assert index.postprocess == method
    expanded = postprocess.alpha_query_expansion(query_embeddings[:1], np.asarray(index.embeddings), 2, 3.0)
    scores, _ = index.search(query_embeddings[:1], 3)
    np.testing.assert_allclose(scores[0], np.sort(expanded[0])[::-1][:3], atol=1e-5)
    frame = schema.read_table(table)
    query = frame.loc[(frame.split == "test") & (frame.domain == "consumer")].iloc[0]
    assert main(["search", "--index", str(out), str(root / query.path), "-k", "3", "--json"]) == 0
    assert [hit["rank"] for hit in json.loads(capsys.readouterr().out)] == [1, 2, 3]


def test_the_final_evaluation_ranks_with_the_index_s_post_processing(setup, tmp_path):
    from helpers.evaluation import metrics
    from helpers.experiments import final

    root, table, _ = setup
    assert main(["index", *common(setup), "--out", str(tmp_path / "aqe"), "--postprocess", "aqe"]) == 0
    index = gallery.GalleryIndex.load(tmp_path / "aqe")
    queries = final.consumer_queries(schema.read_table(table))
    embedded = final.embed_queries(index, queries, root, progress=False)
    results, per_query = final.evaluate_final(index, queries, embedded)
    assert {r["postprocess"]["name"] for r in results.values()} == {"aqe"}
    scores = index.postprocess.scores(embedded, np.asarray(index.embeddings))
    expected = metrics.score_metrics(scores, queries.item_id.to_numpy(), index.gallery.item_id.to_numpy())
    assert per_query.rank_of_first_hit.tolist() == (expected.first_hit_rank + 1).tolist()
    for k in (1, 5, 10, 20):
        assert results["official"][f"recall@{k}"] == expected.recall[k]


def test_an_index_without_post_processing_searches_as_before(exact_index, query_embeddings, tmp_path):
    index = gallery.GalleryIndex.load(exact_index)
    assert json.loads((exact_index / "index.json").read_text())["postprocess"] == {"name": "none", "params": {}}
    scores, found = index.search(query_embeddings, 5)
    expected_scores, expected = exact_topk(query_embeddings, np.asarray(index.embeddings), 5)
    assert np.array_equal(found, expected) and np.array_equal(scores, expected_scores)
    # an index written before post-processing was recorded loads as `none`
    old = tmp_path / "old"
    shutil.copytree(exact_index, old)
    meta = json.loads((old / "index.json").read_text())
    del meta["postprocess"]
    (old / "index.json").write_text(json.dumps(meta))
    assert gallery.GalleryIndex.load(old).postprocess == postprocess.create_postprocess("none")


def test_a_flip_tta_index_embeds_gallery_and_queries_with_the_flip(setup, exact_index, tmp_path):
    from helpers.evaluation import inference

    root, table, _ = setup
    assert main(["index", *common(setup), "--out", str(tmp_path / "flip"), "--postprocess", "flip_tta"]) == 0
    index = gallery.GalleryIndex.load(tmp_path / "flip")
    cfg = replace(config.config_from_dict(index.run_config), flip_tta=True)
    flipped = inference.embed_table(cfg, index.embedder(), index.gallery, root, "cpu", progress=False)
    np.testing.assert_allclose(np.asarray(index.embeddings), flipped, rtol=1e-6, atol=1e-6)
    plain = gallery.GalleryIndex.load(exact_index)
    assert not np.allclose(np.asarray(plain.embeddings), flipped, atol=1e-4)
    photo = root / index.gallery.path[0]
    np.testing.assert_allclose(index.embed_image(photo), inference.embed_image(index.embedder(), cfg, photo), atol=1e-6)


def test_ensure_index_rebuilds_when_the_post_processing_changes(setup, tmp_path, monkeypatch):
    from helpers.experiments import artifacts

    root, table, checkpoint = setup
    built = []
    real_build = gallery.build_index
    monkeypatch.setattr(
        gallery, "build_index", lambda *a, **kw: built.append(kw["postprocess"]) or real_build(*a, **kw)
    )
    folder = tmp_path / "index"
    for name in ("none", "none", "aqe", "aqe", "dba"):
        method = postprocess.create_postprocess(name)
        artifacts.ensure_index(checkpoint, table, root, folder, num_workers=0, progress=False, postprocess=method)
        assert gallery.GalleryIndex.load(folder).postprocess == method
    assert [m.name for m in built] == ["none", "aqe", "dba"]
    artifacts.ensure_index(checkpoint, table, root, folder, num_workers=0, progress=False)  # default: none
    assert [m.name for m in built] == ["none", "aqe", "dba", "none"]


def test_a_bad_post_processing_name_is_refused_before_embedding(setup, tmp_path, capsys):
    assert main(["index", *common(setup), "--out", str(tmp_path / "bad"), "--postprocess", "qe"]) == 2
    assert "invalid choice: 'qe'" in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_cli_evaluate_resamples_items_unless_asked_for_queries(setup, tmp_path, capsys):
    args = ["evaluate", *common(setup), "--split", "test"]
    assert main([*args, "--out", str(tmp_path / "items.json")]) == 0
    assert main([*args, "--out", str(tmp_path / "queries.json"), "--interval", "queries"]) == 0
    assert main([*args, "--out", str(tmp_path / "aqe.json"), "--postprocess", "aqe"]) == 0
    items, queries, aqe = (json.loads((tmp_path / f"{n}.json").read_text()) for n in ("items", "queries", "aqe"))
    assert items["ci"].startswith("percentile bootstrap over items (all queries of an item together), 95%")
    assert queries["ci"].startswith("percentile bootstrap over queries, 95%")
    assert items["recall@5"] == queries["recall@5"] and items["postprocess"] == {"name": "none", "params": {}}
    assert aqe["postprocess"] == postprocess.create_postprocess("aqe").to_json()
    assert main([*args, "--interval", "pairs"]) == 2
    assert "invalid choice: 'pairs'" in capsys.readouterr().err


def test_stage_cli(tmp_path, capsys):
    import zipfile

    with zipfile.ZipFile(tmp_path / "img.zip", "w") as archive:
        archive.writestr("img/a.jpg", b"x" * 100)
    assert main(["stage", str(tmp_path / "img.zip"), str(tmp_path / "local"), "--quiet"]) == 0
    assert (tmp_path / "local/img/a.jpg").read_bytes() == b"x" * 100
    assert main(["stage", str(tmp_path / "img.zip"), str(tmp_path / "local"), "--quiet"]) == 0
    assert "already staged" in capsys.readouterr().out
    assert main(["stage", str(tmp_path / "nope.zip"), str(tmp_path / "local")]) == 2
    assert capsys.readouterr().err.strip().startswith("error: ")
