"""What `status`, `scan`, the metrics and the daemon's own bookkeeping ask of the store:
counts, ages, throughput and the jobs still out. Reads only."""

from __future__ import annotations

import sqlite3

from watcher.store.states import FileState, parse_state


def counts(db: sqlite3.Connection) -> dict[str, dict[FileState, int]]:
    """watch -> state -> count, for the states that have rows.

    A row in a state this version does not know (a newer version wrote it) is in no count:
    neither backlog nor a problem. Its watch is still listed.
    """
    result: dict[str, dict[FileState, int]] = {}
    rows = db.execute("SELECT watch, state, count(*) AS n FROM files GROUP BY watch, state")
    for row in rows.fetchall():
        by_state = result.setdefault(row["watch"], {})
        state = parse_state(row["state"])
        if isinstance(state, FileState):
            by_state[state] = row["n"]
    return result


def state_counts(db: sqlite3.Connection) -> dict[FileState, int]:
    """state -> count, every state present (unknown states as in `counts`)."""
    totals = dict.fromkeys(FileState, 0)
    for row in db.execute("SELECT state, count(*) AS n FROM files GROUP BY state").fetchall():
        state = parse_state(row["state"])
        if isinstance(state, FileState):
            totals[state] = row["n"]
    return totals


def oldest_pending_first_seen(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT min(first_seen_at) AS t FROM files WHERE state IN (?, ?)",
        (FileState.PENDING, FileState.IN_FLIGHT),
    ).fetchone()
    return None if row is None or row["t"] is None else float(row["t"])


def next_due_at(db: sqlite3.Connection) -> float | None:
    row = db.execute(
        "SELECT min(next_attempt_at) AS t FROM files WHERE state = ?", (FileState.PENDING,)
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
        (FileState.IN_FLIGHT, FileState.PENDING, max_attempts),
    ).fetchone()
    return bool(row["unfinished"])


def jobs_in_flight(db: sqlite3.Connection) -> dict[str, list[int]]:
    """job_id -> ids of the files it carries, for jobs submitted but not yet finished."""
    jobs: dict[str, list[int]] = {}
    for row in db.execute(
        "SELECT id, job_id FROM files WHERE state = ? AND job_id IS NOT NULL",
        (FileState.IN_FLIGHT,),
    ).fetchall():
        jobs.setdefault(row["job_id"], []).append(row["id"])
    return jobs
