"""Backfill throughput: `nucleus-watcher scan` against the official client, same files, same
devserver, both as fresh subprocesses, runs alternated, median taken."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from bench.harness import median, run_scan, subprocess_env, write_bench_config
from bench.workloads import FileSet
from watcher.devserver import DevServer

OFFICIAL_SCRIPT = Path(__file__).resolve().parent / "official_append.py"
OURS_SYNC = "nucleus-watcher scan (sync)"
OURS_ASYNC = "nucleus-watcher scan (asynchronous=true)"
OFFICIAL = "official client 0.22.3"
# Our job poll in asynchronous mode: the official client's poll sleep is patched to 0, so ours
# is set as short as sensible rather than left at the 2 s default, to time transfer alone.
ASYNC_JOB_POLL_SECONDS = 0.05


@dataclass
class ToolTimes:
    tool: str
    wall_seconds: list[float] = field(default_factory=list)
    work_seconds: list[float] = field(default_factory=list)  # without start-up and imports

    @property
    def median_wall(self) -> float:
        return median(self.wall_seconds)

    @property
    def median_work(self) -> float:
        return median(self.work_seconds) if self.work_seconds else float("nan")


@dataclass
class WorkloadResult:
    name: str
    files: FileSet
    tools: dict[str, ToolTimes]


def _check_stored(server: DevServer, dataset_id: str, files: FileSet, who: str) -> None:
    items = server.items(dataset_id)
    stored_bytes = sum(item.image_size_bytes or 0 for item in items.values())
    if len(items) != files.count or stored_bytes != files.total_bytes:
        raise RuntimeError(
            f"{who}: devserver holds {len(items)} items / {stored_bytes} bytes in {dataset_id},"
            f" expected {files.count} / {files.total_bytes}"
        )


def _ours(
    server: DevServer, files: FileSet, workdir: Path, dataset_id: str, asynchronous: bool
) -> tuple[float, float]:
    overrides: dict[str, dict[str, object]] = {}
    if asynchronous:
        overrides["nucleus"] = {"asynchronous": True, "job_poll_seconds": ASYNC_JOB_POLL_SECONDS}
    config = write_bench_config(
        workdir,
        endpoint=server.base_url,
        watch_root=files.root,
        dataset_id=dataset_id,
        overrides=overrides,
    )
    outcome = run_scan(config, workdir, timeout_seconds=1200)
    if outcome.returncode != 0:
        raise RuntimeError(f"scan exited {outcome.returncode}: {outcome.summary}")
    _check_stored(server, dataset_id, files, "scan")
    reported = outcome.reported_seconds()
    return outcome.wall_seconds, reported if reported is not None else float("nan")


def _official(
    server: DevServer, files: FileSet, workdir: Path, dataset_id: str
) -> tuple[float, float]:
    workdir.mkdir(parents=True, exist_ok=True)
    result_path = workdir / "result.json"
    command = [
        sys.executable,
        str(OFFICIAL_SCRIPT),
        "--endpoint",
        server.base_url,
        "--dataset",
        dataset_id,
        "--root",
        str(files.root),
        "--result",
        str(result_path),
    ]
    with (workdir / "stdout.log").open("wb") as out, (workdir / "stderr.log").open("wb") as err:
        started = time.perf_counter()
        completed = subprocess.run(
            command, stdout=out, stderr=err, env=subprocess_env(), timeout=1200, check=False
        )
        wall = time.perf_counter() - started
    if completed.returncode != 0:
        raise RuntimeError(
            f"official client exited {completed.returncode}; see {workdir / 'stderr.log'}"
        )
    _check_stored(server, dataset_id, files, "official client")
    result = json.loads(result_path.read_text())
    return wall, float(result["work_seconds"])


def run_workload(
    server: DevServer, name: str, files: FileSet, workdir: Path, runs: int, progress: bool = True
) -> WorkloadResult:
    tools = {tool: ToolTimes(tool) for tool in (OURS_SYNC, OFFICIAL, OURS_ASYNC)}
    for run in range(runs):
        for tool in (OURS_SYNC, OFFICIAL, OURS_ASYNC):  # alternated: ours, theirs, ours, ...
            slug = {OURS_SYNC: "sync", OFFICIAL: "official", OURS_ASYNC: "async"}[tool]
            dataset_id = f"ds_bf_{name}_{slug}_{run}"
            rundir = workdir / f"{name}-{slug}-{run}"
            if tool == OFFICIAL:
                wall, work = _official(server, files, rundir, dataset_id)
            else:
                wall, work = _ours(server, files, rundir, dataset_id, tool == OURS_ASYNC)
            tools[tool].wall_seconds.append(wall)
            tools[tool].work_seconds.append(work)
            if progress:
                print(
                    f"  backfill {name} run {run + 1}/{runs} {tool}: {wall:.2f} s"
                    f" ({files.count / wall:.0f} files/s)",
                    flush=True,
                )
    return WorkloadResult(name, files, tools)
