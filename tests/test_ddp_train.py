"""`fit` under 2-process DDP (gloo, CPU) against one process with the same global batch and seed.

The 2-process run is interrupted after epoch 1 and resumed (as `--resume` after a crash), so
the comparison also covers resume under DDP. Compared: the loss of every training step, the
val history, fit's result and the test metrics :func:`train.evaluate_run` writes from rank 0.

BatchNorm: SyncBatchNorm has no CPU kernel, so under gloo each rank's BatchNorm layers use the
statistics of its own share (2 items × 2 images) instead of the global batch of 8. On the
fixture model (random-init `test_efficientnet` with a Linear-BN head) that changes the loss a
lot (measured here: 0.69 vs 0.36 at step 1), so a tolerance wide enough to absorb it would
hide real faults. The one-process reference therefore runs the same global batch through
"ghost batches" (:class:`GhostBatches`): each rank's share is normalised on its own, as DDP on
CPU does, and the running statistics follow rank 0's share, as DDP's buffer broadcast makes
them. Everything else is the one-process code path (one loader, one loss over the global
batch, no gather, no gradient averaging), so the remaining difference is float rounding of
the gradient all-reduce: tolerance 1e-4 relative on losses and 1e-3 on metrics. On CUDA,
`wrap_model` uses SyncBatchNorm and no ghost batches are needed.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers.core import config
from helpers.training import train

LOSS_RTOL, METRIC_TOL = 1e-4, 1e-3


def cfg():
    # Global batch: 4 items × 2 images; 2 ranks → 2 whole items each.
    return replace(config.get_config("fixture"), epochs=2, p_items=4, k_images=2, patience=5, num_workers=0)


class Recorder(torch.nn.Module):
    """The run's loss, recording the value of every training step."""

    def __init__(self, loss, seen: list):
        super().__init__()
        self.loss, self.seen = loss, seen

    def forward(self, embeddings, labels):
        value = self.loss(embeddings, labels)
        self.seen.append((len(labels), value.item()))
        return value


class GhostBatches(torch.nn.Module):
    """One process, BatchNorm as on N CPU ranks: the batch is run as N consecutive shares
    (each normalised by its own statistics); the running statistics are those after share 0
    only (DDP broadcasts rank 0's buffers before every forward)."""

    def __init__(self, model: torch.nn.Module, shares: int):
        super().__init__()
        self.model, self.shares = model, shares

    def forward(self, images):
        parts = images.chunk(self.shares)
        out = [self.model(parts[0])]
        saved = {
            (module, name): value.detach().clone()
            for module in self.model.modules()
            for name, value in module._buffers.items()
            if value is not None
        }
        for part in parts[1:]:
            out.append(self.model(part))
        # Put rank 0's statistics back by swapping the tensors, not copying into them: the
        # ones just used are saved by autograd for the backward pass.
        for (module, name), value in saved.items():
            module._buffers[name] = value
        return torch.cat(out)


def _record_losses(seen: list):
    original = train.create_criterion

    def create(c):
        return Recorder(original(c), seen)

    train.create_criterion = create


def _worker(rank: int, world: int, port: int, root: str, table: str, out: str) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank)
    )
    torch.set_num_threads(1)
    seen: list = []
    _record_losses(seen)
    try:
        first = train.fit(cfg(), table, root, out, progress=False, stop_after_epoch=1)
        fitted = train.fit(cfg(), table, root, out, resume=True, progress=False)
        result = train.evaluate_run(out, table, root, progress=False)
        torch.save({"first": first, "fitted": fitted, "result": result, "seen": seen}, f"{out}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_two_process_ddp_matches_one_process(small_tree, tmp_path, free_port):
    root, table = small_tree
    ddp_dir = tmp_path / "ddp"
    mp.spawn(_worker, args=(2, free_port(), str(root), str(table), str(ddp_dir)), nprocs=2, join=True)
    ranks = [torch.load(ddp_dir / f"rank{r}.pt", weights_only=False) for r in range(2)]

    seen: list = []
    original, original_module = train.create_criterion, train._training_module
    _record_losses(seen)
    train._training_module = lambda c, embedder, ctx, device: GhostBatches(embedder, 2)
    try:
        fitted = train.fit(cfg(), table, root, tmp_path / "single", progress=False)
    finally:
        train.create_criterion, train._training_module = original, original_module
    single = train.evaluate_run(tmp_path / "single", table, root, progress=False)

    # Both ranks saw the gathered global batch (8 rows) at every step, with the same loss.
    assert ranks[0]["seen"] == ranks[1]["seen"]
    assert [n for n, _ in ranks[0]["seen"]] == [n for n, _ in seen] and {n for n, _ in seen} == {8}
    assert len(seen) >= 2
    for (_, got), (_, want) in zip(ranks[0]["seen"], seen):
        assert got == pytest.approx(want, rel=LOSS_RTOL), (ranks[0]["seen"], seen)
    # The interrupted run stopped after epoch 1 on both ranks and the resumed one finished.
    assert ranks[0]["first"] is None and ranks[1]["first"] is None
    assert ranks[0]["fitted"] == ranks[1]["fitted"] and ranks[0]["fitted"]["best_epoch"] == fitted["best_epoch"]
    assert ranks[0]["result"] == ranks[1]["result"]  # rank 0's test metrics, broadcast
    for key in ("recall@1", "recall@5", "recall@10", "map"):
        assert abs(ranks[0]["result"][key] - single[key]) <= METRIC_TOL, (key, ranks[0]["result"], single)
    assert ranks[0]["result"]["n_queries"] == single["n_queries"]
    # Only rank 0 wrote, and what it wrote is a complete run like the one-process one.
    assert sorted(p.name for p in ddp_dir.iterdir() if not p.name.startswith("rank")) == sorted(
        p.name for p in (tmp_path / "single").iterdir()
    )
    history = pd.read_csv(ddp_dir / "history.csv")
    reference = pd.read_csv(tmp_path / "single" / "history.csv")
    assert list(history.epoch) == list(reference.epoch) == [0, 1, 2]
    for column in ("loss", "val_recall@1", "val_recall@5", "val_map"):
        assert history[column][1:].to_numpy() == pytest.approx(
            reference[column][1:].to_numpy(), rel=LOSS_RTOL, abs=METRIC_TOL
        ), column
    assert json.loads((ddp_dir / "metrics.json").read_text()) == ranks[0]["result"]
    assert json.loads((ddp_dir / "fit.json").read_text()) == ranks[0]["fitted"]
    val_ranks = [pd.read_csv(d / "val_ranks.csv") for d in (ddp_dir, tmp_path / "single")]
    assert val_ranks[0].path.tolist() == val_ranks[1].path.tolist()
