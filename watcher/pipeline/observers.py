"""One watch's watchdog observer: inotify on its own kernel queue, polling when inotify cannot
see the whole tree, and what tells the intake that events were lost.

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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from watchdog.events import FileSystemEventHandler
from watchdog.observers.api import BaseObserver
from watchdog.observers.inotify import InotifyEmitter
from watchdog.observers.inotify_c import CallbackId, InotifyEvent, InotifyFD, Mask, WatchCallback
from watchdog.observers.inotify_c import WatchDescriptor as InotifyWatchDescriptor
from watchdog.observers.polling import PollingObserverVFS

from watcher.pipeline.intake_events import WatchSpec

STATE_INOTIFY = "inotify"
STATE_POLLING = "polling"
STATE_WAITING = "waiting for folder"

# What each errno from inotify_init / inotify_add_watch means, and the knob that lifts it.
LIMIT_SYSCTLS = {
    errno.ENOSPC: "fs.inotify.max_user_watches",
    errno.EMFILE: "fs.inotify.max_user_instances",
}

# `mkdir -p a/b`: watchdog watches a/b while handling the IN_CREATE of a, then again for the
# IN_CREATE of a/b, and warns that it re-registers the same callback. Harmless; the warning is
# attributed to our InotifyFD subclass (this module), so this filter silences nothing else.
warnings.filterwarnings(
    "ignore",
    message="Callback with id .* already exists",
    category=RuntimeWarning,
    module=re.escape(__name__),
)


class WatchedInotifyFD(InotifyFD):
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


class InotifyObserver(BaseObserver):
    """An inotify observer on its own `WatchedInotifyFD` (one kernel queue per watch)."""

    def __init__(self, on_overflow: Callable[[], None]) -> None:
        self.inotify_fd = WatchedInotifyFD(on_overflow)  # OSError(EMFILE) at the limit
        self.inotify_fd.start()
        super().__init__(InotifyEmitter, inotify_fd=self.inotify_fd)

    def on_thread_stop(self) -> None:
        super().on_thread_stop()
        self.inotify_fd.stop()
        self.inotify_fd.join()


@dataclass(frozen=True)
class RootIdentity:
    """Which directory a root path names right now: a change means it was replaced."""

    resolved: str
    device: int
    inode: int


def root_identity(root: Path) -> RootIdentity | None:
    try:
        st = os.stat(root)
        resolved = os.path.realpath(root)
    except OSError:
        return None
    if not stat.S_ISDIR(st.st_mode):
        return None
    return RootIdentity(resolved, st.st_dev, st.st_ino)


def read_sysctl(name: str) -> str:
    try:
        return Path("/proc/sys", *name.split(".")).read_text().strip()
    except OSError:
        return "unknown"


class WatchRunner:
    """One watch's observer and what `supervise` needs to know about it."""

    def __init__(self, spec: WatchSpec) -> None:
        self.spec = spec
        self.state = STATE_WAITING
        self.observer: BaseObserver | None = None
        self.identity: RootIdentity | None = None
        self.restarts = 0
        self.polling_forced = False  # an inotify limit was hit; stay on polling
        self.last_problem: str | None = None  # logged once, not every supervise tick

    def threads_alive(self) -> bool:
        observer = self.observer
        if observer is None or not observer.is_alive():
            return False
        if isinstance(observer, InotifyObserver) and not observer.inotify_fd.is_alive():
            return False
        # An emitter stops by itself when its root is deleted (inotify and polling alike).
        return bool(observer.emitters) and all(e.is_alive() for e in observer.emitters)

    def watch_limit_hit(self) -> bool:
        observer = self.observer
        return (
            isinstance(observer, InotifyObserver) and observer.inotify_fd.watch_limit_hit.is_set()
        )


def start_inotify(
    handler: FileSystemEventHandler,
    watched_dir: str,
    spec: WatchSpec,
    on_overflow: Callable[[], None],
) -> InotifyObserver:
    observer = InotifyObserver(on_overflow)
    try:
        observer.start()
        observer.schedule(handler, watched_dir, recursive=spec.recursive, follow_symlink=False)
    except BaseException:
        stop_observer(observer)
        raise
    return observer


def start_polling(
    handler: FileSystemEventHandler, watched_dir: str, spec: WatchSpec, interval_seconds: float
) -> BaseObserver:
    # lstat, not stat: a symlinked folder is not descended into, like inotify with
    # follow_symlink=False, so nothing outside the root is ever listed.
    observer = PollingObserverVFS(
        stat=os.lstat, listdir=os.scandir, polling_interval=interval_seconds
    )
    try:
        observer.start()
        observer.schedule(handler, watched_dir, recursive=spec.recursive, follow_symlink=False)
    except BaseException:
        stop_observer(observer)
        raise
    return observer


def stop_observer(observer: BaseObserver) -> None:
    observer.stop()
    if observer.is_alive():
        observer.join()
