"""helpers.evaluation.ann: every index kind against exact search (explicit NumPy loops and faiss
IndexFlatIP as oracles), recorded parameters and recall, atomic save / load, streamed
embedding files, bad input."""

from __future__ import annotations

import json

import faiss
import numpy as np
import pytest

from helpers.core.errors import InputError
from helpers.evaluation.ann import KINDS, AnnIndex, AnnParams, EmbeddingWriter, recall_at_k, write_meta
from helpers.evaluation.search import exact_topk


def build(embeddings, params, **kwargs) -> AnnIndex:
    return AnnIndex.build(embeddings, params, exact_search=exact_topk, progress=False, **kwargs)


DIM = 32


def clustered(n: int, seed: int, centers: int = 20, noise: float = 0.15) -> np.ndarray:
    """Unit vectors around a few random centres (the structure IVF relies on; uniform random
    vectors in 32-d have no neighbours worth the name)."""
    rng = np.random.default_rng(seed)
    c = rng.standard_normal((centers, DIM)).astype(np.float32)
    c /= np.linalg.norm(c, axis=1, keepdims=True)
    x = c[rng.integers(0, centers, n)] + noise * rng.standard_normal((n, DIM)).astype(np.float32)
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture(scope="module")
def gallery() -> np.ndarray:
    return clustered(3000, seed=0)


@pytest.fixture(scope="module")
def queries() -> np.ndarray:
    return clustered(50, seed=1)


def loop_topk(query: np.ndarray, gallery: np.ndarray, k: int) -> np.ndarray:
    """Oracle: for each query, score every gallery row one by one and sort."""
    out = []
    for q in query:
        scores = [float(np.dot(q.astype(np.float64), g.astype(np.float64))) for g in gallery]
        out.append(sorted(range(len(gallery)), key=lambda j: -scores[j])[:k])
    return np.array(out)


def loop_recall(approx: np.ndarray, exact: np.ndarray) -> float:
    hits = 0
    for a, e in zip(approx, exact):
        hits += sum(1 for j in a if j in set(e.tolist()))
    return hits / exact.size


# Small but real parameters: 3000 vectors, nlist 16 (≈ 190 per list), PQ 8 × 6 bits.
PARAMS = {
    "ivf_flat": AnnParams("ivf_flat", nlist=16, nprobe=4, seed=3),
    "ivf_pq": AnnParams("ivf_pq", nlist=16, nprobe=4, m=8, nbits=6, seed=3),
    "hnsw": AnnParams("hnsw", hnsw_m=16, ef_construction=40, ef_search=64, seed=3),
}


def test_exact_kind_matches_loop_oracle(gallery, queries):
    index = build(gallery, AnnParams("exact"), recall_queries=queries)
    _, got = index.search(queries, 10)
    np.testing.assert_array_equal(got, loop_topk(queries, gallery, 10))
    assert index.meta["recall_at_10"] == 1.0 and index.meta["kind"] == "exact"
    assert index.meta["recall_query_source"] == "exact search"  # by definition, not measured


@pytest.mark.parametrize("kind", ["ivf_flat", "ivf_pq", "hnsw"])
def test_recorded_recall_is_the_recall_against_exact(kind, gallery, queries):
    index = build(gallery, PARAMS[kind], recall_queries=queries)
    _, approx = index.search(queries, 10)
    expected = loop_recall(approx, loop_topk(queries, gallery, 10))
    assert index.meta["recall_at_10"] == pytest.approx(expected, abs=1e-4)
    assert index.meta["recall_queries"] == len(queries) and index.meta["recall_query_source"] == "given"
    # The recorded parameters are the ones the faiss index actually has.
    for key, value in PARAMS[kind].resolve(len(gallery), DIM).recorded().items():
        assert index.meta[key] == value
    if kind == "hnsw":
        hnsw = index.index.hnsw
        assert (hnsw.efSearch, hnsw.efConstruction, index.meta["hnsw_m"]) == (64, 40, 16)
    else:
        assert (faiss.extract_index_ivf(index.index).nlist, index.index.nprobe) == (16, 4)
        # 64 · nlist, and for PQ at least 39 · 2**nbits
        assert index.meta["train_size"] == {"ivf_flat": 1024, "ivf_pq": 2496}[kind]
    assert index.index.ntotal == len(gallery) and index.meta["n"] == len(gallery)
    # Approximate, but on clustered data with these settings far better than chance (10/3000).
    assert expected > {"ivf_flat": 0.8, "ivf_pq": 0.3, "hnsw": 0.9}[kind]


def test_ivf_flat_probing_every_list_is_exact(gallery, queries):
    """nprobe = nlist scans every vector exactly: the result must equal IndexFlatIP's."""
    index = build(gallery, AnnParams("ivf_flat", nlist=16, nprobe=16), n_recall=0)
    scores, got = index.search(queries, 10)
    flat = faiss.IndexFlatIP(DIM)
    flat.add(gallery)
    ref_scores, ref = flat.search(queries, 10)
    np.testing.assert_allclose(scores, ref_scores, rtol=1e-5, atol=1e-6)
    assert recall_at_k(got, ref) == 1.0


def test_ivf_pq_records_the_faiss_structure(gallery):
    index = build(gallery, PARAMS["ivf_pq"], n_recall=100)
    ivf = index.index
    assert (ivf.nlist, ivf.nprobe, ivf.pq.M, ivf.pq.nbits) == (16, 4, 8, 6)
    assert index.meta["recall_query_source"] == "gallery_sample" and index.meta["recall_queries"] == 100
    assert 0.0 < index.meta["recall_at_10"] <= 1.0


def test_defaults_are_resolved_and_recorded():
    p = AnnParams("ivf_pq").resolve(1_000_000, 256)
    assert p.nlist == 1024 and p.train_size == 65_536
    assert AnnParams("ivf_flat").resolve(3000, 32).nlist == 64  # 2 ** round(log2(sqrt(3000)))
    assert AnnParams("ivf_flat").resolve(3000, 32).train_size == 3000  # capped at n
    assert AnnParams("hnsw").resolve(10, 32).recorded() == {
        "kind": "hnsw",
        "hnsw_m": 32,
        "ef_construction": 40,
        "ef_search": 64,
        "seed": 0,
    }


def test_build_is_seeded(gallery, queries):
    a = build(gallery, PARAMS["ivf_pq"], n_recall=0)
    b = build(gallery, PARAMS["ivf_pq"], n_recall=0)
    np.testing.assert_array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])


@pytest.mark.parametrize("kind", KINDS)
def test_save_load_roundtrip(kind, gallery, queries, tmp_path):
    params = PARAMS.get(kind, AnnParams("exact"))
    index = build(gallery, params, recall_queries=queries)
    path = index.save(tmp_path / "ann.faiss")
    write_meta(tmp_path / "ann.json", index.meta)
    assert sorted(p.name for p in tmp_path.iterdir()) == (
        ["ann.faiss", "ann.json"] if kind != "exact" else ["ann.json"]
    )
    assert (path is None) == (kind == "exact")
    meta = json.loads((tmp_path / "ann.json").read_text())
    loaded = AnnIndex.load(meta, gallery, path, exact_search=exact_topk)
    for a, b in zip(index.search(queries, 7), loaded.search(queries, 7)):
        np.testing.assert_array_equal(a, b)
    assert loaded.meta == index.meta


def test_load_refuses_corrupt_or_mismatched_files(gallery, tmp_path):
    index = build(gallery, PARAMS["hnsw"], n_recall=0)
    path = index.save(tmp_path / "ann.faiss")
    truncated = tmp_path / "short.faiss"
    truncated.write_bytes(path.read_bytes()[:100])
    with pytest.raises(InputError, match="unreadable faiss index"):
        AnnIndex.load(index.meta, None, truncated)
    with pytest.raises(InputError, match="the record says"):
        AnnIndex.load({**index.meta, "n": 5}, None, path)
    with pytest.raises(InputError, match="missing faiss index file"):
        AnnIndex.load(index.meta, None, tmp_path / "nope.faiss")
    with pytest.raises(InputError, match="unknown index parameter"):
        AnnParams.from_dict({"kind": "exact", "bogus": 1})


def test_approximate_may_return_fewer_than_k(gallery):
    """One probed list of a 64-list IVF cannot always hold 60 neighbours: padding is -1 / -inf."""
    index = build(gallery, AnnParams("ivf_flat", nlist=64, nprobe=1), n_recall=0)
    scores, rows = index.search(gallery[:20], 60)
    assert (rows == -1).any()
    assert np.isneginf(scores[rows == -1]).all() and (rows[rows >= 0] < len(gallery)).all()


@pytest.mark.parametrize(
    "params, message",
    [
        (AnnParams("lsh"), "unknown index kind"),
        (AnnParams("ivf_pq", m=7), "must divide the embedding dimension"),
        (AnnParams("ivf_flat", nlist=5000), "nlist must be between"),
        (AnnParams("ivf_pq", nlist=8, nbits=12), "train_size must be between 4096"),
        (AnnParams("hnsw", ef_search=0), "ef_search must be >= 1"),
    ],
)
def test_bad_parameters(params, message, gallery):
    with pytest.raises(InputError, match=message):
        build(gallery, params)


def test_bad_embeddings(gallery):
    with pytest.raises(InputError, match="row 7 has L2 norm"):
        bad = gallery.copy()
        bad[7] *= 3
        build(bad, AnnParams("exact"))
    with pytest.raises(InputError, match="NaN"):
        bad = gallery.copy()
        bad[1, 0] = np.nan
        build(bad, PARAMS["hnsw"])
    index = build(gallery, PARAMS["hnsw"], n_recall=0)
    with pytest.raises(InputError, match="does not match the index dim"):
        index.search(np.ones((1, DIM + 1), np.float32), 5)


def test_memmap_gallery_is_built_chunkwise(gallery, queries, tmp_path, monkeypatch):
    """A memory-mapped gallery is read in chunks (forced small here) and gives the same index."""
    import helpers.evaluation.ann as ann

    with EmbeddingWriter(tmp_path / "g.npy", len(gallery)) as writer:
        for start in range(0, len(gallery), 700):
            writer.write(np.arange(start, min(start + 700, len(gallery))), gallery[start : start + 700])
        writer.close()
    mapped = np.load(tmp_path / "g.npy", mmap_mode="r")
    monkeypatch.setattr(ann, "_ADD_CHUNK_ROWS", 500)
    a = build(mapped, PARAMS["ivf_flat"], n_recall=0)
    b = build(gallery, PARAMS["ivf_flat"], n_recall=0)
    np.testing.assert_array_equal(a.search(queries, 10)[1], b.search(queries, 10)[1])
    exact = build(mapped, AnnParams("exact"), n_recall=0)
    np.testing.assert_array_equal(exact.search(queries, 10)[1], loop_topk(queries, gallery, 10))


def test_embedding_writer_any_order_and_atomic(tmp_path):
    rng = np.random.default_rng(0)
    values = rng.standard_normal((103, 8)).astype(np.float32)
    order = rng.permutation(103)
    writer = EmbeddingWriter(tmp_path / "e.npy", 103, flush_rows=10)
    for start in range(0, 103, 16):
        rows = order[start : start + 16]
        writer.write(rows, values[rows])
        assert not (tmp_path / "e.npy").exists()  # only the .partial exists until close
    assert writer.close() == tmp_path / "e.npy"
    np.testing.assert_array_equal(np.load(tmp_path / "e.npy"), values)
    assert [p.name for p in tmp_path.iterdir()] == ["e.npy"]


def test_embedding_writer_refuses_gaps_and_cleans_up(tmp_path):
    writer = EmbeddingWriter(tmp_path / "e.npy", 10)
    writer.write(np.arange(9), np.zeros((9, 4), np.float32))
    with pytest.raises(InputError, match="1 of 10 rows were never written"):
        writer.close()
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="out of range"):
        EmbeddingWriter(tmp_path / "f.npy", 3, dim=4).write(np.array([3]), np.zeros((1, 4), np.float32))
    with pytest.raises(RuntimeError):
        with EmbeddingWriter(tmp_path / "g.npy", 3, dim=4) as w:
            w.write(np.array([0]), np.zeros((1, 4), np.float32))
            raise RuntimeError("extraction failed")
    assert not (tmp_path / "g.npy.partial").exists() and not (tmp_path / "g.npy").exists()
