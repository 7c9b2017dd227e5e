"""`nmbridge run` with `workers = 2` on afpacket: and afxdp: ports, end to end in a netns lab
(root): the pair's two worker threads each forward one share per port (afpacket: a socket of
one PACKET_FANOUT group; afxdp: the socket of one receive queue),
pinned to the CPUs given; every frame of many UDP flows crosses exactly once, in order within
its flow; `nmbridge stats` sums the workers and each worker balances on its own; SIGTERM
stops both and the final counters balance too.

left ns -- veth (2 queues) -- [bridge ns: nmbridge run, 2 workers] -- veth (2 queues) -- right ns
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rawio import Collector, NmbridgeRun, RawPort, wait_for
from test_afpacket_fanout import flow_seqs, udp_frame

from nmbridge import netns
from nmbridge.backends import backend
from nmbridge.control import request
from nmbridge.netns import Lab

pytestmark = pytest.mark.root

FLOWS = 32
PER_FLOW = 20


@pytest.fixture
def lab2() -> Iterator[Lab]:
    with netns.lab(queues=2) as lb:
        yield lb


def balance(d: dict[str, Any]) -> int:
    return int(d["received"] - d["forwarded"] - sum(d["dropped"].values()) - d["queued"])


@pytest.mark.parametrize("kind", ["afpacket", "afxdp"])
def test_two_workers_forward_every_frame_once_and_balance(lab2: Lab, tmp_path: Path, kind: str) -> None:
    lb = lab2
    if kind == "afxdp" and (why := backend("afxdp").unavailable()):
        pytest.skip(why)
    cpus = sorted(os.sched_getaffinity(0))[:2]
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0\nbackend = "{kind}"\n'
                   f'[[pair]]\nname = "lab"\nports = ["{lb.bridge_left_if}", "{lb.bridge_right_if}"]\n'
                   f"workers = 2\ncpus = {cpus}\n")
    sock = str(tmp_path / "c.sock")
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    tok_lr, tok_rl = secrets.token_bytes(8), secrets.token_bytes(8)
    run = NmbridgeRun(lb, cfg, control=sock)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    try:
        started = run.wait_event("forwarding", pair="lab")
        assert [w["worker"] for w in started["workers"]] == [0, 1]
        run.wait_event("ready")
        at_right, at_left = Collector(right, tok_lr), Collector(left, tok_rl)
        for seq in range(PER_FLOW):
            for flow in range(FLOWS):
                left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + flow, tok_lr, flow, seq))
                right.send(udp_frame(lmac, rmac, lb.right_ip, "10.77.0.201", 30000 + flow, tok_rl, flow, seq))
        total = FLOWS * PER_FLOW
        at_right.wait(total, 20.0)
        at_left.wait(total, 20.0)

        last: list[dict[str, Any]] = [{}]

        def settled() -> bool:  # nothing queued and two reads agree
            pair = request(sock, "stats")["snapshot"]["pairs"][0]
            done = pair == last[0] and all(d["queued"] == 0 for d in pair["directions"].values())
            last[0] = pair
            return done

        wait_for(settled, 20.0, "the pair to be idle")
        pair = last[0]
        assert at_right.poll() == total and at_left.poll() == total  # no duplicate came late
        ws = pair["workers"]
        assert [(w["worker"], w["cpu"]) for w in ws] == [(0, cpus[0]), (1, cpus[1 % len(cpus)])]
        for d in ("a_to_b", "b_to_a"):
            tot = pair["directions"][d]
            assert balance(tot) == 0, tot
            per = [w["directions"][d] for w in ws]
            assert all(balance(x) == 0 for x in per), per
            assert all(x["received"] > 0 for x in per), per  # the fanout hash used both workers
            assert sum(x["received"] for x in per) == tot["received"]
            assert sum(x["forwarded"] for x in per) == tot["forwarded"] >= total
        for got in (flow_seqs(at_right.frames, tok_lr), flow_seqs(at_left.frames, tok_rl)):
            assert sorted(got) == list(range(FLOWS))
            for flow, seqs in got.items():
                assert seqs == list(range(PER_FLOW)), (flow, seqs)  # once each, in flow order
        stopped = run.stop()
        for d in ("a_to_b", "b_to_a"):  # the final counters (the stopped event's own shape)
            c = stopped["counters"]["lab"][d]
            assert c["received"] == c["forwarded"] + c["dropped"] + c["queued"], c
            assert c["dropped"] == sum(c["drops"].values()) and c["forwarded"] >= total, c
    finally:
        left.close()
        right.close()
        run.kill()
