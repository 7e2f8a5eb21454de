"""File names that are not valid UTF-8 (FAT cards, SMB shares, zip extracts) upload like any
other, under the text form pathtext.py defines, through `scan`, the daemon and `explain`."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import BinaryIO

import pytest

from tests.configfactory import API_KEY, run_watcher, write_config
from tests.daemonprocess import running_daemon, wait_until
from tests.imagefactory import jpeg_bytes
from watcher.config import settings_from_mapping
from watcher.devserver import DevServer
from watcher.pipeline import wiring as pipeline

DATASET = "ds_names"
WEATHER_RULE = {"match": "{weather}/**", "metadata": {"weather": "{weather}", "file": "{name}"}}


def _write(root: Path, raw_relpath: bytes, seed: int, *, settled: bool = True) -> bytes:
    """Write a JPEG under a byte-string name (os functions take bytes paths as they are)."""
    path = os.path.join(os.fsencode(root), raw_relpath)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    data = jpeg_bytes(seed=seed)
    with open(path, "wb") as f:
        f.write(data)
    if settled:
        old = time.time() - 60
        os.utime(path, (old, old))
    return data


def _config(tmp_path: Path, devserver: DevServer, root: Path) -> Path:
    watch = {"path": str(root), "dataset_id": DATASET, "rules": [WEATHER_RULE]}
    return write_config(tmp_path, endpoint=devserver.base_url, watches=[watch])


def test_scan_uploads_undecodable_names_under_their_text_form(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    latin1 = _write(root, b"Sunny/caf\xe9.jpg", seed=1)
    percent = _write(root, b"Sunny/50%\xff.jpg", seed=2)
    folder = _write(root, b"Foggy\xfc/x.jpg", seed=3)  # an undecodable folder name
    plain = _write(root, "Sunny/café.jpg".encode(), seed=4)
    config = _config(tmp_path, devserver, root)

    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    assert "Traceback" not in result.stderr
    assert "4 uploaded" in result.stdout
    items = devserver.items(DATASET)
    assert set(items) == {
        "Sunny/caf%E9.jpg",
        "Sunny/50%25%FF.jpg",
        "Foggy%FC/x.jpg",
        "Sunny/café.jpg",
    }
    for reference_id, data in [
        ("Sunny/caf%E9.jpg", latin1),
        ("Sunny/50%25%FF.jpg", percent),
        ("Foggy%FC/x.jpg", folder),
        ("Sunny/café.jpg", plain),
    ]:
        assert devserver.image_bytes(items[reference_id].image_sha256 or "") == data
    assert items["Sunny/caf%E9.jpg"].metadata == {"weather": "Sunny", "file": "caf%E9.jpg"}
    assert items["Foggy%FC/x.jpg"].metadata == {"weather": "Foggy%FC", "file": "x.jpg"}

    again = run_watcher("scan", "-c", str(config))  # recorded: nothing is sent twice
    assert again.returncode == 0 and "0 uploaded" in again.stdout, again.stdout

    explained = run_watcher(
        "explain",
        "-c",
        str(config),
        os.fsdecode(os.path.join(os.fsencode(root), b"Sunny/caf\xe9.jpg")),
    )
    assert explained.returncode == 0, explained.stderr
    assert "reference_id: Sunny/caf%E9.jpg" in explained.stdout
    assert "state:        uploaded" in explained.stdout


def test_daemon_starts_and_uploads_with_undecodable_names_on_disk_and_arriving(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    before = _write(root, b"Sunny/IMG\xe9_1.jpg", seed=1)  # found by the start-up walk
    config = _config(tmp_path, devserver, root)
    with running_daemon(config, tmp_path) as daemon:
        assert wait_until(lambda: "Sunny/IMG%E9_1.jpg" in devserver.items(DATASET))
        live = _write(root, b"Sunny/IMG\xe9_2.jpg", seed=2, settled=False)  # seen live
        assert wait_until(lambda: "Sunny/IMG%E9_2.jpg" in devserver.items(DATASET)), (
            daemon.log_text()
        )
        items = devserver.items(DATASET)
        assert devserver.image_bytes(items["Sunny/IMG%E9_1.jpg"].image_sha256 or "") == before
        assert devserver.image_bytes(items["Sunny/IMG%E9_2.jpg"].image_sha256 or "") == live
        os.unlink(os.path.join(os.fsencode(root), b"Sunny/IMG\xe9_2.jpg"))
        assert wait_until(lambda: "file_gone" in daemon.log_text()), daemon.log_text()
        assert daemon.stop() == 0
        log_text = daemon.log_text()
    assert "Traceback" not in log_text and "Sunny/IMG%E9_2.jpg" in log_text
    assert API_KEY not in log_text


def test_a_bug_on_one_file_is_recorded_on_it_and_the_walk_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Opening is replaced by one that fails for one file: it stands for any bug nobody
    # foresaw. The walk must record that file with the reason and go on with the rest.
    import watcher.pipeline.examine as reconcile_module

    real_open = reconcile_module.open_regular_file

    def open_file(path: Path) -> BinaryIO:
        if path.name == "boom.jpg":
            raise RuntimeError("opener bug")
        return real_open(path)

    monkeypatch.setattr(reconcile_module, "open_regular_file", open_file)
    root = tmp_path / "cam"
    _write(root, b"Sunny/a.jpg", seed=1)
    _write(root, b"Sunny/boom.jpg", seed=66)
    _write(root, b"Sunny/b.jpg", seed=2)
    settings = settings_from_mapping(
        {
            "nucleus": {"endpoint": "http://127.0.0.1:9/v1/nucleus"},
            "state": {"path": str(tmp_path / "state.db")},
            "watch": [{"path": str(root), "dataset_id": DATASET}],
        }
    )
    store = pipeline.open_store(settings)
    try:
        report = pipeline.reconciler(settings, store).reconcile(pipeline.watch_plans(settings))
        assert (report.queued_new, report.problems) == (2, 1)
        record = store.get(str(root), "Sunny/boom.jpg")
        assert record is not None and record.state == "failed"
        assert record.last_error == "internal error: RuntimeError: opener bug"
    finally:
        store.close()
