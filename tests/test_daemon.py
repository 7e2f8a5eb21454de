"""`nucleus-watcher run` end to end: the real daemon process, real files written the ways cameras
and people write them, real watchdog, a real devserver. Each image must arrive once, complete."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from tests.configfactory import API_KEY, run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import jpeg_bytes, sha256_of, write_jpeg
from tests.reliability import cpu_seconds
from watcher.devserver import DevServer

DATASET = "ds_live"


@pytest.fixture
def daemons(tmp_path: Path) -> Iterator[list[DaemonProcess]]:
    """Every daemon a test starts is killed (if still running) and reaped at teardown."""
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.kill()


def live_config(
    tmp_path: Path, devserver: DevServer, roots: list[Path], **sections: dict[str, Any]
) -> Path:
    watches = [
        {
            "path": str(root),
            "dataset_id": DATASET,
            "rules": [{"match": "{weather}/**", "metadata": {"weather": "{weather}"}}],
        }
        for root in roots
    ]
    sections.setdefault("settle", {"seconds": 0.5, "max_wait_seconds": 10})
    return write_config(tmp_path, endpoint=devserver.base_url, watches=watches, **sections)


def start(daemons: list[DaemonProcess], config: Path, tmp_path: Path) -> DaemonProcess:
    daemon = DaemonProcess(config, tmp_path)
    daemons.append(daemon)
    return daemon.start()


def stored_sha(devserver: DevServer, reference_id: str) -> str | None:
    item = devserver.items(DATASET).get(reference_id)
    return item.image_sha256 if item else None


def wait_stored(devserver: DevServer, expected: dict[str, Path], timeout: float = 30) -> None:
    """Until every reference_id holds exactly the bytes of its file."""

    def all_there() -> bool:
        items = devserver.items(DATASET)
        return all(
            ref in items and items[ref].image_sha256 == sha256_of(path)
            for ref, path in expected.items()
        )

    assert wait_until(all_there, timeout), {
        ref: ref in devserver.items(DATASET) for ref in expected
    }


def test_slow_writer_is_uploaded_once_and_complete(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    (root / "Sunny").mkdir(parents=True)
    daemon = start(daemons, live_config(tmp_path, devserver, [root]), tmp_path)
    data = jpeg_bytes(320, 240, seed=5)
    chunks = [data[i * len(data) // 10 : (i + 1) * len(data) // 10] for i in range(10)]
    target = root / "Sunny" / "slow.jpg"
    with target.open("wb") as f:
        for chunk in chunks[:9]:
            f.write(chunk)
            f.flush()
            time.sleep(0.2)  # shorter than settle (0.5 s)
        time.sleep(1.2)  # longer than settle, before the last chunk: only verify_image holds it
        assert devserver.items(DATASET) == {}
        f.write(chunks[9])
    wait_stored(devserver, {"Sunny/slow.jpg": target})
    time.sleep(1.0)  # anything else it would have sent by now
    item = devserver.items(DATASET)["Sunny/slow.jpg"]
    assert item.times_written == 1 and item.metadata == {"weather": "Sunny"}
    assert devserver.append_request_count() == 1
    assert daemon.stop() == 0


def test_every_way_a_file_arrives(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    outside = tmp_path / "outside"
    (root / "Sunny").mkdir(parents=True)
    outside.mkdir()
    daemon = start(daemons, live_config(tmp_path, devserver, [root]), tmp_path)
    expected: dict[str, Path] = {}

    # cp from elsewhere
    write_jpeg(outside / "copied.jpg", seed=1)
    shutil.copy(outside / "copied.jpg", root / "Sunny" / "copied.jpg")
    expected["Sunny/copied.jpg"] = root / "Sunny" / "copied.jpg"
    # mv in from outside the tree
    write_jpeg(outside / "moved.jpg", seed=2)
    os.rename(outside / "moved.jpg", root / "Sunny" / "moved.jpg")
    expected["Sunny/moved.jpg"] = root / "Sunny" / "moved.jpg"
    # atomic temp-and-rename inside the tree
    temp = root / "Sunny" / ".atomic.jpg.tmp"
    temp.write_bytes(jpeg_bytes(seed=3))
    os.rename(temp, root / "Sunny" / "atomic.jpg")
    expected["Sunny/atomic.jpg"] = root / "Sunny" / "atomic.jpg"
    # a new nested folder created after start, a file written into it at once
    write_jpeg(root / "Foggy" / "a" / "b" / "nested.jpg", seed=4)
    expected["Foggy/a/b/nested.jpg"] = root / "Foggy" / "a" / "b" / "nested.jpg"
    # rsync of a folder (rsync writes .name.XXXXXX temp files, then renames)
    if shutil.which("rsync"):
        source = outside / "Rainy"
        for index in range(3):
            write_jpeg(source / f"r{index}.jpg", seed=10 + index)
        subprocess.run(["rsync", "-a", str(source), str(root)], check=True)
        for index in range(3):
            expected[f"Rainy/r{index}.jpg"] = root / "Rainy" / f"r{index}.jpg"

    wait_stored(devserver, expected)
    time.sleep(1.0)
    items = devserver.items(DATASET)
    assert set(items) == set(expected)  # no temp names, nothing twice
    assert all(item.times_written == 1 for item in items.values())
    assert items["Foggy/a/b/nested.jpg"].metadata == {"weather": "Foggy"}
    assert daemon.stop() == 0


def test_files_added_while_stopped_and_edits_after_upload(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    config = live_config(tmp_path, devserver, [root])
    write_jpeg(root / "Sunny" / "before.jpg", seed=1)
    daemon = start(daemons, config, tmp_path)
    wait_stored(devserver, {"Sunny/before.jpg": root / "Sunny" / "before.jpg"})
    assert daemon.stop() == 0

    write_jpeg(root / "Sunny" / "while_down.jpg", seed=2)
    daemon.start()
    wait_stored(devserver, {"Sunny/while_down.jpg": root / "Sunny" / "while_down.jpg"})
    requests_before = devserver.append_request_count()

    edited = root / "Sunny" / "before.jpg"
    write_jpeg(edited, seed=3)
    wait_stored(devserver, {"Sunny/before.jpg": edited})
    time.sleep(1.0)
    assert devserver.append_request_count() == requests_before + 1
    assert devserver.items(DATASET)["Sunny/before.jpg"].times_written == 2
    assert daemon.stop() == 0


def test_sigterm_during_a_burst_then_restart_loses_nothing(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    (root / "Sunny").mkdir(parents=True)
    config = live_config(
        tmp_path, devserver, [root], upload={"concurrency": 2, "max_files_per_request": 2}
    )
    daemon = start(daemons, config, tmp_path)
    files = {f"Sunny/f{index:03}.jpg": root / "Sunny" / f"f{index:03}.jpg" for index in range(100)}
    for index, path in enumerate(files.values()):
        write_jpeg(path, seed=index, width=160, height=120)
    assert wait_until(lambda: len(devserver.items(DATASET)) >= 5, 30)
    daemon.signal(signal.SIGTERM)
    assert daemon.process is not None
    assert daemon.process.wait(40) == 0
    assert any("STOPPING=1" in m for m in daemon.read_notifications())
    stored_at_stop = len(devserver.items(DATASET))

    daemon.start()
    wait_stored(devserver, files, timeout=60)
    time.sleep(1.0)
    items = devserver.items(DATASET)
    assert len(items) == 100
    assert all(item.times_written == 1 for item in items.values()), stored_at_stop
    assert daemon.stop() == 0


def test_sighup_adds_a_watch_and_missing_folder_is_picked_up(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    first, second, later = tmp_path / "first", tmp_path / "second", tmp_path / "later"
    first.mkdir()
    second.mkdir()
    config = live_config(tmp_path, devserver, [first, later])  # `later` does not exist yet
    daemon = start(daemons, config, tmp_path)

    write_jpeg(later / "Sunny" / "appeared.jpg", seed=1)  # the folder appears after start
    wait_stored(devserver, {"Sunny/appeared.jpg": later / "Sunny" / "appeared.jpg"})

    live_config(tmp_path, devserver, [first, later, second])
    daemon.signal(signal.SIGHUP)
    assert wait_until(lambda: daemon.has_message("RELOADING=1"), 10)
    assert wait_until(lambda: "config_reloaded" in daemon.log_text(), 10)
    write_jpeg(second / "Rainy" / "added.jpg", seed=2)
    wait_stored(devserver, {"Rainy/added.jpg": second / "Rainy" / "added.jpg"})
    assert daemon.stop() == 0
    assert API_KEY not in daemon.log_text()


def test_deleted_file_stays_in_dataset_and_record_says_gone(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    write_jpeg(root / "Sunny" / "x.jpg", seed=1)
    config = live_config(tmp_path, devserver, [root])
    daemon = start(daemons, config, tmp_path)
    wait_stored(devserver, {"Sunny/x.jpg": root / "Sunny" / "x.jpg"})
    (root / "Sunny" / "x.jpg").unlink()
    assert wait_until(lambda: "file_gone" in daemon.log_text(), 10)
    assert daemon.stop() == 0
    assert "Sunny/x.jpg" in devserver.items(DATASET)
    explained = run_watcher("explain", "-c", str(config), str(root / "Sunny" / "x.jpg"))
    assert "state:        gone" in explained.stdout


def test_file_deleted_while_its_answer_is_on_the_way_ends_gone(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    # The answer drips slowly: the item is stored, the request is still out, and the file goes.
    with DevServer(data_dir=tmp_path / "slow", drip_byte_interval_seconds=0.05) as server:
        root = tmp_path / "cam"
        (root / "Sunny").mkdir(parents=True)
        config = live_config(tmp_path, server, [root])
        daemon = start(daemons, config, tmp_path)
        server.inject_faults("drip")
        path = root / "Sunny" / "x.jpg"
        write_jpeg(path, seed=1)
        assert wait_until(lambda: "Sunny/x.jpg" in server.items(DATASET), 10)
        path.unlink()
        assert wait_until(lambda: "upload_confirmed" in daemon.log_text(), 20), daemon.log_text()
        assert wait_until(lambda: "file_gone" in daemon.log_text(), 10), daemon.log_text()
        assert daemon.stop() == 0
        explained = run_watcher("explain", "-c", str(config), str(path))
        assert "state:        gone" in explained.stdout, explained.stdout


def test_metrics_endpoint_counts_what_the_daemon_did(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    root = tmp_path / "cam"
    write_jpeg(root / "Sunny" / "a.jpg", seed=1)
    old = time.time() - 60  # found settled by the start-up walk; only b.jpg goes through settle
    os.utime(root / "Sunny" / "a.jpg", (old, old))
    config = live_config(tmp_path, devserver, [root], metrics={"listen": f"127.0.0.1:{port}"})
    daemon = start(daemons, config, tmp_path)
    wait_stored(devserver, {"Sunny/a.jpg": root / "Sunny" / "a.jpg"})
    write_jpeg(root / "Sunny" / "b.jpg", seed=2)
    wait_stored(devserver, {"Sunny/b.jpg": root / "Sunny" / "b.jpg"})

    def scrape() -> str:
        return requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5).text

    assert wait_until(
        lambda: 'nucleus_watcher_files_uploaded_total{dataset="ds_live"} 2.0' in scrape(), 10
    ), scrape()
    text = scrape()
    assert 'nucleus_watcher_queue_depth{state="uploaded"} 2.0' in text
    assert f'nucleus_watcher_files_settled_total{{watch="{root}"}} 1.0' in text
    assert "nucleus_watcher_request_seconds_count 2.0" in text
    assert "nucleus_watcher_bytes_sent_total" in text
    assert daemon.stop() == 0


MAX_QUEUED_EVENTS = Path("/proc/sys/fs/inotify/max_queued_events")


def test_kernel_queue_overflow_loses_no_file(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    """Flood a watched folder past a lowered inotify queue: the overflow triggers a reconcile."""
    try:
        original = MAX_QUEUED_EVENTS.read_text()
        MAX_QUEUED_EVENTS.write_text("64\n")
    except OSError:
        pytest.skip("cannot lower fs.inotify.max_queued_events here (needs root)")
    root = tmp_path / "cam"
    (root / "Sunny").mkdir(parents=True)
    config = live_config(tmp_path, devserver, [root], scan={"interval_seconds": 3600})
    try:
        # The limit is read when the inotify instance is made: lower only around the start.
        daemon = start(daemons, config, tmp_path)
    finally:
        MAX_QUEUED_EVENTS.write_text(original)
    files = {f"Sunny/flood_{i:04}.jpg": root / "Sunny" / f"flood_{i:04}.jpg" for i in range(600)}
    images = [
        jpeg_bytes(16, 16, seed=index) for index in range(len(files))
    ]  # made first: fast flood
    for data, path in zip(images, files.values(), strict=True):
        path.write_bytes(data)
    wait_stored(devserver, files, timeout=60)
    assert "kernel event queue overflow" in daemon.log_text()
    assert daemon.stop() == 0


def test_an_idle_daemon_uses_almost_no_cpu(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    """Nothing to do means sleeping: no worker, observer or loop may spin."""
    root = tmp_path / "cam"
    files = {f"Sunny/{i}.jpg": root / "Sunny" / f"{i}.jpg" for i in range(5)}
    for index, path in enumerate(files.values()):
        write_jpeg(path, seed=index)
    daemon = start(daemons, live_config(tmp_path, devserver, [root]), tmp_path)
    wait_stored(devserver, files)
    time.sleep(1.0)
    assert daemon.process is not None
    before = cpu_seconds(daemon.process.pid)
    time.sleep(4.0)
    used = cpu_seconds(daemon.process.pid) - before
    assert used < 0.2, f"idle daemon used {used:.2f} s of CPU in 4 s"
    assert daemon.stop() == 0
