"""`nucleus-watcher status`: what the state database says, read while the daemon may be running.

The database is opened read-only (`StateStore.open_read_only`): a second writer or checkpointer
on SQLite before 3.51.3 can corrupt a WAL database. No API key is loaded or shown.

The text form is a table of counts per watch and state, the backlog's age, throughput over the
last 1, 5 and 15 minutes, and the last errors. `--json` prints one object with the same data;
its keys are stable (scripts and monitoring read them):

    state_path       str    the database that was read
    generated_at     float  unix seconds when the numbers were taken
    states           [str]  the states, in column order
    watches          [obj]  one per watch, configured ones first in config order, then any
                            that only the database still knows:
        watch        str    the watch root (the store's key)
        configured   bool   whether the config still has it
        counts       obj    state -> files
        total        int
    totals           obj    state -> files, over every watch
    total            int
    backlog          obj    files waiting (pending + in_flight):
        files                 int
        oldest_first_seen_at  float | null   unix seconds
        age_seconds           float | null   how long the oldest has waited
    throughput       [obj]  files confirmed in each window (60, 300, 900 s) up to generated_at:
        window_seconds  int
        files           int
        bytes           int
    recent_errors    [obj]  newest first, at most 10: files whose last attempt left a reason
        path, watch, relpath, dataset_id, reference_id, state, reason: str
        attempts         int

Files are counted per known state (`watcher.store.FileState`), and the backlog is the states in
`BACKLOG_STATES`, named one by one. A row in a state this version does not know (a newer
version wrote it) is in no column and not in the backlog; it is listed under the last errors
only if it left a reason, like any other row.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TextIO

from watcher.config import Settings
from watcher.store import FileRecord, FileState, StateStore, watch_key

# The files still to be sent: waiting for their turn, or being sent now.
BACKLOG_STATES: Final = (FileState.PENDING, FileState.IN_FLIGHT)
THROUGHPUT_WINDOWS_SECONDS = (60, 300, 900)
MAX_ERRORS_SHOWN = 10
_BYTES_PER_MB = 1_000_000


@dataclass(frozen=True)
class WatchCounts:
    watch: str
    configured: bool
    counts: dict[FileState, int]

    @property
    def total(self) -> int:
        return sum(self.counts.values())


@dataclass(frozen=True)
class Throughput:
    window_seconds: int
    files: int
    bytes: int


@dataclass(frozen=True)
class StatusReport:
    """One snapshot of the store, the same for the table and the JSON."""

    state_path: Path
    generated_at: float
    watches: list[WatchCounts]
    oldest_backlog_first_seen_at: float | None
    throughput: list[Throughput]
    recent_errors: list[FileRecord]

    @property
    def totals(self) -> dict[FileState, int]:
        return {state: sum(w.counts[state] for w in self.watches) for state in FileState}

    @property
    def backlog_files(self) -> int:
        totals = self.totals
        return sum(totals[state] for state in BACKLOG_STATES)

    @property
    def backlog_age_seconds(self) -> float | None:
        if self.oldest_backlog_first_seen_at is None:
            return None
        # A clock stepped back (NTP on a box without RTC) must not print a negative age.
        return max(0.0, self.generated_at - self.oldest_backlog_first_seen_at)


def print_status(
    settings: Settings, *, as_json: bool, out: TextIO = sys.stdout, now: float | None = None
) -> int:
    """Print the status; 0. A missing or unreadable database raises StoreError (cli: exit 1).

    `now` (unix seconds) is when ages and throughput windows are measured from.
    """
    report = read_status(settings, now=time.time() if now is None else now)
    if as_json:
        json.dump(status_json(report), out, indent=2, sort_keys=True, ensure_ascii=False)
        out.write("\n")
    else:
        out.write("".join(f"{line}\n" for line in status_lines(report)))
    return 0


def read_status(settings: Settings, *, now: float) -> StatusReport:
    store = StateStore.open_read_only(Path(settings.state.path))
    try:
        by_watch = store.counts()
        oldest = store.oldest_pending_first_seen()
        throughput = [
            Throughput(window, *store.confirmed_since(now - window))
            for window in THROUGHPUT_WINDOWS_SECONDS
        ]
        errors = store.recent_errors(limit=MAX_ERRORS_SHOWN)
    finally:
        store.close()
    roots = [str(Path(watch.path)) for watch in settings.watch]
    configured = [
        watch_key(root, watch.dataset_id, shared=roots.count(root) > 1)
        for root, watch in zip(roots, settings.watch, strict=True)
    ]
    # A watch removed from the config still has rows; show them rather than hide files.
    keys = configured + sorted(set(by_watch) - set(configured))
    watches = [
        WatchCounts(
            watch=key,
            configured=key in configured,
            counts=_known_state_counts(by_watch.get(key, {})),
        )
        for key in keys
    ]
    return StatusReport(
        state_path=store.path,
        generated_at=now,
        watches=watches,
        oldest_backlog_first_seen_at=oldest,
        throughput=throughput,
        recent_errors=errors,
    )


def _known_state_counts(by_state: Mapping[FileState, int]) -> dict[FileState, int]:
    """Files per known state, every one present (0 when none); the store counts no state this
    version does not know (see the module docstring)."""
    return {state: by_state.get(state, 0) for state in FileState}


# -- text ------------------------------------------------------------------------------------


def status_lines(report: StatusReport) -> list[str]:
    lines = [f"state database: {report.state_path}", ""]
    lines += _counts_table(report)
    lines.append("")
    lines.append(_backlog_line(report))
    lines.append("")
    lines += _throughput_table(report.throughput)
    lines.append("")
    lines += _error_lines(report.recent_errors)
    return lines


def _counts_table(report: StatusReport) -> list[str]:
    header = ["watch", *FileState, "total"]
    rows = [
        [
            w.watch if w.configured else f"{w.watch} (not in config)",
            *(str(w.counts[state]) for state in FileState),
            str(w.total),
        ]
        for w in report.watches
    ]
    totals = report.totals
    rows.append(["total", *(str(totals[state]) for state in FileState), str(sum(totals.values()))])
    return _aligned([header, *rows])


def _throughput_table(throughput: list[Throughput]) -> list[str]:
    rows = [
        [f"last {t.window_seconds // 60}m", str(t.files), f"{t.bytes / _BYTES_PER_MB:.2f}"]
        for t in throughput
    ]
    return _aligned([["throughput", "files", "MB"], *rows])


def _aligned(rows: list[list[str]]) -> list[str]:
    """First column left-aligned, the numbers right-aligned, two spaces apart."""
    widths = [max(len(row[column]) for row in rows) for column in range(len(rows[0]))]
    return [
        "  ".join(
            cell.ljust(width) if column == 0 else cell.rjust(width)
            for column, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in rows
    ]


def _backlog_line(report: StatusReport) -> str:
    age = report.backlog_age_seconds
    if report.backlog_files == 0 or age is None:
        return "backlog: none"
    return f"backlog: {report.backlog_files} files, oldest waiting {_duration(age)}"


def _error_lines(errors: list[FileRecord]) -> list[str]:
    if not errors:
        return ["last errors: none"]
    width = max(len(record.state) for record in errors)
    lines = ["last errors (newest first):"]
    for record in errors:
        lines.append(
            f"  {record.state.ljust(width)}  {record.shown_path}: {_one_line(record.last_error)}"
        )
    return lines


def _one_line(text: str | None) -> str:
    # A server's reason may hold newlines; one error per line keeps the list readable.
    return " ".join((text or "").split())


def _duration(seconds: float) -> str:
    """45 -> "45s", 192 -> "3m12s", 7500 -> "2h05m", 190000 -> "2d04h"."""
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    if whole < 3600:
        return f"{whole // 60}m{whole % 60:02d}s"
    if whole < 86400:
        return f"{whole // 3600}h{whole % 3600 // 60:02d}m"
    return f"{whole // 86400}d{whole % 86400 // 3600:02d}h"


# -- JSON ------------------------------------------------------------------------------------


def status_json(report: StatusReport) -> dict[str, Any]:
    totals = report.totals
    return {
        "state_path": str(report.state_path),
        "generated_at": report.generated_at,
        "states": [state.value for state in FileState],
        "watches": [
            {"watch": w.watch, "configured": w.configured, "counts": w.counts, "total": w.total}
            for w in report.watches
        ],
        "totals": totals,
        "total": sum(totals.values()),
        "backlog": {
            "files": report.backlog_files,
            "oldest_first_seen_at": report.oldest_backlog_first_seen_at,
            "age_seconds": report.backlog_age_seconds,
        },
        "throughput": [
            {"window_seconds": t.window_seconds, "files": t.files, "bytes": t.bytes}
            for t in report.throughput
        ],
        "recent_errors": [
            {
                "path": record.shown_path,
                "watch": record.watch,
                "relpath": record.relpath,
                "dataset_id": record.dataset_id,
                "reference_id": record.reference_id,
                "state": record.state,
                "reason": record.last_error or "",
                "attempts": record.attempts,
            }
            for record in report.recent_errors
        ],
    }
