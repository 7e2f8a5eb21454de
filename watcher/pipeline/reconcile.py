"""From a file on disk to a row in the queue: the reconcile walk and the per-file decision.

Both the live path (a file the settler found finished, with the lstat it was judged on) and the
walk (start-up, timer, after an overflow, `scan`) end in `Reconciler._examine`, so there is one
definition of "must this be sent". The walk is cheap on purpose: one stat per file and one dict
lookup against the store's record; a file is hashed only when its size or mtime differ from
what was recorded, and the bytes hashed are checked to still be those of that stat.
"""

from __future__ import annotations

import hashlib
import os
import stat
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Protocol

import structlog

from watcher.errors import PathRuleError
from watcher.files import (
    open_regular_file,
    path_from_text,
    path_text,
    sniff_image_type,
)
from watcher.pipeline.plans import WatchPlan, relpath_of
from watcher.pipeline.settle import IncompleteFile, ReadyFile
from watcher.store import (
    FAILED,
    GONE,
    INCOMPLETE,
    Candidate,
    KnownFile,
    StateStore,
    watch_root,
)

log = structlog.get_logger("watcher.reconcile")

_HEAD_BYTES = 64
# A walk records new and changed files this many at a time: one commit (one fsync) per chunk,
# and the store's lock is free for the uploader between chunks.
_RECORD_CHUNK_FILES = 256


class _Changed(Enum):
    SINCE_STAT = "changed since its lstat"


_CHANGED_SINCE_STAT = _Changed.SINCE_STAT


@dataclass(frozen=True)
class _Pending:
    """A file the walk found new or changed, waiting for its chunk to be recorded."""

    candidate: Candidate
    path: Path
    st: os.stat_result


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
    last_outcome: str = ""

    def merge_outcomes(self, outcomes: Sequence[str]) -> None:
        for outcome in outcomes:
            self.add(outcome)

    def add(self, outcome: str) -> None:
        self.last_outcome = outcome
        if outcome == "new":
            self.queued_new += 1
        elif outcome in ("changed", "deferred"):
            self.queued_changed += 1
        elif outcome == "unchanged":
            self.unchanged += 1
        elif outcome == "unsettled":
            self.unsettled += 1
        else:
            self.problems += 1


def file_sha256(path: Path) -> str:
    with open_regular_file(path) as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


class Settling(Protocol):
    """The settler, as the reconciler uses it: the one judge of "is this file finished?", and
    where a file still being written goes to finish."""

    def at_rest(self, st: os.stat_result, wall_now: float) -> bool: ...

    def image_problem(self, fd: int, size_bytes: int) -> str | None: ...

    def submit(
        self, path: Path, plans: Sequence[WatchPlan] = (), *, closed: bool = False
    ) -> None: ...


class Waking(Protocol):
    """The uploader, told that rows wait in the queue."""

    def wake(self) -> None: ...


class SettledEvents(Protocol):
    """What became of the files the settler handed over (metrics for `run`, the tally for
    `scan`), one call per watch the file belongs to."""

    def settled(self, watch: str, outcome: str) -> None:
        """A finished file was recorded (or not) with `outcome`."""

    def gave_up(self, watch: str, outcome: str) -> None:
        """A file that never finished was recorded with `outcome`."""


class Reconciler:
    """Decides, per file, whether it goes into the queue; walks watch roots to find files.

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
        self._settler = settler
        self._max_file_bytes = max_file_bytes
        self._uploader = uploader
        self._events = events
        self._clock = clock

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
            chunk: list[_Pending] = []
            for path, relpath, st in self._walk(plan):
                report.files_seen += 1
                result = self._examine_guarded(plan, path, relpath, st, known.pop(relpath, None))
                if isinstance(result, _Pending):
                    chunk.append(result)
                    if len(chunk) >= _RECORD_CHUNK_FILES:
                        self._record(plan, chunk, report)
                else:
                    report.add(result)
            self._record(plan, chunk, report)
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

    # -- one file --------------------------------------------------------------------------

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

    def record_settled(self, plan: WatchPlan, path: Path, st: os.stat_result) -> str:
        """A file the settler found finished, recorded from the lstat it was judged on; say
        what happened. Should the bytes no longer match that lstat when they are read, the file
        changed after the decision and goes back to settling."""
        relpath = relpath_of(plan.root, path)
        if relpath is None:
            return "excluded"
        known = self._store.known_file(plan.key, relpath)
        result = self._examine_guarded(plan, path, relpath, st, known, settled=True)
        if result == "gone":
            if self._store.mark_gone(plan.key, relpath):
                log.info("file_gone", path=str(path), dataset_id=plan.dataset_id)
            return result
        if not isinstance(result, _Pending):
            return result
        report = ReconcileReport()
        self._record(plan, [result], report)
        return report.last_outcome

    def record_incomplete(
        self, plan: WatchPlan, path: Path, st: os.stat_result | None, reason: str
    ) -> str:
        """The settler gave up on `path` (never finished within max_wait) at lstat `st`:
        record why. A symlink or FIFO is not "still being written" and is recorded as the walk
        would."""
        relpath = relpath_of(plan.root, path)
        if relpath is None:
            return "excluded"
        if st is None:
            # The settler could not lstat it; whatever we find now is what gets recorded.
            try:
                st = path.lstat()
            except FileNotFoundError:
                return "gone"
            except OSError as exc:
                return self._problem(
                    plan, path, relpath, None, FAILED, f"cannot stat: {exc.strerror}"
                )
        if not stat.S_ISREG(st.st_mode):
            return self.record_settled(plan, path, st)
        log.warning("file_incomplete", path=str(path), dataset_id=plan.dataset_id, reason=reason)
        self._store.record_problem(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            state=INCOMPLETE,
            reason=reason,
            now=self._clock(),
        )
        return INCOMPLETE

    def _examine_guarded(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        known: KnownFile | None,
        settled: bool = False,
    ) -> str | _Pending:
        """`_examine` behind a per-file barrier: an unexpected exception (a bug, a name or a
        file nobody foresaw) is recorded on that file with the reason and the walk goes on."""
        try:
            return self._examine(plan, path, relpath, st, known, settled)
        except Exception as exc:
            log.exception("file_examine_failed", path=str(path), dataset_id=plan.dataset_id)
            try:
                return self._problem(
                    plan, path, relpath, st, FAILED, f"internal error: {type(exc).__name__}: {exc}"
                )
            except Exception:
                log.exception("file_problem_unrecorded", path=str(path))
                return FAILED

    def _examine(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        known: KnownFile | None,
        settled: bool,
    ) -> str | _Pending:
        """An outcome when the file needs no write (or is a problem), else what to record."""
        if stat.S_ISLNK(st.st_mode):
            return self._problem(plan, path, relpath, st, FAILED, "symbolic link (not followed)")
        if not stat.S_ISREG(st.st_mode):
            return self._problem(plan, path, relpath, st, FAILED, "not a regular file")
        unchanged_on_disk = (
            known is not None
            and known.state != GONE
            and known.size_bytes == st.st_size
            and known.mtime_ns == st.st_mtime_ns
        )
        if unchanged_on_disk and known is not None:
            if known.state in (FAILED, INCOMPLETE) and known.metadata_sha256 == "":
                return "unchanged"  # parked before classification; waits for a change or `retry`
            # Same bytes as recorded: reuse the recorded hash, only the rules may have changed.
            return self._classify(plan, path, relpath, st, known.content_sha256, known)
        if not settled and not self._settler.at_rest(st, self._clock()):
            return self._unsettled(plan, path)
        if st.st_size == 0:
            return self._problem(plan, path, relpath, st, INCOMPLETE, "zero-byte file")
        if st.st_size > self._max_file_bytes:
            return self._problem(
                plan,
                path,
                relpath,
                st,
                FAILED,
                f"{st.st_size} bytes is over upload.max_file_bytes ({self._max_file_bytes})",
            )
        try:
            inspected = self._inspect(path, st, check_complete=not settled)
        except FileNotFoundError:
            return "gone"
        except OSError as exc:
            return self._problem(plan, path, relpath, st, FAILED, f"unreadable: {exc.strerror}")
        if inspected is _CHANGED_SINCE_STAT:
            # Written to since `st` was taken: what was decided about it no longer holds.
            return self._unsettled(plan, path)
        if isinstance(inspected, tuple):
            return self._problem(plan, path, relpath, st, *inspected)
        return self._classify(plan, path, relpath, st, inspected, known)

    def _inspect(
        self, path: Path, st: os.stat_result, *, check_complete: bool
    ) -> str | tuple[str, str] | _Changed:
        """The content's sha256, or (state, reason) when the bytes cannot go as they are, or
        `_CHANGED_SINCE_STAT` when the open file's size or mtime are no longer `st`'s.

        One open for everything: the signature, the completeness check (skipped when the
        settler just verified the file at this size and mtime) and the hash.
        """
        with open_regular_file(path) as f:
            fd = f.fileno()
            opened = os.fstat(fd)
            if (opened.st_size, opened.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
                return _CHANGED_SINCE_STAT
            if sniff_image_type(os.pread(fd, _HEAD_BYTES, 0)) is None:
                return FAILED, "not an image (unknown file signature)"
            if check_complete:
                reason = self._settler.image_problem(fd, opened.st_size)
                if reason is not None:
                    return INCOMPLETE, reason
            return hashlib.file_digest(f, "sha256").hexdigest()

    def _unsettled(self, plan: WatchPlan, path: Path) -> str:
        self._settler.submit(path, (plan,))
        return "unsettled"

    def _classify(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        content_sha256: str | None,
        known: KnownFile | None,
    ) -> str | _Pending:
        if content_sha256 is None:
            try:
                content_sha256 = file_sha256(path)
            except OSError as exc:
                return self._problem(plan, path, relpath, st, FAILED, f"unreadable: {exc.strerror}")
        digest = content_sha256
        try:
            classification = plan.rules.classify(
                relpath, mtime_ns=st.st_mtime_ns, sha256=lambda: digest
            )
        except PathRuleError as exc:
            return self._problem(plan, path, relpath, st, FAILED, f"path rules: {exc}")
        if (
            known is not None
            and known.state != GONE
            and known.size_bytes == st.st_size
            and known.mtime_ns == st.st_mtime_ns
            and known.metadata_sha256 == classification.metadata_sha256
            and known.dataset_id == plan.dataset_id
        ):
            return "unchanged"  # the fast path: nothing to write
        candidate = Candidate(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            reference_id=classification.reference_id,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            content_sha256=content_sha256,
            metadata=classification.metadata,
            metadata_sha256=classification.metadata_sha256,
            remote_url=classification.remote_url,
        )
        return _Pending(candidate, path, st)

    def _record(self, plan: WatchPlan, chunk: list[_Pending], report: ReconcileReport) -> None:
        """Record a chunk of candidates in one transaction; empties `chunk`."""
        if not chunk:
            return
        outcomes = self._store.record_candidates([p.candidate for p in chunk], now=self._clock())
        queued = False
        for pending, outcome in zip(chunk, outcomes, strict=True):
            candidate = pending.candidate
            if outcome == "collision":
                outcome = self._settle_collision(plan, pending)
            if outcome in ("new", "changed"):
                queued = True
                log.debug(
                    "file_queued",
                    path=str(pending.path),
                    reference_id=candidate.reference_id,
                    dataset_id=candidate.dataset_id,
                    why=outcome,
                )
            report.add(outcome)
        chunk.clear()
        if queued and self._uploader is not None:
            self._uploader.wake()

    def _settle_collision(self, plan: WatchPlan, pending: _Pending) -> str:
        """Another row holds the reference_id. If its file is no longer on disk (a folder moved
        while we were down, whose old rows the walk has not marked gone yet; a name reused
        after a delete we missed), the reference_id passes to this file; else this one is
        parked."""
        candidate = pending.candidate
        while True:
            other = self._store.other_owner_of_reference(
                candidate.dataset_id, candidate.reference_id, candidate.watch, candidate.relpath
            )
            if other is None:
                return self._store.record_candidate(candidate, now=self._clock())
            other_path = Path(watch_root(other[0])) / path_from_text(other[1])
            # Each pass retires one stale owner, so this ends.
            if os.path.lexists(other_path) or not self._store.mark_gone(*other, now=self._clock()):
                break
        return self._problem(
            plan,
            pending.path,
            candidate.relpath,
            pending.st,
            FAILED,
            f"reference_id {candidate.reference_id!r} is already used by {other_path}",
        )

    def _problem(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result | None,
        state: str,
        reason: str,
    ) -> str:
        log.warning(
            "file_not_sendable",
            path=str(path),
            dataset_id=plan.dataset_id,
            state=state,
            reason=reason,
        )
        self._store.record_problem(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            size_bytes=st.st_size if st is not None else -1,
            mtime_ns=st.st_mtime_ns if st is not None else -1,
            state=state,
            reason=reason,
            now=self._clock(),
        )
        return state
