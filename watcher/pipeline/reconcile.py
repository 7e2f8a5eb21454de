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
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from enum import Enum, StrEnum
from pathlib import Path
from typing import Protocol, assert_never

import structlog

from watcher.errors import PathRuleError
from watcher.files import (
    FileKind,
    kind_of,
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


class Outcome(StrEnum):
    """What became of one file. The first five are the store's answers to recording it."""

    NEW = "new"  # queued, never seen before
    CHANGED = "changed"  # queued: content or metadata differ from what the server has
    DEFERRED = "deferred"  # changed while in flight: queued again when the send ends
    UNCHANGED = "unchanged"  # nothing to send
    COLLISION = "collision"  # another file sends this reference_id (the store's answer)
    UNSETTLED = "unsettled"  # still being written: handed to the settler
    EXCLUDED = "excluded"  # not inside the watch
    GONE = "gone"  # vanished before it could be read
    FAILED = "failed"  # parked with a reason: never sendable as it is
    INCOMPLETE = "incomplete"  # parked with a reason: not finished


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

    def settled(self, watch: str, outcome: Outcome) -> None:
        """A finished file was recorded (or not) with `outcome`."""

    def gave_up(self, watch: str, outcome: Outcome) -> None:
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
                if not isinstance(result, _Pending):
                    report.add(result)
                    continue
                chunk.append(result)
                if len(chunk) >= _RECORD_CHUNK_FILES:
                    report.merge_outcomes(self._record(plan, chunk))
                    chunk = []
            report.merge_outcomes(self._record(plan, chunk))
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

    def record_settled(self, plan: WatchPlan, path: Path, st: os.stat_result) -> Outcome:
        """A file the settler found finished, recorded from the lstat it was judged on; say
        what happened. Should the bytes no longer match that lstat when they are read, the file
        changed after the decision and goes back to settling."""
        relpath = relpath_of(plan.root, path)
        if relpath is None:
            return Outcome.EXCLUDED
        known = self._store.known_file(plan.key, relpath)
        result = self._examine_guarded(plan, path, relpath, st, known, settled=True)
        if result is Outcome.GONE:
            if self._store.mark_gone(plan.key, relpath):
                log.info("file_gone", path=str(path), dataset_id=plan.dataset_id)
            return result
        if not isinstance(result, _Pending):
            return result
        [outcome] = self._record(plan, [result])
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
                return self._problem(
                    plan, path, relpath, None, Outcome.FAILED, f"cannot stat: {exc.strerror}"
                )
        if kind_of(st) is not FileKind.REGULAR:
            return self.record_settled(plan, path, st)
        log.warning("file_incomplete", path=str(path), dataset_id=plan.dataset_id, reason=reason)
        self._store.record_problem(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            state=Outcome.INCOMPLETE.value,
            reason=reason,
            now=self._clock(),
        )
        return Outcome.INCOMPLETE

    def _examine_guarded(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        known: KnownFile | None,
        settled: bool = False,
    ) -> Outcome | _Pending:
        """`_examine` behind a per-file barrier: an unexpected exception (a bug, a name or a
        file nobody foresaw) is recorded on that file with the reason and the walk goes on."""
        try:
            return self._examine(plan, path, relpath, st, known, settled)
        except Exception as exc:
            log.exception("file_examine_failed", path=str(path), dataset_id=plan.dataset_id)
            try:
                return self._problem(
                    plan,
                    path,
                    relpath,
                    st,
                    Outcome.FAILED,
                    f"internal error: {type(exc).__name__}: {exc}",
                )
            except Exception:
                log.exception("file_problem_unrecorded", path=str(path))
                return Outcome.FAILED

    def _examine(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        known: KnownFile | None,
        settled: bool,
    ) -> Outcome | _Pending:
        """An outcome when the file needs no write (or is a problem), else what to record."""
        kind = kind_of(st)
        if kind is not FileKind.REGULAR:
            return self._problem(plan, path, relpath, st, Outcome.FAILED, kind.value)
        unchanged_on_disk = (
            known is not None
            and known.state != GONE
            and known.size_bytes == st.st_size
            and known.mtime_ns == st.st_mtime_ns
        )
        if unchanged_on_disk and known is not None:
            if known.state in (FAILED, INCOMPLETE) and known.metadata_sha256 == "":
                # Parked before classification: waits for a change or `retry`.
                return Outcome.UNCHANGED
            # Same bytes as recorded: reuse the recorded hash, only the rules may have changed.
            return self._classify(plan, path, relpath, st, known.content_sha256, known)
        if not settled and not self._settler.at_rest(st, self._clock()):
            return self._unsettled(plan, path)
        if st.st_size == 0:
            return self._problem(plan, path, relpath, st, Outcome.INCOMPLETE, "zero-byte file")
        if st.st_size > self._max_file_bytes:
            return self._problem(
                plan,
                path,
                relpath,
                st,
                Outcome.FAILED,
                f"{st.st_size} bytes is over upload.max_file_bytes ({self._max_file_bytes})",
            )
        try:
            inspected = self._inspect(path, st, check_complete=not settled)
        except FileNotFoundError:
            return Outcome.GONE
        except OSError as exc:
            return self._problem(
                plan, path, relpath, st, Outcome.FAILED, f"unreadable: {exc.strerror}"
            )
        if inspected is _CHANGED_SINCE_STAT:
            # Written to since `st` was taken: what was decided about it no longer holds.
            return self._unsettled(plan, path)
        if isinstance(inspected, tuple):
            return self._problem(plan, path, relpath, st, *inspected)
        return self._classify(plan, path, relpath, st, inspected, known)

    def _inspect(
        self, path: Path, st: os.stat_result, *, check_complete: bool
    ) -> str | tuple[Outcome, str] | _Changed:
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
                return Outcome.FAILED, "not an image (unknown file signature)"
            if check_complete:
                reason = self._settler.image_problem(fd, opened.st_size)
                if reason is not None:
                    return Outcome.INCOMPLETE, reason
            return hashlib.file_digest(f, "sha256").hexdigest()

    def _unsettled(self, plan: WatchPlan, path: Path) -> Outcome:
        self._settler.submit(path, (plan,))
        return Outcome.UNSETTLED

    def _classify(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        content_sha256: str | None,
        known: KnownFile | None,
    ) -> Outcome | _Pending:
        if content_sha256 is None:
            try:
                content_sha256 = file_sha256(path)
            except OSError as exc:
                return self._problem(
                    plan, path, relpath, st, Outcome.FAILED, f"unreadable: {exc.strerror}"
                )
        digest = content_sha256
        try:
            classification = plan.rules.classify(
                relpath, mtime_ns=st.st_mtime_ns, sha256=lambda: digest
            )
        except PathRuleError as exc:
            return self._problem(plan, path, relpath, st, Outcome.FAILED, f"path rules: {exc}")
        if (
            known is not None
            and known.state != GONE
            and known.size_bytes == st.st_size
            and known.mtime_ns == st.st_mtime_ns
            and known.metadata_sha256 == classification.metadata_sha256
            and known.dataset_id == plan.dataset_id
        ):
            return Outcome.UNCHANGED  # the fast path: nothing to write
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

    def _record(self, plan: WatchPlan, chunk: Sequence[_Pending]) -> list[Outcome]:
        """Record a chunk of candidates in one transaction; what became of each."""
        if not chunk:
            return []
        answers = self._store.record_candidates([p.candidate for p in chunk], now=self._clock())
        outcomes = []
        for pending, answer in zip(chunk, answers, strict=True):
            outcome = Outcome(answer)
            if outcome is Outcome.COLLISION:
                outcome = self._settle_collision(plan, pending)
            if outcome in (Outcome.NEW, Outcome.CHANGED):
                candidate = pending.candidate
                log.debug(
                    "file_queued",
                    path=str(pending.path),
                    reference_id=candidate.reference_id,
                    dataset_id=candidate.dataset_id,
                    why=outcome.value,
                )
            outcomes.append(outcome)
        queued = Outcome.NEW in outcomes or Outcome.CHANGED in outcomes
        if queued and self._uploader is not None:
            self._uploader.wake()
        return outcomes

    def _settle_collision(self, plan: WatchPlan, pending: _Pending) -> Outcome:
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
                return Outcome(self._store.record_candidate(candidate, now=self._clock()))
            other_path = Path(watch_root(other[0])) / path_from_text(other[1])
            # Each pass retires one stale owner, so this ends.
            if os.path.lexists(other_path) or not self._store.mark_gone(*other, now=self._clock()):
                break
        return self._problem(
            plan,
            pending.path,
            candidate.relpath,
            pending.st,
            Outcome.FAILED,
            f"reference_id {candidate.reference_id!r} is already used by {other_path}",
        )

    def _problem(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result | None,
        outcome: Outcome,
        reason: str,
    ) -> Outcome:
        """Park the file (`outcome` FAILED or INCOMPLETE, its state in the store) with why."""
        log.warning(
            "file_not_sendable",
            path=str(path),
            dataset_id=plan.dataset_id,
            state=outcome.value,
            reason=reason,
        )
        self._store.record_problem(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            size_bytes=st.st_size if st is not None else -1,
            mtime_ns=st.st_mtime_ns if st is not None else -1,
            state=outcome.value,
            reason=reason,
            now=self._clock(),
        )
        return outcome
