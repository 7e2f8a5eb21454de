"""The state store: one SQLite database that records every file and what the server confirmed.

Files on disk are the source of truth; this is the record of what Nucleus confirmed, so losing it
costs re-sends, never data. One connection owns the database (WAL, synchronous=FULL) and every
thread goes through it under a lock: SQLite before 3.51.3 can corrupt a WAL database when two
connections write or checkpoint at once. Readers in other processes (`status`) open it read-only.

A file's life:  pending -> in_flight -> uploaded
                   ^  |         |
                   |  +--> failed (parked with a reason; `retry` or a change re-queues it)
                   +-------- retry later (attempts, next_attempt_at)
plus `incomplete` (never finished writing) and `gone` (deleted locally; its item stays in the
dataset).
"""

from __future__ import annotations

import fcntl
import functools
import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Concatenate, ParamSpec, TypeVar

import structlog

from watcher.errors import StoreBusyError, StoreError

log = structlog.get_logger("watcher.store")

PENDING = "pending"
IN_FLIGHT = "in_flight"
UPLOADED = "uploaded"
FAILED = "failed"
INCOMPLETE = "incomplete"
GONE = "gone"
STATES = (PENDING, IN_FLIGHT, UPLOADED, FAILED, INCOMPLETE, GONE)

# Ordered schema steps; PRAGMA user_version says how many have run.
_MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE files (
        id INTEGER PRIMARY KEY,
        watch TEXT NOT NULL,
        relpath TEXT NOT NULL,
        dataset_id TEXT NOT NULL,
        reference_id TEXT NOT NULL,
        size_bytes INTEGER NOT NULL,
        mtime_ns INTEGER NOT NULL,
        content_sha256 TEXT,
        metadata_json TEXT NOT NULL,
        metadata_sha256 TEXT NOT NULL,
        remote_url TEXT,
        state TEXT NOT NULL,
        update_flag INTEGER NOT NULL DEFAULT 0,
        requeue INTEGER NOT NULL DEFAULT 0,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_at REAL NOT NULL DEFAULT 0,
        last_error TEXT,
        job_id TEXT,
        sent_content_sha256 TEXT,
        sent_metadata_sha256 TEXT,
        confirmed_dataset_id TEXT,
        confirmed_reference_id TEXT,
        confirmed_content_sha256 TEXT,
        confirmed_metadata_sha256 TEXT,
        confirmed_at REAL,
        first_seen_at REAL NOT NULL,
        changed_at REAL NOT NULL,
        UNIQUE (watch, relpath)
    );
    CREATE INDEX files_queue ON files (state, next_attempt_at);
    CREATE INDEX files_reference ON files (dataset_id, reference_id);
    CREATE INDEX files_job ON files (job_id) WHERE job_id IS NOT NULL;
    """,
    # Claiming in mtime order without sorting every pending row each time.
    """
    CREATE INDEX files_claim ON files (state, mtime_ns, id);
    """,
)


@dataclass(frozen=True)
class FileRecord:
    """One row of the store, as the uploader and the commands see it."""

    id: int
    watch: str
    relpath: str
    dataset_id: str
    reference_id: str
    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    metadata: dict[str, Any]
    metadata_sha256: str
    remote_url: str | None
    state: str
    update_flag: bool
    attempts: int
    next_attempt_at: float
    last_error: str | None
    job_id: str | None
    confirmed_at: float | None
    first_seen_at: float

    @property
    def path(self) -> Path:
        return Path(self.watch) / self.relpath


@dataclass(frozen=True)
class Candidate:
    """What the reconcile or the settler learned about a file, ready to be recorded."""

    watch: str
    relpath: str
    dataset_id: str
    reference_id: str
    size_bytes: int
    mtime_ns: int
    content_sha256: str
    metadata: dict[str, Any]
    metadata_sha256: str
    remote_url: str | None


@dataclass(frozen=True, slots=True)
class KnownFile:
    """The cheap part of a record, enough for a reconcile to skip an unchanged file."""

    size_bytes: int
    mtime_ns: int
    content_sha256: str | None
    metadata_sha256: str
    state: str


_P = ParamSpec("_P")
_R = TypeVar("_R")
_FULL_RETRY_MAX_SECONDS = 30.0


def _out_of_space_or_io(exc: sqlite3.OperationalError) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    return "disk is full" in str(exc) or "disk I/O error" in str(exc)


def _waits_for_disk_space(
    method: Callable[Concatenate[StateStore, _P], _R],
) -> Callable[Concatenate[StateStore, _P], _R]:
    """A write that fails because the state folder is full (or its disk errs) waits and tries
    again instead of failing: the transaction rolled back, so nothing half-written remains, and
    the pipeline simply stalls until an operator frees space. Closing the store ends the wait."""

    @functools.wraps(method)
    def wrapper(self: StateStore, /, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        delay = 0.5
        while True:
            try:
                result = method(self, *args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not _out_of_space_or_io(exc) or self._closing.is_set():
                    raise
                if not self._write_blocked:
                    self._write_blocked = True
                    log.error(
                        "state_write_failed",
                        path=str(self.path),
                        error=str(exc),
                        hint="free space in the state folder; writes are retried",
                    )
                if self._closing.wait(delay):
                    raise StoreError(f"{self.path}: closed while waiting to write: {exc}") from exc
                delay = min(delay * 2, _FULL_RETRY_MAX_SECONDS)
                continue
            if self._write_blocked:
                self._write_blocked = False
                log.info("state_write_recovered", path=str(self.path))
            return result

    return wrapper


_COLUMNS = (
    "id, watch, relpath, dataset_id, reference_id, size_bytes, mtime_ns, content_sha256,"
    " metadata_json, metadata_sha256, remote_url, state, update_flag, attempts,"
    " next_attempt_at, last_error, job_id, confirmed_at, first_seen_at"
)


def _record(row: sqlite3.Row) -> FileRecord:
    return FileRecord(
        id=row["id"],
        watch=row["watch"],
        relpath=row["relpath"],
        dataset_id=row["dataset_id"],
        reference_id=row["reference_id"],
        size_bytes=row["size_bytes"],
        mtime_ns=row["mtime_ns"],
        content_sha256=row["content_sha256"],
        metadata=json.loads(row["metadata_json"]),
        metadata_sha256=row["metadata_sha256"],
        remote_url=row["remote_url"],
        state=row["state"],
        update_flag=bool(row["update_flag"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        job_id=row["job_id"],
        confirmed_at=row["confirmed_at"],
        first_seen_at=row["first_seen_at"],
    )


def _placeholders(count: int) -> str:
    return ",".join("?" * count)


def _within_bytes(rows: list[sqlite3.Row], max_bytes: int) -> list[sqlite3.Row]:
    """The leading rows whose sizes add up to at most `max_bytes`, and at least the first."""
    total = 0
    for count, row in enumerate(rows):
        total += max(0, row["size_bytes"])  # -1 marks a size to be learned again
        if count and total > max_bytes:
            return rows[:count]
    return rows


class StateStore:
    """The only writer of the state database. Thread-safe: every call holds the store's lock."""

    def __init__(self, connection: sqlite3.Connection, path: Path, *, read_only: bool) -> None:
        self._db = connection
        self._db.row_factory = sqlite3.Row
        self.path = path
        self.read_only = read_only
        self._lock = threading.RLock()
        self._owner_lock: int | None = None
        self._closing = threading.Event()
        self._write_blocked = False

    # -- opening ---------------------------------------------------------------------------

    @classmethod
    def open(cls, path: Path) -> StateStore:
        """Open (or create) the database for writing; move a damaged one aside and start anew.

        One process at a time: an advisory lock beside the database keeps a second daemon or a
        `scan` from becoming a second writer (see the module docstring for why that matters).
        """
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreError(
                f"{path.parent}: cannot create the state folder: {exc.strerror}"
            ) from exc
        owner_lock = _take_owner_lock(path)
        try:
            try:
                store = cls._open_checked(path)
            except sqlite3.DatabaseError as exc:
                if isinstance(exc, sqlite3.OperationalError) and "unable to open" in str(exc):
                    raise StoreError(f"{path}: cannot open the state database: {exc}") from exc
                aside = _move_aside(path)
                log.error("state_db_corrupt", path=str(path), moved_to=str(aside), error=str(exc))
                store = cls._open_checked(path)
        except BaseException:
            os.close(owner_lock)
            raise
        store._owner_lock = owner_lock
        return store

    @classmethod
    def _open_checked(cls, path: Path) -> StateStore:
        db = sqlite3.connect(path, isolation_level=None, check_same_thread=False, timeout=30)
        try:
            result = db.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no answer'}")
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            store = cls(db, path, read_only=False)
            store._migrate()
        except sqlite3.DatabaseError:
            db.close()
            raise
        return store

    @classmethod
    def open_read_only(cls, path: Path) -> StateStore:
        """For `status` and `explain` while the daemon runs: never writes, never checkpoints."""
        if not path.exists():
            raise StoreError(f"{path}: no state database yet (has the daemon or scan run?)")
        try:
            db = sqlite3.connect(
                f"file:{path}?mode=ro", uri=True, check_same_thread=False, isolation_level=None
            )
            db.execute("SELECT count(*) FROM files").fetchone()
        except sqlite3.DatabaseError as exc:
            raise StoreError(f"{path}: cannot read the state database: {exc}") from exc
        return cls(db, path, read_only=True)

    def _migrate(self) -> None:
        version = self._db.execute("PRAGMA user_version").fetchone()[0]
        if version > len(_MIGRATIONS):
            raise StoreError(
                f"{self.path}: written by a newer nucleus-watcher (schema {version}); upgrade first"
            )
        for number, step in enumerate(_MIGRATIONS[version:], start=version + 1):
            with self._transaction():
                for statement in step.split(";"):
                    if statement.strip():
                        self._db.execute(statement)
                self._db.execute(f"PRAGMA user_version = {number}")

    def close(self) -> None:
        self._closing.set()
        with self._lock:
            self._db.close()
            if self._owner_lock is not None:
                os.close(self._owner_lock)  # closing the descriptor releases the flock
                self._owner_lock = None

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.execute("COMMIT")
            except BaseException:
                # SQLite may already have rolled back by itself (a full disk does that).
                if self._db.in_transaction:
                    self._db.execute("ROLLBACK")
                raise

    def _query(self, sql: str, params: Sequence[Any] = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._db.execute(sql, params).fetchall()

    def _records(self, where: str, params: Sequence[Any]) -> list[FileRecord]:
        """Whole records: `where` is the SQL after WHERE (conditions, order, limit)."""
        return [
            _record(row)
            for row in self._query(f"SELECT {_COLUMNS} FROM files WHERE {where}", params)
        ]

    # -- reading ---------------------------------------------------------------------------

    def get(self, watch: str, relpath: str) -> FileRecord | None:
        records = self._records("watch = ? AND relpath = ?", (watch, relpath))
        return records[0] if records else None

    def get_many(self, ids: Sequence[int]) -> list[FileRecord]:
        return self._records(f"id IN ({_placeholders(len(ids))})", list(ids))

    def known_files(self, watch: str) -> dict[str, KnownFile]:
        """Everything a reconcile needs to skip unchanged files, in one indexed query."""
        rows = self._query(
            "SELECT relpath, size_bytes, mtime_ns, content_sha256, metadata_sha256, state"
            " FROM files WHERE watch = ?",
            (watch,),
        )
        return {
            row["relpath"]: KnownFile(
                row["size_bytes"],
                row["mtime_ns"],
                row["content_sha256"],
                row["metadata_sha256"],
                row["state"],
            )
            for row in rows
        }

    def known_file(self, watch: str, relpath: str) -> KnownFile | None:
        rows = self._query(
            "SELECT size_bytes, mtime_ns, content_sha256, metadata_sha256, state"
            " FROM files WHERE watch = ? AND relpath = ?",
            (watch, relpath),
        )
        return KnownFile(*rows[0]) if rows else None

    def other_owner_of_reference(
        self, dataset_id: str, reference_id: str, watch: str, relpath: str
    ) -> Path | None:
        """Another live file that already sends `reference_id` to this dataset, if any."""
        rows = self._query(
            "SELECT watch, relpath FROM files WHERE dataset_id = ? AND reference_id = ?"
            " AND state != ? AND NOT (watch = ? AND relpath = ?) LIMIT 1",
            (dataset_id, reference_id, GONE, watch, relpath),
        )
        return Path(rows[0]["watch"]) / rows[0]["relpath"] if rows else None

    def counts(self) -> dict[str, dict[str, int]]:
        """watch -> state -> count."""
        result: dict[str, dict[str, int]] = {}
        rows = self._query("SELECT watch, state, count(*) AS n FROM files GROUP BY watch, state")
        for row in rows:
            result.setdefault(row["watch"], {})[row["state"]] = row["n"]
        return result

    def state_counts(self) -> dict[str, int]:
        totals = dict.fromkeys(STATES, 0)
        for row in self._query("SELECT state, count(*) AS n FROM files GROUP BY state"):
            totals[row["state"]] = row["n"]
        return totals

    def oldest_pending_first_seen(self) -> float | None:
        rows = self._query(
            "SELECT min(first_seen_at) AS t FROM files WHERE state IN (?, ?)", (PENDING, IN_FLIGHT)
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def next_due_at(self) -> float | None:
        rows = self._query(
            "SELECT min(next_attempt_at) AS t FROM files WHERE state = ?", (PENDING,)
        )
        value = rows[0]["t"] if rows else None
        return float(value) if value is not None else None

    def records_in_state(self, state: str, limit: int = 1000) -> list[FileRecord]:
        return self._records("state = ? ORDER BY changed_at DESC LIMIT ?", (state, limit))

    def recent_errors(self, limit: int = 10) -> list[FileRecord]:
        return self._records("last_error IS NOT NULL ORDER BY changed_at DESC LIMIT ?", (limit,))

    def confirmed_since(self, since: float) -> tuple[int, int]:
        """(files, bytes) confirmed after `since` (unix seconds): the recent throughput."""
        rows = self._query(
            "SELECT count(*) AS n, coalesce(sum(size_bytes), 0) AS b FROM files"
            " WHERE confirmed_at >= ?",
            (since,),
        )
        return int(rows[0]["n"]), int(rows[0]["b"])

    def has_unfinished(self, max_attempts: int) -> bool:
        """Anything in flight, or pending with fewer than `max_attempts` tries? Two indexed
        look-ups that stop at the first row, not a count: `scan` asks this several times a
        second while a large backlog drains."""
        rows = self._query(
            "SELECT EXISTS (SELECT 1 FROM files WHERE state = ?)"
            " OR EXISTS (SELECT 1 FROM files WHERE state = ? AND attempts < ?) AS unfinished",
            (IN_FLIGHT, PENDING, max_attempts),
        )
        return bool(rows[0]["unfinished"])

    def uploaded_oldest_first(self, watch: str, limit: int = 100) -> list[FileRecord]:
        """Confirmed files still on disk, oldest first: what a full disk may give up first."""
        return self._records(
            "watch = ? AND state = ? ORDER BY mtime_ns ASC, id ASC LIMIT ?",
            (watch, UPLOADED, limit),
        )

    def jobs_in_flight(self) -> dict[str, list[int]]:
        """job_id -> ids of the files it carries, for jobs submitted but not yet finished."""
        jobs: dict[str, list[int]] = {}
        for row in self._query(
            "SELECT id, job_id FROM files WHERE state = ? AND job_id IS NOT NULL", (IN_FLIGHT,)
        ):
            jobs.setdefault(row["job_id"], []).append(row["id"])
        return jobs

    # -- writing: intake -------------------------------------------------------------------

    def record_candidate(self, candidate: Candidate, now: float | None = None) -> str:
        """Record what is on disk now; decide whether it must be sent. Returns what happened:

        "new" (never seen), "changed" (content or metadata differ from what the server has),
        "unchanged" (nothing to send), "deferred" (in flight: re-queued when the send ends),
        or "collision" (another file already sends this reference_id to this dataset).
        """
        return self.record_candidates([candidate], now)[0]

    @_waits_for_disk_space
    def record_candidates(
        self, candidates: Sequence[Candidate], now: float | None = None
    ) -> list[str]:
        """`record_candidate` for many files in one transaction (a walk records in chunks:
        one fsync per chunk instead of one per file)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return [self._record_one(db, candidate, now) for candidate in candidates]

    def _record_one(self, db: sqlite3.Connection, candidate: Candidate, now: float) -> str:
        metadata_json = json.dumps(candidate.metadata, sort_keys=True, ensure_ascii=False)
        other = db.execute(
            "SELECT 1 FROM files WHERE dataset_id = ? AND reference_id = ? AND state != ?"
            " AND NOT (watch = ? AND relpath = ?) LIMIT 1",
            (
                candidate.dataset_id,
                candidate.reference_id,
                GONE,
                candidate.watch,
                candidate.relpath,
            ),
        ).fetchone()
        if other is not None:
            return "collision"
        row = db.execute(
            "SELECT * FROM files WHERE watch = ? AND relpath = ?",
            (candidate.watch, candidate.relpath),
        ).fetchone()
        values = (
            candidate.dataset_id,
            candidate.reference_id,
            candidate.size_bytes,
            candidate.mtime_ns,
            candidate.content_sha256,
            metadata_json,
            candidate.metadata_sha256,
            candidate.remote_url,
        )
        if row is None:
            db.execute(
                "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
                " mtime_ns, content_sha256, metadata_json, metadata_sha256, remote_url, state,"
                " first_seen_at, changed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (candidate.watch, candidate.relpath, *values, PENDING, now, now),
            )
            return "new"

        version = (
            candidate.dataset_id,
            candidate.reference_id,
            candidate.content_sha256,
            candidate.metadata_sha256,
        )
        confirmed = (
            row["confirmed_dataset_id"],
            row["confirmed_reference_id"],
            row["confirmed_content_sha256"],
            row["confirmed_metadata_sha256"],
        )
        current = (
            row["dataset_id"],
            row["reference_id"],
            row["content_sha256"],
            row["metadata_sha256"],
        )
        server_has_reference = (
            row["confirmed_at"] is not None
            and confirmed[0] == candidate.dataset_id
            and confirmed[1] == candidate.reference_id
        )
        set_values = (
            "dataset_id = ?, reference_id = ?, size_bytes = ?, mtime_ns = ?,"
            " content_sha256 = ?, metadata_json = ?, metadata_sha256 = ?, remote_url = ?"
        )
        state = row["state"]
        if state == IN_FLIGHT:
            sent = (row["sent_content_sha256"], row["sent_metadata_sha256"])
            requeue = int(sent != (candidate.content_sha256, candidate.metadata_sha256))
            db.execute(
                f"UPDATE files SET {set_values}, requeue = max(requeue, ?) WHERE id = ?",
                (*values, requeue, row["id"]),
            )
            return "deferred" if requeue else "unchanged"
        if version == confirmed:
            # The server already holds exactly this; a touch or a reappearing file.
            db.execute(
                f"UPDATE files SET {set_values}, state = ?, last_error = NULL,"
                " changed_at = CASE WHEN state = ? THEN changed_at ELSE ? END WHERE id = ?",
                (*values, UPLOADED, UPLOADED, now, row["id"]),
            )
            return "unchanged"
        if version == current and state in (PENDING, FAILED):
            # Same thing we already queued or parked: keep its backoff or its reason.
            db.execute(f"UPDATE files SET {set_values} WHERE id = ?", (*values, row["id"]))
            return "unchanged"
        db.execute(
            f"UPDATE files SET {set_values}, state = ?, update_flag = ?, attempts = 0,"
            " next_attempt_at = 0, last_error = NULL, job_id = NULL, changed_at = ?"
            " WHERE id = ?",
            (*values, PENDING, int(server_has_reference), now, row["id"]),
        )
        return "changed"

    @_waits_for_disk_space
    def record_problem(
        self,
        *,
        watch: str,
        relpath: str,
        dataset_id: str,
        size_bytes: int,
        mtime_ns: int,
        state: str,
        reason: str,
        now: float | None = None,
    ) -> None:
        """A file that cannot be sent as it is (incomplete, not an image, bad name): say why."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            row = db.execute(
                "SELECT id, state FROM files WHERE watch = ? AND relpath = ?", (watch, relpath)
            ).fetchone()
            if row is None:
                db.execute(
                    "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
                    " mtime_ns, metadata_json, metadata_sha256, state, last_error, first_seen_at,"
                    " changed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                    (
                        watch,
                        relpath,
                        dataset_id,
                        "",
                        size_bytes,
                        mtime_ns,
                        "{}",
                        "",
                        state,
                        reason,
                        now,
                        now,
                    ),
                )
            elif row["state"] != IN_FLIGHT:
                db.execute(
                    "UPDATE files SET size_bytes = ?, mtime_ns = ?, state = ?, last_error = ?,"
                    " content_sha256 = NULL, metadata_sha256 = '', changed_at = ? WHERE id = ?",
                    (size_bytes, mtime_ns, state, reason, now, row["id"]),
                )

    @_waits_for_disk_space
    def mark_gone(self, watch: str, relpath: str, now: float | None = None) -> bool:
        """The file was deleted locally. Its item stays in the dataset; the record says so."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE files SET state = ?, changed_at = ?, content_sha256 = NULL"
                " WHERE watch = ? AND relpath = ? AND state NOT IN (?, ?)",
                (GONE, now, watch, relpath, GONE, IN_FLIGHT),
            )
            return cursor.rowcount > 0

    @_waits_for_disk_space
    def mark_gone_many(self, watch: str, relpaths: Sequence[str], now: float | None = None) -> int:
        """After a full walk of `watch`: these recorded files are no longer on disk."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return sum(
                db.execute(
                    "UPDATE files SET state = ?, changed_at = ?, content_sha256 = NULL"
                    " WHERE watch = ? AND relpath = ? AND state NOT IN (?, ?)",
                    (GONE, now, watch, relpath, GONE, IN_FLIGHT),
                ).rowcount
                for relpath in relpaths
            )

    # -- writing: the upload queue ---------------------------------------------------------

    @_waits_for_disk_space
    def claim_batch(
        self,
        max_items: int,
        *,
        now: float | None = None,
        newest_first: bool = False,
        max_bytes: int | None = None,
    ) -> list[FileRecord]:
        """Take up to `max_items` due files that can share one request; they become in_flight.

        A batch shares a dataset and a kind (file bytes or remote URL; remote URLs also share
        `update`, which the JSON form carries once per request). With `max_bytes`, a batch of
        local files stops before the file that would take it over that size (the first always
        goes); remote URLs send no file bytes, so it does not limit them.
        """
        now = time.time() if now is None else now
        order = "DESC" if newest_first else "ASC"
        with self._transaction() as db:
            first = db.execute(
                # INDEXED BY: without it SQLite prefers files_queue for the range on
                # next_attempt_at and then sorts every pending row, on every claim.
                "SELECT id, dataset_id, remote_url IS NOT NULL AS remote, update_flag"
                " FROM files INDEXED BY files_claim"
                f" WHERE state = ? AND next_attempt_at <= ? ORDER BY mtime_ns {order}, id {order}"
                " LIMIT 1",
                (PENDING, now),
            ).fetchone()
            if first is None:
                return []
            if first["remote"]:
                kind_filter = "remote_url IS NOT NULL AND update_flag = ?"
                kind_params: tuple[Any, ...] = (first["update_flag"],)
            else:
                kind_filter, kind_params = "remote_url IS NULL", ()
            rows = db.execute(
                f"SELECT {_COLUMNS} FROM files INDEXED BY files_claim"
                " WHERE state = ? AND next_attempt_at <= ?"
                f" AND dataset_id = ? AND {kind_filter}"
                f" ORDER BY mtime_ns {order}, id {order} LIMIT ?",
                (PENDING, now, first["dataset_id"], *kind_params, max_items),
            ).fetchall()
            if max_bytes is not None and not first["remote"]:
                rows = _within_bytes(rows, max_bytes)
            ids = [row["id"] for row in rows]
            db.execute(
                f"UPDATE files SET state = ?, requeue = 0, sent_content_sha256 = content_sha256,"
                f" sent_metadata_sha256 = metadata_sha256, job_id = NULL"
                f" WHERE id IN ({_placeholders(len(ids))})",
                (IN_FLIGHT, *ids),
            )
        return [_record(row) for row in rows]

    @_waits_for_disk_space
    def mark_job_submitted(self, ids: Sequence[int], job_id: str) -> None:
        """The server took the request as a job; a restart follows the job instead of re-sending."""
        with self._transaction() as db:
            db.execute(
                f"UPDATE files SET job_id = ? WHERE id IN ({_placeholders(len(ids))})",
                (job_id, *ids),
            )

    @_waits_for_disk_space
    def mark_confirmed(self, ids: Sequence[int], now: float | None = None) -> None:
        """The server confirmed these (2xx sync answer or job Completed)."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET confirmed_dataset_id = dataset_id,"
                " confirmed_reference_id = reference_id,"
                " confirmed_content_sha256 = sent_content_sha256,"
                " confirmed_metadata_sha256 = sent_metadata_sha256, confirmed_at = ?,"
                " attempts = 0, next_attempt_at = 0, last_error = NULL, job_id = NULL,"
                " changed_at = ?,"
                # A change that arrived while the send was in flight goes out next, as an update.
                " state = CASE WHEN requeue THEN ? ELSE ? END,"
                " update_flag = CASE WHEN requeue THEN 1 ELSE update_flag END, requeue = 0"
                f" WHERE id IN ({_placeholders(len(ids))}) AND state = ?",
                (now, now, PENDING, UPLOADED, *ids, IN_FLIGHT),
            )

    @_waits_for_disk_space
    def mark_retry(
        self, ids: Sequence[int], error: str, next_attempt_at: float, *, force_update: bool = False
    ) -> None:
        """Back to the queue after a transient failure (or to re-send with update=true)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET state = ?, attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ?, job_id = NULL, requeue = 0,"
                " update_flag = CASE WHEN ? THEN 1 ELSE update_flag END"
                f" WHERE id IN ({_placeholders(len(ids))}) AND state = ?",
                (PENDING, next_attempt_at, error, int(force_update), *ids, IN_FLIGHT),
            )

    @_waits_for_disk_space
    def mark_failed(self, ids: Sequence[int], error: str, now: float | None = None) -> None:
        """Parked: this will not succeed as it is. `retry` or a change to the file re-queues it."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET state = CASE WHEN requeue THEN ? ELSE ? END,"
                " attempts = attempts + 1, last_error = ?, job_id = NULL, requeue = 0,"
                f" changed_at = ? WHERE id IN ({_placeholders(len(ids))}) AND state = ?",
                (PENDING, FAILED, error, now, *ids, IN_FLIGHT),
            )

    @_waits_for_disk_space
    def release_in_flight(self) -> int:
        """At start: sends that were cut off (no job id) go back to pending, same reference_id."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE files SET state = ?, next_attempt_at = 0"
                " WHERE state = ? AND job_id IS NULL",
                (PENDING, IN_FLIGHT),
            )
            return cursor.rowcount

    @_waits_for_disk_space
    def reset_pending_attempts(self) -> int:
        """A new `scan` run: items still pending from an earlier run get a fresh set of tries."""
        with self._transaction() as db:
            return db.execute(
                "UPDATE files SET attempts = 0, next_attempt_at = 0 WHERE state = ?", (PENDING,)
            ).rowcount

    @_waits_for_disk_space
    def requeue_failed(self, paths: Sequence[Path] = ()) -> int:
        """`retry`: failed and incomplete items (all, or those at `paths`) get another go.

        Items that reached the server and were refused go back to pending as they are; files
        refused before classification (not an image, incomplete, ...) are marked for the next
        reconcile to look at again, since only a fresh look can tell whether they are fixed.
        """
        where = "state IN (?, ?)"
        params: list[Any] = [FAILED, INCOMPLETE]
        if paths:
            where += f" AND watch || '/' || relpath IN ({_placeholders(len(paths))})"
            params += [str(path.absolute()) for path in paths]
        with self._transaction() as db:
            queued = db.execute(
                "UPDATE files SET state = ?, attempts = 0, next_attempt_at = 0"
                f" WHERE {where} AND metadata_sha256 != ''",
                (PENDING, *params),
            ).rowcount
            reexamined = db.execute(
                f"UPDATE files SET size_bytes = -1, mtime_ns = -1 WHERE {where}"
                " AND metadata_sha256 = ''",
                params,
            ).rowcount
        return queued + reexamined


def lock_path(path: Path) -> Path:
    return path.with_name(path.name + ".lock")


def _take_owner_lock(path: Path) -> int:
    lock = lock_path(path)
    try:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
    except OSError as exc:
        raise StoreError(f"{lock}: cannot create the lock file: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        raise StoreBusyError(
            f"{path}: in use by another nucleus-watcher process (pid {holder})"
        ) from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _move_aside(path: Path) -> Path:
    """Keep a damaged database (and its -wal/-shm) for a person to look at; never delete it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{aside}{suffix}"))
    return aside
