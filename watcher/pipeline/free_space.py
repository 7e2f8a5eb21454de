"""Keeping the disk under the watch roots from filling up.

`FreeSpaceGuard` watches free space under each watch root and, when allowed, gives up the oldest
already-confirmed files, each only if its bytes still hash to what the dataset confirmed.
"""

from __future__ import annotations

import shutil
from collections.abc import Sequence
from enum import StrEnum
from pathlib import Path
from typing import assert_never

import structlog

from watcher.pipeline.after_upload import LocalCopy, compare_with_dataset, file_fields
from watcher.store import FileRecord, StateStore

log = structlog.get_logger("watcher.disk")


class Deletion(StrEnum):
    """What became of one confirmed file the guard tried to give up."""

    DELETED = "deleted"
    MISSING = "missing"  # already gone
    KEPT = "kept"  # changed since, or cannot be deleted


class FreeSpaceGuard:
    """Reports low free space under each watch root, once per episode, and can free some.

    With `delete_uploaded_when_low`, the oldest files the server already confirmed go first,
    until free space is back above `min_free_bytes` or none are left. Pending, failed and any
    other not-yet-confirmed file is never touched: only the server's confirmation makes a local
    copy expendable.
    """

    def __init__(
        self,
        store: StateStore,
        watch_roots: Sequence[tuple[str, Path]],
        min_free_bytes: int,
        delete_uploaded_when_low: bool,
    ) -> None:
        if min_free_bytes < 0:
            raise ValueError(f"min_free_bytes must not be negative (got {min_free_bytes})")
        self._store = store
        self._watch_roots = tuple(watch_roots)
        self._min_free_bytes = min_free_bytes
        self._delete_uploaded_when_low = delete_uploaded_when_low
        self._low_watches: set[str] = set()  # keys in a low-space episode (logged already)

    def check(self) -> int:
        """Look at every root now; returns how many files were deleted to free space."""
        if self._min_free_bytes == 0:
            return 0
        deleted = 0
        for key, root in self._watch_roots:
            free_bytes = _free_bytes(root)
            if free_bytes is None:
                continue
            if free_bytes >= self._min_free_bytes:
                if key in self._low_watches:
                    self._low_watches.discard(key)
                    log.info("disk_space_recovered", root=str(root), free_bytes=free_bytes)
                continue
            if key not in self._low_watches:
                self._low_watches.add(key)
                log.error(
                    "disk_space_low",
                    root=str(root),
                    free_bytes=free_bytes,
                    min_free_bytes=self._min_free_bytes,
                    will_delete_uploaded=self._delete_uploaded_when_low,
                )
            if self._delete_uploaded_when_low:
                deleted += self._free_space(key, root)
        return deleted

    def _free_space(self, key: str, root: Path) -> int:
        deleted = 0
        kept_ids: set[int] = set()  # changed or undeletable: still `uploaded`, so skip them
        while True:
            # Rows kept above are still in the answer; ask for enough to see past them.
            page = self._store.uploaded_oldest_first(key, limit=100 + len(kept_ids))
            candidates = [record for record in page if record.id not in kept_ids]
            if not candidates:
                return deleted
            for record in candidates:
                free_bytes = _free_bytes(root)
                if free_bytes is None or free_bytes >= self._min_free_bytes:
                    return deleted
                match self._delete_confirmed(record):
                    case Deletion.KEPT:
                        kept_ids.add(record.id)
                        continue
                    case Deletion.DELETED:
                        deleted += 1
                    case Deletion.MISSING:
                        pass
                    case unknown:
                        assert_never(unknown)
                # Deleted by us or already missing: either way its record is now `gone`, which
                # also takes it out of the next page.
                self._store.mark_gone(record.watch, record.relpath)

    def _delete_confirmed(self, record: FileRecord) -> Deletion:
        verdict, detail = compare_with_dataset(self._store, record)
        match verdict:
            case LocalCopy.SAME:
                pass
            case LocalCopy.VANISHED:
                return Deletion.MISSING
            case LocalCopy.CHANGED | LocalCopy.UNREADABLE:
                log.info("disk_space_file_kept", reason=detail, **file_fields(record))
                return Deletion.KEPT
            case unknown:
                assert_never(unknown)
        try:
            record.path.unlink()
        except FileNotFoundError:
            return Deletion.MISSING
        except OSError as exc:
            log.warning("disk_space_delete_failed", error=exc.strerror, **file_fields(record))
            return Deletion.KEPT
        log.warning("disk_space_freed", size_bytes=record.size_bytes, **file_fields(record))
        return Deletion.DELETED


def _free_bytes(root: Path) -> int | None:
    """Free bytes for unprivileged users on root's file system; None when root is not there
    (a mount that has not come up yet is reported by the reconcile, not here)."""
    try:
        return shutil.disk_usage(root).free
    except FileNotFoundError:
        return None
    except OSError as exc:
        log.warning("disk_usage_failed", root=str(root), error=exc.strerror)
        return None
