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
from watcher.files import path_from_text

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
    # Every (dataset, reference_id) a send was ever attempted for, with the version it carried
    # (`varied` once two different versions were attempted). A send whose answer never came
    # may have been stored, so a later send of that reference_id with other bytes or metadata,
    # by this file or by one that takes the name over, must be an update; a re-send of the same
    # version need not (the server holds it already, or nothing). `vanished` marks a file
    # deleted while its request was out; it ends `gone` when the answer comes.
    # `sent_dataset_id` and `sent_reference_id` say what the request in flight carried.
    """
    CREATE TABLE sent_references (
        dataset_id TEXT NOT NULL,
        reference_id TEXT NOT NULL,
        content_sha256 TEXT,
        metadata_sha256 TEXT,
        varied INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (dataset_id, reference_id)
    ) WITHOUT ROWID;
    INSERT INTO sent_references (dataset_id, reference_id, content_sha256, metadata_sha256)
        SELECT confirmed_dataset_id, confirmed_reference_id, confirmed_content_sha256,
            confirmed_metadata_sha256 FROM files
        WHERE confirmed_reference_id IS NOT NULL AND confirmed_reference_id != ''
        ON CONFLICT (dataset_id, reference_id) DO UPDATE SET varied = 1;
    INSERT INTO sent_references (dataset_id, reference_id, content_sha256, metadata_sha256)
        SELECT dataset_id, reference_id, sent_content_sha256, sent_metadata_sha256 FROM files
        WHERE reference_id != '' AND sent_content_sha256 IS NOT NULL
            AND (state = 'in_flight' OR attempts > 0)
        ON CONFLICT (dataset_id, reference_id) DO UPDATE SET varied = varied
            OR excluded.content_sha256 IS NOT content_sha256
            OR excluded.metadata_sha256 IS NOT metadata_sha256;
    ALTER TABLE files ADD COLUMN vanished INTEGER NOT NULL DEFAULT 0;
    ALTER TABLE files ADD COLUMN sent_dataset_id TEXT;
    ALTER TABLE files ADD COLUMN sent_reference_id TEXT;
    UPDATE files SET sent_dataset_id = dataset_id, sent_reference_id = reference_id
        WHERE state = 'in_flight';
    """,
)

# Could the server hold another version under this row's reference_id (from any earlier
# send)? Then sending this version needs update=true.
_MAYBE_ON_SERVER = (
    "EXISTS (SELECT 1 FROM sent_references s"
    " WHERE s.dataset_id = files.dataset_id AND s.reference_id = files.reference_id"
    " AND (s.varied OR s.content_sha256 IS NOT files.content_sha256"
    " OR s.metadata_sha256 IS NOT files.metadata_sha256))"
)
# Is what this row would send exactly what the server confirmed last?
_SAME_AS_CONFIRMED = (
    "(dataset_id IS confirmed_dataset_id AND reference_id IS confirmed_reference_id"
    " AND content_sha256 IS confirmed_content_sha256"
    " AND metadata_sha256 IS confirmed_metadata_sha256)"
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
    confirmed_content_sha256: str | None = None

    @property
    def path(self) -> Path:
        """The file on disk (the relpath is stored in its text form; see pathtext.py)."""
        return Path(watch_root(self.watch)) / path_from_text(self.relpath)

    @property
    def shown_path(self) -> str:
        """The path as printed and logged: always valid text."""
        return f"{watch_root(self.watch)}/{self.relpath}"


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
    dataset_id: str


_P = ParamSpec("_P")
_R = TypeVar("_R")
_FULL_RETRY_MAX_SECONDS = 30.0

# How long `open` waits out errors that pass (a lock, a full disk, I/O errors) before giving up.
# A daemon under systemd that gives up is restarted (Restart=on-failure), so it keeps trying.
OPEN_RETRY_SECONDS = 60.0
_OPEN_BUSY_SECONDS = 5.0
_OPEN_FIRST_DELAY_SECONDS = 0.2
_OPEN_MAX_DELAY_SECONDS = 5.0
# Once open, a write waits this long for a lock before it fails (as before the open retries).
_BUSY_TIMEOUT_MILLISECONDS = 30_000
# Not worth waiting for: no permission, a read-only file, a path that cannot be a database.
_OPEN_NOT_TRANSIENT = frozenset(
    {sqlite3.SQLITE_CANTOPEN, sqlite3.SQLITE_PERM, sqlite3.SQLITE_READONLY, sqlite3.SQLITE_AUTH}
)


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
    " next_attempt_at, last_error, job_id, confirmed_at, first_seen_at, confirmed_content_sha256"
)


# A claim reads the update flag the send will carry: forced (on_conflict), or because an earlier
# send of the same reference_id may have reached the server.
_CLAIM_COLUMNS = _COLUMNS.replace(
    " update_flag,", f" (update_flag OR {_MAYBE_ON_SERVER}) AS update_flag,"
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
        confirmed_content_sha256=row["confirmed_content_sha256"],
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
    def open(cls, path: Path, *, retry_seconds: float = OPEN_RETRY_SECONDS) -> StateStore:
        """Open (or create) the database for writing; move a damaged one aside and start anew.

        Only damage moves it aside. A lock held by another program, a full disk or an I/O error
        is waited out for up to `retry_seconds` (one `state_open_retry` log line), then raises
        StoreError: moving a healthy record aside would re-send everything.

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
                store = cls._open_retrying(path, retry_seconds)
            except sqlite3.DatabaseError as exc:
                aside = _move_aside(path)
                log.error("state_db_corrupt", path=str(path), moved_to=str(aside), error=str(exc))
                try:
                    store = cls._open_retrying(path, retry_seconds)
                except sqlite3.DatabaseError as again:
                    raise StoreError(
                        f"{path}: cannot create the state database: {again}"
                    ) from again
        except BaseException:
            os.close(owner_lock)
            raise
        store._owner_lock = owner_lock
        return store

    @classmethod
    def _open_retrying(cls, path: Path, retry_seconds: float) -> StateStore:
        """`_open_checked`, again and again while the failure is one that passes.

        Raises sqlite3.DatabaseError only for damage; StoreError for everything else.
        """
        started = time.monotonic()
        delay_seconds = _OPEN_FIRST_DELAY_SECONDS
        announced = False
        while True:
            try:
                store = cls._open_checked(path)
            except sqlite3.DatabaseError as exc:
                if _is_damage(exc):
                    raise
                code = _primary_code(exc)
                if code in _OPEN_NOT_TRANSIENT:
                    raise StoreError(f"{path}: cannot open the state database: {exc}") from exc
                waited_seconds = time.monotonic() - started
                if waited_seconds + delay_seconds > retry_seconds:
                    raise StoreError(
                        f"{path}: cannot open the state database"
                        f" (gave up after {retry_seconds:g} s): {exc}"
                    ) from exc
                if not announced:
                    announced = True
                    log.warning(
                        "state_open_retry",
                        path=str(path),
                        reason=str(exc),
                        hint=_open_hint(code),
                        give_up_after_seconds=retry_seconds,
                    )
                time.sleep(delay_seconds)
                delay_seconds = min(delay_seconds * 2, _OPEN_MAX_DELAY_SECONDS)
                continue
            if announced:
                log.info(
                    "state_open_recovered",
                    path=str(path),
                    waited_seconds=round(time.monotonic() - started, 1),
                )
            return store

    @classmethod
    def _open_checked(cls, path: Path) -> StateStore:
        # A short busy wait: a lock held longer is retried by the caller, with a log line.
        db = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=_OPEN_BUSY_SECONDS
        )
        try:
            result = db.execute("PRAGMA quick_check").fetchone()
            if result is None or result[0] != "ok":
                damaged = sqlite3.DatabaseError(
                    f"quick_check: {result[0] if result else 'no answer'}"
                )
                damaged.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
                raise damaged
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("PRAGMA foreign_keys=ON")
            store = cls(db, path, read_only=False)
            store._migrate()
            db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MILLISECONDS}")
        except BaseException:  # a newer schema's StoreError too: no connection left behind
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
            "SELECT relpath, size_bytes, mtime_ns, content_sha256, metadata_sha256, state,"
            " dataset_id FROM files WHERE watch = ?",
            (watch,),
        )
        return {
            row["relpath"]: KnownFile(
                row["size_bytes"],
                row["mtime_ns"],
                row["content_sha256"],
                row["metadata_sha256"],
                row["state"],
                row["dataset_id"],
            )
            for row in rows
        }

    def known_file(self, watch: str, relpath: str) -> KnownFile | None:
        rows = self._query(
            "SELECT size_bytes, mtime_ns, content_sha256, metadata_sha256, state, dataset_id"
            " FROM files WHERE watch = ? AND relpath = ?",
            (watch, relpath),
        )
        return KnownFile(*rows[0]) if rows else None

    def other_owner_of_reference(
        self, dataset_id: str, reference_id: str, watch: str, relpath: str
    ) -> tuple[str, str] | None:
        """(watch, relpath) of another live file that already sends `reference_id` to this
        dataset, if any."""
        rows = self._query(
            "SELECT watch, relpath FROM files WHERE dataset_id = ? AND reference_id = ?"
            " AND state != ? AND vanished = 0 AND NOT (watch = ? AND relpath = ?) LIMIT 1",
            (dataset_id, reference_id, GONE, watch, relpath),
        )
        return (rows[0]["watch"], rows[0]["relpath"]) if rows else None

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

    @_waits_for_disk_space
    def adopt_rows(self, key: str, aliases: Sequence[str], dataset_id: str) -> int:
        """A watch whose key changed (a second watch of its folder came or went) takes over
        the rows recorded under its other key for its dataset, instead of sending them all
        again. Only when it has no rows of its own yet."""
        others = [alias for alias in aliases if alias != key]
        if not others:
            return 0
        with self._transaction() as db:
            if db.execute("SELECT 1 FROM files WHERE watch = ? LIMIT 1", (key,)).fetchone():
                return 0
            cursor = db.execute(
                f"UPDATE files SET watch = ? WHERE watch IN ({_placeholders(len(others))})"
                " AND dataset_id = ?",
                (key, *others, dataset_id),
            )
        if cursor.rowcount:
            log.info("watch_rows_adopted", watch=key, rows=cursor.rowcount)
        return cursor.rowcount

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
            " AND vanished = 0 AND NOT (watch = ? AND relpath = ?) LIMIT 1",
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
        set_values = (
            "dataset_id = ?, reference_id = ?, size_bytes = ?, mtime_ns = ?,"
            " content_sha256 = ?, metadata_json = ?, metadata_sha256 = ?, remote_url = ?"
        )
        state = row["state"]
        if state == IN_FLIGHT:
            sent = (
                row["sent_dataset_id"],
                row["sent_reference_id"],
                row["sent_content_sha256"],
                row["sent_metadata_sha256"],
            )
            requeue = int(sent != version)
            # The file is here again if a delete was seen while the request was out.
            db.execute(
                f"UPDATE files SET {set_values}, requeue = max(requeue, ?), vanished = 0"
                " WHERE id = ?",
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
            f"UPDATE files SET {set_values}, state = ?, update_flag = 0, attempts = 0,"
            " next_attempt_at = 0, last_error = NULL, job_id = NULL, changed_at = ?"
            " WHERE id = ?",
            # update_flag: the claim decides it from what was ever sent (sent_references).
            (*values, PENDING, now, row["id"]),
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
                # Not sendable as it is, so it holds no reference_id: a file that takes the
                # name over (or wins a collision) must not collide with this row.
                db.execute(
                    "UPDATE files SET size_bytes = ?, mtime_ns = ?, state = ?, last_error = ?,"
                    " content_sha256 = NULL, metadata_sha256 = '', reference_id = '',"
                    " changed_at = ? WHERE id = ?",
                    (size_bytes, mtime_ns, state, reason, now, row["id"]),
                )

    @_waits_for_disk_space
    def mark_gone(self, watch: str, relpath: str, now: float | None = None) -> bool:
        """The file was deleted locally. Its item stays in the dataset; the record says so."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return _mark_gone(db, watch, relpath, now)

    @_waits_for_disk_space
    def mark_gone_many(self, watch: str, relpaths: Sequence[str], now: float | None = None) -> int:
        """After a full walk of `watch`: these recorded files are no longer on disk."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            return sum(_mark_gone(db, watch, relpath, now) for relpath in relpaths)

    # -- writing: the upload queue ---------------------------------------------------------

    @_waits_for_disk_space
    def claim_batch(
        self,
        max_items: int,
        *,
        now: float | None = None,
        newest_first: bool = False,
        clock_stepped_after: float | None = None,
        max_bytes: int | None = None,
    ) -> list[FileRecord]:
        """Take up to `max_items` due files that can share one request; they become in_flight.

        A batch shares a dataset and a kind (file bytes or remote URL; remote URLs also share
        `update`, which the JSON form carries once per request). A retry time later than
        `clock_stepped_after` was set before the wall clock stepped back and counts as due.
        With `max_bytes`, a batch of local files stops before the file that would take it over
        that size (the first always goes); remote URLs send no file bytes, so it does not limit
        them.
        """
        now = time.time() if now is None else now
        stepped = float("inf") if clock_stepped_after is None else clock_stepped_after
        order = "DESC" if newest_first else "ASC"
        with self._transaction() as db:
            first = db.execute(
                # INDEXED BY: without it SQLite prefers files_queue for the range on
                # next_attempt_at and then sorts every pending row, on every claim.
                "SELECT id, dataset_id, remote_url IS NOT NULL AS remote,"
                f" (update_flag OR {_MAYBE_ON_SERVER}) AS send_update"
                " FROM files INDEXED BY files_claim"
                " WHERE state = ? AND (next_attempt_at <= ? OR next_attempt_at > ?)"
                f" ORDER BY mtime_ns {order}, id {order} LIMIT 1",
                (PENDING, now, stepped),
            ).fetchone()
            if first is None:
                return []
            if first["remote"]:
                kind_filter = f"remote_url IS NOT NULL AND (update_flag OR {_MAYBE_ON_SERVER}) = ?"
                kind_params: tuple[Any, ...] = (first["send_update"],)
            else:
                kind_filter, kind_params = "remote_url IS NULL", ()
            rows = db.execute(
                f"SELECT {_CLAIM_COLUMNS} FROM files INDEXED BY files_claim"
                " WHERE state = ? AND (next_attempt_at <= ? OR next_attempt_at > ?)"
                f" AND dataset_id = ? AND {kind_filter}"
                f" ORDER BY mtime_ns {order}, id {order} LIMIT ?",
                (PENDING, now, stepped, first["dataset_id"], *kind_params, max_items),
            ).fetchall()
            if max_bytes is not None and not first["remote"]:
                rows = _within_bytes(rows, max_bytes)
            ids = [row["id"] for row in rows]
            in_ids = f"id IN ({_placeholders(len(ids))})"
            # From here the server's copy is unknown until an answer comes: a lost answer may
            # have stored this version, so what was confirmed before no longer counts.
            forget_confirmed = ", ".join(
                f"confirmed_{column} = CASE WHEN {_SAME_AS_CONFIRMED} THEN confirmed_{column}"
                " ELSE NULL END"
                for column in ("dataset_id", "reference_id", "content_sha256", "metadata_sha256")
            )
            db.execute(
                f"UPDATE files SET state = ?, requeue = 0, sent_content_sha256 = content_sha256,"
                f" sent_metadata_sha256 = metadata_sha256, sent_dataset_id = dataset_id,"
                f" sent_reference_id = reference_id, job_id = NULL,"
                f" update_flag = (update_flag OR {_MAYBE_ON_SERVER}), {forget_confirmed}"
                f" WHERE {in_ids}",
                (IN_FLIGHT, *ids),
            )
            db.execute(
                "INSERT INTO sent_references"
                " (dataset_id, reference_id, content_sha256, metadata_sha256)"
                " SELECT dataset_id, reference_id, content_sha256, metadata_sha256 FROM files"
                f" WHERE {in_ids}"
                " ON CONFLICT (dataset_id, reference_id) DO UPDATE SET varied = varied"
                " OR excluded.content_sha256 IS NOT content_sha256"
                " OR excluded.metadata_sha256 IS NOT metadata_sha256",
                ids,
            )
        return [_record(row) for row in rows]

    @_waits_for_disk_space
    def note_streamed_bytes(self, id_: int, content_sha256: str) -> None:
        """The bytes that went out for this row were not the ones it was claimed with (the file
        was rewritten while it streamed). The server may hold them: they count as sent (so the
        next send is an update) and, once confirmed, as what the server holds; the file's
        current version goes again."""
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET sent_content_sha256 = ?,"
                " requeue = CASE WHEN content_sha256 IS ? THEN requeue ELSE 1 END"
                " WHERE id = ? AND state = ?",
                (content_sha256, content_sha256, id_, IN_FLIGHT),
            )
            db.execute(
                "INSERT INTO sent_references"
                " (dataset_id, reference_id, content_sha256, metadata_sha256)"
                " SELECT sent_dataset_id, sent_reference_id, ?, sent_metadata_sha256 FROM files"
                " WHERE id = ? AND sent_reference_id IS NOT NULL"
                " ON CONFLICT (dataset_id, reference_id) DO UPDATE SET varied = varied"
                " OR excluded.content_sha256 IS NOT content_sha256"
                " OR excluded.metadata_sha256 IS NOT metadata_sha256",
                (content_sha256, id_),
            )

    @_waits_for_disk_space
    def mark_job_submitted(self, ids: Sequence[int], job_id: str) -> None:
        """The server took the request as a job; a restart follows the job instead of re-sending."""
        with self._transaction() as db:
            db.execute(
                f"UPDATE files SET job_id = ? WHERE id IN ({_placeholders(len(ids))})",
                (job_id, *ids),
            )

    @_waits_for_disk_space
    def mark_confirmed(self, ids: Sequence[int], now: float | None = None) -> int:
        """The server confirmed these (2xx sync answer or job Completed). Returns how many
        went back to the queue because they changed while the request was out."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            states = db.execute(
                "UPDATE files SET confirmed_dataset_id = sent_dataset_id,"
                " confirmed_reference_id = sent_reference_id,"
                " confirmed_content_sha256 = sent_content_sha256,"
                " confirmed_metadata_sha256 = sent_metadata_sha256, confirmed_at = ?,"
                " attempts = 0, next_attempt_at = 0, last_error = NULL, job_id = NULL,"
                " changed_at = ?,"
                # Deleted while the request was out: the record says gone, and what the server
                # holds. A change that arrived meanwhile goes out next.
                " state = CASE WHEN vanished THEN ? WHEN requeue THEN ? ELSE ? END,"
                " content_sha256 = CASE WHEN vanished THEN NULL ELSE content_sha256 END,"
                " requeue = 0, vanished = 0"
                f" WHERE id IN ({_placeholders(len(ids))}) AND state = ? RETURNING state",
                (now, now, GONE, PENDING, UPLOADED, *ids, IN_FLIGHT),
            ).fetchall()
        return sum(row["state"] == PENDING for row in states)

    @_waits_for_disk_space
    def mark_retry(
        self, ids: Sequence[int], error: str, next_attempt_at: float, *, force_update: bool = False
    ) -> None:
        """Back to the queue after a transient failure (or to re-send with update=true)."""
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET state = CASE WHEN vanished THEN ? ELSE ? END,"
                " attempts = attempts + 1, next_attempt_at = ?,"
                " last_error = ?, job_id = NULL, requeue = 0, vanished = 0,"
                " update_flag = CASE WHEN ? THEN 1 ELSE update_flag END"
                f" WHERE id IN ({_placeholders(len(ids))}) AND state = ?",
                (GONE, PENDING, next_attempt_at, error, int(force_update), *ids, IN_FLIGHT),
            )

    @_waits_for_disk_space
    def mark_failed(self, ids: Sequence[int], error: str, now: float | None = None) -> None:
        """Parked: this will not succeed as it is. `retry` or a change to the file re-queues it."""
        now = time.time() if now is None else now
        with self._transaction() as db:
            db.execute(
                "UPDATE files SET state = CASE WHEN vanished THEN ? WHEN requeue THEN ? ELSE ? END,"
                " attempts = attempts + 1, last_error = ?, job_id = NULL, requeue = 0,"
                f" vanished = 0, changed_at = ? WHERE id IN ({_placeholders(len(ids))})"
                " AND state = ?",
                (GONE, PENDING, FAILED, error, now, *ids, IN_FLIGHT),
            )

    @_waits_for_disk_space
    def release_in_flight(self) -> int:
        """At start: sends that were cut off (no job id) go back to pending, same reference_id."""
        with self._transaction() as db:
            cursor = db.execute(
                "UPDATE files SET state = CASE WHEN vanished THEN ? ELSE ? END,"
                " next_attempt_at = 0, vanished = 0, requeue = 0"
                " WHERE state = ? AND job_id IS NULL",
                (GONE, PENDING, IN_FLIGHT),
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
        wanted = {os.fsencode(path.absolute()) for path in paths}
        with self._transaction() as db:
            rows = db.execute(
                "SELECT id, watch, relpath, metadata_sha256 FROM files WHERE state IN (?, ?)",
                (FAILED, INCOMPLETE),
            ).fetchall()
            if paths:
                # Compared as the bytes of the file's path: keys and text forms aside, these
                # are the files the user named.
                rows = [
                    row
                    for row in rows
                    if os.fsencode(Path(watch_root(row["watch"])) / path_from_text(row["relpath"]))
                    in wanted
                ]
            sent = [row["id"] for row in rows if row["metadata_sha256"]]
            unclassified = [row["id"] for row in rows if not row["metadata_sha256"]]
            if sent:
                db.execute(
                    "UPDATE files SET state = ?, attempts = 0, next_attempt_at = 0"
                    f" WHERE id IN ({_placeholders(len(sent))})",
                    (PENDING, *sent),
                )
            if unclassified:
                db.execute(
                    "UPDATE files SET size_bytes = -1, mtime_ns = -1"
                    f" WHERE id IN ({_placeholders(len(unclassified))})",
                    unclassified,
                )
        return len(sent) + len(unclassified)


def watch_key(root: str, dataset_id: str, *, shared: bool) -> str:
    """How the store names a watch: its root folder; when several watches share one root
    (one folder feeding several datasets), `ROOT//DATASET`, which no normalised path is, so
    `watch_root` can take it apart again."""
    return f"{root}//{dataset_id}" if shared else root


def watch_key_aliases(root: str, dataset_id: str) -> tuple[str, ...]:
    """Both forms `watch_key` can give this watch: when a second watch joins or leaves its
    root, the key changes and the rows recorded under the other form are adopted."""
    return (root, f"{root}//{dataset_id}")


def watch_root(key: str) -> str:
    """The root folder of a watch key (see `watch_key`)."""
    root, separator, _dataset = key.rpartition("//")
    return (root or "/") if separator else key


def _mark_gone(db: sqlite3.Connection, watch: str, relpath: str, now: float) -> bool:
    """A row in flight keeps its state until the answer comes (which ends it `gone`): the
    answer still says what the server holds."""
    cursor = db.execute(
        "UPDATE files SET"
        " state = CASE WHEN state = ? THEN state ELSE ? END,"
        " vanished = CASE WHEN state = ? THEN 1 ELSE 0 END,"
        " content_sha256 = CASE WHEN state = ? THEN content_sha256 ELSE NULL END,"
        " changed_at = ?"
        " WHERE watch = ? AND relpath = ? AND state != ? AND vanished = 0",
        (IN_FLIGHT, GONE, IN_FLIGHT, IN_FLIGHT, now, watch, relpath, GONE),
    )
    return cursor.rowcount > 0


def retry_request_path(state_path: Path) -> Path:
    """Where `retry` leaves its request for a running daemon (which owns the database)."""
    return state_path.with_name(state_path.name + ".retry")


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


def _primary_code(exc: sqlite3.Error) -> int | None:
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # the extended code's low byte is the primary


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database or is malformed (or quick_check found damage)."""
    code = _primary_code(exc)
    if code is not None:
        return code in (sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB)
    text = str(exc)
    return "not a database" in text or "malformed" in text


def _open_hint(code: int | None) -> str:
    if code in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED):
        return "another program holds the database (an sqlite3 shell, a backup?); waiting for it"
    if code == sqlite3.SQLITE_FULL:
        return "the state folder's disk is full: free space there; waiting"
    if code == sqlite3.SQLITE_IOERR:
        return "the disk reported an I/O error: check it is present and has free space; waiting"
    return "waiting for the error to pass"


def _move_aside(path: Path) -> Path:
    """Keep a damaged database (and its -wal/-shm) for a person to look at; never delete it."""
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    for suffix in ("", "-wal", "-shm"):
        source = Path(f"{path}{suffix}")
        if source.exists():
            os.replace(source, Path(f"{aside}{suffix}"))
    return aside
