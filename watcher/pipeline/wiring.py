"""Builds the pipeline's parts from the settings, each given only its own part of them.

`scan` and `run` share this so the two commands cannot drift apart in how they upload.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from watcher.config import Settings
from watcher.files import PathFilter
from watcher.nucleus import NucleusClient, TokenBucket
from watcher.pipeline.reconcile import Reconciler, WatchPlan
from watcher.pipeline.settle import Settler
from watcher.pipeline.upload_events import UploadEvents
from watcher.pipeline.upload_policy import UploadPolicy
from watcher.pipeline.uploader import Uploader
from watcher.store import StateStore, watch_key, watch_key_aliases


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


def settler(
    settings: Settings,
    *,
    on_ready: Callable[[Path, os.stat_result], None],
    on_incomplete: Callable[[Path, str], None],
) -> Settler:
    """The one judge of "is this file finished?" for `run` and `scan` alike."""
    return Settler(
        settle_seconds=settings.settle.seconds,
        max_wait_seconds=settings.settle.max_wait_seconds,
        verify_image=settings.settle.verify_image,
        on_ready=on_ready,
        on_incomplete=on_incomplete,
    )


def uploader(
    settings: Settings, store: StateStore, client: NucleusClient, events: UploadEvents | None
) -> Uploader:
    return Uploader(store, client, upload_policy(settings), events=events)
