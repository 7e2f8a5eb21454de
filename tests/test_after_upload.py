"""after_upload (keep/delete/move), on real files and a real store."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog

from tests.uploadedfiles import events_named, record, send, send_and_confirm, write_file
from watcher.pipeline import AfterUpload
from watcher.service import configure_logging, reset_logging
from watcher.store import StateStore


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


def test_a_json_log_line_spells_the_mode_as_the_config_does(
    store: StateStore, root: Path, tmp_path: Path
) -> None:
    blocker = tmp_path / "archive"
    blocker.write_bytes(b"a file where the archive folder should be")
    write_file(root, "a.jpg", b"aaaa")
    record(store, root, "a.jpg")
    confirmed = send_and_confirm(store)
    stream = io.StringIO()
    configure_logging(format="json", stream=stream)
    try:
        AfterUpload("move", blocker, store).confirmed(confirmed)
    finally:
        reset_logging()

    [line] = [json.loads(text) for text in stream.getvalue().splitlines()]
    assert line["event"] == "after_upload_failed"
    assert '"mode": "move"' in stream.getvalue()
