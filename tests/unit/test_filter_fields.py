"""Structured filter fields: frames that must match and frames that must not (filter-semantics.md),
and the errors check_filter gives for bad values."""

from __future__ import annotations

import pytest
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    IPv6ExtHdrRouting,
)
from scapy.layers.l2 import ARP, Dot1AD, Dot1Q, Ether
from scapy.layers.sctp import SCTP
from scapy.packet import Packet, Raw

from nmbridge.filters import FIELDS, FilterConfig, FilterError, RuleConfig, check_filter, compile_filter

MAC_A = "02:00:00:00:00:0a"
MAC_B = "02:00:00:00:00:0b"


def frame(p: Packet | bytes) -> bytes:
    return p if isinstance(p, bytes) else bytes(p)


def matches(fields: dict[str, object], f: Packet | bytes) -> bool:
    """Does one rule with `fields` match the frame?"""
    flt = compile_filter(FilterConfig("t", "pass", (RuleConfig("r", "drop", fields),)))
    verdict, index = flt.evaluate(frame(f))
    assert (verdict == "drop") == (index == 0)
    return index == 0


def eth(**kw: object) -> Ether:
    args: dict[str, object] = {"src": MAC_A, "dst": MAC_B, **kw}
    return Ether(**args)


TCP4 = eth() / IP(src="10.1.2.3", dst="192.168.7.9") / TCP(sport=40000, dport=22)
UDP4 = eth() / IP(src="10.1.2.3", dst="192.168.7.9") / UDP(sport=5353, dport=53)
ICMP4 = eth() / IP(src="10.1.2.3", dst="192.168.7.9") / ICMP()
TCP6 = eth() / IPv6(src="2001:db8::1", dst="fe80::2") / TCP(sport=1234, dport=443)
ARP_F = eth(type=0x0806) / ARP(psrc="10.1.2.3", pdst="192.168.7.9")
Q_TCP4 = eth() / Dot1Q(vlan=100, prio=5) / IP(src="10.1.2.3") / TCP(dport=22)
QINQ = eth() / Dot1AD(vlan=300, prio=3) / Dot1Q(vlan=42, prio=6) / IP(dst="192.168.7.9") / UDP(dport=53)


# an AH header (nh TCP, length 4: (4 + 2) * 4 = 24 bytes)
AH_TCP = bytes([6, 4, 0, 0]) + bytes(20)

# --- each field: (fields, frames that match, frames that do not) ---------------------------

CASES: list[tuple[dict[str, object], list[Packet | bytes], list[Packet | bytes]]] = [
    ({"ethertype": "ipv4"}, [TCP4, Q_TCP4, QINQ], [TCP6, ARP_F, eth(type=0x0500) / Raw(b"x" * 46)]),
    ({"ethertype": "arp"}, [ARP_F, eth() / Dot1Q(vlan=1) / ARP()], [TCP4]),
    ({"ethertype": 0x86DD}, [TCP6], [TCP4]),
    ({"ethertype": "vlan"}, [], [Q_TCP4, QINQ, TCP4]),  # 0x8100 is a tag, never the innermost type
    ({"ethertype": 0x9100}, [eth(type=0x9100) / Raw(b"\0" * 46)], [TCP4]),  # 0x9100 is no tag
    ({"vlan": True}, [Q_TCP4, QINQ, bytes(12) + b"\x81\x00"], [TCP4, bytes(13)]),
    ({"vlan": False}, [TCP4, ARP_F], [Q_TCP4, QINQ, bytes(13)]),
    ({"vlan_id": 100}, [Q_TCP4], [TCP4, QINQ, bytes(12) + b"\x81\x00"]),
    ({"vlan_id": 300}, [QINQ], [Q_TCP4]),  # the outermost tag: the S-tag
    ({"vlan_pcp": 5}, [Q_TCP4], [QINQ, TCP4]),
    ({"vlan_tpid": "802.1ad"}, [QINQ], [Q_TCP4, TCP4]),
    ({"vlan_tpid": 0x8100}, [Q_TCP4], [QINQ]),
    ({"inner_vlan_id": 42}, [QINQ], [Q_TCP4, eth() / Dot1Q(vlan=42) / IP()]),
    ({"inner_vlan_pcp": 6}, [QINQ], [Q_TCP4]),
    ({"vlan_id": 0}, [eth() / Dot1Q(vlan=0) / IP()], [TCP4]),
    ({"vlan_id": 4095}, [eth() / Dot1Q(vlan=4095) / IP()], [eth() / Dot1Q(vlan=4094) / IP()]),
    ({"dst_mac": MAC_B}, [TCP4, bytes.fromhex("02000000000b")], [eth(dst=MAC_A), bytes.fromhex("02000000")]),
    ({"src_mac": MAC_A}, [TCP4], [eth(src=MAC_B) / IP(), bytes(6) + bytes.fromhex("0200000000")]),
    ({"src_mac": "02:00:00:00:00:00/ff:ff:ff:00:00:00"}, [TCP4], [Ether(src="04:00:00:00:00:0a")]),
    ({"dst_mac": "broadcast"}, [Ether(dst="ff:ff:ff:ff:ff:ff")], [Ether(dst="01:00:5e:00:00:01"), TCP4]),
    ({"dst_mac": "multicast"}, [Ether(dst="ff:ff:ff:ff:ff:ff"), Ether(dst="01:00:5e:00:00:01")], [TCP4]),
    ({"src_ip": "10.0.0.0/8"}, [TCP4, Q_TCP4, UDP4], [TCP6, ARP_F, eth() / IP(src="11.0.0.1")]),
    ({"src_ip": "10.1.2.3"}, [TCP4], [eth() / IP(src="10.1.2.4")]),
    ({"dst_ip": "192.168.7.9/32"}, [TCP4, QINQ], [ARP_F, TCP6]),  # ARP addresses are not IP
    ({"src_ip": "2001:db8::/32"}, [TCP6], [TCP4, eth() / IPv6(src="2001:db9::1")]),
    ({"dst_ip": "fe80::2"}, [TCP6], [eth() / IPv6(dst="fe80::3")]),
    ({"src_ip": "10.0.0.0/8"}, [], [bytes(TCP4)[:14 + 15]]),  # address cut off
    ({"ip_proto": "tcp"}, [TCP4, TCP6, Q_TCP4], [UDP4, ICMP4, ARP_F]),
    ({"ip_proto": "icmp"}, [ICMP4], [TCP4]),
    ({"ip_proto": 6}, [eth() / IP(frag=100, proto=6) / Raw(b"x" * 20)], [eth() / IP(proto=17)]),
    ({"ip_proto": "tcp"}, [eth() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrRouting() /
                           IPv6ExtHdrDestOpt() / IPv6ExtHdrFragment() / TCP(),
                           eth() / IPv6(nh=51) / Raw(AH_TCP) / TCP()], []),
    ({"ip_proto": "udp"}, [eth() / IPv6() / IPv6ExtHdrFragment(offset=10, nh=17) / Raw(b"y" * 16)],
     [bytes(eth() / IPv6() / IPv6ExtHdrHopByHop() / UDP())[:14 + 40 + 4]]),  # ext header cut off
    ({"ip_proto": 59}, [eth() / IPv6(nh=59)], [TCP6]),
    ({"dst_port": 22}, [TCP4, Q_TCP4], [UDP4, ICMP4, ARP_F, eth() / IP(frag=1) / TCP(dport=22)]),
    ({"dst_port": 53}, [UDP4, QINQ], [TCP4]),
    ({"dst_port": [440, 450]}, [TCP6], [TCP4]),
    ({"src_port": 40000, "ip_proto": "tcp"}, [TCP4], [eth() / IP() / UDP(sport=40000)]),
    ({"dst_port": 80}, [eth() / IP() / SCTP(dport=80)], [eth() / IP() / ICMP() / Raw(b"\0\0\0\x50")]),
    ({"dst_port": 443}, [eth() / IPv6() / IPv6ExtHdrDestOpt() / TCP(dport=443)],
     [eth() / IPv6() / IPv6ExtHdrFragment(offset=3) / TCP(dport=443)]),
    ({"dst_port": 22}, [], [bytes(TCP4)[:14 + 20 + 3]]),  # cut 3 bytes into TCP
    ({"src_port": 40000}, [bytes(TCP4)[:14 + 20 + 2]], [bytes(TCP4)[:14 + 20 + 1]]),
    ({"ethertype": "ipv4"}, [bytes(TCP4)[:14]], [bytes(TCP4)[:13]]),
    ({}, [b"\x01", b"", TCP4], []),  # no fields: everything, even runts
    ({"ethertype": "ipv4", "dst_port": 22, "src_ip": "10.0.0.0/8"}, [TCP4, Q_TCP4], [UDP4, TCP6]),
]


@pytest.mark.parametrize(("fields", "good", "bad"), CASES, ids=[str(c[0]) for c in CASES])
def test_field(fields: dict[str, object], good: list[Packet | bytes], bad: list[Packet | bytes]) -> None:
    for f in good:
        assert matches(fields, f), f"{fields} should match {frame(f).hex()}"
    for f in bad:
        assert not matches(fields, f), f"{fields} should not match {frame(f).hex()}"


def test_ip_version_and_ihl_checked() -> None:
    raw = bytearray(bytes(TCP4))
    raw[14] = 0x45 & 0x0F | 0x60  # version 6 in an 0x0800 frame: no IP fields
    assert not matches({"src_ip": "10.0.0.0/8"}, bytes(raw))
    assert matches({"ethertype": "ipv4"}, bytes(raw))
    raw[14] = 0x44  # IHL 4
    assert not matches({"ip_proto": "tcp"}, bytes(raw))


def test_every_tpid_combination_is_skipped() -> None:
    f = eth() / Dot1Q(vlan=1) / Dot1AD(vlan=2) / Dot1Q(vlan=3) / IP(dst="1.2.3.4") / UDP(dport=9)
    assert matches({"ethertype": "ipv4", "dst_ip": "1.2.3.4", "dst_port": 9, "inner_vlan_id": 2}, f)


def test_first_match_wins_and_default() -> None:
    flt = compile_filter(FilterConfig("t", "drop", (
        RuleConfig("ssh", "pass", {"dst_port": 22}),
        RuleConfig("tcp", "drop", {"ip_proto": "tcp"}),
        RuleConfig("v4", "pass", {"ethertype": "ipv4"}),
    )))
    assert flt.evaluate(bytes(TCP4)) == ("pass", 0)
    assert flt.evaluate(bytes(eth() / IP() / TCP(dport=80))) == ("drop", 1)
    assert flt.evaluate(bytes(UDP4)) == ("pass", 2)
    assert flt.evaluate(bytes(eth() / IPv6() / UDP())) == ("drop", None)
    assert flt.hits() == {"ssh": 0, "tcp": 0, "v4": 0, "default": 0}  # evaluate counts nothing


def test_fields_documented() -> None:
    assert set(FIELDS) == {"ethertype", "vlan", "vlan_id", "vlan_pcp", "vlan_tpid", "inner_vlan_id",
                           "inner_vlan_pcp", "src_mac", "dst_mac", "src_ip", "dst_ip", "ip_proto",
                           "src_port", "dst_port"}
    assert all(isinstance(doc, str) and doc for doc in FIELDS.values())


# --- errors ------------------------------------------------------------------------------

BAD: list[tuple[str, object, str]] = [
    ("dst_port", 70000, "outside"),
    ("dst_port", [10, 5], "empty"),
    ("dst_port", [1, 2, 3], "[lo, hi]"),
    ("dst_port", "ssh", "number"),
    ("src_port", True, "number"),
    ("ethertype", "ipx", "unknown ethertype"),
    ("ethertype", 0x05FF, "outside"),
    ("vlan", 1, "true or false"),
    ("vlan_id", 4096, "outside"),
    ("vlan_pcp", 8, "outside"),
    ("vlan_tpid", 0x9100, "only 0x8100"),
    ("src_mac", "02:00:00:00:00", "not a MAC"),
    ("dst_mac", "zz:00:00:00:00:00", "not a MAC"),
    ("src_ip", "10.0.0.0/33", "not an IP"),
    ("dst_ip", 10, "string"),
    ("ip_proto", "tcpp", "unknown IP protocol"),
    ("ip_proto", 256, "outside"),
    ("dport", 22, "unknown field"),
]


@pytest.mark.parametrize(("key", "value", "reason"), BAD, ids=[f"{b[0]}={b[1]!r}" for b in BAD])
def test_bad_value_names_filter_rule_field(key: str, value: object, reason: str) -> None:
    f = FilterConfig("web", "pass", (
        RuleConfig("rule 1", "pass", {"ethertype": "ipv4"}, keypath="filter.web.rule[1]"),
        RuleConfig("block", "drop", {key: value}, keypath="filter.web.rule[2]"),
    ), keypath="filter.web")
    with pytest.raises(FilterError) as e:
        check_filter(f)
    assert e.value.keypath == f"filter.web.rule[2].{key}"
    assert reason in e.value.reason
    assert "'block'" in e.value.reason  # the rule's own name
    assert "\n" not in str(e.value)


def test_bad_pcap_expression_has_libpcaps_message() -> None:
    f = FilterConfig("edge", "pass", (RuleConfig("rule 1", "drop", pcap="tcp prot 22",
                                                 keypath="filter.edge.rule[1]"),), keypath="filter.edge")
    with pytest.raises(FilterError) as e:
        check_filter(f)
    assert e.value.keypath == "filter.edge.rule[1].pcap"
    assert "libpcap" in e.value.reason and "syntax error" in e.value.reason


def test_bad_action_and_duplicate_names() -> None:
    with pytest.raises(FilterError, match="pass or drop"):
        check_filter(FilterConfig("x", "allow", ()))  # type: ignore[arg-type]
    with pytest.raises(FilterError, match="already used"):
        check_filter(FilterConfig("x", "pass", (RuleConfig("a", "drop"), RuleConfig("a", "pass"))))
    with pytest.raises(FilterError, match="reserved"):
        check_filter(FilterConfig("x", "pass", (RuleConfig("default", "drop"),)))
