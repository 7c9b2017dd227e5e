"""`nmbridge run` tried from outside, the way a user breaks it (root, netns lab with 2-queue
veths): trafgen at full speed both ways through a `workers = 2` pair, stopped by SIGTERM
mid-traffic; links set down, re-created and re-sized under traffic; reloads that change
`workers` under traffic; signals during start-up; SIGPIPE on the client; garbage on the
control socket while forwarding; configs a 2-queue lab cannot run; an egress MTU lowered
under traffic.

Each checks the counter contract to the frame: per pair, direction and worker, received =
forwarded + drops + queued, in `nmbridge stats`, in one metrics scrape and in the `stopped`
(and `pair_stopped`) events.  Since `queued` is what the identity leaves over, that alone can
never fail: what can is `queued` going back to 0 in every worker once traffic stops (a frame
lost uncounted stays there), and the interfaces' own counters: what the near veth received is
`received`, what the far veth got (plus the kernel's drops) is `forwarded`.

left ns -- veth (2 queues) -- [bridge ns: nmbridge run] -- veth (2 queues) -- right ns
"""

from __future__ import annotations

import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from rawio import ROOT, Collector, NmbridgeRun, RawPort, wait_for
from test_afpacket_fanout import udp_frame

from nmbridge import netns
from nmbridge.backends import OpenOptions, PortSet, backend, parse_spec
from nmbridge.control import MAX_CONNECTIONS, request
from nmbridge.netns import Lab

pytestmark = pytest.mark.root

KINDS = ["afpacket", "afxdp"]
DEADLINE = 20.0  # seconds any awaited condition may take
METRICS_PORT = 9197  # in the bridge namespace's own loopback


@pytest.fixture
def lab2() -> Iterator[Lab]:
    with netns.lab(queues=2) as lb:
        yield lb


def need(kind: str) -> None:
    if kind == "afxdp" and (why := backend("afxdp").unavailable()):
        pytest.skip(why)


def write_config(lb: Lab, path: Path, kind: str, workers: int | str = 2, extra: str = "") -> Path:
    cpus = sorted(os.sched_getaffinity(0))[:2]
    path.write_text(f'[bridge]\nstats_interval = 0\nbackend = "{kind}"\n{extra}'
                    f'[[pair]]\nname = "lab"\nports = ["{lb.bridge_left_if}", "{lb.bridge_right_if}"]\n'
                    f"workers = {json.dumps(workers)}\ncpus = {cpus}\n")
    return path


# --- traffic ---------------------------------------------------------------------------------

def trafgen_conf(lb: Lab, ns: str, ifname: str, path: Path, cpu: int | None = None) -> Path:
    """60-byte IPv4/UDP frames of 64 flows (the UDP source port's low byte) from `ifname`'s
    address to one no interface has (the far stack drops them at once); `cpu`: trafgen sends
    them from that CPU only (a veth's receive queue is the sending CPU's, modulo the queues)."""
    src = lb.mac(ns, ifname)
    ip = bytes.fromhex("4500002e00000000401100000a4d00010a4d0002")
    ip = ip[:10] + netns.inet_checksum(ip).to_bytes(2, "big") + ip[12:]
    head = [f"0x{b:02x}" for b in bytes.fromhex("02000000a77e") + src + bytes.fromhex("0800") + ip + b"\x9c"]
    tail = [f"0x{b:02x}" for b in bytes.fromhex("0009001a0000") + bytes(18)]
    where = f"cpu({cpu}): " if cpu is not None else ""
    path.write_text(where + "{ " + ", ".join([*head, "dinc(0, 63)", *tail]) + " }\n")
    return path


@contextmanager
def trafgen(lb: Lab, ns: str, ifname: str, conf: Path, cpus: int = 1) -> Iterator[subprocess.Popen[bytes]]:
    """trafgen at full speed from `ifname` until the block ends (its whole process group)."""
    gen = lb.popen(ns, "trafgen", "-o", ifname, "-i", str(conf), "--cpus", str(cpus), "--no-sock-mem",
                   "--notouch-irq", "--no-cpu-stats", stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                   start_new_session=True)
    try:
        yield gen
    finally:
        stop_group(gen)


def stop_group(p: subprocess.Popen[bytes]) -> None:
    for sig in (signal.SIGINT, signal.SIGKILL):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            return
        deadline = time.monotonic() + 5.0
        while time.monotonic() < deadline:
            try:
                os.killpg(p.pid, 0)
            except ProcessLookupError:
                p.wait()
                return
            p.poll()
            time.sleep(0.01)


@contextmanager
def both_ways(lb: Lab, tmp: Path, kind: str) -> Iterator[None]:
    """trafgen in left and in right at once; for afxdp: left's on CPU 0 and right's on CPU 1,
    so that each direction reaches its own receive queue (and worker)."""
    lconf = trafgen_conf(lb, lb.ns_left, lb.left_if, tmp / "l.cfg", 0 if kind == "afxdp" else None)
    rconf = trafgen_conf(lb, lb.ns_right, lb.right_if, tmp / "r.cfg", 1 if kind == "afxdp" else None)
    ncpu = 2 if kind == "afxdp" else 1
    with trafgen(lb, lb.ns_left, lb.left_if, lconf, ncpu), trafgen(lb, lb.ns_right, lb.right_if, rconf, ncpu):
        yield


# --- counters --------------------------------------------------------------------------------

def balance(d: dict[str, Any]) -> int:
    dropped = d["dropped"]
    total = sum(dropped.values()) if isinstance(dropped, dict) else dropped
    return int(d["received"] - d["forwarded"] - total - d["queued"])


def pair_stats(sock: str) -> dict[str, Any]:
    """The pair's `nmbridge stats`, checked: every worker and the pair balance, and the pair's
    counters are the workers' sums."""
    pair: dict[str, Any] = request(sock, "stats")["snapshot"]["pairs"][0]
    ws = pair.get("workers", [])
    for d, tot in pair["directions"].items():
        assert balance(tot) == 0, (d, tot)
        per = [w["directions"][d] for w in ws]
        assert all(balance(x) == 0 for x in per), (d, per)
        for k in ("received", "forwarded", "queued"):
            assert sum(x[k] for x in per) == tot[k], (d, k, per, tot)
    return pair


def check_final(ev: dict[str, Any], workers: int | None = None) -> None:
    """A `stopped` or `pair_stopped` event's counters balance (its own shape), and so do its
    workers' (`workers`: how many it must list), whose sums are the pair's; its ports are
    closed, so nothing is queued (what the drain at stop left is a `stopped` drop)."""
    stopped = ev["event"] == "stopped"
    counters = ev["counters"]["lab"] if stopped else ev["counters"]
    ws = (ev.get("workers", {}).get("lab", []) if stopped else ev.get("workers", []))
    if workers is not None:
        assert len(ws) == (workers if workers > 1 else 0), ev
    for d, c in counters.items():
        for x in [c, *(w["directions"][d] for w in ws)]:
            assert x["dropped"] == sum(x["drops"].values()), (d, x)
            assert balance(x) == 0 and x["queued"] == 0 and "stopped" in x["drops"], (d, x)
        for k in ("received", "forwarded", "queued", "dropped") if ws else ():
            assert sum(w["directions"][d][k] for w in ws) == c[k], (d, k, ws, c)


def flowing(sock: str, frames: int = 2000) -> None:
    """Both directions forward `frames` more frames (each stats read checked)."""
    start = {d: s["forwarded"] for d, s in pair_stats(sock)["directions"].items()}

    def more() -> bool:
        return all(s["forwarded"] >= start[d] + frames for d, s in pair_stats(sock)["directions"].items())

    wait_for(more, DEADLINE, f"{frames} more frames forwarded both ways")


def crosses(lb: Lab, left: RawPort, n: int = 64) -> None:
    """`n` UDP frames sent from `left` all arrive at right (within DEADLINE)."""
    right = RawPort(lb.ns_right, lb.right_if)
    try:
        token = secrets.token_bytes(8)
        at_right = Collector(right, token)
        lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
        for seq in range(n):
            left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + seq, token, seq, seq))
        at_right.wait(n, DEADLINE)
    finally:
        right.close()


def settle(sock: str) -> dict[str, Any]:
    """Once traffic stopped: nothing stays queued, in any worker (queued is what the identity
    leaves over: a frame lost without a count would stay there), and two reads agree."""
    last: list[dict[str, Any]] = [{}]

    def idle() -> bool:
        pair = pair_stats(sock)
        ws = pair.get("workers", [])
        queued = [x["queued"] for p in [pair, *ws] for x in p["directions"].values()]
        done = pair == last[0] and not any(queued)
        last[0] = pair
        return done

    wait_for(idle, DEADLINE, "nothing queued in any worker")
    return last[0]


def scrape(lb: Lab) -> dict[tuple[str, ...], float]:
    """One scrape of the metrics endpoint: (name, label=value, ...) -> value."""
    s = netns.netns_socket(lb.ns_bridge, socket.AF_INET, socket.SOCK_STREAM)
    try:
        s.settimeout(10)
        s.connect(("127.0.0.1", METRICS_PORT))
        s.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    finally:
        s.close()
    out: dict[tuple[str, ...], float] = {}
    for line in body.decode().split("\r\n\r\n", 1)[1].splitlines():
        m = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if m and not line.startswith("#"):
            labels = tuple(sorted(re.findall(r'(\w+="[^"]*")', m.group(2) or "")))
            out[(m.group(1), *labels)] = float(m.group(3))
    return out


def check_metrics(lb: Lab, workers: int) -> None:
    """In one scrape, per direction (pair totals, and each worker): received = forwarded +
    drops + queued; the worker series sum to the pair's."""
    m = scrape(lb)
    for d in ("a_to_b", "b_to_a"):
        series = [("nmbridge", ())] + [("nmbridge_worker", (f'worker="{w}"',)) for w in range(workers)]
        for prefix, extra in series:
            key = tuple(sorted(('direction="' + d + '"', 'pair="lab"', *extra)))

            def get(name: str, key: tuple[str, ...] = key) -> float:
                return m[(name, *key)]

            drops = sum(v for k, v in m.items() if k[0] == f"{prefix}_drops_total"
                        and set(key) <= set(k[1:]))
            assert get(f"{prefix}_received_total") == (get(f"{prefix}_forwarded_total") + drops
                                                      + get(f"{prefix}_queued")), (prefix, d)
        for name in ("received_total", "forwarded_total", "queued"):
            pair_key = tuple(sorted(('direction="' + d + '"', 'pair="lab"')))
            per = [m[(f"nmbridge_worker_{name}", *sorted((*pair_key, f'worker="{w}"')))]
                   for w in range(workers)]
            assert sum(per) == m[(f"nmbridge_{name}", *pair_key)], (name, d)


def arrived(lb: Lab, ns: str, ifname: str, bridge_if: str, was: dict[str, int], was_b: dict[str, int]) -> int:
    """Frames that reached `ifname` from its peer `bridge_if` since `was`/`was_b`, or that the
    kernel dropped on the way (the peer's tx_dropped, its own rx_dropped)."""
    now, now_b = link_counts(lb, ns, ifname), link_counts(lb, lb.ns_bridge, bridge_if)
    return (now["rx"] - was["rx"]) + (now["rx_dropped"] - was["rx_dropped"]) + (now_b["tx_dropped"]
                                                                               - was_b["tx_dropped"])


def link_counts(lb: Lab, ns: str, ifname: str) -> dict[str, int]:
    s = lb.link(ns, ifname)["stats64"]
    return {"rx": s["rx"]["packets"], "rx_dropped": s["rx"]["dropped"], "tx_dropped": s["tx"]["dropped"]}


# --- 1. overload, then SIGTERM mid-traffic ---------------------------------------------------

@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("kind", KINDS)
def test_overload_both_ways_then_sigterm_balances_and_matches_the_far_ends(
        lab2: Lab, tmp_path: Path, kind: str, workers: int) -> None:
    need(kind)
    lb = lab2
    lb.ip(lb.ns_bridge, "link", "set", "lo", "up")
    metrics = f'[metrics]\nlisten = "127.0.0.1:{METRICS_PORT}"\n'
    cfg = write_config(lb, tmp_path / "b.toml", kind, workers, extra=metrics)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, cfg, control=sock)
    try:
        run.wait_event("ready")
        far = [(lb.ns_right, lb.right_if, lb.bridge_right_if), (lb.ns_left, lb.left_if, lb.bridge_left_if)]
        before = [(link_counts(lb, ns, i), link_counts(lb, lb.ns_bridge, b)) for ns, i, b in far]
        start = {"a_to_b": link_counts(lb, lb.ns_bridge, lb.bridge_left_if)["rx"],
                 "b_to_a": link_counts(lb, lb.ns_bridge, lb.bridge_right_if)["rx"]}
        with both_ways(lb, tmp_path, kind):
            flowing(sock, 20000)
            pair = pair_stats(sock)
            # afxdp: each direction on its own queue; afpacket: the fanout hash spreads the flows
            assert all(sum(x["forwarded"] for x in w["directions"].values()) > 0 for w in pair["workers"])
            check_metrics(lb, workers)
        pair = settle(sock)  # the generators stopped: every frame is accounted for, exactly
        check_metrics(lb, workers)
        for d, (ns, i, b), (was, was_b) in zip(("a_to_b", "b_to_a"), far, before, strict=True):
            c = pair["directions"][d]
            # what the bridge counted forwarded is what the far end got or its kernel dropped;
            # what it counted received is what the near veth got
            assert c["forwarded"] == arrived(lb, ns, i, b, was, was_b), (d, c)
            near = (lb.ns_bridge, lb.bridge_left_if if d == "a_to_b" else lb.bridge_right_if)
            assert c["received"] == link_counts(lb, *near)["rx"] - start[d], (d, c)
            assert c["forwarded"] >= 20000, c
        with both_ways(lb, tmp_path, kind):
            flowing(sock, 5000)
            stopped = run.stop()  # SIGTERM while both generators still run
            near = {d: link_counts(lb, lb.ns_bridge, i)["rx"] - start[d]
                    for d, i in (("a_to_b", lb.bridge_left_if), ("b_to_a", lb.bridge_right_if))}
        check_final(stopped, workers)
        # the egress veths take every frame (a full peer drops it, counted on the veth): the
        # drain sends out all that was inside within its bound, so nothing is `stopped`
        # (without a drain, overloaded rings lost hundreds of frames here at every stop)
        drain = stopped["drain"]["lab"]
        assert drain["complete"] is True, drain
        for d, (ns, i, b), (was, was_b) in zip(("a_to_b", "b_to_a"), far, before, strict=True):
            c = stopped["counters"]["lab"][d]
            # the drain at stop sent out what was inside the bridge; what it could not is a
            # drop (`stopped`): nothing is left queued, and what the bridge counted forwarded
            # is exactly what reached the far end (or its kernel dropped): nothing went out
            # uncounted after the stop, nothing counted was lost at close
            assert c["queued"] == 0 and "stopped" in c["drops"], (d, c)
            assert c["forwarded"] == arrived(lb, ns, i, b, was, was_b), (d, c)
            assert c["received"] <= near[d], (d, c, near)  # the generators ran on after the stop
            assert c["drops"]["stopped"] == 0, (d, c, drain)
    finally:
        run.kill()


# --- 2. link faults under traffic ------------------------------------------------------------

def recreate_right(lb: Lab, queues: int = 2) -> None:
    """The right veth again, `queues` per end (after its bridge end, and so its peer, was deleted)."""
    qs = ("numtxqueues", str(queues), "numrxqueues", str(queues))
    netns.run("ip", "link", "add", lb.right_if, *qs, "type", "veth", "peer", "name", lb.bridge_right_if, *qs)
    netns.run("ip", "link", "set", "dev", lb.right_if, "netns", lb.ns_right)
    netns.run("ip", "link", "set", "dev", lb.bridge_right_if, "netns", lb.ns_bridge)
    lb.set_up(lb.ns_right, lb.right_if)
    lb.set_up(lb.ns_bridge, lb.bridge_right_if)


@pytest.mark.parametrize("kind", KINDS)
def test_link_down_mtu_and_a_recreated_veth_under_traffic(lab2: Lab, tmp_path: Path, kind: str) -> None:
    need(kind)
    lb = lab2
    cfg = write_config(lb, tmp_path / "b.toml", kind)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, cfg, control=sock, state=tmp_path / "state")
    try:
        run.wait_event("ready")
        with both_ways(lb, tmp_path, kind):
            flowing(sock)
            lb.set_up(lb.ns_bridge, lb.bridge_left_if, False)
            run.wait_event("link_down", ifname=lb.bridge_left_if)
            pair_stats(sock)
            lb.set_up(lb.ns_bridge, lb.bridge_left_if, True)
            run.wait_event("link_up", ifname=lb.bridge_left_if)
            flowing(sock)
            for mtu in ("1400", "9000", "1500"):  # 60-byte frames: every MTU carries them
                lb.ip(lb.ns_bridge, "link", "set", "dev", lb.bridge_right_if, "mtu", mtu)
                flowing(sock)
            lb.ip(lb.ns_bridge, "link", "del", lb.bridge_right_if)  # right's trafgen loses its link too
            run.wait_event("link_down", ifname=lb.bridge_right_if, operstate="NOTPRESENT")
            pair_stats(sock)
        recreate_right(lb)
        run.wait_event("relinked", pair="lab")
        assert not run.events("pair_lost") and not run.events("relink_failed")
        check_final(run.events("pair_stopped")[-1], workers=2)  # the pair's ports before the re-open
        with both_ways(lb, tmp_path, kind):
            flowing(sock)  # through the new interface, both ways, on both workers again
            assert len(pair_stats(sock)["workers"]) == 2
        settle(sock)
        check_final(run.stop(), workers=2)
    finally:
        run.kill()


@pytest.mark.parametrize("kind", KINDS)
def test_every_worker_follows_an_mtu_lowered_while_it_forwards(lab2: Lab, tmp_path: Path, kind: str) -> None:
    """The ports check the egress MTU themselves (the kernel does not: afpacket's TX ring has a
    virtio_net_hdr; an AF_XDP transmit is not checked): lowered while the workers forward, each
    must start counting egress_mtu within its re-read period (time, not txsyncs: a worker
    moving whole batches does few), long before 2000 more frames; every frame is forwarded or
    counted egress_mtu.  (afxdp: this test's frames all leave from one CPU, so one queue.)"""
    need(kind)
    lb = lab2
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, write_config(lb, tmp_path / "b.toml", kind), control=sock)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
    token = secrets.token_bytes(8)
    sent = 0

    def send(n: int) -> None:
        nonlocal sent
        for _ in range(n):
            f = udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + sent % 64, token, sent % 64, sent)
            left.send(f + bytes(1400 - len(f)))
            sent += 1

    try:
        run.wait_event("ready")
        at_right = Collector(right, token)
        send(64)
        at_right.wait(64, DEADLINE)
        active = [w["worker"] for w in pair_stats(sock)["workers"] if w["directions"]["a_to_b"]["forwarded"]]
        assert active == [0, 1] or (kind == "afxdp" and active), active
        lb.ip(lb.ns_bridge, "link", "set", "dev", lb.bridge_right_if, "mtu", "1000")
        before = sent

        def every_worker_drops() -> bool:
            send(8)
            ws = pair_stats(sock)["workers"]
            return sent - before >= 2000 or all(ws[w]["directions"]["a_to_b"]["dropped"]["egress_mtu"]
                                                for w in active)

        wait_for(every_worker_drops, DEADLINE, "every worker to count egress_mtu")
        assert sent - before < 2000, [w["directions"]["a_to_b"] for w in pair_stats(sock)["workers"]]
        c = settle(sock)["directions"]["a_to_b"]  # each frame: forwarded (sent before the
        # worker re-read the MTU) or egress_mtu; the lab's own rare frames count too
        assert c["received"] >= sent and c["forwarded"] + c["dropped"]["egress_mtu"] == c["received"], c
        assert at_right.poll() <= c["forwarded"], c
        check_final(run.stop(), workers=2)
    finally:
        left.close()
        right.close()
        run.kill()


@pytest.mark.parametrize("kind", KINDS)
def test_a_veth_recreated_with_too_few_queues_keeps_the_pair(lab2: Lab, tmp_path: Path, kind: str) -> None:
    """Re-created with 1 queue under a `workers = 2` pair: the re-open cannot work; it is refused
    in one line and the pair stays (it used to close the pair's healthy ports to retry, fail
    again and lose the pair for good: no ports, no counters, no stopped event); re-created again
    with 2 queues, it is re-opened and forwards."""
    need(kind)
    lb = lab2
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, write_config(lb, tmp_path / "b.toml", kind), control=sock, state=tmp_path / "state")
    left = RawPort(lb.ns_left, lb.left_if)
    try:
        run.wait_event("ready")
        for queues in (1, 2):
            lb.ip(lb.ns_bridge, "link", "del", lb.bridge_right_if)
            run.wait_event("link_down", ifname=lb.bridge_right_if, operstate="NOTPRESENT")
            recreate_right(lb, queues)
            if queues == 1:
                ev = run.wait_event("relink_failed", pair="lab")
                assert not run.events("pair_lost"), run.events("pair_lost")
                assert "re-created with 1 ring pair, and the pair runs 2 workers" in ev["error"], ev
                assert len(pair_stats(sock)["workers"]) == 2 and request(sock, "ports")["ports"]
        run.wait_event("relinked", pair="lab")
        assert not run.events("pair_lost")
        crosses(lb, left)
        settle(sock)
        check_final(run.stop(), workers=2)
    finally:
        left.close()
        run.kill()


# --- 3. signals ------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_sighup_reloads_workers_2_1_2_under_traffic_then_sigint_twice(
        lab2: Lab, tmp_path: Path, kind: str) -> None:
    need(kind)
    lb = lab2
    cfg = write_config(lb, tmp_path / "b.toml", kind)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, cfg, control=sock)
    try:
        run.wait_event("ready")
        with both_ways(lb, tmp_path, kind):
            flowing(sock)
            for n in (1, 2):
                write_config(lb, cfg, kind, workers=n)
                run.proc.send_signal(signal.SIGHUP)
                ev = run.wait_event("reloaded", source="SIGHUP")
                assert ev["restarted"] == ["lab"] and ev["failed"] == {}, ev
                assert len(pair_stats(sock).get("workers", [])) == n
                flowing(sock)
                check_final(run.events("pair_stopped")[-1], workers=3 - n)  # the pair before
        settle(sock)
        run.proc.send_signal(signal.SIGINT)
        run.proc.send_signal(signal.SIGINT)
        stopped = run.wait_event("stopped")
        assert run.proc.wait(DEADLINE) == 0
        assert not run.events("reload_failed") and not run.events("pair_lost")
        check_final(stopped, workers=2)
    finally:
        run.kill()


def run_until(lb: Lab, cfg: Path, tmp: Path, event: str, sig: int) -> tuple[int, list[str], str]:
    """`nmbridge run`, sent `sig` as soon as it logs `event`: exit status, events, stderr."""
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    p = lb.popen(lb.ns_bridge, sys.executable, "-m", "nmbridge", "--log-format", "json", "run",
                 "-c", str(cfg), "--control", str(tmp / "c.sock"), "--state-dir", str(tmp / "state"),
                 cwd="/", env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    events: list[str] = []
    assert p.stdout is not None
    for line in p.stdout:
        events.append(json.loads(line)["event"])
        if events[-1] == event:
            p.send_signal(sig)
            break
    out, err = p.communicate(timeout=DEADLINE)
    events += [json.loads(line)["event"] for line in out.splitlines()]
    return p.returncode, events, err


@pytest.mark.parametrize("kind", KINDS)
def test_sigterm_during_start_up_stops_cleanly(lab2: Lab, tmp_path: Path, kind: str) -> None:
    need(kind)
    lb = lab2
    cfg = write_config(lb, tmp_path / "b.toml", kind)
    for event in ("link_ready", "port_opened", "forwarding"):
        rc, events, err = run_until(lb, cfg, tmp_path, event, signal.SIGTERM)
        assert (rc, err) == (0, ""), (event, rc, err)
        assert events[-1] == "stopped" and "stopping" in events, (event, events)
        for ifname in (lb.bridge_left_if, lb.bridge_right_if):  # given back: no promisc, no XDP
            info = lb.link(lb.ns_bridge, ifname)
            assert "PROMISC" not in info["flags"] and "xdp" not in info, (event, info)


def test_sigpipe_on_the_clients_is_quiet(lab2: Lab, tmp_path: Path) -> None:
    lb = lab2
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, write_config(lb, tmp_path / "b.toml", "afpacket"), control=sock)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    try:
        run.wait_event("ready")
        for cmd in ("stats", "stats --json", "ports", "ports --json", "stats --watch 0.05"):
            line = f'"$0" -m nmbridge {cmd} --control {sock} | head -c 20 >/dev/null; '
            line += 'echo "${PIPESTATUS[0]}"'
            r = subprocess.run(["bash", "-c", line, sys.executable], capture_output=True, text=True, env=env,
                               timeout=DEADLINE)
            assert r.stderr == "" and r.stdout.strip() in ("0", "141"), (cmd, r.stdout, r.stderr)
        pair_stats(sock)  # the bridge did not notice
        run.stop()
    finally:
        run.kill()


# --- 4. bad input ----------------------------------------------------------------------------

GARBAGE = [  # (a request, whether it may succeed: known commands ignore arguments they do not take)
    (b"\x00\xff\xfe garbage\n", False),
    (b"{}\n", False),
    (b'{"cmd": 5}\n', False),
    (b'{"cmd": "stats"\n', False),
    (b"[" * 100_000 + b"\n", False),
    (b'{"cmd": "capture", "pair": "nope", "write": "-"}\n', False),  # no such pair
    (b'{"cmd": "capture", "pair": "lab", "write": "-"}\n', True),  # 2 workers: one tap each
    (b'{"cmd": "capture", "pair": "lab", "count": "many"}\n', False),
    (b'{"cmd": "reload", "source": {"x": 1}}\n', True),
    (b'{"cmd": "ports", "pair": [1, 2]}\n', True),
    (b"x" * (1 << 20), False),  # one huge line, no newline
]


def test_garbage_on_the_control_socket_while_two_workers_forward(lab2: Lab, tmp_path: Path) -> None:
    lb = lab2
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, write_config(lb, tmp_path / "b.toml", "afpacket"), control=sock)
    left, right = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    idle: list[socket.socket] = []
    try:
        run.wait_event("ready")
        lmac, rmac = lb.mac(lb.ns_left, lb.left_if), lb.mac(lb.ns_right, lb.right_if)
        token = secrets.token_bytes(8)
        at_right = Collector(right, token)
        for _ in range(MAX_CONNECTIONS // 2):  # clients that connect and say nothing
            c = socket.socket(socket.AF_UNIX)
            c.connect(sock)
            idle.append(c)
        sent = 0
        for junk, may in GARBAGE:
            for seq in range(20):
                left.send(udp_frame(rmac, lmac, lb.left_ip, "10.77.0.200", 20000 + seq, token, seq, sent))
                sent += 1
            c = socket.socket(socket.AF_UNIX)
            c.settimeout(DEADLINE)
            c.connect(sock)
            try:
                c.sendall(junk)
                c.shutdown(socket.SHUT_WR)
                reply = c.makefile("rb").readline()
            except (BrokenPipeError, ConnectionResetError):  # closed on us mid-line: allowed
                reply = b'{"ok": false}'
            finally:
                c.close()
            answer = json.loads(reply)
            assert answer["ok"] is False or may, (junk[:40], reply)
            # neither refused nor evicted: the idle clients above leave places free
            assert "control connections" not in answer.get("error", ""), (junk[:40], reply)
        at_right.wait(sent, DEADLINE)
        pair = settle(sock)
        assert pair["directions"]["a_to_b"]["forwarded"] >= sent
        assert request(sock, "ports")["ports"]  # still answering
        stopped = run.stop()
        check_final(stopped, workers=2)
        assert not [e for e in run.seen if e["level"] in ("error", "critical")]
    finally:
        for c in idle:
            c.close()
        left.close()
        right.close()
        run.kill()


@pytest.mark.parametrize("kind", KINDS)
def test_configs_a_two_queue_lab_cannot_run_are_one_line(lab2: Lab, tmp_path: Path, kind: str) -> None:
    need(kind)
    lb = lab2
    cfg = tmp_path / "b.toml"
    for workers, cpus, why in [(3, "[]", "has 2 ring pairs: at most 2 workers"),
                               (2, "[0, 4095]", "CPU 4095 is not one this process may run on")]:
        write_config(lb, cfg, kind, workers)
        cfg.write_text(re.sub(r"cpus = .*", f"cpus = {cpus}", cfg.read_text()))
        r = lb.exec(lb.ns_bridge, "env", f"PYTHONPATH={ROOT}", sys.executable, "-m", "nmbridge", "run",
                    "-c", str(cfg), "--control", "", "--state-dir", str(tmp_path / "state"), check=False)
        assert r.returncode == 78 and len(r.stderr.strip().splitlines()) == 1 and why in r.stderr, r.stderr
    # "auto" with no CPUs named: one worker per queue, not pinned
    write_config(lb, cfg, kind, "auto")
    cfg.write_text(re.sub(r"cpus = .*", "cpus = []", cfg.read_text()))
    run = NmbridgeRun(lb, cfg, control=str(tmp_path / "c.sock"))
    try:
        ev = run.wait_event("forwarding", pair="lab")
        assert [(w["worker"], w["cpu"]) for w in ev["workers"]] == [(0, None), (1, None)]
        check_final(run.stop(), workers=2)
    finally:
        run.kill()


# --- kernel-kept counters of a closed port ---------------------------------------------------

def test_afxdp_kernel_drops_outlive_the_port(lab: Lab) -> None:
    """Frames the kernel drops at an afxdp: port (its RX ring full: nobody forwards) are in the
    port's counters after it closes, though nothing read them before: the final `stopped`
    counters are read after the ports close."""
    need("afxdp")
    lb = lab
    ps = PortSet(OpenOptions(slots=256, buf_size=2048))
    (port,) = netns.in_netns(lb.ns_bridge, ps.open, [parse_spec(f"afxdp:{lb.bridge_left_if}")])
    left = RawPort(lb.ns_left, lb.left_if)
    try:
        was = link_counts(lb, lb.ns_bridge, lb.bridge_left_if)
        frame = lb.mac(lb.ns_right, lb.right_if) + lb.mac(lb.ns_left, lb.left_if) + b"\x88\xb5" + bytes(50)
        for _ in range(1000):
            left.send(frame)
        wait_for(lambda: link_counts(lb, lb.ns_bridge, lb.bridge_left_if)["rx"] - was["rx"] >= 1000, DEADLINE,
                 "1000 frames at the bridge's veth")
        dropped = link_counts(lb, lb.ns_bridge, lb.bridge_left_if)["rx_dropped"] - was["rx_dropped"]
        assert dropped > 0  # more than its 256-slot ring holds
    finally:
        left.close()
        ps.close()
    c = port.decode_counters(b"")  # type: ignore[attr-defined]
    assert c["rx_kernel_drops"] + c["rx_ring_full"] + c["rx_fill_empty"] == dropped, c
