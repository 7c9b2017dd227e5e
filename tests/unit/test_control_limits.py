"""No client can lock the operators out of the control socket or the metrics endpoint
(nmbridge.serving): idle connections make room for new ones, slow and garbage ones are cut
with one error line, streams in progress are never evicted.  Servers run on temporary
socket paths without a bridge; the last test drives a real ``nmbridge run``.

Deadlines here only guard against a hang (DEADLINE); nothing asserts a duration.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fwdutil import wait_for

from nmbridge import metrics
from nmbridge.control import MAX_CONNECTIONS, ControlError, ControlServer, Stream, _connect, request

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds; generous for a loaded machine, never slept
SNAPSHOT: dict[str, Any] = {"time": 0.0, "pairs": [], "links": {}}


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    _connect(s, path, time.monotonic() + DEADLINE)
    return s


def lines(s: socket.socket) -> list[dict[str, Any]]:
    """Every line the server sends until it closes the connection."""
    out = []
    for line in s.makefile("rb"):
        out.append(json.loads(line))
    return out


def nmbridge(*argv: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nmbridge", *argv], capture_output=True, text=True,
                          env=env, timeout=120)


class Streams:
    """A streaming command like `capture`: one chunk, then nothing until released."""

    def __init__(self) -> None:
        self.started = threading.Semaphore(0)
        self.release = threading.Event()

    def __call__(self, req: dict[str, Any]) -> Stream:
        def run(sock: socket.socket) -> None:
            sock.sendall(b"chunk\n")
            self.started.release()
            self.release.wait(DEADLINE)
            sock.sendall(b"end\n")
        return Stream("test", {"n": req.get("n")}, run)


@pytest.fixture
def streams() -> Iterator[Streams]:
    s = Streams()
    yield s
    s.release.set()


def serve(tmp_path: Path, streams: Streams, **kw: Any) -> ControlServer:
    handlers = {"stats": lambda req: {"bridge": "t", "snapshot": SNAPSHOT}, "echo": lambda req: req.get("x"),
                "stream": streams}
    return ControlServer(str(tmp_path / "c.sock"), handlers, **kw).start()


def test_idle_clients_never_lock_the_operator_out(tmp_path: Path, streams: Streams) -> None:
    """The finding: MAX_CONNECTIONS idle clients made `nmbridge stats` fail for a minute."""
    server = serve(tmp_path, streams, request_timeout=DEADLINE * 4, idle_timeout=DEADLINE * 4)
    held: list[socket.socket] = []
    try:
        held = [connect(server.path) for _ in range(MAX_CONNECTIONS + 8)]
        wait_for(lambda: server.limit.evicted == 8 and server.limit.active == MAX_CONNECTIONS,
                 "the 8 oldest to make room")
        for s in held[:8]:  # the oldest ones, each told why
            assert lines(s) == [{"ok": False, "error": f"closed to make room for a new client (the bridge "
                                 f"keeps {MAX_CONNECTIONS} control connections, and this one had waited the "
                                 "longest)"}]
        for _ in range(3):
            assert request(server.path, "stats")["bridge"] == "t"
        done = nmbridge("stats", "--json", "--control", server.path)  # as an operator types it
        assert done.returncode == 0 and json.loads(done.stdout)["bridge"] == "t", done.stderr
        held[-1].sendall(b'{"cmd": "echo", "x": 7}\n')  # the newest idle ones still work
        assert json.loads(held[-1].makefile("rb").readline()) == {"ok": True, "result": 7}
        assert server.limit.places <= MAX_CONNECTIONS and server.limit.refused == 0
    finally:
        for s in held:
            s.close()
        server.close()


def test_a_slowloris_is_cut_while_others_are_served(tmp_path: Path, streams: Streams,
                                                    capfd: pytest.CaptureFixture[str]) -> None:
    """One byte at a time (each byte sent when the previous one got no answer within 50 ms):
    the line must be complete within request_timeout of the connection, whatever comes."""
    server = serve(tmp_path, streams, request_timeout=3.0)  # ample for a normal client on a busy machine
    try:
        slow = connect(server.path)
        got: list[bytes] = []

        def trickle() -> None:
            for byte in b'{"cmd": "stats"' * 1000:  # never a newline
                if select.select([slow], [], [], 0.05)[0]:
                    break
                try:
                    slow.send(bytes([byte]))
                except OSError:  # cut while we sent
                    break
            got.append(slow.makefile("rb").read())

        t = threading.Thread(target=trickle)
        t.start()
        wait_for(lambda: server.limit.places == 1, "the slow client to be served")
        for _ in range(5):  # meanwhile normal clients get through
            assert request(server.path, "echo", x=3) == 3
        t.join(DEADLINE)
        assert not t.is_alive()
        assert [json.loads(line) for line in got[0].splitlines()] == [
            {"ok": False, "error": "closed: no complete request line within 3 s"}]
        assert server.limit.cuts == {"evicted": 0, "request_timeout": 1, "idle_timeout": 0, "busy_timeout": 0}
        assert request(server.path, "echo", x=4) == 4
        slow.close()
    finally:
        server.close()
    assert "Traceback" not in capfd.readouterr().err


def test_garbage_gets_one_error_line_each(tmp_path: Path, streams: Streams) -> None:
    server = serve(tmp_path, streams, request_timeout=3.0)
    try:
        with connect(server.path) as s:  # a garbage line: one answer; the connection stays usable
            s.sendall(b"\x00\xff\xfe garbage\n")
            f = s.makefile("rb")
            assert json.loads(f.readline())["error"].startswith("not a JSON line: ")
            s.sendall(b'{"cmd": "echo", "x": 1}\n')
            assert json.loads(f.readline()) == {"ok": True, "result": 1}
        with connect(server.path) as s:  # garbage and nothing more: one error line, closed
            s.sendall(b"\x00" * 5000)
            assert lines(s) == [{"ok": False, "error": "closed: no complete request line within 3 s"}]
        with connect(server.path) as s:  # garbage, then the client's end: answered as its last line
            s.sendall(b"\x00\x01\x02")
            s.shutdown(socket.SHUT_WR)
            [reply] = lines(s)
            assert reply["error"].startswith("not a JSON line: ")
        assert request(server.path, "echo", x=2) == 2
    finally:
        server.close()


def test_a_stream_is_never_evicted_and_busy_places_refuse(tmp_path: Path, streams: Streams) -> None:
    """A running capture is no idle client: newcomers evict waiting connections only, and are
    refused (one line) only when every place has a request in progress."""
    server = serve(tmp_path, streams, request_timeout=DEADLINE * 4, idle_timeout=DEADLINE * 4)
    held: list[socket.socket] = []
    streaming: list[socket.socket] = []
    try:
        first = connect(server.path)  # the oldest connection of all
        streaming.append(first)
        first.sendall(b'{"cmd": "stream", "n": 0}\n')
        f = first.makefile("rb")
        assert json.loads(f.readline()) == {"ok": True, "result": {"n": 0}, "stream": "test"}
        assert f.readline() == b"chunk\n"
        held = [connect(server.path) for _ in range(2 * MAX_CONNECTIONS)]  # each later one evicts
        wait_for(lambda: server.limit.evicted == MAX_CONNECTIONS + 1, "the idle ones to make room")
        assert request(server.path, "stats")["bridge"] == "t"
        for s in held[:MAX_CONNECTIONS + 2]:
            s.close()
        for n in range(1, MAX_CONNECTIONS):  # now every place streams
            s = connect(server.path)
            streaming.append(s)
            s.sendall(json.dumps({"cmd": "stream", "n": n}).encode() + b"\n")
        for _ in range(MAX_CONNECTIONS):
            assert streams.started.acquire(timeout=DEADLINE)
        wait_for(lambda: server.limit.places == MAX_CONNECTIONS, "the places to settle")
        with pytest.raises(ControlError, match=f"the bridge has {MAX_CONNECTIONS} control connections with "
                                               "a request in progress: try again later"):
            request(server.path, "stats")
        streams.release.set()
        assert f.readline() == b"end\n" and f.readline() == b""  # the first stream ran to its end
        wait_for(lambda: server.limit.places == 0, "the streams to end")
        assert request(server.path, "stats")["bridge"] == "t"
    finally:
        streams.release.set()
        for s in held + streaming:
            s.close()
        server.close()


def test_a_client_that_does_not_read_its_replies_is_cut(tmp_path: Path, streams: Streams) -> None:
    """Requests pipelined without reading a reply: once the replies fill the socket, the one
    being written has request_timeout to be read, and the place is freed."""
    server = serve(tmp_path, streams, request_timeout=2.0)
    try:
        with connect(server.path) as s:
            s.setblocking(False)
            try:
                while True:
                    s.send(b'{"cmd": "stats"}\n' * 1000)
            except (BlockingIOError, BrokenPipeError, ConnectionResetError):
                pass  # the server stopped reading (blocked on its reply) or cut us already
            wait_for(lambda: server.limit.timed_out == 1, "the reply's deadline")
            assert server.limit.cuts["busy_timeout"] == 1  # cut while its reply was written
            wait_for(lambda: server.limit.places == 0, "the place to be freed")
        assert request(server.path, "stats")["bridge"] == "t"
    finally:
        server.close()


def test_metrics_idle_slow_and_busy_scrapers(monkeypatch: pytest.MonkeyPatch,
                                             capfd: pytest.CaptureFixture[str]) -> None:
    """The metrics endpoint had the same lockout (MAX_SCRAPES idle TCP connections: 503 for
    30 s, from anywhere when it listens publicly)."""
    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT", 2.0)
    release = threading.Event()
    blocked = threading.Semaphore(0)

    def snapshot() -> Any:
        if not release.is_set():
            blocked.release()
            release.wait(DEADLINE)
        return SNAPSHOT

    m = metrics.MetricsServer("127.0.0.1:0", snapshot)  # request timeout: 2 s
    release.set()
    url = f"http://127.0.0.1:{m.port}/metrics"
    held: list[socket.socket] = []
    try:
        with socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE) as slow:
            slow.sendall(b"GET /metr")  # and no more: 408 after the request timeout
            assert slow.makefile("rb").read().startswith(b"HTTP/1.0 408 ")
        m.limit.request_timeout = DEADLINE * 4  # idle from here on: evicted, not timed out
        held = [socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE)
                for _ in range(metrics.MAX_SCRAPES + 4)]
        wait_for(lambda: m.limit.evicted == 4, "the oldest to make room")
        with urllib.request.urlopen(url, timeout=DEADLINE) as r:
            assert r.status == 200 and b"nmbridge_" in r.read()
        for s in held[:4]:
            assert s.makefile("rb").read().startswith(b"HTTP/1.0 408 ")
        for s in held:
            s.close()
        wait_for(lambda: m.limit.places == 0, "the idle connections to go")
        release.clear()  # now every scrape waits inside the collector: all places busy
        held = [socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE)
                for _ in range(metrics.MAX_SCRAPES)]
        for s in held:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        for _ in range(metrics.MAX_SCRAPES):
            assert blocked.acquire(timeout=DEADLINE)
        with socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE) as s:
            assert s.makefile("rb").read().startswith(b"HTTP/1.0 503 ")
        release.set()
        for s in held:
            assert s.makefile("rb").read().startswith(b"HTTP/1.0 200 ")
    finally:
        release.set()
        for s in held:
            s.close()
        m.close()
    assert "Traceback" not in capfd.readouterr().err


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[str]:
    """`nmbridge run` of an endless mem: source (pair "p"); yields its control socket."""
    sock = str(tmp_path / "c.sock")
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[control]\nsocket = "{sock}"\n'
                   '[[pair]]\nname = "p"\nports = ["mem:a?rx=source&tx=sink", "mem:b?rx=none&tx=sink"]\n'
                   'direction = "a-to-b"\n')
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    with (tmp_path / "stderr").open("wb") as err:
        p = subprocess.Popen([sys.executable, "-m", "nmbridge", "run", "-c", str(cfg)], env=env,
                             stdout=subprocess.DEVNULL, stderr=err)
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, "the control socket")
        assert p.poll() is None, (tmp_path / "stderr").read_text()

        def running() -> bool:  # the socket serves before the pairs are up
            try:
                return bool(request(sock, "stats")["snapshot"]["pairs"])
            except ControlError:
                return p.poll() is not None
        wait_for(running, "the pair to run")
        assert p.poll() is None, (tmp_path / "stderr").read_text()
        yield sock
    finally:
        p.terminate()
        p.wait(DEADLINE)


def test_a_running_bridge_answers_stats_and_reload_past_idle_clients_and_a_capture(bridge: str) -> None:
    """End to end: a capture streaming, 40 idle clients connected; `nmbridge stats` and
    `nmbridge reload` get through, and the capture streams on."""
    cap = connect(bridge)
    held: list[socket.socket] = []
    try:
        cap.sendall(json.dumps({"cmd": "capture", "pair": "p", "count": 1000000}).encode() + b"\n")
        f = cap.makefile("rb")
        reply = json.loads(f.readline())
        assert reply["ok"], reply
        assert f.read(4) == b"\x0a\x0d\x0d\x0a"  # pcapng's section header: the stream runs
        held = [connect(bridge) for _ in range(MAX_CONNECTIONS + 8)]
        for cmd in ("stats", "reload"):
            done = nmbridge(cmd, "--control", bridge)
            assert done.returncode == 0, done.stderr
            assert "Traceback" not in done.stderr
        snap = request(bridge, "stats")["snapshot"]
        assert [c["pair"] for c in snap.get("captures", [])] == ["p"]  # still capturing
        assert len(f.read(65536)) == 65536  # and still streaming
    finally:
        for s in held:
            s.close()
        cap.close()
