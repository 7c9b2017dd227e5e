"""End-to-end: the two TX paths of afpacket: ports (PACKET_TX_RING, the default, and sendmmsg)
say the same things: exact and in order, the kernel's size limit counted, link-down drops."""

from __future__ import annotations

import secrets
import struct
import time
from collections.abc import Callable

import pytest
from rawio import TEST_ETHERTYPE, Collector, RawPort, RunningBridge, wait_for

from nmbridge.netns import Lab

StartBridge = Callable[..., RunningBridge]

TX_PATHS = pytest.mark.parametrize("query", ["", "?tx_ring=1&tx_vnet=0", "?tx_ring=0"],
                                   ids=["ring-vnet", "ring-frags", "sendmmsg"])


def frame(dst: bytes, src: bytes, token: bytes, seq: int, size: int, tags: bytes = b"") -> bytes:
    head = dst + src + tags + struct.pack("!H", TEST_ETHERTYPE) + token + struct.pack("!I", seq)
    return head + bytes((seq + i) & 0xFF for i in range(size - len(head)))


def ends(lab: Lab) -> tuple[RawPort, RawPort, bytes, bytes]:
    return (RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if),
            lab.mac(lab.ns_left, lab.left_if), lab.mac(lab.ns_right, lab.right_if))


@pytest.mark.root
@TX_PATHS
def test_tx_paths_exact_and_in_order(lab: Lab, start_bridge: StartBridge, query: str) -> None:
    """More frames than the TX ring has frames (slots=64), both ways: all of them, in order."""
    rb = start_bridge(lab, slots=64, query=query)
    left, right, lm, rm = ends(lab)
    for src, dst, dm, sm, port in ((left, right, rm, lm, rb.right), (right, left, lm, rm, rb.left)):
        token = secrets.token_bytes(8)
        col = Collector(dst, token)
        before = port.counters()["tx_frames"]  # type: ignore[attr-defined]
        sent = [frame(dm, sm, token, i, 60 + (i * 37) % 1455) for i in range(300)]
        for f in sent:
            src.send(f)
        assert col.wait(len(sent)) == sent
        want = before + len(sent)
        wait_for(lambda p=port, w=want: p.counters()["tx_frames"] == w,  # type: ignore[attr-defined]
                 what="the port's tx_frames")
        assert port.counters()["tx_errors"] == 0  # type: ignore[attr-defined]


@pytest.mark.root
@TX_PATHS
def test_frames_over_the_mtu_are_counted_not_sent(lab: Lab, start_bridge: StartBridge, query: str) -> None:
    """The kernel's limit is MTU + 14, 4 more for an 802.1Q-tagged frame; what exceeds it is
    dropped and counted as tx_mtu (reason egress_mtu), and the frames around it still go out."""
    lab.ip(lab.ns_bridge, "link", "set", "dev", lab.bridge_right_if, "mtu", "1000")
    rb = start_bridge(lab, query=query)
    left, right, lm, rm = ends(lab)
    token = secrets.token_bytes(8)
    col = Collector(right, token)
    q = struct.pack("!HH", 0x8100, 7)
    ad = struct.pack("!HH", 0x88A8, 7)
    cases = [(60, b"", True), (1014, b"", True), (1015, b"", False), (1018, q, True),
             (1019, q, False), (1018, ad, False), (1500, b"", False), (61, b"", True)]
    sent = [frame(rm, lm, token, i, size, tags) for i, (size, tags, _) in enumerate(cases)]
    for f in sent:
        left.send(f)
    expected = [f for f, (_, _, ok) in zip(sent, cases, strict=True) if ok]
    assert col.wait(len(expected)) == expected
    wait_for(lambda: rb.right.counters()["tx_mtu"] == len(sent) - len(expected),  # type: ignore[attr-defined]
             what="tx_mtu for the frames over the MTU")
    assert rb.right.counters()["tx_errors"] == 0  # type: ignore[attr-defined]
    col.poll()
    assert col.frames == expected


@pytest.mark.root
@TX_PATHS
def test_frames_dropped_while_down_never_go_out(lab: Lab, start_bridge: StartBridge, query: str) -> None:
    """Frames counted as tx_link_down are not sent later, when the link is back."""
    rb = start_bridge(lab, query=query)
    left, right, lm, rm = ends(lab)
    probe = secrets.token_bytes(8)
    col = Collector(right, probe)
    left.send(frame(rm, lm, probe, 0, 60))
    col.wait(1)
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, False)
    token = secrets.token_bytes(8)
    dropped = Collector(RawPort(lab.ns_right, lab.right_if), token)  # a socket of its own
    for i in range(40):
        left.send(frame(rm, lm, token, i, 60))
    wait_for(lambda: rb.right.counters()["tx_link_down"] == 40,  # type: ignore[attr-defined]
             what="40 frames dropped while the link is down")
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, True)
    wait_for(lambda: lab.link(lab.ns_bridge, lab.bridge_right_if)["operstate"] == "UP",
             what="the link to be up")
    # a frame forwarded now goes out after anything still queued from before
    for seq in range(1, 250):
        left.send(frame(rm, lm, probe, seq, 60))
        time.sleep(0.02)
        if col.poll() >= 2:
            break
    assert col.poll() >= 2, "no probe got through after link-up"
    assert dropped.poll() == 0
    assert rb.right.counters()["tx_link_down"] >= 40  # type: ignore[attr-defined]
