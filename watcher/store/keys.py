"""How the store names a watch, and the files it keeps beside the database."""

from __future__ import annotations

from pathlib import Path


def watch_key(root: str, dataset_id: str, *, shared: bool) -> str:
    """How the store names a watch: its root folder; when several watches share one root
    (one folder feeding several datasets), `ROOT//DATASET`, which no normalised path is, so
    `watch_root` can take it apart again."""
    return f"{root}//{dataset_id}" if shared else root


def watch_key_aliases(root: str, dataset_id: str) -> tuple[str, ...]:
    """Both forms `watch_key` can give this watch: when a second watch joins or leaves its
    root, the key changes and the rows recorded under the other form are adopted."""
    return (root, f"{root}//{dataset_id}")


def watch_root(key: str) -> str:
    """The root folder of a watch key (see `watch_key`)."""
    root, separator, _dataset = key.rpartition("//")
    return (root or "/") if separator else key


def retry_request_path(state_path: Path) -> Path:
    """Where `retry` leaves its request for a running daemon (which owns the database)."""
    return state_path.with_name(state_path.name + ".retry")


def lock_path(state_path: Path) -> Path:
    """The advisory lock that makes one process at a time the database's writer."""
    return state_path.with_name(state_path.name + ".lock")
