"""The control socket: one JSON request and one JSON response per line, over a unix socket.

Request ``{"cmd": "stats"}`` (plus arguments); response ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. Unknown commands and malformed lines get an error
response, never a crash; a client that vanishes mid-request (killed, reset) ends its
connection quietly.  A streaming command (``capture``) answers with one JSON line
``{"ok": true, "result": {...}, "stream": "pcapng"}`` and then raw bytes on the same
connection until the server closes it; the client ends the stream early by half-closing its
side (``shutdown(SHUT_WR)``: the server finishes cleanly) or by closing the connection.
The socket is mode 0660 (owner and group: the service's user and the operators' group); a
world-writable directory is refused, since anyone could replace the socket there.

No client can lock the operators out (see nmbridge.serving): at most ``MAX_CONNECTIONS`` hold
a place (one thread each); a request line must be complete within ``REQUEST_TIMEOUT`` seconds
of the connection (or of its first byte, between requests), a reply read within that time,
and a connection may wait ``IDLE_TIMEOUT`` seconds between requests.  A new client that finds
every place taken evicts the connection that has waited the longest; it is refused only when
every connection has a request in progress (a running capture's stream is one, never
evicted).  Each closed connection gets one error line saying why.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import stat
import threading
import time
from collections.abc import Callable
from typing import Any

from nmbridge.config import SOCKET_PATH_MAX
from nmbridge.errors import ConfigError, NmbridgeError
from nmbridge.serving import ConnectionLimit

DEFAULT_PATH = "/run/nmbridge/control.sock"
MAX_LINE = 64 * 1024
MAX_CONNECTIONS = 32  # connections holding a place at once (each holds a thread)
REQUEST_TIMEOUT = 5.0  # seconds to send a complete request line, and to read a reply
IDLE_TIMEOUT = 60.0  # seconds a connection may wait between two requests

Handler = Callable[[dict[str, Any]], Any]


class Stream:
    """What a streaming handler returns: `header` goes out as the JSON reply's result, then
    `run(sock)` writes the stream; the connection closes when it returns."""

    def __init__(self, kind: str, header: dict[str, Any], run: Callable[[socket.socket], None]) -> None:
        self.kind = kind
        self.header = header
        self.run = run


class ControlError(NmbridgeError):
    """The control socket could not be reached or answered with an error; `config_error`:
    the error is the bridge's config file's (``nmbridge reload`` of a broken file)."""

    def __init__(self, message: str, config_error: bool = False) -> None:
        super().__init__(message)
        self.config_error = config_error


def path_problem(path: str) -> str | None:
    """Why `path` cannot name a unix socket at all (empty, too long, NUL, a directory), or
    None.  Pure text: touches nothing."""
    if not path:
        return "the control socket path is empty"
    if "\0" in path:
        return f"control socket path {path!r} contains a NUL byte"
    if len(os.fsencode(path)) > SOCKET_PATH_MAX:
        return (f"control socket path {path[:40]}... is {len(os.fsencode(path))} bytes long: a unix "
                f"socket path is at most {SOCKET_PATH_MAX}")
    if path.endswith("/"):
        return f"control socket path {path} names a directory: add the socket's file name"
    return None


def _world_writable(d: str, base: str) -> ControlError:
    return ControlError(f"control socket directory {d} is world-writable: anyone could put their own "
                        f"{base} there; use a directory only nmbridge's user can write, e.g. "
                        f"{os.path.dirname(DEFAULT_PATH)} (the default; [control] socket or --control)")


def check_path(path: str) -> None:
    """Everything :class:`ControlServer` would refuse about `path`, checked without creating
    or changing anything, so that ``run`` refuses it before touching any link: a path no
    socket can have, a world-writable directory, a file that is not a socket, another
    nmbridge listening there.  ControlError with the reason, in one line."""
    problem = path_problem(path)
    if problem:
        raise ControlError(problem)
    path = os.path.abspath(path)
    d, base = os.path.split(path)
    try:
        st = os.stat(d)
    except FileNotFoundError:
        st = None  # ControlServer creates it, mode 0750
    except OSError as e:
        raise ControlError(f"control socket directory {d}: {e.strerror or e}") from None
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            raise ControlError(f"control socket path {path}: {d} is not a directory")
        if st.st_mode & stat.S_IWOTH:
            raise _world_writable(d, base)
        if not os.access(d, os.W_OK | os.X_OK):
            raise ControlError(f"control socket directory {d}: permission denied (nmbridge must be able "
                               "to create the socket there)")
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return
    except OSError as e:
        raise ControlError(f"control socket {path}: {e.strerror or e}") from None
    if not stat.S_ISSOCK(mode):
        raise ControlError(f"{path} exists and is not a socket")
    if _alive(path):
        raise ControlError(f"{path}: another nmbridge is already listening there")


def check_directory(path: str) -> None:
    """Create the socket's directory (0750) if missing; refuse a world-writable one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o750, exist_ok=True)
    st = os.stat(d)
    if st.st_mode & stat.S_IWOTH:
        raise _world_writable(d, os.path.basename(path))


def _reply(reply: dict[str, Any]) -> bytes:
    return json.dumps(reply, default=str).encode() + b"\n"


def _closing(reason: str, places: int, request_timeout: float, idle_timeout: float) -> bytes:
    """The error line a connection gets when the limiter closes it (nmbridge.serving)."""
    error = {
        "busy": f"the bridge has {places} control connections with a request in progress: try again later",
        "evicted": f"closed to make room for a new client (the bridge keeps {places} control connections, "
                   "and this one had waited the longest)",
        "request_timeout": f"closed: no complete request line within {request_timeout:g} s",
        "idle_timeout": f"closed: no request for {idle_timeout:g} s",
    }.get(reason)
    return _reply({"ok": False, "error": error}) if error else b""  # busy_timeout: mid-reply


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    request_queue_size = 64  # listen() backlog: a burst of clients waits instead of failing
    handlers: dict[str, Handler]
    limit: ConnectionLimit


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        limit = self.server.limit
        buf = b""
        while True:
            got = self.read_line(buf)
            if got is None:
                return
            line, buf = got
            if not limit.busy():  # evicted or timed out while the line came: not answered
                return
            too_long = len(line) > MAX_LINE and not line.endswith(b"\n")
            reply = self.answer(line)
            stream = reply.pop("stream", None)
            if isinstance(stream, Stream):
                reply["result"], reply["stream"] = stream.header, stream.kind
            limit.busy(limit.request_timeout)  # a client that does not read its reply is cut
            try:
                self.wfile.write(_reply(reply))
                self.wfile.flush()
            except OSError:
                if not isinstance(stream, Stream):
                    return
            if isinstance(stream, Stream):
                limit.busy()  # streaming: never evicted; the stream bounds its own writes
                stream.run(self.connection)  # a client already gone ends it at once
                return
            if too_long:  # the rest of that line would be read as garbage requests
                return
            limit.waiting()

    def read_line(self, buf: bytes) -> tuple[bytes, bytes] | None:
        """The next request line (with its newline; a last one without it; the first
        MAX_LINE + 1 bytes of a longer one) and what follows it; None at the end.  The
        limiter's deadlines cut a client that is too slow (the read then ends)."""
        while True:
            end = buf.find(b"\n", 0, MAX_LINE + 1)
            if end >= 0:
                return buf[:end + 1], buf[end + 1:]
            if len(buf) > MAX_LINE:
                return buf[:MAX_LINE + 1], b""
            if buf:
                self.server.limit.receiving()
            try:
                chunk = self.connection.recv(65536)
            except OSError:  # reset by a killed client, or timed out
                return None
            if not chunk:
                return (buf, b"") if buf else None
            buf += chunk

    def finish(self) -> None:
        try:
            super().finish()
        except OSError:  # flushing to a client that is gone
            pass

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            return {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        try:
            req = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"not a JSON line: {e}"}
        except RecursionError:
            return {"ok": False, "error": "not a JSON request: arrays or objects nested too deeply"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        handler = self.server.handlers.get(req["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.server.handlers))
            return {"ok": False, "error": f"unknown command {req['cmd'][:80]!r} (known: {known})"}
        try:
            result = handler(req)
            if isinstance(result, Stream):
                return {"ok": True, "stream": result}
            return {"ok": True, "result": result}
        except ConfigError as e:
            return {"ok": False, "error": str(e), "kind": "config"}
        except NmbridgeError as e:
            return {"ok": False, "error": str(e)}
        except Exception as e:  # a handler bug must not kill the control thread
            return {"ok": False, "error": f"{type(e).__name__}: {e}"}


class ControlServer:
    """Serve `handlers` (command name -> function of the request dict) on `path`."""

    def __init__(self, path: str, handlers: dict[str, Handler], *, mode: int = 0o660,
                 max_connections: int = MAX_CONNECTIONS, request_timeout: float = REQUEST_TIMEOUT,
                 idle_timeout: float = IDLE_TIMEOUT) -> None:
        check_path(path)  # all that can be refused, before anything is created
        check_directory(path)
        if os.path.lexists(path):  # a stale socket: nobody listens on it (check_path)
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.server = _Server(path, _Connection)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        self.server.handlers = dict(handlers)
        self.limit = ConnectionLimit("control", max_connections, request_timeout=request_timeout,
                                     idle_timeout=idle_timeout,
                                     message=lambda reason: _closing(reason, max_connections, request_timeout,
                                                                     idle_timeout))
        self.server.limit = self.limit
        self.limit.install(self.server)
        self.path = path
        self.thread = threading.Thread(target=self.server.serve_forever, name="nmbridge-control",
                                       daemon=True)

    def start(self) -> ControlServer:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass


def _alive(path: str) -> bool:
    """Whether something listens on the socket at `path` (a full backlog counts as alive)."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1.0)
        try:
            s.connect(path)
        except (TimeoutError, BlockingIOError):  # a full backlog: someone listens
            return True
        except OSError:
            return False
    return True


def _is_socket(path: str) -> bool:
    try:
        return stat.S_ISSOCK(os.stat(path).st_mode)
    except OSError:
        return False


def _connect(s: socket.socket, path: str, deadline: float) -> None:
    """connect(), waiting while the listen backlog is full (a unix socket with a timeout
    fails with EAGAIN there instead of waiting)."""
    while True:
        try:
            s.connect(path)
            return
        except BlockingIOError:
            if time.monotonic() >= deadline:
                raise TimeoutError from None
            time.sleep(0.01)


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one command; return its result or raise ControlError with the reason."""
    problem = path_problem(path)
    if problem:
        raise ControlError(problem)
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            _connect(s, path, time.monotonic() + timeout)
            try:
                s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
            except (BrokenPipeError, ConnectionResetError):
                pass  # closed at once, maybe with a reason (too many clients): read it below
            buf = b""
            while not buf.endswith(b"\n"):
                chunk = s.recv(65536)
                if not chunk:
                    break
                buf += chunk
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is nmbridge running?") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied (be root or in the socket's group)") from None
    except ConnectionRefusedError:
        if not _is_socket(path):
            raise ControlError(f"{path} is not a socket: is it the control socket?") from None
        raise ControlError(f"{path}: nobody is listening (a stale socket?)") from None
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    except ConnectionResetError:
        raise ControlError(f"{path}: the bridge closed the connection before answering") from None
    except OSError as e:  # ENOTDIR, ENOTSOCK, ECONNRESET, ...
        raise ControlError(f"{path}: {e.strerror or e}") from None
    if not buf:
        raise ControlError(f"{path}: the bridge closed the connection without answering")
    try:
        reply = json.loads(buf)
    except (ValueError, RecursionError):
        raise ControlError(f"{path}: malformed answer {buf[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: malformed answer {buf[:80]!r}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")), reply.get("kind") == "config")
    return reply.get("result")
