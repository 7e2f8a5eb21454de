"""How big an upload request should be and how many may be in flight, from the rate the uplink
has been achieving.

On a fast link the answer is what it always was: `max_files_per_request` files per request and
`concurrency` requests at once. On a thin link a request of ten camera frames takes minutes and
four of them only split the link four ways, so each takes four times as long. There a request
is sized to take about `target_seconds` at the measured rate (always at least one file: a file
is never split) and two are in flight, one sending while the other is being answered. Until
the first request is measured, requests are sized for the thinnest link we promise to drain.

The rate is measured over the last few successful requests: the bytes they sent divided by the
time at least one of them was under way, so idle gaps between trickling files do not count
and requests in flight together are not counted twice. Failed requests are left out; a stall
says nothing about the link.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

# Until a request has been measured, assume the thinnest link we promise to drain.
START_RATE_BYTES_PER_SECOND = 64_000
# On a thin link: one request sending while the next is being answered, so the link never
# idles between requests, and no further split of it.
THIN_LINK_IN_FLIGHT = 2
_SAMPLES = 8


@dataclass(frozen=True)
class RequestShape:
    """What the next request may be."""

    max_in_flight: int
    max_bytes: int | None  # None: only the file count limits a request


class LinkRate:
    """Thread-safe; the upload workers ask it before each claim and tell it after each send."""

    def __init__(
        self, *, concurrency: int, max_files_per_request: int, target_seconds: float
    ) -> None:
        if concurrency < 1 or max_files_per_request < 1 or not target_seconds > 0:
            raise ValueError("concurrency, max_files_per_request and target_seconds must be > 0")
        self._concurrency = concurrency
        self._max_files = max_files_per_request
        self._target_seconds = target_seconds
        self._lock = threading.Lock()
        self._samples: deque[tuple[float, float, int, int]] = deque(maxlen=_SAMPLES)
        self._rate_bytes_per_second: float | None = None
        self._bytes_per_file = 0.0

    @property
    def rate_bytes_per_second(self) -> float | None:
        """The measured rate; None before the first successful request."""
        return self._rate_bytes_per_second

    def shape(self) -> RequestShape:
        with self._lock:
            rate = self._rate_bytes_per_second
            if rate is None:
                # Modest first requests find out what the link does. Not fewer of them: uploads
                # of remote URLs alone are never measured and must not be held back.
                first_bytes = round(START_RATE_BYTES_PER_SECOND * self._target_seconds)
                return RequestShape(self._concurrency, first_bytes)
            budget_bytes = rate * self._target_seconds
            every_worker_full_bytes = self._concurrency * self._max_files * self._bytes_per_file
            if every_worker_full_bytes <= budget_bytes:
                return RequestShape(self._concurrency, None)  # a fast link: as ever
            in_flight = min(self._concurrency, THIN_LINK_IN_FLIGHT)
            return RequestShape(in_flight, max(1, round(budget_bytes / in_flight)))

    def record(self, started_at: float, finished_at: float, bytes_sent: int, files: int) -> None:
        """A request of `files` files that sent `bytes_sent` succeeded (monotonic times)."""
        if files < 1 or bytes_sent < 1 or finished_at < started_at:
            return
        with self._lock:
            self._samples.append((started_at, finished_at, bytes_sent, files))
            total_bytes = sum(sample[2] for sample in self._samples)
            total_files = sum(sample[3] for sample in self._samples)
            busy = _busy_seconds((sample[0], sample[1]) for sample in self._samples)
            # A request that took no measurable time is one that a fast link finished at once.
            self._rate_bytes_per_second = total_bytes / max(busy, 1e-3)
            self._bytes_per_file = total_bytes / total_files


def _busy_seconds(intervals: Iterable[tuple[float, float]]) -> float:
    """The length of the union of the intervals."""
    total = 0.0
    current: tuple[float, float] | None = None
    for start, end in sorted(intervals):
        if current is None or start > current[1]:
            if current is not None:
                total += current[1] - current[0]
            current = (start, end)
        else:
            current = (current[0], max(current[1], end))
    if current is not None:
        total += current[1] - current[0]
    return total
