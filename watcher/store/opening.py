"""Opening the database: one writer process (an advisory lock), errors that pass waited out,
damage moved aside for a person to look at, and the read-only opening `status` uses.

Only damage moves a database aside. A lock held by another program, a full disk or an I/O
error is waited out for a while and then reported: moving a healthy record aside would re-send
everything.
"""

from __future__ import annotations

import fcntl
import os
import sqlite3
import time
from datetime import UTC, datetime
from pathlib import Path

import structlog

from watcher.errors import StoreBusyError, StoreError
from watcher.store.keys import lock_path
from watcher.store.schema import migrate

log = structlog.get_logger("watcher.store")

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


def open_for_writing(path: Path, retry_seconds: float) -> tuple[sqlite3.Connection, int]:
    """The database at `path`, created or migrated, and the owner lock's descriptor (closing
    it releases the lock). A damaged database is moved aside and a new one started."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise StoreError(f"{path.parent}: cannot create the state folder: {exc.strerror}") from exc
    owner_lock = _take_owner_lock(path)
    try:
        try:
            db = _open_retrying(path, retry_seconds)
        except sqlite3.DatabaseError as exc:
            aside = _move_aside(path)
            log.error("state_db_corrupt", path=str(path), moved_to=str(aside), error=str(exc))
            try:
                db = _open_retrying(path, retry_seconds)
            except sqlite3.DatabaseError as again:
                raise StoreError(f"{path}: cannot create the state database: {again}") from again
    except BaseException:
        os.close(owner_lock)
        raise
    return db, owner_lock


def open_read_only(path: Path) -> sqlite3.Connection:
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
    return db


def _open_retrying(path: Path, retry_seconds: float) -> sqlite3.Connection:
    """`_open_checked`, again and again while the failure is one that passes.

    Raises sqlite3.DatabaseError only for damage; StoreError for everything else.
    """
    started = time.monotonic()
    delay_seconds = _OPEN_FIRST_DELAY_SECONDS
    announced = False
    while True:
        try:
            db = _open_checked(path)
        except sqlite3.DatabaseError as exc:
            if _is_damage(exc):
                raise
            code = primary_code(exc)
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
        return db


def _open_checked(path: Path) -> sqlite3.Connection:
    # A short busy wait: a lock held longer is retried by the caller, with a log line.
    db = sqlite3.connect(
        path, isolation_level=None, check_same_thread=False, timeout=_OPEN_BUSY_SECONDS
    )
    try:
        result = db.execute("PRAGMA quick_check").fetchone()
        if result is None or result[0] != "ok":
            damaged = sqlite3.DatabaseError(f"quick_check: {result[0] if result else 'no answer'}")
            damaged.sqlite_errorcode = sqlite3.SQLITE_CORRUPT
            raise damaged
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")
        db.execute("PRAGMA foreign_keys=ON")
        migrate(db, path)
        db.execute(f"PRAGMA busy_timeout = {_BUSY_TIMEOUT_MILLISECONDS}")
    except BaseException:  # a newer schema's StoreError too: no connection left behind
        db.close()
        raise
    return db


def _take_owner_lock(path: Path) -> int:
    """One process at a time: the lock keeps a second daemon or a `scan` from becoming a
    second writer (SQLite before 3.51.3 can corrupt a WAL database when two connections write
    or checkpoint at once). The holder's pid is written in it for the refusal message."""
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


def primary_code(exc: sqlite3.Error) -> int | None:
    """The SQLite result code of `exc` without its extension, if SQLite gave one."""
    code: int | None = getattr(exc, "sqlite_errorcode", None)
    return None if code is None else code & 0xFF  # the extended code's low byte is the primary


def _is_damage(exc: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is not a database or is malformed (or quick_check found damage)."""
    code = primary_code(exc)
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
