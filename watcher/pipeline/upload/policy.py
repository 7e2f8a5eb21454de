"""What the settings say about uploading, and the backoff delay they imply."""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Literal

_MAX_DOUBLINGS = 64


@dataclass(frozen=True)
class UploadPolicy:
    """The part of the settings the uploader needs."""

    concurrency: int = 4
    max_files_per_request: int = 10
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    on_conflict: Literal["skip", "update"] = "skip"
    newest_first: bool = False
    asynchronous: bool = False
    job_poll_seconds: float = 2.0
    # How long a request should take at the measured rate on a thin link (see link_rate.py).
    request_target_seconds: float = 30.0


def backoff_delay(
    policy: UploadPolicy, consecutive_failures: int, retry_after_seconds: float | None
) -> float:
    """How long every worker holds back after the `consecutive_failures`-th transient failure
    in a row: a growing ceiling with full jitter, at least the server's Retry-After, never more
    than `retry_max_seconds`."""
    # Capped: after ~1,000 failures in a row (a weekend-long outage) 2**n no longer converts to
    # a float, and the ceiling has long been at retry_max_seconds anyway.
    doublings = min(consecutive_failures - 1, _MAX_DOUBLINGS)
    ceiling = min(policy.retry_max_seconds, policy.retry_initial_seconds * 2**doublings)
    delay = random.uniform(0, ceiling)  # full jitter: a fleet does not retry in step
    if retry_after_seconds is not None:
        delay = min(max(delay, retry_after_seconds), policy.retry_max_seconds)
    return delay
