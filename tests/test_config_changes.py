"""Config changes a fleet makes: a watch moved to another dataset, asynchronous mode turned off
with jobs open, one folder feeding two datasets. Real commands, real devserver."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import sha256_of, write_jpeg
from watcher.devserver import DevServer

WEATHER_RULE = {"match": "{weather}/**", "metadata": {"weather": "{weather}"}}


@pytest.fixture
def daemons() -> Iterator[list[DaemonProcess]]:
    started: list[DaemonProcess] = []
    yield started
    for daemon in started:
        daemon.kill()


def _tree(root: Path, count: int = 3) -> dict[str, Path]:
    files = {}
    for index in range(count):
        path = root / "Sunny" / f"f{index}.jpg"
        write_jpeg(path, seed=index)
        files[f"Sunny/f{index}.jpg"] = path
    old = time.time() - 60
    for path in files.values():
        os.utime(path, (old, old))
    return files


def _config(tmp_path: Path, endpoint: str, watches: list[dict[str, Any]], **sections: Any) -> Path:
    return write_config(tmp_path, endpoint=endpoint, watches=watches, **sections)


def _assert_holds(devserver: DevServer, dataset: str, files: dict[str, Path]) -> None:
    items = devserver.items(dataset)
    assert set(items) == set(files), (dataset, sorted(items))
    for reference_id, path in files.items():
        assert items[reference_id].image_sha256 == sha256_of(path)


def test_a_new_dataset_id_sends_every_recorded_file_there(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    files = _tree(root)
    watch = {"path": str(root), "dataset_id": "ds_old", "rules": [WEATHER_RULE]}
    config = _config(tmp_path, devserver.base_url, [watch])
    assert run_watcher("scan", "-c", str(config)).returncode == 0
    # One more file is recorded but not sent yet (the endpoint refuses it for now).
    devserver.inject_faults(*["503"] * 6, retry_after_seconds=0.01)
    extra = root / "Sunny" / "late.jpg"
    write_jpeg(extra, seed=9)
    os.utime(extra, (time.time() - 60,) * 2)
    assert run_watcher("scan", "-c", str(config)).returncode == 1  # still pending
    config = _config(tmp_path, devserver.base_url, [{**watch, "dataset_id": "ds_new"}])
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_holds(devserver, "ds_new", {**files, "Sunny/late.jpg": extra})
    _assert_holds(devserver, "ds_old", files)  # the pending one never went to the old one


def test_turning_asynchronous_off_with_jobs_open_still_confirms_them(
    tmp_path: Path, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    root.mkdir()
    with DevServer(data_dir=tmp_path / "srv", job_delay_seconds=3.0) as server:
        watch = {"path": str(root), "dataset_id": "ds_jobs", "rules": [WEATHER_RULE]}
        config = _config(tmp_path, server.base_url, [watch], nucleus={"asynchronous": True})
        daemon = DaemonProcess(config, tmp_path)
        daemons.append(daemon)
        daemon.start()
        files = {"Sunny/a.jpg": root / "Sunny" / "a.jpg"}
        write_jpeg(files["Sunny/a.jpg"], seed=1)
        assert wait_until(lambda: "job_submitted" in daemon.log_text(), 20), daemon.log_text()
        daemon.kill()  # the job is still running on the server
        config = _config(tmp_path, server.base_url, [watch], nucleus={"asynchronous": False})
        result = run_watcher("scan", "-c", str(config), timeout_seconds=60)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "0 still pending" in result.stdout
        _assert_holds(server, "ds_jobs", files)
        status = json.loads(run_watcher("status", "-c", str(config), "--json").stdout)
        [counts] = [w["counts"] for w in status["watches"]]
        assert (counts["in_flight"], counts["uploaded"]) == (0, 1)


def test_one_folder_feeds_two_datasets_through_scan_and_the_daemon(
    tmp_path: Path, devserver: DevServer, daemons: list[DaemonProcess]
) -> None:
    root = tmp_path / "cam"
    files = _tree(root)
    watches = [
        {"path": str(root), "dataset_id": "ds_a", "rules": [WEATHER_RULE]},
        {"path": str(root), "dataset_id": "ds_b", "metadata": {"copy": "b"}},
    ]
    config = _config(tmp_path, devserver.base_url, watches)
    check = run_watcher("check", "-c", str(config))
    assert check.returncode == 0, check.stderr
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_holds(devserver, "ds_a", files)
    _assert_holds(devserver, "ds_b", files)
    assert devserver.items("ds_b")["Sunny/f0.jpg"].metadata == {"copy": "b"}

    daemon = DaemonProcess(config, tmp_path)
    daemons.append(daemon)
    daemon.start()
    live = root / "Sunny" / "live.jpg"
    write_jpeg(live, seed=7)
    files["Sunny/live.jpg"] = live
    assert wait_until(
        lambda: (
            "Sunny/live.jpg" in devserver.items("ds_a")
            and "Sunny/live.jpg" in devserver.items("ds_b")
        ),
        20,
    ), daemon.log_text()
    assert daemon.stop() == 0
    _assert_holds(devserver, "ds_a", files)
    _assert_holds(devserver, "ds_b", files)
    assert devserver.items("ds_a")["Sunny/live.jpg"].times_written == 1


def test_a_second_watch_of_a_folder_does_not_resend_the_first_ones_files(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    files = _tree(root)
    first = {"path": str(root), "dataset_id": "ds_a", "rules": [WEATHER_RULE]}
    config = _config(tmp_path, devserver.base_url, [first])
    assert run_watcher("scan", "-c", str(config)).returncode == 0
    sent_to_a = [r for r in devserver.requests() if "ds_a" in r.path]
    config = _config(tmp_path, devserver.base_url, [first, {**first, "dataset_id": "ds_b"}])
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "3 uploaded (3 new, 0 updated)" in result.stdout  # ds_b only
    assert [r for r in devserver.requests() if "ds_a" in r.path] == sent_to_a
    _assert_holds(devserver, "ds_b", files)
    explained = run_watcher("explain", "-c", str(config), str(files["Sunny/f1.jpg"]))
    assert explained.returncode == 0, explained.stdout + explained.stderr
    assert "dataset_id:   ds_a" in explained.stdout and "dataset_id:   ds_b" in explained.stdout
    assert explained.stdout.count("state:        uploaded") == 2


def test_a_file_still_settling_during_scan_goes_to_every_watch_of_its_folder(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    path = root / "Sunny" / "ahead.jpg"
    write_jpeg(path, seed=4)
    ahead = time.time() + 3600  # a camera clock ahead: the walk hands it to the settler
    os.utime(path, (ahead, ahead))
    watches = [
        {"path": str(root), "dataset_id": "ds_a", "rules": [WEATHER_RULE]},
        {"path": str(root), "dataset_id": "ds_b"},
    ]
    config = _config(tmp_path, devserver.base_url, watches)
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    _assert_holds(devserver, "ds_a", {"Sunny/ahead.jpg": path})
    _assert_holds(devserver, "ds_b", {"Sunny/ahead.jpg": path})
