"""The gallery index: a shop gallery embedded once, saved beside the model that embedded it,
and searched per query (exactly with :func:`helpers.evaluation.search.exact_topk`, or with an
approximate faiss index of :mod:`helpers.evaluation.ann`). ``build_index`` makes one from a
checkpoint and an image table; ``GalleryIndex.load`` checks it before anything is searched.

Scores are inner products of L2-normalised embeddings (cosine similarity): higher is closer. An
index may apply a post-processing method (:mod:`helpers.evaluation.postprocess`, recorded in
``index.json`` under ``postprocess``; absent = ``none``) to every search, so the CLI, ``04_demo``
and the live demo rank as the study adopted:

- ``flip_tta``: the gallery is embedded with the flip averaged in, and so is each query;
- ``dba``: the gallery is augmented once (at build for the search structure, at load for exact
  search): dense ``[G, G]`` similarities, memory and time quadratic in the gallery;
- ``aqe``: each query is expanded over its top-k gallery neighbours (found by the index's own
  search), then searched again: two searches per query;
- ``k_reciprocal``: each query is re-ranked alone against the whole gallery (so a photo ranks as
  in the study's evaluation), dense over ``1 + G`` points (``O(G^2)`` memory and a Python loop
  over the points per query): fine for demo-size galleries (thousands), not for millions.

Two runtimes embed (:data:`RUNTIMES`): ``torch`` (the default) and ``onnx``, the checkpoint's
model exported to ONNX (:mod:`helpers.modeling.export`) and run by onnxruntime on the CPU, with
the same preprocessing (:func:`helpers.evaluation.inference.embed_image` and ``embed_table`` run
either). An index built with ``runtime="onnx"`` embeds its gallery that way and keeps the model
beside ``model.pt`` (``model.onnx`` and its sidecar); ``index.json`` records the runtime and the
ONNX file's sha256. Its queries may then be embedded with either runtime (``load(runtime=)``).
"""

from __future__ import annotations

import json
import shutil
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core import repro
from helpers.core.config import config_from_dict
from helpers.core.errors import InputError, choose
from helpers.core.files import sha256_file
from helpers.core.runtime import resolve_device
from helpers.core.schema import read_table
from helpers.evaluation import inference, metrics
from helpers.evaluation.ann import AnnIndex, AnnParams, EmbeddingWriter
from helpers.evaluation.postprocess import PostProcess, create_postprocess, expand_queries, top_k
from helpers.evaluation.search import exact_topk
from helpers.modeling.checkpoints import embedder_from_state, load_embedder, read_checkpoint
from helpers.modeling.export import export_onnx
from helpers.modeling.onnx_embedder import load_onnx, read_sidecar, sidecar_path

INDEX_FILES = ("index.json", "embeddings.npy", "gallery.csv", "model.pt")


ANN_FILE = "ann.faiss"  # the faiss index of an approximate kind (helpers.evaluation.ann), beside the embeddings
ONNX_FILE = "model.onnx"  # an index built with runtime onnx: the exported model (+ its sidecar model.onnx.json)
RUNTIMES = ("torch", "onnx")


class GalleryIndex:
    """A gallery embedded once: embeddings, one row per gallery image, and the model that made
    them (so a query is embedded the same way). Saved as a folder of plain files.

    ``ann`` searches it: exact by default, or a faiss index of ``helpers.evaluation.ann`` whose kind,
    parameters and recall@10 against exact search are recorded under ``meta["ann"]`` (and
    written to ``ann.faiss``). ``embeddings_file``: the ``.npy`` the embeddings were streamed
    to; :meth:`save` moves it into the folder instead of writing a second copy.
    ``postprocess`` (from ``meta["postprocess"]``, default ``none``) is applied by :meth:`search`.
    ``runtime`` embeds the queries: ``torch`` (``model.pt``) or ``onnx`` (``onnx_model``: the
    index's own ``model.onnx``, or an export of the same checkpoint).
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
        runtime: str = "torch",
        onnx_model: Path | None = None,
    ):
        if len(embeddings) != len(gallery):
            raise InputError(f"index has {len(embeddings)} embeddings for {len(gallery)} gallery rows")
        self.embeddings, self.gallery = embeddings, gallery.reset_index(drop=True)
        self.model_state, self.run_config, self.meta = model_state, run_config, meta
        self.postprocess = PostProcess.from_json(meta.get("postprocess", {"name": "none"}))
        if ann is None:  # exact search: nothing to build or check beyond the array itself
            ann = AnnIndex(
                AnnParams(),
                self.postprocess.searched_gallery(embeddings),  # DBA: augmented here, once
                None,
                {"kind": "exact", "n": len(embeddings), "dim": int(embeddings.shape[1])},
                exact_topk,
            )
        self.ann, self.embeddings_file = ann, embeddings_file
        self.runtime = choose(runtime, RUNTIMES, "runtime")
        if runtime == "onnx" and onnx_model is None:
            raise InputError(
                "this index holds no ONNX model (built with --runtime torch): rebuild it with --runtime onnx"
            )
        self.onnx_model = onnx_model
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
        if self.onnx_model is not None:
            shutil.copyfile(self.onnx_model, staging / ONNX_FILE)
            shutil.copyfile(sidecar_path(self.onnx_model), sidecar_path(staging / ONNX_FILE))
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
    def load(cls, directory: str | Path, runtime: str = "torch", onnx_model: str | Path | None = None) -> GalleryIndex:
        """The index in ``directory``, its queries embedded by ``runtime``; ``onnx_model`` (runtime
        onnx): an export of the index's checkpoint to use instead of the index's own ``model.onnx``."""
        directory = Path(directory)
        choose(runtime, RUNTIMES, "runtime")
        missing = [name for name in INDEX_FILES if not (directory / name).is_file()]
        if missing:
            raise InputError(f"{directory}: not a gallery index (missing {', '.join(missing)})")
        try:
            state = torch.load(directory / "model.pt", map_location="cpu", weights_only=True)
            meta = json.loads((directory / "index.json").read_text())
            # Memory-mapped: a gallery of millions is paged in as searched, not loaded whole.
            embeddings = np.load(directory / "embeddings.npy", mmap_mode="r")
            ann = None
            if meta.get("ann", {}).get("kind", "exact") != "exact":  # its file holds the searched vectors
                ann = AnnIndex.load(meta["ann"], embeddings, directory / ANN_FILE, exact_search=exact_topk)
            return cls(
                embeddings,
                pd.read_csv(directory / "gallery.csv", dtype={"path": str}),
                {"model": state["model"], "model_config": state["model_config"]},
                state["config"],
                meta,
                ann,
                runtime=runtime,
                onnx_model=_onnx_of(directory, meta, runtime, onnx_model),
            )
        except InputError:
            raise
        except Exception as error:  # a truncated or foreign file: say which index, not a traceback
            raise InputError(f"{directory}: unreadable gallery index ({type(error).__name__})") from None

    def embedder(self):
        """The model that embeds the queries, in eval mode (built once): the gallery's torch model, or
        its ONNX export run by onnxruntime."""
        if self._embedder is None:
            if self.runtime == "onnx":
                self._embedder = load_onnx(self.onnx_model)[0]
            else:
                self._embedder = embedder_from_state(self.model_state)
        return self._embedder

    def embed_image(self, image, box=None) -> np.ndarray:
        """One query photo (a path or a PIL image; ``box`` = garment box, else the whole photo).

        A path is read as stored, as a dataset image whose box refers to the stored pixels; a
        user's photo comes decoded by :func:`helpers.data.transforms.open_photo` (upright, as a
        viewer shows it), as the CLI's ``search`` and the live demo pass it.
        """
        cfg = config_from_dict(self.run_config)
        cfg = replace(cfg, flip_tta=cfg.flip_tta or self.postprocess.flip_tta)
        return inference.embed_image(self.embedder(), cfg, image, box)

    def search(self, query: np.ndarray, k: int = 5) -> tuple[np.ndarray, np.ndarray]:
        """Top-k of each query row, ranked as the index's post-processing ranks, with the index's
        kind: exact (bounded memory, see exact_topk) or approximate (``helpers.evaluation.ann``;
        may pad with index -1 / score -inf). Exact search gives the top-k of
        ``self.postprocess.scores(query, gallery)`` (k-reciprocal: each row re-ranked alone)."""
        if self.postprocess.name == "k_reciprocal":
            return self._reranked(query, k)
        if self.postprocess.name == "aqe":
            query = self._expanded(query)
        return self.ann.search(query, k)

    def _expanded(self, query: np.ndarray) -> np.ndarray:
        """αQE's queries, each expanded over its top-k gallery neighbours as the index finds them."""
        params = self.postprocess.params
        similarities, neighbours = self.ann.search(query, params["k"])
        found = neighbours >= 0  # an approximate index may find fewer: those add nothing
        vectors = np.where(found[..., None], self.embeddings[np.maximum(neighbours, 0)], 0.0)
        return expand_queries(
            np.asarray(query, np.float32), vectors, np.where(found, similarities, 0.0), params["alpha"]
        )

    def _reranked(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """k-reciprocal: the whole gallery re-ranked (dense, see the module docstring)."""
        if k < 1:
            raise InputError(f"k must be >= 1, got {k}")
        scores = self.postprocess.scores(query, np.asarray(self.embeddings))
        best = top_k(scores, k)
        return np.take_along_axis(scores, best, axis=1).astype(np.float32), best.astype(np.int64)

    def search_image(self, image, box=None, k: int = 5) -> list[dict]:
        """The top-k gallery images for one photo, best first, as plain dicts (``score``: the
        post-processing's score; cosine similarity unless it re-ranks)."""
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


def _onnx_of(directory: Path, meta: dict, runtime: str, onnx_model: str | Path | None) -> Path | None:
    """The ONNX model an index's queries use: ``onnx_model`` if given (an export of the index's
    checkpoint: its sidecar says so), else the index's own; None where the index has none and the
    runtime is torch."""
    if onnx_model is not None:
        _check_same_model(onnx_model, meta["checkpoint_sha256"], f"{directory}'s checkpoint")
        return Path(onnx_model)
    own = directory / ONNX_FILE
    if own.is_file():
        return own
    if runtime == "onnx":
        raise InputError(
            f"{directory}: this index holds no ONNX model (built with --runtime torch): rebuild it with --runtime onnx"
        )
    return None


def _check_same_model(onnx_model: str | Path, checkpoint_sha256: str, what: str) -> None:
    """Refuse an export of another checkpoint: its embeddings would not match the gallery's."""
    if read_sidecar(onnx_model)["checkpoint_sha256"] != checkpoint_sha256:
        raise InputError(f"{onnx_model}: exported from another checkpoint than {what}")


def _onnx_for_build(checkpoint, table_path, data_root, onnx_model, folder: Path) -> Path:
    """The ONNX model an index is embedded with: ``onnx_model`` (checked to be this checkpoint's
    export) or the checkpoint exported now into ``folder`` (checked on images of the table)."""
    if onnx_model is not None:
        _check_same_model(onnx_model, sha256_file(checkpoint), str(checkpoint))
        return Path(onnx_model)
    export_onnx(checkpoint, folder / ONNX_FILE, table_path, data_root)
    return folder / ONNX_FILE


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
    postprocess: PostProcess | None = None,
    runtime: str = "torch",
    onnx_model: str | Path | None = None,
) -> dict:
    """Embed the protocol's gallery for ``split`` with a checkpoint's model and save the index.

    The embeddings are streamed batch by batch into a memory-mapped ``.npy`` (memory stays
    flat as the gallery grows). ``ann`` (default exact) picks the search structure; an
    approximate one is built over the memory-mapped file and its recall@10 against exact
    search is measured on ``n_recall`` gallery embeddings used as queries. ``postprocess``
    (default ``none``) is recorded in ``index.json`` and applied by every search (module docstring).
    ``runtime="onnx"`` embeds with ``onnx_model`` (an export of ``checkpoint``; default: exported
    now) on the CPU and keeps it in the index.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InputError(f"{out_dir}: not empty; choose a new index folder")
    if metrics.resolve_protocol(protocol) == "original_pairs":
        raise InputError("an index needs a gallery without duplicates: use --protocol official or split")
    choose(runtime, RUNTIMES, "runtime")
    if runtime == "onnx" and device not in ("auto", "cpu"):
        raise InputError(f"--runtime onnx embeds on the CPU (onnxruntime's CPU provider), not on {device}")
    state = read_checkpoint(checkpoint)
    embedder, cfg = load_embedder(checkpoint)
    device = "cpu" if runtime == "onnx" else resolve_device(device)
    postprocess = postprocess or create_postprocess("none")
    cfg = replace(cfg, num_workers=num_workers, flip_tta=cfg.flip_tta or postprocess.flip_tta)
    table = read_table(table_path)
    _, gallery = metrics.protocol_sets(table, split, protocol)
    ann = ann or AnnParams()
    # Bad parameters fail now, not after an hour of embedding; the dimension (unknown until the
    # model runs) is checked at build: ``m`` stands in for it, as it passes m's divisibility.
    ann.resolve(len(gallery), ann.m)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=out_dir.name + ".", dir=out_dir.parent) as work:
        onnx_path = None
        if runtime == "onnx":
            onnx_path = _onnx_for_build(checkpoint, table_path, data_root, onnx_model, Path(work))
            embedder = load_onnx(onnx_path)[0]
        embeddings, stream, searcher = _embed_gallery(
            cfg, embedder.to(device), gallery, data_root, device, out_dir, progress, ann, n_recall, postprocess
        )
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
            "postprocess": postprocess.to_json(),
            "runtime": runtime,  # what embedded the gallery
            **({"onnx_sha256": sha256_file(onnx_path)} if onnx_path else {}),
        }
        GalleryIndex(
            embeddings,
            gallery,
            {"model": state["model"], "model_config": state["model_config"]},
            state["config"],
            meta,
            searcher,
            embeddings_file=stream,
            runtime=runtime,
            onnx_model=onnx_path,
        ).save(out_dir)
    return meta


def _embed_gallery(cfg, embedder, gallery, data_root, device, out_dir: Path, progress, ann, n_recall, postprocess):
    """The gallery's embeddings, streamed into a memory-mapped ``.npy`` beside ``out_dir``, and the
    search structure built over them (the stream is removed if that fails)."""
    stream = out_dir.with_name(out_dir.name + ".embeddings.npy")
    with EmbeddingWriter(stream, len(gallery)) as writer:
        inference.embed_table(
            cfg, embedder, gallery, data_root, device, progress, "embedding gallery", sink=writer.write
        )
        writer.close()
    embeddings = np.load(stream, mmap_mode="r")
    try:
        searched = postprocess.searched_gallery(embeddings)
        searcher = AnnIndex.build(searched, ann, exact_search=exact_topk, n_recall=n_recall, progress=progress)
    except BaseException:
        stream.unlink(missing_ok=True)
        raise
    return embeddings, stream, searcher
