"""What recording a file does to its row, decided without SQL or a clock.

`decide_intake` takes the row on record (as a value) and what is on disk now, and says what
the store must write; `intake.record_candidate` reads the row, asks, and applies the answer.
Kept pure so that every case can be read in one place and tested as a table.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum, StrEnum, auto

from watcher.store.records import Candidate
from watcher.store.states import FileState, UnknownState


@dataclass(frozen=True, slots=True)
class Version:
    """What one send carries, as far as the server's copy goes: two sends of equal versions
    store the same item."""

    dataset_id: str | None
    reference_id: str | None
    content_sha256: str | None
    metadata_sha256: str | None

    @classmethod
    def of(cls, candidate: Candidate) -> Version:
        return cls(
            candidate.dataset_id,
            candidate.reference_id,
            candidate.content_sha256,
            candidate.metadata_sha256,
        )


NO_VERSION = Version(None, None, None, None)


@dataclass(frozen=True, slots=True)
class OnRecord:
    """A file's row, as much of it as the decision reads."""

    state: FileState | UnknownState
    current: Version  # what the row would send next
    sent: Version  # what the request in flight carried (meaningful while in flight)
    confirmed: Version  # what the server confirmed last (NO_VERSION once that is unsure)


class IntakeOutcome(StrEnum):
    """What recording a file did, as `StateStore.record_candidate` reports it."""

    NEW = "new"  # never seen: queued
    CHANGED = "changed"  # differs from what the server holds: queued
    UNCHANGED = "unchanged"  # nothing (more) to send
    DEFERRED = "deferred"  # in flight with another version: this one goes after the answer
    COLLISION = "collision"  # another live file already sends this reference_id here


class IntakeDecision(Enum):
    """What the store writes for a file it was told about."""

    REFUSE_COLLISION = auto()  # no write: the caller settles who keeps the reference_id
    INSERT = auto()  # a new pending row
    NOTE_WHILE_IN_FLIGHT = auto()  # the same version is out: record, send nothing more
    REQUEUE_AFTER_SEND = auto()  # another version is out: send this one after the answer
    MARK_UPLOADED = auto()  # the server holds exactly this (a touch, a file back after a delete)
    KEEP_QUEUED = auto()  # already pending or parked with this version: keep backoff or reason
    QUEUE = auto()  # the server may not hold this: pending again, with fresh tries

    @property
    def outcome(self) -> IntakeOutcome:
        return _OUTCOMES[self]


_OUTCOMES = {
    IntakeDecision.REFUSE_COLLISION: IntakeOutcome.COLLISION,
    IntakeDecision.INSERT: IntakeOutcome.NEW,
    IntakeDecision.NOTE_WHILE_IN_FLIGHT: IntakeOutcome.UNCHANGED,
    IntakeDecision.REQUEUE_AFTER_SEND: IntakeOutcome.DEFERRED,
    IntakeDecision.MARK_UPLOADED: IntakeOutcome.UNCHANGED,
    IntakeDecision.KEEP_QUEUED: IntakeOutcome.UNCHANGED,
    IntakeDecision.QUEUE: IntakeOutcome.CHANGED,
}


def decide_intake(
    on_record: OnRecord | None, candidate: Candidate, *, reference_taken: bool
) -> IntakeDecision:
    """`candidate` is what is on disk now; `on_record` its row (None if it has none);
    `reference_taken` whether another live file already sends its reference_id to its
    dataset."""
    if reference_taken:
        return IntakeDecision.REFUSE_COLLISION
    if on_record is None:
        return IntakeDecision.INSERT
    version = Version.of(candidate)
    if on_record.state == FileState.IN_FLIGHT:
        # Never two sends of one file at once: the answer decides what goes next.
        if version == on_record.sent:
            return IntakeDecision.NOTE_WHILE_IN_FLIGHT
        return IntakeDecision.REQUEUE_AFTER_SEND
    if version == on_record.confirmed:
        return IntakeDecision.MARK_UPLOADED
    if version == on_record.current and on_record.state in (FileState.PENDING, FileState.FAILED):
        return IntakeDecision.KEEP_QUEUED
    return IntakeDecision.QUEUE
