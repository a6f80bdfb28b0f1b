"""helpers.modeling.distributed: sharded P×K batches (nothing lost or duplicated, every share
domain-balanced), and gathered-loss gradients under 2-process gloo DDP equal to one process."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from independent_tree import build as build_independent_tree

from helpers.core.errors import InputError
from helpers.data import datasets, sampling
from helpers.evaluation import inference
from helpers.modeling import distributed, losses


def table(n_items: int = 23, seed: int = 0):
    """Items with 1–4 consumer and 1–3 shop images, shuffled rows; one ineligible item."""
    rng = np.random.default_rng(seed)
    labels, domains = [], []
    for item in range(n_items):
        n_consumer, n_shop = int(rng.integers(1, 5)), int(rng.integers(1, 4))
        if item == 0:
            n_shop = 0  # no cross-domain pair: the sampler leaves it out
        labels += [item] * (n_consumer + n_shop)
        domains += ["consumer"] * n_consumer + ["shop"] * n_shop
    order = rng.permutation(len(labels))
    return np.array(labels)[order], np.array(domains)[order]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_shards_partition_each_global_batch(world):
    labels, domains = table()
    p, k = 8, 3
    sampler = datasets.SampleSeeds(datasets.PKSampler((labels, domains), p, k, epoch_len=7, seed=5), seed=5)
    shards = [distributed.ShardedBatches(sampler, k, p, rank, world) for rank in range(world)]
    for epoch in (0, 3):
        for shard in shards:
            shard.set_epoch(epoch)
        global_batches = list(sampler)
        per_rank = [list(shard) for shard in shards]
        assert all(len(batches) == len(global_batches) == len(shard) for batches, shard in zip(per_rank, shards))
        for b, batch in enumerate(global_batches):
            shares = [per_rank[r][b] for r in range(world)]
            # Rank order concatenation is the global batch itself (rows and augmentation seeds):
            # nothing lost, nothing duplicated, the one-process order.
            assert [key for share in shares for key in share] == batch
            items_per_rank = []
            for share in shares:
                rows = [row for row, _ in share]
                assert len(rows) == p // world * k
                items = set(labels[rows].tolist())
                items_per_rank.append(items)
                for item in items:  # domain-balanced: each item keeps a consumer and a shop image
                    mine = [r for r in rows if labels[r] == item]
                    assert {"consumer", "shop"} <= set(domains[mine].tolist())
            assert sum(len(i) for i in items_per_rank) == len(set().union(*items_per_rank)) == p


def test_items_must_split_evenly():
    labels, domains = table()
    sampler = datasets.PKSampler((labels, domains), 6, 2)
    with pytest.raises(InputError, match="multiple of the number of processes 4"):
        distributed.ShardedBatches(sampler, 2, 6, 0, 4)
    with pytest.raises(InputError, match="not in a world"):
        distributed.ShardedBatches(sampler, 2, 6, 2, 2)


def test_one_process_is_a_no_op():
    e, y = torch.randn(4, 3, requires_grad=True), torch.arange(4)
    assert distributed.gather_keep_grad(e, y)[0] is e
    assert distributed.current().world_size == 1 and distributed.broadcast_object({"a": 1}) == {"a": 1}


# ---------------------------------------------------------------- 2 processes, gloo, CPU

DIM_IN, P, K = 12, 8, 2


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(DIM_IN, 16), torch.nn.ReLU(), torch.nn.Linear(16, 8))


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(P * K, DIM_IN, generator=g)
    y = torch.arange(P).repeat_interleave(K)  # item-major, as PKSampler yields
    return x, y


def _step(model, loss_fn, x, y):
    embeddings = torch.nn.functional.normalize(model(x), dim=1)
    loss = loss_fn(embeddings, y)
    loss.backward()
    return loss.item(), [p.grad.clone() for p in model.parameters()]


def _join_env(rank: int, world: int, port: int) -> None:
    """What torchrun would set for this rank; one thread, the two ranks share the CPU."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    _join_env(rank, world, port)
    ctx, device = distributed.init("cpu")
    try:
        model = distributed.wrap_model(_model(), ctx, device)
        x, y = _batch()
        share = P // world * K
        mine = slice(rank * share, (rank + 1) * share)
        loss_fn = distributed.GatheredLoss(losses.create_loss("batch_hard", margin=0.2))
        loss, grads = _step(model, loss_fn, x[mine], y[mine])
        # Negative control: a plain gather, without the ×N in backward.
        model.zero_grad(set_to_none=True)
        distributed._GatherKeepLocal.backward = staticmethod(
            lambda ctx_, grad: grad[ctx_.rank * ctx_.rows : (ctx_.rank + 1) * ctx_.rows]
        )
        _, unscaled = _step(model, loss_fn, x[mine], y[mine])
        rows = distributed.gather_rows(torch.full((rank + 1, 2), float(rank)))  # uneven sizes
        if rank == 0:
            torch.save({"loss": loss, "grads": grads, "unscaled": unscaled, "rows": rows}, out)
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_equal_one_process(tmp_path, free_port):
    """Per-rank shares + gathered loss + DDP averaging = the one-process gradient of the loss
    over the global batch (float tolerance only: no BatchNorm in this model). The negative
    control without the ×N backward scaling is off by exactly a factor 2."""
    out = str(tmp_path / "rank0.pt")
    mp.spawn(_ddp_worker, args=(2, free_port(), out), nprocs=2, join=True)
    got = torch.load(out)
    x, y = _batch()
    ref_loss, ref_grads = _step(_model(), losses.create_loss("batch_hard", margin=0.2), x, y)
    assert got["loss"] == pytest.approx(ref_loss, rel=1e-6)
    for g, u, r in zip(got["grads"], got["unscaled"], ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(2 * u, r, rtol=1e-5, atol=1e-7)
        assert not torch.allclose(u, r, rtol=1e-3)
    assert got["rows"].tolist() == [[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]]


def _embed_worker(rank: int, world: int, port: int, root: str, table_path: str, out: str) -> None:
    _join_env(rank, world, port)
    distributed.init("cpu")
    try:
        cfg, embedder, table = _eval_setup(table_path)
        sharded = inference.TableEmbedder(cfg, embedder.data_config, table, root, "cpu")
        whole = sharded(embedder, progress=False)
        result = inference.evaluate(cfg, embedder, table, root, split="test", device="cpu", progress=False)
        torch.save({"rows": len(sharded.loader.dataset), "embeddings": whole, "metrics": result}, f"{out}.{rank}")
    finally:
        dist.destroy_process_group()


def _eval_setup(table_path: str):
    from helpers.core import config
    from helpers.core.schema import read_table
    from helpers.modeling import models

    cfg = config.get_config("fixture", embed_batch=4)
    torch.manual_seed(0)
    embedder = models.create_embedder(cfg.backbone, cfg.embed_dim, weights="none", img_size=cfg.img_size).eval()
    return cfg, embedder, read_table(table_path)


def test_sharded_evaluation_equals_one_process(tmp_path, free_port):
    """Under 2-process gloo every rank embeds every other row of an odd-sized table (a tree
    written by tests/independent_tree.py), and the gathered embeddings and test metrics on
    every rank equal those of one process."""
    root = tmp_path / "c2s"
    build_independent_tree(root, n_items=12, seed=3)
    sampling.prepare(root, tmp_path / "prepared", categories=None, sample=None, progress=False)
    table_path = str(tmp_path / "prepared" / "images.csv")
    cfg, embedder, table = _eval_setup(table_path)
    assert len(table) % 2 == 1, "the table must not split evenly, to exercise uneven shares"
    want = inference.TableEmbedder(cfg, embedder.data_config, table, root, "cpu")(embedder, progress=False)
    want_metrics = inference.evaluate(cfg, embedder, table, root, split="test", device="cpu", progress=False)
    out = str(tmp_path / "rank")
    mp.spawn(_embed_worker, args=(2, free_port(), str(root), table_path, out), nprocs=2, join=True)
    got = [torch.load(f"{out}.{rank}", weights_only=False) for rank in (0, 1)]
    assert [g["rows"] for g in got] == [(len(table) + 1) // 2, len(table) // 2]
    for g in got:
        np.testing.assert_allclose(g["embeddings"], want, rtol=1e-5, atol=1e-6)
        for key in ("recall@1", "recall@5", "recall@10", "map", "n_queries", "n_gallery"):
            assert g["metrics"][key] == pytest.approx(want_metrics[key], abs=1e-6), key
