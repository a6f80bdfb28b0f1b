"""Inference with a model: embedding a table or one photo (with the preprocessing
:func:`helpers.data.transforms.create_transform` builds from the model's data config), and
evaluating a split under a protocol. Used by training (validation), the CLI, the gallery index and the
live demo alike, so a query is always embedded exactly as the gallery was.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core import runtime
from helpers.core.config import Config
from helpers.core.errors import InputError, choose
from helpers.core.progress import progress_bar
from helpers.data import datasets, store, transforms
from helpers.evaluation import metrics
from helpers.modeling import distributed, models

# Validation embeds the same rows with the same deterministic eval transform every epoch, so
# TableEmbedder keeps the preprocessed batches of its first pass in memory, up to this budget
# (MiB; env C2S_EVAL_CACHE_MB, 0 turns it off), and later passes skip decoding and resizing:
# on the 2-core CPU loading costs ~2.4 ms per image of one core against ~8 ms for the model
# (benchmarks/results/embed/decode_thread_2026-11-29.txt). Beyond the budget (e.g. a full-size val split) every pass streams.
EVAL_CACHE_MB = 1024


def resolve_eval_cache_bytes() -> int:
    return runtime.budget_bytes("C2S_EVAL_CACHE_MB", EVAL_CACHE_MB)


class CachedBatches:
    """``loader``'s batches; its first complete pass is kept in memory when the batches fit in
    ``budget`` bytes, and later passes replay them (same tensors, same order). Only for a
    loader whose batches are the same on every pass: no shuffling, no augmentation."""

    def __init__(self, loader, budget: int):
        self.loader, self.budget, self.kept = loader, budget, None
        self.dataset, self.batch_size, self.num_workers = loader.dataset, loader.batch_size, loader.num_workers

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        if self.kept is not None:
            yield from self.kept
            return
        kept, size = [], 0
        for batch in self.loader:
            size += sum(t.nbytes for t in batch if isinstance(t, torch.Tensor))
            kept = kept if kept is not None and size <= self.budget else None
            if kept is not None:
                kept.append(batch)
            yield batch
        self.kept = kept  # None when over budget; a pass left early never gets here


@torch.inference_mode()
def extract_embeddings(
    model: torch.nn.Module,
    loader,
    device: str = "cpu",
    flip_tta: bool = False,
    progress: bool = True,
    desc: str = "embedding",
    amp: torch.dtype | None = None,
    sink=None,
) -> np.ndarray | None:
    """``float32 [len(dataset), D]`` embeddings of a loader yielding ``(images, labels, index)``.

    Rows are placed by the dataset index each batch carries, so any loader order is safe.
    ``flip_tta`` averages each embedding with that of the horizontally flipped image and
    re-normalises (test-time augmentation: +0.6 top-1 reported on C2S). ``amp`` (bf16 / fp16)
    runs the model under CUDA autocast; None runs it in fp32. ``sink(rows, embeddings)``
    (e.g. :meth:`helpers.evaluation.ann.EmbeddingWriter.write`) receives each batch instead of an
    in-memory array, so a gallery of millions stays on disk; then nothing is returned.
    """
    # channels_last on every device: Lite0 inference at batch 16 ran 113 instead of 94 images/s
    # on the 2-core CPU (benchmarks/bench_embed.py, idle machine).
    model.eval().to(memory_format=torch.channels_last)
    cuda = str(device).startswith("cuda")
    out: np.ndarray | None = None
    for images, _, index in progress_bar(loader, desc=desc, disable=not progress, leave=False, mininterval=2.0):
        images = images.to(device, non_blocking=True).to(memory_format=torch.channels_last)
        with torch.autocast(device_type="cuda", dtype=amp or torch.float16, enabled=cuda and amp is not None):
            embeddings = model(images).float()
            if flip_tta:
                embeddings = torch.nn.functional.normalize(embeddings + model(images.flip(-1)).float(), dim=1)
        if sink is not None:
            sink(index.numpy(), embeddings.cpu().numpy())
            continue
        if out is None:
            out = np.zeros((len(loader.dataset), embeddings.shape[1]), dtype=np.float32)
        out[index.numpy()] = embeddings.cpu().numpy()
    if sink is not None:
        return None
    if out is None:
        raise InputError("nothing to embed: the image list is empty")
    return out


class TableEmbedder:
    """Embeds the rows of one table, in order, as often as asked, through one loader whose
    workers persist between calls (validation runs every epoch on the same rows). With
    ``cache``, the first pass's preprocessed batches are kept within the eval-cache budget
    (:data:`EVAL_CACHE_MB`), so later calls only run the model. With ``crops`` (the table's
    decoded-crop store, :mod:`helpers.data.store`, of this preprocessing) no pass decodes a
    JPEG: the first reads the stored crops, and so does every pass of a table over the budget.

    Under torchrun (``shard=True`` and a process group of N ranks) each rank embeds every N-th
    row (rank r: rows r, r+N, ...) and the embeddings of all ranks are all-gathered back into
    row order, so every rank returns the whole table's embeddings for 1/N of the work; every
    rank must then call it together. In eval mode a row's embedding does not depend on its
    batch, so the result is the one-process result.
    """

    def __init__(
        self,
        cfg: Config,
        data_config: dict,
        table: pd.DataFrame,
        data_root: str | Path,
        device: str,
        shard: bool = True,
        cache: bool = True,
        crops: store.CropStore | None = None,
    ):
        self.cfg, self.device, self.n_rows = cfg, device, len(table)
        ctx = distributed.current() if shard else distributed.Context()
        self.distributed = ctx.distributed
        self.positions = np.arange(len(table))[ctx.rank :: ctx.world_size]
        rows = table.iloc[self.positions].reset_index(drop=True) if ctx.distributed else table
        transform = transforms.create_transform(cfg, data_config)  # eval: deterministic
        if crops is not None:
            self._check_store(crops, table, data_root, transform)
        dataset = datasets.C2SDataset(rows, data_root, transform, store=crops, store_rows=self.positions)
        loader = datasets.make_loader(
            dataset,
            batch_size=runtime.resolve_embed_batch(cfg, device),
            num_workers=runtime.resolve_num_workers(cfg, device),
            seed=cfg.seed,
            device=device,
        )
        self.loader = CachedBatches(loader, resolve_eval_cache_bytes() if cache else 0)

    @staticmethod
    def _check_store(crops: store.CropStore, table: pd.DataFrame, data_root: str | Path, transform) -> None:
        """Refuse a store of other rows or preprocessing, or one with unreadable images (every
        row must be embedded: decoding it here would fail too)."""
        if crops.key != store.store_key(table, data_root, transform):
            raise InputError(f"{crops.path}: a crop store of other rows or another preprocessing")
        if not crops.valid.all():
            listing = crops.path.with_name(f"{crops.key}_bad_images.txt")
            raise InputError(f"{int((~crops.valid).sum())} image(s) to embed could not be read; see {listing}")

    def __call__(
        self, embedder: torch.nn.Module, progress: bool = True, desc: str = "embedding", sink=None
    ) -> np.ndarray | None:
        if self.distributed and sink is not None:
            raise InputError("a sink needs the whole table in one process: build the TableEmbedder with shard=False")
        local = extract_embeddings(
            embedder,
            self.loader,
            self.device,
            flip_tta=self.cfg.flip_tta,
            progress=progress,
            desc=desc,
            amp=runtime.amp_dtype(self.cfg, self.device),
            sink=sink,
        )
        if not self.distributed:
            return local
        # NCCL moves CUDA tensors only; gloo CPU ones.
        comm = self.device if str(self.device).startswith("cuda") else "cpu"
        embeddings = distributed.gather_rows(torch.from_numpy(local).to(comm)).cpu().numpy()
        positions = distributed.gather_rows(torch.from_numpy(self.positions).to(comm)).cpu().numpy()
        out = np.empty((self.n_rows, embeddings.shape[1]), dtype=np.float32)
        out[positions] = embeddings
        return out


def embed_table(
    cfg: Config,
    embedder: models.Embedder,
    table: pd.DataFrame,
    data_root: str | Path,
    device: str,
    progress: bool = True,
    desc: str = "embedding",
    sink=None,
) -> np.ndarray | None:
    """Embeddings of every row of ``table`` (row order kept), eval transform, no augmentation;
    with ``sink``, streamed to it batch by batch instead (see :func:`extract_embeddings`)."""
    # One pass: nothing to cache; with a sink (a gallery of millions) the table stays on disk.
    one_pass = TableEmbedder(cfg, embedder.data_config, table, data_root, device, shard=sink is None, cache=False)
    return one_pass(embedder, progress, desc, sink)


class ProtocolEvaluator:
    """Recall@K / mAP of one split under one protocol, for any model with the same
    preprocessing. Only the rows the protocol uses are embedded (read from ``crops``, their
    decoded-crop store, when given); the loader is built once."""

    def __init__(
        self,
        cfg: Config,
        data_config: dict,
        table: pd.DataFrame,
        data_root: str | Path,
        split: str = "test",
        protocol: str = "official",
        device: str = "cpu",
        cache: bool = True,
        crops: store.CropStore | None = None,
    ):
        self.rows = self.protocol_rows(table, split, protocol)
        self.split, self.protocol = split, protocol
        self.embed = TableEmbedder(cfg, data_config, self.rows, data_root, device, cache=cache, crops=crops)

    @staticmethod
    def protocol_rows(table: pd.DataFrame, split: str = "test", protocol: str = "official") -> pd.DataFrame:
        """The rows the protocol uses, in table order. The protocol picks rows by their own
        columns, so this sub-table gives the same query and gallery sets without embedding (or
        allocating) the rest."""
        queries, gallery = metrics.protocol_sets(table, split, protocol)
        return table.iloc[np.union1d(queries.index.to_numpy(), gallery.index.to_numpy())].reset_index(drop=True)

    def __call__(self, embedder: torch.nn.Module, progress: bool = True) -> dict:
        """The metrics dict (see :meth:`metrics_of`)."""
        return self.metrics_of(self.embed(embedder, progress, f"embedding {self.split}"))

    def with_ranks(self, embedder: torch.nn.Module, progress: bool = True) -> tuple[dict, pd.DataFrame]:
        """The metrics dict and the per-query ranks (what the study's paired statistics resample)
        of one embedding pass, ranked once."""
        embeddings = self.embed(embedder, progress, f"embedding {self.split}")
        queries, gallery, found = metrics.protocol_retrieval(self.rows, embeddings, self.split, self.protocol)
        return self._summary(queries, gallery, found, embeddings), metrics.ranks_table(queries, found)

    def metrics_of(self, embeddings: np.ndarray) -> dict:
        """The metrics dict of the embeddings of :attr:`rows`, plus ``mean_embedding_norm``: the
        norm of the mean unit embedding, near 1 when the embeddings have collapsed to one point."""
        queries, gallery, found = metrics.protocol_retrieval(self.rows, embeddings, self.split, self.protocol)
        return self._summary(queries, gallery, found, embeddings)

    def _summary(self, queries, gallery, found, embeddings: np.ndarray) -> dict:
        result = metrics.summarise_retrieval(queries, gallery, found, self.split, self.protocol)
        result["mean_embedding_norm"] = float(np.linalg.norm(embeddings.mean(axis=0)))
        return result

    def query_ranks(self, embeddings: np.ndarray) -> pd.DataFrame:
        """One row per scored query (``path``, ``item_id``, 0-based ``first_hit_rank``,
        ``average_precision``), sorted by path: what the study's paired statistics resample."""
        queries, _, found = metrics.protocol_retrieval(self.rows, embeddings, self.split, self.protocol)
        return metrics.ranks_table(queries, found)


def evaluate(
    cfg: Config,
    embedder: models.Embedder,
    table: pd.DataFrame,
    data_root: str | Path,
    split: str = "test",
    protocol: str = "official",
    device: str = "cpu",
    progress: bool = True,
    interval: str = "items",
    postprocess=None,
) -> dict:
    """One evaluation of ``embedder`` on the rows :class:`ProtocolEvaluator` picks (one pass, nothing
    cached), with its ``mean_embedding_norm``. ``interval``: what the bootstrap resamples
    (:data:`helpers.evaluation.metrics.INTERVALS`; default items). ``postprocess``: a
    :class:`helpers.evaluation.postprocess.PostProcess` to rank with (flip TTA embeds with the
    flip); default none, plain cosine."""
    choose(interval, tuple(metrics.INTERVALS), "interval")  # before the embedding, not after
    if postprocess is not None:
        cfg = replace(cfg, flip_tta=cfg.flip_tta or postprocess.flip_tta)
    evaluator = ProtocolEvaluator(cfg, embedder.data_config, table, data_root, split, protocol, device, cache=False)
    embeddings = evaluator.embed(embedder, progress, f"embedding {split}")
    scorer = None if postprocess is None else postprocess.scorer
    result = metrics.evaluate_protocol(
        evaluator.rows, embeddings, split=split, protocol=protocol, interval=interval, scorer=scorer
    )
    result["mean_embedding_norm"] = float(np.linalg.norm(embeddings.mean(axis=0)))
    if postprocess is not None:
        result["postprocess"] = postprocess.to_json()
    return result


def evaluate_zero_shot(
    cfg: Config,
    table: pd.DataFrame,
    data_root: str | Path,
    split: str = "test",
    protocol: str = "official",
    progress: bool = True,
    interval: str = "items",
) -> dict:
    """Metrics of ``cfg.backbone``'s pooled, L2-normalised features with ``cfg.weights`` and no
    training (the baseline every trained model is compared with); ``model`` records how it was built.
    ``interval``: what the bootstrap resamples, as in :func:`evaluate`."""
    from helpers.core import repro

    repro.seed_everything(cfg.seed, cfg.deterministic)  # a random init ("none") is seeded too
    embedder = models.create_embedder(
        cfg.backbone, weights=cfg.weights, head="pooled", pooling=cfg.pooling, img_size=cfg.img_size
    )
    device = runtime.resolve_device(cfg.device)
    result = evaluate(
        cfg, embedder.to(device).eval(), table, data_root, split, protocol, device, progress, interval=interval
    )
    return {**result, "model": embedder.config}


def embed_image(embedder: models.Embedder, cfg: Config, image, box=None) -> np.ndarray:
    """``[1, D]`` embedding of one photo (a path or a PIL image) as the run's gallery was
    embedded; ``box`` = the garment's box (with the run's margin), else the whole photo."""
    transform = transforms.create_transform(cfg, embedder.data_config, margin=None if box is not None else 0.0)
    picture = transforms.open_rgb(image) if isinstance(image, (str, Path)) else image.convert("RGB")
    batch = transform(picture, box).unsqueeze(0)
    with torch.inference_mode():
        embedding = embedder(batch)
        if cfg.flip_tta:
            embedding = torch.nn.functional.normalize(embedding + embedder(batch.flip(-1)), dim=1)
    return embedding.numpy()
