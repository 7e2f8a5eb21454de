"""The bytes on the wire: urllib3 connections that report to the request's deadline, a pooled
adapter that sends in big blocks, the paced request body and the bounded answer reader.

Threads: one `requests.Session` with one `StreamingAdapter` is shared by every upload worker.
urllib3's pool hands each in-flight request its own connection (a thread-safe queue), so the
workers share warm keep-alive connections instead of each holding a private pool, and closing
the adapter has one pool to shut.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, Final

import requests
from requests.adapters import HTTPAdapter
from requests_toolbelt.multipart.encoder import MultipartEncoder
from urllib3 import ProxyManager
from urllib3.connection import HTTPConnection, HTTPSConnection
from urllib3.connectionpool import HTTPConnectionPool, HTTPSConnectionPool

from watcher.errors import BodyChanged, RetryableUploadError
from watcher.nucleus.bandwidth import TokenBucket
from watcher.nucleus.deadline import RequestDeadline

# http.client writes a file body in 8 KiB blocks (urllib3: 16 KiB); a syscall per 8 KiB caps a
# single upload well below what a LAN or a fast uplink can carry.
SEND_BLOCK_BYTES: Final = 256 * 1024
# Answers are small JSON; job error lists hold at most 10,000 strings. Anything larger is wrong.
_MAX_ANSWER_BYTES: Final = 32 * 1024 * 1024
# Of an error answer only the start is shown, so there is no point reading a huge one.
_MAX_ERROR_ANSWER_BYTES: Final = 64 * 1024
_ANSWER_CHUNK_BYTES: Final = 64 * 1024


# The deadline of the request the current thread is making; the connection classes below
# read it because urllib3 gives no other way to reach the socket a request ends up on.
_current = threading.local()


@contextmanager
def deadline_on_this_thread(deadline: RequestDeadline) -> Iterator[None]:
    """Make `deadline` the one this thread's connections report to while the block runs."""
    _current.deadline = deadline
    try:
        yield
    finally:
        _current.deadline = None


def _attach_current_deadline(connection: HTTPConnection) -> None:
    deadline: RequestDeadline | None = getattr(_current, "deadline", None)
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
        deadline: RequestDeadline | None = getattr(_current, "deadline", None)
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


class StreamingAdapter(HTTPAdapter):
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


class MeteredBody:
    """File-like view of a multipart encoder that paces, counts and polices outgoing bytes."""

    def __init__(
        self, encoder: MultipartEncoder, deadline: RequestDeadline, bucket: TokenBucket | None
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
                raise BodyChanged
            return b""
        if self.bytes_read + len(chunk) > self._length:
            raise BodyChanged
        if self._bucket is not None:
            with self._deadline.paused():
                self._bucket.take(len(chunk))
            self._deadline.check()  # the request may have been ended meanwhile
        self.bytes_read += len(chunk)
        return chunk


def read_answer(response: requests.Response, deadline: RequestDeadline) -> bytes:
    """The answer's body, read within the deadline: whole if 2xx (refused if absurdly large),
    else only as much of an error answer as is worth showing."""
    ok = 200 <= response.status_code < 300
    limit_bytes = _MAX_ANSWER_BYTES if ok else _MAX_ERROR_ANSWER_BYTES
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
