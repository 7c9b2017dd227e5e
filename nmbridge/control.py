"""The control socket: one JSON request and one JSON response per line, over a unix socket.

Request ``{"cmd": "stats"}`` (plus arguments); response ``{"ok": true, "result": ...}`` or
``{"ok": false, "error": "..."}``. Unknown commands and malformed lines get an error
response, never a crash.  A streaming command (``capture``) answers with one JSON line
``{"ok": true, "result": {...}, "stream": "pcapng"}`` and then raw bytes on the same
connection until the server closes it; the client ends the stream early by half-closing its
side (``shutdown(SHUT_WR)``: the server finishes cleanly) or by closing the connection.
The socket is mode 0660 (owner and group: the service's user and the operators' group); a
world-writable directory is refused, since anyone could replace the socket there.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import stat
import threading
from collections.abc import Callable
from typing import Any

from nmbridge.errors import ConfigError, NmbridgeError

DEFAULT_PATH = "/run/nmbridge/control.sock"
MAX_LINE = 64 * 1024

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


def check_directory(path: str) -> None:
    """Create the socket's directory (0750) if missing; refuse a world-writable one."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, mode=0o750, exist_ok=True)
    st = os.stat(d)
    if st.st_mode & stat.S_IWOTH:
        raise ControlError(f"control socket directory {d} is world-writable: refusing to put "
                           f"{os.path.basename(path)} there (chmod o-w {d}, or set [control] socket)")


class _Server(socketserver.ThreadingMixIn, socketserver.UnixStreamServer):
    daemon_threads = True
    handlers: dict[str, Handler]


class _Connection(socketserver.StreamRequestHandler):
    server: _Server

    def handle(self) -> None:
        while True:
            line = self.rfile.readline(MAX_LINE + 1)
            if not line:
                return
            reply = self.answer(line)
            stream = reply.pop("stream", None)
            if isinstance(stream, Stream):
                reply["result"], reply["stream"] = stream.header, stream.kind
            try:
                self.wfile.write(json.dumps(reply, default=str).encode() + b"\n")
                self.wfile.flush()
            except OSError:
                if not isinstance(stream, Stream):
                    return
            if isinstance(stream, Stream):
                stream.run(self.connection)  # a client already gone ends it at once
                return

    def answer(self, line: bytes) -> dict[str, Any]:
        if len(line) > MAX_LINE:
            return {"ok": False, "error": f"request longer than {MAX_LINE} bytes"}
        try:
            req = json.loads(line)
        except ValueError as e:
            return {"ok": False, "error": f"not a JSON line: {e}"}
        if not isinstance(req, dict) or not isinstance(req.get("cmd"), str):
            return {"ok": False, "error": 'a request is a JSON object with a "cmd" string'}
        handler = self.server.handlers.get(req["cmd"])
        if handler is None:
            known = ", ".join(sorted(self.server.handlers))
            return {"ok": False, "error": f"unknown command {req['cmd']!r} (known: {known})"}
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

    def __init__(self, path: str, handlers: dict[str, Handler], *, mode: int = 0o660) -> None:
        check_directory(path)
        if os.path.exists(path):
            if not stat.S_ISSOCK(os.stat(path).st_mode):
                raise ControlError(f"{path} exists and is not a socket")
            if _alive(path):
                raise ControlError(f"{path}: another nmbridge is already listening there")
            os.unlink(path)
        old = os.umask(0o177)
        try:
            self.server = _Server(path, _Connection)
        finally:
            os.umask(old)
        os.chmod(path, mode)
        self.server.handlers = dict(handlers)
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
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        try:
            s.connect(path)
        except OSError:
            return False
    return True


def request(path: str, cmd: str, timeout: float = 5.0, **args: Any) -> Any:
    """Send one command; return its result or raise ControlError with the reason."""
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
            s.settimeout(timeout)
            s.connect(path)
            s.sendall(json.dumps({"cmd": cmd, **args}).encode() + b"\n")
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
        raise ControlError(f"{path}: nobody is listening (a stale socket?)") from None
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {timeout:g} s") from None
    try:
        reply = json.loads(buf)
    except ValueError:
        raise ControlError(f"{path}: malformed answer {buf[:80]!r}") from None
    if not isinstance(reply, dict):
        raise ControlError(f"{path}: malformed answer {buf[:80]!r}")
    if not reply.get("ok"):
        raise ControlError(str(reply.get("error", "unknown error")), reply.get("kind") == "config")
    return reply.get("result")
