"""Real image files for tests: JPEG and PNG made by Pillow, big JPEGs streamed to disk."""

from __future__ import annotations

import hashlib
import io
import random
from pathlib import Path

from PIL import Image

_COMMENT_CHUNK_BYTES = 65_000  # a JPEG COM segment holds at most 65,533 bytes of payload


def _noise_image(width: int, height: int, seed: int) -> Image.Image:
    rng = random.Random(seed)
    return Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))


def jpeg_bytes(width: int = 64, height: int = 48, seed: int = 0, quality: int = 85) -> bytes:
    """A decodable JPEG whose pixels depend on `seed` (so different seeds give different hashes)."""
    out = io.BytesIO()
    _noise_image(width, height, seed).save(out, format="JPEG", quality=quality)
    return out.getvalue()


def png_bytes(width: int = 64, height: int = 48, seed: int = 0) -> bytes:
    out = io.BytesIO()
    _noise_image(width, height, seed).save(out, format="PNG")
    return out.getvalue()


def write_jpeg(path: Path, seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = jpeg_bytes(width, height, seed)
    path.write_bytes(data)
    return data


def write_png(path: Path, seed: int = 0, width: int = 64, height: int = 48) -> bytes:
    path.parent.mkdir(parents=True, exist_ok=True)
    data = png_bytes(width, height, seed)
    path.write_bytes(data)
    return data


def write_large_jpeg(path: Path, size_bytes: int, seed: int = 0) -> str:
    """Write a valid JPEG of about `size_bytes` without holding it in memory; return its sha256.

    The bulk is COM (comment) segments placed after SOI, which decoders skip, so the file
    still starts with SOI and ends with EOI like any camera frame.
    """
    small = jpeg_bytes(32, 32, seed)
    digest = hashlib.sha256()
    rng = random.Random(seed)
    chunk_payload = rng.randbytes(_COMMENT_CHUNK_BYTES)
    segment = b"\xff\xfe" + (_COMMENT_CHUNK_BYTES + 2).to_bytes(2, "big") + chunk_payload
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("wb") as out:
        head = small[:2]
        out.write(head)
        digest.update(head)
        written = len(small)
        while written + len(segment) <= size_bytes:
            out.write(segment)
            digest.update(segment)
            written += len(segment)
        tail = small[2:]
        out.write(tail)
        digest.update(tail)
    return digest.hexdigest()


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
