"""What the uploader reports as it goes, to whoever listens: metrics, after_upload, progress."""

from __future__ import annotations

from collections.abc import Sequence

from watcher.store import FileRecord


class UploadEvents:
    """What the uploader reports as it goes; the daemon hangs metrics and after_upload here."""

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        """The server confirmed these items (sync 2xx or job Completed)."""

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        """These items will not be retried until they change or `retry` is run."""

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        """A transient failure of `kind` (see `retry_kind`); every worker waits `delay_seconds`."""

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        """One append request finished (for latency and throughput)."""

    def job_finished(self, status: str) -> None:
        """An asynchronous job reached a final state."""
