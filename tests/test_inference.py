"""helpers.evaluation.inference: the eval cache of TableEmbedder (validation re-embeds the same rows every
epoch), on a tree written by tests/independent_tree.py."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from independent_tree import build as build_independent_tree

from helpers.core import config
from helpers.core.errors import InputError
from helpers.core.schema import read_table
from helpers.data import sampling
from helpers.evaluation import inference
from helpers.modeling import models


class CountingLoader:
    """A list of batches with a DataLoader's attributes, counting the batches it produced."""

    def __init__(self, batches):
        self.batches, self.produced = batches, 0
        self.dataset, self.batch_size, self.num_workers = list(range(8)), 2, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for batch in self.batches:
            self.produced += 1
            yield batch


def batches(n=4):
    return [(torch.full((2, 3), float(i)), torch.tensor([i, i]), torch.tensor([2 * i, 2 * i + 1])) for i in range(n)]


def test_cached_batches_replay_the_first_complete_pass():
    loader = CountingLoader(batches())
    cached = inference.CachedBatches(loader, budget=2**20)
    first, second = list(cached), list(cached)
    assert loader.produced == 4  # the second pass came from memory
    assert all(a is b for x, y in zip(first, second) for a, b in zip(x, y))
    assert len(cached) == 4 and cached.batch_size == 2


def test_cached_batches_stream_over_budget_or_after_an_early_exit():
    loader = CountingLoader(batches())
    one_batch = sum(t.nbytes for t in batches(1)[0])
    over = inference.CachedBatches(loader, budget=3 * one_batch)  # 4 batches do not fit
    list(over), list(over)
    assert loader.produced == 8 and over.kept is None

    loader = CountingLoader(batches())
    early = inference.CachedBatches(loader, budget=2**20)
    for _ in early:
        break
    assert early.kept is None  # an incomplete pass is never replayed
    list(early), list(early)
    assert loader.produced == 1 + 4


def test_cache_budget_from_the_environment(monkeypatch):
    monkeypatch.setenv("C2S_EVAL_CACHE_MB", "0.5")
    assert inference.resolve_eval_cache_bytes() == 2**19
    monkeypatch.setenv("C2S_EVAL_CACHE_MB", "lots")
    with pytest.raises(InputError, match="C2S_EVAL_CACHE_MB"):
        inference.resolve_eval_cache_bytes()


@pytest.mark.parametrize("cache_mb", ["1024", "0"])
def test_table_embedder_repeats_give_the_same_embeddings(tmp_path, monkeypatch, cache_mb):
    monkeypatch.setenv("C2S_EVAL_CACHE_MB", cache_mb)
    root = tmp_path / "c2s"
    build_independent_tree(root, n_items=6, seed=4)
    sampling.prepare(root, tmp_path / "prepared", categories=None, sample=None, progress=False)
    table = read_table(tmp_path / "prepared" / "images.csv")
    cfg = config.get_config("fixture", embed_batch=4)
    torch.manual_seed(0)
    embedder = models.create_embedder(cfg.backbone, cfg.embed_dim, weights="none", img_size=cfg.img_size).eval()
    embed = inference.TableEmbedder(cfg, embedder.data_config, table, root, "cpu")
    first = embed(embedder, progress=False)
    assert (embed.loader.kept is not None) == (cache_mb != "0")
    reads = []
    original = embed.loader.dataset.__class__.__getitem__
    monkeypatch.setattr(
        embed.loader.dataset.__class__, "__getitem__", lambda self, key: reads.append(key) or original(self, key)
    )
    second = embed(embedder, progress=False)
    np.testing.assert_array_equal(first, second)
    fresh = inference.embed_table(cfg, embedder, table, root, "cpu", progress=False)
    np.testing.assert_array_equal(first, fresh)
    assert len(reads) == (len(table) if cache_mb == "0" else 0) + len(table)  # + the fresh one-off pass
