"""End-to-end `nmbridge capture` on a running `nmbridge run` (afpacket: ports, netns lab):
what a filter drops is captured byte for byte with its rule; what it passes, likewise; the
file reads back with tcpdump and scapy; a client that goes away ends the capture; a capture
at full rate loses no forwarded frame and counts what the tap skipped.

left ns -- veth -- [bridge ns: nmbridge run, filter on a_to_b] -- veth -- right ns
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rawio import Collector, NmbridgeRun, RawPort, wait_for
from scapy.utils import PcapNgReader
from test_filter_afpacket import EXPECTED, crafted, local_mac
from test_operating import frame

from nmbridge.control import request
from nmbridge.netns import Lab

ROOT = Path(__file__).resolve().parents[2]
FILTER = """
[filter.e2e]
default = "pass"
[[filter.e2e.rule]]
name = "ssh"
action = "drop"
ip_proto = "tcp"
dst_port = 22
[[filter.e2e.rule]]
name = "vlan100"
action = "drop"
vlan_id = 100
[[filter.e2e.rule]]
name = "arp-dns"
action = "drop"
pcap = "arp or udp port 53"
"""


@pytest.fixture
def bridge(lab: Lab, tmp_path: Path) -> Iterator[tuple[NmbridgeRun, str]]:
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[bridge]\nstats_interval = 0\nbackend = "afpacket"\n'
                   f'[[pair]]\nname = "lab"\nports = ["{lab.bridge_left_if}", "{lab.bridge_right_if}"]\n'
                   'filter_a_to_b = "e2e"\n' + FILTER)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock)
    try:
        run.wait_event("ready")
        yield run, sock
    finally:
        run.kill()


def client(sock: str, *args: str, stdout: Any = subprocess.PIPE) -> subprocess.Popen[bytes]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.Popen([sys.executable, "-m", "nmbridge", "capture", "--control", sock, "-p", "lab",
                             *args], env=env, stdout=stdout, stderr=subprocess.PIPE, cwd="/")


def captures(sock: str) -> list[dict[str, Any]]:
    return list(request(sock, "captures")["captures"])


def started(sock: str, n: int = 1) -> None:
    """`n` captures whose taps are in (every frame sent from now on is seen)."""
    wait_for(lambda: [c["state"] for c in captures(sock)] == ["running"] * n, timeout=20,
             what=f"{n} capture(s) running")


def read(path: Path) -> tuple[list[bytes], list[list[bytes]]]:
    with PcapNgReader(str(path)) as r:
        pkts = list(r)
    return [bytes(p) for p in pkts], [list(p.comments or []) for p in pkts]


@pytest.mark.root
def test_dropped_and_forwarded_frames_byte_for_byte_with_their_rule(
        lab: Lab, bridge: tuple[NmbridgeRun, str], tmp_path: Path) -> None:
    _run, sock = bridge
    left, right = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    try:
        src = local_mac()
        frames = crafted(lab.mac(lab.ns_right, lab.right_if), src)
        order = list(EXPECTED) + list(EXPECTED)[::-1]
        dropped = [n for n in order if EXPECTED[n] is not None]
        passed = [n for n in order if EXPECTED[n] is None]
        out_d, out_f = tmp_path / "dropped.pcapng", tmp_path / "forwarded.pcapng"
        cd = client(sock, "-d", "a-to-b", "--what", "dropped", "--rate", "0", "-c", str(len(dropped)),
                    "-w", str(out_d))
        started(sock)
        # a second capture of the same direction is refused in one line
        p = client(sock, "--what", "all", "-w", str(tmp_path / "x"))
        assert p.wait(30) == 1
        assert p.stderr is not None and b"being captured already" in p.stderr.read()
        col = Collector(right, src)
        for n in order:
            left.send(frames[n])
        assert col.wait(len(passed)) == [frames[n] for n in passed]
        assert cd.wait(30) == 0  # --count ends it
        got, comments = read(out_d)
        assert got == [frames[n] for n in dropped]
        assert comments == [[f'dropped: filter e2e, rule "{EXPECTED[n]}"'.encode()] for n in dropped]
        assert cd.stderr is not None
        err = cd.stderr.read().decode()
        assert f"{len(dropped)} frames written" in err and "ended (count)" in err

        # the forwarded ones, through `-w - | tcpdump -r -`
        cf = client(sock, "-d", "a-to-b", "--what", "forwarded", "--rate", "0", "-c", str(len(passed)),
                    "-w", str(out_f))
        started(sock)
        for n in order:
            left.send(frames[n])
        assert cf.wait(30) == 0
        got, comments = read(out_f)
        assert got == [frames[n] for n in passed]
        assert comments == [[b"forwarded: filter e2e, default action"]] * len(passed)
        if shutil.which("tcpdump"):
            listed = subprocess.run(["tcpdump", "-nr", str(out_f)], capture_output=True, text=True,
                                    check=True)
            assert listed.stdout.count("\n") == len(passed)
            env = dict(os.environ, PYTHONPATH=str(ROOT))
            pipe = subprocess.Popen(
                f"{sys.executable} -m nmbridge capture --control {sock} -p lab --what dropped -c 2 -w - "
                "| tcpdump -nr - 2>/dev/null", shell=True, env=env, stdout=subprocess.PIPE, text=True,
                cwd="/")
            started(sock)
            left.send(frames["tcp22"])
            left.send(frames["arp"])
            out, _ = pipe.communicate(timeout=30)
            assert pipe.returncode == 0
            lines = out.splitlines()
            assert len(lines) == 2 and ".22:" in lines[0] and "ARP" in lines[1], out
        wait_for(lambda: captures(sock) == [], timeout=10, what="no capture left")
    finally:
        left.close()
        right.close()


@pytest.mark.root
def test_a_client_that_goes_away_ends_its_capture(lab: Lab, bridge: tuple[NmbridgeRun, str],
                                                  tmp_path: Path) -> None:
    run, sock = bridge
    # killed: the bridge notices, takes the tap out and goes on forwarding
    c = client(sock, "--what", "all", "-w", "-")
    started(sock)
    assert c.stdout is not None
    select.select([c.stdout], [], [], 10)  # the pcapng header has arrived
    c.kill()
    c.wait()
    ev = run.wait_event("capture_ended")
    assert ev["reason"] in ("client closed", "client gone")
    assert captures(sock) == []
    # Ctrl-C: a clean end, the file whole (its statistics block names the counters)
    out = tmp_path / "int.pcapng"
    c = client(sock, "--what", "all", "-w", str(out))
    started(sock)
    c.send_signal(signal.SIGINT)
    assert c.wait(30) == 0
    assert run.wait_event("capture_ended")["reason"] == "client closed"
    assert c.stderr is not None and b"lab:a-to-b ended (client closed): seen" in c.stderr.read()
    assert read(out) == ([], [])
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    try:
        token = os.urandom(8)
        sent = [frame(lab, token, i, 0x88B5) for i in range(50)]
        for f in sent:
            tx.send(f)
        col = Collector(rx, token)
        assert col.wait(50) == sent
    finally:
        tx.close()
        rx.close()


@pytest.mark.root
def test_full_rate_capture_loses_no_forwarded_frame_and_counts_what_it_skipped(
        lab: Lab, bridge: tuple[NmbridgeRun, str], tmp_path: Path) -> None:
    _run, sock = bridge
    out = tmp_path / "all.pcapng"
    c = client(sock, "--what", "all", "--rate", "100", "-w", str(out))  # a low limit: it must skip
    started(sock)
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    token = os.urandom(8)
    total, window = 3000, 200
    delivered = 0

    def stats() -> dict[str, Any]:
        return dict(request(sock, "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"])

    def drain() -> None:
        nonlocal delivered
        delivered += sum(1 for f in rx.recv_all() if f[14:22] == token)

    try:
        base = stats()
        n = 0
        while n < total:
            drain()
            if n - delivered >= window:  # nothing here is filtered (ethertype 0x88b5 passes)
                select.select([rx.sock], [], [], 0.01)
                continue
            tx.send(frame(lab, token, n, 0x88B5))
            n += 1
        wait_for(lambda: (drain(), delivered)[1] == total, timeout=20, what=f"{total} frames delivered")
        st = stats()
        filtered = st["dropped"].get("filtered", 0) - base["dropped"].get("filtered", 0)
        assert delivered + filtered == total
        assert st["forwarded"] - base["forwarded"] >= delivered  # (+ ARP and the like)
        assert st["received"] == st["forwarded"] + sum(st["dropped"].values()) + st["queued"]
        running = captures(sock)[0]["directions"]
        # stats shows it too
        assert [c["pair"] for c in request(sock, "stats")["snapshot"]["captures"]] == ["lab"]
        c.send_signal(signal.SIGINT)
        assert c.wait(30) == 0
    finally:
        tx.close()
        rx.close()
    a2b = running["a_to_b"]
    assert a2b["seen"] >= total
    assert a2b["seen"] == a2b["captured"] + a2b["capture_dropped"] + a2b["rate_limited"]
    assert a2b["rate_limited"] > 0
    got, _ = read(out)
    assert len(got) >= a2b["captured"] and len(got) < total  # the tap took what the limit let it
