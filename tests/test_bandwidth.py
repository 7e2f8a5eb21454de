"""TokenBucket: the real rate over real time, and its bookkeeping on a clock we move by hand."""

from __future__ import annotations

import threading
import time

import pytest

from watcher.nucleus import TokenBucket

CHUNK_BYTES = 256 * 1024


class HandClock:
    """A clock that only moves when the bucket sleeps, so waits are exact and instant."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def _send(bucket: TokenBucket, total_bytes: int) -> None:
    remaining = total_bytes
    while remaining > 0:
        chunk = min(CHUNK_BYTES, remaining)
        bucket.take(chunk)
        remaining -= chunk


def test_three_megabytes_at_one_megabyte_per_second_take_three_seconds() -> None:
    bucket = TokenBucket(1_000_000)

    started = time.monotonic()
    _send(bucket, 3_000_000)
    elapsed_seconds = time.monotonic() - started

    assert elapsed_seconds == pytest.approx(3.0, rel=0.15)


def test_two_threads_share_the_rate_and_both_make_progress() -> None:
    bucket = TokenBucket(1_000_000)
    finished_at: dict[str, float] = {}
    started = time.monotonic()

    def worker(name: str) -> None:
        _send(bucket, 1_500_000)
        finished_at[name] = time.monotonic() - started

    threads = [threading.Thread(target=worker, args=(name,)) for name in ("a", "b")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)

    # Together they get the one rate, not one each ...
    assert max(finished_at.values()) == pytest.approx(3.0, rel=0.15)
    # ... and neither waits for the other to finish first: their chunks interleave.
    assert min(finished_at.values()) > 2.2


def test_a_full_bucket_lets_the_burst_through_at_once() -> None:
    clock = HandClock()
    bucket = TokenBucket(1000, burst_bytes=500, clock=clock, sleep=clock.sleep)

    bucket.take(500)

    assert clock.sleeps == []
    assert bucket.rate_bytes_per_second == 1000
    assert bucket.burst_bytes == 500


def test_a_take_larger_than_the_burst_goes_in_burst_sized_parts() -> None:
    clock = HandClock()
    bucket = TokenBucket(1000, burst_bytes=500, clock=clock, sleep=clock.sleep)

    bucket.take(2500)

    # The first 500 bytes were in the bucket; each further part waits for its own refill.
    assert clock.sleeps == pytest.approx([0.5, 0.5, 0.5, 0.5])
    assert clock.now - 100.0 == pytest.approx(2.0)


def test_idle_time_refills_but_never_beyond_the_burst() -> None:
    clock = HandClock()
    bucket = TokenBucket(1000, burst_bytes=500, clock=clock, sleep=clock.sleep)
    bucket.take(500)

    clock.now += 60.0  # a long pause earns no more than one burst
    bucket.take(500)
    bucket.take(300)

    assert clock.sleeps == pytest.approx([0.3])


def test_default_burst_is_an_eighth_of_a_second_but_at_least_64_kib() -> None:
    assert TokenBucket(8_000_000).burst_bytes == 1_000_000
    assert TokenBucket(10_000).burst_bytes == 64 * 1024


def test_nothing_to_send_never_waits() -> None:
    clock = HandClock()
    bucket = TokenBucket(1, burst_bytes=1, clock=clock, sleep=clock.sleep)
    bucket.take(1)

    bucket.take(0)

    assert clock.sleeps == []


@pytest.mark.parametrize(("rate", "burst"), [(0, None), (-5, None), (1000, 0)])
def test_nonsense_settings_are_refused(rate: int, burst: int | None) -> None:
    with pytest.raises(ValueError, match="must be positive"):
        TokenBucket(rate, burst)
