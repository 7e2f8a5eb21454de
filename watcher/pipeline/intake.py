"""The live front of the pipeline: watchdog observers that hand candidate paths on.

Each watch gets its own observer (`observers.py`), so a crash, an overflow or an inotify limit
concerns one folder, and `supervise` can restart exactly that one. The handlers
(`intake_events.py`) filter the path and call the sink, nothing else. Whatever events could have
been lost (a new folder filled before its watch landed, a kernel queue overflow, a restarted
observer, a root that appeared or was recreated) becomes `on_rescan_needed`, and the daemon's
reconcile, which compares the disk with the store, fills the gap.
"""

from __future__ import annotations

import errno
import threading
from collections.abc import Callable, Sequence

import structlog
from watchdog.observers.api import BaseObserver
from watchdog.observers.polling import PollingObserverVFS

from watcher.pipeline.intake_events import IntakeSink, WatchEventHandler, WatchSpec
from watcher.pipeline.observers import (
    LIMIT_SYSCTLS,
    STATE_INOTIFY,
    STATE_POLLING,
    STATE_WAITING,
    WatchRunner,
    read_sysctl,
    root_identity,
    start_inotify,
    start_polling,
    stop_observer,
)

log = structlog.get_logger("watcher.intake")


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
        self._runners: dict[str, WatchRunner] = {}
        self._started = False

    def start(self, watches: Sequence[WatchSpec]) -> None:
        """Start watching. Call it before the start-up reconcile, so nothing falls in between."""
        specs = _by_key(watches)
        with self._lock:
            if self._started:
                raise RuntimeError("Intake already started")
            self._started = True
            for key, spec in specs.items():
                runner = WatchRunner(spec)
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
                    runner = WatchRunner(spec)
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

    def _supervise_one(self, runner: WatchRunner) -> str | None:
        spec = runner.spec
        if runner.observer is None:
            return "folder appeared" if self._bring_up(runner) else None
        identity = root_identity(spec.root)
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

    def _restart(self, runner: WatchRunner, reason: str) -> str:
        self._take_down(runner)
        runner.restarts += 1
        self._bring_up(runner)
        return reason

    def _bring_up(self, runner: WatchRunner) -> bool:
        """Start the observer for `runner`; False (and state "waiting for folder") if the root
        is not there or cannot be watched yet."""
        spec = runner.spec
        identity = root_identity(spec.root)
        if identity is None:
            self._note_problem(runner, "folder is missing")
            return False
        handler = WatchEventHandler(spec, identity.resolved, self._sink)
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
        self, runner: WatchRunner, handler: WatchEventHandler, watched_dir: str
    ) -> BaseObserver:
        spec = runner.spec
        try:
            observer = start_inotify(handler, watched_dir, spec, self._on_overflow(spec))
        except OSError as exc:
            if exc.errno not in LIMIT_SYSCTLS:
                raise
            limit_errno = exc.errno
        else:
            if not observer.inotify_fd.watch_limit_hit.is_set():
                return observer
            # The root was watched but some subfolder was not (watchdog swallowed that).
            stop_observer(observer)
            limit_errno = errno.ENOSPC
        self._log_inotify_limit(runner, limit_errno)
        runner.polling_forced = True
        return self._start_polling(handler, watched_dir, spec)

    def _on_overflow(self, spec: WatchSpec) -> Callable[[], None]:
        def on_overflow() -> None:
            # Runs on the inotify reader thread: hand on, and never let it raise there.
            log.warning("inotify_overflow", watch=spec.key, path=str(spec.root))
            try:
                self._sink.on_rescan_needed(spec.key, "kernel event queue overflow")
            except Exception:
                log.exception("intake_callback_failed", watch=spec.key)

        return on_overflow

    def _start_polling(
        self, handler: WatchEventHandler, watched_dir: str, spec: WatchSpec
    ) -> BaseObserver:
        return start_polling(handler, watched_dir, spec, self._polling_interval_seconds)

    def _take_down(self, runner: WatchRunner) -> None:
        if runner.observer is not None:
            stop_observer(runner.observer)
        runner.observer = None
        runner.identity = None
        runner.state = STATE_WAITING

    def _note_problem(self, runner: WatchRunner, problem: str) -> None:
        runner.state = STATE_WAITING
        if problem != runner.last_problem:
            runner.last_problem = problem
            log.warning(
                "watch_waiting", watch=runner.spec.key, path=str(runner.spec.root), problem=problem
            )

    def _log_inotify_limit(self, runner: WatchRunner, limit_errno: int) -> None:
        sysctl = LIMIT_SYSCTLS[limit_errno]
        log.warning(
            "inotify_limit",
            watch=runner.spec.key,
            path=str(runner.spec.root),
            sysctl=sysctl,
            current_value=read_sysctl(sysctl),
            action=f"raise {sysctl} (sysctl -w {sysctl}=N; persist in /etc/sysctl.d/); "
            "polling this folder until restart",
        )


def _by_key(watches: Sequence[WatchSpec]) -> dict[str, WatchSpec]:
    specs: dict[str, WatchSpec] = {}
    for spec in watches:
        if spec.key in specs:
            raise ValueError(f"two watches share the key {spec.key!r}")
        specs[spec.key] = spec
    return specs
