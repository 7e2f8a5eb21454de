"""A token bucket that caps how fast all upload workers together may send bytes.

Every worker's streaming reader calls `TokenBucket.take(len(chunk))` before a chunk goes out,
so the limit holds for the sum of all requests in flight, not per request.

The bucket hands out *reservations*: under the lock a caller books the next free slot (tokens
may go negative, i.e. into debt) and then sleeps outside the lock until its slot comes. Callers
are therefore served in the order they asked, nobody spins, and one sleep covers one part.
A take larger than the burst is booked in burst-sized parts so that other threads' parts can
interleave with it instead of waiting behind one huge reservation.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

# Without an explicit burst, allow an eighth of a second's worth at once (but at least 64 KiB,
# so one socket write is not cut into many tiny sleeps at low rates). Small enough that the
# long-run rate is what the user asked for, large enough that sleep overshoot stays negligible.
_DEFAULT_BURST_FRACTION_OF_SECOND = 8
_MIN_DEFAULT_BURST_BYTES = 64 * 1024


class TokenBucket:
    """Thread-safe byte-rate limiter shared by every upload worker."""

    def __init__(
        self,
        rate_bytes_per_second: int,
        burst_bytes: int | None = None,
        clock: Callable[[], float] = time.monotonic,
        *,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if rate_bytes_per_second <= 0:
            raise ValueError(f"bandwidth rate must be positive, got {rate_bytes_per_second} B/s")
        if burst_bytes is None:
            burst_bytes = max(
                _MIN_DEFAULT_BURST_BYTES,
                rate_bytes_per_second // _DEFAULT_BURST_FRACTION_OF_SECOND,
            )
        if burst_bytes <= 0:
            raise ValueError(f"bandwidth burst must be positive, got {burst_bytes} bytes")
        self._rate_bytes_per_second = rate_bytes_per_second
        self._burst_bytes = burst_bytes
        self._clock = clock
        self._sleep = sleep
        self._lock = threading.Lock()
        # Start full: the first chunk after an idle period may go at once, as after any pause.
        self._tokens = float(burst_bytes)
        self._last_refill = clock()

    @property
    def rate_bytes_per_second(self) -> int:
        return self._rate_bytes_per_second

    @property
    def burst_bytes(self) -> int:
        return self._burst_bytes

    def take(self, n_bytes: int) -> None:
        """Block until `n_bytes` may be sent. Never spins; zero or negative sizes return at once."""
        remaining = n_bytes
        while remaining > 0:
            part = min(remaining, self._burst_bytes)
            wait_seconds = self._reserve(part)
            if wait_seconds > 0:
                self._sleep(wait_seconds)
            remaining -= part

    def _reserve(self, n_bytes: int) -> float:
        """Book `n_bytes`; return how long the caller must wait before its booking is due."""
        with self._lock:
            now = self._clock()
            elapsed = max(0.0, now - self._last_refill)
            self._last_refill = now
            self._tokens = min(
                float(self._burst_bytes), self._tokens + elapsed * self._rate_bytes_per_second
            )
            self._tokens -= n_bytes
            if self._tokens >= 0:
                return 0.0
            return -self._tokens / self._rate_bytes_per_second
