"""Post-processing of a trained embedder's rankings, no training: pure functions on L2-normalised
``float32`` query ``[Q, D]`` and gallery ``[G, D]`` embeddings, each returning a ``[Q, G]`` score
matrix (higher = closer), and :func:`ranking` to turn any score matrix into per-query first-hit
ranks with the project's tie rule (equal scores: lower gallery position first).

- flip test-time augmentation is not here: it changes the embeddings, not the ranking (the
  config field ``flip_tta``, applied by :mod:`helpers.evaluation.inference`);
- :func:`alpha_query_expansion` (αQE, Radenović et al., TPAMI 2018): each query replaced by
  ``normalise(q + Σ_{i≤k} s_i^α g_i)`` over its top-k gallery neighbours, ``s_i`` its similarity
  clipped at 0 (a negative similarity would flip the sign of ``s^α`` for odd α);
- :func:`database_augmentation` (DBA): each gallery vector replaced by the normalised sum of
  itself and its top-k gallery neighbours (itself excluded) weighted ``s^α``;
- :func:`k_reciprocal_distance` / :func:`k_reciprocal_scores` (Zhong et al., CVPR 2017):
  Jaccard distance between k-reciprocal neighbour sets (expanded, Gaussian-weighted, locally
  query-expanded over k2 neighbours) blended with the original distance by λ.

Neighbours are taken in a stable order (equal similarities: lower index first), so every
function is deterministic and can be checked against an explicit loop.
"""

from __future__ import annotations

import numpy as np

from helpers.core.errors import InputError


def check_embeddings(query: np.ndarray, gallery: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Both as ``float32`` 2-D arrays of one dimension, else a one-line :class:`InputError`."""
    q, g = np.asarray(query, dtype=np.float32), np.asarray(gallery, dtype=np.float32)
    if q.ndim != 2 or g.ndim != 2 or q.shape[1] != g.shape[1]:
        raise InputError(f"query and gallery embeddings need shapes [Q, D] and [G, D], got {q.shape} and {g.shape}")
    if 0 in q.shape or g.shape[0] == 0:
        raise InputError(f"query and gallery embeddings must not be empty, got {q.shape} and {g.shape}")
    return q, g


def check_positive(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise InputError(f"{name} must be an integer of at least 1, got {value!r}")
    return int(value)


def check_alpha(alpha: float) -> float:
    if not np.isfinite(alpha) or alpha < 0:
        raise InputError(f"alpha must be a finite number of at least 0, got {alpha!r}")
    return float(alpha)


def normalise(rows: np.ndarray) -> np.ndarray:
    return (rows / np.linalg.norm(rows, axis=1, keepdims=True)).astype(np.float32)


def cosine_scores(query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
    """``[Q, G]`` cosine similarities: the ranking without post-processing."""
    q, g = check_embeddings(query, gallery)
    return q @ g.T


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """``[rows, min(k, columns)]`` column indices of each row's k highest scores, best first
    (equal scores: lower column first)."""
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def alpha_query_expansion(query: np.ndarray, gallery: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """``[Q, G]`` scores of the αQE queries ``normalise(q + Σ_{i≤k} max(s_i, 0)^α g_i)`` (top-k
    gallery neighbours of q by cosine) against the gallery."""
    q, g = check_embeddings(query, gallery)
    k, alpha = check_positive(k, "k"), check_alpha(alpha)
    scores = q @ g.T
    neighbours = top_k(scores, k)
    weights = np.maximum(np.take_along_axis(scores, neighbours, axis=1), 0.0) ** alpha
    expanded = normalise(q + np.einsum("qk,qkd->qd", weights, g[neighbours]))
    return expanded @ g.T


def augmented_gallery(gallery: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """DBA's gallery: each ``g_j`` replaced by ``normalise(g_j + Σ_{i≤k} max(s_i, 0)^α g_i)`` over
    its top-k gallery neighbours other than itself (by index: a duplicate image still counts)."""
    _, g = check_embeddings(gallery, gallery)
    k, alpha = check_positive(k, "k"), check_alpha(alpha)
    scores = g @ g.T
    np.fill_diagonal(scores, -np.inf)  # itself is the "+ g_j" term, never a neighbour
    neighbours = top_k(scores, min(k, len(g) - 1))
    weights = np.maximum(np.take_along_axis(scores, neighbours, axis=1), 0.0) ** alpha
    return normalise(g + np.einsum("gk,gkd->gd", weights, g[neighbours]))


def database_augmentation(query: np.ndarray, gallery: np.ndarray, k: int, alpha: float) -> np.ndarray:
    """``[Q, G]`` scores of the queries against the DBA gallery (:func:`augmented_gallery`)."""
    q, g = check_embeddings(query, gallery)
    return q @ augmented_gallery(g, k, alpha).T


def reciprocal_neighbours(initial_rank: np.ndarray, i: int, k: int) -> np.ndarray:
    """R(i, k): the members of i's k+1 nearest (itself included) that have i among their own
    k+1 nearest, in i's order."""
    forward = initial_rank[i, : k + 1]
    return forward[(initial_rank[forward, : k + 1] == i).any(axis=1)]


def k_reciprocal_distance(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """``[Q, G]`` re-ranked distances (lower = closer): ``(1 - λ) · d_J + λ · d``.

    Over the N = Q + G probe and gallery points together: ``d`` the squared Euclidean distance
    (``2 - 2 cos`` on unit vectors), each row divided by its maximum; ``R(i, k1)`` the
    k-reciprocal set of i, grown by ``R(c, round(k1 / 2))`` of every member c that shares more
    than 2/3 of that smaller set with ``R(i, k1)``; ``V_i`` weights ``exp(-d(i, j))`` on that set,
    normalised to sum 1, then averaged over i's k2 nearest (local query expansion; k2 = 1 keeps
    it); ``d_J(i, j) = 1 - Σ min(V_i, V_j) / Σ max(V_i, V_j)``. Dense ``[N, N]`` arrays: meant
    for validation-sized sets.
    """
    q, g = check_embeddings(query, gallery)
    k1, k2 = check_positive(k1, "k1"), check_positive(k2, "k2")
    if not 0.0 <= lambda_value <= 1.0:
        raise InputError(f"lambda must lie in [0, 1], got {lambda_value!r}")
    points = np.concatenate([q, g]).astype(np.float64)
    n_query, n = len(q), len(points)
    distance = np.maximum(2.0 - 2.0 * points @ points.T, 0.0)
    distance /= np.maximum(distance.max(axis=1, keepdims=True), np.finfo(np.float64).tiny)
    initial_rank = np.argsort(distance, axis=1, kind="stable")
    half = int(round(k1 / 2))
    encoded = np.zeros((n, n))
    for i in range(n):
        reciprocal = reciprocal_neighbours(initial_rank, i, k1)
        expanded = [reciprocal]
        for candidate in reciprocal:
            theirs = reciprocal_neighbours(initial_rank, candidate, half)
            if len(np.intersect1d(theirs, reciprocal)) > 2 / 3 * len(theirs):
                expanded.append(theirs)
        members = np.unique(np.concatenate(expanded))
        weights = np.exp(-distance[i, members])
        encoded[i, members] = weights / weights.sum()
    if k2 > 1:
        encoded = encoded[initial_rank[:, :k2]].mean(axis=1)
    jaccard = np.empty((n_query, n - n_query))
    for i in range(n_query):
        support = np.flatnonzero(encoded[i])  # min(V_i, V_j) is 0 elsewhere
        shared = np.minimum(encoded[i, support], encoded[n_query:, support]).sum(axis=1)
        jaccard[i] = 1.0 - shared / (encoded[i].sum() + encoded[n_query:].sum(axis=1) - shared)
    return (1.0 - lambda_value) * jaccard + lambda_value * distance[:n_query, n_query:]


def k_reciprocal_scores(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """:func:`k_reciprocal_distance` negated, so higher = closer like the other methods."""
    return -k_reciprocal_distance(query, gallery, k1, k2, lambda_value)


def ranking(scores: np.ndarray, query_labels, gallery_labels) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(query_index, first_hit_rank, average_precision)`` of a ``[Q, G]`` score matrix, for the
    queries whose label has a gallery entry: 0-based rank of the first relevant entry in a stable
    descending sort (equal scores: lower gallery position first, as
    :func:`helpers.evaluation.metrics.retrieval_metrics` ranks) and AP over the whole ranking."""
    scores = np.asarray(scores)
    query_labels, gallery_labels = np.asarray(query_labels, dtype=object), np.asarray(gallery_labels, dtype=object)
    if scores.ndim != 2 or scores.shape != (len(query_labels), len(gallery_labels)):
        raise InputError(
            f"scores of shape {scores.shape} for {len(query_labels)} query and {len(gallery_labels)} gallery labels"
        )
    order = np.argsort(-scores, axis=1, kind="stable")
    kept, first, precision = [], [], []
    for i, label in enumerate(query_labels):
        hits = np.flatnonzero(gallery_labels[order[i]] == label)
        if hits.size:
            kept.append(i)
            first.append(hits[0])
            precision.append(float(np.mean(np.arange(1, hits.size + 1) / (hits + 1))))
    return np.asarray(kept, dtype=np.int64), np.asarray(first, dtype=np.int64), np.asarray(precision)
