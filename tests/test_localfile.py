"""What a path is (`kind_of`), and opening only regular files, on real files."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from watcher.errors import NotARegularFile
from watcher.files import FileKind, kind_of, open_regular_file


def test_kind_of_tells_regular_files_from_links_fifos_and_folders(tmp_path: Path) -> None:
    regular = tmp_path / "a.jpg"
    regular.write_bytes(b"x")
    link = tmp_path / "link.jpg"
    link.symlink_to(regular)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    assert kind_of(regular.lstat()) is FileKind.REGULAR
    assert kind_of(link.lstat()) is FileKind.SYMLINK
    assert kind_of(fifo.lstat()) is FileKind.OTHER
    assert kind_of(tmp_path.lstat()) is FileKind.OTHER


def test_only_regular_files_are_opened_and_the_refusal_says_why(tmp_path: Path) -> None:
    regular = tmp_path / "a.jpg"
    regular.write_bytes(b"bytes")
    with open_regular_file(regular) as f:
        assert f.read() == b"bytes"
    link = tmp_path / "link.jpg"
    link.symlink_to(regular)
    with pytest.raises(NotARegularFile) as refused:
        open_regular_file(link)
    assert refused.value.strerror == "symbolic link (not followed)"
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(NotARegularFile) as refused:
        open_regular_file(fifo)  # O_NONBLOCK: no writer needed to get here
    assert refused.value.strerror == "not a regular file"
