"""The exceptions nucleus-watcher raises on purpose.

    WatcherError
    ├── ConfigError              bad settings; carries one line per problem
    ├── StoreError               the state database cannot be used
    │   └── StoreBusyError           another nucleus-watcher process owns it
    └── UploadError              a request to Nucleus did not confirm the items
        ├── RetryableUploadError     try again later (network, 408, 429, 5xx)
        │   └── TimeoutUploadError       no progress for timeout_seconds
        ├── PermanentUploadError     this request will never succeed as is (400, 404, 413, bad file)
        │   └── LocalFileError           one local file of the request cannot be opened
        └── UnauthorizedError        401: the key is wrong; every upload pauses until it changes

    ValueError
    ├── PathRuleError            this path cannot become an item (the file is parked with it)
    ├── TemplateError            a template or glob in the config cannot be parsed
    └── KeyedProblems            config: a validator's problems under keys below its model

    OSError
    └── NotARegularFile          a symlink, FIFO, device or folder where a file was expected

    Exception (signals inside the client; they never reach its callers)
    ├── DeadlineExceeded         a request made no progress for timeout_seconds
    └── BodyChanged              a file changed size while it was streamed

The ValueError and OSError ones keep the built-in bases their callers catch them by (pydantic
turns a ValueError from a validator into a validation error). Anything else that escapes is a
bug, not a user mistake.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


class WatcherError(Exception):
    """Base of every error nucleus-watcher raises on purpose."""


class ConfigError(WatcherError):
    """Settings that cannot be used. `problems` holds one printable line per problem."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("\n".join(self.problems))


class StoreError(WatcherError):
    """The state database cannot be opened, read or written."""


class StoreBusyError(StoreError):
    """Another nucleus-watcher process (daemon or scan) has the state database open for writing."""


class UploadError(WatcherError):
    """A request to Nucleus did not confirm the items it carried."""

    def __init__(self, reason: str, *, status_code: int | None = None) -> None:
        self.reason = reason
        self.status_code = status_code
        # reference_id -> sha256 of the file bytes that went out, when the whole body was sent
        # before the failure (the server may have stored them; see NucleusClient.append).
        self.streamed_sha256: dict[str, str] = {}
        super().__init__(reason)


class RetryableUploadError(UploadError):
    """Transient: the same request may succeed later; `retry_after_seconds` is the server's hint."""

    def __init__(
        self,
        reason: str,
        *,
        status_code: int | None = None,
        retry_after_seconds: float | None = None,
    ) -> None:
        super().__init__(reason, status_code=status_code)
        self.retry_after_seconds = retry_after_seconds


class TimeoutUploadError(RetryableUploadError):
    """The request made no progress for `timeout_seconds` (nothing sent, acknowledged or
    answered), or the connection could not be made in time."""


class PermanentUploadError(UploadError):
    """The request will not succeed as it is; the items are parked with the reason."""


class LocalFileError(PermanentUploadError):
    """A local file of the request could not be opened: only that item should be parked."""

    def __init__(self, path: Path, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path


class UnauthorizedError(UploadError):
    """The server refused the API key (401)."""


class PathRuleError(ValueError):
    """This path cannot be turned into an item; the caller parks the file with this reason."""


class TemplateError(ValueError):
    """A template or glob cannot be parsed."""


class NotARegularFile(OSError):
    """The path is a symlink, FIFO, device or folder: we only read regular files."""


class KeyedProblems(ValueError):
    """Raised from a config validator to report problems under keys below the model being
    validated: (key, message) pairs."""

    def __init__(self, problems: Sequence[tuple[str, str]]) -> None:
        self.problems = list(problems)
        super().__init__("; ".join(message for _, message in self.problems))


class DeadlineExceeded(Exception):
    """Raised inside a request when its deadline has passed; the client turns it into a
    `TimeoutUploadError`."""


class BodyChanged(Exception):
    """A file grew or shrank while it was streamed, so the body no longer fits Content-Length;
    the client turns it into a `LocalFileError` for that file."""
