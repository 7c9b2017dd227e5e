"""The accounting identity on mem: ports: received = forwarded + dropped[reason] + queued,
per direction, in every snapshot -- also while the forwarder runs in another thread -- and
what the metrics endpoint makes of it; every afpacket drop counter has its reason."""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Any

import pytest
from fwdutil import drain, frame, pair
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from nmbridge.accounting import FASTFWD_DROPS, PortAccounting, direction, pair_directions
from nmbridge.backends.mem import MemPort
from nmbridge.fastfwd import Forwarder
from nmbridge.metrics import BridgeCollector
from nmbridge.netmap_consts import NS_MOREFRAG
from nmbridge.port import Region
from nmbridge.stats import Snapshot, balance, pair_counters

ROOT = Path(__file__).resolve().parents[2]
ACC = PortAccounting(rx_delivered="rx", tx_sent="tx", tx_bytes="txb",
                     rx_drops={"over": "rx_kernel_drops"},
                     tx_drops={"big": "egress_mtu", "down": "tx_link_down"})


def fwd_counters(frames: int = 0, **drops: int) -> dict[str, int]:
    return {"frames": frames, "bytes": 60 * frames, "batches": 1, "tx_stalls": 7,
            **{r: drops.get(r, 0) for r in FASTFWD_DROPS}}


def test_direction_attributes_rx_drops_of_the_source_and_tx_drops_of_the_destination() -> None:
    src = {"rx": 100, "over": 20, "tx": 999, "big": 999}  # its TX side feeds the other direction
    dst = {"rx": 999, "over": 999, "tx": 80, "txb": 4800, "big": 3, "down": 2}
    d = direction(fwd_counters(90, filtered=4, oversize=1), src, ACC, dst, ACC)
    assert d["received"] == 120 and d["forwarded"] == 80 and d["bytes"] == 4800
    assert d["dropped"] == {"rx_kernel_drops": 20, "filtered": 4, "oversize": 1, "broken_chain": 0,
                            "egress_mtu": 3, "tx_link_down": 2}
    # 100 delivered - 95 taken from RX = 5 in the RX ring; 90 on TX - 85 handed over = 5 more
    assert d["queued"] == 10
    assert d["tx_stalls"] == 7 and "tx_stalls" not in d["dropped"]


def test_a_backend_without_port_counters_uses_fastfwds_own() -> None:
    d = direction(fwd_counters(50, filtered=5), None, None, None, None)
    assert (d["received"], d["forwarded"], d["queued"]) == (55, 50, 0)
    assert d["dropped"] == {"filtered": 5, "oversize": 0, "broken_chain": 0}


def test_queued_is_what_sits_in_the_rings_and_returns_to_zero() -> None:
    a, b = pair(slots=64)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject_many(frame(i) for i in range(10))
    fwd.step()  # nothing to move yet; the sync delivers the 10 frames into a's RX ring
    d = pair_directions(fwd.snapshot(), a, b)["a_to_b"]
    assert (d["received"], d["forwarded"], d["queued"]) == (10, 0, 10)
    assert a.ring_state()["rx"][0][2] - a.ring_state()["rx"][0][0] == 10  # tail - head
    fwd.step()
    d = pair_directions(fwd.snapshot(), a, b)["a_to_b"]
    assert (d["received"], d["forwarded"], d["queued"], sum(d["dropped"].values())) == (10, 10, 0, 0)
    assert len(b.collect()) == 10


def test_every_drop_reason_of_the_loop_balances() -> None:
    a, b = pair(slots=64)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject_many(frame(i) for i in range(5))
    a.inject_slot(frame(99), length=4000)  # a slot longer than its buffer
    for _ in range(3):  # a frame of 4 slots: one frame, whole
        a.inject_slot(frame(7), flags=NS_MOREFRAG)
    a.inject_slot(frame(8))
    drain(fwd, a, b)
    d = pair_counters(fwd, a, b)["a_to_b"]
    assert balance(d) == 0 and d["queued"] == 0
    assert d["received"] == 7 and d["forwarded"] == 6 and d["dropped"]["oversize"] == 1
    assert len(b.collect()) == 6


def test_snapshots_balance_while_the_loop_runs_in_another_thread() -> None:
    """An endless source into a sink: every snapshot, taken while frames fly, balances,
    with queued within what the rings can hold, and counters never go back."""
    r = Region(ports=2, slots=256)
    a = MemPort(r, "src", slots=256, rx="source", tx="sink")
    b = MemPort(r, "dst", slots=256, rx="none", tx="sink")
    fwd = Forwarder(a, b, burst=64, direction="a-to-b")
    t = threading.Thread(target=fwd.run, daemon=True)
    t.start()
    seen: list[Any] = []
    try:
        while len(seen) < 200:
            d = pair_directions(fwd.snapshot(), a, b)["a_to_b"]
            assert balance(dict(d)) == 0  # type: ignore[arg-type]
            assert 0 <= d["queued"] <= 2 * 256
            if seen:
                assert d["received"] >= seen[-1]["received"] and d["forwarded"] >= seen[-1]["forwarded"]
            seen.append(d)
    finally:
        fwd.stop()
        t.join(10)
    assert seen[-1]["forwarded"] > 0
    final = pair_directions(fwd.snapshot(), a, b)["a_to_b"]
    assert final["received"] == final["forwarded"] + final["queued"]  # a source loses nothing


def test_metrics_show_the_identity_and_no_untruthful_names() -> None:
    snap = Snapshot(time=0.0, links={}, pairs=[{
        "pair": "lan", "ports": ["afpacket:a", "afpacket:b"], "zerocopy": True,
        "directions": {"a_to_b": {"received": 100, "forwarded": 90, "queued": 4, "bytes": 5400, "batches": 3,
                                  "tx_stalls": 11, "dropped": {"rx_kernel_drops": 5, "egress_mtu": 1},
                                  "filter": None}}}])
    reg = CollectorRegistry()
    reg.register(BridgeCollector(lambda: snap))
    text = generate_latest(reg).decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    lab = (("direction", "a_to_b"), ("pair", "lan"))
    assert samples[("nmbridge_received_total", lab)] == 100
    assert samples[("nmbridge_forwarded_total", lab)] == 90
    assert samples[("nmbridge_queued", lab)] == 4
    assert samples[("nmbridge_drops_total", (*lab, ("reason", "rx_kernel_drops")))] == 5
    assert samples[("nmbridge_drops_total", (*lab, ("reason", "egress_mtu")))] == 1
    assert samples[("nmbridge_tx_stalls_total", lab)] == 11
    assert not [k for k in samples if k[0] == "nmbridge_frames_total" or "tx_full" in str(k)]
    assert "# TYPE nmbridge_queued gauge" in text


@pytest.mark.parametrize("name", ["afpacket", "afxdp"])
def test_every_drop_counter_has_a_reason(name: str) -> None:
    """A field commented "dropped: ..." in nmb_<backend>.h is declared in <backend>.pyx (so it
    reaches the counters dict) and mapped to a reason in the backend's ACCOUNTING."""
    import importlib

    header = (ROOT / f"nmbridge/include/nmb_{name}.h").read_text()
    struct = header[header.index(f"struct nmb_{name}_stats {{"):]
    struct = struct[:struct.index("};")]
    fields = re.findall(r"uint64_t\s+([\w\s,]+);\s*/\*\s*dropped:", struct)
    dropped = [f.strip() for group in fields for f in group.split(",")]
    assert "rx_kernel_drops" in dropped
    acc = importlib.import_module(f"nmbridge.backends.{name}_backend").ACCOUNTING
    pyx = (ROOT / f"nmbridge/backends/{name}.pyx").read_text()
    decl = pyx[pyx.index(f"struct nmb_{name}_stats:"):pyx.index(f"nmb_port *nmb_{name}_open")]
    for f in dropped:
        assert f in acc.rx_drops or f in acc.tx_drops, f"{f}: no reason in ACCOUNTING"
        assert re.search(rf"\b{f}\b", decl), f"{f}: not declared in {name}.pyx"
    assert len(set(acc.reasons())) == len(acc.reasons())
