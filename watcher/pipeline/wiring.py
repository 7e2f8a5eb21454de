"""Builds the pipeline's parts from the settings, each given only its own part of them, and
connects them: `build_live` hands `run` every part, built, before its loop starts.

`scan` and `run` share this so the two commands cannot drift apart in how they upload.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from watcher.config import Settings, compile_rules
from watcher.files import PathFilter
from watcher.nucleus import NucleusClient, TokenBucket
from watcher.pipeline.disk import AfterUpload, FanOutEvents
from watcher.pipeline.intake import Intake, WatchSpec
from watcher.pipeline.plans import WatchPlan, plans_for, plans_taking
from watcher.pipeline.reconcile import Reconciler
from watcher.pipeline.settle import IncompleteFile, ReadyFile, Settler
from watcher.pipeline.uploader import Uploader, UploadEvents, UploadPolicy
from watcher.store import INCOMPLETE, StateStore, watch_key, watch_key_aliases

# The routing below used to live in the daemon; its log lines keep the daemon's logger name.
log = structlog.get_logger("watcher.daemon")


def watch_plans(settings: Settings) -> list[WatchPlan]:
    rule_sets = compile_rules(settings)
    roots = [str(Path(watch.path)) for watch in settings.watch]
    return [
        WatchPlan(
            key=watch_key(root, watch.dataset_id, shared=roots.count(root) > 1),
            aliases=watch_key_aliases(root, watch.dataset_id),
            root=Path(watch.path),
            dataset_id=watch.dataset_id,
            recursive=watch.recursive,
            path_filter=PathFilter(watch.include, watch.exclude),
            rules=rules,
            polling=settings.scan.polling,
        )
        for root, watch, rules in zip(roots, settings.watch, rule_sets, strict=True)
    ]


def upload_policy(settings: Settings) -> UploadPolicy:
    upload = settings.upload
    return UploadPolicy(
        concurrency=upload.concurrency,
        max_files_per_request=upload.max_files_per_request,
        retry_initial_seconds=upload.retry_initial_seconds,
        retry_max_seconds=upload.retry_max_seconds,
        on_conflict=upload.on_conflict,
        newest_first=upload.order == "newest-first",
        asynchronous=settings.nucleus.asynchronous,
        job_poll_seconds=settings.nucleus.job_poll_seconds,
        # A quarter of the idle timeout, but at least a second so per-request latency on a fast
        # link is not mistaken for a thin one.
        request_target_seconds=max(1.0, settings.nucleus.timeout_seconds / 4),
    )


def nucleus_client(settings: Settings, api_key: str) -> NucleusClient:
    nucleus = settings.nucleus
    rate = settings.upload.bandwidth_limit_bytes_per_second
    return NucleusClient(
        nucleus.endpoint,
        api_key,
        timeout_seconds=nucleus.timeout_seconds,
        ca_bundle=nucleus.ca_bundle or None,
        bandwidth=TokenBucket(rate) if rate else None,
        pool_size=max(10, settings.upload.concurrency),
    )


def open_store(settings: Settings) -> StateStore:
    return StateStore.open(Path(settings.state.path))


def reconciler(
    settings: Settings,
    store: StateStore,
    *,
    on_unsettled: Callable[[WatchPlan, Path], None] | None = None,
    on_queued: Callable[[], None] | None = None,
) -> Reconciler:
    return Reconciler(
        store,
        verify_image=settings.settle.verify_image,
        settle_seconds=settings.settle.seconds,
        max_file_bytes=settings.upload.max_file_bytes,
        on_unsettled=on_unsettled,
        on_queued=on_queued,
    )


def settler(settings: Settings) -> Settler:
    """The one judge of "is this file finished?" for `run` and `scan` alike."""
    return Settler(
        settle_seconds=settings.settle.seconds,
        max_wait_seconds=settings.settle.max_wait_seconds,
        verify_image=settings.settle.verify_image,
    )


def uploader(
    settings: Settings, store: StateStore, client: NucleusClient, events: UploadEvents | None
) -> Uploader:
    return Uploader(store, client, upload_policy(settings), events=events)


def watch_specs(plans: Sequence[WatchPlan]) -> list[WatchSpec]:
    """What the intake needs of each watch."""
    return [
        WatchSpec(
            key=plan.key,
            root=plan.root,
            recursive=plan.recursive,
            path_filter=plan.path_filter,
            polling=plan.polling,
        )
        for plan in plans
    ]


class LiveEvents(Protocol):
    """What `run` counts about files on their way in (the service turns it into metrics)."""

    def seen(self, watch: str) -> None:
        """The intake saw an event for a file of `watch`."""

    def settled(self, watch: str) -> None:
        """The settler found a file of `watch` finished."""

    def incomplete(self, watch: str) -> None:
        """A file of `watch` was recorded incomplete: it never finished within max_wait."""


class LiveRoutes:
    """Carries each live stage's output to the next and holds the current watches.

    Intake events go to the settler, finished files to the reconciler. The methods run on the
    intake's and the settler's threads: they hand on and return.
    """

    def __init__(
        self,
        plans: Sequence[WatchPlan],
        *,
        store: StateStore,
        settler: Settler,
        reconciler: Reconciler,
        events: LiveEvents,
    ) -> None:
        # Replaced whole on reload, never changed in place: readers on other threads see
        # either the old watches or the new ones.
        self.plans: tuple[WatchPlan, ...] = tuple(plans)
        self._store = store
        self._settler = settler
        self._reconciler = reconciler
        self._events = events

    def replan(self, plans: Sequence[WatchPlan]) -> None:
        """A reloaded config's watches; files still settling go to them from now on."""
        self.plans = tuple(plans)
        self._settler.reroute(lambda path: plans_taking(self.plans, path))

    # -- from the intake -------------------------------------------------------------------

    def on_candidate(self, key: str, path: Path, closed: bool) -> None:
        self._events.seen(key)
        plans = plans_taking(self.plans, path)
        if plans:
            self._settler.submit(path, plans, closed=closed)

    def on_deleted(self, key: str, path: Path) -> None:
        self._settler.forget(path)
        for plan, relpath in plans_for(self.plans, path):
            if self._store.mark_gone(plan.key, relpath):
                log.info("file_gone", path=str(path), dataset_id=plan.dataset_id)

    # -- from the settler ------------------------------------------------------------------

    def on_ready(self, file: ReadyFile) -> None:
        for plan in file.plans:
            self._events.settled(plan.key)
            self._reconciler.record_settled(plan, file.path, file.st)

    def on_incomplete(self, file: IncompleteFile) -> None:
        for plan in file.plans:
            outcome = self._reconciler.record_incomplete(plan, file.path, file.st, file.reason)
            if outcome == INCOMPLETE:
                self._events.incomplete(plan.key)


@dataclass(frozen=True)
class LivePipeline:
    """Every part `run` needs, built and connected; `start` sets them going."""

    store: StateStore
    client: NucleusClient
    uploader: Uploader
    reconciler: Reconciler
    settler: Settler
    intake: Intake
    routes: LiveRoutes

    def start(self) -> None:
        """Uploads, settling, then watching: call it before the start-up reconcile, so nothing
        written meanwhile falls between the walk and the watch."""
        self.uploader.start()
        self.settler.start(self.routes)
        self.intake.start(watch_specs(self.routes.plans))

    def stop(self, upload_stop_timeout_seconds: float) -> None:
        self.intake.stop()
        self.settler.stop()
        self.uploader.stop(upload_stop_timeout_seconds)

    def close(self) -> None:
        self.client.close()
        self.store.close()


def build_live(
    settings: Settings,
    api_key: str,
    *,
    upload_events: UploadEvents,
    events: LiveEvents,
    on_rescan_needed: Callable[[str | None, str], None],
) -> LivePipeline:
    """Open the store and build every part of `run`, connected; nothing is started."""
    plans = watch_plans(settings)
    store = open_store(settings)
    try:
        client = nucleus_client(settings, api_key)
    except BaseException:
        store.close()
        raise
    archive_dir = Path(settings.upload.archive_dir) if settings.upload.archive_dir else None
    after_upload = AfterUpload(settings.upload.after_upload, archive_dir, store)
    uploader_ = uploader(settings, store, client, FanOutEvents([upload_events, after_upload]))
    settler_ = settler(settings)
    reconciler_ = reconciler(
        settings,
        store,
        on_unsettled=lambda plan, path: settler_.submit(path, (plan,)),
        on_queued=uploader_.wake,
    )
    routes = LiveRoutes(
        plans,
        store=store,
        settler=settler_,
        reconciler=reconciler_,
        events=events,
    )
    intake = Intake(
        on_candidate=routes.on_candidate,
        on_deleted=routes.on_deleted,
        on_rescan_needed=on_rescan_needed,
    )
    return LivePipeline(store, client, uploader_, reconciler_, settler_, intake, routes)
