"""What happens to local files once Nucleus has them, and keeping the disk from filling up.

`AfterUpload` applies `upload.after_upload` (keep | delete | move) to items the server confirmed.
`FreeSpaceGuard` watches free space under each watch root and, when allowed, gives up the oldest
already-confirmed files. Both only ever touch a file whose size and mtime still equal what was
recorded: a file rewritten after its send is newer than what the server holds and must stay.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import structlog

from watcher.errors import NotARegularFile
from watcher.files import open_regular_file, path_from_text
from watcher.pipeline.upload_events import UploadEvents
from watcher.store import UPLOADED, FileRecord, StateStore

log = structlog.get_logger("watcher.disk")

AFTER_UPLOAD_MODES = ("keep", "delete", "move")

# link() fails with these where a hard link cannot be made (another file system, or one without
# hard links such as FAT on a camera's card); the file is then copied instead.
_NO_LINK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
)
_COPY_CHUNK_BYTES = 1024 * 1024


def _file_fields(record: FileRecord) -> dict[str, str]:
    return {
        "path": record.shown_path,
        "reference_id": record.reference_id,
        "dataset_id": record.dataset_id,
    }


def _compare_with_dataset(store: StateStore, record: FileRecord) -> tuple[str, str]:
    """Does the dataset hold exactly this file, with nothing left to send for it?
    (verdict, detail), verdict one of "same", "vanished", "changed" (rewritten or replaced
    since, or a newer version or metadata still to be sent), "unreadable".

    The file's bytes are hashed and compared with the hash the server confirmed: size and
    mtime alone cannot tell a rewrite within one timestamp tick, and the record may already
    describe a newer version that was never sent (a change during an asynchronous job).
    """
    current = store.get(record.watch, record.relpath)
    if current is None or current.state != UPLOADED or current.confirmed_content_sha256 is None:
        state = "missing" if current is None else current.state
        return "changed", f"the record is {state}: the dataset does not hold this version yet"
    try:
        with open_regular_file(record.path) as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return "vanished", "no such file"
    except NotARegularFile:
        return "changed", "no longer a regular file"
    except OSError as exc:
        return "unreadable", f"cannot read: {exc.strerror}"
    if digest != current.confirmed_content_sha256:
        return "changed", "its bytes differ from what the dataset holds"
    return "same", ""


class FanOutEvents(UploadEvents):
    """Hands every upload event to several consumers (metrics, after_upload, progress).

    One consumer's bug must not keep the others from hearing about a confirmed upload, nor
    reach the uploader, which would count it as a failed request.
    """

    def __init__(self, consumers: Sequence[UploadEvents]) -> None:
        self._consumers = tuple(consumers)

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        self._forward("confirmed", lambda consumer: consumer.confirmed(records))

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        self._forward("parked", lambda consumer: consumer.parked(records, reason))

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        self._forward(
            "retrying", lambda consumer: consumer.retrying(records, kind, reason, delay_seconds)
        )

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        self._forward(
            "request_done", lambda consumer: consumer.request_done(seconds, bytes_sent, ok)
        )

    def job_finished(self, status: str) -> None:
        self._forward("job_finished", lambda consumer: consumer.job_finished(status))

    def _forward(self, event: str, call: Callable[[UploadEvents], None]) -> None:
        for consumer in self._consumers:
            try:
                call(consumer)
            except Exception:
                log.exception(
                    "upload_event_consumer_failed",
                    upload_event=event,
                    consumer=type(consumer).__name__,
                )


class AfterUpload(UploadEvents):
    """`upload.after_upload`: keep, delete, or move confirmed files into `archive_dir`.

    The uploader calls `confirmed` only after the server confirmed (sync 2xx or job Completed),
    from several worker threads. Remote-URL items have no local bytes of ours and are left alone.
    A failure is one warning line: the upload itself succeeded, and the file simply stays.
    """

    def __init__(self, mode: str, archive_dir: Path | None, store: StateStore) -> None:
        if mode not in AFTER_UPLOAD_MODES:
            raise ValueError(f"after_upload must be one of {AFTER_UPLOAD_MODES} (got {mode!r})")
        if mode == "move" and archive_dir is None:
            raise ValueError('after_upload = "move" needs an archive_dir')
        self._mode = mode
        self._archive_dir = archive_dir
        self._store = store

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        if self._mode == "keep":
            return
        for record in records:
            if record.remote_url is not None:
                continue
            # Never fail an upload that has already succeeded: the file just stays.
            try:
                self._apply(record)
            except OSError as exc:
                log.warning(
                    "after_upload_failed", mode=self._mode, error=str(exc), **_file_fields(record)
                )
            except Exception:
                log.exception("after_upload_failed", mode=self._mode, **_file_fields(record))

    def _apply(self, record: FileRecord) -> None:
        verdict, detail = _compare_with_dataset(self._store, record)
        if verdict == "changed":
            # Rewritten since the send: the reconcile queues the new content; keep it for that.
            log.info("after_upload_skipped", mode=self._mode, reason=detail, **_file_fields(record))
            return
        if verdict != "same":
            log.warning(
                "after_upload_failed", mode=self._mode, error=detail, **_file_fields(record)
            )
            return
        if self._mode == "delete":
            record.path.unlink()
            log.info("after_upload_deleted", **_file_fields(record))
            return
        assert self._archive_dir is not None  # checked in __init__
        # Worker threads may archive two files with one relpath (two watches) at the same
        # moment; the exclusive link/create gives each its own name without a lock.
        destination = _move_without_overwrite(
            record.path, self._archive_dir / path_from_text(record.relpath)
        )
        log.info("after_upload_moved", moved_to=str(destination), **_file_fields(record))


def _numbered(destination: Path) -> Iterator[Path]:
    """a.jpg, a-1.jpg, a-2.jpg, ...: the first free one is where an archived file goes."""
    yield destination
    number = 1
    while True:
        yield destination.with_name(f"{destination.stem}-{number}{destination.suffix}")
        number += 1


def _move_without_overwrite(source: Path, destination: Path) -> Path:
    """Move `source` to `destination` or a numbered variant of it; returns where it went.

    os.replace would silently overwrite a file that appeared after an exists() check; link()
    and O_EXCL creation fail instead, so an archived file is never lost.
    """
    destination.parent.mkdir(parents=True, exist_ok=True)
    for candidate in _numbered(destination):
        try:
            os.link(source, candidate, follow_symlinks=False)
        except FileExistsError:
            continue
        except OSError as exc:
            if exc.errno not in _NO_LINK_ERRNOS:
                raise
            return _copy_without_overwrite(source, destination)
        _fsync_directory(candidate.parent)
        source.unlink()
        return candidate
    raise AssertionError("unreachable: _numbered never ends")


def _copy_without_overwrite(source: Path, destination: Path) -> Path:
    """copy2 + fsync + unlink, for another file system: the copy is durable before the source
    goes, so a power cut leaves the file in one place or both, never in neither."""
    for candidate in _numbered(destination):
        try:
            target = open(candidate, "xb")  # noqa: SIM115 (closed below, before copystat)
        except FileExistsError:
            continue
        try:
            with target, open(source, "rb") as reader:
                shutil.copyfileobj(reader, target, _COPY_CHUNK_BYTES)
                target.flush()
                os.fsync(target.fileno())
            shutil.copystat(source, candidate)
        except BaseException:
            candidate.unlink(missing_ok=True)
            raise
        _fsync_directory(candidate.parent)
        source.unlink()
        return candidate
    raise AssertionError("unreachable: _numbered never ends")


def _fsync_directory(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


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
                outcome = self._delete_confirmed(record)
                if outcome == "kept":
                    kept_ids.add(record.id)
                    continue
                # Deleted by us or already missing: either way its record is now `gone`, which
                # also takes it out of the next page.
                self._store.mark_gone(record.watch, record.relpath)
                if outcome == "deleted":
                    deleted += 1

    def _delete_confirmed(self, record: FileRecord) -> str:
        """ "deleted", "missing" (already gone), or "kept" (changed since, or cannot delete)."""
        verdict, detail = _compare_with_dataset(self._store, record)
        if verdict == "vanished":
            return "missing"
        if verdict != "same":
            log.info("disk_space_file_kept", reason=detail, **_file_fields(record))
            return "kept"
        try:
            record.path.unlink()
        except FileNotFoundError:
            return "missing"
        except OSError as exc:
            log.warning("disk_space_delete_failed", error=exc.strerror, **_file_fields(record))
            return "kept"
        log.warning("disk_space_freed", size_bytes=record.size_bytes, **_file_fields(record))
        return "deleted"


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
