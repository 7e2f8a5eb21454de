"""The files the benchmark feeds in: real JPEGs made by Pillow, big JPEGs, tiny JPEGs.

Every file has its own bytes (its own seed or index), so nothing is deduplicated by content.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from tests.imagefactory import jpeg_bytes, write_large_jpeg

# Noise at quality 85 costs ~0.8 bytes per pixel: 252 x 252 gives ~50 KB.
SMALL_SIDE_PIXELS = 252
FILES_PER_FOLDER = 1000


@dataclass(frozen=True)
class FileSet:
    """Files under `root`, with their paths relative to it (the reference_ids)."""

    root: Path
    relpaths: tuple[str, ...]
    total_bytes: int

    @property
    def count(self) -> int:
        return len(self.relpaths)

    def paths(self) -> list[Path]:
        return [self.root / relpath for relpath in self.relpaths]


def _folder_of(index: int, per_folder: int) -> str:
    return f"d{index // per_folder:03d}"


def small_jpeg_payloads(count: int, first_seed: int = 0) -> list[bytes]:
    """`count` distinct ~50 KB JPEGs, in memory (for writers that must not pay Pillow's time)."""
    side = SMALL_SIDE_PIXELS
    return [jpeg_bytes(side, side, seed=first_seed + index) for index in range(count)]


def write_small_jpegs(root: Path, count: int, first_seed: int = 0) -> FileSet:
    """`count` distinct ~50 KB JPEGs in folders of 100 under `root`."""
    relpaths: list[str] = []
    total = 0
    for index, data in enumerate(small_jpeg_payloads(count, first_seed)):
        relpath = f"{_folder_of(index, 100)}/frame_{index:06d}.jpg"
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        relpaths.append(relpath)
        total += len(data)
    return FileSet(root, tuple(relpaths), total)


def write_large_jpegs(root: Path, count: int, size_bytes: int, first_seed: int = 0) -> FileSet:
    relpaths: list[str] = []
    total = 0
    for index in range(count):
        relpath = f"large/frame_{index:06d}.jpg"
        path = root / relpath
        write_large_jpeg(path, size_bytes, seed=first_seed + index)
        relpaths.append(relpath)
        total += path.stat().st_size
    return FileSet(root, tuple(relpaths), total)


def tiny_jpeg(index: int, base: bytes) -> bytes:
    """A valid JPEG of a few hundred bytes, unique to `index`: a COM segment right after SOI."""
    comment = f"bench frame {index}".encode()
    segment = b"\xff\xfe" + (len(comment) + 2).to_bytes(2, "big") + comment
    return base[:2] + segment + base[2:]


def write_tiny_jpegs(
    root: Path, count: int, *, per_folder: int = FILES_PER_FOLDER, prefix: str = "t"
) -> FileSet:
    """`count` tiny JPEGs (~720 bytes each) in folders of `per_folder` under `root`."""
    base = jpeg_bytes(8, 8, seed=7)
    relpaths: list[str] = []
    total = 0
    made_folders: set[str] = set()
    for index in range(count):
        folder = f"{prefix}{_folder_of(index, per_folder)}"
        if folder not in made_folders:
            (root / folder).mkdir(parents=True, exist_ok=True)
            made_folders.add(folder)
        relpath = f"{folder}/frame_{index:06d}.jpg"
        data = tiny_jpeg(index, base)
        with open(root / relpath, "wb") as out:
            out.write(data)
        relpaths.append(relpath)
        total += len(data)
    return FileSet(root, tuple(relpaths), total)


def wait_until_older_than(paths: Sequence[Path], seconds: float) -> None:
    """Sleep until the newest of `paths` was modified more than `seconds` ago (a scan treats
    younger files as possibly still being written and waits for them)."""
    newest = max((os.stat(path).st_mtime for path in paths), default=0.0)
    remaining = newest + seconds + 0.1 - time.time()
    if remaining > 0:
        time.sleep(min(remaining, seconds + 1.0))
