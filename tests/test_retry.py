"""`nucleus-watcher retry`: parked items go again, with or without a daemon running."""

from __future__ import annotations

import os
import time
from pathlib import Path

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import write_jpeg
from watcher.devserver import DevServer


def make_files(root: Path) -> None:
    for index in range(3):
        write_jpeg(root / f"f{index}.jpg", seed=index)
        old = time.time() - 60
        os.utime(root / f"f{index}.jpg", (old, old))


def test_retry_after_the_cause_is_fixed(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    make_files(root)
    data = tmp_path / "server"
    # The dataset does not exist yet: every upload gets 404 and is parked.
    server = DevServer(data_dir=data, datasets=["ds_other"]).start()
    port = server.port
    try:
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[{"path": str(root), "dataset_id": "ds_new"}],
        )
        first = run_watcher("scan", "-c", str(config))
        assert first.returncode == 1
        assert first.stdout.count("failed: ") == 3
        assert "404" in first.stdout
    finally:
        server.stop()

    server = DevServer(port=port, data_dir=data).start()  # now ds_new exists
    try:
        unchanged = run_watcher("scan", "-c", str(config))
        assert unchanged.returncode == 1  # parked items stay parked until `retry`
        assert server.append_request_count() == 0
        retried = run_watcher("retry", "-c", str(config))
        assert retried.stdout.strip() == "re-queued 3 item(s)"
        second = run_watcher("scan", "-c", str(config))
        assert second.returncode == 0, second.stdout + second.stderr
        assert sorted(server.items("ds_new")) == ["f0.jpg", "f1.jpg", "f2.jpg"]
    finally:
        server.stop()


def test_retry_while_the_daemon_runs_goes_through_the_daemon(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    make_files(root)
    data = tmp_path / "server"
    server = DevServer(data_dir=data, datasets=["ds_other"]).start()
    port = server.port
    config = write_config(
        tmp_path, endpoint=server.base_url, watches=[{"path": str(root), "dataset_id": "ds_new"}]
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()
        assert wait_until(lambda: daemon.log_text().count('"upload_parked"') == 3, 20)
        server.stop()
        server = DevServer(port=port, data_dir=data).start()
        retried = run_watcher("retry", "-c", str(config), str(root / "f1.jpg"))
        assert retried.returncode == 0
        assert "running daemon will re-queue" in retried.stdout
        assert wait_until(lambda: "f1.jpg" in server.items("ds_new"), 20)
        time.sleep(0.5)
        assert sorted(server.items("ds_new")) == ["f1.jpg"]  # only the one asked for
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        server.stop()
