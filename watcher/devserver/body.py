"""Reading one request body, Content-Length or chunked, in pieces and under a cap."""

from __future__ import annotations

import io
import time
from typing import Final

from watcher.devserver.request_failures import _ClientGone, _RequestRejected
from watcher.nucleus import TokenBucket

_READ_CHUNK_BYTES: Final = 1 << 20
_LINK_READ_BYTES: Final = 8 * 1024


# --------------------------------------------------------------------------- request bodies


class _BodyReader:
    """Reads one request body (Content-Length or chunked) in pieces, refusing more than a cap."""

    def __init__(
        self,
        rfile: io.BufferedIOBase,
        content_length: int | None,
        chunked: bool,
        max_bytes: int,
        link: TokenBucket | None = None,
    ) -> None:
        self._rfile = rfile
        self._link = link
        self._chunked = chunked
        self._max_bytes = max_bytes
        self.declared_bytes = content_length
        self.bytes_read = 0
        self._remaining_in_chunk = 0 if chunked else (content_length or 0)
        self.finished = not chunked and not content_length

    def read_some(self, limit: int = _READ_CHUNK_BYTES) -> bytes:
        """Return the next piece of the body (at most `limit` bytes); b"" at its end."""
        if self.finished:
            return b""
        if self._chunked and self._remaining_in_chunk == 0:
            self._remaining_in_chunk = self._next_chunk_size()
            if self._remaining_in_chunk == 0:
                self._read_trailers()
                self.finished = True
                return b""
        wanted = min(limit, self._remaining_in_chunk)
        if self._link is not None:
            # Small reads, so connections sharing the link take turns instead of one booking
            # a second of it at once.
            wanted = min(wanted, _LINK_READ_BYTES)
        # read1 hands over what one recv brought instead of waiting for the whole piece.
        data = self._rfile.read1(wanted)
        if not data:
            raise _ClientGone
        if self._link is not None:
            # Not reading holds the bytes in the kernel's buffers and TCP's window closes, so
            # the client sees the link's rate.
            self._link.take(len(data))
        self.bytes_read += len(data)
        if self.bytes_read > self._max_bytes:
            raise _RequestRejected(413, f"request body is larger than {self._max_bytes} bytes")
        self._remaining_in_chunk -= len(data)
        if self._remaining_in_chunk == 0:
            if self._chunked:
                self._expect_crlf()
            else:
                self.finished = True
        return bytes(data)

    def read_all(self, max_bytes: int) -> bytes:
        """The rest of the body in memory, for bodies that are small by contract."""
        if self.declared_bytes is not None and self.declared_bytes > max_bytes:
            raise _RequestRejected(413, f"this body may be at most {max_bytes} bytes")
        pieces: list[bytes] = []
        total = 0
        while piece := self.read_some():
            total += len(piece)
            if total > max_bytes:
                raise _RequestRejected(413, f"this body may be at most {max_bytes} bytes")
            pieces.append(piece)
        return b"".join(pieces)

    def discard(self) -> None:
        while self.read_some():
            pass

    @property
    def declared_over_cap(self) -> bool:
        return self.declared_bytes is not None and self.declared_bytes > self._max_bytes

    def drop_rest(self, seconds: float) -> None:
        """Read and drop the rest for at most `seconds`, whatever the cap; chunk framing is
        not followed, as the connection is closed afterwards."""
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            limit = _READ_CHUNK_BYTES
            if not self._chunked and self.declared_bytes is not None:
                limit = min(limit, self.declared_bytes - self.bytes_read)
                if limit <= 0:
                    return
            data = self._rfile.read1(limit)
            if not data:
                return
            self.bytes_read += len(data)

    def _next_chunk_size(self) -> int:
        line = self._rfile.readline(1024)
        if not line:
            raise _ClientGone
        size_text = line.split(b";", 1)[0].strip()
        try:
            return int(size_text, 16)
        except ValueError:
            raise _RequestRejected(400, "malformed chunked transfer encoding") from None

    def _expect_crlf(self) -> None:
        if self._rfile.readline(1024) not in (b"\r\n", b"\n"):
            raise _RequestRejected(400, "malformed chunked transfer encoding")

    def _read_trailers(self) -> None:
        while True:
            line = self._rfile.readline(8192)
            if not line:
                raise _ClientGone
            if line in (b"\r\n", b"\n"):
                return
