"""The life of `nmbridge run` around its links, in a netns lab (root): one bridge per
interface, restore after kill -9, no bounce on a restart, re-created interfaces re-opened,
--no-link-setup warnings.

left ns -- veth -- [bridge ns: nmbridge run, two afpacket: ports] -- veth -- right ns
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from rawio import NmbridgeRun, RawPort, wait_for

from nmbridge import netns
from nmbridge.control import request
from nmbridge.netns import Lab

pytestmark = pytest.mark.root

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 60.0
TEST_TYPE = 0x88B5



@pytest.fixture
def lab() -> Iterator[Lab]:
    with netns.lab() as lb:
        yield lb


def write_config(lb: Lab, path: Path, extra: str = "") -> Path:
    path.write_text('[bridge]\nstats_interval = 0\nbackend = "afpacket"\n'
                    f'[[pair]]\nname = "lab"\nports = ["{lb.bridge_left_if}", "{lb.bridge_right_if}"]\n'
                    + extra)
    return path


def frame(lb: Lab, token: bytes, seq: int) -> bytes:
    dst, src = lb.mac(lb.ns_right, lb.right_if), lb.mac(lb.ns_left, lb.left_if)
    return dst + src + struct.pack("!H", TEST_TYPE) + token + struct.pack("!I", seq) + bytes(34)


def send_and_count(lb: Lab, n: int, timeout: float = 10.0) -> int:
    """Send n frames left to right; return how many arrived (waiting until all did or timeout)."""
    tx, rx = RawPort(lb.ns_left, lb.left_if), RawPort(lb.ns_right, lb.right_if)
    token = os.urandom(8)
    got = 0
    try:
        for i in range(n):
            tx.send(frame(lb, token, i))
        deadline = time.monotonic() + timeout
        while got < n and time.monotonic() < deadline:
            got += sum(1 for f in rx.recv_all() if f[14:22] == token)
            time.sleep(0.01)
    finally:
        tx.close()
        rx.close()
    return got


def flags(lb: Lab, ifname: str) -> tuple[bool, bool]:
    """(admin up, promiscuous flag) of a bridge-side interface: the flag as set through
    netlink, not an afpacket: socket's own promiscuous membership."""
    info = lb.link(lb.ns_bridge, ifname)
    return "UP" in info["flags"], "PROMISC" in info["flags"]


def test_a_second_bridge_on_the_same_interface_is_refused_before_touching_it(
        lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    first = NmbridgeRun(lab, cfg, control=str(tmp_path / "one.sock"), state=tmp_path / "state")
    try:
        first.wait_event("ready")
        assert send_and_count(lab, 50) == 50
        before = flags(lab, lab.bridge_left_if)
        second = subprocess.run(
            ["ip", "netns", "exec", lab.ns_bridge, sys.executable, "-m", "nmbridge", "--log-format", "json",
             "run", "-c", str(cfg), "--control", str(tmp_path / "two.sock"), "--state-dir",
             str(tmp_path / "state")],
            capture_output=True, text=True, timeout=DEADLINE, env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert second.returncode == 1
        assert second.stderr.count("\n") == 1
        assert (f"nmbridge: interface {lab.bridge_left_if} is in use by another nmbridge "
                f"(pid {first.proc.pid}; ") in second.stderr, second.stderr
        logged = [json.loads(x)["event"] for x in second.stdout.splitlines()]
        assert "link_ready" not in logged and "port_opened" not in logged  # refused before any change
        assert not (tmp_path / "two.sock").exists()
        assert flags(lab, lab.bridge_left_if) == before
        assert send_and_count(lab, 50) == 50  # the first one forwards on, once each (no DUP)
        first.stop()
    finally:
        first.kill()


def test_after_kill_9_the_next_run_restores_the_true_original_state(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    lab.set_up(lab.ns_bridge, lab.bridge_left_if, False)  # originally down, not promiscuous
    assert flags(lab, lab.bridge_left_if) == (False, False)
    state = tmp_path / "state"
    first = NmbridgeRun(lab, cfg, state=state)
    try:
        first.wait_event("ready")
        assert flags(lab, lab.bridge_left_if) == (True, True)
        records = list((state / "links").glob("*.json"))
        assert len(records) == 2  # one per interface it changed (both promisc; left also up)
        first.proc.send_signal(signal.SIGKILL)
        first.proc.wait(DEADLINE)
    finally:
        first.kill()
    assert flags(lab, lab.bridge_left_if)[0]  # left up by the dead run
    second = NmbridgeRun(lab, cfg, state=state)
    try:
        recovered = second.wait_event("link_record_recovered", ifname=lab.bridge_left_if)
        assert recovered["original"][:2] == ["down", "promisc off"] and recovered["level"] == "warning"
        second.wait_event("ready")
        assert send_and_count(lab, 20) == 20
        second.stop()
    finally:
        second.kill()
    assert flags(lab, lab.bridge_left_if) == (False, False)  # the state before the first run
    assert list((state / "links").iterdir()) == []


def test_a_restart_by_reload_does_not_bounce_a_link_that_was_down(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    lab.set_up(lab.ns_bridge, lab.bridge_left_if, False)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock, state=tmp_path / "state")
    try:
        run.wait_event("ready")
        cfg.write_text(cfg.read_text() + 'direction = "a-to-b"\n')
        r = request(sock, "reload", timeout=DEADLINE)
        assert r["restarted"] == ["lab"]
        assert run.events("link_restored") == []  # never set back down in between
        assert len(run.events("link_ready")) == 2  # set up once, at start
        assert flags(lab, lab.bridge_left_if) == (True, True)
        assert send_and_count(lab, 20) == 20
        run.stop()
    finally:
        run.kill()
    assert flags(lab, lab.bridge_left_if) == (False, False)


def test_a_reload_naming_a_missing_interface_keeps_the_pair_forwarding(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock, state=tmp_path / "state")
    try:
        run.wait_event("ready")
        cfg.write_text(cfg.read_text().replace(lab.bridge_right_if, "nmbnope0"))
        p = subprocess.run([sys.executable, "-m", "nmbridge", "reload", "--control", sock],
                           capture_output=True, text=True, timeout=DEADLINE,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert p.returncode == 1 and p.stdout == ""
        assert p.stderr == "nmbridge: pair lab: port afpacket:nmbnope0: no such interface nmbnope0\n"
        assert send_and_count(lab, 50) == 50
        assert run.events("pair_stopped") == []
        run.stop()
    finally:
        run.kill()


def test_no_link_setup_warns_about_what_doctor_would_report(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    lab.set_up(lab.ns_bridge, lab.bridge_left_if, False)
    run = NmbridgeRun(lab, cfg, args=("--no-link-setup",), state=tmp_path / "state")
    try:
        run.wait_event("ready")
        checks = [e for e in run.events("link_check") if e["ifname"] == lab.bridge_left_if]
        assert {e["level"] for e in checks} == {"warning"}
        assert any(e["problem"] == "is down" and e["fix"] == f"ip link set dev {lab.bridge_left_if} up"
                   for e in checks), checks
        assert any(e["problem"].startswith("promiscuous mode is off") for e in checks)
        # TSO/GSO stay on behind afpacket: ports with vnet (run leaves them): no problem to report
        offloads = [e["problem"] for e in checks if e["problem"].startswith("offloads on")]
        assert offloads and not any(k in p for p in offloads for k in ("tso", "gso")), offloads
        run.stop()
    finally:
        run.kill()
    assert flags(lab, lab.bridge_left_if) == (False, False)  # untouched


def recreate_left(lb: Lab) -> None:
    """Make the left link again (after its bridge-side veth, and so its peer, was deleted)."""
    netns.run("ip", "link", "add", lb.left_if, "mtu", str(lb.mtu), "type", "veth", "peer", "name",
              lb.bridge_left_if, "mtu", str(lb.mtu))
    netns.run("ip", "link", "set", "dev", lb.left_if, "netns", lb.ns_left)
    netns.run("ip", "link", "set", "dev", lb.bridge_left_if, "netns", lb.ns_bridge)
    lb.set_up(lb.ns_left, lb.left_if)


def test_an_interface_deleted_and_recreated_is_reopened(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml")
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock, state=tmp_path / "state")

    def left_link() -> dict[str, Any] | None:
        ports = request(sock, "ports")["ports"]
        return next(p["link"] for p in ports if p["port"] == f"afpacket:{lab.bridge_left_if}")

    # traffic right to left all along: through the deletion, the re-creation and the re-open
    stop = threading.Event()
    token = os.urandom(8)

    def sender() -> None:
        tx = RawPort(lab.ns_right, lab.right_if)
        i = 0
        try:
            while not stop.is_set():
                tx.send(b"\xff" * 6 + lab.mac(lab.ns_right, lab.right_if) + struct.pack("!H", TEST_TYPE)
                        + token + struct.pack("!I", i) + bytes(34))
                i += 1
                time.sleep(0.002)
        finally:
            tx.close()

    background = threading.Thread(target=sender, daemon=True)
    try:
        run.wait_event("ready")
        background.start()
        assert send_and_count(lab, 50) == 50
        assert left_link() == {"up": True, "operstate": "UP"}
        lab.ip(lab.ns_bridge, "link", "del", lab.bridge_left_if)
        down = run.wait_event("link_down", ifname=lab.bridge_left_if, operstate="NOTPRESENT")
        assert down["level"] == "warning"
        assert left_link() == {"up": False, "operstate": "NOTPRESENT"}  # never "up" while gone
        recreate_left(lab)
        run.wait_event("relinked", pair="lab")
        wait_for(lambda: left_link() == {"up": True, "operstate": "UP"}, timeout=DEADLINE,
                 what="the re-opened port's link to show up")
        assert send_and_count(lab, 50) == 50  # frames flow again, through the new interface
        rx = RawPort(lab.ns_left, lab.left_if)
        try:  # and the other way: the background traffic reaches the new left end
            wait_for(lambda: any(f[14:22] == token for f in rx.recv_all()), timeout=DEADLINE,
                     what="right-to-left traffic through the re-opened port")
        finally:
            rx.close()
        assert flags(lab, lab.bridge_left_if) == (True, True)  # set up again: up, promiscuous
        stop.set()
        background.join(DEADLINE)
        stopped = run.stop()
    finally:
        stop.set()
        run.kill()
    b_to_a = stopped["counters"]["lab"]["b_to_a"]
    assert b_to_a["forwarded"] > 0  # the pair's new forwarder carried the background traffic


def test_link_setup_turned_on_and_off_by_reload(lab: Lab, tmp_path: Path) -> None:
    cfg = write_config(lab, tmp_path / "b.toml", "link_setup = false\n")
    lab.set_up(lab.ns_bridge, lab.bridge_left_if, False)
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lab, cfg, control=sock, state=tmp_path / "state")
    try:
        run.wait_event("ready")
        assert flags(lab, lab.bridge_left_if) == (False, False)
        cfg.write_text(cfg.read_text().replace("link_setup = false", "link_setup = true"))
        assert request(sock, "reload", timeout=DEADLINE)["restarted"] == ["lab"]
        assert flags(lab, lab.bridge_left_if) == (True, True)
        assert send_and_count(lab, 20) == 20
        cfg.write_text(cfg.read_text().replace("link_setup = true", "link_setup = false"))
        assert request(sock, "reload", timeout=DEADLINE)["restarted"] == ["lab"]
        assert flags(lab, lab.bridge_left_if) == (False, False)  # given back
        run.stop()
    finally:
        run.kill()
    assert flags(lab, lab.bridge_left_if) == (False, False)
