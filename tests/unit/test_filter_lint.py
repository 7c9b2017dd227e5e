"""Warnings about rules that can never match or never decide (nmbridge.filters.lint), the forms
of values people bring from other tools (accepted or refused with a hint), and `check`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from test_filter_random import FIELD_VALUES, frames

from nmbridge import cli, config
from nmbridge.errors import ConfigError
from nmbridge.filters import FilterConfig, FilterWarning, RuleConfig, check_filter, compile_filter

PAIR = '[[pair]]\nports = ["mem:a", "mem:b"]\n'


def rules(*rs: dict[str, Any]) -> FilterConfig:
    out = []
    for n, r in enumerate(rs, 1):
        r = dict(r)
        name = r.pop("name", f"rule {n}")
        pcap = r.pop("pcap", None)
        out.append(RuleConfig(name, r.pop("action", "drop"), r, pcap))
    return FilterConfig("f", "pass", tuple(out))


def found(*rs: dict[str, Any]) -> list[tuple[str, int, int | None]]:
    return [(w.kind, w.number, w.other_number) for w in check_filter(rules(*rs))]


# --- rules that can never match ---------------------------------------------------------

NEVER = [
    ({"ethertype": 0x8100}, "ethertype = 33024 is a VLAN tag type"),
    ({"ethertype": "0x88a8"}, 'ethertype = "0x88a8" is a VLAN tag type'),
    ({"ethertype": "vlan"}, "to match tagged frames write vlan = true or vlan_tpid = 0x8100"),
    ({"ethertype": "802.1q"}, "VLAN tag type"),
    ({"ethertype": "qinq"}, "vlan_tpid = 0x88a8"),
    ({"ethertype": "802.1ad"}, "VLAN tag type"),
    ({"pcap": "inbound"}, "kernel metadata (inbound/outbound)"),
    ({"pcap": "outbound"}, "kernel metadata (inbound/outbound)"),
    ({"pcap": "not inbound"}, "kernel metadata (inbound/outbound)"),  # not X is no escape
    ({"pcap": "ifindex 3"}, "kernel metadata (ifindex)"),
    ({"pcap": "inbound or tcp"}, "kernel metadata"),  # the metadata test comes first
    ({"ethertype": "arp", "dst_ip": "10.0.0.0/8"}, "different ethertypes"),
    ({"src_ip": "10.0.0.0/8", "dst_ip": "::/0"}, "different ethertypes"),
    ({"ethertype": "ipv6", "src_ip": "10.0.0.1"}, "different ethertypes"),
    ({"ethertype": "lldp", "ip_proto": "tcp"}, "different ethertypes"),
    ({"ethertype": "arp", "dst_port": 22}, "different ethertypes"),
    ({"ip_proto": "icmp", "dst_port": 22}, "different IP protocols"),
    ({"ip_proto": "gre", "src_port": [1, 2]}, "exists only for TCP, UDP and SCTP"),
    ({"vlan": False, "vlan_id": 3}, "vlan = false, and vlan_id = 3 needs a tag"),
    ({"vlan": False, "inner_vlan_pcp": 1}, "needs a tag"),
    ({"vlan": False, "vlan_tpid": "802.1ad"}, "needs a tag"),
]


@pytest.mark.parametrize("rule, why", NEVER, ids=[str(r) for r, _ in NEVER])
def test_never_matches(rule: dict[str, Any], why: str) -> None:
    (w,) = check_filter(rules({"ip_proto": "udp"}, rule))
    assert (w.kind, w.number, w.rule, w.keypath) == ("never_matches", 2, "rule 2", "filter.f.rule[2]")
    assert why in w.message
    flt = compile_filter(rules(rule))  # and it compiles: a warning, not an error
    assert flt.name == "f"


PARTIAL = [
    ({"pcap": "tcp or inbound"}, "part of it can never be true: it reads kernel metadata (inbound/outbound)"),
    ({"pcap": "arp or ifindex 2"}, "(ifindex)"),
    ({"ip_proto": "ah"}, "on IPv6 it matches non-first fragments only: elsewhere ip_proto is the "
                         "protocol after the extension headers, never 51 (AH is walked past); IPv4 frames"),
    ({"dst_ip": "2001:db8::/32", "ip_proto": "ah"}, "never 51 (AH is walked past)"),
    ({"ethertype": "ipv6", "ip_proto": 44}, "never 44 (fragment is walked past)"),
    ({"ip_proto": 0, "dst_port": 5}, None),  # hop-by-hop with ports: no ports on protocol 0
]


@pytest.mark.parametrize("rule, why", PARTIAL, ids=[str(r) for r, _ in PARTIAL])
def test_partly_void(rule: dict[str, Any], why: str | None) -> None:
    (w,) = check_filter(rules(rule))
    if why is None:
        assert w.kind == "never_matches"
    else:
        assert (w.kind, w.number) == ("partial", 1) and why in w.message


# --- rules that never decide ------------------------------------------------------------

SHADOWED = [
    ({}, {"ip_proto": "tcp"}),  # no fields: every frame
    ({"pcap": "ip or not ip"}, {"dst_port": 22}),  # a program that never looks at the frame
    ({"pcap": "len >= 0"}, {}),
    ({}, {"pcap": "tcp"}),
    ({"pcap": "tcp port 22"}, {"pcap": "tcp port 22"}),  # the same program
    ({"ip_proto": "tcp"}, {"ip_proto": 6, "dst_port": 22}),
    ({"dst_port": [1, 1024]}, {"dst_port": 22}),
    ({"dst_port": [20, 30]}, {"dst_port": [22, 23], "ip_proto": "udp"}),
    ({"dst_ip": "10.0.0.0/8"}, {"dst_ip": "10.1.2.0/24"}),
    ({"ethertype": "ipv4"}, {"src_ip": "10.0.0.1"}),
    ({"ethertype": "ipv6"}, {"dst_ip": "::1"}),
    ({"vlan": True}, {"vlan_id": 10}),
    ({"vlan": True}, {"inner_vlan_id": 10}),
    ({"vlan_id": 10}, {"vlan_id": 10, "vlan_pcp": 3}),
    ({"dst_mac": "multicast"}, {"dst_mac": "broadcast"}),
    ({"dst_mac": "01:80:c2:00:00:00/40"}, {"dst_mac": "0180.c200.000e"}),
    ({"src_mac": "02:00:00:00:00:00/8"}, {"src_mac": "02:11:22:33:44:55", "ethertype": "arp"}),
    ({"name": "a", "ethertype": "arp"}, {"name": "b", "ethertype": 0x0806, "action": "pass"}),
]


@pytest.mark.parametrize("first, later", SHADOWED, ids=[f"{a}-{b}" for a, b in SHADOWED])
def test_shadowed(first: dict[str, Any], later: dict[str, Any]) -> None:
    ws = check_filter(rules({"ethertype": "lldp"}, first, later))
    (w,) = [w for w in ws if w.kind == "shadowed"]
    assert (w.number, w.other_number) == (3, 2)
    assert w.other_keypath == "filter.f.rule[2]" and "never decides: filter.f.rule[2]" in w.message


NOT_SHADOWED = [
    ({"ip_proto": "tcp"}, {"dst_port": 22}),  # port 22 is also UDP and SCTP
    ({"dst_port": 22}, {"ip_proto": "tcp"}),  # a TCP frame cut before its ports
    ({"dst_port": [0, 65535]}, {"ip_proto": "tcp"}),  # non-first fragments have no ports
    ({"dst_ip": "10.1.0.0/16"}, {"dst_ip": "10.0.0.0/8"}),
    ({"dst_ip": "0.0.0.0/0"}, {"ethertype": "ipv4"}),  # ethertype 0x0800 with a bad version nibble
    ({"ethertype": "ipv4"}, {"ip_proto": "tcp"}),  # also IPv6
    ({"vlan": False}, {"ethertype": "ipv4"}),
    ({"vlan_id": 10}, {"inner_vlan_id": 10}),
    ({"dst_mac": "broadcast"}, {"dst_mac": "multicast"}),
    ({"src_mac": "multicast"}, {"dst_mac": "multicast"}),
    ({"pcap": "tcp"}, {"ip_proto": "tcp"}),  # claimed only for identical programs
    ({"pcap": "tcp"}, {"pcap": "tcp port 22"}),
    ({"ethertype": 0x8100}, {"ethertype": 0x8100}),  # never matches: not "shadowed" too
    ({"pcap": "inbound"}, {"ip_proto": "udp"}),
]


@pytest.mark.parametrize("first, later", NOT_SHADOWED, ids=[f"{a}-{b}" for a, b in NOT_SHADOWED])
def test_not_shadowed(first: dict[str, Any], later: dict[str, Any]) -> None:
    assert [w for w in check_filter(rules(first, later)) if w.kind == "shadowed"] == []


def test_clean_filters_have_no_warnings() -> None:
    for f in config.load(str(Path(__file__).parents[2] / "etc" / "filters.toml")).filters.values():
        assert check_filter(f) == []


# Soundness: what the warnings claim holds on every frame (the fast path's own verdicts).

PCAP_RULES = ["tcp", "tcp port 22", "inbound", "tcp or outbound", "ip or not ip", "arp", "vlan"]
rule_st = st.one_of(
    st.dictionaries(st.sampled_from(sorted(FIELD_VALUES)), st.just(None), max_size=3).flatmap(
        lambda d: st.fixed_dictionaries({k: st.sampled_from(FIELD_VALUES[k]) for k in d})),
    st.sampled_from(PCAP_RULES).map(lambda e: {"pcap": e}),
    st.sampled_from([{"dst_port": [1, 100]}, {"dst_ip": "10.0.0.0/16"}, {"src_ip": "0.0.0.0/0"},
                     {"ip_proto": 51}, {"ip_proto": 60, "src_ip": "::/0"},
                     {"ethertype": "ipv6", "ip_proto": 0},
                     {"dst_mac": "02:00:00:00:00:00/46"}]))


def matches(rule: dict[str, Any], frame: bytes) -> bool:
    return compile_filter(rules({**rule, "action": "pass"})).evaluate(frame)[1] == 0


@settings(max_examples=300, deadline=None)
@given(first=rule_st, later=rule_st, batch=st.lists(frames(), min_size=1, max_size=12))
def test_what_the_warnings_claim_holds(first: dict[str, Any], later: dict[str, Any],
                                       batch: list[bytes]) -> None:
    try:
        ws = check_filter(rules(first, later))
    except ValueError:  # a rule the compiler refuses (libpcap: "rejects all packets", ...)
        return
    claims = {(w.kind, w.number) for w in ws}
    for frame in batch:
        if ("never_matches", 1) in claims:
            assert not matches(first, frame)
        if ("never_matches", 2) in claims:
            assert not matches(later, frame)
        if ("shadowed", 2) in claims and matches(later, frame):
            assert matches(first, frame)


# --- `check` and the config loader -----------------------------------------------------


def test_check_warns_on_stderr_with_file_line_and_both_rules(
        capsys: pytest.CaptureFixture[str], tmp_path: Path, restore_logging: None) -> None:
    path = tmp_path / "b.toml"
    path.write_text('[filter.f]\n[[filter.f.rule]]\nname = "any tcp"\naction = "pass"\nip_proto = "tcp"\n'
                    '[[filter.f.rule]]\naction = "drop"\nip_proto = "tcp"\ndst_port = 23\n'
                    '[[filter.f.rule]]\naction = "drop"\nethertype = "vlan"\n' + PAIR)
    assert cli.main(["check", "-c", str(path)]) == 0
    out, err = capsys.readouterr()
    assert "filter f: 3 rules, default pass, 2 warnings (below)" in out
    assert err.splitlines() == [
        f'nmbridge: {path}:6: warning: filter.f.rule[2]: never decides: filter.f.rule[1] "any tcp" before '
        "it matches every frame it matches",
        f'nmbridge: {path}:10: warning: filter.f.rule[3]: can never match: ethertype = "vlan" is a VLAN '
        "tag type, and ethertype is the type after all tags (a tag type never is): to match tagged "
        "frames write vlan = true or vlan_tpid = 0x8100"]
    w: FilterWarning = config.load(path).warnings[0]
    assert w.as_dict() == {"kind": "shadowed", "filter": "f", "rule_number": 2, "rule": "rule 2",
                           "keypath": "filter.f.rule[2]", "message": w.message, "shadowed_by_number": 1,
                           "shadowed_by": "any tcp", "shadowed_by_keypath": "filter.f.rule[1]",
                           "where": f"{path}:6"}


def test_run_logs_the_warnings(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                               monkeypatch: pytest.MonkeyPatch, restore_logging: None) -> None:
    from nmbridge import app

    ran: list[object] = []

    class FakeBridge:  # the config is all this test needs: nothing is opened
        def __init__(self, cfg: object, **_: object) -> None:
            self.cfg = cfg

        def run(self) -> None:
            ran.append(self.cfg)

    monkeypatch.setattr(app, "check_capabilities", lambda cfg, link_setup: None)
    monkeypatch.setattr(app, "Bridge", FakeBridge)
    path = tmp_path / "b.toml"
    path.write_text('[filter.f]\n[[filter.f.rule]]\naction = "pass"\n[[filter.f.rule]]\naction = "drop"\n'
                    'pcap = "tcp"\n' + PAIR + 'filter = "f"\n')
    assert cli.main(["--log-format", "json", "run", "-c", str(path)]) == 0 and ran
    (event,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (event["event"], event["level"], event["kind"], event["rule_number"], event["keypath"],
            event["shadowed_by_number"], event["where"]) == (
        "filter_warning", "warning", "shadowed", 2, "filter.f.rule[2]", 1, f"{path}:4")


# --- forms people type ------------------------------------------------------------------


def error(rule: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.loads(f"[filter.f]\n[[filter.f.rule]]\n{rule}\n" + PAIR, "b.toml")
    return str(e.value)


@pytest.mark.parametrize("rule, message", [
    ('action = "accept"', 'b.toml:3: filter.f.rule[1].action = "accept": must be "pass" or "drop"; '
                          'write "pass"'),
    ('action = "deny"', 'filter.f.rule[1].action = "deny": must be "pass" or "drop"; write "drop"'),
    ('action = "Drop"', 'must be "pass" or "drop"; write it in lower case: "drop"'),
    ('action = "reject"', 'write "drop" (nmbridge never answers a frame: it passes or drops it)'),
    ('action = "drop"\ndst_port = [443]', "filter.f.rule[1].dst_port = [443]: [443] is an array of one: "
                                         "write one port as a number (443); an array is a range [lo, hi]"),
    ('action = "drop"\ndst_port = [22, 80, 443]', "an array is an inclusive range [lo, hi], not a list of "
                                                 "ports: write one rule per port or range"),
    ('action = "drop"\nsrc_port = "1000-2000"', 'src_port = "1000-2000": write a range as an array: '
                                                "[1000, 2000]"),
    ('action = "drop"\nsrc_port = "443"', "write a port as a number, without quotes: 443"),
    ('action = "drop"\nsrc_port = "https"', "service names are not looked up"),
    ('action = "drop"\ndst_mac = "0180c2000000"',
     'is not a MAC address: write six hex bytes as "aa:bb:cc:dd:ee:ff" '
     "(or aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff)"),
    ('action = "drop"\ndst_mac = "01:80:c2:00:00:00/49"', "a MAC mask length is 0 to 48, not 49"),
    ('action = "drop"\nport = 22', "filter.f.rule[1].port = 22: unknown field; the fields of a rule all "
                                   "match, so either port is two rules"),
    ('action = "drop"\ndport = 22', 'unknown field; write "dst_port"'),
    ('action = "drop"\nip_prto = 6', 'unknown field; did you mean "ip_proto"?'),
])
def test_refused_with_the_form_to_write(rule: str, message: str) -> None:
    assert message in error(rule)


@pytest.mark.parametrize("written, same_as", [
    ("0180.c200.0000", "01:80:c2:00:00:00"),
    ("0180.C200.0000/44", "01:80:c2:00:00:00/ff:ff:ff:ff:ff:f0"),
    ("01-80-c2-00-00-00/24", "01:80:c2:00:00:00/ff:ff:ff:00:00:00"),
    ("02:00:00:00:00:00/0", "00:00:00:00:00:00/00:00:00:00:00:00"),
    ("01:80:c2:00:00:0e/48", "01:80:c2:00:00:0e"),
])
def test_mac_forms_accepted(written: str, same_as: str) -> None:
    from nmbridge.filters.fields import parse_mac

    assert parse_mac(written) == parse_mac(same_as)


def test_directions_read_both_ways_and_written_one_way() -> None:
    for spelling in ("a-to-b", "a_to_b", "A-To-B"):
        c = config.loads('[filter.f]\n' + PAIR + f'direction = "{spelling}"\nfilter = "f"\n')
        assert (c.pairs[0].direction, c.pairs[0].filters) == ("a_to_b", {"a_to_b": "f"})
        assert c.as_dict()["pair"][0]["direction"] == "a_to_b"  # type: ignore[index]


def insns(*prog: tuple[int, int, int, int]) -> bytes:
    import struct

    return b"".join(struct.pack("=HBBI", *i) for i in prog)


@pytest.mark.parametrize("prog, can, every, meta", [
    ([(0x06, 0, 0, 65535)], True, True, ()),  # ret #65535
    ([(0x06, 0, 0, 0)], False, False, ()),  # ret #0
    ([(0x40, 0, 0, 0xFFFFF008), (0x06, 0, 0, 1)], False, False, ("ifindex",)),  # ld [x + ifindex]
    ([(0x28, 0, 0, 12), (0x06, 0, 0, 1)], True, False, ()),  # a frame load can fail
    ([(0x80, 0, 0, 0), (0x35, 0, 1, 0), (0x06, 0, 0, 9), (0x06, 0, 0, 0)], True, True, ()),  # len >= 0
    ([(0x00, 0, 0, 1), (0x07, 0, 0, 0), (0x3C, 0, 0, 0), (0x06, 0, 0, 1)], True, False, ()),  # a / x
    ([(0x05, 0, 0, 1), (0x06, 0, 0, 0), (0x06, 0, 0, 5)], True, True, ()),  # ja over ret #0
    ([(0x28, 0, 0, 12), (0x15, 0, 1, 0x86DD), (0x05, 0, 0, 0xFFFFFFFD), (0x16, 0, 0, 0)],
     True, False, ()),  # a backward jump (wraps around): still ends; ret a may be a match
])
def test_program_analysis(prog: list[tuple[int, int, int, int]], can: bool, every: bool,
                          meta: tuple[str, ...]) -> None:
    from nmbridge.filters.lint import analyse_bpf

    got = analyse_bpf(insns(*prog))
    assert (got.can_match, got.matches_all, got.metadata) == (can, every, meta)
