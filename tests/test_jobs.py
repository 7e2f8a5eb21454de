"""Asynchronous jobs followed across restarts: a job the server forgot is sent again."""

from __future__ import annotations

import json
from pathlib import Path

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import write_jpeg
from watcher.devserver import DevServer


def status_json(config: Path) -> dict[str, object]:
    result = run_watcher("status", "-c", str(config), "--json")
    assert result.returncode == 0, result.stderr
    parsed: dict[str, object] = json.loads(result.stdout)
    return parsed


def test_job_unknown_to_the_server_is_resent_and_confirmed(tmp_path: Path) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    data = tmp_path / "server"
    server = DevServer(data_dir=data, job_delay_seconds=600).start()  # the job never finishes
    port = server.port
    config = write_config(
        tmp_path,
        endpoint=server.base_url,
        watches=[{"path": str(root), "dataset_id": "ds_jobs"}],
        nucleus={"asynchronous": True, "job_poll_seconds": 0.1},
    )
    daemon = DaemonProcess(config, tmp_path)
    try:
        daemon.start()
        write_jpeg(root / "a.jpg", seed=1)
        assert wait_until(lambda: '"job_submitted"' in daemon.log_text(), 20)
        server.stop()  # jobs live in memory: the new server does not know it
        server = DevServer(port=port, data_dir=data).start()
        assert wait_until(lambda: '"job_unknown"' in daemon.log_text(), 20)
        assert wait_until(lambda: "upload_confirmed" in daemon.log_text(), 20)
        assert server.items("ds_jobs")["a.jpg"].times_written == 1
        assert daemon.stop() == 0
    finally:
        daemon.kill()
        server.stop()
    assert status_json(config)["totals"] == {
        "failed": 0,
        "gone": 0,
        "in_flight": 0,
        "incomplete": 0,
        "pending": 0,
        "uploaded": 1,
    }
