"""The uploader's backoff and retry times across a wall-clock step back (NTP at boot, an RTC
that lost its time): a real store, client and devserver; only the wall clock is the test's."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Sequence
from pathlib import Path

from tests.configfactory import API_KEY
from tests.daemonprocess import wait_until
from tests.imagefactory import write_jpeg
from watcher.devserver import DevServer
from watcher.nucleus import NucleusClient
from watcher.pipeline import Uploader, UploadEvents, UploadPolicy
from watcher.store import Candidate, FileRecord, FileState, StateStore


class SteppingWallClock(UploadEvents):
    """time.time(), stepped back by an hour at the first retry the uploader reports."""

    def __init__(self) -> None:
        self.offset_seconds = 0.0
        self.stepped = threading.Event()

    def __call__(self) -> float:
        return time.time() - self.offset_seconds

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        if not self.stepped.is_set():
            self.offset_seconds = 3600.0
            self.stepped.set()


def test_backoff_and_retry_times_survive_the_wall_clock_stepping_back_an_hour(
    tmp_path: Path, devserver: DevServer
) -> None:
    store = StateStore.open(tmp_path / "state.db")
    client = NucleusClient(devserver.base_url, API_KEY, timeout_seconds=10)
    root = tmp_path / "cam"
    for index in range(3):
        data = write_jpeg(root / f"f{index}.jpg", seed=index)
        store.record_candidate(
            Candidate(
                watch=str(root),
                relpath=f"f{index}.jpg",
                dataset_id="ds_clock",
                reference_id=f"f{index}.jpg",
                size_bytes=len(data),
                mtime_ns=index,
                content_sha256=hashlib.sha256(data).hexdigest(),
                metadata={},
                metadata_sha256="m",
                remote_url=None,
            )
        )
    devserver.inject_faults("503", "503", retry_after_seconds=0.05)
    clock = SteppingWallClock()
    policy = UploadPolicy(
        concurrency=1, max_files_per_request=1, retry_initial_seconds=0.2, retry_max_seconds=1.0
    )
    uploader = Uploader(store, client, policy, events=clock, clock=clock)
    uploader.start()
    try:
        assert wait_until(lambda: store.state_counts()[FileState.UPLOADED] == 3, 15), (
            store.state_counts()
        )
        assert clock.stepped.is_set()
    finally:
        assert uploader.stop(10)
        client.close()
        store.close()
    assert set(devserver.items("ds_clock")) == {"f0.jpg", "f1.jpg", "f2.jpg"}
