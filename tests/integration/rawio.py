"""Raw frame I/O in lab namespaces, for end-to-end tests and the demo.

``RawPort``: an AF_PACKET socket on a lab interface, for sending crafted frames and receiving
them whole (the VLAN tag the kernel moved into metadata is put back from PACKET_AUXDATA).
``Collector``: the frames carrying a test token, in arrival order.  ``wait_for``: poll a
condition with a deadline.  ``RunningBridge``: what the ``start_bridge`` fixture returns.
``NmbridgeRun``: the real ``nmbridge run`` in a lab's bridge namespace, its JSON log events
read by a thread.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from nmbridge import netns
from nmbridge.backends import PortSet

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_AUXDATA = 8
PACKET_IGNORE_OUTGOING = 23
TP_STATUS_VLAN_VALID = 1 << 4
TP_STATUS_VLAN_TPID_VALID = 1 << 6
SO_RCVBUFFORCE = 33
TEST_ETHERTYPE = 0x88B5  # IEEE local experimental


def wait_for(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    """Poll `cond` until true; fail the test (naming `what`) after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.005)


class RawPort:
    """An AF_PACKET socket bound to one interface of a lab namespace."""

    def __init__(self, ns: str, ifname: str) -> None:
        self.sock = netns.netns_socket(ns, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        self.sock.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
        self.sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        self.sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 32 << 20)
        self.sock.bind((ifname, ETH_P_ALL))
        self.sock.setblocking(False)

    def send(self, frame: bytes) -> None:
        self.sock.send(frame)

    def recv_all(self) -> list[bytes]:
        """Every frame queued now, whole (VLAN tag re-inserted from the auxdata)."""
        out = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(65536, socket.CMSG_SPACE(64))
            except BlockingIOError:
                return out
            for level, kind, cdata in anc:
                if level == SOL_PACKET and kind == PACKET_AUXDATA and len(cdata) >= 20:
                    status, _, _, _, _, tci, tpid = struct.unpack_from("=IIIHHHH", cdata)
                    if status & TP_STATUS_VLAN_VALID:
                        if not (status & TP_STATUS_VLAN_TPID_VALID and tpid):
                            tpid = 0x8100
                        data = data[:12] + struct.pack("!HH", tpid, tci) + data[12:]
            out.append(data)

    def close(self) -> None:
        self.sock.close()


@dataclass
class Collector:
    """Frames received on a RawPort that carry a test token, kept in arrival order."""

    port: RawPort
    token: bytes
    frames: list[bytes] = field(default_factory=list)

    def poll(self) -> int:
        self.frames.extend(f for f in self.port.recv_all() if self.token in f[:64])
        return len(self.frames)

    def wait(self, n: int, timeout: float = 5.0) -> list[bytes]:
        wait_for(lambda: self.poll() >= n, timeout, f"{n} frames (got {len(self.frames)})")
        return self.frames


@dataclass
class RunningBridge:
    """A Forwarder over two afpacket: ports in a lab's bridge namespace."""

    lab: netns.Lab
    portset: PortSet
    left: object  # AfPacketPort on bridge_left_if
    right: object  # AfPacketPort on bridge_right_if
    fwd: object  # Forwarder(left, right)
    thread: threading.Thread
    errors: list[BaseException]

    def stop(self) -> None:
        self.fwd.stop()  # type: ignore[attr-defined]
        self.thread.join(10)
        self.portset.close()


ROOT = Path(__file__).resolve().parents[2]
RUN_DEADLINE = 60.0  # seconds an event or an exit may take


class NmbridgeRun:
    """`nmbridge run -c CONFIG` in the lab's bridge namespace (behind `prefix`, e.g. setpriv),
    JSON logs read by a thread; `state`: its --state-dir (locks, restore records)."""

    def __init__(self, lb: netns.Lab, config: Path, *prefix: str, args: tuple[str, ...] = (),
                 control: str = "", state: Path | str | None = None) -> None:
        env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
        extra = [*args, *(["--state-dir", str(state)] if state else [])]
        self.proc = lb.popen(lb.ns_bridge, *prefix, sys.executable, "-m", "nmbridge", "--log-format", "json",
                             "run", "-c", str(config), "--control", control, *extra, cwd="/", env=env,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
        self.seen: list[dict[str, Any]] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(json.loads(line))
        self.lines.put(None)

    def wait_event(self, name: str, **match: object) -> dict[str, Any]:
        """The next event `name` whose fields match `match`; the test fails if nmbridge ends first."""
        deadline = time.monotonic() + RUN_DEADLINE
        while True:
            ev = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            if ev is None:
                self.lines.put(None)
                err = self.proc.stderr.read() if self.proc.stderr else ""
                pytest.fail(f"nmbridge ended before {name!r}: {err}")
            self.seen.append(ev)
            if ev["event"] == name and all(ev.get(k) == v for k, v in match.items()):
                return ev

    def events(self, name: str) -> list[dict[str, Any]]:
        """Every event `name` logged so far."""
        while True:
            try:
                ev = self.lines.get_nowait()
            except queue.Empty:
                break
            if ev is None:
                self.lines.put(None)
                break
            self.seen.append(ev)
        return [e for e in self.seen if e["event"] == name]

    def stop(self) -> dict[str, Any]:
        """SIGTERM; the `stopped` event (exit status 0 asserted)."""
        self.proc.send_signal(signal.SIGTERM)
        stopped = self.wait_event("stopped")
        assert self.proc.wait(RUN_DEADLINE) == 0
        return stopped

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def udp_both_ways(lb: netns.Lab, sizes: tuple[int, ...] = (1, 100, 1472, 4000)) -> None:
    """Datagrams of `sizes` from left's kernel stack to right's and back (4000 bytes: one the
    IP layer fragments); each must arrive intact, from the right address."""
    import secrets

    a = netns.netns_socket(lb.ns_left, socket.AF_INET, socket.SOCK_DGRAM)
    b = netns.netns_socket(lb.ns_right, socket.AF_INET, socket.SOCK_DGRAM)
    try:
        a.bind((lb.left_ip, 40001))
        b.bind((lb.right_ip, 40002))
        a.settimeout(5)
        b.settimeout(5)
        for size in sizes:
            msg = secrets.token_bytes(size)
            a.sendto(msg, (lb.right_ip, 40002))
            assert b.recvfrom(65536) == (msg, (lb.left_ip, 40001))
            b.sendto(msg[::-1], (lb.left_ip, 40001))
            assert a.recvfrom(65536) == (msg[::-1], (lb.right_ip, 40002))
    finally:
        a.close()
        b.close()
