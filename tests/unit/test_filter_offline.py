"""`nmbridge filter test`: a capture file through filters, offline, from a config (by filter or
by pair), a rule file or tcpdump expressions; one numbering and one direction spelling."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.utils import wrpcap

from nmbridge import cli
from nmbridge.filters.offline import read_pcap

pytestmark = pytest.mark.usefixtures("restore_logging")

CONFIG = """
[bridge]
backend = "mem"

[filter.f]
default = "drop"

[[filter.f.rule]]
name = "arp"
action = "pass"
ethertype = "arp"

[[filter.f.rule]]
action = "pass"
pcap = "tcp port 22"

[filter.spare]
default = "pass"

[[filter.spare.rule]]
action = "drop"
ip_proto = "udp"

[[pair]]
name = "p"
ports = ["mem:a", "mem:b"]
filter_a_to_b = "f"
"""

FRAMES = [Ether() / ARP(), Ether() / IP() / TCP(dport=22), Ether() / IP() / UDP(dport=53), b"\x01",
          Ether() / Dot1Q(vlan=5) / IP() / TCP(dport=22)]


@pytest.fixture
def pcap(tmp_path: Path) -> Path:
    path = tmp_path / "c.pcap"
    wrpcap(str(path), FRAMES[:3])
    # one runt frame appended by hand (scapy will not write a 1-byte Ethernet frame)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<IIII", 0, 0, 1, 1) + b"\x01")
    wrpcap(str(path), FRAMES[4:], append=True)
    return path


@pytest.fixture
def conf(tmp_path: Path) -> Path:
    path = tmp_path / "b.toml"
    path.write_text(CONFIG)
    return path


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    status = cli.main(["filter", "test", *argv])
    out, err = capsys.readouterr()
    return status, out, err


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> dict[str, object]:
    status, out, err = run(capsys, *argv, "--json")
    assert status == 0, err
    doc: dict[str, object] = json.loads(out)
    return doc


def verdicts(result: dict[str, object]) -> list[tuple[object, object, object]]:
    frames = result["frames"]
    assert isinstance(frames, list)
    return [(f["verdict"], f["rule"], f["rule_number"]) for f in frames]


def test_read_pcap(pcap: Path) -> None:
    assert [len(f) for f in read_pcap(pcap)] == [len(bytes(f)) for f in FRAMES]


def test_a_pair_and_direction_in_json(capsys: pytest.CaptureFixture[str], pcap: Path, conf: Path) -> None:
    for spelling in ("a-to-b", "a_to_b"):  # both read, a_to_b written
        doc = run_json(capsys, "--pcap", str(pcap), "-c", str(conf), "--pair", "p", "--direction", spelling)
        (res,) = doc["results"]  # type: ignore[misc]
        assert (res["pair"], res["direction"], res["filter"]) == ("p", "a_to_b", "f")
        # rules are numbered from 1, as rule[N] in key paths and "rule N" as a default name
        assert verdicts(res) == [("pass", "arp", 1), ("pass", "rule 2", 2), ("drop", "default", None),
                                 ("drop", "default", None), ("drop", "default", None)]
        assert [f["frame"] for f in res["frames"]] == [1, 2, 3, 4, 5]
        assert res["rules"] == [{"rule_number": 1, "rule": "arp", "action": "pass", "frames": 1},
                                {"rule_number": 2, "rule": "rule 2", "action": "pass", "frames": 1}]
        assert res["totals"] == {"arp": 1, "rule 2": 1, "default": 3}
        assert (res["passed"], res["dropped"]) == (2, 3)


def test_text_output(capsys: pytest.CaptureFixture[str], pcap: Path, conf: Path) -> None:
    status, out, err = run(capsys, "--pcap", str(pcap), "-c", str(conf), "--pair", "p")
    assert (status, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"pair p a_to_b: filter f (2 rules, default drop): 5 frames from {pcap}"
    assert lines[1].split() == ["frame", "bytes", "verdict", "rule"]
    assert lines[2].split() == ["1", "42", "pass", "rule", "1", '"arp"']
    assert lines[3].split() == ["2", "54", "pass", "rule", "2"]
    assert lines[5].split() == ["4", "1", "drop", "default"]
    assert lines[-4:] == ['    rule 1 "arp"    1', "    rule 2          1", "    default (drop)  3",
                          "    passed 2, dropped 3"]


def test_a_filter_by_name_that_no_pair_uses(capsys: pytest.CaptureFixture[str], pcap: Path,
                                            conf: Path) -> None:
    status, out, _ = run(capsys, "--pcap", str(pcap), "-c", str(conf), "--filter", "spare", "--totals")
    assert status == 0
    assert out.splitlines()[0].startswith("filter spare (used by no pair) (1 rule, default pass): 5 frames")
    assert "frame  bytes" not in out  # --totals: no line per frame
    doc = run_json(capsys, "--pcap", str(pcap), "-c", str(conf), "--filter", "spare")
    (res,) = doc["results"]  # type: ignore[misc]
    assert (res["pair"], res["direction"], res["totals"]) == (None, None, {"rule 1": 1, "default": 4})


def test_every_filter_by_default_also_those_no_pair_uses(capsys: pytest.CaptureFixture[str], pcap: Path,
                                                         conf: Path) -> None:
    doc = run_json(capsys, "--pcap", str(pcap), "-c", str(conf))
    assert [(r["pair"], r["direction"], r["filter"]) for r in doc["results"]] == [  # type: ignore[attr-defined]
        ("p", "a_to_b", "f"), (None, None, "spare")]


def test_a_file_of_filters_only(capsys: pytest.CaptureFixture[str], pcap: Path, tmp_path: Path) -> None:
    only = tmp_path / "filters.toml"
    only.write_text(CONFIG.split("[[pair]]")[0])
    doc = run_json(capsys, "--pcap", str(pcap), "-c", str(only), "--filter", "f")
    assert doc["results"][0]["totals"] == {"arp": 1, "rule 2": 1, "default": 3}  # type: ignore[index]
    status = cli.main(["check", "-c", str(only)])
    err = capsys.readouterr().err
    assert status == 78 and "no [[pair]]" in err  # a bridge still needs a pair


def test_an_expression_without_a_config(capsys: pytest.CaptureFixture[str], pcap: Path) -> None:
    status, out, err = run(capsys, "--pcap", str(pcap), "-e", "tcp port 22")
    assert (status, err) == (0, "")
    assert out.splitlines()[0] == f"-e (1 rule, default drop): 5 frames from {pcap}"
    assert '    rule 1 "tcp port 22"  1' in out.splitlines()  # plain `tcp` does not match tagged frames
    doc = run_json(capsys, "--pcap", str(pcap), "-e", "arp", "-e", "vlan and tcp")
    (res,) = doc["results"]  # type: ignore[misc]
    assert (res["source"], res["default"]) == ("-e", "drop")
    assert [v[:2] for v in verdicts(res)] == [("pass", "arp"), ("drop", "default"), ("drop", "default"),
                                               ("drop", "default"), ("pass", "vlan and tcp")]


def test_a_rule_file(capsys: pytest.CaptureFixture[str], pcap: Path, tmp_path: Path) -> None:
    rules = tmp_path / "web.toml"
    rules.write_text('default = "pass"\n\n[[rule]]\nname = "no-udp"\naction = "drop"\nip_proto = "udp"\n\n'
                     '[[rule]]\naction = "drop"\ndst_mac = "ffff.ffff.ffff"\n')
    doc = run_json(capsys, "--pcap", str(pcap), "--rules", str(rules))
    (res,) = doc["results"]  # type: ignore[misc]
    assert res["source"] == f"rules {rules}"
    assert res["totals"] == {"no-udp": 1, "rule 2": 3, "default": 1}  # scapy sends to broadcast
    rules.write_text('[[rule]]\naction = "deny"\n')
    status, out, err = run(capsys, "--pcap", str(pcap), "--rules", str(rules), "--json")
    assert (status, out) == (78, "")
    assert err == f'nmbridge: {rules}:2: rule[1].action = "deny": must be "pass" or "drop"; write "drop"\n'


@pytest.mark.parametrize("argv, status, message", [
    (["-c", "{conf}", "--pair", "nope"], 1, "no pair named 'nope' in {conf} (pairs: p)"),
    (["-c", "{conf}", "--filter", "nope"], 1, "no filter named 'nope' in {conf} (filters: f, spare)"),
    (["-c", "{conf}", "--direction", "b-to-a"], 1,
     "no pair of {conf} has a filter for b_to_a; try a filter by name: --filter f"),
    (["-c", "{conf}", "--pair", "p", "--direction", "b_to_a"], 1,
     "pair 'p' has no filter for b_to_a in {conf}: it forwards every frame; "
     "try a filter by name: --filter f"),
    (["-c", "{conf}", "--direction", "sideways"], 1,
     "--direction is a_to_b or b_to_a (a-to-b, b-to-a also read), not 'sideways'"),
    (["-c", "{conf}", "--filter", "f", "--pair", "p"], 2,
     "filter test: --filter names one filter; --pair/--direction choose by pair: use one or the other"),
    (["-e", "tcp", "--pair", "p"], 2,
     "filter test: --pair chooses among the filters of a config: add -c FILE"),
    (["-e", "tcp prot 22"], 78, '-e[1] "tcp prot 22": libpcap: can\'t parse filter expression: syntax error'),
    (["-e", "tcp", "-e", " "], 78, '-e[2] " ": an empty expression (leave -e out to match nothing)'),
])
def test_errors_are_one_line_on_stderr_also_with_json(
        capsys: pytest.CaptureFixture[str], pcap: Path, conf: Path,
        argv: list[str], status: int, message: str) -> None:
    argv = [a.format(conf=conf) for a in argv]
    for extra in ([], ["--json"]):
        assert run(capsys, "--pcap", str(pcap), *argv, *extra) == (
            status, "", f"nmbridge: {message.format(conf=conf)}\n")


def test_a_rule_file_that_does_not_load(capsys: pytest.CaptureFixture[str], pcap: Path,
                                        tmp_path: Path) -> None:
    missing = tmp_path / "none.toml"
    assert run(capsys, "--pcap", str(pcap), "--rules", str(missing)) == (
        78, "", f"nmbridge: {missing}: cannot read: No such file or directory\n")
    broken = tmp_path / "broken.toml"
    broken.write_text("[[rule]\n")
    status, out, err = run(capsys, "--pcap", str(pcap), "--rules", str(broken))
    assert (status, out) == (78, "") and err.startswith(f"nmbridge: {broken}:1:") and err.count("\n") == 1
    broken.write_text("[[rule]]\naction = \"drop\"\n[filter.x]\n")  # a config, not a rule file
    assert run(capsys, "--pcap", str(pcap), "--rules", str(broken))[2] == (
        f'nmbridge: {broken}: filter = {{x = {{}}}}: unknown key; known keys: default, rule\n')


def test_a_bad_capture(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
    status, out, err = run(capsys, "--pcap", str(bad), "-e", "tcp", "--json")
    assert (status, out) == (1, "")
    assert "pcapng" in err and err.count("\n") == 1


def test_warnings_go_to_stderr_and_into_the_json(capsys: pytest.CaptureFixture[str], pcap: Path) -> None:
    status, out, err = run(capsys, "--pcap", str(pcap), "-e", "inbound", "-e", "tcp", "-e", "tcp", "--json")
    assert status == 0
    assert err.splitlines() == [
        'nmbridge: warning: -e[1] "inbound": can never match: it reads kernel metadata (inbound/outbound) '
        "that frames on a bridge do not have: that test always ends the program with no match",
        'nmbridge: warning: -e[3]: never decides: -e[2] "tcp" before it matches every frame it matches']
    doc = json.loads(out)
    assert [(w["kind"], w["rule_number"], w.get("shadowed_by_number")) for w in doc["warnings"]] == [
        ("never_matches", 1, None), ("shadowed", 3, 2)]


# --- the README's example is a real run ---------------------------------------------------


def readme_capture(path: Path) -> None:
    """The five frames of the README's capture.pcap."""
    from scapy.layers.l2 import LLC, Dot3

    a, b = "02:00:00:00:00:01", "02:00:00:00:00:02"
    wrpcap(str(path), [
        Ether(src=a, dst=b) / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=22),
        Ether(src=b, dst="ff:ff:ff:ff:ff:ff") / ARP(hwsrc=b, psrc="10.0.0.2", pdst="10.0.0.1"),
        Ether(src=a, dst=b) / IP(src="10.0.0.1", dst="10.0.0.53") / UDP(sport=5353, dport=53),
        Ether(src=a, dst=b) / Dot1Q(vlan=20) / IP(src="10.0.0.1", dst="192.0.2.80")
        / TCP(sport=40001, dport=443),
        Dot3(src=a, dst="01:80:c2:00:00:00") / LLC(dsap=0x42, ssap=0x42, ctrl=3) / (b"\0" * 35),
    ])


def test_the_readme_example(capsys: pytest.CaptureFixture[str], tmp_path: Path,
                            monkeypatch: pytest.MonkeyPatch) -> None:
    import re
    import shlex

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    m = re.search(r"<!-- filter-test-example:.*?-->(.*?)<!-- /filter-test-example -->", readme, re.S)
    assert m
    session = "".join(re.findall(r"```\n(.*?)```", m.group(1), re.S))
    runs = re.findall(r"^\$ (.*)\n((?:(?!\$ ).*\n)*)", session, re.M)
    assert len(runs) == 3
    monkeypatch.chdir(tmp_path)
    readme_capture(tmp_path / "capture.pcap")
    for command, expected in runs:
        argv = shlex.split(command)
        if argv[0] == "cat":
            (tmp_path / argv[1]).write_text(expected)
            continue
        assert argv[0] == "nmbridge"
        assert cli.main(argv[1:]) == 0
        out, err = capsys.readouterr()
        assert err + out == expected  # the warnings come first, as on a terminal
