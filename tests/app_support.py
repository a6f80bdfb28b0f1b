"""Shared by the live-demo tests: a fixture-sized gallery index (built once per test session
through the CLI, as a user would) and image bytes for every kind of upload the app must survive.
"""

from __future__ import annotations

import io
import struct
import zlib
from contextlib import redirect_stdout
from pathlib import Path

import numpy as np
from PIL import Image

from helpers.apps.cli import main
from helpers.core import config
from helpers.experiments import artifacts

_CACHE: dict[str, Path] = {}


def fixture_index(tmp_factory) -> Path:
    """Train the fixture model one epoch and index its test gallery (once per session)."""
    if "index" not in _CACHE:
        root, table = artifacts.ensure_prepared(config.get_config("fixture"), progress=False)
        work = tmp_factory.mktemp("app_index")
        with redirect_stdout(io.StringIO()):
            assert (
                main(
                    [
                        "train",
                        "--profile",
                        "fixture",
                        "--table",
                        str(table),
                        "--data-root",
                        str(root),
                        "--out",
                        str(work / "run"),
                        "--quiet",
                    ]
                )
                == 0
            )
            assert (
                main(
                    [
                        "index",
                        "--checkpoint",
                        str(work / "run" / "best.pt"),
                        "--table",
                        str(table),
                        "--data-root",
                        str(root),
                        "--out",
                        str(work / "index"),
                        "--quiet",
                    ]
                )
                == 0
            )
        _CACHE["index"] = work / "index"
    return _CACHE["index"]


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **params)
    return buffer.getvalue()


def photo(width: int = 96, height: int = 128, seed: int = 0) -> Image.Image:
    """A noisy RGB picture (noise, so JPEG truncation leaves real pixel data missing)."""
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8))


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def png_declaring(width: int, height: int) -> bytes:
    """A valid-header PNG declaring ``width``×``height`` (8-bit gray) with a tiny payload: the
    shape of a decompression bomb, without spending the memory to build a real one."""
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _chunk(b"IHDR", header)
        + _chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + _chunk(b"IEND", b"")
    )


def exif_rotated_jpeg() -> bytes:
    """A 40×80 (w×h) JPEG, top half red, bottom half blue, EXIF orientation 6: a viewer turns it
    90° clockwise, so it is shown 80×40 with red on the right."""
    image = Image.new("RGB", (40, 80), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 40, 40))
    exif = Image.Exif()
    exif[0x0112] = 6
    return encode(image, "JPEG", exif=exif.tobytes(), quality=95)


def bad_uploads() -> dict[str, bytes]:
    """Uploads the app must refuse with a message (name → bytes)."""
    jpeg = encode(photo(), "JPEG", quality=90)
    png = encode(photo(), "PNG")
    return {
        "not an image": b"this is a text file, not a photo\n" * 20,
        "empty": b"",
        "truncated jpeg": jpeg[: len(jpeg) // 2],
        "truncated png": png[: len(png) // 2],
        "jpeg header only": jpeg[:200],
        "bomb 400 MP": png_declaring(20_000, 20_000),
        "bomb 100 MP": png_declaring(10_000, 10_000),
        "1x1": encode(Image.new("RGB", (1, 1), (200, 10, 10))),
        "html": b"<html><body><img src=x onerror=alert(1)></body></html>",
    }


def odd_but_valid_uploads() -> dict[str, bytes]:
    """Uploads that are valid images in unusual modes: the app must search them."""
    base = photo()
    rgba = base.convert("RGBA")
    rgba.putalpha(128)
    palette = base.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return {
        "grayscale jpeg": encode(base.convert("L"), "JPEG"),
        "cmyk jpeg": encode(base.convert("CMYK"), "JPEG"),
        "rgba png": encode(rgba, "PNG"),
        "palette png": encode(palette, "PNG"),
        "palette gif": encode(palette, "GIF"),
        "16-bit png": encode(Image.fromarray(np.asarray(base.convert("L"), dtype=np.uint16) * 257), "PNG"),
        "webp": encode(base, "WEBP"),
        "exif rotated": exif_rotated_jpeg(),
    }
