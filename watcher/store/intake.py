"""Recording what is on disk: a candidate file (and whether it must be sent), a file that
cannot be sent as it is, a file that is gone, and the rows a watch takes over from its other
key."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import assert_never

from watcher.store.intake_decision import (
    NO_VERSION,
    IntakeDecision,
    IntakeOutcome,
    OnRecord,
    Version,
    decide_intake,
)
from watcher.store.records import Candidate
from watcher.store.sql import placeholders
from watcher.store.states import FileState, parse_state


def other_owner_of_reference(
    db: sqlite3.Connection, dataset_id: str, reference_id: str, watch: str, relpath: str
) -> tuple[str, str] | None:
    """(watch, relpath) of another live file that already sends `reference_id` to this
    dataset, if any."""
    row = db.execute(
        "SELECT watch, relpath FROM files WHERE dataset_id = ? AND reference_id = ?"
        " AND classified AND state != ? AND vanished = 0"
        " AND NOT (watch = ? AND relpath = ?) LIMIT 1",
        (dataset_id, reference_id, FileState.GONE, watch, relpath),
    ).fetchone()
    return None if row is None else (row["watch"], row["relpath"])


def adopt_rows(db: sqlite3.Connection, key: str, aliases: Sequence[str], dataset_id: str) -> int:
    """A watch whose key changed (a second watch of its folder came or went) takes over the
    rows recorded under its other key for its dataset, instead of sending them all again. Only
    when it has no rows of its own yet."""
    others = [alias for alias in aliases if alias != key]
    if not others:
        return 0
    if db.execute("SELECT 1 FROM files WHERE watch = ? LIMIT 1", (key,)).fetchone():
        return 0
    return db.execute(
        f"UPDATE files SET watch = ? WHERE watch IN ({placeholders(len(others))})"
        " AND dataset_id = ?",
        (key, *others, dataset_id),
    ).rowcount


_VERSIONS = ", ".join(
    f"{prefix}{column}"
    for prefix in ("", "sent_", "confirmed_")
    for column in ("dataset_id", "reference_id", "content_sha256", "metadata_sha256")
)


def _version(row: sqlite3.Row, prefix: str) -> Version:
    return Version(
        row[f"{prefix}dataset_id"],
        row[f"{prefix}reference_id"],
        row[f"{prefix}content_sha256"],
        row[f"{prefix}metadata_sha256"],
    )


def _on_record(row: sqlite3.Row) -> OnRecord:
    return OnRecord(
        state=parse_state(row["state"]),
        current=_version(row, "") if row["classified"] else NO_VERSION,
        sent=_version(row, "sent_"),
        confirmed=_version(row, "confirmed_"),
    )


_SET_VERSION = (
    "dataset_id = ?, reference_id = ?, size_bytes = ?, mtime_ns = ?, content_sha256 = ?,"
    " metadata_json = ?, metadata_sha256 = ?, remote_url = ?, classified = 1, reexamine = 0"
)


def record_candidate(db: sqlite3.Connection, candidate: Candidate, now: float) -> IntakeOutcome:
    """Record what is on disk now; decide whether it must be sent (see `decide_intake`)."""
    taken = other_owner_of_reference(
        db, candidate.dataset_id, candidate.reference_id, candidate.watch, candidate.relpath
    )
    row = db.execute(
        f"SELECT id, state, classified, {_VERSIONS} FROM files WHERE watch = ? AND relpath = ?",
        (candidate.watch, candidate.relpath),
    ).fetchone()
    on_record = None if row is None else _on_record(row)
    decision = decide_intake(on_record, candidate, reference_taken=taken is not None)
    _apply(db, decision, candidate, None if row is None else row["id"], now)
    return decision.outcome


def _apply(
    db: sqlite3.Connection,
    decision: IntakeDecision,
    candidate: Candidate,
    row_id: int | None,
    now: float,
) -> None:
    """Write what `decision` says: the candidate's version, plus the state change."""
    if decision is IntakeDecision.REFUSE_COLLISION:
        return
    values = (
        candidate.dataset_id,
        candidate.reference_id,
        candidate.size_bytes,
        candidate.mtime_ns,
        candidate.content_sha256,
        json.dumps(candidate.metadata, sort_keys=True, ensure_ascii=False),
        candidate.metadata_sha256,
        candidate.remote_url,
    )
    if decision is IntakeDecision.INSERT:
        db.execute(
            "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
            " mtime_ns, content_sha256, metadata_json, metadata_sha256, remote_url, state,"
            " first_seen_at, changed_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
            (candidate.watch, candidate.relpath, *values, FileState.PENDING, now, now),
        )
        return
    change, params = _state_change(decision, now)
    db.execute(f"UPDATE files SET {_SET_VERSION}{change} WHERE id = ?", (*values, *params, row_id))


def _state_change(decision: IntakeDecision, now: float) -> tuple[str, tuple[object, ...]]:
    """The SET clauses (after the version's) an update of an existing row adds, and their
    parameters."""
    match decision:
        case IntakeDecision.NOTE_WHILE_IN_FLIGHT:
            # The file is here again if a delete was seen while the request was out.
            return ", vanished = 0", ()
        case IntakeDecision.REQUEUE_AFTER_SEND:
            return ", requeue = 1, vanished = 0", ()
        case IntakeDecision.MARK_UPLOADED:
            return (
                ", state = ?, last_error = NULL,"
                " changed_at = CASE WHEN state = ? THEN changed_at ELSE ? END",
                (FileState.UPLOADED, FileState.UPLOADED, now),
            )
        case IntakeDecision.KEEP_QUEUED:
            return "", ()
        case IntakeDecision.QUEUE:
            # update_flag: the claim decides it from what was ever sent (sent_references).
            return (
                ", state = ?, update_flag = 0, attempts = 0, next_attempt_at = 0,"
                " last_error = NULL, job_id = NULL, changed_at = ?",
                (FileState.PENDING, now),
            )
        case IntakeDecision.REFUSE_COLLISION | IntakeDecision.INSERT:
            raise ValueError(f"{decision} does not update a row")
        case _:
            assert_never(decision)


def record_problem(
    db: sqlite3.Connection,
    *,
    watch: str,
    relpath: str,
    dataset_id: str,
    size_bytes: int | None,
    mtime_ns: int | None,
    state: FileState,
    reason: str,
    now: float,
) -> None:
    """A file that cannot be sent as it is (incomplete, not an image, bad name): say why.

    The row is left unclassified: not sendable as it is, it holds no reference_id, so a file
    that takes the name over (or wins a collision) does not collide with it. Without a size
    and mtime (the file could not be stat'ed) the next walk looks at it again.
    """
    row = db.execute(
        "SELECT id, state FROM files WHERE watch = ? AND relpath = ?", (watch, relpath)
    ).fetchone()
    reexamine = int(size_bytes is None or mtime_ns is None)
    if row is None:
        db.execute(
            "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
            " mtime_ns, metadata_json, metadata_sha256, state, last_error, first_seen_at,"
            " changed_at, classified, reexamine) VALUES (?,?,?,'',?,?,'{}','',?,?,?,?,0,?)",
            # A size and mtime not known are 0: `reexamine` says they are not to be trusted.
            (
                watch,
                relpath,
                dataset_id,
                size_bytes or 0,
                mtime_ns or 0,
                state,
                reason,
                now,
                now,
                reexamine,
            ),
        )
    elif row["state"] != FileState.IN_FLIGHT:
        db.execute(
            "UPDATE files SET size_bytes = coalesce(?, size_bytes),"
            " mtime_ns = coalesce(?, mtime_ns), state = ?, last_error = ?,"
            " content_sha256 = NULL, metadata_sha256 = '', reference_id = '', classified = 0,"
            " reexamine = ?, changed_at = ? WHERE id = ?",
            (size_bytes, mtime_ns, state, reason, reexamine, now, row["id"]),
        )


def mark_gone(db: sqlite3.Connection, watch: str, relpaths: Sequence[str], now: float) -> int:
    """These files were deleted locally; their items stay in the dataset and the record says
    so. Returns how many rows that changed. A row in flight keeps its state until the answer
    comes (which ends it `gone`): the answer still says what the server holds."""
    return db.executemany(
        "UPDATE files SET"
        " state = CASE WHEN state = ? THEN state ELSE ? END,"
        " vanished = CASE WHEN state = ? THEN 1 ELSE 0 END,"
        " content_sha256 = CASE WHEN state = ? THEN content_sha256 ELSE NULL END,"
        " changed_at = ?"
        " WHERE watch = ? AND relpath = ? AND state != ? AND vanished = 0",
        [
            (
                FileState.IN_FLIGHT,
                FileState.GONE,
                FileState.IN_FLIGHT,
                FileState.IN_FLIGHT,
                now,
                watch,
                relpath,
                FileState.GONE,
            )
            for relpath in relpaths
        ],
    ).rowcount
