"""Stage a released image archive from a slow mount (Google Drive on Colab) to local disk.

Reading ~240k small JPEGs through the Drive mount cost the original study ~40 minutes per Colab
runtime; one large sequential read of the archive and a local extraction take minutes. So:

1. copy ``SRC`` (e.g. ``img.zip``) to ``DEST/.staging/<name>.partial``: sequential, in large
   blocks, with a progress bar; an interrupted copy is **continued** from the bytes already
   there, not restarted;
2. verify the copy by size and sha256 against ``--sha256``, else a ``<SRC>.sha256`` file
   beside the archive (``sha256sum`` output), else the sha256 of the source itself (one more
   sequential read of the source: a checksum file saves it). A resumed copy that fails the
   check is restarted once from zero (its first part may come from another archive version);
3. extract into ``DEST/.staging/extract.partial`` (zip or tar; member paths that would escape
   it are refused), then move each top-level entry into ``DEST``;
4. write the marker ``DEST/.staged-<name>.json`` last. A second call with the same source
   (same size and modification time) finds the marker and returns at once.

Nothing at the source is written, renamed or deleted: it is only opened for reading.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import time
import zipfile
from pathlib import Path

from helpers.core.errors import InputError
from helpers.core.files import copy_atomic, sha256_file, write_text_atomic
from helpers.core.progress import progress_bar

_BLOCK = 8 << 20  # 8 MiB reads: large sequential requests are what a network mount does fast
_STAGING = ".staging"
# Released C2S lists that travel with the archive when SRC is a dataset folder (small text files).
_LIST_DIRS = ("Anno", "Eval")
_ARCHIVE_NAMES = ("img.zip", "Img/img.zip", "img.tar", "img.tar.gz")


def marker_path(dest: str | Path, source: str | Path) -> Path:
    return Path(dest) / f".staged-{Path(source).name}.json"


def expected_sha256(source: Path, sha256: str | None) -> tuple[str | None, str]:
    """The checksum to verify against and where it came from (``None``: hash the source)."""
    if sha256:
        value, origin = sha256, "given"
    else:
        sidecar = source.with_name(source.name + ".sha256")
        if not sidecar.is_file():
            return None, "source"
        words = sidecar.read_text().split()
        if not words:
            raise InputError(f"{sidecar}: empty checksum file")
        value, origin = words[0], str(sidecar)
    value = value.strip().lower()
    if len(value) != 64 or any(c not in "0123456789abcdef" for c in value):
        raise InputError(f"{origin}: not a sha256 hex digest: {value[:80]!r}")
    return value, origin


def _copy_resuming(source: Path, partial: Path, size: int, progress: bool) -> int:
    """Append the missing tail of ``source`` to ``partial``; return the bytes already present."""
    have = partial.stat().st_size if partial.exists() else 0
    if have > size:  # longer than the source: not a prefix of it
        partial.unlink()
        have = 0
    with (
        open(source, "rb") as src,
        open(partial, "ab") as dst,
        progress_bar(
            total=size,
            initial=have,
            unit="B",
            unit_scale=True,
            desc=f"copying {source.name}",
            disable=not progress,
            mininterval=1.0,
        ) as bar,
    ):
        src.seek(have)
        for block in iter(lambda: src.read(_BLOCK), b""):
            dst.write(block)
            bar.update(len(block))
        dst.flush()
        os.fsync(dst.fileno())
    return have


def _safe_members_zip(archive: zipfile.ZipFile, root: Path) -> list[zipfile.ZipInfo]:
    members = archive.infolist()
    for member in members:
        target = (root / member.filename).resolve()
        if not target.is_relative_to(root.resolve()):
            raise InputError(f"archive member {member.filename!r} would be written outside {root}")
    return members


def _extract(archive: Path, into: Path, progress: bool) -> int:
    """Extract ``archive`` into the empty folder ``into``; return the number of members."""
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            members = _safe_members_zip(handle, into)
            needed = sum(m.file_size for m in members)
            _check_space(into, needed, "extracting")
            for member in progress_bar(
                members, desc=f"extracting {archive.name}", unit="file", disable=not progress, mininterval=1.0
            ):
                handle.extract(member, into)
            return len(members)
    if tarfile.is_tarfile(archive):
        with tarfile.open(archive) as handle:
            members = handle.getmembers()
            _check_space(into, sum(m.size for m in members), "extracting")
            for member in progress_bar(
                members, desc=f"extracting {archive.name}", unit="file", disable=not progress, mininterval=1.0
            ):
                # The "data" filter refuses absolute paths, "..", links out of the tree and
                # device files (Python >= 3.11.4; older versions check the path only).
                if hasattr(tarfile, "data_filter"):
                    handle.extract(member, into, filter="data")
                else:
                    target = (into / member.name).resolve()
                    if not target.is_relative_to(into.resolve()) or member.issym() or member.islnk():
                        raise InputError(f"archive member {member.name!r} would be written outside {into}")
                    handle.extract(member, into)
            return len(members)
    raise InputError(f"{archive}: neither a zip nor a tar archive")


def _check_space(folder: Path, needed: int, what: str) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise InputError(f"{folder}: {what} needs {needed / 2**30:.2f} GiB, only {free / 2**30:.2f} GiB free")


def stage(
    source: str | Path,
    dest: str | Path,
    *,
    sha256: str | None = None,
    keep_archive: bool = False,
    progress: bool = True,
) -> dict:
    """Copy, verify and extract the archive ``source`` into the folder ``dest`` (see module doc).

    Returns the marker's record: source path, size, mtime, sha256 and where the expected
    value came from, the extracted top-level entries, bytes resumed, seconds, and
    ``"already_staged": True`` when the marker made this call a no-op.
    """
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise InputError(f"{source}: no such archive")
    stat = source.stat()
    marker = marker_path(dest, source)
    if marker.is_file():
        record = json.loads(marker.read_text())
        same = record.get("size") == stat.st_size and record.get("mtime") == stat.st_mtime
        if same and all((dest / entry).exists() for entry in record.get("entries", [])):
            return {**record, "already_staged": True}
        # A different archive (or its output was removed): drop what the marker says this
        # module extracted there (its own output, nothing else), then stage again.
        for entry in record.get("entries", []):
            target = dest / entry
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
        marker.unlink()
    started = time.perf_counter()
    expected, origin = expected_sha256(source, sha256)
    staging = dest / _STAGING
    staging.mkdir(parents=True, exist_ok=True)
    partial = staging / (source.name + ".partial")
    archive = staging / source.name
    if archive.exists():  # copied by a run that stopped while extracting: verify, don't copy again
        os.replace(archive, partial)
    have = partial.stat().st_size if partial.exists() else 0
    _check_space(staging, max(stat.st_size - have, 0), "copying")

    if expected is None:
        expected = sha256_file(source, progress, desc=f"sha256 of {source.name} (source)")
    resumed = 0
    for attempt in (1, 2):
        resumed = _copy_resuming(source, partial, stat.st_size, progress)
        size = partial.stat().st_size
        actual = (
            sha256_file(partial, progress, desc=f"sha256 of {source.name} (copy)") if size == stat.st_size else None
        )
        if actual == expected:
            break
        partial.unlink()
        if attempt == 2 or not resumed:
            raise InputError(
                f"{source}: the copy's {'sha256' if actual else 'size'} does not match "
                f"({actual or size} vs {expected if actual else stat.st_size}; expected sha256 from "
                f"{origin}); the source may be corrupt or changing"
            )
        # The resumed prefix did not belong to this archive: start over once.
    os.replace(partial, archive)

    extract = staging / "extract.partial"
    shutil.rmtree(extract, ignore_errors=True)
    extract.mkdir()
    n_members = _extract(archive, extract, progress)
    entries = sorted(p.name for p in extract.iterdir())
    clashes = [name for name in entries if (dest / name).exists()]
    if clashes:
        raise InputError(
            f"{dest}: {', '.join(clashes)} already exist and were not staged from {source.name}; "
            "remove them or choose another destination"
        )
    for name in entries:
        os.replace(extract / name, dest / name)
    extract.rmdir()
    if not keep_archive:
        archive.unlink()
    record = {
        "source": str(source),
        "size": stat.st_size,
        "mtime": stat.st_mtime,
        "sha256": expected,
        "sha256_from": origin,
        "entries": entries,
        "n_members": n_members,
        "resumed_bytes": resumed,
        "seconds": round(time.perf_counter() - started, 2),
        "archive": str(archive) if keep_archive else None,
    }
    write_text_atomic(marker, json.dumps(record, indent=2) + "\n")  # last: only once all above is done
    if not any(staging.iterdir()):
        staging.rmdir()
    return {**record, "already_staged": False}


def find_archive(root: Path) -> Path:
    for name in _ARCHIVE_NAMES:
        if (root / name).is_file():
            return root / name
    raise InputError(f"{root}: no image archive found (looked for {', '.join(_ARCHIVE_NAMES)})")


def stage_dataset(
    source_root: str | Path, dest: str | Path, *, sha256: str | None = None, progress: bool = True
) -> dict:
    """Stage a DeepFashion C2S folder: its image archive (extracted, giving ``DEST/img``) and
    its small list folders ``Anno/`` and ``Eval/`` (copied file by file, atomically), so that
    ``DEST`` is a complete data root on local disk."""
    source_root, dest = Path(source_root), Path(dest)
    if not source_root.is_dir():
        raise InputError(f"{source_root}: no such folder")
    record = stage(find_archive(source_root), dest, sha256=sha256, progress=progress)
    copied = []
    for folder in _LIST_DIRS:
        for path in sorted((source_root / folder).glob("*.txt")):
            target = dest / folder / path.name
            if target.is_file() and target.stat().st_size == path.stat().st_size:
                continue
            target.parent.mkdir(parents=True, exist_ok=True)
            copy_atomic(path, target)
            copied.append(f"{folder}/{path.name}")
    return {**record, "lists_copied": copied}
