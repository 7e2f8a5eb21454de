"""What every connection thread of a devserver shares: the catalog, jobs, faults, the request
log, and the switches `DevServer` flips while it runs."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from http.server import ThreadingHTTPServer

from watcher.devserver.catalog import _Catalog
from watcher.devserver.faults import _FaultPlan
from watcher.devserver.jobs import _JobBook
from watcher.devserver.request_log import _RequestLog
from watcher.nucleus import TokenBucket


@dataclass
class _ServerContext:
    """What every connection thread shares."""

    catalog: _Catalog
    jobs: _JobBook
    faults: _FaultPlan
    log: _RequestLog
    stopping: threading.Event  # set by stop(): stalled and dripping answers give up
    api_key: str | None
    max_body_bytes: int
    drip_byte_interval_seconds: float
    link: TokenBucket | None = None  # paces reading every request body, all connections
    down: bool = False


class _ContextServer(ThreadingHTTPServer):
    """A server whose handlers reach the shared context as `self.server.context`."""

    context: _ServerContext
