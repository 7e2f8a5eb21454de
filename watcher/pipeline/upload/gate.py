"""When an upload worker may claim its next batch, and the waiting that goes with it.

A worker waits while the uploader is paused by a 401 or held back after a transient failure
(one dead endpoint, one backoff for every worker); during a burst of new files it lingers once
so they go out in batches; on a thin link it waits until fewer requests are in flight. The job
follower waits on the same condition, so a `wake` reaches it too.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from watcher.pipeline.upload.link_rate import LinkRate, RequestShape

log = structlog.get_logger("watcher.uploader")

# Wake-ups closer together than this are a burst; a worker then lingers once, this long, before
# claiming, so a burst forms batches. A lone file (the trickle case) goes at once.
_BURST_GAP_SECONDS = 0.02
_BURST_LINGER_SECONDS = 0.02


@dataclass(frozen=True)
class Turn:
    """A worker's leave to claim one batch, counted as busy until it ends."""

    shape: RequestShape  # how big the batch may be
    generation: int  # wake-ups seen so far: a later one means new work was queued meanwhile
    lingered: bool  # it waited for a burst to gather; a worker does that once per batch


class UploadGate:
    """Shared by the workers, the job follower and the outcome recorder of one uploader."""

    def __init__(self, link: LinkRate) -> None:
        self._link = link
        lock = threading.RLock()
        # Two conditions on one lock: workers wait for work (`wake`, `resume`, `stop`);
        # `wait_until_drained` waits for workers to go idle. Sharing one condition let idle
        # workers wake each other in a loop.
        self._work = threading.Condition(lock)
        self._idle = threading.Condition(lock)
        self._stopping = False
        self._paused_reason: str | None = None
        # On the monotonic clock: a wall-clock step (NTP at boot, a stepped-back RTC) must not
        # stretch a backoff into hours.
        self._hold_until = 0.0
        self._consecutive_failures = 0
        self._busy_workers = 0
        self._waiting_for_link = 0
        self._wake_generation = 0
        self._last_wake_at = 0.0
        self._wakes_in_burst = 0

    # -- what callers tell the gate --------------------------------------------------------

    def stop(self) -> None:
        with self._work:
            self._stopping = True
            self._work.notify_all()

    @property
    def stopping(self) -> bool:
        with self._work:
            return self._stopping

    def wake(self) -> None:
        """New work was queued."""
        with self._work:
            now = time.monotonic()
            close_to_last = now - self._last_wake_at < _BURST_GAP_SECONDS
            self._wakes_in_burst = self._wakes_in_burst + 1 if close_to_last else 1
            self._last_wake_at = now
            self._wake_generation += 1
            self._work.notify_all()

    def pause(self, reason: str) -> bool:
        """A 401: nobody claims until `resume`. True if this began the pause."""
        with self._work:
            first = self._paused_reason is None
            self._paused_reason = reason
            self._work.notify_all()
        return first

    def resume(self) -> None:
        """After a 401: the key changed (or SIGHUP); try again."""
        with self._work:
            if self._paused_reason is not None:
                log.info("uploads_resumed")
            self._paused_reason = None
            self._hold_until = 0.0
            self._work.notify_all()

    @property
    def paused_reason(self) -> str | None:
        return self._paused_reason

    def count_failure(self) -> int:
        """A transient failure; returns how many came in a row."""
        with self._work:
            self._consecutive_failures += 1
            return self._consecutive_failures

    def count_success(self) -> None:
        with self._work:
            self._consecutive_failures = 0

    def hold_for(self, delay_seconds: float) -> None:
        """No worker claims for `delay_seconds` from now (a longer hold already set stays)."""
        with self._work:
            self._hold_until = max(self._hold_until, time.monotonic() + delay_seconds)

    # -- waiting ---------------------------------------------------------------------------

    def enter(self, *, may_linger: bool) -> Turn | None:
        """Wait until a worker may claim; None once stopping. End the turn with `leave` or
        `leave_empty_handed`."""
        with self._work:
            lingered = False
            while True:
                if self._stopping:
                    return None
                if self._paused_reason is not None:
                    self._work.wait(30.0)
                    continue
                held_seconds = self._hold_until - time.monotonic()
                if held_seconds > 0:
                    self._work.wait(held_seconds)
                    continue
                if may_linger and not lingered and self._in_burst():
                    # Files are arriving in a burst: wait a moment (once) so they go out in
                    # batches instead of one request each. A lone file never waits.
                    lingered = True
                    self._linger()
                    continue
                shape = self._link.shape()
                if self._busy_workers >= shape.max_in_flight:
                    # A thin link: another request would only split it (see link_rate.py).
                    self._waiting_for_link += 1
                    self._work.wait(5.0)  # a finishing request notifies
                    self._waiting_for_link -= 1
                    continue
                # Counted as busy while claiming, so `wait_until_drained` never sees a batch
                # that left the queue but is not yet in anyone's hands.
                self._busy_workers += 1
                return Turn(shape, self._wake_generation, lingered)

    def _in_burst(self) -> bool:
        since_wake = time.monotonic() - self._last_wake_at
        return self._wakes_in_burst > 1 and since_wake < _BURST_GAP_SECONDS

    def _linger(self) -> None:
        linger_until = time.monotonic() + _BURST_LINGER_SECONDS
        # Every wake() in the burst notifies us: keep waiting until the deadline.
        while not self._stopping and (left := linger_until - time.monotonic()) > 0:
            self._work.wait(left)

    def leave(self) -> None:
        """The turn's batch was sent (or failed): no longer busy."""
        with self._work:
            self._busy_workers -= 1
            self._idle.notify_all()
            if self._waiting_for_link:
                self._work.notify_all()

    def leave_empty_handed(self, turn: Turn, wait_seconds: float) -> None:
        """Nothing was due: wait up to `wait_seconds` for new work, or not at all if some was
        queued since the turn began."""
        with self._work:
            self._busy_workers -= 1
            self._idle.notify_all()
            if turn.generation != self._wake_generation or self._stopping:
                return
            self._work.wait(wait_seconds)

    def sleep(self, seconds: float) -> bool:
        """Wait `seconds` or until woken; False (at once) when stopping."""
        with self._work:
            if self._stopping:
                return False
            self._work.wait(seconds)
            return True

    def wait_until_drained(
        self, unfinished: Callable[[], bool], timeout_seconds: float | None
    ) -> bool:
        """Wait until `unfinished()` is False and no worker is busy; False on timeout or pause."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            # Asked outside our lock: workers must not wait on a store query to finish a batch.
            any_unfinished = unfinished()
            with self._work:
                if self._paused_reason is not None:
                    return False
                if not any_unfinished and self._busy_workers == 0:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.2 if remaining is None else min(0.2, remaining))
