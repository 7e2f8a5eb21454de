"""What an operator relies on, end to end: the notify protocol, after_upload, the bandwidth cap."""

from __future__ import annotations

import re
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import sha256_of, write_jpeg, write_large_jpeg
from watcher.devserver import DevServer


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.kill()


def test_notify_protocol_ready_status_watchdog_stopping(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    config = write_config(
        tmp_path, endpoint=devserver.base_url, watches=[{"path": str(root), "dataset_id": "ds_n"}]
    )
    daemon = DaemonProcess(config, tmp_path, extra_env={"WATCHDOG_USEC": "400000"})
    daemons.append(daemon)
    daemon.start()
    write_jpeg(root / "a.jpg")
    assert wait_until(lambda: "a.jpg" in devserver.items("ds_n"), 20)
    assert wait_until(lambda: sum(m == "WATCHDOG=1" for m in daemon.read_notifications()) >= 3, 10)
    assert wait_until(lambda: any("1 uploaded" in m for m in daemon.read_notifications()), 10)
    assert daemon.stop() == 0
    messages = daemon.notify_messages
    ready = next(i for i, m in enumerate(messages) if "READY=1" in m)
    stopping = next(i for i, m in enumerate(messages) if "STOPPING=1" in m)
    assert ready < stopping
    assert not any("WATCHDOG=1" in m for m in messages[:ready])  # not before it is watching
    status = [m for m in messages if m.startswith("STATUS=")]
    assert re.fullmatch(
        r"STATUS=\d+ pending, \d+ in flight, \d+ uploaded, \d+ failed", status[-1]
    ), status[-1]


def test_delete_after_upload_waits_for_the_async_job(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    with DevServer(job_delay_seconds=1.5) as server:
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[{"path": str(root), "dataset_id": "ds_del"}],
            nucleus={"asynchronous": True, "job_poll_seconds": 0.1},
            upload={"after_upload": "delete"},
        )
        daemon = DaemonProcess(config, tmp_path)
        daemons.append(daemon)
        daemon.start()
        path = root / "Sunny" / "a.jpg"
        write_jpeg(path, seed=3)
        digest = sha256_of(path)
        assert wait_until(lambda: "Sunny/a.jpg" in server.items("ds_del"), 20)
        # The server has the bytes but the job is still Running: the file must stay.
        assert path.exists()
        assert wait_until(lambda: not path.exists(), 20), daemon.log_text()[-2000:]
        assert server.items("ds_del")["Sunny/a.jpg"].image_sha256 == digest
        assert daemon.stop() == 0


@pytest.mark.parametrize("mode", ["delete", "move"])
def test_a_file_rewritten_during_the_async_job_is_kept_until_its_new_bytes_are_stored(
    tmp_path: Path, daemons: list[DaemonProcess], mode: str
) -> None:
    root, archive = tmp_path / "cam", tmp_path / "archive"
    root.mkdir()
    with DevServer(job_delay_seconds=2.0) as server:
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[{"path": str(root), "dataset_id": "ds_del"}],
            nucleus={"asynchronous": True, "job_poll_seconds": 0.1},
            upload={"after_upload": mode, "archive_dir": str(archive)},
        )
        daemon = DaemonProcess(config, tmp_path)
        daemons.append(daemon)
        daemon.start()
        path = root / "Sunny" / "a.jpg"
        write_jpeg(path, seed=3)
        assert wait_until(lambda: "Sunny/a.jpg" in server.items("ds_del"), 20)
        # The job for the first version is still running; the camera writes a second one.
        second = write_jpeg(path, seed=4)
        assert wait_until(lambda: not path.exists(), 30), daemon.log_text()[-3000:]
        item = server.items("ds_del")["Sunny/a.jpg"]
        assert server.image_bytes(item.image_sha256 or "") == second  # never lost
        assert item.times_written == 2
        if mode == "move":
            assert (archive / "Sunny" / "a.jpg").read_bytes() == second
        assert daemon.stop() == 0


def test_a_rule_change_during_the_send_is_sent_before_the_file_is_deleted(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    (root / "Sunny").mkdir(parents=True)
    # The answer drips slowly: the request is still out when the rules change.
    with DevServer(data_dir=tmp_path / "srv", drip_byte_interval_seconds=0.05) as server:

        def config_with(label: str) -> Path:
            rule = {"match": "{weather}/**", "metadata": {"weather": "{weather}", "rig": label}}
            return write_config(
                tmp_path,
                endpoint=server.base_url,
                watches=[{"path": str(root), "dataset_id": "ds_rule", "rules": [rule]}],
                upload={"after_upload": "delete"},
            )

        config = config_with("v1")
        daemon = DaemonProcess(config, tmp_path)
        daemons.append(daemon)
        daemon.start()
        server.inject_faults("drip")
        path = root / "Sunny" / "a.jpg"
        data = write_jpeg(path, seed=5)
        assert wait_until(lambda: "Sunny/a.jpg" in server.items("ds_rule"), 20)
        config_with("v2")
        daemon.signal(signal.SIGHUP)
        assert wait_until(lambda: not path.exists(), 30), daemon.log_text()[-3000:]
        item = server.items("ds_rule")["Sunny/a.jpg"]
        assert item.metadata == {"weather": "Sunny", "rig": "v2"}  # the update went first
        assert server.image_bytes(item.image_sha256 or "") == data
        assert daemon.stop() == 0


def test_move_after_upload_keeps_the_relative_path(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root, archive = tmp_path / "cam", tmp_path / "archive"
    root.mkdir()
    config = write_config(
        tmp_path,
        endpoint=devserver.base_url,
        watches=[{"path": str(root), "dataset_id": "ds_mv"}],
        upload={"after_upload": "move", "archive_dir": str(archive)},
    )
    daemon = DaemonProcess(config, tmp_path)
    daemons.append(daemon)
    daemon.start()
    data = write_jpeg(root / "Foggy" / "deep" / "b.jpg", seed=4)
    assert wait_until(lambda: (archive / "Foggy" / "deep" / "b.jpg").exists(), 20)
    # The move links the archive copy first, then unlinks the original: wait for both.
    assert wait_until(lambda: not (root / "Foggy" / "deep" / "b.jpg").exists(), 10)
    assert (archive / "Foggy" / "deep" / "b.jpg").read_bytes() == data
    assert daemon.stop() == 0


def test_bandwidth_limit_caps_bytes_on_the_wire(tmp_path: Path, devserver: DevServer) -> None:
    """4 MiB through "1MiB/s" across 2 workers takes about 4 s (within 15%)."""
    root = tmp_path / "cam"
    for index in range(4):
        write_large_jpeg(root / f"big_{index}.jpg", 1024 * 1024, seed=index)
    config = write_config(
        tmp_path,
        endpoint=devserver.base_url,
        watches=[{"path": str(root), "dataset_id": "ds_bw"}],
        upload={"bandwidth_limit": "1MiB/s", "concurrency": 2, "max_files_per_request": 1},
        settle={"seconds": 0.01},
    )
    time.sleep(0.05)
    started = time.monotonic()
    result = run_watcher("scan", "-c", str(config))
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    wire_bytes = sum((root / name).stat().st_size for name in (f"big_{i}.jpg" for i in range(4)))
    expected_seconds = wire_bytes / (1024 * 1024)
    # Process start-up adds a fixed part; compare the upload time the scan itself reports.
    match = re.search(r"still pending in ([\d.]+) s", result.stdout)
    assert match is not None, result.stdout
    upload_seconds = float(match.group(1))
    assert abs(upload_seconds - expected_seconds) <= 0.15 * expected_seconds, (
        upload_seconds,
        expected_seconds,
        elapsed,
    )
    assert len(devserver.items("ds_bw")) == 4
