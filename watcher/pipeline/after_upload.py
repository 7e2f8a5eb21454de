"""What happens to local files once Nucleus has them: `upload.after_upload` (keep | delete |
move) for items the server confirmed.

Only a file whose bytes still hash to what the dataset confirmed is ever moved or deleted: a file
rewritten after its send is newer than what the server holds and must stay. The free-space guard
asks the same question (`compare_with_dataset`) before it gives a file up.
"""

from __future__ import annotations

import errno
import hashlib
import os
import shutil
from collections.abc import Iterator, Sequence
from enum import StrEnum
from pathlib import Path
from typing import assert_never

import structlog

from watcher.errors import NotARegularFile
from watcher.files import open_regular_file, path_from_text
from watcher.pipeline.upload.events import UploadEvents
from watcher.store import FileRecord, FileState, StateStore

log = structlog.get_logger("watcher.disk")


class AfterUploadMode(StrEnum):
    """`upload.after_upload`, spelled as in the config and in the `mode` field of log lines."""

    KEEP = "keep"
    DELETE = "delete"
    MOVE = "move"


class LocalCopy(StrEnum):
    """The file on disk next to what the dataset holds (see `compare_with_dataset`)."""

    SAME = "same"  # the bytes the dataset confirmed, with nothing left to send for it
    VANISHED = "vanished"
    CHANGED = "changed"  # rewritten or replaced since, or a newer version still to be sent
    UNREADABLE = "unreadable"


# link() fails with these where a hard link cannot be made (another file system, or one without
# hard links such as FAT on a camera's card); the file is then copied instead.
_NO_LINK_ERRNOS = frozenset(
    {errno.EXDEV, errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EMLINK, errno.ENOSYS}
)
_COPY_CHUNK_BYTES = 1024 * 1024


def file_fields(record: FileRecord) -> dict[str, str]:
    """What every log line about a file carries (see service/logs.py)."""
    return {
        "path": record.shown_path,
        "reference_id": record.reference_id,
        "dataset_id": record.dataset_id,
    }


def compare_with_dataset(store: StateStore, record: FileRecord) -> tuple[LocalCopy, str]:
    """Does the dataset hold exactly this file, with nothing left to send for it?
    Returns the verdict and, unless it is SAME, a detail for the log line.

    The file's bytes are hashed and compared with the hash the server confirmed: size and
    mtime alone cannot tell a rewrite within one timestamp tick, and the record may already
    describe a newer version that was never sent (a change during an asynchronous job).
    """
    current = store.get(record.watch, record.relpath)
    if (
        current is None
        or current.state != FileState.UPLOADED
        or current.confirmed_content_sha256 is None
    ):
        state = "missing" if current is None else current.state
        return (
            LocalCopy.CHANGED,
            f"the record is {state}: the dataset does not hold this version yet",
        )
    try:
        with open_regular_file(record.path) as f:
            digest = hashlib.file_digest(f, "sha256").hexdigest()
    except FileNotFoundError:
        return LocalCopy.VANISHED, "no such file"
    except NotARegularFile:
        return LocalCopy.CHANGED, "no longer a regular file"
    except OSError as exc:
        return LocalCopy.UNREADABLE, f"cannot read: {exc.strerror}"
    if digest != current.confirmed_content_sha256:
        return LocalCopy.CHANGED, "its bytes differ from what the dataset holds"
    return LocalCopy.SAME, ""


class AfterUpload(UploadEvents):
    """`upload.after_upload`: keep, delete, or move confirmed files into `archive_dir`.

    The uploader calls `confirmed` only after the server confirmed (sync 2xx or job Completed),
    from several worker threads. Remote-URL items have no local bytes of ours and are left alone.
    A failure is one warning line: the upload itself succeeded, and the file simply stays.
    """

    def __init__(self, mode: str, archive_dir: Path | None, store: StateStore) -> None:
        try:
            self._mode = AfterUploadMode(mode)
        except ValueError:
            modes = tuple(known.value for known in AfterUploadMode)
            raise ValueError(f"after_upload must be one of {modes} (got {mode!r})") from None
        if self._mode is AfterUploadMode.MOVE and archive_dir is None:
            raise ValueError('after_upload = "move" needs an archive_dir')
        self._archive_dir = archive_dir
        self._store = store

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        if self._mode is AfterUploadMode.KEEP:
            return
        for record in records:
            if record.remote_url is not None:
                continue
            # Never fail an upload that has already succeeded: the file just stays.
            try:
                self._apply(record)
            except OSError as exc:
                log.warning(
                    "after_upload_failed", mode=self._mode, error=str(exc), **file_fields(record)
                )
            except Exception:
                log.exception("after_upload_failed", mode=self._mode, **file_fields(record))

    def _apply(self, record: FileRecord) -> None:
        verdict, detail = compare_with_dataset(self._store, record)
        match verdict:
            case LocalCopy.SAME:
                pass
            case LocalCopy.CHANGED:
                # Rewritten since the send: the reconcile queues the new content; keep it.
                log.info(
                    "after_upload_skipped", mode=self._mode, reason=detail, **file_fields(record)
                )
                return
            case LocalCopy.VANISHED | LocalCopy.UNREADABLE:
                log.warning(
                    "after_upload_failed", mode=self._mode, error=detail, **file_fields(record)
                )
                return
            case unknown:
                assert_never(unknown)
        if self._mode is AfterUploadMode.DELETE:
            record.path.unlink()
            log.info("after_upload_deleted", **file_fields(record))
            return
        assert self._archive_dir is not None  # checked in __init__
        # Worker threads may archive two files with one relpath (two watches) at the same
        # moment; the exclusive link/create gives each its own name without a lock.
        destination = _move_without_overwrite(
            record.path, self._archive_dir / path_from_text(record.relpath)
        )
        log.info("after_upload_moved", moved_to=str(destination), **file_fields(record))


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
