"""Footprint of `nucleus-watcher run`: RSS idle with 10,000 uploaded files, during a burst and
during a 1 GB upload; CPU time while idle. Read from /proc/<pid>/status and /proc/<pid>/stat."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

from bench.harness import (
    RssSampler,
    StoreClock,
    cpu_seconds,
    read_memory,
    reset_peak,
    run_scan,
    running_daemon,
    write_bench_config,
)
from bench.workloads import small_jpeg_payloads, wait_until_older_than, write_tiny_jpegs
from tests.imagefactory import write_large_jpeg
from watcher.devserver import DevServer

WATCHED_FILES = 10_000
BURST_FILES = 500
LARGE_FILE_BYTES = 1_000_000_000
DATASET_ID = "ds_footprint"


@dataclass
class Phase:
    """Memory over one phase: `steady` is the median sample, `peak` VmHWM after a reset."""

    steady_bytes: int
    peak_bytes: int
    seconds: float
    cpu_seconds: float


@dataclass
class FootprintResult:
    watched_files: int
    startup_rss_bytes: int  # VmRSS right after READY
    startup_peak_bytes: int  # VmHWM right after READY: includes the start-up reconcile
    idle: Phase
    burst: Phase
    large: Phase
    large_file_bytes: int
    peak_reset_worked: bool
    preload_scan_seconds: float


def _phase_peak(pid: int, sampler: RssSampler, reset_worked: bool) -> int:
    # VmHWM catches spikes between samples; without a reset it would still hold older peaks.
    return read_memory(pid).peak_bytes if reset_worked else sampler.max_bytes


def run_footprint(workdir: Path, idle_seconds: float) -> FootprintResult:
    watch_root = workdir / "watch"
    files = write_tiny_jpegs(watch_root, WATCHED_FILES)
    for folder in ("burst", "big"):
        (watch_root / folder).mkdir(parents=True, exist_ok=True)
    staging = workdir / "staging"
    staging.mkdir(parents=True, exist_ok=True)
    burst_payloads = small_jpeg_payloads(BURST_FILES, first_seed=300_000)
    wait_until_older_than(files.paths()[-10:], 2.0)

    clock = StoreClock(DATASET_ID)
    server = DevServer(data_dir=workdir / "devserver", on_request=clock.on_request)
    server.start()
    try:
        config = write_bench_config(
            workdir,
            endpoint=server.base_url,
            watch_root=watch_root,
            dataset_id=DATASET_ID,
            overrides={"upload": {"max_file_bytes": 2 * LARGE_FILE_BYTES}},
        )
        preload = run_scan(config, workdir, timeout_seconds=1200)
        if preload.returncode != 0 or len(server.items(DATASET_ID)) != WATCHED_FILES:
            raise RuntimeError(f"preload scan failed ({preload.returncode}): {preload.summary}")
        print(f"  footprint: {WATCHED_FILES} files uploaded by scan", flush=True)

        with running_daemon(config, workdir / "daemon") as daemon:
            assert daemon.process is not None
            pid = daemon.process.pid
            startup = read_memory(pid)
            time.sleep(5.0)

            reset_worked = reset_peak(pid)
            cpu_before = cpu_seconds(pid)
            started = time.monotonic()
            with RssSampler(pid, 0.5, idle_seconds + 5) as sampler:
                time.sleep(idle_seconds)
            idle = Phase(
                sampler.median_bytes,
                _phase_peak(pid, sampler, reset_worked),
                time.monotonic() - started,
                cpu_seconds(pid) - cpu_before,
            )
            print(
                f"  footprint idle: RSS {idle.steady_bytes / 2**20:.1f} MiB,"
                f" CPU {idle.cpu_seconds:.2f} s in {idle.seconds:.0f} s",
                flush=True,
            )

            clock.server = server  # from here on, note when items arrive
            reset_peak(pid)
            cpu_before = cpu_seconds(pid)
            started = time.monotonic()
            burst_ids = [f"burst/frame_{index:06d}.jpg" for index in range(BURST_FILES)]
            with RssSampler(pid, 0.02, 300) as sampler:
                for relpath, data in zip(burst_ids, burst_payloads, strict=True):
                    (watch_root / relpath).write_bytes(data)
                if not clock.wait_for(burst_ids, timeout_seconds=300):
                    raise RuntimeError("burst not stored within 300 s")
            burst = Phase(
                sampler.median_bytes,
                _phase_peak(pid, sampler, reset_worked),
                time.monotonic() - started,
                cpu_seconds(pid) - cpu_before,
            )
            print(f"  footprint burst: peak RSS {burst.peak_bytes / 2**20:.1f} MiB", flush=True)

            time.sleep(3.0)
            big_name = "frame_900000.jpg"
            staged = staging / big_name
            write_large_jpeg(staged, LARGE_FILE_BYTES, seed=9)
            large_bytes = staged.stat().st_size
            reset_peak(pid)
            cpu_before = cpu_seconds(pid)
            started = time.monotonic()
            with RssSampler(pid, 0.02, 600) as sampler:
                os.rename(staged, watch_root / "big" / big_name)  # appears whole, like `mv`
                if not clock.wait_for([f"big/{big_name}"], timeout_seconds=600):
                    raise RuntimeError("1 GB file not stored within 600 s")
            large = Phase(
                sampler.median_bytes,
                _phase_peak(pid, sampler, reset_worked),
                time.monotonic() - started,
                cpu_seconds(pid) - cpu_before,
            )
            print(
                f"  footprint 1 GB: peak RSS {large.peak_bytes / 2**20:.1f} MiB"
                f" in {large.seconds:.1f} s",
                flush=True,
            )
    finally:
        server.stop()
    return FootprintResult(
        watched_files=WATCHED_FILES,
        startup_rss_bytes=startup.rss_bytes,
        startup_peak_bytes=startup.peak_bytes,
        idle=idle,
        burst=burst,
        large=large,
        large_file_bytes=large_bytes,
        peak_reset_worked=reset_worked,
        preload_scan_seconds=preload.wall_seconds,
    )
