"""DevServer: start and stop, what it holds, trouble on demand; and running one from the
command line.
"""

from __future__ import annotations

import signal
import sys
import tempfile
import threading
import types
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Final

from watcher.devserver.catalog import StoredItem, _Catalog
from watcher.devserver.context import _ServerContext
from watcher.devserver.faults import _FaultPlan
from watcher.devserver.http_server import _HttpServer
from watcher.devserver.jobs import _JobBook
from watcher.devserver.request_log import RequestRecord, _RequestLog
from watcher.devserver.routes import API_PREFIX
from watcher.errors import ConfigError
from watcher.nucleus import TokenBucket

DEFAULT_MAX_BODY_BYTES: Final = (1 << 30) + (16 << 20)  # 1 GiB of images + room for the form
_JOIN_TIMEOUT_SECONDS: Final = 5.0
_POLL_INTERVAL_SECONDS: Final = 0.05
_LINK_MIN_BURST_BYTES: Final = 8 * 1024  # how quickly stop() is noticed by the accept loop


# --------------------------------------------------------------------------- the server


class DevServer:
    """A local Nucleus-compatible endpoint. Use as a context manager or start()/stop().

    Besides the documented interface: `max_body_bytes` (answer 413 above it),
    `drip_byte_interval_seconds` (pace of the "drip" fault), `on_request` (called with each
    RequestRecord, from the connection's thread) and `link_rate_bytes_per_second` (read request
    bodies no faster than this, all connections together, like one thin uplink).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        data_dir: Path | None = None,
        api_key: str | None = None,
        job_delay_seconds: float = 0.0,
        datasets: Sequence[str] | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
        drip_byte_interval_seconds: float = 1.0,
        on_request: Callable[[RequestRecord], None] | None = None,
        link_rate_bytes_per_second: int | None = None,
    ) -> None:
        if job_delay_seconds < 0:
            raise ValueError("job_delay_seconds must not be negative")
        if max_body_bytes < 1:
            raise ValueError("max_body_bytes must be positive")
        if drip_byte_interval_seconds < 0:
            raise ValueError("drip_byte_interval_seconds must not be negative")
        if api_key is not None and not api_key:
            raise ValueError("api_key must be None (accept any key) or a non-empty string")
        if link_rate_bytes_per_second is not None and link_rate_bytes_per_second < 1:
            raise ValueError("link_rate_bytes_per_second must be positive (None: no limit)")
        self.host = host
        self._requested_port = port
        self._given_data_dir = data_dir
        self._allowed_datasets = list(datasets) if datasets is not None else None
        self._api_key = api_key
        self._max_body_bytes = max_body_bytes
        self._drip_byte_interval_seconds = drip_byte_interval_seconds
        self._link: TokenBucket | None = None
        if link_rate_bytes_per_second:
            # A link has no 64 KiB of credit to spend at once: an eighth of a second at most.
            burst_bytes = max(_LINK_MIN_BURST_BYTES, link_rate_bytes_per_second // 8)
            self._link = TokenBucket(link_rate_bytes_per_second, burst_bytes)
        self._jobs = _JobBook(job_delay_seconds)
        self._faults = _FaultPlan()
        self._log = _RequestLog(on_request)
        self._stopping = threading.Event()
        self._down = False
        self._temp_dir: tempfile.TemporaryDirectory[str] | None = None
        self._context: _ServerContext | None = None
        self._data_dir: Path | None = None
        self._http: _HttpServer | None = None
        self._serve_thread: threading.Thread | None = None
        self._state = "new"

    # -- lifecycle

    def start(self) -> DevServer:
        """Load what the data folder holds, bind, and serve in a background thread."""
        if self._state != "new":
            raise RuntimeError("a DevServer can be started once")
        if self._given_data_dir is None:
            self._temp_dir = tempfile.TemporaryDirectory(prefix="nucleus-devserver-")
            self._data_dir = Path(self._temp_dir.name)
        else:
            self._data_dir = self._given_data_dir
        catalog = _Catalog(self._data_dir, self._allowed_datasets)
        self._context = _ServerContext(
            catalog=catalog,
            jobs=self._jobs,
            faults=self._faults,
            log=self._log,
            stopping=self._stopping,
            api_key=self._api_key,
            max_body_bytes=self._max_body_bytes,
            drip_byte_interval_seconds=self._drip_byte_interval_seconds,
            link=self._link,
            down=self._down,
        )
        try:
            catalog.load()
            self._http = _HttpServer((self.host, self._requested_port), self._context)
        except BaseException:
            self._cleanup_temp_dir()
            raise
        self._serve_thread = threading.Thread(
            target=self._http.serve_forever,
            kwargs={"poll_interval": _POLL_INTERVAL_SECONDS},
            name="devserver-accept",
            daemon=True,
        )
        self._serve_thread.start()
        self._state = "running"
        return self

    def stop(self) -> None:
        """Stop accepting, end every connection, join every thread, close files. Idempotent."""
        if self._state != "running":
            self._state = "stopped"
            return
        self._state = "stopped"
        self._stopping.set()
        assert self._http is not None and self._serve_thread is not None
        assert self._context is not None
        self._http.shutdown()
        self._http.server_close()
        self._http.end_connections(_JOIN_TIMEOUT_SECONDS)
        self._serve_thread.join(_JOIN_TIMEOUT_SECONDS)
        self._context.catalog.close()
        self._cleanup_temp_dir()

    def _cleanup_temp_dir(self) -> None:
        if self._temp_dir is not None:
            self._temp_dir.cleanup()
            self._temp_dir = None

    def __enter__(self) -> DevServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: types.TracebackType | None,
    ) -> None:
        self.stop()

    # -- where it is

    @property
    def port(self) -> int:
        if self._http is None:
            raise RuntimeError("the devserver is not started")
        return int(self._http.server_address[1])

    @property
    def base_url(self) -> str:
        """`http://127.0.0.1:<port>/v1/nucleus`."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}{API_PREFIX}"

    @property
    def data_dir(self) -> Path:
        if self._data_dir is None:
            raise RuntimeError("the devserver is not started")
        return self._data_dir

    # -- what it holds

    def _catalog(self) -> _Catalog:
        if self._context is None:
            raise RuntimeError("the devserver is not started")
        return self._context.catalog

    def items(self, dataset_id: str) -> dict[str, StoredItem]:
        """reference_id -> item, a snapshot; empty for a dataset that holds nothing."""
        return self._catalog().items(dataset_id)

    def image_path(self, sha256: str) -> Path:
        """Where the image with this sha256 is stored; KeyError if none."""
        return self._catalog().image_path(sha256)

    def image_bytes(self, sha256: str) -> bytes:
        return self.image_path(sha256).read_bytes()

    def requests(self) -> list[RequestRecord]:
        """Every request so far, in arrival order; a record is made before its answer is sent."""
        return self._log.snapshot()

    def append_request_count(self) -> int:
        """POST .../append requests received, whatever became of them."""
        return self._log.append_count()

    # -- trouble on demand

    def inject_faults(self, *kinds: str, retry_after_seconds: float = 1.0) -> None:
        """The next len(kinds) append requests each get one fault, in order.

        Requests refused before they count (401, 404, set_down) do not use up a fault.
        """
        self._faults.enqueue(kinds, retry_after_seconds)

    def set_fault_rate(
        self,
        rate: float,
        kinds: Sequence[str],
        seed: int = 0,
        retry_after_seconds: float = 1.0,
    ) -> None:
        """Each append request gets a random fault with probability `rate` (0 turns it off).

        Queued faults from inject_faults() go first.
        """
        self._faults.set_rate(rate, kinds, seed, retry_after_seconds)

    def set_down(self, down: bool) -> None:
        """True: every request is answered 503 (recorded with fault "down")."""
        self._down = down
        if self._context is not None:
            self._context.down = down


# --------------------------------------------------------------------------- command line


def _log_request_line(record: RequestRecord) -> None:
    query = f"?{record.query}" if record.query else ""
    status = str(record.status) if record.status else "no-answer"
    fault = f" fault={record.fault}" if record.fault else ""
    print(
        f"{datetime.now(UTC).strftime('%H:%M:%S')} {record.method} {record.path}{query} "
        f"{status} items={record.item_count}{fault}",
        file=sys.stderr,
        flush=True,
    )


def serve_forever_cli(
    host: str,
    port: int,
    data_dir: Path | None,
    api_key: str | None,
    job_delay_seconds: float,
    datasets: list[str],
    link_rate_bytes_per_second: int | None = None,
) -> int:
    """Run a devserver until SIGINT/SIGTERM; the base URL is the first line on stdout."""
    server = DevServer(
        host,
        port,
        data_dir=data_dir,
        api_key=api_key or None,
        job_delay_seconds=job_delay_seconds,
        datasets=datasets or None,
        on_request=_log_request_line,
        link_rate_bytes_per_second=link_rate_bytes_per_second,
    )
    try:
        server.start()
    except OSError as exc:
        raise ConfigError(f"devserver: cannot listen on {host}:{port}: {exc.strerror}") from None
    stop_requested = threading.Event()
    previous_handlers = {
        signum: signal.signal(signum, lambda _signum, _frame: stop_requested.set())
        for signum in (signal.SIGINT, signal.SIGTERM)
    }
    try:
        print(server.base_url, flush=True)
        data_note = data_dir if data_dir is not None else "a temporary folder (removed on exit)"
        print(f"devserver: storing uploads in {data_note}", file=sys.stderr, flush=True)
        if link_rate_bytes_per_second:
            print(
                f"devserver: reading request bodies at {link_rate_bytes_per_second} bytes/s"
                " (one link shared by all connections)",
                file=sys.stderr,
                flush=True,
            )
        while not stop_requested.wait(1.0):
            pass
    finally:
        for signum, handler in previous_handlers.items():
            signal.signal(signum, handler)
        server.stop()
    return 0
