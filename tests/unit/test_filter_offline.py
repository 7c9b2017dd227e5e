"""`nmbridge filter test`: a capture file through the configured filters, offline."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path

from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import ARP, Ether
from scapy.utils import wrpcap

from nmbridge import config
from nmbridge.filters.offline import filter_test, read_pcap

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
name = "ssh"
action = "pass"
pcap = "tcp port 22"

[[pair]]
name = "p"
ports = ["mem:a", "mem:b"]
filter_a_to_b = "f"
"""

FRAMES = [Ether() / ARP(), Ether() / IP() / TCP(dport=22), Ether() / IP() / UDP(dport=53), b"\x01"]


def capture(tmp_path: Path) -> Path:
    path = tmp_path / "c.pcap"
    wrpcap(str(path), FRAMES[:3])
    # one runt frame appended by hand (scapy will not write a 1-byte Ethernet frame)
    with open(path, "ab") as fh:
        fh.write(struct.pack("<IIII", 0, 0, 1, 1) + b"\x01")
    return path


def test_text_and_json(tmp_path: Path) -> None:
    cfg = config.loads(CONFIG)
    pcap = capture(tmp_path)
    assert [len(f) for f in read_pcap(pcap)] == [len(bytes(f)) for f in FRAMES]
    out = io.StringIO()
    assert filter_test(cfg, pcap, None, None, True, out) == 0
    doc = json.loads(out.getvalue())
    (res,) = doc["results"]
    assert (res["pair"], res["direction"], res["filter"]) == ("p", "a_to_b", "f")
    assert [(f["verdict"], f["rule"]) for f in res["frames"]] == [
        ("pass", "arp"), ("pass", "ssh"), ("drop", "default"), ("drop", "default")]
    assert res["totals"] == {"arp": 1, "ssh": 1, "default": 2}
    assert (res["passed"], res["dropped"]) == (2, 2)
    out = io.StringIO()
    assert filter_test(cfg, pcap, "p", "a-to-b", False, out) == 0
    text = out.getvalue()
    assert "filter f" in text and "ssh" in text and "2 / 2" in text


def test_errors(tmp_path: Path) -> None:
    cfg = config.loads(CONFIG)
    pcap = capture(tmp_path)
    out = io.StringIO()
    assert filter_test(cfg, pcap, "nope", None, True, out) == 1
    assert "no pair named 'nope'" in json.loads(out.getvalue())["error"]
    assert filter_test(cfg, pcap, None, "b-to-a", True, io.StringIO()) == 1  # no filter that way
    bad = tmp_path / "bad.pcap"
    bad.write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(40))
    out = io.StringIO()
    assert filter_test(cfg, bad, None, None, True, out) == 1
    assert "pcapng" in json.loads(out.getvalue())["error"]
