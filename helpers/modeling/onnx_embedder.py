"""An exported model (:mod:`helpers.modeling.export`) run by onnxruntime, behind the torch
:class:`~helpers.modeling.models.Embedder`'s interface, so the project's inference code (the
gallery index, a query's embedding) runs either runtime unchanged.

An export is two files: ``model.onnx`` and its sidecar ``model.onnx.json`` (:func:`sidecar_path`),
which records the preprocessing, the run's config, the checkpoint's sha256 and the ONNX file's own,
so a model and a sidecar that do not belong together are refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from helpers.core.config import Config, config_from_dict
from helpers.core.errors import InputError
from helpers.core.files import sha256_file

INPUT_NAME, OUTPUT_NAME = "images", "embeddings"


def sidecar_path(model: str | Path) -> Path:
    """``model.onnx`` → ``model.onnx.json``."""
    model = Path(model)
    return model.with_name(model.name + ".json")


def read_sidecar(model: str | Path) -> dict:
    """The sidecar of an exported model, checked against the model file's sha256."""
    model, sidecar = Path(model), sidecar_path(model)
    for path in (model, sidecar):
        if not path.is_file():
            raise InputError(f"{path}: not found (an export is model.onnx plus model.onnx.json: run `export`)")
    try:
        record = json.loads(sidecar.read_text())
        expected = record["onnx_sha256"]
    except (ValueError, KeyError, TypeError):
        raise InputError(f"{sidecar}: not a sidecar written by `export`") from None
    if sha256_file(model) != expected:
        raise InputError(f"{model}: does not match its sidecar {sidecar.name} (sha256); export it again")
    return record


class OnnxEmbedder(nn.Module):
    """An ONNX embedder on onnxruntime's CPU provider: ``[N, 3, H, W]`` float tensor in,
    ``[N, D]`` L2-normalised float tensor out, with the torch model's ``config`` and
    ``data_config``. An ``nn.Module`` without parameters so that ``eval()``, ``to()`` and
    ``inference_mode`` work as they do for the torch model.

    The session uses as many threads as torch does when it is created (``torch.get_num_threads``),
    so one setting (the live demo's one thread per query, a benchmark's) governs both runtimes.
    """

    def __init__(self, path: str | Path, config: dict):
        super().__init__()
        import onnxruntime

        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads = torch.get_num_threads()
        options.inter_op_num_threads = 1
        try:
            self.session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as error:  # a truncated or foreign file: name it, no traceback
            raise InputError(f"{path}: onnxruntime cannot load it ({type(error).__name__})") from None
        self.config = config

    @property
    def data_config(self) -> dict:
        return self.config["data_config"]

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        # channels_last tensors (as inference passes them) are strided: onnxruntime needs NCHW bytes.
        batch = np.ascontiguousarray(images.detach().cpu().numpy(), dtype=np.float32)
        return torch.from_numpy(self.session.run([OUTPUT_NAME], {INPUT_NAME: batch})[0])


def load_onnx(model: str | Path) -> tuple[OnnxEmbedder, Config, dict]:
    """An exported model ready to embed, its run's config (its preprocessing) and its sidecar."""
    record = read_sidecar(model)
    return OnnxEmbedder(model, record["model_config"]), config_from_dict(record["config"]), record
