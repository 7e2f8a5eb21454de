"""Shared fixtures. Every fixture that starts a thread or server stops and joins it."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from watcher.devserver import DevServer
from watcher.store import StateStore


@pytest.fixture
def devserver(tmp_path: Path) -> Iterator[DevServer]:
    """A running devserver on a free loopback port, storing into tmp_path/devserver."""
    server = DevServer(data_dir=tmp_path / "devserver").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def store(tmp_path: Path) -> Iterator[StateStore]:
    """A real state store in tmp_path/state, closed after the test."""
    opened = StateStore.open(tmp_path / "state" / "state.db")
    try:
        yield opened
    finally:
        opened.close()


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An empty watch folder, tmp_path/cam."""
    folder = tmp_path / "cam"
    folder.mkdir()
    return folder
