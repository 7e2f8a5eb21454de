"""The Nucleus client the upload threads share, and its hand-over when the API key changes."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

from watcher.nucleus import NucleusClient


class SharedClient:
    """Requests take the current client with `in_use`; `replace` swaps in a new one.

    A request in flight finishes on the client it started with; a replaced client is closed as
    soon as no request uses it.
    """

    def __init__(self, client: NucleusClient) -> None:
        self._lock = threading.Lock()
        self._client = client
        # Requests using each client right now; a replaced client is closed when its count ends.
        self._users: dict[NucleusClient, int] = {}
        self._owns_client = False  # True once the client came through `replace`

    def replace(self, client: NucleusClient) -> None:
        """Requests from now on use `client`, which belongs to us from then on: it is closed
        when replaced in turn, or by `close_if_owned`."""
        with self._lock:
            old = self._client
            if client is old:
                return
            self._client = client
            self._owns_client = True
            idle = old not in self._users
        if idle:
            old.close()

    @contextmanager
    def in_use(self) -> Iterator[NucleusClient]:
        """The current client, counted as in use until the block ends."""
        with self._lock:
            client = self._client
            self._users[client] = self._users.get(client, 0) + 1
        retired = False
        try:
            yield client
        finally:
            with self._lock:
                users = self._users.pop(client) - 1
                if users:
                    self._users[client] = users
                retired = not users and client is not self._client
            if retired:
                client.close()  # outside the lock: it joins the client's deadline thread

    def close_if_owned(self) -> None:
        """Close the current client if `replace` gave it to us (the first one is the caller's)."""
        with self._lock:
            owned = self._client if self._owns_client else None
        if owned is not None:
            owned.close()
