"""Builds the pipeline's parts from the settings, each given only its own part of them, and
connects them: `build_live` and `build_scan` hand `run` and `scan` every part, built and
connected, before anything starts.

`scan` and `run` share this so the two commands cannot drift apart in how they upload.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog

from watcher.config import Settings
from watcher.files import PathFilter
from watcher.nucleus import NucleusClient, TokenBucket
from watcher.pipeline.after_upload import AfterUpload
from watcher.pipeline.intake import Intake
from watcher.pipeline.intake_events import WatchSpec
from watcher.pipeline.plans import WatchPlan, plans_for, plans_taking
from watcher.pipeline.reconcile import Reconciler, SettledEvents
from watcher.pipeline.settle import Settler
from watcher.pipeline.upload.events import FanOutEvents, UploadEvents
from watcher.pipeline.upload.policy import UploadPolicy
from watcher.pipeline.upload.uploader import Uploader
from watcher.store import StateStore, watch_key, watch_key_aliases

# LiveRoutes logs as the daemon (file_gone), the logger name operators filter on.
log = structlog.get_logger("watcher.daemon")


def watch_plans(settings: Settings) -> list[WatchPlan]:
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
        for root, watch, rules in zip(roots, settings.watch, settings.rule_sets, strict=True)
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


def settler(settings: Settings) -> Settler:
    """The one judge of "is this file finished?" for `run` and `scan` alike."""
    return Settler(
        settle_seconds=settings.settle.seconds,
        max_wait_seconds=settings.settle.max_wait_seconds,
        verify_image=settings.settle.verify_image,
    )


def reconciler(
    settings: Settings,
    store: StateStore,
    *,
    settling: Settler | None = None,
    uploader: Uploader | None = None,
    events: SettledEvents | None = None,
) -> Reconciler:
    """Without `settling`, files still being written go to a settler that is never started
    (a walk for its report only)."""
    return Reconciler(
        store,
        settler(settings) if settling is None else settling,
        max_file_bytes=settings.upload.max_file_bytes,
        uploader=uploader,
        events=events,
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


@dataclass(frozen=True)
class Pipeline:
    """The parts `scan` and `run` share, built and connected: the settler reports to the
    reconciler, which hands unfinished files to the settler and wakes the uploader."""

    store: StateStore
    client: NucleusClient
    uploader: Uploader
    settler: Settler
    reconciler: Reconciler

    def start(self) -> None:
        self.uploader.start()
        self.settler.start(self.reconciler)

    def stop(self, upload_stop_timeout_seconds: float) -> None:
        self.settler.stop()
        self.uploader.stop(upload_stop_timeout_seconds)

    def close(self) -> None:
        self.client.close()
        self.store.close()


def _open(settings: Settings, api_key: str) -> tuple[StateStore, NucleusClient]:
    store = open_store(settings)
    try:
        return store, nucleus_client(settings, api_key)
    except BaseException:
        store.close()
        raise


def _connect(
    settings: Settings,
    store: StateStore,
    client: NucleusClient,
    upload_events: UploadEvents,
    events: SettledEvents,
) -> tuple[Uploader, Settler, Reconciler]:
    uploader_ = uploader(settings, store, client, upload_events)
    settler_ = settler(settings)
    reconciler_ = reconciler(settings, store, settling=settler_, uploader=uploader_, events=events)
    return uploader_, settler_, reconciler_


def build_scan(
    settings: Settings, api_key: str, *, upload_events: UploadEvents, events: SettledEvents
) -> Pipeline:
    """Open the store and build every part of `scan`, connected; nothing is started."""
    store, client = _open(settings, api_key)
    return Pipeline(store, client, *_connect(settings, store, client, upload_events, events))


class LiveEvents(SettledEvents, Protocol):
    """What `run` counts about files on their way in (the service turns it into metrics)."""

    def seen(self, watch: str) -> None:
        """The intake saw an event for a file of `watch`."""


class LiveRoutes:
    """The intake's sink: carries its events to the settler and the store, and holds the
    current watches. Its methods run on the intake's threads: they hand on and return."""

    def __init__(
        self,
        plans: Sequence[WatchPlan],
        *,
        store: StateStore,
        settler: Settler,
        events: LiveEvents,
        on_rescan_needed: Callable[[str | None, str], None],
    ) -> None:
        # Replaced whole on reload, never changed in place: readers on other threads see
        # either the old watches or the new ones.
        self.plans: tuple[WatchPlan, ...] = tuple(plans)
        self._store = store
        self._settler = settler
        self._events = events
        self._on_rescan_needed = on_rescan_needed

    def replan(self, plans: Sequence[WatchPlan]) -> None:
        """A reloaded config's watches; files still settling go to them from now on."""
        self.plans = tuple(plans)
        self._settler.reroute(lambda path: plans_taking(self.plans, path))

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

    def on_rescan_needed(self, key: str | None, reason: str) -> None:
        self._on_rescan_needed(key, reason)


@dataclass(frozen=True)
class LivePipeline(Pipeline):
    """Every part `run` needs: the shared ones, the intake in front, and the routes between."""

    intake: Intake
    routes: LiveRoutes

    def start(self) -> None:
        """Uploads, settling, then watching: call it before the start-up reconcile, so nothing
        written meanwhile falls between the walk and the watch."""
        super().start()
        self.intake.start(watch_specs(self.routes.plans))

    def stop(self, upload_stop_timeout_seconds: float) -> None:
        self.intake.stop()
        super().stop(upload_stop_timeout_seconds)


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
    store, client = _open(settings, api_key)
    archive_dir = Path(settings.upload.archive_dir) if settings.upload.archive_dir else None
    after_upload = AfterUpload(settings.upload.after_upload, archive_dir, store)
    uploader_, settler_, reconciler_ = _connect(
        settings, store, client, FanOutEvents([upload_events, after_upload]), events
    )
    routes = LiveRoutes(
        plans, store=store, settler=settler_, events=events, on_rescan_needed=on_rescan_needed
    )
    intake = Intake(routes)
    return LivePipeline(store, client, uploader_, settler_, reconciler_, intake, routes)
