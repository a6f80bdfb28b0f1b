"""The decoded-crop store: each training and val image decoded, cropped to its box and resized
once per preprocessing, kept as uint8, and reused by every epoch, seed and study run that shares it.

Without it every epoch decodes the same JPEGs again: on the 2-core CPU the loop ran ~230 ms a
32-image step behind the bare model (benchmarks/results/train/before_store_2026-11-30.txt), and on a GPU the input pipeline, not the model, set the pace.
Val (the official protocol's rows, eval transform) has a store of its own: a fit's first val pass
reads it instead of decoding, and so does every pass of a val split too large for
:class:`helpers.evaluation.inference.TableEmbedder`'s in-memory cache.

What is stored is :meth:`C2STransform.prepare`'s output: the box crop (with the run's margin),
the photometric mode and the resize to the model's input side. The augmentation presets work
on exactly that square (their crops and scales are of the resized image), so storing at the
input side loses nothing: a stored image followed by :meth:`C2STransform.finish` gives the same
tensor as the whole chain from the JPEG, with or without augmentation (tests/test_store.py).

A store is a pair of files beside the prepared table, ``stores/<key>.npy`` (uint8, ``[rows,
side, side, 3]``) and ``stores/<key>.json``, ``key`` a hash of the rows (paths and boxes, in
order), the data root and the prepared fields. Another table or preprocessing is another key,
so a store is never reused for them; the ``.npy`` is written as ``.partial<pid>`` and renamed, and
the JSON is written last, so an interrupted build is rebuilt, never read. An image that cannot
be decoded is excluded (its rows are marked invalid) and listed in ``<key>_bad_images.txt``.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd

from helpers.core.errors import InputError
from helpers.core.files import sha256_bytes, write_text_atomic
from helpers.core.progress import progress_bar
from helpers.core.runtime import budget_bytes
from helpers.core.schema import BOX_COLUMNS
from helpers.data.transforms import C2STransform, open_rgb

# A store up to this size (MiB; env C2S_STORE_MB) is read into memory; a larger one is
# memory-mapped, so a full-size DeepFashion sample never needs its bytes in RAM at once.
STORE_MB = 2048
FORMAT = 1  # bumped when what a store holds changes


def resolve_store_bytes() -> int:
    return budget_bytes("C2S_STORE_MB", STORE_MB)


def store_key(rows: pd.DataFrame, data_root: str | Path, transform: C2STransform) -> str:
    """What makes two stores the same: the rows in order, where they are read from, and every
    field :meth:`C2STransform.prepare` depends on."""
    identity = {
        "format": FORMAT,
        "rows": rows[["path", *BOX_COLUMNS]].astype(str).to_numpy().tolist(),
        "data_root": str(Path(data_root).resolve()),
        "prepared": transform.prepared_fields,
    }
    return sha256_bytes(json.dumps(identity, sort_keys=True).encode())[:16]


class CropStore:
    """``pixels[i]``: row ``i``'s prepared image (uint8 HWC); ``valid[i]``: it could be decoded."""

    def __init__(self, path: Path, meta: dict, in_memory: bool):
        self.path, self.meta, self.in_memory = Path(path), meta, in_memory
        self.valid = np.asarray(meta["valid"], dtype=bool)
        self._pixels = None

    @property
    def pixels(self) -> np.ndarray:
        if self._pixels is None:  # opened lazily: a worker process opens its own map
            mapped = np.load(self.path, mmap_mode="r")
            self._pixels = np.array(mapped) if self.in_memory else mapped
        return self._pixels

    @property
    def key(self) -> str:
        return self.meta["key"]

    def __len__(self) -> int:
        return len(self.valid)

    def __getstate__(self) -> dict:
        # A DataLoader worker started by spawn gets the path, not a copy of every image.
        return {**self.__dict__, "_pixels": None}


def _read_meta(meta_path: Path, key: str, rows: int, side: int) -> dict | None:
    """The store's record when it is complete and of this key and shape, else None (rebuild)."""
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, ValueError):
        return None
    shape = [rows, side, side, 3]
    if meta.get("key") != key or meta.get("shape") != shape or len(meta.get("valid", [])) != rows:
        return None
    return meta


def ensure_store(
    rows: pd.DataFrame,
    data_root: str | Path,
    transform: C2STransform,
    folder: str | Path,
    budget_bytes: int | None = None,
    progress: bool = True,
) -> CropStore:
    """The store of ``rows`` prepared by ``transform``: read when ``folder`` holds a complete one
    of the same key, else built (every image decoded once) and written there."""
    folder, data_root = Path(folder), Path(data_root)
    key = store_key(rows, data_root, transform)
    side = transform.img_size
    path, meta_path = folder / f"{key}.npy", folder / f"{key}.json"
    budget = resolve_store_bytes() if budget_bytes is None else budget_bytes
    meta = _read_meta(meta_path, key, len(rows), side) if path.is_file() else None
    if meta is None:
        meta = _build(rows, data_root, transform, folder, key, progress)
    return CropStore(path, meta, in_memory=meta["bytes"] <= budget)


def _build(
    rows: pd.DataFrame, data_root: Path, transform: C2STransform, folder: Path, key: str, progress: bool
) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    side = transform.img_size
    partial = folder / f"{key}.npy.partial{os.getpid()}"  # two builders never share one
    started = time.perf_counter()
    paths = rows["path"].to_numpy(dtype=str)
    boxes = rows[list(BOX_COLUMNS)].to_numpy(dtype=np.float64)
    valid = np.ones(len(rows), dtype=bool)
    bad: list[str] = []
    pixels = np.lib.format.open_memmap(partial, mode="w+", dtype=np.uint8, shape=(len(rows), side, side, 3))
    try:
        for i in progress_bar(range(len(rows)), desc="decoding into the crop store", disable=not progress):
            path = data_root / paths[i]
            try:
                prepared = transform.prepare(open_rgb(path), boxes[i])
            except InputError as error:  # missing, truncated, or a box outside the image
                valid[i] = False
                bad.append(f"{paths[i]}\t{error}")
                continue
            pixels[i] = np.asarray(prepared, dtype=np.uint8)
        pixels.flush()
        del pixels
        with open(partial, "rb+") as handle:  # the bytes must be on disk before the rename
            os.fsync(handle.fileno())
        os.replace(partial, folder / f"{key}.npy")
    finally:
        partial.unlink(missing_ok=True)
    if bad:
        listing = folder / f"{key}_bad_images.txt"
        write_text_atomic(listing, "\n".join(bad) + "\n")
        print(f"crop store: {len(bad)} image(s) could not be read and are excluded; see {listing}", file=sys.stderr)
    meta = {
        "key": key,
        "shape": [len(rows), side, side, 3],
        "bytes": len(rows) * side * side * 3,
        "prepared": transform.prepared_fields,
        "n_excluded": len(bad),
        "build_seconds": round(time.perf_counter() - started, 2),
        "valid": valid.astype(int).tolist(),
    }
    write_text_atomic(folder / f"{key}.json", json.dumps(meta) + "\n")  # last: the store is complete
    return meta
