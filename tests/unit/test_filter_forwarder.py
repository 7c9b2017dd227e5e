"""A compiled filter installed on a Forwarder between mem: ports drops exactly what it names."""

from __future__ import annotations

import gc

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether

from nmbridge.backends.mem import MemPort
from nmbridge.fastfwd import Forwarder
from nmbridge.filters import FilterConfig, RuleConfig, compile_filter
from nmbridge.port import Region


def pump(fwd: Forwarder, src: MemPort) -> None:
    """Step until everything injected has gone through (bounded: never loops forever)."""
    for _ in range(100):
        fwd.step()
        if src.pending == 0 and fwd.step() == 0:
            return
    raise AssertionError("frames still pending after 100 steps")


def test_filter_drops_exactly_what_it_names() -> None:
    region = Region(ports=2, slots=64)
    a = MemPort(region, "fa", slots=64)
    b = MemPort(region, "fb", slots=64)
    fwd = Forwarder(a, b, burst=16)
    flt = compile_filter(FilterConfig("f", "pass", (
        RuleConfig("keep-ssh", "pass", {"dst_port": 22}),
        RuleConfig("no-tcp", "drop", {"ip_proto": "tcp"}),
        RuleConfig("no-arp", "drop", pcap="arp"),
    )))
    fwd.set_filter("a_to_b", flt)
    frames = {
        "ssh": bytes(Ether() / IP() / TCP(dport=22)),
        "web": bytes(Ether() / IP() / TCP(dport=80)),
        "arp": bytes(Ether() / ARP()),
        "dns": bytes(Ether() / Dot1Q(vlan=7) / IP() / UDP(dport=53)),
        "runt": b"\x01\x02",
        # larger than a 2048-byte buffer: an NS_MOREFRAG chain, decided by its first slot
        "big-web": bytes(Ether() / IP() / TCP(dport=80)) + bytes(3000),
        "big-dns": bytes(Ether() / IP() / UDP(dport=53)) + bytes(3000),
    }
    order = ["ssh", "web", "arp", "dns", "web", "runt", "big-web", "big-dns", "arp", "ssh"]
    for name in order:
        a.inject(frames[name])
    backwards = bytes(Ether() / IP() / TCP(dport=80))
    b.inject(backwards)  # b_to_a has no filter
    pump(fwd, a)
    passed = [frames[n] for n in order if n in ("ssh", "dns", "runt", "big-dns")]
    assert b.collect() == passed
    assert a.collect() == [backwards]
    st = fwd.stats()
    assert st["a_to_b"]["filtered"] == 5
    assert st["a_to_b"]["frames"] == 5
    assert st["b_to_a"]["filtered"] == 0 and st["b_to_a"]["frames"] == 1
    assert flt.hits() == {"keep-ssh": 2, "no-tcp": 3, "no-arp": 2, "default": 3}
    region.check()


def test_filter_replaced_and_removed() -> None:
    region = Region(ports=2, slots=64)
    a = MemPort(region, "ga", slots=64)
    b = MemPort(region, "gb", slots=64)
    fwd = Forwarder(a, b, direction="a-to-b")
    udp = bytes(Ether() / IP() / UDP(dport=53))
    fwd.set_filter("a_to_b", compile_filter(FilterConfig("all", "drop")))
    gc.collect()  # the forwarder keeps the compiled filter alive
    a.inject(udp)
    pump(fwd, a)
    assert b.collect() == []
    fwd.set_filter("a_to_b", None)
    a.inject(udp)
    pump(fwd, a)
    assert b.collect() == [udp]
    assert fwd.stats()["a_to_b"]["filtered"] == 1
