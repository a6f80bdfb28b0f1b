"""Exact chunked top-k search: correctness against brute force and FAISS, and its memory bound."""

from __future__ import annotations

import doctest
import weakref

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from helpers.core import arrays, errors
from helpers.core.errors import InputError
from helpers.evaluation import search
from helpers.evaluation.search import exact_topk, faiss_topk, plan_blocks, working_bytes

MIB = 1024 * 1024


def random_unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    x = rng.standard_normal((n, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def brute_force(query: np.ndarray, gallery: np.ndarray, k: int):
    """The full Q×G matrix in float64 and a stable descending argsort: the reference."""
    full = query.astype(np.float64) @ gallery.astype(np.float64).T
    order = np.argsort(-full, axis=1, kind="stable")[:, : min(k, gallery.shape[0])]
    return np.take_along_axis(full, order, axis=1), order


# (Q, G, dim, k, budget MiB): whole-gallery blocks, several query blocks, gallery sizes not
# divisible by the block, k > G, and budgets so small the gallery must be split and merged.
SHAPES = [
    (17, 100, 8, 5, 256),
    (40, 1001, 12, 3, 0.05),
    (33, 257, 16, 10, 0.004),
    (9, 300, 8, 7, 0.002),
    (5, 7, 4, 20, 256),
    (6, 7, 4, 20, 0.0007),
    (1, 50, 3, 50, 0.01),
]


@pytest.mark.parametrize("matmul", ["numpy", "torch"])
@pytest.mark.parametrize("n_query,n_gallery,dim,k,budget", SHAPES)
def test_exact_topk_matches_brute_force(n_query, n_gallery, dim, k, budget, matmul):
    rng = np.random.default_rng(n_query * 1000 + n_gallery)
    query, gallery = random_unit(rng, n_query, dim), random_unit(rng, n_gallery, dim)
    threads = torch.get_num_threads()
    scores, indices = exact_topk(query, gallery, k, memory_budget_mb=budget, matmul=matmul)
    assert torch.get_num_threads() == threads  # the one-thread selection is undone
    ref_scores, ref_indices = brute_force(query, gallery, k)
    assert scores.dtype == np.float32 and indices.dtype == np.int64
    assert scores.shape == indices.shape == (n_query, min(k, n_gallery))
    np.testing.assert_array_equal(indices, ref_indices)
    np.testing.assert_allclose(scores, ref_scores, atol=1e-5)


def test_tiny_budgets_really_split_the_gallery():
    # Guard for the parametrised test above: the tiny budgets must exercise the merge path.
    for n_query, n_gallery, _, k, budget in SHAPES:
        plan = plan_blocks(n_query, n_gallery, k, budget)
        assert plan.working_bytes <= budget * MIB
        if budget < 0.01:
            assert plan.splits_gallery, (n_query, n_gallery, budget, plan)


def test_torch_inputs_and_float64_inputs_give_the_same_result():
    rng = np.random.default_rng(1)
    query, gallery = random_unit(rng, 12, 6), random_unit(rng, 40, 6)
    s_np, i_np = exact_topk(query, gallery, 4)
    s_t, i_t = exact_topk(torch.from_numpy(query), torch.from_numpy(gallery), 4)
    s_64, i_64 = exact_topk(query.astype(np.float64), gallery.astype(np.float64), 4)
    np.testing.assert_array_equal(i_np, i_t)
    np.testing.assert_array_equal(i_np, i_64)
    np.testing.assert_array_equal(s_np, s_t)


def test_ties_are_ordered_by_lower_gallery_index():
    # Integer vectors: float32 dot products are exact, and duplicated gallery rows tie.
    rng = np.random.default_rng(2)
    base = rng.integers(-2, 3, size=(6, 4)).astype(np.float32)
    gallery = base[rng.integers(0, 6, size=30)]  # 30 rows, many exact duplicates
    query = rng.integers(-2, 3, size=(8, 4)).astype(np.float32)
    full = query.astype(np.float64) @ gallery.astype(np.float64).T
    scores, indices = exact_topk(query, gallery, k=30)
    # k = G returns the whole ranking, which must be exactly the stable sort.
    np.testing.assert_array_equal(indices, np.argsort(-full, axis=1, kind="stable"))
    np.testing.assert_array_equal(scores, np.take_along_axis(full, indices, 1))
    # With the gallery split (k < G): the right scores, and equal scores by index.
    assert plan_blocks(8, 30, 4, 0.0006).splits_gallery
    scores, indices = exact_topk(query, gallery, k=4, memory_budget_mb=0.0006)
    np.testing.assert_array_equal(scores, -np.sort(-full, axis=1)[:, :4])
    np.testing.assert_array_equal(scores, np.take_along_axis(full, indices, 1))
    same = scores[:, 1:] == scores[:, :-1]
    assert (indices[:, 1:][same] > indices[:, :-1][same]).all()


@pytest.mark.parametrize("n_query,n_gallery,dim,k", [(25, 500, 16, 10), (3, 9, 5, 20), (64, 1000, 32, 1)])
def test_exact_topk_equals_faiss(n_query, n_gallery, dim, k):
    pytest.importorskip("faiss")
    rng = np.random.default_rng(n_gallery)
    query, gallery = random_unit(rng, n_query, dim), random_unit(rng, n_gallery, dim)
    s_exact, i_exact = exact_topk(query, gallery, k, memory_budget_mb=0.01)
    s_faiss, i_faiss = faiss_topk(query, gallery, k)
    assert i_faiss.shape == (n_query, min(k, n_gallery)) and (i_faiss >= 0).all()  # k clamped
    np.testing.assert_array_equal(i_exact, i_faiss)
    np.testing.assert_allclose(s_exact, s_faiss, atol=1e-5)


@pytest.mark.parametrize("n_cols,k", [(1024, 4), (1001, 3), (5000, 20), (700, 3), (90, 5)])
def test_block_topk_equals_torch_topk(n_cols, k):
    # Covers the group pre-selection (with and without a tail of < 32 columns) and the
    # plain fallback; integer scores add many exact ties, where the values must still agree.
    gen = torch.Generator().manual_seed(n_cols)
    for scores in (torch.randn(13, n_cols, generator=gen), torch.randint(-50, 50, (13, n_cols), generator=gen).float()):
        values, cols = search._block_topk(scores, k)
        ref = torch.topk(scores, k, dim=1).values
        assert torch.equal(values.sort(dim=1).values, ref.sort(dim=1).values)
        assert torch.equal(scores.gather(1, cols), values)
        assert all(len(set(row.tolist())) == k for row in cols)  # k distinct columns


def test_bad_input_is_an_input_error():
    q, g = np.zeros((2, 3), np.float32), np.zeros((4, 3), np.float32)
    with pytest.raises(InputError, match="dim"):
        exact_topk(q, np.zeros((4, 5), np.float32), 2)
    with pytest.raises(InputError, match="k must be"):
        exact_topk(q, g, 0)
    with pytest.raises(InputError, match="empty"):
        exact_topk(q, np.zeros((0, 3), np.float32), 2)
    with pytest.raises(InputError, match="2-D"):
        exact_topk(np.zeros(3, np.float32), g, 2)
    with pytest.raises(InputError, match="numpy, torch"):
        exact_topk(q, g, 2, matmul="blas")
    with pytest.raises(InputError, match="NaN"):
        exact_topk(np.array([[np.nan, 0, 0]], np.float32), g, 2)
    with pytest.raises(InputError, match="too small"):
        exact_topk(q, g, 2, memory_budget_mb=1e-6)


# ----------------------------------------------------------------------------------------
# Memory: count every byte torch allocates during the search
# ----------------------------------------------------------------------------------------


class LiveTorchBytes(TorchDispatchMode):
    """Track live bytes of every tensor storage created by an aten op inside the mode.

    Every op (matmul, topk, cat, gather, sort, in-place add, factory functions …) passes
    through ``__torch_dispatch__``; each new storage is counted until the last tensor
    viewing it dies (weakref finalizers), giving the peak of simultaneously live torch
    allocations. Storages of the inputs, created before the call, are ignored.
    """

    def __init__(self, external: list[torch.Tensor]):
        super().__init__()
        self.external = {t.untyped_storage().data_ptr() for t in external}
        self.bytes: dict[int, int] = {}
        self.refs: dict[int, int] = {}
        self.current = self.peak = self.largest = 0

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.current -= self.bytes.pop(key)
            del self.refs[key]

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key in self.external:
                continue
            if key not in self.bytes:
                self.bytes[key], self.refs[key] = storage.nbytes(), 0
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
                self.largest = max(self.largest, storage.nbytes())
            self.refs[key] += 1
            weakref.finalize(t, self._release, key)
        return out


def _topk_scratch_bound(plan) -> int:
    """torch.topk's per-row std::vector lives outside torch's allocator: bound it by
    arithmetic, as working_bytes does (16 B per element, one row per thread)."""
    return 16 * plan.gallery_rows * min(torch.get_num_threads(), plan.query_rows)


def test_tracker_sees_a_full_matrix():
    # Sanity of the instrument: the naive approach must register its Q×G matrix.
    q, g = torch.randn(30, 8), torch.randn(200, 8)
    with LiveTorchBytes([q, g]) as tracker:
        torch.topk(q @ g.T, 5, dim=1)
    assert tracker.peak >= 30 * 200 * 4


@pytest.mark.parametrize(
    "n_query,n_gallery,k,budget",
    # The last case has >= 8k groups of 32 columns per block: the group pre-selection runs.
    [(30, 400, 5, 0.004), (30, 400, 5, 0.03), (7, 150, 20, 0.002), (20, 1001, 3, 0.05)],
)
def test_exact_topk_stays_within_its_memory_budget(n_query, n_gallery, k, budget):
    rng = np.random.default_rng(3)
    q = torch.from_numpy(random_unit(rng, n_query, 8))
    g = torch.from_numpy(random_unit(rng, n_gallery, 8))
    plan = plan_blocks(n_query, n_gallery, k, budget)
    with LiveTorchBytes([q, g]) as tracker:
        exact_topk(q, g, k, memory_budget_mb=budget)
    budget_bytes = budget * MIB
    full_matrix = n_query * n_gallery * 4
    assert full_matrix > budget_bytes  # the budget really binds
    assert tracker.largest < full_matrix
    # All torch allocations at once, plus topk's private scratch, within the budget …
    assert tracker.peak + _topk_scratch_bound(plan) <= budget_bytes
    # … and within the planner's own accounting (so working_bytes is an honest bound).
    assert tracker.peak + _topk_scratch_bound(plan) <= plan.working_bytes


def test_working_bytes_grows_with_block_size():
    assert working_bytes(2, 100, 5, 1000) < working_bytes(4, 100, 5, 1000)
    assert working_bytes(2, 100, 5, 1000) < working_bytes(2, 200, 5, 1000)


@pytest.mark.parametrize("module", [arrays, errors])
def test_doctests_pass(module):
    result = doctest.testmod(module)
    assert result.attempted > 0 and result.failed == 0
