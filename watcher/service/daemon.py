"""`nucleus-watcher run`: the always-on service. The only place that wires the live pipeline.

    intake (watchdog) --candidate--> settler --ready--> reconciler.consider --> store --> uploader
    reconcile walk (start, every scan.interval_seconds, after overflow/restart) ----^

The main thread owns the control loop: signals, reconcile walks, observer supervision, and the
systemd watchdog. Stages talk through callbacks and the store, never by importing each other.
"""

from __future__ import annotations

import ctypes
import json
import os
import signal
import threading
import time
from pathlib import Path
from types import FrameType

import structlog

from watcher.config import Settings, load_settings, resolve_api_key
from watcher.errors import ConfigError
from watcher.nucleus import NucleusClient
from watcher.pipeline import (
    AfterUpload,
    FanOutEvents,
    FreeSpaceGuard,
    Intake,
    Reconciler,
    Settler,
    Uploader,
    WatchPlan,
    WatchSpec,
    plans_for,
)
from watcher.pipeline import wiring as pipeline
from watcher.service.logs import add_secret
from watcher.service.metrics import Metrics, UploadMetrics
from watcher.service.sdnotify import SystemdNotifier
from watcher.store import FileState, StateStore, retry_request_path

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


class Daemon:
    def __init__(self, config_path: Path, settings: Settings, api_key: str) -> None:
        self._config_path = config_path
        self._settings = settings
        self._api_key = api_key
        self._wakeup = threading.Event()
        self._stop_requested = False
        self._reload_requested = False
        self._rescan_lock = threading.Lock()
        self._rescan_keys: set[str | None] = set()
        self._notifier = SystemdNotifier()
        self._metrics = Metrics()
        self._loop_tick = time.monotonic()
        self._restarts_seen: dict[str, int] = {}
        self._plans: list[WatchPlan] = pipeline.watch_plans(settings)
        self._store: StateStore | None = None
        self._uploader: Uploader | None = None
        self._reconciler: Reconciler | None = None
        self._settler: Settler | None = None
        self._intake: Intake | None = None
        self._key_file_mtime_ns = self._key_file_mtime()

    # -- callbacks from other threads: hand on, never block ---------------------------------

    def _on_candidate(self, key: str, path: Path, closed: bool) -> None:
        assert self._settler is not None
        self._metrics.files_seen_total.labels(watch=key).inc()
        self._settler.submit(path, closed=closed)

    def _on_deleted(self, key: str, path: Path) -> None:
        assert self._settler is not None and self._store is not None
        self._settler.forget(path)
        for plan, relpath in self._plans_for(path):
            if self._store.mark_gone(plan.key, relpath):
                log.info("file_gone", path=str(path), dataset_id=plan.dataset_id)

    def _on_rescan_needed(self, key: str | None, reason: str) -> None:
        log.info("rescan_requested", watch=key, reason=reason)
        with self._rescan_lock:
            self._rescan_keys.add(key)
        self._wakeup.set()

    def _on_settled(self, path: Path, _stat: os.stat_result) -> None:
        assert self._reconciler is not None
        for plan, _relpath in self._plans_for(path):
            self._metrics.files_settled_total.labels(watch=plan.key).inc()
            self._reconciler.consider(plan, path, settled=True)

    def _on_incomplete(self, path: Path, reason: str) -> None:
        assert self._reconciler is not None
        for plan, _relpath in self._plans_for(path):
            if self._reconciler.record_incomplete(plan, path, reason) == FileState.INCOMPLETE:
                self._metrics.incomplete_files_total.labels(watch=plan.key).inc()

    def _on_unsettled(self, plan: WatchPlan, path: Path) -> None:
        assert self._settler is not None
        self._settler.submit(path)

    def _on_queued(self) -> None:
        if self._uploader is not None:
            self._uploader.wake()

    def _plans_for(self, path: Path) -> list[tuple[WatchPlan, str]]:
        return plans_for(self._plans, path)

    # -- signals ---------------------------------------------------------------------------

    def _handle_stop(self, signum: int, _frame: FrameType | None) -> None:
        self._stop_requested = True
        self._wakeup.set()

    def _handle_reload(self, signum: int, _frame: FrameType | None) -> None:
        self._reload_requested = True
        self._wakeup.set()

    # -- the control loop ------------------------------------------------------------------

    def run(self) -> int:
        settings = self._settings
        signal.signal(signal.SIGTERM, self._handle_stop)
        signal.signal(signal.SIGINT, self._handle_stop)
        signal.signal(signal.SIGHUP, self._handle_reload)

        self._store = pipeline.open_store(settings)
        released = self._store.release_in_flight()
        if released:
            log.info("resending_interrupted", items=released)
        client = pipeline.nucleus_client(settings, self._api_key)
        archive_dir = Path(settings.upload.archive_dir) if settings.upload.archive_dir else None
        events = FanOutEvents(
            [
                UploadMetrics(self._metrics),
                AfterUpload(settings.upload.after_upload, archive_dir, self._store),
            ]
        )
        self._uploader = pipeline.uploader(settings, self._store, client, events)
        self._reconciler = pipeline.reconciler(
            settings, self._store, on_unsettled=self._on_unsettled, on_queued=self._on_queued
        )
        self._settler = pipeline.settler(
            settings, on_ready=self._on_settled, on_incomplete=self._on_incomplete
        )
        self._intake = Intake(
            on_candidate=self._on_candidate,
            on_deleted=self._on_deleted,
            on_rescan_needed=self._on_rescan_needed,
        )
        heartbeat = threading.Thread(target=self._heartbeat, name="sd-watchdog", daemon=True)
        try:
            self._start_metrics()
            self._uploader.start()
            self._settler.start()
            self._intake.start(self._watch_specs())
            log.info(
                "daemon_started",
                watches=[plan.key for plan in self._plans],
                state=str(settings.state.path),
            )
            # Files added while we were down: the first walk runs before READY so that a
            # `systemctl start` returns once everything on disk is known.
            self._reconcile(None)
            self._notifier.ready(self._status_line())
            heartbeat.start()
            self._loop()
        finally:
            self._shutdown(client)
            if heartbeat.is_alive():
                heartbeat.join(5)
        return 0

    def _start_metrics(self) -> None:
        assert self._store is not None
        store = self._store

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
        next_scan = time.monotonic() + settings.scan.interval_seconds
        next_supervise = time.monotonic() + _SUPERVISE_EVERY_SECONDS
        next_disk_check = time.monotonic()
        disk_guard = FreeSpaceGuard(
            self._store_or_fail(),
            [(plan.key, plan.root) for plan in self._plans],
            settings.disk.min_free_bytes,
            settings.disk.delete_uploaded_when_low,
        )
        while not self._stop_requested:
            self._loop_tick = time.monotonic()
            self._wakeup.wait(_TICK_SECONDS)
            self._wakeup.clear()
            if self._stop_requested:
                break
            if self._reload_requested:
                self._reload_requested = False
                self._reload()
            now = time.monotonic()
            if now >= next_scan:
                next_scan = now + self._settings.scan.interval_seconds
                self._on_rescan_needed(None, "periodic")
            with self._rescan_lock:
                keys, self._rescan_keys = self._rescan_keys, set()
            if keys:
                self._reconcile(None if None in keys else keys)
            if now >= next_supervise:
                next_supervise = now + _SUPERVISE_EVERY_SECONDS
                self._supervise()
            if settings.disk.min_free_bytes and now >= next_disk_check:
                next_disk_check = now + _DISK_CHECK_EVERY_SECONDS
                disk_guard.check()
            self._notifier.status(self._status_line())

    def _store_or_fail(self) -> StateStore:
        assert self._store is not None
        return self._store

    def _supervise(self) -> None:
        assert self._intake is not None
        self._intake.supervise()
        for key, count in self._intake.restarts().items():
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
        count = self._store_or_fail().requeue_failed(paths)
        log.info("retry_requested", items=count)
        self._on_rescan_needed(None, "retry requested")

    def _heartbeat(self) -> None:
        """WATCHDOG=1 from its own thread, so a long reconcile walk is not mistaken for a hang;
        it stops when a stage's thread has died or the control loop stopped coming round."""
        interval = self._notifier.watchdog_interval_seconds
        if interval is None:
            return
        while not self._stop_requested:
            if self._healthy():
                self._notifier.watchdog()
            elif not self._stop_requested:
                log.error("pipeline_unhealthy", hint="systemd will restart the service")
            time.sleep(interval)

    def _reconcile(self, keys: set[str | None] | None) -> None:
        assert self._reconciler is not None
        plans = self._plans if keys is None else [p for p in self._plans if p.key in keys]
        report = self._reconciler.reconcile(plans)
        self._metrics.scan_seconds.observe(report.seconds)
        assert self._uploader is not None
        self._uploader.wake()
        _return_freed_memory()

    def _watch_specs(self) -> list[WatchSpec]:
        return [
            WatchSpec(
                key=plan.key,
                root=plan.root,
                recursive=plan.recursive,
                path_filter=plan.path_filter,
                polling=plan.polling,
            )
            for plan in self._plans
        ]

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
        self._plans = plans
        assert self._intake is not None and self._uploader is not None
        self._intake.reconfigure(self._watch_specs())
        self._reload_api_key()
        self._uploader.resume()
        log.info("config_reloaded", watches=[plan.key for plan in plans])
        self._on_rescan_needed(None, "config reloaded")
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
        assert self._uploader is not None
        mtime_ns = self._key_file_mtime()
        if mtime_ns == self._key_file_mtime_ns:
            return
        self._key_file_mtime_ns = mtime_ns
        if self._uploader.paused_reason is not None:
            log.info("api_key_file_changed")
            self._reload_api_key()
            self._uploader.resume()

    def _reload_api_key(self) -> None:
        try:
            api_key = resolve_api_key(self._settings.nucleus)
        except ConfigError as exc:
            log.error("api_key_unavailable", problem=exc.problems[0])
            return
        if api_key != self._api_key:
            add_secret(api_key)
            self._api_key = api_key
            assert self._uploader is not None
            self._uploader.replace_client(pipeline.nucleus_client(self._settings, api_key))

    def _healthy(self) -> bool:
        """systemd restarts us when this stays False past WatchdogSec: only say so when a
        restart would help (a stage's thread died), not when the network is down."""
        assert self._settler is not None and self._uploader is not None
        loop_alive = time.monotonic() - self._loop_tick < _LOOP_STUCK_SECONDS
        return loop_alive and self._settler.is_alive() and self._uploader.is_alive()

    def _status_line(self) -> str:
        if self._store is None:
            return "starting"
        counts = self._store.state_counts()
        paused = self._uploader.paused_reason if self._uploader else None
        text = (
            f"{counts[FileState.PENDING]} pending, {counts[FileState.IN_FLIGHT]} in flight,"
            f" {counts[FileState.UPLOADED]} uploaded, {counts[FileState.FAILED]} failed"
        )
        return f"{text}; PAUSED: {paused}" if paused else text

    def _shutdown(self, client: NucleusClient) -> None:
        self._notifier.stopping()
        log.info("daemon_stopping")
        if self._intake is not None:
            self._intake.stop()
        if self._settler is not None:
            self._settler.stop()
        if self._uploader is not None:
            self._uploader.stop(self._settings.upload.stop_timeout_seconds)
        self._metrics.stop()
        client.close()
        if self._store is not None:
            self._store.close()
        log.info("daemon_stopped")


def run_daemon(config_path: Path, settings: Settings, api_key: str) -> int:
    return Daemon(config_path, settings, api_key).run()
