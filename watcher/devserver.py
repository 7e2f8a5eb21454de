"""A local stand-in for the Nucleus dataset-append API, with fault injection.

It speaks the wire contract of `nucleus-api.md` over real HTTP/1.1 (keep-alive, TCP_NODELAY),
streams uploads to disk while hashing them, and keeps what it accepted in a folder a person can
read::

    <data_dir>/images/<sha256>.<ext>           every accepted image, stored once by content
    <data_dir>/datasets/<id>/items.jsonl       one JSON line per created/updated/deleted item
    <data_dir>/incoming/                       uploads in flight (emptied on start)

A devserver started again on the same folder replays the items files, so it remembers what it
stored. Jobs live in memory only.

Validation is all-or-nothing per request: when one item breaks a rule, nothing in that request is
stored (a sync request gets 400, an async one a job that ends `Errored_User`).
"""

from __future__ import annotations

import base64
import binascii
import collections
import contextlib
import hashlib
import hmac
import io
import json
import logging
import os
import random
import re
import signal
import socket
import socketserver
import struct
import sys
import tempfile
import threading
import time
import traceback
import types
import uuid
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path, PurePosixPath
from typing import IO, Any, Final
from urllib.parse import parse_qs, unquote, urlsplit

from python_multipart.multipart import MultipartParser, parse_options_header

from watcher.errors import ConfigError

__all__ = [
    "FAULT_KINDS",
    "DevServer",
    "RequestRecord",
    "StoredItem",
    "serve_forever_cli",
]

API_PREFIX: Final = "/v1/nucleus"
FAULT_KINDS: Final = ("500", "503", "429", "reset", "stall", "drip", "lost")
MAX_FILES_PER_REQUEST: Final = 10
REMOTE_URL_PREFIXES: Final = ("gs://", "s3://", "http://", "https://")
DEFAULT_MAX_BODY_BYTES: Final = (1 << 30) + (16 << 20)  # 1 GiB of images + room for the form

_READ_CHUNK_BYTES: Final = 1 << 20
_MAX_FIELD_BYTES: Final = 64 << 20  # non-file parts and JSON bodies are held in memory
_MAX_SMALL_BODY_BYTES: Final = 1 << 20  # bodies of GET/DELETE (the official client sends "{}")
_RESET_READ_BYTES: Final = 64 << 10
_STALL_SECONDS: Final = 300.0
_IDLE_CONNECTION_SECONDS: Final = 300.0
_LINGER_DRAIN_SECONDS: Final = 2.0
_JOIN_TIMEOUT_SECONDS: Final = 5.0
_POLL_INTERVAL_SECONDS: Final = 0.05  # how quickly stop() is noticed by the accept loop
_SAFE_DATASET_ID: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_SAFE_EXTENSION: Final = re.compile(r"[a-z0-9]{1,8}")
_CONTENT_TYPE_EXTENSIONS: Final = {"image/jpeg": "jpg", "image/png": "png"}

# python_multipart logs a warning for each malformed body; the client already gets it as a 400,
# so keep Python's last-resort handler from printing it again on stderr.
logging.getLogger("python_multipart").addHandler(logging.NullHandler())


@dataclass(frozen=True)
class StoredItem:
    """One dataset item as the devserver holds it."""

    reference_id: str
    metadata: dict[str, Any]
    image_url: str  # the part filename / remote URL as received
    image_sha256: str | None  # None for remote-URL items
    image_size_bytes: int | None
    content_type: str | None
    times_written: int  # 1 on create, +1 per update


@dataclass(frozen=True)
class RequestRecord:
    """One request as the devserver saw it. `status` is 0 when no answer was sent."""

    method: str
    path: str
    query: str
    status: int
    item_count: int
    fault: str | None


# --------------------------------------------------------------------------- request failures


class _RequestRejected(Exception):
    """Ends a request with an HTTP error answer; never escapes the handler."""

    def __init__(self, status: int, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.headers = headers or {}


class _ClientGone(Exception):
    """The client closed the connection before its request body was complete."""


# --------------------------------------------------------------------------- request bodies


class _BodyReader:
    """Reads one request body (Content-Length or chunked) in pieces, refusing more than a cap."""

    def __init__(
        self, rfile: io.BufferedIOBase, content_length: int | None, chunked: bool, max_bytes: int
    ) -> None:
        self._rfile = rfile
        self._chunked = chunked
        self._max_bytes = max_bytes
        self.declared_bytes = content_length
        self.bytes_read = 0
        self._remaining_in_chunk = 0 if chunked else (content_length or 0)
        self.finished = not chunked and not content_length

    def read_some(self, limit: int = _READ_CHUNK_BYTES) -> bytes:
        """Return the next piece of the body (at most `limit` bytes); b"" at its end."""
        if self.finished:
            return b""
        if self._chunked and self._remaining_in_chunk == 0:
            self._remaining_in_chunk = self._next_chunk_size()
            if self._remaining_in_chunk == 0:
                self._read_trailers()
                self.finished = True
                return b""
        wanted = min(limit, self._remaining_in_chunk)
        # read1 hands over what one recv brought instead of waiting for the whole piece.
        data = self._rfile.read1(wanted)
        if not data:
            raise _ClientGone
        self.bytes_read += len(data)
        if self.bytes_read > self._max_bytes:
            raise _RequestRejected(413, f"request body is larger than {self._max_bytes} bytes")
        self._remaining_in_chunk -= len(data)
        if self._remaining_in_chunk == 0:
            if self._chunked:
                self._expect_crlf()
            else:
                self.finished = True
        return bytes(data)

    def read_all(self, max_bytes: int) -> bytes:
        """The rest of the body in memory, for bodies that are small by contract."""
        if self.declared_bytes is not None and self.declared_bytes > max_bytes:
            raise _RequestRejected(413, f"this body may be at most {max_bytes} bytes")
        pieces: list[bytes] = []
        total = 0
        while piece := self.read_some():
            total += len(piece)
            if total > max_bytes:
                raise _RequestRejected(413, f"this body may be at most {max_bytes} bytes")
            pieces.append(piece)
        return b"".join(pieces)

    def discard(self) -> None:
        while self.read_some():
            pass

    @property
    def declared_over_cap(self) -> bool:
        return self.declared_bytes is not None and self.declared_bytes > self._max_bytes

    def drop_rest(self, seconds: float) -> None:
        """Read and drop the rest for at most `seconds`, whatever the cap; chunk framing is
        not followed, as the connection is closed afterwards."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            limit = _READ_CHUNK_BYTES
            if not self._chunked and self.declared_bytes is not None:
                limit = min(limit, self.declared_bytes - self.bytes_read)
                if limit <= 0:
                    return
            data = self._rfile.read1(limit)
            if not data:
                return
            self.bytes_read += len(data)

    def _next_chunk_size(self) -> int:
        line = self._rfile.readline(1024)
        if not line:
            raise _ClientGone
        size_text = line.split(b";", 1)[0].strip()
        try:
            return int(size_text, 16)
        except ValueError:
            raise _RequestRejected(400, "malformed chunked transfer encoding") from None

    def _expect_crlf(self) -> None:
        if self._rfile.readline(1024) not in (b"\r\n", b"\n"):
            raise _RequestRejected(400, "malformed chunked transfer encoding")

    def _read_trailers(self) -> None:
        while True:
            line = self._rfile.readline(8192)
            if not line:
                raise _ClientGone
            if line in (b"\r\n", b"\n"):
                return


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


# --------------------------------------------------------------------------- items and datasets


@dataclass
class _IncomingItem:
    reference_id: str
    metadata: dict[str, Any]
    image_url: str
    update: bool
    image: _ReceivedImage | None = None


@dataclass(frozen=True)
class _ItemProblem:
    reference_id: str
    error: str

    def as_job_error(self) -> str:
        return json.dumps({"reference_id": self.reference_id, "error": self.error})


@dataclass(frozen=True)
class _AppendOutcome:
    new_items: int
    updated_items: int
    ignored_items: int
    problems: list[_ItemProblem]


def _metadata_type(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, bool):  # bool before int: True is an int in Python
        return "boolean"
    if isinstance(value, int | float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, dict):
        return "object"
    return "list"


class _Dataset:
    """Items of one dataset and the type each metadata key has taken in it."""

    def __init__(self, dataset_id: str, items_path: Path) -> None:
        self.dataset_id = dataset_id
        self.items: dict[str, StoredItem] = {}
        # Once a key has a type it keeps it, as the service's metadata schema does.
        self.key_types: dict[str, str] = {}
        self._items_path = items_path
        self._items_file: IO[str] | None = None

    def type_problems(
        self, item: _IncomingItem, pending_types: dict[str, tuple[str, str]]
    ) -> list[_ItemProblem]:
        """Type conflicts of `item` against the dataset and earlier items of the same request."""
        problems: list[_ItemProblem] = []
        for key, value in item.metadata.items():
            value_type = _metadata_type(value)
            if value_type is None:
                continue
            known = self.key_types.get(key)
            if known is None and key in pending_types:
                known, other_ref = pending_types[key]
                where = f"item {other_ref!r} of this request"
            else:
                where = f"dataset {self.dataset_id}"
            if known is not None and known != value_type:
                problems.append(
                    _ItemProblem(
                        item.reference_id,
                        f"metadata key {key!r} is a {known} in {where} "
                        f"but item {item.reference_id!r} sends a {value_type}",
                    )
                )
            elif known is None:
                pending_types[key] = (value_type, item.reference_id)
        return problems

    def learn_types(self, metadata: dict[str, Any]) -> None:
        for key, value in metadata.items():
            value_type = _metadata_type(value)
            if value_type is not None:
                self.key_types.setdefault(key, value_type)

    def write_lines(self, lines: list[str]) -> None:
        if self._items_file is None:
            self._items_path.parent.mkdir(parents=True, exist_ok=True)
            self._items_file = self._items_path.open("a", encoding="utf-8")
        self._items_file.write("".join(lines))
        self._items_file.flush()

    def close(self) -> None:
        if self._items_file is not None:
            self._items_file.close()
            self._items_file = None


def _journal_line(item: StoredItem | None, reference_id: str) -> str:
    written_at = datetime.now(UTC).isoformat()
    if item is None:
        return json.dumps({"reference_id": reference_id, "deleted": True, "at": written_at}) + "\n"
    return json.dumps({**asdict(item), "at": written_at}) + "\n"


class _Catalog:
    """Everything the devserver stored: datasets, items and images, safe across threads."""

    def __init__(self, data_dir: Path, allowed_datasets: Sequence[str] | None) -> None:
        self.images_dir = data_dir / "images"
        self.incoming_dir = data_dir / "incoming"
        self._datasets_dir = data_dir / "datasets"
        self._allowed = frozenset(allowed_datasets) if allowed_datasets is not None else None
        self._lock = threading.Lock()
        self._datasets: dict[str, _Dataset] = {}
        self._image_paths: dict[str, Path] = {}

    # -- start and stop

    def load(self) -> None:
        for directory in (self.images_dir, self.incoming_dir, self._datasets_dir):
            directory.mkdir(parents=True, exist_ok=True)
        for leftover in self.incoming_dir.iterdir():
            leftover.unlink(missing_ok=True)
        for image_path in self.images_dir.iterdir():
            self._image_paths[image_path.name.split(".", 1)[0]] = image_path
        for items_path in sorted(self._datasets_dir.glob("*/items.jsonl")):
            dataset_id = items_path.parent.name
            if self.dataset_exists(dataset_id):
                self._replay(self._dataset(dataset_id), items_path)

    def close(self) -> None:
        with self._lock:
            for dataset in self._datasets.values():
                dataset.close()

    def _replay(self, dataset: _Dataset, items_path: Path) -> None:
        with items_path.open(encoding="utf-8") as lines:
            for line in lines:
                try:
                    entry = json.loads(line)
                    reference_id = entry["reference_id"]
                    if entry.get("deleted"):
                        dataset.items.pop(reference_id, None)
                        continue
                    item = StoredItem(
                        reference_id=reference_id,
                        metadata=entry["metadata"],
                        image_url=entry["image_url"],
                        image_sha256=entry["image_sha256"],
                        image_size_bytes=entry["image_size_bytes"],
                        content_type=entry["content_type"],
                        times_written=entry["times_written"],
                    )
                except (ValueError, KeyError, TypeError):
                    continue  # a line cut short by a crash; the items before it still count
                dataset.items[reference_id] = item
                dataset.learn_types(item.metadata)

    # -- lookups

    def dataset_exists(self, dataset_id: str) -> bool:
        if not _SAFE_DATASET_ID.fullmatch(dataset_id):
            return False
        if self._allowed is not None:
            return dataset_id in self._allowed
        return dataset_id.startswith("ds_")

    def _dataset(self, dataset_id: str) -> _Dataset:
        dataset = self._datasets.get(dataset_id)
        if dataset is None:
            dataset = _Dataset(dataset_id, self._datasets_dir / dataset_id / "items.jsonl")
            self._datasets[dataset_id] = dataset
        return dataset

    def items(self, dataset_id: str) -> dict[str, StoredItem]:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            return dict(dataset.items) if dataset is not None else {}

    def item(self, dataset_id: str, reference_id: str) -> StoredItem | None:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            return dataset.items.get(reference_id) if dataset is not None else None

    def dataset_summary(self, dataset_id: str) -> tuple[int, dict[str, str]]:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is None:
                return 0, {}
            return len(dataset.items), dict(dataset.key_types)

    def image_path(self, sha256: str) -> Path:
        with self._lock:
            path = self._image_paths.get(sha256)
        if path is None:
            raise KeyError(f"no stored image with sha256 {sha256}")
        return path

    # -- changes

    def delete(self, dataset_id: str, reference_id: str) -> bool:
        with self._lock:
            dataset = self._datasets.get(dataset_id)
            if dataset is None or dataset.items.pop(reference_id, None) is None:
                return False
            dataset.write_lines([_journal_line(None, reference_id)])
            return True

    def append(self, dataset_id: str, incoming: list[_IncomingItem]) -> _AppendOutcome:
        """Apply a whole request, or nothing of it when any written item breaks a rule."""
        with self._lock:
            dataset = self._dataset(dataset_id)
            plan: list[tuple[_IncomingItem, StoredItem | None]] = []
            ignored = 0
            problems: list[_ItemProblem] = []
            pending_types: dict[str, tuple[str, str]] = {}
            for item in incoming:
                existing = dataset.items.get(item.reference_id)
                if existing is not None and not item.update:
                    ignored += 1
                    continue
                problems.extend(dataset.type_problems(item, pending_types))
                plan.append((item, existing))
            if problems:
                return _AppendOutcome(0, 0, 0, problems)

            new_count = updated_count = 0
            lines: list[str] = []
            for item, existing in plan:
                image = item.image
                stored = StoredItem(
                    reference_id=item.reference_id,
                    metadata=item.metadata,
                    image_url=item.image_url,
                    image_sha256=image.sha256 if image else None,
                    image_size_bytes=image.size_bytes if image else None,
                    content_type=image.content_type if image else None,
                    times_written=1 if existing is None else existing.times_written + 1,
                )
                if image is not None:
                    self._keep_image(image)
                dataset.items[item.reference_id] = stored
                dataset.learn_types(item.metadata)
                lines.append(_journal_line(stored, item.reference_id))
                if existing is None:
                    new_count += 1
                else:
                    updated_count += 1
            if lines:
                dataset.write_lines(lines)
            return _AppendOutcome(new_count, updated_count, ignored, [])

    def _keep_image(self, image: _ReceivedImage) -> None:
        if image.sha256 in self._image_paths:
            image.temp_path.unlink(missing_ok=True)  # same bytes already stored
            return
        final_path = self.images_dir / f"{image.sha256}.{image.extension}"
        os.replace(image.temp_path, final_path)
        self._image_paths[image.sha256] = final_path


# --------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    job_id: str
    created_at: str
    ready_at_monotonic: float
    final_status: str  # what the job reports once its delay has passed
    total_items: int
    errors: list[str]

    def status(self) -> str:
        return self.final_status if time.monotonic() >= self.ready_at_monotonic else "Running"

    def status_answer(self) -> dict[str, Any]:
        status = self.status()
        done = status != "Running"
        message = {
            "Running": "Job is running.",
            "Completed": "Job completed successfully.",
        }.get(status, f"{len(self.errors)} item(s) failed; see job/{self.job_id}/errors")
        return {
            "job_id": self.job_id,
            "status": status,
            "message": message,
            "job_progress": "1.00" if done else "0.00",
            "completed_steps": str(self.total_items if done else 0),
            "total_steps": str(self.total_items),
        }

    def info_answer(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_last_known_status": self.status(),
            "job_type": "uploadDatasetItems",
            "job_creation_time": self.created_at,
        }


class _JobBook:
    def __init__(self, delay_seconds: float) -> None:
        self._delay_seconds = delay_seconds
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def create(self, outcome: _AppendOutcome, total_items: int) -> _Job:
        job = _Job(
            job_id=f"job_{uuid.uuid4().hex[:20]}",
            created_at=datetime.now(UTC).isoformat(),
            ready_at_monotonic=time.monotonic() + self._delay_seconds,
            final_status="Errored_User" if outcome.problems else "Completed",
            total_items=total_items,
            errors=[problem.as_job_error() for problem in outcome.problems],
        )
        with self._lock:
            self._jobs[job.job_id] = job
        return job

    def get(self, job_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.get(job_id)


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class _Fault:
    kind: str
    retry_after_seconds: float


class _FaultPlan:
    """Which append request gets which fault: a queue first, then a random rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[_Fault] = collections.deque()
        self._rate = 0.0
        self._rate_kinds: tuple[str, ...] = ()
        self._rate_retry_after_seconds = 1.0
        self._rng = random.Random(0)

    def enqueue(self, kinds: Sequence[str], retry_after_seconds: float) -> None:
        _check_fault_kinds(kinds)
        with self._lock:
            self._queue.extend(_Fault(kind, retry_after_seconds) for kind in kinds)

    def set_rate(
        self, rate: float, kinds: Sequence[str], seed: int, retry_after_seconds: float
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, got {rate}")
        if rate > 0 and not kinds:
            raise ValueError("a fault rate above 0 needs at least one fault kind")
        _check_fault_kinds(kinds)
        with self._lock:
            self._rate = rate
            self._rate_kinds = tuple(kinds)
            self._rate_retry_after_seconds = retry_after_seconds
            self._rng = random.Random(seed)

    def next_fault(self) -> _Fault | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._rate > 0 and self._rng.random() < self._rate:
                kind = self._rng.choice(self._rate_kinds)
                return _Fault(kind, self._rate_retry_after_seconds)
            return None


def _check_fault_kinds(kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")


def _retry_after_text(seconds: float) -> str:
    # Whole seconds as HTTP says; fractions are kept so tests need not wait a full second.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"


# --------------------------------------------------------------------------- routes


@dataclass(frozen=True)
class _Route:
    name: str  # append | job | job_errors | job_info | dataset_info | dataset_property | refloc
    dataset_id: str = ""
    job_id: str = ""
    reference_id: str = ""
    property_name: str = ""

    @classmethod
    def parse(cls, raw_path: str) -> _Route | None:
        if not raw_path.startswith(API_PREFIX + "/"):
            return None
        segments = raw_path[len(API_PREFIX) + 1 :].split("/")
        decoded = [unquote(segment) for segment in segments]
        match decoded:
            case ["dataset", dataset_id, "append"]:
                return cls("append", dataset_id=dataset_id)
            case ["dataset", dataset_id, "info"]:
                return cls("dataset_info", dataset_id=dataset_id)
            case ["dataset", dataset_id, ("name" | "is_scene" | "use_privacy_mode") as prop]:
                # Small properties the official client reads before it appends.
                return cls("dataset_property", dataset_id=dataset_id, property_name=prop)
            case ["dataset", dataset_id, "refloc", *_] if len(segments) > 3:
                # A reference_id may hold slashes ("{device}/{relpath}"), encoded or not.
                return cls(
                    "refloc", dataset_id=dataset_id, reference_id=unquote("/".join(segments[3:]))
                )
            case ["job", job_id]:
                return cls("job", job_id=job_id)
            case ["job", job_id, "errors"]:
                return cls("job_errors", job_id=job_id)
            case ["job", job_id, "info"]:
                return cls("job_info", job_id=job_id)
        return None


def _item_from_json(raw: Any, *, default_update: bool, image_url_required: bool) -> _IncomingItem:
    if not isinstance(raw, dict):
        raise _RequestRejected(400, "every item must be a JSON object")
    reference_id = raw.get("reference_id")
    if not isinstance(reference_id, str) or not reference_id:
        raise _RequestRejected(400, "every item needs a non-empty string reference_id")
    metadata = raw.get("metadata")
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, dict):
        raise _RequestRejected(400, f"item {reference_id!r}: metadata must be a JSON object")
    image_url = raw.get("image_url")
    if image_url is None and not image_url_required:
        image_url = ""
    if not isinstance(image_url, str) or (image_url_required and not image_url):
        raise _RequestRejected(400, f"item {reference_id!r}: image_url must be a non-empty string")
    update = raw.get("update", default_update)
    if not isinstance(update, bool):
        raise _RequestRejected(400, f"item {reference_id!r}: update must be true or false")
    return _IncomingItem(reference_id, metadata, image_url, update)


def _parse_json_bytes(raw: bytes, what: str) -> Any:
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise _RequestRejected(400, f"{what} is not valid JSON: {exc}") from None


def _reject_duplicates(items: list[_IncomingItem]) -> None:
    seen: set[str] = set()
    for item in items:
        if item.reference_id in seen:
            raise _RequestRejected(
                400, f"reference_id {item.reference_id!r} appears twice in one request"
            )
        seen.add(item.reference_id)


def _items_from_form(form: _ReceivedForm) -> list[_IncomingItem]:
    """Items of the list form (`items` + `image` parts) or the legacy form (`item` + `image`)."""
    if form.file_part_count > MAX_FILES_PER_REQUEST:
        raise _RequestRejected(
            400,
            f"{form.file_part_count} files in one request; at most {MAX_FILES_PER_REQUEST}",
        )
    if "items" in form.fields:
        if len(form.fields["items"]) != 1:
            raise _RequestRejected(400, "the form must hold exactly one 'items' part")
        raw_items = _parse_json_bytes(form.fields["items"][0], "the 'items' part")
        if not isinstance(raw_items, list) or not raw_items:
            raise _RequestRejected(400, "the 'items' part must be a non-empty JSON list")
        items = [
            _item_from_json(raw, default_update=False, image_url_required=True) for raw in raw_items
        ]
    elif "item" in form.fields:
        if len(form.fields["item"]) != 1 or len(form.images) != 1:
            raise _RequestRejected(400, "the single-item form needs one 'item' and one image part")
        raw_item = _parse_json_bytes(form.fields["item"][0], "the 'item' part")
        item = _item_from_json(raw_item, default_update=False, image_url_required=False)
        item.image_url = item.image_url or form.images[0].filename
        items = [item]
    else:
        raise _RequestRejected(400, "multipart body has neither an 'items' nor an 'item' part")
    _reject_duplicates(items)
    _attach_images(items, form.images)
    return items


def _attach_images(items: list[_IncomingItem], images: list[_ReceivedImage]) -> None:
    # The official client (aiohttp) percent-encodes part filenames; urllib3 sends them raw.
    by_filename: dict[str, collections.deque[_ReceivedImage]] = {}
    for image in images:
        for name in {image.filename, unquote(image.filename)}:
            by_filename.setdefault(name, collections.deque()).append(image)
    used: set[int] = set()
    for item in items:
        candidates = by_filename.get(item.image_url, collections.deque())
        while candidates and id(candidates[0]) in used:
            candidates.popleft()
        if not candidates:
            raise _RequestRejected(
                400,
                f"item {item.reference_id!r}: no image part with filename {item.image_url!r}",
            )
        item.image = candidates.popleft()
        used.add(id(item.image))
    if len(used) != len(images):
        extra = next(image.filename for image in images if id(image) not in used)
        raise _RequestRejected(400, f"image part {extra!r} belongs to no item")


def _items_from_json_body(body: Any) -> list[_IncomingItem]:
    if not isinstance(body, dict):
        raise _RequestRejected(400, "the JSON body must be an object with an 'items' list")
    if "request_id" in body and "items" not in body:
        raise _RequestRejected(
            400, "uploads through a presigned URL (request_id) are not supported by the devserver"
        )
    default_update = body.get("update", False)
    if not isinstance(default_update, bool):
        raise _RequestRejected(400, "update must be true or false")
    raw_items = body.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise _RequestRejected(400, "the JSON body needs a non-empty 'items' list")
    items = [
        _item_from_json(raw, default_update=default_update, image_url_required=True)
        for raw in raw_items
    ]
    for item in items:
        if not item.image_url.startswith(REMOTE_URL_PREFIXES):
            raise _RequestRejected(
                400,
                f"item {item.reference_id!r}: image_url must start with "
                f"{', '.join(REMOTE_URL_PREFIXES)}",
            )
    _reject_duplicates(items)
    return items


def _item_answer(dataset_id: str, item: StoredItem) -> dict[str, Any]:
    item_id = "di_" + hashlib.sha256(f"{dataset_id}/{item.reference_id}".encode()).hexdigest()[:20]
    return {
        "item": {
            "id": item_id,
            "dataset_item_id": item_id,
            "reference_id": item.reference_id,
            "ref_id": item.reference_id,
            "metadata": item.metadata,
            "image_url": item.image_url,
            "original_image_url": item.image_url,
        },
        "annotations": {},
    }


# --------------------------------------------------------------------------- shared state


class _RequestLog:
    """Every request as seen, and how many append requests arrived, safe across threads."""

    def __init__(self, on_request: Callable[[RequestRecord], None] | None) -> None:
        self._on_request = on_request
        self._lock = threading.Lock()
        # Bounded so a devserver left running for days does not grow without end.
        self._records: collections.deque[RequestRecord] = collections.deque(maxlen=1_000_000)
        self._append_total = 0

    def count_append(self) -> None:
        with self._lock:
            self._append_total += 1

    def add(self, record: RequestRecord) -> None:
        with self._lock:
            self._records.append(record)
        if self._on_request is not None:
            self._on_request(record)

    def snapshot(self) -> list[RequestRecord]:
        with self._lock:
            return list(self._records)

    def append_count(self) -> int:
        with self._lock:
            return self._append_total


@dataclass
class _ServerContext:
    """What every connection thread shares."""

    catalog: _Catalog
    jobs: _JobBook
    faults: _FaultPlan
    log: _RequestLog
    stopping: threading.Event  # set by stop(): stalled and dripping answers give up
    api_key: str | None
    max_body_bytes: int
    drip_byte_interval_seconds: float
    down: bool = False


# --------------------------------------------------------------------------- HTTP


class _Handler(BaseHTTPRequestHandler):
    """One connection; BaseHTTPRequestHandler loops over its keep-alive requests."""

    protocol_version = "HTTP/1.1"
    server_version = "nucleus-devserver/1"
    sys_version = ""
    timeout = _IDLE_CONNECTION_SECONDS
    server: _HttpServer

    def do_GET(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def do_DELETE(self) -> None:
        self._dispatch()

    def do_PUT(self) -> None:
        self._dispatch()

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: every request is reported once, as a RequestRecord."""

    # -- the request

    def _dispatch(self) -> None:
        self._url = urlsplit(self.path)
        self._status = 0
        self._item_count = 0
        self._fault: str | None = None
        self._recorded = False
        self._body: _BodyReader | None = None
        try:
            self._body = self._open_body()
            self._route_request(self._url.path, self._url.query)
        except _RequestRejected as rejected:
            self._answer_error(rejected)
        except _ClientGone:
            self.close_connection = True
        except (ConnectionError, TimeoutError):
            self.close_connection = True
        except Exception:
            traceback.print_exc(file=sys.stderr)
            self._answer_error(_RequestRejected(500, "devserver internal error"))
        finally:
            self._record()

    def _record(self) -> None:
        """Report this request once; before its answer goes out, so a client that has the
        answer also finds the record."""
        if not self._recorded:
            self._recorded = True
            self.server.context.log.add(
                RequestRecord(
                    self.command,
                    self._url.path,
                    self._url.query,
                    self._status,
                    self._item_count,
                    self._fault,
                )
            )

    def _open_body(self) -> _BodyReader:
        chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        length_text = self.headers.get("Content-Length")
        content_length: int | None = None
        if length_text is not None and not chunked:
            try:
                content_length = int(length_text)
            except ValueError:
                self.close_connection = True
                raise _RequestRejected(400, "Content-Length is not a number") from None
            if content_length < 0:
                self.close_connection = True
                raise _RequestRejected(400, "Content-Length is negative")
        max_bytes = self.server.context.max_body_bytes
        reader = _BodyReader(self.rfile, content_length, chunked, max_bytes)
        if content_length is not None and content_length > max_bytes:
            raise _RequestRejected(413, f"request body is larger than {max_bytes} bytes")
        return reader

    def _route_request(self, path: str, query: str) -> None:
        context = self.server.context
        route = _Route.parse(path)
        is_append = route is not None and route.name == "append" and self.command == "POST"
        if is_append:
            context.log.count_append()
        if context.down:
            self._fault = "down"
            raise _RequestRejected(503, "the endpoint is down (devserver set_down)")
        if route is None:
            raise _RequestRejected(404, f"no route {self.command} {path}")
        self._check_auth()
        if is_append:
            self._append(route.dataset_id, query)
            return
        self._finish_small_body()
        self._answer_read_route(route)

    def _check_auth(self) -> None:
        header = self.headers.get("Authorization", "")
        scheme, _, encoded = header.partition(" ")
        key = ""
        if scheme.lower() == "basic":
            try:
                key = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
            except (binascii.Error, UnicodeDecodeError):
                key = ""
            key = key.partition(":")[0]
        expected = self.server.context.api_key
        accepted = bool(key) and (
            expected is None or hmac.compare_digest(key.encode(), expected.encode())
        )
        if not accepted:
            raise _RequestRejected(
                401,
                "invalid API key: send it as the HTTP Basic username with an empty password",
                headers={"WWW-Authenticate": 'Basic realm="nucleus"'},
            )

    def _answer_read_route(self, route: _Route) -> None:
        context = self.server.context
        catalog = context.catalog
        if route.name in ("job", "job_errors", "job_info"):
            job = context.jobs.get(route.job_id)
            if job is None or self.command != "GET":
                raise _RequestRejected(404, f"no job {route.job_id}")
            if route.name == "job":
                self._answer_json(200, job.status_answer())
            elif route.name == "job_info":
                self._answer_json(200, job.info_answer())
            else:
                done = job.status() != "Running"
                self._answer_json(200, job.errors if done else [])
            return
        if not catalog.dataset_exists(route.dataset_id):
            raise _RequestRejected(404, f"no dataset {route.dataset_id}")
        if route.name == "dataset_info" and self.command == "GET":
            length, key_types = catalog.dataset_summary(route.dataset_id)
            self._answer_json(
                200,
                {
                    "dataset_id": route.dataset_id,
                    "name": route.dataset_id,
                    "length": length,
                    "model_run_ids": [],
                    "slice_ids": [],
                    "annotation_metadata_schema": {},
                    "item_metadata_schema": key_types,
                    "tags": [],
                    "is_scene": False,
                },
            )
        elif route.name == "dataset_property" and self.command == "GET":
            value = route.dataset_id if route.property_name == "name" else False
            self._answer_json(200, {route.property_name: value})
        elif route.name == "refloc" and self.command == "GET":
            item = catalog.item(route.dataset_id, route.reference_id)
            if item is None:
                raise _RequestRejected(404, f"no item {route.reference_id!r} in {route.dataset_id}")
            self._answer_json(200, _item_answer(route.dataset_id, item))
        elif route.name == "refloc" and self.command == "DELETE":
            if not catalog.delete(route.dataset_id, route.reference_id):
                raise _RequestRejected(404, f"no item {route.reference_id!r} in {route.dataset_id}")
            self._answer_json(200, {"dataset_id": route.dataset_id, "deleted": 1})
        else:
            raise _RequestRejected(405, f"{self.command} is not allowed here")

    # -- appends

    def _append(self, dataset_id: str, query: str) -> None:
        context = self.server.context
        if not context.catalog.dataset_exists(dataset_id):
            raise _RequestRejected(404, f"no dataset {dataset_id}")
        fault = context.faults.next_fault()
        if fault is not None:
            self._fault = fault.kind
            if self._fault_before_items(fault):
                return
        asynchronous = parse_qs(query).get("async", ["0"])[-1].lower() in ("1", "true")
        content_type, options = parse_options_header(self.headers.get("Content-Type", ""))
        if content_type == b"multipart/form-data":
            boundary = options.get(b"boundary")
            if not boundary:
                raise _RequestRejected(400, "multipart Content-Type without a boundary")
            form = self._receive_form(boundary)
            try:
                items = _items_from_form(form)
                self._item_count = len(items)
                answer = self._apply(dataset_id, items, asynchronous)
            finally:
                form.discard_images()  # kept images were renamed away already
        elif content_type == b"application/json":
            body = _parse_json_bytes(self._read_body(_MAX_FIELD_BYTES), "the JSON body")
            items = _items_from_json_body(body)
            self._item_count = len(items)
            answer = self._apply(dataset_id, items, asynchronous)
        else:
            raise _RequestRejected(
                400, "append takes multipart/form-data or application/json bodies"
            )
        self._answer_append(answer, fault)

    def _apply(self, dataset_id: str, items: list[_IncomingItem], asynchronous: bool) -> Any:
        context = self.server.context
        outcome = context.catalog.append(dataset_id, items)
        if asynchronous:
            return context.jobs.create(outcome, len(items)).info_answer()
        if outcome.problems:
            raise _RequestRejected(400, outcome.problems[0].error)
        return {
            "dataset_id": dataset_id,
            "new_items": outcome.new_items,
            "updated_items": outcome.updated_items,
            "ignored_items": outcome.ignored_items,
            "upload_errors": 0,
        }

    def _receive_form(self, boundary: bytes) -> _ReceivedForm:
        assert self._body is not None
        receiver = _MultipartReceiver(
            boundary, self.server.context.catalog.incoming_dir, MAX_FILES_PER_REQUEST
        )
        try:
            while piece := self._body.read_some():
                receiver.feed(piece)
            return receiver.finish()
        except BaseException:
            receiver.abandon()
            raise

    def _read_body(self, max_bytes: int) -> bytes:
        assert self._body is not None
        return self._body.read_all(max_bytes)

    def _finish_small_body(self) -> None:
        assert self._body is not None
        if self._body.declared_bytes and self._body.declared_bytes > _MAX_SMALL_BODY_BYTES:
            raise _RequestRejected(413, f"this body may be at most {_MAX_SMALL_BODY_BYTES} bytes")
        self._body.read_all(_MAX_SMALL_BODY_BYTES)

    # -- faults

    def _fault_before_items(self, fault: _Fault) -> bool:
        """Act out a fault that comes before the items are stored; True when the request is over."""
        assert self._body is not None
        if fault.kind in ("500", "503", "429"):
            self._body.discard()
            headers = {}
            if fault.kind == "429":
                headers["Retry-After"] = _retry_after_text(fault.retry_after_seconds)
            raise _RequestRejected(int(fault.kind), f"injected fault {fault.kind}", headers=headers)
        if fault.kind == "reset":
            declared = self._body.declared_bytes
            wanted = min(
                _RESET_READ_BYTES, max(1, declared // 2) if declared else _RESET_READ_BYTES
            )
            self._body.read_some(wanted)
            self._reset_connection()
            return True
        if fault.kind == "stall":
            self._body.discard()
            self._record()
            self.server.context.stopping.wait(_STALL_SECONDS)
            self.close_connection = True
            return True
        return False  # drip and lost act after the items are stored

    def _reset_connection(self) -> None:
        self._record()
        # SO_LINGER 0 turns close() into a TCP RST, which the client sees as "connection reset".
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.rfile.close()  # the buffered reader holds a reference that would delay the close
        self.connection.close()
        self.close_connection = True

    def _answer_append(self, answer: Any, fault: _Fault | None) -> None:
        if fault is not None and fault.kind == "lost":
            self._record()
            self.close_connection = True  # stored, but the client never hears of it
            return
        drip = fault is not None and fault.kind == "drip"
        self._answer_json(200, answer, drip=drip)

    # -- answers

    def _answer_error(self, rejected: _RequestRejected) -> None:
        body = self._body
        if body is not None and not body.finished and not self.close_connection:
            # Read what the client is still sending, so that it gets to read our answer.
            if body.declared_over_cap:
                self.close_connection = True
            else:
                try:
                    body.discard()
                except _RequestRejected:
                    self.close_connection = True
                except (_ClientGone, OSError):
                    self.close_connection = True
                    return  # nobody left to answer
        answer = {"error": rejected.message, "status_code": rejected.status}
        try:
            self._answer_json(rejected.status, answer, headers=rejected.headers)
        except OSError:
            self.close_connection = True
            return
        if self.close_connection and body is not None and not body.finished:
            self._lingering_close(body)

    def _lingering_close(self, body: _BodyReader) -> None:
        """Half-close after an early answer and drop what still arrives for a moment: closing
        with unread data would send a reset that can wipe the answer before the client reads it."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(_LINGER_DRAIN_SECONDS)
            body.drop_rest(_LINGER_DRAIN_SECONDS)
        except OSError:
            pass

    def _answer_json(
        self,
        status: int,
        answer: Any,
        *,
        headers: dict[str, str] | None = None,
        drip: bool = False,
    ) -> None:
        payload = json.dumps(answer).encode()
        self._status = status
        self._record()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        if not drip:
            self.wfile.write(payload)
            return
        context = self.server.context
        for index in range(len(payload)):
            self.wfile.write(payload[index : index + 1])
            if index + 1 < len(payload) and context.stopping.wait(
                context.drip_byte_interval_seconds
            ):
                self.close_connection = True
                return


class _HttpServer(ThreadingHTTPServer):
    """Threaded HTTP server that knows its connections, so stop() can end and join them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: _ServerContext) -> None:
        self.context = context
        self._connections_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a broken resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        # Without it a reply written in two pieces waits ~40 ms for the client's delayed ACK.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"devserver-conn-{client_address[1]}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # a client that went away mid-answer is normal here
        super().handle_error(request, client_address)

    def end_connections(self, timeout_seconds: float) -> None:
        """Wake every connection thread (their sockets stop working) and join them."""
        with self._connections_lock:
            connections = list(self._connections.items())
        for connection, _ in connections:
            with contextlib.suppress(OSError):  # already closed by its thread
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_seconds
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))


# --------------------------------------------------------------------------- the server


class DevServer:
    """A local Nucleus-compatible endpoint. Use as a context manager or start()/stop().

    Besides the documented interface: `max_body_bytes` (answer 413 above it),
    `drip_byte_interval_seconds` (pace of the "drip" fault) and `on_request` (called with each
    RequestRecord, from the connection's thread).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: Path | None = None,
        api_key: str | None = None,
        job_delay_seconds: float = 0.0,
        datasets: Sequence[str] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        drip_byte_interval_seconds: float = 1.0,
        on_request: Callable[[RequestRecord], None] | None = None,
    ) -> None:
        if job_delay_seconds < 0:
            raise ValueError("job_delay_seconds must not be negative")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if drip_byte_interval_seconds < 0:
            raise ValueError("drip_byte_interval_seconds must not be negative")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        self.host = host
        self._requested_port = port
        self._given_data_dir = data_dir
        self._allowed_datasets = list(datasets) if datasets is not None else None
        self._api_key = api_key
        self._max_body_bytes = max_body_bytes
        self._drip_byte_interval_seconds = drip_byte_interval_seconds
        self._jobs = _JobBook(job_delay_seconds)
        self._faults = _FaultPlan()
        self._log = _RequestLog(on_request)
        self._stopping = threading.Event()
        self._down = False
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None
        self._context: _ServerContext | None = None
        self._data_dir: Path | None = None
        self._http: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._state = "new"

    # -- lifecycle

    def start(self) -> DevServer:
        """Load what the data folder holds, bind, and serve in a background thread."""
        if self._state != "new":
            raise RuntimeError("a DevServer can be started once")
        if self._given_data_dir is None:
            self._temp_dir = tempfile.TemporaryDirectory(prefix="nucleus-devserver-")
            self._data_dir = Path(self._temp_dir.name)
        else:
            self._data_dir = self._given_data_dir
        catalog = _Catalog(self._data_dir, self._allowed_datasets)
        self._context = _ServerContext(
            catalog=catalog,
            jobs=self._jobs,
            faults=self._faults,
            log=self._log,
            stopping=self._stopping,
            api_key=self._api_key,
            max_body_bytes=self._max_body_bytes,
            drip_byte_interval_seconds=self._drip_byte_interval_seconds,
            down=self._down,
        )
        try:
            catalog.load()
            self._http = _HttpServer((self.host, self._requested_port), self._context)
        except BaseException:
            self._cleanup_temp_dir()
            raise
        self._serve_thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_SECONDS},
            name="devserver-accept",
            daemon=True,
        )
        self._serve_thread.start()
        self._state = "running"
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection, join every thread, close files. Idempotent."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping.set()
        assert self._http is not None and self._serve_thread is not None
        assert self._context is not None
        self._http.shutdown()
        self._http.server_close()
        self._http.end_connections(_JOIN_TIMEOUT_SECONDS)
        self._serve_thread.join(_JOIN_TIMEOUT_SECONDS)
        self._context.catalog.close()
        self._cleanup_temp_dir()

    def _cleanup_temp_dir(self) -> None:
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the devserver is not started")
        return int(self._http.server_address[1])

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>/v1/nucleus`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{API_PREFIX}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the devserver is not started")
        return self._data_dir

    # -- what it holds

    def _catalog(self) -> _Catalog:
        if self._context is None:
            raise RuntimeError("the devserver is not started")
        return self._context.catalog

    def items(self, dataset_id: str) -> dict[str, StoredItem]:
        """reference_id -> item, a snapshot; empty for a dataset that holds nothing."""
        return self._catalog().items(dataset_id)

    def image_path(self, sha256: str) -> Path:
        """Where the image with this sha256 is stored; KeyError if none."""
        return self._catalog().image_path(sha256)

    def image_bytes(self, sha256: str) -> bytes:
        return self.image_path(sha256).read_bytes()

    def requests(self) -> list[RequestRecord]:
        """Every request so far, in arrival order; a record is made before its answer is sent."""
        return self._log.snapshot()

    def append_request_count(self) -> int:
        """POST .../append requests received, whatever became of them."""
        return self._log.append_count()

    # -- trouble on demand

    def inject_faults(self, *kinds: str, retry_after_seconds: float = 1.0) -> None:
        """The next len(kinds) append requests each get one fault, in order.

        Requests refused before they count (401, 404, set_down) do not use up a fault.
        """
        self._faults.enqueue(kinds, retry_after_seconds)

    def set_fault_rate(
        self,
        rate: float,
        kinds: Sequence[str],
        seed: int = 0,
        retry_after_seconds: float = 1.0,
    ) -> None:
        """Each append request gets a random fault with probability `rate` (0 turns it off).

        Queued faults from inject_faults() go first.
        """
        self._faults.set_rate(rate, kinds, seed, retry_after_seconds)

    def set_down(self, down: bool) -> None:
        """True: every request is answered 503 (recorded with fault "down")."""
        self._down = down
        if self._context is not None:
            self._context.down = down


# --------------------------------------------------------------------------- command line


def _log_request_line(record: RequestRecord) -> None:
    query = f"?{record.query}" if record.query else ""
    status = str(record.status) if record.status else "no-answer"
    fault = f" fault={record.fault}" if record.fault else ""
    print(
        f"{datetime.now(UTC).strftime('%H:%M:%S')} {record.method} {record.path}{query} "
        f"{status} items={record.item_count}{fault}",
        file=sys.stderr,
        flush=True,
    )


def serve_forever_cli(
    host: str,
    port: int,
    data_dir: Path | None,
    api_key: str | None,
    job_delay_seconds: float,
    datasets: list[str],
) -> int:
    """Run a devserver until SIGINT/SIGTERM; the base URL is the first line on stdout."""
    server = DevServer(
        host,
        port,
        data_dir=data_dir,
        api_key=api_key or None,
        job_delay_seconds=job_delay_seconds,
        datasets=datasets or None,
        on_request=_log_request_line,
    )
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(f"devserver: cannot listen on {host}:{port}: {exc.strerror}") from None
    stop_requested = threading.Event()
    previous_handlers = {
        signum: signal.signal(signum, lambda _signum, _frame: stop_requested.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        print(server.base_url, flush=True)
        data_note = data_dir if data_dir is not None else "a temporary folder (removed on exit)"
        print(f"devserver: storing uploads in {data_note}", file=sys.stderr, flush=True)
        while not stop_requested.wait(1.0):
            pass
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        server.stop()
    return 0
