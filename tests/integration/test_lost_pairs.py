"""A pair that is down comes back by itself (nmbridge.healing), in the netns lab (root):
`nmbridge run` on a `workers = 2` pair of 2-queue veths, one of them deleted under it.

* re-created, but locked by someone else (another nmbridge, as far as the bridge can tell)
  when it appears: the first re-open fails, the pair stays down, is retried on its backoff;
  once the lock is released — no link event at all — a retry brings it back, it forwards,
  and the counters balance;
* deleted for good, then SIGTERM: `stopped` (with the pair down and why) and exit 0.

left ns -- veth (2 queues) -- [bridge ns: nmbridge run] -- veth (2 queues) -- right ns
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path

import pytest
from rawio import NmbridgeRun, RawPort, wait_for
from test_adversarial import (
    DEADLINE,
    KINDS,
    check_final,
    crosses,
    lab2,
    need,
    pair_stats,
    settle,
    write_config,
)

from nmbridge import netns
from nmbridge.backends import OpenOptions, PortSet, parse_spec
from nmbridge.control import request
from nmbridge.netns import Lab

pytestmark = pytest.mark.root
__all__ = ["lab2"]  # the fixture, imported for pytest


def create_right_renamed(lb: Lab, tmp_name: str) -> int:
    """The right veth again (2 queues per end), its bridge end under `tmp_name` (down): the
    bridge's watcher does not know that name yet.  Returns that end's ifindex in the bridge
    namespace."""
    qs = ("numtxqueues", "2", "numrxqueues", "2")
    netns.run("ip", "link", "add", lb.right_if, *qs, "type", "veth", "peer", "name", tmp_name, *qs)
    netns.run("ip", "link", "set", "dev", lb.right_if, "netns", lb.ns_right)
    netns.run("ip", "link", "set", "dev", tmp_name, "netns", lb.ns_bridge)
    lb.set_up(lb.ns_right, lb.right_if)
    return int(lb.link(lb.ns_bridge, tmp_name)["ifindex"])


def hold_lock(state: Path, lb: Lab, index: int, ifname: str) -> int:
    """Lock the interface `index` of the bridge namespace as another nmbridge would
    (nmbridge.runstate): its lock file, flock-ed, with our pid in it."""
    ns = os.stat(f"/run/netns/{lb.ns_bridge}").st_ino  # the namespace's inode, as netns_id() names it
    links = state / "links"
    links.mkdir(parents=True, exist_ok=True)
    fd = os.open(links / f"net{ns}-{index}.lock", os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o640)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    os.write(fd, f"{os.getpid()} {ifname}\n".encode())
    return fd


def release_lock(state: Path, lb: Lab, index: int, fd: int) -> None:
    ns = os.stat(f"/run/netns/{lb.ns_bridge}").st_ino
    os.unlink(state / "links" / f"net{ns}-{index}.lock")  # removed while locked, as the owner does
    os.close(fd)


def right_link(sock: str, lb: Lab) -> object:
    ports = request(sock, "ports")["ports"]
    return next((p["link"] for p in ports if p["port"].endswith(lb.bridge_right_if)), None)


@pytest.mark.parametrize("kind", KINDS)
def test_a_recreated_veth_locked_by_another_bridge_comes_back_once_released(
        lab2: Lab, tmp_path: Path, kind: str) -> None:
    need(kind)
    lb = lab2
    sock, state = str(tmp_path / "c.sock"), tmp_path / "state"
    cfg = write_config(lb, tmp_path / "b.toml", kind)
    cfg.write_text(cfg.read_text() + 'filter = "noarp"\n[filter.noarp]\n[[filter.noarp.rule]]\nname = "arp"\n'
                   'action = "drop"\nethertype = "arp"\n')
    run = NmbridgeRun(lb, cfg, control=sock, state=state)
    left = RawPort(lb.ns_left, lb.left_if)
    fd = -1
    try:
        run.wait_event("ready")
        lb.ip(lb.ns_bridge, "link", "del", lb.bridge_right_if)
        down = run.wait_event("pair_down", pair="lab")
        assert down["state"] == "stale" and lb.bridge_right_if in down["reason"], down
        assert down["retry_in"] == 0.5, down
        (gone,) = request(sock, "stats")["snapshot"]["down"]
        assert gone["pair"] == "lab" and gone["state"] == "stale", gone
        before = pair_stats(sock)  # the old pair's counters stay visible while it is down

        tmp_name = lb.bridge_right_if[:-2] + "tm"
        index = create_right_renamed(lb, tmp_name)
        fd = hold_lock(state, lb, index, lb.bridge_right_if)
        # renamed to the pair's interface: the watcher sees it re-created, the re-open is
        # refused by the lock
        lb.ip(lb.ns_bridge, "link", "set", "dev", tmp_name, "name", lb.bridge_right_if)
        first = run.wait_event("pair_retry_failed", pair="lab")
        while "in use" not in first["error"]:  # attempts before the rename found it gone
            assert "is gone" in first["error"], first
            first = run.wait_event("pair_retry_failed", pair="lab")
        assert f"in use by another nmbridge (pid {os.getpid()}" in first["error"], first
        # then the backoff, with no link event: later attempts fail the same way (logged at
        # debug); `nmbridge stats` counts them
        def tried_again() -> bool:
            (d,) = request(sock, "stats")["snapshot"]["down"]
            assert "in use by another nmbridge" in d["reason"] and d["retry_in"] <= 30, d
            return bool(d["attempts"] >= first["attempt"] + 2)

        wait_for(tried_again, DEADLINE, "two more attempts, on the backoff")
        assert run.events("pair_restored") == [] and run.events("relinked") == []
        assert int(lb.link(lb.ns_bridge, lb.bridge_right_if)["ifindex"]) == index  # the lock's interface
        assert "PROMISC" not in lb.link(lb.ns_bridge, lb.bridge_right_if)["flags"]  # nothing touched

        release_lock(state, lb, index, fd)  # the other bridge stops: no link event at all
        fd = -1
        restored = run.wait_event("pair_restored", pair="lab")
        assert restored["attempts"] >= 3 and "in use by another nmbridge" in restored["was"], restored
        assert len(run.events("pair_restored")) == 1
        assert "down" not in request(sock, "stats")["snapshot"]
        # its filter came back with it (a re-open used to start the new ports with none)
        assert {d: s["filter"] for d, s in pair_stats(sock)["directions"].items()} == {
            "a_to_b": "noarp", "b_to_a": "noarp"}
        check_final(run.events("pair_stopped")[-1], workers=2)  # the old pair's final counters
        stale = run.events("pair_stopped")[-1]["counters"]
        for d in ("a_to_b", "b_to_a"):  # what it counted while down is in its final counters
            assert stale[d]["received"] >= before["directions"][d]["received"], (d, stale, before)

        # frames flow through the new interface; the new pair's counters start at 0 and balance
        lb.set_up(lb.ns_bridge, lb.bridge_right_if)
        crosses(lb, left)
        c = settle(sock)["directions"]["a_to_b"]
        assert c["forwarded"] >= 64 and c["queued"] == 0, c
        check_final(run.stop(), workers=2)
    finally:
        if fd >= 0:
            os.close(fd)
        left.close()
        run.kill()


def test_every_pair_down_then_sigterm_logs_stopped_and_exits_0(lab2: Lab, tmp_path: Path) -> None:
    """Its only pair down for good (an interface deleted): the bridge runs on, says so, and a
    SIGTERM still ends it with `stopped` — the pair's counters and why it was down — and 0."""
    lb = lab2
    sock = str(tmp_path / "c.sock")
    run = NmbridgeRun(lb, write_config(lb, tmp_path / "b.toml", "afpacket"), control=sock,
                      state=tmp_path / "state")
    try:
        run.wait_event("ready")
        lb.ip(lb.ns_bridge, "link", "del", lb.bridge_right_if)
        run.wait_event("pair_down", pair="lab")
        assert right_link(sock, lb) == {"up": False, "operstate": "NOTPRESENT"}
        assert request(sock, "stats")["snapshot"]["down"][0]["pair"] == "lab"
        stopped = run.stop()  # exit 0 asserted
        assert "gone" in stopped["down"]["lab"], stopped
        check_final(stopped, workers=2)
        assert run.events("stopping")[-1]["signal"] == "SIGTERM"
    finally:
        run.kill()


@pytest.mark.parametrize("then", ["released", "sigterm"])
def test_a_recreated_veth_whose_queues_another_afxdp_user_holds_is_lost_then_restored(
        lab2: Lab, tmp_path: Path, then: str) -> None:
    """afxdp: the re-created veth's queues are held by another AF_XDP user when it appears.
    The re-open fails, so do the retry with the old ports closed and the re-open of those:
    the pair is lost — no ports, no counters, no pair running at all (it used to be dropped
    from the config for good, and a SIGTERM then exited without `stopped`).  Now it is down
    (closed) and retried: once the other user lets go, it forwards again; or a SIGTERM while
    it is down logs `stopped` (no counters, the pair down and why) and exits 0."""
    need("afxdp")
    lb = lab2
    sock = str(tmp_path / "c.sock")
    cfg = write_config(lb, tmp_path / "b.toml", "afxdp")
    run = NmbridgeRun(lb, cfg, control=sock, state=tmp_path / "state")
    other = PortSet(OpenOptions(slots=256, buf_size=2048))
    try:
        run.wait_event("ready")
        lb.ip(lb.ns_bridge, "link", "del", lb.bridge_right_if)
        run.wait_event("pair_down", pair="lab")
        tmp_name = lb.bridge_right_if[:-2] + "tm"
        create_right_renamed(lb, tmp_name)
        netns.in_netns(lb.ns_bridge, other.open_shares, [parse_spec(f"afxdp:{tmp_name}")], [2])
        lb.ip(lb.ns_bridge, "link", "set", "dev", tmp_name, "down")
        lb.ip(lb.ns_bridge, "link", "set", "dev", tmp_name, "name", lb.bridge_right_if)
        lost = run.wait_event("pair_lost", pair="lab")
        assert "already bound by another AF_XDP socket" in lost["error"], lost
        snap = request(sock, "stats")["snapshot"]  # down before pair_lost is logged
        assert snap["pairs"] == [] and [d["state"] for d in snap["down"]] == ["closed"], (lost, snap)
        check_final(run.events("pair_stopped")[-1], workers=2)  # the old ports' final counters
        if then == "sigterm":
            stopped = run.stop()  # exit 0 asserted
            assert stopped["counters"] == {} and list(stopped["down"]) == ["lab"], stopped
            return
        other.close()  # the other user lets go
        restored = run.wait_event("pair_restored", pair="lab")
        assert restored["attempts"] >= 1, restored
        assert len(pair_stats(sock)["workers"]) == 2 and "down" not in request(sock, "stats")["snapshot"]
        check_final(run.stop(), workers=2)
    finally:
        other.close()
        run.kill()
