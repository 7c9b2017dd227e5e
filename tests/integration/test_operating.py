"""Operating `nmbridge run` in a netns lab (root): a filter reloaded under steady afpacket:
traffic loses no frame, and the bridge runs as an unprivileged user with capabilities.

left ns -- veth -- [bridge ns: nmbridge run, two afpacket: ports] -- veth -- right ns
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from rawio import NmbridgeRun, RawPort, wait_for

from nmbridge import netns
from nmbridge.control import request
from nmbridge.netns import Lab

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0
FRAMES = 3000  # frames sent, with a reload after every sixth of them
WINDOW = 200  # frames in flight at most (the kernel's per-CPU backlog holds 1000)
PASS_TYPE, MAYBE_TYPE = 0x88B5, 0x88B6  # local experimental ethertypes; the filter drops the second or not

FILTER = """
[filter.f]
default = "pass"
[[filter.f.rule]]
name = "maybe"
action = "{action}"
ethertype = 0x88b6
"""



@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns.lab() as lb:
        yield lb


def frame(lb: Lab, token: bytes, seq: int, ethertype: int) -> bytes:
    dst, src = lb.mac(lb.ns_right, lb.right_if), lb.mac(lb.ns_left, lb.left_if)
    return dst + src + struct.pack("!H", ethertype) + token + struct.pack("!I", seq) + bytes(34)


@pytest.mark.root
def test_sighup_swaps_a_filter_under_steady_traffic_and_loses_no_frame(lab: Lab, tmp_path: Path) -> None:
    cfg = tmp_path / "bridge.toml"
    head = ('[bridge]\nstats_interval = 0\nbackend = "afpacket"\n'
            f'[[pair]]\nname = "lab"\nports = ["{lab.bridge_left_if}", "{lab.bridge_right_if}"]\n'
            'filter = "f"\n')
    cfg.write_text(head + FILTER.format(action="drop"))
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock)
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    token = os.urandom(8)
    delivered = {PASS_TYPE: 0, MAYBE_TYPE: 0}
    sent = {PASS_TYPE: 0, MAYBE_TYPE: 0}
    reloads = 0

    def filtered() -> int:
        d = request(sock, "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"]
        return int(d["dropped"]["filtered"])

    def drain() -> None:
        for f in rx.recv_all():
            if f[14:22] == token:
                delivered[int.from_bytes(f[12:14], "big")] += 1

    try:
        run.wait_event("ready")
        n = 0
        dropped = 0
        deadline = time.monotonic() + DEADLINE
        while n < FRAMES:
            assert time.monotonic() < deadline, "the traffic did not get through in time"
            drain()
            # in flight = sent - delivered - dropped; `filtered` read now is a lower bound
            # of the drops, so the window never overfills the kernel's queues
            if n - sum(delivered.values()) - dropped >= WINDOW:
                select.select([rx.sock], [], [], 0.01)
                dropped = filtered()
                continue
            kind = MAYBE_TYPE if n % 4 == 3 else PASS_TYPE
            tx.send(frame(lab, token, n, kind))
            sent[kind] += 1
            n += 1
            if n % (FRAMES // 6) == 0 and n < FRAMES:  # a new filter, frames in flight: drop <-> pass
                cfg.write_text(head + FILTER.format(action="pass" if reloads % 2 == 0 else "drop"))
                run.proc.send_signal(signal.SIGHUP)
                reloads += 1
        # every frame sent is delivered or counted as dropped by the filter, none lost
        wait_for(lambda: (drain(), sum(delivered.values()) + filtered())[1] == n, timeout=10,
                 what=f"delivered + filtered == {n} sent (delivered {delivered}, filtered {filtered()})")
        stopped = run.stop()
    finally:
        run.kill()
        tx.close()
        rx.close()
    counters = stopped["counters"]["lab"]["a_to_b"]
    drops = counters["drops"]
    assert sum(delivered.values()) + drops["filtered"] == sum(sent.values()) == n
    assert counters["dropped"] == drops["filtered"]  # no other reason
    # the identity, to the frame: every frame sent was received, and forwarded or filtered
    assert counters["received"] == n and counters["queued"] == 0
    assert counters["forwarded"] == sum(delivered.values())
    # both filters were in force for a while: some of those frames dropped, some delivered
    assert 0 < drops["filtered"] < sent[MAYBE_TYPE] and 0 < delivered[MAYBE_TYPE]
    assert delivered[PASS_TYPE] == sent[PASS_TYPE]
    done = [e for e in run.seen if e["event"] == "reloaded"]
    assert len(done) == reloads == 5
    assert all(e["filters"] == {"lab": {"a_to_b": "f", "b_to_a": "f"}} and e["restarted"] == [] for e in done)
    assert [e["event"] for e in run.seen].count("forwarding") == 1  # never restarted


def _setpriv(*caps: str) -> list[str]:
    """setpriv as uid/gid 65534 with only `caps` (plus dac_read_search when the interpreter
    is where 65534 may not look, as under /root/.pyenv)."""
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(["setpriv", *nobody, sys.executable, "-c", "import nmbridge.cli"],
                           capture_output=True, timeout=60, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wanted = list(caps) if probe.returncode == 0 else [*caps, "dac_read_search"]
    if not wanted:
        return ["setpriv", *nobody]
    spec = ",".join(f"+{c}" for c in wanted)
    return ["setpriv", *nobody, f"--inh-caps={spec}", f"--ambient-caps={spec}"]


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory uid 65534 can read (pytest's tmp_path is root's alone)."""
    d = Path(tempfile.mkdtemp(prefix="nmbtest-"))
    d.chmod(0o755)
    try:
        yield d
    finally:
        shutil.rmtree(d)


@pytest.mark.root
def test_an_unprivileged_user_with_capabilities_forwards_on_veth(lab: Lab, public_dir: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    cfg = public_dir / "bridge.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0\n[[pair]]\nname = "lab"\n'
                   f'ports = ["afpacket:{lab.bridge_left_if}", "afpacket:{lab.bridge_right_if}"]\n')
    cfg.chmod(0o644)
    state = public_dir / "state"  # /run/nmbridge is root's: the service gets its own (RuntimeDirectory)
    state.mkdir()
    os.chown(state, 65534, 65534)
    run = NmbridgeRun(lab, cfg, *_setpriv("net_admin", "net_raw"), state=state)
    tx, rx = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    token = os.urandom(8)
    try:
        run.wait_event("ready")
        status = Path(f"/proc/{run.proc.pid}/status").read_text()
        assert "\nUid:\t65534\t65534\t65534\t65534\n" in status
        sent = [frame(lab, token, i, PASS_TYPE) for i in range(500)]
        got: list[bytes] = []
        for f in sent:
            tx.send(f)
        wait_for(lambda: (got.extend(f for f in rx.recv_all() if f[14:22] == token), len(got))[1] >= 500,
                 what="500 frames through the unprivileged bridge")
        assert got == sent
        stopped = run.stop()
    finally:
        run.kill()
        tx.close()
        rx.close()
    assert stopped["counters"]["lab"]["a_to_b"]["forwarded"] >= 500
    assert any(e["event"] == "link_ready" for e in run.seen)  # it did set the links up


@pytest.mark.root
def test_without_capabilities_it_fails_in_one_line_naming_them(lab: Lab, public_dir: Path) -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    cfg = public_dir / "bridge.toml"
    cfg.write_text(f'[[pair]]\nports = ["afpacket:{lab.bridge_left_if}", "afpacket:{lab.bridge_right_if}"]\n')
    cfg.chmod(0o644)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    base = ["ip", "netns", "exec", lab.ns_bridge]
    argv = [sys.executable, "-m", "nmbridge", "run", "-c", str(cfg), "--control", ""]
    p = subprocess.run([*base, *_setpriv(), *argv], capture_output=True, text=True, timeout=60, env=env)
    assert (p.returncode, p.stdout) == (1, "")
    assert p.stderr == ("nmbridge: nmbridge run needs CAP_NET_RAW (afpacket: ports) and CAP_NET_ADMIN "
                        "(link set-up; or run --no-link-setup): run as root, or give the service "
                        "AmbientCapabilities=CAP_NET_RAW CAP_NET_ADMIN (see etc/systemd/nmbridge.service)\n")
    # CAP_NET_RAW alone: link set-up is on here, so CAP_NET_ADMIN is named, and only it
    p = subprocess.run([*base, *_setpriv("net_raw"), *argv], capture_output=True, text=True, timeout=60,
                       env=env)
    assert p.returncode == 1 and p.stderr.count("\n") == 1
    assert "needs CAP_NET_ADMIN (link set-up; or run --no-link-setup)" in p.stderr
    assert "CAP_NET_RAW" not in p.stderr.split(":")[1]
