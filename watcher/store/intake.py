"""Recording what is on disk: a candidate file (and whether it must be sent), a file that
cannot be sent as it is, a file that is gone, and the rows a watch takes over from its other
key."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

import structlog

from watcher.store.records import Candidate
from watcher.store.sql import placeholders
from watcher.store.states import FAILED, GONE, IN_FLIGHT, PENDING, UPLOADED

log = structlog.get_logger("watcher.store")


def other_owner_of_reference(
    db: sqlite3.Connection, dataset_id: str, reference_id: str, watch: str, relpath: str
) -> tuple[str, str] | None:
    """(watch, relpath) of another live file that already sends `reference_id` to this
    dataset, if any."""
    row = db.execute(
        "SELECT watch, relpath FROM files WHERE dataset_id = ? AND reference_id = ?"
        " AND state != ? AND vanished = 0 AND NOT (watch = ? AND relpath = ?) LIMIT 1",
        (dataset_id, reference_id, GONE, watch, relpath),
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
    adopted = db.execute(
        f"UPDATE files SET watch = ? WHERE watch IN ({placeholders(len(others))})"
        " AND dataset_id = ?",
        (key, *others, dataset_id),
    ).rowcount
    if adopted:
        log.info("watch_rows_adopted", watch=key, rows=adopted)
    return adopted


def record_candidate(db: sqlite3.Connection, candidate: Candidate, now: float) -> str:
    """Record what is on disk now; decide whether it must be sent (see
    `StateStore.record_candidate` for what the answer means)."""
    metadata_json = json.dumps(candidate.metadata, sort_keys=True, ensure_ascii=False)
    if other_owner_of_reference(
        db, candidate.dataset_id, candidate.reference_id, candidate.watch, candidate.relpath
    ):
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
            f"UPDATE files SET {set_values}, requeue = max(requeue, ?), vanished = 0 WHERE id = ?",
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


def record_problem(
    db: sqlite3.Connection,
    *,
    watch: str,
    relpath: str,
    dataset_id: str,
    size_bytes: int,
    mtime_ns: int,
    state: str,
    reason: str,
    now: float,
) -> None:
    """A file that cannot be sent as it is (incomplete, not an image, bad name): say why."""
    row = db.execute(
        "SELECT id, state FROM files WHERE watch = ? AND relpath = ?", (watch, relpath)
    ).fetchone()
    if row is None:
        db.execute(
            "INSERT INTO files (watch, relpath, dataset_id, reference_id, size_bytes,"
            " mtime_ns, metadata_json, metadata_sha256, state, last_error, first_seen_at,"
            " changed_at) VALUES (?,?,?,'',?,?,'{}','',?,?,?,?)",
            (watch, relpath, dataset_id, size_bytes, mtime_ns, state, reason, now, now),
        )
    elif row["state"] != IN_FLIGHT:
        # Not sendable as it is, so it holds no reference_id: a file that takes the name over
        # (or wins a collision) must not collide with this row.
        db.execute(
            "UPDATE files SET size_bytes = ?, mtime_ns = ?, state = ?, last_error = ?,"
            " content_sha256 = NULL, metadata_sha256 = '', reference_id = '',"
            " changed_at = ? WHERE id = ?",
            (size_bytes, mtime_ns, state, reason, now, row["id"]),
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
            (IN_FLIGHT, GONE, IN_FLIGHT, IN_FLIGHT, now, watch, relpath, GONE)
            for relpath in relpaths
        ],
    ).rowcount
