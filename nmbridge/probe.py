"""One-way latency probes across a lab's bridge (``nmbridge demo``, ``benchmarks/latency.py``).

A probe is a 60-byte frame sent from ``left`` to ``right`` on AF_PACKET sockets (ethertype
0x88B5, IEEE local experimental: nothing in the lab answers it), carrying a run token, a
sequence number and the wall-clock time (``CLOCK_REALTIME``, ns) just before ``send()``.
The receiver asks the kernel for each frame's arrival time (``SO_TIMESTAMPNS``, the same
clock: same host), so ``arrival - stamp`` is the one-way latency: the sender's system call,
the two veths, and whatever bridge is in between -- no reply path, no ping tool.

Sending and receiving share one thread (no GIL hand-over between the stamp and the send):
between two probes it waits on the receive socket until the next probe is due.
"""

from __future__ import annotations

import math
import os
import secrets
import select
import socket
import struct
import time
from dataclasses import dataclass, field

from nmbridge import netns

ETHERTYPE = 0x88B5
FRAME = 60  # bytes, the minimum Ethernet frame without FCS
SO_TIMESTAMPNS = 35
SO_RCVBUFFORCE = 33
_PAYLOAD = struct.Struct("!8sIq")  # token, sequence, stamp (ns)


@dataclass
class ProbeResult:
    """One-way latencies (ns) of the probes that arrived, in sending order."""

    sent: int = 0
    latencies_ns: list[int] = field(default_factory=list)
    duplicates: int = 0
    rate_pps: float = 0.0

    @property
    def received(self) -> int:
        return len(self.latencies_ns)

    @property
    def lost(self) -> int:
        return self.sent - self.received

    def summary(self) -> dict[str, float | int | None]:
        """sent/received/lost and p50/p99/p99.9/max in microseconds (None when nothing came)."""
        return {"sent": self.sent, "received": self.received, "lost": self.lost,
                "rate_pps": round(self.rate_pps, 1), **percentiles_us(self.latencies_ns)}


def percentile(sorted_values: list[int], q: float) -> int:
    """The nearest-rank q-th percentile (0 < q <= 100) of an ascending list."""
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[rank - 1]


def percentiles_us(latencies_ns: list[int]) -> dict[str, float | None]:
    """p50, p99, p99.9 and max in microseconds (nearest rank), None for an empty list."""
    keys = (("p50_us", 50.0), ("p99_us", 99.0), ("p99_9_us", 99.9))
    if not latencies_ns:
        return {**{k: None for k, _ in keys}, "max_us": None}
    v = sorted(latencies_ns)
    out: dict[str, float | None] = {k: round(percentile(v, q) / 1000, 1) for k, q in keys}
    out["max_us"] = round(v[-1] / 1000, 1)
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system, all threads) process `pid` has used so far; 0.0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _timestamp(ancdata: list[tuple[int, int, bytes]]) -> int | None:
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(data) >= 16:
            sec, nsec = struct.unpack_from("qq", data)
            return int(sec * 1_000_000_000 + nsec)
    return None


def probe(lb: netns.Lab, count: int, rate: float, *, settle: float = 0.5, skip: int = 0) -> ProbeResult:
    """Send `count` probes left -> right at `rate` per second; collect their one-way latency.

    The first `skip` probes are sent but not counted (warm-up: a learning bridge floods,
    caches are cold).  After the last probe, stragglers are awaited for `settle` seconds."""
    if count < 1 or rate <= 0:
        raise ValueError("probe needs count >= 1 and rate > 0")
    src_mac = lb.mac(lb.ns_left, lb.left_if)
    dst_mac = lb.mac(lb.ns_right, lb.right_if)
    token = secrets.token_bytes(8)
    head = dst_mac + src_mac + struct.pack("!H", ETHERTYPE)
    pad = bytes(FRAME - len(head) - _PAYLOAD.size)
    tx = netns.netns_socket(lb.ns_left, socket.AF_PACKET, socket.SOCK_RAW, 0)
    rx = netns.netns_socket(lb.ns_right, socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETHERTYPE))
    res = ProbeResult()
    seen: set[int] = set()
    total = count + skip
    try:
        tx.bind((lb.left_if, 0))  # protocol 0: this socket receives nothing
        rx.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        rx.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, 8 << 20)
        rx.bind((lb.right_if, ETHERTYPE))
        rx.setblocking(False)
        cmsg_space = socket.CMSG_SPACE(16)

        def drain() -> None:
            while True:
                try:
                    data, anc, _flags, _addr = rx.recvmsg(256, cmsg_space)
                except BlockingIOError:
                    return
                if len(data) < 14 + _PAYLOAD.size:
                    continue
                tok, seq, stamp = _PAYLOAD.unpack_from(data, 14)
                at = _timestamp(anc)
                if tok != token or at is None:
                    continue
                if seq in seen:
                    res.duplicates += 1
                    continue
                seen.add(seq)
                if seq >= skip:
                    res.latencies_ns.append(at - stamp)

        t0 = time.monotonic()
        for seq in range(total):
            due = t0 + seq / rate
            while (left := due - time.monotonic()) > 0:
                if select.select([rx], [], [], left)[0]:
                    drain()
            tx.send(head + _PAYLOAD.pack(token, seq, time.time_ns()) + pad)
            drain()
        elapsed = time.monotonic() - t0
        res.sent = count
        res.rate_pps = total / elapsed if elapsed > 0 else 0.0
        deadline = time.monotonic() + settle
        while len(seen) < total and (left := deadline - time.monotonic()) > 0:
            if select.select([rx], [], [], left)[0]:
                drain()
    finally:
        tx.close()
        rx.close()
    return res


# --- TCP through the bridge (iperf3) -------------------------------------------------------


@dataclass
class TcpResult:
    """One iperf3 run left -> right: what the receiver got, and the sender's retransmits."""

    seconds: float
    bytes_received: int
    bits_per_second: float
    retransmits: int | None


def iperf3(lb: netns.Lab, seconds: float = 3.0, port: int = 5201) -> TcpResult:
    """TCP from left to right for `seconds` with iperf3 (the client in left, a one-off server
    in right), through whatever bridges the lab; raises NetnsError when iperf3 fails."""
    import json
    import subprocess

    server = lb.popen(lb.ns_right, "iperf3", "-s", "-1", "-p", str(port), "-B", lb.right_ip,
                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 10.0
        while True:  # until the server listens
            p = lb.exec(lb.ns_left, "iperf3", "-c", lb.right_ip, "-p", str(port), "-t", f"{seconds:g}",
                        "-J", check=False)
            try:
                report = json.loads(p.stdout)
            except ValueError:
                report = {"error": (p.stdout + p.stderr).strip()[-400:]}
            if "error" not in report or time.monotonic() > deadline or server.poll() is not None:
                break
            time.sleep(0.1)
        if "error" in report:
            raise netns.NetnsError(f"iperf3 failed: {report['error']}")
        end = report["end"]
        recv, sent = end["sum_received"], end["sum_sent"]
        return TcpResult(float(recv["seconds"]), int(recv["bytes"]), float(recv["bits_per_second"]),
                         sent.get("retransmits"))
    finally:
        if server.poll() is None:
            server.kill()
        server.wait()
