"""A damaged or full state store costs re-sends at most, never images, and never the daemon."""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configfactory import API_KEY, run_watcher, watcher_env, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import sha256_of, write_jpeg
from watcher.devserver import DevServer
from watcher.errors import StoreError
from watcher.store import StateStore

DATASET = "ds_state"


def old_files(root: Path, count: int, first_seed: int = 0) -> dict[str, Path]:
    files = {}
    for index in range(count):
        path = root / f"img_{first_seed + index}.jpg"
        write_jpeg(path, seed=first_seed + index)
        old = time.time() - 60
        os.utime(path, (old, old))
        files[path.name] = path
    return files


def test_corrupt_database_is_moved_aside_and_rebuilt_without_duplicates(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    files = old_files(root, 5)
    config = write_config(
        tmp_path, endpoint=devserver.base_url, watches=[{"path": str(root), "dataset_id": DATASET}]
    )
    assert run_watcher("scan", "-c", str(config)).returncode == 0
    state = tmp_path / "state" / "state.db"
    with state.open("r+b") as f:
        f.write(b"garbage " * 64)  # the header is gone: SQLite cannot read it

    again = run_watcher("scan", "-c", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    assert '"event": "state_db_corrupt"' in again.stderr
    assert len(list(state.parent.glob("state.db.corrupt-*"))) == 1
    items = devserver.items(DATASET)
    assert set(items) == set(files)
    # The rebuilt store re-sent everything once; the server kept what it had (on_conflict=skip).
    assert all(item.times_written == 1 for item in items.values())
    with sqlite3.connect(state) as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"


@pytest.fixture
def small_state_fs(tmp_path: Path) -> Iterator[Path]:
    """A 4 MiB tmpfs for the state folder, so it can be filled up for real."""
    mount_point = tmp_path / "statefs"
    mount_point.mkdir()
    result = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount_point)],
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.strip()}")
    try:
        yield mount_point
    finally:
        subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(folder: Path) -> Path:
    filler = folder / "filler"
    # Unbuffered writes: a buffered file's close() would retry the last partial write and
    # raise ENOSPC outside the loop.
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        block = b"\0" * 65536
        while True:
            os.write(fd, block)
    except OSError as exc:
        assert exc.errno == errno.ENOSPC
    finally:
        os.close(fd)
    return filler


def test_full_state_folder_stalls_then_recovers_without_loss(
    tmp_path: Path, devserver: DevServer, small_state_fs: Path
) -> None:
    root = tmp_path / "cam"
    first = old_files(root, 1)
    config = write_config(
        tmp_path,
        endpoint=devserver.base_url,
        watches=[{"path": str(root), "dataset_id": DATASET}],
        state={"path": str(small_state_fs / "state.db")},
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()
        assert wait_until(lambda: set(devserver.items(DATASET)) == set(first), 20)
        filler = fill(small_state_fs)
        later = {f"new_{i}.jpg": root / f"new_{i}.jpg" for i in range(5)}
        for index, path in enumerate(later.values()):
            write_jpeg(path, seed=100 + index)
        assert wait_until(lambda: "state_write_failed" in daemon.log_text(), 20)
        time.sleep(1.0)
        assert daemon.process is not None and daemon.process.poll() is None  # still running

        filler.unlink()
        expected = {**first, **later}
        assert wait_until(
            lambda: all(
                ref in devserver.items(DATASET)
                and devserver.items(DATASET)[ref].image_sha256 == sha256_of(path)
                for ref, path in expected.items()
            ),
            40,
        ), daemon.log_text()[-3000:]
        assert "state_write_recovered" in daemon.log_text()
        assert daemon.stop() == 0
    finally:
        daemon.kill()
    with sqlite3.connect(small_state_fs / "state.db") as db:
        assert db.execute("PRAGMA quick_check").fetchone()[0] == "ok"
        uploaded = db.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()[0]
    assert uploaded == 6


# -- errors at open that are not damage: wait, never move the database aside -----------------


class ScanProcess:
    """`nucleus-watcher scan` running in the background, its stderr in a file to poll."""

    def __init__(self, config: Path, log_path: Path) -> None:
        self.log_path = log_path
        self._log = log_path.open("wb")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "watcher", "scan", "-c", str(config)],
            env=watcher_env(),
            stdout=subprocess.PIPE,
            stderr=self._log,
        )

    def events(self, name: str) -> list[dict[str, Any]]:
        found = []
        for line in self.log_path.read_text(errors="replace").splitlines():
            if line.startswith("{"):
                event = json.loads(line)
                if event.get("event") == name:
                    found.append(event)
        return found

    def wait_for(self, name: str, timeout_seconds: float) -> bool:
        """Whether `name` was logged within the time; gives up early once the scan has ended."""
        wait_until(lambda: self.events(name) or self.process.poll() is not None, timeout_seconds)
        return bool(self.events(name))

    def finish(self, timeout_seconds: float) -> tuple[int, str]:
        stdout, _ = self.process.communicate(timeout=timeout_seconds)
        return self.process.returncode, stdout.decode()

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.communicate()
        self._log.close()


def scanned_once(tmp_path: Path, devserver: DevServer, **state: Any) -> tuple[Path, Path]:
    """A config whose first scan uploaded two files; returns (config, state database)."""
    root = tmp_path / "cam"
    old_files(root, 2)
    config = write_config(
        tmp_path,
        endpoint=devserver.base_url,
        watches=[{"path": str(root), "dataset_id": DATASET}],
        state=state,
    )
    first = run_watcher("scan", "-c", str(config))
    assert first.returncode == 0, first.stdout + first.stderr
    state_path = Path(state["path"]) if state else tmp_path / "state" / "state.db"
    return config, state_path


def assert_intact_and_not_resent(state: Path, devserver: DevServer) -> None:
    assert list(state.parent.glob("*.corrupt-*")) == []
    with sqlite3.connect(state) as db:
        assert db.execute("SELECT count(*) FROM files WHERE state = 'uploaded'").fetchone()[0] == 2
    assert all(item.times_written == 1 for item in devserver.items(DATASET).values())


def test_locked_database_is_waited_for_and_not_moved_aside(
    tmp_path: Path, devserver: DevServer
) -> None:
    config, state = scanned_once(tmp_path, devserver)
    requests_before = devserver.append_request_count()
    # Another program (an sqlite3 shell, a backup) holds the database exclusively.
    holder = sqlite3.connect(state, isolation_level=None, check_same_thread=False)
    scan: ScanProcess | None = None
    try:
        holder.execute("PRAGMA locking_mode=EXCLUSIVE")
        holder.execute("BEGIN EXCLUSIVE")
        holder.execute("UPDATE files SET changed_at = changed_at")
        holder.execute("COMMIT")  # the exclusive lock stays until the connection closes
        scan = ScanProcess(config, tmp_path / "scan.log")
        assert scan.wait_for("state_open_retry", 40), scan.log_path.read_text()
        holder.close()
        returncode, stdout = scan.finish(60)
        assert returncode == 0, stdout + scan.log_path.read_text()
        retries = scan.events("state_open_retry")
        assert len(retries) == 1, retries  # one line, however long it waits
        assert retries[0]["reason"] == "database is locked"
        assert "another program" in retries[0]["hint"]
        assert scan.events("state_db_corrupt") == []
    finally:
        holder.close()
        if scan is not None:
            scan.kill()
    assert_intact_and_not_resent(state, devserver)
    assert devserver.append_request_count() == requests_before


def test_full_disk_at_open_is_waited_for_and_not_moved_aside(
    tmp_path: Path, devserver: DevServer, small_state_fs: Path
) -> None:
    config, state = scanned_once(tmp_path, devserver, path=str(small_state_fs / "state.db"))
    filler = fill(small_state_fs)
    scan = ScanProcess(config, tmp_path / "scan.log")
    try:
        assert scan.wait_for("state_open_retry", 40), scan.log_path.read_text()
        filler.unlink()
        returncode, stdout = scan.finish(60)
        assert returncode == 0, stdout + scan.log_path.read_text()
        retries = scan.events("state_open_retry")
        assert len(retries) == 1, retries
        assert "free space" in retries[0]["hint"]
        assert scan.events("state_db_corrupt") == []
        assert API_KEY not in scan.log_path.read_text() + stdout
    finally:
        scan.kill()
    assert_intact_and_not_resent(state, devserver)


def test_open_gives_up_after_its_retry_time_with_one_line(
    tmp_path: Path, devserver: DevServer, small_state_fs: Path
) -> None:
    _, state = scanned_once(tmp_path, devserver, path=str(small_state_fs / "state.db"))
    fill(small_state_fs)
    started = time.monotonic()
    with pytest.raises(StoreError) as caught:
        StateStore.open(state, retry_seconds=1.0)
    assert time.monotonic() - started < 20
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith(f"{state}: cannot open the state database (gave up after 1 s): ")
    assert list(small_state_fs.glob("*.corrupt-*")) == []
    # The lock beside the database was let go: the next open (with space again) works.
    (small_state_fs / "filler").unlink()
    StateStore.open(state, retry_seconds=1.0).close()


def test_quick_check_failure_still_moves_the_database_aside(
    tmp_path: Path, devserver: DevServer
) -> None:
    config, state = scanned_once(tmp_path, devserver)
    # Damage a table page, not the header: the file still opens, quick_check finds it.
    page_size = 4096
    with sqlite3.connect(state) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        root_page = db.execute(
            "SELECT rootpage FROM sqlite_master WHERE name = 'files_claim'"
        ).fetchone()[0]
    with state.open("r+b") as f:
        f.seek((root_page - 1) * page_size)
        f.write(b"\x0d" + b"\xff" * 200)
    again = run_watcher("scan", "-c", str(config))
    assert again.returncode == 0, again.stdout + again.stderr
    corrupt = [line for line in again.stderr.splitlines() if '"state_db_corrupt"' in line]
    assert len(corrupt) == 1 and "quick_check" in json.loads(corrupt[0])["error"], again.stderr
    assert len(list(state.parent.glob("state.db.corrupt-*"))) == 1
