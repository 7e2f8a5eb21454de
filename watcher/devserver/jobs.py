"""Async append jobs: each reports Running until its delay has passed. Held in memory only."""

from __future__ import annotations

import threading
import time
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from watcher.devserver.catalog import _AppendOutcome

# --------------------------------------------------------------------------- jobs


@dataclass
class _Job:
    job_id: str
    created_at: str
    ready_at_monotonic: float
    final_status: str  # what the job reports once its delay has passed
    total_items: int
    errors: list[str]

    def status(self) -> str:
        return self.final_status if time.monotonic() >= self.ready_at_monotonic else "Running"

    def status_answer(self) -> dict[str, Any]:
        status = self.status()
        done = status != "Running"
        message = {
            "Running": "Job is running.",
            "Completed": "Job completed successfully.",
        }.get(status, f"{len(self.errors)} item(s) failed; see job/{self.job_id}/errors")
        return {
            "job_id": self.job_id,
            "status": status,
            "message": message,
            "job_progress": "1.00" if done else "0.00",
            "completed_steps": str(self.total_items if done else 0),
            "total_steps": str(self.total_items),
        }

    def info_answer(self) -> dict[str, Any]:
        return {
            "job_id": self.job_id,
            "job_last_known_status": self.status(),
            "job_type": "uploadDatasetItems",
            "job_creation_time": self.created_at,
        }


class _JobBook:
    def __init__(self, delay_seconds: float) -> None:
        self._delay_seconds = delay_seconds
        self._lock = threading.Lock()
        self._jobs: dict[str, _Job] = {}

    def create(self, outcome: _AppendOutcome, total_items: int) -> _Job:
        job = _Job(
            job_id=f"job_{uuid.uuid4().hex[:20]}",
            created_at=datetime.now(UTC).isoformat(),
            ready_at_monotonic=time.monotonic() + self._delay_seconds,
            final_status="Errored_User" if outcome.problems else "Completed",
            total_items=total_items,
            errors=[problem.as_job_error() for problem in outcome.problems],
        )
        with self._lock:
            self._jobs[job.job_id] = job
        return job

    def get(self, job_id: str) -> _Job | None:
        with self._lock:
            return self._jobs.get(job_id)
