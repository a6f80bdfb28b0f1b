"""Fit and evaluate an embedder: P×K batches, metric loss, val Recall@5 for model selection.

A run directory holds ``config.json`` (the resolved config, the model's config, the table's
hash and ``env_info``), ``history.csv`` (one row per epoch), ``best.pt`` / ``last.pt``
(written atomically) and ``metrics.json`` (the test split, official protocol, evaluated once
with ``best.pt``; the val numbers used for selection are kept apart under ``"val"``).

Reproducibility: every epoch reseeds torch from ``(seed, epoch)`` and the sampler draws from
``(seed, epoch)``, so ``--resume`` from ``last.pt`` continues a run exactly as if it had not
stopped. A run directory that already holds a run is never reused without ``--resume``, and
``--resume`` refuses a checkpoint whose config differs (a resume never mixes two runs).
"""

from __future__ import annotations

import csv
import hashlib
import json
import math
import os
import shutil
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from tqdm.auto import tqdm

from . import data, losses, metrics, models, repro, retrieval
from .config import Config
from .errors import InputError

COLLAPSE_THRESHOLD = 0.99  # norm of the mean unit embedding: 1.0 means all embeddings equal


def checkpoint_save(path: Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    tmp = path.with_name(path.name + ".tmp")
    torch.save(state, tmp)
    os.replace(tmp, path)


def checkpoint_load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None


def load_checkpoint(path: str | Path) -> tuple[models.Embedder, Config]:
    """The embedder of a checkpoint (``best.pt``, ``last.pt``) in eval mode, and its run's config
    (so evaluation uses the preprocessing the model was trained with)."""
    state = checkpoint_load(path)
    if not {"model_config", "model", "config"} <= set(state):
        raise InputError(f"{path}: not a checkpoint written by helpers.train")
    embedder = models.embedder_from_config(state["model_config"])
    embedder.load_state_dict(state["model"])
    return embedder.eval(), config_from_dict(state["config"])


def config_from_dict(values: dict) -> Config:
    """Inverse of ``asdict`` after a JSON round trip (lists back to the tuples a Config holds)."""
    return Config(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def table_sha256(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def make_transform(cfg: Config, data_config: dict, augment: str = "none", margin: float | None = None) -> data.C2STransform:
    """The run's preprocessing: the model's input size / mean / std, the config's crop margin,
    resize mode and photometric normalisation; ``augment`` only for training."""
    return data.build_transform(data_config["input_size"][-1], data_config["mean"], data_config["std"],
                                data_config["interpolation"], augment=augment, resize=cfg.resize,
                                photometric=cfg.photometric, margin=cfg.box_margin if margin is None else margin)


def embed_table(cfg: Config, embedder: models.Embedder, table: pd.DataFrame, data_root: str | Path,
                device: str, progress: bool = True, desc: str = "embedding") -> np.ndarray:
    """Embeddings of every row of ``table`` (row order kept), eval transform, no augmentation."""
    dataset = data.C2SDataset(table, data_root, make_transform(cfg, embedder.data_config))
    loader = data.make_loader(dataset, batch_size=64, num_workers=cfg.num_workers, seed=cfg.seed, device=device)
    return retrieval.extract_embeddings(embedder, loader, device, flip_tta=cfg.flip_tta, progress=progress, desc=desc,
                                        amp_dtype=_amp_dtype(cfg, device))


def evaluate(cfg: Config, embedder: models.Embedder, table: pd.DataFrame, data_root: str | Path, split: str = "test",
             protocol: str = "official", device: str = "cpu", progress: bool = True) -> dict:
    """Recall@K / mAP of ``split`` under ``protocol`` (only the rows the protocol uses are embedded),
    plus ``mean_embedding_norm``: the norm of the mean unit embedding, near 1 when collapsed."""
    queries, gallery = metrics.protocol_sets(table, split, protocol)
    # The protocol picks rows by their own columns, so the sub-table of the rows it uses
    # gives the same query and gallery sets without embedding (or allocating) the rest.
    used = table.iloc[np.union1d(queries.index.to_numpy(), gallery.index.to_numpy())].reset_index(drop=True)
    embeddings = embed_table(cfg, embedder, used, data_root, device, progress, f"embedding {split}")
    result = metrics.evaluate_protocol(used, embeddings, split=split, protocol=protocol)
    result["mean_embedding_norm"] = float(np.linalg.norm(embeddings.mean(axis=0)))
    return result


def _schedule(cfg: Config, steps_per_epoch: int):
    """Linear warm-up over ``warmup_epochs``, then cosine decay to 1 % of the base rate."""
    warmup, total = cfg.warmup_epochs * steps_per_epoch, max(1, cfg.epochs * steps_per_epoch)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, total - warmup)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return factor


def _amp_dtype(cfg: Config, device: str) -> torch.dtype | None:
    if cfg.amp == "off" or not device.startswith("cuda"):
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16


def train_one_epoch(embedder, loader, criterion, optimizer, scheduler, scaler, device: str,
                    amp_dtype: torch.dtype | None, grad_clip: float, progress: bool = False,
                    desc: str = "training") -> tuple[float, int, float]:
    """One pass over ``loader``: returns (mean loss, images seen, seconds). Stops the run on a
    non-finite loss with a message that says what to try."""
    embedder.train()
    started, losses_seen, images_seen = time.perf_counter(), [], 0
    for images, labels, _ in tqdm(loader, desc=desc, disable=not progress, leave=False, mininterval=2.0):
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if device.startswith("cuda"):
            images = images.to(memory_format=torch.channels_last)
        with torch.autocast(device_type=device.split(":")[0], dtype=amp_dtype or torch.float32,
                            enabled=amp_dtype is not None):
            loss = criterion(embedder(images), labels)
        if not torch.isfinite(loss):
            raise InputError(f"loss became {loss.item()} ({desc}): lower --lr, use --amp auto (bf16) or off, "
                             "and check the input images")
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


def _check_resume(run_dir: Path, cfg: Config, table_path: str | Path, resume: bool) -> dict | None:
    last = run_dir / "last.pt"
    existing = [p.name for p in (run_dir / "config.json", last, run_dir / "history.csv") if p.exists()]
    if not resume:
        if existing:
            raise InputError(f"{run_dir}: already holds a run ({', '.join(existing)}); "
                             "pass --resume to continue it or choose a new --out")
        return None
    if not last.is_file():
        raise InputError(f"{last}: nothing to resume (no last.pt)")
    state = checkpoint_load(last)
    saved = state["config"]
    differs = sorted(k for k, v in asdict(cfg).items() if _jsonable(saved.get(k)) != _jsonable(v))
    if differs:
        detail = ", ".join(f"{k}: {saved.get(k)!r} → {getattr(cfg, k)!r}" for k in differs)
        raise InputError(f"{last}: was trained with another config ({detail}); start a new --out instead")
    if state["table_sha256"] != table_sha256(table_path):
        raise InputError(f"{table_path}: differs from the table {last} was trained on (sha256 changed); "
                         "start a new --out instead")
    return state


def _jsonable(value):
    return json.loads(json.dumps(value))


def _write_history(path: Path, rows: list[dict]) -> None:
    """history.csv is rewritten from the checkpoint's rows, so it always matches last.pt."""
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def _copy_atomic(source: Path, target: Path) -> None:
    tmp = target.with_name(target.name + ".tmp")
    shutil.copyfile(source, tmp)
    os.replace(tmp, target)


def fit(cfg: Config, table_path: str | Path, data_root: str | Path, run_dir: str | Path, resume: bool = False,
        progress: bool = True, stop_after_epoch: int | None = None) -> dict | None:
    """Train, select on val Recall@5 with early stopping, then evaluate ``best.pt`` on test once.

    ``stop_after_epoch`` ends the call after that epoch as an interruption would (returns None,
    no test evaluation); ``resume=True`` later continues the same run.

    Crash safety: ``last.pt`` holds everything (weights, optimizer, schedule, early-stopping
    state, the history rows) and is written first; ``best.pt`` is a copy of it and
    ``history.csv`` is rewritten from it, so a crash between writes is repaired on resume.
    """
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    state = _check_resume(run_dir, cfg, table_path, resume)
    from .sampling import read_table

    table = read_table(table_path)
    device = repro.resolve_device(cfg.device)
    repro.seed_everything(cfg.seed, cfg.deterministic)

    embedder = models.create_embedder(cfg.backbone, cfg.embed_dim, weights="none" if state else cfg.weights,
                                      head=cfg.head, pooling=cfg.pooling, img_size=cfg.img_size)
    if state:
        embedder.config = state["model_config"]
        embedder.load_state_dict(state["model"])
    embedder.to(device)
    if device.startswith("cuda"):
        embedder.to(memory_format=torch.channels_last)
    criterion = losses.create_loss(cfg.loss, **_loss_kwargs(cfg))
    optimizer = torch.optim.AdamW(models.param_groups(embedder, cfg.lr, cfg.backbone_lr_mult), weight_decay=cfg.weight_decay)

    train_rows = table.loc[table.split == "train"].reset_index(drop=True)
    if train_rows.empty:
        raise InputError(f"{table_path}: the train split is empty")
    train_set = data.C2SDataset(train_rows, data_root, make_transform(cfg, embedder.data_config, cfg.augment))
    sampler = data.PKSampler((train_set.labels, train_set.domains), cfg.p_items, cfg.k_images, seed=cfg.seed)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, _schedule(cfg, len(sampler)))
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)

    if state:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if state["scaler"]:
            scaler.load_state_dict(state["scaler"])
        if state["bad_epochs"] == 0 and state["epoch"] >= 0:
            _copy_atomic(run_dir / "last.pt", run_dir / "best.pt")  # the copy a crash may have missed
        _write_history(run_dir / "history.csv", state["history"])
    else:
        # Epoch 0: the untrained model on val. It is the baseline that training must beat, and
        # its embedding spread tells a collapse caused by training from a model that starts
        # nearly collapsed (a random init).
        initial = evaluate(cfg, embedder, table, data_root, split="val", device=device, progress=False)
        state = {"epoch": -1, "best": -1.0, "bad_epochs": 0, "initial_norm": initial["mean_embedding_norm"],
                 "history": [_history_row(0, float("nan"), cfg.lr, initial, float("nan"))],
                 "table_sha256": table_sha256(table_path)}
        (run_dir / "config.json").write_text(json.dumps({
            "config": asdict(cfg), "model": embedder.config, "table": str(table_path),
            "table_sha256": state["table_sha256"], "data_root": str(data_root),
            "ineligible_train_items": sampler.n_ineligible, "env": repro.env_info()}, indent=2, default=str))

    def save(epoch: int, val: dict | None) -> None:
        state.update(model=embedder.state_dict(), optimizer=optimizer.state_dict(), scheduler=scheduler.state_dict(),
                     scaler=scaler.state_dict(), epoch=epoch, config=_jsonable(asdict(cfg)),
                     model_config=embedder.config, val=val)
        checkpoint_save(run_dir / "last.pt", state)
        if val is not None and state["bad_epochs"] == 0:
            _copy_atomic(run_dir / "last.pt", run_dir / "best.pt")
        _write_history(run_dir / "history.csv", state["history"])

    if state["epoch"] < 0 and not (run_dir / "last.pt").exists():
        save(-1, None)  # a crash in epoch 1 can then be resumed too
    if stop_after_epoch == 0:
        return None

    stopped = None
    for epoch in range(state["epoch"] + 1, cfg.epochs):
        if state["bad_epochs"] >= cfg.patience:
            stopped = f"early stop: val recall@5 did not improve for {cfg.patience} epochs"
            break
        torch.manual_seed(cfg.seed * 100_003 + epoch)  # augmentation and worker seeds = f(seed, epoch)
        sampler.set_epoch(epoch)
        loader = data.make_loader(train_set, batch_sampler=sampler, num_workers=cfg.num_workers,
                                  seed=cfg.seed * 100_003 + epoch, device=device)
        loss, images_seen, seconds = train_one_epoch(embedder, loader, criterion, optimizer, scheduler, scaler,
                                                     device, amp_dtype, cfg.grad_clip, progress,
                                                     desc=f"epoch {epoch + 1}/{cfg.epochs}")
        del loader  # its workers are not needed during evaluation

        val = evaluate(cfg, embedder, table, data_root, split="val", protocol="official", device=device, progress=False)
        improved = val["recall@5"] > state["best"]
        state["best"], state["bad_epochs"] = (val["recall@5"], 0) if improved else (state["best"], state["bad_epochs"] + 1)
        state["history"].append(_history_row(epoch + 1, loss, optimizer.param_groups[0]["lr"], val, images_seen / seconds))
        save(epoch, val)
        if progress:
            print(f"epoch {epoch + 1}: loss {loss:.4f}  val R@1 {val['recall@1']:.3f}  R@5 {val['recall@5']:.3f}")
        spread, initial_norm = val["mean_embedding_norm"], state["initial_norm"]
        if spread > COLLAPSE_THRESHOLD and spread > initial_norm + 0.005:
            raise InputError(f"embeddings collapsed at epoch {epoch + 1} (mean unit embedding has norm {spread:.3f}, "
                             f"{initial_norm:.3f} before training): "
                             "check that pretrained weights loaded (--weights), lower --lr, or try --loss infonce")
        if stop_after_epoch is not None and epoch + 1 >= stop_after_epoch:
            return None

    best_state = checkpoint_load(run_dir / "best.pt")
    embedder.load_state_dict(best_state["model"])
    test = evaluate(cfg, embedder, table, data_root, split="test", protocol="official", device=device, progress=progress)
    result = {**test, "best_epoch": best_state["epoch"] + 1, "val": best_state["val"], "stopped": stopped}
    (run_dir / "metrics.json").write_text(json.dumps(result, indent=2) + "\n")
    return result


def _history_row(epoch: int, loss: float, lr: float, val: dict, images_per_s: float) -> dict:
    return {"epoch": epoch, "loss": loss, "lr": lr, "val_recall@1": val["recall@1"], "val_recall@5": val["recall@5"],
            "val_recall@10": val["recall@10"], "val_map": val["map"], "mean_embedding_norm": val["mean_embedding_norm"],
            "train_images_per_s": images_per_s}


def _loss_kwargs(cfg: Config) -> dict:
    return {"temperature": cfg.temperature} if cfg.loss == "infonce" else {"margin": cfg.margin}
