"""What a path on disk is, and opening files under a watch root without ever leaving it or
hanging on it.

`kind_of` is the one place that tells a regular file from a symlink or a FIFO; the settler, the
reconcile and the opener below all ask it.

Between the walk's `lstat` and the open, a file can be swapped for a symlink (pointing outside
the root) or a FIFO (where a plain open blocks forever). O_NOFOLLOW refuses the first, O_NONBLOCK
the second, and the fstat after the open checks what was really opened.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from enum import StrEnum
from pathlib import Path

from watcher.errors import NotARegularFile

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


class FileKind(StrEnum):
    """What a stat says a path is. For anything but a regular file, the value is the reason it
    is refused, as logs and the store show it."""

    REGULAR = "regular file"
    SYMLINK = "symbolic link (not followed)"
    OTHER = "not a regular file"  # FIFO, socket, device, folder: never opened


def kind_of(st: os.stat_result) -> FileKind:
    if stat.S_ISREG(st.st_mode):
        return FileKind.REGULAR
    if stat.S_ISLNK(st.st_mode):
        return FileKind.SYMLINK
    return FileKind.OTHER


def open_regular_file(path: Path) -> io.BufferedReader:
    """Open `path` for reading if, and only if, it is a regular file (not via a symlink)."""
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise NotARegularFile(exc.errno, FileKind.SYMLINK.value) from None
        raise
    try:
        kind = kind_of(os.fstat(fd))
        if kind is not FileKind.REGULAR:
            raise NotARegularFile(0, kind.value)
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
