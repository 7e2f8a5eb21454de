"""The threaded HTTP server that knows its connections, so `DevServer.stop()` can end and join
them, and that can make loopback look like a thin network link."""

from __future__ import annotations

import contextlib
import socket
import socketserver
import sys
import threading
import time
from typing import Any, Final

from watcher.devserver.context import _ContextServer, _ServerContext
from watcher.devserver.handler import _Handler

# With a link rate the connection should look like one over a real network: the kernel may
# hold only a little of a body the handler has not read (a big receive buffer would acknowledge
# megabytes at once, which no thin link does), in Ethernet-sized segments (loopback's 64 KiB
# segments leave a nearly closed window stuck until a whole segment fits).
_LINK_RECEIVE_BUFFER_BYTES: Final = 16 * 1024
_LINK_SEGMENT_BYTES: Final = 1448


class _HttpServer(_ContextServer):
    """Threaded HTTP server that knows its connections, so stop() can end and join them."""

    daemon_threads = True
    request_queue_size = 128

    def __init__(self, address: tuple[str, int], context: _ServerContext) -> None:
        self.context = context
        self._connections_lock = threading.Lock()
        self._connections: dict[socket.socket, threading.Thread] = {}
        super().__init__(address, _Handler)

    def server_bind(self) -> None:
        if self.context.link is not None:
            # Set on the listening socket, so accepted ones inherit it before the handshake
            # fixes their window scale.
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, _LINK_RECEIVE_BUFFER_BYTES)
            self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_MAXSEG, _LINK_SEGMENT_BYTES)
        # HTTPServer.server_bind looks up the host's FQDN, which can stall on a broken resolver.
        socketserver.TCPServer.server_bind(self)
        host, port = self.server_address[:2]
        self.server_name = str(host)
        self.server_port = int(port)

    def get_request(self) -> tuple[socket.socket, Any]:
        connection, address = super().get_request()
        # Without it a reply written in two pieces waits ~40 ms for the client's delayed ACK.
        connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return connection, address

    def process_request(self, request: Any, client_address: Any) -> None:
        thread = threading.Thread(
            target=self._serve_connection,
            args=(request, client_address),
            name=f"devserver-conn-{client_address[1]}",
            daemon=True,
        )
        with self._connections_lock:
            self._connections[request] = thread
        thread.start()

    def _serve_connection(self, request: socket.socket, client_address: Any) -> None:
        try:
            self.process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.pop(request, None)

    def handle_error(self, request: Any, client_address: Any) -> None:
        exc = sys.exc_info()[1]
        if isinstance(exc, OSError):
            return  # a client that went away mid-answer is normal here
        super().handle_error(request, client_address)

    def end_connections(self, timeout_seconds: float) -> None:
        """Wake every connection thread (their sockets stop working) and join them."""
        with self._connections_lock:
            connections = list(self._connections.items())
        for connection, _ in connections:
            with contextlib.suppress(OSError):  # already closed by its thread
                connection.shutdown(socket.SHUT_RDWR)
        deadline = time.monotonic() + timeout_seconds
        for _, thread in connections:
            thread.join(max(0.0, deadline - time.monotonic()))
