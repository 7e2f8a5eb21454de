"""`nucleus-watcher explain` names the watches the daemon records a file under.

Both come from `watcher.pipeline.plans_for`; these tests hold the two ends against each other
with nested watch folders: what `explain` prints, and what the daemon (live) or `scan` (the
walk) wrote into the store and sent to the devserver.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from tests.configfactory import run_watcher, write_config
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import write_jpeg
from watcher.devserver import DevServer
from watcher.store import FileState, StateStore, watch_root


def explained_watches(config: Path, path: Path) -> list[str]:
    result = run_watcher("explain", "-c", str(config), str(path))
    assert result.returncode == 0, result.stdout + result.stderr
    prefix = "watch:"
    return [
        line[len(prefix) :].strip()
        for line in result.stdout.splitlines()
        if line.startswith(prefix)
    ]


def recorded_watches(state_db: Path, path: Path) -> list[str]:
    """The watch keys under which the store holds a live record of `path`."""
    store = StateStore.open_read_only(state_db)
    try:
        found = []
        for key in store.counts():
            root = Path(watch_root(key))
            if not path.is_relative_to(root):
                continue
            record = store.get(key, path.relative_to(root).as_posix())
            if record is not None and record.state != FileState.GONE:
                found.append(key)
        return sorted(found)
    finally:
        store.close()


def write_old_jpeg(path: Path, seed: int) -> None:
    """A finished file: its mtime is long past settle.seconds, so `scan` takes it at once."""
    write_jpeg(path, seed=seed)
    old = time.time() - 60
    os.utime(path, (old, old))


@pytest.mark.parametrize("how", ["run", "scan"])
def test_a_file_in_a_watch_nested_in_another_is_explained_and_recorded_under_both(
    tmp_path: Path, how: str
) -> None:
    outer = tmp_path / "cam"
    inner = outer / "front"
    inner.mkdir(parents=True)
    image = inner / "shot.jpg"
    with DevServer(datasets=["ds_all", "ds_front"]) as server:
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[
                {"path": str(outer), "dataset_id": "ds_all"},
                {"path": str(inner), "dataset_id": "ds_front"},
            ],
        )
        if how == "scan":
            write_old_jpeg(image, seed=1)
            result = run_watcher("scan", "-c", str(config))
            assert result.returncode == 0, result.stdout + result.stderr
        else:
            daemon = DaemonProcess(config, tmp_path)
            try:
                daemon.start()
                write_jpeg(image, seed=1)
                assert wait_until(
                    lambda: (
                        "front/shot.jpg" in server.items("ds_all")
                        and "shot.jpg" in server.items("ds_front")
                    )
                ), daemon.log_text()
                assert daemon.stop() == 0
            finally:
                daemon.kill()
        assert sorted(server.items("ds_all")) == ["front/shot.jpg"]
        assert sorted(server.items("ds_front")) == ["shot.jpg"]

    explained = explained_watches(config, image)
    assert explained == [str(outer), str(inner)]
    assert recorded_watches(tmp_path / "state" / "state.db", image) == sorted(explained)


def test_a_flat_watch_around_a_nested_one_of_the_same_dataset_sees_only_its_own_files(
    tmp_path: Path,
) -> None:
    outer = tmp_path / "cam"
    inner = outer / "front"
    top, nested = outer / "top.jpg", inner / "nested.jpg"
    write_old_jpeg(top, seed=1)
    write_old_jpeg(nested, seed=2)
    with DevServer(datasets=["ds_cam"]) as server:
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[
                {"path": str(outer), "dataset_id": "ds_cam", "recursive": False},
                {"path": str(inner), "dataset_id": "ds_cam", "reference_id": "front-{relpath}"},
            ],
        )
        result = run_watcher("scan", "-c", str(config))
        assert result.returncode == 0, result.stdout + result.stderr
        assert sorted(server.items("ds_cam")) == ["front-nested.jpg", "top.jpg"]

    state_db = tmp_path / "state" / "state.db"
    assert explained_watches(config, nested) == [str(inner)]
    assert recorded_watches(state_db, nested) == [str(inner)]
    assert explained_watches(config, top) == [str(outer)]
    assert recorded_watches(state_db, top) == [str(outer)]
