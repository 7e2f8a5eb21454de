"""Files the daemon must not trip over: each case gets a clear log line and a state that
`explain` or `status --json` shows, the daemon keeps running and still uploads a good file
afterwards, and nothing outside the watch root is opened (inotify IN_OPEN on an outside folder
that holds a symlink target)."""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configfactory import write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import jpeg_bytes
from tests.reliability import (
    Commands,
    DaemonPool,
    explain_fields,
    log_events,
    no_reader_on_fifo,
    opens_recorded,
    wait_delivered,
    wait_log_event,
    write_images,
)
from watcher.devserver import DevServer

DATASET = "ds_bad"
MAX_WAIT_SECONDS = 2.0


class Rig:
    """A watch root, an outside folder nobody may read, a config, the daemons, the commands."""

    def __init__(self, tmp_path: Path, devserver: DevServer, opened: list[str]) -> None:
        self.tmp_path = tmp_path
        self.devserver = devserver
        self.root = tmp_path / "cam"
        self.root.mkdir()
        self.outside = tmp_path / "outside"
        self.outside_opened = opened
        self.config = write_config(
            tmp_path,
            endpoint=devserver.base_url,
            watches=[{"path": str(self.root), "dataset_id": DATASET}],
            settle={"seconds": 0.3, "max_wait_seconds": MAX_WAIT_SECONDS},
        )
        self.cli = Commands()
        self.pool = DaemonPool()
        self.daemon: DaemonProcess | None = None
        self._good = 0

    def start(self, *, drop_dac: bool = False) -> DaemonProcess:
        self.daemon = self.pool.start(self.config, self.tmp_path / "run", drop_dac=drop_dac)
        return self.daemon

    def explain(self, path: Path) -> dict[str, str]:
        return explain_fields(self.cli.explain(self.config, path))

    def wait_event(self, event: str, path: Path, **expected: str) -> dict[str, Any]:
        """Until the log has `event` about `path` whose fields contain the expected texts."""
        assert self.daemon is not None
        return wait_log_event(
            self.daemon,
            lambda e: (
                e.get("event") == event
                and e.get("path") == str(path)
                and all(text in str(e.get(key, "")) for key, text in expected.items())
            ),
        )

    def wait_reported(self, path: Path, reason: str) -> dict[str, Any]:
        """Until a warning (or worse) about `path` gives a reason containing `reason`."""
        assert self.daemon is not None
        return wait_log_event(
            self.daemon,
            lambda e: (
                e.get("path") == str(path)
                and e.get("level") in ("warning", "error")
                and reason in str(e.get("reason", ""))
            ),
        )

    def items(self) -> set[str]:
        return set(self.devserver.items(DATASET))

    def good_file_still_arrives(self) -> None:
        assert self.daemon is not None and self.daemon.process is not None
        assert self.daemon.process.poll() is None, self.daemon.log_text()[-4000:]
        self._good += 1
        good = write_images(self.root, [f"good/ok{self._good}.jpg"], first_seed=9000 + self._good)
        wait_delivered(self.devserver, DATASET, good, timeout_seconds=15)

    def finish(self) -> None:
        """Still alive and uploading, nothing outside opened, and a clean stop."""
        self.good_file_still_arrives()
        time.sleep(0.2)  # inotify events reach the recorder asynchronously
        assert self.outside_opened == [], "opened outside the watch root"
        assert self.daemon is not None
        assert self.daemon.stop() == 0, self.daemon.log_text()[-4000:]
        lines = [line for line in self.daemon.log_text().splitlines() if line.strip()]
        assert len(log_events("\n".join(lines))) == len(lines), "a log line that is not JSON"


@pytest.fixture
def rig(tmp_path: Path, devserver: DevServer) -> Iterator[Rig]:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "target.jpg").write_bytes(jpeg_bytes(seed=4242))
    with opens_recorded(outside) as opened:  # from here on, not even the test reads it
        rig = Rig(tmp_path, devserver, opened)
        try:
            yield rig
        finally:
            rig.pool.kill_all()


def state_of(fields: dict[str, str]) -> str:
    return fields.get("state", "").split(" ")[0]


# -- incomplete files -------------------------------------------------------------------------


def test_zero_byte_file_is_reported_then_uploaded_once_written(rig: Rig) -> None:
    rig.start()
    empty = rig.root / "empty.jpg"
    empty.touch()
    rig.wait_reported(empty, "zero-byte file")
    fields = rig.explain(empty)
    assert state_of(fields) == "incomplete" and fields["last error"] == "zero-byte file", fields
    assert "empty.jpg" not in rig.items()

    empty.write_bytes(jpeg_bytes(seed=1))  # the camera finally writes it
    wait_delivered(rig.devserver, DATASET, {"empty.jpg": empty}, timeout_seconds=15)
    rig.finish()


def test_truncated_jpeg_stays_incomplete_until_completed(rig: Rig) -> None:
    rig.start()
    data = jpeg_bytes(320, 240, seed=2)
    cut = rig.root / "cut.jpg"
    written_at = time.monotonic()
    cut.write_bytes(data[: len(data) * 6 // 10])
    rig.wait_reported(cut, "JPEG has no end-of-image marker")
    assert time.monotonic() - written_at >= MAX_WAIT_SECONDS - 0.2  # reported after max_wait
    fields = rig.explain(cut)
    assert state_of(fields) == "incomplete" and "JPEG" in fields["last error"], fields
    status = rig.cli.status(rig.config)
    assert status["totals"]["incomplete"] == 1, status["totals"]
    assert any(e["relpath"] == "cut.jpg" for e in status["recent_errors"])
    time.sleep(0.5)
    assert "cut.jpg" not in rig.items()

    with cut.open("ab") as f:  # the writer comes back and finishes the file
        f.write(data[len(data) * 6 // 10 :])
    wait_delivered(rig.devserver, DATASET, {"cut.jpg": cut}, timeout_seconds=15)
    assert rig.devserver.items(DATASET)["cut.jpg"].times_written == 1
    rig.finish()


# -- files that are not images or cannot be read ----------------------------------------------


def test_non_image_with_jpg_extension_is_not_uploaded(rig: Rig) -> None:
    rig.start()
    notes = rig.root / "notes.jpg"
    notes.write_text("this is a text file, not a JPEG\n")
    rig.wait_reported(notes, "not an image")
    fields = rig.explain(notes)
    assert "not an image" in fields.get("last error", ""), fields
    assert "notes.jpg" not in rig.items()
    rig.finish()


def test_non_image_with_jpg_extension_is_parked_as_failed(rig: Rig) -> None:
    rig.start()
    notes = rig.root / "notes.jpg"
    notes.write_text("this is a text file, not a JPEG\n")
    fields = rig.cli.wait_state(rig.config, notes, "failed", timeout_seconds=MAX_WAIT_SECONDS + 4)
    assert "not an image" in fields["last error"], fields
    rig.finish()


def test_unreadable_file_is_reported_and_uploaded_after_chmod_and_retry(rig: Rig) -> None:
    """Root reads mode-000 files anyway; as root the daemon runs through `setpriv` without
    CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, which makes file modes bind root too."""
    as_root = os.geteuid() == 0
    if as_root and shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing")
    rig.start(drop_dac=as_root)
    locked = rig.root / "locked.jpg"
    fd = os.open(locked, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o000)  # never readable
    os.write(fd, jpeg_bytes(seed=3))
    os.close(fd)
    rig.wait_reported(locked, "unreadable: Permission denied")
    fields = rig.explain(locked)
    assert state_of(fields) in ("incomplete", "failed"), fields
    assert fields["last error"] == "unreadable: Permission denied", fields
    assert "locked.jpg" not in rig.items()

    locked.chmod(0o644)
    retried = rig.cli.run("retry", "-c", str(rig.config), str(locked))
    assert retried.returncode == 0, retried.stdout + retried.stderr
    wait_delivered(rig.devserver, DATASET, {"locked.jpg": locked}, timeout_seconds=15)
    rig.finish()


def test_fifo_named_jpg_is_never_opened(rig: Rig) -> None:
    early = rig.root / "early.jpg"
    os.mkfifo(early)  # found by the start-up walk
    daemon = rig.start()
    fifo = rig.root / "x.jpg"
    os.mkfifo(fifo)  # seen live
    rig.wait_reported(early, "not a regular file")
    rig.wait_reported(fifo, "not a regular file")
    for path in (early, fifo):
        fields = rig.explain(path)
        assert state_of(fields) in ("failed", "incomplete"), fields
        assert fields["last error"] == "not a regular file", fields
    daemon.signal(signal.SIGHUP)  # another walk over both
    assert wait_until(lambda: "config_reloaded" in daemon.log_text(), 10)
    rig.good_file_still_arrives()
    assert no_reader_on_fifo(early) and no_reader_on_fifo(fifo), "the daemon opened a FIFO"
    assert not {"early.jpg", "x.jpg"} & rig.items()
    rig.finish()


# -- symlinks ---------------------------------------------------------------------------------


def test_symlinks_out_of_the_root_are_not_followed(rig: Rig) -> None:
    target = rig.outside / "target.jpg"
    walked = rig.root / "walked.jpg"
    walked.symlink_to(target)  # there at start: the walk sees it
    (rig.root / "outdir").symlink_to(rig.outside, target_is_directory=True)
    daemon = rig.start()
    live = rig.root / "live.jpg"
    live.symlink_to(target)  # created while running: the live path sees it
    rig.wait_reported(walked, "symbolic link")
    rig.wait_reported(live, "symbolic link")
    for link in (walked, live):
        fields = rig.explain(link)
        assert state_of(fields) in ("failed", "incomplete"), fields
        assert "symbolic link" in fields["last error"], fields
    daemon.signal(signal.SIGHUP)  # a walk over the live one too
    assert wait_until(lambda: "config_reloaded" in daemon.log_text(), 10)
    rig.good_file_still_arrives()
    assert not {"walked.jpg", "live.jpg", "outdir/target.jpg"} & rig.items(), rig.items()
    stored = {item.image_sha256 for item in rig.devserver.items(DATASET).values()}
    assert hashlib.sha256(jpeg_bytes(seed=4242)).hexdigest() not in stored
    rig.finish()


def test_symlink_loop_seen_live_is_ignored(rig: Rig) -> None:
    rig.start()
    first, second = rig.root / "loop_a.jpg", rig.root / "loop_b.jpg"
    first.symlink_to(second)
    second.symlink_to(first)
    rig.wait_event("settle_incomplete", first, reason="symbolic link")
    rig.wait_event("settle_incomplete", second, reason="symbolic link")
    rig.finish()


def test_symlink_loop_survives_the_reconcile_walk(rig: Rig) -> None:
    (rig.root / "loop_a.jpg").symlink_to(rig.root / "loop_b.jpg")
    (rig.root / "loop_b.jpg").symlink_to(rig.root / "loop_a.jpg")
    # Until 4a0da62 Path.resolve() raised RuntimeError on the loop and the walk killed the daemon.
    daemon = rig.start()  # the start-up walk meets the loop before READY
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: "config_reloaded" in daemon.log_text(), 10)
    time.sleep(0.5)
    rig.finish()


# -- names ------------------------------------------------------------------------------------

AWKWARD_NAMES = [
    "with space.jpg",
    'it\'s "quoted".jpg',
    "ünïcödé 日本語 🙂.jpg",
    "hash#pct%q?amp&.jpg",
    "back\\slash [bracket] *star*.jpg",
    "a" * 251 + ".jpg",  # 255 bytes, the longest name ext4 allows
    "é" * 125 + "x.jpg",  # 255 bytes in UTF-8, 130 characters
    "deep dir/sub ü/" + "b" * 251 + ".jpg",
]


def test_awkward_names_arrive_under_their_exact_relpath(rig: Rig) -> None:
    assert len(AWKWARD_NAMES[5].encode()) == 255 and len(AWKWARD_NAMES[6].encode()) == 255
    before = write_images(rig.root, AWKWARD_NAMES[:4], first_seed=100)
    rig.start()
    live = write_images(rig.root, AWKWARD_NAMES[4:], first_seed=200)
    files = before | live
    wait_delivered(rig.devserver, DATASET, files, timeout_seconds=20)
    assert rig.items() == set(files)  # reference_id == relpath, character for character
    for relpath in (AWKWARD_NAMES[1], AWKWARD_NAMES[6], AWKWARD_NAMES[7]):
        path = files[relpath]
        fields = rig.explain(path)
        assert fields["reference_id"] == relpath and state_of(fields) == "uploaded", fields
    rig.finish()


def test_control_characters_and_overlong_reference_ids_are_refused(rig: Rig) -> None:
    rig.start()
    newline = rig.root / "new\nline.jpg"
    tab = rig.root / "tab\there.jpg"
    deep = rig.root / "/".join(["d" * 250] * 4) / ("e" * 251 + ".jpg")  # relpath > 1024 chars
    write_images(rig.root, [p.relative_to(rig.root).as_posix() for p in (newline, tab, deep)], 300)
    rig.wait_event("file_not_sendable", newline, reason="control character (U+000A)")
    rig.wait_event("file_not_sendable", tab, reason="control character (U+0009)")
    rig.wait_event("file_not_sendable", deep, reason="the limit is 1024")
    errors = {e["relpath"]: e for e in rig.cli.status(rig.config)["recent_errors"]}
    for path in (newline, tab, deep):
        error = errors[path.relative_to(rig.root).as_posix()]
        assert error["state"] == "failed" and error["reason"].startswith("path rules:"), error
    explained = rig.cli.explain(rig.config, tab)
    assert "refused: reference_id" in explained and "U+0009" in explained, explained
    assert rig.items() == set()
    rig.finish()  # also: every log line stayed one JSON line, newline name or not


# -- things that vanish -----------------------------------------------------------------------


def test_file_deleted_between_settle_and_upload_is_gone_not_lost(rig: Rig) -> None:
    daemon = rig.start()
    rig.devserver.set_down(True)  # it settles and queues, but cannot go out
    victim = rig.root / "victim.jpg"
    victim.write_bytes(jpeg_bytes(seed=5))
    rig.cli.wait_state(rig.config, victim, "pending", timeout_seconds=10)
    wait_log_event(daemon, lambda e: e.get("event") == "upload_retry")
    victim.unlink()
    rig.cli.wait_state(rig.config, victim, "gone", timeout_seconds=10)
    # Seen as a delete event while queued, or as a failed open when already claimed.
    wait_log_event(
        daemon,
        lambda e: e.get("path") == str(victim) and e.get("event") in ("file_gone", "upload_parked"),
    )
    rig.devserver.set_down(False)
    rig.good_file_still_arrives()
    assert "victim.jpg" not in rig.items()
    assert state_of(rig.explain(victim)) == "gone"
    rig.finish()


def test_watch_folder_deleted_and_recreated_keeps_watching(rig: Rig) -> None:
    daemon = rig.start()
    first = write_images(rig.root, ["first.jpg"], first_seed=1)
    wait_delivered(rig.devserver, DATASET, first, timeout_seconds=15)

    shutil.rmtree(rig.root)  # deleted, noticed, recreated later
    wait_log_event(
        daemon,
        lambda e: e.get("event") == "watch_waiting" and e.get("problem") == "folder is missing",
    )
    rig.root.mkdir()
    second = write_images(rig.root, ["second.jpg"], first_seed=2)
    wait_delivered(rig.devserver, DATASET, second, timeout_seconds=15)
    rig.cli.wait_state(rig.config, first["first.jpg"], "gone")  # its item stays in the dataset
    assert "first.jpg" in rig.items()

    shutil.rmtree(rig.root)  # replaced at once, before the supervisor looks
    rig.root.mkdir()
    third = write_images(rig.root, ["sub/third.jpg"], first_seed=3)
    wait_delivered(rig.devserver, DATASET, third, timeout_seconds=15)
    rig.finish()
