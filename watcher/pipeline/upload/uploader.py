"""Upload workers: claim batches from the store, send them, follow jobs, record what happened.

The store is the queue, so nothing lives only in memory: a crash between claim and confirm
leaves rows `in_flight`, which the next start releases and re-sends under the same reference_id.

This module holds the workers' loop (claim, send); `upload_gate` decides when a worker may
claim, `upload_outcomes` records what the answer was (and backs off after a transient failure),
`job_follower` follows asynchronous jobs, `shared_client` hands a new API key's client over.
A permanent failure of a batch splits it first, so one bad file does not park nine good ones.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import structlog

from watcher.errors import (
    LocalFileError,
    PermanentUploadError,
    RetryableUploadError,
    UnauthorizedError,
)
from watcher.nucleus import NucleusClient, UploadItem
from watcher.pipeline.upload.events import FanOutEvents, UploadEvents
from watcher.pipeline.upload.gate import UploadGate
from watcher.pipeline.upload.job_follower import JobFollower
from watcher.pipeline.upload.link_rate import LinkRate
from watcher.pipeline.upload.outcomes import UploadOutcomes
from watcher.pipeline.upload.policy import UploadPolicy
from watcher.pipeline.upload.shared_client import SharedClient
from watcher.store import FileRecord, StateStore

log = structlog.get_logger("watcher.uploader")


def _items(batch: list[FileRecord]) -> list[UploadItem]:
    return [
        UploadItem(
            reference_id=record.reference_id,
            metadata=record.metadata,
            update=record.update_flag,
            path=None if record.remote_url else record.path,
            remote_url=record.remote_url,
        )
        for record in batch
    ]


class Uploader:
    """`concurrency` worker threads plus, in asynchronous mode, one thread that follows jobs."""

    def __init__(
        self,
        store: StateStore,
        client: NucleusClient,
        policy: UploadPolicy,
        *,
        events: UploadEvents | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._store = store
        self._client = SharedClient(client)
        self._policy = policy
        self._events = FanOutEvents([]) if events is None else events
        self._clock = clock
        self._link = LinkRate(
            concurrency=policy.concurrency,
            max_files_per_request=policy.max_files_per_request,
            target_seconds=policy.request_target_seconds,
        )
        self._gate = UploadGate(self._link)
        self._outcomes = UploadOutcomes(store, self._events, policy, self._gate, clock)
        self._follower = JobFollower(store, self._client, self._gate, self._outcomes, policy, clock)
        self._follower_thread: threading.Thread | None = None
        self._threads: list[threading.Thread] = []
        # We never set a retry time further ahead than this; a later one was written before
        # the wall clock stepped back, and counts as due.
        self._clock_step_slack_seconds = policy.retry_max_seconds + 60.0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self._policy.concurrency):
            thread = threading.Thread(target=self._work, name=f"upload-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # Jobs submitted before a restart are followed even when `asynchronous` has since been
        # turned off: their rows stay in flight until the server says how the job ended.
        if self._policy.asynchronous or self._store.jobs_in_flight():
            follower = threading.Thread(target=self._follower.run, name="job-follower", daemon=True)
            follower.start()
            self._follower_thread = follower
            self._threads.append(follower)

    def stop(self, timeout_seconds: float = 30.0) -> bool:
        """Stop claiming; let requests in flight finish for up to `timeout_seconds`.

        Returns False if some did not finish: their rows stay in_flight and the next start
        re-sends them (same reference_id), so nothing is lost either way.
        """
        self._gate.stop()
        deadline = time.monotonic() + timeout_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in self._threads if t.is_alive()]
        if unfinished:
            log.warning(
                "upload_stop_timeout", unfinished=unfinished, timeout_seconds=timeout_seconds
            )
        self._threads = [t for t in self._threads if t.is_alive()]
        self._client.close_if_owned()
        return not unfinished

    def wake(self) -> None:
        """New work was queued."""
        self._gate.wake()

    def resume(self) -> None:
        """After a 401: the key changed (or SIGHUP); try again."""
        self._gate.resume()

    def replace_client(self, client: NucleusClient) -> None:
        """A new API key: requests from now on use `client` (one in flight finishes as it was).

        The replaced client is closed as soon as no request uses it. `client` belongs to the
        uploader from then on: it is closed when replaced in turn, or by `stop()`.
        """
        self._client.replace(client)

    def is_alive(self) -> bool:
        """Every thread that was started is still running (for the systemd watchdog); a job
        follower that finished the last job of an earlier asynchronous run ended on purpose."""
        return bool(self._threads) and all(
            thread.is_alive() or self._ended_on_purpose(thread) for thread in self._threads
        )

    def _ended_on_purpose(self, thread: threading.Thread) -> bool:
        return thread is self._follower_thread and self._follower.ended_on_purpose

    @property
    def paused_reason(self) -> str | None:
        return self._gate.paused_reason

    def wait_until_drained(self, max_attempts: int, timeout_seconds: float | None = None) -> bool:
        """For `scan`: wait until nothing is in flight and every pending item has had
        `max_attempts` tries. Returns False on timeout or when uploads are paused by a 401."""
        return self._gate.wait_until_drained(
            lambda: self._store.has_unfinished(max_attempts), timeout_seconds
        )

    # -- workers ---------------------------------------------------------------------------

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._send(batch)
            except Exception:  # a bug must not kill the worker; the rows are retried later
                log.exception("upload_worker_error", items=len(batch))
                try:
                    self._store.mark_retry(
                        [r.id for r in batch], "internal error", self._clock() + 5
                    )
                except Exception:  # the rows stay in flight; the next start re-sends them
                    log.exception("upload_worker_error_unrecorded", items=len(batch))
            finally:
                self._gate.leave()

    def _next_batch(self) -> list[FileRecord] | None:
        lingered = False
        while True:
            turn = self._gate.enter(may_linger=not lingered)
            if turn is None:
                return None
            lingered = lingered or turn.lingered
            now = self._clock()
            # The claim runs outside the gate's lock: a store write can stall (full disk) and
            # that must not stall `stop()` or `wake()` with it.
            batch = self._store.claim_batch(
                self._policy.max_files_per_request,
                now=now,
                newest_first=self._policy.newest_first,
                clock_stepped_after=now + self._clock_step_slack_seconds,
                max_bytes=turn.shape.max_bytes,
            )
            if batch:
                return batch
            next_due = self._store.next_due_at()
            if next_due is not None and next_due > now + self._clock_step_slack_seconds:
                next_due = now  # set before the wall clock stepped back: due
            wait = 30.0 if next_due is None else max(0.01, min(30.0, next_due - now))
            self._gate.leave_empty_handed(turn, wait)

    def _send(self, batch: list[FileRecord]) -> None:
        dataset_id = batch[0].dataset_id
        started = time.monotonic()
        try:
            with self._client.in_use() as client:
                result = client.append(
                    dataset_id, _items(batch), asynchronous=self._policy.asynchronous
                )
        except LocalFileError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._outcomes.local_file_failed(batch, exc)
        except UnauthorizedError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._outcomes.unauthorized(batch, exc.reason)
        except RetryableUploadError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._outcomes.note_streamed(batch, exc.streamed_sha256)
            self._outcomes.back_off(batch, exc)
        except PermanentUploadError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            if len(batch) > 1:
                # One bad item must not park the rest: send each alone to find it.
                log.info("batch_split", dataset_id=dataset_id, items=len(batch), reason=exc.reason)
                for record in batch:
                    self._send([record])
            else:
                self._outcomes.park(batch, exc.reason)
        else:
            finished = time.monotonic()
            self._events.request_done(finished - started, result.bytes_sent, True)
            if batch[0].remote_url is None:  # a URL list says nothing about the uplink
                self._link.record(started, finished, result.bytes_sent, len(batch))
            self._gate.count_success()
            self._outcomes.answered(batch, result)
