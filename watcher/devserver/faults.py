"""Fault injection: the kinds there are, and which append request gets which fault."""

from __future__ import annotations

import collections
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

FAULT_KINDS: Final = ("500", "503", "429", "reset", "stall", "drip", "lost")


# --------------------------------------------------------------------------- faults


@dataclass(frozen=True)
class _Fault:
    kind: str
    retry_after_seconds: float


class _FaultPlan:
    """Which append request gets which fault: a queue first, then a random rate."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._queue: collections.deque[_Fault] = collections.deque()
        self._rate = 0.0
        self._rate_kinds: tuple[str, ...] = ()
        self._rate_retry_after_seconds = 1.0
        self._rng = random.Random(0)

    def enqueue(self, kinds: Sequence[str], retry_after_seconds: float) -> None:
        _check_fault_kinds(kinds)
        with self._lock:
            self._queue.extend(_Fault(kind, retry_after_seconds) for kind in kinds)

    def set_rate(
        self, rate: float, kinds: Sequence[str], seed: int, retry_after_seconds: float
    ) -> None:
        if not 0.0 <= rate <= 1.0:
            raise ValueError(f"fault rate must be between 0 and 1, got {rate}")
        if rate > 0 and not kinds:
            raise ValueError("a fault rate above 0 needs at least one fault kind")
        _check_fault_kinds(kinds)
        with self._lock:
            self._rate = rate
            self._rate_kinds = tuple(kinds)
            self._rate_retry_after_seconds = retry_after_seconds
            self._rng = random.Random(seed)

    def next_fault(self) -> _Fault | None:
        with self._lock:
            if self._queue:
                return self._queue.popleft()
            if self._rate > 0 and self._rng.random() < self._rate:
                kind = self._rng.choice(self._rate_kinds)
                return _Fault(kind, self._rate_retry_after_seconds)
            return None


def _check_fault_kinds(kinds: Sequence[str]) -> None:
    unknown = [kind for kind in kinds if kind not in FAULT_KINDS]
    if unknown:
        raise ValueError(f"unknown fault kind(s) {unknown}; known: {', '.join(FAULT_KINDS)}")


def _retry_after_text(seconds: float) -> str:
    # Whole seconds as HTTP says; fractions are kept so tests need not wait a full second.
    return str(int(seconds)) if float(seconds).is_integer() else f"{seconds:g}"
