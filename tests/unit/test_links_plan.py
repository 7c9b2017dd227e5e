"""Link set-up decisions as pure functions: what to change, what to restore, MTU checks."""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given
from hypothesis import strategies as st

from nmbridge.backends import backend, backend_names, parse_spec
from nmbridge.links import (
    EVERY_OFFLOAD,
    OFFLOAD_GROUPS,
    OFFLOADS,
    Feature,
    LinkState,
    RestorePlan,
    changes_made,
    check_mtu,
    check_state,
    frame_limit,
    offload_features,
    pair_links,
    plan_restore,
    plan_setup,
    port_offloads,
)
from nmbridge.linkwatch import link_is_up

GRO, TSO, RXVLAN = "rx-gro", "tx-tcp-segmentation", "rx-vlan-hw-parse"


def state(name: str = "eth1", *, up: bool = False, promisc: bool = False, mtu: int = 1500,
          **features: tuple[bool, bool]) -> LinkState:
    feats = {k.replace("_", "-"): Feature(*v) for k, v in features.items()}
    return LinkState(name, 7, admin_up=up, promisc=promisc, mtu=mtu, features=feats)


def with_features(s: LinkState, **active: bool) -> LinkState:
    feats = dict(s.features)
    for k, v in active.items():
        name = k.replace("_", "-")
        feats[name] = Feature(v, feats[name].changeable)
    return dataclasses.replace(s, features=feats)


def apply(s: LinkState, plan: RestorePlan) -> LinkState:
    """What the kernel would hold after restore carried out `plan` on `s`."""
    feats = {n: Feature(plan.features.get(n, f.active), f.changeable) for n, f in s.features.items()}
    return dataclasses.replace(
        s, features=feats,
        admin_up=s.admin_up if plan.admin_up is None else plan.admin_up,
        promisc=s.promisc if plan.promisc is None else plan.promisc)


# ---------------------------------------------------------------- what set-up changes

def test_plan_turns_on_what_is_off_and_off_the_changeable_offloads() -> None:
    s = state(rx_gro=(True, True), tx_tcp_segmentation=(True, True), rx_vlan_hw_parse=(True, False),
              rx_lro=(False, True), tx_checksum_ip_generic=(True, True))
    plan = plan_setup(s)
    assert plan.bring_up and plan.promisc_on
    assert set(plan.offloads_off) == {GRO, TSO}
    assert plan.fixed_on == (RXVLAN,)  # on but fixed: reported, not touched
    # checksum offload is not one nmbridge manages
    assert "tx-checksum-ip-generic" not in plan.offloads_off


def test_plan_is_empty_for_a_ready_interface() -> None:
    s = state(up=True, promisc=True, rx_gro=(False, True), tx_tcp_segmentation=(False, True))
    assert plan_setup(s).empty


def test_every_managed_offload_has_an_ethtool_keyword_and_unique_feature() -> None:
    assert len({o.feature for o in OFFLOADS}) == len(OFFLOADS)
    assert {"rx-gro", "rx-lro", "tx-generic-segmentation", "tx-tcp-segmentation",
            "rx-vlan-hw-parse"} <= {o.feature for o in OFFLOADS}
    assert all(o.keyword and " " not in o.keyword for o in OFFLOADS)


# ---------------------------------------------------------------- which offloads, per backend

TX_SEG = {"tx-generic-segmentation", "tx-tcp-segmentation", "tx-tcp-ecn-segmentation",
          "tx-tcp-accecn-segmentation", "tx-tcp-mangleid-segmentation", "tx-tcp6-segmentation",
          "tx-udp-segmentation"}
RX_MERGE = {"rx-gro", "rx-gro-hw", "rx-lro"}
VLAN = {"rx-vlan-hw-parse", "rx-vlan-stag-hw-parse"}


def everything_on(name: str = "eth1") -> LinkState:
    return state(name, up=True, promisc=True, **{o.feature.replace("-", "_"): (True, True) for o in OFFLOADS})


def test_offload_groups_cover_the_table_exactly() -> None:
    assert offload_features(OFFLOAD_GROUPS) == EVERY_OFFLOAD
    assert offload_features({"tx-segmentation"}) == TX_SEG
    assert offload_features({"rx-merging"}) == RX_MERGE
    assert offload_features({"vlan-stripping"}) == VLAN
    with pytest.raises(ValueError, match="unknown offload group"):
        offload_features({"tx-checksum"})


def test_every_backend_declares_known_offload_groups() -> None:
    names = {"mem": "a", "afpacket": "eth1", "afxdp": "eth1", "netmap": "eth1"}
    assert set(names) == set(backend_names())
    for b in backend_names():
        assert backend(b).offloads_off(names[b]) <= OFFLOAD_GROUPS


@pytest.mark.parametrize(("port", "off"), [
    ("afpacket:eth1", RX_MERGE | VLAN),  # vnet (default): GSO requests reach the egress kernel
    ("afpacket:eth1?vnet=1", RX_MERGE | VLAN),
    ("afpacket:eth1?vnet=0", RX_MERGE | VLAN | TX_SEG),  # plain frames: segment before us
    ("afpacket:eth1?tx_vnet=0", RX_MERGE | VLAN | TX_SEG),
    ("afxdp:eth1", RX_MERGE | VLAN | TX_SEG),  # an XDP descriptor carries no offload metadata
    ("netmap:eth1", RX_MERGE | VLAN | TX_SEG),
    ("netmap:eth1^", RX_MERGE | VLAN | TX_SEG),
])
def test_plan_turns_off_what_the_ports_backend_cannot_carry(port: str, off: set[str]) -> None:
    managed = port_offloads(parse_spec(port))
    assert managed == off
    plan = plan_setup(everything_on(), managed)
    assert set(plan.offloads_off) == off
    assert not plan.bring_up and not plan.promisc_on
    # what is left on is no problem for doctor / --no-link-setup either
    found = check_state(everything_on(), link_setup=False, managed=managed)
    assert len(found) == 1
    named = set(found[0].problem.split(": ", 1)[1].split(" (")[0].split(", "))
    tso_covers = TX_SEG - {"tx-generic-segmentation", "tx-tcp-segmentation", "tx-udp-segmentation"}
    tso_covers = tso_covers if "tx-tcp-segmentation" in off else set()
    assert named == {o.keyword for o in OFFLOADS if o.feature in off - tso_covers}


def test_afpacket_vnet_ports_are_ready_with_tso_and_gso_on_but_not_with_gro() -> None:
    managed = port_offloads(parse_spec("afpacket:eth1"))
    s = state(up=True, promisc=True, tx_tcp_segmentation=(True, True), tx_generic_segmentation=(True, True),
              rx_gro=(False, True))
    assert plan_setup(s, managed).empty and check_state(s, False, managed) == []
    s = with_features(s, rx_gro=True)
    assert plan_setup(s, managed).offloads_off == ("rx-gro",)
    assert [f.fix for f in check_state(s, False, managed)] == ["ethtool -K eth1 gro off"]


def test_pair_links_carry_each_ports_offloads() -> None:
    pl = pair_links("p", [parse_spec("afpacket:eth1"), parse_spec("afpacket:eth2?vnet=0")], True)
    assert "tx-tcp-segmentation" not in pl.ports[0].offloads_off
    assert "tx-tcp-segmentation" in pl.ports[1].offloads_off
    assert pl.ports[0].offloads_off >= RX_MERGE | VLAN
    mem = pair_links("m", [parse_spec("mem:a"), parse_spec("afxdp:eth3")], True)
    assert mem.ports[0].ifname is None and mem.ports[1].offloads_off == EVERY_OFFLOAD


# ---------------------------------------------------------------- what restore puts back

def test_record_holds_only_what_changed_with_original_values() -> None:
    before = state(up=False, promisc=True, rx_gro=(True, True), tx_tcp_segmentation=(False, True))
    after = with_features(dataclasses.replace(before, admin_up=True), rx_gro=False)
    rec = changes_made(before, after)
    assert rec.admin_up is False and rec.set_admin_up is True
    assert rec.promisc is None  # was already promisc: restore leaves it on
    assert dict(rec.features) == {GRO: True}
    plan = plan_restore(rec, after)
    assert plan.admin_up is False and plan.promisc is None and dict(plan.features) == {GRO: True}
    assert apply(after, plan) == before


def test_nothing_changed_means_nothing_to_restore() -> None:
    s = state(up=True, promisc=True, rx_gro=(False, True))
    rec = changes_made(s, s)
    assert rec.empty
    assert plan_restore(rec, s).empty


def test_restore_is_a_no_op_once_done() -> None:
    before = state(rx_gro=(True, True))
    after = with_features(dataclasses.replace(before, admin_up=True, promisc=True), rx_gro=False)
    rec = changes_made(before, after)
    restored = apply(after, plan_restore(rec, after))
    assert restored == before
    assert plan_restore(rec, restored).empty


def test_restore_leaves_fields_someone_else_changed_since() -> None:
    before = state(rx_gro=(True, True), tx_tcp_segmentation=(True, True))
    after = with_features(dataclasses.replace(before, admin_up=True, promisc=True),
                          rx_gro=False, tx_tcp_segmentation=False)
    rec = changes_made(before, after)
    # meanwhile an operator turned promisc off and GRO back on by hand
    now = with_features(dataclasses.replace(after, promisc=False), rx_gro=True)
    plan = plan_restore(rec, now)
    assert plan.promisc is None and GRO not in plan.features  # already at their original value
    assert plan.features == {TSO: True} and plan.admin_up is False


def test_kernel_knock_on_changes_are_recorded_too() -> None:
    # switching GRO off also switched off rx-gro-list (a feature nmbridge does not manage)
    before = state(rx_gro=(True, True), rx_gro_list=(True, True))
    after = with_features(before, rx_gro=False, rx_gro_list=False)
    rec = changes_made(before, after)
    assert dict(rec.features) == {GRO: True, "rx-gro-list": True}


flag = st.booleans()
feature_names = [o.feature for o in OFFLOADS] + ["rx-gro-list", "tx-checksum-ip-generic"]


@st.composite
def before_after(draw: st.DrawFn) -> tuple[LinkState, LinkState]:
    feats = {n: Feature(draw(flag), draw(flag)) for n in draw(st.sets(st.sampled_from(feature_names)))}
    before = LinkState("eth1", 3, draw(flag), draw(flag), 1500, features=feats)
    after = LinkState("eth1", 3, draw(flag), draw(flag), 1500,
                      features={n: Feature(draw(flag), f.changeable) for n, f in feats.items()})
    return before, after


@given(before_after())
def test_restore_of_any_change_gives_back_the_original(pair: tuple[LinkState, LinkState]) -> None:
    before, after = pair
    rec = changes_made(before, after)
    plan = plan_restore(rec, after)
    assert apply(after, plan) == before
    # and touches nothing that did not change
    assert set(plan.features) == {n for n in before.features
                                  if before.features[n].active != after.features[n].active}


# ---------------------------------------------------------------- MTU checks

def test_mtu_that_fits_the_buffer_with_a_vlan_tag_is_fine() -> None:
    assert frame_limit(1500) == 1518
    assert check_mtu(("eth1", 1500), ("eth2", 1500), buf_size=2048) == []
    assert check_mtu(("eth1", 2030), ("eth2", 2030), buf_size=2048) == []


def test_mtu_too_large_for_the_buffer_is_an_error_unless_chains_are_allowed() -> None:
    found = check_mtu(("eth1", 9000), ("eth2", 9000), buf_size=2048)
    assert [(f.ifname, f.severity) for f in found] == [("eth1", "error"), ("eth2", "error")]
    assert "9018" in found[0].problem and "2048" in found[0].problem
    assert found[0].fix == "ip link set dev eth1 mtu 2030"
    chained = check_mtu(("eth1", 9000), ("eth2", 9000), buf_size=2048, allow_chains=True)
    assert [(f.ifname, f.severity) for f in chained] == [("eth1", "note"), ("eth2", "note")]
    assert [f.ifname for f in check_mtu(("eth1", 2031), None, buf_size=2048)] == ["eth1"]


def test_mtu_of_one_interface_on_both_sides_is_checked_once() -> None:
    # netmap:lo <-> netmap:lo^: the NIC and host rings of one interface
    found = check_mtu(("lo", 65536), ("lo", 65536), buf_size=2048)
    assert [(f.ifname, f.severity) for f in found] == [("lo", "error")]


def test_mtu_mismatch_warns_on_the_smaller_side() -> None:
    found = check_mtu(("eth1", 1500), ("eth2", 1400), buf_size=2048)
    assert len(found) == 1
    f = found[0]
    assert f.severity == "warning" and f.ifname == "eth2"
    assert "1400" in f.problem and "eth1" in f.problem
    assert f.fix == "ip link set dev eth2 mtu 1500"


# ---------------------------------------------------------------- doctor findings

def test_state_findings_give_the_exact_fix_commands() -> None:
    s = state("veth7", rx_gro=(True, True), tx_generic_segmentation=(True, True),
              tx_tcp_segmentation=(True, True), tx_tcp6_segmentation=(True, True),
              rx_vlan_hw_parse=(True, True))
    found = check_state(s, link_setup=False)
    fixes = [f.fix for f in found]
    assert "ip link set dev veth7 up" in fixes
    assert "ip link set dev veth7 promisc on" in fixes
    assert "ethtool -K veth7 gro off gso off tso off rxvlan off" in fixes
    assert all(f.severity == "warning" for f in found)
    # without tso, the IPv6 one is named on its own
    s2 = state("veth7", up=True, promisc=True, tx_tcp6_segmentation=(True, True))
    assert [f.fix for f in check_state(s2, link_setup=False)] == ["ethtool -K veth7 tx-tcp6-segmentation off"]


def test_state_findings_are_notes_when_run_sets_the_link_up_itself() -> None:
    s = state("veth7", rx_gro=(True, True))
    found = check_state(s, link_setup=True)
    assert found and all(f.severity == "note" for f in found)


def test_a_ready_interface_has_no_findings() -> None:
    s = state("veth7", up=True, promisc=True, rx_gro=(False, True), rx_vlan_hw_parse=(False, True))
    assert check_state(s, link_setup=False) == []


def test_operational_state() -> None:
    assert link_is_up(0x1 | 0x10000, "UP")
    assert not link_is_up(0x1, "LOWERLAYERDOWN")
    assert not link_is_up(0x10000, "DOWN")
