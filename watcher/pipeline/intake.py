"""The live front of the pipeline: watchdog observers that hand candidate paths on.

Each watch gets its own observer, so a crash, an overflow or an inotify limit concerns one
folder, and `supervise` can restart exactly that one. Handlers run under the observer's lock:
they filter the path and call a callback, nothing else. Whatever events could have been lost
(a new folder filled before its watch landed, a kernel queue overflow, a restarted observer, a
root that appeared or was recreated) becomes `on_rescan_needed`, and the daemon's reconcile,
which compares the disk with the store, fills the gap.

How an overflow surfaces in watchdog 7.1: the kernel puts an IN_Q_OVERFLOW record (wd -1) in
the inotify queue; `InotifyFD.handle_event` sees it, logs a warning, and calls
`on_queue_overflow` on every watch group, which rebuilds recursive watches. No event reaches the
handlers. We subclass `InotifyFD` and act on that record itself, after watchdog rebuilt its
watches: it is tied to this watch's own inotify instance (a log record carries no watch), cannot
be silenced by a logging configuration, and fires exactly once per overflow.
"""

from __future__ import annotations

import errno
import os
import re
import stat
import threading
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import CallbackId, InotifyEvent, InotifyFD, Mask, WatchCallback
from watchdog.observers.inotify_c import WatchDescriptor as InotifyWatchDescriptor
from watchdog.observers.polling import PollingObserverVFS

from watcher.files import PathFilter

log = structlog.get_logger("watcher.intake")

STATE_INOTIFY = "inotify"
STATE_POLLING = "polling"
STATE_WAITING = "waiting for folder"

# What each errno from inotify_init / inotify_add_watch means, and the knob that lifts it.
_LIMIT_SYSCTLS = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
}

# `mkdir -p a/b`: watchdog watches a/b while handling the IN_CREATE of a, then again for the
# IN_CREATE of a/b, and warns that it re-registers the same callback. Harmless; the warning is
# attributed to our InotifyFD subclass, so this filter silences nothing else.
warnings.filterwarnings(
    "ignore",
    message="Callback with id .* already exists",
    category=RuntimeWarning,
    module=re.escape(__name__),
)


@dataclass(frozen=True)
class WatchSpec:
    """One folder to watch, as the intake needs it."""

    key: str  # stable name e.g. "watch[0]", handed back in every callback
    root: Path
    recursive: bool
    path_filter: PathFilter
    polling: bool = False


class IntakeSink(Protocol):
    """Where the intake delivers. Called on watchdog's threads: return quickly, and never call
    back into `start`, `reconfigure`, `supervise` or `stop` (those join the very threads that
    make the call). `key` names the watch (`WatchSpec.key`)."""

    def on_candidate(self, key: str, path: Path, closed: bool) -> None:
        """Something happened to the file at `path`; `closed` after a close-after-write."""

    def on_deleted(self, key: str, path: Path) -> None:
        """The file at `path` was deleted or moved away."""

    def on_rescan_needed(self, key: str | None, reason: str) -> None:
        """Events may have been lost for `key` (every watch when None): walk it. Comes in
        bursts (a tree of new folders); coalesce."""


class _WatchEventHandler(FileSystemEventHandler):
    """Turns one watch's watchdog events into candidate/deleted/rescan callbacks."""

    def __init__(self, spec: WatchSpec, watched_dir: str, sink: IntakeSink) -> None:
        self._spec = spec
        # The resolved root (watchdog reports paths under it); reported paths use spec.root.
        self._prefix = watched_dir.rstrip("/") + "/"
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:
            # An exception here would end the observer thread and every later event with it.
            log.exception("intake_event_failed", watch=self._spec.key, event=event.event_type)

    def _route(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._route_directory(event)
        elif isinstance(event, FileMovedEvent):
            self._deleted(event.src_path)
            self._candidate(event.dest_path, closed=False)
        elif isinstance(event, FileDeletedEvent):
            self._deleted(event.src_path)
        elif isinstance(event, FileClosedEvent):
            self._candidate(event.src_path, closed=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent | FileAttribEvent):
            # Attrib included: `cp -p` and rsync set the final mtime after the last write.
            self._candidate(event.src_path, closed=False)

    def _route_directory(self, event: FileSystemEvent) -> None:
        # watchdog adds a watch for a new folder, but files written into it before the watch
        # landed produce no event; synthetic events for its subfolders add nothing new.
        if not self._spec.recursive or event.is_synthetic:
            return
        if isinstance(event, DirMovedEvent):
            relpath = self._relative(event.dest_path)
        elif isinstance(event, DirCreatedEvent):
            relpath = self._relative(event.src_path)
        else:
            return
        if relpath is not None and self._spec.path_filter.accepts_dir(relpath):
            self._sink.on_rescan_needed(self._spec.key, "new folder")

    def _candidate(self, raw_path: bytes | str, *, closed: bool) -> None:
        relpath = self._relative(raw_path)
        if relpath is not None and self._spec.path_filter.accepts(relpath):
            self._sink.on_candidate(self._spec.key, self._spec.root / relpath, closed)

    def _deleted(self, raw_path: bytes | str) -> None:
        relpath = self._relative(raw_path)
        if relpath is not None and self._spec.path_filter.accepts(relpath):
            self._sink.on_deleted(self._spec.key, self._spec.root / relpath)

    def _relative(self, raw_path: bytes | str) -> str | None:
        path = os.fsdecode(raw_path)
        if not path.startswith(self._prefix):
            return None
        relpath = path[len(self._prefix) :]
        if not relpath or (not self._spec.recursive and "/" in relpath):
            return None
        return relpath


class _WatchedInotifyFD(InotifyFD):
    """watchdog's inotify instance, plus: tell us about overflows and watch-limit failures."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        super().__init__()
        self._on_overflow = on_overflow
        # Set when a watch could not be added for lack of fs.inotify.max_user_watches. watchdog
        # swallows that error for subfolders (only the root's reaches the caller), which would
        # leave part of the tree silently unwatched.
        self.watch_limit_hit = threading.Event()

    def handle_event(self, event: InotifyEvent) -> None:
        super().handle_event(event)  # rebuilds the recursive watches first
        if event.is_queue_overflow:
            self._on_overflow()

    def add_callback(
        self, path: bytes, mask: Mask, callback: WatchCallback, id_: CallbackId
    ) -> InotifyWatchDescriptor:
        try:
            return super().add_callback(path, mask, callback, id_)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                self.watch_limit_hit.set()
            raise


class _InotifyObserver(BaseObserver):
    """An inotify observer on its own `_WatchedInotifyFD` (one kernel queue per watch)."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        self.inotify_fd = _WatchedInotifyFD(on_overflow)  # OSError(EMFILE) at the limit
        self.inotify_fd.start()
        super().__init__(InotifyEmitter, inotify_fd=self.inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify_fd.stop()
        self.inotify_fd.join()


@dataclass(frozen=True)
class _RootIdentity:
    """Which directory a root path names right now: a change means it was replaced."""

    resolved: str
    device: int
    inode: int


def _root_identity(root: Path) -> _RootIdentity | None:
    try:
        st = os.stat(root)
        resolved = os.path.realpath(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return _RootIdentity(resolved, st.st_dev, st.st_ino)


def _read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "unknown"


class _WatchRunner:
    """One watch's observer and what `supervise` needs to know about it."""

    def __init__(self, spec: WatchSpec) -> None:
        self.spec = spec
        self.state = STATE_WAITING
        self.observer: BaseObserver | None = None
        self.identity: _RootIdentity | None = None
        self.restarts = 0
        self.polling_forced = False  # an inotify limit was hit; stay on polling
        self.last_problem: str | None = None  # logged once, not every supervise tick

    def threads_alive(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        if isinstance(observer, _InotifyObserver) and not observer.inotify_fd.is_alive():
            return False
        # An emitter stops by itself when its root is deleted (inotify and polling alike).
        return bool(observer.emitters) and all(e.is_alive() for e in observer.emitters)

    def watch_limit_hit(self) -> bool:
        observer = self.observer
        return (
            isinstance(observer, _InotifyObserver) and observer.inotify_fd.watch_limit_hit.is_set()
        )


class Intake:
    """Runs one watchdog observer per watch and hands what they see to `sink`."""

    def __init__(self, sink: IntakeSink, *, polling_interval_seconds: float = 2.0) -> None:
        if polling_interval_seconds <= 0:
            raise ValueError(
                f"polling_interval_seconds must be positive: {polling_interval_seconds}"
            )
        self._sink = sink
        self._polling_interval_seconds = polling_interval_seconds
        # start/reconfigure/supervise/stop may come from different threads. Never taken by
        # watchdog's threads, so joining them while holding it cannot deadlock.
        self._lock = threading.RLock()
        self._runners: dict[str, _WatchRunner] = {}
        self._started = False

    def start(self, watches: Sequence[WatchSpec]) -> None:
        """Start watching. Call it before the start-up reconcile, so nothing falls in between."""
        specs = _by_key(watches)
        with self._lock:
            if self._started:
                raise RuntimeError("Intake already started")
            self._started = True
            for key, spec in specs.items():
                runner = _WatchRunner(spec)
                self._runners = {**self._runners, key: runner}
                self._bring_up(runner)

    def reconfigure(self, watches: Sequence[WatchSpec]) -> None:
        """Apply a reloaded config: keep unchanged watches running, stop removed ones, start new
        or changed ones (each of those gets `on_rescan_needed(key, "watch added")`)."""
        specs = _by_key(watches)
        rescans: list[tuple[str, str]] = []
        with self._lock:
            self._started = True  # a reconfigure before start() simply starts
            runners = dict(self._runners)
            for key, runner in list(runners.items()):
                if specs.get(key) != runner.spec:
                    self._take_down(runner)
                    del runners[key]
            for key, spec in specs.items():
                if key not in runners:
                    runner = _WatchRunner(spec)
                    runners[key] = runner
                    self._bring_up(runner)
                    rescans.append((key, "watch added"))
            self._runners = runners
        for key, reason in rescans:
            self._sink.on_rescan_needed(key, reason)

    def supervise(self) -> None:
        """Repair what broke since the last call (the daemon calls this every few seconds)."""
        rescans: list[tuple[str, str]] = []
        with self._lock:
            if not self._started:
                return
            for runner in self._runners.values():
                reason = self._supervise_one(runner)
                if reason is not None:
                    rescans.append((runner.spec.key, reason))
        for key, reason in rescans:
            self._sink.on_rescan_needed(key, reason)

    def stop(self) -> None:
        """Stop and join every observer."""
        with self._lock:
            self._started = False
            for runner in self._runners.values():
                self._take_down(runner)
            self._runners = {}

    # Read without the lock (the dict is replaced, never changed in place), so a callback
    # that reports metrics cannot deadlock against a supervise that is joining its thread.
    def watch_states(self) -> dict[str, str]:
        return {key: runner.state for key, runner in self._runners.items()}

    def restarts(self) -> dict[str, int]:
        return {key: runner.restarts for key, runner in self._runners.items()}

    # -- under the lock ----------------------------------------------------------------------

    def _supervise_one(self, runner: _WatchRunner) -> str | None:
        spec = runner.spec
        if runner.observer is None:
            return "folder appeared" if self._bring_up(runner) else None
        identity = _root_identity(spec.root)
        if identity is None:
            self._take_down(runner)
            self._note_problem(runner, "folder is missing")
            return None
        if identity != runner.identity:
            log.warning("watch_root_replaced", watch=spec.key, path=str(spec.root))
            return self._restart(runner, "folder recreated")
        if runner.watch_limit_hit():
            # A folder created since start could not be watched: inotify is blind to part of
            # the tree, so polling is the only way to see all of it.
            self._log_inotify_limit(runner, errno.ENOSPC)
            runner.polling_forced = True
            self._take_down(runner)
            self._bring_up(runner)
            return "inotify watch limit reached"
        if not runner.threads_alive():
            log.warning("observer_died", watch=spec.key, path=str(spec.root))
            return self._restart(runner, "observer restarted")
        return None

    def _restart(self, runner: _WatchRunner, reason: str) -> str:
        self._take_down(runner)
        runner.restarts += 1
        self._bring_up(runner)
        return reason

    def _bring_up(self, runner: _WatchRunner) -> bool:
        """Start the observer for `runner`; False (and state "waiting for folder") if the root
        is not there or cannot be watched yet."""
        spec = runner.spec
        identity = _root_identity(spec.root)
        if identity is None:
            self._note_problem(runner, "folder is missing")
            return False
        handler = _WatchEventHandler(spec, identity.resolved, self._sink)
        try:
            if spec.polling or runner.polling_forced:
                observer = self._start_polling(handler, identity.resolved, spec)
            else:
                observer = self._start_inotify_or_polling(runner, handler, identity.resolved)
        except OSError as exc:
            self._note_problem(runner, f"cannot watch: {exc.strerror}")
            return False
        runner.observer = observer
        runner.identity = identity
        runner.state = STATE_POLLING if isinstance(observer, PollingObserverVFS) else STATE_INOTIFY
        runner.last_problem = None
        log.info("watch_started", watch=spec.key, path=str(spec.root), mode=runner.state)
        return True

    def _start_inotify_or_polling(
        self, runner: _WatchRunner, handler: _WatchEventHandler, watched_dir: str
    ) -> BaseObserver:
        spec = runner.spec
        try:
            observer = self._start_inotify(handler, watched_dir, spec)
        except OSError as exc:
            if exc.errno not in _LIMIT_SYSCTLS:
                raise
            limit_errno = exc.errno
        else:
            if not observer.inotify_fd.watch_limit_hit.is_set():
                return observer
            # The root was watched but some subfolder was not (watchdog swallowed that).
            _stop_observer(observer)
            limit_errno = errno.ENOSPC
        self._log_inotify_limit(runner, limit_errno)
        runner.polling_forced = True
        return self._start_polling(handler, watched_dir, spec)

    def _start_inotify(
        self, handler: _WatchEventHandler, watched_dir: str, spec: WatchSpec
    ) -> _InotifyObserver:
        key = spec.key

        def on_overflow() -> None:
            # Runs on the inotify reader thread: hand on, and never let it raise there.
            log.warning("inotify_overflow", watch=key, path=str(spec.root))
            try:
                self._sink.on_rescan_needed(key, "kernel event queue overflow")
            except Exception:
                log.exception("intake_callback_failed", watch=key)

        observer = _InotifyObserver(on_overflow)
        try:
            observer.start()
            observer.schedule(handler, watched_dir, recursive=spec.recursive, follow_symlink=False)
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def _start_polling(
        self, handler: _WatchEventHandler, watched_dir: str, spec: WatchSpec
    ) -> BaseObserver:
        # lstat, not stat: a symlinked folder is not descended into, like inotify with
        # follow_symlink=False, so nothing outside the root is ever listed.
        observer = PollingObserverVFS(
            stat=os.lstat,
            listdir=os.scandir,
            polling_interval=self._polling_interval_seconds,
        )
        try:
            observer.start()
            observer.schedule(handler, watched_dir, recursive=spec.recursive, follow_symlink=False)
        except BaseException:
            _stop_observer(observer)
            raise
        return observer

    def _take_down(self, runner: _WatchRunner) -> None:
        if runner.observer is not None:
            _stop_observer(runner.observer)
        runner.observer = None
        runner.identity = None
        runner.state = STATE_WAITING

    def _note_problem(self, runner: _WatchRunner, problem: str) -> None:
        runner.state = STATE_WAITING
        if problem != runner.last_problem:
            runner.last_problem = problem
            log.warning(
                "watch_waiting", watch=runner.spec.key, path=str(runner.spec.root), problem=problem
            )

    def _log_inotify_limit(self, runner: _WatchRunner, limit_errno: int) -> None:
        sysctl = _LIMIT_SYSCTLS[limit_errno]
        log.warning(
            "inotify_limit",
            watch=runner.spec.key,
            path=str(runner.spec.root),
            sysctl=sysctl,
            current_value=_read_sysctl(sysctl),
            action=f"raise {sysctl} (sysctl -w {sysctl}=N; persist in /etc/sysctl.d/); "
            "polling this folder until restart",
        )


def _stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        observer.join()


def _by_key(watches: Sequence[WatchSpec]) -> dict[str, WatchSpec]:
    specs: dict[str, WatchSpec] = {}
    for spec in watches:
        if spec.key in specs:
            raise ValueError(f"two watches share the key {spec.key!r}")
        specs[spec.key] = spec
    return specs
