"""Random frames (hypothesis): pcap rules against libpcap's pcap_offline_filter, structured rules
against a small pure-Python reference evaluator written from filter-semantics.md."""

from __future__ import annotations

import ipaddress
import struct
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmbridge.filters import CompiledFilter, FilterConfig, RuleConfig, compile_filter
from nmbridge.filters.engine import run_bpf_bounded
from nmbridge.filters.fields import PARSERS
from nmbridge.filters.pcap import compile_expr, offline_filter

# --- frames built from structured pieces, then cut and damaged --------------------------------

MACS = [bytes.fromhex(m) for m in ("ffffffffffff", "01005e000001", "020000000001", "020000000002",
                                   "333300000001")]
IP4 = [ipaddress.IPv4Address(a).packed for a in ("10.0.0.1", "10.9.9.9", "192.168.1.1", "8.8.8.8")]
IP6 = [ipaddress.IPv6Address(a).packed for a in ("2001:db8::1", "fe80::1", "2001:db9::5", "::1")]
PORTS = [22, 53, 80, 443, 1000, 1500, 65535]
PROTOS = [6, 17, 132, 1, 58, 47]


@st.composite
def l4(draw: st.DrawFn) -> bytes:
    sport, dport = draw(st.sampled_from(PORTS)), draw(st.sampled_from(PORTS))
    return struct.pack("!HH", sport, dport) + draw(st.binary(min_size=0, max_size=24))


@st.composite
def ipv4(draw: st.DrawFn) -> bytes:
    ihl = draw(st.sampled_from([5, 5, 5, 6, 4]))
    version = draw(st.sampled_from([4, 4, 4, 6]))
    frag = draw(st.sampled_from([0, 0, 0x4000, 0x2000, 1, 0x1FFF]))
    proto = draw(st.sampled_from(PROTOS))
    hdr = struct.pack("!BBHHHBBH4s4s", version << 4 | ihl, 0, 40, 1, frag, 64, proto, 0,
                      draw(st.sampled_from(IP4)), draw(st.sampled_from(IP4)))
    hdr += bytes(max(0, ihl * 4 - 20))
    return hdr + draw(l4())


@st.composite
def ipv6(draw: st.DrawFn) -> bytes:
    chain = draw(st.lists(st.sampled_from([0, 43, 60, 51, 44]), max_size=3))
    final = draw(st.sampled_from([*PROTOS, 59]))
    types = [*chain, final]
    hdr = struct.pack("!IHBB16s16s", 6 << 28, 40, types[0], 64, draw(st.sampled_from(IP6)),
                      draw(st.sampled_from(IP6)))
    ext = b""
    for i, t in enumerate(chain):
        nh = types[i + 1]
        if t == 44:
            off = draw(st.sampled_from([0, 0, 8]))
            ext += struct.pack("!BBHI", nh, 0, off, 7)
        elif t == 51:
            ext += bytes([nh, 1]) + bytes(10)  # (1 + 2) * 4 = 12 bytes
        else:
            n = draw(st.sampled_from([0, 1]))
            ext += bytes([nh, n]) + bytes(6 + 8 * n)
    return hdr + ext + draw(l4())


@st.composite
def frames(draw: st.DrawFn) -> bytes:
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=80))
    out = draw(st.sampled_from(MACS)) + draw(st.sampled_from(MACS))
    for _ in range(draw(st.sampled_from([0, 0, 1, 1, 2, 3]))):
        tpid = draw(st.sampled_from([0x8100, 0x88A8, 0x9100]))
        out += struct.pack("!HH", tpid, draw(st.sampled_from([0, 100, 0xA064, 4095, 0xE001])))
    et = draw(st.sampled_from([0x0800, 0x0800, 0x86DD, 0x86DD, 0x0806, 0x0500, 0x88CC]))
    out += struct.pack("!H", et)
    if et == 0x0800:
        out += draw(ipv4())
    elif et == 0x86DD:
        out += draw(ipv6())
    else:
        out += draw(st.binary(max_size=40))
    if draw(st.booleans()):
        out = out[:draw(st.integers(0, len(out)))]
    if out and draw(st.integers(0, 4)) == 0:
        i = draw(st.integers(0, len(out) - 1))
        out = out[:i] + bytes([draw(st.integers(0, 255))]) + out[i + 1:]
    return out


# --- pcap expressions: nmbridge's interpreter == libpcap ------------------------------------

EXPRESSIONS = [
    "arp", "not arp and tcp port 22", "ip", "ip6", "tcp", "udp port 53", "vlan", "vlan 100",
    "vlan and ip", "vlan and vlan and udp", "ether broadcast", "ether multicast",
    "host 10.0.0.1", "net 10.0.0.0/8", "src net 2001:db8::/32", "ip6 protochain 6",
    "ip6 protochain 17 or ip protochain 17",
    "ip[6:2] & 0x1fff != 0", "tcp[13] & 2 != 0", "portrange 1000-2000", "icmp", "icmp6",
    "len > 60", "ip proto 47", "ether src 02:00:00:00:00:01", "mpls", "sctp",
    "ip and ip[2:2] / ip[8] > 3", "ip and ip[2:2] % ip[1] == 0", "ip and ip[0] % 3 == 1",
    "ip and ip[1] * ip[0] > 4",
    "ip and (ip[8] << (ip[9] & 7)) > 100", "ether proto 0x88cc", "ip6 and tcp port 80",
    "not ip and not ip6", "ip[0] & 0xf > 5", "greater 40 and less 70",
    "ether[12:2] = 0x9100", "ip and udp[0:2] > udp[2:2]", "ip[0] - 40 > 100",
]


def libpcap(insns: bytes, frame: bytes) -> int:
    """libpcap's verdict -- except where its runner, which has no bound, would never return
    (nmbridge's interpreter hit its backward-jump bound): there nmbridge's documented 0."""
    _, bounded = run_bpf_bounded(insns, frame)
    return 0 if bounded else offline_filter(insns, frame)


@pytest.fixture(scope="module")
def programs() -> dict[str, bytes]:
    return {e: compile_expr(e) for e in EXPRESSIONS}


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(frame=frames())
def test_interpreter_equals_libpcap(programs: dict[str, bytes], frame: bytes) -> None:
    for expr, insns in programs.items():
        verdict, bounded = run_bpf_bounded(insns, frame)
        if bounded:  # libpcap's runner would loop forever here (see the test below)
            assert verdict == 0, (expr, frame.hex())
            continue
        assert verdict == offline_filter(insns, frame), (expr, frame.hex())


def test_a_program_that_would_loop_is_cut_off() -> None:
    """`ip6 protochain` on IPv6 -> AH -> AH ...: libpcap's generated loop does not advance
    past AH here, and libpcap's own runner, which has no bound, never returns (found by the
    random test above). nmbridge's interpreter stops at the backward-jump bound: no match."""
    frame = bytes.fromhex(
        "02000000000133330000000186dd60000000002833400000000000000000000000000000000100000000"
        "00000000000000000000000133010000000000000000000006010000000000000000000000160016")
    verdict, bounded = run_bpf_bounded(compile_expr("ip6 protochain 6"), frame)
    assert (verdict, bounded) == (0, True)
    assert run_bpf_bounded(compile_expr("ip6 protochain 6"), frame[:54])[1] is False


@settings(max_examples=100, deadline=None)
@given(frame=frames(), expr=st.sampled_from(EXPRESSIONS[:12]))
def test_pcap_rule_in_a_filter_equals_libpcap(frame: bytes, expr: str) -> None:
    flt = compile_filter(FilterConfig("p", "pass", (RuleConfig("r", "drop", pcap=expr),)))
    match = libpcap(compile_expr(expr), frame) != 0
    assert (flt.evaluate(frame)[0] == "drop") == match
    check_fast_path(flt, frame, 0 if match else None)


def check_fast_path(flt: CompiledFilter, frame: bytes, index: int | None) -> None:
    """The fast path's entry point (a specialised run function: no rules, bare pcap rules, up
    to 64 rules, more) decides as `index` says and counts exactly that rule."""
    before = flt.program.hits()
    verdict = flt.program.run(frame)
    after = flt.program.hits()
    slot = len(before) - 1 if index is None else index
    assert [a - b for a, b in zip(after, before, strict=True)] == [
        int(i == slot) for i in range(len(before))], (index, frame.hex())
    rules = flt.config.rules
    want = flt.config.default if index is None else rules[index].action
    assert verdict == want, (index, frame.hex())


# --- structured rules: the C evaluator == a reference evaluator ------------------------------

def _u16(b: bytes, off: int) -> int | None:
    return int.from_bytes(b[off:off + 2], "big") if off + 2 <= len(b) else None


def facts(b: bytes) -> dict[str, Any]:
    """What the frame says about each field (absent: the field cannot be evaluated)."""
    out: dict[str, Any] = {}
    if len(b) >= 6:
        out["dst_mac"] = b[0:6]
    if len(b) >= 12:
        out["src_mac"] = b[6:12]
    t12 = _u16(b, 12)
    if t12 is not None:
        out["vlan"] = t12 in (0x8100, 0x88A8)
        if out["vlan"]:
            out["vlan_tpid"] = t12
    tags: list[int] = []
    off = 12
    etype = None
    while True:
        t = _u16(b, off)
        if t is None:
            break
        if t in (0x8100, 0x88A8):
            tci = _u16(b, off + 2)
            if tci is None:
                break
            tags.append(tci)
            off += 4
            continue
        etype = t if t >= 0x0600 else None
        break
    if tags:
        out["vlan_id"], out["vlan_pcp"] = tags[0] & 0xFFF, tags[0] >> 13
    if len(tags) > 1:
        out["inner_vlan_id"], out["inner_vlan_pcp"] = tags[1] & 0xFFF, tags[1] >> 13
    if etype is None:
        return out
    out["ethertype"] = etype
    l3 = off + 2
    ip = b[l3:]
    if etype == 0x0800 and len(ip) >= 1 and ip[0] >> 4 == 4 and ip[0] & 15 >= 5:
        if len(ip) >= 16:
            out["src_ip"] = (4, ip[12:16])
        if len(ip) >= 20:
            out["dst_ip"] = (4, ip[16:20])
        if len(ip) >= 10:
            out["ip_proto"] = ip[9]
            first = (_u16(ip, 6) or 0) & 0x1FFF == 0
            if first and ip[9] in (6, 17, 132):
                _ports(out, ip[(ip[0] & 15) * 4:])
    elif etype == 0x86DD and len(ip) >= 1 and ip[0] >> 4 == 6:
        if len(ip) >= 24:
            out["src_ip"] = (6, ip[8:24])
        if len(ip) >= 40:
            out["dst_ip"] = (6, ip[24:40])
        if len(ip) < 7:
            return out
        nh, pos = ip[6], 40
        while nh in (0, 43, 60, 51, 44):
            if nh == 44:
                if pos + 8 > len(ip):
                    return out
                if int.from_bytes(ip[pos + 2:pos + 4], "big") >> 3:
                    out["ip_proto"] = ip[pos]
                    return out
                nh, pos = ip[pos], pos + 8
                continue
            if pos + 2 > len(ip):
                return out
            size = (ip[pos + 1] + 2) * 4 if nh == 51 else (ip[pos + 1] + 1) * 8
            if pos + size > len(ip):
                return out
            nh, pos = ip[pos], pos + size
        out["ip_proto"] = nh
        if nh in (6, 17, 132):
            _ports(out, ip[pos:])
    return out


def _ports(out: dict[str, Any], l4: bytes) -> None:
    if len(l4) >= 2:
        out["src_port"] = _u16(l4, 0)
    if len(l4) >= 4:
        out["dst_port"] = _u16(l4, 2)


def field_matches(key: str, raw: object, f: dict[str, Any]) -> bool:
    if key not in f:
        return False
    want = PARSERS[key](raw)
    have = f[key]
    if key in ("dst_mac", "src_mac"):
        value, mask = want
        return all((h & m) == (v & m) for h, v, m in zip(have, value, mask, strict=True))
    if key in ("src_ip", "dst_ip"):
        version, addr = have
        net = ipaddress.ip_network(str(raw), strict=False)
        return net.version == version and ipaddress.ip_address(addr) in net
    if key in ("src_port", "dst_port"):
        return bool(want[0] <= have <= want[1])
    return bool(have == want)


def reference(rules: list[dict[str, object]], frame: bytes) -> int | None:
    f = facts(frame)
    for i, r in enumerate(rules):
        if all(field_matches(k, v, f) for k, v in r.items()):
            return i
    return None


FIELD_VALUES: dict[str, list[object]] = {
    "ethertype": ["ipv4", "ipv6", "arp", 0x88CC, 0x9100, "vlan"],
    "vlan": [True, False],
    "vlan_id": [0, 100, 4095, 1],
    "vlan_pcp": [0, 5, 7],
    "vlan_tpid": [0x8100, 0x88A8],
    "inner_vlan_id": [100, 0, 4095],
    "inner_vlan_pcp": [0, 5, 7],
    "dst_mac": ["broadcast", "multicast", "02:00:00:00:00:01", "02:00:00:00:00:00/ff:ff:ff:ff:ff:fc"],
    "src_mac": ["02:00:00:00:00:02", "multicast", "33:33:00:00:00:00/ff:ff:00:00:00:00"],
    "src_ip": ["10.0.0.0/8", "10.0.0.1", "2001:db8::/32", "::1", "0.0.0.0/0", "::/0"],
    "dst_ip": ["192.168.1.1/32", "8.8.8.0/24", "fe80::/10", "2001:db9::5"],
    "ip_proto": ["tcp", "udp", "sctp", "icmp", "icmpv6", 47, 59],
    "src_port": [22, [1000, 1500], [0, 65535], 53],
    "dst_port": [80, 443, [50, 60], 65535],
}

rule_st = st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.just(None), max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: st.sampled_from(FIELD_VALUES[k]) for k in d}))
rules_st = st.lists(rule_st, min_size=1, max_size=6)


@settings(max_examples=400, deadline=None)
@given(rules=rules_st, batch=st.lists(frames(), min_size=1, max_size=8))
def test_structured_equals_reference(rules: list[dict[str, object]], batch: list[bytes]) -> None:
    flt = compile_filter(FilterConfig("r", "pass", tuple(
        RuleConfig(f"r{i}", "drop", r) for i, r in enumerate(rules))))
    for frame in batch:
        want = reference(rules, frame)
        assert flt.evaluate(frame)[1] == want, (rules, frame.hex(), facts(frame))
        check_fast_path(flt, frame, want)


# more than 64 rules (of 2-3 fields, so later ones get their turn): the candidate sets span
# several 64-bit words
narrow_rule_st = st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.just(None), min_size=2,
                                 max_size=3).flatmap(
    lambda d: st.fixed_dictionaries({k: st.sampled_from(FIELD_VALUES[k]) for k in d}))


@settings(max_examples=60, deadline=None)
@given(rules=st.lists(narrow_rule_st, min_size=60, max_size=140),
       batch=st.lists(frames(), min_size=1, max_size=8))
def test_many_rules_equal_reference(rules: list[dict[str, object]], batch: list[bytes]) -> None:
    flt = compile_filter(FilterConfig("r", "pass", tuple(
        RuleConfig(f"r{i}", "drop", r) for i, r in enumerate(rules))))
    for frame in batch:
        want = reference(rules, frame)
        assert flt.evaluate(frame)[1] == want, (frame.hex(), facts(frame))
        check_fast_path(flt, frame, want)


# pcap and structured rules mixed (and pcap rules alone): first match in order, pcap rules as
# libpcap decides them
mixed_rule_st = st.one_of(rule_st, st.sampled_from(EXPRESSIONS).map(lambda e: {"pcap": e}))


@settings(max_examples=150, deadline=None)
@given(rules=st.one_of(st.lists(mixed_rule_st, min_size=1, max_size=6),
                       st.lists(st.sampled_from(EXPRESSIONS).map(lambda e: {"pcap": e}),
                                min_size=1, max_size=4)),
       batch=st.lists(frames(), min_size=1, max_size=8))
def test_mixed_rules_equal_reference(rules: list[dict[str, object]], batch: list[bytes]) -> None:
    flt = compile_filter(FilterConfig("m", "pass", tuple(
        RuleConfig(f"r{i}", "drop", {k: v for k, v in r.items() if k != "pcap"},
                   pcap=r.get("pcap"))  # type: ignore[arg-type]
        for i, r in enumerate(rules))))
    insns = {str(r["pcap"]): compile_expr(str(r["pcap"])) for r in rules if "pcap" in r}
    for frame in batch:
        f = facts(frame)
        want = next((i for i, r in enumerate(rules)
                     if (libpcap(insns[str(r["pcap"])], frame) != 0 if "pcap" in r
                         else all(field_matches(k, v, f) for k, v in r.items()))), None)
        assert flt.evaluate(frame)[1] == want, (rules, frame.hex())
        check_fast_path(flt, frame, want)


def _config_value(key: str, have: Any) -> object:
    """A config value that names exactly what the frame has."""
    if key in ("dst_mac", "src_mac"):
        return ":".join(f"{b:02x}" for b in have)
    if key in ("src_ip", "dst_ip"):
        return str(ipaddress.ip_address(have[1]))
    return have


ANY_VALUE: dict[str, object] = {
    "ethertype": "ipv4", "vlan": True, "vlan_id": 100, "vlan_pcp": 5, "vlan_tpid": 0x8100,
    "inner_vlan_id": 100, "inner_vlan_pcp": 5, "dst_mac": "00:00:00:00:00:00/00:00:00:00:00:00",
    "src_mac": "00:00:00:00:00:00/00:00:00:00:00:00", "src_ip": "0.0.0.0/0", "dst_ip": "::/0",
    "ip_proto": "tcp", "src_port": [0, 65535], "dst_port": [0, 65535],
}


@settings(max_examples=300, deadline=None)
@given(frame=frames())
def test_each_field_the_frame_has_matches_and_no_other(frame: bytes) -> None:
    have = facts(frame)
    rules: list[dict[str, object]] = [{k: _config_value(k, v)} for k, v in sorted(have.items())]
    for i, r in enumerate(rules):
        flt = compile_filter(FilterConfig("f", "pass", (RuleConfig("r", "drop", r),)))
        assert flt.evaluate(frame)[1] == 0, (r, frame.hex(), i)
        check_fast_path(flt, frame, 0)
    for key, value in ANY_VALUE.items():
        flt = compile_filter(FilterConfig("f", "pass", (RuleConfig("r", "drop", {key: value}),)))
        if key not in have:
            assert flt.evaluate(frame)[1] is None, (key, frame.hex())
        elif key != "dst_ip" or have[key][0] == 6:
            assert (flt.evaluate(frame)[1] == 0) == field_matches(key, value, have), (key, frame.hex())


@pytest.mark.parametrize("default", ["pass", "drop"])
def test_no_rules_the_default_decides(default: str) -> None:
    flt = compile_filter(FilterConfig("empty", default, ()))  # type: ignore[arg-type]
    for frame in (b"", b"\x01", bytes(60)):
        assert flt.evaluate(frame) == (default, None)
        check_fast_path(flt, frame, None)
    assert flt.hits() == {"default": 3}
