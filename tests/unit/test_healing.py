"""Pairs that are down come back by themselves (nmbridge.healing): the retry schedule, pure;
then a bridge of mem: ports whose forwarder fails, run in a thread, no root needed."""

from __future__ import annotations

import io
import json
import socket
import threading
from pathlib import Path
from typing import Any

import pytest
from fwdutil import run_in_thread, wait_for
from test_ops import frame, running

from nmbridge import app, cli, config, healing
from nmbridge.app import Bridge
from nmbridge.control import ControlError, request
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.healing import Down, attempt_failed, due, link_changed, next_due, retry_delay, went_down
from nmbridge.metrics import BridgeCollector
from nmbridge.sdnotify import Notifier
from nmbridge.stats import Snapshot

DEADLINE = 30.0  # seconds any awaited condition may take; never slept
__all__ = ["running"]  # the fixture, imported for pytest


def events(out: io.StringIO, name: str | None = None) -> list[dict[str, Any]]:
    evs = [json.loads(line) for line in out.getvalue().splitlines()]
    return [e for e in evs if name is None or e["event"] == name]


# --- the schedule ----------------------------------------------------------------------------

def test_the_delay_doubles_from_half_a_second_to_a_cap_of_30() -> None:
    assert [retry_delay(n) for n in range(9)] == [0.5, 1, 2, 4, 8, 16, 30, 30, 30]
    assert retry_delay(10**6) == 30 and retry_delay(-1) == 0.5


def _down(now: float = 100.0) -> Down:
    pc = config.loads('[[pair]]\nname = "lan"\nports = ["mem:a", "mem:b"]\n', "t").pairs[0]
    d = Down(pc, "gone", now)
    went_down(d, now)
    return d


def test_failed_attempts_back_off_and_a_link_event_makes_the_next_one_due_at_once() -> None:
    d = _down(100.0)
    assert d.next_at == 100.5 and due({"lan": d}, 100.4) == [] and due({"lan": d}, 100.5) == ["lan"]
    t = 100.5
    for expected in (1, 2, 4, 8, 16, 30, 30):
        attempt_failed(d, t)
        assert d.next_at - t == expected
        t = d.next_at
    # its interface comes back: the next attempt is due now, the doubling starts again
    now = d.last_try + 5.0  # type: ignore[operator]
    link_changed(d, now)
    assert d.next_at == now and d.failed == 0
    attempt_failed(d, now)
    assert d.next_at - now == 1.0


def test_link_events_never_bring_two_attempts_closer_than_min_gap() -> None:
    d = _down(100.0)
    attempt_failed(d, 100.5)
    link_changed(d, 100.6)  # a flapping link right after an attempt
    assert d.next_at == 100.5 + healing.MIN_GAP
    link_changed(d, 103.0)  # long after: at once
    assert d.next_at == pytest.approx(101.0)  # still the earlier of the two


def test_due_lists_the_soonest_first_and_next_due_is_the_earliest() -> None:
    a, b = _down(100.0), _down(100.0)
    attempt_failed(a, 100.0)  # due at 101
    assert due({"a": a, "b": b}, 102.0) == ["b", "a"]
    assert next_due({"a": a, "b": b}) == 100.5 and next_due({}) is None


def test_a_pair_that_fails_again_soon_after_a_restore_resumes_its_backoff() -> None:
    d = _down(100.0)
    went_down(d, 200.0, resumed=3)
    assert d.next_at == 204.0 and d.since == 200.0


# --- a bridge whose pair fails: closed, retried, back --------------------------------------------

class FlakyForwarder(Forwarder):
    """Fails its first `fails` runs (counted across instances), then forwards."""

    fails = 0

    def run(self, *, max_frames: int = 0) -> None:
        if FlakyForwarder.fails > 0:
            FlakyForwarder.fails -= 1
            raise PortError(f"{self.a.spec}: txsync: link went away")
        super().run(max_frames=max_frames)


CFG = ('[bridge]\nstats_interval = 0\n[control]\nsocket = ""\n'
       '[[pair]]\nname = "p0"\nports = ["mem:src0?rx=source&tx=sink", "mem:dst0?rx=none&tx=sink"]\n'
       'direction = "a-to-b"\n')


def start(monkeypatch: pytest.MonkeyPatch, fails: int, first: float,
          notifier: Notifier | None = None) -> tuple[Bridge, threading.Thread, list[Any]]:
    monkeypatch.setattr(healing, "FIRST_DELAY", first)
    monkeypatch.setattr(healing, "MIN_GAP", min(first, healing.MIN_GAP))
    monkeypatch.setattr(FlakyForwarder, "fails", fails)
    monkeypatch.setattr(app, "Forwarder", FlakyForwarder)
    bridge = Bridge(config.loads(CFG, "t.toml"), notifier=notifier)
    t, errors = run_in_thread(bridge)
    return bridge, t, errors


def stop(bridge: Bridge, t: threading.Thread) -> None:
    bridge.events.put(("signal", "SIGTERM"))
    t.join(DEADLINE)
    assert not t.is_alive()


def test_a_failing_pair_is_closed_retried_with_a_backoff_and_comes_back(
        log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """It used to stop the whole bridge (exit 1).  Now the pair is closed (its counters in
    `pair_stopped`), retried; failing again soon after each restore, its backoff goes on
    doubling; once it forwards, the bridge has it back and a stop logs its counters."""
    bridge, t, errors = start(monkeypatch, fails=3, first=0.02)
    try:
        wait_for(lambda: len(events(log_lines, "pair_restored")) == 3 and bridge.pairs
                 and bridge.pairs[0].fwd.stats()["a_to_b"]["frames"] > 0, "the pair to forward again")
        downs = events(log_lines, "pair_down")
        assert [d["retry_in"] for d in downs] == [0.02, 0.04, 0.08], downs
        assert all(d["state"] == "closed" and "link went away" in d["reason"] for d in downs)
        assert len(events(log_lines, "pair_failed")) == 3 and len(events(log_lines, "pair_stopped")) == 3
        names = [e["event"] for e in events(log_lines)]
        assert names.index("pair_restored") > names.index("pair_down")
        assert names[-1] != "pair_down" and not bridge.heal.down
        assert bridge.status() == "forwarding 1 pair: p0" and "down" not in bridge.snapshot()
    finally:
        stop(bridge, t)
    assert errors == []
    stopped = events(log_lines, "stopped")[-1]
    assert "down" not in stopped
    c = stopped["counters"]["p0"]["a_to_b"]
    assert c["forwarded"] > 0 and c["received"] == c["forwarded"] + c["dropped"] + c["queued"]


def test_every_pair_down_then_sigterm_logs_stopped_and_returns(
        log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """The only pair keeps failing: the bridge keeps running (a NIC briefly gone must not kill
    an appliance) and says so, to systemd too; a stop logs `stopped` (no counters: nothing
    runs; the pair down, with its reason) and run() returns: `nmbridge run` exits 0."""
    systemd = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    systemd.bind(str(tmp_path / "notify"))
    systemd.settimeout(DEADLINE)
    notifier = Notifier(str(tmp_path / "notify"))
    bridge, t, errors = start(monkeypatch, fails=10**9, first=10.0, notifier=notifier)
    try:
        wait_for(lambda: events(log_lines, "pair_down"), "the pair to go down")
        said: list[str] = []
        while "STATUS=forwarding 0 pairs; down, retrying: p0" not in said:
            said = systemd.recv(4096).decode().splitlines()
            assert "STOPPING=1" not in said
        assert bridge.pairs == [] and t.is_alive()
        assert bridge.status() == "forwarding 0 pairs; down, retrying: p0"
        (down,) = bridge.snapshot()["down"]
        assert down["pair"] == "p0" and down["state"] == "closed" and 9 < down["retry_in"] <= 10
        assert "txsync: link went away" in down["reason"]
        bridge.events.put(("usr1", "SIGUSR1"))  # the stats events name it, each time
        wait_for(lambda: events(log_lines, "pair_still_down"), "a pair_still_down event")
        (still,) = events(log_lines, "pair_still_down")
        assert still["pair"] == "p0" and still["level"] == "warning" and still["attempts"] == 0
        text = cli.stats_table({"snapshot": bridge.snapshot(), "rates": {}})
        assert text.startswith("no pairs are forwarding\npair p0 is DOWN for ")
        assert "next in " in text and text.endswith("txsync: link went away")
    finally:
        stop(bridge, t)
        systemd.close()
    assert errors == []
    stopped = events(log_lines, "stopped")
    assert len(stopped) == 1 and stopped[0]["counters"] == {}
    assert "txsync: link went away" in stopped[0]["down"]["p0"]


def test_metrics_show_a_down_pair_at_0() -> None:
    snap: Snapshot = {"time": 0.0, "pairs": [], "links": {"afpacket:x": False},
                      "down": [{"pair": "p0", "ports": ["afpacket:x", "afpacket:y"], "reason": "gone",
                                "state": "closed", "down_seconds": 1.0, "attempts": 2, "retry_in": 2.0}]}
    got = {(m.name, tuple(s.labels.items())): s.value
           for m in BridgeCollector(lambda: snap).collect() for s in m.samples}
    assert got[("nmbridge_pair_up", (("pair", "p0"),))] == 0.0
    assert got[("nmbridge_link_up", (("port", "afpacket:x"),))] == 0.0


# --- a pair lost by a reload: retried, reloaded while down, back ---------------------------------

def test_a_pair_lost_by_a_reload_stays_wanted_takes_the_next_reload_and_comes_back(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """A restart on rings that cannot be opened twice, whose retry fails and whose old ports
    do not open again either: the pair is lost.  It used to vanish from the config for good;
    now it is down (closed), a reload meanwhile gives it its new config without failing, and
    once its port opens again it forwards, with that config."""
    bridge, sock, path = running
    monkeypatch.setattr(healing, "FIRST_DELAY", 0.05)
    monkeypatch.setattr(healing, "MIN_GAP", 0.05)
    real_open = bridge.portset.open_shares
    refusing = threading.Event()
    refusing.set()

    def open_(specs: Any, shares: Any) -> Any:
        busy = {p.spec for p in bridge.portset.ports if not p.closed}
        for s in specs:
            if str(s) in busy or (refusing.is_set() and str(s) in ("mem:a", "mem:z")):
                bridge.portset.failed = s
                raise PortError(f"{s}: busy")
        return real_open(specs, shares)

    monkeypatch.setattr(bridge.portset, "open_shares", open_)
    original = path.read_text()
    path.write_text(original.replace('ports = ["mem:a", "mem:b"]', 'ports = ["mem:a", "mem:z"]'))
    with pytest.raises(ControlError, match=r"; pair lan is down: pair lan: port mem:a: busy\)$"):
        request(sock, "reload")
    wait_for(lambda: events(log_lines, "pair_down"), "the lost pair to be down")
    assert [p.config.name for p in bridge.pairs] == ["idle"]
    assert [p.name for p in bridge.config.pairs] == ["lan", "idle"]  # still wanted
    (down,) = request(sock, "stats")["snapshot"]["down"]
    assert down["pair"] == "lan" and down["state"] == "closed" and "busy" in down["reason"]
    assert bridge.status() == "forwarding 1 pair: idle; down, retrying: lan"

    # a reload while it is down: its filter changes; the reload does not fail for it
    path.write_text(original.replace('action = "drop"', 'action = "pass"'))
    r = request(sock, "reload")
    assert r["down"] == ["lan"] and r["restarted"] == [] and r["removed"] == [], r
    refusing.clear()  # its port opens again
    wait_for(lambda: events(log_lines, "pair_restored"), "the pair to come back")
    (back,) = events(log_lines, "pair_restored")
    assert back["pair"] == "lan" and back["attempts"] >= 1 and "busy" in back["was"]
    lan = bridge.pairs[0]
    assert lan.config.name == "lan" and "down" not in bridge.snapshot()
    assert bridge.config.filters["noarp"].rules[0].action == "pass" and lan.filters["a_to_b"].name == "noarp"
    lan.a.inject_many(frame(i, 0x0806) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 10, "ARP to pass, as the reload said")
