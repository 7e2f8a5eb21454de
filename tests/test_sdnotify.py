"""watcher.sdnotify against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import structlog.testing

from watcher.service import SystemdNotifier


class FakeServiceManager:
    """The receiving end of NOTIFY_SOCKET: one bound datagram socket."""

    def __init__(self, address: str | bytes) -> None:
        self.socket = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.socket.bind(address)
        self.socket.settimeout(2.0)

    def receive(self) -> bytes:
        return self.socket.recv(4096)

    def assert_nothing_more(self) -> None:
        self.socket.settimeout(0.05)
        with pytest.raises(TimeoutError):
            self.socket.recv(4096)

    def close(self) -> None:
        self.socket.close()


@pytest.fixture
def manager(tmp_path: Path) -> Iterator[tuple[FakeServiceManager, str]]:
    path = str(tmp_path / "notify.sock")
    fake = FakeServiceManager(path)
    yield fake, path
    fake.close()


@pytest.fixture
def notifier(manager: tuple[FakeServiceManager, str]) -> Iterator[SystemdNotifier]:
    _, path = manager
    sd = SystemdNotifier({"NOTIFY_SOCKET": path})
    yield sd
    sd.close()


def test_each_message_is_one_datagram_in_the_protocol_format(
    manager: tuple[FakeServiceManager, str], notifier: SystemdNotifier
) -> None:
    fake, _ = manager
    assert notifier.enabled

    notifier.ready("watching 2 folders")
    assert fake.receive() == b"READY=1\nSTATUS=watching 2 folders"
    notifier.ready()
    assert fake.receive() == b"READY=1"
    notifier.status("uploading: 3 pending")
    assert fake.receive() == b"STATUS=uploading: 3 pending"
    notifier.watchdog()
    assert fake.receive() == b"WATCHDOG=1"
    notifier.stopping("finishing 2 uploads")
    assert fake.receive() == b"STOPPING=1\nSTATUS=finishing 2 uploads"
    notifier.stopping()
    assert fake.receive() == b"STOPPING=1"
    fake.assert_nothing_more()


def test_reloading_carries_the_monotonic_clock(
    manager: tuple[FakeServiceManager, str], notifier: SystemdNotifier
) -> None:
    fake, _ = manager
    before_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    notifier.reloading()
    after_usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000

    match = re.fullmatch(rb"RELOADING=1\nMONOTONIC_USEC=(\d+)", fake.receive())
    assert match is not None
    assert before_usec <= int(match[1]) <= after_usec


def test_a_newline_in_a_status_cannot_inject_another_assignment(
    manager: tuple[FakeServiceManager, str], notifier: SystemdNotifier
) -> None:
    fake, _ = manager
    notifier.status("folder /srv/x\nREADY=1")
    assert fake.receive() == b"STATUS=folder /srv/x READY=1"


def test_abstract_namespace_socket() -> None:
    name = f"nucleus-watcher-test-{uuid.uuid4().hex}"
    fake = FakeServiceManager(b"\0" + name.encode())
    sd = SystemdNotifier({"NOTIFY_SOCKET": "@" + name})
    try:
        sd.ready("up")
        assert fake.receive() == b"READY=1\nSTATUS=up"
    finally:
        sd.close()
        fake.close()


def test_disabled_without_notify_socket() -> None:
    sd = SystemdNotifier({"WATCHDOG_USEC": "60000000"})
    assert not sd.enabled
    # Every method is a harmless no-op outside systemd.
    sd.ready("up")
    sd.status("x")
    sd.watchdog()
    sd.stopping()
    sd.reloading()
    sd.close()


def test_a_vanished_socket_never_raises_and_is_logged_once(tmp_path: Path) -> None:
    sd = SystemdNotifier({"NOTIFY_SOCKET": str(tmp_path / "gone.sock")})
    assert sd.enabled
    with structlog.testing.capture_logs() as events:
        for _ in range(3):
            sd.ready("up")
            sd.watchdog()
    sd.close()
    assert [event["event"] for event in events] == ["sd_notify_failed"]
    assert events[0]["log_level"] == "debug"


@pytest.mark.parametrize(
    ("environ", "expected_seconds"),
    [
        ({"WATCHDOG_USEC": "60000000"}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid())}, 30.0),
        ({"WATCHDOG_USEC": "60000000", "WATCHDOG_PID": str(os.getpid() + 1)}, None),
        ({"WATCHDOG_USEC": "0"}, None),
        ({"WATCHDOG_USEC": "soon"}, None),
        ({}, None),
    ],
)
def test_watchdog_interval_is_half_the_timeout_for_our_pid(
    environ: dict[str, str], expected_seconds: float | None
) -> None:
    sd = SystemdNotifier({"NOTIFY_SOCKET": "/run/systemd/notify", **environ})
    assert sd.watchdog_interval_seconds == expected_seconds
