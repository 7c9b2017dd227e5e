"""afxdp: ports opened as shares for forwarding workers (issue 16), end to end: veths with two
queues each, two shares per side (share w owns queue w), two Forwarders in two threads.

Root only; skipped where the kernel has no AF_XDP."""

from __future__ import annotations

import os
import secrets
import struct
import sys
import threading
from collections.abc import Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from rawio import Collector, RawPort, wait_for

from nmbridge import netns
from nmbridge.backends import OpenOptions, backend
from nmbridge.backends.afxdp_backend import kernel_lacks_af_xdp
from nmbridge.errors import PortError
from nmbridge.netns import Lab, in_netns
from nmbridge.port import Port, Region

_LACKS = kernel_lacks_af_xdp() if os.geteuid() == 0 else "needs root"
pytestmark = [pytest.mark.root, pytest.mark.skipif(_LACKS is not None, reason=str(_LACKS))]

FLOWS = 16  # UDP flows per direction: the sender's queue is a hash of the flow, so both get some


@pytest.fixture
def lab2() -> Iterator[Lab]:
    with netns.lab(queues=2) as lb:
        yield lb


def udp_frame(dst: bytes, src: bytes, sport: int, token: bytes, seq: int) -> bytes:
    """Ethernet + IPv4 + UDP (checksum 0: none) from 198.51.100.1:sport to 198.51.100.2:9 (no
    address of the lab: the far stack drops it without a word, so nothing else crosses), the
    token and the sequence number first in the payload."""
    payload = token + struct.pack("!I", seq) + bytes(20)
    udp = struct.pack("!HHHH", sport, 9, 8 + len(payload), 0) + payload
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), seq & 0xFFFF, 0, 64, 17, 0,
                     bytes((198, 51, 100, 1)), bytes((198, 51, 100, 2)))
    ip = ip[:10] + struct.pack("!H", netns.inet_checksum(ip)) + ip[12:]
    return dst + src + b"\x08\x00" + ip + udp


def exchange(src: RawPort, dst: RawPort, dst_mac: bytes, src_mac: bytes, n: int) -> list[bytes]:
    """n frames over FLOWS flows from src to dst; returns what was sent once all arrived, and
    checks that each arrived exactly once and in order within its flow."""
    token = secrets.token_bytes(8)
    col = Collector(dst, token)
    sent = [udp_frame(dst_mac, src_mac, 40000 + i % FLOWS, token, i) for i in range(n)]
    for i in range(0, n, 100):  # bursts of 100: the peer's per-CPU backlog holds 1000
        for f in sent[i:i + 100]:
            src.send(f)
        col.wait(i + min(100, n - i))
    col.poll()
    assert sorted(col.frames) == sorted(sent)  # each exactly once, none other
    for flow in range(FLOWS):
        sport = struct.pack("!H", 40000 + flow)
        assert [f for f in col.frames if f[34:36] == sport] == [f for f in sent if f[34:36] == sport]
    return sent


def xdp_attached(lb: Lab, ifname: str) -> bool:
    return "xdp" in lb.ip(lb.ns_bridge, "-d", "link", "show", "dev", ifname).stdout.split()


def test_two_shares_per_side_forward_every_frame_once(lab2: Lab) -> None:
    from nmbridge.fastfwd import Forwarder
    from nmbridge.stats import balance, pair_counters

    lb = lab2
    be = backend("afxdp")
    opts = OpenOptions(slots=256)
    assert in_netns(lb.ns_bridge, be.ring_pairs, lb.bridge_left_if, opts) == 2  # type: ignore[attr-defined]
    assert be.ring_pairs(f"{lb.bridge_left_if}?queues=2", opts) == 2  # type: ignore[attr-defined]
    region = Region(ports=4, rings=1, slots=256)
    left: list[Port] = in_netns(lb.ns_bridge, be.open_shares,  # type: ignore[attr-defined]
                                lb.bridge_left_if, opts, region, 2)
    right: list[Port] = []
    fwds: list[Forwarder] = []
    threads: list[threading.Thread] = []
    errors: list[BaseException] = []
    try:
        right = in_netns(lb.ns_bridge, be.open_shares, lb.bridge_right_if, opts, region, 2)  # type: ignore[attr-defined]
        assert [p.queue_ids for p in left] == [[0], [1]]  # type: ignore[attr-defined]
        assert [p.info()["queue_ids"] for p in right] == [[0], [1]]
        # one UMEM for all four: the first socket registered it, the other three share it
        assert sum(p.shared_sockets for p in left + right) == 3  # type: ignore[attr-defined]
        for w in range(2):
            fwd = Forwarder(left[w], right[w], burst=64, poll_timeout_ms=100)
            assert fwd.zerocopy
            fwds.append(fwd)

            def body(f: Forwarder = fwd) -> None:
                try:
                    f.run()
                except BaseException as e:
                    errors.append(e)

            threads.append(threading.Thread(target=body, name=f"worker-{w}", daemon=True))
            threads[-1].start()
        for fwd in fwds:
            wait_for(lambda f=fwd: f.running, what="the workers to start")
        lp, rp = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
        lm, rm = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
        try:
            a_to_b = exchange(lp, rp, rm, lm, 800)
            b_to_a = exchange(rp, lp, lm, rm, 800)
        finally:
            lp.close()
            rp.close()
        stats = [f.stats() for f in fwds]
        assert sum(s["a_to_b"]["frames"] for s in stats) == len(a_to_b)
        assert sum(s["b_to_a"]["frames"] for s in stats) == len(b_to_a)
        assert all(s["a_to_b"]["frames"] > 0 and s["b_to_a"]["frames"] > 0 for s in stats), stats
        for w in range(2):  # each share's numbers balance on their own
            for d, s in pair_counters(fwds[w], left[w], right[w]).items():
                assert balance(s) == 0, (w, d, s)
            assert left[w].counters()["rx_frames"] == stats[w]["a_to_b"]["frames"]  # type: ignore[attr-defined]
            assert right[w].counters()["rx_frames"] == stats[w]["b_to_a"]["frames"]  # type: ignore[attr-defined]
    finally:
        for fwd in fwds:
            fwd.stop()
        for t in threads:
            t.join(10)
        assert not errors, errors
        # the interface's program stays while any share is open, and goes with the last
        for p in (left[0], *right[:1]):
            p.close()
        assert xdp_attached(lb, lb.bridge_left_if)
        for p in left[1:] + right[1:]:
            p.close()
    assert not xdp_attached(lb, lb.bridge_left_if) and not xdp_attached(lb, lb.bridge_right_if)


def test_more_shares_than_queues_is_refused_and_nothing_stays(lab2: Lab) -> None:
    be = backend("afxdp")
    region = Region(ports=4, rings=1, slots=64)
    with pytest.raises(PortError, match=r"afxdp:.*cannot be split into 3 shares: it has 2 ring pairs"):
        in_netns(lab2.ns_bridge, be.open_shares, lab2.bridge_left_if,  # type: ignore[attr-defined]
                 OpenOptions(slots=64), region, 3)
    assert not xdp_attached(lab2, lab2.bridge_left_if)
    free = region.free_buffers
    # the ordinary open still binds every queue, as one port with two ring pairs
    p = in_netns(lab2.ns_bridge, be.open, lab2.bridge_left_if, OpenOptions(slots=64), region)
    try:
        assert p.queue_ids == [0, 1]  # type: ignore[attr-defined]
        assert xdp_attached(lab2, lab2.bridge_left_if)
    finally:
        p.close()
    assert region.free_buffers == free and not xdp_attached(lab2, lab2.bridge_left_if)
