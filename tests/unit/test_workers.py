"""Forwarding workers (nmbridge.workers) over mem: ports with several ring pairs: shares own
disjoint rings, real threads forward them, nothing is lost, duplicated or reordered within a
flow, and the pair's counters are the sum of the workers'."""

from __future__ import annotations

import threading
from collections import Counter
from pathlib import Path

import pytest
from fwdutil import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmbridge.backends import OpenOptions, open_shares, share_rings
from nmbridge.backends.mem import MemPort
from nmbridge.backends.mem_backend import BACKEND as MEM
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Region
from nmbridge.stats import balance, pair_counters, worker_directions
from nmbridge.workers import Workers

BUF = 64


def frame(side: int, ring: int, seq: int, length: int) -> bytes:
    """A frame that says where it entered: side (0: a, 1: b), RX ring (its flow), number."""
    head = bytes([side, ring]) + seq.to_bytes(4, "big")
    return (head + bytes((seq + k) & 0xFF for k in range(max(0, length - len(head)))))[:max(length, 6)]


def shares(region: Region, name: str, rings: int, n: int, slots: int) -> list[MemPort]:
    got = MEM.open_shares(f"{name}?rings={rings}", OpenOptions(slots=slots), region, n)
    assert all(isinstance(p, MemPort) for p in got)
    return [p for p in got if isinstance(p, MemPort)]


def test_a_share_owns_ring_i_mod_n() -> None:
    region = Region(ports=2, rings=5, slots=8, buf_size=BUF)
    a = shares(region, "a", 5, 2, 8)
    assert [p.info()["rx_rings"] for p in a] == [3, 2]  # rings 0, 2, 4 and 1, 3
    assert share_rings(5, 2, 0) == [0, 2, 4] and share_rings(5, 2, 1) == [1, 3]
    # a frame injected for a share's ring arrives on that ring only: the other share's
    # syncs never touch it
    a[1].inject(b"\x01" * 60, ring=1)
    a[0].rxsync()
    assert all(t == 0 for _, _, t in a[0].ring_state()["rx"])
    a[1].rxsync()
    assert [t for _, _, t in a[1].ring_state()["rx"]] == [0, 1]
    with pytest.raises(ValueError, match="no RX ring 2"):
        a[1].inject(b"\x01" * 60, ring=2)


def test_open_shares_refuses_more_shares_than_rings() -> None:
    region = Region(ports=2, rings=2, slots=8, buf_size=BUF)
    free = region.free_buffers
    with pytest.raises(PortError, match=r"^mem:a: 2 ring pairs cannot be split into 3 shares"):
        MEM.open_shares("a?rings=2", OpenOptions(slots=8), region, 3)
    assert region.free_buffers == free  # nothing left behind


def test_default_for_a_backend_without_shares() -> None:
    class OneRing:
        name = "one"

        def open(self, name: str, options: OpenOptions, region: Region | None) -> str:
            return f"port {name}"

    one = OneRing()
    assert open_shares(one, "x", OpenOptions(), None, 1) == ["port x"]  # type: ignore[arg-type,comparison-overlap]
    with pytest.raises(PortError, match=r"^one:x: the one backend has one ring pair per port; "
                                        r"workers = 2 needs 2$"):
        open_shares(one, "x", OpenOptions(), None, 2)  # type: ignore[arg-type]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    rings=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    n=st.integers(1, 4),
    slots=st.sampled_from([4, 8, 32]),
    burst=st.integers(1, 64),
    flows=st.lists(st.tuples(st.integers(0, 1), st.integers(0, 3), st.lists(st.integers(1, BUF * 3),
                                                                            min_size=1, max_size=30)),
                   min_size=1, max_size=8),
)
def test_workers_lose_nothing_and_keep_flow_order(rings: tuple[int, int], n: int, slots: int, burst: int,
                                                  flows: list[tuple[int, int, list[int]]]) -> None:
    n = min(n, *rings)
    region = Region(ports=2, rings=max(rings), slots=slots, buf_size=BUF, spare_ports=2)
    a, b = shares(region, "a", rings[0], n, slots), shares(region, "b", rings[1], n, slots)
    sides = (a, b)
    bufs_before = Counter(i for p in (*a, *b) for i in p.buffer_indices())
    group = Workers(a, b, lambda x, y: Forwarder(x, y, burst=burst))

    # frames enter each side's RX ring r (a flow: ring r of side s): share r % n, its ring r // n
    sent: dict[tuple[int, int], list[bytes]] = {}
    seq = 0
    for side, ring, lengths in flows:
        ring %= rings[side]
        for length in lengths:
            f = frame(side, ring, seq, length)
            seq += 1
            sent.setdefault((side, ring), []).append(f)
            sides[side][ring % n].inject(f, ring=ring // n)
    # a chain longer than a ring (or than any ring of the other side) can never move
    limit = slots - 1
    deliverable = {k: [f for f in v if -(-len(f) // BUF) <= limit] for k, v in sent.items()}
    expected = sum(map(len, deliverable.values()))
    broken = sum(map(len, sent.values())) - expected

    threads = [threading.Thread(target=f.run, daemon=True) for f in group.forwarders]
    for t in threads:
        t.start()
    got: dict[tuple[int, int], list[bytes]] = {}
    where: dict[tuple[int, int], set[int]] = {}

    def collect() -> int:
        for ports in (b, a):  # frames from a arrive on b's shares, and back
            for w, p in enumerate(ports):
                for f in p.collect():
                    key = (f[0], f[1])
                    got.setdefault(key, []).append(f)
                    where.setdefault(key, set()).add(w)
        return sum(map(len, got.values()))

    def dropped() -> int:
        return sum(s["broken_chain"] for s in group.stats().values())

    wait_for(lambda: collect() >= expected and dropped() >= broken and all(p.pending == 0 for p in (*a, *b)),
             f"{expected} frames forwarded and {broken} dropped")
    # the frames still in flight: let the loops settle, then stop
    group.stop()
    for t in threads:
        t.join(10)
        assert not t.is_alive()
    collect()

    assert got == {k: v for k, v in deliverable.items() if v}  # each flow whole, in order, once
    for (_, ring), ws in where.items():
        assert ws == {ring % n}, "a flow is forwarded by the worker that owns its ring"
    stats = group.stats()
    assert sum(s["frames"] for s in stats.values()) == expected
    assert sum(s["broken_chain"] for s in stats.values()) == broken
    # every buffer of the region is in exactly one slot of one share (or free), as before
    after = Counter(i for p in (*a, *b) for i in p.buffer_indices())
    assert after == bufs_before and max(after.values()) == 1
    region.check()
    for p in (*a, *b):
        p.check()
    # the pair's counters: the workers' summed, and the identity holds for the sum
    per = worker_directions(group, a[0], b[0])
    assert len(per) == n
    total = pair_counters(group, a[0], b[0])
    for d, s in total.items():
        assert balance(s) == 0
        assert s["forwarded"] == sum(w[d]["forwarded"] for w in per)
        assert s["received"] == sum(w[d]["received"] for w in per)
    for p in (*a, *b):
        p.close()


def test_unequal_rings_two_workers() -> None:
    """a has 4 ring pairs, b 2, two workers: worker w owns a's rings w, w + 2 and b's ring w;
    both of its a rings feed its one b TX ring, and b's ring w feeds its a TX rings."""
    region = Region(ports=2, rings=4, slots=16, buf_size=BUF)
    a, b = shares(region, "a", 4, 2, 16), shares(region, "b", 2, 2, 16)
    group = Workers(a, b, lambda x, y: Forwarder(x, y), rings=(4, 2))
    assert group.owned(0) == {"a": [0, 2], "b": [0]} and group.owned(1) == {"a": [1, 3], "b": [1]}
    for ring in range(4):
        for k in range(20):
            a[ring % 2].inject(frame(0, ring, k, 60), ring=ring // 2)
    for ring in range(2):
        for k in range(20):
            b[ring].inject(frame(1, ring, k, 60), ring=0)
    threads = [threading.Thread(target=f.run, daemon=True) for f in group.forwarders]
    for t in threads:
        t.start()
    got_b: list[list[bytes]] = [[], []]
    got_a: list[list[bytes]] = [[], []]

    def done() -> bool:
        for w in range(2):
            got_b[w] += b[w].collect()
            got_a[w] += a[w].collect()
        return sum(map(len, got_b)) == 80 and sum(map(len, got_a)) == 40

    wait_for(done, "every frame forwarded")
    group.stop()
    for t in threads:
        t.join(10)
    for w in range(2):
        assert sorted({f[1] for f in got_b[w]}) == [w, w + 2]
        for ring in (w, w + 2):
            assert [f for f in got_b[w] if f[1] == ring] == [frame(0, ring, k, 60) for k in range(20)]
        assert got_a[w] == [frame(1, w, k, 60) for k in range(20)]
    assert group.describe() == [{"worker": 0, "cpu": None, "rings": {"a": [0, 2], "b": [0]}},
                                {"worker": 1, "cpu": None, "rings": {"a": [1, 3], "b": [1]}}]


def test_netmap_ring_pairs_before_opening(tmp_path: Path) -> None:
    from nmbridge.backends.netmap_backend import ring_pairs

    for q in ("rx-0", "rx-1", "rx-2", "tx-0", "tx-1", "tx-2"):
        (tmp_path / "eth1" / "queues" / q).mkdir(parents=True)
    assert ring_pairs("netmap:eth1", str(tmp_path)) == 3
    assert ring_pairs("eth1-2", str(tmp_path)) == 1  # names one ring pair
    assert ring_pairs("eth1^", str(tmp_path)) == 1 and ring_pairs("p{1", str(tmp_path)) == 1
    assert ring_pairs("vale0:x", str(tmp_path)) == 1
    with pytest.raises(PortError, match=r"^netmap:eth9: cannot count its queues in .*eth9/queues"):
        ring_pairs("eth9", str(tmp_path))
