"""Following asynchronous append jobs until the server says how each ended.

A job's rows stay `in_flight` under its id until then, across restarts: jobs submitted before a
restart are followed even when `asynchronous` has since been turned off.
"""

from __future__ import annotations

from collections.abc import Callable

import structlog

from watcher.errors import (
    PermanentUploadError,
    RetryableUploadError,
    UnauthorizedError,
    UploadError,
)
from watcher.nucleus import JobState
from watcher.pipeline.upload.gate import UploadGate
from watcher.pipeline.upload.outcomes import UploadOutcomes
from watcher.pipeline.upload.policy import UploadPolicy
from watcher.pipeline.upload.shared_client import SharedClient
from watcher.store import FileRecord, StateStore

log = structlog.get_logger("watcher.uploader")


class JobFollower:
    """Runs in its own thread (`run`); polls every job in flight each `job_poll_seconds`."""

    def __init__(
        self,
        store: StateStore,
        client: SharedClient,
        gate: UploadGate,
        outcomes: UploadOutcomes,
        policy: UploadPolicy,
        clock: Callable[[], float],
    ) -> None:
        self._store = store
        self._client = client
        self._gate = gate
        self._outcomes = outcomes
        self._policy = policy
        self._clock = clock
        # Set when `run` returned because no job can come any more (not a crash).
        self.ended_on_purpose = False

    def run(self) -> None:
        while not self._gate.stopping:
            jobs = self._store.jobs_in_flight()
            if not jobs and not self._policy.asynchronous:
                # Only here for jobs from an earlier asynchronous run; none can come now.
                self.ended_on_purpose = True
                log.info("earlier_jobs_followed")
                return
            for job_id, ids in jobs.items():
                try:
                    self._check_job(job_id, ids)
                except UnauthorizedError as exc:
                    self._gate.pause(exc.reason)
                except UploadError as exc:
                    log.warning("job_poll_failed", job_id=job_id, reason=exc.reason)
            if not self._gate.sleep(self._policy.job_poll_seconds):
                return

    def _check_job(self, job_id: str, ids: list[int]) -> None:
        try:
            with self._client.in_use() as client:
                state = client.job(job_id)
        except (UnauthorizedError, RetryableUploadError):
            raise
        except PermanentUploadError as exc:
            # The server no longer knows the job (404): its items go again, same reference_ids.
            log.warning("job_unknown", job_id=job_id, items=len(ids), reason=exc.reason)
            self._store.mark_retry(ids, f"job {job_id} unknown to the server", self._clock())
            self._gate.wake()
            return
        if not state.finished:
            return
        records = self._store.get_many(ids)
        self._outcomes.job_finished(state.status)
        log.info("job_finished", job_id=job_id, status=state.status, items=len(records))
        if state.succeeded:
            self._outcomes.confirm(records)
        elif state.user_error:
            self._refused(job_id, state, records)
        else:
            self._outcomes.back_off(
                records, RetryableUploadError(f"job {job_id} ended {state.status}: {state.message}")
            )

    def _refused(self, job_id: str, state: JobState, records: list[FileRecord]) -> None:
        """The job ended on the items' fault: park those the server names, and the rest too if
        it blames the job as a whole (or names nobody)."""
        with self._client.in_use() as client:
            errors = client.job_errors(job_id, [r.reference_id for r in records])
        general = errors.get("")
        for record in records:
            reason = errors.get(record.reference_id)
            if reason is not None:
                self._outcomes.park([record], f"job {state.status}: {reason}")
        rest = [r for r in records if r.reference_id not in errors]
        if general is not None or not errors:
            self._outcomes.park(rest, f"job {state.status}: {general or state.message}")
        else:
            self._outcomes.confirm(rest)
