"""afpacket: ports opened as shares of one PACKET_FANOUT group, end to end in a netns lab
(root), without the app: share w of the left port and share w of the right port are
forwarded by Forwarder w in a thread of its own, as the app's workers do.

left ns -- veth (2 queues) -- [bridge ns: shares of bl <-> shares of br] -- veth -- right ns
"""

from __future__ import annotations

import secrets
import socket
import struct
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from rawio import ROOT, TEST_ETHERTYPE, Collector, RawPort, wait_for

from nmbridge import netns
from nmbridge.accounting import pair_directions
from nmbridge.backends import OpenOptions, backend, close_all
from nmbridge.backends.afpacket import AfPacketPort
from nmbridge.netns import Lab, in_netns
from nmbridge.port import Port, Region

pytestmark = pytest.mark.root

FLOWS = 32  # UDP flows per direction: with 2 shares, all on one share has odds 2**-31
PER_FLOW = 20


@pytest.fixture
def lab2() -> Iterator[Lab]:
    """A lab whose veths have 2 TX and 2 RX queues."""
    with netns.lab(queues=2) as lb:
        yield lb


@dataclass
class Workers:
    """Shares of both bridge ports and one Forwarder per share pair, each in a thread."""

    a: list[Port]
    b: list[Port]
    fwds: list[Any]
    threads: list[threading.Thread] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)

    def directions(self, w: int) -> dict[str, dict[str, Any]]:
        return {k: dict(v) for k, v in pair_directions(self.fwds[w].snapshot(), self.a[w], self.b[w]).items()}


def open_shares(lb: Lab, ifname: str, region: Region, n: int, query: str = "",
                slots: int = 256) -> list[Port]:
    opener = backend("afpacket").open_shares  # type: ignore[attr-defined]
    ports: list[Port] = in_netns(lb.ns_bridge, opener, ifname + query, OpenOptions(slots=slots), region, n)
    return ports


@contextmanager
def workers(lb: Lab, n: int = 2, query: str = "", slots: int = 256) -> Iterator[Workers]:
    from nmbridge.fastfwd import Forwarder

    region = Region(ports=2 * n, slots=slots)
    a = open_shares(lb, lb.bridge_left_if, region, n, query, slots)
    try:
        b = open_shares(lb, lb.bridge_right_if, region, n, query, slots)
    except BaseException:
        close_all(a)
        raise
    w = Workers(a, b, [Forwarder(x, y, burst=64, poll_timeout_ms=50) for x, y in zip(a, b, strict=True)])

    def body(fwd: Any) -> None:
        try:
            fwd.run()
        except BaseException as e:
            w.errors.append(e)

    try:
        for i, fwd in enumerate(w.fwds):
            t = threading.Thread(target=body, args=(fwd,), name=f"worker-{i}", daemon=True)
            w.threads.append(t)
            t.start()
        for fwd in w.fwds:
            wait_for(lambda f=fwd: f.running, what="the workers to start")
        yield w
        assert all(t.is_alive() for t in w.threads), "a worker stopped by itself"
    finally:
        for fwd in w.fwds:
            fwd.stop()
        for t in w.threads:
            t.join(10)
        close_all([*a, *b])
    assert not w.errors, f"a worker failed: {w.errors[0]}"


def udp_frame(dst: bytes, src: bytes, sip: str, dip: str, sport: int, token: bytes, flow: int,
              seq: int) -> bytes:
    """An Ethernet/IPv4/UDP frame of flow `flow` (source port `sport`), payload token, flow, seq.
    `dip` is no address of the lab: the far stack drops it without a reply (no forwarding)."""
    payload = token + struct.pack("!HI", flow, seq) + bytes(8)
    udp = struct.pack("!HHHH", sport, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 64, 17, 0,
                     socket.inet_aton(sip), socket.inet_aton(dip))
    ip = ip[:10] + struct.pack("!H", netns.inet_checksum(ip)) + ip[12:]
    return dst + src + b"\x08\x00" + ip + udp


def flow_seqs(frames: list[bytes], token: bytes) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for f in frames:
        at = f.index(token) + len(token)
        flow, seq = struct.unpack_from("!HI", f, at)
        out.setdefault(flow, []).append(seq)
    return out


def balanced_and_idle(w: Workers) -> list[dict[str, dict[str, Any]]]:
    """Each worker's directions once nothing is queued and two reads agree."""
    last: list[list[dict[str, dict[str, Any]]]] = [[w.directions(i) for i in range(len(w.fwds))]]

    def idle() -> bool:
        cur = [w.directions(i) for i in range(len(w.fwds))]
        done = cur == last[0] and all(d["queued"] == 0 for ds in cur for d in ds.values())
        last[0] = cur
        return done

    wait_for(idle, 20.0, "every worker to be idle (nothing queued)")
    for ds in last[0]:
        for d in ds.values():  # per share, to the frame: received = forwarded + dropped + queued
            assert d["received"] == d["forwarded"] + sum(d["dropped"].values()) + d["queued"], d
    return last[0]


@pytest.mark.parametrize("mode, ordered", [("hash", True), ("qm", True), ("lb", False),
                                           ("hash&rx_ring=0&tx_ring=0", True)])
def test_two_shares_carry_every_frame_once(lab2: Lab, mode: str, ordered: bool) -> None:
    """Several UDP flows both ways through 2 workers: every frame arrives exactly once, in
    order within its flow (hash, qm: a flow stays on one share), both shares carry some,
    and each share's counters balance on their own."""
    lb = lab2
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    tok_lr, tok_rl = secrets.token_bytes(8), secrets.token_bytes(8)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    try:
        with workers(lb, 2, f"?fanout={mode}") as w:
            at_right, at_left = Collector(right, tok_lr), Collector(left, tok_rl)
            for seq in range(PER_FLOW):
                for flow in range(FLOWS):
                    left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + flow, tok_lr,
                                        flow, seq))
                    right.send(udp_frame(lmac, rmac, lb.right_ip, "10.77.0.201", 30000 + flow, tok_rl,
                                         flow, seq))
            total = FLOWS * PER_FLOW
            at_right.wait(total, 20.0)
            at_left.wait(total, 20.0)
            dirs = balanced_and_idle(w)
            # nothing more comes (a duplicate would come with the rest)
            assert at_right.poll() == total and at_left.poll() == total
        for got in (flow_seqs(at_right.frames, tok_lr), flow_seqs(at_left.frames, tok_rl)):
            assert sorted(got) == list(range(FLOWS))
            for flow, seqs in got.items():
                assert sorted(seqs) == list(range(PER_FLOW)), (flow, seqs)  # each exactly once
                if ordered:
                    assert seqs == list(range(PER_FLOW)), (flow, seqs)
        for d in ("a_to_b", "b_to_a"):
            per_share = [ds[d]["forwarded"] for ds in dirs]
            assert all(n > 0 for n in per_share), (d, per_share)
            assert sum(per_share) >= total, (d, per_share)
            assert all(ds[d]["dropped"] == {} or not any(ds[d]["dropped"].values()) for ds in dirs), dirs
    finally:
        left.close()
        right.close()


def test_shares_of_a_port_share_one_group_unique_in_the_namespace(lab2: Lab) -> None:
    """The kernel picks each group's id: the shares of a port have one, another port's
    differs, and so does a second opening of the same interface while the first still holds
    its group (a restarted bridge whose old sockets linger never joins the old group)."""
    lb = lab2
    region = Region(ports=8, slots=64)
    opened: list[Port] = []
    try:
        a = open_shares(lb, lb.bridge_left_if, region, 3, slots=64)
        opened += a
        b = open_shares(lb, lb.bridge_right_if, region, 2, slots=64)
        opened += b
        again = open_shares(lb, lb.bridge_left_if, region, 2, slots=64)
        opened += again
        ga = {p.fanout_group for p in a}  # type: ignore[attr-defined]
        gb = {p.fanout_group for p in b}  # type: ignore[attr-defined]
        gagain = {p.fanout_group for p in again}  # type: ignore[attr-defined]
        assert len(ga) == len(gb) == len(gagain) == 1 and None not in ga | gb | gagain
        assert len(ga | gb | gagain) == 3
        one = open_shares(lb, lb.bridge_right_if, region, 1, slots=64)
        opened += one
        assert one[0].fanout_group is None  # type: ignore[attr-defined]
    finally:
        close_all(opened)


def test_shares_split_the_default_rx_ring(lab2: Lab) -> None:
    """N shares cost about one port's RX ring: 8 MiB / N each (1 MiB at least); rx_frames=
    sizes each share's ring; one share is a plain port (8 MiB)."""
    lb = lab2
    region = Region(ports=9, slots=64)
    opened: list[Port] = []
    try:
        one = open_shares(lb, lb.bridge_left_if, region, 1, slots=64)
        two = open_shares(lb, lb.bridge_left_if, region, 2, slots=64)
        many = open_shares(lb, lb.bridge_right_if, region, 4, slots=64)
        sized = open_shares(lb, lb.bridge_right_if, region, 2, "?rx_frames=1024", slots=64)
        opened += [*one, *two, *many, *sized]
        rx = [[p.ring_bytes[0] for p in g] for g in (one, two, many, sized)]  # type: ignore[attr-defined]
        assert rx == [[8 << 20], [4 << 20] * 2, [2 << 20] * 4, [2 << 20] * 2]  # 2 KiB frames (MTU 1500)
    finally:
        close_all(opened)


def test_a_share_receives_nothing_until_started(lab2: Lab) -> None:
    """A share is held (it takes no frame) until fanout_start(): a socket bound but not yet
    in its group would otherwise receive frames the group also hands out."""
    lb = lab2
    region = Region(ports=2, slots=64)
    held = in_netns(lb.ns_bridge, AfPacketPort, region, lb.bridge_left_if, slots=64, fanout=0)
    witness = in_netns(lb.ns_bridge, AfPacketPort, region, lb.bridge_left_if, slots=64)
    left = RawPort(lb.ns_left, lb.left_if)
    lmac = lb.mac(lb.ns_left, lb.left_if)
    tok = secrets.token_bytes(8)

    def received(p: AfPacketPort) -> int:
        p.rxsync()
        return p.counters()["rx_frames"]

    try:
        for seq in range(10):
            left.send(udp_frame(b"\xff" * 6, lmac, lb.left_ip, "10.77.0.200", 20000, tok, 0, seq))
        # the kernel hands a frame to every tap in one pass: once the witness has them all,
        # the held share has had its chance
        wait_for(lambda: received(witness) >= 10, what="the witness to receive 10 frames")
        assert received(held) == 0
        held.fanout_start()
        for seq in range(10, 20):
            left.send(udp_frame(b"\xff" * 6, lmac, lb.left_ip, "10.77.0.200", 20000, tok, 0, seq))
        wait_for(lambda: received(held) >= 10, what="the started share to receive 10 frames")
    finally:
        left.close()
        held.close()
        witness.close()


def legacy_shares(lb: Lab, region: Region) -> list[Port]:
    """Two shares of a group made as Linux < 6.2 makes them (no IGNORE_OUTGOING flag); the
    second share asks for the flag, is refused, and joins without it."""
    def body() -> list[Port]:
        first = AfPacketPort(region, lb.bridge_left_if, slots=64, fanout=0, fanout_legacy=True)
        try:
            second = AfPacketPort(region, lb.bridge_left_if, slots=64, fanout=0,
                                  fanout_group=first.fanout_group if first.fanout_group is not None else -2)
        except BaseException:
            first.close()
            raise
        for p in (first, second):
            p.fanout_start()
        return [first, second]

    return in_netns(lb.ns_bridge, body)


@pytest.mark.parametrize("legacy", [False, True])
def test_shares_ignore_outgoing_frames(lab2: Lab, legacy: bool) -> None:
    """A socket's own PACKET_IGNORE_OUTGOING does not apply in a fanout group; the group's
    flag does (or, on Linux < 6.2, each share's filter): frames sent out of the interface
    (by the local stack, or by a share's GSO socket) never come back in as received frames."""
    lb = lab2
    region = Region(ports=2, slots=64)
    shares = legacy_shares(lb, region) if legacy else open_shares(lb, lb.bridge_left_if, region, 2, slots=64)
    out = netns.netns_socket(lb.ns_bridge, socket.AF_PACKET, socket.SOCK_RAW, 0)
    left = RawPort(lb.ns_left, lb.left_if)
    tok = secrets.token_bytes(8)
    try:
        out.bind((lb.bridge_left_if, 0))
        lmac = lb.mac(lb.ns_left, lb.left_if)
        bmac = lb.mac(lb.ns_bridge, lb.bridge_left_if)
        for seq in range(16):  # a type no stack answers (an IPv4 frame made left's ARP)
            out.send(lmac + bmac + struct.pack("!H", TEST_ETHERTYPE) + tok + struct.pack("!I", seq)
                     + bytes(34))
        Collector(left, tok).wait(16)  # they went out (and past every tap of bl)
        for p in shares:
            p.rxsync()
            assert p.counters()["rx_frames"] == 0  # type: ignore[attr-defined]
    finally:
        out.close()
        left.close()
        close_all(shares)


def test_shares_carry_traffic_again_after_the_link_went_down_and_up(lab2: Lab) -> None:
    """The kernel takes a share out of its group while the interface is down and puts it
    back when it comes up: traffic goes through every share again."""
    lb = lab2
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    tok = secrets.token_bytes(8)
    try:
        with workers(lb, 2) as w:
            lb.set_up(lb.ns_bridge, lb.bridge_left_if, False)
            lb.set_up(lb.ns_bridge, lb.bridge_left_if, True)
            wait_for(lambda: lb.link(lb.ns_left, lb.left_if)["operstate"] == "UP", what="the link to be up")
            before = [ds["a_to_b"]["forwarded"] for ds in balanced_and_idle(w)]
            at_right = Collector(right, tok)
            for flow in range(FLOWS):
                left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + flow, tok, flow, 0))
            at_right.wait(FLOWS, 10.0)
            after = [ds["a_to_b"]["forwarded"] for ds in balanced_and_idle(w)]
        assert sorted(flow_seqs(at_right.frames, tok)) == list(range(FLOWS))
        assert all(y > x for x, y in zip(before, after, strict=True)), (before, after)
    finally:
        left.close()
        right.close()


def test_tcp_with_offloads_through_two_shares(lab2: Lab) -> None:
    """TCP connections from left's stack (TSO/GSO on: super-frames) through 2 workers: each
    share sends its super-frames through its own GSO socket, and every byte arrives."""
    lb = lab2
    conns, size = 16, 256 << 10
    srv = netns.netns_socket(lb.ns_right, socket.AF_INET, socket.SOCK_STREAM)
    srv.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    srv.bind((lb.right_ip, 5301))
    srv.listen(conns)
    srv.settimeout(20)
    got: dict[int, bytes] = {}
    data = secrets.token_bytes(size)

    def serve() -> None:
        for _ in range(conns):
            c, (_, port) = srv.accept()
            with c:
                c.settimeout(20)
                buf = bytearray()
                while chunk := c.recv(1 << 16):
                    buf += chunk
                got[port] = bytes(buf)

    try:
        with workers(lb, 2) as w:
            t = threading.Thread(target=serve, daemon=True)
            t.start()
            for _ in range(conns):
                c = netns.netns_socket(lb.ns_left, socket.AF_INET, socket.SOCK_STREAM)
                with c:
                    c.settimeout(20)
                    c.connect((lb.right_ip, 5301))
                    c.sendall(data)
            t.join(30)
            assert not t.is_alive()
            balanced_and_idle(w)
            tx_gso = [p.counters()["tx_gso"] for p in w.b]  # type: ignore[attr-defined]
        assert len(got) == conns and all(v == data for v in got.values())
        assert all(n > 0 for n in tx_gso), tx_gso
    finally:
        srv.close()


def test_ring_pairs_is_the_rx_queue_count(lab2: Lab) -> None:
    opts = OpenOptions()
    b = backend("afpacket")
    # a thread in the namespace: sysfs is this namespace's, so ethtool answers
    assert in_netns(lab2.ns_bridge, b.ring_pairs, lab2.bridge_left_if, opts) == 2  # type: ignore[attr-defined]
    # a process in the namespace (ip netns exec remounts sysfs): sysfs answers
    code = (f"import sys; sys.path.insert(0, {str(ROOT)!r}); "
            "from nmbridge.backends import OpenOptions, backend; "
            "print(backend('afpacket').ring_pairs(sys.argv[1], OpenOptions()))")
    done = lab2.exec(lab2.ns_bridge, sys.executable, "-c", code, lab2.bridge_left_if)
    assert done.stdout.strip() == "2"
    with netns.lab() as one:  # the kernel's default veth: 1 queue in use
        assert in_netns(one.ns_bridge, b.ring_pairs, one.bridge_left_if, opts) == 1  # type: ignore[attr-defined]



def test_shares_of_an_interface_that_is_down(lab2: Lab) -> None:
    """Linux 6.13 and later join a socket bound to an interface that is down to a group (it
    starts receiving when the link comes up); older kernels refuse: one line says so."""
    from nmbridge.errors import PortError

    lb = lab2
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    lb.set_up(lb.ns_bridge, lb.bridge_left_if, False)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    tok = secrets.token_bytes(8)
    try:
        with workers(lb, 2) as w:
            lb.set_up(lb.ns_bridge, lb.bridge_left_if, True)
            wait_for(lambda: lb.link(lb.ns_left, lb.left_if)["operstate"] == "UP", what="the link to be up")
            at_right = Collector(right, tok)
            for flow in range(FLOWS):
                left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + flow, tok, flow, 0))
            at_right.wait(FLOWS, 10.0)
            per_share = [ds["a_to_b"]["forwarded"] for ds in balanced_and_idle(w)]
        assert all(n > 0 for n in per_share), per_share
    except PortError as e:
        assert str(e) == (f"afpacket:{lb.bridge_left_if}: PACKET_FANOUT: Invalid argument "
                          "(is the interface up?) (share 0 of 2)")
    finally:
        left.close()
        right.close()
