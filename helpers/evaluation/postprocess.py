"""Post-processing of a trained embedder's rankings, no training: pure functions on L2-normalised
``float32`` query ``[Q, D]`` and gallery ``[G, D]`` embeddings, each returning a ``[Q, G]`` score
matrix (higher = closer), and the registry of named methods (:data:`METHODS`,
:func:`create_postprocess`, :class:`PostProcess`) that the study compares and that the gallery
index, ``04_demo`` and the live demo apply once one is adopted. Any score matrix is ranked by
:func:`helpers.evaluation.metrics.score_metrics` (the one ranking routine).

- ``flip_tta`` changes the embeddings, not the ranking: each image is embedded with its horizontal
  flip averaged in (:mod:`helpers.evaluation.inference`), then scored by cosine;
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

from collections.abc import Callable
from dataclasses import dataclass, field

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


def check_lambda(lambda_value: float) -> float:
    if not 0.0 <= lambda_value <= 1.0:
        raise InputError(f"lambda must lie in [0, 1], got {lambda_value!r}")
    return float(lambda_value)


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
    return expand_queries(q, g[neighbours], np.take_along_axis(scores, neighbours, axis=1), alpha) @ g.T


def expand_queries(query: np.ndarray, neighbours: np.ndarray, similarities: np.ndarray, alpha: float) -> np.ndarray:
    """αQE's ``[Q, D]`` queries ``normalise(q + Σ_i max(s_i, 0)^α n_i)`` from each query's neighbour
    vectors ``[Q, k, D]`` and their similarities ``[Q, k]`` (found by any search: the gallery index
    passes its own)."""
    weights = np.maximum(similarities, 0.0) ** check_alpha(alpha)
    return normalise(query + np.einsum("qk,qkd->qd", weights, neighbours))


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
    k1, k2, lambda_value = check_positive(k1, "k1"), check_positive(k2, "k2"), check_lambda(lambda_value)
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


def k_reciprocal_each(query: np.ndarray, gallery: np.ndarray, k1: int, k2: int, lambda_value: float) -> np.ndarray:
    """:func:`k_reciprocal_scores` of each query alone with the gallery: the neighbour sets are
    built over the gallery and that one query, so a query ranks the same whichever queries are
    searched with it (one photo in the live demo as in the study's val and test evaluations)."""
    q, g = check_embeddings(query, gallery)
    return np.concatenate([k_reciprocal_scores(q[i : i + 1], g, k1, k2, lambda_value) for i in range(len(q))])


# --------------------------------------------------------------------------- the registry of named methods

# Each method alone against `none` (plain cosine on the plain embeddings). αQE / DBA: k = 2
# neighbours because a C2S item has few shop photos in the gallery (a larger k adds other items),
# α = 3 as Radenović et al.; k-reciprocal: the paper's k1 = 20, k2 = 6, λ = 0.3.
METHODS: dict[str, dict] = {
    "none": {},
    "flip_tta": {},
    "aqe": {"k": 2, "alpha": 3.0},
    "dba": {"k": 2, "alpha": 3.0},
    "k_reciprocal": {"k1": 20, "k2": 6, "lambda_value": 0.3},
}

_SCORERS: dict[str, Callable[..., np.ndarray]] = {
    "none": cosine_scores,
    "flip_tta": cosine_scores,  # on flip-TTA embeddings: the flip is made when embedding
    "aqe": alpha_query_expansion,
    "dba": database_augmentation,
    "k_reciprocal": k_reciprocal_each,
}

_CHECKS: dict[str, Callable] = {
    "k": lambda v: check_positive(v, "k"),
    "k1": lambda v: check_positive(v, "k1"),
    "k2": lambda v: check_positive(v, "k2"),
    "alpha": check_alpha,
    "lambda_value": check_lambda,
}


@dataclass(frozen=True)
class PostProcess:
    """One named method of :data:`METHODS` with its parameters (made by :func:`create_postprocess`)."""

    name: str = "none"
    params: dict = field(default_factory=dict)

    @property
    def flip_tta(self) -> bool:
        """True for ``flip_tta`` only: its query and gallery embeddings must be made with the
        horizontal flip averaged in (an embedding-time option); its scores are then cosine."""
        return self.name == "flip_tta"

    @property
    def scorer(self) -> Callable[[np.ndarray, np.ndarray], np.ndarray] | None:
        """:meth:`scores`, or None where they are plain cosine of the embeddings (``none``,
        ``flip_tta``): then the bounded-memory cosine search and metrics apply unchanged."""
        return None if self.name in ("none", "flip_tta") else self.scores

    def scores(self, query: np.ndarray, gallery: np.ndarray) -> np.ndarray:
        """``[Q, G]`` scores of the queries against the gallery, higher = better."""
        return _SCORERS[self.name](query, gallery, **self.params)

    def searched_gallery(self, gallery: np.ndarray) -> np.ndarray:
        """The vectors a query is compared with: DBA's augmented gallery (dense ``[G, G]``
        similarities once), else ``gallery`` itself."""
        return augmented_gallery(gallery, **self.params) if self.name == "dba" else gallery

    def label(self) -> str:
        """``aqe (k=2, alpha=3.0)``; ``none (cosine similarity)``: what a page or a table shows."""
        if self.name == "none":
            return "none (cosine similarity)"
        return self.name + (f" ({', '.join(f'{k}={v}' for k, v in self.params.items())})" if self.params else "")

    def to_json(self) -> dict:
        return {"name": self.name, "params": dict(self.params)}

    @classmethod
    def from_json(cls, record: dict) -> PostProcess:
        """The method :meth:`to_json` recorded, checked as :func:`create_postprocess` checks it."""
        if not isinstance(record, dict) or not isinstance(record.get("params", {}), dict):
            raise InputError(f"not a post-processing record: {record!r}")
        return create_postprocess(record.get("name"), **record.get("params", {}))


def create_postprocess(name: str, **params) -> PostProcess:
    """The method ``name`` of :data:`METHODS` with its default parameters, overridden by ``params``;
    an unknown name or parameter, or a bad value, is a one-line :class:`InputError`."""
    if name not in METHODS:
        raise InputError(f"unknown post-processing {name!r}; choose one of: {', '.join(METHODS)}")
    unknown = sorted(set(params) - set(METHODS[name]))
    if unknown:
        takes = ", ".join(METHODS[name]) or "no parameters"
        raise InputError(f"post-processing {name!r} takes {takes}, not {', '.join(unknown)}")
    merged = {**METHODS[name], **params}
    return PostProcess(name, {key: _CHECKS[key](value) for key, value in merged.items()})
