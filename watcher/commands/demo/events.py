"""What happens during the demo, as events on one queue: the sample writer and the devserver's
request callback put them there, the reporter takes them off in the main thread."""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass

from watcher.commands.demo.config_text import DEMO_DATASET_ID
from watcher.devserver import DevServer, RequestRecord, StoredItem


@dataclass(frozen=True)
class Note:
    """A line to print as it is."""

    text: str


@dataclass(frozen=True)
class Closed:
    """The writer closed a sample file: it is complete on disk."""

    relpath: str
    at: float  # time.monotonic()
    pieces: int


@dataclass(frozen=True)
class WritesDone:
    """The writer has nothing more to write (or stopped on an error)."""

    at: float


@dataclass(frozen=True)
class Stored:
    """The devserver stored (or updated) an item."""

    item: StoredItem
    at: float


Event = Note | Closed | WritesDone | Stored


class Arrivals:
    """The devserver's on_request callback: turns each accepted append into Stored events.

    A request record is made after the items are stored, so diffing the dataset then finds
    exactly what the request brought (and an update, by its write count)."""

    def __init__(self, events: queue.Queue[Event]) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._server: DevServer | None = None

    def attach(self, server: DevServer) -> None:
        self._server = server

    def __call__(self, record: RequestRecord) -> None:
        if record.method != "POST" or not 200 <= record.status < 300 or self._server is None:
            return
        at = time.monotonic()
        with self._lock:
            for reference_id, item in sorted(self._server.items(DEMO_DATASET_ID).items()):
                if self._seen.get(reference_id) != item.times_written:
                    self._seen[reference_id] = item.times_written
                    self._events.put(Stored(item, at))
