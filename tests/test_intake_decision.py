"""The intake decision as a table: the row on record and the file on disk in, what the store
writes out. No database here; tests/test_store.py checks that the writes do what is decided."""

from __future__ import annotations

import pytest

from watcher.store import Candidate, FileState, UnknownState
from watcher.store.intake_decision import (
    NO_VERSION,
    IntakeDecision,
    IntakeOutcome,
    OnRecord,
    Version,
    decide_intake,
)


def version(sha: str = "c1", meta: str = "m1", *, dataset: str = "ds_1") -> Version:
    return Version(dataset, "a.jpg", sha, meta)


def on_disk(sha: str = "c1", meta: str = "m1", *, dataset: str = "ds_1") -> Candidate:
    return Candidate(
        watch="/srv/cam",
        relpath="a.jpg",
        dataset_id=dataset,
        reference_id="a.jpg",
        size_bytes=10,
        mtime_ns=1,
        content_sha256=sha,
        metadata={},
        metadata_sha256=meta,
        remote_url=None,
    )


def row(
    state: FileState | UnknownState,
    current: Version = NO_VERSION,
    *,
    sent: Version = NO_VERSION,
    confirmed: Version = NO_VERSION,
) -> OnRecord:
    return OnRecord(state=state, current=current, sent=sent, confirmed=confirmed)


UPLOADED_C1 = row(FileState.UPLOADED, version("c1"), sent=version("c1"), confirmed=version("c1"))

# (row on record, file on disk, another live file sends its reference_id, decision)
CASES = {
    "a file whose reference_id another live file sends is refused as a collision": (
        None,
        on_disk(),
        True,
        IntakeDecision.REFUSE_COLLISION,
    ),
    "a file on record is refused too when another live file took its reference_id": (
        row(FileState.PENDING, version("c1")),
        on_disk("c2"),
        True,
        IntakeDecision.REFUSE_COLLISION,
    ),
    "a file never seen is inserted": (None, on_disk(), False, IntakeDecision.INSERT),
    "a file in flight with the version that went out is only noted": (
        row(FileState.IN_FLIGHT, version("c1"), sent=version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.NOTE_WHILE_IN_FLIGHT,
    ),
    "a file changed while in flight goes again after the answer": (
        row(FileState.IN_FLIGHT, version("c1"), sent=version("c1")),
        on_disk("c2"),
        False,
        IntakeDecision.REQUEUE_AFTER_SEND,
    ),
    "a file in flight reverted to what the server confirmed still waits for the answer": (
        row(FileState.IN_FLIGHT, version("c2"), sent=version("c2"), confirmed=version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.REQUEUE_AFTER_SEND,
    ),
    "an uploaded file that was only touched stays uploaded": (
        UPLOADED_C1,
        on_disk("c1"),
        False,
        IntakeDecision.MARK_UPLOADED,
    ),
    "a gone file that comes back unchanged is uploaded without a send": (
        row(FileState.GONE, NO_VERSION, confirmed=version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.MARK_UPLOADED,
    ),
    "a parked file changed back to what the server confirmed is uploaded": (
        row(FileState.FAILED, version("c2"), confirmed=version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.MARK_UPLOADED,
    ),
    "a pending file seen again unchanged keeps its place and its backoff": (
        row(FileState.PENDING, version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.KEEP_QUEUED,
    ),
    "a failed file seen again unchanged stays parked with its reason": (
        row(FileState.FAILED, version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.KEEP_QUEUED,
    ),
    "an incomplete file seen again with the same version is queued": (
        row(FileState.INCOMPLETE, version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.QUEUE,
    ),
    "an uploaded file whose bytes changed is queued": (
        UPLOADED_C1,
        on_disk("c2"),
        False,
        IntakeDecision.QUEUE,
    ),
    "an uploaded file whose metadata changed is queued": (
        UPLOADED_C1,
        on_disk("c1", "m2"),
        False,
        IntakeDecision.QUEUE,
    ),
    "an uploaded file now meant for another dataset is queued": (
        UPLOADED_C1,
        on_disk("c1", dataset="ds_2"),
        False,
        IntakeDecision.QUEUE,
    ),
    "a pending file that changed again is queued with fresh tries": (
        row(FileState.PENDING, version("c2")),
        on_disk("c3"),
        False,
        IntakeDecision.QUEUE,
    ),
    "a file reverted after an unanswered update is queued, the server may hold the update": (
        row(FileState.PENDING, version("c2"), sent=version("c2")),
        on_disk("c1"),
        False,
        IntakeDecision.QUEUE,
    ),
    "a row in a state this version does not know is queued again": (
        row(UnknownState("archived"), version("c1")),
        on_disk("c1"),
        False,
        IntakeDecision.QUEUE,
    ),
    "a gone file that comes back changed is queued": (
        row(FileState.GONE, NO_VERSION, confirmed=version("c1")),
        on_disk("c2"),
        False,
        IntakeDecision.QUEUE,
    ),
}


@pytest.mark.parametrize(
    ("on_record", "candidate", "reference_taken", "expected"),
    list(CASES.values()),
    ids=list(CASES),
)
def test_intake_decision(
    on_record: OnRecord | None,
    candidate: Candidate,
    reference_taken: bool,
    expected: IntakeDecision,
) -> None:
    assert decide_intake(on_record, candidate, reference_taken=reference_taken) is expected


def test_every_decision_appears_in_the_table() -> None:
    assert {case[-1] for case in CASES.values()} == set(IntakeDecision)


@pytest.mark.parametrize(
    ("decision", "outcome"),
    [
        (IntakeDecision.REFUSE_COLLISION, "collision"),
        (IntakeDecision.INSERT, "new"),
        (IntakeDecision.NOTE_WHILE_IN_FLIGHT, "unchanged"),
        (IntakeDecision.REQUEUE_AFTER_SEND, "deferred"),
        (IntakeDecision.MARK_UPLOADED, "unchanged"),
        (IntakeDecision.KEEP_QUEUED, "unchanged"),
        (IntakeDecision.QUEUE, "changed"),
    ],
    ids=lambda value: value.name.lower() if isinstance(value, IntakeDecision) else value,
)
def test_each_decision_reports_the_outcome_the_reconcile_counts(
    decision: IntakeDecision, outcome: str
) -> None:
    assert decision.outcome == outcome
    assert isinstance(decision.outcome, IntakeOutcome)
