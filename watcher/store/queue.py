"""The upload queue's state machine: claiming a batch, and what each answer does to it.

pending -> in_flight (claim_batch) -> uploaded (mark_confirmed), back to pending with a retry
time (mark_retry), or failed (mark_failed). A row deleted while its request was out (`vanished`)
ends `gone` whichever answer comes. Every (dataset, reference_id) a send was attempted for is
kept in `sent_references`, so a later send that may replace what the server holds is an update.
"""

from __future__ import annotations

import os
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from watcher.files import path_from_text
from watcher.store.keys import watch_root
from watcher.store.records import COLUMNS, FileRecord, record_from_row
from watcher.store.sql import placeholders
from watcher.store.states import FileState

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
# A claim reads the update flag the send will carry: forced (on_conflict), or because an earlier
# send of the same reference_id may have reached the server.
_CLAIM_COLUMNS = COLUMNS.replace(
    " update_flag,", f" (update_flag OR {_MAYBE_ON_SERVER}) AS update_flag,"
)
# Remembers a version as sent; a second, different version of one reference_id marks it varied.
_NOTE_SENT = (
    " ON CONFLICT (dataset_id, reference_id) DO UPDATE SET varied = varied"
    " OR excluded.content_sha256 IS NOT content_sha256"
    " OR excluded.metadata_sha256 IS NOT metadata_sha256"
)
# INDEXED BY: without it SQLite prefers files_queue for the range on next_attempt_at and then
# sorts every pending row, on every claim.
_DUE = (
    "FROM files INDEXED BY files_claim"
    " WHERE state = ? AND (next_attempt_at <= ? OR next_attempt_at > ?)"
)


def claim_batch(
    db: sqlite3.Connection,
    max_items: int,
    *,
    now: float,
    newest_first: bool,
    clock_stepped_after: float | None,
    max_bytes: int | None,
) -> list[FileRecord]:
    """Take up to `max_items` due files that can share one request; they become in_flight.

    A batch shares a dataset and a kind (file bytes or remote URL; remote URLs also share
    `update`, which the JSON form carries once per request). A retry time later than
    `clock_stepped_after` was set before the wall clock stepped back and counts as due.
    With `max_bytes`, a batch of local files stops before the file that would take it over
    that size (the first always goes); remote URLs send no file bytes, so it does not limit
    them.
    """
    stepped = float("inf") if clock_stepped_after is None else clock_stepped_after
    order = "DESC" if newest_first else "ASC"
    due = (FileState.PENDING, now, stepped)
    first = db.execute(
        "SELECT id, dataset_id, remote_url IS NOT NULL AS remote,"
        f" (update_flag OR {_MAYBE_ON_SERVER}) AS send_update {_DUE}"
        f" ORDER BY mtime_ns {order}, id {order} LIMIT 1",
        due,
    ).fetchone()
    if first is None:
        return []
    if first["remote"]:
        kind_filter = f"remote_url IS NOT NULL AND (update_flag OR {_MAYBE_ON_SERVER}) = ?"
        kind_params: tuple[Any, ...] = (first["send_update"],)
    else:
        kind_filter, kind_params = "remote_url IS NULL", ()
    rows = db.execute(
        f"SELECT {_CLAIM_COLUMNS} {_DUE} AND dataset_id = ? AND {kind_filter}"
        f" ORDER BY mtime_ns {order}, id {order} LIMIT ?",
        (*due, first["dataset_id"], *kind_params, max_items),
    ).fetchall()
    if max_bytes is not None and not first["remote"]:
        rows = _within_bytes(rows, max_bytes)
    _mark_in_flight(db, [row["id"] for row in rows])
    return [record_from_row(row) for row in rows]


def _within_bytes(rows: list[sqlite3.Row], max_bytes: int) -> list[sqlite3.Row]:
    """The leading rows whose sizes add up to at most `max_bytes`, and at least the first."""
    total = 0
    for count, row in enumerate(rows):
        total += row["size_bytes"]
        if count and total > max_bytes:
            return rows[:count]
    return rows


def _mark_in_flight(db: sqlite3.Connection, ids: list[int]) -> None:
    """The claimed rows go out: note what they carry, here and in `sent_references`."""
    in_ids = f"id IN ({placeholders(len(ids))})"
    # From here the server's copy is unknown until an answer comes: a lost answer may have
    # stored this version, so what was confirmed before no longer counts.
    forget_confirmed = ", ".join(
        f"confirmed_{column} = CASE WHEN {_SAME_AS_CONFIRMED} THEN confirmed_{column} ELSE NULL END"
        for column in ("dataset_id", "reference_id", "content_sha256", "metadata_sha256")
    )
    db.execute(
        f"UPDATE files SET state = ?, requeue = 0, sent_content_sha256 = content_sha256,"
        f" sent_metadata_sha256 = metadata_sha256, sent_dataset_id = dataset_id,"
        f" sent_reference_id = reference_id, job_id = NULL,"
        f" update_flag = (update_flag OR {_MAYBE_ON_SERVER}), {forget_confirmed}"
        f" WHERE {in_ids}",
        (FileState.IN_FLIGHT, *ids),
    )
    db.execute(
        "INSERT INTO sent_references (dataset_id, reference_id, content_sha256, metadata_sha256)"
        f" SELECT dataset_id, reference_id, content_sha256, metadata_sha256 FROM files"
        f" WHERE {in_ids}{_NOTE_SENT}",
        ids,
    )


def note_streamed_bytes(db: sqlite3.Connection, id_: int, content_sha256: str) -> None:
    """The bytes that went out for this row were not the ones it was claimed with (the file
    was rewritten while it streamed). The server may hold them: they count as sent (so the
    next send is an update) and, once confirmed, as what the server holds; the file's
    current version goes again."""
    db.execute(
        "UPDATE files SET sent_content_sha256 = ?,"
        " requeue = CASE WHEN content_sha256 IS ? THEN requeue ELSE 1 END"
        " WHERE id = ? AND state = ?",
        (content_sha256, content_sha256, id_, FileState.IN_FLIGHT),
    )
    db.execute(
        "INSERT INTO sent_references (dataset_id, reference_id, content_sha256, metadata_sha256)"
        " SELECT sent_dataset_id, sent_reference_id, ?, sent_metadata_sha256 FROM files"
        f" WHERE id = ? AND sent_reference_id IS NOT NULL{_NOTE_SENT}",
        (content_sha256, id_),
    )


def mark_job_submitted(db: sqlite3.Connection, ids: Sequence[int], job_id: str) -> None:
    """The server took the request as a job; a restart follows the job instead of re-sending."""
    db.execute(
        f"UPDATE files SET job_id = ? WHERE id IN ({placeholders(len(ids))})", (job_id, *ids)
    )


def mark_confirmed(db: sqlite3.Connection, ids: Sequence[int], now: float) -> int:
    """The server confirmed these (2xx sync answer or job Completed). Returns how many
    went back to the queue because they changed while the request was out."""
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
        f" WHERE id IN ({placeholders(len(ids))}) AND state = ? RETURNING state",
        (
            now,
            now,
            FileState.GONE,
            FileState.PENDING,
            FileState.UPLOADED,
            *ids,
            FileState.IN_FLIGHT,
        ),
    ).fetchall()
    return sum(row["state"] == FileState.PENDING for row in states)


def mark_retry(
    db: sqlite3.Connection,
    ids: Sequence[int],
    error: str,
    next_attempt_at: float,
    *,
    force_update: bool,
) -> None:
    """Back to the queue after a transient failure (or to re-send with update=true)."""
    db.execute(
        "UPDATE files SET state = CASE WHEN vanished THEN ? ELSE ? END,"
        " attempts = attempts + 1, next_attempt_at = ?,"
        " last_error = ?, job_id = NULL, requeue = 0, vanished = 0,"
        " update_flag = CASE WHEN ? THEN 1 ELSE update_flag END"
        f" WHERE id IN ({placeholders(len(ids))}) AND state = ?",
        (
            FileState.GONE,
            FileState.PENDING,
            next_attempt_at,
            error,
            int(force_update),
            *ids,
            FileState.IN_FLIGHT,
        ),
    )


def mark_failed(db: sqlite3.Connection, ids: Sequence[int], error: str, now: float) -> None:
    """Parked: this will not succeed as it is. `retry` or a change to the file re-queues it."""
    db.execute(
        "UPDATE files SET state = CASE WHEN vanished THEN ? WHEN requeue THEN ? ELSE ? END,"
        " attempts = attempts + 1, last_error = ?, job_id = NULL, requeue = 0,"
        f" vanished = 0, changed_at = ? WHERE id IN ({placeholders(len(ids))})"
        " AND state = ?",
        (
            FileState.GONE,
            FileState.PENDING,
            FileState.FAILED,
            error,
            now,
            *ids,
            FileState.IN_FLIGHT,
        ),
    )


def release_in_flight(db: sqlite3.Connection) -> int:
    """At start: sends that were cut off (no job id) go back to pending, same reference_id."""
    return db.execute(
        "UPDATE files SET state = CASE WHEN vanished THEN ? ELSE ? END,"
        " next_attempt_at = 0, vanished = 0, requeue = 0"
        " WHERE state = ? AND job_id IS NULL",
        (FileState.GONE, FileState.PENDING, FileState.IN_FLIGHT),
    ).rowcount


def reset_pending_attempts(db: sqlite3.Connection) -> int:
    """A new `scan` run: items still pending from an earlier run get a fresh set of tries."""
    return db.execute(
        "UPDATE files SET attempts = 0, next_attempt_at = 0 WHERE state = ?", (FileState.PENDING,)
    ).rowcount


def requeue_failed(db: sqlite3.Connection, paths: Sequence[Path]) -> int:
    """`retry`: failed and incomplete items (all, or those at `paths`) get another go.

    Items that reached the server and were refused go back to pending as they are; files
    refused before classification (not an image, incomplete, ...) are marked for the next
    reconcile to look at again, since only a fresh look can tell whether they are fixed.
    """
    rows = db.execute(
        "SELECT id, watch, relpath, classified FROM files WHERE state IN (?, ?)",
        (FileState.FAILED, FileState.INCOMPLETE),
    ).fetchall()
    if paths:
        # Compared as the bytes of the file's path: keys and text forms aside, these are the
        # files the user named.
        wanted = {os.fsencode(path.absolute()) for path in paths}
        rows = [
            row
            for row in rows
            if os.fsencode(Path(watch_root(row["watch"])) / path_from_text(row["relpath"]))
            in wanted
        ]
    sent = [row["id"] for row in rows if row["classified"]]
    unclassified = [row["id"] for row in rows if not row["classified"]]
    if sent:
        db.execute(
            "UPDATE files SET state = ?, attempts = 0, next_attempt_at = 0"
            f" WHERE id IN ({placeholders(len(sent))})",
            (FileState.PENDING, *sent),
        )
    if unclassified:
        db.execute(
            f"UPDATE files SET reexamine = 1 WHERE id IN ({placeholders(len(unclassified))})",
            unclassified,
        )
    return len(sent) + len(unclassified)
