"""Bounds for nmbridge's small servers (the control socket, the metrics endpoint).

Both are ``socketserver`` servers with a thread per connection.  Left as they are, a client
that vanishes mid-request prints a traceback on stderr (socketserver's ``handle_error``), one
that connects and sends nothing holds a thread for ever, and 3,000 of them hold 3,000
threads.  A plain cap on connections fixes the threads but hands the server to whoever holds
the places: 32 idle clients (a stuck script, a hostile one) locked every operator out.

:class:`ConnectionLimit` installs on a server instance and keeps a table of the connections
that hold a place, each in one of two states:

* *waiting*: nothing in progress; it may send a request.  A new connection must complete its
  request within `request_timeout` (a few seconds; slowloris, one byte a second, gets no
  longer); between requests a connection may stay silent for `idle_timeout`, and once the
  first byte of the next request comes, the rest must come within `request_timeout`.
* *busy*: a request is being answered (a handler running, a reply being written, a capture
  streaming): never evicted; optionally bounded by a deadline its protocol sets.

At most `max_connections` hold a place.  A newcomer that finds them all taken evicts the
connection that has been waiting the longest (sent `message("evicted")` and closed); only
when every place is busy is the newcomer refused (`message("busy")`).  One watchdog thread
per server closes connections past their deadline (`message("request_timeout")` or
``"idle_timeout"``).  The server's thread per connection stays: a connection is cut by
``shutdown()`` from the accepting or the watchdog thread, which wakes its thread at once.
Messages are written without blocking (a client that does not read loses them, nothing
else), and an error in a connection is one log line, never a traceback.

The protocol tells the limiter what a connection is doing, from the connection's own thread:
:meth:`~ConnectionLimit.receiving` (bytes of a request have come), :meth:`~ConnectionLimit.busy`
(a complete request: answer it) and :meth:`~ConnectionLimit.waiting` (answered: wait for
the next one).
"""

from __future__ import annotations

import fcntl
import os
import socket
import socketserver
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from nmbridge.logs import get_logger

# why a connection is closed by the limiter; the protocol's `message` turns each into its words
REASONS = ("busy", "evicted", "request_timeout", "idle_timeout", "busy_timeout")
BACKSTOP = 10.0  # seconds a socket's own timeout exceeds the longest deadline
LOG_EVERY = 60.0  # seconds between two log lines saying the table is full


class _Place:
    """One connection holding a place: its socket, its state and its deadline."""

    __slots__ = ("busy", "cut", "deadline", "fresh", "receiving", "since", "sock")

    def __init__(self, sock: socket.socket, now: float, request_timeout: float) -> None:
        self.sock = sock
        self.busy = False
        self.since = now  # when its current wait began: the longest-waiting is evicted first
        self.deadline: float | None = now + request_timeout
        self.receiving = False  # bytes of a request came: its deadline is request_timeout's
        self.fresh = True  # no request yet: a new connection gets request_timeout, not idle_timeout
        self.cut: str | None = None  # the reason it was closed by the limiter


class ConnectionLimit:
    """Installed on one server by :meth:`install`.  ``active``: connections whose thread runs
    (evicted ones included until their thread ends); ``evicted``, ``timed_out``, ``refused``
    and ``cuts`` (by reason): counts since the start."""

    def __init__(self, what: str, max_connections: int, *, request_timeout: float, idle_timeout: float,
                 message: Callable[[str], bytes]) -> None:
        self.what = what  # names the server in log events: "control", "metrics"
        self.max_connections = max_connections
        self.request_timeout = request_timeout
        self.idle_timeout = idle_timeout
        self.message = message
        self.active = 0
        self.evicted = 0
        self.timed_out = 0
        self.refused = 0
        self.cuts = dict.fromkeys(REASONS[1:], 0)  # connections closed by the limiter, by reason
        self._places: list[_Place] = []  # the connections holding a place (not yet cut)
        self._open: dict[int, _Place] = {}  # id(socket) -> place, until its socket is closed
        self._cond = threading.Condition()
        self._local = threading.local()
        self._logged: float | None = None  # when the table was last logged full
        self._stopped = False
        self._watchdog = threading.Thread(target=self._watch, name=f"nmbridge-{what}-timeouts", daemon=True)

    @property
    def places(self) -> int:
        """Connections holding a place now."""
        with self._cond:
            return len(self._places)

    def install(self, server: socketserver.TCPServer) -> None:
        """Wrap the server's accept, dispatch, close and error handling (instance attributes:
        the server's class, maybe a library's, is left alone)."""
        get_request = server.get_request
        process_request = server.process_request
        process_request_thread = server.process_request_thread  # type: ignore[attr-defined]
        shutdown_request = server.shutdown_request
        server_close = server.server_close

        def accepted() -> tuple[Any, Any]:
            conn, addr = get_request()
            # a backstop for every blocking read and write, should the watchdog fail; the
            # places' deadlines come first (and tell the client why)
            conn.settimeout(self.idle_timeout + self.request_timeout + BACKSTOP)
            return conn, addr

        def dispatch(request: Any, client_address: Any) -> None:
            if not self._admit(request):
                self._refuse(request)
                shutdown_request(request)
                return
            try:
                process_request(request, client_address)  # starts the connection's thread
            except BaseException:
                self._leave()
                raise

        def served(request: Any, client_address: Any) -> None:
            with self._cond:
                self._local.place = self._open.get(id(request))
            try:
                process_request_thread(request, client_address)
            finally:
                self._local.place = None
                self._leave()

        def closing(request: Any) -> None:
            with self._cond:  # nobody touches the socket once it is closed (its fd is reused)
                place = self._open.pop(id(request), None)
                if place is not None and place in self._places:
                    self._places.remove(place)
            shutdown_request(request)

        def close() -> None:
            with self._cond:
                self._stopped = True
                for place in [p for p in self._places if not p.busy]:
                    self._cut(place, None)  # waiting clients: closed with the server
                self._cond.notify_all()
            if self._watchdog.is_alive():
                self._watchdog.join()
            server_close()

        server.get_request = accepted  # type: ignore[method-assign]
        server.process_request = dispatch  # type: ignore[method-assign]
        server.process_request_thread = served  # type: ignore[attr-defined]
        server.shutdown_request = closing  # type: ignore[method-assign]
        server.server_close = close  # type: ignore[method-assign]
        server.handle_error = self._error  # type: ignore[method-assign]
        self._watchdog.start()

    # --- what the protocol says, from the connection's thread --------------------------------

    def receiving(self) -> None:
        """Bytes of a request have come: the rest must come within `request_timeout`."""
        with self._cond:
            place = self._mine()
            if place is None or place.busy or place.receiving:
                return
            place.receiving = True
            end = time.monotonic() + self.request_timeout
            if place.deadline is None or end < place.deadline:
                place.deadline = end
                self._cond.notify_all()

    def busy(self, timeout: float | None = None) -> bool:
        """A complete request: the connection is not evicted while it is answered (and is
        closed after `timeout` seconds, if given).  False: it was cut meanwhile (evicted,
        timed out): drop the request and end the connection."""
        with self._cond:
            place = self._mine()
            if place is None:
                return getattr(self._local, "place", None) is None  # outside a connection: no limit
            place.busy, place.receiving, place.fresh = True, False, False
            place.deadline = None if timeout is None else time.monotonic() + timeout
            self._cond.notify_all()
            return True

    def waiting(self) -> None:
        """Answered: the connection may wait for `idle_timeout` for its next request."""
        with self._cond:
            place = self._mine()
            if place is None:
                return
            now = time.monotonic()
            place.busy, place.receiving, place.since = False, False, now
            place.deadline = now + self.idle_timeout
            self._cond.notify_all()

    def _mine(self) -> _Place | None:
        """The calling thread's place, None once it was cut (or outside a connection)."""
        place: _Place | None = getattr(self._local, "place", None)
        return place if place is not None and place.cut is None and place in self._places else None

    # --- admission, eviction, deadlines --------------------------------------------------------

    def _admit(self, request: socket.socket) -> bool:
        admitted, log = self._place(request)
        if log:  # never with the lock held (stdout may block)
            get_logger().warning(f"{self.what}_full", connections=self.max_connections, evicted=self.evicted,
                                 refused=self.refused,
                                 note=("a new client closes the connection that has waited the longest"
                                       if admitted else "every connection is busy: a new client is refused"))
        return admitted

    def _place(self, request: socket.socket) -> tuple[bool, bool]:
        """(admitted, whether to log that the table is full: at most once per LOG_EVERY s)."""
        with self._cond:
            if self._stopped:
                return False, False
            now = time.monotonic()
            log = False
            if len(self._places) >= self.max_connections:
                log = self._logged is None or now - self._logged >= LOG_EVERY
                if log:
                    self._logged = now
                waiting = [p for p in self._places if not p.busy]
                # evicted threads are ending; never more than twice the places in all
                if not waiting or self.active >= 2 * self.max_connections:
                    self.refused += 1
                    return False, log
                self._cut(min(waiting, key=lambda p: p.since), "evicted")
                self.evicted += 1
            place = _Place(request, now, self.request_timeout)
            self._places.append(place)
            self._open[id(request)] = place
            self.active += 1
            self._cond.notify_all()
            return True, log

    def _cut(self, place: _Place, reason: str | None) -> None:
        """Close `place`'s connection from another thread (lock held): its message, written
        without blocking, then shutdown(), which wakes its thread; the thread closes it."""
        place.cut = reason or "closed"
        if reason is not None:
            self.cuts[reason] += 1
        if place in self._places:
            self._places.remove(place)
        if reason is not None:
            _send_now(place.sock, self.message(reason))
        try:
            place.sock.shutdown(socket.SHUT_RDWR)
        except OSError:  # the client is gone already
            pass

    def _watch(self) -> None:
        """The watchdog: cut every connection past its deadline, sleep until the next one."""
        with self._cond:
            while not self._stopped:
                now = time.monotonic()
                for place in [p for p in self._places if p.deadline is not None and p.deadline <= now]:
                    reason = ("busy_timeout" if place.busy else
                              "request_timeout" if place.fresh or place.receiving else "idle_timeout")
                    self._cut(place, reason)
                    self.timed_out += 1
                ends = [p.deadline for p in self._places if p.deadline is not None]
                self._cond.wait(min(ends) - now if ends else None)

    def _leave(self) -> None:
        with self._cond:
            self.active -= 1

    def _refuse(self, request: socket.socket) -> None:
        _send_now(request, self.message("busy"))

    def _error(self, request: Any, client_address: Any) -> None:
        """What reaches socketserver's handle_error: a client gone (reset, timeout) ends
        quietly; anything else is one log line instead of a traceback on stderr."""
        e = sys.exc_info()[1]
        if isinstance(e, OSError):  # ConnectionResetError, BrokenPipeError, TimeoutError...
            return
        get_logger().error(f"{self.what}_connection_failed", error=f"{type(e).__name__}: {e}")


def _send_now(sock: socket.socket, data: bytes) -> None:
    """Write `data` if the socket takes it at once; never wait (a socket with a timeout has
    O_NONBLOCK set, and socket.send would wait for the timeout first; a socket without one is
    left alone)."""
    if not data:
        return
    try:
        fd = sock.fileno()
        if fd < 0 or not fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK:
            return
        os.write(fd, data)
    except OSError:  # full, reset, closed: the client does not get the reason
        pass
