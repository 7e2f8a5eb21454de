"""What every benchmark section shares: configs, the real command as a subprocess, the daemon,
what the devserver stored and when, and /proc readings of a process's memory and CPU time."""

from __future__ import annotations

import contextlib
import json
import math
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.configfactory import watcher_env, write_config
from tests.daemonprocess import DaemonProcess
from watcher.devserver import DevServer, RequestRecord

REPO = Path(__file__).resolve().parent.parent
CLOCK_TICKS_PER_SECOND = os.sysconf("SC_CLK_TCK")

# Production defaults (config.example.toml), except what a benchmark must pin: the state path,
# JSON logs to a file, and no metrics port.
PRODUCTION_SECTIONS: dict[str, dict[str, Any]] = {
    "nucleus": {"timeout_seconds": 120, "job_poll_seconds": 2.0, "asynchronous": False},
    "upload": {
        "concurrency": 4,
        "max_files_per_request": 10,
        "retry_initial_seconds": 1,
        "retry_max_seconds": 300,
    },
    "settle": {"seconds": 2.0, "max_wait_seconds": 600, "verify_image": True},
    "log": {"format": "json", "level": "info"},
    "metrics": {"listen": ""},
}


def subprocess_env(**extra: str) -> dict[str, str]:
    """The test suite's environment for the real command (fake key, no NUCLEUS_* leaking in),
    with the repository on the path so `python -m watcher` works from any folder."""
    env = watcher_env(**extra)
    env["PYTHONPATH"] = str(REPO) + (os.pathsep + env["PYTHONPATH"] if "PYTHONPATH" in env else "")
    return env


def write_bench_config(
    directory: Path,
    *,
    endpoint: str,
    watch_root: Path,
    dataset_id: str,
    overrides: Mapping[str, Mapping[str, Any]] | None = None,
) -> Path:
    """A config with production defaults watching `watch_root`; reference_id = relpath,
    metadata = a static camera name plus the frame number as a JSON number."""
    directory.mkdir(parents=True, exist_ok=True)
    sections: dict[str, dict[str, Any]] = {k: dict(v) for k, v in PRODUCTION_SECTIONS.items()}
    sections["state"] = {"path": str(directory / "state" / "state.db")}
    for section, values in (overrides or {}).items():
        sections.setdefault(section, {}).update(values)
    watch = {
        "path": str(watch_root),
        "dataset_id": dataset_id,
        "reference_id": "{relpath}",
        "metadata": {"camera": "bench"},
        "rules": [{"regex": r"frame_(?P<frame>\d+)", "metadata": {"frame": "{frame:int}"}}],
    }
    return write_config(
        directory, endpoint=endpoint, watches=[watch], name="config.toml", **sections
    )


# --------------------------------------------------------------------------- the command line


@dataclass(frozen=True)
class ScanOutcome:
    wall_seconds: float
    returncode: int
    summary: str  # the command's one-line summary
    log_path: Path

    def reported_seconds(self) -> float | None:
        """The command's own duration ("... in 3.2 s"): without interpreter start-up."""
        found = re.search(r" in ([0-9.]+) s \(", self.summary)
        return float(found.group(1)) if found else None


def run_scan(config: Path, workdir: Path, *, timeout_seconds: float) -> ScanOutcome:
    """`nucleus-watcher scan -c CONFIG` to completion, timed from spawn to exit."""
    log_path = workdir / "scan.log"
    with log_path.open("wb") as log:
        started = time.perf_counter()
        completed = subprocess.run(
            [sys.executable, "-m", "watcher", "scan", "-c", str(config)],
            stdout=subprocess.PIPE,
            stderr=log,
            env=subprocess_env(),
            timeout=timeout_seconds,
            check=False,
        )
        wall = time.perf_counter() - started
    return ScanOutcome(wall, completed.returncode, completed.stdout.decode().strip(), log_path)


def log_events(log_path: Path, event: str) -> list[dict[str, Any]]:
    """Every JSON log line of `event` in a log file (other lines are skipped)."""
    found: list[dict[str, Any]] = []
    needle = f'"{event}"'
    with log_path.open(encoding="utf-8", errors="replace") as lines:
        for line in lines:
            if needle not in line:
                continue
            with contextlib.suppress(ValueError):
                entry = json.loads(line)
                if isinstance(entry, dict) and entry.get("event") == event:
                    found.append(entry)
    return found


@contextlib.contextmanager
def running_daemon(
    config: Path, workdir: Path, *, ready_timeout_seconds: float = 120.0
) -> Iterator[DaemonProcess]:
    """`nucleus-watcher run` until READY=1; SIGTERM (then SIGKILL) when the block ends."""
    workdir.mkdir(parents=True, exist_ok=True)
    daemon = DaemonProcess(config, workdir, extra_env={"PYTHONPATH": str(REPO)})
    daemon.start(wait_ready=False)
    try:
        deadline = time.monotonic() + ready_timeout_seconds
        while not daemon.has_message("READY=1"):
            if time.monotonic() > deadline:
                raise RuntimeError(f"daemon not ready in {ready_timeout_seconds} s")
            time.sleep(0.01)
        yield daemon
    finally:
        try:
            daemon.stop(timeout_seconds=60)
        except Exception:
            daemon.kill()


# --------------------------------------------------------------------------- /proc


@dataclass(frozen=True)
class Memory:
    rss_bytes: int
    peak_bytes: int  # VmHWM: the high-water mark since start (or the last reset_peak)


def read_memory(pid: int) -> Memory:
    values: dict[str, int] = {}
    with open(f"/proc/{pid}/status", encoding="ascii") as status:
        for line in status:
            name, _, rest = line.partition(":")
            if name in ("VmRSS", "VmHWM"):
                values[name] = int(rest.split()[0]) * 1024
    return Memory(values["VmRSS"], values["VmHWM"])


def cpu_seconds(pid: int) -> float:
    """utime + stime of the process (all its threads), from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    # After the command name: state is field 3, utime field 14, stime field 15.
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS_PER_SECOND


def reset_peak(pid: int) -> bool:
    """Reset VmHWM to the current RSS (clear_refs "5", Linux >= 4.0); False if not allowed."""
    try:
        with open(f"/proc/{pid}/clear_refs", "w", encoding="ascii") as clear_refs:
            clear_refs.write("5")
    except OSError:
        return False
    return True


class RssSampler:
    """Reads VmRSS every `interval_seconds` on a thread; at most `max_seconds` of samples."""

    def __init__(self, pid: int, interval_seconds: float, max_seconds: float) -> None:
        self._pid = pid
        self._interval_seconds = interval_seconds
        self._max_seconds = max_seconds
        self._stop = threading.Event()
        self.samples: list[int] = []
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        deadline = time.monotonic() + self._max_seconds
        while not self._stop.is_set() and time.monotonic() < deadline:
            try:
                self.samples.append(read_memory(self._pid).rss_bytes)
            except (OSError, KeyError):
                return
            self._stop.wait(self._interval_seconds)

    @property
    def max_bytes(self) -> int:
        return max(self.samples, default=0)

    @property
    def median_bytes(self) -> int:
        return int(percentile([float(s) for s in self.samples], 50)) if self.samples else 0


# --------------------------------------------------------------------------- the devserver


@dataclass
class StoreClock:
    """When each item first appeared in the devserver's dataset, by the benchmark's clock.

    Hooked in as DevServer(on_request=...): the callback runs on the connection's thread when
    the request is recorded, after the items are stored and just before the answer is sent.
    """

    dataset_id: str
    server: DevServer | None = None
    stored_at: dict[str, float] = field(default_factory=dict)
    appends: list[tuple[float, int]] = field(default_factory=list)  # (time, items in request)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def on_request(self, record: RequestRecord) -> None:
        if self.server is None or not record.path.endswith(f"/dataset/{self.dataset_id}/append"):
            return
        now = time.monotonic()
        with self._lock:
            self.appends.append((now, record.item_count))
            for reference_id in self.server.items(self.dataset_id):
                self.stored_at.setdefault(reference_id, now)

    def appends_between(self, start: float, end: float) -> list[int]:
        """Item counts of the append requests recorded in [start, end]."""
        with self._lock:
            return [items for at, items in self.appends if start <= at <= end]

    def count(self) -> int:
        with self._lock:
            return len(self.stored_at)

    def wait_for(self, reference_ids: Sequence[str], timeout_seconds: float) -> bool:
        deadline = time.monotonic() + timeout_seconds
        wanted = set(reference_ids)
        while time.monotonic() < deadline:
            with self._lock:
                if wanted.issubset(self.stored_at):
                    return True
            time.sleep(0.01)
        with self._lock:
            return wanted.issubset(self.stored_at)


# --------------------------------------------------------------------------- numbers


def percentile(values: Sequence[float], pct: float) -> float:
    """Linear interpolation between closest ranks (numpy's default); NaN when empty."""
    if not values:
        return math.nan
    ordered = sorted(values)
    rank = (len(ordered) - 1) * pct / 100.0
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def median(values: Sequence[float]) -> float:
    return percentile(values, 50)


def mib(value_bytes: float) -> float:
    return value_bytes / (1 << 20)
