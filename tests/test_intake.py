"""Intake with real watchdog observers on temporary folders."""

from __future__ import annotations

import os
import shutil
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import structlog.testing
from watchdog.utils import BaseThread

from tests.imagefactory import write_jpeg, write_png
from watcher.files import PathFilter
from watcher.pipeline import Intake, WatchSpec

WAIT_SECONDS = 10.0  # upper bound for anything we wait for; never reached when things work
INOTIFY_SYSCTLS = Path("/proc/sys/fs/inotify")
CAMERA_FILTER = PathFilter(["*.jpg", "*.jpeg", "*.png"], [".*", "*.tmp", "*.part", "*~"])


@dataclass
class Calls:
    """Everything the intake reported, in order."""

    cond: threading.Condition = field(default_factory=threading.Condition)
    candidates: list[tuple[str, Path, bool]] = field(default_factory=list)
    deleted: list[tuple[str, Path]] = field(default_factory=list)
    rescans: list[tuple[str | None, str]] = field(default_factory=list)

    def on_candidate(self, key: str, path: Path, closed: bool) -> None:
        with self.cond:
            self.candidates.append((key, path, closed))
            self.cond.notify_all()

    def on_deleted(self, key: str, path: Path) -> None:
        with self.cond:
            self.deleted.append((key, path))
            self.cond.notify_all()

    def on_rescan_needed(self, key: str | None, reason: str) -> None:
        with self.cond:
            self.rescans.append((key, reason))
            self.cond.notify_all()

    def wait_until(self, predicate: Callable[[], bool], timeout: float = WAIT_SECONDS) -> bool:
        with self.cond:
            return self.cond.wait_for(predicate, timeout)

    def candidate_paths(self) -> set[Path]:
        with self.cond:
            return {path for _, path, _ in self.candidates}

    def wait_for_candidate(self, path: Path, key: str = "watch[0]") -> bool:
        return self.wait_until(lambda: any(c[:2] == (key, path) for c in self.candidates))

    def wait_for_rescan(self, key: str | None, reason: str) -> bool:
        return self.wait_until(lambda: (key, reason) in self.rescans)


IntakeFactory = Callable[..., tuple[Intake, Calls]]


@pytest.fixture
def make_intake() -> Iterator[IntakeFactory]:
    made: list[Intake] = []
    threads_before = set(_watchdog_threads())

    def make(polling_interval_seconds: float = 2.0) -> tuple[Intake, Calls]:
        calls = Calls()
        intake = Intake(calls, polling_interval_seconds=polling_interval_seconds)
        made.append(intake)
        return intake, calls

    yield make
    for intake in made:
        intake.stop()
    # Every observer thread (dispatcher, emitter, inotify reader) is joined by stop().
    assert set(_watchdog_threads()) - threads_before == set()


def _watchdog_threads() -> list[threading.Thread]:
    return [thread for thread in threading.enumerate() if isinstance(thread, BaseThread)]


def spec(root: Path, key: str = "watch[0]", **overrides: object) -> WatchSpec:
    fields: dict[str, object] = {
        "key": key,
        "root": root,
        "recursive": True,
        "path_filter": CAMERA_FILTER,
    }
    fields.update(overrides)
    return WatchSpec(**fields)  # type: ignore[arg-type]


@pytest.fixture
def root(tmp_path: Path) -> Path:
    path = tmp_path / "camera"
    path.mkdir()
    return path


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    path = tmp_path / "elsewhere"
    path.mkdir()
    return path


# -- files arriving ----------------------------------------------------------------------------


def test_file_written_in_place_gives_candidates_ending_with_a_close_hint(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    assert intake.watch_states() == {"watch[0]": "inotify"}
    path = root / "a.jpg"
    write_jpeg(path)
    assert calls.wait_until(lambda: ("watch[0]", path, True) in calls.candidates)
    assert ("watch[0]", path, False) in calls.candidates  # the create came first


def test_copy_into_the_folder(root: Path, outside: Path, make_intake: IntakeFactory) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    source = outside / "src.png"
    write_png(source)
    shutil.copy(source, root / "copied.png")
    assert calls.wait_until(lambda: ("watch[0]", root / "copied.png", True) in calls.candidates)


def test_move_in_from_outside_the_tree(
    root: Path, outside: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    source = outside / "moved.jpg"
    write_jpeg(source)
    os.rename(source, root / "moved.jpg")
    assert calls.wait_for_candidate(root / "moved.jpg")


def test_atomic_temp_and_rename_gives_only_the_final_name(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    temp = root / ".x.jpg.tmp"
    write_jpeg(temp)
    os.rename(temp, root / "x.jpg")
    assert calls.wait_for_candidate(root / "x.jpg")
    # Events arrive in order: anything about the temp name would have come before.
    assert calls.candidate_paths() == {root / "x.jpg"}
    assert calls.deleted == []


def test_rsync_style_temp_names_and_dot_folders_are_ignored(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    write_jpeg(root / ".frame_001.jpg.Xa81Qz")
    write_jpeg(root / ".thumbnails" / "frame_001.jpg")
    write_jpeg(root / "partial.jpg.part")
    (root / "notes.txt").write_text("not an image")
    write_jpeg(root / "sentinel.jpg")
    assert calls.wait_for_candidate(root / "sentinel.jpg")
    assert calls.candidate_paths() == {root / "sentinel.jpg"}


# watchdog warns when `mkdir -p` makes it watch a folder twice; intake.py filters that at
# import, but pytest resets warning filters after collection.
@pytest.mark.filterwarnings("ignore:Callback with id:RuntimeWarning")
def test_new_nested_folder_asks_for_a_rescan_and_is_then_watched(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    nested = root / "2024-05-01" / "cam1"
    nested.mkdir(parents=True)
    write_jpeg(nested / "early.jpg")  # may land before watchdog watches the folder
    assert calls.wait_for_rescan("watch[0]", "new folder")
    write_jpeg(nested / "later.jpg")
    assert calls.wait_for_candidate(nested / "later.jpg")


def test_non_recursive_watch_ignores_subfolders(root: Path, make_intake: IntakeFactory) -> None:
    intake, calls = make_intake()
    intake.start([spec(root, recursive=False)])
    (root / "sub").mkdir()
    write_jpeg(root / "sub" / "deep.jpg")
    write_jpeg(root / "top.jpg")
    assert calls.wait_for_candidate(root / "top.jpg")
    assert calls.candidate_paths() == {root / "top.jpg"}
    assert calls.rescans == []


def test_deleted_and_moved_away_files_are_reported(
    root: Path, outside: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    doomed, leaving = root / "doomed.jpg", root / "leaving.jpg"
    write_jpeg(doomed)
    write_jpeg(leaving)
    assert calls.wait_for_candidate(leaving)
    doomed.unlink()
    os.rename(leaving, outside / "leaving.jpg")
    assert calls.wait_until(
        lambda: {("watch[0]", doomed), ("watch[0]", leaving)} <= set(calls.deleted)
    )


def test_symlinked_folder_is_not_followed_out_of_the_root(
    root: Path, outside: Path, make_intake: IntakeFactory
) -> None:
    (root / "link").symlink_to(outside, target_is_directory=True)
    intake, calls = make_intake()
    intake.start([spec(root)])
    write_jpeg(outside / "secret.jpg")
    write_jpeg(root / "sentinel.jpg")
    assert calls.wait_for_candidate(root / "sentinel.jpg")
    assert calls.candidate_paths() == {root / "sentinel.jpg"}


def test_symlinked_root_reports_paths_under_the_configured_root(
    tmp_path: Path, root: Path, make_intake: IntakeFactory
) -> None:
    configured = tmp_path / "camera-link"
    configured.symlink_to(root, target_is_directory=True)
    intake, calls = make_intake()
    intake.start([spec(configured)])
    write_jpeg(root / "a.jpg")
    assert calls.wait_for_candidate(configured / "a.jpg")


# -- overflow and inotify limits -------------------------------------------------------------


class InotifySysctl:
    """One /proc/sys/fs/inotify value, changed only inside `set_to` and always put back."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._path = INOTIFY_SYSCTLS / name
        self.original = self._path.read_text()

    @contextmanager
    def set_to(self, value: int) -> Iterator[None]:
        # Other processes on this machine share the limit: keep the window as short as possible.
        self._path.write_text(f"{value}\n")
        try:
            yield
        finally:
            self.restore()

    def restore(self) -> None:
        self._path.write_text(self.original)


@pytest.fixture
def inotify_sysctl() -> Iterator[Callable[[str], InotifySysctl]]:
    touched: list[InotifySysctl] = []

    def open_sysctl(name: str) -> InotifySysctl:
        try:
            sysctl = InotifySysctl(name)
            sysctl.restore()  # writing the same value proves we may write it
        except OSError as exc:
            pytest.skip(f"cannot change fs.inotify.{name}: {exc.strerror}")
        touched.append(sysctl)
        return sysctl

    yield open_sysctl
    for sysctl in touched:
        sysctl.restore()


def test_kernel_queue_overflow_asks_for_a_rescan(
    root: Path, make_intake: IntakeFactory, inotify_sysctl: Callable[[str], InotifySysctl]
) -> None:
    queued = inotify_sysctl("max_queued_events")
    intake, calls = make_intake()
    with queued.set_to(16):  # an inotify instance keeps the queue size it was created with
        intake.start([spec(root)])
    overflowed = lambda: ("watch[0]", "kernel event queue overflow") in calls.rescans  # noqa: E731
    for batch in range(40):
        if calls.wait_until(overflowed, timeout=0.05):
            break
        for index in range(250):  # each create+close is several events; the queue holds 16
            fd = os.open(root / f"flood_{batch}_{index}.jpg", os.O_CREAT | os.O_WRONLY, 0o644)
            os.close(fd)
    assert calls.wait_until(overflowed)
    # watchdog rebuilt its watches: files written after the overflow are seen again. Let the
    # flood's tail drain first: with a 16-event queue, a busy machine can overflow once more,
    # and then the (second) rescan is what finds the file.
    time.sleep(0.5)
    rescans_before = len(calls.rescans)
    write_jpeg(root / "after.jpg")
    assert calls.wait_until(
        lambda: (
            any(c[1] == root / "after.jpg" for c in calls.candidates)
            or len(calls.rescans) > rescans_before
        )
    )


@pytest.mark.parametrize("sysctl_name", ["max_user_watches", "max_user_instances"])
def test_inotify_limit_at_start_falls_back_to_polling(
    root: Path,
    make_intake: IntakeFactory,
    inotify_sysctl: Callable[[str], InotifySysctl],
    sysctl_name: str,
) -> None:
    limit = inotify_sysctl(sysctl_name)
    intake, calls = make_intake(polling_interval_seconds=0.1)
    with structlog.testing.capture_logs() as logs, limit.set_to(0):
        intake.start([spec(root)])
    assert intake.watch_states() == {"watch[0]": "polling"}
    limit_lines = [line for line in logs if line["event"] == "inotify_limit"]
    assert len(limit_lines) == 1
    assert limit_lines[0]["sysctl"] == f"fs.inotify.{sysctl_name}"
    assert limit_lines[0]["current_value"] == "0"
    assert limit_lines[0]["log_level"] == "warning"
    write_jpeg(root / "seen-by-polling.jpg")
    assert calls.wait_for_candidate(root / "seen-by-polling.jpg")


def test_watch_limit_hit_by_a_new_subfolder_switches_to_polling(
    root: Path, make_intake: IntakeFactory, inotify_sysctl: Callable[[str], InotifySysctl]
) -> None:
    watches = inotify_sysctl("max_user_watches")
    intake, calls = make_intake(polling_interval_seconds=0.1)
    intake.start([spec(root)])
    with watches.set_to(0):
        (root / "new").mkdir()
        # The "new folder" event is handled after watchdog tried (and failed) to watch it.
        assert calls.wait_for_rescan("watch[0]", "new folder")
    intake.supervise()
    assert intake.watch_states() == {"watch[0]": "polling"}
    assert ("watch[0]", "inotify watch limit reached") in calls.rescans
    write_jpeg(root / "new" / "inside.jpg")
    assert calls.wait_for_candidate(root / "new" / "inside.jpg")


# -- folders coming and going, supervision, reconfiguration ---------------------------------


def test_missing_root_waits_then_is_watched_once_created(
    root: Path, make_intake: IntakeFactory
) -> None:
    later = root / "not-yet"
    intake, calls = make_intake()
    intake.start([spec(later)])
    assert intake.watch_states() == {"watch[0]": "waiting for folder"}
    intake.supervise()
    assert intake.watch_states() == {"watch[0]": "waiting for folder"}
    later.mkdir()
    intake.supervise()
    assert intake.watch_states() == {"watch[0]": "inotify"}
    assert calls.rescans == [("watch[0]", "folder appeared")]
    write_jpeg(later / "first.jpg")
    assert calls.wait_for_candidate(later / "first.jpg")


def test_root_deleted_and_recreated_is_watched_again(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    shutil.rmtree(root)
    intake.supervise()
    assert intake.watch_states() == {"watch[0]": "waiting for folder"}
    root.mkdir()
    intake.supervise()
    assert calls.rescans == [("watch[0]", "folder appeared")]
    write_jpeg(root / "again.jpg")
    assert calls.wait_for_candidate(root / "again.jpg")


def test_root_replaced_between_two_supervise_calls_is_rescheduled(
    root: Path, make_intake: IntakeFactory
) -> None:
    intake, calls = make_intake()
    intake.start([spec(root)])
    shutil.rmtree(root)
    root.mkdir()
    # A new inode ("folder recreated"), or the same inode number reused, in which case the
    # emitter that saw its folder deleted has stopped ("observer restarted").
    recovered = lambda: any(  # noqa: E731
        reason in ("folder recreated", "observer restarted") for _, reason in calls.rescans
    )
    for _ in range(100):
        intake.supervise()
        if calls.wait_until(recovered, timeout=0.05):
            break
    assert recovered()
    assert intake.restarts() == {"watch[0]": 1}
    write_jpeg(root / "again.jpg")
    assert calls.wait_for_candidate(root / "again.jpg")


class DaemonBug(BaseException):
    """Escapes `except Exception`, so it ends watchdog's dispatcher thread like a real crash."""


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")
def test_dead_observer_thread_is_restarted(root: Path, make_intake: IntakeFactory) -> None:
    crashed = threading.Event()

    class CrashingCalls(Calls):
        def on_candidate(self, key: str, path: Path, closed: bool) -> None:
            if path.name == "crash.jpg":
                crashed.set()
                raise DaemonBug("boom")
            super().on_candidate(key, path, closed)

    calls = CrashingCalls()
    intake = Intake(calls)
    threads_before = set(_watchdog_threads())
    try:
        intake.start([spec(root)])
        write_jpeg(root / "crash.jpg")
        assert crashed.wait(WAIT_SECONDS)
        restarted = lambda: ("watch[0]", "observer restarted") in calls.rescans  # noqa: E731
        for _ in range(100):
            intake.supervise()
            if calls.wait_until(restarted, timeout=0.05):
                break
        assert restarted()
        assert intake.restarts() == {"watch[0]": 1}
        write_jpeg(root / "after.jpg")
        assert calls.wait_for_candidate(root / "after.jpg")
    finally:
        intake.stop()
    assert set(_watchdog_threads()) - threads_before == set()


def test_reconfigure_adds_removes_and_keeps_watches(
    tmp_path: Path, make_intake: IntakeFactory
) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir()
    second.mkdir()
    intake, calls = make_intake()
    intake.start([spec(first, key="a")])
    intake.reconfigure([spec(first, key="a"), spec(second, key="b")])
    assert intake.watch_states() == {"a": "inotify", "b": "inotify"}
    assert calls.rescans == [("b", "watch added")]  # "a" was kept as it was
    write_jpeg(first / "1.jpg")
    write_jpeg(second / "2.jpg")
    assert calls.wait_for_candidate(first / "1.jpg", key="a")
    assert calls.wait_for_candidate(second / "2.jpg", key="b")

    intake.reconfigure([spec(second, key="b")])
    assert intake.watch_states() == {"b": "inotify"}
    write_jpeg(first / "unwatched.jpg")
    write_jpeg(second / "sentinel.jpg")
    assert calls.wait_for_candidate(second / "sentinel.jpg", key="b")
    assert first / "unwatched.jpg" not in calls.candidate_paths()


def test_polling_mode(root: Path, make_intake: IntakeFactory) -> None:
    intake, calls = make_intake(polling_interval_seconds=0.1)
    intake.start([spec(root, polling=True)])
    assert intake.watch_states() == {"watch[0]": "polling"}
    (root / "sub").mkdir()
    write_jpeg(root / "sub" / "polled.jpg")
    write_jpeg(root / ".hidden.jpg")
    assert calls.wait_for_candidate(root / "sub" / "polled.jpg")
    assert calls.candidate_paths() == {root / "sub" / "polled.jpg"}
    assert all(closed is False for _, _, closed in calls.candidates)  # polling sees no closes
    (root / "sub" / "polled.jpg").unlink()
    assert calls.wait_until(lambda: ("watch[0]", root / "sub" / "polled.jpg") in calls.deleted)


def test_duplicate_keys_are_refused(root: Path, make_intake: IntakeFactory) -> None:
    intake, _ = make_intake()
    with pytest.raises(ValueError):
        intake.start([spec(root), spec(root)])
