"""The free-space guard, on real files (some reserved with fallocate) and a real store."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import structlog

from tests.uploadedfiles import (
    MiB,
    events_named,
    record,
    send,
    send_and_confirm,
    state_of,
    write_file,
)
from watcher.pipeline import FreeSpaceGuard
from watcher.store import FileState, StateStore

# Other processes on this machine write and delete files while these tests run, so every
# space threshold below keeps a margin of BIG // 2 on either side; the big files are reserved
# with fallocate (instant, no data written) and always removed afterwards.
BIG = 1024 * MiB


def free_bytes(folder: Path) -> int:
    return shutil.disk_usage(folder).free


@pytest.fixture
def reserve(tmp_path: Path) -> Iterator[Callable[[Path], None]]:
    """reserve(path): a file of BIG bytes; removed at the end even if the test fails."""
    made: list[Path] = []
    if free_bytes(tmp_path) < 4 * BIG:
        pytest.skip("needs 4 GiB free on the tmp_path file system")

    def make(path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        made.append(path)
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
        try:
            os.posix_fallocate(descriptor, 0, BIG)
        except OSError as exc:
            pytest.skip(f"fallocate not supported here: {exc}")
        finally:
            os.close(descriptor)

    yield make
    for path in made:
        path.unlink(missing_ok=True)


def uploaded_file(store: StateStore, root: Path, relpath: str, data: bytes, mtime_s: int) -> None:
    write_file(root, relpath, data, mtime_s=mtime_s)
    record(store, root, relpath)
    send_and_confirm(store)


def test_low_space_deletes_only_uploaded_files_oldest_first_until_none_are_left(
    store: StateStore, root: Path, tmp_path: Path
) -> None:
    other_root = tmp_path / "yard"
    other_root.mkdir()
    # Recorded newest first, so the order of deletion can only come from the files' age.
    uploaded_file(store, root, "new.jpg", b"n" * 1000, mtime_s=1_700_000_300)
    uploaded_file(store, root, "day1/old.jpg", b"o" * 1000, mtime_s=1_700_000_100)
    uploaded_file(store, root, "mid.jpg", b"m" * 1000, mtime_s=1_700_000_200)
    uploaded_file(store, other_root, "yard.jpg", b"y" * 1000, mtime_s=1_700_000_000)
    # Confirmed, then rewritten: the server holds an older version; this one is not expendable.
    uploaded_file(store, root, "rewritten.jpg", b"r" * 1000, mtime_s=1_700_000_050)
    write_file(root, "rewritten.jpg", b"r" * 2000, mtime_s=1_700_000_400)
    write_file(root, "failed.jpg", b"f" * 1000, mtime_s=1_600_000_000)
    record(store, root, "failed.jpg")
    store.mark_failed([r.id for r in send(store)], "HTTP 413: too large")
    write_file(root, "inflight.jpg", b"i" * 1000, mtime_s=1_600_000_000)
    record(store, root, "inflight.jpg")
    send(store)
    write_file(root, "pending.jpg", b"p" * 1000, mtime_s=1_600_000_000)
    record(store, root, "pending.jpg")
    write_file(root, "unknown.jpg", b"u" * 1000, mtime_s=1_600_000_000)  # never recorded

    # Always short by far more than these files could free: it must stop when none are left.
    minimum = free_bytes(root) + 4 * BIG
    guard = FreeSpaceGuard(store, [(str(root), root)], minimum, delete_uploaded_when_low=True)
    with structlog.testing.capture_logs() as logs:
        deleted = guard.check()

    assert deleted == 3
    assert [e["path"] for e in events_named(logs, "disk_space_freed")] == [
        str(root / "day1" / "old.jpg"),
        str(root / "mid.jpg"),
        str(root / "new.jpg"),
    ]
    assert sorted(str(p.relative_to(root)) for p in root.rglob("*.jpg")) == [
        "failed.jpg",
        "inflight.jpg",
        "pending.jpg",
        "rewritten.jpg",
        "unknown.jpg",
    ]
    assert (other_root / "yard.jpg").exists()  # another watch, not this guard's
    assert [state_of(store, root, name) for name in ("day1/old.jpg", "mid.jpg", "new.jpg")] == [
        FileState.GONE,
        FileState.GONE,
        FileState.GONE,
    ]
    assert state_of(store, root, "rewritten.jpg") == FileState.UPLOADED
    assert state_of(store, root, "failed.jpg") == FileState.FAILED
    assert state_of(store, root, "inflight.jpg") == FileState.IN_FLIGHT
    assert state_of(store, root, "pending.jpg") == FileState.PENDING
    [low] = events_named(logs, "disk_space_low")
    assert low["log_level"] == "error"
    assert low["root"] == str(root)
    assert low["min_free_bytes"] == minimum
    assert low["free_bytes"] < minimum

    with structlog.testing.capture_logs() as logs:
        assert guard.check() == 0  # nothing left to give up; same episode, no new error line
    assert events_named(logs, "disk_space_low") == []


def test_low_space_stops_deleting_once_enough_is_free(
    store: StateStore, root: Path, reserve: Callable[[Path], None]
) -> None:
    for number, mtime_s in enumerate((1_700_000_100, 1_700_000_200, 1_700_000_300)):
        path = root / f"f{number}.jpg"
        reserve(path)
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
        record(store, root, path.name)
        send_and_confirm(store)
    # Short by 1.5 files: deleting the two oldest is enough.
    minimum = free_bytes(root) + BIG + BIG // 2
    guard = FreeSpaceGuard(store, [(str(root), root)], minimum, delete_uploaded_when_low=True)

    assert guard.check() == 2

    assert sorted(p.name for p in root.iterdir()) == ["f2.jpg"]
    assert state_of(store, root, "f2.jpg") == FileState.UPLOADED


def test_low_space_is_reported_once_per_episode_and_nothing_is_deleted_unless_allowed(
    store: StateStore, root: Path, tmp_path: Path, reserve: Callable[[Path], None]
) -> None:
    uploaded_file(store, root, "a.jpg", b"a" * 1000, mtime_s=1_700_000_000)
    filler = tmp_path / "filler.bin"
    minimum = free_bytes(root) - BIG // 2
    guard = FreeSpaceGuard(store, [(str(root), root)], minimum, delete_uploaded_when_low=False)

    with structlog.testing.capture_logs() as logs:
        assert guard.check() == 0  # above the minimum
        reserve(filler)  # now below it
        assert guard.check() == 0
        assert guard.check() == 0
        filler.unlink()
        assert guard.check() == 0
        reserve(filler)
        assert guard.check() == 0

    assert [e["event"] for e in logs if e["event"].startswith("disk_space")] == [
        "disk_space_low",
        "disk_space_recovered",
        "disk_space_low",
    ]
    assert (root / "a.jpg").exists()
    assert state_of(store, root, "a.jpg") == FileState.UPLOADED


def test_a_missing_root_or_no_minimum_is_quiet(store: StateStore, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted-yet"
    guard = FreeSpaceGuard(store, [(str(missing), missing)], 1024**5, True)
    off = FreeSpaceGuard(store, [(str(tmp_path), tmp_path)], 0, True)
    with structlog.testing.capture_logs() as logs:
        assert guard.check() == 0
        assert off.check() == 0
    assert logs == []
