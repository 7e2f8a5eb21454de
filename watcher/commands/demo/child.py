"""The daemon as a child process: its environment, its systemd notify socket, start and stop.

It is started as `python -m watcher run -c <config>` in its own session: it installs signal
handlers, which only work in a main thread, and a child can be stopped with SIGTERM and reaped
like systemd would. It is told to report through a notify socket of ours, so the demo starts
writing after READY=1, which comes after the daemon's start-up scan.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Final

from watcher.commands.demo.config_text import DEMO_API_KEY

POLL_SECONDS: Final = 0.1
_READY_TIMEOUT_SECONDS: Final = 30.0
_REAP_TIMEOUT_SECONDS: Final = 15.0  # after SIGTERM, before SIGKILL

# Variables that would point the child elsewhere: NUCLEUS_ENDPOINT at the real API,
# NUCLEUS_WATCHER_* at other settings, a service manager's notify socket or watchdog.
_DROPPED_PREFIXES: Final = ("NUCLEUS", "NOTIFY_SOCKET", "WATCHDOG_", "LISTEN_")


def child_environment(notify_socket: str) -> dict[str, str]:
    """Ours, without what would point the daemon elsewhere, plus the demo's key and socket."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.upper().startswith(_DROPPED_PREFIXES)
    }
    env["NUCLEUS_API_KEY"] = DEMO_API_KEY
    env["NOTIFY_SOCKET"] = notify_socket
    # Loopback must not go through a proxy that HTTP_PROXY may name.
    for name in ("NO_PROXY", "no_proxy"):
        env[name] = ",".join(filter(None, [env.get(name, ""), "127.0.0.1", "localhost"]))
    return env


@contextlib.contextmanager
def notify_socket(root: Path) -> Iterator[tuple[socket.socket, str]]:
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
        sock.settimeout(POLL_SECONDS)
        yield sock, address
    finally:
        sock.close()


def start_daemon(config: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "watcher", "run", "-c", str(config)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,  # it logs to stderr, which it shares with us
        env=env,
        start_new_session=True,  # Ctrl-C reaches only us; we stop it in order
    )


def wait_ready(process: subprocess.Popen[bytes], sock: socket.socket) -> bool:
    """True once the daemon sent READY=1; False if it exited or took too long."""
    deadline = time.monotonic() + _READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline and process.poll() is None:
        try:
            message = sock.recv(4096).decode("utf-8", "replace")
        except TimeoutError:
            continue
        if "READY=1" in message.splitlines():
            return True
    return False


def stop_daemon(process: subprocess.Popen[bytes]) -> int:
    """SIGTERM (the daemon finishes what is in flight), SIGKILL if it takes too long; reaped."""
    if process.poll() is None:
        process.terminate()
    try:
        return process.wait(_REAP_TIMEOUT_SECONDS)
    except subprocess.TimeoutExpired:
        process.kill()
        return process.wait()


def daemon_failed(process: subprocess.Popen[bytes], when: str) -> str:
    """The line that says the daemon is gone (or never got ready)."""
    code = process.poll()
    if code is None:
        return f"the daemon did not get ready in {_READY_TIMEOUT_SECONDS:g} s (its log is above)"
    return f"the daemon exited with code {code} {when} (its log is above)"
