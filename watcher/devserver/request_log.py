"""Every request as the devserver saw it, kept for inspection and passed to `on_request`."""

from __future__ import annotations

import collections
import threading
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class RequestRecord:
    """One request as the devserver saw it. `status` is 0 when no answer was sent."""

    method: str
    path: str
    query: str
    status: int
    item_count: int
    fault: str | None


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
