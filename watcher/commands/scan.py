"""`nucleus-watcher scan`: one pass. Reconcile every watch, upload what is pending, wait for
jobs, print a summary; exit 0 when everything is confirmed, 1 when some items are not."""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TextIO

import structlog

from watcher.config import Settings
from watcher.files import path_text
from watcher.pipeline import Outcome, UploadEvents
from watcher.pipeline import wiring as pipeline
from watcher.store import FileRecord, FileState

log = structlog.get_logger("watcher.scan")

# A scan is a one-shot command: after this many tries a transient failure is reported (the item
# stays pending for the next scan or the daemon) instead of holding the command forever.
SCAN_MAX_ATTEMPTS = 5


@dataclass
class ScanTally:
    new: int = 0
    updated: int = 0
    bytes_sent: int = 0
    requests: int = 0


class ScanProgress(UploadEvents):
    """Counts for the summary, and a one-line progress bar when stderr is a terminal."""

    def __init__(self, total: int, stream: TextIO) -> None:
        self.tally = ScanTally()
        self.total = total
        self._stream = stream
        self._tty = stream.isatty()
        self._lock = threading.Lock()
        self._started = time.monotonic()

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        with self._lock:
            for record in records:
                if record.update_flag:
                    self.tally.updated += 1
                else:
                    self.tally.new += 1
            self._draw()

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        with self._lock:
            self.tally.requests += 1
            self.tally.bytes_sent += bytes_sent

    def _draw(self) -> None:
        if not self._tty or self.total == 0:
            return
        done = self.tally.new + self.tally.updated
        width = 30
        filled = int(width * min(done, self.total) / self.total)
        rate = done / max(1e-6, time.monotonic() - self._started)
        self._stream.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {done}/{self.total} {rate:.0f} files/s"
        )
        self._stream.flush()

    def finish(self) -> None:
        if self._tty and self.total:
            self._stream.write("\n")
            self._stream.flush()


class _SettledTally:
    """What became of the files the walk found still being written (the settler finished
    them during the scan), for the summary."""

    def __init__(self, progress: ScanProgress) -> None:
        self._progress = progress
        self._lock = threading.Lock()
        self.outcomes: list[Outcome] = []

    def settled(self, watch: str, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)
            if outcome in (Outcome.NEW, Outcome.CHANGED):
                self._progress.total += 1

    def gave_up(self, watch: str, outcome: Outcome) -> None:
        with self._lock:
            self.outcomes.append(outcome)


def run_scan(settings: Settings, api_key: str, out: TextIO | None = None) -> int:
    # Looked up per call, not bound at import: a caller (or a test) may have replaced it.
    out = sys.stdout if out is None else out
    plans = pipeline.watch_plans(settings)
    progress = ScanProgress(0, sys.stderr)
    settled = _SettledTally(progress)
    parts = pipeline.build_scan(settings, api_key, upload_events=progress, events=settled)
    store, uploader = parts.store, parts.uploader
    started = time.monotonic()
    try:
        store.release_in_flight()
        store.reset_pending_attempts()
        progress.total = store.state_counts()[FileState.PENDING]
        # Uploads start while the walk goes on: the walk records files in chunks and wakes
        # the workers once per chunk, so batches stay full and the two overlap.
        parts.start()
        try:
            report = parts.reconciler.reconcile(plans)
            progress.total = report.queued_new + report.queued_changed + progress.total
            # Files still being written when the walk saw them (or whose mtime is in the
            # future): the settler watches them hold still on the monotonic clock; what never
            # finishes within settle.max_wait_seconds is recorded incomplete and listed.
            still_settling = parts.settler.wait_until_settled(
                settings.settle.max_wait_seconds + 5.0
            )
            drained = uploader.wait_until_drained(SCAN_MAX_ATTEMPTS)
        finally:
            parts.stop(settings.upload.stop_timeout_seconds)
            progress.finish()
        report.merge_outcomes(settled.outcomes)
        seconds = time.monotonic() - started
        counts = store.state_counts()
        tally = progress.tally
        sent = tally.new + tally.updated
        out.write(
            f"scan: {report.files_seen} files seen, {sent} uploaded"
            f" ({tally.new} new, {tally.updated} updated), {report.unchanged} unchanged,"
            f" {counts[FileState.FAILED]} failed, {counts[FileState.INCOMPLETE]} incomplete,"
            f" {counts[FileState.PENDING]} still pending in {seconds:.1f} s"
            f" ({sent / max(seconds, 1e-6):.1f} files/s,"
            f" {tally.bytes_sent / 1e6 / max(seconds, 1e-6):.1f} MB/s, {tally.requests} requests)\n"
        )
        for missing in report.missing_roots:
            out.write(f"  missing watch folder: {missing}\n")
        for path in still_settling:
            out.write(f"  still being written: {path_text(str(path))}\n")
        problems = store.records_in_state(FileState.FAILED, limit=50) + store.records_in_state(
            FileState.INCOMPLETE, limit=50
        )
        for record in problems:
            out.write(f"  {record.state}: {record.shown_path}: {record.last_error}\n")
        if uploader.paused_reason is not None:
            out.write(f"  uploads paused: {uploader.paused_reason}\n")
        if not drained or counts[FileState.PENDING] or problems or still_settling:
            return 1
        return 0
    finally:
        parts.close()
