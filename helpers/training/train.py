"""Fit an embedder: P×K batches, a metric loss (optionally over a cross-batch memory), val
Recall@5 for model selection. A fit never embeds test: :func:`evaluate_run` evaluates the
selected checkpoint once, for the callers that report test (the CLI's ``train``, the demo, the
final evaluation); the study reads val only.

A run directory holds ``config.json`` (the resolved config, the model's config, the table's
hash and ``env_info``), ``history.csv`` (one row per epoch), ``best.pt`` / ``last.pt``
(written atomically), ``val_ranks.csv`` (each scored val query's 0-based first-hit rank and
average precision under ``best.pt``, official protocol, sorted by path: from the validation
pass that selected it, so val is never embedded again for it) and ``fit.json`` (the best
epoch, its val metrics, why training stopped early; written last, it marks a finished fit).
With ``stop_items`` > 0 the val queries split in two by item, both searched against every val
shop photo (:func:`helpers.data.sampling.split_stop_items`): early stopping, ``best.pt``'s choice,
``history.csv``'s val columns and ``stop_ranks.csv`` use the stop items' queries;
``val_ranks.csv`` and ``fit.json``'s ``val`` are ``best.pt`` on the other items' queries, which no
choice has seen (``fit.json``'s ``stop`` keeps the stop items' numbers).
:func:`evaluate_run` adds ``metrics.json`` (the test split, official protocol, with
``fit.json``'s fields; the val numbers used for selection are kept apart under ``"val"``).

Reproducibility: the sampler's batches are a function of ``(seed, epoch)`` and every sample's
augmentation of ``(seed, epoch, batch, position)`` (:class:`helpers.data.datasets.SampleSeeds`), so a run
gives the same batches, pixels and losses for any ``num_workers``, and ``--resume`` from
``last.pt`` continues it exactly as if it had not stopped. A run directory that already holds
a run is never reused without ``--resume``, and ``--resume`` refuses a checkpoint whose
config (runtime fields such as ``num_workers`` aside) or table differs: a resume never mixes
two runs.

``fit`` reads as its steps: :func:`_open_run` (new or resumed state) → :func:`_build` (model,
loss, optimiser, loaders) → :func:`_baseline` or :func:`_restore` → :func:`_train_epochs`
→ :func:`_finish`.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core import identity, repro, runtime
from helpers.core.config import Config
from helpers.core.errors import InputError
from helpers.core.files import copy_atomic, portable_path, sha256_file, write_text_atomic
from helpers.core.progress import progress_bar, show_bars
from helpers.core.schema import read_table
from helpers.data import datasets, sampling, store, transforms
from helpers.evaluation import inference, metrics
from helpers.modeling import checkpoints, distributed, losses, models
from helpers.modeling.checkpoints import read_checkpoint, save_checkpoint

COLLAPSE_THRESHOLD = 0.99  # norm of the mean unit embedding: 1.0 means all embeddings equal


# --------------------------------------------------------------------------- parts of a run


def create_criterion(cfg: Config) -> torch.nn.Module:
    """The config's loss, wrapped in a cross-batch memory when ``xbm_size`` > 0."""
    options = {"temperature": cfg.temperature} if cfg.loss == "infonce" else {"margin": cfg.margin}
    loss = losses.create_loss(cfg.loss, **options)
    return losses.CrossBatchMemory(loss, cfg.xbm_size) if cfg.xbm_size else loss


def create_optimizer(cfg: Config, embedder: models.Embedder) -> torch.optim.Optimizer:
    groups = models.param_groups(embedder, cfg.lr, cfg.backbone_lr_mult, cfg.layer_decay)
    optimizer = torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    return optimizer(groups, weight_decay=cfg.weight_decay)


def lr_factor(cfg: Config, steps_per_epoch: int):
    """Step → learning-rate factor: linear warm-up over ``warmup_epochs``, then cosine decay to
    1 % of the base rate (``schedule="cosine"``) or the base rate (``"constant"``)."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if cfg.schedule == "constant":
            return 1.0
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def train_one_epoch(
    embedder,
    loader,
    criterion,
    optimizer,
    scheduler,
    scaler,
    device: str,
    amp_dtype: torch.dtype | None,
    grad_clip: float,
    progress: bool = False,
    desc: str = "training",
) -> tuple[float, int, float]:
    """One pass over ``loader``: returns (mean loss, images seen, seconds). Stops the run on a
    non-finite loss with a message that says what to try."""
    embedder.train()
    started, losses_seen, images_seen = time.perf_counter(), [], 0
    for images, labels, _ in progress_bar(loader, desc=desc, disable=not progress, leave=False, mininterval=2.0):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        images = images.to(memory_format=torch.channels_last)  # the model's layout, see _build
        with torch.autocast(
            device_type=device.split(":")[0], dtype=amp_dtype or torch.float32, enabled=amp_dtype is not None
        ):
            loss = criterion(embedder(images), labels)
        if not torch.isfinite(loss):
            raise InputError(
                f"loss became {loss.item()} ({desc}): lower --lr, use --amp auto (bf16) or off, "
                "and check the input images"
            )
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(embedder.parameters(), grad_clip)
        scaler.step(optimizer)
        scaler.update()
        scheduler.step()
        losses_seen.append(loss.item())
        images_seen += len(images)
    return float(np.mean(losses_seen)), images_seen, time.perf_counter() - started


@dataclass
class Run:
    """Everything one training run holds while it runs; ``state`` is what ``last.pt`` stores."""

    cfg: Config
    run_dir: Path
    table_path: Path
    data_root: Path
    device: str
    embedder: models.Embedder
    criterion: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LambdaLR
    scaler: torch.amp.GradScaler
    amp: torch.dtype | None
    batches: datasets.SampleSeeds
    loader: torch.utils.data.DataLoader
    validate: inference.ProtocolEvaluator
    state: dict | None
    # Under torchrun: this process's rank, and the module that trains (DDP over ``embedder``,
    # maybe compiled); ``embedder`` itself is what is saved and evaluated.
    ctx: distributed.Context = distributed.Context()
    model: torch.nn.Module | None = None


# --------------------------------------------------------------------------- the steps of fit


def _open_run(run_dir: Path, cfg: Config, table_path: Path, resume: bool) -> dict | None:
    """The state to resume from (checked against this config and table), or None for a new run."""
    last = run_dir / "last.pt"
    existing = [p.name for p in (run_dir / "config.json", last, run_dir / "history.csv") if p.exists()]
    if not resume:
        if existing:
            raise InputError(
                f"{run_dir}: already holds a run ({', '.join(existing)}); "
                "pass --resume to continue it or choose a new --out"
            )
        return None
    if not last.is_file():
        raise InputError(f"{last}: nothing to resume (no last.pt)")
    state = read_checkpoint(last)
    # The one definition of run identity (helpers.core.identity), split into its two reasons.
    differs = identity.differences(state["config"], state["table_sha256"], cfg, state["table_sha256"])
    if differs:
        raise InputError(f"{last}: was trained with another config ({', '.join(differs)}); start a new --out instead")
    if identity.differences(state["config"], state["table_sha256"], cfg, sha256_file(table_path)):
        raise InputError(
            f"{table_path}: differs from the table {last} was trained on (sha256 changed); start a new --out instead"
        )
    if state["epoch"] >= 0 and "val_ranks" not in state:
        raise InputError(f"{last}: written before fit kept the val ranks (val_ranks.csv); start a new --out instead")
    if "best_map" not in state:
        raise InputError(
            f"{last}: written before ties on val Recall@5 were broken by val mAP (its best epoch may differ under "
            "the current rule); start a new --out instead"
        )
    return state


def _build(
    cfg: Config, table_path: Path, data_root: Path, run_dir: Path, state: dict | None, progress: bool = True
) -> Run:
    table = read_table(table_path)
    ctx, device = distributed.init(runtime.resolve_device(cfg.device))
    repro.seed_everything(cfg.seed, cfg.deterministic)  # the same on every rank: identical initial weights
    embedder = models.create_embedder(
        cfg.backbone,
        cfg.embed_dim,
        weights="none" if state else cfg.weights,
        head=cfg.head,
        pooling=cfg.pooling,
        img_size=cfg.img_size,
    )
    if state:
        embedder.config = state["model_config"]
        embedder.load_state_dict(state["model"])
    if cfg.grad_checkpointing:
        models.enable_grad_checkpointing(embedder)
    # channels_last on every device: on the 2-core CPU a training step of Lite0 at 160 px took
    # 1.17 s instead of 1.75 s (benchmarks/bench_train.py, idle machine); on a GPU it is the
    # layout tensor cores want.
    embedder.to(device).to(memory_format=torch.channels_last)

    stop_table, _ = _val_tables(cfg, table)
    train_rows = sampling.train_subset(table, cfg.train_fraction, cfg.split_seed)
    train_rows = train_rows.loc[train_rows.split == "train"].reset_index(drop=True)
    if train_rows.empty:
        raise InputError(f"{table_path}: the train split is empty")
    transform = transforms.create_transform(cfg, embedder.data_config, cfg.augment)
    # Every image decoded, cropped and resized once, beside the prepared table, for every epoch,
    # seed and run of this preprocessing (helpers.data.store).
    folder = Path(table_path).parent / "stores"
    crops = _shared_store(ctx, train_rows, data_root, transform, folder, progress)
    kept = np.flatnonzero(crops.valid)  # an image that could not be decoded is left out (and listed)
    train_set = datasets.C2SDataset(
        train_rows.iloc[kept].reset_index(drop=True), data_root, transform, store=crops, store_rows=kept
    )
    epoch_len = None if cfg.epoch_images is None else max(1, cfg.epoch_images // (cfg.p_items * cfg.k_images))
    sampler = datasets.PKSampler(
        (train_set.labels, train_set.domains), cfg.p_items, cfg.k_images, epoch_len=epoch_len, seed=cfg.seed
    )
    batches = datasets.SampleSeeds(sampler, cfg.seed)
    # Under DDP each rank loads only its share (whole items) of every global batch.
    shares = distributed.ShardedBatches(batches, cfg.k_images, cfg.p_items, ctx.rank, ctx.world_size)
    # One loader for the whole run: its workers persist across epochs (no re-fork of a large
    # process every epoch); set_epoch selects the batches before each pass.
    loader = datasets.make_loader(
        train_set,
        batch_sampler=shares if ctx.distributed else batches,
        num_workers=runtime.resolve_num_workers(cfg, device),
        seed=cfg.seed,
        device=device,
    )
    optimizer = create_optimizer(cfg, embedder)
    amp = runtime.amp_dtype(cfg, device)
    return Run(
        cfg=cfg,
        run_dir=run_dir,
        table_path=table_path,
        data_root=data_root,
        device=device,
        embedder=embedder,
        criterion=create_criterion(cfg).to(device),
        optimizer=optimizer,
        scheduler=torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(cfg, len(sampler))),
        scaler=torch.amp.GradScaler("cuda", enabled=amp == torch.float16),
        amp=amp,
        batches=batches,
        loader=loader,
        validate=_val_evaluator(cfg, embedder, stop_table, data_root, device, folder, ctx, progress),
        state=state,
        ctx=ctx,
        model=_training_module(cfg, embedder, ctx, device),
    )


def _shared_store(
    ctx: distributed.Context, rows: pd.DataFrame, data_root: Path, transform, folder: Path, progress: bool
) -> store.CropStore:
    """The rows' decoded-crop store: rank 0 builds it (or reads it), then the others read it."""
    if ctx.is_main:
        crops = store.ensure_store(rows, data_root, transform, folder, progress=progress)
    distributed.barrier()
    if not ctx.is_main:
        crops = store.ensure_store(rows, data_root, transform, folder, progress=False)
    return crops


def _val_evaluator(
    cfg: Config,
    embedder: models.Embedder,
    table: pd.DataFrame,
    data_root: Path,
    device: str,
    folder: Path,
    ctx: distributed.Context,
    progress: bool,
) -> inference.ProtocolEvaluator:
    """Val under the official protocol, its crops read from a store too: the eval transform is
    deterministic, so stored crops give the decoded tensors exactly (tests/test_store.py), and
    no fit of this table and preprocessing decodes a val JPEG again, nor, when val exceeds the
    eval cache, in every epoch."""
    rows = inference.ProtocolEvaluator.protocol_rows(table, "val", "official")
    transform = transforms.create_transform(cfg, embedder.data_config)
    crops = _shared_store(ctx, rows, data_root, transform, folder, progress)
    return inference.ProtocolEvaluator(
        cfg, embedder.data_config, table, data_root, "val", "official", device, crops=crops
    )


def _val_tables(cfg: Config, table: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame | None]:
    """``(stop, compare)``: the tables whose val split early stopping and the reported val numbers
    use; compare is None when ``stop_items`` is 0 (one val does both)."""
    if not cfg.stop_items:
        return table, None
    return sampling.split_stop_items(table, cfg.stop_items, cfg.split_seed)


def _ranks_file(cfg: Config) -> str:
    """The per-query ranks of the validation that picks ``best.pt``: val's own, or the stop items'
    (val_ranks.csv then holds the compare items', written by :func:`_finish`)."""
    return "stop_ranks.csv" if cfg.stop_items else "val_ranks.csv"


def _training_module(cfg: Config, embedder: models.Embedder, ctx: distributed.Context, device: str) -> torch.nn.Module:
    """DDP over the embedder under torchrun (else the embedder), compiled when ``cfg.compile``."""
    model = distributed.wrap_model(embedder, ctx, device)
    return torch.compile(model) if cfg.compile else model


def _validate(run: Run) -> tuple[dict, pd.DataFrame]:
    """Val metrics and per-query ranks: every rank embeds its share of the rows (gathered by
    ``TableEmbedder``), and rank 0's results are sent to every rank (so all take the same
    early-stopping and checkpoint decisions)."""
    distributed.broadcast_buffers(run.embedder)
    return distributed.broadcast_object(run.validate.with_ranks(run.embedder, progress=False))


def _baseline(run: Run) -> None:
    """Epoch 0: the untrained model on val, and ``config.json``. The baseline is what training
    must beat, and its embedding spread tells a collapse caused by training from a model that
    starts nearly collapsed (a random init)."""
    initial, _ = _validate(run)
    sha = sha256_file(run.table_path)
    run.state = {
        "epoch": -1,
        "best": -1.0,
        "best_map": -1.0,
        "bad_epochs": 0,
        "initial_norm": initial["mean_embedding_norm"],
        "history": [_history_row(0, float("nan"), run.cfg.lr, initial, float("nan"))],
        "table_sha256": sha,
    }
    if run.ctx.is_main:
        write_text_atomic(
            run.run_dir / "config.json",
            json.dumps(
                {
                    "config": asdict(run.cfg),
                    "model": run.embedder.config,
                    "table": portable_path(run.table_path),
                    "table_sha256": sha,
                    "data_root": portable_path(run.data_root),
                    "ineligible_train_items": run.batches.batch_sampler.n_ineligible,
                    "env": repro.env_info(),
                    "world_size": run.ctx.world_size,
                },
                indent=2,
                default=str,
            ),
        )
    _save(run, epoch=-1, val=None)  # a crash in epoch 1 can then be resumed too (every rank: its barrier)


def _restore(run: Run) -> None:
    """Optimiser, schedule and scaler from ``last.pt``; repair what a crash between the writes
    of the last save may have left (a missing ``best.pt`` copy or ``val_ranks.csv``, a stale
    ``history.csv``)."""
    state = run.state
    run.optimizer.load_state_dict(state["optimizer"])
    run.scheduler.load_state_dict(state["scheduler"])
    if state["scaler"]:
        run.scaler.load_state_dict(state["scaler"])
    if not run.ctx.is_main:
        return
    if state["epoch"] >= 0:
        if state["bad_epochs"] == 0:
            copy_atomic(run.run_dir / "last.pt", run.run_dir / "best.pt")
        _write_val_ranks(run.run_dir / _ranks_file(run.cfg), state["val_ranks"])
    _write_history(run.run_dir / "history.csv", state["history"])


def _save(run: Run, epoch: int, val: dict | None) -> None:
    """``last.pt`` first (everything), then ``best.pt`` as its copy and ``val_ranks.csv`` when
    val improved, then the history rewritten from it: a crash between writes is repaired by
    :func:`_restore`."""
    run.state.update(epoch=epoch, val=val)
    if not run.ctx.is_main:  # one writer; every rank holds the same weights and state
        # Wait until rank 0 has written: a rank that returns (stop_after_epoch) and resumes
        # must read this last.pt, not the previous one.
        distributed.barrier()
        return
    run.state.update(
        model=run.embedder.state_dict(),
        optimizer=run.optimizer.state_dict(),
        scheduler=run.scheduler.state_dict(),
        scaler=run.scaler.state_dict(),
        config=_jsonable(asdict(run.cfg)),
        model_config=run.embedder.config,
    )
    save_checkpoint(run.run_dir / "last.pt", run.state)
    if val is not None and run.state["bad_epochs"] == 0:
        copy_atomic(run.run_dir / "last.pt", run.run_dir / "best.pt")
        _write_val_ranks(run.run_dir / _ranks_file(run.cfg), run.state["val_ranks"])
    _write_history(run.run_dir / "history.csv", run.state["history"])
    distributed.barrier()


def _train_epoch(run: Run, epoch: int, progress: bool | str) -> dict:
    """One epoch and its validation; returns the val metrics. ``progress``: True draws the epoch's
    bar and prints its line, ``"epochs"`` prints the line only (:func:`helpers.core.progress.show_bars`)."""
    cfg, state = run.cfg, run.state
    torch.manual_seed(cfg.seed * 100_003 + epoch)  # any model-side randomness = f(seed, epoch)
    run.batches.set_epoch(epoch)
    if isinstance(run.criterion, losses.CrossBatchMemory):
        run.criterion.reset()  # per epoch: resume stays exact without storing the memory
    criterion = run.criterion if epoch >= cfg.xbm_start_epoch else getattr(run.criterion, "loss", run.criterion)
    if run.ctx.distributed:  # mining sees the global batch: all ranks' embeddings and labels
        criterion = distributed.GatheredLoss(criterion)
    loss, images_seen, seconds = train_one_epoch(
        run.model or run.embedder,
        run.loader,
        criterion,
        run.optimizer,
        run.scheduler,
        run.scaler,
        run.device,
        run.amp,
        cfg.grad_clip,
        show_bars(progress) and run.ctx.is_main,
        desc=f"epoch {epoch + 1}/{cfg.epochs}",
    )
    images_seen *= run.ctx.world_size  # every rank saw an equal share of each global batch
    val, ranks = _validate(run)
    improved = better_epoch(val, state["best"], state["best_map"])
    if improved:
        state["best"], state["best_map"], state["bad_epochs"] = val["recall@5"], val["map"], 0
    else:
        state["bad_epochs"] += 1
    if improved:  # the best epoch's ranks, as plain lists: checkpoints are read with weights_only
        state["val_ranks"] = ranks.to_dict("list")
    state["history"].append(
        _history_row(epoch + 1, loss, run.optimizer.param_groups[0]["lr"], val, images_seen / seconds)
    )
    _save(run, epoch, val)
    if progress and run.ctx.is_main:
        print(
            f"epoch {epoch + 1}/{cfg.epochs}: loss {loss:.4f}  val R@1 {val['recall@1']:.3f}  "
            f"R@5 {val['recall@5']:.3f}  ({seconds:.0f} s training)",
            flush=True,
        )
    return val


def better_epoch(val: dict, best_recall: float, best_map: float) -> bool:
    """Whether an epoch's val beats the best so far: a higher Recall@5, or the same Recall@5 with a
    higher mAP. Recall@5 over a few hundred queries moves in steps of one query, so equal values
    are common while a run still improves; mAP, which every rank moves, breaks the tie (a tie
    that counted as no improvement stopped runs still rising)."""
    recall = val["recall@5"]
    return recall > best_recall or (recall == best_recall and val["map"] > best_map)


def _check_collapse(run: Run, val: dict, epoch: int) -> None:
    spread, initial = val["mean_embedding_norm"], run.state["initial_norm"]
    if spread > COLLAPSE_THRESHOLD and spread > initial + 0.005:
        raise InputError(
            f"embeddings collapsed at epoch {epoch + 1} (mean unit embedding has norm {spread:.3f}, "
            f"{initial:.3f} before training): "
            "check that pretrained weights loaded (--weights), lower --lr, or try --loss infonce"
        )


def _train_epochs(run: Run, progress: bool | str, stop_after_epoch: int | None) -> tuple[bool, str | None]:
    """Epochs from the one after the state's, until the last, early stop or ``stop_after_epoch``.
    Returns (finished, why it stopped early or None)."""
    for epoch in range(run.state["epoch"] + 1, run.cfg.epochs):
        if run.state["bad_epochs"] >= run.cfg.patience:
            return (
                True,
                f"early stop: val recall@5 (ties broken by val mAP) did not improve for {run.cfg.patience} epochs",
            )
        val = _train_epoch(run, epoch, progress)
        _check_collapse(run, val, epoch)
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return False, None  # as an interruption would: no fit.json
    return True, None


def _compare_val(run: Run, weights: dict) -> tuple[dict, pd.DataFrame]:
    """Metrics and per-query ranks of ``weights`` on the compare items (``stop_items`` > 0)."""
    run.embedder.load_state_dict(weights)
    _, compare = _val_tables(run.cfg, read_table(run.table_path))
    folder = Path(run.table_path).parent / "stores"
    evaluator = _val_evaluator(run.cfg, run.embedder, compare, run.data_root, run.device, folder, run.ctx, False)
    distributed.broadcast_buffers(run.embedder)
    return distributed.broadcast_object(evaluator.with_ranks(run.embedder, progress=False))


def _finish(run: Run, stopped: str | None) -> dict:
    """``fit.json``: the best epoch (1-based), its val metrics and why training stopped early
    (None: it ran every epoch). Written last, so it marks a finished fit; every rank returns it
    once it is written (a caller may go on to :func:`evaluate_run` at once)."""
    best = read_checkpoint(run.run_dir / "best.pt")  # written by rank 0 before its last barrier
    result = {"best_epoch": best["epoch"] + 1, "val": best["val"], "stopped": stopped}
    if run.cfg.stop_items:  # the reported val: best.pt on the val items no choice has seen
        val, ranks = _compare_val(run, best["model"])
        result = {**result, "val": val, "stop": best["val"]}
        if run.ctx.is_main:
            _write_val_ranks(run.run_dir / "val_ranks.csv", ranks.to_dict("list"))
    if run.ctx.is_main:
        write_text_atomic(run.run_dir / "fit.json", json.dumps(result, indent=2) + "\n")
    distributed.barrier()
    return result


def fit(
    cfg: Config,
    table_path: str | Path,
    data_root: str | Path,
    run_dir: str | Path,
    resume: bool = False,
    progress: bool | str = True,
    stop_after_epoch: int | None = None,
) -> dict | None:
    """Train and select ``best.pt`` on val Recall@5 (ties broken by val mAP: :func:`better_epoch`)
    with early stopping; returns ``fit.json``'s
    ``{"best_epoch", "val", "stopped"}``. Test is not looked at (see :func:`evaluate_run`).

    ``progress``: True draws bars and prints a line per epoch, ``"epochs"`` prints the line per
    epoch only, False prints nothing; it never changes what the run computes.

    ``stop_after_epoch`` ends the call after that epoch as an interruption would (returns None,
    no ``fit.json``); ``resume=True`` later continues the same run.
    """
    runtime.tune_allocator()
    run_dir, table_path, data_root = Path(run_dir), Path(table_path), Path(data_root)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _open_run(run_dir, cfg, table_path, resume)
    run = _build(cfg, table_path, data_root, run_dir, state, show_bars(progress))
    distributed.barrier()  # every rank has checked the run directory before rank 0 writes to it
    if run.state is None:
        _baseline(run)
    else:
        _restore(run)
    if stop_after_epoch == 0:
        return None
    finished, stopped = _train_epochs(run, progress, stop_after_epoch)
    return _finish(run, stopped) if finished else None


# --------------------------------------------------------------------------- evaluating a run


def metrics_name(split: str) -> str:
    """The file :func:`evaluate_run` writes: ``metrics.json`` for test, ``<split>_metrics.json`` else."""
    return "metrics.json" if split == "test" else f"{split}_metrics.json"


def evaluate_run(
    run_dir: str | Path,
    table_path: str | Path,
    data_root: str | Path,
    split: str = "test",
    progress: bool | str = True,
) -> dict:
    """``best.pt`` of the finished fit in ``run_dir`` evaluated once on ``split`` (official
    protocol, the run's own config), with ``fit.json``'s fields added, written to
    :func:`metrics_name`. Under torchrun every rank embeds its share of the rows; rank 0
    writes, and its result is sent to every rank."""
    run_dir, table_path = Path(run_dir), Path(table_path)
    fitted = fit_record(run_dir)
    if json.loads((run_dir / "config.json").read_text())["table_sha256"] != sha256_file(table_path):
        raise InputError(f"{table_path}: differs from the table {run_dir} was trained on (sha256 changed)")
    embedder, cfg = checkpoints.load_embedder(run_dir / "best.pt")
    ctx, device = distributed.init(runtime.resolve_device(cfg.device))
    evaluated = inference.evaluate(
        cfg,
        embedder.to(device),
        read_table(table_path),
        data_root,
        split=split,
        protocol="official",
        device=device,
        progress=show_bars(progress) and ctx.is_main,
    )
    result = distributed.broadcast_object({**evaluated, **fitted})
    if ctx.is_main:
        write_text_atomic(run_dir / metrics_name(split), json.dumps(result, indent=2) + "\n")
    return result


def fit_record(run_dir: str | Path) -> dict:
    """What ``fit`` recorded of a finished run: ``best_epoch``, the best epoch's ``val`` metrics and
    why it ``stopped`` (``fit.json``; a run finished before that file existed has them in its
    ``metrics.json``)."""
    for path in (Path(run_dir) / "fit.json", Path(run_dir) / "metrics.json"):
        if path.is_file():
            record = json.loads(path.read_text())
            if "best_epoch" in record:
                return {k: record[k] for k in ("best_epoch", "val", "stopped") if k in record}
    raise InputError(f"{run_dir}: holds no finished fit (no fit.json); train or resume it first")


def ensure_test_metrics(
    run_dir: str | Path, table_path: str | Path, data_root: str | Path, progress: bool = True
) -> dict:
    """``metrics.json`` of the finished fit in ``run_dir``: read back when written with intervals
    over items (by :func:`evaluate_run`), else evaluated now (never, or by ``fit`` itself before
    ``fit.json`` existed, with per-query intervals)."""
    path = Path(run_dir) / metrics_name("test")
    if path.is_file() and metrics.INTERVALS["items"] in json.loads(path.read_text()).get("ci", ""):
        return json.loads(path.read_text())
    return evaluate_run(run_dir, table_path, data_root, progress=progress)


# --------------------------------------------------------------------------- history


def _jsonable(value):
    return json.loads(json.dumps(value))


def _write_val_ranks(path: Path, ranks: dict) -> None:
    """val_ranks.csv is written from the checkpoint's lists, so it always matches best.pt."""
    write_text_atomic(path, pd.DataFrame(ranks).to_csv(index=False, lineterminator="\n"))


def _write_history(path: Path, rows: list[dict]) -> None:
    """history.csv is rewritten from the checkpoint's rows, so it always matches last.pt."""
    text = io.StringIO()
    writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(path, text.getvalue())


def _history_row(epoch: int, loss: float, lr: float, val: dict, images_per_s: float) -> dict:
    return {
        "epoch": epoch,
        "loss": loss,
        "lr": lr,
        "val_recall@1": val["recall@1"],
        "val_recall@5": val["recall@5"],
        "val_recall@10": val["recall@10"],
        "val_map": val["map"],
        "mean_embedding_norm": val["mean_embedding_norm"],
        "train_images_per_s": images_per_s,
    }
