"""Opening files under a watch root without ever leaving it or hanging on it.

Between the walk's `lstat` and the open, a file can be swapped for a symlink (pointing outside
the root) or a FIFO (where a plain open blocks forever). O_NOFOLLOW refuses the first, O_NONBLOCK
the second, and the fstat after the open checks what was really opened.
"""

from __future__ import annotations

import errno
import io
import os
import stat
from pathlib import Path

from watcher.errors import NotARegularFile

_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def open_regular_file(path: Path) -> io.BufferedReader:
    """Open `path` for reading if, and only if, it is a regular file (not via a symlink)."""
    try:
        fd = os.open(path, _FLAGS)
    except OSError as exc:
        if exc.errno == errno.ELOOP:  # the last component is a symlink
            raise NotARegularFile(exc.errno, "symbolic link (not followed)") from None
        raise
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise NotARegularFile(0, "not a regular file")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
