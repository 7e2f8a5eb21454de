"""From watchdog's events to the intake's sink: which file, which watch, what happened.

The handler runs under its observer's lock: it filters the path and calls the sink, nothing
else. A new folder becomes a rescan request, because files written into it before watchdog
watched it produce no event.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import structlog
from watchdog.events import (
    DirCreatedEvent,
    DirMovedEvent,
    FileAttribEvent,
    FileClosedEvent,
    FileCreatedEvent,
    FileDeletedEvent,
    FileModifiedEvent,
    FileMovedEvent,
    FileSystemEvent,
    FileSystemEventHandler,
)

from watcher.files import PathFilter

log = structlog.get_logger("watcher.intake")


@dataclass(frozen=True)
class WatchSpec:
    """One folder to watch, as the intake needs it."""

    key: str  # stable name e.g. "watch[0]", handed back in every call to the sink
    root: Path
    recursive: bool
    path_filter: PathFilter
    polling: bool = False


class IntakeSink(Protocol):
    """Where the intake delivers. Called on watchdog's threads: return quickly, and never call
    back into `start`, `reconfigure`, `supervise` or `stop` (those join the very threads that
    make the call). `key` names the watch (`WatchSpec.key`)."""

    def on_candidate(self, key: str, path: Path, closed: bool) -> None:
        """Something happened to the file at `path`; `closed` after a close-after-write."""

    def on_deleted(self, key: str, path: Path) -> None:
        """The file at `path` was deleted or moved away."""

    def on_rescan_needed(self, key: str | None, reason: str) -> None:
        """Events may have been lost for `key` (every watch when None): walk it. Comes in
        bursts (a tree of new folders); coalesce."""


class WatchEventHandler(FileSystemEventHandler):
    """Turns one watch's watchdog events into candidate/deleted/rescan callbacks."""

    def __init__(self, spec: WatchSpec, watched_dir: str, sink: IntakeSink) -> None:
        self._spec = spec
        # The resolved root (watchdog reports paths under it); reported paths use spec.root.
        self._prefix = watched_dir.rstrip("/") + "/"
        self._sink = sink

    def dispatch(self, event: FileSystemEvent) -> None:
        try:
            self._route(event)
        except Exception:
            # An exception here would end the observer thread and every later event with it.
            log.exception("intake_event_failed", watch=self._spec.key, event=event.event_type)

    def _route(self, event: FileSystemEvent) -> None:
        if event.is_directory:
            self._route_directory(event)
        elif isinstance(event, FileMovedEvent):
            self._deleted(event.src_path)
            self._candidate(event.dest_path, closed=False)
        elif isinstance(event, FileDeletedEvent):
            self._deleted(event.src_path)
        elif isinstance(event, FileClosedEvent):
            self._candidate(event.src_path, closed=True)
        elif isinstance(event, FileCreatedEvent | FileModifiedEvent | FileAttribEvent):
            # Attrib included: `cp -p` and rsync set the final mtime after the last write.
            self._candidate(event.src_path, closed=False)

    def _route_directory(self, event: FileSystemEvent) -> None:
        # watchdog adds a watch for a new folder, but files written into it before the watch
        # landed produce no event; synthetic events for its subfolders add nothing new.
        if not self._spec.recursive or event.is_synthetic:
            return
        if isinstance(event, DirMovedEvent):
            relpath = self._relative(event.dest_path)
        elif isinstance(event, DirCreatedEvent):
            relpath = self._relative(event.src_path)
        else:
            return
        if relpath is not None and self._spec.path_filter.accepts_dir(relpath):
            self._sink.on_rescan_needed(self._spec.key, "new folder")

    def _candidate(self, raw_path: bytes | str, *, closed: bool) -> None:
        relpath = self._relative(raw_path)
        if relpath is not None and self._spec.path_filter.accepts(relpath):
            self._sink.on_candidate(self._spec.key, self._spec.root / relpath, closed)

    def _deleted(self, raw_path: bytes | str) -> None:
        relpath = self._relative(raw_path)
        if relpath is not None and self._spec.path_filter.accepts(relpath):
            self._sink.on_deleted(self._spec.key, self._spec.root / relpath)

    def _relative(self, raw_path: bytes | str) -> str | None:
        path = os.fsdecode(raw_path)
        if not path.startswith(self._prefix):
            return None
        relpath = path[len(self._prefix) :]
        if not relpath or (not self._spec.recursive and "/" in relpath):
            return None
        return relpath
