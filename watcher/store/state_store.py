"""`StateStore`: the one object the rest of the watcher holds for the state database.

Files on disk are the source of truth; this is the record of what Nucleus confirmed, so losing it
costs re-sends, never data. One connection owns the database (WAL, synchronous=FULL) and every
thread goes through it under a lock: SQLite before 3.51.3 can corrupt a WAL database when two
connections write or checkpoint at once. Readers in other processes (`status`) open it read-only.

The class is thin on purpose: it owns the connection, the lock and the write transaction, and
hands the connection to the module that owns each question (`intake`, `queue`, `records`,
`reports`). Every write runs through `DiskFullWait`, so a full disk stalls it instead of failing.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import structlog

from watcher.store import intake, queue, records, reports
from watcher.store.diskfull import DiskFullWait
from watcher.store.opening import OPEN_RETRY_SECONDS, open_for_writing, open_read_only
from watcher.store.records import Candidate, FileRecord, KnownFile
from watcher.store.sql import write_transaction
from watcher.store.states import FileState

log = structlog.get_logger("watcher.store")

_R = TypeVar("_R")


def _now(now: float | None) -> float:
    return time.time() if now is None else now


class StateStore:
    """The only writer of the state database. Thread-safe: every call holds the store's lock."""

    def __init__(
        self, connection: sqlite3.Connection, path: Path, *, owner_lock: int | None = None
    ) -> None:
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self.path = path
        self._lock = threading.RLock()
        self._owner_lock = owner_lock
        self._disk_full = DiskFullWait(path)

    # -- opening and closing ---------------------------------------------------------------

    @classmethod
    def open(cls, path: Path, *, retry_seconds: float = OPEN_RETRY_SECONDS) -> StateStore:
        """Open (or create) the database for writing; move a damaged one aside and start anew.

        Only damage moves it aside. A lock held by another program, a full disk or an I/O error
        is waited out for up to `retry_seconds` (one `state_open_retry` log line), then raises
        StoreError: moving a healthy record aside would re-send everything.

        One process at a time: an advisory lock beside the database keeps a second daemon or a
        `scan` from becoming a second writer (see the module docstring for why that matters).
        """
        db, owner_lock = open_for_writing(path, retry_seconds)
        return cls(db, path, owner_lock=owner_lock)

    @classmethod
    def open_read_only(cls, path: Path) -> StateStore:
        """For `status` and `explain` while the daemon runs: never writes, never checkpoints."""
        return cls(open_read_only(path), path)

    def close(self) -> None:
        self._disk_full.close()
        with self._lock:
            self._db.close()
            if self._owner_lock is not None:
                os.close(self._owner_lock)  # closing the descriptor releases the flock
                self._owner_lock = None

    def _read(self, query: Callable[[sqlite3.Connection], _R]) -> _R:
        with self._lock:
            return query(self._db)

    def _write(self, change: Callable[[sqlite3.Connection], _R]) -> _R:
        """`change` in one write transaction; a full disk is waited out (see `DiskFullWait`)."""

        def attempt() -> _R:
            with self._lock, write_transaction(self._db) as db:
                return change(db)

        return self._disk_full.run(attempt)

    # -- reading ---------------------------------------------------------------------------

    def get(self, watch: str, relpath: str) -> FileRecord | None:
        return self._read(lambda db: records.get(db, watch, relpath))

    def get_many(self, ids: Sequence[int]) -> list[FileRecord]:
        return self._read(lambda db: records.get_many(db, ids))

    def known_files(self, watch: str) -> dict[str, KnownFile]:
        """Everything a reconcile needs to skip unchanged files, in one indexed query."""
        return self._read(lambda db: records.known_files(db, watch))

    def known_file(self, watch: str, relpath: str) -> KnownFile | None:
        return self._read(lambda db: records.known_file(db, watch, relpath))

    def records_in_state(self, state: FileState, limit: int = 1000) -> list[FileRecord]:
        return self._read(lambda db: records.in_state(db, state, limit))

    def recent_errors(self, limit: int = 10) -> list[FileRecord]:
        return self._read(lambda db: records.recent_errors(db, limit))

    def uploaded_oldest_first(self, watch: str, limit: int = 100) -> list[FileRecord]:
        """Confirmed files still on disk, oldest first: what a full disk may give up first."""
        return self._read(lambda db: records.uploaded_oldest_first(db, watch, limit))

    def other_owner_of_reference(
        self, dataset_id: str, reference_id: str, watch: str, relpath: str
    ) -> tuple[str, str] | None:
        """(watch, relpath) of another live file that already sends `reference_id` to this
        dataset, if any."""
        return self._read(
            lambda db: intake.other_owner_of_reference(db, dataset_id, reference_id, watch, relpath)
        )

    def counts(self) -> dict[str, dict[FileState, int]]:
        """watch -> state -> count (see `reports.counts`)."""
        return self._read(reports.counts)

    def state_counts(self) -> dict[FileState, int]:
        """state -> count, every state present (see `reports.counts`)."""
        return self._read(reports.state_counts)

    def oldest_pending_first_seen(self) -> float | None:
        return self._read(reports.oldest_pending_first_seen)

    def next_due_at(self) -> float | None:
        return self._read(reports.next_due_at)

    def confirmed_since(self, since: float) -> tuple[int, int]:
        """(files, bytes) confirmed after `since` (unix seconds): the recent throughput."""
        return self._read(lambda db: reports.confirmed_since(db, since))

    def has_unfinished(self, max_attempts: int) -> bool:
        """Anything in flight, or pending with fewer than `max_attempts` tries?"""
        return self._read(lambda db: reports.has_unfinished(db, max_attempts))

    def jobs_in_flight(self) -> dict[str, list[int]]:
        """job_id -> ids of the files it carries, for jobs submitted but not yet finished."""
        return self._read(reports.jobs_in_flight)

    # -- writing: intake -------------------------------------------------------------------

    def adopt_rows(self, key: str, aliases: Sequence[str], dataset_id: str) -> int:
        """A watch whose key changed (a second watch of its folder came or went) takes over
        the rows recorded under its other key for its dataset, instead of sending them all
        again. Only when it has no rows of its own yet."""
        adopted = self._write(lambda db: intake.adopt_rows(db, key, aliases, dataset_id))
        if adopted:
            log.info("watch_rows_adopted", watch=key, rows=adopted)
        return adopted

    def record_candidate(self, candidate: Candidate, now: float | None = None) -> str:
        """Record what is on disk now; decide whether it must be sent. Returns what happened:

        "new" (never seen), "changed" (content or metadata differ from what the server has),
        "unchanged" (nothing to send), "deferred" (in flight: re-queued when the send ends),
        or "collision" (another file already sends this reference_id to this dataset).
        """
        return self.record_candidates([candidate], now)[0]

    def record_candidates(
        self, candidates: Sequence[Candidate], now: float | None = None
    ) -> list[str]:
        """`record_candidate` for many files in one transaction (a walk records in chunks:
        one fsync per chunk instead of one per file)."""
        return self._write(
            lambda db: [intake.record_candidate(db, c, _now(now)) for c in candidates]
        )

    def record_problem(
        self,
        *,
        watch: str,
        relpath: str,
        dataset_id: str,
        size_bytes: int | None,
        mtime_ns: int | None,
        state: FileState,
        reason: str,
        now: float | None = None,
    ) -> None:
        """A file that cannot be sent as it is (incomplete, not an image, bad name): say why.
        Without `size_bytes` and `mtime_ns` (the file could not be stat'ed) the next walk
        looks at it again."""
        self._write(
            lambda db: intake.record_problem(
                db,
                watch=watch,
                relpath=relpath,
                dataset_id=dataset_id,
                size_bytes=size_bytes,
                mtime_ns=mtime_ns,
                state=state,
                reason=reason,
                now=_now(now),
            )
        )

    def mark_gone(self, watch: str, relpath: str, now: float | None = None) -> bool:
        """The file was deleted locally. Its item stays in the dataset; the record says so."""
        return self.mark_gone_many(watch, [relpath], now) > 0

    def mark_gone_many(self, watch: str, relpaths: Sequence[str], now: float | None = None) -> int:
        """After a full walk of `watch`: these recorded files are no longer on disk."""
        return self._write(lambda db: intake.mark_gone(db, watch, relpaths, _now(now)))

    # -- writing: the upload queue ---------------------------------------------------------

    def claim_batch(
        self,
        max_items: int,
        *,
        now: float | None = None,
        newest_first: bool = False,
        clock_stepped_after: float | None = None,
        max_bytes: int | None = None,
    ) -> list[FileRecord]:
        """Take up to `max_items` due files that can share one request (see
        `queue.claim_batch`); they become in_flight."""
        return self._write(
            lambda db: queue.claim_batch(
                db,
                max_items,
                now=_now(now),
                newest_first=newest_first,
                clock_stepped_after=clock_stepped_after,
                max_bytes=max_bytes,
            )
        )

    def note_streamed_bytes(self, id_: int, content_sha256: str) -> None:
        """Other bytes than claimed went out for this row (see `queue.note_streamed_bytes`)."""
        self._write(lambda db: queue.note_streamed_bytes(db, id_, content_sha256))

    def mark_job_submitted(self, ids: Sequence[int], job_id: str) -> None:
        """The server took the request as a job; a restart follows the job instead of re-sending."""
        self._write(lambda db: queue.mark_job_submitted(db, ids, job_id))

    def mark_confirmed(self, ids: Sequence[int], now: float | None = None) -> int:
        """The server confirmed these (2xx sync answer or job Completed). Returns how many
        went back to the queue because they changed while the request was out."""
        return self._write(lambda db: queue.mark_confirmed(db, ids, _now(now)))

    def mark_retry(
        self, ids: Sequence[int], error: str, next_attempt_at: float, *, force_update: bool = False
    ) -> None:
        """Back to the queue after a transient failure (or to re-send with update=true)."""
        self._write(
            lambda db: queue.mark_retry(db, ids, error, next_attempt_at, force_update=force_update)
        )

    def mark_failed(self, ids: Sequence[int], error: str, now: float | None = None) -> None:
        """Parked: this will not succeed as it is. `retry` or a change to the file re-queues it."""
        self._write(lambda db: queue.mark_failed(db, ids, error, _now(now)))

    def release_in_flight(self) -> int:
        """At start: sends that were cut off (no job id) go back to pending, same reference_id."""
        return self._write(queue.release_in_flight)

    def reset_pending_attempts(self) -> int:
        """A new `scan` run: items still pending from an earlier run get a fresh set of tries."""
        return self._write(queue.reset_pending_attempts)

    def requeue_failed(self, paths: Sequence[Path] = ()) -> int:
        """`retry`: failed and incomplete items (all, or those at `paths`) get another go
        (see `queue.requeue_failed`)."""
        return self._write(lambda db: queue.requeue_failed(db, paths))
