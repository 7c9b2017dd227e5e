"""End-to-end: two afpacket: ports in a bridge namespace, forwarded by fastfwd.

left ns (10.77.0.1) -- veth -- [bridge ns: nmbridge] -- veth -- right ns (10.77.0.2)
"""

from __future__ import annotations

import os
import random
import secrets
import struct
import time
from collections.abc import Callable

import pytest
from rawio import TEST_ETHERTYPE, Collector, RawPort, RunningBridge, udp_both_ways, wait_for

from nmbridge import netns
from nmbridge.backends import OpenOptions, PortSet, backend, parse_spec
from nmbridge.errors import PortError
from nmbridge.netns import Lab, in_netns
from nmbridge.port import Region

StartBridge = Callable[..., RunningBridge]


# ---------------------------------------------------------------------------------------
# names (no root needed)

@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("a" * 16, "longer than 15 bytes"),
    ("eth/0", "'/'"),
    ("eth 0", "' '"),
    ("..", "not a valid"),
    ("eth0?rx_frames=1", "from 16"),
    ("eth0?bogus=1", "unknown afpacket option 'bogus'"),
    ("eth0?blocks=8", "is gone: .* rx_frames"),
    ("eth0?vnet=2", "use 0 or 1"),
])
def test_bad_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        backend("afpacket").check_name(name)


def test_good_names() -> None:
    b = backend("afpacket")
    for name in ("eth0", "veth-a.100", "a" * 15, "eth0?rx_frames=4096&rcvbuf=65536&promisc=0",
                 "eth0?rx_ring=0&vnet=0", "eth0?tx_vnet=1"):
        b.check_name(name)
    assert b.interface("eth1?rx_frames=64") == "eth1"
    assert parse_spec("afpacket:eth1").name == "eth1"


# ---------------------------------------------------------------------------------------
# helpers

def frame(dst: bytes, src: bytes, token: bytes, seq: int, size: int, *, tags: bytes = b"",
          rng: random.Random | None = None) -> bytes:
    """An Ethernet frame of exactly `size` bytes: [tags] TEST_ETHERTYPE, token, seq, filler."""
    head = dst + src + tags + struct.pack("!H", TEST_ETHERTYPE) + token + struct.pack("!I", seq)
    fill = size - len(head)
    assert fill >= 0
    r = rng or random.Random(seq)
    return head + r.randbytes(fill)


def ends(lab: Lab) -> tuple[RawPort, RawPort]:
    return RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)


def macs(lab: Lab) -> tuple[bytes, bytes]:
    return lab.mac(lab.ns_left, lab.left_if), lab.mac(lab.ns_right, lab.right_if)


def ping(lab: Lab, ns: str, dst: str, count: int = 3, timeout: float = 3.0) -> int:
    """ICMP echo through the kernel stack of `ns` (ARP included); returns replies received."""
    return sum(rtt is not None for rtt in netns.ping(ns, dst, count, timeout))


def probe_until_through(src: RawPort, dst: RawPort, dst_mac: bytes, src_mac: bytes,
                        timeout: float = 5.0) -> None:
    """Send probe frames until one arrives (the path works), then drain the receiver."""
    token = secrets.token_bytes(8)
    col = Collector(dst, token)
    deadline = time.monotonic() + timeout
    seq = 0
    while col.poll() == 0:
        if time.monotonic() > deadline:
            pytest.fail("no probe frame got through the bridge")
        src.send(frame(dst_mac, src_mac, token, seq, 60))
        seq += 1
        time.sleep(0.01)


def burst_exact(rb: RunningBridge, src: RawPort, dst: RawPort, dst_mac: bytes, src_mac: bytes,
                n: int, direction: str) -> None:
    """Send n frames; exactly those n arrive, in order, and the bridge forwarded exactly n."""
    token = secrets.token_bytes(8)
    col = Collector(dst, token)
    before = rb.fwd.stats()[direction]["frames"]  # type: ignore[attr-defined]
    sent = [frame(dst_mac, src_mac, token, i, 60 + i % 200) for i in range(n)]
    for f in sent:
        src.send(f)
    got = col.wait(n)
    wait_for(lambda: rb.fwd.stats()[direction]["frames"] - before >= n,  # type: ignore[attr-defined]
             what="the forwarder's count")
    col.poll()
    assert got == sent
    assert rb.fwd.stats()[direction]["frames"] - before == n  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------
# end to end (root)

@pytest.mark.root
def test_missing_interface_is_one_clear_line(lab: Lab) -> None:
    region = Region(ports=2, slots=64)
    with pytest.raises(PortError) as e:
        in_netns(lab.ns_bridge, backend("afpacket").open, "nmbnosuch0", OpenOptions(slots=64), region)
    assert str(e.value) == "afpacket:nmbnosuch0: no such interface"


@pytest.mark.root
def test_failed_open_leaves_nothing_changed(lab: Lab) -> None:
    """An open that fails on the second port closes the first: promiscuity back to 0."""
    ps = PortSet(OpenOptions(slots=64))
    specs = [parse_spec(f"afpacket:{lab.bridge_left_if}"), parse_spec("afpacket:nmbnosuch0")]
    with pytest.raises(PortError, match=r"^afpacket:nmbnosuch0: no such interface$"):
        in_netns(lab.ns_bridge, ps.open, specs)
    assert ps.ports == []
    assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 0


@pytest.mark.root
def test_open_sets_promisc_while_open(lab: Lab) -> None:
    ps = PortSet(OpenOptions(slots=64))
    in_netns(lab.ns_bridge, ps.open, [parse_spec(f"afpacket:{lab.bridge_left_if}")])
    try:
        assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 1
    finally:
        ps.close()
    assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 0


@pytest.mark.root
def test_arp_and_ping_both_ways(lab: Lab, start_bridge: StartBridge) -> None:
    rb = start_bridge(lab)
    assert ping(lab, lab.ns_left, lab.right_ip) == 3
    assert ping(lab, lab.ns_right, lab.left_ip) == 3
    # ARP resolved each side to the other's real MAC, through the bridge
    left_mac, right_mac = macs(lab)
    neigh = lab.ip(lab.ns_left, "neigh", "show", lab.right_ip).stdout
    assert right_mac.hex(":") in neigh
    neigh = lab.ip(lab.ns_right, "neigh", "show", lab.left_ip).stdout
    assert left_mac.hex(":") in neigh
    st = rb.fwd.stats()  # type: ignore[attr-defined]
    assert st["a_to_b"]["frames"] >= 4 and st["b_to_a"]["frames"] >= 4


@pytest.mark.root
@pytest.mark.parametrize(("query", "counter"), [("", "rx_csum_passed"), ("?rx_ring=0", "rx_csum_passed"),
                                                ("?vnet=0", "rx_csum_fixed"),
                                                ("?rx_ring=0&vnet=0", "rx_csum_fixed")])
def test_udp_both_ways(lab: Lab, start_bridge: StartBridge, query: str, counter: str) -> None:
    """Datagrams from the kernel stacks (CHECKSUM_PARTIAL on veth: the request travels to the
    egress port's kernel in a virtio-net header) arrive intact both ways, including one the IP
    layer fragments.  Without the header (vnet=0) the backend finishes the checksum itself."""
    rb = start_bridge(lab, query=query)
    udp_both_ways(lab)
    done = rb.left.counters()[counter] + rb.right.counters()[counter]  # type: ignore[attr-defined]
    assert done >= 1


@pytest.mark.root
@pytest.mark.parametrize("query", ["", "?rx_ring=0", "?busy_poll=2000"])
def test_exact_counts_for_a_burst(lab: Lab, start_bridge: StartBridge, query: str) -> None:
    """Both receive paths, and busy polling between bursts, count every frame."""
    rb = start_bridge(lab, query=query)
    left, right = ends(lab)
    lm, rm = macs(lab)
    burst_exact(rb, left, right, rm, lm, 3000, "a_to_b")
    burst_exact(rb, right, left, lm, rm, 3000, "b_to_a")
    for p in (rb.left, rb.right):
        c = p.counters()  # type: ignore[attr-defined]
        assert c["rx_kernel_drops"] == 0 and c["rx_truncated"] == 0 and c["tx_errors"] == 0


@pytest.mark.root
@pytest.mark.parametrize("mtu, buf_size", [(1500, 2048), (1500, 1024), (9000, 2048)],
                         ids=["mtu1500-1slot", "mtu1500-chains", "mtu9000-chains"])
def test_every_size_byte_for_byte(start_bridge: StartBridge, mtu: int, buf_size: int) -> None:
    """60 bytes up to MTU + 14, both ways, intact and in order; larger than a buffer = chains."""
    with netns.lab(mtu=mtu) as lb:
        rb = start_bridge(lb, buf_size=buf_size)
        left, right = ends(lb)
        lm, rm = macs(lb)
        top = mtu + 14
        sizes = sorted(s for s in {60, 61, 63, 64, 65, 127, 128, 129, 255, 256, 511, 512, 1000,
                                   buf_size - 1, buf_size, buf_size + 1, 2 * buf_size + 1,
                                   top - 1, top} if s <= top)
        rng = random.Random(mtu + buf_size)
        for src, dst, dm, sm in ((left, right, rm, lm), (right, left, lm, rm)):
            token = secrets.token_bytes(8)
            col = Collector(dst, token)
            sent = [frame(dm, sm, token, i, size, rng=rng) for i, size in enumerate(sizes)]
            for f in sent:
                src.send(f)
            assert col.wait(len(sent)) == sent
        if buf_size < top:
            st = rb.fwd.stats()  # type: ignore[attr-defined]
            assert st["a_to_b"]["broken_chain"] == 0 and st["a_to_b"]["oversize"] == 0


@pytest.mark.root
@pytest.mark.parametrize("query", ["", "?rx_ring=0"])
def test_jumbo_bursts_into_a_small_ring(start_bridge: StartBridge, query: str) -> None:
    """Frames of 4 slots each into 64-slot rings: most of the time the next frame finds too
    little room and waits (in the kernel's ring, or received and pending in the port); every
    one still arrives, whole and in order, and none is counted lost."""
    with netns.lab(mtu=9000) as lb:
        rb = start_bridge(lb, slots=64, burst=16, query=query)
        left, right = ends(lb)
        lm, rm = macs(lb)
        rng = random.Random(7)
        token = secrets.token_bytes(8)
        col = Collector(right, token)
        sent = [frame(rm, lm, token, i, rng.randrange(6000, 8014), rng=rng) for i in range(300)]
        for i in range(0, len(sent), 50):  # 50 at a time: the kernel's backlog holds them all
            for f in sent[i:i + 50]:
                left.send(f)
            col.wait(i + 50)
        assert col.wait(len(sent)) == sent
        c = rb.left.counters()  # type: ignore[attr-defined]
        assert c["rx_kernel_drops"] == c["rx_truncated"] == c["rx_oversize"] == 0
        assert rb.fwd.stats()["a_to_b"]["frames"] == len(sent)  # type: ignore[attr-defined]


@pytest.mark.root
def test_vlan_tags_pass_through(lab: Lab, start_bridge: StartBridge) -> None:
    """802.1Q, a priority tag (VID 0), 802.1ad and QinQ: the receive path moves the outer tag
    into metadata; the bridge must put it back."""
    rb = start_bridge(lab)
    left, right = ends(lab)
    lm, rm = macs(lab)
    token = secrets.token_bytes(8)
    col = Collector(right, token)
    tags = [
        struct.pack("!HH", 0x8100, (3 << 13) | 100),
        struct.pack("!HH", 0x8100, (5 << 13) | 0),
        struct.pack("!HH", 0x88A8, 200),
        struct.pack("!HHHH", 0x88A8, 300, 0x8100, 42),
        struct.pack("!HH", 0x8100, 4094),
    ]
    # the kernel lets a sender exceed the MTU by 4 bytes only for an 802.1Q outer tag
    sent = [frame(rm, lm, token, i, size, tags=t) for i, t in enumerate(tags)
            for size in (64, 1518 if t[:2] == b"\x81\x00" else 1514)]
    for f in sent:
        left.send(f)
    assert col.wait(len(sent)) == sent
    assert rb.left.counters()["rx_vlan_restored"] == len(sent)  # type: ignore[attr-defined]


@pytest.mark.root
def test_link_down_and_up_mid_run(lab: Lab, start_bridge: StartBridge) -> None:
    """Frames for a port whose link is down are counted and dropped; the forwarder keeps
    running and both directions work again once the link is back."""
    rb = start_bridge(lab)
    left, right = ends(lab)
    lm, rm = macs(lab)
    probe_until_through(left, right, rm, lm)
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, False)
    token = secrets.token_bytes(8)
    for i in range(50):
        left.send(frame(rm, lm, token, i, 60))
    wait_for(lambda: rb.right.counters()["tx_link_down"] == 50,  # type: ignore[attr-defined]
             what="50 frames dropped while the link is down")
    assert rb.fwd.running and rb.thread.is_alive()  # type: ignore[attr-defined]
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, True)
    probe_until_through(left, right, rm, lm)
    probe_until_through(right, left, lm, rm)
    burst_exact(rb, left, right, rm, lm, 500, "a_to_b")
    burst_exact(rb, right, left, lm, rm, 500, "b_to_a")


@pytest.mark.root
def test_no_namespace_left_behind() -> None:
    with netns.lab() as lb:
        names = lb.namespaces
        assert all(os.path.exists(f"/run/netns/{n}") for n in names)
    assert not any(os.path.exists(f"/run/netns/{n}") for n in names)
