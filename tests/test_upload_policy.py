"""The backoff after transient failures: a growing, jittered ceiling, the server's Retry-After,
and never past retry_max_seconds."""

from __future__ import annotations

from watcher.pipeline import UploadPolicy, backoff_delay

POLICY = UploadPolicy(retry_initial_seconds=1.0, retry_max_seconds=300.0)


def test_the_first_failures_wait_at_most_the_doubling_ceiling() -> None:
    for failures, ceiling in ((1, 1.0), (2, 2.0), (3, 4.0), (9, 256.0), (10, 300.0)):
        delays = [backoff_delay(POLICY, failures, None) for _ in range(200)]
        assert all(0.0 <= delay <= ceiling for delay in delays), (failures, max(delays))


def test_the_servers_retry_after_is_waited_for_but_not_past_the_maximum() -> None:
    assert 10.0 <= backoff_delay(POLICY, 1, 10.0) <= 300.0
    assert backoff_delay(POLICY, 1, 10_000.0) == 300.0


def test_thousands_of_failures_in_a_row_still_give_a_delay() -> None:
    # A long outage: 2**5000 does not fit a float, so the doubling must stop somewhere.
    assert 0.0 <= backoff_delay(POLICY, 5_000, None) <= 300.0
    assert backoff_delay(POLICY, 5_000, 30.0) >= 30.0
