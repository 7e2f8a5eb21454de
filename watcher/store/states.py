"""The states a file's row can be in (see the life drawn in `watcher.store`)."""

from __future__ import annotations

PENDING = "pending"
IN_FLIGHT = "in_flight"
UPLOADED = "uploaded"
FAILED = "failed"
INCOMPLETE = "incomplete"
GONE = "gone"
STATES = (PENDING, IN_FLIGHT, UPLOADED, FAILED, INCOMPLETE, GONE)
