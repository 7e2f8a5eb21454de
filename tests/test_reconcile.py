"""The reconciler on real files and a real store: a settled file is recorded from the stat the
settler decided on, and "is it finished?" is the settler's question, for the walk too."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.imagefactory import jpeg_bytes, write_jpeg
from watcher.config import Settings, settings_from_mapping
from watcher.pipeline import IncompleteFile, ReadyFile, Reconciler, Settler, WatchPlan
from watcher.pipeline import wiring as pipeline
from watcher.store import StateStore

DATASET = "ds_reconcile"
WAIT_SECONDS = 10.0  # upper bound for anything we wait for; never reached when things work


@dataclass
class Rig:
    root: Path
    settings: Settings
    store: StateStore
    settler: Settler
    reconciler: Reconciler
    plan: WatchPlan

    def write_settled(self, name: str, seed: int) -> Path:
        path = self.root / name
        write_jpeg(path, seed=seed)
        old = time.time() - 60
        os.utime(path, (old, old))
        return path


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[Rig]:
    root = tmp_path / "cam"
    root.mkdir()
    settings = settings_from_mapping(
        {
            "nucleus": {"endpoint": "http://127.0.0.1:9/v1/nucleus"},
            "state": {"path": str(tmp_path / "state.db")},
            "settle": {"seconds": 0.2, "max_wait_seconds": 5},
            "watch": [{"path": str(root), "dataset_id": DATASET}],
        }
    )
    store = pipeline.open_store(settings)
    settler = pipeline.settler(settings)
    reconciler = pipeline.reconciler(settings, store, settling=settler)
    try:
        yield Rig(root, settings, store, settler, reconciler, pipeline.watch_plans(settings)[0])
    finally:
        settler.stop()
        store.close()


@dataclass
class Reported:
    """A sink that remembers what the settler handed over."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    ready: list[ReadyFile] = field(default_factory=list)

    def on_ready(self, file: ReadyFile) -> None:
        with self.cond:
            self.ready.append(file)
            self.cond.notify_all()

    def on_incomplete(self, file: IncompleteFile) -> None:
        raise AssertionError(f"not expected to give up on {file}")


def test_a_settled_file_is_recorded_from_the_stat_the_settler_decided_on(rig: Rig) -> None:
    path = rig.write_settled("a.jpg", seed=1)
    st = path.lstat()
    assert rig.reconciler.record_settled(rig.plan, path, st) == "new"
    record = rig.store.get(rig.plan.key, "a.jpg")
    assert record is not None and record.state == "pending"
    assert (record.size_bytes, record.mtime_ns) == (st.st_size, st.st_mtime_ns)


def test_a_file_rewritten_after_the_settle_decision_goes_back_to_settling(rig: Rig) -> None:
    path = rig.write_settled("a.jpg", seed=1)
    decided_on = path.lstat()
    path.write_bytes(jpeg_bytes(seed=2, width=80))  # other bytes, other size, other mtime
    assert rig.reconciler.record_settled(rig.plan, path, decided_on) == "unsettled"
    assert rig.store.get(rig.plan.key, "a.jpg") is None
    assert rig.settler.pending_paths() == [path]


def test_a_file_deleted_after_the_settle_decision_is_recorded_gone(rig: Rig) -> None:
    path = rig.write_settled("a.jpg", seed=1)
    assert rig.reconciler.record_settled(rig.plan, path, path.lstat()) == "new"
    write_jpeg(path, seed=2, width=80)  # a new version settles...
    decided_on = path.lstat()
    path.unlink()  # ...and is gone before it is read
    assert rig.reconciler.record_settled(rig.plan, path, decided_on) == "gone"
    record = rig.store.get(rig.plan.key, "a.jpg")
    assert record is not None and record.state == "gone"


def test_the_walk_hands_a_file_still_being_written_to_the_settler_with_its_watch(
    rig: Rig,
) -> None:
    rig.write_settled("old.jpg", seed=1)
    fresh = rig.root / "fresh.jpg"
    data = write_jpeg(fresh, seed=2)
    report = rig.reconciler.reconcile([rig.plan])
    assert (report.queued_new, report.unsettled) == (1, 1)
    assert rig.settler.pending_paths() == [fresh]
    reported = Reported()
    rig.settler.start(reported)
    with reported.cond:
        assert reported.cond.wait_for(lambda: bool(reported.ready), WAIT_SECONDS)
    [file] = reported.ready
    assert (file.path, file.plans, file.st.st_size) == (fresh, (rig.plan,), len(data))
    assert rig.settler.wait_until_settled(WAIT_SECONDS) == []


def test_a_walk_never_judges_a_file_finished_by_itself(rig: Rig) -> None:
    # The settler's rule for a file seen once: its mtime must be settle.seconds old.
    path = rig.write_settled("a.jpg", seed=1)
    st = path.lstat()
    assert rig.settler.at_rest(st, st.st_mtime + 0.2)
    assert not rig.settler.at_rest(st, st.st_mtime + 0.1)
