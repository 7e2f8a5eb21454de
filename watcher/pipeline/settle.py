"""Deciding when a file is finished: size and mtime stop moving (and the image is whole).

Every path the intake or the reconcile hands over becomes a candidate with a deadline. One
thread sleeps until the earliest deadline, looks at the file (lstat, and the image check when it
can matter), and either reports it ready, reports it incomplete, or sets a new deadline.

When a candidate is ready:

* its (size, mtime_ns) has not changed for `settle_seconds` (each new event for the path pushes
  the next look `settle_seconds` out, so a busy writer is not even looked at); or
* a close-after-write event came, and the file then held still for a short grace, or (with
  `verify_image`) the image checks out complete right away. The event alone is never enough: a
  writer may close and reopen.

With `verify_image`, "held still" is not enough either: a stable file whose JPEG has no EOI yet
keeps waiting. After `max_wait_seconds` a candidate that never became ready is reported once
through `on_incomplete`, then parked until its size or mtime changes.

A report carries the watches the path was submitted for and the lstat the verdict rests on, so
the reconciler records from that lstat. The settler is also the judge a walk asks about a file
it sees once (`at_rest`, `image_problem`): "is it finished?" is answered here only.
"""

from __future__ import annotations

import heapq
import itertools
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from watcher.files import ImageVerdict, check_open_image_complete
from watcher.pipeline.plans import WatchPlan
from watcher.pipeline.settle_look import (
    UNREADABLE,
    Look,
    Observation,
    Verified,
    look_at,
    observation_of,
)

log = structlog.get_logger("watcher.settle")

# After a close-after-write event, how long the size and mtime must hold still (without an image
# check) before the file counts as finished. A writer that closes and reopens to append does so
# within milliseconds, and ext4/xfs timestamps tick at the kernel's coarse clock (at most 10 ms),
# so 0.1 s is ten ticks: a second write would show as a new mtime or size. It is still 20x
# shorter than the default 2 s settle, which is the whole point of listening for the close.
CLOSE_GRACE_SECONDS = 0.1


@dataclass(frozen=True)
class ReadyFile:
    """A file found completely written, for the watches it was submitted for."""

    path: Path
    plans: tuple[WatchPlan, ...]
    st: os.stat_result  # the lstat it was judged on: record this, not a later look


@dataclass(frozen=True)
class IncompleteFile:
    """A file that never became ready within max_wait (or is no regular file), and why."""

    path: Path
    plans: tuple[WatchPlan, ...]
    reason: str
    st: os.stat_result | None  # the lstat it was given up on; None when none could be taken


class SettleSink(Protocol):
    """Where the settler reports; called on its thread, outside its lock."""

    def on_ready(self, file: ReadyFile) -> None: ...

    def on_incomplete(self, file: IncompleteFile) -> None: ...


@dataclass
class _Candidate:
    """Everything the settler knows about one path. Touched only under the settler's lock."""

    path: Path
    pending_since: float  # start of the max_wait window
    plans: tuple[WatchPlan, ...] = ()  # every watch it was submitted for
    submits: int = 0  # bumped by every submit; a look that raced with a submit is not trusted
    heap_token: int = -1  # matches the live heap entry; older entries are stale
    closed_hint: bool = False  # a close-after-write came and no later write event yet
    observation: Observation | None = None
    observed_since: float = 0.0  # when `observation` was first seen
    verified: Verified | None = None  # last image check and its verdict
    reported: Observation | None = None  # parked: on_incomplete already told about this state

    @property
    def parked(self) -> bool:
        return self.reported is not None


@dataclass(frozen=True)
class _Verdict:
    ready_stat: os.stat_result | None = None
    incomplete_reason: str | None = None
    incomplete_stat: os.stat_result | None = None


class Settler:
    """Reports each submitted path to the sink given to `start` once it is completely written.

    The sink's methods run on the settler's thread, never under its lock, so they may call
    `submit` or `forget`. Keep them quick: the next deadline waits for them.
    """

    def __init__(
        self,
        *,
        settle_seconds: float,
        max_wait_seconds: float,
        verify_image: bool,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if settle_seconds <= 0:
            raise ValueError(f"settle_seconds must be positive, got {settle_seconds}")
        if max_wait_seconds < settle_seconds:
            raise ValueError(
                f"max_wait_seconds ({max_wait_seconds}) must be at least "
                f"settle_seconds ({settle_seconds})"
            )
        self._settle_seconds = settle_seconds
        self._max_wait_seconds = max_wait_seconds
        self._verify_image = verify_image
        self._clock = clock
        lock = threading.Lock()
        self._cond = threading.Condition(lock)  # the settler thread waits on it for deadlines
        self._quiet = threading.Condition(lock)  # `wait_until_settled` waits on it
        self._looking = False  # the thread holds a candidate (looking at it or reporting it)
        self._candidates: dict[Path, _Candidate] = {}
        self._heap: list[tuple[float, int, Path]] = []
        self._tokens = itertools.count()
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- called from any thread ------------------------------------------------------------

    def start(self, sink: SettleSink) -> None:
        """Start the thread that reports finished (or abandoned) files to `sink`."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("Settler already started")
            self._thread = threading.Thread(
                target=self._run, args=(sink,), name="settler", daemon=True
            )
        self._thread.start()

    def stop(self) -> None:
        """Stop the thread and wait for it; pending candidates are dropped (the reconcile finds
        them again at the next start)."""
        with self._cond:
            self._stopping = True
            self._cond.notify()
            thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join()

    def submit(self, path: Path, plans: Sequence[WatchPlan] = (), *, closed: bool = False) -> None:
        """Something happened to `path`, a file of `plans`; `closed` when it was a
        close-after-write. The plans add to those it was submitted for before.

        Never touches the disk, so it is safe to call from a watchdog handler.
        """
        now = self._clock()
        with self._cond:
            candidate = self._candidates.get(path)
            if candidate is None:
                candidate = _Candidate(path=path, pending_since=now)
                self._candidates[path] = candidate
                # Look at once to have a baseline; readiness needs a second, later look anyway.
                deadline = now
            elif closed:
                deadline = now
            else:
                # Still being written: no point looking before it could have settled.
                deadline = now + self._settle_seconds
            candidate.plans = _by_key(candidate.plans, plans)
            candidate.submits += 1
            candidate.closed_hint = closed
            self._schedule(candidate, deadline)

    def reroute(self, route: Callable[[Path], Sequence[WatchPlan]]) -> None:
        """The watches changed (a reload): each pending path now goes to `route(path)`, and a
        path no watch takes any more is dropped."""
        with self._cond:
            for path, candidate in list(self._candidates.items()):
                plans = tuple(route(path))
                if plans:
                    candidate.plans = plans
                else:
                    del self._candidates[path]

    def forget(self, path: Path) -> None:
        """The file is gone (or moved away): stop tracking it."""
        with self._cond:
            self._candidates.pop(path, None)
            # Its heap entries go stale: the token no longer matches any candidate.
            self._quiet.notify_all()

    def at_rest(self, st: os.stat_result, wall_now: float) -> bool:
        """For a file a walk sees once, with no history to go by: finished when its mtime
        is at least `settle_seconds` old. A file that is not goes through `submit`."""
        return wall_now - st.st_mtime >= self._settle_seconds

    def image_problem(self, fd: int, size_bytes: int) -> str | None:
        """With `verify_image`, why the image open at `fd` is not whole yet; else None."""
        if not self._verify_image:
            return None
        return check_open_image_complete(fd, size_bytes)

    def wait_until_settled(self, timeout_seconds: float) -> list[Path]:
        """Wait until every submitted file was reported (ready or incomplete) or vanished, or
        `timeout_seconds` passed; the paths still settling then."""
        with self._cond:
            self._quiet.wait_for(self._all_settled, timeout_seconds)
            return self._unsettled_paths()

    def is_alive(self) -> bool:
        """True while the settler thread runs (for the daemon's health check)."""
        thread = self._thread
        return thread is not None and thread.is_alive()

    def pending_paths(self) -> list[Path]:
        """The paths still waiting to settle (parked incomplete ones are not waiting)."""
        with self._cond:
            return self._unsettled_paths()

    # -- the settler thread ----------------------------------------------------------------

    def _run(self, sink: SettleSink) -> None:
        while True:
            with self._cond:
                candidate = self._wait_for_due()
                if candidate is None:
                    return
                self._looking = True
                submits = candidate.submits
                snapshot = (candidate.closed_hint, candidate.observation, candidate.verified)
            try:
                look = look_at(
                    candidate.path,
                    verify_image=self._verify_image,
                    closed_hint=snapshot[0],
                    previous=snapshot[1],
                    verified=snapshot[2],
                )
            except Exception as exc:
                # One file's surprise must not end the settling of every other file: it is
                # treated as unreadable, retried, and reported with the reason after max_wait.
                log.exception("settle_look_failed", path=str(candidate.path))
                look = Look(unreadable_reason=f"internal error: {type(exc).__name__}: {exc}")
            with self._cond:
                verdict = self._decide(candidate, submits, look)
                plans = candidate.plans
            _report(sink, candidate.path, plans, verdict)
            with self._cond:
                # Only now, with the sink done, may `wait_until_settled` see the file as settled.
                self._looking = False
                self._quiet.notify_all()

    def _all_settled(self) -> bool:
        return not self._looking and not any(not c.parked for c in self._candidates.values())

    def _unsettled_paths(self) -> list[Path]:
        return [c.path for c in self._candidates.values() if not c.parked]

    def _wait_for_due(self) -> _Candidate | None:
        """Under the lock: sleep until a candidate is due; None when stopping."""
        while not self._stopping:
            now = self._clock()
            while self._heap:
                deadline, token, path = self._heap[0]
                candidate = self._candidates.get(path)
                if candidate is None or candidate.heap_token != token:
                    heapq.heappop(self._heap)  # stale: forgotten or rescheduled since
                    continue
                if deadline > now:
                    break
                heapq.heappop(self._heap)
                candidate.heap_token = -1
                return candidate
            timeout = self._heap[0][0] - now if self._heap else None
            self._cond.wait(timeout)
        return None

    def _decide(self, candidate: _Candidate, submits: int, look: Look) -> _Verdict:
        """Under the lock: fold a look into the candidate; say what to report, if anything."""
        path = candidate.path
        if self._candidates.get(path) is not candidate or candidate.submits != submits:
            # Forgotten, or a new event came while we looked; that submit set its own deadline.
            return _Verdict()
        now = self._clock()
        if look.vanished:
            del self._candidates[path]
            log.debug("settle_vanished", path=str(path))
            return _Verdict()
        if look.verified is not None:
            candidate.verified = look.verified
        st = look.st
        observation = UNREADABLE if st is None else observation_of(st)
        if candidate.reported is not None:
            if observation == candidate.reported:
                return _Verdict()  # still the state we reported; stay parked
            # Changed since we gave up on it: a fresh start, with a fresh max_wait window.
            candidate.reported = None
            candidate.pending_since = now
        if st is None:
            # Unreadable (permissions, I/O error): keep trying until max_wait says otherwise.
            return self._not_ready(candidate, now, None, look.unreadable_reason or "")
        if look.not_regular_reason is not None:
            candidate.reported = observation
            return _Verdict(incomplete_reason=look.not_regular_reason, incomplete_stat=st)
        if observation != candidate.observation:
            candidate.observation = observation
            candidate.observed_since = now
        stable_seconds = now - candidate.observed_since
        image_reason = self._image_reason(candidate, observation)
        if image_reason is None and self._settled(candidate, stable_seconds):
            del self._candidates[path]
            return _Verdict(ready_stat=st)
        if image_reason == ImageVerdict.NOT_AN_IMAGE and stable_seconds >= self._settle_seconds:
            # No amount of waiting turns this into an image: hand it on now, and let the
            # classifier park it with the same reason a folder walk would give.
            del self._candidates[path]
            return _Verdict(ready_stat=st)
        if image_reason is not None and stable_seconds >= self._settle_seconds:
            reason = image_reason
        else:
            reason = f"still changing after {self._max_wait_seconds:g} s"
        return self._not_ready(candidate, now, st, reason)

    def _image_reason(self, candidate: _Candidate, observation: Observation) -> str | None:
        """Why the image is not complete (None when it is, or when not checking images)."""
        if not self._verify_image:
            return None
        if candidate.verified is None or candidate.verified[0] != observation:
            return "image not checked yet"
        return candidate.verified[1]

    def _settled(self, candidate: _Candidate, stable_seconds: float) -> bool:
        if stable_seconds >= self._settle_seconds:
            return True
        if not candidate.closed_hint:
            return False
        # The image check (done with size and mtime equal before and after) stands in for
        # waiting; without it, the file must hold still for the grace after the close.
        return self._verify_image or stable_seconds >= CLOSE_GRACE_SECONDS

    def _not_ready(
        self,
        candidate: _Candidate,
        now: float,
        st: os.stat_result | None,
        reason: str,
    ) -> _Verdict:
        observation = UNREADABLE if st is None else observation_of(st)
        give_up_at = candidate.pending_since + self._max_wait_seconds
        if now >= give_up_at:
            # Parked on this state: a new look at the same size and mtime stays quiet.
            candidate.reported = observation
            return _Verdict(incomplete_reason=reason, incomplete_stat=st)
        wait_seconds = self._settle_seconds
        if candidate.closed_hint and not self._verify_image:
            wait_seconds = CLOSE_GRACE_SECONDS
        next_look = now + wait_seconds
        if observation != UNREADABLE and candidate.observed_since + wait_seconds > now:
            next_look = candidate.observed_since + wait_seconds
        self._schedule(candidate, min(next_look, give_up_at))
        return _Verdict()

    def _schedule(self, candidate: _Candidate, deadline: float) -> None:
        """Under the lock: (re)set the candidate's next look; a busy writer cannot push it past
        the end of its max_wait window."""
        if not candidate.parked:
            deadline = min(deadline, candidate.pending_since + self._max_wait_seconds)
        token = next(self._tokens)
        candidate.heap_token = token
        heapq.heappush(self._heap, (deadline, token, candidate.path))
        self._cond.notify()


def _report(sink: SettleSink, path: Path, plans: tuple[WatchPlan, ...], verdict: _Verdict) -> None:
    try:
        if verdict.ready_stat is not None:
            log.debug("settle_ready", path=str(path), size_bytes=verdict.ready_stat.st_size)
            sink.on_ready(ReadyFile(path, plans, verdict.ready_stat))
        elif verdict.incomplete_reason is not None:
            log.info("settle_incomplete", path=str(path), reason=verdict.incomplete_reason)
            sink.on_incomplete(
                IncompleteFile(path, plans, verdict.incomplete_reason, verdict.incomplete_stat)
            )
    except Exception:
        # A failing consumer must not stop the settling of every other file.
        log.exception("settle_callback_failed", path=str(path))


def _by_key(plans: tuple[WatchPlan, ...], more: Sequence[WatchPlan]) -> tuple[WatchPlan, ...]:
    """`plans` and `more`, one per watch; for a watch in both, the one from `more` (newer)."""
    if not more:
        return plans
    merged = {plan.key: plan for plan in plans}
    merged.update((plan.key, plan) for plan in more)
    return tuple(merged.values())
