"""helpers.data.staging on small archives made here: copy, resume, verification, extraction,
the no-op second call, and that the source is never touched."""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import zipfile
from pathlib import Path

import pytest

import helpers.data.staging as staging
from helpers.core.errors import InputError


def make_zip(path: Path, n: int = 30) -> dict[str, bytes]:
    """A zip shaped like the release (img/CATEGORY/id/…jpg) with incompressible content."""
    files = {f"img/TOPS/Tee/id_{i:08d}/comsumer_01.jpg": os.urandom(3000 + 97 * i) for i in range(n)}
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return files


def snapshot(folder: Path) -> dict[str, tuple[int, int, str]]:
    """Every file under ``folder`` with size, mtime (ns) and sha256: the source must not change."""
    return {
        str(p.relative_to(folder)): (p.stat().st_size, p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


@pytest.fixture
def drive(tmp_path):
    source = tmp_path / "drive"
    source.mkdir()
    files = make_zip(source / "img.zip")
    return source, files


def check_tree(dest: Path, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        assert (dest / name).read_bytes() == data


def test_stage_copies_verifies_extracts_and_leaves_source_alone(drive, tmp_path, monkeypatch):
    source, files = drive
    before = snapshot(source)
    monkeypatch.setattr(staging, "_BLOCK", 4096)  # many blocks: the loop, not one read
    record = staging.stage(source / "img.zip", tmp_path / "local", progress=False)
    check_tree(tmp_path / "local", files)
    assert record["sha256"] == hashlib.sha256((source / "img.zip").read_bytes()).hexdigest()
    assert record["sha256_from"] == "source" and record["entries"] == ["img"] and not record["already_staged"]
    assert record["n_members"] == len(files) and record["resumed_bytes"] == 0
    # Only the extracted tree and the marker remain: no archive copy, no staging leftovers.
    assert sorted(p.name for p in (tmp_path / "local").iterdir()) == [".staged-img.zip.json", "img"]
    assert snapshot(source) == before


def test_second_call_is_a_no_op(drive, tmp_path, monkeypatch):
    source, _ = drive
    staging.stage(source / "img.zip", tmp_path / "local", progress=False)

    def fail(*args, **kwargs):
        raise AssertionError("the second call read the archive again")

    monkeypatch.setattr(staging, "_copy_resuming", fail)
    monkeypatch.setattr(staging, "sha256_file", fail)
    again = staging.stage(source / "img.zip", tmp_path / "local", progress=False)
    assert again["already_staged"] is True


def test_removed_output_or_changed_source_is_staged_again(drive, tmp_path):
    source, _ = drive
    dest = tmp_path / "local"
    staging.stage(source / "img.zip", dest, progress=False)
    import shutil

    shutil.rmtree(dest / "img")  # the marker's output is gone: stage again
    record = staging.stage(source / "img.zip", dest, progress=False)
    assert record["already_staged"] is False and (dest / "img").is_dir()
    # A new release of the archive replaces the old extraction (the marker's own entries).
    files = make_zip(source / "img.zip", n=3)
    os.utime(source / "img.zip", ns=(1, 1))
    record = staging.stage(source / "img.zip", dest, progress=False)
    assert record["already_staged"] is False and record["n_members"] == 3
    assert sorted(str(p.relative_to(dest)) for p in (dest / "img").rglob("*.jpg")) == sorted(files)


def test_interrupted_copy_is_continued_not_restarted(drive, tmp_path, monkeypatch):
    source, files = drive
    data = (source / "img.zip").read_bytes()
    dest = tmp_path / "local"
    (dest / ".staging").mkdir(parents=True)
    # What a copy killed after 40 % leaves behind.
    (dest / ".staging" / "img.zip.partial").write_bytes(data[: len(data) * 2 // 5])
    read = []
    real_open = open

    def counting_open(path, mode="r", *args, **kwargs):
        handle = real_open(path, mode, *args, **kwargs)
        if Path(path) == source / "img.zip":
            original = handle.read
            handle.read = lambda n=-1: (lambda b: (read.append(len(b)), b)[1])(original(n))
        return handle

    monkeypatch.setattr("builtins.open", counting_open)
    record = staging.stage(source / "img.zip", dest, sha256=hashlib.sha256(data).hexdigest(), progress=False)
    monkeypatch.undo()
    assert record["resumed_bytes"] == len(data) * 2 // 5
    assert sum(read) == len(data) - len(data) * 2 // 5  # only the tail came from the source
    assert record["sha256_from"] == "given"
    check_tree(dest, files)


def test_a_foreign_partial_is_restarted_once(drive, tmp_path):
    source, files = drive
    dest = tmp_path / "local"
    (dest / ".staging").mkdir(parents=True)
    (dest / ".staging" / "img.zip.partial").write_bytes(b"not the same archive" * 10)
    record = staging.stage(source / "img.zip", dest, progress=False)
    check_tree(dest, files)
    assert record["resumed_bytes"] == 0  # the second attempt started from zero


def test_checksum_file_beside_the_archive(drive, tmp_path):
    source, _ = drive
    digest = hashlib.sha256((source / "img.zip").read_bytes()).hexdigest()
    (source / "img.zip.sha256").write_text(f"{digest}  img.zip\n")
    record = staging.stage(source / "img.zip", tmp_path / "a", progress=False)
    assert record["sha256_from"] == str(source / "img.zip.sha256")
    (source / "img.zip.sha256").write_text("0" * 64 + "  img.zip\n")
    with pytest.raises(InputError, match="sha256 does not match"):
        staging.stage(source / "img.zip", tmp_path / "b", progress=False)
    assert not (tmp_path / "b" / "img").exists() and not (tmp_path / "b" / ".staged-img.zip.json").exists()


@pytest.mark.parametrize("bad, message", [("xyz", "not a sha256 hex digest"), ("", None)])
def test_bad_checksum_argument(drive, tmp_path, bad, message):
    source, _ = drive
    if message is None:  # an empty --sha256 means "none given": falls back to hashing the source
        assert staging.stage(source / "img.zip", tmp_path / "d", sha256=bad, progress=False)["sha256_from"] == "source"
        return
    with pytest.raises(InputError, match=message):
        staging.stage(source / "img.zip", tmp_path / "d", sha256=bad, progress=False)


def test_refuses_missing_source_non_archive_and_clashes(drive, tmp_path):
    source, _ = drive
    with pytest.raises(InputError, match="no such archive"):
        staging.stage(source / "nope.zip", tmp_path / "d", progress=False)
    (source / "notes.zip").write_bytes(b"plain text, not an archive")
    with pytest.raises(InputError, match="neither a zip nor a tar"):
        staging.stage(source / "notes.zip", tmp_path / "d", progress=False)
    (tmp_path / "e" / "img").mkdir(parents=True)
    with pytest.raises(InputError, match="img already exist"):
        staging.stage(source / "img.zip", tmp_path / "e", progress=False)


def test_refuses_path_traversal(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as archive:
        archive.writestr("../outside.txt", b"x")
    with pytest.raises(InputError, match="outside"):
        staging.stage(evil, tmp_path / "d", progress=False)
    assert not (tmp_path / "outside.txt").exists()


def test_tar_archive_and_dataset_folder(tmp_path):
    """A tar works too, and stage_dataset makes DEST a data root: img/ plus the list folders."""
    root = tmp_path / "c2s"
    (root / "Anno").mkdir(parents=True)
    (root / "Eval").mkdir()
    (root / "Anno" / "list_bbox_consumer2shop.txt").write_text("1\nheader\n")
    (root / "Eval" / "list_eval_partition.txt").write_text("1\nheader\n")
    payload = b"jpeg bytes"
    with tarfile.open(root / "img.tar.gz", "w:gz") as archive:
        info = tarfile.TarInfo("img/DRESSES/Dress/id_00000001/shop_01.jpg")
        info.size = len(payload)
        archive.addfile(info, io.BytesIO(payload))
    before = snapshot(root)
    record = staging.stage_dataset(root, tmp_path / "local", progress=False)
    local = tmp_path / "local"
    assert (local / "img/DRESSES/Dress/id_00000001/shop_01.jpg").read_bytes() == payload
    assert (local / "Anno/list_bbox_consumer2shop.txt").read_text() == "1\nheader\n"
    assert record["lists_copied"] == ["Anno/list_bbox_consumer2shop.txt", "Eval/list_eval_partition.txt"]
    assert staging.stage_dataset(root, local, progress=False)["lists_copied"] == []
    assert snapshot(root) == before
    assert json.loads((local / ".staged-img.tar.gz.json").read_text())["entries"] == ["img"]
