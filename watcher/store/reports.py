"""What `status`, `scan`, the metrics and the daemon's own bookkeeping ask of the store:
counts, ages, throughput and the jobs still out. Reads only."""

from __future__ import annotations

import sqlite3

from watcher.store.states import IN_FLIGHT, PENDING, STATES


def counts(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """watch -> state -> count."""
    result: dict[str, dict[str, int]] = {}
    rows = db.execute("SELECT watch, state, count(*) AS n FROM files GROUP BY watch, state")
    for row in rows.fetchall():
        result.setdefault(row["watch"], {})[row["state"]] = row["n"]
    return result


def state_counts(db: sqlite3.Connection) -> dict[str, int]:
    """state -> count, every state present."""
    totals = dict.fromkeys(STATES, 0)
    for row in db.execute("SELECT state, count(*) AS n FROM files GROUP BY state").fetchall():
        totals[row["state"]] = row["n"]
    return totals


def oldest_pending_first_seen(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT min(first_seen_at) AS t FROM files WHERE state IN (?, ?)", (PENDING, IN_FLIGHT)
    ).fetchone()
    return None if row is None or row["t"] is None else float(row["t"])


def next_due_at(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT min(next_attempt_at) AS t FROM files WHERE state = ?", (PENDING,)
    ).fetchone()
    return None if row is None or row["t"] is None else float(row["t"])


def confirmed_since(db: sqlite3.Connection, since: float) -> tuple[int, int]:
    """(files, bytes) confirmed after `since` (unix seconds): the recent throughput."""
    row = db.execute(
        "SELECT count(*) AS n, coalesce(sum(size_bytes), 0) AS b FROM files"
        " WHERE confirmed_at >= ?",
        (since,),
    ).fetchone()
    return int(row["n"]), int(row["b"])


def has_unfinished(db: sqlite3.Connection, max_attempts: int) -> bool:
    """Anything in flight, or pending with fewer than `max_attempts` tries? Two indexed
    look-ups that stop at the first row, not a count: `scan` asks this several times a
    second while a large backlog drains."""
    row = db.execute(
        "SELECT EXISTS (SELECT 1 FROM files WHERE state = ?)"
        " OR EXISTS (SELECT 1 FROM files WHERE state = ? AND attempts < ?) AS unfinished",
        (IN_FLIGHT, PENDING, max_attempts),
    ).fetchone()
    return bool(row["unfinished"])


def jobs_in_flight(db: sqlite3.Connection) -> dict[str, list[int]]:
    """job_id -> ids of the files it carries, for jobs submitted but not yet finished."""
    jobs: dict[str, list[int]] = {}
    for row in db.execute(
        "SELECT id, job_id FROM files WHERE state = ? AND job_id IS NOT NULL", (IN_FLIGHT,)
    ).fetchall():
        jobs.setdefault(row["job_id"], []).append(row["id"])
    return jobs
