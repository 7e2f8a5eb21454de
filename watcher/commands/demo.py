"""`nucleus-watcher demo`: the whole pipeline on a temporary folder, no account, no network.

    this process                                        child process
    ------------                                        -------------
    sample writer --writes--> <tmp>/images/{Sunny,Foggy,Rainy}/ <--watches-- nucleus-watcher run
    DevServer (loopback) <---------------- multipart append ------------------------'
        `-- on_request --> one line per stored item, then a summary

The daemon is the real one, started as `python -m watcher run -c <tmp>/config.toml` in its own
session: it installs signal handlers, which only work in a main thread, and a child can be
stopped with SIGTERM and reaped like systemd would. The devserver runs in this process so that
each upload can be reported the moment it is stored, and compared byte for byte with the sample
it came from. The daemon is told when to start through its systemd notify socket (READY=1 comes
after its start-up scan), so the times shown are from a running daemon, not from its start-up.

Samples are small images shipped in `watcher/samples/`, named `<weather>-<n>.<ext>`; every third
one is written in pieces, slower than `settle.seconds`, to show a half-written file is not sent.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.resources
import json
import math
import os
import queue
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, BinaryIO, Final, TextIO

from watcher.config import load_settings
from watcher.devserver import DevServer, RequestRecord, StoredItem
from watcher.errors import ConfigError

__all__ = ["DEMO_DATASET_ID", "WEATHERS", "Sample", "load_samples", "run_demo"]

# Accepted only by the devserver this demo starts; it is handed to the daemon through its
# environment and never printed.
_DEMO_API_KEY: Final = "demo-key"
DEMO_DATASET_ID: Final = "ds_demo"
WEATHERS: Final = ("Sunny", "Foggy", "Rainy")
_IMAGE_SUFFIXES: Final = (".jpg", ".jpeg", ".png")

_SETTLE_SECONDS: Final = 1.0
_SLOW_CHUNKS: Final = 4
# A slow file is being written for longer than settle.seconds, so it is the image check and
# the events for each piece, not a quiet second, that keep it from being sent half-written.
_SLOW_MIN_SPAN_SECONDS: Final = 1.5
_READY_TIMEOUT_SECONDS: Final = 30.0
_UPLOAD_GRACE_SECONDS: Final = 20.0  # after the last write, how long to wait for the last upload
_DAEMON_STOP_TIMEOUT_SECONDS: Final = 5.0  # the daemon's upload.stop_timeout_seconds
_REAP_TIMEOUT_SECONDS: Final = 15.0  # after SIGTERM, before SIGKILL
_POLL_SECONDS: Final = 0.1

# Variables that would point the child elsewhere: NUCLEUS_ENDPOINT at the real API,
# NUCLEUS_WATCHER_* at other settings, a service manager's notify socket or watchdog.
_DROPPED_PREFIXES: Final = ("NUCLEUS", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")


@dataclass(frozen=True)
class Sample:
    """One shipped sample image and where the demo writes it."""

    name: str  # "sunny-1.jpg"
    weather: str  # "Sunny": its folder, and the metadata the rule gives it
    data: bytes

    @property
    def relpath(self) -> str:
        """Its path under the watched folder, which is also its reference_id."""
        return f"{self.weather}/{self.name}"

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.data).hexdigest()


def load_samples() -> list[Sample]:
    """The images in `watcher/samples/` named `<weather>-<n>.<ext>`, by name."""
    folder = importlib.resources.files("watcher") / "samples"
    samples: list[Sample] = []
    for entry in sorted(folder.iterdir(), key=lambda entry: entry.name):
        name = entry.name
        weather = name.split("-", 1)[0].capitalize()
        if entry.is_file() and name.lower().endswith(_IMAGE_SUFFIXES) and weather in WEATHERS:
            samples.append(Sample(name=name, weather=weather, data=entry.read_bytes()))
    return samples


# --------------------------------------------------------------------------- what happens


@dataclass(frozen=True)
class _Note:
    text: str


@dataclass(frozen=True)
class _Closed:
    relpath: str
    at: float  # time.monotonic()
    pieces: int


@dataclass(frozen=True)
class _WritesDone:
    at: float


@dataclass(frozen=True)
class _Stored:
    item: StoredItem
    at: float


_Event = _Note | _Closed | _WritesDone | _Stored


class _Arrivals:
    """The devserver's on_request callback: turns each accepted append into _Stored events.

    A request record is made after the items are stored, so diffing the dataset then finds
    exactly what the request brought (and an update, by its write count)."""

    def __init__(self, events: queue.Queue[_Event]) -> None:
        self._events = events
        self._lock = threading.Lock()
        self._seen: dict[str, int] = {}
        self._server: DevServer | None = None

    def attach(self, server: DevServer) -> None:
        self._server = server

    def __call__(self, record: RequestRecord) -> None:
        if record.method != "POST" or not 200 <= record.status < 300 or self._server is None:
            return
        at = time.monotonic()
        with self._lock:
            for reference_id, item in sorted(self._server.items(DEMO_DATASET_ID).items()):
                if self._seen.get(reference_id) != item.times_written:
                    self._seen[reference_id] = item.times_written
                    self._events.put(_Stored(item, at))


@dataclass(frozen=True)
class _Write:
    at_seconds: float  # after the writer starts
    sample: Sample
    piece: int
    pieces: int


def _write_plan(samples: Sequence[Sample], seconds: float) -> list[_Write]:
    """Start one file every seconds/len(samples); every third one goes in pieces, slowly."""
    slot = seconds / max(1, len(samples))
    slow_span = max(2 * slot, _SLOW_MIN_SPAN_SECONDS)
    plan: list[_Write] = []
    for index, sample in enumerate(_interleaved(samples)):
        start = index * slot
        if index % 3 == 1:
            step = slow_span / (_SLOW_CHUNKS - 1)
            plan.extend(
                _Write(start + piece * step, sample, piece, _SLOW_CHUNKS)
                for piece in range(_SLOW_CHUNKS)
            )
        else:
            plan.append(_Write(start, sample, 0, 1))
    return sorted(plan, key=lambda write: write.at_seconds)


def _interleaved(samples: Sequence[Sample]) -> list[Sample]:
    """Round-robin over the weathers, rotating, so each weather gets a slow file."""
    by_weather = [[s for s in samples if s.weather == weather] for weather in WEATHERS]
    rounds = max((len(group) for group in by_weather), default=0)
    order: list[Sample] = []
    for round_index in range(rounds):
        for offset in range(len(WEATHERS)):
            group = by_weather[(round_index + offset) % len(WEATHERS)]
            if round_index < len(group):
                order.append(group[round_index])
    return order


class _SampleWriter:
    """A thread that carries out a write plan; `stop()` ends it between writes."""

    def __init__(self, folder: Path, plan: Sequence[_Write], events: queue.Queue[_Event]) -> None:
        self._folder = folder
        self._plan = list(plan)
        self._events = events
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="demo-writer", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _run(self) -> None:
        open_files: dict[str, BinaryIO] = {}
        started = time.monotonic()
        try:
            for write in self._plan:
                delay = started + write.at_seconds - time.monotonic()
                if delay > 0 and self._stopping.wait(delay):
                    return
                if self._stopping.is_set():
                    return
                self._write(write, open_files)
        except OSError as exc:  # the folder was removed or the disk is full: say so and end
            self._events.put(_Note(f"  cannot write the samples: {exc}"))
        finally:
            for handle in open_files.values():
                handle.close()
            self._events.put(_WritesDone(time.monotonic()))

    def _write(self, write: _Write, open_files: dict[str, BinaryIO]) -> None:
        sample = write.sample
        data = sample.data
        if write.piece == 0:
            open_files[sample.relpath] = (self._folder / sample.relpath).open("wb")
            if write.pieces > 1:
                span = self._plan_span(sample)
                self._events.put(
                    _Note(
                        f"  writing {sample.relpath} slowly: {write.pieces} pieces over"
                        f" {span:.1f} s; it is not sent before it is complete"
                    )
                )
        handle = open_files[sample.relpath]
        begin = len(data) * write.piece // write.pieces
        end = len(data) * (write.piece + 1) // write.pieces
        handle.write(data[begin:end])
        handle.flush()
        if write.piece == write.pieces - 1:
            handle.close()
            closed_at = time.monotonic()
            del open_files[sample.relpath]
            self._events.put(_Closed(sample.relpath, closed_at, write.pieces))

    def _plan_span(self, sample: Sample) -> float:
        times = [write.at_seconds for write in self._plan if write.sample == sample]
        return max(times) - min(times)


# --------------------------------------------------------------------------- the daemon


def _config_text(root: Path, images: Path, endpoint: str) -> str:
    def text(value: str) -> str:
        return json.dumps(value)  # a JSON string is a valid TOML basic string

    return f"""\
# Written by `nucleus-watcher demo`; see config.example.toml for every key.
[nucleus]
endpoint = {text(endpoint)}
timeout_seconds = 30

[upload]
retry_initial_seconds = 0.2
retry_max_seconds = 2
stop_timeout_seconds = {_DAEMON_STOP_TIMEOUT_SECONDS}

[settle]
seconds = {_SETTLE_SECONDS}
max_wait_seconds = 60

[state]
path = {text(str(root / "state" / "state.db"))}

[log]
level = "warning"

[metrics]
listen = ""

[[watch]]
path = {text(str(images))}
dataset_id = {text(DEMO_DATASET_ID)}
reference_id = "{{relpath}}"

  [[watch.rules]]
  match = "{{weather}}/**"
  metadata = {{ weather = "{{weather}}" }}
"""


def _child_environment(notify_socket: str) -> dict[str, str]:
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(_DROPPED_PREFIXES)
    }
    env["NUCLEUS_API_KEY"] = _DEMO_API_KEY
    env["NOTIFY_SOCKET"] = notify_socket
    # Loopback must not go through a proxy that HTTP_PROXY may name.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1", "localhost"]))
    return env


@contextlib.contextmanager
def _notify_socket(root: Path) -> Iterator[tuple[socket.socket, str]]:
    """A datagram socket for the daemon's READY=1, and the NOTIFY_SOCKET value naming it."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        if sys.platform == "linux":
            # Abstract namespace: no path-length limit, nothing left on disk.
            name = f"nucleus-watcher-demo-{uuid.uuid4().hex}"
            sock.bind(b"\0" + name.encode())
            address = f"@{name}"
        else:
            address = str(root / "notify.sock")
            sock.bind(address)
        sock.settimeout(_POLL_SECONDS)
        yield sock, address
    finally:
        sock.close()


def _wait_ready(process: subprocess.Popen[bytes], sock: socket.socket) -> bool:
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            message = sock.recv(4096).decode("utf-8", "replace")
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return True
    return False


def _stop_daemon(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the daemon finishes what is in flight), SIGKILL if it takes too long; reaped."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(_REAP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


_Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None


class _Signals:
    """While the demo runs, SIGTERM and SIGHUP end it like Ctrl-C, so it still cleans up.

    During clean-up a further signal kills the daemon instead of waiting for its orderly stop,
    and clean-up goes on. Signal handlers can only be set from the main thread; elsewhere this
    does nothing."""

    _SIGNALS: Final = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)

    def __init__(self) -> None:
        self._previous: dict[int, _Handler] = {}
        self._process: subprocess.Popen[bytes] | None = None
        self._enabled = threading.current_thread() is threading.main_thread()

    def __enter__(self) -> _Signals:
        if self._enabled:
            for signum in self._SIGNALS:
                # An ignored signal stays ignored: `nohup nucleus-watcher demo --keep` is meant.
                if signal.getsignal(signum) != signal.SIG_IGN:
                    self._previous[signum] = signal.signal(signum, self._interrupt)
        return self

    def __exit__(self, *_exc: object) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)

    def cleaning_up(self, process: subprocess.Popen[bytes] | None) -> None:
        self._process = process
        for signum in self._previous:
            signal.signal(signum, self._hurry)

    def _interrupt(self, _signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt

    def _hurry(self, _signum: int, _frame: FrameType | None) -> None:
        if self._process is not None and self._process.poll() is None:
            self._process.kill()


# --------------------------------------------------------------------------- the demo


def _size_text(size_bytes: int | None) -> str:
    if size_bytes is None:
        return "?"
    return f"{size_bytes} B" if size_bytes < 1024 else f"{size_bytes / 1024:.1f} KiB"


class _Reporter:
    """Prints the events as they come, and remembers what is needed for the summary."""

    def __init__(self, out: TextIO, expected: Sequence[Sample]) -> None:
        self._out = out
        self._expected = {sample.relpath for sample in expected}
        self._width = max((len(relpath) for relpath in self._expected), default=0)
        self._closed: dict[str, _Closed] = {}
        self.stored: dict[str, StoredItem] = {}
        self.writes_done_at: float | None = None

    def line(self, text: str = "") -> None:
        print(text, file=self._out, flush=True)

    @property
    def all_stored(self) -> bool:
        return self._expected <= self.stored.keys()

    def handle(self, event: _Event) -> None:
        if isinstance(event, _Note):
            self.line(event.text)
        elif isinstance(event, _Closed):
            self._closed[event.relpath] = event
        elif isinstance(event, _WritesDone):
            self.writes_done_at = event.at
        else:
            self._stored(event)

    def _stored(self, event: _Stored) -> None:
        item = event.item
        self.stored[item.reference_id] = item
        verb = "stored " if item.times_written == 1 else "updated"
        metadata = json.dumps(item.metadata, sort_keys=True, ensure_ascii=False)
        closed = self._closed.pop(item.reference_id, None)
        timing = ""
        if closed is not None:
            timing = f"  {(event.at - closed.at) * 1000:4.0f} ms after close"
            if closed.pieces > 1:
                timing += f" (written in {closed.pieces} pieces)"
        self.line(
            f"  {verb} {item.reference_id:<{self._width}}  {metadata:<21}"
            f"  {_size_text(item.image_size_bytes):>8}{timing}"
        )


def _byte_identical(server: DevServer, samples: Sequence[Sample]) -> bool:
    """Every sample is in the dataset, and the devserver's stored copy hashes like the original."""
    items = server.items(DEMO_DATASET_ID)
    for sample in samples:
        item = items.get(sample.relpath)
        if item is None or item.image_sha256 is None:
            return False
        try:
            stored = server.image_bytes(item.image_sha256)
        except (KeyError, OSError):
            return False
        if hashlib.sha256(stored).hexdigest() != sample.sha256:
            return False
    return True


def _follow(
    events: queue.Queue[_Event],
    reporter: _Reporter,
    process: subprocess.Popen[bytes],
    *,
    forever: bool = False,
) -> None:
    """Report events until every sample is written and stored (or, `forever`, until Ctrl-C),
    the daemon exits, or the last write is long past."""
    while process.poll() is None:
        try:
            reporter.handle(events.get(timeout=_POLL_SECONDS))
            continue
        except queue.Empty:
            pass
        if forever:
            continue
        if reporter.all_stored and reporter.writes_done_at is not None:
            return
        done_at = reporter.writes_done_at
        if done_at is not None and time.monotonic() > done_at + _UPLOAD_GRACE_SECONDS:
            return


def run_demo(
    *,
    keep: bool,
    seconds: float,
    out: TextIO = sys.stdout,
    link_rate_bytes_per_second: int | None = None,
) -> int:
    """Run the demo; 0 when every sample arrived byte-identical, 1 otherwise, 130 on Ctrl-C.

    `seconds`: about how long writing the samples takes. With `keep`, after the summary the
    daemon and devserver keep running (and uploads keep being reported) until Ctrl-C, and the
    temporary folder is left in place. `link_rate_bytes_per_second`: the devserver reads
    uploads no faster, like a thin uplink.
    """
    if not (math.isfinite(seconds) and seconds >= 0):
        raise ConfigError(f"demo: --seconds must be a number, 0 or more (got {seconds:g})")
    samples = load_samples()
    if not samples:
        raise ConfigError("demo: no sample images in the installed package (watcher/samples)")
    demo = _Demo(samples, keep=keep, seconds=seconds, out=out)
    demo.link_rate_bytes_per_second = link_rate_bytes_per_second
    with _Signals() as signals:
        try:
            return demo.run()
        except KeyboardInterrupt:
            return demo.interrupted()
        finally:
            signals.cleaning_up(demo.process)
            demo.clean_up()


class _Demo:
    def __init__(
        self, samples: Sequence[Sample], *, keep: bool, seconds: float, out: TextIO
    ) -> None:
        self._samples = list(samples)
        self._keep = keep
        self._seconds = seconds
        self._began = time.monotonic()
        self._events: queue.Queue[_Event] = queue.Queue()
        self._reporter = _Reporter(out, samples)
        self._root: Path | None = None
        self._server: DevServer | None = None
        self._writer: _SampleWriter | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._kept = False  # the summary is out and the demo is waiting for Ctrl-C
        self._code = 1
        self.link_rate_bytes_per_second: int | None = None

    def run(self) -> int:
        line = self._reporter.line
        self._root = root = Path(tempfile.mkdtemp(prefix="nucleus-watcher-demo-"))
        images = root / "images"
        for weather in WEATHERS:
            (images / weather).mkdir(parents=True)
        arrivals = _Arrivals(self._events)
        self._server = server = DevServer(
            data_dir=root / "devserver",
            api_key=_DEMO_API_KEY,
            datasets=[DEMO_DATASET_ID],
            on_request=arrivals,
            link_rate_bytes_per_second=self.link_rate_bytes_per_second,
        )
        server.start()
        arrivals.attach(server)
        config = root / "config.toml"
        config.write_text(_config_text(root, images, server.base_url))
        with _notify_socket(root) as (sock, notify_address):
            env = _child_environment(notify_address)
            load_settings(config, environ=env)  # a mistake in it is ours: say so plainly
            self.process = process = subprocess.Popen(
                [sys.executable, "-m", "watcher", "run", "-c", str(config)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,  # it logs to stderr, which it shares with us
                env=env,
                start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
            )
            _print_intro(self._reporter, images, server, process.pid, config)
            if self.link_rate_bytes_per_second:
                self._reporter.line(
                    f"  link       the devserver reads uploads at"
                    f" {self.link_rate_bytes_per_second} bytes/s"
                )
            if not _wait_ready(process, sock):
                line(_daemon_failed(process, "before it was ready"))
                return 1

        line(
            f"writing {len(self._samples)} sample images over about {self._seconds:g} s;"
            " one line per upload, as the devserver stores it:"
        )
        self._writer = _SampleWriter(
            images, _write_plan(self._samples, self._seconds), self._events
        )
        self._writer.start()
        _follow(self._events, self._reporter, process)
        if process.poll() is not None:
            line(_daemon_failed(process, "during the demo"))
            return 1
        identical = self._reporter.all_stored and _byte_identical(server, self._samples)
        arrived = len(self._reporter.stored.keys() & {sample.relpath for sample in self._samples})
        line(
            f"summary: {arrived} of {len(self._samples)} files uploaded;"
            f" all byte-identical (sha256 of the devserver's copy): {_yes(identical)};"
            f" {time.monotonic() - self._began:.1f} s in total"
        )
        missing = sorted(
            {sample.relpath for sample in self._samples} - self._reporter.stored.keys()
        )
        if missing:
            line(f"not uploaded: {', '.join(missing)} (the daemon's warnings, if any, are above)")
        self._code = 0 if identical else 1
        if not self._keep:
            return self._code
        self._kept = True
        _print_keep(self._reporter, images, server, root)
        _follow(self._events, self._reporter, process, forever=True)
        line(_daemon_failed(process, "while kept running"))
        return 1

    def interrupted(self) -> int:
        if self._kept:
            return self._code
        self._reporter.line("interrupted; cleaning up")
        return 130

    def clean_up(self) -> None:
        """Stop the writer, the daemon (reaped) and the devserver; remove the folder unless kept."""
        if self._writer is not None:
            self._writer.stop()
        if self.process is not None:
            _stop_daemon(self.process)
        if self._server is not None:
            self._server.stop()
        if self._root is None:
            return
        if self._kept:
            self._reporter.line(f"stopped; the demo folder is kept: {self._root}")
        else:
            shutil.rmtree(self._root, ignore_errors=True)


def _yes(value: bool) -> str:
    return "yes" if value else "no"


def _daemon_failed(process: subprocess.Popen[bytes], when: str) -> str:
    code = process.poll()
    if code is None:
        return f"the daemon did not get ready in {_READY_TIMEOUT_SECONDS:g} s (its log is above)"
    return f"the daemon exited with code {code} {when} (its log is above)"


def _print_intro(
    reporter: _Reporter, images: Path, server: DevServer, pid: int, config: Path
) -> None:
    folders = " ".join(f"{weather}/" for weather in WEATHERS)
    reporter.line(
        "nucleus-watcher demo: the real daemon on a temporary folder, uploading to a local"
        " stand-in for Nucleus (no account, no network)"
    )
    reporter.line(f"  folder     {images}  ({folders})")
    reporter.line(f"  devserver  {server.base_url}  dataset {DEMO_DATASET_ID}")
    reporter.line('  rule       {weather}/**  ->  {"weather": "{weather}"}')
    reporter.line(f"  daemon     pid {pid}: nucleus-watcher run -c {config}")


def _print_keep(reporter: _Reporter, images: Path, server: DevServer, root: Path) -> None:
    reporter.line()
    reporter.line("still running (--keep); press Ctrl-C to stop.")
    reporter.line(f"  folder     {images}")
    reporter.line(f"  devserver  {server.base_url}")
    reporter.line(f"  stored in  {server.data_dir}")
    reporter.line(f"  try        cp photo.jpg {images / 'Sunny'}/")
    reporter.line(
        "             any .jpg/.jpeg/.png in a subfolder is uploaded and shown here;"
        " a new subfolder's name becomes a new weather"
    )
    reporter.line(f"  the demo folder {root} is kept when you stop")
