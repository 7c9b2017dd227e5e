"""``nmbridge demo``: a throw-away lab of network namespaces, bridged, with real traffic.

::

    left ns  (10.77.0.1/24)  --veth--  bridge ns: nmbridge run  --veth--  right ns (10.77.0.2/24)

1. build the lab (:mod:`nmbridge.netns`): three namespaces, two veth pairs, addresses on the
   left and right ends only, the Linux default offloads (TSO/GSO on) there, as containers have;
2. write a config with two ``afpacket:`` (or, ``--backend afxdp``, ``afxdp:``) ports on the
   bridge-side veths and start the real
   ``nmbridge run -c CONFIG`` inside the bridge namespace (``ip netns exec``), with JSON logs
   on its stdout; wait for its ``forwarding`` event;
3. ping left -> right and right -> left (ICMP echo from each namespace's own stack, so ARP
   goes through the bridge too), then time timestamped probe frames left -> right one way
   (:mod:`nmbridge.probe`: p50/p99);
4. send a burst of frames left -> right on an AF_PACKET socket and count what arrives on the
   right, in order, none missing (the sender keeps at most :data:`BURST_WINDOW` frames in
   flight, so nothing is lost to kernel queue limits and the count must be exact);
5. stop the bridge with SIGTERM and print its final counters from its ``stopped`` event;
6. tear everything down: on success, on errors, on SIGINT/SIGTERM/SIGHUP (the teardown itself
   ignores further signals).  ``--keep`` leaves the lab up (the bridge stopped) and prints how
   to use and remove it.

Progress goes to stdout, or to stderr with ``--json`` (then stdout holds only the summary).
Exit status: 0 when every ping was answered and every frame of the burst arrived, in order;
1 otherwise (the reason is printed); 128 + the signal number when interrupted.
"""

from __future__ import annotations

import json
import os
import queue
import secrets
import select
import shlex
import shutil
import signal
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from types import FrameType
from typing import Any, TextIO

from nmbridge import caps, netns, probe
from nmbridge.errors import NmbridgeError
from nmbridge.logs import discard_output

ROOT_MESSAGE = "nmbridge demo needs root (network namespaces): run it with sudo"

FORWARDING_TIMEOUT = 30.0  # seconds for the bridge to start forwarding (Python start-up, imports)
STOP_TIMEOUT = 15.0  # seconds for the bridge to log `stopped` and exit after SIGTERM
PING_COUNT = 3
PING_TIMEOUT = 2.0  # seconds per echo request
PROBE_COUNT = 500  # one-way latency probes (nmbridge/probe.py), after PROBE_SKIP warm-up ones
PROBE_RATE = 1000.0  # probes per second
PROBE_SKIP = 20
BURST_ETHERTYPE = 0x88B5  # IEEE local experimental: nothing in the lab answers it
BURST_FRAME = 60  # bytes: the minimum Ethernet frame without FCS
BURST_WINDOW = 256  # frames in flight at most (the kernel's per-CPU backlog holds 1000)
BURST_STALL = 3.0  # seconds without a new frame arriving: the missing ones are lost
SO_RCVBUFFORCE = 33
CAP_SYS_ADMIN = 21
NEEDED_CAPS = ((CAP_SYS_ADMIN, "CAP_SYS_ADMIN"), (caps.CAP_NET_ADMIN, "CAP_NET_ADMIN"),
               (caps.CAP_NET_RAW, "CAP_NET_RAW"))
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


EX_OUTPUT_CLOSED = 141  # as the CLI: 128 + SIGPIPE


class DemoError(NmbridgeError):
    """A step of the demo failed; the message says which and why."""


class Interrupted(BaseException):
    """A signal asked the demo to stop (tear down and exit 128 + signum)."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --- results -------------------------------------------------------------------------------


@dataclass
class PingResult:
    source: str
    target: str
    target_ip: str
    rtt_ms: list[float | None]

    @property
    def answered(self) -> int:
        return sum(r is not None for r in self.rtt_ms)


@dataclass
class BurstResult:
    sent: int = 0
    delivered: int = 0
    in_order: bool = True
    duplicates: int = 0
    seconds: float = 0.0
    frame_bytes: int = BURST_FRAME

    @property
    def complete(self) -> bool:
        return self.delivered == self.sent and self.in_order and self.duplicates == 0


@dataclass
class Summary:
    ok: bool = False
    reason: str | None = None
    lab: dict[str, Any] = field(default_factory=dict)
    bridge_command: list[str] = field(default_factory=list)
    bridge_pid: int | None = None
    pings: list[PingResult] = field(default_factory=list)
    probe: dict[str, float | int | None] = field(default_factory=dict)
    burst: BurstResult | None = None
    zero_copy: bool | None = None
    counters: dict[str, dict[str, Any]] = field(default_factory=dict)
    bridge_exit_status: int | None = None
    kept: bool = False
    left_behind: list[str] = field(default_factory=list)
    interrupted_by: str | None = None

    def to_json(self) -> dict[str, Any]:
        d = asdict(self)
        for p, src in zip(d["pings"], self.pings, strict=True):
            p["answered"] = src.answered
        if self.burst is not None:
            d["burst"]["complete"] = self.burst.complete
        return d


# --- the bridge as a child process ---------------------------------------------------------


class BridgeProcess:
    """``nmbridge run -c CONFIG`` inside the bridge namespace; its JSON log events read by a
    thread into a queue, its stderr kept for error messages."""

    def __init__(self, lb: netns.Lab, config_path: str) -> None:
        self.command = [sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", config_path]
        pkg_parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        env = dict(os.environ, PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join(p for p in (pkg_parent, os.environ.get("PYTHONPATH")) if p))
        self.events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.seen: list[dict[str, Any]] = []
        self.stderr: list[str] = []
        # its own session: a Ctrl-C at the terminal reaches only the demo, which stops the
        # bridge itself (and so still reads its final counters)
        self.proc = lb.popen(lb.ns_bridge, *self.command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env, start_new_session=True)
        self._threads = [threading.Thread(target=self._read_stdout, daemon=True, name="bridge-stdout"),
                         threading.Thread(target=self._read_stderr, daemon=True, name="bridge-stderr")]
        for t in self._threads:
            t.start()

    def _read_stdout(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                ev = json.loads(line)
            except json.JSONDecodeError:
                self.stderr.append(line.rstrip("\n"))  # not a log line: keep it for errors
                continue
            if isinstance(ev, dict):
                self.events.put(ev)
        self.events.put(None)  # EOF: the process is ending

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.stderr.append(line.rstrip("\n"))

    def wait_event(self, name: str, timeout: float) -> dict[str, Any]:
        """The next event called `name`; DemoError if the bridge ends or `timeout` passes first."""
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise DemoError(f"the bridge did not log '{name}' within {timeout:g} s{self.details()}")
            try:
                ev = self.events.get(timeout=remaining)
            except queue.Empty:
                continue
            if ev is None:
                self.events.put(None)  # stay at EOF for later calls
                status = self._exit_status(5.0)
                raise DemoError(f"the bridge exited (status {status}) before logging '{name}'"
                                f"{self.details()}")
            self.seen.append(ev)
            if ev.get("event") == name:
                return ev

    def _exit_status(self, timeout: float) -> int | None:
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def details(self) -> str:
        """The bridge's error events and stderr, indented, for an error message."""
        for t in self._threads:
            t.join(0.5 if self.proc.poll() is not None else 0)
        lines = [f"{e.get('event')}: {e.get('error', '')}".rstrip(": ") for e in self.seen
                 if e.get("level") in ("error", "critical")]
        lines += [s for s in self.stderr if s.strip()]
        if not lines:
            return " (it printed nothing on stderr)"
        return "; the bridge said:\n" + "\n".join("    " + s for s in lines[-20:])

    def stop(self) -> tuple[dict[str, Any], int]:
        """SIGTERM; its ``stopped`` event and exit status."""
        self.proc.send_signal(signal.SIGTERM)
        stopped = self.wait_event("stopped", STOP_TIMEOUT)
        status = self._exit_status(STOP_TIMEOUT)
        if status is None:
            raise DemoError(f"the bridge logged 'stopped' but did not exit within {STOP_TIMEOUT:g} s")
        return stopped, status

    def kill(self) -> None:
        """Make sure it has ended: SIGTERM, then SIGKILL after STOP_TIMEOUT."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            if self._exit_status(STOP_TIMEOUT) is None:
                self.proc.kill()
                self.proc.wait()
        for t in self._threads:
            t.join(2.0)


# --- traffic -------------------------------------------------------------------------------


def burst(lb: netns.Lab, frames: int) -> BurstResult:
    """Send `frames` frames left -> right on AF_PACKET sockets; count what arrives."""
    src_mac = lb.mac(lb.ns_left, lb.left_if)
    dst_mac = lb.mac(lb.ns_right, lb.right_if)
    token = secrets.token_bytes(8)
    head = dst_mac + src_mac + struct.pack("!H", BURST_ETHERTYPE) + token
    pad = bytes(BURST_FRAME - len(head) - 4)
    tx = netns.netns_socket(lb.ns_left, socket.AF_PACKET, socket.SOCK_RAW, 0)
    rx = netns.netns_socket(lb.ns_right, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(BURST_ETHERTYPE))
    res = BurstResult()
    try:
        tx.bind((lb.left_if, 0))  # protocol 0: this socket receives nothing
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        rx.bind((lb.right_if, BURST_ETHERTYPE))
        rx.setblocking(False)
        seen: set[int] = set()
        last = -1

        def drain() -> int:
            nonlocal last
            got = 0
            while True:
                try:
                    f = rx.recv(2048)
                except BlockingIOError:
                    return got
                if f[14:22] != token:
                    continue
                seq = int.from_bytes(f[22:26], "big")
                if seq in seen:
                    res.duplicates += 1
                    continue
                seen.add(seq)
                res.in_order = res.in_order and seq > last
                last = max(last, seq)
                res.delivered += 1
                got += 1

        t0 = time.monotonic()
        progress = t0
        while res.delivered + res.duplicates < frames:
            room = min(BURST_WINDOW - (res.sent - res.delivered), frames - res.sent)
            for _ in range(max(room, 0)):
                tx.send(head + res.sent.to_bytes(4, "big") + pad)
                res.sent += 1
            remaining = progress + BURST_STALL - time.monotonic()
            if remaining <= 0:
                break  # nothing arrived for BURST_STALL seconds: the rest is lost
            if select.select([rx], [], [], remaining)[0] and drain():
                progress = time.monotonic()
        res.seconds = time.monotonic() - t0
    finally:
        tx.close()
        rx.close()
    return res


# --- the demo ------------------------------------------------------------------------------


DEMO_BACKENDS = ("afpacket", "afxdp")


def config_text(lb: netns.Lab, backend: str = "afpacket") -> str:
    return (
        f"# written by `nmbridge demo`: two {backend}: ports on the bridge-side veths of the lab\n"
        "[bridge]\n"
        'name = "demo"\n'
        f'backend = "{backend}"\n'
        "stats_interval = 0\n"
        "\n"
        "[[pair]]\n"
        'name = "demo"\n'
        f'ports = ["{backend}:{lb.bridge_left_if}", "{backend}:{lb.bridge_right_if}"]\n'
        'direction = "both"\n'
    )


@contextmanager
def _signals_raise() -> Iterator[None]:
    """SIGINT, SIGTERM and SIGHUP raise :class:`Interrupted` in the main thread."""

    def handler(signum: int, frame: FrameType | None) -> None:
        raise Interrupted(signum)

    old = {s: signal.signal(s, handler) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


@contextmanager
def _signals_ignored() -> Iterator[None]:
    """For the teardown: nothing may interrupt it halfway."""
    old = {s: signal.signal(s, signal.SIG_IGN) for s in SIGNALS}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)


class Demo:
    def __init__(self, frames: int, keep: bool, as_json: bool, out: TextIO, progress: TextIO,
                 backend: str = "afpacket") -> None:
        self.frames = frames
        self.backend = backend
        self.keep = keep
        self.as_json = as_json
        self.out = out
        self.progress = progress
        self.summary = Summary()
        self.lab: netns.Lab | None = None
        self.bridge: BridgeProcess | None = None
        self.tmpdir: str | None = None
        self.step_no = 0
        self.output_closed = False  # the reader of the progress went away (`demo | head`)
        self.tearing_down = False

    def say(self, text: str = "") -> None:
        """Progress; a closed output never raises here (the teardown says things too, and
        must go on to remove the lab): it is discarded and the next step stops the demo."""
        if self.output_closed:
            return
        try:
            print(text, file=self.progress, flush=True)
        except BrokenPipeError:
            self.output_closed = True
            discard_output(self.progress)

    def step(self, text: str) -> None:
        if self.output_closed and not self.tearing_down:
            raise DemoError("the output was closed (its reader went away)")
        self.step_no += 1
        self.say(f"\n[{self.step_no}/6] {text}")

    def run(self) -> int:
        status = 1
        try:
            with _signals_raise():
                try:
                    self._steps()
                    status = 0 if self.summary.ok else 1
                except (NmbridgeError, OSError) as e:  # DemoError, NetnsError, a socket's error
                    self.summary.reason = str(e)
                    status = 1
                finally:
                    with _signals_ignored():
                        self._teardown()
        except Interrupted as e:
            self.summary.interrupted_by = str(e)
            self.summary.reason = f"interrupted by {e}"
            status = 128 + e.signum
            with _signals_ignored():
                self._teardown()  # idempotent: finishes a teardown the signal cut short
        if self.output_closed:
            status = EX_OUTPUT_CLOSED
        self._report(status)
        return status

    # --- steps

    def _steps(self) -> None:
        s = self.summary
        self.say("nmbridge demo: three throw-away network namespaces, two veth cables, and nmbridge\n"
                 "forwarding real traffic between them. Everything is removed at the end.")

        lb = netns.new_lab()
        self.lab = lb
        self.step(f"Building the lab (every name starts with {lb.prefix}, unique to this run)")
        netns.build(lb)
        s.lab = {"prefix": lb.prefix, "namespaces": list(lb.namespaces), "interfaces": list(lb.interfaces),
                 "left_ip": lb.left_ip, "right_ip": lb.right_ip}
        self.say(f"      namespace {lb.ns_left:<16} interface {lb.left_if:<10} {lb.left_ip}/{lb.plen}\n"
                 f"          | veth cable\n"
                 f"      namespace {lb.ns_bridge:<16} interfaces {lb.bridge_left_if} and {lb.bridge_right_if}"
                 f" (no IP address: nmbridge just moves frames)\n"
                 f"          | veth cable\n"
                 f"      namespace {lb.ns_right:<16} interface {lb.right_if:<10} {lb.right_ip}/{lb.plen}\n"
                 f"      The left and right sides share one subnet, but their only path is the bridge.")

        self.tmpdir = tempfile.mkdtemp(prefix=f"{lb.prefix}-demo-")
        config_path = os.path.join(self.tmpdir, "bridge.toml")
        with open(config_path, "w") as f:
            f.write(config_text(lb, self.backend))
        self.step("Starting the bridge: the real `nmbridge run`, inside the bridge namespace")
        self.bridge = br = BridgeProcess(lb, config_path)
        s.bridge_command = ["ip", "netns", "exec", lb.ns_bridge, *br.command]
        s.bridge_pid = br.proc.pid
        self.say(f"      config {config_path}: one pair, {self.backend}:{lb.bridge_left_if} <-> "
                 f"{self.backend}:{lb.bridge_right_if}\n"
                 f"      $ {shlex.join(s.bridge_command)}")
        t0 = time.monotonic()
        fwd = br.wait_event("forwarding", FORWARDING_TIMEOUT)
        s.zero_copy = bool(fwd.get("zero_copy"))
        # how its forwarding thread is scheduled (logged by the thread itself, in either order)
        sched = next((e for e in br.seen if e.get("event") == "forwarding_sched"), None)
        if sched is None:
            sched = br.wait_event("forwarding_sched", FORWARDING_TIMEOUT)
        self.say(f"      the bridge is forwarding (after {time.monotonic() - t0:.1f} s; pid {br.proc.pid}), "
                 f"{'zero-copy' if s.zero_copy else 'copying'}; its forwarding thread runs "
                 f"{sched.get('sched')}")

        self.step("Ping, both ways (ICMP echo from each side's own network stack, so ARP crosses "
                  "the bridge too)")
        for src_ns, src_name, dst_name, dst_ip in ((lb.ns_left, "left", "right", lb.right_ip),
                                                   (lb.ns_right, "right", "left", lb.left_ip)):
            self.say(f"      {src_name} -> {dst_name} ({dst_ip}):")

            def show(seq: int, rtt: float | None, dst_ip: str = dst_ip) -> None:
                if rtt is None:
                    self.say(f"        no reply to seq={seq} within {PING_TIMEOUT:g} s")
                else:
                    first = " (includes ARP)" if seq == 0 else ""
                    self.say(f"        reply from {dst_ip}: seq={seq} time={rtt * 1000:.3f} ms{first}")

            rtts = netns.ping(src_ns, dst_ip, PING_COUNT, PING_TIMEOUT, on_reply=show)
            s.pings.append(PingResult(src_name, dst_name, dst_ip,
                                      [None if r is None else round(r * 1000, 3) for r in rtts]))
        cpu0, t0 = probe.cpu_seconds(br.proc.pid), time.monotonic()
        pr = probe.probe(lb, PROBE_COUNT, PROBE_RATE, skip=PROBE_SKIP)
        s.probe = pr.summary()
        s.probe["bridge_cpu"] = round((probe.cpu_seconds(br.proc.pid) - cpu0) / (time.monotonic() - t0), 2)
        lat = s.probe
        self.say(f"      one-way, left -> right: {pr.received} of {pr.sent} timestamped probe frames "
                 f"({PROBE_RATE:g}/s) took\n"
                 f"        p50 {lat['p50_us']} µs, p99 {lat['p99_us']} µs, max {lat['max_us']} µs\n"
                 "      (a ping's time is a round trip through both stacks and a Python pinger; the probe's\n"
                 "       is one way, sender to receiver, kernel-stamped: the bridge's own share of it)\n"
                 f"      meanwhile the bridge used {lat['bridge_cpu']:.0%} of a CPU: its forwarding thread "
                 "polls a link\n       that had a frame in the last 2 ms instead of sleeping (README "
                 "\"Latency\", spin_us)")

        self.step(f"Burst: {self.frames} frames of {BURST_FRAME} bytes from left to right (AF_PACKET, "
                  f"ethertype {BURST_ETHERTYPE:#06x}), counted on the right")
        s.burst = b = burst(lb, self.frames)
        rate = b.delivered / b.seconds if b.seconds > 0 else 0.0
        order = ", in order" if b.in_order else ", OUT OF ORDER"
        self.say(f"      sent {b.sent}, arrived {b.delivered}{order}"
                 f"{f', {b.duplicates} duplicates' if b.duplicates else ''} in {b.seconds:.2f} s "
                 f"({rate:,.0f} frames/s)\n"
                 f"      (the Python sender, one system call per frame and at most {BURST_WINDOW} in "
                 f"flight, sets that pace;\n       benchmarks/veth.py measures the bridge itself)")

        self.step("Stopping the bridge (SIGTERM) and reading its final counters")
        stopped, status = br.stop()
        s.bridge_exit_status = status
        s.counters = dict(stopped.get("counters", {}).get("demo", {}))
        self._counter_table()
        if status != 0:
            raise DemoError(f"the bridge exited with status {status} after SIGTERM{br.details()}")

        problems = []
        for p in s.pings:
            if p.answered < PING_COUNT:
                problems.append(f"{p.source} -> {p.target}: {PING_COUNT - p.answered} of {PING_COUNT} "
                                "pings unanswered")
        if s.probe.get("received", 0) != s.probe.get("sent"):
            problems.append(f"probe: {s.probe.get('received')} of {s.probe.get('sent')} frames arrived")
        if not b.complete:
            problems.append(f"burst: {b.delivered} of {b.sent} frames arrived"
                            f"{'' if b.in_order else ', out of order'}"
                            f"{f', {b.duplicates} duplicates' if b.duplicates else ''}")
        s.ok = not problems
        s.reason = "; ".join(problems) or None

    def _counter_table(self) -> None:
        s = self.summary
        names = {"a_to_b": "left -> right", "b_to_a": "right -> left"}
        self.say(f"      {'direction':<15}{'received':>10}{'forwarded':>10}{'bytes':>12}{'drops':>8}")
        for d, label in names.items():
            c = s.counters.get(d)
            if c is None:
                continue
            self.say(f"      {label:<15}{c.get('received', 0):>10}{c.get('forwarded', 0):>10}"
                     f"{c.get('bytes', 0):>12}{c.get('dropped', 0):>8}")
        self.say(f"      zero-copy: {'yes' if s.zero_copy else 'no'}"
                 f"{' (frames move between the ports by swapping buffer indices)' if s.zero_copy else ''}")
        self.say("      (left -> right is the burst plus the probes, pings and ARP; received = forwarded "
                 "+ drops + frames still queued)")

    # --- teardown

    def _teardown(self) -> None:
        """Stop the bridge, then (unless --keep after a finished run) remove the lab and the
        config.  Idempotent; never raises."""
        self.tearing_down = True
        if self.bridge is not None:
            try:
                self.bridge.kill()
            except Exception as e:  # pragma: no cover - a bridge that cannot be signalled
                self.say(f"      could not stop the bridge (pid {self.bridge.proc.pid}): {e}")
            self.bridge = None
        lb = self.lab
        if lb is None:
            return
        keep = self.keep and self.summary.interrupted_by is None
        if keep:
            self.summary.kept = True
            self._print_keep(lb)
            self.lab = None
            return
        for pid in lb.pids():  # anything else still inside would keep a namespace alive
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + 5.0
        while lb.pids() and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.step_no == 5:
            self.step("Removing the lab")
        else:
            self.say("\nRemoving the lab")
        left = netns.destroy(lb)
        self.summary.left_behind = left
        if self.tmpdir is not None:
            shutil.rmtree(self.tmpdir, ignore_errors=True)
            self.tmpdir = None
        self.lab = None
        if left:
            self.say(f"      could NOT remove {', '.join(left)}; "
                     f"remove by hand: ip netns del NAME / ip link del NAME")
        else:
            self.say(f"      removed namespaces {', '.join(lb.namespaces)}; their veths went with them")

    def _print_keep(self, lb: netns.Lab) -> None:
        cfg = os.path.join(self.tmpdir or "", "bridge.toml")
        run = f"ip netns exec {lb.ns_bridge} {_nmbridge_command()} run -c {cfg}"
        self.say(f"\nThe lab is still up (--keep); the bridge is stopped. To poke at it:\n"
                 f"  start the bridge again:  {run}\n"
                 f"  a shell on the left:     ip netns exec {lb.ns_left} bash   "
                 f"(then e.g. ping {lb.right_ip}, with iputils-ping)\n"
                 f"  watch the right side:    ip netns exec {lb.ns_right} tcpdump -eni {lb.right_if}\n"
                 f"  see the links:           ip -n {lb.ns_bridge} -s link\n"
                 f"To remove it:\n"
                 f"  ip netns del {lb.ns_left}; ip netns del {lb.ns_bridge}; ip netns del {lb.ns_right}; "
                 f"rm -r {self.tmpdir}")

    # --- result

    def _report(self, status: int) -> None:
        s = self.summary
        if s.ok and status == 0:
            b = s.burst
            assert b is not None
            self.say(f"\nResult: OK. Every ping was answered and all {b.sent} frames crossed the bridge.")
        else:
            self.say(f"\nResult: FAILED: {s.reason or 'unknown'}")
        if self.as_json:
            print(json.dumps({**s.to_json(), "exit_status": status}, indent=2), file=self.out, flush=True)


def _nmbridge_command() -> str:
    """How a person starts nmbridge from a shell: the installed command, else this
    interpreter with this source tree on its path."""
    if shutil.which("nmbridge") is not None:
        return "nmbridge"
    parent = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return f"env PYTHONPATH={shlex.quote(parent)} {shlex.quote(sys.executable)} -m nmbridge"


def privilege_problem() -> str | None:
    """None when this process may build namespaces and veths and open raw sockets."""
    if os.geteuid() != 0:
        return ROOT_MESSAGE
    have = caps.effective()
    lacking = [name for bit, name in NEEDED_CAPS if not have & (1 << bit)]
    if lacking:
        return (f"nmbridge demo needs root (network namespaces): this root process lacks "
                f"{', '.join(lacking)} (a restricted container?)")
    return None


def run_demo(frames: int = 10000, keep: bool = False, as_json: bool = False,
             out: TextIO | None = None, backend: str = "afpacket") -> int:
    """``nmbridge demo``; returns the exit status."""
    out = out if out is not None else sys.stdout
    problem = privilege_problem()
    if problem is not None:
        print(problem, file=sys.stderr)
        return 1
    if shutil.which("ip") is None:
        print("nmbridge demo needs the ip command: apt-get install iproute2", file=sys.stderr)
        return 1
    if frames < 1:
        print("nmbridge demo: --frames must be at least 1", file=sys.stderr)
        return 2
    progress = sys.stderr if as_json else out
    if backend not in DEMO_BACKENDS:
        print(f"nmbridge demo: --backend {backend}: use one of {', '.join(DEMO_BACKENDS)}", file=sys.stderr)
        return 2
    return Demo(frames, keep, as_json, out, progress, backend).run()
