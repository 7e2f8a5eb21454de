"""The database's schema: the ordered migrations, and running the ones a database lacks.

PRAGMA user_version says how many steps have run; a database from a newer release (more steps
than this one knows) is refused rather than guessed at.
"""

from __future__ import annotations

import sqlite3
from pathlib import Path

from watcher.errors import StoreError
from watcher.store.sql import write_transaction

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
    # Explicit columns for what sentinel values used to say. `classified = 0`: the file was
    # refused before it had a version to send (a path rule, not an image, incomplete), which
    # an empty reference_id and metadata_sha256 used to mean. `reexamine = 1`: the next walk
    # looks at the file whatever its size and mtime (after `retry`, or when it could not be
    # stat'ed), which a size of -1 used to mean; those sizes become 0, known to be unknown.
    """
    ALTER TABLE files ADD COLUMN classified INTEGER NOT NULL DEFAULT 1;
    ALTER TABLE files ADD COLUMN reexamine INTEGER NOT NULL DEFAULT 0;
    UPDATE files SET classified = 0 WHERE metadata_sha256 = '';
    UPDATE files SET reexamine = 1, size_bytes = 0, mtime_ns = 0 WHERE size_bytes = -1;
    """,
)


def migrate(db: sqlite3.Connection, path: Path) -> None:
    """Run the steps `db` has not had yet, each in its own transaction with its version."""
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version > len(_MIGRATIONS):
        raise StoreError(
            f"{path}: written by a newer nucleus-watcher (schema {version}); upgrade first"
        )
    for number, step in enumerate(_MIGRATIONS[version:], start=version + 1):
        with write_transaction(db):
            for statement in step.split(";"):
                if statement.strip():
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {number}")
