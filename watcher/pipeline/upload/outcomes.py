"""What became of a request, recorded: store rows, one log line per file, and upload events.

Failures split three ways (see errors.py): transient ones hold every worker back for a jittered,
growing delay and the items stay due, so the backlog drains at full speed once a request goes
through; permanent ones park the item with the reason; 401 pauses everything until `resume()`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import structlog

from watcher.errors import LocalFileError, RetryableUploadError, TimeoutUploadError
from watcher.nucleus import AppendResult
from watcher.pipeline.upload.events import UploadEvents
from watcher.pipeline.upload.gate import UploadGate
from watcher.pipeline.upload.policy import UploadPolicy, backoff_delay
from watcher.store import FileRecord, StateStore

log = structlog.get_logger("watcher.uploader")


def retry_kind(exc: RetryableUploadError) -> str:
    """A short label for why a request is retried (metrics, logs): few values, never a path."""
    code = exc.status_code
    if code is None:
        return "timeout" if isinstance(exc, TimeoutUploadError) else "connection"
    if code == 429:
        return "http_429"
    if code >= 500:
        return "http_5xx"
    return f"http_{code}"


class UploadOutcomes:
    """Called by the workers and the job follower once the server (or the link) has answered."""

    def __init__(
        self,
        store: StateStore,
        events: UploadEvents,
        policy: UploadPolicy,
        gate: UploadGate,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._events = events
        self._policy = policy
        self._gate = gate
        self._clock = clock

    def answered(self, batch: list[FileRecord], result: AppendResult) -> None:
        """The append request succeeded: a job to follow, or items confirmed, refused or kept."""
        self.note_streamed(batch, result.streamed_sha256)
        if result.job_id is not None:
            self._store.mark_job_submitted([r.id for r in batch], result.job_id)
            log.info(
                "job_submitted",
                job_id=result.job_id,
                dataset_id=batch[0].dataset_id,
                items=len(batch),
            )
            self._gate.wake()
            return
        rejected = [r for r in batch if r.reference_id in result.item_errors]
        for record in rejected:
            self.park(
                [record], f"server refused the item: {result.item_errors[record.reference_id]}"
            )
        accepted = [r for r in batch if r.reference_id not in result.item_errors]
        if result.ignored_items:
            accepted = self._server_had_some(batch, accepted, result.ignored_items)
        self.confirm(accepted)

    def _server_had_some(
        self, batch: list[FileRecord], accepted: list[FileRecord], ignored_items: int
    ) -> list[FileRecord]:
        """The server kept `ignored_items` of its own; returns the items it holds as sent."""
        not_updates = [r for r in accepted if not r.update_flag]
        if not_updates and self._policy.on_conflict == "update":
            # The server had some of these reference_ids from before our record began; which
            # ones is not in the answer, so every item sent without update goes again with it.
            self._store.mark_retry(
                [r.id for r in not_updates],
                "server already had the reference_id; re-sending with update=true (on_conflict)",
                self._clock(),
                force_update=True,
            )
            self._gate.wake()
            return [r for r in accepted if r.update_flag]
        log.info(
            "server_kept_existing",
            dataset_id=batch[0].dataset_id,
            ignored_items=ignored_items,
            on_conflict=self._policy.on_conflict,
        )
        return accepted

    def note_streamed(self, batch: Sequence[FileRecord], streamed: Mapping[str, str]) -> None:
        """A file rewritten while it streamed sent other bytes than it was claimed with."""
        for record in batch:
            digest = streamed.get(record.reference_id)
            if digest is not None and digest != record.content_sha256:
                log.warning(
                    "file_changed_while_sent",
                    path=record.shown_path,
                    reference_id=record.reference_id,
                    dataset_id=record.dataset_id,
                )
                self._store.note_streamed_bytes(record.id, digest)

    def confirm(self, records: Sequence[FileRecord]) -> None:
        if not records:
            return
        if self._store.mark_confirmed([r.id for r in records], now=self._clock()):
            self._gate.wake()  # a change that came while the request was out goes next
        for record in records:
            log.info(
                "upload_confirmed",
                path=record.shown_path,
                reference_id=record.reference_id,
                dataset_id=record.dataset_id,
                update=record.update_flag,
            )
        self._events.confirmed(records)

    def job_finished(self, status: str) -> None:
        self._events.job_finished(status)

    def park(self, records: Sequence[FileRecord], reason: str) -> None:
        self._store.mark_failed([r.id for r in records], reason, now=self._clock())
        for record in records:
            log.error(
                "upload_parked",
                path=record.shown_path,
                reference_id=record.reference_id,
                dataset_id=record.dataset_id,
                reason=reason,
            )
        self._events.parked(records, reason)

    def back_off(self, batch: Sequence[FileRecord], exc: RetryableUploadError) -> None:
        """A transient failure: every worker holds back; the items stay due, so once the hold
        lifts the backlog goes at full speed."""
        failures = self._gate.count_failure()
        delay = backoff_delay(self._policy, failures, exc.retry_after_seconds)
        self._gate.hold_for(delay)
        self._store.mark_retry([r.id for r in batch], exc.reason, self._clock())
        kind = retry_kind(exc)
        log.warning(
            "upload_retry",
            dataset_id=batch[0].dataset_id,
            items=len(batch),
            kind=kind,
            reason=exc.reason,
            delay_seconds=round(delay, 3),
        )
        self._events.retrying(batch, kind, exc.reason, delay)

    def unauthorized(self, batch: Sequence[FileRecord], reason: str) -> None:
        """A 401: every upload pauses until the key changes."""
        first = self._gate.pause(reason)
        self._store.mark_retry([r.id for r in batch], reason, self._clock())
        if first:
            log.error(
                "nucleus_unauthorized",
                reason=reason,
                hint="uploads paused: fix the API key (the key file is watched) or send SIGHUP",
            )

    def local_file_failed(self, batch: Sequence[FileRecord], exc: LocalFileError) -> None:
        """One file of the request could not be opened: park it, send the rest again."""
        bad = [r for r in batch if r.path == exc.path]
        rest = [r for r in batch if r.path != exc.path]
        if bad:
            self.park(bad, exc.reason)
            if not exc.path.exists():
                for record in bad:
                    self._store.mark_gone(record.watch, record.relpath, now=self._clock())
        if rest:
            self._store.mark_retry([r.id for r in rest], "sent again without a vanished file", 0)
            self._gate.wake()
