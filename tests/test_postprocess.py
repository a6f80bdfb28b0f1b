"""helpers.evaluation.postprocess against explicit loops written from the papers' definitions and a
hand-worked k-reciprocal case; the study's post-processing experiment on a real fixture run."""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
import torch

from helpers.core import config
from helpers.core.errors import InputError
from helpers.evaluation import metrics, postprocess


def _unit(rows) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def embeddings():
    rng = np.random.default_rng(7)
    return _unit(rng.normal(size=(5, 8))), _unit(rng.normal(size=(9, 8)))


def _nearest(similarities: list[float], k: int, skip: int | None = None) -> list[int]:
    """The k most similar indices, ties by lower index (the module's stable order)."""
    order = sorted((j for j in range(len(similarities)) if j != skip), key=lambda j: (-similarities[j], j))
    return order[:k]


def _expanded(vector, others, k: int, alpha: float, skip: int | None = None) -> np.ndarray:
    similarities = [float(np.dot(vector, other)) for other in others]
    total = np.array(vector, dtype=np.float64)
    for i in _nearest(similarities, k, skip):
        total += max(similarities[i], 0.0) ** alpha * others[i]
    return total / np.linalg.norm(total)


def test_alpha_query_expansion_equals_the_loop(embeddings):
    query, gallery = embeddings
    got = postprocess.alpha_query_expansion(query, gallery, k=3, alpha=3.0)
    for i, q in enumerate(query):
        expanded = _expanded(q, gallery, 3, 3.0)
        assert got[i] == pytest.approx([float(np.dot(expanded, g)) for g in gallery], abs=1e-5)


def test_database_augmentation_equals_the_loop(embeddings):
    query, gallery = embeddings
    gallery = np.concatenate([gallery, gallery[:1]])  # a duplicate image is still a neighbour, itself is not
    got = postprocess.database_augmentation(query, gallery, k=2, alpha=1.0)
    augmented = [_expanded(g, gallery, 2, 1.0, skip=j) for j, g in enumerate(gallery)]
    for i, q in enumerate(query):
        assert got[i] == pytest.approx([float(np.dot(q, a)) for a in augmented], abs=1e-5)


def test_negative_similarities_do_not_pull_the_query():
    query = _unit([[1.0, 0.0]])
    gallery = _unit([[-1.0, 0.1], [0.0, 1.0]])  # both neighbours at or below 0 similarity
    assert postprocess.alpha_query_expansion(query, gallery, k=2, alpha=3.0) == pytest.approx(query @ gallery.T)


def _k_reciprocal_loops(points: np.ndarray, n_query: int, k1: int, k2: int, lam: float) -> np.ndarray:
    """Zhong et al. 2017 from its definitions, one element at a time."""
    n = len(points)
    squared = [
        [float(sum((a - b) ** 2 for a, b in zip(points[i], points[j], strict=True))) for j in range(n)]
        for i in range(n)
    ]
    d = [[squared[i][j] / max(squared[i]) for j in range(n)] for i in range(n)]

    def nearest(i: int, k: int) -> list[int]:  # N(i, k): the k + 1 nearest, i itself first
        return sorted(range(n), key=lambda j: (d[i][j], j))[: k + 1]

    def reciprocal(i: int, k: int) -> set[int]:
        return {j for j in nearest(i, k) if i in nearest(j, k)}

    vectors = []
    for i in range(n):
        members = reciprocal(i, k1)
        grown = set(members)
        for c in members:
            theirs = reciprocal(c, round(k1 / 2))
            if len(theirs & members) > 2 / 3 * len(theirs):
                grown |= theirs
        total = sum(math.exp(-d[i][j]) for j in grown)
        vectors.append([math.exp(-d[i][j]) / total if j in grown else 0.0 for j in range(n)])
    expanded = [[sum(vectors[m][t] for m in nearest(i, k2 - 1)) / k2 for t in range(n)] for i in range(n)]
    out = np.empty((n_query, n - n_query))
    for i in range(n_query):
        for j in range(n_query, n):
            low = sum(min(a, b) for a, b in zip(expanded[i], expanded[j], strict=True))
            high = sum(max(a, b) for a, b in zip(expanded[i], expanded[j], strict=True))
            out[i, j - n_query] = (1 - lam) * (1 - low / high) + lam * d[i][j]
    return out


def test_k_reciprocal_by_hand():
    # On the unit circle: query at 0°, gallery at 10°, 25°, 90°. With k1 = 1 the nearest of each
    # point: 0°→10°, 10°→0°, 25°→10°, 90°→25°, so R(q) = {q, 10°}, R(10°) = {10°, q}, R(25°) = {25°}
    # and R(90°) = {90°}: only the 10° image shares support with the query (Jaccard < 1).
    angles = np.radians([0.0, 10.0, 25.0, 90.0])
    points = np.stack([np.cos(angles), np.sin(angles)], axis=1).astype(np.float32)
    query, gallery = points[:1], points[1:]
    squared = 2 - 2 * np.cos(angles[:, None] - angles[None, :])
    d = squared / squared.max(axis=1, keepdims=True)
    a, b = math.exp(-d[0, 1]), math.exp(-d[1, 0])
    v_query, v_10 = np.array([1, a]) / (1 + a), np.array([b, 1]) / (1 + b)
    jaccard = 1 - np.minimum(v_query, v_10).sum() / np.maximum(v_query, v_10).sum()
    got = postprocess.k_reciprocal_distance(query, gallery, k1=1, k2=1, lambda_value=0.0)
    assert got[0] == pytest.approx([jaccard, 1.0, 1.0], abs=1e-6)
    got = postprocess.k_reciprocal_distance(query, gallery, k1=1, k2=1, lambda_value=0.3)
    assert got[0] == pytest.approx(0.7 * np.array([jaccard, 1.0, 1.0]) + 0.3 * d[0, 1:], abs=1e-6)
    assert got[0] == pytest.approx(_k_reciprocal_loops(points.astype(np.float64), 1, 1, 1, 0.3)[0], abs=1e-6)


@pytest.mark.parametrize(("k1", "k2", "lam"), [(3, 2, 0.3), (4, 3, 0.0), (2, 1, 0.5)])
def test_k_reciprocal_equals_the_loops(embeddings, k1, k2, lam):
    query, gallery = embeddings
    got = postprocess.k_reciprocal_distance(query, gallery, k1, k2, lam)
    expected = _k_reciprocal_loops(np.concatenate([query, gallery]).astype(np.float64), len(query), k1, k2, lam)
    assert got == pytest.approx(expected, abs=1e-5)


def test_k_reciprocal_with_lambda_one_keeps_the_original_ranking(embeddings):
    query, gallery = embeddings
    reranked = postprocess.k_reciprocal_scores(query, gallery, k1=3, k2=2, lambda_value=1.0)
    original = postprocess.cosine_scores(query, gallery)
    assert np.array_equal(np.argsort(-reranked, axis=1), np.argsort(-original, axis=1))


def test_every_method_is_registered_with_its_defaults(embeddings):
    query, gallery = embeddings
    assert list(postprocess.METHODS) == ["none", "flip_tta", "aqe", "dba", "k_reciprocal"]
    expected = {
        "none": query @ gallery.T,
        "flip_tta": query @ gallery.T,  # cosine: the flip is in the embeddings
        "aqe": postprocess.alpha_query_expansion(query, gallery, k=2, alpha=3.0),
        "dba": postprocess.database_augmentation(query, gallery, k=2, alpha=3.0),
        "k_reciprocal": np.concatenate(  # each query re-ranked alone with the gallery
            [postprocess.k_reciprocal_scores(q[None], gallery, k1=20, k2=6, lambda_value=0.3) for q in query]
        ),
    }
    for name, scores in expected.items():
        method = postprocess.create_postprocess(name)
        assert method.params == postprocess.METHODS[name] and method.flip_tta == (name == "flip_tta")
        assert np.array_equal(method.scores(query, gallery), scores)
        assert (method.scorer is None) == (name in ("none", "flip_tta"))
        assert postprocess.PostProcess.from_json(json.loads(json.dumps(method.to_json()))) == method
    changed = postprocess.create_postprocess("aqe", k=3)
    assert changed.params == {"k": 3, "alpha": 3.0} and changed.label() == "aqe (k=3, alpha=3.0)"
    assert postprocess.create_postprocess("none").label() == "none (cosine similarity)"
    with pytest.raises(InputError, match="unknown post-processing 'qe'; choose one of: none, flip_tta, aqe, dba, k_"):
        postprocess.create_postprocess("qe")
    with pytest.raises(InputError, match="'flip_tta' takes no parameters, not k"):
        postprocess.create_postprocess("flip_tta", k=2)


def test_scores_rank_through_the_one_ranking_routine(embeddings):
    query, gallery = embeddings
    query_labels, gallery_labels = ["a", "b", "c", "a", "q"], list("abcabcxyz")
    method = postprocess.create_postprocess("aqe")
    got = metrics.retrieval_metrics(query, query_labels, gallery, gallery_labels, scorer=method.scorer)
    expected = metrics.score_metrics(method.scores(query, gallery), query_labels, gallery_labels)
    assert got.query_index.tolist() == expected.query_index.tolist() == [0, 1, 2, 3]
    assert got.first_hit_rank.tolist() == expected.first_hit_rank.tolist()
    assert got.average_precision.tolist() == expected.average_precision.tolist()
    none = postprocess.create_postprocess("none")
    plain = metrics.retrieval_metrics(query, query_labels, gallery, gallery_labels, scorer=none.scorer)
    cosine = metrics.score_metrics(none.scores(query, gallery), query_labels, gallery_labels)
    assert plain.first_hit_rank.tolist() == cosine.first_hit_rank.tolist()


@pytest.mark.parametrize(
    "call",
    [
        lambda q, g: postprocess.alpha_query_expansion(q, g, k=0, alpha=3.0),
        lambda q, g: postprocess.alpha_query_expansion(q, g, k=2, alpha=-1.0),
        lambda q, g: postprocess.database_augmentation(q, g, k=0, alpha=3.0),
        lambda q, g: postprocess.k_reciprocal_distance(q, g, k1=0, k2=1, lambda_value=0.3),
        lambda q, g: postprocess.k_reciprocal_distance(q, g, k1=3, k2=0, lambda_value=0.3),
        lambda q, g: postprocess.k_reciprocal_distance(q, g, k1=3, k2=1, lambda_value=1.5),
        lambda q, g: postprocess.k_reciprocal_distance(q, g, k1=3, k2=1, lambda_value=-0.1),
        lambda q, g: postprocess.cosine_scores(q, g[:, :4]),
        lambda q, g: postprocess.cosine_scores(q[0], g),
        lambda q, g: postprocess.create_postprocess("qe"),
        lambda q, g: postprocess.create_postprocess("aqe", k1=3),
        lambda q, g: postprocess.create_postprocess("dba", alpha=-1.0),
        lambda q, g: postprocess.create_postprocess("k_reciprocal", lambda_value=2.0),
        lambda q, g: postprocess.PostProcess.from_json({"name": "aqe", "params": [2]}),
    ],
)
def test_bad_arguments_are_one_line_errors(embeddings, call):
    with pytest.raises(InputError) as error:
        call(*embeddings)
    assert "\n" not in str(error.value)


# --------------------------------------------------------------------------- the experiment, on a real fixture run


def test_run_postprocess_on_the_final_configurations_run(tmp_path, monkeypatch):
    from helpers.experiments import catalogue, comparison, postprocessing, runs
    from helpers.experiments.study import Study
    from helpers.modeling import checkpoints

    study = Study("fixture", root=tmp_path, progress=False)
    cfg = study.config
    data_root, table = study.prepared()
    with pytest.raises(InputError, match="final_config.json: missing"):
        postprocessing.run_postprocess(study)
    chosen = {k: getattr(cfg, k) for k in catalogue.decided_fields("fixture")}
    (tmp_path / "final_config.json").write_text(json.dumps({"profile": "fixture", "config": chosen}))
    with pytest.raises(InputError, match="no finished run"):
        postprocessing.run_postprocess(study)
    run_dir, _ = runs.ensure_run(cfg, table, data_root, tmp_path / "crop" / "baseline_seed0", tmp_path, progress=False)

    result = postprocessing.run_postprocess(study)
    out = tmp_path / "postprocess"
    table_runs = pd.read_csv(out / "runs.csv")
    assert list(table_runs.variant) == list(postprocess.METHODS) and set(table_runs.seed) == {0}
    assert set(table_runs.run_dir) == {"crop/baseline_seed0"}
    # `none` is the run's own val ranking: the ranks fit recorded for it, query by query
    recorded = pd.read_csv(run_dir / "val_ranks.csv")
    none_ranks = pd.read_csv(out / "ranks" / "none_seed0.csv")
    pd.testing.assert_frame_equal(none_ranks[["path", "first_hit_rank"]], recorded[["path", "first_hit_rank"]])
    none = table_runs.set_index("variant").loc["none"]
    for metric, value in runs.metrics_from_ranks(recorded).items():
        assert none[f"val_{metric}"] == pytest.approx(value)
    table_cmp = comparison.read_comparison(out / "comparison.csv")
    assert list(table_cmp.index) == list(postprocess.METHODS)
    assert table_cmp.loc["none", "verdict_recall@5"] == "baseline"
    assert table_cmp.loc["none", "n_seeds"] == 1
    tested = table_cmp.drop(index="none")
    assert tested["verdict_recall@5"].isin(("better", "worse", "within noise")).all()
    assert (tested["holm_m_recall@5"] == len(postprocess.METHODS) - 1).all()
    decision = json.loads((out / "decision.json").read_text())
    assert decision["winner"] in postprocess.METHODS and decision["seeds"] == [0]
    assert decision["final_config"] == chosen and decision["family"]["m"] == 4
    assert result["decision"] == decision
    # every test recomputes from the committed ranks alone, to the same table
    before = (out / "comparison.csv").read_text()
    assert postprocessing.restate(study) is not None and (out / "comparison.csv").read_text() == before
    # a fresh clone has the run's record, not its checkpoint: the run is retrained (once, locally),
    # gives the recorded run back to the digit, so its checkpoint is restored beside the record
    monkeypatch.setattr(config, "OUTPUTS", tmp_path / "outputs")
    trained_first = checkpoints.read_checkpoint(run_dir / "best.pt")["model"]
    (run_dir / "best.pt").unlink()
    postprocessing.run_postprocess(study)
    local = tmp_path / "final_runs" / run_dir.name  # beside the study's experiments
    assert runs.same_run(local, run_dir) and (local / "best.pt").is_file()
    assert (run_dir / "best.pt").read_bytes() == (local / "best.pt").read_bytes()
    restored = checkpoints.read_checkpoint(run_dir / "best.pt")["model"]
    assert all(torch.equal(restored[name], tensor) for name, tensor in trained_first.items())
    assert (out / "comparison.csv").read_text() == before
    assert pd.read_csv(out / "runs.csv").drop(columns="postprocess_s").equals(table_runs.drop(columns="postprocess_s"))

    # the report's subsection: every method's row, the decision, the figure, numbers from the files
    from helpers.reporting import check, results_section

    (tmp_path / "figures").mkdir()
    lines = results_section.postprocess_lines({"root": tmp_path, "profile": "fixture"}, "", tmp_path / "figures", "###")
    text = "\n".join(lines)
    assert lines[0] == f"### Post-processing: {catalogue.POSTPROCESS_QUESTION}"
    assert "| baseline (postprocess=none) | 1 |" in text
    assert all(f"| {method} | 1 |" in text for method in postprocess.METHODS if method != "none")
    assert (
        f"**Adopted: {decision['winner']}.**" in text and (tmp_path / "figures" / "fixture_postprocess.png").is_file()
    )
    assert check.untraceable_numbers(text, tmp_path) == []
