"""Retrieval metrics (Recall@K, mAP), bootstrap intervals and the evaluation protocols.

Definitions used everywhere in the project:

* **Ranking.** Each query ranks the whole gallery by inner product (cosine similarity on
  L2-normalised embeddings), highest first; equal scores are ordered by lower gallery
  position first, so every gallery entry has one well-defined 0-based rank.
* **Recall@K** = top-K accuracy = OML's ``cmc@k``: the fraction of queries with at least
  one gallery entry of the query's item among the top K. (Not "relevant found / relevant
  total", which is what mmfashion's evaluator reports.)
* **mAP**: the mean over queries of average precision over the *whole* gallery ranking,
  ``AP = (1/R) Σ_i i / (r_i + 1)`` where ``r_1 < r_2 < … < r_R`` are the 0-based ranks of
  the query's R relevant gallery entries.
* Queries whose item has no gallery entry cannot be scored: they are **excluded** from
  every mean and counted in ``n_excluded_queries``.
* **Intervals**: 95 % percentile bootstrap, by default over *items* (all queries of a drawn item
  together: photos of one garment are not independent); over single queries only when asked
  (:data:`INTERVALS`).

Protocols (which images are queries and which form the gallery) are documented in
:data:`PROTOCOLS` and :func:`protocol_sets`.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch

from helpers.core.arrays import ArrayLike, as_float32_tensor, chunks
from helpers.core.errors import InputError, choose
from helpers.core.schema import SPLITS, check_columns

DEFAULT_KS: tuple[int, ...] = (1, 5, 10, 20)
# The metric names of every result (metrics.json, runs.csv, tables): the one list of them.
METRICS: tuple[str, ...] = (*(f"recall@{k}" for k in DEFAULT_KS), "map")

PROTOCOLS: dict[str, str] = {
    "official": (
        "queries = unique consumer images of the evaluated split; gallery = unique shop "
        "images of val + test (split 'test'), of val only (split 'val', model selection), "
        "of train only (split 'train'); Recall@K = top-K accuracy (cmc@k)"
    ),
    "split": (
        "queries = unique consumer images of the evaluated split; gallery = unique shop "
        "images of that split only; Recall@K = top-K accuracy (cmc@k)"
    ),
    "original_pairs": (
        "the original study's pair-row protocol, for comparison with its table only: every "
        "consumer x shop pair of an item in the split is one row; queries = the consumer "
        "image of each row (repeated once per shop image of its item), gallery = the shop "
        "image of each row (repeated once per consumer image of its item, i.e. duplicated "
        "gallery entries); hit = any top-K gallery entry of the same item"
    ),
}

# The original study's pair-row protocol was called ``seed_pairs`` here before; the old name is
# still accepted (resolve_protocol says it was renamed).
RENAMED_PROTOCOLS: dict[str, str] = {"seed_pairs": "original_pairs"}


def resolve_protocol(name: str) -> str:
    """A protocol's current name; an old name is accepted with a one-line note on stderr."""
    if name in RENAMED_PROTOCOLS:
        new = RENAMED_PROTOCOLS[name]
        print(f"note: protocol {name!r} is now called {new!r}", file=sys.stderr)
        return new
    return choose(name, tuple(PROTOCOLS), "protocol")


# Gallery splits of the official protocol, by evaluated split.
_OFFICIAL_GALLERY_SPLITS: dict[str, tuple[str, ...]] = {
    "test": ("val", "test"),  # "the gallery set here are all the shop images in val + test"
    "val": ("val",),  # model selection must not look at test images
    "train": ("train",),
}

_MIB = 1024 * 1024


# ----------------------------------------------------------------------------------------
# Per-query metrics
# ----------------------------------------------------------------------------------------


def recall_at_k(first_hit_rank: np.ndarray, ks: Iterable[int] = DEFAULT_KS) -> dict[int, float]:
    """Recall@K (= top-K accuracy = OML ``cmc@k``) from each query's first-hit rank.

    ``first_hit_rank`` is **0-based**: 0 means the top-1 gallery entry is of the query's
    item. A query is a hit at K when ``first_hit_rank < K``. Excluded queries (no relevant
    gallery entry) must not be passed in. An empty input gives NaN.

    Four queries whose first relevant entry sits at ranks 0, 2, 7 and 1:

    >>> recall_at_k(np.array([0, 2, 7, 1]), ks=(1, 3, 10))
    {1: 0.25, 3: 0.75, 10: 1.0}

    (K=1: only rank 0 → 1/4; K=3: ranks 0, 2, 1 → 3/4; K=10: all four → 4/4.)
    """
    ranks = np.asarray(first_hit_rank)
    out: dict[int, float] = {}
    for k in ks:
        out[int(k)] = float(np.mean(ranks < k)) if ranks.size else float("nan")
    return out


def average_precision(relevant_ranks: Sequence[int] | np.ndarray) -> float:
    """Average precision of one query from the 0-based ranks of all its relevant entries.

    Relevant entries at ranks 0 and 2 give precisions 1/1 and 2/3:

    >>> round(average_precision([2, 0]), 4)
    0.8333
    """
    r = np.sort(np.asarray(relevant_ranks, dtype=np.int64))
    if r.size == 0:
        return float("nan")
    return float(np.mean(np.arange(1, r.size + 1) / (r + 1)))


@dataclass
class RetrievalResult:
    """Per-query results of :func:`retrieval_metrics` and their aggregates.

    The per-query arrays cover the *evaluated* queries only (those with at least one
    relevant gallery entry), in input order; ``query_index`` maps them back to positions
    in the query input.
    """

    ks: tuple[int, ...]
    query_index: np.ndarray  # int64 [n_queries]: positions in the query input
    first_hit_rank: np.ndarray  # int64 [n_queries]: 0-based rank of the first relevant entry
    average_precision: np.ndarray  # float64 [n_queries]: AP over the whole ranking
    n_relevant: np.ndarray  # int64 [n_queries]: relevant gallery entries per query
    n_excluded_queries: int
    n_gallery: int
    recall: dict[int, float] = field(default_factory=dict)
    map: float = float("nan")

    @property
    def n_queries(self) -> int:
        """Number of evaluated (non-excluded) queries."""
        return int(self.query_index.size)

    def hits(self, k: int) -> np.ndarray:
        """Per-query hit indicator at K (float 0/1), e.g. for bootstrapping Recall@K."""
        return (self.first_hit_rank < k).astype(np.float64)


def _encode_labels(query_labels: ArrayLike | Sequence, gallery_labels: ArrayLike | Sequence):
    """Integer codes for the labels: gallery codes 0..U-1, query codes (-1 = not in gallery).

    Works for strings ("id_00000001") and ints alike; labels are compared by equality.
    """
    g_codes, uniques = pd.factorize(pd.Series(np.asarray(gallery_labels, dtype=object)))
    q_codes = pd.Index(uniques).get_indexer(pd.Series(np.asarray(query_labels, dtype=object)))
    return np.asarray(q_codes, dtype=np.int64), np.asarray(g_codes, dtype=np.int64), len(uniques)


def _relevant_ranks(
    scores: torch.Tensor, columns: torch.Tensor, valid: torch.Tensor, elements_per_op: int
) -> torch.Tensor:
    """0-based ranks of gallery entries ``columns [c, m]`` in each score row ``scores [c, G]``.

    rank = #{entries scoring higher} + #{entries scoring equal at a lower gallery position}:
    the position in a stable descending sort, computed by counting instead of sorting (O(G)
    per relevant entry instead of O(G log G) per query, and no [c × G] index matrix). Each
    relevant entry's own score is read from the same matrix, so it compares exactly with
    itself. Slots where ``valid`` is False are padding; their rank is meaningless.

    The comparisons run on ``[rows, m, columns]`` slices of at most ``elements_per_op``
    elements: small enough to stay in cache (measured ~10x faster than comparing whole
    rows) and to bound the bool / int64 temporaries a counting reduction creates.
    """
    n_rows, n_gallery = scores.shape
    m = columns.shape[1]
    own = scores.gather(1, columns).masked_fill(~valid, float("inf"))  # padding counts nothing
    # Prefer >= 256 gallery columns per slice (contiguous inner loops), fewer rows if needed.
    row_block = max(1, min(n_rows, elements_per_op // (m * 256)))
    col_block = max(1, elements_per_op // (row_block * m))
    greater = torch.zeros(n_rows, m, dtype=torch.int64)
    equal = torch.zeros(n_rows, m, dtype=torch.int64)
    for r0, r1 in chunks(n_rows, row_block):
        o = own[r0:r1, :, None]
        for g0, g1 in chunks(n_gallery, col_block):
            block = scores[r0:r1, None, g0:g1]  # a view, no copy
            greater[r0:r1] += (block > o).sum(2)
            equal[r0:r1] += (block == o).sum(2)
    if not bool(((equal > 1) & valid).any()):
        return greater  # no entry shares its score with another: no tie to break
    # Ties (e.g. duplicated gallery images): add the equal-scoring entries at lower positions.
    lower = torch.zeros(n_rows, m, dtype=torch.int64)
    for r0, r1 in chunks(n_rows, row_block):
        o, cols = own[r0:r1, :, None], columns[r0:r1, :, None]
        for g0, g1 in chunks(n_gallery, col_block):
            block = scores[r0:r1, None, g0:g1]
            before = torch.arange(g0, g1) < cols  # [rows, m, cols] bool
            lower[r0:r1] += ((block == o) & before).sum(2)
    return greater + lower


def _memory_plan(memory_budget_mb: float, n_gallery: int, score_bytes: int) -> tuple[int, int]:
    """``(query rows per score chunk, elements per comparison slice)`` within the budget: half of
    it for a ``rows × G`` score chunk, the other half (and a cache-sized 1M elements) for the rank
    counting of :func:`_relevant_ranks` (~16 bytes per compared element: bool result, its int64
    cast inside sum(), a bool mask). One query row is the floor."""
    budget = max(int(memory_budget_mb * _MIB), 1)
    return max(1, (budget // 2) // (score_bytes * n_gallery)), max(1, min(1 << 20, (budget // 2) // 16))


def _check_labels(query_labels, gallery_labels, n_query: int, n_gallery: int) -> None:
    if len(query_labels) != n_query:
        raise InputError(f"{len(query_labels)} query labels for {n_query} query rows")
    if len(gallery_labels) != n_gallery:
        raise InputError(f"{len(gallery_labels)} gallery labels for {n_gallery} gallery rows")
    if n_gallery == 0:
        raise InputError("the gallery is empty")


def _check_ks(ks: Iterable[int]) -> tuple[int, ...]:
    ks = tuple(int(k) for k in ks)
    if not ks or min(ks) < 1:
        raise InputError(f"ks must be positive integers, got {ks}")
    return ks


def _ranked(
    score_rows: Callable[[np.ndarray], torch.Tensor],
    query_labels: ArrayLike | Sequence,
    gallery_labels: ArrayLike | Sequence,
    ks: tuple[int, ...],
    chunk_rows: int,
    elements_per_op: int,
) -> RetrievalResult:
    """The one ranking routine: first-hit rank and AP of every query with a relevant entry, from
    ``score_rows(query positions) -> [rows, G]`` scores, at most ``chunk_rows`` rows at a time.

    Queries are grouped by their number of relevant entries so each chunk's
    ``[c, max relevant]`` slot matrix has little padding.
    """
    n_query, n_gallery = len(query_labels), len(gallery_labels)
    q_codes, g_codes, n_labels = _encode_labels(query_labels, gallery_labels)
    # Gallery positions grouped by label: label c owns order[starts[c]:starts[c]+counts[c]].
    order = np.argsort(g_codes, kind="stable")
    counts = np.bincount(g_codes, minlength=n_labels)
    starts = np.concatenate([[0], np.cumsum(counts)[:-1]]).astype(np.int64)

    evaluated = np.flatnonzero(q_codes >= 0)
    n_rel = counts[q_codes[evaluated]].astype(np.int64)
    by_n_rel = np.argsort(n_rel, kind="stable")  # process queries grouped by relevant count

    first_hit = np.empty(evaluated.size, dtype=np.int64)
    ap = np.empty(evaluated.size, dtype=np.float64)
    for c0, c1 in chunks(evaluated.size, chunk_rows):
        sel = by_n_rel[c0:c1]  # positions in `evaluated`
        rows = evaluated[sel]
        scores = score_rows(rows)

        rel = n_rel[sel]
        slot = np.arange(rel.max())
        valid = slot[None, :] < rel[:, None]  # [c, m]
        codes = q_codes[rows]
        within = np.where(valid, starts[codes][:, None] + slot[None, :], 0)
        columns = order[within]  # gallery position of each relevant slot (padding: any)

        ranks = _relevant_ranks(scores, torch.from_numpy(columns), torch.from_numpy(valid), elements_per_op).numpy()
        # Padding sorts last (rank G is beyond any real rank); then slot i holds the i-th
        # best relevant rank, and AP = mean_i (i+1)/(rank_i+1) over the real slots.
        ranks = np.sort(np.where(valid, ranks, n_gallery), axis=1)
        first_hit[sel] = ranks[:, 0]
        precision = np.where(valid, (slot[None, :] + 1) / (ranks + 1), 0.0)
        ap[sel] = precision.sum(axis=1) / rel

    result = RetrievalResult(
        ks=ks,
        query_index=evaluated.astype(np.int64),
        first_hit_rank=first_hit,
        average_precision=ap,
        n_relevant=n_rel,
        n_excluded_queries=int(n_query - evaluated.size),
        n_gallery=int(n_gallery),
    )
    result.recall = recall_at_k(first_hit, ks)
    result.map = float(ap.mean()) if ap.size else float("nan")
    return result


def ranks_table(queries: pd.DataFrame, result: RetrievalResult) -> pd.DataFrame:
    """The per-query table of a retrieval (``val_ranks.csv``): one row per scored query of
    ``queries`` (``path``, ``item_id``, 0-based ``first_hit_rank``, ``average_precision``), sorted
    by path, what the study's paired statistics read."""
    scored = queries.iloc[result.query_index]
    ranks = pd.DataFrame(
        {
            "path": scored.path.to_numpy(),
            "item_id": scored.item_id.to_numpy(),
            "first_hit_rank": result.first_hit_rank,
            "average_precision": result.average_precision,
        }
    )
    return ranks.sort_values("path", kind="stable").reset_index(drop=True)


def score_metrics(
    scores: ArrayLike,
    query_labels: ArrayLike | Sequence,
    gallery_labels: ArrayLike | Sequence,
    ks: Iterable[int] = DEFAULT_KS,
    memory_budget_mb: float = 256,
) -> RetrievalResult:
    """Recall@K and mAP of any ``[Q, G]`` score matrix (higher = better), e.g. a post-processing
    method's (:class:`helpers.evaluation.postprocess.PostProcess`), ranked exactly as
    :func:`retrieval_metrics` ranks cosine similarities (it calls the same routine). The scores
    keep their dtype (float64 re-ranked distances are not rounded into ties); the rank counting
    stays within the budget, the matrix itself is the caller's.

    >>> result = score_metrics([[0.5, 0.9, 0.5]], ["a"], ["b", "a", "a"])
    >>> result.first_hit_rank.tolist(), round(result.map, 4)  # order 1, 0, 2: relevant at ranks 0 and 2
    ([0], 0.8333)
    """
    ks = _check_ks(ks)
    matrix = np.asarray(scores)
    if matrix.ndim != 2:
        raise InputError(f"scores must be a [queries, gallery] matrix, got shape {matrix.shape}")
    if matrix.dtype not in (np.float32, np.float64):
        matrix = matrix.astype(np.float64)
    if not np.isfinite(matrix).all():
        raise InputError("scores contain NaN or infinite values")
    _check_labels(query_labels, gallery_labels, *matrix.shape)
    tensor = torch.from_numpy(np.ascontiguousarray(matrix))
    chunk_rows, elements_per_op = _memory_plan(memory_budget_mb, matrix.shape[1], matrix.itemsize)
    return _ranked(
        lambda rows: tensor[torch.from_numpy(rows)], query_labels, gallery_labels, ks, chunk_rows, elements_per_op
    )


def retrieval_metrics(
    query_emb: ArrayLike,
    query_labels: ArrayLike | Sequence,
    gallery_emb: ArrayLike,
    gallery_labels: ArrayLike | Sequence,
    ks: Iterable[int] = DEFAULT_KS,
    memory_budget_mb: float = 256,
    scorer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> RetrievalResult:
    """Recall@K and mAP of queries against a gallery, with bounded memory.

    Queries are processed in chunks of ``c`` rows whose ``c × G`` float32 score block
    takes at most half the budget; the rank counting (see :func:`_relevant_ranks`) works on
    slices bounded by the other half (and by a cache-sized 1M elements). One query row
    against the whole gallery is the floor, so a budget below ``4·G`` bytes is exceeded
    rather than refused.

    ``scorer(query_emb, gallery_emb) -> [Q, G]`` ranks by its scores instead of cosine (e.g.
    :attr:`helpers.evaluation.postprocess.PostProcess.scorer`), through :func:`score_metrics`:
    its whole matrix is made at once, outside the budget.

    Labels may be strings or ints. Queries whose label has no gallery entry are excluded
    and counted. Ties are ranked by lower gallery position first (see module docstring).
    """
    ks = _check_ks(ks)
    q = as_float32_tensor(query_emb, "query embeddings")
    g = as_float32_tensor(gallery_emb, "gallery embeddings")
    n_gallery = g.shape[0]
    _check_labels(query_labels, gallery_labels, q.shape[0], n_gallery)
    if q.shape[1] != g.shape[1]:
        raise InputError(f"query dim {q.shape[1]} does not match gallery dim {g.shape[1]}")
    if scorer is not None:
        return score_metrics(scorer(q.numpy(), g.numpy()), query_labels, gallery_labels, ks, memory_budget_mb)

    chunk_rows, elements_per_op = _memory_plan(memory_budget_mb, n_gallery, 4)
    buffer: list[torch.Tensor] = []  # the largest (first) chunk's block, reused by the others

    def cosine_rows(rows: np.ndarray) -> torch.Tensor:
        if not buffer:
            buffer.append(torch.empty(rows.size * n_gallery, dtype=torch.float32))
        scores = buffer[0][: rows.size * n_gallery].view(rows.size, n_gallery)
        return torch.mm(q[torch.from_numpy(rows)], g.T, out=scores)

    return _ranked(cosine_rows, query_labels, gallery_labels, ks, chunk_rows, elements_per_op)


# ----------------------------------------------------------------------------------------
# Bootstrap confidence intervals
# ----------------------------------------------------------------------------------------


# How the intervals resample, by name: the ``ci`` string of a result begins with its description.
INTERVALS: dict[str, str] = {
    # The consumer photos of one item are not independent (same garment, often the same shop
    # photos to find): resampling them one by one gave intervals 15-31 % too narrow.
    "items": "percentile bootstrap over items (all queries of an item together)",
    "queries": "percentile bootstrap over queries",
}


def _unit_totals(values: np.ndarray, items: ArrayLike | Sequence | None) -> tuple[np.ndarray, np.ndarray]:
    """``(sums [n_units, m], counts [n_units])`` of the resampled units: one per query without
    ``items``, else one per item (numbered in order of first appearance) holding its queries."""
    if items is None:
        return values, np.ones(len(values), dtype=np.int64)
    if len(items) != len(values):
        raise InputError(f"{len(items)} item labels for {len(values)} per-query values")
    codes, uniques = pd.factorize(pd.Series(np.asarray(items, dtype=object)))
    sums = np.column_stack([np.bincount(codes, weights=column, minlength=len(uniques)) for column in values.T])
    return sums, np.bincount(codes, minlength=len(uniques))


def _bootstrap_means(values: np.ndarray, n_boot: int, seed: int, items=None) -> np.ndarray:
    """Means of ``n_boot`` resamples (with replacement) of ``values [n, m]``: of rows, or with
    ``items`` (one label per row) of items, each drawn item bringing all its rows, so a replicate's
    mean is ``Σ drawn sums / Σ drawn counts`` (an item weighs as many rows as it has).

    All columns share the same resamples. Vectorised in batches of replicates so the
    ``[batch, units]`` index and gathered matrices stay under ~32 MiB each; the batching
    depends only on the number of units, so a seed always gives the same replicates.
    """
    sums, counts = _unit_totals(values, items)
    n = len(counts)
    rng = np.random.default_rng(seed)
    batch = max(1, (32 * _MIB) // (8 * n))
    means = np.empty((n_boot, values.shape[1]), dtype=np.float64)
    for b0, b1 in chunks(n_boot, batch):
        idx = rng.integers(0, n, size=(b1 - b0, n))
        drawn = counts[idx].sum(axis=1)
        for j in range(values.shape[1]):
            means[b0:b1, j] = sums[idx, j].sum(axis=1) / drawn
    return means


def bootstrap_ci(
    per_query_values: ArrayLike | Sequence[float],
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    items: ArrayLike | Sequence | None = None,
) -> tuple[float, float]:
    """Percentile bootstrap ``(low, high)`` interval of the mean over queries.

    ``per_query_values`` are e.g. hit indicators (for Recall@K) or APs (for mAP). Without
    ``items`` queries are resampled one by one; with ``items`` (each query's item label) items
    are resampled, all queries of a drawn item together (see :func:`_bootstrap_means`), as
    :func:`evaluate_protocol` does by default. Seeded, so the same inputs and seed give the same
    interval. Empty input gives ``(nan, nan)``.
    """
    values = np.asarray(per_query_values, dtype=np.float64).reshape(-1)
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 1:
        raise InputError(f"n_boot must be >= 1, got {n_boot}")
    if values.size == 0:
        return float("nan"), float("nan")
    means = _bootstrap_means(values[:, None], n_boot, seed, items)[:, 0]
    low, high = np.quantile(means, [alpha / 2, 1 - alpha / 2])
    return float(low), float(high)


# ----------------------------------------------------------------------------------------
# Protocols
# ----------------------------------------------------------------------------------------


def protocol_sets(
    table: pd.DataFrame, split: str = "test", protocol: str = "official"
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Query rows and gallery rows of ``table`` (one row per image) under a named protocol.

    The index of both returned frames is the **row position in** ``table`` (0 … len-1,
    whatever ``table``'s own index was), i.e. the row of an embedding array aligned with
    the table. Rows keep all of the table's columns.

    Protocols (``domain`` is ``consumer``/``shop``, ``split`` is ``train``/``val``/``test``):

    * ``official`` (default): queries = unique consumer images of ``split``; gallery =
      unique shop images of val + test for ``split='test'`` (the benchmark's note: "the
      gallery set here are all the shop images in val + test"), of val only for
      ``split='val'`` (model selection must not see test), of train only for
      ``split='train'``.
    * ``split``: queries as above; gallery = unique shop images of ``split`` only.
    * ``original_pairs``: the original study's non-standard pair-row protocol, kept **only** to
      compare with its table. Every consumer × shop pair of an item within ``split`` is one
      row (the official partition list enumerates pairs; from a one-row-per-image table
      they are rebuilt as each item's full consumer × shop product). The query list is
      the consumer image of each row, so a consumer image repeats once per shop image of
      its item; the gallery is the shop image of each row, so each shop image repeats once
      per consumer image of its item (duplicated gallery entries). A hit is any top-K
      gallery entry of the same item. Example: an item with 2 consumer and 3 shop images
      contributes 2·3 = 6 query rows and 6 gallery entries (each shop image twice).
      Items with no shop (or no consumer) image in the split form no pair, so this
      protocol never excludes a query. Duplicates crowd the top K with copies of the
      same image, so Recall@K measures something else: not comparable with published numbers.

    "Unique" means de-duplicated by ``path``. Raises :class:`InputError` for an unknown
    protocol or split, missing columns, or an empty query or gallery set.
    """
    protocol = resolve_protocol(protocol)
    choose(split, SPLITS, "split")
    check_columns(table, ("path", "item_id", "domain", "split"))

    rows = table.reset_index(drop=True)  # index = position = embedding row
    in_split = rows["split"] == split
    consumer = rows[(rows["domain"] == "consumer") & in_split].drop_duplicates("path")

    if protocol == "original_pairs":
        shop = rows[(rows["domain"] == "shop") & in_split].drop_duplicates("path")
        pairs = pd.merge(
            pd.DataFrame({"item_id": consumer["item_id"].to_numpy(), "q": consumer.index}),
            pd.DataFrame({"item_id": shop["item_id"].to_numpy(), "g": shop.index}),
            on="item_id",
            how="inner",
        ).sort_values(["q", "g"], kind="stable")
        queries, gallery = rows.loc[pairs["q"].to_numpy()], rows.loc[pairs["g"].to_numpy()]
        where = f"split {split!r}"
        q_what = g_what = "item with both consumer and shop images in the split"
    else:
        gallery_splits = _OFFICIAL_GALLERY_SPLITS[split] if protocol == "official" else (split,)
        gallery = rows[(rows["domain"] == "shop") & rows["split"].isin(gallery_splits)]
        gallery = gallery.drop_duplicates("path")
        queries = consumer
        where = f"split {split!r}"
        q_what = "consumer images"
        g_what = f"shop images in {'+'.join(gallery_splits)}"

    if len(queries) == 0:
        raise InputError(f"protocol {protocol!r}, {where}: no queries (no {q_what})")
    if len(gallery) == 0:
        raise InputError(f"protocol {protocol!r}, {where}: empty gallery (no {g_what})")
    return queries, gallery


def evaluate_protocol(
    table: pd.DataFrame,
    embeddings: ArrayLike,
    split: str = "test",
    protocol: str = "official",
    ks: Iterable[int] = DEFAULT_KS,
    memory_budget_mb: float = 256,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    interval: str = "items",
    scorer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> dict:
    """Evaluate embeddings under a protocol; returns the ``metrics.json`` dictionary.

    Args:
        table: the image table (``images.csv``), one row per image.
        embeddings: ``[len(table), D]``, row ``i`` embedding table row ``i`` (by position,
            not by index label).
        split, protocol: see :func:`protocol_sets`.
        ks: the K of Recall@K; the ``metrics.json`` contract needs 1, 5, 10 and 20 (the
            default).
        memory_budget_mb: bound on the search's working memory (see
            :func:`retrieval_metrics`).
        n_boot, seed, alpha: the percentile bootstrap of the intervals.
        interval: what the bootstrap resamples (:data:`INTERVALS`): ``items`` (default: all
            queries of a drawn item together, as they are not independent) or ``queries``.
        scorer: ranks by these scores instead of cosine (see :func:`retrieval_metrics`), e.g.
            the post-processing method a caller applies.

    Returns plain JSON-serialisable values: ``recall@K`` per K, ``map``, ``n_queries``
    (evaluated), ``n_excluded_queries``, ``n_gallery`` (entries, duplicates included),
    ``n_unique_query_images``, ``n_unique_gallery_images``, ``protocol``,
    ``protocol_definition``, ``split``, ``recall@K_ci`` and ``map_ci`` as ``[low, high]``,
    ``ci`` (how the intervals were made), ``rank_base`` and ``per_category`` (by the query's
    ``category``: ``recall@K``, ``map``, ``n_queries``; empty if the table has no
    ``category`` column). Raises :class:`InputError` when no query can be scored.
    """
    ks = tuple(int(k) for k in ks)
    choose(interval, tuple(INTERVALS), "interval")
    queries, gallery, res = protocol_retrieval(table, embeddings, split, protocol, ks, memory_budget_mb, scorer)
    return summarise_retrieval(queries, gallery, res, split, protocol, ks, n_boot, seed, alpha, interval)


def protocol_retrieval(
    table: pd.DataFrame,
    embeddings: ArrayLike,
    split: str = "test",
    protocol: str = "official",
    ks: Iterable[int] = DEFAULT_KS,
    memory_budget_mb: float = 256,
    scorer: Callable[[np.ndarray, np.ndarray], np.ndarray] | None = None,
) -> tuple[pd.DataFrame, pd.DataFrame, RetrievalResult]:
    """``(queries, gallery, per-query result)`` of the embeddings under a protocol (the ranking
    :func:`evaluate_protocol` summarises; see it for the arguments). Raises :class:`InputError`
    when no query can be scored."""
    ks = tuple(int(k) for k in ks)
    if isinstance(embeddings, torch.Tensor):
        embeddings = embeddings.detach().cpu().numpy()
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] != len(table):
        raise InputError(f"embeddings have shape {emb.shape}; expected [{len(table)}, dim], one row per table row")
    protocol = resolve_protocol(protocol)
    queries, gallery = protocol_sets(table, split, protocol)
    q_pos, g_pos = queries.index.to_numpy(), gallery.index.to_numpy()
    res = retrieval_metrics(
        emb[q_pos],
        queries["item_id"].to_numpy(),
        emb[g_pos],
        gallery["item_id"].to_numpy(),
        ks=ks,
        memory_budget_mb=memory_budget_mb,
        scorer=scorer,
    )
    if res.n_queries == 0:
        raise InputError(
            f"protocol {protocol!r}, split {split!r}: none of the {len(queries)} queries has a "
            "gallery image of its item"
        )

    return queries, gallery, res


def summarise_retrieval(
    queries: pd.DataFrame,
    gallery: pd.DataFrame,
    res: RetrievalResult,
    split: str,
    protocol: str,
    ks: Iterable[int] = DEFAULT_KS,
    n_boot: int = 1000,
    seed: int = 0,
    alpha: float = 0.05,
    interval: str = "items",
) -> dict:
    """The ``metrics.json`` dictionary of a :func:`protocol_retrieval` (see :func:`evaluate_protocol`)."""
    ks, protocol = tuple(int(k) for k in ks), resolve_protocol(protocol)
    out: dict = {
        "protocol": protocol,
        "protocol_definition": PROTOCOLS[protocol],
        "split": split,
    }
    for k in ks:
        out[f"recall@{k}"] = res.recall[k]
    out["map"] = res.map
    out["n_queries"] = res.n_queries
    out["n_excluded_queries"] = res.n_excluded_queries
    out["n_gallery"] = res.n_gallery
    out["n_unique_query_images"] = int(queries["path"].nunique())
    out["n_unique_gallery_images"] = int(gallery["path"].nunique())

    # One set of resamples for every metric, so the intervals are mutually consistent.
    per_query = np.column_stack([res.hits(k) for k in ks] + [res.average_precision])
    items = queries["item_id"].to_numpy()[res.query_index] if interval == "items" else None
    means = _bootstrap_means(per_query, n_boot, seed, items)
    bounds = np.quantile(means, [alpha / 2, 1 - alpha / 2], axis=0)
    for j, name in enumerate([f"recall@{k}" for k in ks] + ["map"]):
        out[f"{name}_ci"] = [float(bounds[0, j]), float(bounds[1, j])]
    out["ci"] = f"{INTERVALS[interval]}, {int(round((1 - alpha) * 100))}%, n_boot={n_boot}, seed={seed}"
    out["rank_base"] = "Recall@K counts a hit when the first relevant entry has 0-based rank < K"

    per_category: dict[str, dict] = {}
    if "category" in queries.columns:
        cats = queries["category"].astype(str).to_numpy()[res.query_index]
        for cat in sorted(set(cats)):
            mask = cats == cat
            entry = {f"recall@{k}": float(res.hits(k)[mask].mean()) for k in ks}
            entry["map"] = float(res.average_precision[mask].mean())
            entry["n_queries"] = int(mask.sum())
            per_category[cat] = entry
    out["per_category"] = per_category
    return out
