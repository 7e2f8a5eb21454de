"""What each job state the server can report means to the uploader: still running, done, or
failed because of the items (park them) or for another reason (retry them)."""

from __future__ import annotations

import json

import pytest

from watcher.nucleus import JobState, JobStatus

# status -> (finished, succeeded, user_error)
MEANINGS = {
    "Queued": (False, False, False),
    "Running": (False, False, False),
    "Completed": (True, True, False),
    "Errored": (True, False, False),
    "Errored_Server": (True, False, False),
    "Errored_User": (True, False, True),
    "Errored_Partial": (True, False, True),
    "Errored_Hanging": (True, False, False),
    "Cancelled": (True, False, False),
    "Retried": (True, False, False),
    # States the service may add later: an unknown error is final, anything else runs on.
    "Errored_Quota": (True, False, False),
    "Paused": (False, False, False),
}


@pytest.mark.parametrize(("status", "meaning"), MEANINGS.items())
def test_each_job_state_reads_as_running_done_or_failed(
    status: str, meaning: tuple[bool, bool, bool]
) -> None:
    state = JobState(job_id="job_1", status=status, message="")
    assert (state.finished, state.succeeded, state.user_error) == meaning


def test_every_documented_job_state_has_a_meaning_and_keeps_its_wire_spelling() -> None:
    assert {str(status) for status in JobStatus} <= MEANINGS.keys()
    for status in JobStatus:
        assert json.dumps(status) == json.dumps(status.value)
        assert f"job {status}" == f"job {status.value}"
