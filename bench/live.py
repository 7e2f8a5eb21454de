"""Live latency: from a writer closing a finished JPEG in a watched folder to the devserver
having stored it, with `nucleus-watcher run` in between (settle.seconds = 1, verify_image on)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import StoreClock, percentile, running_daemon, write_bench_config
from bench.workloads import small_jpeg_payloads
from watcher.devserver import DevServer

SETTLE_SECONDS = 1.0
TRICKLE_FILES_PER_SECOND = 5
BURST_FILES = 500
DATASET_ID = "ds_live"


@dataclass
class Latencies:
    name: str
    seconds: list[float] = field(default_factory=list)
    missing: int = 0
    duration_seconds: float = 0.0
    request_item_counts: list[int] = field(default_factory=list)

    @property
    def items_per_request(self) -> float:
        counts = self.request_item_counts
        return sum(counts) / len(counts) if counts else float("nan")

    def pct(self, value: float) -> float:
        return percentile(self.seconds, value)


@dataclass
class LiveResult:
    settle_seconds: float
    trickle_seconds: float
    trickle: Latencies
    burst: Latencies


def _write_closed(path: Path, data: bytes) -> float:
    """Write the whole file, close it, and return the monotonic time of the close."""
    with open(path, "wb") as out:
        out.write(data)
    return time.monotonic()


def _latencies(
    name: str, clock: StoreClock, closed_at: dict[str, float], started: float
) -> Latencies:
    """Close-to-stored times of the files written since `started`, and the requests that
    carried them."""
    ended = time.monotonic()
    result = Latencies(name, duration_seconds=ended - started)
    result.request_item_counts = clock.appends_between(started, ended)
    for reference_id, closed in closed_at.items():
        stored = clock.stored_at.get(reference_id)
        if stored is None:
            result.missing += 1
        else:
            result.seconds.append(stored - closed)
    return result


def run_live(workdir: Path, trickle_seconds: float) -> LiveResult:
    watch_root = workdir / "watch"
    for folder in ("trickle", "burst"):
        (watch_root / folder).mkdir(parents=True, exist_ok=True)
    trickle_count = round(trickle_seconds * TRICKLE_FILES_PER_SECOND)
    # Made before the daemon starts: the writer's own time is then only write() and close().
    trickle_payloads = small_jpeg_payloads(trickle_count, first_seed=100_000)
    burst_payloads = small_jpeg_payloads(BURST_FILES, first_seed=200_000)

    clock = StoreClock(DATASET_ID)
    server = DevServer(data_dir=workdir / "devserver", on_request=clock.on_request)
    clock.server = server
    server.start()
    try:
        config = write_bench_config(
            workdir,
            endpoint=server.base_url,
            watch_root=watch_root,
            dataset_id=DATASET_ID,
            overrides={"settle": {"seconds": SETTLE_SECONDS, "verify_image": True}},
        )
        with running_daemon(config, workdir / "daemon"):
            time.sleep(1.0)  # let the start-up settle; nothing is pending
            trickle_closed: dict[str, float] = {}
            started = time.monotonic()
            for index, data in enumerate(trickle_payloads):
                due = started + index / TRICKLE_FILES_PER_SECOND
                time.sleep(max(0.0, due - time.monotonic()))
                relpath = f"trickle/frame_{index:06d}.jpg"
                trickle_closed[relpath] = _write_closed(watch_root / relpath, data)
            clock.wait_for(list(trickle_closed), timeout_seconds=60)
            trickle = _latencies("trickle", clock, trickle_closed, started)
            print(
                f"  live trickle: {len(trickle.seconds)} files, p50 {trickle.pct(50):.3f} s",
                flush=True,
            )

            time.sleep(2.0)
            burst_closed: dict[str, float] = {}
            started = time.monotonic()
            for index, data in enumerate(burst_payloads):
                relpath = f"burst/frame_{index:06d}.jpg"
                burst_closed[relpath] = _write_closed(watch_root / relpath, data)
            clock.wait_for(list(burst_closed), timeout_seconds=300)
            burst = _latencies("burst", clock, burst_closed, started)
            print(
                f"  live burst: {len(burst.seconds)} files, p50 {burst.pct(50):.3f} s",
                flush=True,
            )
    finally:
        server.stop()
    return LiveResult(SETTLE_SECONDS, trickle_seconds, trickle, burst)
