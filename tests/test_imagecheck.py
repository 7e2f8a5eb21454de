"""check_image_complete / sniff_image_type on real image files, whole and cut short."""

from __future__ import annotations

import io
import os
import random
import struct
import time
from pathlib import Path

import pytest
from PIL import Image

from tests.configfactory import API_KEY, run_watcher, write_config
from tests.imagefactory import jpeg_bytes, png_bytes, write_large_jpeg
from watcher.devserver import DevServer
from watcher.files import SNIFF_BYTES, check_image_complete, sniff_image_type


def _pillow_bytes(fmt: str, width: int = 64, height: int = 48, **params: object) -> bytes:
    rng = random.Random(7)
    image = Image.frombytes("RGB", (width, height), rng.randbytes(width * height * 3))
    if fmt == "GIF":
        image = image.convert("P")
    out = io.BytesIO()
    image.save(out, format=fmt, **params)
    return out.getvalue()


WHOLE_IMAGES = {
    "jpeg": jpeg_bytes(),
    "png": png_bytes(),
    "gif": _pillow_bytes("GIF"),
    "webp": _pillow_bytes("WEBP"),
    "tiff": _pillow_bytes("TIFF"),
    "bmp": _pillow_bytes("BMP"),
}


def _write(tmp_path: Path, name: str, data: bytes) -> Path:
    path = tmp_path / name
    path.write_bytes(data)
    return path


@pytest.mark.parametrize("kind", sorted(WHOLE_IMAGES))
def test_whole_images_are_complete_and_sniffed(tmp_path: Path, kind: str) -> None:
    data = WHOLE_IMAGES[kind]
    assert sniff_image_type(data[:SNIFF_BYTES]) == kind
    assert check_image_complete(_write(tmp_path, f"x.{kind}", data)) is None


@pytest.mark.parametrize(
    ("kind", "reason"),
    [
        ("jpeg", "JPEG has no end-of-image marker"),
        ("png", "PNG has no IEND chunk"),
        ("gif", "GIF has no trailer"),
        ("webp", "WebP size does not match its RIFF header"),
        ("tiff", "TIFF is shorter than its strips or tiles"),
        ("bmp", "BMP is shorter than its header says"),
    ],
)
def test_images_cut_short_are_incomplete(tmp_path: Path, kind: str, reason: str) -> None:
    data = WHOLE_IMAGES[kind]
    path = _write(tmp_path, f"x.{kind}", data[: len(data) * 2 // 3])
    assert check_image_complete(path) == reason


@pytest.mark.parametrize("kind", sorted(WHOLE_IMAGES))
@pytest.mark.parametrize("kept_bytes", [1, 2, 9, 20])
def test_a_bare_beginning_is_never_complete(tmp_path: Path, kind: str, kept_bytes: int) -> None:
    path = _write(tmp_path, f"x.{kind}", WHOLE_IMAGES[kind][:kept_bytes])
    assert check_image_complete(path) is not None


def test_jpeg_zero_padding_after_eoi_is_complete(tmp_path: Path) -> None:
    data = jpeg_bytes()
    assert check_image_complete(_write(tmp_path, "pad64.jpg", data + bytes(64))) is None
    # Longer padding too: the marker structure reaches EOI, whatever follows it.
    assert check_image_complete(_write(tmp_path, "pad4k.jpg", data + bytes(4096))) is None


def _motion_photo_video(size_bytes: int, seed: int = 3) -> bytes:
    """What a phone appends to a motion photo: an MP4 ('ftyp' box first), here random bytes."""
    ftyp = struct.pack(">I", 24) + b"ftypmp42" + b"\x00\x00\x00\x00" + b"isommp42"
    body = random.Random(seed).randbytes(size_bytes - len(ftyp))
    return ftyp + body


def _restart_marker_jpeg() -> bytes:
    return _pillow_bytes("JPEG", 64, 48, restart_marker_rows=1)


JPEG_VARIANTS = {
    "baseline": jpeg_bytes(),
    "progressive": _pillow_bytes("JPEG", 64, 48, progressive=True),
    "restart-markers": _restart_marker_jpeg(),
    "exif-thumbnail": b"",  # filled in below: needs a thumbnail made first
}


def _jpeg_with_exif_thumbnail() -> bytes:
    thumbnail = jpeg_bytes(16, 16, seed=9)
    # APP1 "Exif": a TIFF header and one IFD1-less IFD0 whose bytes hold a whole JPEG (with its
    # own EOI) inside the segment, as cameras do; only lengths tell that EOI is not the end.
    tiff = b"II*\x00" + struct.pack("<I", 8) + struct.pack("<H", 0) + struct.pack("<I", 0)
    payload = b"Exif\x00\x00" + tiff + thumbnail
    app1 = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    main = jpeg_bytes(seed=4)
    return main[:2] + app1 + main[2:]


JPEG_VARIANTS["exif-thumbnail"] = _jpeg_with_exif_thumbnail()


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_jpeg_followed_by_a_motion_photo_video_is_complete(tmp_path: Path, variant: str) -> None:
    data = JPEG_VARIANTS[variant] + _motion_photo_video(2_000_000)
    assert not data.endswith(b"\xff\xd9")
    assert check_image_complete(_write(tmp_path, "motion.jpg", data)) is None


def test_jpeg_followed_by_a_maker_trailer_is_complete(tmp_path: Path) -> None:
    trailer = b"\x00" * 100 + b"SEFH" + bytes(range(256)) * 4 + b"SEFT"
    path = _write(tmp_path, "maker.jpg", jpeg_bytes() + trailer)
    assert check_image_complete(path) is None


@pytest.mark.parametrize("variant", sorted(JPEG_VARIANTS))
def test_motion_photo_cut_before_its_eoi_is_incomplete(tmp_path: Path, variant: str) -> None:
    jpeg = JPEG_VARIANTS[variant]
    whole = jpeg + _motion_photo_video(100_000)
    for cut in (len(jpeg) // 3, len(jpeg) * 2 // 3, len(jpeg) - 1):
        path = _write(tmp_path, f"cut{cut}.jpg", whole[:cut])
        assert check_image_complete(path) == "JPEG has no end-of-image marker", cut


def test_jpeg_cut_inside_its_exif_thumbnail_segment_is_incomplete(tmp_path: Path) -> None:
    data = _jpeg_with_exif_thumbnail()
    thumbnail_end = data.index(b"\xff\xd9") + 2  # the thumbnail's EOI, inside APP1
    path = _write(tmp_path, "cut.jpg", data[:thumbnail_end] + b"\x00" * 200)
    assert check_image_complete(path) == "JPEG has no end-of-image marker"


def test_scan_uploads_motion_photos_byte_identical_and_refuses_a_cut_one(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "phone"
    root.mkdir()
    motion = {
        "PXL_motion.jpg": JPEG_VARIANTS["exif-thumbnail"] + _motion_photo_video(2_000_000),
        "progressive_motion.jpg": JPEG_VARIANTS["progressive"] + _motion_photo_video(300_000, 5),
    }
    whole = jpeg_bytes(seed=8)
    cut = whole[: len(whole) // 2]
    for name, data in {**motion, "cut.jpg": cut}.items():
        path = _write(root, name, data)
        old = time.time() - 60  # written a minute ago: settled
        os.utime(path, (old, old))
    config = write_config(
        tmp_path, endpoint=devserver.base_url, watches=[{"path": str(root), "dataset_id": "ds_mp"}]
    )

    result = run_watcher("scan", "-c", str(config))

    assert API_KEY not in result.stdout + result.stderr
    assert result.returncode == 1, result.stdout + result.stderr  # the cut one is listed
    assert f"incomplete: {root / 'cut.jpg'}: JPEG has no end-of-image marker" in result.stdout
    items = devserver.items("ds_mp")
    assert sorted(items) == sorted(motion)
    for name, data in motion.items():
        stored = items[name]
        assert stored.image_sha256 is not None
        assert devserver.image_bytes(stored.image_sha256) == data, name


def test_jpeg_whose_marker_structure_is_broken_is_refused(tmp_path: Path) -> None:
    data = jpeg_bytes()
    # A segment length of 1 cannot be (it counts its own two bytes); and a trailer follows,
    # so the quick end-of-file look does not decide.
    broken = data[:2] + b"\xff\xe0\x00\x01" + data[2:] + b"trailer"
    path = _write(tmp_path, "broken.jpg", broken)
    assert check_image_complete(path) == "JPEG marker structure is broken at byte 2"


def test_jpeg_preallocated_to_full_size_is_incomplete(tmp_path: Path) -> None:
    data = jpeg_bytes()
    half = len(data) // 2
    path = _write(tmp_path, "prealloc.jpg", data[:half] + bytes(len(data) - half))
    assert check_image_complete(path) == "JPEG has no end-of-image marker"


def test_large_jpeg_is_checked_from_head_and_tail(tmp_path: Path) -> None:
    path = tmp_path / "big.jpg"
    write_large_jpeg(path, 3_000_000)
    assert check_image_complete(path) is None
    with path.open("r+b") as f:
        f.truncate(2_000_000)
    assert check_image_complete(path) == "JPEG has no end-of-image marker"


def test_png_with_bytes_after_iend_is_incomplete(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.png", png_bytes() + b"\x00\x00\x00\x0cIDAT")
    assert check_image_complete(path) == "PNG has no IEND chunk"


def test_webp_longer_than_its_header_is_refused(tmp_path: Path) -> None:
    path = _write(tmp_path, "x.webp", WHOLE_IMAGES["webp"] + b"junk")
    assert check_image_complete(path) == "WebP size does not match its RIFF header"


def test_tiff_with_many_strips_is_checked_against_the_last_strip(tmp_path: Path) -> None:
    # 16 rows per strip (tag 278): 16 strips, so the offsets live in an array, not inline.
    data = _pillow_bytes("TIFF", 256, 256, tiffinfo={278: 16})
    strips = _tiff_strip_count(data)
    assert strips > 1
    assert check_image_complete(_write(tmp_path, "whole.tif", data)) is None
    # Cut inside the pixel data only (Pillow puts the directory first, pixels last).
    path = _write(tmp_path, "cut.tif", data[:-100])
    assert check_image_complete(path) == "TIFF is shorter than its strips or tiles"


def test_tiff_whose_directory_is_not_written_yet_is_incomplete(tmp_path: Path) -> None:
    # libtiff writes the pixels first and the directory at the end: a file cut before the
    # directory still has the header pointing past its end.
    header = b"II*\x00" + struct.pack("<I", 5000)
    path = _write(tmp_path, "x.tif", header + bytes(1000))
    assert check_image_complete(path) == "TIFF first directory lies outside the file"


def test_bigtiff_is_understood(tmp_path: Path) -> None:
    data = _pillow_bytes("TIFF", 128, 128, big_tiff=True, tiffinfo={278: 16})
    assert data[:4] == b"II+\x00"
    assert check_image_complete(_write(tmp_path, "big.tif", data)) is None
    path = _write(tmp_path, "big-cut.tif", data[:-50])
    assert check_image_complete(path) == "TIFF is shorter than its strips or tiles"


def test_zero_byte_and_unknown_files(tmp_path: Path) -> None:
    assert check_image_complete(_write(tmp_path, "empty.jpg", b"")) == "zero-byte file"
    text = _write(tmp_path, "notes.jpg", b"these are not the pixels you are looking for")
    assert check_image_complete(text) == "not an image: unknown signature"
    assert sniff_image_type(b"these are not") is None
    assert sniff_image_type(b"") is None


def test_missing_file_and_directory(tmp_path: Path) -> None:
    reason = check_image_complete(tmp_path / "missing.jpg")
    assert reason is not None and reason.startswith("unreadable:")
    assert check_image_complete(tmp_path) == "not a regular file"


def test_fifo_is_not_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert check_image_complete(fifo) == "not a regular file"
    # Had it been opened for reading, a non-blocking writer could now connect.
    with pytest.raises(OSError):
        os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)


def _tiff_strip_count(data: bytes) -> int:
    ifd_offset = struct.unpack_from("<I", data, 4)[0]
    entry_count = struct.unpack_from("<H", data, ifd_offset)[0]
    for index in range(entry_count):
        tag, _type, count = struct.unpack_from("<HHI", data, ifd_offset + 2 + index * 12)
        if tag == 273:
            return int(count)
    return 0
