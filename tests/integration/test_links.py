"""Link set-up, restore, link events and doctor on veth pairs in a namespace of their own."""

from __future__ import annotations

import dataclasses
import io
import itertools
import os
import queue
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from nmbridge import doctor
from nmbridge.backends import PortSpec, parse_spec
from nmbridge.errors import LinkError
from nmbridge.links import (
    OFFLOADS,
    LinkManager,
    LinkState,
    PairLinks,
    PortLink,
    RestoreRecord,
    _Kernel,
    changes_made,
    in_netns,
    lookup_links,
    pair_links,
)
from nmbridge.linkwatch import LinkEvent, LinkWatcher

pytestmark = pytest.mark.root

_seq = itertools.count()


@dataclass
class Veth:
    ns: str
    a: str
    b: str

    def ip(self, *args: str) -> None:
        subprocess.run(["ip", "-n", self.ns, *args], check=True, capture_output=True)

    def state(self, name: str) -> LinkState:
        st = lookup_links([name], self.ns)[name]
        assert st is not None
        return st

    def set_features(self, name: str, **values: bool) -> None:
        with in_netns(self.ns), _Kernel() as k:
            k.set_features(name, {f.replace("_", "-"): v for f, v in values.items()})

    def pair(self, link_setup: bool = True) -> PairLinks:
        ports = (PortLink(f"afpacket:{self.a}", self.a), PortLink(f"afpacket:{self.b}", self.b))
        return PairLinks("p", ports, link_setup)


@pytest.fixture
def veth() -> Iterator[Veth]:
    """A fresh namespace holding one veth pair, both ends down; deleted afterwards."""
    n = next(_seq)
    tag = f"{os.getpid() % 100000}{n}"
    v = Veth(f"nmbtl{tag}", f"la{tag}", f"lb{tag}")
    subprocess.run(["ip", "netns", "add", v.ns], check=True)
    try:
        v.ip("link", "add", v.a, "type", "veth", "peer", "name", v.b)
        yield v
    finally:
        subprocess.run(["ip", "netns", "del", v.ns], check=False)


def managed(st: LinkState) -> dict[str, bool]:
    return {o.feature: st.features[o.feature].active for o in OFFLOADS if o.feature in st.features}


def snapshot(st: LinkState) -> tuple[bool, bool, int, dict[str, bool]]:
    return st.admin_up, st.promisc, st.mtu, {n: f.active for n, f in st.features.items()}


def test_setup_then_restore_gives_back_exactly_the_original_state(veth: Veth) -> None:
    veth.set_features(veth.a, rx_gro=True)  # veth has GRO off by default; TSO/GSO/rxvlan are on
    before = {n: veth.state(n) for n in (veth.a, veth.b)}
    assert before[veth.a].features["rx-gro"].active
    assert not before[veth.a].admin_up and not before[veth.a].promisc

    links = LinkManager(buf_size=2048, netns=veth.ns)
    links.setup([veth.pair()])
    for name in (veth.a, veth.b):
        st = veth.state(name)
        assert st.admin_up and st.promisc
        on = [f for f, active in managed(st).items() if active and st.features[f].changeable]
        assert on == [], f"{name}: still on: {on}"
    assert not veth.state(veth.a).features["rx-gro"].active

    links.restore()
    for name in (veth.a, veth.b):
        assert snapshot(veth.state(name)) == snapshot(before[name])
    links.restore()  # idempotent
    assert snapshot(veth.state(veth.a)) == snapshot(before[veth.a])


def test_what_was_already_set_stays_set_after_restore(veth: Veth) -> None:
    veth.ip("link", "set", "dev", veth.a, "promisc", "on")
    veth.ip("link", "set", "dev", veth.a, "up")
    veth.set_features(veth.a, tx_tcp_segmentation=False)
    before = veth.state(veth.a)
    assert before.promisc and before.admin_up

    with LinkManager(buf_size=2048, netns=veth.ns) as links:
        links.setup([veth.pair()])
        assert links.records[veth.a].promisc is None and links.records[veth.a].admin_up is None

    after = veth.state(veth.a)
    assert after.promisc and after.admin_up
    assert snapshot(after) == snapshot(before)


def test_missing_interface_is_one_clear_error_and_changes_nothing(veth: Veth) -> None:
    before = veth.state(veth.a)
    pair = PairLinks("p", (PortLink(f"afpacket:{veth.a}", veth.a), PortLink("afpacket:nmbnope9", "nmbnope9")))
    links = LinkManager(buf_size=2048, netns=veth.ns)
    with pytest.raises(LinkError) as e:
        links.setup([pair])
    assert str(e.value) == "pair p: port afpacket:nmbnope9: no such interface nmbnope9"
    assert links.records == {}
    assert snapshot(veth.state(veth.a)) == snapshot(before)


def test_mtu_too_big_for_the_buffers_is_refused_before_any_change(veth: Veth) -> None:
    veth.ip("link", "set", "dev", veth.a, "mtu", "4000")
    veth.ip("link", "set", "dev", veth.b, "mtu", "4000")
    before = veth.state(veth.a)
    links = LinkManager(buf_size=2048, netns=veth.ns)
    message = f"^pair p: port afpacket:{veth.a}: {veth.a}: MTU 4000 needs 4018-byte buffers"
    with pytest.raises(LinkError, match=message):
        links.setup([veth.pair()])
    assert snapshot(veth.state(veth.a)) == snapshot(before)


def test_link_setup_off_touches_nothing(veth: Veth) -> None:
    veth.set_features(veth.a, rx_gro=True)
    before = veth.state(veth.a)
    links = LinkManager(buf_size=2048, netns=veth.ns)
    links.setup([veth.pair(link_setup=False)])
    assert links.records == {}
    assert snapshot(veth.state(veth.a)) == snapshot(before)


def test_watcher_reports_link_down_and_up(veth: Veth) -> None:
    veth.ip("link", "set", "dev", veth.b, "up")
    events: queue.Queue[LinkEvent] = queue.Queue()
    watcher = LinkWatcher({veth.a: f"afpacket:{veth.a}"}, events.put, netns=veth.ns).start()
    try:
        assert not watcher.state[veth.a].up

        def expect(up: bool) -> LinkEvent:
            deadline = time.monotonic() + 10
            while True:
                ev = events.get(timeout=max(0.0, deadline - time.monotonic()))
                if ev.up == up:
                    return ev

        veth.ip("link", "set", "dev", veth.a, "up")
        ev = expect(True)
        assert (ev.port, ev.ifname, ev.operstate) == (f"afpacket:{veth.a}", veth.a, "UP")
        veth.ip("link", "set", "dev", veth.a, "down")
        assert expect(False).operstate == "DOWN"
        veth.ip("link", "set", "dev", veth.a, "up")
        assert expect(True).ifname == veth.a
        # the peer going down takes the carrier away
        veth.ip("link", "set", "dev", veth.b, "down")
        assert expect(False).operstate == "LOWERLAYERDOWN"
    finally:
        thread = watcher._thread
        watcher.stop()
    assert thread is not None and not thread.is_alive()


@dataclass(frozen=True)
class _Bridge:
    buf_size: int = 2048
    link_setup: bool = True


@dataclass(frozen=True)
class _Pair:
    name: str
    ports: tuple[PortSpec, PortSpec]
    link_setup: bool = True


@dataclass(frozen=True)
class _Config:
    bridge: _Bridge
    pairs: tuple[_Pair, ...]


def test_doctor_reports_problems_with_fixes_and_nothing_when_fixed(veth: Veth) -> None:
    veth.set_features(veth.a, rx_gro=True)
    veth.ip("link", "set", "dev", veth.b, "mtu", "1400")
    cfg = _Config(_Bridge(), (_Pair("p", (PortSpec("afpacket", veth.a), PortSpec("afpacket", veth.b))),))
    before = veth.state(veth.a)

    out = io.StringIO()
    assert doctor.run_doctor(cfg, out, link_setup=False, netns=veth.ns) == 1
    text = out.getvalue()
    for fix in (f"ip link set dev {veth.a} up", f"ip link set dev {veth.a} promisc on",
                f"ip link set dev {veth.b} promisc on", f"ethtool -K {veth.a} gro off",
                f"ip link set dev {veth.b} mtu 1500"):
        assert f"fix: {fix}" in text, text
    assert snapshot(veth.state(veth.a)) == snapshot(before)  # doctor changes nothing

    # with link set-up on, what run does itself is only a note, the MTU mismatch still fails
    out = io.StringIO()
    assert doctor.run_doctor(cfg, out, netns=veth.ns) == 1
    assert "1 problem to fix" in out.getvalue()

    veth.ip("link", "set", "dev", veth.b, "mtu", "1500")
    links = LinkManager(buf_size=2048, netns=veth.ns)
    links.setup([veth.pair()])
    try:
        out = io.StringIO()
        assert doctor.run_doctor(cfg, out, link_setup=False, netns=veth.ns) == 0, out.getvalue()
        assert "fix:" not in out.getvalue() and "all interfaces ready" in out.getvalue()
    finally:
        links.restore()


@pytest.mark.parametrize("query", ["", "?vnet=0"])
def test_doctor_agrees_with_what_run_turns_off_per_backend(veth: Veth, query: str) -> None:
    """An afpacket: port with vnet keeps TSO/GSO: set-up leaves them on and doctor (as
    --no-link-setup) finds nothing wrong with them; with vnet=0 both turn them off."""
    veth.set_features(veth.a, rx_gro=True)
    specs = (parse_spec(f"afpacket:{veth.a}{query}"), parse_spec(f"afpacket:{veth.b}{query}"))
    cfg = _Config(_Bridge(), (_Pair("p", specs),))
    out = io.StringIO()
    assert doctor.run_doctor(cfg, out, link_setup=False, netns=veth.ns) == 1
    text = out.getvalue()
    assert f"fix: ethtool -K {veth.a} gro off " in text, text
    assert ("tso off" in text) == (query != ""), text
    before = {n: veth.state(n) for n in (veth.a, veth.b)}
    links = LinkManager(buf_size=2048, netns=veth.ns)
    links.setup([pair_links("p", list(specs), True)])
    try:
        after = veth.state(veth.a)
        assert not after.features["rx-gro"].active
        assert after.features["tx-tcp-segmentation"].active == (query == "")
        assert after.features["tx-generic-segmentation"].active == (query == "")
        out = io.StringIO()
        assert doctor.run_doctor(cfg, out, link_setup=False, netns=veth.ns) == 0, out.getvalue()
    finally:
        links.restore()
    for n in (veth.a, veth.b):
        assert snapshot(veth.state(n)) == snapshot(before[n])


def test_tso_an_older_run_turned_off_is_given_back_at_start_for_vnet_ports(veth: Veth) -> None:
    """A run that died (an older nmbridge: TSO/GSO off behind every port) left a record; this
    run adopts it, puts back what it no longer manages at once, and still restores the rest."""
    original = veth.state(veth.a)
    veth.set_features(veth.a, tx_tcp_segmentation=False, tx_generic_segmentation=False)
    dead = changes_made(original, veth.state(veth.a))
    assert dead.features.get("tx-tcp-segmentation") is True
    veth.set_features(veth.a, rx_gro=True)  # an original GRO on that this run turns off
    original = dataclasses.replace(original, features={**original.features,
                                                       "rx-gro": veth.state(veth.a).features["rx-gro"]})
    specs = [parse_spec(f"afpacket:{veth.a}"), parse_spec(f"afpacket:{veth.b}")]
    stored: dict[str, RestoreRecord | None] = {}
    links = LinkManager(buf_size=2048, netns=veth.ns, store=stored.__setitem__)
    links.setup([pair_links("p", specs, True)], before_change=lambda states: {veth.a: dead})
    try:
        now = veth.state(veth.a)
        assert now.features["tx-tcp-segmentation"].active and now.features["tx-generic-segmentation"].active
        assert not now.features["rx-gro"].active
        rec = stored[veth.a]
        assert rec is not None and "tx-tcp-segmentation" not in rec.features and rec.features["rx-gro"]
    finally:
        links.restore()
    assert snapshot(veth.state(veth.a)) == snapshot(original)
