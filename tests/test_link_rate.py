"""How request size and requests in flight follow the measured uplink rate (times are given, so
nothing here waits), and the store's byte budget for a claimed batch."""

from __future__ import annotations

from pathlib import Path

import pytest

from watcher.pipeline import START_RATE_BYTES_PER_SECOND, LinkRate, RequestShape
from watcher.store import Candidate, StateStore

MB = 1_000_000


def four_workers(target_seconds: float = 30.0) -> LinkRate:
    return LinkRate(concurrency=4, max_files_per_request=10, target_seconds=target_seconds)


def test_before_any_measurement_requests_are_sized_for_the_thinnest_link() -> None:
    assert four_workers().shape() == RequestShape(4, START_RATE_BYTES_PER_SECOND * 30)


def test_a_fast_link_gets_full_batches_from_every_worker() -> None:
    link = four_workers()
    link.record(0.0, 0.05, 10 * 200_000, files=10)  # 40 MB/s

    assert link.shape() == RequestShape(4, None)


def test_a_thin_link_gets_two_requests_sized_to_the_target_time() -> None:
    link = four_workers()
    link.record(0.0, 5.0, 5 * MB, files=1)  # one 5 MB camera frame at 1 MB/s

    # 30 s at 1 MB/s is 30 MB, shared by the two requests in flight.
    assert link.shape() == RequestShape(2, 15 * MB)


def test_idle_time_between_requests_is_not_counted_against_the_link() -> None:
    link = four_workers()
    link.record(0.0, 1.0, MB, files=1)
    link.record(100.0, 101.0, MB, files=1)  # a trickle: a file now and then

    assert link.rate_bytes_per_second == pytest.approx(MB)


def test_requests_in_flight_together_share_the_time_they_took() -> None:
    link = four_workers()
    # Two 2 MB requests side by side for the same 4 s: the link moved 1 MB/s in all.
    link.record(0.0, 4.0, 2 * MB, files=1)
    link.record(0.0, 4.0, 2 * MB, files=1)

    assert link.rate_bytes_per_second == pytest.approx(MB)


def test_the_rate_follows_the_recent_requests() -> None:
    link = four_workers()
    for second in range(8):
        link.record(second, second + 1.0, 100_000, files=1)  # 100 kB/s
    slow = link.shape()
    for second in range(8, 16):
        link.record(second, second + 0.01, 10 * 100_000, files=10)  # then 100 MB/s

    assert slow.max_in_flight == 2
    assert link.shape() == RequestShape(4, None)


def _queue(store: StateStore, tmp_path: Path, sizes: list[int], remote: bool = False) -> None:
    for index, size in enumerate(sizes):
        store.record_candidate(
            Candidate(
                watch=str(tmp_path),
                relpath=f"f{index}.jpg",
                dataset_id="ds",
                reference_id=f"f{index}",
                size_bytes=size,
                mtime_ns=index,
                content_sha256=f"{index:064x}",
                metadata={},
                metadata_sha256="m",
                remote_url=f"https://images.example.com/f{index}.jpg" if remote else None,
            ),
            now=0.0,
        )


def test_a_claim_stops_before_the_file_that_would_pass_the_byte_budget(tmp_path: Path) -> None:
    store = StateStore.open(tmp_path / "state.db")
    try:
        _queue(store, tmp_path, [3 * MB, 4 * MB, 2 * MB, 1 * MB])
        first = store.claim_batch(10, now=1.0, max_bytes=8 * MB)
        second = store.claim_batch(10, now=1.0, max_bytes=MB)  # smaller than any: still one
        rest = store.claim_batch(10, now=1.0)
    finally:
        store.close()

    assert [r.reference_id for r in first] == ["f0", "f1"]
    assert [r.reference_id for r in second] == ["f2"]
    assert [r.reference_id for r in rest] == ["f3"]


def test_a_byte_budget_does_not_limit_remote_urls(tmp_path: Path) -> None:
    # The local file only marks the item; the service fetches the URL, our uplink sends none.
    store = StateStore.open(tmp_path / "state.db")
    try:
        _queue(store, tmp_path, [5 * MB] * 4, remote=True)
        batch = store.claim_batch(10, now=1.0, max_bytes=MB)
    finally:
        store.close()

    assert len(batch) == 4
