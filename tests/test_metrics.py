"""watcher.metrics: scraped over real HTTP on 127.0.0.1, as Prometheus would."""

from __future__ import annotations

import socket
import threading
from collections.abc import Iterator

import pytest
import requests

from watcher import __version__
from watcher.errors import ConfigError
from watcher.service import Metrics


@pytest.fixture
def http() -> Iterator[requests.Session]:
    session = requests.Session()
    session.trust_env = False  # a proxy from the environment must not intercept 127.0.0.1
    yield session
    session.close()


@pytest.fixture
def metrics() -> Iterator[Metrics]:
    instance = Metrics()
    instance.start_http_server("127.0.0.1", 0)
    yield instance
    instance.stop()


def scrape(http: requests.Session, host: str, port: int | None) -> dict[str, float]:
    """{'name{labels}': value} for every sample line of the exposition."""
    response = http.get(f"http://{host}:{port}/metrics", timeout=5)
    assert response.status_code == 200
    samples: dict[str, float] = {}
    for line in response.text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            samples[series] = float(value)
    return samples


def test_counters_histogram_and_build_info_are_served(
    metrics: Metrics, http: requests.Session
) -> None:
    assert metrics.port is not None and metrics.port > 0
    metrics.files_seen_total.labels(watch="/srv/cam").inc()
    metrics.files_seen_total.labels(watch="/srv/cam").inc()
    metrics.files_uploaded_total.labels(dataset="ds_1").inc(3)
    metrics.files_failed_total.labels(dataset="ds_1", reason="http_400").inc()
    metrics.upload_retries_total.labels(reason="http_429").inc()
    metrics.bytes_sent_total.inc(123_456)
    metrics.request_seconds.observe(0.3)
    metrics.jobs_total.labels(status="Completed").inc()

    samples = scrape(http, "127.0.0.1", metrics.port)

    assert samples['nucleus_watcher_files_seen_total{watch="/srv/cam"}'] == 2
    assert samples['nucleus_watcher_files_uploaded_total{dataset="ds_1"}'] == 3
    assert samples['nucleus_watcher_files_failed_total{dataset="ds_1",reason="http_400"}'] == 1
    assert samples['nucleus_watcher_upload_retries_total{reason="http_429"}'] == 1
    assert samples["nucleus_watcher_bytes_sent_total"] == 123_456
    assert samples['nucleus_watcher_jobs_total{status="Completed"}'] == 1
    assert samples['nucleus_watcher_request_seconds_bucket{le="0.25"}'] == 0
    assert samples['nucleus_watcher_request_seconds_bucket{le="0.5"}'] == 1
    assert samples['nucleus_watcher_request_seconds_bucket{le="120.0"}'] == 1
    assert samples["nucleus_watcher_request_seconds_count"] == 1
    assert samples[f'nucleus_watcher_build_info{{version="{__version__}"}}'] == 1


def test_gauges_are_read_from_callbacks_at_scrape_time(
    metrics: Metrics, http: requests.Session
) -> None:
    depths = {"pending": 3, "uploading": 1}
    oldest: list[float | None] = [42.5]
    metrics.set_queue_depth_source(lambda: depths)
    metrics.set_oldest_pending_source(lambda: oldest[0])

    samples = scrape(http, "127.0.0.1", metrics.port)
    assert samples['nucleus_watcher_queue_depth{state="pending"}'] == 3
    assert samples['nucleus_watcher_queue_depth{state="uploading"}'] == 1
    assert samples["nucleus_watcher_oldest_pending_age_seconds"] == 42.5

    depths["pending"] = 0
    oldest[0] = None  # nothing waits any more
    samples = scrape(http, "127.0.0.1", metrics.port)
    assert samples['nucleus_watcher_queue_depth{state="pending"}'] == 0
    assert samples["nucleus_watcher_oldest_pending_age_seconds"] == 0


def test_a_failing_callback_does_not_break_the_scrape(
    metrics: Metrics, http: requests.Session
) -> None:
    healthy = [False]

    def queue_depths() -> dict[str, int]:
        if not healthy[0]:
            raise RuntimeError("database is locked")
        return {"pending": 7}

    metrics.set_queue_depth_source(queue_depths)
    metrics.set_oldest_pending_source(lambda: 5.0)
    metrics.files_seen_total.labels(watch="/srv/cam").inc()

    samples = scrape(http, "127.0.0.1", metrics.port)
    assert not any(series.startswith("nucleus_watcher_queue_depth") for series in samples)
    assert samples["nucleus_watcher_oldest_pending_age_seconds"] == 5
    assert samples['nucleus_watcher_files_seen_total{watch="/srv/cam"}'] == 1

    healthy[0] = True
    samples = scrape(http, "127.0.0.1", metrics.port)
    assert samples['nucleus_watcher_queue_depth{state="pending"}'] == 7


def test_instances_have_separate_registries(metrics: Metrics, http: requests.Session) -> None:
    other = Metrics()  # would fail with "Duplicated timeseries" on a shared registry
    other.files_seen_total.labels(watch="/srv/other").inc()

    samples = scrape(http, "127.0.0.1", metrics.port)
    assert 'nucleus_watcher_files_seen_total{watch="/srv/other"}' not in samples


def test_stop_joins_the_server_thread_and_frees_the_port(http: requests.Session) -> None:
    instance = Metrics()
    instance.start_http_server("127.0.0.1", 0)
    port = instance.port
    assert scrape(http, "127.0.0.1", port)

    instance.stop()

    assert not any(thread.name == "metrics-http" for thread in threading.enumerate())
    with pytest.raises(requests.ConnectionError):
        http.get(f"http://127.0.0.1:{port}/metrics", timeout=2)
    instance.stop()  # a second stop is harmless


def _ipv6_loopback_available() -> bool:
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_STREAM) as probe:
            probe.bind(("::1", 0))
    except OSError:
        return False
    return True


@pytest.mark.skipif(not _ipv6_loopback_available(), reason="no IPv6 loopback on this machine")
def test_ipv6_listen_address(http: requests.Session) -> None:
    instance = Metrics()
    instance.start_http_server("::1", 0)
    try:
        samples = scrape(http, "[::1]", instance.port)
        assert f'nucleus_watcher_build_info{{version="{__version__}"}}' in samples
    finally:
        instance.stop()


def test_port_in_use_is_a_config_error() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        instance = Metrics()
        with pytest.raises(ConfigError, match=f"cannot listen on '127.0.0.1:{port}'"):
            instance.start_http_server("127.0.0.1", port)
        instance.stop()
