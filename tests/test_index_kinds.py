"""`index --kind …` end to end: streamed embeddings, every search structure recorded with its
recall, `search` / GalleryIndex.load reading any kind, bad parameters refused in one line."""

from __future__ import annotations

import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from helpers.apps.cli import main
from helpers.core import config, schema
from helpers.evaluation import gallery
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
