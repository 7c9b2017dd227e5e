"""Raw frame I/O in lab namespaces, for end-to-end tests and the demo.

``RawPort``: an AF_PACKET socket on a lab interface, for sending crafted frames and receiving
them whole (the VLAN tag the kernel moved into metadata is put back from PACKET_AUXDATA).
``Collector``: the frames carrying a test token, in arrival order.  ``wait_for``: poll a
condition with a deadline.  ``RunningBridge``: what the ``start_bridge`` fixture returns.
"""

from __future__ import annotations

import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

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
