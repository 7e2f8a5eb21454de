"""`nucleus-watcher run`: the always-on service around the live pipeline.

    intake (watchdog) --candidate--> settler --ready--> reconciler --> store --> uploader
    reconcile walk (start, every scan.interval_seconds, after overflow/restart) --^

`pipeline.wiring.build_live` builds and connects every part before the loop runs. The main
thread owns the control loop: signals (TERM/INT stop, HUP reload), reconcile walks, observer
supervision, and the systemd watchdog.
"""

from __future__ import annotations

import ctypes
import json
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from watcher.config import Settings, load_settings, resolve_api_key
from watcher.errors import ConfigError
from watcher.pipeline import FreeSpaceGuard, Outcome
from watcher.pipeline import wiring as pipeline
from watcher.service.logs import add_secret
from watcher.service.metrics import Metrics, UploadMetrics
from watcher.service.sdnotify import SystemdNotifier
from watcher.store import FileState, retry_request_path

log = structlog.get_logger("watcher.daemon")

_TICK_SECONDS = 1.0
_SUPERVISE_EVERY_SECONDS = 2.0
_DISK_CHECK_EVERY_SECONDS = 30.0
# The control loop may spend a while in one reconcile walk; the systemd watchdog is only told
# we are stuck when the loop has not come round for this long.
_LOOP_STUCK_SECONDS = 600.0


def _return_freed_memory() -> None:
    """A walk of a large tree builds a big temporary map of known files; once it is freed,
    ask glibc to hand the empty heap pages back, so a daemon that runs for months sits at its
    idle size instead of its largest walk's. Elsewhere (musl, macOS) this does nothing."""
    try:
        libc = ctypes.CDLL(None)
        libc.malloc_trim(0)
    except (OSError, AttributeError):
        pass


class _Wakeups:
    """What wakes the control loop, from any thread: signals and requests for a rescan.

    Rescan requests come in bursts (a tree of new folders); they are coalesced per watch.
    """

    def __init__(self) -> None:
        self._event = threading.Event()
        self._lock = threading.Lock()
        self._rescan_keys: set[str | None] = set()
        self.stop_requested = False
        self.reload_requested = False

    def install_signal_handlers(self) -> None:
        signal.signal(signal.SIGTERM, self._handle_stop)
        signal.signal(signal.SIGINT, self._handle_stop)
        signal.signal(signal.SIGHUP, self._handle_reload)

    def _handle_stop(self, signum: int, _frame: FrameType | None) -> None:
        self.stop_requested = True
        self._event.set()

    def _handle_reload(self, signum: int, _frame: FrameType | None) -> None:
        self.reload_requested = True
        self._event.set()

    def request_rescan(self, key: str | None, reason: str) -> None:
        """Walk `key` (every watch when None) at the loop's next turn."""
        log.info("rescan_requested", watch=key, reason=reason)
        with self._lock:
            self._rescan_keys.add(key)
        self._event.set()

    def take_rescans(self) -> set[str | None]:
        with self._lock:
            keys, self._rescan_keys = self._rescan_keys, set()
        return keys

    def wait(self, timeout_seconds: float) -> None:
        self._event.wait(timeout_seconds)
        self._event.clear()


class _FileMetrics:
    """Counts files on their way in (the live pipeline's `LiveEvents`)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def seen(self, watch: str) -> None:
        self._metrics.files_seen_total.labels(watch=watch).inc()

    def settled(self, watch: str, outcome: Outcome) -> None:
        self._metrics.files_settled_total.labels(watch=watch).inc()

    def gave_up(self, watch: str, outcome: Outcome) -> None:
        if outcome is Outcome.INCOMPLETE:  # a symlink or FIFO is recorded failed, not incomplete
            self._metrics.incomplete_files_total.labels(watch=watch).inc()


class Daemon:
    def __init__(
        self,
        config_path: Path,
        settings: Settings,
        api_key: str,
        live: pipeline.LivePipeline,
        metrics: Metrics,
        wakeups: _Wakeups,
    ) -> None:
        self._config_path = config_path
        self._settings = settings
        self._api_key = api_key
        self._live = live
        self._metrics = metrics
        self._wakeups = wakeups
        self._notifier = SystemdNotifier()
        self._loop_tick = time.monotonic()
        self._restarts_seen: dict[str, int] = {}
        self._key_file_mtime_ns = self._key_file_mtime()

    # -- the control loop ------------------------------------------------------------------

    def run(self) -> int:
        live = self._live
        released = live.store.release_in_flight()
        if released:
            log.info("resending_interrupted", items=released)
        heartbeat = threading.Thread(target=self._heartbeat, name="sd-watchdog", daemon=True)
        try:
            self._start_metrics()
            live.start()
            log.info(
                "daemon_started",
                watches=[plan.key for plan in live.routes.plans],
                state=str(self._settings.state.path),
            )
            # Files added while we were down: the first walk runs before READY so that a
            # `systemctl start` returns once everything on disk is known.
            self._reconcile(None)
            self._notifier.ready(self._status_line())
            heartbeat.start()
            self._loop()
        finally:
            self._shutdown()
            if heartbeat.is_alive():
                heartbeat.join(5)
        return 0

    def _start_metrics(self) -> None:
        store = self._live.store

        def oldest_pending_age() -> float | None:
            first_seen = store.oldest_pending_first_seen()
            return None if first_seen is None else max(0.0, time.time() - first_seen)

        def queue_depths() -> dict[str, int]:
            return {state.value: count for state, count in store.state_counts().items()}

        self._metrics.set_queue_depth_source(queue_depths)
        self._metrics.set_oldest_pending_source(oldest_pending_age)
        if self._settings.metrics.listen_address is not None:
            self._metrics.start_http_server(*self._settings.metrics.listen_address)
            log.info("metrics_listening", listen=self._settings.metrics.listen)

    def _loop(self) -> None:
        settings = self._settings
        wakeups = self._wakeups
        next_scan = time.monotonic() + settings.scan.interval_seconds
        next_supervise = time.monotonic() + _SUPERVISE_EVERY_SECONDS
        next_disk_check = time.monotonic()
        disk_guard = FreeSpaceGuard(
            self._live.store,
            [(plan.key, plan.root) for plan in self._live.routes.plans],
            settings.disk.min_free_bytes,
            settings.disk.delete_uploaded_when_low,
        )
        while not wakeups.stop_requested:
            self._loop_tick = time.monotonic()
            wakeups.wait(_TICK_SECONDS)
            if wakeups.stop_requested:
                break
            if wakeups.reload_requested:
                wakeups.reload_requested = False
                self._reload()
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + self._settings.scan.interval_seconds
                wakeups.request_rescan(None, "periodic")
            keys = wakeups.take_rescans()
            if keys:
                self._reconcile(None if None in keys else keys)
            if now >= next_supervise:
                next_supervise = now + _SUPERVISE_EVERY_SECONDS
                self._supervise()
            if settings.disk.min_free_bytes and now >= next_disk_check:
                next_disk_check = now + _DISK_CHECK_EVERY_SECONDS
                disk_guard.check()
            self._notifier.status(self._status_line())

    def _supervise(self) -> None:
        intake = self._live.intake
        intake.supervise()
        for key, count in intake.restarts().items():
            new = count - self._restarts_seen.get(key, 0)
            if new > 0:
                self._metrics.watcher_restarts_total.labels(watch=key).inc(new)
            self._restarts_seen[key] = count
        self._check_key_file()
        self._take_retry_request()

    def _take_retry_request(self) -> None:
        """`nucleus-watcher retry` while we run: it leaves a request file instead of writing."""
        request = retry_request_path(Path(self._settings.state.path))
        try:
            paths = [Path(p) for p in json.loads(request.read_text())]
            request.unlink()
        except FileNotFoundError:
            return
        except (OSError, ValueError) as exc:
            log.error("retry_request_unreadable", path=str(request), error=str(exc))
            request.unlink(missing_ok=True)
            return
        count = self._live.store.requeue_failed(paths)
        log.info("retry_requested", items=count)
        self._wakeups.request_rescan(None, "retry requested")

    def _heartbeat(self) -> None:
        """WATCHDOG=1 from its own thread, so a long reconcile walk is not mistaken for a hang;
        it stops when a stage's thread has died or the control loop stopped coming round."""
        interval = self._notifier.watchdog_interval_seconds
        if interval is None:
            return
        while not self._wakeups.stop_requested:
            if self._healthy():
                self._notifier.watchdog()
            elif not self._wakeups.stop_requested:
                log.error("pipeline_unhealthy", hint="systemd will restart the service")
            time.sleep(interval)

    def _reconcile(self, keys: set[str | None] | None) -> None:
        plans = self._live.routes.plans
        if keys is not None:
            plans = tuple(p for p in plans if p.key in keys)
        report = self._live.reconciler.reconcile(plans)
        self._metrics.scan_seconds.observe(report.seconds)
        self._live.uploader.wake()
        _return_freed_memory()

    def _reload(self) -> None:
        self._notifier.reloading()
        try:
            settings = load_settings(self._config_path)
            plans = pipeline.watch_plans(settings)
        except ConfigError as exc:
            for problem in exc.problems:
                log.error("reload_refused", problem=problem)
            self._notifier.ready(self._status_line())
            return
        if settings.upload != self._settings.upload or settings.nucleus != self._settings.nucleus:
            log.warning("reload_partial", hint="[upload] and [nucleus] changes need a restart")
        self._settings = settings.model_copy(
            update={"upload": self._settings.upload, "nucleus": self._settings.nucleus}
        )
        self._live.routes.replan(plans)
        self._live.intake.reconfigure(pipeline.watch_specs(plans))
        self._reload_api_key()
        self._live.uploader.resume()
        log.info("config_reloaded", watches=[plan.key for plan in plans])
        self._wakeups.request_rescan(None, "config reloaded")
        self._notifier.ready(self._status_line())

    def _key_file_mtime(self) -> int | None:
        key_file = self._settings.nucleus.api_key_file
        if not key_file:
            return None
        try:
            return Path(key_file).stat().st_mtime_ns
        except OSError:
            return None

    def _check_key_file(self) -> None:
        """After a 401 every upload waits; a new key file lets them go again without a restart."""
        mtime_ns = self._key_file_mtime()
        if mtime_ns == self._key_file_mtime_ns:
            return
        self._key_file_mtime_ns = mtime_ns
        if self._live.uploader.paused_reason is not None:
            log.info("api_key_file_changed")
            self._reload_api_key()
            self._live.uploader.resume()

    def _reload_api_key(self) -> None:
        try:
            api_key = resolve_api_key(self._settings.nucleus)
        except ConfigError as exc:
            log.error("api_key_unavailable", problem=exc.problems[0])
            return
        if api_key != self._api_key:
            add_secret(api_key)
            self._api_key = api_key
            self._live.uploader.replace_client(pipeline.nucleus_client(self._settings, api_key))

    def _healthy(self) -> bool:
        """systemd restarts us when this stays False past WatchdogSec: only say so when a
        restart would help (a stage's thread died), not when the network is down."""
        loop_alive = time.monotonic() - self._loop_tick < _LOOP_STUCK_SECONDS
        return loop_alive and self._live.settler.is_alive() and self._live.uploader.is_alive()

    def _status_line(self) -> str:
        counts = self._live.store.state_counts()
        paused = self._live.uploader.paused_reason
        text = (
            f"{counts[FileState.PENDING]} pending, {counts[FileState.IN_FLIGHT]} in flight,"
            f" {counts[FileState.UPLOADED]} uploaded, {counts[FileState.FAILED]} failed"
        )
        return f"{text}; PAUSED: {paused}" if paused else text

    def _shutdown(self) -> None:
        self._notifier.stopping()
        log.info("daemon_stopping")
        self._live.stop(self._settings.upload.stop_timeout_seconds)
        self._metrics.stop()
        self._live.close()
        log.info("daemon_stopped")


def run_daemon(config_path: Path, settings: Settings, api_key: str) -> int:
    wakeups = _Wakeups()
    # Before anything is built: a TERM while the store is being opened ends the run cleanly.
    wakeups.install_signal_handlers()
    metrics = Metrics()
    live = pipeline.build_live(
        settings,
        api_key,
        upload_events=UploadMetrics(metrics),
        events=_FileMetrics(metrics),
        on_rescan_needed=wakeups.request_rescan,
    )
    return Daemon(config_path, settings, api_key, live, metrics, wakeups).run()
