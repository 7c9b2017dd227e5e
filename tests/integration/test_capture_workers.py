"""`nmbridge capture` on a pair of two workers (afpacket: ports, netns lab, root): while UDP
flows cross both workers both ways, one capture of both directions holds every frame of its
window exactly once — the forwarded ones (those that arrived) and the dropped ones with their
rule — each flow in order, both workers' taps having written; the statistics blocks give each
worker's counters.

left ns -- veth (2 queues) -- [bridge ns: nmbridge run, 2 workers, filter] -- veth (2 queues) -- right ns
"""

from __future__ import annotations

import re
import secrets
import signal
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rawio import Collector, NmbridgeRun, RawPort, wait_for
from test_afpacket_fanout import flow_seqs, udp_frame
from test_capture_afpacket import client, started

from nmbridge import netns
from nmbridge.capture import block_comments, read_blocks
from nmbridge.control import request
from nmbridge.netns import Lab

pytestmark = pytest.mark.root

FLOWS = 32
PER_FLOW = 20
FILTER = """
[filter.e2e]
default = "pass"
[[filter.e2e.rule]]
name = "every 4th flow"
action = "drop"
pcap = "udp and udp[1] & 3 = 3"
"""
DROPPED = 'dropped: filter e2e, rule "every 4th flow"'
FORWARDED = "forwarded: filter e2e, default action"


@pytest.fixture
def lab2() -> Iterator[Lab]:
    with netns.lab(queues=2) as lb:
        yield lb


def epbs(data: bytes) -> list[tuple[int, bytes, list[str]]]:
    """(interface, frame, comments) of each Enhanced Packet Block, in file order."""
    out = []
    for t, body in read_blocks(data):
        if t == 6:
            ifc, _hi, _lo, caplen, _origlen = struct.unpack_from("<IIIII", body)
            out.append((ifc, body[20:20 + caplen], block_comments(6, body)))
    return out


def test_a_capture_of_two_workers_holds_every_frame_once(lab2: Lab, tmp_path: Path) -> None:
    lb = lab2
    cfg = tmp_path / "bridge.toml"
    cfg.write_text('[bridge]\nstats_interval = 0\nbackend = "afpacket"\n'
                   f'[[pair]]\nname = "lab"\nports = ["{lb.bridge_left_if}", "{lb.bridge_right_if}"]\n'
                   'workers = 2\nfilter = "e2e"\n' + FILTER)
    sock = str(tmp_path / "c.sock")
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    tok = {"a_to_b": secrets.token_bytes(8), "b_to_a": secrets.token_bytes(8)}
    run = NmbridgeRun(lb, cfg, control=sock)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    out = tmp_path / "both.pcapng"
    cap = None
    try:
        run.wait_event("ready")
        cap = client(sock, "--what", "all", "--rate", "0", "-w", str(out))
        started(sock)
        at_right, at_left = Collector(right, tok["a_to_b"]), Collector(left, tok["b_to_a"])
        for seq in range(PER_FLOW):
            for flow in range(FLOWS):
                left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + flow, tok["a_to_b"],
                                    flow, seq))
                right.send(udp_frame(lmac, rmac, lb.right_ip, "10.77.0.201", 30000 + flow, tok["b_to_a"],
                                     flow, seq))
        passed = sum(1 for flow in range(FLOWS) if flow % 4 != 3) * PER_FLOW
        at_right.wait(passed, 20.0)
        at_left.wait(passed, 20.0)

        last: list[dict[str, Any]] = [{}]

        def settled() -> bool:  # nothing queued and two reads agree: every verdict is taken
            pair = request(sock, "stats")["snapshot"]["pairs"][0]
            done = pair == last[0] and all(d["queued"] == 0 for d in pair["directions"].values())
            last[0] = pair
            return done

        wait_for(settled, 20.0, "the pair to be idle")
        workers = last[0]["workers"]
        for d in ("a_to_b", "b_to_a"):  # the fanout hash gave both workers flows
            assert all(w["directions"][d]["received"] > 0 for w in workers), workers
        cap.send_signal(signal.SIGINT)  # a clean end: what the taps hold, then the statistics
        assert cap.wait(30) == 0
        assert at_right.poll() == passed and at_left.poll() == passed  # nothing came late
    finally:
        left.close()
        right.close()
        if cap is not None and cap.poll() is None:
            cap.kill()
        run.kill()

    data = out.read_bytes()
    blocks = read_blocks(data)
    got = epbs(data)
    for ifc, (d, arrived) in enumerate((("a_to_b", at_right.frames), ("b_to_a", at_left.frames))):
        mine = [(f, c) for i, f, c in got if i == ifc and tok[d] in f[:64]]
        assert not [f for i, f, _ in got if i != ifc and tok[d] in f[:64]]  # on its own interface
        seqs = flow_seqs([f for f, _ in mine], tok[d])
        assert sorted(seqs) == list(range(FLOWS))
        for flow, s in seqs.items():
            assert s == list(range(PER_FLOW)), (d, flow, s)  # once each, in flow order
        # what was forwarded is what arrived, byte for byte; the rest dropped, with its rule
        assert sorted(f for f, c in mine if c == [FORWARDED]) == sorted(arrived)
        dropped = [f for f, c in mine if c == [DROPPED]]
        assert len(dropped) == FLOWS // 4 * PER_FLOW
        assert all(flow_seqs([f], tok[d]).keys() <= {3, 7, 11, 15, 19, 23, 27, 31} for f in dropped)
        assert len(mine) == FLOWS * PER_FLOW
    summaries = [block_comments(t, body)[0] for t, body in blocks if t == 5]
    assert len(summaries) == 2
    for text in summaries:  # each worker's tap wrote; none lost anything at rate 0
        per = [int(n) for n in re.findall(r"worker \d: captured (\d+), capture_dropped 0, rate_limited 0",
                                          text)]
        assert len(per) == 2 and all(n > 0 for n in per), text
        assert f"captured {sum(per)}, capture_dropped 0, rate_limited 0" in text, text
