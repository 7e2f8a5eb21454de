"""Upload workers: claim batches from the store, send them, follow jobs, record what happened.

The store is the queue, so nothing lives only in memory: a crash between claim and confirm
leaves rows `in_flight`, which the next start releases and re-sends under the same reference_id.

Failures split three ways (see errors.py): transient ones hold every worker back for a jittered,
growing delay (one dead endpoint, one backoff: a backlog of 10,000 files does not turn into
10,000 probes) and the items stay due, so the backlog drains at full speed once a request goes
through; permanent ones park the item with the reason (a batch is split first, so one bad file
does not park nine good ones); 401 pauses everything until `resume()`.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import structlog

from watcher.errors import (
    LocalFileError,
    PermanentUploadError,
    RetryableUploadError,
    TimeoutUploadError,
    UnauthorizedError,
    UploadError,
)
from watcher.nucleus import AppendResult, NucleusClient, UploadItem
from watcher.pipeline.link_rate import LinkRate
from watcher.store import FileRecord, StateStore

log = structlog.get_logger("watcher.uploader")


@dataclass(frozen=True)
class UploadPolicy:
    """The part of the settings the uploader needs."""

    concurrency: int = 4
    max_files_per_request: int = 10
    retry_initial_seconds: float = 1.0
    retry_max_seconds: float = 300.0
    on_conflict: str = "skip"
    newest_first: bool = False
    asynchronous: bool = False
    job_poll_seconds: float = 2.0
    # How long a request should take at the measured rate on a thin link (see link_rate.py).
    request_target_seconds: float = 30.0


class UploadEvents:
    """What the uploader reports as it goes; the daemon hangs metrics and after_upload here."""

    def confirmed(self, records: Sequence[FileRecord]) -> None:
        """The server confirmed these items (sync 2xx or job Completed)."""

    def parked(self, records: Sequence[FileRecord], reason: str) -> None:
        """These items will not be retried until they change or `retry` is run."""

    def retrying(
        self, records: Sequence[FileRecord], kind: str, reason: str, delay_seconds: float
    ) -> None:
        """A transient failure of `kind` (see `retry_kind`); every worker waits `delay_seconds`."""

    def request_done(self, seconds: float, bytes_sent: int, ok: bool) -> None:
        """One append request finished (for latency and throughput)."""

    def job_finished(self, status: str) -> None:
        """An asynchronous job reached a final state."""


# Wake-ups closer together than this are a burst; a worker then lingers once, this long, before
# claiming, so a burst forms batches. A lone file (the trickle case) goes at once.
_BURST_GAP_SECONDS = 0.02
_BURST_LINGER_SECONDS = 0.02


def retry_kind(exc: RetryableUploadError) -> str:
    """A short label for why a request is retried (metrics, logs): few values, never a path."""
    code = exc.status_code
    if code is None:
        return "timeout" if isinstance(exc, TimeoutUploadError) else "connection"
    if code == 429:
        return "http_429"
    if code >= 500:
        return "http_5xx"
    return f"http_{code}"


def _items(batch: Sequence[FileRecord]) -> list[UploadItem]:
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
        self._client = client
        # Requests using each client right now; a replaced client is closed when its count ends.
        self._client_users: dict[NucleusClient, int] = {}
        self._owns_client = False  # True once the client came through replace_client
        self._policy = policy
        self._events = events or UploadEvents()
        self._clock = clock
        lock = threading.RLock()
        # Two conditions on one lock: workers wait for work (`wake`, `resume`, `stop`);
        # `wait_until_drained` waits for workers to go idle. Sharing one condition let idle
        # workers wake each other in a loop.
        self._lock = threading.Condition(lock)
        self._idle = threading.Condition(lock)
        self._stopping = False
        self._paused_reason: str | None = None
        # On the monotonic clock: a wall-clock step (NTP at boot, a stepped-back RTC) must not
        # stretch a backoff into hours.
        self._hold_until = 0.0
        self._consecutive_failures = 0
        self._busy_workers = 0
        self._wake_generation = 0
        self._last_wake_at = 0.0
        self._wakes_in_burst = 0
        self._threads: list[threading.Thread] = []
        self._finished_follower: threading.Thread | None = None
        # We never set a retry time further ahead than this; a later one was written before
        # the wall clock stepped back, and counts as due.
        self._clock_step_slack_seconds = policy.retry_max_seconds + 60.0
        self._link = LinkRate(
            concurrency=policy.concurrency,
            max_files_per_request=policy.max_files_per_request,
            target_seconds=policy.request_target_seconds,
        )
        self._waiting_for_link = 0

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        for number in range(self._policy.concurrency):
            thread = threading.Thread(target=self._work, name=f"upload-{number}", daemon=True)
            thread.start()
            self._threads.append(thread)
        # Jobs submitted before a restart are followed even when `asynchronous` has since been
        # turned off: their rows stay in flight until the server says how the job ended.
        if self._policy.asynchronous or self._store.jobs_in_flight():
            follower = threading.Thread(target=self._follow_jobs, name="job-follower", daemon=True)
            follower.start()
            self._threads.append(follower)

    def stop(self, timeout_seconds: float = 30.0) -> bool:
        """Stop claiming; let requests in flight finish for up to `timeout_seconds`.

        Returns False if some did not finish: their rows stay in_flight and the next start
        re-sends them (same reference_id), so nothing is lost either way.
        """
        with self._lock:
            self._stopping = True
            self._lock.notify_all()
        deadline = time.monotonic() + timeout_seconds
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        unfinished = [t.name for t in self._threads if t.is_alive()]
        if unfinished:
            log.warning(
                "upload_stop_timeout", unfinished=unfinished, timeout_seconds=timeout_seconds
            )
        self._threads = [t for t in self._threads if t.is_alive()]
        with self._lock:
            owned = self._client if self._owns_client else None
        if owned is not None:
            owned.close()
        return not unfinished

    def wake(self) -> None:
        """New work was queued."""
        with self._lock:
            now = time.monotonic()
            close_to_last = now - self._last_wake_at < _BURST_GAP_SECONDS
            self._wakes_in_burst = self._wakes_in_burst + 1 if close_to_last else 1
            self._last_wake_at = now
            self._wake_generation += 1
            self._lock.notify_all()

    def resume(self) -> None:
        """After a 401: the key changed (or SIGHUP); try again."""
        with self._lock:
            if self._paused_reason is not None:
                log.info("uploads_resumed")
            self._paused_reason = None
            self._hold_until = 0.0
            self._lock.notify_all()

    def replace_client(self, client: NucleusClient) -> None:
        """A new API key: requests from now on use `client` (one in flight finishes as it was).

        The replaced client is closed as soon as no request uses it. `client` belongs to the
        uploader from then on: it is closed when replaced in turn, or by `stop()`.
        """
        with self._lock:
            old = self._client
            if client is old:
                return
            self._client = client
            self._owns_client = True
            idle = old not in self._client_users
        if idle:
            old.close()

    @contextmanager
    def _client_in_use(self) -> Iterator[NucleusClient]:
        """The current client, counted as in use until the block ends."""
        with self._lock:
            client = self._client
            self._client_users[client] = self._client_users.get(client, 0) + 1
        retired = False
        try:
            yield client
        finally:
            with self._lock:
                users = self._client_users.pop(client) - 1
                if users:
                    self._client_users[client] = users
                retired = not users and client is not self._client
            if retired:
                client.close()  # outside the lock: it joins the client's deadline thread

    def is_alive(self) -> bool:
        """Every thread that was started is still running (for the systemd watchdog); a job
        follower that finished the last job of an earlier asynchronous run ended on purpose."""
        return bool(self._threads) and all(
            thread.is_alive() or thread is self._finished_follower for thread in self._threads
        )

    @property
    def paused_reason(self) -> str | None:
        return self._paused_reason

    def wait_until_drained(self, max_attempts: int, timeout_seconds: float | None = None) -> bool:
        """For `scan`: wait until nothing is in flight and every pending item has had
        `max_attempts` tries. Returns False on timeout or when uploads are paused by a 401."""
        deadline = None if timeout_seconds is None else time.monotonic() + timeout_seconds
        while True:
            # Asked outside our lock: workers must not wait on a store query to finish a batch.
            unfinished = self._store.has_unfinished(max_attempts)
            with self._lock:
                if self._paused_reason is not None:
                    return False
                if not unfinished and self._busy_workers == 0:
                    return True
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._idle.wait(0.2 if remaining is None else min(0.2, remaining))

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
                with self._lock:
                    self._busy_workers -= 1
                    self._idle.notify_all()
                    if self._waiting_for_link:
                        self._lock.notify_all()

    def _next_batch(self) -> list[FileRecord] | None:
        lingered = False
        while True:
            with self._lock:
                if self._stopping:
                    return None
                now = self._clock()
                if self._paused_reason is not None:
                    self._lock.wait(30.0)
                    continue
                held_seconds = self._hold_until - time.monotonic()
                if held_seconds > 0:
                    self._lock.wait(held_seconds)
                    continue
                since_wake = time.monotonic() - self._last_wake_at
                if not lingered and self._wakes_in_burst > 1 and since_wake < _BURST_GAP_SECONDS:
                    # Files are arriving in a burst: wait a moment (once) so they go out in
                    # batches instead of one request each. A lone file never waits.
                    lingered = True
                    linger_until = time.monotonic() + _BURST_LINGER_SECONDS
                    # Every wake() in the burst notifies us: keep waiting until the deadline.
                    while not self._stopping and (left := linger_until - time.monotonic()) > 0:
                        self._lock.wait(left)
                    continue
                shape = self._link.shape()
                if self._busy_workers >= shape.max_in_flight:
                    # A thin link: another request would only split it (see link_rate.py).
                    self._waiting_for_link += 1
                    self._lock.wait(5.0)  # a finishing request notifies
                    self._waiting_for_link -= 1
                    continue
                # Counted as busy while claiming, so `wait_until_drained` never sees a batch
                # that left the queue but is not yet in anyone's hands.
                self._busy_workers += 1
                generation = self._wake_generation
            # The claim runs outside our lock: a store write can stall (full disk) and that
            # must not stall `stop()` or `wake()` with it.
            batch = self._store.claim_batch(
                self._policy.max_files_per_request,
                now=now,
                newest_first=self._policy.newest_first,
                clock_stepped_after=now + self._clock_step_slack_seconds,
                max_bytes=shape.max_bytes,
            )
            if batch:
                return batch
            next_due = self._store.next_due_at()
            if next_due is not None and next_due > now + self._clock_step_slack_seconds:
                next_due = now  # set before the wall clock stepped back: due
            with self._lock:
                self._busy_workers -= 1
                self._idle.notify_all()
                if generation != self._wake_generation or self._stopping:
                    continue  # work was queued while we looked: look again at once
                wait = 30.0 if next_due is None else max(0.01, min(30.0, next_due - now))
                self._lock.wait(wait)

    def _send(self, batch: list[FileRecord]) -> None:
        dataset_id = batch[0].dataset_id
        started = time.monotonic()
        try:
            with self._client_in_use() as client:
                result = client.append(
                    dataset_id, _items(batch), asynchronous=self._policy.asynchronous
                )
        except LocalFileError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._drop_local_file(batch, exc)
        except UnauthorizedError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._pause(batch, exc)
        except RetryableUploadError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            self._note_streamed(batch, exc.streamed_sha256)
            self._back_off(batch, exc)
        except PermanentUploadError as exc:
            self._events.request_done(time.monotonic() - started, 0, False)
            if len(batch) > 1:
                # One bad item must not park the rest: send each alone to find it.
                log.info("batch_split", dataset_id=dataset_id, items=len(batch), reason=exc.reason)
                for record in batch:
                    self._send([record])
            else:
                self._park(batch, exc.reason)
        else:
            finished = time.monotonic()
            self._events.request_done(finished - started, result.bytes_sent, True)
            if batch[0].remote_url is None:  # a URL list says nothing about the uplink
                self._link.record(started, finished, result.bytes_sent, len(batch))
            with self._lock:
                self._consecutive_failures = 0
            self._record_answer(batch, result)

    def _note_streamed(self, batch: Sequence[FileRecord], streamed: Mapping[str, str]) -> None:
        """A file rewritten while it streamed sent other bytes than it was claimed with."""
        for record in batch:
            digest = streamed.get(record.reference_id)
            if digest is not None and digest != record.content_sha256:
                log.warning(
                    "file_changed_while_sent",
                    path=record.shown_path,
                    reference_id=record.reference_id,
                    dataset_id=record.dataset_id,
                )
                self._store.note_streamed_bytes(record.id, digest)

    def _record_answer(self, batch: list[FileRecord], result: AppendResult) -> None:
        self._note_streamed(batch, result.streamed_sha256)
        if result.job_id is not None:
            self._store.mark_job_submitted([r.id for r in batch], result.job_id)
            log.info(
                "job_submitted",
                job_id=result.job_id,
                dataset_id=batch[0].dataset_id,
                items=len(batch),
            )
            self.wake()
            return
        rejected = [r for r in batch if r.reference_id in result.item_errors]
        for record in rejected:
            self._park(
                [record], f"server refused the item: {result.item_errors[record.reference_id]}"
            )
        accepted = [r for r in batch if r.reference_id not in result.item_errors]
        not_updates = [r for r in accepted if not r.update_flag]
        if result.ignored_items and not_updates and self._policy.on_conflict == "update":
            # The server had some of these reference_ids from before our record began; which
            # ones is not in the answer, so every item sent without update goes again with it.
            self._store.mark_retry(
                [r.id for r in not_updates],
                "server already had the reference_id; re-sending with update=true (on_conflict)",
                self._clock(),
                force_update=True,
            )
            accepted = [r for r in accepted if r.update_flag]
            self.wake()
        elif result.ignored_items:
            log.info(
                "server_kept_existing",
                dataset_id=batch[0].dataset_id,
                ignored_items=result.ignored_items,
                on_conflict=self._policy.on_conflict,
            )
        self._confirm(accepted)

    def _confirm(self, records: Sequence[FileRecord]) -> None:
        if not records:
            return
        if self._store.mark_confirmed([r.id for r in records], now=self._clock()):
            self.wake()  # a change that came while the request was out goes next
        for record in records:
            log.info(
                "upload_confirmed",
                path=record.shown_path,
                reference_id=record.reference_id,
                dataset_id=record.dataset_id,
                update=record.update_flag,
            )
        self._events.confirmed(records)

    def _park(self, records: Sequence[FileRecord], reason: str) -> None:
        self._store.mark_failed([r.id for r in records], reason, now=self._clock())
        for record in records:
            log.error(
                "upload_parked",
                path=record.shown_path,
                reference_id=record.reference_id,
                dataset_id=record.dataset_id,
                reason=reason,
            )
        self._events.parked(records, reason)

    def _back_off(self, batch: Sequence[FileRecord], exc: RetryableUploadError) -> None:
        with self._lock:
            self._consecutive_failures += 1
            ceiling = min(
                self._policy.retry_max_seconds,
                self._policy.retry_initial_seconds * 2 ** (self._consecutive_failures - 1),
            )
            delay = random.uniform(0, ceiling)  # full jitter: a fleet does not retry in step
            if exc.retry_after_seconds is not None:
                delay = min(max(delay, exc.retry_after_seconds), self._policy.retry_max_seconds)
            self._hold_until = max(self._hold_until, time.monotonic() + delay)
        # The items stay due: once the hold lifts, the backlog goes at full speed.
        self._store.mark_retry([r.id for r in batch], exc.reason, self._clock())
        kind = retry_kind(exc)
        log.warning(
            "upload_retry",
            dataset_id=batch[0].dataset_id,
            items=len(batch),
            kind=kind,
            reason=exc.reason,
            delay_seconds=round(delay, 3),
        )
        self._events.retrying(batch, kind, exc.reason, delay)

    def _pause(self, batch: Sequence[FileRecord], exc: UnauthorizedError) -> None:
        with self._lock:
            first = self._paused_reason is None
            self._paused_reason = exc.reason
            self._lock.notify_all()
        self._store.mark_retry([r.id for r in batch], exc.reason, self._clock())
        if first:
            log.error(
                "nucleus_unauthorized",
                reason=exc.reason,
                hint="uploads paused: fix the API key (the key file is watched) or send SIGHUP",
            )

    def _drop_local_file(self, batch: list[FileRecord], exc: LocalFileError) -> None:
        bad = [r for r in batch if r.path == exc.path]
        rest = [r for r in batch if r.path != exc.path]
        if bad:
            self._park(bad, exc.reason)
            if not exc.path.exists():
                for record in bad:
                    self._store.mark_gone(record.watch, record.relpath, now=self._clock())
        if rest:
            self._store.mark_retry([r.id for r in rest], "sent again without a vanished file", 0)
            self.wake()

    # -- asynchronous jobs -----------------------------------------------------------------

    def _follow_jobs(self) -> None:
        while True:
            with self._lock:
                if self._stopping:
                    return
            jobs = self._store.jobs_in_flight()
            if not jobs and not self._policy.asynchronous:
                # Only here for jobs from an earlier asynchronous run; none can come now.
                self._finished_follower = threading.current_thread()
                log.info("earlier_jobs_followed")
                return
            for job_id, ids in jobs.items():
                try:
                    self._check_job(job_id, ids)
                except UnauthorizedError as exc:
                    with self._lock:
                        self._paused_reason = exc.reason
                except UploadError as exc:
                    log.warning("job_poll_failed", job_id=job_id, reason=exc.reason)
            with self._lock:
                if self._stopping:
                    return
                self._lock.wait(self._policy.job_poll_seconds)

    def _check_job(self, job_id: str, ids: list[int]) -> None:
        try:
            with self._client_in_use() as client:
                state = client.job(job_id)
        except (UnauthorizedError, RetryableUploadError):
            raise
        except PermanentUploadError as exc:
            # The server no longer knows the job (404): its items go again, same reference_ids.
            log.warning("job_unknown", job_id=job_id, items=len(ids), reason=exc.reason)
            self._store.mark_retry(ids, f"job {job_id} unknown to the server", self._clock())
            self.wake()
            return
        if not state.finished:
            return
        records = self._store.get_many(ids)
        self._events.job_finished(state.status)
        log.info("job_finished", job_id=job_id, status=state.status, items=len(records))
        if state.succeeded:
            self._confirm(records)
        elif state.user_error:
            with self._client_in_use() as client:
                errors = client.job_errors(job_id, [r.reference_id for r in records])
            general = errors.get("")
            for record in records:
                reason = errors.get(record.reference_id)
                if reason is not None:
                    self._park([record], f"job {state.status}: {reason}")
            rest = [r for r in records if r.reference_id not in errors]
            if general is not None or not errors:
                self._park(rest, f"job {state.status}: {general or state.message}")
            else:
                self._confirm(rest)
        else:
            self._back_off(
                records, RetryableUploadError(f"job {job_id} ended {state.status}: {state.message}")
            )
