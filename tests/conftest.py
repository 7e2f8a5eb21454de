"""Shared fixtures. Every fixture that starts a thread or server stops and joins it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.devserver import DevServer


@pytest.fixture
def devserver(tmp_path: Path) -> Iterator[DevServer]:
    """A running devserver on a free loopback port, storing into tmp_path/devserver."""
    server = DevServer(data_dir=tmp_path / "devserver").start()
    try:
        yield server
    finally:
        server.stop()
