"""What the uploader reports as it goes, to whoever listens: metrics, after_upload, progress."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

import structlog

from watcher.store import FileRecord

# A failing consumer is reported as `watcher.disk`, the logger name operators' filters know.
log = structlog.get_logger("watcher.disk")


class UploadEvents(Protocol):
    """What the uploader reports as it goes; the daemon hangs metrics and after_upload here.

    Any object with these methods will do. A class that names `UploadEvents` as its base
    inherits a do-nothing body for each, so it writes only the events it cares about (the
    bodies say `return None` for that reason: an empty one would make the method abstract).
    """

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        """The server confirmed these items (sync 2xx or job Completed)."""
        return None

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        """These items will not be retried until they change or `retry` is run."""
        return None

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        """A transient failure of `kind` (see `retry_kind`); every worker waits `delay_seconds`."""
        return None

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        """One append request finished (for latency and throughput)."""
        return None

    def job_finished(self, status: str) -> None:
        """An asynchronous job reached a final state."""
        return None


class FanOutEvents(UploadEvents):
    """Hands every upload event to several consumers (metrics, after_upload, progress).

    One consumer's bug must not keep the others from hearing about a confirmed upload, nor
    reach the uploader, which would count it as a failed request.
    """

    def __init__(self, consumers: Sequence[UploadEvents]) -> None:
        self._consumers = tuple(consumers)

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        self._forward("confirmed", lambda consumer: consumer.confirmed(records))

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        self._forward("parked", lambda consumer: consumer.parked(records, reason))

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        self._forward(
            "retrying", lambda consumer: consumer.retrying(records, kind, reason, delay_seconds)
        )

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        self._forward(
            "request_done", lambda consumer: consumer.request_done(seconds, bytes_sent, ok)
        )

    def job_finished(self, status: str) -> None:
        self._forward("job_finished", lambda consumer: consumer.job_finished(status))

    def _forward(self, event: str, call: Callable[[UploadEvents], None]) -> None:
        for consumer in self._consumers:
            try:
                call(consumer)
            except Exception:
                log.exception(
                    "upload_event_consumer_failed",
                    upload_event=event,
                    consumer=type(consumer).__name__,
                )
