"""A corpus of bad inputs the tests build: image files that must be refused or skipped with a reason, and
damage to a run folder's files. Each item says what a user must be told."""

from __future__ import annotations

import io
import os
import struct
import zlib
from pathlib import Path

from conftest import make_xray
from PIL import Image


def png_header_only(width: int, height: int, colour_type: int = 6) -> bytes:
    """A PNG whose header declares width x height (RGBA by default) with almost no pixel data: a
    decompression bomb in a few dozen bytes. Refusal must come from the header alone."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, colour_type, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")


def compressed_bomb_png(side: int) -> bytes:
    """A real, fully decodable 1-bit PNG of side x side pixels that compresses to a small file."""
    out = io.BytesIO()
    Image.new("1", (side, side)).save(out, format="PNG", optimize=True)
    return out.getvalue()


def jpeg_bytes(seed: int = 0) -> bytes:
    out = io.BytesIO()
    make_xray(seed=seed).convert("RGB").save(out, format="JPEG")
    return out.getvalue()


# name -> (file bytes, the reason's words a user must see)
BAD_IMAGE_FILES: dict[str, tuple[bytes, str]] = {
    "zero_bytes.jpeg": (b"", "not an image"),
    "text.png": (b"this is not an image\n" * 10, "not an image"),
    "truncated.jpeg": (jpeg_bytes()[:200], "truncated"),
    "header_bomb.png": (png_header_only(30_000, 30_000), "too large"),
    "just_over_limit.png": (png_header_only(7_000, 6_000), "too large"),
    "no_pixels.png": (png_header_only(0, 10), ""),
}


def write_bad_images(folder: Path) -> dict[str, str]:
    """Write every bad image file into `folder`; returns {path: words its reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, (data, words) in BAD_IMAGE_FILES.items():
        (folder / name).write_bytes(data)
        out[str(folder / name)] = words
    return out


def write_bad_entries(folder: Path) -> dict[str, str]:
    """Entries a scan cannot use: a name that is not UTF-8, a dangling link, a link loop, a link to a
    folder. Returns {escaped path: words its reason must contain}."""
    folder.mkdir(parents=True, exist_ok=True)
    bad_name = os.fsencode(folder) + b"/bad\xff name.jpeg"
    with open(bad_name, "wb") as f:
        f.write(jpeg_bytes(1))
    (folder / "dangling.jpeg").symlink_to(folder / "missing.jpeg")
    (folder / "loop_a.png").symlink_to(folder / "loop_b.png")
    (folder / "loop_b.png").symlink_to(folder / "loop_a.png")
    (folder / "linked_folder").symlink_to(folder.parent)
    return {f"{folder}/bad\\xff name.jpeg": "not valid UTF-8", f"{folder}/dangling.jpeg": "broken symbolic link",
            f"{folder}/loop_a.png": "broken symbolic link", f"{folder}/loop_b.png": "broken symbolic link",
            f"{folder}/linked_folder": "link to a folder"}
