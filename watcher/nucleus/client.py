"""HTTP to the Nucleus append, job and info routes: one request per call, within an idle
deadline, its answer split into a result or a retryable, permanent or unauthorized error.

Nothing here sleeps to retry or touches the state store; the uploader decides what happens
after an error. The wire format follows `shared/nucleus-api.md` (and the official client).

Deadline: `timeout_seconds` is an idle timeout (see `deadline.RequestDeadline` for what counts
as progress): a request lives as long as bytes move, however long that takes on a thin link.
"""

from __future__ import annotations

import http.cookiejar
import math
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import replace
from typing import Any, Final
from urllib.parse import quote

import requests
from urllib3.exceptions import HTTPError as Urllib3HTTPError

from watcher import __version__
from watcher.config import parse_endpoint
from watcher.errors import (
    BodyChanged,
    ConfigError,
    DeadlineExceeded,
    RetryableUploadError,
    TimeoutUploadError,
    UploadError,
)
from watcher.nucleus.answers import Answer, AnswerReader, network_error
from watcher.nucleus.bandwidth import TokenBucket
from watcher.nucleus.bodies import multipart_form, remote_items_json
from watcher.nucleus.deadline import DeadlineReaper, RequestDeadline
from watcher.nucleus.tls import CombinedCaBundle
from watcher.nucleus.transport import (
    MeteredBody,
    StreamingAdapter,
    deadline_on_this_thread,
    read_answer,
)
from watcher.nucleus.types import MAX_FILES_PER_REQUEST, AppendResult, JobState, UploadItem

# A host that does not complete the TCP handshake in this time will not do it later either.
_CONNECT_TIMEOUT_CAP_SECONDS: Final = 30.0


class NucleusClient:
    """Talks to one Nucleus endpoint with one API key. Safe to share between threads."""

    def __init__(
        self,
        endpoint: str,
        api_key: str,
        *,
        timeout_seconds: float = 120.0,
        ca_bundle: str | None = None,
        bandwidth: TokenBucket | None = None,
        user_agent: str = f"nucleus-watcher/{__version__}",
        pool_size: int = 10,
    ) -> None:
        self._base_url, self._host_label = _checked_endpoint(endpoint)
        if not api_key:
            raise ConfigError("nucleus: no API key given")
        if not (math.isfinite(timeout_seconds) and timeout_seconds > 0):
            raise ConfigError(
                f"nucleus.timeout_seconds: must be a positive number, got {timeout_seconds}"
            )
        if pool_size < 1:
            raise ValueError(f"pool_size must be at least 1, got {pool_size}")
        self._answers = AnswerReader(api_key)
        self._timeout_seconds = float(timeout_seconds)
        self._bandwidth = bandwidth
        self._closed = False
        self._ca_bundle = CombinedCaBundle(ca_bundle) if ca_bundle else None
        # Verification is always on; an extra CA only widens what is trusted. It is passed with
        # every request because requests lets REQUESTS_CA_BUNDLE override `session.verify`.
        self._verify: str | bool = self._ca_bundle.path if self._ca_bundle else True
        self._session = _session(api_key, user_agent, self._verify, pool_size)
        self._reaper = DeadlineReaper()

    # -- public routes ---------------------------------------------------------------------

    def append(
        self, dataset_id: str, items: Sequence[UploadItem], *, asynchronous: bool
    ) -> AppendResult:
        """Append items to a dataset with one request.

        All items must be local files (multipart, at most 10) or all remote URLs (JSON). Remote
        items share one top-level `update` flag on the wire, so they must all agree on it; the
        caller groups them. Violations raise ValueError before anything is sent.
        """
        if not items:
            raise ValueError("append needs at least one item")
        reference_ids = [item.reference_id for item in items]
        if len(set(reference_ids)) != len(reference_ids):
            raise ValueError("append got the same reference_id twice in one request")
        local = [item for item in items if item.path is not None]
        if local and len(local) != len(items):
            raise ValueError("local files and remote URLs cannot share one append request")
        route = f"dataset/{_path_segment(dataset_id, 'dataset_id')}/append"
        if asynchronous:
            route += "?async=1"
        if local:
            if len(local) > MAX_FILES_PER_REQUEST:
                raise ValueError(
                    f"at most {MAX_FILES_PER_REQUEST} files per request, got {len(local)}"
                )
            answer, bytes_sent, streamed = self._post_local(route, items)
        else:
            answer, bytes_sent = self._post_remote(route, items)
            streamed = {}
        try:
            data = self._answers.json_object(answer)
            if asynchronous:
                result = self._answers.async_result(data, bytes_sent)
            else:
                result = self._answers.sync_result(data, reference_ids, bytes_sent)
        except UploadError as exc:
            exc.streamed_sha256 = streamed
            raise
        return replace(result, streamed_sha256=streamed)

    def job(self, job_id: str) -> JobState:
        """The current status of an asynchronous job."""
        answer = self._request("GET", f"job/{_path_segment(job_id, 'job_id')}")
        return self._answers.job_state(job_id, answer)

    def job_errors(self, job_id: str, reference_ids: Sequence[str]) -> dict[str, str]:
        """A job's error strings, keyed by the reference_id each names ("" when none does)."""
        answer = self._request("GET", f"job/{_path_segment(job_id, 'job_id')}/errors")
        return self._answers.job_errors(answer, reference_ids)

    def dataset_info(self, dataset_id: str) -> dict[str, Any]:
        """The dataset summary: a cheap check that key and dataset id are right."""
        answer = self._request("GET", f"dataset/{_path_segment(dataset_id, 'dataset_id')}/info")
        return self._answers.json_object(answer)

    def close(self) -> None:
        """Close pooled connections and stop the deadline thread. Call after the workers stop."""
        if self._closed:
            return
        self._closed = True
        self._session.close()
        self._reaper.stop()
        if self._ca_bundle:
            self._ca_bundle.remove()

    def __enter__(self) -> NucleusClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- request bodies --------------------------------------------------------------------

    def _post_local(
        self, route: str, items: Sequence[UploadItem]
    ) -> tuple[Answer, int, dict[str, str]]:
        """The multipart request; also the sha256 of each file's bytes as they went out."""
        deadline = RequestDeadline(self._timeout_seconds)
        with ExitStack() as open_files:
            encoder, hashed = multipart_form(items, open_files)
            body = MeteredBody(encoder, deadline, self._bandwidth)

            def streamed() -> dict[str, str]:
                # Only a body sent whole can have been stored.
                if body.bytes_read < len(body):
                    return {}
                return {ref: handle.hexdigest() for ref, handle in hashed.items()}

            try:
                answer = self._request(
                    "POST",
                    route,
                    deadline=deadline,
                    data=body,
                    headers={"Content-Type": encoder.content_type},
                )
            except UploadError as exc:
                exc.streamed_sha256 = streamed()
                raise
            return answer, body.bytes_read, streamed()

    def _post_remote(self, route: str, items: Sequence[UploadItem]) -> tuple[Answer, int]:
        body = remote_items_json(items)
        deadline = RequestDeadline(self._timeout_seconds)
        if self._bandwidth is not None:
            self._bandwidth.take(len(body))
        answer = self._request(
            "POST",
            route,
            deadline=deadline,
            data=body,
            headers={"Content-Type": "application/json"},
        )
        return answer, len(body)

    # -- one HTTP exchange -----------------------------------------------------------------

    def _request(
        self,
        method: str,
        route: str,
        *,
        deadline: RequestDeadline | None = None,
        **kwargs: Any,
    ) -> Answer:
        """Send one request and read the whole answer within the deadline; raise on non-2xx."""
        # Two steps, so that an error raised for the status carries no frame that still holds
        # the response (and through it the pooled connection).
        answer = self._exchange(method, route, deadline=deadline, **kwargs)
        self._answers.raise_for_status(answer)
        return answer

    def _exchange(
        self,
        method: str,
        route: str,
        *,
        deadline: RequestDeadline | None = None,
        **kwargs: Any,
    ) -> Answer:
        if self._closed:
            raise RuntimeError("NucleusClient used after close()")
        if deadline is None:
            deadline = RequestDeadline(self._timeout_seconds)
        url = f"{self._base_url}/{route}"
        self._reaper.watch(deadline)
        try:
            with deadline_on_this_thread(deadline):
                response = self._session.request(
                    method,
                    url,
                    # No read timeout: a wait for the answer while the link still drains the
                    # body is progress, which only the deadline's reviews can tell.
                    timeout=(min(self._timeout_seconds, _CONNECT_TIMEOUT_CAP_SECONDS), None),
                    stream=True,
                    allow_redirects=False,
                    verify=self._verify,
                    **kwargs,
                )
                try:
                    body = read_answer(response, deadline)
                    return Answer(response.status_code, response.headers, body)
                finally:
                    response.close()
        except DeadlineExceeded:
            raise self._timed_out() from None
        except BodyChanged:
            raise RetryableUploadError("a file changed size while it was being sent") from None
        except (requests.RequestException, Urllib3HTTPError, OSError) as exc:
            if deadline.expired:
                raise self._timed_out() from exc
            raise network_error(exc, self._host_label) from exc
        finally:
            self._reaper.forget(deadline)

    def _timed_out(self) -> TimeoutUploadError:
        return TimeoutUploadError(f"timed out after {self._timeout_seconds:g} s without progress")


def _session(api_key: str, user_agent: str, verify: str | bool, pool_size: int) -> requests.Session:
    """The session every worker shares; its pool hands each request its own connection."""
    session = requests.Session()
    session.auth = (api_key, "")
    session.headers["User-Agent"] = user_agent
    session.headers["Accept"] = "application/json"
    # Cookies are refused so the session carries no state between requests.
    session.cookies.set_policy(http.cookiejar.DefaultCookiePolicy(allowed_domains=[]))
    session.verify = verify
    # No transparent retries: a streamed body cannot be replayed, and the uploader owns
    # retry timing anyway.
    adapter = StreamingAdapter(
        pool_connections=4, pool_maxsize=pool_size, max_retries=0, pool_block=False
    )
    session.mount("https://", adapter)
    session.mount("http://", adapter)
    return session


def _checked_endpoint(endpoint: str) -> tuple[str, str]:
    """(base URL, host label for messages), by the same rule the config applies."""
    try:
        parsed = parse_endpoint(endpoint)
    except ValueError as exc:
        raise ConfigError(f"nucleus.endpoint: {exc}") from None
    return parsed.url, parsed.host


def _path_segment(value: str, what: str) -> str:
    if not value:
        raise ValueError(f"{what} must not be empty")
    return quote(value, safe="")
