"""Scale: a `scan` of 100,000 new tiny JPEGs into the store (and up to the devserver), then the
start-up reconcile of `run` over the same 100,000 files, all already uploaded, and a `scan` with
nothing to do."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.harness import log_events, read_memory, run_scan, running_daemon, write_bench_config
from bench.workloads import wait_until_older_than, write_tiny_jpegs
from watcher.devserver import DevServer

DATASET_ID = "ds_scale"


@dataclass
class Reconcile:
    seconds: float
    files_seen: int
    queued_new: int
    unchanged: int


@dataclass
class ScaleResult:
    files: int
    file_bytes: int
    write_seconds: float
    new_scan_wall_seconds: float
    new_scan_reconcile: Reconcile  # the walk that queued every file into the store
    daemon_ready_seconds: float  # spawn to READY=1, the start-up reconcile included
    daemon_reconcile: Reconcile
    daemon_startup_peak_bytes: int  # VmHWM at READY: the start-up reconcile's peak
    daemon_settled_rss_bytes: int  # VmRSS 3 s later
    idle_scan_wall_seconds: float
    idle_scan_reconcile: Reconcile


def _reconcile_of(events: list[dict[str, Any]], where: str) -> Reconcile:
    if not events:
        raise RuntimeError(f"no reconcile_done in the log of {where}")
    first = events[0]
    return Reconcile(
        float(first["seconds"]),
        int(first["files_seen"]),
        int(first["queued_new"]),
        int(first["unchanged"]),
    )


def run_scale(workdir: Path, count: int) -> ScaleResult:
    watch_root = workdir / "watch"
    started = time.monotonic()
    files = write_tiny_jpegs(watch_root, count)
    write_seconds = time.monotonic() - started
    wait_until_older_than(files.paths()[-10:], 2.0)
    print(f"  scale: {count} tiny files written in {write_seconds:.1f} s", flush=True)

    server = DevServer(data_dir=workdir / "devserver").start()
    try:
        config = write_bench_config(
            workdir, endpoint=server.base_url, watch_root=watch_root, dataset_id=DATASET_ID
        )
        new_dir = workdir / "scan-new"
        new_dir.mkdir()
        new_scan = run_scan(config, new_dir, timeout_seconds=1800)
        stored = len(server.items(DATASET_ID))
        if new_scan.returncode != 0 or stored != count:
            raise RuntimeError(f"scan of new files: exit {new_scan.returncode}, {stored} stored")
        new_reconcile = _reconcile_of(log_events(new_scan.log_path, "reconcile_done"), "scan")
        print(
            f"  scale: new-file scan {new_scan.wall_seconds:.1f} s"
            f" (walk into store {new_reconcile.seconds:.1f} s)",
            flush=True,
        )

        started = time.monotonic()
        with running_daemon(config, workdir / "daemon", ready_timeout_seconds=600) as daemon:
            ready_seconds = time.monotonic() - started
            assert daemon.process is not None
            startup_peak = read_memory(daemon.process.pid).peak_bytes
            time.sleep(3.0)
            settled_rss = read_memory(daemon.process.pid).rss_bytes
            daemon_reconcile = _reconcile_of(log_events(daemon.log_path, "reconcile_done"), "run")
        print(f"  scale: daemon start-up reconcile {daemon_reconcile.seconds:.2f} s", flush=True)

        idle_dir = workdir / "scan-idle"
        idle_dir.mkdir()
        idle_scan = run_scan(config, idle_dir, timeout_seconds=1200)
        if idle_scan.returncode != 0:
            raise RuntimeError(f"scan with nothing to do: exit {idle_scan.returncode}")
        idle_reconcile = _reconcile_of(log_events(idle_scan.log_path, "reconcile_done"), "scan")
    finally:
        server.stop()
    return ScaleResult(
        files=count,
        file_bytes=files.total_bytes,
        write_seconds=write_seconds,
        new_scan_wall_seconds=new_scan.wall_seconds,
        new_scan_reconcile=new_reconcile,
        daemon_ready_seconds=ready_seconds,
        daemon_reconcile=daemon_reconcile,
        daemon_startup_peak_bytes=startup_peak,
        daemon_settled_rss_bytes=settled_rss,
        idle_scan_wall_seconds=idle_scan.wall_seconds,
        idle_scan_reconcile=idle_reconcile,
    )
