"""What the server's answers mean: the status code as confirmed, retry, permanent or
unauthorized; a failed exchange as a network error; the JSON bodies as results; and which item
each error string is about.

Everything the server says may echo what it was sent, so every text taken from an answer goes
through `AnswerReader.scrub` before it can reach an exception, a log line or the state store.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import math
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Final

import requests

from watcher.errors import (
    PermanentUploadError,
    RetryableUploadError,
    TimeoutUploadError,
    UnauthorizedError,
)
from watcher.nucleus.types import AppendResult, JobState

_ERROR_TEXT_MAX_CHARS: Final = 300
_ITEM_ERROR_MAX_CHARS: Final = 1000


@dataclass
class Answer:
    """One answer as read off the wire, before anything is made of it."""

    status_code: int
    headers: Mapping[str, str]
    body: bytes = field(repr=False)


class AnswerReader:
    """Turns answers into results or errors, with the API key removed from any text."""

    def __init__(self, api_key: str) -> None:
        self._api_key = api_key

    def scrub(self, text: str) -> str:
        """Remove the API key from server-provided text (a server may echo what it got)."""
        return text.replace(self._api_key, "[redacted]") if self._api_key in text else text

    def raise_for_status(self, answer: Answer) -> None:
        status = answer.status_code
        if 200 <= status < 300:
            return
        text = self.scrub(_server_error_text(answer.body))
        if status == 401:
            raise UnauthorizedError(
                f"the server refused the API key (HTTP 401): {text}", status_code=status
            )
        if status in (408, 429) or status >= 500:
            raise RetryableUploadError(
                f"HTTP {status} from server: {text}",
                status_code=status,
                retry_after_seconds=_retry_after_seconds(answer.headers.get("Retry-After")),
            )
        if 300 <= status < 400:
            # Probably a wrong endpoint; retrying keeps the items until someone fixes it.
            raise RetryableUploadError(
                f"HTTP {status}: the server redirects; check nucleus.endpoint", status_code=status
            )
        if status < 200:
            raise RetryableUploadError(f"bad answer from server: HTTP {status}")
        raise PermanentUploadError(f"HTTP {status}: {text}", status_code=status)

    def json(self, answer: Answer) -> Any:
        try:
            return json.loads(answer.body)
        except (ValueError, UnicodeDecodeError):
            preview = self.scrub(" ".join(answer.body[:120].decode("utf-8", "replace").split()))
            raise RetryableUploadError(
                f"bad answer from server: not JSON ({preview or 'empty'})"
            ) from None

    def json_object(self, answer: Answer) -> dict[str, Any]:
        data = self.json(answer)
        if not isinstance(data, dict):
            raise RetryableUploadError("bad answer from server: expected a JSON object")
        return data

    def async_result(self, data: Mapping[str, Any], bytes_sent: int) -> AppendResult:
        job_id = data.get("job_id")
        if not isinstance(job_id, str) or not job_id:
            raise RetryableUploadError("bad answer from server: asynchronous append without job_id")
        return AppendResult(0, 0, 0, job_id, {}, bytes_sent)

    def sync_result(
        self, data: Mapping[str, Any], reference_ids: Sequence[str], bytes_sent: int
    ) -> AppendResult:
        counts = {}
        for key in ("new_items", "updated_items", "ignored_items"):
            value = data.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise RetryableUploadError(f"bad answer from server: no count '{key}'")
            counts[key] = value
        upload_errors = data.get("upload_errors", 0)
        if not isinstance(upload_errors, int) or isinstance(upload_errors, bool):
            upload_errors = 0
        entries: list[Any] = []
        for key in ("error_items", "error_payload"):
            value = data.get(key)
            if isinstance(value, list):
                entries.extend(value)
            elif isinstance(value, dict):
                entries.extend({"reference_id": k, "error": v} for k, v in value.items())
        errors = self.attribute_errors(entries, reference_ids) if entries else {}
        general = errors.get("")
        attributed = len(errors) - (1 if general is not None else 0)
        if upload_errors > attributed:
            # The server refused items without saying which: the uploader splits a
            # multi-item batch on a permanent error and so finds them one by one.
            detail = f": {general}" if general else ""
            raise PermanentUploadError(
                f"server could not ingest {upload_errors} of {len(reference_ids)} items{detail}"
            )
        return AppendResult(
            counts["new_items"],
            counts["updated_items"],
            counts["ignored_items"],
            None,
            errors,
            bytes_sent,
            upload_errors,
        )

    def job_state(self, job_id: str, answer: Answer) -> JobState:
        data = self.json_object(answer)
        status = data.get("status")
        if not isinstance(status, str) or not status:
            raise RetryableUploadError("bad answer from server: job status without 'status'")
        message = data.get("message", "")
        if not isinstance(message, str):
            message = json.dumps(message, default=str)
        return JobState(job_id=job_id, status=status, message=self.scrub(message))

    def job_errors(self, answer: Answer, reference_ids: Sequence[str]) -> dict[str, str]:
        entries = self.json(answer)
        if not isinstance(entries, list):
            raise RetryableUploadError("bad answer from server: job errors are not a list")
        return self.attribute_errors(entries, reference_ids)

    def attribute_errors(
        self, entries: Sequence[Any], reference_ids: Sequence[str]
    ) -> dict[str, str]:
        """Error entries joined per reference_id they name ("" for those that name none)."""
        attributor = _ErrorAttributor(reference_ids)
        collected: dict[str, list[str]] = {}
        for entry in entries:
            for reference_id, text in attributor.attribute(entry):
                collected.setdefault(reference_id, []).append(self.scrub(text))
        return {
            reference_id: _truncate("; ".join(texts), _ITEM_ERROR_MAX_CHARS)
            for reference_id, texts in collected.items()
        }


def network_error(exc: BaseException, host_label: str) -> RetryableUploadError:
    """The error for an exchange that failed below HTTP: a timeout if that is what failed."""
    reason, timed_out = _network_failure(exc)
    error = TimeoutUploadError if timed_out else RetryableUploadError
    return error(f"network error talking to {host_label}: {reason}")


def _retry_after_seconds(value: str | None) -> float | None:
    """`Retry-After` as seconds from now: delta-seconds or an HTTP-date; None if unusable."""
    if not value:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        pass
    else:
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return max(0.0, (when - datetime.now(UTC)).total_seconds())


def _network_failure(exc: BaseException) -> tuple[str, bool]:
    """A short reason from the chain of a network exception, without URLs or headers, and
    whether a timeout is what failed."""
    seen: set[int] = set()
    pending: list[BaseException] = [exc]
    os_reason: str | None = None
    timed_out = False
    while pending:
        current = pending.pop(0)
        if id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, ssl.SSLCertVerificationError):
            return f"TLS certificate not trusted ({current.verify_message})", False
        if isinstance(current, http.client.RemoteDisconnected):
            return "the server closed the connection without answering", False
        if isinstance(current, TimeoutError | requests.Timeout):
            timed_out = True
        if isinstance(current, OSError) and current.strerror:
            os_reason = current.strerror  # the deepest one wins: it is the most specific
        linked = [current.__cause__, current.__context__, getattr(current, "reason", None)]
        linked.extend(arg for arg in current.args if isinstance(arg, BaseException))
        pending.extend(e for e in linked if isinstance(e, BaseException))
    if os_reason:
        return os_reason, timed_out
    if timed_out:
        return "timed out", True
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the answer was cut off", False
    return type(exc).__name__, False


def _server_error_text(body: bytes) -> str:
    text = body.decode("utf-8", "replace")
    try:
        data = json.loads(text)
    except ValueError:
        data = None
    if isinstance(data, dict):
        for key in ("error", "message", "detail", "errors"):
            if key in data:
                value = data[key]
                text = value if isinstance(value, str) else json.dumps(value, default=str)
                break
    return _truncate(" ".join(text.split()), _ERROR_TEXT_MAX_CHARS) or "(empty answer)"


def _truncate(text: str, max_chars: int) -> str:
    return text if len(text) <= max_chars else text[: max_chars - 3] + "..."


class _ErrorAttributor:
    """Finds which of a request's reference_ids an error entry is about."""

    _REFERENCE_KEYS = ("reference_id", "referenceId", "ref_id", "item_id")
    _TEXT_KEYS = ("error", "message", "reason", "detail")

    def __init__(self, reference_ids: Sequence[str]) -> None:
        self._known = set(reference_ids)
        # Longest first, so "a/10" is tried before "a/1".
        self._by_length = sorted(self._known, key=len, reverse=True)

    def attribute(self, entry: Any) -> list[tuple[str, str]]:
        if isinstance(entry, str):
            parsed = _parse_error_json(entry)
            if isinstance(parsed, dict):
                return self._from_mapping(parsed, entry)
            return self._from_text(entry)
        if isinstance(entry, dict):
            return self._from_mapping(entry, json.dumps(entry, default=str))
        text = json.dumps(entry, default=str)
        return self._from_text(text)

    def _from_mapping(self, entry: Mapping[str, Any], raw: str) -> list[tuple[str, str]]:
        text = self._text_of(entry) or raw
        named = self._named_reference(entry)
        if named is not None and named in self._known:
            return [(named, _truncate(text, _ERROR_TEXT_MAX_CHARS))]
        return self._from_text(raw, shown=text)

    def _named_reference(self, entry: Mapping[str, Any]) -> str | None:
        for holder in (entry, entry.get("item"), entry.get("dataset_item")):
            if isinstance(holder, Mapping):
                for key in self._REFERENCE_KEYS:
                    value = holder.get(key)
                    if isinstance(value, str):
                        return value
        return None

    def _text_of(self, entry: Mapping[str, Any]) -> str | None:
        for key in self._TEXT_KEYS:
            value = entry.get(key)
            if isinstance(value, str) and value:
                return value
            if value:
                return json.dumps(value, default=str)
        return None

    def _from_text(self, raw: str, shown: str | None = None) -> list[tuple[str, str]]:
        text = _truncate(" ".join((shown or raw).split()), _ERROR_TEXT_MAX_CHARS)
        found: list[str] = []
        for reference_id in self._by_length:
            if _names(raw, reference_id) and not any(reference_id in f for f in found):
                found.append(reference_id)
        if not found:
            return [("", text)]
        return [(reference_id, text) for reference_id in found]


def _parse_error_json(text: str) -> Any:
    # The service double-escapes some strings (the official client undoes \\n, \\t, \\").
    for candidate in (text, text.replace('\\\\"', '"').replace("\\\\n", "\n")):
        try:
            return json.loads(candidate)
        except ValueError:
            continue
    return None


def _names(text: str, reference_id: str) -> bool:
    """Whether `text` mentions `reference_id` as a whole token, not as part of a longer id."""
    start = text.find(reference_id)
    while start != -1:
        end = start + len(reference_id)
        before = text[start - 1] if start > 0 else ""
        after = text[end] if end < len(text) else ""
        after_next = text[end + 1] if end + 1 < len(text) else ""
        glued_before = before.isalnum() or before in "_-./"
        glued_after = after.isalnum() or after in "_-/" or (after == "." and after_next.isalnum())
        if not glued_before and not glued_after:
            return True
        start = text.find(reference_id, start + 1)
    return False
