"""A damaged or full state store costs re-sends at most, never images, and never the daemon."""

from __future__ import annotations

import errno
import os
import sqlite3
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import sha256_of, write_jpeg
from watcher.devserver import DevServer

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
    with filler.open("wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
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
