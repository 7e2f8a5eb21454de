"""Is this image file completely written? Judged from its head and tail, never the whole file.

A writer that is still busy, or died half-way, leaves a file whose end does not match what its
format promises: JPEG ends in an EOI marker, PNG in an IEND chunk, GIF in a trailer byte; WebP,
BMP and TIFF declare their sizes or offsets in the header. `check_image_complete` compares the
two with a few small reads, so it is cheap enough for the settler to call on every candidate.

A JPEG that does not end in EOI may still be whole: phones append a video to motion photos,
cameras append maker trailers. Such a file's marker structure is walked from SOI (segments are
skipped by their lengths, the entropy-coded data is searched for the next marker) until it
reaches EOI; only that walk reads more than a few bytes, and it stops at the EOI.

It says "looks complete", not "decodes": a file cut off exactly after an embedded thumbnail's
EOI would pass, which is why the settler also requires the size and mtime to have stopped moving.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from watcher.errors import NotARegularFile
from watcher.files.localfile import FileKind, kind_of, open_regular_file

# How much of the head `sniff_image_type` looks at; callers reading a head should read this much.
SNIFF_BYTES = 32


class ImageVerdict(StrEnum):
    """The fixed reasons an image is not complete. Two more carry details: "JPEG marker
    structure is broken at byte N" and "unreadable: <error>"."""

    NOT_AN_IMAGE = "not an image: unknown signature"  # no amount of waiting changes this one
    NOT_REGULAR = FileKind.OTHER.value
    ZERO_BYTES = "zero-byte file"
    JPEG_NO_EOI = "JPEG has no end-of-image marker"
    PNG_NO_IEND = "PNG has no IEND chunk"
    GIF_NO_TRAILER = "GIF has no trailer"
    WEBP_SIZE_MISMATCH = "WebP size does not match its RIFF header"
    BMP_SHORT = "BMP is shorter than its header says"
    TIFF_HEADER_SHORT = "TIFF header is incomplete"
    TIFF_DIRECTORY_OUTSIDE = "TIFF first directory lies outside the file"
    TIFF_TABLE_OUTSIDE = "TIFF strip or tile table lies outside the file"
    TIFF_DATA_SHORT = "TIFF is shorter than its strips or tiles"


# Some cameras pad a JPEG after EOI with zeros up to a block size; up to this much padding the
# end of the file decides at once. Anything longer (or any other trailer) needs the walk.
JPEG_MAX_ZERO_PADDING_BYTES = 64

_JPEG_SOI = b"\xff\xd8\xff"
_JPEG_EOI = b"\xff\xd9"
_JPEG_EOI_CODE = 0xD9
_JPEG_SOI_CODE = 0xD8
_JPEG_TEM_CODE = 0x01  # the one standalone marker besides SOI, EOI and RSTn
_JPEG_FIRST_VALID_CODE = 0xC0  # 0x02-0xBF are reserved: no encoder writes them
# A marker is 0xFF and a code byte. Not one: 0xFF 0x00 (a stuffed 0xFF inside entropy-coded
# data), 0xFF 0xD0-0xD7 (restart markers, part of the scan) and 0xFF 0xFF (fill before a marker).
_JPEG_MARKER = re.compile(b"\xff[\x01-\xcf\xd8-\xfe]")
# The walk reads ahead in chunks that grow from small (the next marker is usually right there)
# to large (a scan is megabytes long).
_JPEG_FIRST_CHUNK_BYTES = 4096
_JPEG_MAX_CHUNK_BYTES = 1 << 20
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# length 0, type "IEND", and the CRC of "IEND", which is always the same.
_PNG_IEND_CHUNK = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_GIF_SIGNATURES = (b"GIF87a", b"GIF89a")
_GIF_TRAILER = b"\x3b"
_BMP_DIB_HEADER_SIZES = frozenset({12, 16, 40, 52, 56, 64, 108, 124})

# TIFF tags whose arrays say where the pixel data lies.
_TIFF_STRIP_OFFSETS = 273
_TIFF_STRIP_BYTE_COUNTS = 279
_TIFF_TILE_OFFSETS = 324
_TIFF_TILE_BYTE_COUNTS = 325
_TIFF_TYPE_SIZES = {3: 2, 4: 4, 16: 8}  # SHORT, LONG, LONG8: the types offsets and counts use
# Beyond this many IFD entries or strips, reading them stops being cheap; fall back to the
# IFD-in-range check alone.
_TIFF_MAX_IFD_ENTRIES = 4096
_TIFF_MAX_STRIPS = 65536


def sniff_image_type(head: bytes) -> str | None:
    """The image format `head` (the first bytes of a file) starts with, or None.

    Returns "jpeg", "png", "gif", "webp", "tiff" or "bmp". Give it at least `SNIFF_BYTES`
    bytes when the file has that many; shorter heads are judged on what is there.
    """
    if head.startswith(_JPEG_SOI):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head[:6] in _GIF_SIGNATURES:
        return "gif"
    if len(head) >= 12 and head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if len(head) >= 18 and head[:2] == b"BM":
        dib_header_size = int.from_bytes(head[14:18], "little")
        if dib_header_size in _BMP_DIB_HEADER_SIZES:
            return "bmp"
    return None


def check_image_complete(path: Path) -> str | None:
    """None if the image at `path` looks completely written, else a short reason why not.

    Reads a few bytes at the head and the tail (and, for TIFF, the first directory).
    Never opens anything but a regular file, so a FIFO is not disturbed.
    """
    try:
        st = os.stat(path)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"
    if kind_of(st) is not FileKind.REGULAR:
        return ImageVerdict.NOT_REGULAR.value
    if st.st_size == 0:
        return ImageVerdict.ZERO_BYTES.value
    try:
        # Should the path become a FIFO or a symlink between stat and open: no hang, no follow.
        with open_regular_file(path) as f:
            fd = f.fileno()
            return check_open_image_complete(fd, os.fstat(fd).st_size)
    except NotARegularFile as exc:
        return str(exc.strerror)
    except OSError as exc:
        return f"unreadable: {exc.strerror}"


def check_open_image_complete(fd: int, size_bytes: int) -> str | None:
    """`check_image_complete` on a regular file the caller already opened (positional reads
    only, so the caller's file position is untouched)."""
    reason = _check_by_format(_ImageReader(fd, size_bytes))
    # Plain text, not the enum member: reasons go to logs and the store as they are.
    return None if reason is None else str(reason)


@dataclass(frozen=True)
class _ImageReader:
    """Positional reads on an open file of known size; reads past the end come back short."""

    fd: int
    size_bytes: int

    def read_at(self, offset: int, length: int) -> bytes:
        if offset < 0 or length <= 0 or offset >= self.size_bytes:
            return b""
        return os.pread(self.fd, min(length, self.size_bytes - offset), offset)

    def tail(self, length: int) -> bytes:
        start = max(0, self.size_bytes - length)
        return self.read_at(start, self.size_bytes - start)


def _check_by_format(reader: _ImageReader) -> str | None:
    head = reader.read_at(0, SNIFF_BYTES)
    kind = sniff_image_type(head)
    if kind == "jpeg":
        return _check_jpeg(reader)
    if kind == "png":
        return _check_png(reader)
    if kind == "gif":
        return None if reader.tail(1) == _GIF_TRAILER else ImageVerdict.GIF_NO_TRAILER
    if kind == "webp":
        return _check_webp(head, reader)
    if kind == "tiff":
        return _check_tiff(head, reader)
    if kind == "bmp":
        return _check_bmp(head, reader)
    return ImageVerdict.NOT_AN_IMAGE


def _check_jpeg(reader: _ImageReader) -> str | None:
    if reader.size_bytes < len(_JPEG_SOI) + len(_JPEG_EOI):
        return ImageVerdict.JPEG_NO_EOI
    window = reader.tail(len(_JPEG_EOI) + JPEG_MAX_ZERO_PADDING_BYTES)
    # rstrip removes at most the whole window; a longer padding leaves fewer than two bytes.
    if window.rstrip(b"\x00").endswith(_JPEG_EOI):
        return None  # the common case, decided by the tail alone
    return _walk_jpeg_to_eoi(reader)


def _walk_jpeg_to_eoi(reader: _ImageReader) -> str | None:
    """Follow the markers from SOI; None once EOI is reached, whatever bytes follow it."""
    offset = len(_JPEG_SOI) - 1  # the 0xFF that starts the first marker after SOI
    while True:
        found = _next_jpeg_marker(reader, offset)
        if found is None:
            return ImageVerdict.JPEG_NO_EOI
        marker_offset, code = found
        if code == _JPEG_EOI_CODE:
            return None
        if code == _JPEG_SOI_CODE or (code < _JPEG_FIRST_VALID_CODE and code != _JPEG_TEM_CODE):
            return f"JPEG marker structure is broken at byte {marker_offset}"
        offset = marker_offset + 2
        if code == _JPEG_TEM_CODE:
            continue
        length_field = reader.read_at(offset, 2)
        if len(length_field) < 2:
            return ImageVerdict.JPEG_NO_EOI
        segment_bytes = int.from_bytes(length_field, "big")  # counts itself, not the marker
        if segment_bytes < 2:
            return f"JPEG marker structure is broken at byte {marker_offset}"
        offset += segment_bytes
        if offset > reader.size_bytes:
            return ImageVerdict.JPEG_NO_EOI
        # After SOS the entropy-coded data follows; the next search runs through it. Any other
        # bytes before the next marker are skipped too, as decoders do.


def _next_jpeg_marker(reader: _ImageReader, offset: int) -> tuple[int, int] | None:
    """The offset and code of the first marker at or after `offset`, or None before the end."""
    chunk_bytes = _JPEG_FIRST_CHUNK_BYTES
    while offset < reader.size_bytes:
        chunk = reader.read_at(offset, chunk_bytes)
        match = _JPEG_MARKER.search(chunk)
        if match is not None:
            return offset + match.start(), chunk[match.start() + 1]
        if len(chunk) < 2:
            return None
        # The last byte may be a 0xFF whose code byte is in the next chunk.
        offset += len(chunk) - 1
        chunk_bytes = min(chunk_bytes * 2, _JPEG_MAX_CHUNK_BYTES)
    return None


def _check_png(reader: _ImageReader) -> str | None:
    if reader.size_bytes < len(_PNG_SIGNATURE) + len(_PNG_IEND_CHUNK):
        return ImageVerdict.PNG_NO_IEND
    if reader.tail(len(_PNG_IEND_CHUNK)) != _PNG_IEND_CHUNK:
        return ImageVerdict.PNG_NO_IEND
    return None


def _check_webp(head: bytes, reader: _ImageReader) -> str | None:
    riff_payload_bytes = int.from_bytes(head[4:8], "little")
    if reader.size_bytes != riff_payload_bytes + 8:
        return ImageVerdict.WEBP_SIZE_MISMATCH
    return None


def _check_bmp(head: bytes, reader: _ImageReader) -> str | None:
    declared_size_bytes = int.from_bytes(head[2:6], "little")
    pixel_offset = int.from_bytes(head[10:14], "little")
    if declared_size_bytes == 0:
        # Allowed by the format for uncompressed bitmaps; the pixel offset is all there is.
        return None if reader.size_bytes > pixel_offset else ImageVerdict.BMP_SHORT
    if reader.size_bytes < declared_size_bytes:
        return ImageVerdict.BMP_SHORT
    return None


@dataclass(frozen=True)
class _TiffLayout:
    """Classic TIFF and BigTIFF differ only in field widths; this holds the widths."""

    byte_order: str  # "<" or ">" for struct
    offset_format: str  # "I" (4 bytes) or "Q" (8 bytes)
    entry_count_format: str  # "H" or "Q"
    entry_bytes: int  # 12 or 20
    inline_value_bytes: int  # 4 or 8
    header_bytes: int  # 8 or 16; the first directory's offset ends the header

    @property
    def offset_bytes(self) -> int:
        return struct.calcsize(self.offset_format)

    @property
    def entry_count_bytes(self) -> int:
        return struct.calcsize(self.entry_count_format)

    def unpack(self, fmt: str, data: bytes, offset: int = 0) -> int:
        value: int = struct.unpack_from(self.byte_order + fmt, data, offset)[0]
        return value


def _tiff_layout(head: bytes) -> _TiffLayout | None:
    byte_order = "<" if head[:2] == b"II" else ">"
    version = struct.unpack_from(byte_order + "H", head, 2)[0]
    if version == 42:
        return _TiffLayout(byte_order, "I", "H", 12, 4, 8)
    if len(head) >= 16 and struct.unpack_from(byte_order + "H", head, 4)[0] == 8:
        return _TiffLayout(byte_order, "Q", "Q", 20, 8, 16)
    return None


def _check_tiff(head: bytes, reader: _ImageReader) -> str | None:
    layout = _tiff_layout(head)
    if layout is None or len(head) < layout.header_bytes:
        return ImageVerdict.TIFF_HEADER_SHORT
    ifd_offset = layout.unpack(
        layout.offset_format, head, layout.header_bytes - layout.offset_bytes
    )
    count_raw = reader.read_at(ifd_offset, layout.entry_count_bytes)
    if ifd_offset < layout.header_bytes or len(count_raw) < layout.entry_count_bytes:
        return ImageVerdict.TIFF_DIRECTORY_OUTSIDE
    entry_count = layout.unpack(layout.entry_count_format, count_raw)
    entries_offset = ifd_offset + layout.entry_count_bytes
    ifd_end = entries_offset + entry_count * layout.entry_bytes + layout.offset_bytes
    if ifd_end > reader.size_bytes:
        return ImageVerdict.TIFF_DIRECTORY_OUTSIDE
    if entry_count > _TIFF_MAX_IFD_ENTRIES:
        return None
    entries = reader.read_at(entries_offset, entry_count * layout.entry_bytes)
    data_end = _tiff_pixel_data_end(layout, entries, entry_count, reader)
    if data_end is None:
        return ImageVerdict.TIFF_TABLE_OUTSIDE
    if data_end > reader.size_bytes:
        return ImageVerdict.TIFF_DATA_SHORT
    return None


def _tiff_pixel_data_end(
    layout: _TiffLayout, entries: bytes, entry_count: int, reader: _ImageReader
) -> int | None:
    """The highest offset+count of IFD0's strips or tiles (0 if it has none); None if unreadable."""
    arrays: dict[int, list[int]] = {}
    wanted = (
        _TIFF_STRIP_OFFSETS,
        _TIFF_STRIP_BYTE_COUNTS,
        _TIFF_TILE_OFFSETS,
        _TIFF_TILE_BYTE_COUNTS,
    )
    count_format = "I" if layout.entry_bytes == 12 else "Q"
    for index in range(entry_count):
        base = index * layout.entry_bytes
        tag = layout.unpack("H", entries, base)
        if tag not in wanted:
            continue
        value_type = layout.unpack("H", entries, base + 2)
        value_count = layout.unpack(count_format, entries, base + 4)
        value_size = _TIFF_TYPE_SIZES.get(value_type)
        if value_size is None:
            return None
        if value_count > _TIFF_MAX_STRIPS:
            return 0  # too many to read cheaply; the directory check above has to do
        value_field_offset = base + 4 + struct.calcsize(count_format)
        array_bytes = value_count * value_size
        if array_bytes <= layout.inline_value_bytes:
            raw = entries[value_field_offset : value_field_offset + array_bytes]
        else:
            array_offset = layout.unpack(layout.offset_format, entries, value_field_offset)
            raw = reader.read_at(array_offset, array_bytes)
            if len(raw) < array_bytes:
                return None
        value_format = {2: "H", 4: "I", 8: "Q"}[value_size]
        arrays[tag] = list(struct.unpack(f"{layout.byte_order}{value_count}{value_format}", raw))
    data_end = 0
    for offsets_tag, counts_tag in (
        (_TIFF_STRIP_OFFSETS, _TIFF_STRIP_BYTE_COUNTS),
        (_TIFF_TILE_OFFSETS, _TIFF_TILE_BYTE_COUNTS),
    ):
        offsets = arrays.get(offsets_tag, [])
        counts = arrays.get(counts_tag, [])
        for offset, count in zip(offsets, counts, strict=False):
            data_end = max(data_end, offset + count)
    return data_end
