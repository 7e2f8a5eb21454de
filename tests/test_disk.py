"""after_upload (keep/delete/move) and the free-space guard, on real files and a real store."""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import structlog

from watcher.pipeline import AfterUpload, FanOutEvents, FreeSpaceGuard, UploadEvents
from watcher.store import (
    FAILED,
    GONE,
    IN_FLIGHT,
    PENDING,
    UPLOADED,
    Candidate,
    FileRecord,
    StateStore,
)

MiB = 1024 * 1024


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    s = StateStore.open(tmp_path / "state" / "state.db")
    yield s
    s.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    folder = tmp_path / "cam"
    folder.mkdir()
    return folder


def write_file(root: Path, relpath: str, data: bytes, *, mtime_s: int | None = None) -> Path:
    path = root / relpath
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime_s is not None:
        os.utime(path, ns=(mtime_s * 10**9, mtime_s * 10**9))
    return path


def _sha256_of(path: Path) -> str:
    with path.open("rb") as f:  # streamed: some of these files are 1 GiB
        return hashlib.file_digest(f, "sha256").hexdigest()


def record(store: StateStore, root: Path, relpath: str, *, remote_url: str | None = None) -> None:
    """Record the file as it is on disk now (pending), as the reconcile would."""
    st = (root / relpath).stat()
    store.record_candidate(
        Candidate(
            watch=str(root),
            relpath=relpath,
            dataset_id="ds_cam",
            reference_id=f"cam/{relpath}",
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            content_sha256=_sha256_of(root / relpath),
            metadata={"camera": "back"},
            metadata_sha256="m1",
            remote_url=remote_url,
        )
    )


def send(store: StateStore) -> list[FileRecord]:
    """Claim every pending file (one dataset, one kind) as the uploader does: now in flight."""
    batch = store.claim_batch(10)
    assert batch, "nothing was pending"
    return batch


def send_and_confirm(store: StateStore) -> list[FileRecord]:
    batch = send(store)
    store.mark_confirmed([r.id for r in batch])
    return batch


def state_of(store: StateStore, root: Path, relpath: str) -> str:
    found = store.get(str(root), relpath)
    assert found is not None
    return found.state


def events_named(
    logs: Sequence[MutableMapping[str, Any]], name: str
) -> list[MutableMapping[str, Any]]:
    return [entry for entry in logs if entry["event"] == name]


# -- AfterUpload -------------------------------------------------------------------------------


def test_keep_leaves_confirmed_files_in_place(store: StateStore, root: Path) -> None:
    write_file(root, "a.jpg", b"aaaa")
    record(store, root, "a.jpg")
    confirmed = send_and_confirm(store)

    AfterUpload("keep", None, store).confirmed(confirmed)

    assert (root / "a.jpg").read_bytes() == b"aaaa"


def test_delete_removes_confirmed_files_but_not_remote_url_items(
    store: StateStore, root: Path
) -> None:
    write_file(root, "day1/a.jpg", b"aaaa")
    write_file(root, "day1/b.jpg", b"bbbbbb")
    write_file(root, "remote.jpg", b"rrr")
    record(store, root, "day1/a.jpg")
    record(store, root, "day1/b.jpg")
    confirmed = send_and_confirm(store)
    record(store, root, "remote.jpg", remote_url="s3://bucket/remote.jpg")
    confirmed_remote = send_and_confirm(store)

    with structlog.testing.capture_logs() as logs:
        AfterUpload("delete", None, store).confirmed([*confirmed, *confirmed_remote])

    assert not (root / "day1" / "a.jpg").exists()
    assert not (root / "day1" / "b.jpg").exists()
    assert (root / "remote.jpg").read_bytes() == b"rrr"  # its bytes were never ours to send
    deleted = events_named(logs, "after_upload_deleted")
    assert [(e["path"], e["reference_id"], e["dataset_id"]) for e in deleted] == [
        (str(root / "day1" / "a.jpg"), "cam/day1/a.jpg", "ds_cam"),
        (str(root / "day1" / "b.jpg"), "cam/day1/b.jpg", "ds_cam"),
    ]


def test_move_keeps_the_relative_path_and_never_overwrites(
    store: StateStore, root: Path, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    write_file(archive, "day1/b.jpg", b"archived earlier")
    write_file(archive, "day1/b-1.jpg", b"archived earlier too")
    write_file(root, "day1/a.jpg", b"aaaa", mtime_s=1_600_000_000)
    write_file(root, "day1/b.jpg", b"new b")
    record(store, root, "day1/a.jpg")
    record(store, root, "day1/b.jpg")
    confirmed = send_and_confirm(store)

    AfterUpload("move", archive, store).confirmed(confirmed)

    assert not (root / "day1" / "a.jpg").exists()
    assert not (root / "day1" / "b.jpg").exists()
    assert (archive / "day1" / "a.jpg").read_bytes() == b"aaaa"
    assert (archive / "day1" / "a.jpg").stat().st_mtime_ns == 1_600_000_000 * 10**9
    assert (archive / "day1" / "b.jpg").read_bytes() == b"archived earlier"
    assert (archive / "day1" / "b-1.jpg").read_bytes() == b"archived earlier too"
    assert (archive / "day1" / "b-2.jpg").read_bytes() == b"new b"
    assert sorted(p.name for p in (archive / "day1").iterdir()) == [
        "a.jpg",
        "b-1.jpg",
        "b-2.jpg",
        "b.jpg",
    ]


@pytest.fixture
def other_filesystem_dir(tmp_path: Path) -> Iterator[Path]:
    """A folder on another file system than tmp_path (tmpfs), so a move must copy."""
    shm = Path("/dev/shm")
    if not shm.is_dir() or not os.access(shm, os.W_OK):
        pytest.skip("no writable /dev/shm")
    if shm.stat().st_dev == tmp_path.stat().st_dev:
        pytest.skip("/dev/shm is on the same file system as tmp_path")
    folder = Path(tempfile.mkdtemp(dir=shm, prefix="watcher-test-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder)


def test_move_to_another_file_system_copies_then_removes(
    store: StateStore, root: Path, other_filesystem_dir: Path
) -> None:
    archive = other_filesystem_dir / "archive"
    write_file(archive, "a.jpg", b"already there")
    write_file(root, "a.jpg", b"x" * 300_000, mtime_s=1_600_000_000)
    record(store, root, "a.jpg")
    confirmed = send_and_confirm(store)

    AfterUpload("move", archive, store).confirmed(confirmed)

    assert not (root / "a.jpg").exists()
    assert (archive / "a.jpg").read_bytes() == b"already there"
    moved = archive / "a-1.jpg"
    assert moved.read_bytes() == b"x" * 300_000
    assert moved.stat().st_mtime_ns == 1_600_000_000 * 10**9  # copy2 keeps the times


@pytest.mark.parametrize("mode", ["delete", "move"])
def test_a_file_changed_after_the_send_is_left_alone(
    store: StateStore, root: Path, tmp_path: Path, mode: str
) -> None:
    archive = tmp_path / "archive"
    write_file(root, "a.jpg", b"first version", mtime_s=1_600_000_000)
    record(store, root, "a.jpg")
    in_flight = send(store)
    write_file(root, "a.jpg", b"second, longer version")  # rewritten while the send was out
    store.mark_confirmed([r.id for r in in_flight])

    with structlog.testing.capture_logs() as logs:
        AfterUpload(mode, archive, store).confirmed(in_flight)

    assert (root / "a.jpg").read_bytes() == b"second, longer version"
    assert not archive.exists()
    [skipped] = events_named(logs, "after_upload_skipped")
    assert skipped["path"] == str(root / "a.jpg")
    assert skipped["reference_id"] == "cam/a.jpg"
    assert skipped["dataset_id"] == "ds_cam"


def test_a_vanished_file_is_one_warning_and_the_rest_still_goes(
    store: StateStore, root: Path
) -> None:
    write_file(root, "a.jpg", b"aaaa")
    write_file(root, "b.jpg", b"bbbb")
    record(store, root, "a.jpg")
    record(store, root, "b.jpg")
    confirmed = send_and_confirm(store)
    (root / "a.jpg").unlink()

    with structlog.testing.capture_logs() as logs:
        AfterUpload("delete", None, store).confirmed(confirmed)

    assert not (root / "b.jpg").exists()
    [failed] = events_named(logs, "after_upload_failed")
    assert failed["log_level"] == "warning"
    assert failed["path"] == str(root / "a.jpg")
    assert failed["reference_id"] == "cam/a.jpg"


def test_an_unwritable_folder_is_one_warning_not_an_exception(
    store: StateStore, root: Path
) -> None:
    if os.geteuid() == 0:
        pytest.skip("root ignores directory permissions")
    write_file(root, "locked/a.jpg", b"aaaa")
    record(store, root, "locked/a.jpg")
    confirmed = send_and_confirm(store)
    (root / "locked").chmod(0o555)
    try:
        with structlog.testing.capture_logs() as logs:
            AfterUpload("delete", None, store).confirmed(confirmed)
    finally:
        (root / "locked").chmod(0o755)

    assert (root / "locked" / "a.jpg").exists()
    [failed] = events_named(logs, "after_upload_failed")
    assert "Permission denied" in failed["error"]


def test_an_unusable_archive_is_one_warning_and_the_file_stays(
    store: StateStore, root: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "archive"
    blocker.write_bytes(b"a file where the archive folder should be")
    write_file(root, "day1/a.jpg", b"aaaa")
    record(store, root, "day1/a.jpg")
    confirmed = send_and_confirm(store)

    with structlog.testing.capture_logs() as logs:
        AfterUpload("move", blocker, store).confirmed(confirmed)

    assert (root / "day1" / "a.jpg").read_bytes() == b"aaaa"
    assert blocker.read_bytes() == b"a file where the archive folder should be"
    [failed] = events_named(logs, "after_upload_failed")
    assert failed["log_level"] == "warning"
    assert failed["path"] == str(root / "day1" / "a.jpg")
    assert failed["dataset_id"] == "ds_cam"


def test_move_needs_an_archive_dir(store: StateStore) -> None:
    with pytest.raises(ValueError, match="archive_dir"):
        AfterUpload("move", None, store)
    with pytest.raises(ValueError, match="after_upload"):
        AfterUpload("shred", None, store)


class _BrokenConsumer(UploadEvents):
    def confirmed(self, records: Sequence[FileRecord]) -> None:
        raise RuntimeError("metrics exporter bug")


class _Recorder(UploadEvents):
    def __init__(self) -> None:
        self.calls: list[tuple[str, object]] = []

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        self.calls.append(("confirmed", [r.relpath for r in records]))

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        self.calls.append(("parked", reason))

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        self.calls.append(("retrying", delay_seconds))

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        self.calls.append(("request_done", bytes_sent))

    def job_finished(self, status: str) -> None:
        self.calls.append(("job_finished", status))


def test_fan_out_reaches_every_consumer_even_past_a_broken_one(
    store: StateStore, root: Path
) -> None:
    write_file(root, "a.jpg", b"aaaa")
    record(store, root, "a.jpg")
    confirmed = send_and_confirm(store)
    recorder = _Recorder()
    events = FanOutEvents([_BrokenConsumer(), AfterUpload("delete", None, store), recorder])

    with structlog.testing.capture_logs() as logs:
        events.confirmed(confirmed)
        events.parked(confirmed, "HTTP 413")
        events.retrying(confirmed, "http_5xx", "HTTP 503", 2.5)
        events.request_done(0.1, 1234, True)
        events.job_finished("Completed")

    assert not (root / "a.jpg").exists()
    assert recorder.calls == [
        ("confirmed", ["a.jpg"]),
        ("parked", "HTTP 413"),
        ("retrying", 2.5),
        ("request_done", 1234),
        ("job_finished", "Completed"),
    ]
    [failure] = events_named(logs, "upload_event_consumer_failed")
    assert failure["consumer"] == "_BrokenConsumer"


# -- FreeSpaceGuard ----------------------------------------------------------------------------


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
        GONE,
        GONE,
        GONE,
    ]
    assert state_of(store, root, "rewritten.jpg") == UPLOADED
    assert state_of(store, root, "failed.jpg") == FAILED
    assert state_of(store, root, "inflight.jpg") == IN_FLIGHT
    assert state_of(store, root, "pending.jpg") == PENDING
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
    assert state_of(store, root, "f2.jpg") == UPLOADED


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
    assert state_of(store, root, "a.jpg") == UPLOADED


def test_a_missing_root_or_no_minimum_is_quiet(store: StateStore, tmp_path: Path) -> None:
    missing = tmp_path / "not-mounted-yet"
    guard = FreeSpaceGuard(store, [(str(missing), missing)], 1024**5, True)
    off = FreeSpaceGuard(store, [(str(tmp_path), tmp_path)], 0, True)
    with structlog.testing.capture_logs() as logs:
        assert guard.check() == 0
        assert off.check() == 0
    assert logs == []
