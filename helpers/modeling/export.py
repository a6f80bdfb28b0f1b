"""A run's embedder exported to ONNX (``python -m helpers export``), so a trained model can be
used outside this repository and without PyTorch: ``model.onnx`` with a dynamic batch axis
(input ``images`` ``[N, 3, H, W]`` float32, normalised; output ``embeddings`` ``[N, D]``,
L2-normalised) and the sidecar ``model.onnx.json`` holding everything needed to feed it: input
size, mean / std, interpolation, resize mode, box margin, crop, photometric mode, flip TTA, and
the embedding dimension, backbone and checkpoint sha256 it came from.

The exporter is ``torch.onnx.export(..., dynamo=False)``, the TorchScript-based one. Torch 2.14
defaults to the ``torch.export`` (dynamo) exporter, which needs two more packages (onnxscript,
onnx-ir), took 21 s instead of 3 s for the demo model on the 2-core CPU and gives the same
embeddings for these CNNs; the TorchScript exporter is in every torch this project accepts
(>= 2.2) and works offline with ``onnx`` alone. It is deprecated: when a torch release removes
it, this is the one call to switch (``dynamo=True, dynamic_shapes=...``).

Every export is checked right away: onnxruntime's embeddings of real images of a table must
equal PyTorch's within 1e-4 in cosine, or nothing is written.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from helpers.core.config import Config
from helpers.core.errors import InputError
from helpers.core.files import save_atomic, sha256_file, write_text_atomic
from helpers.core.schema import read_table
from helpers.data import transforms
from helpers.modeling.checkpoints import load_embedder
from helpers.modeling.models import Embedder
from helpers.modeling.onnx_embedder import INPUT_NAME, OUTPUT_NAME, OnnxEmbedder, sidecar_path

# 17: the oldest opset with LayerNormalization (vision transformers export without a decomposition)
# and one every onnxruntime of the last years runs.
OPSET = 17
COSINE_TOLERANCE = 1e-4  # 1 - cosine allowed between onnxruntime's and PyTorch's embedding of an image
CHECK_IMAGES = 8
TRACE_BATCH = 2  # traced with 2 images, checked with CHECK_IMAGES: the batch axis is proven dynamic


def check_batch(cfg: Config, data_config: dict, table: pd.DataFrame, data_root: str | Path, n: int) -> torch.Tensor:
    """``n`` images spread over ``table`` (both domains, several items), preprocessed as the run's
    evaluation preprocesses them: crop to the box, photometric mode, resize, normalise."""
    if table.empty:
        raise InputError("the table has no rows to check the export with")
    transform = transforms.create_transform(cfg, data_config)
    rows = table.iloc[np.unique(np.linspace(0, len(table) - 1, min(n, len(table))).round().astype(int))]
    return torch.stack(
        [
            transform(transforms.open_rgb(Path(data_root) / row.path), (row.x_1, row.y_1, row.x_2, row.y_2))
            for row in rows.itertuples(index=False)
        ]
    )


def _export(embedder: Embedder, example: torch.Tensor, path: Path, checkpoint: Path) -> None:
    """``torch.onnx.export`` with a dynamic batch axis; an op it rejects becomes one InputError line."""
    axes = {INPUT_NAME: {0: "batch"}, OUTPUT_NAME: {0: "batch"}}
    try:
        with warnings.catch_warnings():  # the exporter's notice that it is deprecated (module docstring)
            warnings.simplefilter("ignore", DeprecationWarning)
            torch.onnx.export(
                embedder,
                (example,),
                str(path),
                dynamo=False,
                input_names=[INPUT_NAME],
                output_names=[OUTPUT_NAME],
                dynamic_axes=axes,
                opset_version=OPSET,
            )
    except Exception as error:
        reason = (str(error).strip().splitlines() or [type(error).__name__])[0][:160]
        raise InputError(
            f"{checkpoint}: the ONNX exporter rejects backbone {embedder.config['backbone']} ({reason})"
        ) from None


def compare(embedder: Embedder, path: Path, batch: torch.Tensor, checkpoint: Path) -> dict:
    """Embed ``batch`` with PyTorch and with onnxruntime; refuse the export unless every image's two
    embeddings agree within :data:`COSINE_TOLERANCE` in cosine."""
    with torch.inference_mode():
        expected = embedder(batch).numpy()
        got = OnnxEmbedder(path, embedder.config)(batch).numpy()
    cosine = (expected * got).sum(1) / (np.linalg.norm(expected, axis=1) * np.linalg.norm(got, axis=1))
    worst = float(cosine.min())
    if not 1 - worst <= COSINE_TOLERANCE:
        raise InputError(
            f"{checkpoint}: onnxruntime's embeddings differ from PyTorch's (cosine {worst:.6f} < "
            f"{1 - COSINE_TOLERANCE}); nothing written"
        )
    return {"images": len(batch), "min_cosine": worst, "max_abs_diff": float(np.abs(expected - got).max())}


def preprocessing(cfg: Config, data_config: dict) -> dict:
    """What a user of the ONNX file must do to a photo before it goes in (C2STransform's eval steps)."""
    return {
        "input_size": data_config["input_size"],
        "mean": data_config["mean"],
        "std": data_config["std"],
        "interpolation": data_config["interpolation"],
        "resize": cfg.resize,
        "letterbox_fill": list(transforms.mean_fill(data_config["mean"])),
        "box_margin": cfg.box_margin,
        "crop": cfg.crop,
        "photometric": cfg.photometric,
        "flip_tta": cfg.flip_tta,
        "channels": "RGB",
        "scale": "pixels / 255, then (x - mean) / std",
    }


def export_onnx(
    checkpoint: str | Path, out: str | Path, table: str | Path, data_root: str | Path, n_check: int = CHECK_IMAGES
) -> dict:
    """Export ``checkpoint``'s embedder to ``out`` (``.onnx``) and write its sidecar; checked with
    onnxruntime on ``n_check`` images of ``table`` first (nothing is written if the check fails).
    Returns the sidecar's record."""
    checkpoint, out = Path(checkpoint), Path(out)
    if out.suffix != ".onnx":
        raise InputError(f"{out}: an exported model's file name ends in .onnx")
    embedder, cfg = load_embedder(checkpoint)
    batch = check_batch(cfg, embedder.data_config, read_table(table), data_root, n_check)
    out.parent.mkdir(parents=True, exist_ok=True)
    check = {"table": str(table), "tolerance": COSINE_TOLERANCE}

    def write(tmp: Path) -> None:
        _export(embedder, batch[:TRACE_BATCH], tmp, checkpoint)
        check.update(compare(embedder, tmp, batch, checkpoint))

    save_atomic(out, write)
    record = {
        "onnx_sha256": sha256_file(out),
        "input": {"name": INPUT_NAME, "shape": ["batch", *embedder.data_config["input_size"]], "dtype": "float32"},
        "output": {"name": OUTPUT_NAME, "shape": ["batch", embedder.config["embed_dim"]], "l2_normalised": True},
        "preprocessing": preprocessing(cfg, embedder.data_config),
        "embed_dim": embedder.config["embed_dim"],
        "backbone": embedder.config["backbone"],
        "checkpoint": str(checkpoint),
        "checkpoint_sha256": sha256_file(checkpoint),
        "exporter": f"torch.onnx.export (TorchScript, dynamo=False), torch {torch.__version__}",
        "opset": OPSET,
        "check": {**check, "onnxruntime": version("onnxruntime")},
        "model_config": embedder.config,
        "config": asdict(cfg),
    }
    write_text_atomic(sidecar_path(out), json.dumps(record, indent=2) + "\n")
    return record
