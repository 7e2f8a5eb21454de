"""Receiving a multipart form as it streams in: file parts go to disk, hashed on the way."""

from __future__ import annotations

import hashlib
import logging
import re
import uuid
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final
from urllib.parse import unquote

from python_multipart.multipart import MultipartParser, parse_options_header

from watcher.devserver.request_failures import _RequestRejected

_MAX_FIELD_BYTES: Final = 64 << 20  # non-file parts and JSON bodies are held in memory
_SAFE_EXTENSION: Final = re.compile(r"[a-z0-9]{1,8}")
_CONTENT_TYPE_EXTENSIONS: Final = {"image/jpeg": "jpg", "image/png": "png"}

# python_multipart logs a warning for each malformed body; the client already gets it as a 400,
# so keep Python's last-resort handler from printing it again on stderr.
logging.getLogger("python_multipart").addHandler(logging.NullHandler())


# --------------------------------------------------------------------------- multipart forms


@dataclass
class _ReceivedImage:
    """One file part, already on disk under a temporary name."""

    filename: str
    content_type: str | None
    temp_path: Path
    sha256: str
    size_bytes: int
    extension: str


@dataclass
class _ReceivedForm:
    fields: dict[str, list[bytes]] = field(default_factory=dict)
    images: list[_ReceivedImage] = field(default_factory=list)
    file_part_count: int = 0

    def discard_images(self) -> None:
        for image in self.images:
            image.temp_path.unlink(missing_ok=True)


def _extension_for(filename: str, content_type: str | None) -> str:
    suffix = PurePosixPath(unquote(filename)).suffix.lower().lstrip(".")
    if _SAFE_EXTENSION.fullmatch(suffix):
        return suffix
    if content_type in _CONTENT_TYPE_EXTENSIONS:
        return _CONTENT_TYPE_EXTENSIONS[content_type]
    if content_type and content_type.startswith("image/"):
        subtype = content_type.removeprefix("image/")
        if _SAFE_EXTENSION.fullmatch(subtype):
            return subtype
    return "bin"


class _MultipartReceiver:
    """Feeds a multipart body through python_multipart; file parts go to disk as they arrive."""

    def __init__(self, boundary: bytes, incoming_dir: Path, max_files: int) -> None:
        self._incoming_dir = incoming_dir
        self._max_files = max_files
        self.form = _ReceivedForm()
        self._ended = False
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[str, bytes] = {}
        self._field_name: str | None = None
        self._field_buffer: bytearray | None = None
        self._file: IO[bytes] | None = None
        self._file_path: Path | None = None
        self._file_hash: Any = None
        self._file_size = 0
        self._file_name = ""
        self._file_content_type: str | None = None
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
                "on_end": self._on_end,
            },
        )

    def feed(self, data: bytes) -> None:
        try:
            self._parser.write(data)
        except _RequestRejected:
            raise
        except Exception as exc:  # python_multipart raises its own error types for bad bodies
            if isinstance(exc, OSError):
                raise
            raise _RequestRejected(400, f"malformed multipart body: {exc}") from None

    def finish(self) -> _ReceivedForm:
        self._parser.finalize()
        if not self._ended:
            raise _RequestRejected(400, "multipart body ended before its closing boundary")
        return self.form

    def abandon(self) -> None:
        """Remove every temporary file this request created."""
        if self._file is not None:
            self._file.close()
            self._file = None
        if self._file_path is not None:
            self._file_path.unlink(missing_ok=True)
        self.form.discard_images()

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._header_name.clear()
        self._header_value.clear()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_name.decode("latin-1").strip().lower()] = bytes(
            self._header_value
        )
        self._header_name.clear()
        self._header_value.clear()

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(
            self._headers.get("content-disposition", b"").decode("latin-1")
        )
        name = _decode_header_text(options.get(b"name", b""))
        content_type_raw = self._headers.get("content-type")
        content_type = (
            content_type_raw.decode("latin-1").split(";", 1)[0].strip().lower()
            if content_type_raw
            else None
        )
        # A client may send the JSON part as a file; it is still the JSON part.
        if b"filename" in options and name not in ("items", "item"):
            self.form.file_part_count += 1
            if self.form.file_part_count > self._max_files:
                return  # counted and skipped; the request is refused once the body is read
            self._file_name = _decode_header_text(options[b"filename"])
            self._file_content_type = content_type
            self._file_path = self._incoming_dir / f"{uuid.uuid4().hex}.part"
            self._file = self._file_path.open("wb")
            self._file_hash = hashlib.sha256()
            self._file_size = 0
        else:
            self._field_name = name
            self._field_buffer = bytearray()

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._file is not None:
            piece = memoryview(data)[start:end]
            self._file.write(piece)
            self._file_hash.update(piece)
            self._file_size += end - start
        elif self._field_buffer is not None:
            if len(self._field_buffer) + (end - start) > _MAX_FIELD_BYTES:
                raise _RequestRejected(413, f"form field may be at most {_MAX_FIELD_BYTES} bytes")
            self._field_buffer += data[start:end]

    def _on_part_end(self) -> None:
        if self._file is not None and self._file_path is not None:
            self._file.close()
            self.form.images.append(
                _ReceivedImage(
                    filename=self._file_name,
                    content_type=self._file_content_type,
                    temp_path=self._file_path,
                    sha256=self._file_hash.hexdigest(),
                    size_bytes=self._file_size,
                    extension=_extension_for(self._file_name, self._file_content_type),
                )
            )
            self._file = None
            self._file_path = None
        elif self._field_name is not None and self._field_buffer is not None:
            self.form.fields.setdefault(self._field_name, []).append(bytes(self._field_buffer))
        self._field_name = None
        self._field_buffer = None

    def _on_end(self) -> None:
        self._ended = True


def _decode_header_text(raw: bytes) -> str:
    # Clients put UTF-8 in part headers; python_multipart hands them back as latin-1 bytes.
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return raw.decode("latin-1")
