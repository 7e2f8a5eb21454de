"""Settler on real files and a real thread: when is a file finished?"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from tests.imagefactory import jpeg_bytes
from watcher.config import settings_from_mapping
from watcher.pipeline import CLOSE_GRACE_SECONDS, IncompleteFile, ReadyFile, Settler, WatchPlan
from watcher.pipeline import wiring as pipeline

WAIT_SECONDS = 10.0  # upper bound for anything we wait for; never reached when things work


@dataclass
class Outcomes:
    """What the settler reported, with the file's bytes as they were at that moment."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    ready: list[tuple[Path, bytes]] = field(default_factory=list)
    incomplete: list[tuple[Path, str]] = field(default_factory=list)

    def on_ready(self, file: ReadyFile) -> None:
        data = file.path.read_bytes()
        assert file.st.st_size == len(data)
        with self.cond:
            self.ready.append((file.path, data))
            self.cond.notify_all()

    def on_incomplete(self, file: IncompleteFile) -> None:
        with self.cond:
            self.incomplete.append((file.path, file.reason))
            self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)


@dataclass
class ReadyHook:
    """A sink that hands each ready file to one function (and keeps it), ignoring the rest."""

    hook: Callable[[Path, os.stat_result], None]
    files: list[ReadyFile] = field(default_factory=list)

    def on_ready(self, file: ReadyFile) -> None:
        self.files.append(file)
        self.hook(file.path, file.st)

    def on_incomplete(self, file: IncompleteFile) -> None:
        pass


SettlerFactory = Callable[..., tuple[Settler, Outcomes]]


def eventually(predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
    """Poll `predicate` (for state that no callback announces) until true or timeout."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.01)
    return predicate()


@pytest.fixture
def make_settler() -> Iterator[SettlerFactory]:
    started: list[Settler] = []

    def make(**overrides: object) -> tuple[Settler, Outcomes]:
        outcomes = Outcomes()
        params: dict[str, object] = {
            "settle_seconds": 0.3,
            "max_wait_seconds": 30.0,
            "verify_image": True,
        }
        sink = overrides.pop("sink", outcomes)
        params.update(overrides)
        settler = Settler(**params)  # type: ignore[arg-type]
        settler.start(sink)  # type: ignore[arg-type]
        started.append(settler)
        return settler, outcomes

    yield make
    for settler in started:
        settler.stop()
        assert not settler.is_alive()


class ManualClock:
    """A clock that moves only when the test says so."""

    def __init__(self) -> None:
        self._now = 1000.0
        self._lock = threading.Lock()

    def __call__(self) -> float:
        with self._lock:
            return self._now

    def advance(self, seconds: float) -> None:
        with self._lock:
            self._now += seconds


def test_jpeg_written_in_one_go_and_closed_is_ready_without_waiting(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    # The settler's clock never moves: only the close hint plus the image check can let it go.
    clock = ManualClock()
    settler, outcomes = make_settler(settle_seconds=30.0, max_wait_seconds=60.0, clock=clock)
    path = tmp_path / "one.jpg"
    data = jpeg_bytes()
    path.write_bytes(data)
    settler.submit(path)  # created
    settler.submit(path, closed=True)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert outcomes.ready == [(path, data)]
    assert settler.pending_paths() == []


def test_close_without_image_check_waits_only_the_grace(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    clock = ManualClock()
    settler, outcomes = make_settler(
        settle_seconds=30.0, max_wait_seconds=60.0, verify_image=False, clock=clock
    )
    path = tmp_path / "one.png"
    path.write_bytes(b"whatever the bytes, the image is not checked")
    settler.submit(path, closed=True)
    # The first look (on the frozen clock) happens at once; the grace has not passed for it.
    assert not outcomes.wait_until(lambda: bool(outcomes.ready), timeout=0.3)
    clock.advance(CLOSE_GRACE_SECONDS)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert outcomes.incomplete == []


def test_close_of_an_incomplete_jpeg_is_not_trusted(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    clock = ManualClock()
    settler, outcomes = make_settler(settle_seconds=0.3, max_wait_seconds=60.0, clock=clock)
    path = tmp_path / "half.jpg"
    data = jpeg_bytes()
    path.write_bytes(data[: len(data) // 2])
    settler.submit(path, closed=True)
    for _ in range(5):  # well past settle_seconds on the settler's clock
        clock.advance(0.3)
        assert not outcomes.wait_until(lambda: bool(outcomes.ready), timeout=0.1)
    assert settler.pending_paths() == [path]
    with path.open("ab") as f:
        f.write(data[len(data) // 2 :])
    settler.submit(path, closed=True)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert outcomes.ready == [(path, data)]


def _slow_writer(path: Path, data: bytes, settler: Settler, pauses_seconds: list[float]) -> None:
    """Write `data` in len(pauses)+1 chunks, reopening and closing around every chunk (the
    harshest case: every chunk ends in a close-after-write hint), sleeping between chunks."""
    chunk_count = len(pauses_seconds) + 1
    chunk_bytes = -(-len(data) // chunk_count)
    for index in range(chunk_count):
        with path.open("ab") as f:
            f.write(data[index * chunk_bytes : (index + 1) * chunk_bytes])
        settler.submit(path)  # modified
        settler.submit(path, closed=True)
        if index < len(pauses_seconds):
            time.sleep(pauses_seconds[index])


def test_slow_writer_is_reported_only_when_really_complete(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    settler, outcomes = make_settler(settle_seconds=0.3, verify_image=True)
    path = tmp_path / "slow.jpg"
    data = jpeg_bytes(width=160, height=120, seed=3)
    # Ten chunks with short pauses, then a pause well over settle_seconds before the last one.
    pauses = [0.05] * 9 + [0.9]
    writer = threading.Thread(target=_slow_writer, args=(path, data, settler, pauses))
    writer.start()
    try:
        assert outcomes.wait_until(lambda: len(outcomes.ready) == 1, timeout=WAIT_SECONDS)
    finally:
        writer.join()
    # What on_ready saw on disk is the whole image, so it was not called during the long pause.
    assert outcomes.ready == [(path, data)]
    assert outcomes.incomplete == []


def test_without_image_check_pauses_shorter_than_settle_do_not_release_the_file(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    settler, outcomes = make_settler(settle_seconds=0.4, verify_image=False)
    path = tmp_path / "slow.bin"
    data = os.urandom(64_000)
    chunk_count = 8
    chunk_bytes = len(data) // chunk_count
    with path.open("wb") as f:  # one open for the whole write: no close hints until the end
        for index in range(chunk_count):
            f.write(data[index * chunk_bytes : (index + 1) * chunk_bytes])
            f.flush()
            settler.submit(path)
            time.sleep(0.1)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert outcomes.ready == [(path, data)]


def test_incomplete_jpeg_is_reported_once_after_max_wait_then_ready_when_finished(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    settler, outcomes = make_settler(settle_seconds=0.2, max_wait_seconds=0.8)
    path = tmp_path / "broken.jpg"
    data = jpeg_bytes(seed=5)
    path.write_bytes(data[:-10])
    settler.submit(path, closed=True)
    assert outcomes.wait_until(lambda: len(outcomes.incomplete) == 1)
    assert outcomes.incomplete == [(path, "JPEG has no end-of-image marker")]
    assert settler.pending_paths() == []  # parked, no longer counted as pending

    # The same unchanged file handed over again (a periodic reconcile) stays quiet.
    settler.submit(path)
    settler.submit(path, closed=True)
    assert not outcomes.wait_until(lambda: len(outcomes.incomplete) > 1, timeout=1.2)
    assert outcomes.ready == []

    path.write_bytes(data)
    settler.submit(path, closed=True)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert outcomes.ready == [(path, data)]
    assert len(outcomes.incomplete) == 1


def test_file_that_never_stops_changing_is_reported_after_max_wait(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    settler, outcomes = make_settler(settle_seconds=0.2, max_wait_seconds=0.6, verify_image=False)
    path = tmp_path / "growing.jpg"
    stop_writing = threading.Event()

    def keep_writing() -> None:
        with path.open("ab") as f:
            while not stop_writing.is_set():
                f.write(b"x" * 100)
                f.flush()
                settler.submit(path)  # every event pushes the deadline out
                time.sleep(0.02)

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        assert outcomes.wait_until(lambda: len(outcomes.incomplete) == 1)
    finally:
        stop_writing.set()
        writer.join()
    assert outcomes.incomplete[0][0] == path
    assert outcomes.incomplete[0][1].startswith("still changing")
    assert outcomes.ready == []


def test_fifo_is_reported_and_never_opened(tmp_path: Path, make_settler: SettlerFactory) -> None:
    settler, outcomes = make_settler()
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    writer_connected = threading.Event()
    writer_fd: list[int] = []

    def blocked_writer() -> None:
        # open() for writing blocks until some reader opens the FIFO.
        writer_fd.append(os.open(fifo, os.O_WRONLY))
        writer_connected.set()

    writer = threading.Thread(target=blocked_writer)
    writer.start()
    try:
        settler.submit(fifo, closed=True)
        assert outcomes.wait_until(lambda: len(outcomes.incomplete) == 1)
        assert outcomes.incomplete == [(fifo, "not a regular file")]
        settler.submit(fifo)  # again: parked, not reported twice
        assert not outcomes.wait_until(lambda: len(outcomes.incomplete) > 1, timeout=0.6)
        assert not writer_connected.is_set()
    finally:
        # Release the writer: connect a reader of our own, then close both ends.
        reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
        writer.join(WAIT_SECONDS)
        os.close(reader)
        for fd in writer_fd:
            os.close(fd)
    assert not writer.is_alive()


def test_symlink_is_not_followed(tmp_path: Path, make_settler: SettlerFactory) -> None:
    settler, outcomes = make_settler()
    outside = tmp_path / "outside.jpg"
    outside.write_bytes(jpeg_bytes())
    link = tmp_path / "watched" / "link.jpg"
    link.parent.mkdir()
    link.symlink_to(outside)
    settler.submit(link, closed=True)
    assert outcomes.wait_until(lambda: len(outcomes.incomplete) == 1)
    assert outcomes.incomplete == [(link, "symbolic link (not followed)")]
    assert outcomes.ready == []


def test_deleted_file_is_dropped_silently(tmp_path: Path, make_settler: SettlerFactory) -> None:
    settler, outcomes = make_settler(settle_seconds=0.2)
    path = tmp_path / "gone.jpg"
    path.write_bytes(jpeg_bytes()[:100])
    settler.submit(path)
    assert settler.pending_paths() == [path]
    path.unlink()
    settler.submit(path)
    assert eventually(lambda: settler.pending_paths() == [])
    assert outcomes.ready == [] and outcomes.incomplete == []


def test_forget_drops_a_pending_path(tmp_path: Path, make_settler: SettlerFactory) -> None:
    settler, outcomes = make_settler(settle_seconds=0.2)
    kept = tmp_path / "kept.jpg"
    forgotten = tmp_path / "forgotten.jpg"
    kept.write_bytes(jpeg_bytes(seed=1))
    forgotten.write_bytes(jpeg_bytes(seed=2))
    settler.submit(forgotten)
    settler.forget(forgotten)
    settler.submit(kept)
    assert outcomes.wait_until(lambda: len(outcomes.ready) == 1)
    assert [path for path, _ in outcomes.ready] == [kept]
    assert settler.pending_paths() == []


def test_callbacks_run_outside_the_settler_lock(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    other_thread_got_through = threading.Event()
    settler_box: list[Settler] = []

    def on_ready(path: Path, st: os.stat_result) -> None:
        # Another thread must be able to use the settler while this callback runs.
        probe = threading.Thread(target=lambda: settler_box[0].submit(tmp_path / "next.jpg"))
        probe.start()
        probe.join(WAIT_SECONDS)
        if not probe.is_alive():
            other_thread_got_through.set()

    settler, _ = make_settler(sink=ReadyHook(on_ready))
    settler_box.append(settler)
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes())
    settler.submit(path, closed=True)
    assert other_thread_got_through.wait(WAIT_SECONDS)


def test_a_failing_callback_does_not_stop_the_settler(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    seen: list[Path] = []
    done = threading.Event()

    def on_ready(path: Path, st: os.stat_result) -> None:
        seen.append(path)
        if len(seen) == 1:
            raise RuntimeError("consumer bug")
        done.set()

    settler, _ = make_settler(sink=ReadyHook(on_ready))
    first, second = tmp_path / "1.jpg", tmp_path / "2.jpg"
    first.write_bytes(jpeg_bytes(seed=1))
    second.write_bytes(jpeg_bytes(seed=2))
    settler.submit(first, closed=True)
    settler.submit(second, closed=True)
    assert done.wait(WAIT_SECONDS)
    assert sorted(seen) == [first, second]
    assert settler.is_alive()


@pytest.mark.parametrize(
    ("settle_seconds", "max_wait_seconds"),
    [(0.0, 10.0), (-1.0, 10.0), (5.0, 1.0)],
)
def test_refuses_unusable_timings(settle_seconds: float, max_wait_seconds: float) -> None:
    with pytest.raises(ValueError):
        Settler(
            settle_seconds=settle_seconds,
            max_wait_seconds=max_wait_seconds,
            verify_image=True,
        )


def test_a_bug_in_one_files_check_is_reported_on_that_file_and_others_settle(
    tmp_path: Path, make_settler: SettlerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The image check is replaced by one that fails for one file: it stands for any bug that
    # nobody foresaw (a format the checker mishandles, a name it cannot take).
    import watcher.pipeline.settle_look as settle_module

    real_check = settle_module.check_image_complete

    def check(path: Path) -> str | None:
        if path.name == "boom.jpg":
            raise RuntimeError("checker bug")
        return real_check(path)

    monkeypatch.setattr(settle_module, "check_image_complete", check)
    settler, outcomes = make_settler(max_wait_seconds=1.0)
    boom, fine = tmp_path / "boom.jpg", tmp_path / "fine.jpg"
    boom.write_bytes(jpeg_bytes(seed=1))
    fine.write_bytes(jpeg_bytes(seed=2))
    settler.submit(boom, closed=True)
    settler.submit(fine, closed=True)
    assert outcomes.wait_until(lambda: bool(outcomes.ready) and bool(outcomes.incomplete))
    assert [path for path, _ in outcomes.ready] == [fine]
    assert outcomes.incomplete == [(boom, "internal error: RuntimeError: checker bug")]
    assert settler.is_alive()


def _plans(tmp_path: Path, *datasets: str) -> list[WatchPlan]:
    settings = settings_from_mapping(
        {
            "nucleus": {"endpoint": "http://127.0.0.1:9/v1/nucleus"},
            "state": {"path": str(tmp_path / "state.db")},
            "watch": [{"path": str(tmp_path), "dataset_id": dataset} for dataset in datasets],
        }
    )
    return pipeline.watch_plans(settings)


def test_a_file_comes_with_every_watch_it_was_submitted_for(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    first, second = _plans(tmp_path, "ds_a", "ds_b")
    ready: list[ReadyFile] = []
    settler, _ = make_settler(sink=ReadyHook(lambda path, st: None, ready))
    path = tmp_path / "x.jpg"
    path.write_bytes(jpeg_bytes())
    settler.submit(path, (first,))
    settler.submit(path, (second, first), closed=True)
    assert eventually(lambda: len(ready) == 1)
    assert ready[0].plans == (first, second)
    assert ready[0].st.st_size == path.stat().st_size


def test_reroute_sends_pending_files_to_the_new_watches_and_drops_orphans(
    tmp_path: Path, make_settler: SettlerFactory
) -> None:
    [old] = _plans(tmp_path, "ds_a")
    [new] = _plans(tmp_path, "ds_b")
    settler, outcomes = make_settler(settle_seconds=30.0, max_wait_seconds=60.0)
    kept, dropped = tmp_path / "kept.jpg", tmp_path / "dropped.jpg"
    settler.submit(kept, (old,))
    settler.submit(dropped, (old,))
    settler.reroute(lambda path: (new,) if path == kept else ())
    assert settler.pending_paths() == [kept]
    assert outcomes.ready == [] and outcomes.incomplete == []
