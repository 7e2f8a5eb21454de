"""Small SQL helpers every part of the store shares."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def write_transaction(db: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE (the write lock up front, so a write never fails half-way for a lock),
    COMMIT on success, ROLLBACK on any exception. The caller holds the store's lock."""
    db.execute("BEGIN IMMEDIATE")
    try:
        yield db
        db.execute("COMMIT")
    except BaseException:
        # SQLite may already have rolled back by itself (a full disk does that).
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def placeholders(count: int) -> str:
    """`?,?,?` for an `IN (...)` of `count` values."""
    return ",".join("?" * count)
