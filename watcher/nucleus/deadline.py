"""The idle deadline: a request lives as long as bytes move and ends once none have for
`timeout_seconds`, as rclone's `--timeout` does.

Each request gets a `RequestDeadline`; the body and the answer reader report progress, and one
`DeadlineReaper` thread per client reviews every request now and then and shuts down the socket
of one that made none. Shutting the socket is the only way to unblock a thread stuck in a send
or a read, which is why the deadline knows its request's connections (`transport` attaches them).
"""

from __future__ import annotations

import heapq
import itertools
import socket
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from typing import Final

from urllib3.connection import HTTPConnection

from watcher.errors import DeadlineExceeded

# The reaper reviews a request's progress this many times per timeout: a stalled request ends
# at most timeout/8 late, and a long upload costs the reaper a wake-up every timeout/8.
_REVIEWS_PER_TIMEOUT: Final = 8
# struct tcp_info up to and including tcpi_bytes_acked (Linux 4.1+); read a little more.
_TCP_INFO_BYTES_ACKED_END: Final = 128
_TCP_INFO_READ_BYTES: Final = 256


class RequestDeadline:
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
            raise DeadlineExceeded

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


class DeadlineReaper:
    """One thread for all requests of a client: reviews each request's progress now and
    then, and ends the ones that have made none for their timeout."""

    # Finished deadlines stay in the heap until they surface; rebuild it when they dominate.
    _COMPACT_AFTER_FINISHED = 1024

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, RequestDeadline]] = []
        self._sequence = itertools.count()
        self._finished_in_heap = 0
        self._stopping = False
        self._thread: threading.Thread | None = None

    def watch(self, deadline: RequestDeadline) -> None:
        with self._condition:
            if self._thread is None and not self._stopping:
                self._thread = threading.Thread(
                    target=self._run, name="nucleus-deadline-reaper", daemon=True
                )
                self._thread.start()
            self._push(time.monotonic() + deadline.review_interval_seconds, deadline)
            self._condition.notify()

    def forget(self, deadline: RequestDeadline) -> None:
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

    def _push(self, at: float, deadline: RequestDeadline) -> None:
        heapq.heappush(self._heap, (at, next(self._sequence), deadline))

    def _run(self) -> None:
        while True:
            with self._condition:
                if self._stopping:
                    return
                due = self._take_due(time.monotonic())
            # Reviews read socket options: outside the lock, so watch() and forget() never wait.
            for deadline in due:
                next_review_at = deadline.review(time.monotonic())
                if next_review_at is None:
                    deadline.expire()
                    continue
                with self._condition:
                    if not deadline.finished:
                        self._push(next_review_at, deadline)

    def _take_due(self, now: float) -> list[RequestDeadline]:
        """Pop the deadlines due for review (the lock held); wait for the next if none is."""
        due: list[RequestDeadline] = []
        while self._heap and (self._heap[0][2].finished or self._heap[0][0] <= now):
            _, _, deadline = heapq.heappop(self._heap)
            if deadline.finished:
                self._finished_in_heap = max(0, self._finished_in_heap - 1)
            else:
                due.append(deadline)
        if not due:
            self._condition.wait(self._heap[0][0] - now if self._heap else None)
        return due
