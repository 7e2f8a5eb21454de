"""Writes that wait for disk space instead of failing.

A write that fails because the state folder is full (or its disk errs) waits and tries again:
the transaction rolled back, so nothing half-written remains, and the pipeline simply stalls
until an operator frees space. One log line when writes block, one when they pass again.
"""

from __future__ import annotations

import sqlite3
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import structlog

from watcher.errors import StoreError
from watcher.store.opening import primary_code

log = structlog.get_logger("watcher.store")

_R = TypeVar("_R")
_FIRST_DELAY_SECONDS = 0.5
_MAX_DELAY_SECONDS = 30.0


def _out_of_space_or_io(exc: sqlite3.OperationalError) -> bool:
    code = primary_code(exc)
    if code is not None:
        return code in (sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR)
    return "disk is full" in str(exc) or "disk I/O error" in str(exc)


class DiskFullWait:
    """Runs a store's writes, waiting out a full disk; `close` ends any wait."""

    def __init__(self, path: Path) -> None:
        self._path = path
        self._closing = threading.Event()
        self._blocked = False

    def close(self) -> None:
        self._closing.set()

    def run(self, write: Callable[[], _R]) -> _R:
        """`write()`, again after a pause for as long as it fails for lack of space."""
        delay = _FIRST_DELAY_SECONDS
        while True:
            try:
                result = write()
            except sqlite3.OperationalError as exc:
                if not _out_of_space_or_io(exc) or self._closing.is_set():
                    raise
                if not self._blocked:
                    self._blocked = True
                    log.error(
                        "state_write_failed",
                        path=str(self._path),
                        error=str(exc),
                        hint="free space in the state folder; writes are retried",
                    )
                if self._closing.wait(delay):
                    raise StoreError(f"{self._path}: closed while waiting to write: {exc}") from exc
                delay = min(delay * 2, _MAX_DELAY_SECONDS)
                continue
            if self._blocked:
                self._blocked = False
                log.info("state_write_recovered", path=str(self._path))
            return result
