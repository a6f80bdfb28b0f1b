"""Atomic file writes: a reader (or a crash) never sees half a file.

Each writer goes to ``NAME.tmp`` beside the target, then ``os.replace`` renames it, which is
atomic on POSIX and Windows when both names are on one file system.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path


def _replace_via_tmp(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)
    return path


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    return _replace_via_tmp(path, lambda tmp: tmp.write_bytes(data))


def write_text_atomic(path: str | Path, text: str) -> Path:
    return write_bytes_atomic(path, text.encode("utf-8"))


def copy_atomic(source: str | Path, target: str | Path) -> Path:
    return _replace_via_tmp(target, lambda tmp: shutil.copyfile(source, tmp))


def save_atomic(path: str | Path, save: Callable[[Path], None]) -> Path:
    """Run ``save(tmp_path)`` (e.g. ``lambda p: torch.save(state, p)``), then rename."""
    return _replace_via_tmp(path, save)


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
