"""Files: atomic writes, content hashes and the paths written into results. The one home of
each, so every module writes, hashes and records a path the same way.

Atomic: each writer goes to a temporary name beside the target (unique per process), forces the
bytes to disk, then ``os.replace`` renames it, which is atomic on POSIX and Windows when both
names are on one file system. A reader (or a crash) never sees half a file, and a failed write
leaves no temporary file behind.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from pathlib import Path

# The repository root: results record the paths inside it relative to it (portable_path).
REPO_ROOT = Path(__file__).resolve().parents[2]
_HASH_BLOCK = 8 << 20  # 8 MiB reads: large sequential requests are what a network mount does fast


def _replace_via_tmp(path: str | Path, write: Callable[[Path], None]) -> Path:
    path = Path(path)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:  # the bytes must be on disk before the rename
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
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


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | Path, progress: bool = False, desc: str = "sha256") -> str:
    """The file's sha256 hex digest; ``progress`` shows a byte bar (for multi-GB archives)."""
    from helpers.core.progress import progress_bar

    path = Path(path)
    digest = hashlib.sha256()
    with (
        open(path, "rb") as handle,
        progress_bar(
            total=path.stat().st_size, unit="B", unit_scale=True, desc=desc, disable=not progress, leave=False
        ) as bar,
    ):
        for block in iter(lambda: handle.read(_HASH_BLOCK), b""):
            digest.update(block)
            bar.update(len(block))
    return digest.hexdigest()


def portable_path(path: str | Path) -> str:
    """``path`` as results record it: relative to the repository when inside it (committed
    files must not carry the absolute path of the machine that made them), else as given."""
    resolved = Path(path).expanduser().resolve()
    return resolved.relative_to(REPO_ROOT).as_posix() if resolved.is_relative_to(REPO_ROOT) else str(path)
