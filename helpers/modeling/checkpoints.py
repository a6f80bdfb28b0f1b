"""Checkpoints: written atomically, read with ``weights_only=True``, and turned back into the
model and config of the run that wrote them.

* :func:`save_checkpoint` / :func:`read_checkpoint`: the raw state dict of a run
  (weights, optimizer, schedule, history, config).
* :func:`load_embedder`: a ready model in eval mode plus its run's :class:`Config`, for
  evaluation, indexing and search.
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers.core.config import Config, config_from_dict
from helpers.core.errors import InputError
from helpers.core.files import save_atomic
from helpers.modeling import models


def save_checkpoint(path: str | Path, state: dict) -> None:
    """``torch.save`` to a temporary file, then rename: a crash never leaves half a file."""
    save_atomic(path, lambda tmp: torch.save(state, tmp))


def read_checkpoint(path: str | Path) -> dict:
    """The state dict stored at ``path`` (tensors on the CPU); never unpickles code."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path}: checkpoint not found")
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise InputError(f"{path}: not a readable checkpoint ({type(error).__name__})") from None


def embedder_from_state(state: dict) -> models.Embedder:
    """The embedder stored in a checkpoint or index state (``model_config`` + ``model``), eval mode."""
    embedder = models.embedder_from_config(state["model_config"])
    embedder.load_state_dict(state["model"])
    return embedder.eval()


def load_embedder(path: str | Path) -> tuple[models.Embedder, Config]:
    """The embedder of a run's checkpoint (``best.pt``, ``last.pt``) in eval mode, and the run's
    config (so evaluation uses the preprocessing the model was trained with)."""
    state = read_checkpoint(path)
    if not {"model_config", "model", "config"} <= set(state):
        raise InputError(f"{path}: not a checkpoint written by helpers.training.train")
    return embedder_from_state(state), config_from_dict(state["config"])
