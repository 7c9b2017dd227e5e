"""fastfwd on mem: ports: byte-for-byte forwarding, copy mode, chains, bad slots, threads."""

from __future__ import annotations

import os
import threading

import pytest
from fwdutil import drain, frame, pair

from nmbridge.backends.mem import MemPort
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.netmap_consts import NS_BUF_CHANGED, NS_MOREFRAG
from nmbridge.port import Region


@pytest.mark.parametrize("zerocopy", [True, False])
def test_both_directions_byte_for_byte(zerocopy: bool) -> None:
    a, b = pair(zerocopy=zerocopy)
    fwd = Forwarder(a, b, burst=16)
    assert fwd.zerocopy is zerocopy
    left = [frame(i, 60 + i * 7) for i in range(150)]
    right = [frame(1000 + i, 1514 - i) for i in range(90)]
    a.inject_many(left)
    b.inject_many(right)
    drain(fwd, a, b)
    assert b.collect() == left
    assert a.collect() == right
    st = fwd.stats()
    assert st["a_to_b"]["frames"] == 150 and st["b_to_a"]["frames"] == 90
    assert st["a_to_b"]["bytes"] == sum(map(len, left))
    assert st["a_to_b"]["batches"] >= 150 // 16
    a.check()


def test_zero_copy_swaps_buffers_and_marks_both_slots() -> None:
    a, b = pair(slots=8)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject(frame(1))
    a.rxsync()
    rx_before = a.buffer_indices()[8:]  # RX ring of a
    tx_before = b.buffer_indices()[:8]  # TX ring of b
    fwd.step()
    slots = b.collect_slots()
    assert [s[0] for s in slots] == [frame(1)]
    rx_after = a.buffer_indices()[8:]
    tx_after = b.buffer_indices()[:8]
    assert rx_after[0] == tx_before[0] and tx_after[0] == rx_before[0]  # swapped, not copied
    assert sorted(rx_before + tx_before) == sorted(rx_after + tx_after)


def test_copy_mode_keeps_each_pool_to_itself() -> None:
    a, b = pair(slots=8, zerocopy=False)
    before_a, before_b = sorted(a.buffer_indices()), sorted(b.buffer_indices())
    fwd = Forwarder(a, b)
    a.inject_many([frame(i) for i in range(20)])
    drain(fwd, a, b)
    assert b.collect() == [frame(i) for i in range(20)]
    assert sorted(a.buffer_indices()) == before_a and sorted(b.buffer_indices()) == before_b


def test_directions_can_be_one_way() -> None:
    a, b = pair()
    fwd = Forwarder(a, b, direction="b-to-a")
    a.inject(frame(1))
    b.inject(frame(2))
    for _ in range(5):
        fwd.step()
    assert a.collect() == [frame(2)]
    assert b.collect() == []
    assert list(fwd.stats()) == ["b_to_a"]


def test_morefrag_chains_move_whole() -> None:
    a, b = pair(slots=16, buf_size=256)
    big = [frame(i, 256 * 3 + 10) for i in range(5)]  # 4 slots each
    a.inject_many(big)
    fwd = Forwarder(a, b, burst=3)  # burst smaller than a chain: a chain still moves whole
    drain(fwd, a, b)
    slots = b.collect_slots()
    assert [f for f, _, _ in slots[:4]] == [big[0][i * 256:(i + 1) * 256] for i in range(4)]
    assert [bool(fl & NS_MOREFRAG) for _, fl, _ in slots[:4]] == [True, True, True, False]
    assert fwd.stats()["a_to_b"]["frames"] == 5


def test_a_chain_waits_for_its_tail() -> None:
    a, b = pair(slots=16, buf_size=256)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject_slot(b"x" * 256, flags=NS_MOREFRAG)
    for _ in range(4):
        fwd.step()
    assert b.collect_slots() == []  # half a frame never leaves
    a.inject_slot(b"y" * 10)
    drain(fwd, a, b)
    assert b.collect() == [b"x" * 256 + b"y" * 10]


def test_a_chain_longer_than_the_tx_ring_is_dropped_as_broken() -> None:
    region = Region(ports=2, rings=1, slots=16, buf_size=64)
    a = MemPort(region, "a", slots=16, strict=True)
    b = MemPort(region, "b", slots=8, strict=True)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject(frame(7, 64 * 7 + 1))  # 8 slots: an 8-slot TX ring holds at most 7
    a.inject(frame(8))
    drain(fwd, a, b)
    st = fwd.stats()["a_to_b"]
    assert st["broken_chain"] == 1 and st["frames"] == 1
    assert b.collect() == [frame(8)]


def test_a_chain_that_fills_the_rx_ring_unfinished_is_broken() -> None:
    a, b = pair(slots=4, buf_size=64)
    fwd = Forwarder(a, b, direction="a-to-b")
    for _ in range(3):  # an RX ring of 4 slots holds 3: all MOREFRAG, no end
        a.inject_slot(b"z" * 64, flags=NS_MOREFRAG)
    a.inject_slot(b"z" * 64, flags=NS_MOREFRAG)  # more of it arrives later...
    a.inject_slot(b"end")  # ...up to its last slot: all of it is dropped
    a.inject(frame(9))
    drain(fwd, a, b)
    st = fwd.stats()["a_to_b"]
    assert st["broken_chain"] == 1
    assert b.collect() == [frame(9)]


def test_oversize_slot_is_counted_and_not_forwarded() -> None:
    a, b = pair(buf_size=128)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject_slot(frame(1, 100), length=129)  # a NIC claiming more than the buffer holds
    a.inject(frame(2))
    drain(fwd, a, b)
    assert b.collect() == [frame(2)]
    assert fwd.stats()["a_to_b"]["oversize"] == 1


def test_full_tx_stalls_and_loses_nothing() -> None:
    a, b = pair(slots=8)
    fwd = Forwarder(a, b, direction="a-to-b", burst=64)
    frames = [frame(i) for i in range(40)]
    a.inject_many(frames)
    got: list[bytes] = []
    # b's TX is reclaimed only at txsync, so each step moves at most 7: TX fills every time
    for _ in range(100):
        fwd.step()
        got += b.collect()
    assert got == frames


def test_forwarded_slots_carry_buf_changed_to_the_kernel() -> None:
    a, b = pair(slots=8)
    fwd = Forwarder(a, b, direction="a-to-b")
    a.inject(frame(1))
    a.rxsync()
    fwd.step()  # the mem "kernel" reports and clears NS_BUF_CHANGED at txsync
    (data, flags, _), = b.collect_slots()
    assert data == frame(1) and not flags & NS_BUF_CHANGED


def test_run_in_a_thread_stops_at_once() -> None:
    a, b = pair(slots=64, strict=False)
    fwd = Forwarder(a, b, poll_timeout_ms=60_000)  # stop() must not wait for the timeout
    t = threading.Thread(target=fwd.run)
    t.start()
    frames = [frame(i) for i in range(500)]
    a.inject_many(frames)
    got: list[bytes] = []
    for _ in range(10_000):
        got += b.collect()
        if len(got) == len(frames):
            break
        threading.Event().wait(0.001)
    fwd.stop()
    t.join(timeout=5)
    assert not t.is_alive()
    assert got == frames
    assert fwd.polls >= 1


def _polls_between_frames(spin_us: int, n: int = 20) -> int:
    """Run a forwarder with `spin_us`; send `n` frames, each once the one before arrived
    (and, with spin_us = 0, once the loop is asleep again): the poll() calls meanwhile.  The
    loop's thread and this one on different CPUs where there are two, so that they do not
    preempt each other (a preempted loop stops polling and sleeps)."""
    a, b = pair(slots=64, strict=False)
    fwd = Forwarder(a, b, poll_timeout_ms=60_000, spin_us=spin_us)
    cpus = sorted(os.sched_getaffinity(0))

    def run() -> None:
        if len(cpus) > 1:
            os.sched_setaffinity(0, {cpus[-1]})
        fwd.run()

    mine = os.sched_getaffinity(0)
    if len(cpus) > 1:
        os.sched_setaffinity(0, set(cpus[:-1]))
    t = threading.Thread(target=run)
    t.start()
    try:
        got: list[bytes] = []
        start = None  # counted from the second frame on (the first finds the loop asleep)
        for i in range(n + 1):
            polls = fwd.polls  # asleep (spin_us = 0): counted as it went to sleep
            a.inject(frame(i))
            for _ in range(10_000):
                got += b.collect()
                if got and got[-1] == frame(i):
                    break
                threading.Event().wait(0.0005)
            if not spin_us:  # asleep again before the next frame
                for _ in range(10_000):
                    if fwd.polls > polls:
                        break
                    threading.Event().wait(0.0005)
            if start is None:
                start = fwd.polls
        assert got == [frame(i) for i in range(n + 1)]
        assert start is not None
        return fwd.polls - start
    finally:
        fwd.stop()
        t.join(timeout=5)
        os.sched_setaffinity(0, mine)
        assert not t.is_alive()


def test_spin_us_takes_the_next_frame_without_sleeping() -> None:
    """Idle, the loop keeps syncing for spin_us before it sleeps in poll(): a frame that comes
    meanwhile needs no wake-up (frames a millisecond apart, a second-long window: hardly a
    poll(); one now and then when the thread was preempted anyway); with spin_us = 0 the
    loop sleeps as soon as nothing moves, one poll() per frame at least."""
    assert _polls_between_frames(1_000_000) < 10
    assert _polls_between_frames(0) >= 20


def test_a_polling_loop_that_loses_its_cpu_stops_polling_and_sleeps() -> None:
    """A busy task on the forwarding thread's CPU, the thread pinned there: the loop, polling
    for a second, notices it shares its CPU, cannot move, and sleeps in poll() instead (no
    frame comes: only that can end the spell)."""
    a, b = pair(slots=64, strict=False)
    fwd = Forwarder(a, b, poll_timeout_ms=60_000, spin_us=1_000_000)
    cpu = min(os.sched_getaffinity(0))
    stop = threading.Event()

    def run() -> None:
        os.sched_setaffinity(0, {cpu})
        fwd.run()

    def hog() -> None:  # a CPU-bound task on the same CPU
        os.sched_setaffinity(0, {cpu})
        x = 0
        while not stop.is_set():
            x += 1

    mine = os.sched_getaffinity(0)
    if len(mine) > 1:  # this thread elsewhere: only the hog shares the loop's CPU
        os.sched_setaffinity(0, mine - {cpu})
    t = threading.Thread(target=run)
    t.start()
    a.inject(frame(1))  # a frame, so the loop polls afterwards
    for _ in range(10_000):
        if b.collect():
            break
        threading.Event().wait(0.0005)
    polls, yields = fwd.polls, fwd.spin_yields
    h = threading.Thread(target=hog)
    h.start()
    try:
        for _ in range(2_000):  # well inside the second of polling
            if fwd.spin_yields > yields and fwd.polls > polls:
                break
            threading.Event().wait(0.0005)
        assert fwd.spin_yields > yields and fwd.polls > polls
        assert fwd.cpu_moves == 0  # it may use one CPU only
    finally:
        stop.set()
        h.join()
        os.sched_setaffinity(0, mine)
        fwd.stop()
        t.join(timeout=5)
    assert not t.is_alive()


def _cpu_of(tid: int) -> int:
    """The CPU a thread last ran on (/proc: field 39 of its stat)."""
    with open(f"/proc/self/task/{tid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[36])


@pytest.mark.skipif(len(os.sched_getaffinity(0)) < 2, reason="needs two CPUs")
def test_a_polling_loop_that_shares_its_cpu_moves_to_another_and_polls_on() -> None:
    """A busy task pinned where the polling thread runs, the thread free to use two CPUs: it
    notices it shares its CPU and moves to the other one, with its affinity as it was.  (Where
    it runs next is the scheduler's: this machine's packs tasks onto fewer vCPUs and may bring
    it back, so the test does not follow it further.)"""
    a, b = pair(slots=64, strict=False)
    fwd = Forwarder(a, b, poll_timeout_ms=60_000, spin_us=1_000_000)
    first, second = sorted(os.sched_getaffinity(0))[:2]
    stop = threading.Event()
    tid: list[int] = []

    def run() -> None:
        os.sched_setaffinity(0, {first})  # starts on `first`, alone there
        tid.append(threading.get_native_id())
        fwd.run()

    def hog() -> None:  # a CPU-bound task on the polling thread's CPU
        os.sched_setaffinity(0, {first})
        x = 0
        while not stop.is_set():
            x += 1

    mine = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {second})
    t = threading.Thread(target=run)
    t.start()
    h = threading.Thread(target=hog)
    try:
        a.inject(frame(1))  # a frame, so the loop polls afterwards
        for _ in range(10_000):
            if b.collect():
                break
            threading.Event().wait(0.0005)
        os.sched_setaffinity(tid[0], {first, second})  # free to move; it stays where it runs
        assert _cpu_of(tid[0]) == first
        moves = fwd.cpu_moves
        os.sched_setaffinity(0, {first})  # this thread too: `second` stays free for the loop
        h.start()
        for _ in range(4_000):  # well inside the second of polling
            if fwd.cpu_moves > moves:
                break
            threading.Event().wait(0.0005)
        assert fwd.cpu_moves > moves
        assert os.sched_getaffinity(tid[0]) == {first, second}  # moved, not pinned
    finally:
        stop.set()
        if h.is_alive():
            h.join()
        os.sched_setaffinity(0, mine)
        fwd.stop()
        t.join(timeout=5)
    assert not t.is_alive()


def test_spin_us_is_bounded_and_set_before_run() -> None:
    a, b = pair()
    with pytest.raises(ValueError, match="spin_us"):
        Forwarder(a, b, spin_us=1_000_001)
    fwd = Forwarder(a, b)
    assert fwd.spin_us == 0
    fwd.spin_us = 2000
    assert fwd.spin_us == 2000
    with pytest.raises(ValueError, match="spin_us"):
        fwd.spin_us = -1


def test_run_reports_a_ring_violation_as_port_error() -> None:
    a, b = pair(slots=8)
    fwd = Forwarder(a, b, direction="a-to-b")
    # a corrupt ring (two slots with one buffer) is caught by strict mode at the next sync
    import ctypes
    import struct
    (nifp,) = struct.unpack("<Q", ctypes.string_at(a.address, 8))
    (tx0,) = struct.unpack("<q", ctypes.string_at(nifp + 56, 8))
    dup = struct.unpack("<I", ctypes.string_at(nifp + tx0 + 256, 4))[0]
    ctypes.memmove(nifp + tx0 + 256 + 16, struct.pack("<I", dup), 4)
    a.inject(frame(1))
    dup_msg = r"mem:a <-> mem:b: (rx|tx)sync: .*a tx ring 0 slot 1: buf_idx \d+ is also in a tx ring 0 slot 0"
    with pytest.raises(PortError, match=dup_msg):
        fwd.run()


def test_constructor_checks() -> None:
    a, b = pair()
    with pytest.raises(ValueError, match="burst"):
        Forwarder(a, b, burst=0)
    with pytest.raises(ValueError, match="direction"):
        Forwarder(a, b, direction="sideways")
    with pytest.raises(ValueError, match="two different ports"):
        Forwarder(a, a)
    b.close()
    with pytest.raises(PortError, match="closed"):
        Forwarder(a, b)
