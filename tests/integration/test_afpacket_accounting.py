"""The accounting identity end to end, over afpacket: ports in a netns lab (root):

    received = forwarded + sum(dropped[reason]) + queued      (per direction, to the frame)

checked against the kernel's own interface counters under overload (two trafgen senders),
with frames larger than the egress MTU, with the egress link down for a while under
traffic, and with the far end down (no carrier on the bridge's egress veth).

left ns -- l/bl veth -- [bridge ns: afpacket:bl <-> afpacket:br] -- br/r veth -- right ns
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from rawio import Collector, RawPort, wait_for

from nmbridge.accounting import pair_directions
from nmbridge.netns import Lab

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0
TYPE = 0x88B5  # IEEE local experimental

pytestmark = pytest.mark.root


def ifstats(lb: Lab, ns: str, ifname: str) -> dict[str, int]:
    s = lb.link(ns, ifname)["stats64"]
    return {"rx": int(s["rx"]["packets"]), "tx": int(s["tx"]["packets"]),
            "rx_dropped": int(s["rx"]["dropped"]), "tx_dropped": int(s["tx"]["dropped"])}


def frame(lb: Lab, token: bytes, seq: int, size: int = 60) -> bytes:
    dst, src = lb.mac(lb.ns_right, lb.right_if), lb.mac(lb.ns_left, lb.left_if)
    head = dst + src + struct.pack("!H", TYPE) + token + struct.pack("!I", seq)
    return head + bytes(size - len(head))


def balanced(d: dict[str, Any]) -> bool:
    return d["received"] == d["forwarded"] + sum(d["dropped"].values()) + d["queued"]


def a_to_b(rb: Any) -> dict[str, Any]:
    """The a_to_b direction of a running start_bridge forwarder (left -> right)."""
    d = pair_directions(rb.fwd.snapshot(), rb.left, rb.right)["a_to_b"]
    assert balanced(dict(d)), d
    return dict(d)


def settle(get: Any) -> dict[str, Any]:
    """Counters once nothing is queued and two reads agree (the bridge is idle)."""
    last: list[dict[str, Any]] = [get()]

    def idle() -> bool:
        cur = get()
        done = cur["queued"] == 0 and cur == last[0]
        last[0] = cur
        return bool(done)

    wait_for(idle, 20.0, "the bridge to be idle (nothing queued)")
    return last[0]


def paced_send(tx: RawPort, frames: list[bytes], pps: float, during: Any = None) -> None:
    """Send at about `pps`; call during(i) before frame i (the test's link changes)."""
    start = time.monotonic()
    for i, f in enumerate(frames):
        if during is not None:
            during(i)
        tx.send(f)
        ahead = start + (i + 1) / pps - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)


# --- overload, through `nmbridge run` and `nmbridge stats --json` ----------------------


def cli(lb: Lab, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    return subprocess.run(["ip", "netns", "exec", lb.ns_bridge, sys.executable, "-m", "nmbridge", *args],
                          env=env, capture_output=True, text=True, timeout=DEADLINE, check=False)


@pytest.mark.skipif(shutil.which("trafgen") is None, reason="trafgen (netsniff-ng) is not installed")
def test_overload_two_senders_balances_to_the_frame_in_nmbridge_stats(lab: Lab, tmp_path: Path) -> None:
    """More than the bridge can forward (two trafgen senders, a small RX ring): what
    `nmbridge stats --json` shows balances to the frame, received is what reached the
    bridge's interface, and forwarded is what the egress kernel took."""
    per_sender = 100_000
    cfg = tmp_path / "bridge.toml"
    sock = str(tmp_path / "c.sock")
    # a small RX ring (16 frames) overruns for sure
    small = f"afpacket:{lab.bridge_left_if}?rx_frames=16"
    cfg.write_text('[bridge]\nstats_interval = 0\n'
                   f'[[pair]]\nname = "lab"\nports = ["{small}", "afpacket:{lab.bridge_right_if}"]\n')
    pkt = tmp_path / "frame.cfg"
    dst = ", ".join(f"0x{b:02x}" for b in lab.mac(lab.ns_right, lab.right_if))
    src = ", ".join(f"0x{b:02x}" for b in lab.mac(lab.ns_left, lab.left_if))
    pkt.write_text(f"{{ {dst}, {src}, 0x88, 0xb5, fill(0x00, 46) }}\n")
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    run = lab.popen(lab.ns_bridge, sys.executable, "-m", "nmbridge", "--log-format", "json", "run",
                    "-c", str(cfg), "--control", sock, "--no-link-setup", cwd="/", env=env,
                    stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def stats() -> dict[str, Any]:
            r = cli(lab, "stats", "--json", "--control", sock)
            assert r.returncode == 0, r.stderr
            d = json.loads(r.stdout)["snapshot"]["pairs"][0]["directions"]["a_to_b"]
            return {k: d[k] for k in ("received", "forwarded", "queued", "dropped")}

        wait_for(lambda: os.path.exists(sock) and cli(lab, "stats", "--control", sock).returncode == 0,
                 20.0, "nmbridge run to answer on its control socket")
        bl0 = ifstats(lab, lab.ns_bridge, lab.bridge_left_if)
        br0 = ifstats(lab, lab.ns_bridge, lab.bridge_right_if)
        before = stats()
        senders = [lab.popen(lab.ns_left, "trafgen", "-o", lab.left_if, "-i", str(pkt), "-n",
                             str(per_sender), "-P", "1", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                   for _ in range(2)]
        for s in senders:
            assert s.wait(DEADLINE) == 0
        after = settle(stats)
        bl1 = ifstats(lab, lab.ns_bridge, lab.bridge_left_if)
        br1 = ifstats(lab, lab.ns_bridge, lab.bridge_right_if)
    finally:
        run.terminate()
        run.wait(DEADLINE)
    got = {k: after[k] - before[k] for k in ("received", "forwarded")}
    dropped = {r: n - before["dropped"].get(r, 0) for r, n in after["dropped"].items()}
    print(f"overload: sent {2 * per_sender}, reached the bridge {bl1['rx'] - bl0['rx']}, {got}, "
          f"dropped {dropped}")
    assert got["received"] == got["forwarded"] + sum(dropped.values())  # queued is 0
    # received: every frame that reached the bridge's interface; forwarded: every frame the
    # egress veth took (sent on, or dropped by the veth itself, which it counts)
    assert got["received"] == bl1["rx"] - bl0["rx"] > 0
    assert got["forwarded"] == (br1["tx"] - br0["tx"]) + (br1["tx_dropped"] - br0["tx_dropped"])
    assert dropped["rx_kernel_drops"] > 0  # the overload shows, under its reason
    assert set(dropped) >= {"rx_kernel_drops", "rx_truncated", "rx_oversize", "filtered",
                            "oversize", "broken_chain", "egress_mtu", "tx_error", "tx_link_down"}


# --- frames larger than the egress MTU --------------------------------------------------


def test_frames_larger_than_the_egress_mtu_are_dropped_as_egress_mtu(lab: Lab, start_bridge: Any) -> None:
    """1000 frames of 1518 bytes into a 1500-MTU egress: none forwarded, 1000 egress_mtu."""
    for ns, ifname in ((lab.ns_left, lab.left_if), (lab.ns_bridge, lab.bridge_left_if)):
        lab.ip(ns, "link", "set", "dev", ifname, "mtu", "1504")  # 1518-byte frames come in
    rb = start_bridge(lab)
    token = os.urandom(8)
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    try:
        before = a_to_b(rb)
        r0 = ifstats(lab, lab.ns_right, lab.right_if)["rx"]
        paced_send(tx, [frame(lab, token, i, 1518) for i in range(1000)], 20_000)
        wait_for(lambda: a_to_b(rb)["received"] - before["received"] >= 1000, 10.0, "1000 frames received")
        after = settle(lambda: a_to_b(rb))
        assert after["received"] - before["received"] == 1000
        assert after["forwarded"] - before["forwarded"] == 0
        assert after["dropped"]["egress_mtu"] - before["dropped"]["egress_mtu"] == 1000
        assert ifstats(lab, lab.ns_right, lab.right_if)["rx"] == r0
        assert Collector(rx, token).poll() == 0
        print(f"mtu: {after}")
    finally:
        tx.close()
        rx.close()


# --- egress link down, far end down ------------------------------------------------------


@pytest.mark.parametrize(("where", "query"), [("egress", ""), ("far_end", ""), ("far_end", "?tx_ring=0")])
def test_link_down_under_traffic_loses_frames_under_tx_link_down_only(lab: Lab, start_bridge: Any,
                                                                      where: str, query: str) -> None:
    """3000 frames at ~3 kpps; from frame 1000 to 2000 the bridge's egress veth is down
    (`egress`) or the far end is (`far_end`: no carrier on the egress veth); through the TX
    ring and through sendmmsg (`tx_ring=0`).  Every frame
    is forwarded (and arrives) or counted under tx_link_down; the forwarder waits instead
    of spinning and counts no stall per attempt."""
    ns, ifname = ((lab.ns_bridge, lab.bridge_right_if) if where == "egress"
                  else (lab.ns_right, lab.right_if))
    rb = start_bridge(lab, query=query)
    token = os.urandom(8)
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    got = Collector(rx, token)
    n = 3000

    def poll() -> None:
        try:
            got.poll()
        except OSError as e:  # the far end's socket reports its link going down, once
            if e.errno != errno.ENETDOWN:
                raise
            got.poll()

    def during(i: int) -> None:
        if i == 1000:
            lab.set_up(ns, ifname, False)
        elif i == 2000:
            lab.set_up(ns, ifname, True)
            # the far end's carrier is back before the rest is sent
            wait_for(lambda: "LOWER_UP" in lab.link(lab.ns_bridge, lab.bridge_right_if)["flags"],
                     5.0, "the egress carrier")
        if i % 100 == 0:
            poll()

    try:
        before = a_to_b(rb)
        polls = rb.fwd.polls
        paced_send(tx, [frame(lab, token, i) for i in range(n)], 3000, during)
        wait_for(lambda: a_to_b(rb)["received"] - before["received"] >= n, 10.0, f"{n} frames received")
        after = settle(lambda: a_to_b(rb))
        poll()
        d = {k: after[k] - before[k] for k in ("received", "forwarded", "tx_stalls")}
        dropped = {r: after["dropped"][r] - before["dropped"][r] for r in after["dropped"]}
        print(f"{where} down{query}: {d}, dropped {dropped}, arrived {len(got.frames)}, "
              f"polls {rb.fwd.polls - polls}")
        assert d["received"] == n
        assert d["received"] == d["forwarded"] + sum(dropped.values())
        assert {r: k for r, k in dropped.items() if k} == {"tx_link_down": n - d["forwarded"]}
        assert 0 < dropped["tx_link_down"] <= 1100  # about the frames sent while it was down
        assert len(got.frames) == d["forwarded"]  # forwarded frames all arrived ...
        seqs = [struct.unpack_from("!I", f, 22)[0] for f in got.frames]
        assert seqs == sorted(seqs) and seqs[0] == 0 and seqs[-1] == n - 1  # ... in order
        # waiting, not spinning: no stall per attempt, and no more wake-ups than frames
        assert d["tx_stalls"] <= 10
        assert rb.fwd.polls - polls <= 2 * n
    finally:
        tx.close()
        rx.close()
