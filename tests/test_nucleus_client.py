"""NucleusClient against real HTTP on 127.0.0.1: the devserver, and a tiny canned-answer server
for answers the devserver never gives (odd error formats, bad bodies, TLS)."""

from __future__ import annotations

import base64
import collections
import email.utils
import json
import os
import shutil
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from tests.imagefactory import jpeg_bytes, sha256_of, write_jpeg, write_large_jpeg, write_png
from watcher.devserver import DevServer
from watcher.errors import (
    ConfigError,
    LocalFileError,
    PermanentUploadError,
    RetryableUploadError,
    TimeoutUploadError,
    UnauthorizedError,
)
from watcher.nucleus import (
    AppendResult,
    JobState,
    NucleusClient,
    TokenBucket,
    UploadItem,
)

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "test_key_5f2b9c0d1e"
DATASET = "ds_client"
JOB_WAIT_SECONDS = 10.0


ClientFactory = Callable[..., NucleusClient]


@pytest.fixture
def make_client() -> Iterator[ClientFactory]:
    """Build clients (any endpoint, any options); every one is closed at teardown."""
    made: list[NucleusClient] = []

    def build(endpoint: str, api_key: str = API_KEY, **options: Any) -> NucleusClient:
        options.setdefault("timeout_seconds", 10.0)
        client = NucleusClient(endpoint, api_key, **options)
        made.append(client)
        return client

    yield build
    for client in made:
        client.close()


@pytest.fixture
def client(devserver: DevServer, make_client: ClientFactory) -> NucleusClient:
    return make_client(devserver.base_url)


def _local(reference_id: str, path: Path, update: bool = False, **metadata: Any) -> UploadItem:
    return UploadItem(reference_id=reference_id, metadata=metadata, update=update, path=path)


def _wait_for_job(client: NucleusClient, job_id: str) -> JobState:
    give_up_at = time.monotonic() + JOB_WAIT_SECONDS
    while True:
        state = client.job(job_id)
        if state.finished or time.monotonic() > give_up_at:
            return state
        time.sleep(0.05)


# -- appends that work ---------------------------------------------------------------------


def test_sync_append_stores_identical_bytes_and_exact_metadata(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    paths = [tmp_path / f"cam/frame_{i}.jpg" for i in range(3)]
    for seed, path in enumerate(paths):
        write_jpeg(path, seed=seed)
    metadata = {
        "frame": 7,
        "exposure": 0.25,
        "night": False,
        "Recording Date": "2024-05-01",
        "camera_params": {"fx": 1000, "cx": 320.5},
    }
    items = [
        UploadItem(f"dev/{p.name}", {**metadata, "index": i}, False, path=p)
        for i, p in enumerate(paths)
    ]

    result = client.append(DATASET, items, asynchronous=False)

    assert (result.new_items, result.updated_items, result.ignored_items) == (3, 0, 0)
    assert result.job_id is None and result.item_errors == {}
    assert result.bytes_sent > sum(p.stat().st_size for p in paths)
    stored = devserver.items(DATASET)
    assert set(stored) == {f"dev/frame_{i}.jpg" for i in range(3)}
    for i, path in enumerate(paths):
        item = stored[f"dev/{path.name}"]
        assert item.metadata == {**metadata, "index": i}
        assert type(item.metadata["frame"]) is int and type(item.metadata["index"]) is int
        assert type(item.metadata["exposure"]) is float
        assert item.image_sha256 == sha256_of(path)
        assert devserver.image_bytes(item.image_sha256) == path.read_bytes()
        assert item.content_type == "image/jpeg"
        assert item.image_url == f"{i}-{path.name}"
        # The client says which bytes it streamed: exactly what the server stored.
        assert result.streamed_sha256[f"dev/{path.name}"] == item.image_sha256


def test_resend_with_update_counts_as_updated_and_replaces_metadata(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path, seed=1)
    client.append(DATASET, [_local("a", path, old=1, gone="yes")], asynchronous=False)
    write_jpeg(path, seed=2)  # the camera rewrote the frame

    ignored = client.append(DATASET, [_local("a", path, old=5)], asynchronous=False)
    updated = client.append(DATASET, [_local("a", path, update=True, old=2)], asynchronous=False)

    assert (ignored.new_items, ignored.updated_items, ignored.ignored_items) == (0, 0, 1)
    assert (updated.new_items, updated.updated_items, updated.ignored_items) == (0, 1, 0)
    item = devserver.items(DATASET)["a"]
    assert item.metadata == {"old": 2}
    assert item.times_written == 2
    assert item.image_sha256 == sha256_of(path)


def test_png_and_unsafe_file_names_upload_with_safe_part_names(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    odd = tmp_path / 'we"ird name\x01;é.PNG'
    write_png(odd, seed=3)

    client.append(DATASET, [_local("odd", odd)], asynchronous=False)

    item = devserver.items(DATASET)["odd"]
    assert item.content_type == "image/png"
    assert item.image_url == "0-we_ird_name___.PNG"
    assert item.image_sha256 == sha256_of(odd)


def test_async_append_returns_job_that_reaches_completed(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    with DevServer(data_dir=tmp_path / "srv", job_delay_seconds=0.3) as server:
        client = make_client(server.base_url)

        result = client.append(DATASET, [_local("a", path, n=1)], asynchronous=True)
        first = client.job(result.job_id or "")
        final = _wait_for_job(client, result.job_id or "")

        assert result.job_id and result.job_id.startswith("job_")
        assert first.status == "Running" and not first.finished
        assert final.status == "Completed"
        assert final.finished and final.succeeded and not final.user_error
        assert server.items(DATASET)["a"].metadata == {"n": 1}
        assert server.requests()[0].query == "async=1"


def test_job_errors_are_attributed_to_the_items_they_name(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    paths = [tmp_path / f"{name}.jpg" for name in ("a", "b", "c")]
    for seed, path in enumerate(paths):
        write_jpeg(path, seed=seed)
    client.append(DATASET, [_local("cam/a", paths[0], speed=3)], asynchronous=False)

    result = client.append(
        DATASET,
        [_local("cam/b", paths[1], speed="fast"), _local("cam/c", paths[2], speed="slow")],
        asynchronous=True,
    )
    state = _wait_for_job(client, result.job_id or "")
    errors = client.job_errors(result.job_id or "", ["cam/b", "cam/c"])

    assert state.status == "Errored_User" and state.finished and state.user_error
    assert set(errors) == {"cam/b", "cam/c"}
    assert "speed" in errors["cam/b"] and "speed" in errors["cam/c"]


def test_remote_url_items_go_as_json_with_one_update_flag(
    devserver: DevServer, client: NucleusClient
) -> None:
    items = [
        UploadItem("r1", {"n": 1}, True, remote_url="s3://bucket/one.jpg"),
        UploadItem("r2", {"n": 2}, True, remote_url="https://example.com/two.png"),
    ]

    result = client.append(DATASET, items, asynchronous=False)

    assert result.new_items == 2
    stored = devserver.items(DATASET)
    assert stored["r1"].image_url == "s3://bucket/one.jpg"
    assert stored["r2"].metadata == {"n": 2}
    assert stored["r2"].image_sha256 is None


def test_requests_that_cannot_be_sent_as_asked_are_refused_before_sending(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    remote_true = UploadItem("r1", {}, True, remote_url="gs://b/1.jpg")
    remote_false = UploadItem("r2", {}, False, remote_url="gs://b/2.jpg")

    with pytest.raises(ValueError, match="agree on update"):
        client.append(DATASET, [remote_true, remote_false], asynchronous=False)
    with pytest.raises(ValueError, match="cannot share"):
        client.append(DATASET, [_local("l", path), remote_true], asynchronous=False)
    with pytest.raises(ValueError, match="at most 10"):
        client.append(DATASET, [_local(f"l{i}", path) for i in range(11)], asynchronous=False)
    with pytest.raises(ValueError, match="exactly one"):
        UploadItem("x", {}, False)
    with pytest.raises(ValueError, match="must start with"):
        UploadItem("x", {}, False, remote_url="ftp://host/x.jpg")
    assert devserver.append_request_count() == 0


def test_concurrent_appends_from_many_threads_all_arrive(
    devserver: DevServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    client = make_client(devserver.base_url, pool_size=8)
    failures: list[BaseException] = []

    def upload(worker: int) -> None:
        try:
            for n in range(5):
                path = tmp_path / f"w{worker}" / f"{n}.jpg"
                write_jpeg(path, seed=worker * 100 + n)
                client.append(DATASET, [_local(f"w{worker}/{n}", path)], asynchronous=False)
        except BaseException as exc:
            failures.append(exc)

    threads = [threading.Thread(target=upload, args=(w,)) for w in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)

    assert failures == []
    assert len(devserver.items(DATASET)) == 40


def test_bandwidth_bucket_paces_the_streamed_body(
    devserver: DevServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    path = tmp_path / "big.jpg"
    write_large_jpeg(path, 1_000_000)
    slept: list[float] = []
    now = [0.0]

    def fake_sleep(seconds: float) -> None:  # a clock that jumps instead of waiting
        slept.append(seconds)
        now[0] += seconds

    bucket = TokenBucket(1_000_000, 64 * 1024, clock=lambda: now[0], sleep=fake_sleep)
    client = make_client(devserver.base_url, bandwidth=bucket, timeout_seconds=30)

    result = client.append(DATASET, [_local("big", path)], asynchronous=False)

    # Every byte of the body went through the bucket: all but the burst had to wait.
    expected_seconds = (result.bytes_sent - 64 * 1024) / 1_000_000
    assert sum(slept) == pytest.approx(expected_seconds, rel=0.01)
    assert devserver.items(DATASET)["big"].image_sha256 == sha256_of(path)


def test_streaming_a_200_mb_file_keeps_memory_flat(devserver: DevServer, tmp_path: Path) -> None:
    path = tmp_path / "huge.jpg"
    digest = write_large_jpeg(path, 200 * 1024 * 1024)
    # A fresh interpreter, so the peak RSS measured is the client's alone.
    script = """
import sys
from pathlib import Path
from watcher.nucleus import NucleusClient, UploadItem

def peak_kib():
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1])

with NucleusClient(sys.argv[1], "key", timeout_seconds=120) as client:
    client.dataset_info(sys.argv[3])  # warm up: imports, connection, first answer
    before = peak_kib()
    item = UploadItem("huge", {"size": "200MB"}, False, path=Path(sys.argv[2]))
    result = client.append(sys.argv[3], [item], asynchronous=False)
    print(result.new_items, result.bytes_sent, peak_kib() - before)
"""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    completed = subprocess.run(
        [sys.executable, "-c", script, devserver.base_url, str(path), DATASET],
        capture_output=True,
        text=True,
        timeout=180,
        env=env,
        cwd=ROOT,
    )

    assert completed.returncode == 0, completed.stderr
    new_items, bytes_sent, growth_kib = (int(x) for x in completed.stdout.split())
    assert new_items == 1
    assert bytes_sent > 200 * 1024 * 1024 - 70_000
    assert growth_kib < 32 * 1024
    assert devserver.items(DATASET)["huge"].image_sha256 == digest
    # Both copies would otherwise outlive the test in pytest's kept temp folders.
    path.unlink()
    devserver.image_path(digest).unlink()


@pytest.mark.parametrize("change", ["grow", "shrink"])
def test_a_file_that_changes_size_while_streamed_is_retryable(
    change: str, devserver: DevServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    path = tmp_path / "growing.jpg"
    write_large_jpeg(path, 600_000)
    now = [0.0]

    def change_file_then_wait(seconds: float) -> None:
        # Runs between two chunks of the body: the camera is still writing after all.
        with path.open("r+b") as f:
            if change == "grow":
                f.seek(0, os.SEEK_END)
                f.write(b"\0" * 100_000)
            else:
                f.truncate(300_000)
        now[0] += seconds

    bucket = TokenBucket(1_000_000, 64 * 1024, clock=lambda: now[0], sleep=change_file_then_wait)
    client = make_client(devserver.base_url, bandwidth=bucket)

    with pytest.raises(RetryableUploadError, match="changed size"):
        client.append(DATASET, [_local("g", path)], asynchronous=False)

    assert devserver.items(DATASET) == {}


def test_close_stops_the_deadline_thread(devserver: DevServer, tmp_path: Path) -> None:
    client = NucleusClient(devserver.base_url, API_KEY)
    client.dataset_info(DATASET)
    assert any(t.name == "nucleus-deadline-reaper" for t in threading.enumerate())

    client.close()

    assert not any(t.name == "nucleus-deadline-reaper" for t in threading.enumerate())
    with pytest.raises(RuntimeError):
        client.dataset_info(DATASET)


# -- failures ------------------------------------------------------------------------------


def test_wrong_key_is_unauthorized_and_never_shown(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    wrong_key = "wrong_key_8d7e6f5a4b3c"
    with DevServer(data_dir=tmp_path / "srv", api_key="the-right-key") as server:
        client = make_client(server.base_url, api_key=wrong_key)
        with pytest.raises(UnauthorizedError) as caught:
            client.append(DATASET, [_local("a", path)], asynchronous=False)
        with pytest.raises(UnauthorizedError) as caught_info:
            client.dataset_info(DATASET)

    assert caught.value.status_code == 401
    for exc in (caught.value, caught_info.value):
        assert wrong_key not in str(exc) and wrong_key not in repr(exc.args)
        assert "401" in str(exc)


@pytest.mark.parametrize("kind", ["500", "503"])
def test_server_errors_are_retryable(
    kind: str, devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    devserver.inject_faults(kind)

    with pytest.raises(RetryableUploadError) as caught:
        client.append(DATASET, [_local("a", path)], asynchronous=False)

    assert caught.value.status_code == int(kind)
    assert f"HTTP {kind}" in str(caught.value)
    assert "a" not in devserver.items(DATASET)


def test_rate_limit_is_retryable_with_the_servers_retry_after(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    devserver.inject_faults("429", retry_after_seconds=2.5)

    with pytest.raises(RetryableUploadError) as caught:
        client.append(DATASET, [_local("a", path)], asynchronous=False)

    assert caught.value.status_code == 429
    assert caught.value.retry_after_seconds == 2.5


@pytest.mark.parametrize("kind", ["reset", "lost"])
def test_broken_connections_are_retryable(
    kind: str, devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    devserver.inject_faults(kind)

    with pytest.raises(RetryableUploadError) as caught:
        client.append(DATASET, [_local("a", path)], asynchronous=False)
    after = client.append(DATASET, [_local("a", path)], asynchronous=False)

    assert caught.value.status_code is None
    # "lost" stored the item before the answer vanished: the re-send finds it there.
    assert (after.new_items, after.ignored_items) == ((0, 1) if kind == "lost" else (1, 0))


@pytest.mark.parametrize("kind", ["stall", "drip"])
def test_a_server_that_never_finishes_answering_hits_the_deadline(
    kind: str, devserver: DevServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    client = make_client(devserver.base_url, timeout_seconds=2)
    devserver.inject_faults(kind)

    started = time.monotonic()
    with pytest.raises(TimeoutUploadError, match="timed out after 2 s"):
        client.append(DATASET, [_local("a", path)], asynchronous=False)
    waited_seconds = time.monotonic() - started

    assert 1.9 <= waited_seconds < 2.0 + 2.0
    # The pool is still usable afterwards.
    assert client.append(DATASET, [_local("b", path)], asynchronous=False).new_items == 1


def test_a_slow_link_that_keeps_moving_is_not_timed_out(
    make_client: ClientFactory, tmp_path: Path
) -> None:
    # 1.5 MB over 256 KiB/s takes ~6 s: three times the 2 s timeout, but bytes keep moving.
    path = tmp_path / "big.jpg"
    digest = write_large_jpeg(path, 1_500_000)
    with DevServer(data_dir=tmp_path / "srv", link_rate_bytes_per_second=256 * 1024) as server:
        client = make_client(server.base_url, timeout_seconds=2)
        started = time.monotonic()
        result = client.append(DATASET, [_local("big", path)], asynchronous=False)
        seconds = time.monotonic() - started
        stored = server.items(DATASET)["big"]

    assert result.new_items == 1 and stored.image_sha256 == digest
    assert seconds > 4.0  # it really was paced by the link


def test_waiting_on_our_own_bandwidth_limit_is_not_lack_of_progress(
    devserver: DevServer, make_client: ClientFactory, tmp_path: Path
) -> None:
    # Our own limiter holds 1.2 MB to ~4.5 s; the server is idle all the while, and that is us.
    path = tmp_path / "big.jpg"
    digest = write_large_jpeg(path, 1_200_000)
    client = make_client(devserver.base_url, timeout_seconds=2, bandwidth=TokenBucket(256 * 1024))

    result = client.append(DATASET, [_local("big", path)], asynchronous=False)

    assert result.new_items == 1
    assert devserver.items(DATASET)["big"].image_sha256 == digest


@pytest.fixture
def deaf_server() -> Iterator[str]:
    """Accepts connections and never reads from them: a link that moves nothing."""
    listener = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.05)
        while not stop.is_set():
            try:
                accepted.append(listener.accept()[0])
            except TimeoutError:
                continue

    thread = threading.Thread(target=accept, name="deaf-server")
    thread.start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1/nucleus"
    finally:
        stop.set()
        thread.join()
        for connection in accepted:
            connection.close()
        listener.close()


def test_a_server_that_stops_reading_the_body_is_abandoned_after_the_timeout(
    deaf_server: str, make_client: ClientFactory, tmp_path: Path
) -> None:
    # Far more than the kernel's buffers hold: the body gets stuck part of the way.
    path = tmp_path / "big.jpg"
    write_large_jpeg(path, 40_000_000)
    client = make_client(deaf_server, timeout_seconds=2)

    started = time.monotonic()
    with pytest.raises(TimeoutUploadError, match="timed out after 2 s"):
        client.append(DATASET, [_local("big", path)], asynchronous=False)
    waited_seconds = time.monotonic() - started

    assert 1.9 <= waited_seconds < 2.0 + 2.0


def test_a_body_over_the_servers_limit_is_permanent(
    tmp_path: Path, make_client: ClientFactory
) -> None:
    path = tmp_path / "big.jpg"
    path.write_bytes(jpeg_bytes(400, 300, seed=5))
    with DevServer(data_dir=tmp_path / "srv", max_body_bytes=20_000) as server:
        client = make_client(server.base_url)
        with pytest.raises(PermanentUploadError) as caught:
            client.append(DATASET, [_local("big", path)], asynchronous=False)

    assert caught.value.status_code == 413
    assert not isinstance(caught.value, LocalFileError)


def test_a_refused_item_is_permanent_with_the_servers_reason(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    client.append(DATASET, [_local("a", path, speed=3)], asynchronous=False)

    with pytest.raises(PermanentUploadError) as caught:
        client.append(DATASET, [_local("b", path, speed="fast")], asynchronous=False)

    assert caught.value.status_code == 400
    assert "speed" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_unknown_dataset_is_permanent(tmp_path: Path, make_client: ClientFactory) -> None:
    path = tmp_path / "a.jpg"
    write_jpeg(path)
    with DevServer(data_dir=tmp_path / "srv", datasets=["ds_only"]) as server:
        client = make_client(server.base_url)
        with pytest.raises(PermanentUploadError) as caught:
            client.append("ds_other", [_local("a", path)], asynchronous=False)
        with pytest.raises(PermanentUploadError):
            client.job("job_does_not_exist")

    assert caught.value.status_code == 404


def test_a_vanished_file_is_a_local_file_error_and_nothing_is_sent(
    devserver: DevServer, client: NucleusClient, tmp_path: Path
) -> None:
    kept = tmp_path / "kept.jpg"
    write_jpeg(kept)
    gone = tmp_path / "gone.jpg"

    with pytest.raises(LocalFileError) as caught:
        client.append(DATASET, [_local("k", kept), _local("g", gone)], asynchronous=False)
    with pytest.raises(LocalFileError) as caught_type:
        client.append(DATASET, [_local("t", tmp_path / "notes.txt")], asynchronous=False)

    assert caught.value.path == gone
    assert str(gone) in str(caught.value)
    assert isinstance(caught.value, PermanentUploadError)
    assert caught_type.value.path == tmp_path / "notes.txt"
    assert devserver.append_request_count() == 0


def test_an_unreachable_endpoint_is_retryable(make_client: ClientFactory) -> None:
    with socket.socket() as probe:  # a port that was free a moment ago: nobody listens there
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    client = make_client(f"http://127.0.0.1:{port}/v1/nucleus")

    with pytest.raises(RetryableUploadError, match="Connection refused"):
        client.dataset_info(DATASET)


def test_bad_settings_are_refused_when_the_client_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as caught:
        NucleusClient("https://user:s3cret@api.example.com/v1", API_KEY)
    assert "s3cret" not in str(caught.value)
    with pytest.raises(ConfigError):
        NucleusClient("ftp://api.example.com", API_KEY)
    with pytest.raises(ConfigError):
        NucleusClient("https://api.example.com", "")
    with pytest.raises(ConfigError):
        NucleusClient("https://api.example.com", API_KEY, timeout_seconds=0)
    with pytest.raises(ConfigError, match="ca_bundle"):
        NucleusClient("https://api.example.com", API_KEY, ca_bundle=str(tmp_path / "none.pem"))


# -- answers only a canned server gives ----------------------------------------------------


@dataclass
class CannedAnswer:
    status: int
    body: bytes | str | Any = b"{}"
    headers: dict[str, str] = field(default_factory=dict)

    def payload(self) -> bytes:
        if isinstance(self.body, bytes):
            return self.body
        if isinstance(self.body, str):
            return self.body.encode()
        return json.dumps(self.body).encode()


@dataclass
class ReceivedRequest:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes
    client_port: int


class CannedServer:
    """Answers each request with the next queued answer (200 {} when none is left)."""

    def __init__(self, tls_context: ssl.SSLContext | None = None) -> None:
        self.answers: collections.deque[CannedAnswer] = collections.deque()
        self.received: list[ReceivedRequest] = []
        canned = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            timeout = 10

            def setup(self) -> None:
                super().setup()
                # Headers and body go out in two writes; without this each answer waits ~40 ms
                # for the client's delayed ACK.
                self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

            def do_GET(self) -> None:
                self._answer()

            def do_POST(self) -> None:
                self._answer()

            def log_message(self, format: str, *args: Any) -> None:
                pass

            def _answer(self) -> None:
                length = int(self.headers.get("Content-Length", "0"))
                body = self.rfile.read(length)
                canned.received.append(
                    ReceivedRequest(
                        self.command, self.path, dict(self.headers), body, self.client_address[1]
                    )
                )
                answer = canned.answers.popleft() if canned.answers else CannedAnswer(200)
                payload = answer.payload()
                self.send_response(answer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                for name, value in answer.headers.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(payload)

        self._http = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._http.daemon_threads = False
        self._http.block_on_close = True  # server_close() joins the connection threads
        if tls_context is not None:
            self._http.socket = tls_context.wrap_socket(self._http.socket, server_side=True)
        self._thread = threading.Thread(target=self._http.serve_forever, args=(0.05,))
        scheme = "https" if tls_context is not None else "http"
        self.base_url = f"{scheme}://127.0.0.1:{self._http.server_address[1]}/v1/nucleus"

    def start(self) -> CannedServer:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._http.shutdown()
        self._http.server_close()
        self._thread.join()


@pytest.fixture
def canned() -> Iterator[CannedServer]:
    server = CannedServer().start()
    yield server
    server.stop()


@pytest.fixture
def canned_client(canned: CannedServer) -> Iterator[NucleusClient]:
    # Closed before the server stops (fixture order), so its keep-alive threads can end.
    client = NucleusClient(canned.base_url, API_KEY, timeout_seconds=10)
    yield client
    client.close()


def test_wire_format_auth_and_connection_reuse(
    canned: CannedServer, canned_client: NucleusClient, tmp_path: Path
) -> None:
    jpg = tmp_path / "one.jpg"
    png = tmp_path / "two.png"
    write_jpeg(jpg)
    write_png(png)
    canned.answers.extend(
        [CannedAnswer(200, {"new_items": 2, "updated_items": 0, "ignored_items": 0})] * 2
    )

    canned_client.append(
        "ds_x", [_local("r/1", jpg, n=1), _local("r/2", png, update=True)], asynchronous=False
    )
    canned_client.append(
        "ds_x", [_local("r/1", jpg, n=1), _local("r/2", png, update=True)], asynchronous=False
    )
    canned_client.dataset_info("ds x/y")

    first = canned.received[0]
    assert first.method == "POST" and first.path == "/v1/nucleus/dataset/ds_x/append"
    expected_auth = "Basic " + base64.b64encode(f"{API_KEY}:".encode()).decode()
    assert first.headers["Authorization"] == expected_auth
    assert first.headers["User-Agent"].startswith("nucleus-watcher/")
    assert int(first.headers["Content-Length"]) == len(first.body)
    parts = _multipart_parts(first.headers["Content-Type"], first.body)
    assert [p[0] for p in parts] == [
        'form-data; name="items"',
        'form-data; name="image"; filename="0-one.jpg"',
        'form-data; name="image"; filename="1-two.png"',
    ]
    assert [p[1] for p in parts] == ["application/json", "image/jpeg", "image/png"]
    assert json.loads(parts[0][2]) == [
        {"reference_id": "r/1", "metadata": {"n": 1}, "image_url": "0-one.jpg", "update": False},
        {"reference_id": "r/2", "metadata": {}, "image_url": "1-two.png", "update": True},
    ]
    assert parts[1][2] == jpg.read_bytes() and parts[2][2] == png.read_bytes()
    assert canned.received[2].path == "/v1/nucleus/dataset/ds%20x%2Fy/info"
    # One pooled keep-alive connection carried all three requests.
    assert len({r.client_port for r in canned.received}) == 1


def _multipart_parts(content_type: str, body: bytes) -> list[tuple[str, str, bytes]]:
    """(Content-Disposition, Content-Type, data) of each part, parsed by hand on purpose."""
    boundary = content_type.split("boundary=")[1].encode()
    parts = []
    for chunk in body.split(b"--" + boundary)[1:-1]:
        head, _, data = chunk[2:].partition(b"\r\n\r\n")
        headers = dict(line.split(": ", 1) for line in head.decode().split("\r\n") if ": " in line)
        parts.append((headers["Content-Disposition"], headers["Content-Type"], data[:-2]))
    return parts


def test_job_errors_in_every_shape_find_their_item(
    canned: CannedServer, canned_client: NucleusClient
) -> None:
    canned.answers.append(
        CannedAnswer(
            200,
            [
                json.dumps({"reference_id": "cam/a/1", "error": "bad metadata"}),
                json.dumps({"item": {"reference_id": "cam/a/10"}, "message": "too big"}),
                "Item cam/a/2 could not be fetched",
                "image for 'cam/a/1' is corrupt",
                "the batch took too long",
                {"ref_id": "cam/a/2", "error": {"code": 7}},
            ],
        )
    )

    errors = canned_client.job_errors("job_1", ["cam/a/1", "cam/a/10", "cam/a/2"])

    assert errors == {
        "cam/a/1": "bad metadata; image for 'cam/a/1' is corrupt",
        "cam/a/10": "too big",
        "cam/a/2": 'Item cam/a/2 could not be fetched; {"code": 7}',
        "": "the batch took too long",
    }
    assert canned.received[0].path == "/v1/nucleus/job/job_1/errors"


def test_sync_answer_with_item_errors(canned: CannedServer, canned_client: NucleusClient) -> None:
    canned.answers.append(
        CannedAnswer(
            200,
            {
                "new_items": 1,
                "updated_items": 0,
                "ignored_items": 0,
                "upload_errors": 1,
                "error_items": [{"reference_id": "r2", "error": "unreadable image"}],
            },
        )
    )
    items = [UploadItem(f"r{i}", {}, False, remote_url=f"s3://b/{i}.jpg") for i in (1, 2)]

    result = canned_client.append("ds_x", items, asynchronous=False)

    assert result == AppendResult(1, 0, 0, None, {"r2": "unreadable image"}, result.bytes_sent, 1)
    body = json.loads(canned.received[0].body)
    assert body == {
        "items": [
            {"reference_id": "r1", "metadata": {}, "image_url": "s3://b/1.jpg"},
            {"reference_id": "r2", "metadata": {}, "image_url": "s3://b/2.jpg"},
        ],
        "update": False,
    }
    assert result.bytes_sent == len(canned.received[0].body)


def test_unattributed_upload_errors_are_permanent(
    canned: CannedServer, canned_client: NucleusClient
) -> None:
    canned.answers.append(
        CannedAnswer(
            200, {"new_items": 1, "updated_items": 0, "ignored_items": 0, "upload_errors": 1}
        )
    )
    items = [UploadItem(f"r{i}", {}, False, remote_url=f"s3://b/{i}.jpg") for i in (1, 2)]

    with pytest.raises(PermanentUploadError, match="1 of 2"):
        canned_client.append("ds_x", items, asynchronous=False)


@pytest.mark.parametrize(
    "answer",
    [
        CannedAnswer(200, b"<html>gateway</html>"),
        CannedAnswer(200, {"dataset_id": "ds_x"}),
        CannedAnswer(200, [1, 2]),
    ],
    ids=["not-json", "no-counts", "not-object"],
)
def test_a_2xx_with_an_unexpected_body_is_retryable(
    answer: CannedAnswer, canned: CannedServer, canned_client: NucleusClient
) -> None:
    canned.answers.append(answer)
    item = UploadItem("r", {}, False, remote_url="s3://b/r.jpg")

    with pytest.raises(RetryableUploadError, match="bad answer from server"):
        canned_client.append("ds_x", [item], asynchronous=False)


def test_status_codes_map_to_the_error_tree(
    canned: CannedServer, canned_client: NucleusClient
) -> None:
    later = email.utils.format_datetime(datetime.now(UTC) + timedelta(seconds=30), usegmt=True)
    long_reason = "x" * 5000
    canned.answers.extend(
        [
            CannedAnswer(408, {"error": "slow"}),
            CannedAnswer(503, {"error": "busy"}, {"Retry-After": later}),
            CannedAnswer(404, {"error": "no such dataset ds_x"}),
            CannedAnswer(400, {"error": f"bad key {API_KEY} " + long_reason}),
            CannedAnswer(403, "forbidden\nfor you"),
        ]
    )
    outcomes: list[Exception] = []
    for _ in range(5):
        with pytest.raises((RetryableUploadError, PermanentUploadError)) as caught:
            canned_client.dataset_info("ds_x")
        outcomes.append(caught.value)

    slow, busy, missing, bad, forbidden = outcomes
    assert isinstance(slow, RetryableUploadError) and slow.status_code == 408
    assert isinstance(busy, RetryableUploadError)
    assert busy.retry_after_seconds is not None and 25 <= busy.retry_after_seconds <= 30
    assert isinstance(missing, PermanentUploadError) and "no such dataset ds_x" in str(missing)
    assert isinstance(bad, PermanentUploadError) and API_KEY not in str(bad)
    assert "[redacted]" in str(bad) and len(str(bad)) < 350
    assert isinstance(forbidden, PermanentUploadError)
    assert str(forbidden) == "HTTP 403: forbidden for you"


# -- TLS -----------------------------------------------------------------------------------


@pytest.fixture
def self_signed_cert(tmp_path: Path) -> tuple[Path, Path]:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("the openssl command is needed to make a test certificate")
    cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
def tls_server(self_signed_cert: tuple[Path, Path]) -> Iterator[CannedServer]:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*self_signed_cert)
    server = CannedServer(tls_context=context).start()
    yield server
    server.stop()


def test_tls_is_verified_and_an_extra_ca_makes_it_trusted(
    tls_server: CannedServer, self_signed_cert: tuple[Path, Path], make_client: ClientFactory
) -> None:
    untrusting = make_client(tls_server.base_url)
    with pytest.raises(RetryableUploadError, match="certificate"):
        untrusting.dataset_info("ds_x")
    untrusting.close()

    trusting = make_client(tls_server.base_url, ca_bundle=str(self_signed_cert[0]))
    tls_server.answers.append(CannedAnswer(200, {"dataset_id": "ds_x", "length": 3}))

    assert trusting.dataset_info("ds_x") == {"dataset_id": "ds_x", "length": 3}
    assert len(tls_server.received) == 1  # the untrusted attempt never got to send a request
