"""HTTP to the Nucleus append, job and info routes: streaming multipart, an idle deadline, and
the split of failures into retryable and permanent ones.

Nothing here sleeps to retry or touches the state store; the uploader decides what happens
after an error. The wire format follows `shared/nucleus-api.md` (and the official client).

Threads: one `requests.Session` with one pooled adapter is shared by every upload worker.
urllib3's pool hands each in-flight request its own connection (a thread-safe queue), so the
workers share warm keep-alive connections instead of each holding a private pool, and `close()`
has one pool to shut. Cookies are refused so the session carries no state between requests.

Deadline: `timeout_seconds` is an idle timeout, as rclone's `--timeout`: a request lives as
long as bytes move, however long that takes on a thin link, and ends once it has gone
`timeout_seconds` without progress (see `_RequestDeadline` for what counts). Each request gets
a `_RequestDeadline`; the body and the answer reader report progress, and a single reaper thread
reviews every request now and then and shuts down the socket of one that made none. The answer
counts only in whole chunks, so a server that drips one byte a second is still abandoned.
"""

from __future__ import annotations

import email.utils
import hashlib
import heapq
import http.client
import http.cookiejar
import itertools
import json
import math
import os
import socket
import ssl
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import quote

import certifi
import requests
from requests.adapters import HTTPAdapter
from requests_toolbelt.multipart.encoder import MultipartEncoder
from urllib3 import ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from watcher import __version__
from watcher.config import parse_endpoint
from watcher.errors import (
    ConfigError,
    LocalFileError,
    NotARegularFile,
    PermanentUploadError,
    RetryableUploadError,
    TimeoutUploadError,
    UnauthorizedError,
    UploadError,
)
from watcher.files import open_regular_file
from watcher.nucleus.bandwidth import TokenBucket
from watcher.wire import REMOTE_URL_PREFIXES

# http.client writes a file body in 8 KiB blocks (urllib3: 16 KiB); a syscall per 8 KiB caps a
# single upload well below what a LAN or a fast uplink can carry.
SEND_BLOCK_BYTES = 256 * 1024
# The service takes at most 10 files per multipart request (as the official client sends).
MAX_FILES_PER_REQUEST = 10
# Answers are small JSON; job error lists hold at most 10,000 strings. Anything larger is wrong.
_MAX_ANSWER_BYTES = 32 * 1024 * 1024
# Of an error answer only the start is shown, so there is no point reading a huge one.
_MAX_ERROR_ANSWER_BYTES = 64 * 1024
_ANSWER_CHUNK_BYTES = 64 * 1024
_ERROR_TEXT_MAX_CHARS = 300
_ITEM_ERROR_MAX_CHARS = 1000
# A host that does not complete the TCP handshake in this time will not do it later either.
_CONNECT_TIMEOUT_CAP_SECONDS = 30.0
# The reaper reviews a request's progress this many times per timeout: a stalled request ends
# at most timeout/8 late, and a long upload costs the reaper a wake-up every timeout/8.
_REVIEWS_PER_TIMEOUT = 8
# struct tcp_info up to and including tcpi_bytes_acked (Linux 4.1+); read a little more.
_TCP_INFO_BYTES_ACKED_END = 128
_TCP_INFO_READ_BYTES = 256
_IMAGE_CONTENT_TYPES = {
    ".jpg": "image/jpeg",
    ".jpeg": "image/jpeg",
    ".png": "image/png",
    ".gif": "image/gif",
    ".webp": "image/webp",
    ".tif": "image/tiff",
    ".tiff": "image/tiff",
    ".bmp": "image/bmp",
}
# Multipart filenames stay plain ASCII: parsers disagree on how a non-ASCII or quoted filename
# is encoded in the part header, and the name must match `image_url` in the items JSON exactly.
_FILENAME_SAFE_CHARS = frozenset(
    "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+"
)
_FILENAME_MAX_CHARS = 120
# Job states in which the job will not change any more.
_JOB_FINAL_STATES = frozenset(
    {"Completed", "Errored", "Errored_Server", "Errored_User", "Errored_Partial",
     "Errored_Hanging", "Cancelled", "Retried"}
)  # fmt: skip
# Final states caused by the items themselves: sending them again would fail the same way.
_JOB_USER_ERROR_STATES = frozenset({"Errored_User", "Errored_Partial"})


# -- value types ---------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadItem:
    """One dataset item to append: a local file to stream, or a URL the service fetches."""

    reference_id: str
    metadata: Mapping[str, Any]
    update: bool
    path: Path | None = None
    remote_url: str | None = None

    def __post_init__(self) -> None:
        if not self.reference_id:
            raise ValueError("an upload item needs a non-empty reference_id")
        if (self.path is None) == (self.remote_url is None):
            raise ValueError(f"item {self.reference_id!r}: give exactly one of path and remote_url")
        if self.remote_url is not None and not self.remote_url.startswith(REMOTE_URL_PREFIXES):
            raise ValueError(
                f"item {self.reference_id!r}: remote_url must start with "
                + ", ".join(REMOTE_URL_PREFIXES)
            )


@dataclass(frozen=True)
class AppendResult:
    """What the server said about one append request."""

    new_items: int
    updated_items: int
    ignored_items: int
    job_id: str | None  # set for asynchronous appends; the counts are then all 0
    item_errors: dict[str, str]  # reference_id -> error, where the server named the item
    bytes_sent: int  # request body bytes (multipart or JSON)
    upload_errors: int = 0  # the server's own count of items it could not ingest
    # reference_id -> sha256 of the file bytes actually streamed (local files). A file
    # rewritten while it was read differs from the hash recorded when it was claimed.
    streamed_sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobState:
    """The status of an asynchronous append job."""

    job_id: str
    status: str
    message: str

    @property
    def finished(self) -> bool:
        # Unknown states count as still running: polling on is safer than guessing an outcome.
        return self.status in _JOB_FINAL_STATES or self.status.startswith("Errored")

    @property
    def succeeded(self) -> bool:
        return self.status == "Completed"

    @property
    def user_error(self) -> bool:
        """The items themselves were refused: park them. Other failed states are retried."""
        return self.status in _JOB_USER_ERROR_STATES


# -- idle deadline -------------------------------------------------------------------------


class _DeadlineExceeded(Exception):
    """Raised inside a request when its deadline has passed (never leaves this module)."""


class _BodyChanged(Exception):
    """A file grew or shrank while it was streamed, so the body no longer fits Content-Length."""


class _RequestDeadline:
    """Ends one request once it has gone `timeout_seconds` without progress.

    Progress is: a piece of the request handed to the kernel, a full chunk of the answer read,
    or the peer acknowledging more bytes (the reaper reads TCP_INFO, so a send that waits while
    a thin link drains the kernel's buffer is not mistaken for a stall). Time spent waiting on
    our own bandwidth limiter (`paused`) is no lack of progress. A server that takes the whole
    body and then says nothing, or drips its short answer, makes none and is abandoned.
    """

    def __init__(self, timeout_seconds: float) -> None:
        self.timeout_seconds = timeout_seconds
        # The reaper looks this often; a stalled request ends at most this late.
        self.review_interval_seconds = timeout_seconds / _REVIEWS_PER_TIMEOUT
        # Plain attributes written by the request's thread and read by the reaper: each is one
        # atomic store, and a stale read only delays a decision by one review.
        self._last_progress_at = time.monotonic()
        self._paused = False
        self._acked_seen: int | None = None
        self._lock = threading.Lock()
        self._connections: list[HTTPConnection] = []
        self._expired = False
        self.finished = False

    @property
    def expired(self) -> bool:
        return self._expired

    def check(self) -> None:
        if self._expired:
            raise _DeadlineExceeded

    def progressed(self) -> None:
        self._last_progress_at = time.monotonic()

    @contextmanager
    def paused(self) -> Iterator[None]:
        """While our own bandwidth limiter holds the request back: that is not the link."""
        self._paused = True
        try:
            yield
        finally:
            self._paused = False
            self.progressed()

    def review(self, now: float) -> float | None:
        """Called by the reaper: when to look again, or None when the request must end."""
        acked = self._bytes_acknowledged()
        if acked is not None:
            if self._acked_seen is not None and acked != self._acked_seen:
                self._last_progress_at = max(self._last_progress_at, now)
            self._acked_seen = acked
        if self._paused:
            return now + self.review_interval_seconds
        idle_until = self._last_progress_at + self.timeout_seconds
        if now >= idle_until:
            return None
        return min(idle_until, now + self.review_interval_seconds)

    def _bytes_acknowledged(self) -> int | None:
        total: int | None = None
        for connection in self._own_connections():
            acked = _tcp_bytes_acked(connection.sock)
            if acked is not None:
                total = (total or 0) + acked
        return total

    def _own_connections(self) -> list[HTTPConnection]:
        with self._lock:
            # A connection already handed back to the pool may now serve someone else.
            return [c for c in self._connections if getattr(c, "_nucleus_deadline", None) is self]

    def attach(self, connection: HTTPConnection) -> None:
        with self._lock:
            connection._nucleus_deadline = self  # type: ignore[attr-defined]
            if connection not in self._connections:
                self._connections.append(connection)
            already_expired = self._expired
        if already_expired:
            _shut_down(connection)

    def finish(self) -> None:
        with self._lock:
            self.finished = True
            self._connections.clear()

    def expire(self) -> None:
        """Called by the reaper: unblock whatever socket operation the request is stuck in."""
        with self._lock:
            if self.finished:
                return
            self._expired = True
        for connection in self._own_connections():
            _shut_down(connection)


def _tcp_bytes_acked(sock: socket.socket | None) -> int | None:
    """How many bytes the peer has acknowledged on this TCP connection; None if unknown.

    Linux's `struct tcp_info` holds `tcpi_bytes_acked` (a u64) at byte 120 since 4.1; other
    systems fall back to counting only what we hand to the kernel.
    """
    option = getattr(socket, "TCP_INFO", None)
    if sock is None or option is None:
        return None
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, option, _TCP_INFO_READ_BYTES)
    except (OSError, ValueError):  # closed meanwhile, or not a TCP socket
        return None
    if len(info) < _TCP_INFO_BYTES_ACKED_END:
        return None
    return int.from_bytes(
        info[_TCP_INFO_BYTES_ACKED_END - 8 : _TCP_INFO_BYTES_ACKED_END], sys.byteorder
    )


def _shut_down(connection: HTTPConnection) -> None:
    # shutdown(), not close(): another thread is blocked on this socket, and closing the file
    # descriptor under it could let the number be reused by an unrelated socket.
    sock = connection.sock
    if sock is None:
        return
    # An OSError means it is already closed or never connected: nothing is blocked on it.
    with suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


class _DeadlineReaper:
    """One thread for all requests of a client: reviews each request's progress now and
    then, and ends the ones that have made none for their timeout."""

    # Finished deadlines stay in the heap until they surface; rebuild it when they dominate.
    _COMPACT_AFTER_FINISHED = 1024

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, _RequestDeadline]] = []
        self._sequence = itertools.count()
        self._finished_in_heap = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def watch(self, deadline: _RequestDeadline) -> None:
        with self._condition:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(
                    target=self._run, name="nucleus-deadline-reaper", daemon=True
                )
                self._thread.start()
            self._push(time.monotonic() + deadline.review_interval_seconds, deadline)
            self._condition.notify()

    def forget(self, deadline: _RequestDeadline) -> None:
        deadline.finish()
        with self._condition:
            self._finished_in_heap += 1
            if (
                self._finished_in_heap > self._COMPACT_AFTER_FINISHED
                and self._finished_in_heap * 2 > len(self._heap)
            ):
                self._heap = [entry for entry in self._heap if not entry[2].finished]
                heapq.heapify(self._heap)
                self._finished_in_heap = 0

    def stop(self) -> None:
        with self._condition:
            self._stopping = True
            self._condition.notify()
            thread = self._thread
        if thread is not None:
            thread.join()

    def _push(self, at: float, deadline: _RequestDeadline) -> None:
        heapq.heappush(self._heap, (at, next(self._sequence), deadline))

    def _run(self) -> None:
        while True:
            due: list[_RequestDeadline] = []
            with self._condition:
                if self._stopping:
                    return
                now = time.monotonic()
                while self._heap and (self._heap[0][2].finished or self._heap[0][0] <= now):
                    _, _, deadline = heapq.heappop(self._heap)
                    if deadline.finished:
                        self._finished_in_heap = max(0, self._finished_in_heap - 1)
                    else:
                        due.append(deadline)
                if not due:
                    wait = self._heap[0][0] - now if self._heap else None
                    self._condition.wait(wait)
            # Reviews read socket options: outside the lock, so watch() and forget() never wait.
            for deadline in due:
                next_review_at = deadline.review(time.monotonic())
                if next_review_at is None:
                    deadline.expire()
                    continue
                with self._condition:
                    if not deadline.finished:
                        self._push(next_review_at, deadline)


# The deadline of the request the current thread is making; the connection classes below
# read it because urllib3 gives no other way to reach the socket a request ends up on.
_current = threading.local()


def _attach_current_deadline(connection: HTTPConnection) -> None:
    deadline: _RequestDeadline | None = getattr(_current, "deadline", None)
    if deadline is not None:
        deadline.attach(connection)
        deadline.check()


class _DeadlineHTTPConnection(HTTPConnection):
    def connect(self) -> None:
        _attach_current_deadline(self)
        super().connect()

    def request(self, *args: Any, **kwargs: Any) -> None:
        _attach_current_deadline(self)
        super().request(*args, **kwargs)

    def send(self, data: Any) -> None:
        deadline: _RequestDeadline | None = getattr(_current, "deadline", None)
        if deadline is not None and self.sock is not None:
            # The reaper judges progress. A socket timeout would instead end a send that waits
            # while a thin link drains the kernel's buffer, which is progress, not a stall.
            self.sock.settimeout(None)
        super().send(data)
        if deadline is not None:
            deadline.progressed()


class _DeadlineHTTPSConnection(_DeadlineHTTPConnection, HTTPSConnection):
    """The same deadline hooks; the MRO puts HTTPSConnection's connect() under them."""


class _DeadlineHTTPConnectionPool(HTTPConnectionPool):
    ConnectionCls = _DeadlineHTTPConnection


class _DeadlineHTTPSConnectionPool(HTTPSConnectionPool):
    ConnectionCls = _DeadlineHTTPSConnection


_POOL_CLASSES: dict[str, type[HTTPConnectionPool]] = {
    "http": _DeadlineHTTPConnectionPool,
    "https": _DeadlineHTTPSConnectionPool,
}


class _StreamingAdapter(HTTPAdapter):
    """Pooled adapter whose connections send in big blocks and obey the request deadline."""

    def init_poolmanager(
        self, connections: int, maxsize: int, block: bool = False, **pool_kwargs: Any
    ) -> None:
        pool_kwargs["blocksize"] = SEND_BLOCK_BYTES
        super().init_poolmanager(connections, maxsize, block, **pool_kwargs)
        self.poolmanager.pool_classes_by_scheme = _POOL_CLASSES

    def proxy_manager_for(self, proxy: str, **proxy_kwargs: Any) -> Any:
        proxy_kwargs.setdefault("blocksize", SEND_BLOCK_BYTES)
        manager = super().proxy_manager_for(proxy, **proxy_kwargs)
        # SOCKS managers bring their own connection classes; leave those alone.
        if type(manager) is ProxyManager:
            manager.pool_classes_by_scheme = _POOL_CLASSES
        return manager

    def close(self) -> None:
        # urllib3 2.8's PoolManager.clear() only forgets its pools (their sockets close when the
        # garbage collector gets to them); close them now so close() really ends connections.
        managers = [self.poolmanager, *self.proxy_manager.values()]
        for manager in managers:
            # RecentlyUsedContainer refuses plain iteration; keys() is its thread-safe copy.
            keys = manager.pools.keys()
            pools = [manager.pools.get(key) for key in keys]
            manager.clear()
            for pool in pools:
                if pool is not None:
                    pool.close()


# -- streaming body ------------------------------------------------------------------------


class _MeteredBody:
    """File-like view of a multipart encoder that paces, counts and polices outgoing bytes."""

    def __init__(
        self, encoder: MultipartEncoder, deadline: _RequestDeadline, bucket: TokenBucket | None
    ) -> None:
        self._encoder = encoder
        self._deadline = deadline
        self._bucket = bucket
        self._length: int = encoder.len
        self.bytes_read = 0

    def __len__(self) -> int:
        # requests takes Content-Length from here (the encoder knows it from the file sizes).
        return self._length

    def read(self, size: int | None = -1) -> bytes:
        self._deadline.check()
        # Only urllib3 reads this, in blocks; a "read everything" would defeat the streaming.
        if size is None or size < 0 or size > SEND_BLOCK_BYTES:
            size = SEND_BLOCK_BYTES
        chunk: bytes = self._encoder.read(size)
        if not chunk:
            if self.bytes_read != self._length:
                raise _BodyChanged
            return b""
        if self.bytes_read + len(chunk) > self._length:
            raise _BodyChanged
        if self._bucket is not None:
            with self._deadline.paused():
                self._bucket.take(len(chunk))
            self._deadline.check()  # the request may have been ended meanwhile
        self.bytes_read += len(chunk)
        return chunk


# -- the client ----------------------------------------------------------------------------


@dataclass
class _Answer:
    status_code: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


class NucleusClient:
    """Talks to one Nucleus endpoint with one API key. Safe to share between threads."""

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        *,
        timeout_seconds: float = 120.0,
        ca_bundle: str | None = None,
        bandwidth: TokenBucket | None = None,
        user_agent: str = f"nucleus-watcher/{__version__}",
        pool_size: int = 10,
    ) -> None:
        self._base_url, self._host_label = _checked_endpoint(endpoint)
        if not api_key:
            raise ConfigError("nucleus: no API key given")
        if not (math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ConfigError(
                f"nucleus.timeout_seconds: must be a positive number, got {timeout_seconds}"
            )
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self._api_key = api_key
        self._timeout_seconds = float(timeout_seconds)
        self._bandwidth = bandwidth
        self._closed = False
        self._ca_bundle_file = _combined_ca_bundle(ca_bundle) if ca_bundle else None

        session = requests.Session()
        session.auth = (api_key, "")
        session.headers["User-Agent"] = user_agent
        session.headers["Accept"] = "application/json"
        session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
        # Verification is always on; an extra CA only widens what is trusted. It is passed with
        # every request because requests lets REQUESTS_CA_BUNDLE override `session.verify`.
        self._verify: str | bool = self._ca_bundle_file if self._ca_bundle_file else True
        session.verify = self._verify
        # No transparent retries: a streamed body cannot be replayed, and the uploader owns
        # retry timing anyway.
        adapter = _StreamingAdapter(
            pool_connections=4, pool_maxsize=pool_size, max_retries=0, pool_block=False
        )
        session.mount("https://", adapter)
        session.mount("http://", adapter)
        self._session = session
        self._reaper = _DeadlineReaper()

    # -- public routes ---------------------------------------------------------------------

    def append(
        self, dataset_id: str, items: Sequence[UploadItem], *, asynchronous: bool
    ) -> AppendResult:
        """Append items to a dataset with one request.

        All items must be local files (multipart, at most 10) or all remote URLs (JSON). Remote
        items share one top-level `update` flag on the wire, so they must all agree on it; the
        caller groups them. Violations raise ValueError before anything is sent.
        """
        if not items:
            raise ValueError("append needs at least one item")
        reference_ids = [item.reference_id for item in items]
        if len(set(reference_ids)) != len(reference_ids):
            raise ValueError("append got the same reference_id twice in one request")
        local = [item for item in items if item.path is not None]
        if local and len(local) != len(items):
            raise ValueError("local files and remote URLs cannot share one append request")
        route = f"dataset/{_path_segment(dataset_id, 'dataset_id')}/append"
        if asynchronous:
            route += "?async=1"
        if local:
            if len(local) > MAX_FILES_PER_REQUEST:
                raise ValueError(
                    f"at most {MAX_FILES_PER_REQUEST} files per request, got {len(local)}"
                )
            answer, bytes_sent, streamed = self._post_local(route, items)
        else:
            answer, bytes_sent = self._post_remote(route, items)
            streamed = {}
        try:
            data = self._json_object(answer)
            if asynchronous:
                result = self._async_result(data, bytes_sent)
            else:
                result = self._sync_result(data, reference_ids, bytes_sent)
        except UploadError as exc:
            exc.streamed_sha256 = streamed
            raise
        return replace(result, streamed_sha256=streamed)

    def job(self, job_id: str) -> JobState:
        """The current status of an asynchronous job."""
        answer = self._request("GET", f"job/{_path_segment(job_id, 'job_id')}")
        data = self._json_object(answer)
        status = data.get("status")
        if not isinstance(status, str) or not status:
            raise RetryableUploadError("bad answer from server: job status without 'status'")
        message = data.get("message", "")
        if not isinstance(message, str):
            message = json.dumps(message, default=str)
        return JobState(job_id=job_id, status=status, message=self._scrub(message))

    def job_errors(self, job_id: str, reference_ids: Sequence[str]) -> dict[str, str]:
        """A job's error strings, keyed by the reference_id each names ("" when none does)."""
        answer = self._request("GET", f"job/{_path_segment(job_id, 'job_id')}/errors")
        entries = self._json(answer)
        if not isinstance(entries, list):
            raise RetryableUploadError("bad answer from server: job errors are not a list")
        return self._attribute_errors(entries, reference_ids)

    def dataset_info(self, dataset_id: str) -> dict[str, Any]:
        """The dataset summary: a cheap check that key and dataset id are right."""
        answer = self._request("GET", f"dataset/{_path_segment(dataset_id, 'dataset_id')}/info")
        return self._json_object(answer)

    def close(self) -> None:
        """Close pooled connections and stop the deadline thread. Call after the workers stop."""
        if self._closed:
            return
        self._closed = True
        self._session.close()
        self._reaper.stop()
        if self._ca_bundle_file:
            # If it cannot go, no harm: the file holds only public certificates.
            with suppress(OSError):
                os.unlink(self._ca_bundle_file)

    def __enter__(self) -> NucleusClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- request bodies --------------------------------------------------------------------

    def _post_local(
        self, route: str, items: Sequence[UploadItem]
    ) -> tuple[_Answer, int, dict[str, str]]:
        """The multipart request; also the sha256 of each file's bytes as they went out."""
        deadline = _RequestDeadline(self._timeout_seconds)
        with ExitStack() as open_files:
            fields: list[tuple[str, tuple[str | None, Any, str]]] = []
            payload: list[dict[str, Any]] = []
            hashed: dict[str, _HashingFile] = {}
            for index, item in enumerate(items):
                assert item.path is not None  # append() sent only local items here
                content_type = _image_content_type(item.path)
                handle = _HashingFile(open_files.enter_context(_open_image(item.path)))
                hashed[item.reference_id] = handle
                filename = _multipart_filename(index, item.path)
                payload.append(
                    {
                        "reference_id": item.reference_id,
                        "metadata": dict(item.metadata),
                        "image_url": filename,
                        "update": item.update,
                    }
                )
                fields.append(("image", (filename, handle, content_type)))
            items_json = _dumps_items(payload, items)
            fields.insert(0, ("items", (None, items_json, "application/json")))
            encoder = MultipartEncoder(fields=fields)
            body = _MeteredBody(encoder, deadline, self._bandwidth)

            def streamed() -> dict[str, str]:
                # Only a body sent whole can have been stored.
                if body.bytes_read < len(body):
                    return {}
                return {ref: handle.hexdigest() for ref, handle in hashed.items()}

            try:
                answer = self._request(
                    "POST",
                    route,
                    deadline=deadline,
                    data=body,
                    headers={"Content-Type": encoder.content_type},
                )
            except UploadError as exc:
                exc.streamed_sha256 = streamed()
                raise
            return answer, body.bytes_read, streamed()

    def _post_remote(self, route: str, items: Sequence[UploadItem]) -> tuple[_Answer, int]:
        update_flags = {item.update for item in items}
        if len(update_flags) != 1:
            raise ValueError("remote-URL items in one append must agree on update; group them")
        payload = [
            {
                "reference_id": item.reference_id,
                "metadata": dict(item.metadata),
                "image_url": item.remote_url,
            }
            for item in items
        ]
        body = json.dumps(
            {"items": payload, "update": update_flags.pop()}, allow_nan=False
        ).encode()
        deadline = _RequestDeadline(self._timeout_seconds)
        if self._bandwidth is not None:
            self._bandwidth.take(len(body))
        answer = self._request(
            "POST",
            route,
            deadline=deadline,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        return answer, len(body)

    # -- one HTTP exchange -----------------------------------------------------------------

    def _request(
        self,
        method: str,
        route: str,
        *,
        deadline: _RequestDeadline | None = None,
        **kwargs: Any,
    ) -> _Answer:
        """Send one request and read the whole answer within the deadline; raise on non-2xx."""
        # Two steps, so that an error raised for the status carries no frame that still holds
        # the response (and through it the pooled connection).
        answer = self._exchange(method, route, deadline=deadline, **kwargs)
        self._raise_for_status(answer)
        return answer

    def _exchange(
        self,
        method: str,
        route: str,
        *,
        deadline: _RequestDeadline | None = None,
        **kwargs: Any,
    ) -> _Answer:
        if self._closed:
            raise RuntimeError("NucleusClient used after close()")
        if deadline is None:
            deadline = _RequestDeadline(self._timeout_seconds)
        url = f"{self._base_url}/{route}"
        self._reaper.watch(deadline)
        _current.deadline = deadline
        try:
            response = self._session.request(
                method,
                url,
                # No read timeout: a wait for the answer while the link still drains the body
                # is progress, which only the deadline's reviews can tell.
                timeout=(min(self._timeout_seconds, _CONNECT_TIMEOUT_CAP_SECONDS), None),
                stream=True,
                allow_redirects=False,
                verify=self._verify,
                **kwargs,
            )
            try:
                ok = 200 <= response.status_code < 300
                limit = _MAX_ANSWER_BYTES if ok else _MAX_ERROR_ANSWER_BYTES
                body = _read_answer(response, deadline, limit, ok)
                answer = _Answer(response.status_code, response.headers, body)
            finally:
                response.close()
        except _DeadlineExceeded:
            raise self._timed_out() from None
        except _BodyChanged:
            raise RetryableUploadError("a file changed size while it was being sent") from None
        except (requests.RequestException, Urllib3HTTPError, OSError) as exc:
            if deadline.expired:
                raise self._timed_out() from exc
            reason, timed_out = _network_failure(exc)
            error = TimeoutUploadError if timed_out else RetryableUploadError
            raise error(f"network error talking to {self._host_label}: {reason}") from exc
        finally:
            _current.deadline = None
            self._reaper.forget(deadline)
        return answer

    def _timed_out(self) -> TimeoutUploadError:
        return TimeoutUploadError(f"timed out after {self._timeout_seconds:g} s without progress")

    def _raise_for_status(self, answer: _Answer) -> None:
        status = answer.status_code
        if 200 <= status < 300:
            return
        text = self._scrub(_server_error_text(answer.body))
        if status == 401:
            raise UnauthorizedError(
                f"the server refused the API key (HTTP 401): {text}", status_code=status
            )
        if status in (408, 429) or status >= 500:
            raise RetryableUploadError(
                f"HTTP {status} from server: {text}",
                status_code=status,
                retry_after_seconds=_retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if 300 <= status < 400:
            # Probably a wrong endpoint; retrying keeps the items until someone fixes it.
            raise RetryableUploadError(
                f"HTTP {status}: the server redirects; check nucleus.endpoint", status_code=status
            )
        if status < 200:
            raise RetryableUploadError(f"bad answer from server: HTTP {status}")
        raise PermanentUploadError(f"HTTP {status}: {text}", status_code=status)

    # -- answers ---------------------------------------------------------------------------

    def _json(self, answer: _Answer) -> Any:
        try:
            return json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            preview = self._scrub(" ".join(answer.body[:120].decode("utf-8", "replace").split()))
            raise RetryableUploadError(
                f"bad answer from server: not JSON ({preview or 'empty'})"
            ) from None

    def _json_object(self, answer: _Answer) -> dict[str, Any]:
        data = self._json(answer)
        if not isinstance(data, dict):
            raise RetryableUploadError("bad answer from server: expected a JSON object")
        return data

    def _async_result(self, data: Mapping[str, Any], bytes_sent: int) -> AppendResult:
        job_id = data.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableUploadError("bad answer from server: asynchronous append without job_id")
        return AppendResult(0, 0, 0, job_id, {}, bytes_sent)

    def _sync_result(
        self, data: Mapping[str, Any], reference_ids: Sequence[str], bytes_sent: int
    ) -> AppendResult:
        counts = {}
        for key in ("new_items", "updated_items", "ignored_items"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RetryableUploadError(f"bad answer from server: no count '{key}'")
            counts[key] = value
        upload_errors = data.get("upload_errors", 0)
        if not isinstance(upload_errors, int) or isinstance(upload_errors, bool):
            upload_errors = 0
        entries: list[Any] = []
        for key in ("error_items", "error_payload"):
            value = data.get(key)
            if isinstance(value, list):
                entries.extend(value)
            elif isinstance(value, dict):
                entries.extend({"reference_id": k, "error": v} for k, v in value.items())
        errors = self._attribute_errors(entries, reference_ids) if entries else {}
        general = errors.get("")
        attributed = len(errors) - (1 if general is not None else 0)
        if upload_errors > attributed:
            # The server refused items without saying which: the uploader splits a
            # multi-item batch on a permanent error and so finds them one by one.
            detail = f": {general}" if general else ""
            raise PermanentUploadError(
                f"server could not ingest {upload_errors} of {len(reference_ids)} items{detail}"
            )
        return AppendResult(
            counts["new_items"],
            counts["updated_items"],
            counts["ignored_items"],
            None,
            errors,
            bytes_sent,
            upload_errors,
        )

    def _attribute_errors(
        self, entries: Sequence[Any], reference_ids: Sequence[str]
    ) -> dict[str, str]:
        attributor = _ErrorAttributor(reference_ids)
        collected: dict[str, list[str]] = {}
        for entry in entries:
            for reference_id, text in attributor.attribute(entry):
                collected.setdefault(reference_id, []).append(self._scrub(text))
        return {
            reference_id: _truncate("; ".join(texts), _ITEM_ERROR_MAX_CHARS)
            for reference_id, texts in collected.items()
        }

    def _scrub(self, text: str) -> str:
        """Remove the API key from server-provided text (a server may echo what it got)."""
        return text.replace(self._api_key, "[redacted]") if self._api_key in text else text


# -- helpers that need no client state -----------------------------------------------------


def _checked_endpoint(endpoint: str) -> tuple[str, str]:
    """(base URL, host label for messages), by the same rule the config applies."""
    try:
        parsed = parse_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"nucleus.endpoint: {exc}") from None
    return parsed.url, parsed.host


def _combined_ca_bundle(extra_ca_path: str) -> str:
    """Write the default CAs plus the extra file to a temp file that `verify=` can point at."""
    try:
        extra = Path(extra_ca_path).read_bytes()
    except OSError as exc:
        raise ConfigError(
            f"nucleus.ca_bundle: cannot read {extra_ca_path}: {exc.strerror}"
        ) from None
    if b"-----BEGIN CERTIFICATE-----" not in extra:
        raise ConfigError(f"nucleus.ca_bundle: {extra_ca_path} holds no PEM certificate")
    try:
        ssl.create_default_context(cafile=extra_ca_path)
    except ssl.SSLError as exc:
        raise ConfigError(f"nucleus.ca_bundle: {extra_ca_path} is not usable: {exc}") from None
    combined = Path(_default_ca_file()).read_bytes() + b"\n" + extra + b"\n"
    with tempfile.NamedTemporaryFile(
        prefix="nucleus-watcher-ca-", suffix=".pem", delete=False
    ) as out:
        out.write(combined)
    return out.name


def _default_ca_file() -> str:
    """The bundle requests would verify with: its environment override, else certifi's."""
    for variable in ("REQUESTS_CA_BUNDLE", "CURL_CA_BUNDLE"):
        candidate = os.environ.get(variable)
        if candidate and os.path.isfile(candidate):
            return candidate
    return certifi.where()


def _path_segment(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    return quote(value, safe="")


def _image_content_type(path: Path) -> str:
    content_type = _IMAGE_CONTENT_TYPES.get(path.suffix.lower())
    if content_type is None:
        raise LocalFileError(path, f"unsupported image type {path.suffix or '(no extension)'!r}")
    return content_type


class _HashingFile:
    """A file part as the multipart encoder reads it, hashed on the way out: the hash of
    exactly the bytes sent, even if the file is rewritten while it streams."""

    def __init__(self, handle: IO[bytes]) -> None:
        self._handle = handle
        self._digest = hashlib.sha256()

    def read(self, size: int = -1) -> bytes:
        data = self._handle.read(size)
        self._digest.update(data)
        return data

    # The encoder sizes the part with fstat and tell, as it would the file itself.
    def fileno(self) -> int:
        return self._handle.fileno()

    def tell(self) -> int:
        return self._handle.tell()

    def hexdigest(self) -> str:
        return self._digest.hexdigest()


def _open_image(path: Path) -> IO[bytes]:
    try:
        return open_regular_file(path)
    except NotARegularFile as exc:
        raise LocalFileError(path, exc.strerror or "not a regular file") from None
    except OSError as exc:
        raise LocalFileError(path, f"cannot open: {exc.strerror or type(exc).__name__}") from None


def _multipart_filename(index: int, path: Path) -> str:
    """`{index}-{basename}` with anything but plain ASCII name characters replaced by `_`."""
    cleaned = "".join(ch if ch in _FILENAME_SAFE_CHARS else "_" for ch in path.name)
    if len(cleaned) > _FILENAME_MAX_CHARS:
        suffix = "".join(ch if ch in _FILENAME_SAFE_CHARS else "_" for ch in path.suffix)[:16]
        cleaned = cleaned[: _FILENAME_MAX_CHARS - len(suffix)] + suffix
    return f"{index}-{cleaned or 'image'}"


def _dumps_items(payload: list[dict[str, Any]], items: Sequence[UploadItem]) -> str:
    try:
        return json.dumps(payload, allow_nan=False)
    except (TypeError, ValueError) as exc:
        for entry, item in zip(payload, items, strict=True):
            try:
                json.dumps(entry, allow_nan=False)
            except (TypeError, ValueError):
                raise PermanentUploadError(
                    f"metadata of {item.reference_id!r} is not valid JSON: {exc}"
                ) from None
        raise PermanentUploadError(f"items are not valid JSON: {exc}") from None


def _read_answer(
    response: requests.Response, deadline: _RequestDeadline, limit_bytes: int, ok: bool
) -> bytes:
    chunks: list[bytes] = []
    total = 0
    for chunk in response.iter_content(_ANSWER_CHUNK_BYTES):
        deadline.check()
        if len(chunk) == _ANSWER_CHUNK_BYTES:
            # Only whole chunks count: a dripped answer must not keep a request alive.
            deadline.progressed()
        chunks.append(chunk)
        total += len(chunk)
        if total >= limit_bytes:
            if ok:
                raise RetryableUploadError(
                    f"bad answer from server: larger than {limit_bytes} bytes"
                )
            break  # enough of an error answer to show its start
    return b"".join(chunks)


def _server_error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "errors"):
            if key in data:
                value = data[key]
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                break
    return _truncate(" ".join(text.split()), _ERROR_TEXT_MAX_CHARS) or "(empty answer)"


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _network_failure(exc: BaseException) -> tuple[str, bool]:
    """A short reason from the chain of a network exception, without URLs or headers, and
    whether a timeout is what failed."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    os_reason: str | None = None
    timed_out = False
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({current.verify_message})", False
        if isinstance(current, http.client.RemoteDisconnected):
            return "the server closed the connection without answering", False
        if isinstance(current, TimeoutError | requests.Timeout):
            timed_out = True
        if isinstance(current, OSError) and current.strerror:
            os_reason = current.strerror  # the deepest one wins: it is the most specific
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked.extend(arg for arg in current.args if isinstance(arg, BaseException))
        pending.extend(e for e in linked if isinstance(e, BaseException))
    if os_reason:
        return os_reason, timed_out
    if timed_out:
        return "timed out", True
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the answer was cut off", False
    return type(exc).__name__, False


class _ErrorAttributor:
    """Finds which of a request's reference_ids an error entry is about."""

    _REFERENCE_KEYS = ("reference_id", "referenceId", "ref_id", "item_id")
    _TEXT_KEYS = ("error", "message", "reason", "detail")

    def __init__(self, reference_ids: Sequence[str]) -> None:
        self._known = set(reference_ids)
        # Longest first, so "a/10" is tried before "a/1".
        self._by_length = sorted(self._known, key=len, reverse=True)

    def attribute(self, entry: Any) -> list[tuple[str, str]]:
        if isinstance(entry, str):
            parsed = _parse_error_json(entry)
            if isinstance(parsed, dict):
                return self._from_mapping(parsed, entry)
            return self._from_text(entry)
        if isinstance(entry, dict):
            return self._from_mapping(entry, json.dumps(entry, default=str))
        text = json.dumps(entry, default=str)
        return self._from_text(text)

    def _from_mapping(self, entry: Mapping[str, Any], raw: str) -> list[tuple[str, str]]:
        text = self._text_of(entry) or raw
        named = self._named_reference(entry)
        if named is not None and named in self._known:
            return [(named, _truncate(text, _ERROR_TEXT_MAX_CHARS))]
        return self._from_text(raw, shown=text)

    def _named_reference(self, entry: Mapping[str, Any]) -> str | None:
        for holder in (entry, entry.get("item"), entry.get("dataset_item")):
            if isinstance(holder, Mapping):
                for key in self._REFERENCE_KEYS:
                    value = holder.get(key)
                    if isinstance(value, str):
                        return value
        return None

    def _text_of(self, entry: Mapping[str, Any]) -> str | None:
        for key in self._TEXT_KEYS:
            value = entry.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return json.dumps(value, default=str)
        return None

    def _from_text(self, raw: str, shown: str | None = None) -> list[tuple[str, str]]:
        text = _truncate(" ".join((shown or raw).split()), _ERROR_TEXT_MAX_CHARS)
        found: list[str] = []
        for reference_id in self._by_length:
            if _names(raw, reference_id) and not any(reference_id in f for f in found):
                found.append(reference_id)
        if not found:
            return [("", text)]
        return [(reference_id, text) for reference_id in found]


def _parse_error_json(text: str) -> Any:
    # The service double-escapes some strings (the official client undoes \\n, \\t, \\").
    for candidate in (text, text.replace('\\\\"', '"').replace("\\\\n", "\n")):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _names(text: str, reference_id: str) -> bool:
    """Whether `text` mentions `reference_id` as a whole token, not as part of a longer id."""
    start = text.find(reference_id)
    while start != -1:
        end = start + len(reference_id)
        before = text[start - 1] if start > 0 else ""
        after = text[end] if end < len(text) else ""
        after_next = text[end + 1] if end + 1 < len(text) else ""
        glued_before = before.isalnum() or before in "_-./"
        glued_after = after.isalnum() or after in "_-/" or (after == "." and after_next.isalnum())
        if not glued_before and not glued_after:
            return True
        start = text.find(reference_id, start + 1)
    return False
