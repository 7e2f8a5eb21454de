"""Who owns a reference_id over time: a name reused after a delete, a folder moved while the
daemon was down, and the loser of a collision. Each through the real `scan` command."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path
from typing import Any

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import running_daemon, wait_until
from tests.imagefactory import sha256_of, write_jpeg
from watcher.devserver import DevServer

DATASET = "ds_owner"
WEATHER_RULE = {"match": "{weather}/**", "metadata": {"weather": "{weather}"}}


def _settled(*paths: Path) -> None:
    old = time.time() - 60
    for path in paths:
        os.utime(path, (old, old))


def _config(
    tmp_path: Path,
    devserver: DevServer,
    root: Path,
    *,
    upload: dict[str, Any] | None = None,
    **watch: Any,
) -> Path:
    spec: dict[str, Any] = {"path": str(root), "dataset_id": DATASET, "rules": [WEATHER_RULE]}
    spec.update(watch)
    return write_config(tmp_path, endpoint=devserver.base_url, watches=[spec], upload=upload or {})


def sha256_of_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _scan(config: Path) -> str:
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 0, result.stdout + result.stderr
    return result.stdout


def test_camera_counter_restart_sends_the_new_image_and_keeps_it_until_stored(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    (root / "Sunny").mkdir(parents=True)
    config = _config(
        tmp_path, devserver, root, reference_id="{name}", upload={"after_upload": "delete"}
    )
    with running_daemon(config, tmp_path) as daemon:
        first = root / "Sunny" / "IMG_0001.jpg"
        write_jpeg(first, seed=1)
        assert wait_until(lambda: not first.exists()), daemon.log_text()  # stored, deleted
        # The counter restarts: a new picture under a name whose reference_id was used before.
        second = root / "Foggy" / "IMG_0001.jpg"
        expected = sha256_of_bytes(write_jpeg(second, seed=2))
        assert wait_until(lambda: not second.exists()), daemon.log_text()
        item = devserver.items(DATASET)["IMG_0001.jpg"]
        assert item.image_sha256 == expected  # deleted only once the dataset holds these bytes
        assert item.times_written == 2 and item.metadata == {"weather": "Foggy"}


def test_folder_moved_while_down_passes_its_reference_ids_on(
    tmp_path: Path, devserver: DevServer
) -> None:
    root = tmp_path / "cam"
    for index in range(3):
        write_jpeg(root / "Sunny" / f"f{index}.jpg", seed=index)
    _settled(*(root / "Sunny").iterdir())
    config = _config(tmp_path, devserver, root, reference_id="{name}")
    _scan(config)
    (root / "Sunny").rename(root / "Foggy")  # while nothing runs
    out = _scan(config)
    assert "0 failed" in out
    items = devserver.items(DATASET)
    assert {ref: item.metadata["weather"] for ref, item in items.items()} == {
        "f0.jpg": "Foggy",
        "f1.jpg": "Foggy",
        "f2.jpg": "Foggy",
    }


def test_collision_loser_does_not_keep_its_old_reference_id(
    tmp_path: Path, devserver: DevServer
) -> None:
    # Content-addressed reference_ids: a file rewritten to another file's bytes collides.
    root = tmp_path / "cam"
    a, b = root / "Sunny" / "a.jpg", root / "Sunny" / "b.jpg"
    write_jpeg(a, seed=1)
    write_jpeg(b, seed=2)
    old_b_sha = sha256_of(b)
    _settled(a, b)
    config = _config(tmp_path, devserver, root, reference_id="{sha256}")
    _scan(config)
    b.write_bytes(a.read_bytes())  # b now renders a's reference_id: b loses
    _settled(b)
    result = run_watcher("scan", "-c", str(config))
    assert result.returncode == 1 and "is already used by" in result.stdout
    # A new file with b's old bytes: that reference_id is free again, not held by the loser.
    c = root / "Sunny" / "c.jpg"
    write_jpeg(c, seed=2)
    assert sha256_of(c) == old_b_sha
    _settled(c)
    result = run_watcher("scan", "-c", str(config))
    assert f"{c}" not in result.stdout, result.stdout
    assert devserver.items(DATASET)[old_b_sha].metadata == {"weather": "Sunny"}
