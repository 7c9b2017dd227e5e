"""End-to-end: a filter on a pair of afpacket: ports drops exactly the frames its rules name.

left ns -- veth -- [bridge ns: nmbridge, filter on a_to_b] -- veth -- right ns

Crafted frames go to the right end's real MAC but to IP addresses nobody owns, so no kernel
answers them and the only traffic is the test's (the lab runs with IPv6 off and sends
nothing by itself).  Every test frame carries a per-test source MAC, which is how the
receiving end tells them from anything else.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable

import pytest
from rawio import Collector, RawPort, RunningBridge, wait_for
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Packet

from nmbridge.filters import FilterConfig, RuleConfig, compile_filter
from nmbridge.netns import Lab

StartBridge = Callable[..., RunningBridge]

FILTER = FilterConfig("e2e", "pass", (
    RuleConfig("ssh", "drop", {"ip_proto": "tcp", "dst_port": 22}),
    RuleConfig("vlan100", "drop", {"vlan_id": 100}),
    RuleConfig("arp-dns", "drop", pcap="arp or udp port 53"),
))

# name -> (which rule drops it, or None when it passes)
EXPECTED: dict[str, str | None] = {
    "tcp22": "ssh",
    "tcp80": None,
    "udp53": "arp-dns",
    "arp": "arp-dns",
    "vlan100-tcp80": "vlan100",
    # tcpdump's `udp port 53` looks at untagged frames only: a tagged DNS query passes
    "vlan200-udp53": None,
    "ip6-udp53": "arp-dns",
    "ip6-tcp22": "ssh",
    "ip6-tcp443": None,
    "qinq-tcp22": "ssh",  # structured fields look through any number of tags
}


def crafted(dst: bytes, src: bytes) -> dict[str, bytes]:
    """One frame per EXPECTED name, padded to the 60-byte minimum."""
    eth = Ether(dst=dst.hex(":"), src=src.hex(":"))
    v4 = IP(src="10.200.0.1", dst="10.200.0.2")  # owned by nobody in the lab
    v6 = IPv6(src="fd00:200::1", dst="fd00:200::2")
    pkts: dict[str, Packet] = {
        "tcp22": eth / v4 / TCP(sport=40000, dport=22),
        "tcp80": eth / v4 / TCP(sport=40001, dport=80),
        "udp53": eth / v4 / UDP(sport=40002, dport=53),
        "arp": eth / ARP(op=1, hwsrc=src.hex(":"), psrc="10.200.0.1", pdst="10.200.0.9"),
        "vlan100-tcp80": eth / Dot1Q(vlan=100, prio=3) / v4 / TCP(sport=40003, dport=80),
        "vlan200-udp53": eth / Dot1Q(vlan=200) / v4 / UDP(sport=40004, dport=53),
        "ip6-udp53": eth / v6 / UDP(sport=40005, dport=53),
        "ip6-tcp22": eth / v6 / TCP(sport=40006, dport=22),
        "ip6-tcp443": eth / v6 / TCP(sport=40007, dport=443),
        "qinq-tcp22": eth / Dot1Q(type=0x8100, vlan=300) / Dot1Q(vlan=7) / v4 / TCP(dport=22),
    }
    assert pkts.keys() == EXPECTED.keys()
    out = {}
    for name, pkt in pkts.items():
        raw = bytes(pkt)
        out[name] = raw + bytes(max(0, 60 - len(raw)))
    # the 802.1ad outer tag: scapy writes 0x8100 for both tags above; make the outer one an S-tag
    q = out["qinq-tcp22"]
    out["qinq-tcp22"] = q[:12] + b"\x88\xa8" + q[14:]
    return out


def local_mac() -> bytes:
    """A random locally administered unicast MAC: this test's marker."""
    return bytes([0x02]) + secrets.token_bytes(5)


@pytest.mark.root
def test_filter_on_afpacket_drops_exactly_what_it_names(lab: Lab, start_bridge: StartBridge) -> None:
    rb = start_bridge(lab)
    flt = compile_filter(FILTER)
    rb.fwd.set_filter("a_to_b", flt)  # type: ignore[attr-defined]
    left = RawPort(lab.ns_left, lab.left_if)
    right = RawPort(lab.ns_right, lab.right_if)
    try:
        left_mac = lab.mac(lab.ns_left, lab.left_if)
        right_mac = lab.mac(lab.ns_right, lab.right_if)

        # a_to_b: three rounds of the mix, in a different order each round
        src = local_mac()
        frames = crafted(right_mac, src)
        names = list(EXPECTED)
        order = names + names[::-1] + names[1::2] + names[0::2]
        sent = [frames[n] for n in order]
        passing = [frames[n] for n in order if EXPECTED[n] is None]
        dropped: dict[str, int] = {r.name: 0 for r in FILTER.rules}
        for n in order:
            rule = EXPECTED[n]
            if rule is not None:
                dropped[rule] += 1
        # the offline evaluation (same C code) agrees with the table above
        for n in names:
            verdict, index = flt.evaluate(frames[n])
            rule = None if index is None else FILTER.rules[index].name
            assert (verdict, rule) == ("pass" if EXPECTED[n] is None else "drop", EXPECTED[n]), n

        col = Collector(right, src)
        before = rb.fwd.stats()["a_to_b"]  # type: ignore[attr-defined]
        for f in sent:
            left.send(f)
        # every frame has been decided once forwarded + filtered reaches the count sent
        wait_for(lambda: (rb.fwd.stats()["a_to_b"]["frames"] + rb.fwd.stats()["a_to_b"]["filtered"]  # type: ignore[attr-defined]
                          - before["frames"] - before["filtered"]) >= len(sent),
                 what="the forwarder to decide every frame")
        got = col.wait(len(passing))
        after = rb.fwd.stats()["a_to_b"]  # type: ignore[attr-defined]
        assert got == passing  # byte for byte, in order, nothing else
        assert after["frames"] - before["frames"] == len(passing)
        assert after["filtered"] - before["filtered"] == sum(dropped.values())
        assert flt.hits() == {**dropped, "default": len(passing)}

        # b_to_a has no filter: the same kinds of frames all go through
        src_b = local_mac()
        back = list(crafted(left_mac, src_b).values())
        col_b = Collector(left, src_b)
        before_b = rb.fwd.stats()["b_to_a"]  # type: ignore[attr-defined]
        for f in back:
            right.send(f)
        assert col_b.wait(len(back)) == back
        after_b = rb.fwd.stats()["b_to_a"]  # type: ignore[attr-defined]
        assert after_b["frames"] - before_b["frames"] == len(back)
        assert after_b["filtered"] == before_b["filtered"] == 0
        # and nothing of it reached a_to_b's filter
        assert flt.hits() == {**dropped, "default": len(passing)}
        col.poll()
        assert col.frames == passing
    finally:
        left.close()
        right.close()
