"""The gallery index: a shop gallery embedded once, saved beside the model that embedded it,
and searched per query (exactly with :func:`helpers.evaluation.search.exact_topk`, or with an
approximate faiss index of :mod:`helpers.evaluation.ann`). ``build_index`` makes one from a
checkpoint and an image table; ``GalleryIndex.load`` checks it before anything is searched.

Scores are inner products of L2-normalised embeddings (cosine similarity): higher is closer.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core import repro, runtime
from helpers.core.config import config_from_dict
from helpers.core.errors import InputError
from helpers.core.files import sha256_file
from helpers.core.schema import read_table
from helpers.evaluation import inference, metrics
from helpers.evaluation.ann import AnnIndex, AnnParams, EmbeddingWriter
from helpers.evaluation.search import exact_topk
from helpers.modeling.checkpoints import embedder_from_state, load_embedder, read_checkpoint

INDEX_FILES = ("index.json", "embeddings.npy", "gallery.csv", "model.pt")


ANN_FILE = "ann.faiss"  # the faiss index of an approximate kind (helpers.evaluation.ann), beside the embeddings


class GalleryIndex:
    """A gallery embedded once: embeddings, one row per gallery image, and the model that made
    them (so a query is embedded the same way). Saved as a folder of plain files.

    ``ann`` searches it: exact by default, or a faiss index of ``helpers.evaluation.ann`` whose kind,
    parameters and recall@10 against exact search are recorded under ``meta["ann"]`` (and
    written to ``ann.faiss``). ``embeddings_file``: the ``.npy`` the embeddings were streamed
    to; :meth:`save` moves it into the folder instead of writing a second copy.
    """

    def __init__(
        self,
        embeddings: np.ndarray,
        gallery: pd.DataFrame,
        model_state: dict,
        run_config: dict,
        meta: dict,
        ann: AnnIndex | None = None,
        embeddings_file: Path | None = None,
    ):
        if len(embeddings) != len(gallery):
            raise InputError(f"index has {len(embeddings)} embeddings for {len(gallery)} gallery rows")
        self.embeddings, self.gallery = embeddings, gallery.reset_index(drop=True)
        self.model_state, self.run_config, self.meta = model_state, run_config, meta
        if ann is None:  # exact search: nothing to build or check beyond the array itself
            ann = AnnIndex(
                AnnParams(),
                embeddings,
                None,
                {"kind": "exact", "n": len(embeddings), "dim": int(embeddings.shape[1])},
                exact_topk,
            )
        self.ann, self.embeddings_file = ann, embeddings_file
        self._embedder = None

    def save(self, directory: str | Path) -> Path:
        """Write the index folder (via a ``.partial`` sibling renamed at the end: never half an index)."""
        directory = Path(directory)
        if directory.exists() and any(directory.iterdir()):
            raise InputError(f"{directory}: not empty; choose a new index folder")
        staging = directory.with_name(directory.name + ".partial")
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        if self.embeddings_file is not None:
            # Streamed to disk already (build_index): move it, don't copy a file of GiBs.
            self.embeddings_file.replace(staging / "embeddings.npy")
            self.embeddings_file = None  # moved: a later save writes the (still mapped) array
        else:
            np.save(staging / "embeddings.npy", self.embeddings)
        self.ann.save(staging / ANN_FILE)  # approximate kinds only; atomic
        self.gallery.to_csv(staging / "gallery.csv", index=False, lineterminator="\n")
        torch.save(
            {
                "model": self.model_state["model"],
                "model_config": self.model_state["model_config"],
                "config": self.run_config,
            },
            staging / "model.pt",
        )
        (staging / "index.json").write_text(json.dumps(self.meta, indent=2) + "\n")
        if directory.exists():
            directory.rmdir()
        staging.rename(directory)
        return directory

    @classmethod
    def load(cls, directory: str | Path) -> GalleryIndex:
        directory = Path(directory)
        missing = [name for name in INDEX_FILES if not (directory / name).is_file()]
        if missing:
            raise InputError(f"{directory}: not a gallery index (missing {', '.join(missing)})")
        try:
            state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
            meta = json.loads((directory / "index.json").read_text())
            # Memory-mapped: a gallery of millions is paged in as searched, not loaded whole.
            embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
            ann = None
            if meta.get("ann", {}).get("kind", "exact") != "exact":
                ann = AnnIndex.load(meta["ann"], embeddings, directory / ANN_FILE, exact_search=exact_topk)
            return cls(
                embeddings,
                pd.read_csv(directory / "gallery.csv", dtype={"path": str}),
                {"model": state["model"], "model_config": state["model_config"]},
                state["config"],
                meta,
                ann,
            )
        except InputError:
            raise
        except Exception as error:  # a truncated or foreign file: say which index, not a traceback
            raise InputError(f"{directory}: unreadable gallery index ({type(error).__name__})") from None

    def embedder(self):
        """The model that embedded the gallery, in eval mode (built once)."""
        if self._embedder is None:
            self._embedder = embedder_from_state(self.model_state)
        return self._embedder

    def embed_image(self, image, box=None) -> np.ndarray:
        """One query photo (a path or a PIL image; ``box`` = garment box, else the whole photo).

        A path is read as stored, as a dataset image whose box refers to the stored pixels; a
        user's photo comes decoded by :func:`helpers.data.transforms.open_photo` (upright, as a
        viewer shows it), as the CLI's ``search`` and the live demo pass it.
        """
        return inference.embed_image(self.embedder(), config_from_dict(self.run_config), image, box)

    def search(self, query: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-k over the gallery with the index's kind: exact (bounded memory, see exact_topk)
        or approximate (``helpers.evaluation.ann``; may pad with index -1 / score -inf)."""
        return self.ann.search(query, k)

    def search_image(self, image, box=None, k: int = 5) -> list[dict]:
        """The top-k gallery images for one photo, best first, as plain dicts."""
        scores, indices = self.search(self.embed_image(image, box), k)
        found = indices[0] >= 0  # an approximate index may find fewer than k
        scores, indices = scores[:, found], indices[:, found]
        rows = self.gallery.iloc[indices[0]]
        return [
            {
                "rank": rank + 1,
                "score": float(score),
                "item_id": row.item_id,
                "path": row.path,
                "category": row.category,
            }
            for rank, (score, row) in enumerate(zip(scores[0], rows.itertuples(index=False)))
        ]


def build_index(
    checkpoint: str | Path,
    table_path: str | Path,
    data_root: str | Path,
    out_dir: str | Path,
    split: str = "test",
    protocol: str = "official",
    device: str = "auto",
    num_workers: int | None = None,
    progress: bool = True,
    ann: AnnParams | None = None,
    n_recall: int = 1000,
) -> dict:
    """Embed the protocol's gallery for ``split`` with a checkpoint's model and save the index.

    The embeddings are streamed batch by batch into a memory-mapped ``.npy`` (memory stays
    flat as the gallery grows). ``ann`` (default exact) picks the search structure; an
    approximate one is built over the memory-mapped file and its recall@10 against exact
    search is measured on ``n_recall`` gallery embeddings used as queries.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: not empty; choose a new index folder")
    if metrics.resolve_protocol(protocol) == "original_pairs":
        raise InputError("an index needs a gallery without duplicates: use --protocol official or split")
    state = read_checkpoint(checkpoint)
    embedder, cfg = load_embedder(checkpoint)
    device = runtime.resolve_device(device)
    cfg = replace(cfg, num_workers=num_workers)
    table = read_table(table_path)
    _, gallery = metrics.protocol_sets(table, split, protocol)
    ann = ann or AnnParams()
    # Bad parameters fail now, not after an hour of embedding; the dimension (unknown until the
    # model runs) is checked at build: ``m`` stands in for it, as it passes m's divisibility.
    ann.resolve(len(gallery), ann.m)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    stream = out_dir.with_name(out_dir.name + ".embeddings.npy")
    with EmbeddingWriter(stream, len(gallery)) as writer:
        inference.embed_table(
            cfg, embedder.to(device), gallery, data_root, device, progress, "embedding gallery", sink=writer.write
        )
        writer.close()
    embeddings = np.load(stream, mmap_mode="r")
    try:
        searcher = AnnIndex.build(embeddings, ann, exact_search=exact_topk, n_recall=n_recall, progress=progress)
    except BaseException:
        stream.unlink(missing_ok=True)
        raise
    meta = {
        "n_gallery": len(gallery),
        "dim": int(embeddings.shape[1]),
        "split": split,
        "protocol": protocol,
        "gallery_definition": metrics.PROTOCOLS[protocol],
        "data_root": str(data_root),
        "table": str(table_path),
        "table_sha256": sha256_file(table_path),
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),  # what a reuse of this index is checked against
        "env": repro.env_info(),
        "ann": searcher.meta,
    }
    GalleryIndex(
        embeddings,
        gallery,
        {"model": state["model"], "model_config": state["model_config"]},
        state["config"],
        meta,
        searcher,
        embeddings_file=stream,
    ).save(out_dir)
    return meta
