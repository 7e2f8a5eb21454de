"""The states a file's row can be in (see the life drawn in `watcher.store`).

The database holds a state as its value's text; `status` prints the same text. A state read
back that this version does not know (a newer version wrote it) is kept as an `UnknownState`:
it can be shown, and compares equal to no `FileState`, so nothing counts it as backlog, sent
or a problem; `parse_state` is the one place that text becomes a state.
"""

from __future__ import annotations

from enum import StrEnum


class FileState(StrEnum):
    PENDING = "pending"  # waiting for its turn (or for its retry time)
    IN_FLIGHT = "in_flight"  # in a request whose answer has not come yet
    UPLOADED = "uploaded"  # the server confirmed what the row says
    FAILED = "failed"  # parked with a reason: `retry` or a change re-queues it
    INCOMPLETE = "incomplete"  # never finished writing
    GONE = "gone"  # deleted locally; its item stays in the dataset


class UnknownState(str):
    """A state name this version does not know, as read from the database."""

    __slots__ = ()


_BY_VALUE = {state.value: state for state in FileState}


def parse_state(text: str) -> FileState | UnknownState:
    """The state a row's `state` column names."""
    return _BY_VALUE.get(text) or UnknownState(text)
