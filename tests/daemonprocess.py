"""Run the real `nucleus-watcher run` as a subprocess, listening on its systemd notify socket."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

from tests.configfactory import watcher_env


def wait_until(
    predicate: Callable[[], object], timeout_seconds: float = 20.0, interval_seconds: float = 0.02
) -> bool:
    deadline = time.monotonic() + timeout_seconds
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval_seconds)
    return bool(predicate())


class DaemonProcess:
    """One `python -m watcher run -c CONFIG`; its stderr goes to a log file, its sd_notify
    messages to a datagram socket this object reads."""

    def __init__(self, config: Path, workdir: Path, *, extra_env: dict[str, str] | None = None):
        self.config = config
        self.workdir = workdir
        self.extra_env = extra_env or {}
        self.process: subprocess.Popen[bytes] | None = None
        self.notify_messages: list[str] = []
        self._socket: socket.socket | None = None
        self._runs = 0

    @property
    def log_path(self) -> Path:
        return self.workdir / f"daemon-{self._runs}.log"

    def start(self, *, wait_ready: bool = True) -> DaemonProcess:
        self._runs += 1
        self.notify_messages = []
        notify_path = self.workdir / f"notify-{self._runs}.sock"
        self._socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._socket.bind(str(notify_path))
        self._socket.settimeout(0.05)
        env = watcher_env(NOTIFY_SOCKET=str(notify_path), **self.extra_env)
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                self.command(), stdout=log, stderr=subprocess.STDOUT, env=env
            )
        if wait_ready:
            assert wait_until(lambda: self.has_message("READY=1"), 30), self.log_text()
        return self

    def command(self) -> list[str]:
        return [sys.executable, "-m", "watcher", "run", "-c", str(self.config)]

    def read_notifications(self) -> list[str]:
        while self._socket is not None:
            try:
                self.notify_messages.append(self._socket.recv(4096).decode())
            except (TimeoutError, BlockingIOError):
                break
        return self.notify_messages

    def has_message(self, needle: str) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise AssertionError(f"daemon exited {self.process.returncode}:\n{self.log_text()}")
        return any(needle in message for message in self.read_notifications())

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def stop(self, timeout_seconds: float = 40.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        assert self.process is not None
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        code = self.process.wait(timeout_seconds)
        self.read_notifications()
        self._close_socket()
        return code

    def kill(self) -> None:
        assert self.process is not None
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait(10)
        self._close_socket()

    def _close_socket(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def running_daemon(config: Path, workdir: Path) -> Iterator[DaemonProcess]:
    daemon = DaemonProcess(config, workdir).start()
    try:
        yield daemon
    finally:
        daemon.kill()
