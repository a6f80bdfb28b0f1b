"""Data-parallel training over several processes (``torchrun --nproc_per_node=N -m helpers train``).

One process per GPU (NCCL) or per CPU worker (gloo, what CI uses). What makes N processes
train the same model as one process with the same global batch:

* :class:`ShardedBatches`: every rank walks the same global batch sequence (same sampler,
  same seed) and keeps its contiguous slice of ``P/N`` whole items × K images, so within an
  epoch no image of a batch is lost or duplicated and every share keeps each item's
  consumer + shop pair (domain-balanced). Concatenating the shares in rank order gives the
  global batch in the one-process order.
* :func:`gather_keep_grad` / :class:`GatheredLoss`: embeddings and labels of all ranks are
  all-gathered so mining sees the global batch; the local part keeps its autograd graph,
  as in pytorch-metric-learning's ``DistributedLossWrapper``. Each rank then computes the
  same loss over the global batch; DDP averages the parameter gradients over ranks, so the
  backward of the local part is scaled by N: the averaged gradient is then the one-process
  gradient of that loss.
* BatchNorm: on CUDA, :func:`wrap_model` converts BN layers to ``SyncBatchNorm`` (statistics
  of the global batch, as in one process). ``SyncBatchNorm`` has no CPU kernel, so under gloo
  each rank normalises with its own share's statistics, which differ from the global batch's
  (see the tolerance in ``tests/test_distributed.py``).

Outside ``torchrun`` (no ``WORLD_SIZE`` in the environment, or 1) everything here is a no-op
and training is the one-process code path.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from helpers.core.errors import InputError


@dataclass(frozen=True)
class Context:
    """This process's place in the job. ``world_size == 1``: not distributed."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def env_world_size() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        raise InputError(f"WORLD_SIZE must be an integer, got {os.environ['WORLD_SIZE']!r}") from None


def init(device: str) -> tuple[Context, str]:
    """Join the process group torchrun describes (env ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
    ``MASTER_ADDR/PORT``) and return the context and this rank's device.

    ``device`` is the resolved device of the config: ``cuda`` → NCCL, one GPU per local rank
    (``cuda:LOCAL_RANK``); ``cpu`` → gloo. Already initialised (e.g. a second ``fit`` in the
    same process): the existing group is used.
    """
    world = env_world_size()
    if world <= 1:
        return Context(), device
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device.startswith("cuda"):
        if local_rank >= torch.cuda.device_count():
            raise InputError(
                f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA device(s): "
                "--nproc_per_node must not exceed the GPUs of the node"
            )
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)
        backend = "nccl"
    elif device == "cpu":
        backend = "gloo"
    else:
        raise InputError(f"distributed training supports cuda (NCCL) and cpu (gloo), not {device!r}")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return Context(rank=rank, world_size=dist.get_world_size(), local_rank=local_rank, backend=backend), device


def current() -> Context:
    """The context of an already initialised group (or the one-process context)."""
    if not (dist.is_available() and dist.is_initialized()):
        return Context()
    return Context(
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=int(os.environ.get("LOCAL_RANK", "0")),
        backend=dist.get_backend(),
    )


def barrier() -> None:
    if current().distributed:
        dist.barrier()


def broadcast_object(value, src: int = 0):
    """``value`` of rank ``src`` on every rank (picklable objects: val metrics, a decision)."""
    if not current().distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=src)
    return box[0]


# ----------------------------------------------------------------------------------------
# Sharding the P×K batches
# ----------------------------------------------------------------------------------------


class ShardedBatches:
    """This rank's contiguous share of every global batch of ``batch_sampler``.

    ``batch_sampler`` yields global batches of ``items_per_batch`` items × ``k`` rows in
    item-major order (:class:`helpers.data.datasets.PKSampler`, possibly wrapped in
    :class:`helpers.data.datasets.SampleSeeds`, whose per-sample augmentation seeds are assigned on
    the global batch, so a sample is augmented identically whatever the number of ranks).
    Rank ``r`` of ``N`` keeps items ``r·P/N … (r+1)·P/N − 1`` of each batch: whole items, so
    each keeps its consumer and shop image. ``P`` must be a multiple of ``N``.
    """

    def __init__(self, batch_sampler, k: int, items_per_batch: int, rank: int, world_size: int):
        if world_size < 1 or not 0 <= rank < world_size:
            raise InputError(f"rank {rank} is not in a world of {world_size}")
        if items_per_batch % world_size:
            raise InputError(
                f"--p-items {items_per_batch} must be a multiple of the number of processes "
                f"{world_size}, so every process gets whole items"
            )
        self.batch_sampler, self.k = batch_sampler, k
        self.rank, self.world_size = rank, world_size
        self.share = items_per_batch // world_size * k

    def set_epoch(self, epoch: int) -> None:
        self.batch_sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.batch_sampler)

    def __iter__(self) -> Iterator[list]:
        for batch in self.batch_sampler:
            if len(batch) != self.share * self.world_size:
                raise InputError(
                    f"a batch of {len(batch)} rows cannot be split into {self.world_size} shares of {self.share}"
                )
            yield batch[self.rank * self.share : (self.rank + 1) * self.share]


# ----------------------------------------------------------------------------------------
# Gathering embeddings for the loss
# ----------------------------------------------------------------------------------------


class _GatherKeepLocal(torch.autograd.Function):
    """All-gather ``[b, D]`` from every rank → ``[N·b, D]`` in rank order. Backward: only this
    rank's slice flows back (the other ranks' copies are constants here, they get their
    gradient on their own rank), scaled by N because DDP averages gradients over ranks."""

    @staticmethod
    def forward(ctx, local: torch.Tensor) -> torch.Tensor:
        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(parts, local.contiguous())
        ctx.rank, ctx.world, ctx.rows = rank, world, local.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        start = ctx.rank * ctx.rows
        return grad[start : start + ctx.rows] * ctx.world


def gather_keep_grad(embeddings: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch's embeddings (local slice with gradient) and labels, in rank order.
    Shares must have equal sizes (``ShardedBatches`` guarantees it). No-op on one process."""
    if not current().distributed:
        return embeddings, labels
    gathered_labels = [torch.empty_like(labels) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered_labels, labels.contiguous())
    return _GatherKeepLocal.apply(embeddings), torch.cat(gathered_labels)


class GatheredLoss(torch.nn.Module):
    """``loss(gather(embeddings), gather(labels))``: a metric loss over the global batch.

    Stateful losses (the cross-batch memory) see the same global batch on every rank, so
    their state stays identical across ranks.
    """

    def __init__(self, loss: torch.nn.Module):
        super().__init__()
        self.loss = loss

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(*gather_keep_grad(embeddings, labels))


def gather_rows(values: torch.Tensor) -> torch.Tensor:
    """All ranks' ``[b_r, D]`` (sizes may differ) concatenated in rank order, on every rank;
    no gradient. Used to assemble evaluation embeddings embedded shard by shard."""
    if not current().distributed:
        return values
    world = dist.get_world_size()
    sizes = [torch.zeros(1, dtype=torch.int64, device=values.device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([values.shape[0]], dtype=torch.int64, device=values.device))
    largest = int(max(s.item() for s in sizes))
    padded = torch.zeros((largest, *values.shape[1:]), dtype=values.dtype, device=values.device)
    padded[: values.shape[0]] = values
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return torch.cat([part[: int(size.item())] for part, size in zip(parts, sizes)])


def broadcast_buffers(module: torch.nn.Module, src: int = 0) -> None:
    """Rank ``src``'s buffers (BatchNorm running statistics) on every rank, in place. DDP does
    this at the start of each forward; after the last training step of an epoch each rank
    still holds the statistics of its own share, so evaluation first makes them rank 0's
    (the ones its checkpoint saves). No-op on one process."""
    if not current().distributed:
        return
    for buffer in module.buffers():
        dist.broadcast(buffer.data, src=src)


def wrap_model(model: torch.nn.Module, ctx: Context, device: str) -> torch.nn.Module:
    """The module to train with: DDP over ``model`` when distributed (SyncBatchNorm on CUDA),
    else ``model`` itself. Checkpoints keep saving ``model`` (no ``module.`` prefixes)."""
    if not ctx.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel

    if device.startswith("cuda"):
        # Converted in place: the wrapped modules are the ones ``model`` holds, so its
        # state_dict (same keys: SyncBatchNorm keeps BN's parameters and buffers) stays valid.
        _convert_sync_bn_inplace(model)
        return DistributedDataParallel(model, device_ids=[torch.device(device).index])
    return DistributedDataParallel(model)


def _convert_sync_bn_inplace(model: torch.nn.Module) -> None:
    # timm's converter, not torch's: timm's BatchNormAct2d (BN + activation in one module,
    # used by EfficientNet) would lose its activation in torch's plain SyncBatchNorm.
    from timm.layers import convert_sync_batchnorm

    for name, child in list(model.named_children()):
        converted = convert_sync_batchnorm(child)
        if converted is not child:
            setattr(model, name, converted)
