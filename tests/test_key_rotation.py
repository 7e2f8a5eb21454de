"""A new API key swaps the uploader's client; the old one is closed once no request uses it."""

from __future__ import annotations

import functools
import os
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import certifi
import pytest

from tests.configfactory import write_config
from tests.daemonprocess import wait_until
from tests.imagefactory import sha256_of, write_jpeg
from watcher.config import Settings, load_settings
from watcher.devserver import DevServer, RequestRecord
from watcher.nucleus import NucleusClient
from watcher.pipeline import Reconciler, Uploader, WatchPlan
from watcher.pipeline import wiring as pipeline
from watcher.store import FileState

DATASET = "ds_rotate"
OLD_KEY = "key_old_rotation_Jd81"
NEW_KEY = "key_new_rotation_Qw27"
REAPER_THREAD = "nucleus-deadline-reaper"
HOLD_SECONDS = 30.0


class AppendGate:
    """Holds accepted append requests in the devserver (items stored, answer not yet sent)."""

    def __init__(self) -> None:
        self._armed = False
        self.held = threading.Event()
        self.release = threading.Event()

    def arm(self) -> None:
        self._armed = True

    def on_request(self, record: RequestRecord) -> None:
        if self._armed and record.path.endswith("/append") and record.status == 200:
            self._armed = False
            self.held.set()
            self.release.wait(HOLD_SECONDS)


class Rig:
    """A real store, uploader, reconciler and devserver; clients made with a CA bundle."""

    def __init__(self, tmp_path: Path, server: DevServer) -> None:
        self.root = tmp_path / "cam"
        self.root.mkdir()
        config = write_config(
            tmp_path,
            endpoint=server.base_url,
            watches=[{"path": str(self.root), "dataset_id": DATASET}],
            nucleus={"ca_bundle": certifi.where()},
            upload={"concurrency": 1},
        )
        self.settings: Settings = load_settings(config)
        self.server = server
        self.clients: list[NucleusClient] = []
        self.store = pipeline.open_store(self.settings)
        self.uploader: Uploader | None = None
        self.reconciler: Reconciler = pipeline.reconciler(self.settings, self.store)
        self.plan: WatchPlan = pipeline.watch_plans(self.settings)[0]

    def client(self, api_key: str) -> NucleusClient:
        client = pipeline.nucleus_client(self.settings, api_key)
        self.clients.append(client)
        return client

    def start(self, api_key: str) -> Uploader:
        self.uploader = pipeline.uploader(self.settings, self.store, self.client(api_key), None)
        self.uploader.start()
        return self.uploader

    def add_file(self, name: str, seed: int) -> Path:
        path = self.root / name
        write_jpeg(path, seed=seed)
        old = time.time() - 60
        os.utime(path, (old, old))
        self.reconciler.record_settled(self.plan, path, path.lstat())
        assert self.uploader is not None
        self.uploader.wake()
        return path

    def stored(self, path: Path) -> bool:
        item = self.server.items(DATASET).get(path.name)
        return item is not None and item.image_sha256 == sha256_of(path)

    def recorded_as_uploaded(self, path: Path) -> bool:
        record = self.store.get(self.plan.key, path.name)
        return record is not None and record.state == FileState.UPLOADED

    def close(self) -> None:
        if self.uploader is not None:
            self.uploader.stop(10)
        for client in self.clients:
            client.close()
        self.store.close()


@pytest.fixture
def ca_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Where clients write their combined CA file, so the test can count them."""
    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


@pytest.fixture
def gate() -> Iterator[AppendGate]:
    gate = AppendGate()
    try:
        yield gate
    finally:
        gate.release.set()


@pytest.fixture
def rig(tmp_path: Path, ca_dir: Path, gate: AppendGate) -> Iterator[Rig]:
    server = DevServer(
        data_dir=tmp_path / "devserver", api_key=NEW_KEY, on_request=gate.on_request
    ).start()
    try:
        rig = Rig(tmp_path, server)
        try:
            yield rig
        finally:
            gate.release.set()
            rig.close()
    finally:
        server.stop()


def reaper_threads() -> int:
    return sum(1 for thread in threading.enumerate() if thread.name == REAPER_THREAD)


def ca_files(ca_dir: Path) -> set[Path]:
    return set(ca_dir.glob("nucleus-watcher-ca-*.pem"))


def open_connections_to(port: int) -> int:
    """This process's established TCP connections to `port` on 127.0.0.1 (the clients' pools)."""
    wanted = f"0100007F:{port:04X}"
    inodes = set()
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        if fields[2] == wanted and fields[3] == "01":  # remote address, state ESTABLISHED
            inodes.add(f"socket:[{fields[9]}]")
    fd_dir = Path("/proc/self/fd")
    held = set()
    for fd in fd_dir.iterdir():
        try:
            held.add(os.readlink(fd))
        except OSError:
            continue  # closed while we looked
    return len(inodes & held)


def test_rotated_out_clients_are_closed_once_their_requests_are_done(
    rig: Rig, ca_dir: Path, gate: AppendGate
) -> None:
    reapers_before = reaper_threads()
    uploader = rig.start(OLD_KEY)
    refused = rig.add_file("f0.jpg", seed=0)
    assert wait_until(lambda: uploader.paused_reason is not None, 20)

    # The key file changed: a client with the new key, as the daemon does it.
    uploader.replace_client(rig.client(NEW_KEY))
    uploader.resume()
    assert wait_until(lambda: rig.stored(refused), 20)
    assert len(ca_files(ca_dir)) == 1  # the refused client's CA file went with it

    # A rotation while a request is in flight: that request finishes on its own client.
    before_in_flight = ca_files(ca_dir)
    gate.arm()
    in_flight = rig.add_file("f1.jpg", seed=1)
    assert gate.held.wait(20)
    uploader.replace_client(rig.client(NEW_KEY))
    assert before_in_flight <= ca_files(ca_dir)  # not closed under the request
    gate.release.set()
    assert wait_until(lambda: rig.recorded_as_uploaded(in_flight), 20)  # the answer came back
    assert rig.stored(in_flight)
    assert wait_until(lambda: not before_in_flight & ca_files(ca_dir), 20)

    # More rotations, each followed by an upload with the new client.
    for number in range(2, 6):
        uploader.replace_client(rig.client(NEW_KEY))
        path = rig.add_file(f"f{number}.jpg", seed=number)
        assert wait_until(functools.partial(rig.stored, path), 20)

    assert len(ca_files(ca_dir)) == 1, ca_files(ca_dir)
    assert reaper_threads() == reapers_before + 1  # only the current client's
    assert open_connections_to(rig.server.port) <= 1  # at most the current client's keep-alive
    assert sorted(rig.server.items(DATASET)) == [f"f{n}.jpg" for n in range(6)]

    # The last client came through replace_client, so stopping the uploader closes it too.
    assert uploader.stop(10)
    assert ca_files(ca_dir) == set()
    assert reaper_threads() == reapers_before
    assert open_connections_to(rig.server.port) == 0
