"""Gallery search at scale: exact (the default) or a FAISS approximate index, and streamed
embedding files.

Layout of this module:

1. ``AnnParams``: the index kind and its parameters, validated and resolved (``resolve``)
   against the gallery size and dimension, so what is recorded is what was built.
2. ``AnnIndex``: build (train on a seeded sample, add the gallery in chunks), search,
   recall@10 against exact search, atomic save / load.
3. ``EmbeddingWriter``: a memory-mapped ``.npy`` written batch by batch, so extracting a
   gallery of millions of images holds one batch in memory, not the whole matrix.

Kinds (all inner product; on L2-normalised embeddings that is cosine similarity):

* ``exact``: the caller's exact search over the embeddings, :func:`helpers.evaluation.search.exact_topk`
  (bounded memory; a memory-mapped file works); nothing is trained or stored besides the
  embeddings. ``retrieval`` sits above this module (it builds the gallery index from it), so
  the exact search is passed in (``exact_search=``), never imported from here.
* ``ivf_flat``: ``IndexIVFFlat``: k-means into ``nlist`` lists, a query scans the ``nprobe``
  nearest lists exactly. Stores a full float32 copy of the gallery.
* ``ivf_pq``: ``IndexIVFPQ``: the same lists, vectors compressed to ``m`` codes of ``nbits``
  bits (``m · nbits / 8`` bytes each): the kind whose memory fits millions of vectors.
* ``hnsw``: ``IndexHNSWFlat``: a graph with ``M`` links per node, ``efSearch`` candidates per
  query; no training, the largest build time and memory (vectors + links).

"Recall@10 against exact" (``recall_at_10``) is the share of the exact top-10 neighbours of
a query that the approximate top-10 contains, averaged over the sample queries; it is a
property of the index, not of the model (Recall@K in ``metrics`` is about matching items).
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from helpers.core.errors import InputError
from helpers.core.files import save_atomic, write_text_atomic
from helpers.core.progress import progress_bar

KINDS: tuple[str, ...] = ("exact", "ivf_flat", "ivf_pq", "hnsw")
APPROXIMATE_KINDS: tuple[str, ...] = KINDS[1:]
# (query [Q, D], gallery [n, D], k) → (scores float32 [Q, k], indices int64 [Q, k]), best first:
# the contract of helpers.evaluation.search.exact_topk.
ExactSearch = Callable[[np.ndarray, np.ndarray, int], "tuple[np.ndarray, np.ndarray]"]

# Rows handed to faiss / checked per step when streaming a (memory-mapped) gallery: 64k ×
# 256 float32 = 64 MiB, large enough that the per-call overhead is invisible.
_ADD_CHUNK_ROWS = 65_536
# Embeddings are expected L2-normalised (inner product = cosine). Float32 normalisation
# leaves |norm - 1| around 1e-7; 1e-3 also tolerates bf16-autocast models' float32 output
# being normalised after the cast, while still catching un-normalised features (norms ≫ 1).
_NORM_TOLERANCE = 1e-3
# faiss warns below 39 training points per centroid (its k-means gets unstable); ask for
# 64 per list by default, as its wiki recommends 30–256.
_TRAIN_POINTS_PER_LIST = 64
# PQ needs 2**nbits centroids per sub-quantizer, trained on the same sample.
_TRAIN_POINTS_PER_PQ_CENTROID = 39


# ----------------------------------------------------------------------------------------
# 1. Parameters
# ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class AnnParams:
    """An index kind and its parameters. ``None`` means "derive from the gallery" (``resolve``).

    * ``nlist`` (IVF): lists; default the power of two nearest √n (1024 for 1M). faiss's
      guideline is 4√n–16√n for the best speed at fixed recall; √n trains 4–16× faster,
      which is what fits a 2-core build, and ``nprobe`` buys the recall back.
    * ``nprobe`` (IVF): lists scanned per query.
    * ``m``, ``nbits`` (IVF-PQ): sub-quantizers (must divide the dimension) and bits each.
    * ``hnsw_m``, ``ef_construction``, ``ef_search`` (HNSW): links per node, candidate list
      size while building and while searching.
    * ``train_size``: vectors sampled (without replacement, ``seed``) to train IVF / PQ;
      default ``64 · nlist`` (and ≥ ``39 · 2**nbits`` for PQ), at most n.
    * ``seed``: the training sample and faiss's k-means seed. HNSW's level draw uses faiss's
      fixed internal seed; a multi-threaded HNSW build is not bit-reproducible.
    """

    kind: str = field(default="exact", metadata={"help": "exact: chunked exact search; ivf_flat, ivf_pq, hnsw: faiss"})
    nlist: int | None = field(default=None, metadata={"help": "IVF lists; None: the power of two nearest sqrt(n)"})
    nprobe: int = field(default=16, metadata={"help": "IVF lists scanned per query"})
    m: int = field(default=32, metadata={"help": "IVF-PQ sub-quantizers (must divide the dimension)"})
    nbits: int = field(default=8, metadata={"help": "IVF-PQ bits per code"})
    hnsw_m: int = field(default=32, metadata={"help": "HNSW links per node"})
    ef_construction: int = field(default=40, metadata={"help": "HNSW candidate list size while building"})
    ef_search: int = field(default=64, metadata={"help": "HNSW candidate list size while searching"})
    train_size: int | None = field(
        default=None, metadata={"help": "vectors sampled to train IVF / PQ; None: 64 x nlist (PQ: >= 39 x 2**nbits)"}
    )
    seed: int = field(default=0, metadata={"help": "seed of the training sample and of faiss's k-means"})

    def resolve(self, n: int, dim: int) -> AnnParams:
        """Check the parameters against a gallery of ``n`` × ``dim`` and fill the defaults.

        Raises :class:`InputError` with the parameter at fault.
        """
        if self.kind not in KINDS:
            raise InputError(f"unknown index kind {self.kind!r}; choose one of {', '.join(KINDS)}")
        if n < 1:
            raise InputError("the gallery is empty")
        for name in ("nprobe", "m", "nbits", "hnsw_m", "ef_construction", "ef_search"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.seed < 0:
            raise InputError(f"seed must be >= 0, got {self.seed}")
        if self.kind in ("exact", "hnsw"):
            return replace(self, nlist=None, train_size=None)
        nlist = self.nlist if self.nlist is not None else max(1, 2 ** round(math.log2(math.sqrt(n))))
        if not 1 <= nlist <= n:
            raise InputError(f"nlist must be between 1 and the gallery size {n}, got {nlist}")
        needed = nlist
        if self.kind == "ivf_pq":
            if dim % self.m:
                raise InputError(f"m={self.m} sub-quantizers must divide the embedding dimension {dim}")
            if self.nbits > 16:
                raise InputError(f"nbits must be <= 16, got {self.nbits}")
            needed = max(nlist, 2**self.nbits)
        train_size = self.train_size
        if train_size is None:
            wish = _TRAIN_POINTS_PER_LIST * nlist
            if self.kind == "ivf_pq":
                wish = max(wish, _TRAIN_POINTS_PER_PQ_CENTROID * 2**self.nbits)
            train_size = min(n, wish)
        if not needed <= train_size <= n:
            raise InputError(
                f"train_size must be between {needed} (nlist"
                f"{' and 2**nbits' if self.kind == 'ivf_pq' else ''}) and the gallery size {n}, got {train_size}"
            )
        return replace(self, nlist=int(nlist), train_size=int(train_size))

    def recorded(self) -> dict:
        """The parameters that matter for this kind (what ``index.json`` records)."""
        keys = {
            "exact": ("kind",),
            "ivf_flat": ("kind", "nlist", "nprobe", "train_size", "seed"),
            "ivf_pq": ("kind", "nlist", "nprobe", "m", "nbits", "train_size", "seed"),
            "hnsw": ("kind", "hnsw_m", "ef_construction", "ef_search", "seed"),
        }[self.kind]
        values = asdict(self)
        return {key: values[key] for key in keys}

    @classmethod
    def from_dict(cls, record: dict) -> AnnParams:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(record) - known)
        if unknown:
            raise InputError(f"unknown index parameter(s) {', '.join(unknown)}")
        return cls(**record)


# ----------------------------------------------------------------------------------------
# 2. The index
# ----------------------------------------------------------------------------------------


def _as_rows(x: np.ndarray, name: str) -> np.ndarray:
    """A float32 C-contiguous 2-D array (copied only when it is not one already: faiss
    reads raw memory)."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise InputError(f"{name} must be 2-D [n, dim], got shape {tuple(x.shape)}")
    return np.ascontiguousarray(x, dtype=np.float32)


def _check_chunk(chunk: np.ndarray, start: int, name: str) -> None:
    """Finite and L2-normalised rows, or an InputError naming the first bad row."""
    finite = np.isfinite(chunk).all(axis=1)
    if not finite.all():
        raise InputError(f"{name} row {start + int(np.argmin(finite))} contains NaN or infinite values")
    norms = np.linalg.norm(chunk, axis=1)
    bad = np.abs(norms - 1.0) > _NORM_TOLERANCE
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(
            f"{name} row {start + row} has L2 norm {norms[row]:.4g}; inner-product indexes need "
            "L2-normalised embeddings"
        )


def recall_at_k(approx: np.ndarray, exact: np.ndarray, k: int = 10) -> float:
    """Mean over queries of |approx top-k ∩ exact top-k| / k (``-1`` padding never matches)."""
    approx, exact = np.asarray(approx)[:, :k], np.asarray(exact)[:, :k]
    if approx.shape[0] != exact.shape[0]:
        raise InputError(f"recall needs as many approximate ({approx.shape[0]}) as exact ({exact.shape[0]}) rows")
    if approx.shape[0] == 0:
        raise InputError("recall needs at least one query")
    hits = sum(len(np.intersect1d(a[a >= 0], e)) for a, e in zip(approx, exact))
    return hits / float(exact.shape[0] * exact.shape[1])


def sample_rows(n: int, size: int, seed: int) -> np.ndarray:
    """``size`` distinct row numbers of ``range(n)``, sorted (sequential reads on a memmap)."""
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, size=min(size, n), replace=False))


class AnnIndex:
    """A search structure over a gallery of L2-normalised embeddings (rows = gallery order).

    ``index`` is the faiss index (``None`` for ``exact``, which searches ``embeddings``);
    ``meta`` records the kind, the resolved parameters, the gallery shape, the build time and,
    when measured, ``recall_at_10`` with the number and source of the queries.
    """

    def __init__(
        self,
        params: AnnParams,
        embeddings: np.ndarray | None,
        index=None,
        meta: dict | None = None,
        exact_search: ExactSearch | None = None,
    ):
        self.params, self.embeddings, self.index = params, embeddings, index
        self.meta = dict(meta or {})
        self.exact_search = exact_search

    def _exact(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        if self.exact_search is None or self.embeddings is None:
            raise InputError("exact search needs the gallery embeddings and an exact search function")
        return self.exact_search(query, self.embeddings, k)

    # -- build ---------------------------------------------------------------------------

    @classmethod
    def build(
        cls,
        embeddings: np.ndarray,
        params: AnnParams | None = None,
        *,
        exact_search: ExactSearch,
        recall_queries: np.ndarray | None = None,
        n_recall: int = 1000,
        progress: bool = True,
    ) -> AnnIndex:
        """Build ``params.kind`` over ``embeddings`` (``[n, dim]``; a memory-mapped array is
        read chunk by chunk, never copied whole) and measure its recall@10 against exact search.

        ``recall_queries``: the queries for the recall check; default ``n_recall`` gallery
        rows sampled with the seed (a gallery row finds itself first in both searches, so
        it inflates recall@1, but recall@10 still counts the other nine). ``n_recall=0``
        skips the check (e.g. a benchmark that measures it against a shared ground truth).
        """
        import faiss  # lazy: heavy, and only this module's approximate kinds need it

        params = params or AnnParams()
        if embeddings.ndim != 2:
            raise InputError(f"embeddings must be 2-D [n, dim], got shape {tuple(embeddings.shape)}")
        n, dim = int(embeddings.shape[0]), int(embeddings.shape[1])
        params = params.resolve(n, dim)
        started = time.perf_counter()
        index = None
        if params.kind == "exact":
            # Validate once here (chunked), so a bad gallery fails at build, not at query time.
            for start in range(0, n, _ADD_CHUNK_ROWS):
                _check_chunk(_as_rows(embeddings[start : start + _ADD_CHUNK_ROWS], "embeddings"), start, "embeddings")
        else:
            index = cls._new_faiss_index(faiss, params, dim)
            if params.kind != "hnsw":
                rows = sample_rows(n, params.train_size, params.seed)
                sample = _as_rows(embeddings[rows], "embeddings")
                _check_chunk(sample, 0, "training sample")
                index.train(sample)
                del sample
            bar = progress_bar(
                total=n, desc=f"adding to {params.kind}", unit="vec", disable=not progress, leave=False, mininterval=2.0
            )
            for start in range(0, n, _ADD_CHUNK_ROWS):
                chunk = _as_rows(embeddings[start : start + _ADD_CHUNK_ROWS], "embeddings")
                _check_chunk(chunk, start, "embeddings")
                index.add(chunk)
                bar.update(len(chunk))
            bar.close()
        meta = {
            **params.recorded(),
            "n": n,
            "dim": dim,
            "metric": "inner_product",
            "build_seconds": round(time.perf_counter() - started, 3),
            "faiss_version": faiss.__version__,
        }
        built = cls(params, embeddings, index, meta, exact_search)
        if params.kind == "exact":  # the reference itself: 1 by definition, nothing to measure
            built.meta.update({"recall_at_10": 1.0, "recall_queries": 0, "recall_query_source": "exact search"})
        elif recall_queries is not None or n_recall > 0:
            built.measure_recall(recall_queries, n_recall=n_recall)
        return built

    @staticmethod
    def _new_faiss_index(faiss, params: AnnParams, dim: int):
        metric = faiss.METRIC_INNER_PRODUCT
        if params.kind == "hnsw":
            index = faiss.IndexHNSWFlat(dim, params.hnsw_m, metric)
            index.hnsw.efConstruction = params.ef_construction
            index.hnsw.efSearch = params.ef_search
            return index
        quantizer = faiss.IndexFlatIP(dim)
        if params.kind == "ivf_flat":
            index = faiss.IndexIVFFlat(quantizer, dim, params.nlist, metric)
        else:
            index = faiss.IndexIVFPQ(quantizer, dim, params.nlist, params.m, params.nbits, metric)
            index.pq.cp.seed = params.seed
        index.cp.seed = params.seed
        # The quantizer must outlive the index: faiss's Python wrapper keeps a reference to
        # it (referenced_objects), and read_index gives the loaded index its own.
        index.nprobe = params.nprobe
        return index

    # -- search --------------------------------------------------------------------------

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Top-``k`` of each query row: ``float32 [Q, min(k, n)]`` scores, ``int64`` gallery rows.

        Same contract as :func:`helpers.evaluation.search.exact_topk`, except that an approximate
        index may find fewer than ``k`` neighbours (an IVF probe of near-empty lists): those
        slots hold index ``-1`` and score ``-inf``.
        """
        query = _as_rows(query, "query")
        n, dim = self.meta.get("n"), self.meta.get("dim")
        if query.shape[1] != dim:
            raise InputError(f"query dim {query.shape[1]} does not match the index dim {dim}")
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        k = min(int(k), int(n))
        if self.index is None:
            return self._exact(query, k)
        if not np.isfinite(query).all():
            raise InputError("query contains NaN or infinite values")
        if query.shape[0] == 0:
            return np.empty((0, k), np.float32), np.empty((0, k), np.int64)
        scores, indices = self.index.search(query, k)
        scores = scores.astype(np.float32, copy=False)
        scores[indices < 0] = -np.inf  # faiss pads with -1 and a sentinel score
        return scores, indices.astype(np.int64, copy=False)

    def measure_recall(
        self,
        queries: np.ndarray | None = None,
        *,
        n_recall: int = 1000,
        k: int = 10,
        exact_indices: np.ndarray | None = None,
    ) -> float:
        """Recall@``k`` of this index against exact search; stored in ``meta`` and returned.

        ``exact_indices`` may pass a ground truth already computed for ``queries`` (the
        exact top-``k`` from :func:`helpers.evaluation.search.exact_topk`) to avoid recomputing it.
        """
        n = int(self.meta["n"])
        if queries is None:
            if n_recall < 1:
                raise InputError(f"n_recall must be >= 1, got {n_recall}")
            rows = sample_rows(n, n_recall, self.params.seed + 1)
            queries, source = _as_rows(self.embeddings[rows], "embeddings"), "gallery_sample"
        else:
            queries, source = _as_rows(queries, "recall queries"), "given"
        key, k = f"recall_at_{k}", min(k, n)  # a gallery smaller than k: all of it is the top-k
        if exact_indices is None:
            _, exact_indices = self._exact(queries, k)
        _, approx = self.search(queries, k)
        recall = recall_at_k(approx, exact_indices, k)
        self.meta.update({key: round(recall, 4), "recall_queries": int(len(queries)), "recall_query_source": source})
        return recall

    # -- persistence ---------------------------------------------------------------------

    def save(self, path: str | Path) -> Path | None:
        """Write the faiss index to ``path`` atomically (temporary file, fsync, rename);
        ``exact`` has nothing to write (``None``). ``meta`` is the caller's to store."""
        if self.index is None:
            return None
        import faiss

        return save_atomic(path, lambda tmp: faiss.write_index(self.index, str(tmp)))

    @classmethod
    def load(
        cls,
        meta: dict,
        embeddings: np.ndarray | None,
        path: str | Path | None,
        *,
        exact_search: ExactSearch | None = None,
    ) -> AnnIndex:
        """Rebuild from recorded ``meta`` (``AnnIndex.meta``), the gallery embeddings (needed by
        ``exact``; may be a memmap) and the saved faiss file (the approximate kinds)."""
        params = AnnParams.from_dict({k: meta[k] for k in AnnParams.__dataclass_fields__ if k in meta})
        if params.kind not in KINDS:
            raise InputError(f"unknown index kind {params.kind!r} in the index record")
        index = None
        if params.kind != "exact":
            import faiss

            if path is None or not Path(path).is_file():
                raise InputError(f"{path}: missing faiss index file for kind {params.kind}")
            try:
                index = faiss.read_index(str(path))
            except RuntimeError as error:  # faiss raises RuntimeError for a truncated / foreign file
                raise InputError(f"{path}: unreadable faiss index ({str(error).splitlines()[0][:120]})") from None
            if index.ntotal != meta.get("n") or index.d != meta.get("dim"):
                raise InputError(
                    f"{path}: holds {index.ntotal} × {index.d} vectors, the record says "
                    f"{meta.get('n')} × {meta.get('dim')}"
                )
            # Search-time knobs are not all serialised by faiss (efSearch is not): set them.
            if params.kind == "hnsw":
                index.hnsw.efSearch = params.ef_search
            else:
                faiss.extract_index_ivf(index).nprobe = params.nprobe
        elif embeddings is None or exact_search is None:
            raise InputError("an exact index needs its embeddings and an exact search function")
        return cls(params, embeddings, index, meta, exact_search)


# ----------------------------------------------------------------------------------------
# 3. Streamed embedding files
# ----------------------------------------------------------------------------------------


class EmbeddingWriter:
    """Rows of a ``float32 [n, dim]`` ``.npy`` written batch by batch through a memory map.

    The file is created as ``<path>.partial`` and renamed to ``path`` by :meth:`close` only
    once every row was written (a per-row mask checks it), so a crashed extraction never
    leaves a file that looks complete. Memory: the dirty pages of the map, which the kernel
    writes back and drops, plus one batch; :meth:`write` flushes every ``flush_rows`` rows so
    they cannot pile up. ``dim`` may be ``None``: the file is created at the first batch.
    """

    def __init__(self, path: str | Path, n: int, dim: int | None = None, flush_rows: int = 65_536):
        if n < 1:
            raise InputError("nothing to embed: the image list is empty")
        self.path = Path(path)
        self.partial = self.path.with_name(self.path.name + ".partial")
        self.n, self.dim, self.flush_rows = int(n), dim, flush_rows
        self._written = np.zeros(self.n, dtype=bool)
        self._since_flush = 0
        self._array = None
        if dim is not None:
            self._open(dim)

    def _open(self, dim: int) -> None:
        from numpy.lib.format import open_memmap

        self.partial.unlink(missing_ok=True)
        self.dim = int(dim)
        self._array = open_memmap(self.partial, mode="w+", dtype=np.float32, shape=(self.n, self.dim))

    def write(self, rows: np.ndarray, values: np.ndarray) -> None:
        """Store ``values[j]`` at row ``rows[j]`` (dataset indices, any order)."""
        rows, values = np.asarray(rows, dtype=np.int64), np.asarray(values, dtype=np.float32)
        if values.ndim != 2 or len(rows) != len(values):
            raise InputError(f"write needs [b] rows and [b, dim] values, got {rows.shape} and {values.shape}")
        if self._array is None:
            self._open(values.shape[1])
        if values.shape[1] != self.dim:
            raise InputError(f"embedding dim {values.shape[1]} does not match the file's {self.dim}")
        if len(rows) and (rows.min() < 0 or rows.max() >= self.n):
            raise InputError(f"row index out of range [0, {self.n})")
        self._array[rows] = values
        self._written[rows] = True
        self._since_flush += len(rows)
        if self._since_flush >= self.flush_rows:
            self._array.flush()
            self._since_flush = 0

    def close(self) -> Path:
        """Flush, check every row was written, rename into place; return the final path."""
        if self._array is None:
            raise InputError("nothing to embed: no batch was written")
        missing = int((~self._written).sum())
        self._array.flush()
        del self._array
        self._array = None
        if missing:
            self.partial.unlink(missing_ok=True)
            raise InputError(f"{self.path}: {missing} of {self.n} rows were never written")
        with open(self.partial, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(self.partial, self.path)
        return self.path

    def abort(self) -> None:
        """Drop the partial file (after an error)."""
        self._array = None
        self.partial.unlink(missing_ok=True)

    def __enter__(self) -> EmbeddingWriter:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is not None:
            self.abort()


def write_meta(path: str | Path, meta: dict) -> None:
    """A JSON record written atomically (temporary file + rename)."""
    write_text_atomic(path, json.dumps(meta, indent=2) + "\n")
