"""Benchmark nucleus-watcher on this machine and write a markdown report.

    python bench/run.py [--quick] [--out bench/RESULTS.md] [--only backfill,live,footprint,scale]

Everything happens in a temporary folder and against an in-process devserver on 127.0.0.1:
1. backfill throughput, `nucleus-watcher scan` vs the official client (bench/official_append.py);
2. live close-to-stored latency through `nucleus-watcher run`;
3. footprint of `run` (RSS idle, in a burst, during a 1 GB upload; idle CPU);
4. scale: scan of 100,000 new files, start-up reconcile of 100,000 uploaded ones.
"""

from __future__ import annotations

import argparse
import compileall
import math
import os
import platform
import sqlite3
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `bench`, `tests` and `watcher` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import backfill, footprint, live, scale
from bench.harness import REPO
from bench.workloads import (
    FileSet,
    wait_until_older_than,
    write_large_jpegs,
    write_small_jpegs,
)
from watcher.devserver import DevServer

SECTIONS = ("backfill", "live", "footprint", "scale")
SMALL_FILES = 2000
LARGE_FILES = 20
LARGE_FILE_BYTES = 20_000_000
MB = 1e6  # targets and tables use MB = 10^6 bytes


@dataclass(frozen=True)
class Plan:
    quick: bool
    runs: int
    trickle_seconds: float
    idle_seconds: float
    scale_files: int


@dataclass
class Results:
    plan: Plan
    started: datetime
    backfill: list[backfill.WorkloadResult] = field(default_factory=list)
    live: live.LiveResult | None = None
    footprint: footprint.FootprintResult | None = None
    scale: scale.ScaleResult | None = None
    errors: dict[str, str] = field(default_factory=dict)
    section_seconds: dict[str, float] = field(default_factory=dict)
    total_seconds: float = 0.0
    load_at_start: str = ""
    load_at_end: str = ""


# --------------------------------------------------------------------------- the machine


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_bytes() -> int:
    with open("/proc/meminfo", encoding="ascii") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024
    return 0


def _filesystem_of(path: Path) -> str:
    """The mount (device, type) holding `path`, from /proc/mounts."""
    best = ("?", "?", "")
    resolved = str(path.resolve())
    with open("/proc/mounts", encoding="utf-8") as mounts:
        for line in mounts:
            device, mountpoint, fstype = line.split()[:3]
            inside = resolved == mountpoint or resolved.startswith(mountpoint.rstrip("/") + "/")
            if inside and len(mountpoint) >= len(best[2]):
                best = (device, fstype, mountpoint)
    return f"{best[1]} on {best[0]} (mounted at {best[2]})"


def load_average() -> str:
    """1, 5 and 15 minute load averages: other work on the machine skews every number here."""
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine_rows(results: Results, workdir: Path) -> list[tuple[str, str]]:
    return [
        ("CPU", _cpu_model()),
        ("Cores (logical)", str(os.cpu_count())),
        ("RAM", f"{_ram_bytes() / 2**30:.1f} GiB"),
        ("Kernel", f"{platform.system()} {platform.release()}"),
        ("Python", sys.version.split()[0] + f" ({sys.executable})"),
        ("SQLite (linked)", sqlite3.sqlite_version),
        ("Work folder", _filesystem_of(workdir)),
        ("Load average (1/5/15 min) at start", results.load_at_start),
        ("Load average (1/5/15 min) at end", results.load_at_end),
    ]


# --------------------------------------------------------------------------- sections


def _backfill(results: Results, workdir: Path) -> None:
    small_root = workdir / "files-small"
    large_root = workdir / "files-large"
    print(f"making {SMALL_FILES} ~50 KB and {LARGE_FILES} ~20 MB JPEGs", flush=True)
    small = write_small_jpegs(small_root, SMALL_FILES)
    large = write_large_jpegs(large_root, LARGE_FILES, LARGE_FILE_BYTES)
    wait_until_older_than(small.paths()[-10:] + large.paths()[-2:], 2.0)
    server = DevServer(data_dir=workdir / "devserver-backfill").start()
    try:
        workloads: list[tuple[str, FileSet]] = [("small", small), ("large", large)]
        for name, files in workloads:
            results.backfill.append(
                backfill.run_workload(
                    server, name, files, workdir / "backfill-runs", results.plan.runs
                )
            )
    finally:
        server.stop()


def _live(results: Results, workdir: Path) -> None:
    results.live = live.run_live(workdir / "live", results.plan.trickle_seconds)


def _footprint(results: Results, workdir: Path) -> None:
    results.footprint = footprint.run_footprint(workdir / "footprint", results.plan.idle_seconds)


def _scale(results: Results, workdir: Path) -> None:
    results.scale = scale.run_scale(workdir / "scale", results.plan.scale_files)


RUNNERS: dict[str, Callable[[Results, Path], None]] = {
    "backfill": _backfill,
    "live": _live,
    "footprint": _footprint,
    "scale": _scale,
}


# --------------------------------------------------------------------------- the report


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines.extend("| " + " | ".join(row) + " |" for row in rows)
    return [*lines, ""]


def _verdict(ok: bool | None) -> str:
    if ok is None:
        return "n/a"
    return "**pass**" if ok else "**MISS**"


def _mb(value_bytes: float) -> str:
    return f"{value_bytes / MB:.1f} MB"


def _ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.0f} ms"


def _workload(results: Results, name: str) -> backfill.WorkloadResult | None:
    return next((w for w in results.backfill if w.name == name), None)


def _ratio(result: backfill.WorkloadResult, tool: str) -> float:
    return result.tools[backfill.OFFICIAL].median_wall / result.tools[tool].median_wall


def _targets(results: Results) -> list[list[str]]:
    rows: list[list[str]] = []
    for name, label, need in (
        ("small", "Backfill, 2,000 x ~50 KB: ours/official (sync scan)", 1.3),
        ("large", "Backfill, 20 x ~20 MB: ours/official (sync scan)", 1.0),
    ):
        found = _workload(results, name)
        if found is None:
            rows.append([label, f">= {need:.1f}x", "not run", _verdict(None)])
            continue
        ratio = _ratio(found, backfill.OURS_SYNC)
        rows.append([label, f">= {need:.1f}x", f"{ratio:.2f}x", _verdict(ratio >= need)])
    if results.live is not None:
        limit = results.live.settle_seconds + 0.150
        for phase in (results.live.trickle, results.live.burst):
            p50 = phase.pct(50)
            rows.append(
                [
                    f"Live p50, {phase.name} (settle {results.live.settle_seconds:g} s)",
                    f"< {_ms(limit)}",
                    _ms(p50),
                    _verdict(p50 < limit and phase.missing == 0),
                ]
            )
    else:
        rows.append(["Live p50 (settle 1 s)", "< 1150 ms", "not run", _verdict(None)])
    fp = results.footprint
    if fp is not None:
        rows.append(
            [
                f"Idle RSS of `run`, {fp.watched_files:,} files uploaded",
                "< 60 MB",
                _mb(fp.idle.steady_bytes) + f" (peak {_mb(fp.idle.peak_bytes)})",
                _verdict(fp.idle.steady_bytes < 60 * MB),
            ]
        )
        growth = fp.large.peak_bytes - fp.idle.steady_bytes
        rows.append(
            [
                "RSS during 1 GB upload, above idle",
                "<= 32 MB",
                f"+{_mb(growth)} (peak {_mb(fp.large.peak_bytes)})",
                _verdict(growth <= 32 * MB),
            ]
        )
        share = 100 * fp.idle.cpu_seconds / max(fp.idle.seconds, 1e-9)
        rows.append(
            [
                f"Idle CPU over {fp.idle.seconds:.0f} s, {fp.watched_files:,} watched files",
                "~0 (< 1 % of a core)",
                f"{fp.idle.cpu_seconds:.2f} s CPU ({share:.2f} %)",
                _verdict(share < 1.0),
            ]
        )
    else:
        rows.append(["Footprint", "", "not run", _verdict(None)])
    sc = results.scale
    if sc is not None:
        per_100k = sc.daemon_reconcile.seconds * 100_000 / sc.files
        measured = f"{sc.daemon_reconcile.seconds:.2f} s for {sc.files:,}"
        if sc.files != 100_000:
            measured += f" (x{100_000 / sc.files:g} = {per_100k:.1f} s)"
        rows.append(
            [
                "Start-up reconcile, 100,000 uploaded files",
                "< 15 s",
                measured,
                _verdict(per_100k < 15.0),
            ]
        )
    else:
        rows.append(["Start-up reconcile, 100,000 files", "< 15 s", "not run", _verdict(None)])
    return rows


def _backfill_section(results: Results) -> list[str]:
    lines = ["## 1. Backfill throughput", ""]
    if not results.backfill:
        return [*lines, f"Not run. {results.errors.get('backfill', '')}", ""]
    lines += [
        f"Median of {results.plan.runs} runs per tool, alternated (ours sync, official, ours"
        " async, ...). Wall time is spawn to exit of a fresh process (fresh state db and"
        " dataset id each run), so both pay interpreter start-up and imports; *in-process* is"
        " each tool's own clock after its imports (`scan`'s summary line; the official script's"
        " timer from after `import nucleus` to the last job `Completed`).",
        "",
    ]
    for result in results.backfill:
        files = result.files
        lines.append(
            f"**{result.name}**: {files.count:,} files, {files.total_bytes / MB:,.1f} MB"
            f" ({files.total_bytes / files.count / 1000:,.1f} KB each)"
        )
        lines.append("")
        rows: list[list[str]] = []
        for tool, times in result.tools.items():
            wall = times.median_wall
            ratio = "1.00x" if tool == backfill.OFFICIAL else f"{_ratio(result, tool):.2f}x"
            rows.append(
                [
                    tool,
                    f"{wall:.2f} s",
                    f"{files.count / wall:,.0f}",
                    f"{files.total_bytes / MB / wall:,.1f}",
                    ratio,
                    f"{times.median_work:.2f} s",
                    ", ".join(f"{s:.2f}" for s in times.wall_seconds),
                ]
            )
        lines += _table(
            [
                "tool",
                "median wall",
                "files/s",
                "MB/s",
                "ours/official",
                "median in-process",
                "all runs (wall s)",
            ],
            rows,
        )
    return lines


def _live_section(results: Results) -> list[str]:
    lines = ["## 2. Live latency (close to stored)", ""]
    lv = results.live
    if lv is None:
        return [*lines, f"Not run. {results.errors.get('live', '')}", ""]
    lines += [
        f"`nucleus-watcher run`, settle.seconds = {lv.settle_seconds:g}, verify_image = true,"
        " ~50 KB JPEGs written in place (open, write, close) into an already-watched folder."
        " Latency = devserver `on_request` callback time (items stored, answer not yet sent)"
        " minus the writer's time right after `close()`, same monotonic clock.",
        "",
    ]
    rows = []
    for phase, load in (
        (
            lv.trickle,
            f"{live.TRICKLE_FILES_PER_SECOND} files/s for {lv.trickle_seconds:.0f} s",
        ),
        (lv.burst, f"{live.BURST_FILES} files at once"),
    ):
        rows.append(
            [
                phase.name,
                load,
                str(len(phase.seconds)),
                str(phase.missing),
                _ms(phase.pct(50)),
                _ms(phase.pct(95)),
                _ms(phase.pct(99)),
                _ms(max(phase.seconds, default=math.nan)),
                f"{lv.settle_seconds:g} s",
                f"{len(phase.request_item_counts)} ({phase.items_per_request:.2f} items each)",
            ]
        )
    return lines + _table(
        [
            "phase",
            "load",
            "files",
            "missing",
            "p50",
            "p95",
            "p99",
            "max",
            "settle",
            "append requests",
        ],
        rows,
    )


def _footprint_section(results: Results) -> list[str]:
    lines = ["## 3. Footprint of `run`", ""]
    fp = results.footprint
    if fp is None:
        return [*lines, f"Not run. {results.errors.get('footprint', '')}", ""]
    peak_how = (
        "VmHWM after resetting it (`echo 5 > /proc/<pid>/clear_refs`) at the phase start"
        if fp.peak_reset_worked
        else "the largest VmRSS sample (VmHWM could not be reset)"
    )
    lines += [
        f"Daemon watching {fp.watched_files:,} tiny JPEGs already uploaded by a `scan`"
        f" ({fp.preload_scan_seconds:.1f} s), production defaults (settle 2 s, metrics off)."
        f" *steady* = median VmRSS sample; *peak* = {peak_how}. CPU = utime+stime delta.",
        "",
    ]
    rows = [
        [
            "start-up (spawn to READY, incl. reconcile)",
            _mb(fp.startup_rss_bytes),
            _mb(fp.startup_peak_bytes),
            "",
            "",
        ],
        [
            f"idle, {fp.idle.seconds:.0f} s",
            _mb(fp.idle.steady_bytes),
            _mb(fp.idle.peak_bytes),
            f"{fp.idle.cpu_seconds:.2f} s",
            f"{fp.idle.seconds:.1f} s",
        ],
        [
            f"burst of {footprint.BURST_FILES} ~50 KB files, until all stored",
            _mb(fp.burst.steady_bytes),
            _mb(fp.burst.peak_bytes),
            f"{fp.burst.cpu_seconds:.2f} s",
            f"{fp.burst.seconds:.1f} s",
        ],
        [
            f"one {fp.large_file_bytes / 1e9:.2f} GB JPEG, `mv` in until stored",
            _mb(fp.large.steady_bytes),
            _mb(fp.large.peak_bytes),
            f"{fp.large.cpu_seconds:.2f} s",
            f"{fp.large.seconds:.1f} s",
        ],
    ]
    return lines + _table(["phase", "steady RSS", "peak RSS", "CPU", "duration"], rows)


def _scale_section(results: Results) -> list[str]:
    lines = ["## 4. Scale", ""]
    sc = results.scale
    if sc is None:
        return [*lines, f"Not run. {results.errors.get('scale', '')}", ""]
    lines += [
        f"{sc.files:,} tiny JPEGs ({sc.file_bytes / sc.files:.0f} bytes each) in folders of"
        f" 1,000, written in {sc.write_seconds:.1f} s. Reconcile times are the `seconds` of the"
        " `reconcile_done` log event.",
        "",
    ]
    new = sc.new_scan_reconcile
    rows = [
        [
            "`scan`, all files new: walk + hash + queue into the store",
            f"{new.seconds:.1f} s",
            f"{new.queued_new / max(new.seconds, 1e-9):,.0f} files/s",
        ],
        [
            "`scan`, all files new: whole command (walk, upload all, exit)",
            f"{sc.new_scan_wall_seconds:.1f} s",
            f"{sc.files / sc.new_scan_wall_seconds:,.0f} files/s",
        ],
        [
            "`run` start-up reconcile, all uploaded (no hashing)",
            f"{sc.daemon_reconcile.seconds:.2f} s",
            f"{sc.daemon_reconcile.files_seen / max(sc.daemon_reconcile.seconds, 1e-9):,.0f}"
            " files/s",
        ],
        [
            "`run` spawn to READY=1 (includes that reconcile)",
            f"{sc.daemon_ready_seconds:.2f} s",
            "",
        ],
        [
            "`run` memory: peak at READY (VmHWM) / RSS 3 s later",
            f"{_mb(sc.daemon_startup_peak_bytes)} / {_mb(sc.daemon_settled_rss_bytes)}",
            "",
        ],
        [
            "`scan` with nothing to do: reconcile",
            f"{sc.idle_scan_reconcile.seconds:.2f} s",
            f"{sc.idle_scan_reconcile.unchanged:,} unchanged",
        ],
        ["`scan` with nothing to do: whole command", f"{sc.idle_scan_wall_seconds:.2f} s", ""],
    ]
    return lines + _table(["measurement", "time", "rate"], rows)


def render(results: Results, workdir: Path) -> str:
    plan = results.plan
    mode = "--quick" if plan.quick else "full"
    lines = [
        "# nucleus-watcher benchmark results",
        "",
        f"Generated by `python bench/run.py{' --quick' if plan.quick else ''}` on"
        f" {results.started.strftime('%Y-%m-%d %H:%M UTC')} ({mode} run, took"
        f" {results.total_seconds / 60:.1f} min). Devserver in-process on 127.0.0.1, loopback"
        " only; it shares the CPU with the tool under test. MB = 10^6 bytes.",
        "",
        "## Machine",
        "",
    ]
    lines += _table(["", ""], [[k, v] for k, v in machine_rows(results, workdir)])
    lines += ["## Targets", ""]
    lines += _table(["target", "goal", "measured", "result"], _targets(results))
    lines += _backfill_section(results)
    lines += _live_section(results)
    lines += _footprint_section(results)
    lines += _scale_section(results)
    if results.errors:
        lines += ["## Errors", ""]
        for section, text in results.errors.items():
            lines += [f"**{section}**:", "", "```", text.strip(), "```", ""]
    lines += ["## Section times", ""]
    lines += _table(
        ["section", "seconds"], [[k, f"{v:.0f}"] for k, v in results.section_seconds.items()]
    )
    return "\n".join(lines).rstrip() + "\n"


# --------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="fewer runs, shorter windows")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "RESULTS.md")
    parser.add_argument(
        "--only", default=",".join(SECTIONS), help=f"comma-separated subset of {SECTIONS}"
    )
    args = parser.parse_args(argv)
    chosen = [name.strip() for name in args.only.split(",") if name.strip()]
    unknown = sorted(set(chosen) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown sections: {', '.join(unknown)}")
    plan = Plan(
        quick=args.quick,
        runs=3 if args.quick else 5,
        trickle_seconds=20.0 if args.quick else 60.0,
        idle_seconds=20.0 if args.quick else 60.0,
        scale_files=20_000 if args.quick else 100_000,
    )
    # pip compiles an installed package's bytecode at install time, as it did for the official
    # client in site-packages. A checkout under PYTHONDONTWRITEBYTECODE would instead compile
    # our modules from source in every timed process: compile them once, like an install.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    compileall.compile_dir(REPO / "watcher", quiet=1)
    results = Results(plan=plan, started=datetime.now(UTC), load_at_start=load_average())
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="nucleus-bench-") as temp:
        workdir = Path(temp)
        for name in SECTIONS:
            if name not in chosen:
                continue
            print(f"== {name}", flush=True)
            section_started = time.monotonic()
            try:
                RUNNERS[name](results, workdir)
            except Exception:
                results.errors[name] = traceback.format_exc()
                print(results.errors[name], file=sys.stderr, flush=True)
            results.section_seconds[name] = time.monotonic() - section_started
        results.total_seconds = time.monotonic() - began
        results.load_at_end = load_average()
        report = render(results, workdir)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report, encoding="utf-8")
    print(report)
    print(f"wrote {args.out} ({results.total_seconds / 60:.1f} min)", flush=True)
    return 1 if results.errors else 0


if __name__ == "__main__":
    raise SystemExit(main())
