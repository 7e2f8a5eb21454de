"""The record types (a row as the uploader, the reconcile and the commands see it), how a row
becomes one, and the queries that read records whole."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from watcher.files import path_from_text
from watcher.store.keys import watch_root
from watcher.store.sql import placeholders
from watcher.store.states import FileState, UnknownState, parse_state


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
    state: FileState | UnknownState
    update_flag: bool
    attempts: int
    next_attempt_at: float
    last_error: str | None
    job_id: str | None
    confirmed_at: float | None
    first_seen_at: float
    confirmed_content_sha256: str | None = None
    # False: refused before classification (a path rule or a bad file parked it), so it has
    # no version to send; reference_id and metadata_sha256 are empty.
    classified: bool = True

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
    state: FileState | UnknownState
    dataset_id: str
    classified: bool  # see FileRecord.classified
    reexamine: bool  # look at the file again, whatever its size and mtime


COLUMNS = (
    "id, watch, relpath, dataset_id, reference_id, size_bytes, mtime_ns, content_sha256,"
    " metadata_json, metadata_sha256, remote_url, state, update_flag, attempts,"
    " next_attempt_at, last_error, job_id, confirmed_at, first_seen_at, confirmed_content_sha256,"
    " classified"
)
_KNOWN_COLUMNS = (
    "size_bytes, mtime_ns, content_sha256, metadata_sha256, state, dataset_id, classified,"
    " reexamine"
)


def record_from_row(row: sqlite3.Row) -> FileRecord:
    """A row selected with `COLUMNS` (or the queue's claim columns)."""
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
        state=parse_state(row["state"]),
        update_flag=bool(row["update_flag"]),
        attempts=row["attempts"],
        next_attempt_at=row["next_attempt_at"],
        last_error=row["last_error"],
        job_id=row["job_id"],
        confirmed_at=row["confirmed_at"],
        first_seen_at=row["first_seen_at"],
        confirmed_content_sha256=row["confirmed_content_sha256"],
        classified=bool(row["classified"]),
    )


def _known_from_row(row: sqlite3.Row) -> KnownFile:
    return KnownFile(
        row["size_bytes"],
        row["mtime_ns"],
        row["content_sha256"],
        row["metadata_sha256"],
        parse_state(row["state"]),
        row["dataset_id"],
        bool(row["classified"]),
        bool(row["reexamine"]),
    )


def _records(db: sqlite3.Connection, where: str, params: Sequence[Any]) -> list[FileRecord]:
    """Whole records: `where` is the SQL after WHERE (conditions, order, limit)."""
    rows = db.execute(f"SELECT {COLUMNS} FROM files WHERE {where}", params).fetchall()
    return [record_from_row(row) for row in rows]


def get(db: sqlite3.Connection, watch: str, relpath: str) -> FileRecord | None:
    records = _records(db, "watch = ? AND relpath = ?", (watch, relpath))
    return records[0] if records else None


def get_many(db: sqlite3.Connection, ids: Sequence[int]) -> list[FileRecord]:
    return _records(db, f"id IN ({placeholders(len(ids))})", list(ids))


def in_state(db: sqlite3.Connection, state: FileState, limit: int) -> list[FileRecord]:
    """The most recently changed first."""
    return _records(db, "state = ? ORDER BY changed_at DESC LIMIT ?", (state, limit))


def recent_errors(db: sqlite3.Connection, limit: int) -> list[FileRecord]:
    return _records(db, "last_error IS NOT NULL ORDER BY changed_at DESC LIMIT ?", (limit,))


def uploaded_oldest_first(db: sqlite3.Connection, watch: str, limit: int) -> list[FileRecord]:
    """Confirmed files still on disk, oldest first: what a full disk may give up first."""
    return _records(
        db,
        "watch = ? AND state = ? ORDER BY mtime_ns ASC, id ASC LIMIT ?",
        (watch, FileState.UPLOADED, limit),
    )


def known_files(db: sqlite3.Connection, watch: str) -> dict[str, KnownFile]:
    """Everything a reconcile needs to skip unchanged files, in one indexed query."""
    rows = db.execute(
        f"SELECT relpath, {_KNOWN_COLUMNS} FROM files WHERE watch = ?", (watch,)
    ).fetchall()
    return {row["relpath"]: _known_from_row(row) for row in rows}


def known_file(db: sqlite3.Connection, watch: str, relpath: str) -> KnownFile | None:
    row = db.execute(
        f"SELECT {_KNOWN_COLUMNS} FROM files WHERE watch = ? AND relpath = ?", (watch, relpath)
    ).fetchone()
    return None if row is None else _known_from_row(row)
