"""The systemd notify protocol, spoken directly (no python-systemd).

systemd passes the address of a datagram socket in ``NOTIFY_SOCKET``; each message is one
datagram of ``KEY=VALUE`` lines. A path starting with ``@`` names a socket in the abstract
namespace (the ``@`` stands for a leading NUL byte). With ``Type=notify`` the unit is only
"started" after ``READY=1``; with ``WatchdogSec=`` it is killed unless ``WATCHDOG=1`` arrives
at least every ``WATCHDOG_USEC`` microseconds.

Outside systemd (no ``NOTIFY_SOCKET``) every method does nothing, so callers never check.
Sending never raises: a lost notification must not take the daemon down with it.

After a reload, call `ready` again: systemd keeps the unit in "reloading" until it sees
``READY=1`` following ``RELOADING=1``.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from collections.abc import Mapping

import structlog

log = structlog.get_logger("watcher.sdnotify")


class SystemdNotifier:
    """Sends READY/STATUS/WATCHDOG/STOPPING/RELOADING to the service manager, if there is one."""

    def __init__(self, environ: Mapping[str, str] | None = None) -> None:
        env = os.environ if environ is None else environ
        self._address = _socket_address(env.get("NOTIFY_SOCKET", ""))
        self.enabled: bool = self._address is not None
        self.watchdog_interval_seconds: float | None = _watchdog_interval_seconds(env)
        self._socket: socket.socket | None = None
        self._socket_lock = threading.Lock()
        self._failure_logged = False

    def ready(self, status: str = "") -> None:
        self._send("READY=1", status)

    def status(self, text: str) -> None:
        self._send(None, text)

    def watchdog(self) -> None:
        self._send("WATCHDOG=1", "")

    def stopping(self, status: str = "") -> None:
        self._send("STOPPING=1", status)

    def reloading(self) -> None:
        # systemd (253+) matches this timestamp against its own clock to tell this reload from
        # an earlier one; older versions ignore the extra field.
        now_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
        self._send(f"RELOADING=1\nMONOTONIC_USEC={now_usec}", "")

    def close(self) -> None:
        """Release the socket; a later send opens a new one."""
        with self._socket_lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None

    def _send(self, state: str | None, status: str) -> None:
        if self._address is None:
            return
        lines = [] if state is None else [state]
        if status:
            # A newline would end STATUS= early and let the rest read as another assignment.
            lines.append("STATUS=" + " ".join(status.splitlines()))
        if not lines:
            return
        datagram = "\n".join(lines).encode("utf-8", "replace")
        try:
            with self._socket_lock:
                if self._socket is None:
                    # Non-blocking: if nobody reads the socket (its queue holds ~10 datagrams),
                    # a STATUS= update is dropped rather than stalling the daemon's control loop.
                    self._socket = socket.socket(
                        socket.AF_UNIX,
                        socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK,
                    )
                self._socket.sendto(datagram, self._address)
        except OSError as error:
            # Once only: a watchdog ping every few seconds would otherwise flood the journal.
            if not self._failure_logged:
                self._failure_logged = True
                log.debug("sd_notify_failed", error=str(error))


def _socket_address(notify_socket: str) -> str | bytes | None:
    if notify_socket.startswith("/"):
        return notify_socket
    if notify_socket.startswith("@") and len(notify_socket) > 1:
        return b"\0" + notify_socket[1:].encode()
    # Empty means "not under systemd"; other forms (vsock:...) are for VMs, not for us.
    return None


def _watchdog_interval_seconds(env: Mapping[str, str]) -> float | None:
    """Half the watchdog timeout, as sd_watchdog_enabled(3) advises; None when not asked for."""
    watchdog_pid = env.get("WATCHDOG_PID", "")
    if watchdog_pid and watchdog_pid != str(os.getpid()):
        # The variable was meant for another process (inherited across a fork/exec).
        return None
    try:
        timeout_usec = int(env.get("WATCHDOG_USEC", ""))
    except ValueError:
        return None
    if timeout_usec <= 0:
        return None
    return timeout_usec / 1_000_000 / 2
