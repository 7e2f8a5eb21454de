"""One file: must it be sent, and as what? The decision the walk and the live path share.

A file is refused if it is no regular file, empty, too large, not an image or (unless the
settler already found it finished) not finished yet; else it is classified by its watch's rules
and becomes a row to record. The bytes are read once, for the signature, the completeness check
and the hash, and only if that open file still has the size and mtime the decision was made on.
"""

from __future__ import annotations

import hashlib
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from pathlib import Path
from typing import Protocol

import structlog

from watcher.errors import PathRuleError
from watcher.files import FileKind, kind_of, open_regular_file, path_from_text, sniff_image_type
from watcher.pipeline.plans import WatchPlan
from watcher.store import Candidate, FileState, KnownFile, StateStore, watch_root

# Logs as the reconcile, the logger name operators filter on for what became of a file.
log = structlog.get_logger("watcher.reconcile")

_HEAD_BYTES = 64


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


class _Changed(Enum):
    """The open file no longer has the size and mtime the decision was made on."""

    SINCE_STAT = "changed since its lstat"


_CHANGED_SINCE_STAT = _Changed.SINCE_STAT


@dataclass(frozen=True)
class Pending:
    """A file found new or changed, waiting to be recorded (a walk records them in chunks)."""

    candidate: Candidate
    path: Path
    st: os.stat_result


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


class Examiner:
    """Decides, for one file at one stat, what it becomes, and records the rows."""

    def __init__(
        self,
        store: StateStore,
        settler: Settling,
        *,
        max_file_bytes: int,
        uploader: Waking | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._settler = settler
        self._max_file_bytes = max_file_bytes
        self._uploader = uploader
        self._clock = clock

    def examine(
        self,
        plan: WatchPlan,
        path: Path,
        relpath: str,
        st: os.stat_result,
        known: KnownFile | None,
        *,
        settled: bool = False,
    ) -> Outcome | Pending:
        """What to do with one file: an outcome when it needs no write (or is a problem), else
        the row to record. `settled` when the settler found it finished at `st`.

        `_examine` behind a per-file barrier: an unexpected exception (a bug, a name or a
        file nobody foresaw) is recorded on that file with the reason and the walk goes on."""
        try:
            return self._examine(plan, path, relpath, st, known, settled)
        except Exception as exc:
            log.exception("file_examine_failed", path=str(path), dataset_id=plan.dataset_id)
            try:
                return self.problem(
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
    ) -> Outcome | Pending:
        """An outcome when the file needs no write (or is a problem), else what to record."""
        kind = kind_of(st)
        if kind is not FileKind.REGULAR:
            return self.problem(plan, path, relpath, st, Outcome.FAILED, kind.value)
        unchanged_on_disk = (
            known is not None
            and known.state != FileState.GONE
            and not known.reexamine
            and known.size_bytes == st.st_size
            and known.mtime_ns == st.st_mtime_ns
        )
        if unchanged_on_disk and known is not None:
            if known.state in (FileState.FAILED, FileState.INCOMPLETE) and not known.classified:
                # Parked before classification: waits for a change or `retry`.
                return Outcome.UNCHANGED
            # Same bytes as recorded: reuse the recorded hash, only the rules may have changed.
            return self._classify(plan, path, relpath, st, known.content_sha256, known)
        if not settled and not self._settler.at_rest(st, self._clock()):
            return self._unsettled(plan, path)
        if st.st_size == 0:
            return self.problem(plan, path, relpath, st, Outcome.INCOMPLETE, "zero-byte file")
        if st.st_size > self._max_file_bytes:
            return self.problem(
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
            return self.problem(
                plan, path, relpath, st, Outcome.FAILED, f"unreadable: {exc.strerror}"
            )
        if inspected is _CHANGED_SINCE_STAT:
            # Written to since `st` was taken: what was decided about it no longer holds.
            return self._unsettled(plan, path)
        if isinstance(inspected, tuple):
            return self.problem(plan, path, relpath, st, *inspected)
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
    ) -> Outcome | Pending:
        if content_sha256 is None:
            try:
                content_sha256 = file_sha256(path)
            except OSError as exc:
                return self.problem(
                    plan, path, relpath, st, Outcome.FAILED, f"unreadable: {exc.strerror}"
                )
        digest = content_sha256
        try:
            classification = plan.rules.classify(
                relpath, mtime_ns=st.st_mtime_ns, sha256=lambda: digest
            )
        except PathRuleError as exc:
            return self.problem(plan, path, relpath, st, Outcome.FAILED, f"path rules: {exc}")
        if (
            known is not None
            and known.classified
            and known.state != FileState.GONE
            and not known.reexamine
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
        return Pending(candidate, path, st)

    def record(self, plan: WatchPlan, chunk: Sequence[Pending]) -> list[Outcome]:
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

    def _settle_collision(self, plan: WatchPlan, pending: Pending) -> Outcome:
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
        return self.problem(
            plan,
            pending.path,
            candidate.relpath,
            pending.st,
            Outcome.FAILED,
            f"reference_id {candidate.reference_id!r} is already used by {other_path}",
        )

    def problem(
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
            size_bytes=st.st_size if st is not None else None,
            mtime_ns=st.st_mtime_ns if st is not None else None,
            state=FileState(outcome.value),
            reason=reason,
            now=self._clock(),
        )
        return outcome

    def incomplete(
        self, plan: WatchPlan, path: Path, relpath: str, st: os.stat_result, reason: str
    ) -> Outcome:
        """Park a regular file the settler gave up on (it never finished) with why."""
        log.warning("file_incomplete", path=str(path), dataset_id=plan.dataset_id, reason=reason)
        self._store.record_problem(
            watch=plan.key,
            relpath=relpath,
            dataset_id=plan.dataset_id,
            size_bytes=st.st_size,
            mtime_ns=st.st_mtime_ns,
            state=FileState.INCOMPLETE,
            reason=reason,
            now=self._clock(),
        )
        return Outcome.INCOMPLETE
