"""From a file on disk to a row in the queue: the reconcile walk, and the settler's files.

Both the live path (a file the settler found finished, with the lstat it was judged on) and the
walk (start-up, timer, after an overflow, `scan`) end in `Examiner.examine`, so there is one
definition of "must this be sent". The walk is cheap on purpose: one stat per file and one dict
lookup against the store's record; a file is hashed only when its size or mtime differ from
what was recorded.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, assert_never

import structlog

from watcher.files import FileKind, kind_of, path_text
from watcher.pipeline.examine import Examiner, Outcome, Pending, Settling, Waking
from watcher.pipeline.plans import WatchPlan, relpath_of
from watcher.pipeline.settle import IncompleteFile, ReadyFile
from watcher.store import StateStore

log = structlog.get_logger("watcher.reconcile")

# A walk records new and changed files this many at a time: one commit (one fsync) per chunk,
# and the store's lock is free for the uploader between chunks.
_RECORD_CHUNK_FILES = 256


@dataclass
class ReconcileReport:
    files_seen: int = 0
    queued_new: int = 0
    queued_changed: int = 0
    unchanged: int = 0
    problems: int = 0
    unsettled: int = 0
    gone: int = 0
    seconds: float = 0.0
    missing_roots: list[str] = field(default_factory=list)

    def merge_outcomes(self, outcomes: Sequence[Outcome]) -> None:
        for outcome in outcomes:
            self.add(outcome)

    def add(self, outcome: Outcome) -> None:
        match outcome:
            case Outcome.NEW:
                self.queued_new += 1
            case Outcome.CHANGED | Outcome.DEFERRED:
                self.queued_changed += 1
            case Outcome.UNCHANGED:
                self.unchanged += 1
            case Outcome.UNSETTLED:
                self.unsettled += 1
            case (
                Outcome.COLLISION
                | Outcome.EXCLUDED
                | Outcome.GONE
                | Outcome.FAILED
                | Outcome.INCOMPLETE
            ):
                self.problems += 1
            case _:
                assert_never(outcome)


class SettledEvents(Protocol):
    """What became of the files the settler handed over (metrics for `run`, the tally for
    `scan`), one call per watch the file belongs to."""

    def settled(self, watch: str, outcome: Outcome) -> None:
        """A finished file was recorded (or not) with `outcome`."""

    def gave_up(self, watch: str, outcome: Outcome) -> None:
        """A file that never finished was recorded with `outcome`."""


class Reconciler:
    """Walks watch roots to find files, and records what the settler hands over; each file is
    decided by the `Examiner`.

    It is the settler's sink: each finished file is recorded for every watch it belongs to.
    """

    def __init__(
        self,
        store: StateStore,
        settler: Settling,
        *,
        max_file_bytes: int,
        uploader: Waking | None = None,
        events: SettledEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._examiner = Examiner(
            store, settler, max_file_bytes=max_file_bytes, uploader=uploader, clock=clock
        )
        self._events = events

    # -- the walk --------------------------------------------------------------------------

    def reconcile(self, plans: Sequence[WatchPlan]) -> ReconcileReport:
        report = ReconcileReport()
        started = time.monotonic()
        for plan in plans:
            if not plan.root.is_dir():
                report.missing_roots.append(plan.key)
                log.warning("watch_folder_missing", watch=plan.key)
                continue
            known = self._store.known_files(plan.key)
            if not known and self._store.adopt_rows(plan.key, plan.aliases, plan.dataset_id):
                known = self._store.known_files(plan.key)
            chunk: list[Pending] = []
            for path, relpath, st in self._walk(plan):
                report.files_seen += 1
                result = self._examiner.examine(plan, path, relpath, st, known.pop(relpath, None))
                if not isinstance(result, Pending):
                    report.add(result)
                    continue
                chunk.append(result)
                if len(chunk) >= _RECORD_CHUNK_FILES:
                    report.merge_outcomes(self._examiner.record(plan, chunk))
                    chunk = []
            report.merge_outcomes(self._examiner.record(plan, chunk))
            # What the walk did not pop from `known` is no longer on disk.
            report.gone += self._store.mark_gone_many(plan.key, list(known))
        report.seconds = time.monotonic() - started
        log.info(
            "reconcile_done",
            files_seen=report.files_seen,
            queued_new=report.queued_new,
            queued_changed=report.queued_changed,
            unchanged=report.unchanged,
            problems=report.problems,
            unsettled=report.unsettled,
            gone=report.gone,
            seconds=round(report.seconds, 3),
        )
        return report

    def _walk(self, plan: WatchPlan) -> Iterator[tuple[Path, str, os.stat_result]]:
        """Entries under the root that pass the filter, with their lstat.

        Symbolic links are reported, never followed: nothing outside a watch root is read, and
        a loop cannot trap the walk.
        """
        stack = [(plan.root, "")]
        while stack:
            folder, rel_folder = stack.pop()
            try:
                entries = list(os.scandir(folder))
            except OSError as exc:
                log.warning("folder_unreadable", path=str(folder), error=exc.strerror)
                continue
            for entry in entries:
                # The walk keeps names as os.fsdecode gives them (they open the right file);
                # filters, rules and the store see the text form.
                relpath = f"{rel_folder}{entry.name}"
                text = path_text(relpath)
                try:
                    if entry.is_dir(follow_symlinks=False):
                        if plan.recursive and plan.path_filter.accepts_dir(text):
                            stack.append((Path(entry.path), relpath + "/"))
                        continue
                    if not plan.path_filter.accepts(text):
                        continue
                    st = entry.stat(follow_symlinks=False)
                except OSError as exc:
                    log.warning("file_unreadable", path=entry.path, error=exc.strerror)
                    continue
                except Exception:
                    # One entry's bug must not end the walk of every other file.
                    log.exception("walk_entry_failed", path=entry.path)
                    continue
                yield Path(entry.path), text, st

    # -- files the settler hands over -------------------------------------------------------

    def on_ready(self, file: ReadyFile) -> None:
        for plan in file.plans:
            outcome = self.record_settled(plan, file.path, file.st)
            if self._events is not None:
                self._events.settled(plan.key, outcome)

    def on_incomplete(self, file: IncompleteFile) -> None:
        for plan in file.plans:
            outcome = self.record_incomplete(plan, file.path, file.st, file.reason)
            if self._events is not None:
                self._events.gave_up(plan.key, outcome)

    def record_settled(self, plan: WatchPlan, path: Path, st: os.stat_result) -> Outcome:
        """A file the settler found finished, recorded from the lstat it was judged on; say
        what happened. Should the bytes no longer match that lstat when they are read, the file
        changed after the decision and goes back to settling."""
        relpath = relpath_of(plan.root, path)
        if relpath is None:
            return Outcome.EXCLUDED
        known = self._store.known_file(plan.key, relpath)
        result = self._examiner.examine(plan, path, relpath, st, known, settled=True)
        if result is Outcome.GONE:
            if self._store.mark_gone(plan.key, relpath):
                log.info("file_gone", path=str(path), dataset_id=plan.dataset_id)
            return result
        if not isinstance(result, Pending):
            return result
        [outcome] = self._examiner.record(plan, [result])
        return outcome

    def record_incomplete(
        self, plan: WatchPlan, path: Path, st: os.stat_result | None, reason: str
    ) -> Outcome:
        """The settler gave up on `path` (never finished within max_wait) at lstat `st`:
        record why. A symlink or FIFO is not "still being written" and is recorded as the walk
        would."""
        relpath = relpath_of(plan.root, path)
        if relpath is None:
            return Outcome.EXCLUDED
        if st is None:
            # The settler could not lstat it; whatever we find now is what gets recorded.
            try:
                st = path.lstat()
            except FileNotFoundError:
                return Outcome.GONE
            except OSError as exc:
                return self._examiner.problem(
                    plan, path, relpath, None, Outcome.FAILED, f"cannot stat: {exc.strerror}"
                )
        if kind_of(st) is not FileKind.REGULAR:
            return self.record_settled(plan, path, st)
        return self._examiner.incomplete(plan, path, relpath, st, reason)
