"""Bounds for nmbridge's small servers (the control socket, the metrics endpoint).

Both are ``socketserver`` servers with a thread per connection.  Left as they are, a client
that vanishes mid-request prints a traceback on stderr (socketserver's ``handle_error``), one
that connects and sends nothing holds a thread for ever, and 3,000 of them hold 3,000
threads.  :class:`ConnectionLimit` installs on a server instance: at most `max_connections`
served at once (more are sent `refusal` and closed, without blocking the accepting thread),
every accepted socket gets `idle_timeout` for each read and write, and an error in a
connection is one log line, never a traceback.
"""

from __future__ import annotations

import socket
import socketserver
import sys
import threading
from typing import Any

from nmbridge.logs import get_logger


class ConnectionLimit:
    """Installed on one server by :meth:`install`; ``active`` counts connections served."""

    def __init__(self, what: str, max_connections: int, idle_timeout: float | None, refusal: bytes) -> None:
        self.what = what  # names the server in log events: "control", "metrics"
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.refusal = refusal
        self.active = 0
        self._lock = threading.Lock()
        self._refusing = False  # logged once per stretch of refusals

    def install(self, server: socketserver.TCPServer) -> None:
        """Wrap the server's accept, dispatch and error handling (instance attributes: the
        server's class, maybe a library's, is left alone)."""
        get_request = server.get_request
        process_request = server.process_request
        process_request_thread = server.process_request_thread  # type: ignore[attr-defined]

        def accepted() -> tuple[Any, Any]:
            conn, addr = get_request()
            conn.settimeout(self.idle_timeout)
            return conn, addr

        def dispatch(request: Any, client_address: Any) -> None:
            if not self._admit():
                self._refuse(server, request)
                return
            try:
                process_request(request, client_address)  # starts the connection's thread
            except BaseException:
                self._leave()
                raise

        def served(request: Any, client_address: Any) -> None:
            try:
                process_request_thread(request, client_address)
            finally:
                self._leave()

        server.get_request = accepted  # type: ignore[method-assign]
        server.process_request = dispatch  # type: ignore[method-assign]
        server.process_request_thread = served  # type: ignore[attr-defined]
        server.handle_error = self._error  # type: ignore[method-assign]

    def _admit(self) -> bool:
        with self._lock:
            if self.active < self.max_connections:
                self.active += 1
                self._refusing = False
                return True
            first, self._refusing = not self._refusing, True
        if first:
            get_logger().warning(f"{self.what}_busy", connections=self.max_connections,
                                 note="more clients are refused until some close")
        return False

    def _leave(self) -> None:
        with self._lock:
            self.active -= 1

    def _refuse(self, server: socketserver.TCPServer, request: socket.socket) -> None:
        try:
            request.setblocking(False)  # never wait on a client that does not read
            request.send(self.refusal)
        except OSError:
            pass
        server.shutdown_request(request)

    def _error(self, request: Any, client_address: Any) -> None:
        """What reaches socketserver's handle_error: a client gone (reset, timeout) ends
        quietly; anything else is one log line instead of a traceback on stderr."""
        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # ConnectionResetError, BrokenPipeError, TimeoutError...
            return
        get_logger().error(f"{self.what}_connection_failed", error=f"{type(e).__name__}: {e}")
