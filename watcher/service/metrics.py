"""Prometheus metrics for nucleus-watcher.

The metric names below are a contract with operators' dashboards and alerts: add new ones,
never rename. Each `Metrics` owns its registry (not prometheus_client's global one), so tests
and tools can build several side by side.

Label conventions: ``watch`` is the watch folder's configured path, ``dataset`` the dataset id,
``reason`` a short snake_case word (``timeout``, ``connection``, ``http_429``, ``http_5xx``,
``http_400``, ``too_large``, ``unreadable``, ...), ``status`` a job status as the server spells
it, ``state`` a queue state as the store spells it. Keep label values few: never a file path.

Two gauges are computed at scrape time from callbacks the daemon registers, because the store
already knows the answer and keeping a copy in step would be one more thing to get wrong.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from wsgiref.simple_server import WSGIServer

import structlog
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Histogram,
    Info,
    ProcessCollector,
    start_http_server,
)
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from watcher import __version__
from watcher.errors import ConfigError
from watcher.pipeline import UploadEvents
from watcher.store import FileRecord

log = structlog.get_logger("watcher.metrics")

PREFIX = "nucleus_watcher_"

# One request carries up to 10 files of up to 100 MiB over links from LAN to a slow LTE modem:
# from a few milliseconds (tiny file, async accept) to many minutes (timeout_seconds is an idle
# timeout, so one large file over a thin link may take as long as it keeps moving).
REQUEST_SECONDS_BUCKETS = (
    0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120, 300, 600, 1800
)  # fmt: skip
# A reconcile walks a folder tree: instant for an empty one, up to an hour for millions of files.
SCAN_SECONDS_BUCKETS = (0.1, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)


class _ScrapeTimeGauge(Collector):
    """A gauge whose samples come from a callback at scrape time.

    A callback that raises (say, the database is busy) yields a gauge without samples for that
    scrape; the rest of the scrape is unaffected.
    """

    def __init__(self, name: str, documentation: str, label_names: tuple[str, ...]) -> None:
        self._name = name
        self._documentation = documentation
        self._label_names = label_names
        self._sample_source: Callable[[], Mapping[tuple[str, ...], float]] | None = None
        self._last_scrape_failed = False

    def set_sample_source(self, fn: Callable[[], Mapping[tuple[str, ...], float]]) -> None:
        self._sample_source = fn

    def describe(self) -> Iterator[Metric]:
        # Lets the registry check names at registration without calling the source.
        yield self._empty_family()

    def collect(self) -> Iterator[Metric]:
        family = self._empty_family()
        source = self._sample_source
        if source is not None:
            try:
                samples = dict(source())
            except Exception:
                # Warn once per run of failures, not on every scrape every 15 seconds.
                if not self._last_scrape_failed:
                    log.warning("metrics_source_failed", metric=self._name, exc_info=True)
                self._last_scrape_failed = True
            else:
                self._last_scrape_failed = False
                for label_values, value in sorted(samples.items()):
                    family.add_metric(list(label_values), float(value))
        yield family

    def _empty_family(self) -> GaugeMetricFamily:
        return GaugeMetricFamily(self._name, self._documentation, labels=list(self._label_names))


class Metrics:
    """Every nucleus-watcher metric, its registry, and the optional HTTP endpoint serving them."""

    def __init__(self, *, version: str = __version__) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        # Defined in groups, in the order a scrape lists them.
        self._define_file_counters()
        self._define_request_metrics()
        self._define_watch_metrics()
        self.build_info = Info(
            PREFIX + "build",
            "The running nucleus-watcher version.",
            registry=self.registry,
        )
        self.build_info.info({"version": version})

        self._queue_depth = _ScrapeTimeGauge(
            PREFIX + "queue_depth", "Files in the state store, by state.", ("state",)
        )
        self._oldest_pending_age = _ScrapeTimeGauge(
            PREFIX + "oldest_pending_age_seconds",
            "Age of the oldest file waiting for upload; 0 when nothing waits.",
            (),
        )
        self.registry.register(self._queue_depth)
        self.registry.register(self._oldest_pending_age)
        # Memory, open files and CPU of this process: the first thing to look at on a box that
        # has been running for months.
        ProcessCollector(registry=self.registry)

        self.port: int | None = None
        self._server: WSGIServer | None = None
        self._server_thread: threading.Thread | None = None

    def _define_file_counters(self) -> None:
        registry = self.registry
        self.files_seen_total = Counter(
            PREFIX + "files_seen",
            "Files noticed in a watch folder (event or scan), before settling.",
            ["watch"],
            registry=registry,
        )
        self.files_settled_total = Counter(
            PREFIX + "files_settled",
            "Files that stopped changing and were handed on for upload.",
            ["watch"],
            registry=registry,
        )
        self.files_uploaded_total = Counter(
            PREFIX + "files_uploaded",
            "Files the server confirmed as new items.",
            ["dataset"],
            registry=registry,
        )
        self.files_updated_total = Counter(
            PREFIX + "files_updated",
            "Files re-sent with update=true (content or metadata changed) and confirmed.",
            ["dataset"],
            registry=registry,
        )
        self.files_failed_total = Counter(
            PREFIX + "files_failed",
            "Upload attempts that failed for a file, by reason.",
            ["dataset", "reason"],
            registry=registry,
        )
        self.files_parked_total = Counter(
            PREFIX + "files_parked",
            "Files given up on after a permanent error (re-queue with `retry`).",
            ["dataset"],
            registry=registry,
        )

    def _define_request_metrics(self) -> None:
        registry = self.registry
        self.bytes_sent_total = Counter(
            PREFIX + "bytes_sent",
            "Request body bytes written to the Nucleus API.",
            registry=registry,
        )
        self.upload_retries_total = Counter(
            PREFIX + "upload_retries",
            "Requests scheduled again after a transient failure, by reason.",
            ["reason"],
            registry=registry,
        )
        self.request_seconds = Histogram(
            PREFIX + "request_seconds",
            "Duration of one request to the Nucleus API, first byte sent to answer read.",
            registry=registry,
            buckets=REQUEST_SECONDS_BUCKETS,
        )
        self.jobs_total = Counter(
            PREFIX + "jobs",
            "Asynchronous append jobs that reached a final status.",
            ["status"],
            registry=registry,
        )

    def _define_watch_metrics(self) -> None:
        registry = self.registry
        self.watcher_restarts_total = Counter(
            PREFIX + "watcher_restarts",
            "Times a folder observer was restarted (crash, overflow, vanished root).",
            ["watch"],
            registry=registry,
        )
        self.scan_seconds = Histogram(
            PREFIX + "scan_seconds",
            "Duration of one reconcile pass over a watch folder.",
            registry=registry,
            buckets=SCAN_SECONDS_BUCKETS,
        )
        self.incomplete_files_total = Counter(
            PREFIX + "incomplete_files",
            "Files still changing (or not a complete image) after settle.max_wait_seconds.",
            ["watch"],
            registry=registry,
        )

    def set_queue_depth_source(self, fn: Callable[[], Mapping[str, int]]) -> None:
        """`fn` returns {state: count}; called on every scrape."""

        def samples() -> Mapping[tuple[str, ...], float]:
            return {(state,): float(count) for state, count in fn().items()}

        self._queue_depth.set_sample_source(samples)

    def set_oldest_pending_source(self, fn: Callable[[], float | None]) -> None:
        """`fn` returns the oldest pending file's age in seconds, or None when nothing waits."""

        def samples() -> Mapping[tuple[str, ...], float]:
            age_seconds = fn()
            # 0 rather than no sample: an alert on "age > 1h" then reads naturally.
            return {(): 0.0 if age_seconds is None else float(age_seconds)}

        self._oldest_pending_age.set_sample_source(samples)

    def start_http_server(self, host: str, port: int) -> None:
        """Serve /metrics on `host`, `port` (as `MetricsSettings.listen_address` gives them; port
        0 picks a free one).

        The bound port is then in `.port`. Raises ConfigError if the address cannot be bound
        (in use, not local).
        """
        if self._server is not None:
            raise RuntimeError("metrics HTTP server already started")
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as error:
            listen = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
            raise ConfigError(f"metrics.listen: cannot listen on {listen!r}: {error}") from error
        thread.name = "metrics-http"
        self._server = server
        self._server_thread = thread
        self.port = server.server_port
        log.info("metrics_listening", host=host, port=self.port)

    def stop(self) -> None:
        """Stop the HTTP server (if started) and wait for its thread."""
        server, thread = self._server, self._server_thread
        self._server = None
        self._server_thread = None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        if thread is not None:
            thread.join()


class UploadMetrics(UploadEvents):
    """Feeds the uploader's outcomes into `Metrics` (one of the daemon's event consumers)."""

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        for record in records:
            counter = (
                self._metrics.files_updated_total
                if record.update_flag
                else self._metrics.files_uploaded_total
            )
            counter.labels(dataset=record.dataset_id).inc()

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        for record in records:
            self._metrics.files_parked_total.labels(dataset=record.dataset_id).inc()

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        self._metrics.upload_retries_total.labels(reason=kind).inc()
        for record in records:
            self._metrics.files_failed_total.labels(dataset=record.dataset_id, reason=kind).inc()

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        self._metrics.request_seconds.observe(seconds)
        self._metrics.bytes_sent_total.inc(bytes_sent)

    def job_finished(self, status: str) -> None:
        self._metrics.jobs_total.labels(status=status).inc()
