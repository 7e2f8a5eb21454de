"""Helpers for the reliability suites (test_faults.py, test_bad_input.py): what the dataset must
hold, what the store says (through the real `status`/`explain` commands), how many sends were
repeats, a process's CPU time, where a secret could leak, and who opened a file."""

from __future__ import annotations

import base64
import collections
import errno
import json
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog.events import FileOpenedEvent, FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer

from tests.configfactory import run_watcher
from tests.daemonprocess import DaemonProcess, wait_until
from tests.imagefactory import jpeg_bytes
from watcher.devserver import DevServer, RequestRecord

# -- files and what the dataset holds -------------------------------------------------------


def write_images(root: Path, relpaths: Iterable[str], first_seed: int) -> dict[str, Path]:
    """One distinct JPEG per relpath (seeded, so every file has its own bytes); relpath -> path."""
    files: dict[str, Path] = {}
    for offset, relpath in enumerate(relpaths):
        path = root / relpath
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(jpeg_bytes(seed=first_seed + offset))
        files[relpath] = path
    return files


def undelivered(devserver: DevServer, dataset: str, files: Mapping[str, Path]) -> list[str]:
    """reference_ids that the dataset lacks or holds with other bytes than the file's."""
    items = devserver.items(dataset)
    missing = []
    for reference_id, path in files.items():
        item = items.get(reference_id)
        if item is None or item.image_sha256 is None:
            missing.append(reference_id)
            continue
        try:
            if devserver.image_bytes(item.image_sha256) != path.read_bytes():
                missing.append(reference_id)
        except (KeyError, OSError):
            missing.append(reference_id)
    return missing


def wait_delivered(
    devserver: DevServer, dataset: str, files: Mapping[str, Path], timeout_seconds: float
) -> float:
    """Until every file is in the dataset under its reference_id, byte for byte; the seconds
    it took."""
    started = time.monotonic()
    left: list[str] = list(files)

    def done() -> bool:
        nonlocal left
        left = undelivered(devserver, dataset, {ref: files[ref] for ref in left})
        return not left

    assert wait_until(done, timeout_seconds, 0.1), (
        f"{len(left)} of {len(files)} not delivered after {timeout_seconds} s: {left[:10]}"
    )
    return time.monotonic() - started


def assert_one_item_each(devserver: DevServer, dataset: str, files: Mapping[str, Path]) -> None:
    """The dataset holds exactly these reference_ids, each written once, byte-identical."""
    items = devserver.items(dataset)
    assert set(items) == set(files), {
        "extra": sorted(set(items) - set(files))[:10],
        "missing": sorted(set(files) - set(items))[:10],
    }
    rewritten = {ref: item.times_written for ref, item in items.items() if item.times_written != 1}
    assert not rewritten, f"items written more than once (re-sent as updates): {rewritten}"
    wrong = undelivered(devserver, dataset, files)
    assert not wrong, f"stored bytes differ from the file: {wrong[:10]}"


# -- the command line, every output kept ----------------------------------------------------


class Commands:
    """Runs `python -m watcher ...` and keeps every output, for the secret audit."""

    def __init__(self) -> None:
        self.outputs: list[str] = []

    def run(
        self, *args: str, env: Mapping[str, str] | None = None, timeout_seconds: float = 120
    ) -> subprocess.CompletedProcess[str]:
        result = run_watcher(*args, env=env, timeout_seconds=timeout_seconds)
        self.outputs.append(f"$ {' '.join(args)}\n{result.stdout}\n{result.stderr}")
        return result

    def status(self, config: Path) -> dict[str, Any]:
        result = self.run("status", "-c", str(config), "--json")
        assert result.returncode == 0, result.stderr
        status: dict[str, Any] = json.loads(result.stdout)
        return status

    def explain(self, config: Path, path: Path) -> str:
        return self.run("explain", "-c", str(config), str(path)).stdout

    def wait_totals(
        self,
        config: Path,
        predicate: Callable[[dict[str, int]], bool],
        timeout_seconds: float,
    ) -> dict[str, int]:
        """Poll `status --json` until its totals satisfy `predicate`; return the last totals."""
        totals: dict[str, int] = {}

        def check() -> bool:
            nonlocal totals
            totals = self.status(config)["totals"]
            return predicate(totals)

        assert wait_until(check, timeout_seconds, 0.3), f"status totals: {totals}"
        return totals

    def wait_drained(self, config: Path, uploaded: int, timeout_seconds: float) -> dict[str, int]:
        """Until the store says `uploaded` files are confirmed and nothing waits or is parked."""
        return self.wait_totals(
            config,
            lambda t: t["uploaded"] == uploaded and t["pending"] == 0 and t["in_flight"] == 0,
            timeout_seconds,
        )

    def wait_state(
        self, config: Path, path: Path, state: str, timeout_seconds: float = 15
    ) -> dict[str, str]:
        """Until `explain PATH` reports `state`; the explain fields."""
        fields: dict[str, str] = {}

        def check() -> bool:
            nonlocal fields
            fields = explain_fields(self.explain(config, path))
            return fields.get("state", "").split(" ")[0] == state

        assert wait_until(check, timeout_seconds, 0.2), f"{path}: wanted {state}, got {fields}"
        return fields


def explain_fields(text: str) -> dict[str, str]:
    """`explain` output as {"state": "failed (attempts 1)", "last error": "...", ...}."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep and key in {
            "watch",
            "relpath",
            "dataset_id",
            "reference_id",
            "metadata",
            "state",
            "last error",
            "rules",
            "included",
        }:
            fields[key] = value.strip()
    return fields


# -- daemon logs ------------------------------------------------------------------------------


def log_events(text: str) -> list[dict[str, Any]]:
    """The JSON events of a daemon log (lines that are not JSON are skipped)."""
    events = []
    for line in text.splitlines():
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def events_named(texts: Iterable[str], name: str) -> list[dict[str, Any]]:
    return [event for text in texts for event in log_events(text) if event.get("event") == name]


def wait_log_event(
    daemon: DaemonProcess,
    predicate: Callable[[dict[str, Any]], bool],
    timeout_seconds: float = 15,
) -> dict[str, Any]:
    """Until the daemon's log holds an event matching `predicate`; that event."""
    found: list[dict[str, Any]] = []

    def check() -> bool:
        found[:] = [event for event in log_events(daemon.log_text()) if predicate(event)]
        return bool(found)

    assert wait_until(check, timeout_seconds, 0.05), daemon.log_text()[-4000:]
    return found[0]


class DaemonPool:
    """Every daemon a test starts; `kill_all` at teardown kills and reaps what still runs.

    It also reads their notify sockets every 0.2 s. DaemonProcess reads only when asked, and a
    Unix datagram queue holds 10 messages (net.unix.max_dgram_qlen): the daemon sends STATUS
    every second, so after ~10 s unread its sendto() blocks and its control loop (signals
    included) stops, which would fail a long test for a reason of the harness, not the daemon.
    """

    def __init__(self) -> None:
        self.started: list[DaemonProcess] = []
        self._stop_draining = threading.Event()
        self._drainer: threading.Thread | None = None

    def start(
        self, config: Path, workdir: Path, *, wait_ready: bool = True, drop_dac: bool = False
    ) -> DaemonProcess:
        workdir.mkdir(parents=True, exist_ok=True)
        daemon = DacDroppedDaemon(config, workdir) if drop_dac else DaemonProcess(config, workdir)
        self.started.append(daemon)
        if self._drainer is None:
            self._drainer = threading.Thread(target=self._drain, name="notify-drain", daemon=True)
            self._drainer.start()
        return daemon.start(wait_ready=wait_ready)

    def _drain(self) -> None:
        while not self._stop_draining.wait(0.2):
            for daemon in list(self.started):
                # Only a socket that start() has finished setting up (it gets a timeout last):
                # a recv on one without a timeout could block for good.
                sock = getattr(daemon, "_socket", None)
                if sock is None or sock.gettimeout() is None:
                    continue
                # The socket may be closed under us by kill()/stop(); the next round retries.
                with suppress(OSError):
                    daemon.read_notifications()

    def kill_all(self) -> None:
        for daemon in self.started:
            if daemon.process is not None:
                daemon.kill()
        self._stop_draining.set()
        if self._drainer is not None:
            self._drainer.join(5)

    def log_texts(self) -> list[str]:
        texts = []
        for daemon in self.started:
            texts.extend(p.read_text(errors="replace") for p in daemon.workdir.glob("daemon-*.log"))
        return texts


# Without these two capabilities root obeys file modes like anyone else (capabilities(7)).
_DROP_DAC = "-dac_override,-dac_read_search"


class DacDroppedDaemon(DaemonProcess):
    """The daemon run through `setpriv` without CAP_DAC_OVERRIDE and CAP_DAC_READ_SEARCH, so that
    a chmod 000 file is unreadable to it even when the tests run as root. Same protocol as
    DaemonProcess (notify socket, log file); only the command differs."""

    def command(self) -> list[str]:
        return [
            "setpriv",
            f"--inh-caps={_DROP_DAC}",
            f"--bounding-set={_DROP_DAC}",
            "--",
            *super().command(),
        ]


# -- what the devserver saw -----------------------------------------------------------------


def is_append(method: str, path: str) -> bool:
    return method == "POST" and path.endswith("/append")


@dataclass
class SendTally:
    """Repeats, counted two ways.

    Server side: every append request whose items reached the catalog (answered 200, or stored
    and then "lost") carried `item_sends` items; the dataset holds `items` distinct ones; the
    difference is how many item sends were repeats of an already-stored reference_id (ignored
    because update=false, or re-written as an update). A repeat is only legitimate after an
    answer that never arrived: `lost_item_sends` (or a process killed before it heard).

    Daemon side: `answered_repeat_requests` requests got an answer saying some items were
    already there (`server_kept_existing`), holding `answered_repeat_items` items.
    """

    append_requests: int = 0
    faults: collections.Counter[str] = field(default_factory=collections.Counter)
    item_sends: int = 0
    lost_item_sends: int = 0
    items: int = 0
    rewrites: int = 0
    answered_repeat_requests: int = 0
    answered_repeat_items: int = 0

    @property
    def duplicate_item_sends(self) -> int:
        return self.item_sends - self.items

    def describe(self) -> str:
        return (
            f"{self.append_requests} append requests, faults {dict(sorted(self.faults.items()))},"
            f" {self.item_sends} item sends reached the dataset for {self.items} items:"
            f" {self.duplicate_item_sends} duplicate item sends"
            f" ({self.lost_item_sends} items were in requests whose answer was lost,"
            f" {self.rewrites} re-written as updates); daemon heard"
            f" {self.answered_repeat_requests} answers with already-stored reference_ids"
            f" ({self.answered_repeat_items} items)"
        )


def tally_sends(devserver: DevServer, dataset: str, daemon_logs: Iterable[str]) -> SendTally:
    tally = SendTally()
    for record in devserver.requests():
        if not is_append(record.method, record.path) or f"/dataset/{dataset}/" not in record.path:
            continue
        tally.append_requests += 1
        if record.fault:
            tally.faults[record.fault] += 1
        if record.status == 200 or record.fault == "lost":
            tally.item_sends += record.item_count
        if record.fault == "lost":
            tally.lost_item_sends += record.item_count
    items = devserver.items(dataset)
    tally.items = len(items)
    tally.rewrites = sum(item.times_written - 1 for item in items.values())
    kept = events_named(daemon_logs, "server_kept_existing")
    tally.answered_repeat_requests = len(kept)
    tally.answered_repeat_items = sum(int(e.get("ignored_items", 0)) for e in kept)
    return tally


# -- processes ------------------------------------------------------------------------------


class RequestKiller:
    """SIGKILLs a process from the devserver's request thread as the n-th append request is
    recorded: the server has acted on the request, the client has not heard the answer."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid: int | None = None
        self._left = 0

    def arm(self, pid: int, nth: int) -> None:
        with self._lock:
            self._pid, self._left = pid, nth

    def disarm(self) -> None:
        with self._lock:
            self._pid = None

    def on_request(self, record: RequestRecord) -> None:
        if not is_append(record.method, record.path):
            return
        with self._lock:
            if self._pid is None:
                return
            self._left -= 1
            if self._left > 0:
                return
            pid, self._pid = self._pid, None
        sigkill(pid)


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process from /proc/<pid>/stat, in seconds."""
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def sigkill(pid: int) -> None:
    with suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


# -- secrets ----------------------------------------------------------------------------------


def secret_forms(key: str) -> list[str]:
    """The key and its HTTP Basic forms: base64(key + ":") with and without '=' padding."""
    basic = base64.b64encode(f"{key}:".encode()).decode()
    return sorted({key, basic, basic.rstrip("=")})


def leaks(data: str | bytes, keys: Iterable[str]) -> list[str]:
    """Which secret forms of `keys` occur in `data`."""
    text = data.decode("latin-1") if isinstance(data, bytes) else data
    return [form for key in keys for form in secret_forms(key) if form in text]


@dataclass
class SecretAudit:
    """Every text a test produced (command outputs, daemon logs) and the state db bytes:
    none may hold an API key or its Basic-auth forms."""

    keys: list[str]
    commands: Commands
    roots: list[Path] = field(default_factory=list)

    def texts(self) -> dict[str, str | bytes]:
        found: dict[str, str | bytes] = {
            f"command output #{index}": text for index, text in enumerate(self.commands.outputs)
        }
        for root in self.roots:
            for path in sorted(root.rglob("daemon-*.log")):
                found[str(path)] = path.read_text(errors="replace")
            for path in sorted(root.rglob("state.db*")):
                found[str(path)] = path.read_bytes()
        return found

    def problems(self) -> dict[str, list[str]]:
        return {
            where: found
            for where, data in self.texts().items()
            if (found := leaks(data, self.keys))
        }


# -- who opened what --------------------------------------------------------------------------


class _OpenRecorder(FileSystemEventHandler):
    def __init__(self) -> None:
        self.opened: list[str] = []
        self._lock = threading.Lock()

    def on_any_event(self, event: FileSystemEvent) -> None:
        if isinstance(event, FileOpenedEvent):
            with self._lock:
                self.opened.append(os.fsdecode(event.src_path))


@contextmanager
def opens_recorded(folder: Path) -> Iterator[list[str]]:
    """inotify IN_OPEN on `folder`: the list fills with every file in it any process opens
    (stat and readlink do not count; reading does)."""
    recorder = _OpenRecorder()
    observer = Observer()
    observer.schedule(recorder, str(folder), recursive=True)
    observer.start()
    try:
        yield recorder.opened
    finally:
        observer.stop()
        observer.join(10)


def no_reader_on_fifo(path: Path) -> bool:
    """True when no process has the FIFO open for reading (a writer's O_NONBLOCK open then
    fails with ENXIO). Opening it ourselves for writing reads nothing."""
    try:
        fd = os.open(path, os.O_WRONLY | os.O_NONBLOCK)
    except OSError as exc:
        return exc.errno == errno.ENXIO
    os.close(fd)
    return False
