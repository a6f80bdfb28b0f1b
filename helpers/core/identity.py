"""What makes two training runs the same run: the one definition that the study's reuse, the
results layout (a run directory's name carries its key) and ``fit``'s resume all use.

A run is its config without the runtime fields (:data:`helpers.core.config.RUNTIME_FIELDS`:
workers, batch sizes for embedding, device, which never change a result), seed included, and the
sha256 of the prepared table it trained on. Values are compared as ``config.json`` stores them
(JSON), so a tuple read back as a list is the same value.

A field added to :class:`~helpers.core.config.Config` after runs were recorded is listed in
:data:`LATER_FIELDS` with the value that trains exactly as before it existed: at that value it is
left out of the identity (the recorded runs keep their keys), and a recorded config without it
reads as that value.
"""

from __future__ import annotations

import json
from dataclasses import asdict

from helpers.core.config import RUNTIME_FIELDS, Config
from helpers.core.files import sha256_bytes

# field → the value that reproduces the runs recorded before the field existed
LATER_FIELDS: dict[str, object] = {
    "layer_decay": 1.0,
    "grad_checkpointing": False,
    "synthetic_splits": None,
    "train_fraction": 1.0,
    "stop_items": 0,
    "epoch_images": None,
}


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def recipe(cfg: Config) -> dict:
    """The config fields that make a result what it is (all but the runtime fields, and a later
    field at its neutral value), as JSON."""
    values = asdict(cfg).items()
    return _jsonable(
        {k: v for k, v in values if k not in RUNTIME_FIELDS and not (k in LATER_FIELDS and v == LATER_FIELDS[k])}
    )


def run_key(cfg: Config, table_sha256: str) -> str:
    """A 12-hex-digit key of the run: the hash of :func:`recipe` and the table's sha256."""
    text = json.dumps({"config": recipe(cfg), "table": table_sha256}, sort_keys=True, default=str)
    return sha256_bytes(text.encode())[:12]


def differences(recorded: dict, recorded_table: str | None, cfg: Config, table_sha256: str) -> list[str]:
    """How a recorded run (its stored config dict and table sha256) differs from the run of
    ``cfg`` on a table of ``table_sha256``, one ``field: old → new`` entry each; empty: the same run."""
    wanted = _jsonable({k: v for k, v in asdict(cfg).items() if k not in RUNTIME_FIELDS})
    recorded = {**_jsonable(LATER_FIELDS), **recorded}  # a later field absent from the record: as before it
    found = [
        f"{k}: {_jsonable(recorded.get(k))!r} → {v!r}" for k, v in wanted.items() if _jsonable(recorded.get(k)) != v
    ]
    if recorded_table != table_sha256:
        found.append("table: changed since the run (sha256)")
    return found
