"""Live capture: what a pair forwards and what it drops, and why, as pcapng.

A :class:`Capture` installs one tap (:class:`nmbridge.capring.Tap`) per captured direction and
per worker of a pair (a :class:`TapSet` per direction: a tap's ring has one writer, its
worker's thread); each forwarding thread copies the frames that match the selection into its
own tap's ring, and :meth:`Capture.stream` — the control connection's thread, the only
consumer — drains the rings, merges them by timestamp (see :meth:`Capture.drain`) into pcapng
blocks on the client's socket until ``count`` frames, ``duration`` seconds, the client going
away, or the pair going away.  Then the taps come out, one Interface Statistics Block per
direction carries the counters of its taps (summed; per worker in its comment), and the stream
ends.

pcapng (draft-ietf-opsawg-pcapng): one Section Header Block, one Interface Description Block
per direction (Ethernet, ``if_tsresol`` = 9: nanoseconds), one Enhanced Packet Block per frame;
a dropped frame's EPB has an ``opt_comment`` such as ``dropped: filter guard, rule "no telnet"``.
"""

from __future__ import annotations

import heapq
import itertools
import select
import signal
import socket
import struct
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from nmbridge import __version__
from nmbridge.errors import NmbridgeError

DIRECTIONS = ("a_to_b", "b_to_a")
WHAT = {"forwarded": ("forwarded",), "dropped": ("filter", "oversize", "broken_chain"),
        "all": ("forwarded", "filter", "oversize", "broken_chain")}
DEFAULT_RATE = 10_000
DEFAULT_SNAPLEN = 262_144
RING_BYTES = 4 << 20
DRAIN_RECORDS = 4096  # records taken from one tap per read
LINKTYPE_ETHERNET = 1


# --- pcapng -----------------------------------------------------------------------------------

def _opt(code: int, value: bytes) -> bytes:
    pad = -len(value) % 4
    return struct.pack("<HH", code, len(value)) + value + b"\0" * pad


def _block(btype: int, body: bytes, options: Iterable[bytes] = ()) -> bytes:
    opts = b"".join(options)
    if opts:
        opts += b"\0\0\0\0"  # opt_endofopt
    body = body + b"\0" * (-len(body) % 4) + opts
    n = 12 + len(body)
    return struct.pack("<II", btype, n) + body + struct.pack("<I", n)


def shb(application: str = f"nmbridge {__version__}") -> bytes:
    """Section Header Block (little-endian, version 1.0, section length unknown)."""
    return _block(0x0A0D0D0A, struct.pack("<IHHq", 0x1A2B3C4D, 1, 0, -1),
                  [_opt(4, application.encode())])  # shb_userappl


def idb(name: str, description: str, snaplen: int) -> bytes:
    """Interface Description Block: Ethernet, timestamps in ns."""
    return _block(1, struct.pack("<HHI", LINKTYPE_ETHERNET, 0, snaplen),
                  [_opt(2, name.encode()), _opt(3, description.encode()), _opt(9, b"\x09")])


def epb(interface: int, ts_ns: int, data: bytes, origlen: int, comment: str | None = None) -> bytes:
    """Enhanced Packet Block; `comment` as opt_comment."""
    body = struct.pack("<IIIII", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF, len(data), origlen) + data
    return _block(6, body, [_opt(1, comment.encode())] if comment else [])


def isb(interface: int, ts_ns: int, *, start_ns: int, received: int, dropped: int,
        comment: str | None = None) -> bytes:
    """Interface Statistics Block: isb_starttime, isb_endtime, isb_ifrecv (frames that matched
    the selection), isb_ifdrop (frames the tap could not take), opt_comment."""
    opts = [_opt(2, struct.pack("<II", start_ns >> 32, start_ns & 0xFFFFFFFF)),
            _opt(3, struct.pack("<II", ts_ns >> 32, ts_ns & 0xFFFFFFFF)),
            _opt(4, struct.pack("<Q", received)), _opt(5, struct.pack("<Q", dropped))]
    if comment:
        opts.insert(0, _opt(1, comment.encode()))
    return _block(5, struct.pack("<III", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF), opts)


def read_blocks(data: bytes) -> list[tuple[int, bytes]]:
    """(type, body) of each whole little-endian block in `data` (tests and the client)."""
    out, off = [], 0
    while off + 12 <= len(data):
        btype, n = struct.unpack_from("<II", data, off)
        if n < 12 or off + n > len(data):
            break
        out.append((btype, data[off + 8:off + n - 4]))
        off += n
    return out


def block_comments(btype: int, body: bytes) -> list[str]:
    """The opt_comment values of an EPB or ISB body (tests and the client)."""
    if btype == 6:
        caplen = struct.unpack_from("<I", body, 12)[0]
        off = 20 + caplen + (-caplen % 4)
    elif btype == 5:
        off = 12
    else:
        return []
    out = []
    while off + 4 <= len(body):
        code, n = struct.unpack_from("<HH", body, off)
        if code == 0:
            break
        if code == 1:
            out.append(body[off + 4:off + 4 + n].decode(errors="replace"))
        off += 4 + n + (-n % 4)
    return out


# --- a capture ------------------------------------------------------------------------------

@dataclass(frozen=True)
class CaptureSpec:
    pair: str
    directions: tuple[str, ...]  # of DIRECTIONS
    what: str = "all"
    expr: str | None = None
    count: int = 0
    duration: float = 0.0
    snaplen: int = DEFAULT_SNAPLEN
    rate: int = DEFAULT_RATE

    @classmethod
    def from_request(cls, req: dict[str, Any]) -> CaptureSpec:
        """Validate a control request's arguments; raises NmbridgeError with one clear line."""
        pair = req.get("pair")
        if not isinstance(pair, str) or not pair:
            raise NmbridgeError('capture: "pair" is required')
        d = req.get("direction") or "both"
        dirs = {"both": DIRECTIONS, "a-to-b": ("a_to_b",), "b-to-a": ("b_to_a",),
                "a_to_b": ("a_to_b",), "b_to_a": ("b_to_a",)}.get(d)
        if dirs is None:
            raise NmbridgeError(f"capture: direction must be a-to-b, b-to-a or both, not {d!r}")
        what = req.get("what") or "all"
        if what not in WHAT:
            raise NmbridgeError(f"capture: what must be forwarded, dropped or all, not {what!r}")
        expr = req.get("filter") or None
        if expr is not None and not isinstance(expr, str):
            raise NmbridgeError("capture: filter is a tcpdump expression (a string)")
        nums: dict[str, Any] = {}
        for key, kind, lo, hi in (("count", int, 0, 2**62), ("duration", (int, float), 0, 10**7),
                                  ("snaplen", int, 1, DEFAULT_SNAPLEN), ("rate", int, 0, 10**9)):
            v = req.get(key)
            if v is None:
                continue
            if isinstance(v, bool) or not isinstance(v, kind) or not lo <= v <= hi:
                raise NmbridgeError(f"capture: {key} must be a number in [{lo}, {hi}], not {v!r}")
            nums[key] = v
        return cls(pair, dirs, what, expr, **nums)


def _compile_selection(expr: str) -> Any:
    from nmbridge.filters import FilterConfig, FilterError, RuleConfig, compile_filter

    try:
        return compile_filter(FilterConfig("capture", "drop", (RuleConfig("match", "pass", pcap=expr),),
                                           keypath="capture"))
    except FilterError as e:
        raise NmbridgeError(f"capture filter {expr!r}: {str(e).split(': ', 1)[-1]}") from None


_ids = itertools.count(1)

# a record as the merge handles it: ts_ns, direction, reason, rule, origlen, frame bytes
_Rec = tuple[int, str, str, int | None, int, bytes]
COUNTERS = ("seen", "captured", "capture_dropped", "rate_limited", "bytes")


class TapSet:
    """The taps of one direction of a capture, one per worker of the pair (worker w writes
    ``parts[w]`` only); ``Workers.set_tap`` installs part w on worker w.  Counters are summed."""

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("a TapSet needs at least one tap")
        self.parts = list(parts)

    def counters(self) -> dict[str, int]:
        per = [t.counters() for t in self.parts]
        return {k: sum(c[k] for c in per) for k in COUNTERS}

    def per_worker(self) -> list[dict[str, int]]:
        return [t.counters() for t in self.parts]


class Capture:
    """One running capture of one pair (see the module's doc).  `pair` is the bridge's running
    pair (``config``, ``fwd``: its :class:`~nmbridge.workers.Workers`, ``filters``); `alive()`
    says whether it still runs."""

    def __init__(self, spec: CaptureSpec, pair: Any, alive: Any = lambda: True) -> None:
        from nmbridge.capring import Tap
        from nmbridge.filters.engine import decide_address

        self.id = next(_ids)
        self.spec = spec
        self.pair = pair
        self.alive = alive
        self.select = _compile_selection(spec.expr) if spec.expr else None
        want = WHAT[spec.what]
        ring = RING_BYTES
        while ring < 2 * (spec.snaplen + 64):
            ring *= 2
        enabled = set(pair.fwd.stats())
        dirs = [d for d in spec.directions if d in enabled]
        if not dirs:
            raise NmbridgeError(f"capture: pair {spec.pair} does not forward {'/'.join(spec.directions)}")
        self.workers = len(pair.fwd)
        rate = -(-spec.rate // self.workers)  # the pair's taps together copy at most `rate`/s
        self.taps = {d: TapSet([Tap(DIRECTIONS.index(d), want, snaplen=spec.snaplen, ring_bytes=ring,
                                    rate=rate, limit=spec.count, select=self.select,
                                    decide=decide_address())
                                for _ in range(self.workers)])
                     for d in dirs}
        # what was read from each tap and not written yet (see drain)
        self._pending: list[tuple[str, Any, deque[_Rec]]] = [
            (d, tap, deque()) for d, taps in self.taps.items() for tap in taps.parts]
        self.interfaces = {d: i for i, d in enumerate(dirs)}
        self.started = time.time()
        self.written = 0
        self.ended: str | None = None
        self._fwd: Any = None
        self._lock = threading.Lock()
        self.attached = threading.Event()  # the taps are in: every frame from now on is seen

    # the taps in and out of the forwarder (which a reload may replace)
    def attach(self) -> None:
        with self._lock:
            fwd = self.pair.fwd
            if fwd is self._fwd:
                return
            for d, tap in self.taps.items():
                fwd.set_tap(d, tap)
            self._fwd = fwd
            self.attached.set()

    def detach(self) -> None:
        with self._lock:
            if self._fwd is not None:
                for d in self.taps:
                    if self._fwd.tap(d) is self.taps[d]:
                        self._fwd.set_tap(d, None)
                self._fwd = None

    def header(self) -> dict[str, Any]:
        s = self.spec
        return {"capture": self.id, "pair": s.pair, "format": "pcapng",
                "interfaces": [self._ifname(d) for d in self.taps], "what": s.what,
                "filter": s.expr, "count": s.count, "duration": s.duration, "snaplen": s.snaplen,
                "rate": s.rate}

    def info(self) -> dict[str, Any]:
        """For ``captures``, stats and metrics: the selection and per-direction counters (the
        sums over the workers; with several, each worker's beside them)."""
        per = {"workers": self.per_worker()} if self.workers > 1 else {}
        return {**self.header(), "state": "running" if self.attached.is_set() else "starting",
                "running_seconds": round(time.time() - self.started, 3),
                "written": self.written,
                "directions": {d: taps.counters() for d, taps in self.taps.items()}, **per}

    def per_worker(self) -> list[dict[str, Any]]:
        return [{"worker": w, "directions": {d: taps.parts[w].counters() for d, taps in self.taps.items()}}
                for w in range(self.workers)]

    def _ifname(self, d: str) -> str:
        return f"{self.spec.pair}:{d.replace('_', '-')}"

    def _comment(self, d: str, reason: str, rule: int | None) -> str | None:
        filt = self.pair.filters.get(d)
        if reason == "filter" or (reason == "forwarded" and filt is not None and rule is not None):
            if filt is None:
                who = "filter"
            elif rule is None or rule < 0:
                who = f"filter {filt.name}, default action"
            else:
                rules = filt.config.rules
                who = (f'filter {filt.name}, rule "{rules[rule].name}"' if rule < len(rules)
                       else f"filter {filt.name}, rule {rule}")
            return f"{'dropped' if reason == 'filter' else 'forwarded'}: {who}"
        if reason == "oversize":
            return "dropped: oversize (longer than a buffer)"
        if reason == "broken_chain":
            return "dropped: broken chain (an NS_MOREFRAG chain that can never move)"
        return None

    def preamble(self) -> bytes:
        ports = [str(p) for p in self.pair.config.ports]
        out = [shb()]
        for d in self.taps:
            src, dst = (ports[0], ports[1]) if d == "a_to_b" else (ports[1], ports[0])
            out.append(idb(self._ifname(d), f"{src} -> {dst}", self.spec.snaplen))
        return b"".join(out)

    def drain(self, flush: bool = False) -> bytes:
        """pcapng blocks for what the rings hold now (at most `count` frames in all), the taps
        (directions, workers) merged by timestamp.  Each tap's records keep their order; across
        taps, a record is written only once every tap has delivered what it stamped before it:
        a tap read dry has (up to the clock read before reading it), one that may hold more has
        up to its last record read; the rest waits for the next read.  `flush` (the taps are
        out: nothing can come) writes everything."""
        now = time.time_ns()
        mark = None
        for d, tap, pending in self._pending:
            got = tap.drain(DRAIN_RECORDS)
            pending.extend((ts, d, reason, rule, origlen, data)
                           for _dir, reason, rule, ts, origlen, data in got)
            seen = got[-1][3] if len(got) == DRAIN_RECORDS else now
            mark = seen if mark is None else min(mark, seen)
        ready: list[list[_Rec]] = []
        for _d, _tap, pending in self._pending:
            out = []
            while pending and (flush or mark is None or pending[0][0] <= mark):
                out.append(pending.popleft())
            ready.append(out)
        recs = list(heapq.merge(*ready, key=lambda r: r[0]))
        if self.spec.count:
            recs = recs[:max(0, self.spec.count - self.written)]
        self.written += len(recs)
        return b"".join(epb(self.interfaces[d], ts, data, origlen, self._comment(d, reason, rule))
                        for ts, d, reason, rule, origlen, data in recs)

    def trailer(self) -> bytes:
        now = time.time_ns()
        start = int(self.started * 1e9)
        out = []
        for d, taps in self.taps.items():
            c = taps.counters()
            per = "".join(f"; worker {w}: captured {x['captured']}, capture_dropped {x['capture_dropped']}, "
                          f"rate_limited {x['rate_limited']}"
                          for w, x in enumerate(taps.per_worker())) if self.workers > 1 else ""
            out.append(isb(self.interfaces[d], now, start_ns=start, received=c["seen"],
                           dropped=c["capture_dropped"] + c["rate_limited"],
                           comment=(f"capture {self.id} {self._ifname(d)} ended ({self.ended}): "
                                    f"seen {c['seen']}, "
                                    f"captured {c['captured']}, capture_dropped {c['capture_dropped']}, "
                                    f"rate_limited {c['rate_limited']}{per}")))
        return b"".join(out)

    def done(self) -> bool:
        return bool(self.spec.count) and self.written >= self.spec.count

    def stream(self, sock: socket.socket, stopping: threading.Event | None = None) -> None:
        """Write the capture to `sock` until it ends (the calling thread is the consumer)."""
        deadline = time.monotonic() + self.spec.duration if self.spec.duration else None
        sock.settimeout(30.0)  # a client that stops reading for this long is gone
        try:
            self.attach()
            sock.sendall(self.preamble())
            idle = 0.0
            while True:
                data = self.drain()
                if data:
                    sock.sendall(data)
                if self.done():
                    self.ended = "count"
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    self.ended = "duration"
                    break
                if stopping is not None and stopping.is_set():
                    self.ended = "bridge stopping"
                    break
                if not self.alive():
                    self.ended = "pair gone"
                    break
                self.attach()  # a reload may have given the pair a new forwarder
                idle = 0.0 if data else 0.02
                readable, _, _ = select.select([sock], [], [], idle)
                if readable:
                    # the client half-closed (SIGINT: a clean end) or went away
                    try:
                        got = sock.recv(4096, socket.MSG_DONTWAIT)
                    except BlockingIOError:
                        got = b"x"
                    except OSError:
                        got = b""
                    if not got:
                        self.ended = "client closed"
                        break
            self.detach()
            rest = self.drain(flush=True) if not self.done() else b""
            sock.sendall(rest + self.trailer())
        except OSError:  # the client is gone (EPIPE, reset, timeout): stop quietly
            self.ended = self.ended or "client gone"
        finally:
            self.detach()


# --- the client ------------------------------------------------------------------------------

class _Counter:
    """Follows the pcapng stream's blocks as they pass: frames written, the ISB comments."""

    def __init__(self) -> None:
        self.buf = b""
        self.frames = 0
        self.summaries: list[str] = []

    def feed(self, data: bytes) -> None:
        self.buf += data
        off = 0
        while off + 8 <= len(self.buf):
            btype, n = struct.unpack_from("<II", self.buf, off)
            if n < 12 or off + n > len(self.buf):
                break
            if btype == 6:
                self.frames += 1
            elif btype == 5:
                self.summaries += block_comments(5, self.buf[off + 8:off + n - 4])
            off += n
        self.buf = self.buf[off:]


@dataclass
class _Asked:
    """SIGINTs received since :func:`_interrupts` began."""

    count: int = 0


@contextmanager
def _interrupts() -> Iterator[_Asked]:
    """SIGINT counted instead of raised for the block (in the main thread; elsewhere nothing
    changes): a KeyboardInterrupt could land anywhere in the copy loop -- between a recv and
    its write, halfway through a write -- and end the client with status 130 and a torn
    file, where an interrupt is the operator's clean end."""
    asked = _Asked()
    if threading.current_thread() is not threading.main_thread():
        yield asked
        return

    def count(_sig: int, _frame: Any) -> None:
        asked.count += 1

    before = signal.signal(signal.SIGINT, count)
    try:
        yield asked
    finally:
        signal.signal(signal.SIGINT, before)


POLL_S = 0.2  # how soon the copy loop sees an interrupt while the stream is quiet
CLOSE_S = 5.0  # after an interrupt: how long the bridge has to end the capture cleanly


def _copy_stream(sock: socket.socket, out: Any, count: _Counter, asked: _Asked) -> None:
    """Copy the pcapng stream to `out` until the bridge ends it.  The first interrupt
    half-closes the connection (the bridge then ends the capture cleanly: what the taps hold,
    the statistics); a second one, or CLOSE_S without the end, stops at once."""
    sock.settimeout(POLL_S)
    closing_until = None
    while True:
        if asked.count and closing_until is None:
            sock.shutdown(socket.SHUT_WR)  # the bridge ends the capture cleanly
            closing_until = time.monotonic() + CLOSE_S
        if closing_until is not None and (asked.count > 1 or time.monotonic() > closing_until):
            return
        try:
            data = sock.recv(1 << 16)
        except TimeoutError:
            continue
        if not data:
            return
        count.feed(data)
        try:
            out.write(data)
            out.flush()
        except BrokenPipeError:  # `| tcpdump -c 5` went away: so do we
            return


def run_client(path: str, req: dict[str, Any], out: Any, *, connect_timeout: float = 5.0,
               on_start: Any = None) -> _Counter:
    """Send a capture request to the control socket at `path`, copy the pcapng stream to the
    binary file `out` until the bridge ends it.  SIGINT (KeyboardInterrupt) half-closes the
    connection and waits (5 s at most) for the bridge's clean end.  Raises ControlError."""
    import json

    from nmbridge.control import ControlError, _connect

    count = _Counter()
    try:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(connect_timeout)
        _connect(sock, path, time.monotonic() + connect_timeout)  # waits while the backlog is full
    except TimeoutError:
        raise ControlError(f"{path}: no answer within {connect_timeout:g} s") from None
    except FileNotFoundError:
        raise ControlError(f"no control socket at {path}: is nmbridge running?") from None
    except PermissionError:
        raise ControlError(f"{path}: permission denied (be root or in the socket's group)") from None
    except OSError as e:
        raise ControlError(f"{path}: {e.strerror or e}") from None
    with sock:
        sock.sendall(json.dumps({"cmd": "capture", **req}).encode() + b"\n")
        head = b""
        while not head.endswith(b"\n"):
            chunk = sock.recv(1)
            if not chunk:
                raise ControlError(f"{path}: the bridge closed the connection without answering")
            head += chunk
        reply = json.loads(head)
        if not reply.get("ok"):
            raise ControlError(str(reply.get("error", "unknown error")))
        if on_start is not None:
            on_start(reply.get("result") or {})
        with _interrupts() as asked:
            _copy_stream(sock, out, count, asked)
    return count
