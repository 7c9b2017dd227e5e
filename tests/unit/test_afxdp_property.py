"""Property: afxdp: ports obey netmap's rules of ownership over a fake XSK.

Two afxdp ports whose "kernel" is a fake over rings in plain memory (the same rxsync/txsync
code as a real port): the fake kernel receives frames on `a` from the buffers of its fill
ring, in a rotated order when asked (a driver may hand buffers back out of fill order), and
transmits and completes frames of `b` (in reverse order when asked); fastfwd forwards a -> b
by swapping buffers.  After every operation every buffer of the region is in exactly one slot
or the free pool, the buffers the kernel holds are exactly those of the slots the kernel owns,
and at the end every received frame left `b` exactly once.
"""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmbridge.backends.afxdp import FakeXskPort
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Region

ops = st.lists(
    st.one_of(
        st.tuples(st.just("rx"), st.integers(0, 80), st.integers(0, 7)),
        st.tuples(st.just("tx"), st.integers(0, 80), st.integers(0, 7)),
        st.tuples(st.just("step"), st.just(0), st.just(0)),
    ),
    min_size=1,
    max_size=40,
)


def cyclic(lo: int, hi: int, n: int) -> list[int]:
    """Slots lo, lo+1, ... up to hi (exclusive), cyclically."""
    out = []
    while lo != hi:
        out.append(lo)
        lo = (lo + 1) % n
    return out


def check_ownership(region: Region, a: FakeXskPort, b: FakeXskPort, slots: int) -> None:
    region.check()
    a.check()
    b.check()
    for p in (a, b):
        # the buffers in the fill and RX rings are those of the RX slots the NIC owns,
        # [tail, head - 1) (rxsync has run: hwcur == head)
        held = p.held()
        assert len(held) == len(set(held))
        head, _, tail = p.ring_state()["rx"][0]
        rx_bufs = p.buffer_indices()[slots:]
        assert sorted(held) == sorted(rx_bufs[s] for s in cyclic(tail, (head - 1) % slots, slots))
        # what the kernel holds on the TX side (TX ring, completions not yet reaped) is among
        # the TX slots in flight, (tail, head)
        held = p.held(tx_side=True)
        assert len(held) == len(set(held))
        head, _, tail = p.ring_state()["tx"][0]
        tx_bufs = p.buffer_indices()[:slots]
        assert set(held) <= {tx_bufs[s] for s in cyclic((tail + 1) % slots, head, slots)}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(slots=st.integers(2, 40), burst=st.integers(1, 64), program=ops)
def test_fake_xsk_never_loses_or_duplicates_a_buffer(slots: int, burst: int,
                                                      program: list[tuple[str, int, int]]) -> None:
    region = Region(ports=2, slots=slots)
    a = FakeXskPort(region, "a", slots=slots)
    b = FakeXskPort(region, "b", slots=slots)
    fwd = Forwarder(a, b, burst=burst, direction="a-to-b")
    seen = bytearray(4096)
    received = 0
    check_ownership(region, a, b, slots)
    for op, k, perm in program:
        if op == "rx":
            received += a.kernel(rx=k, perm=perm)
        elif op == "tx":
            b.kernel(tx=k, perm=perm, seen=seen)
        else:
            fwd.step()
        check_ownership(region, a, b, slots)
    # drain: forward and transmit until nothing moves
    for _ in range(10 * slots + 10):
        moved = fwd.step() + b.kernel(tx=slots, seen=seen)
        check_ownership(region, a, b, slots)
        if not moved and not b.held(tx_side=True):
            fwd.step()
            if not b.kernel(tx=slots, seen=seen):
                break
    assert fwd.stats()["a_to_b"]["frames"] == received
    assert list(seen[:received]) == [1] * received
    assert not any(seen[received:])
    assert b.counters()["tx_frames"] == received == a.counters()["rx_frames"]
    a.close()
    b.close()
    region.check()


def test_rotated_fill_order_is_swapped_into_place() -> None:
    """A buffer handed back out of fill order lands at the RX ring's tail; the one that held
    that slot takes its place, still the kernel's."""
    region = Region(ports=2, slots=8)
    a = FakeXskPort(region, "a", slots=8)
    b = FakeXskPort(region, "b", slots=8)
    before = a.buffer_indices()[8:]
    assert a.kernel(rx=3, perm=1) == 3  # delivers fill entries 1, 2, 0
    a.rxsync()
    after = a.buffer_indices()[8:]
    assert after[:3] == [before[1], before[2], before[0]]
    assert a.ring_state()["rx"][0] == (0, 0, 3)
    check_ownership(region, a, b, 8)
