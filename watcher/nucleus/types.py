"""The values an append is made of and answered with: items in, results and job states out."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any, Final

from watcher.wire import REMOTE_URL_PREFIXES

# The service takes at most 10 files per multipart request (as the official client sends).
MAX_FILES_PER_REQUEST: Final = 10


class JobStatus(StrEnum):
    """The job states `shared/nucleus-api.md` lists; the values are the server's words."""

    QUEUED = "Queued"
    RUNNING = "Running"
    COMPLETED = "Completed"
    ERRORED = "Errored"
    ERRORED_SERVER = "Errored_Server"
    ERRORED_USER = "Errored_User"
    ERRORED_PARTIAL = "Errored_Partial"
    ERRORED_HANGING = "Errored_Hanging"
    CANCELLED = "Cancelled"
    RETRIED = "Retried"


# Job states in which the job will not change any more.
_FINAL_STATES: Final = frozenset(
    {
        JobStatus.COMPLETED,
        JobStatus.ERRORED,
        JobStatus.ERRORED_SERVER,
        JobStatus.ERRORED_USER,
        JobStatus.ERRORED_PARTIAL,
        JobStatus.ERRORED_HANGING,
        JobStatus.CANCELLED,
        JobStatus.RETRIED,
    }
)
# Final states caused by the items themselves: sending them again would fail the same way.
_USER_ERROR_STATES: Final = frozenset({JobStatus.ERRORED_USER, JobStatus.ERRORED_PARTIAL})


@dataclass(frozen=True)
class UploadItem:
    """One dataset item to append: a local file to stream, or a URL the service fetches."""

    reference_id: str
    metadata: Mapping[str, Any]
    update: bool
    path: Path | None = None
    remote_url: str | None = None

    def __post_init__(self) -> None:
        if not self.reference_id:
            raise ValueError("an upload item needs a non-empty reference_id")
        if (self.path is None) == (self.remote_url is None):
            raise ValueError(f"item {self.reference_id!r}: give exactly one of path and remote_url")
        if self.remote_url is not None and not self.remote_url.startswith(REMOTE_URL_PREFIXES):
            raise ValueError(
                f"item {self.reference_id!r}: remote_url must start with "
                + ", ".join(REMOTE_URL_PREFIXES)
            )


@dataclass(frozen=True)
class AppendResult:
    """What the server said about one append request."""

    new_items: int
    updated_items: int
    ignored_items: int
    job_id: str | None  # set for asynchronous appends; the counts are then all 0
    item_errors: dict[str, str]  # reference_id -> error, where the server named the item
    bytes_sent: int  # request body bytes (multipart or JSON)
    upload_errors: int = 0  # the server's own count of items it could not ingest
    # reference_id -> sha256 of the file bytes actually streamed (local files). A file
    # rewritten while it was read differs from the hash recorded when it was claimed.
    streamed_sha256: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class JobState:
    """The status of an asynchronous append job.

    `status` is the server's word as it came, not a `JobStatus`: a state the service adds later
    must still reach the log and the metrics label unchanged (it compares equal to the member
    when it is a known one).
    """

    job_id: str
    status: str
    message: str

    @property
    def finished(self) -> bool:
        # Unknown states count as still running: polling on is safer than guessing an outcome.
        return self.status in _FINAL_STATES or self.status.startswith(JobStatus.ERRORED)

    @property
    def succeeded(self) -> bool:
        return self.status == JobStatus.COMPLETED

    @property
    def user_error(self) -> bool:
        """The items themselves were refused: park them. Other failed states are retried."""
        return self.status in _USER_ERROR_STATES
