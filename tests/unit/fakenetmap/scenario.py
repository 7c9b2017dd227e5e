"""Run under LD_PRELOAD=fake_netmap.so with NMB_FAKE_DEV=<file>: the netmap backend's open,
region sharing, ring ranges, syncs, errors, exclusive rings, the system calls of a forwarding
round, and close, end to end.  Prints "ok" (and one JSON line of syscall counts) or fails.

    python scenario.py [all|counts]
"""

from __future__ import annotations

import ctypes
import json
import os
import struct
import sys

import pytest

from nmbridge.backends.netmap import NetmapPort, mapped_regions
from nmbridge.backends.netmap_backend import NR_EXCLUSIVE, NR_NO_TX_POLL, open_port
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder

DEV = os.environ["NMB_FAKE_DEV"]
FAKE = ctypes.CDLL(None)  # the preloaded fake's test hooks are global symbols
BUSY = "its rings are in use by another netmap program"


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def counters() -> dict[str, int]:
    out = (ctypes.c_uint64 * 8)()
    FAKE.fake_netmap_counters(out)
    return {"poll": out[0], "txsync": out[1], "rxsync": out[2], "ctrl": out[3],
            "poll_tx_rings": out[4], "poll_rx_rings": out[5], "pollin": out[6], "pollout": out[7]}


def last_request() -> tuple[bytes, bytes]:
    buf = (ctypes.c_ubyte * (88 + 56))()
    FAKE.fake_netmap_last_request(buf)
    raw = bytes(buf)
    return raw[:88], raw[88:]


def basics() -> None:
    fd0 = fds()
    a = open_port("netmap:fa", device=DEV)
    b = open_port("netmap:fb", device=DEV)
    assert mapped_regions() == 1, "two ports of region 1 share one mapping"
    ra = a.registration()
    assert ra["mem_id"] == 1 and ra["region_users"] == 2
    assert ra["tx_range"] == (0, 1) and ra["rx_range"] == (0, 1)
    assert ra["host_tx_rings"] == 1 and ra["reply_host_tx_rings"] == 0
    assert ra["nr_flags"] == NR_EXCLUSIVE
    assert a.mem_key == b.mem_key == (1 << 63) | 1
    assert a.name == "fa" and a.info()["tx_slots"] == 1024 and a.info()["buf_size"] == 2048

    # the fake loops TX back into RX: a port talks to itself
    frames = [bytes([i]) * (60 + i) for i in range(10)]
    assert a.send(frames) == 10
    assert a.recv() == frames

    # nmbridge a -> b (zero-copy), then b's loopback brings them to b's RX
    fwd = Forwarder(a, b, direction="a-to-b")
    assert fwd.zerocopy
    assert a.send(frames) == 10
    a.rxsync()
    assert fwd.step() == 10
    assert b.recv() == frames
    assert fwd.stats()["a_to_b"]["frames"] == 10

    # a VALE port lives in another region: mapped separately, copy mode
    v = open_port("vale0:v", device=DEV)
    assert mapped_regions() == 2 and v.mem_id == 3 and v.mem_key != a.mem_key
    fwd2 = Forwarder(a, v, direction="a-to-b")
    assert not fwd2.zerocopy
    assert a.send(frames[:3]) == 3
    a.rxsync()
    assert fwd2.step() == 3
    assert v.recv() == frames[:3]
    with pytest.raises(ValueError, match="different memory regions"):
        Forwarder(a, v, zerocopy=True)

    # host rings: indices after the NIC rings, from the netmap_if counts
    h = open_port("netmap:fa^", device=DEV)
    rh = h.registration()
    assert rh["nr_mode"] == 2 and rh["tx_range"] == (1, 2) and rh["rx_range"] == (1, 2)
    assert h.send(frames[:2]) == 2 and h.recv() == frames[:2]

    # errors in words, and nothing left behind
    fd1, regions = fds(), mapped_regions()
    for name, words in [("netmap:nosuch0", "no such interface 'nosuch0'"),
                        ("netmap:busy0", BUSY),
                        ("netmap:oldapi0", "NETMAP_API 14, the kernel answered nr_version 11")]:
        with pytest.raises(PortError) as e:
            open_port(name, device=DEV)
        assert str(e.value) == f"{name}: " + str(e.value).split(": ", 1)[1] and words in str(e.value), e.value
    assert fds() == fd1 and mapped_regions() == regions

    # close: the mapping goes with the last port of its region
    del fwd, fwd2
    a.close()
    assert mapped_regions() == 2
    b.close()
    h.close()
    assert mapped_regions() == 1
    v.close()
    assert mapped_regions() == 0 and fds() == fd0
    a.close()  # idempotent


def refused(name: str) -> str:
    before_fds, before_regions = fds(), mapped_regions()
    with pytest.raises(PortError) as e:
        open_port(name, device=DEV)
    assert fds() == before_fds and mapped_regions() == before_regions, "a refused port leaks nothing"
    return str(e.value)


def exclusive() -> None:
    # the request the kernel gets: NR_EXCLUSIVE set, NR_NO_TX_POLL not
    p = open_port("netmap:ex0", device=DEV)
    hdr, reg = last_request()
    assert hdr[8:8 + 4] == b"ex0\0" and struct.unpack_from("<I", reg, 36)[0] == 1  # ALL_NIC
    flags = struct.unpack_from("<Q", reg, 48)[0]
    assert flags & NR_EXCLUSIVE and not flags & NR_NO_TX_POLL, hex(flags)

    # the same rings again, from this process: EBUSY, in words, nothing leaked
    msg = refused("netmap:ex0")
    assert msg.startswith("netmap:ex0: ") and BUSY in msg, msg
    # the host rings are other krings: no conflict; NIC + host overlaps both
    host = open_port("netmap:ex0^", device=DEV)
    assert BUSY in refused("netmap:ex0*")
    assert BUSY in refused("netmap:ex0^")
    # one NIC ring of a two-ring interface vs the other ring, and vs all of them
    q0 = open_port("netmap:mq0-0", device=DEV)
    q1 = open_port("netmap:mq0-1", device=DEV)
    assert BUSY in refused("netmap:mq0")
    assert BUSY in refused("netmap:mq0-1/R")
    # the two ends of a pipe are two ports: one process may hold both exclusively
    m, s = open_port("netmap:px{1", device=DEV), open_port("netmap:px}1", device=DEV)
    assert BUSY in refused("netmap:px}1")
    assert m.send([b"\x01" * 60, b"\x02" * 70]) == 2 and s.recv() == [b"\x01" * 60, b"\x02" * 70]
    # VALE ports: per port
    v1, v2 = open_port("vale0:e1", device=DEV), open_port("vale0:e2", device=DEV)
    assert BUSY in refused("vale0:e1")

    # a non-exclusive user (pkt-gen without /x, say) blocks our exclusive registration ...
    other = NetmapPort("netmap:sh0", "sh0", mode=1, flags=0, device=DEV)
    assert BUSY in refused("netmap:sh0")
    # ... and may share with other non-exclusive users, as netmap allows
    other2 = NetmapPort("netmap:sh0", "sh0", mode=1, flags=0, device=DEV)
    other.close()
    other2.close()
    mine = open_port("netmap:sh0", device=DEV)
    # our exclusive mark refuses a later non-exclusive registration too
    with pytest.raises(PortError, match=BUSY):
        NetmapPort("netmap:sh0", "sh0", mode=1, flags=0, device=DEV)

    # closing releases: the rings can be registered again
    p.close()
    again = open_port("netmap:ex0", device=DEV)
    for port in (again, host, q0, q1, m, s, v1, v2, mine):
        port.close()
    assert mapped_regions() == 0


def request(i: int) -> tuple[bytes, bytes] | None:
    buf = (ctypes.c_ubyte * (88 + 56))()
    if FAKE.fake_netmap_request(i, buf) != 0:
        return None
    raw = bytes(buf)
    return raw[:88], raw[88:]


def shares() -> None:
    """A NIC port split for two workers: one NR_REG_ONE_NIC registration per ring pair, each
    with its own fd; a worker's syncs are its share's ioctls, on its ring only."""
    from nmbridge.backends.netmap_backend import NR_REG_ONE_NIC, open_shares

    fd0, regions0 = fds(), mapped_regions()
    FAKE.fake_netmap_reset_counters()
    a = open_shares("netmap:mqa", 2, device=DEV)
    # the requests, share by share: ONE_NIC, ring w, exclusive
    for w in range(2):
        got = request(w)
        assert got is not None
        hdr, reg = got
        assert hdr[8:8 + 4] == b"mqa\0"
        assert struct.unpack_from("<H", reg, 34)[0] == w  # nr_ringid
        assert struct.unpack_from("<I", reg, 36)[0] == NR_REG_ONE_NIC  # nr_mode
        assert struct.unpack_from("<Q", reg, 48)[0] & NR_EXCLUSIVE
    assert request(2) is None and counters()["ctrl"] == 2
    assert len({p.fd for p in a}) == 2 and fds() == fd0 + 2 and mapped_regions() == regions0 + 1
    for w, p in enumerate(a):
        r = p.registration()
        assert (r["nr_mode"], r["nr_ringid"]) == (NR_REG_ONE_NIC, w)
        assert r["tx_range"] == (w, w + 1) and r["rx_range"] == (w, w + 1) and r["rx_rings"] == 2
        assert p.spec == "netmap:mqa" and p.info()["rx_rings"] == 1
    b = open_shares("netmap:mqb", 2, device=DEV)
    fwd = [Forwarder(a[w], b[w], direction="a-to-b") for w in range(2)]
    # frames on a's ring w (the fake loops a TX ring into the same RX ring) reach b's ring w only
    sent = {w: [bytes([w, i]) * 30 for i in range(5 + w)] for w in range(2)}
    for w in range(2):
        assert a[w].send(sent[w]) == len(sent[w])
    for w in range(2):
        a[w].rxsync()
        FAKE.fake_netmap_reset_counters()
        assert fwd[w].step() == len(sent[w])
        c = counters()  # one worker's round: a txsync of its b share, an rxsync of its a share
        assert (c["txsync"], c["rxsync"], c["poll"], c["ctrl"]) == (1, 1, 0, 0), c
        assert b[1 - w].recv() == [] or w == 1  # share 1's round has not run yet for w == 0
        assert b[w].recv() == sent[w]
    # what cannot be split so, in one line, leaking nothing
    fd1, regions1 = fds(), mapped_regions()  # (with the forwarders' eventfds)
    for name, n, words in [("netmap:mqc", 3, "netmap:mqc: 2 ring pairs cannot be split into 3 netmap "
                                             "shares: a share is one ring pair (NR_REG_ONE_NIC), so workers "
                                             "= 2 or 1"),
                           ("netmap:fc", 2, "netmap:fc: 1 ring pair cannot be split into 2 netmap shares"),
                           ("netmap:mqc-1", 2, "netmap:mqc-1: a port that names its rings is one ring pair; "
                                               "workers = 2 needs a NIC's rings (name the interface alone)"),
                           ("netmap:px{3", 2, "netmap:px{3: a pipe is one ring pair")]:
        with pytest.raises(PortError) as e:
            open_shares(name, n, device=DEV)
        assert str(e.value).startswith(words), e.value
        assert fds() == fd1 and mapped_regions() == regions1
    del fwd  # their stop eventfds
    for p in (*a, *b):
        p.close()
    assert fds() == fd0 and mapped_regions() == regions0


def round_counts(burst: int, direction: str, discipline: str, frames: int) -> dict[str, float]:
    """Forward `frames` from an endless source to a sink; system calls per round and per
    million frames. `discipline` "poll" is run(); "sync" is the txsync + rxsync after every
    batch that run() did for netmap ports before (Forwarder.step(): a batch, then sync_all)."""
    src = open_port("netmap:src0", device=DEV)
    dst = open_port("netmap:sink0", device=DEV)
    fwd = Forwarder(src, dst, burst=burst, direction=direction)
    FAKE.fake_netmap_reset_counters()
    if discipline == "poll":
        fwd.run(max_frames=frames)
        rounds = fwd.polls
    else:
        src.rxsync()
        rounds = 0
        while fwd.stats()["a_to_b"]["frames"] < frames:
            fwd.step()
            rounds += 1
    c = counters()
    moved = fwd.stats()["a_to_b"]["frames"]
    src.close()
    dst.close()
    calls = c["poll"] + c["txsync"] + c["rxsync"]
    return {"burst": burst, "direction": direction, "discipline": discipline, "frames": moved,
            "rounds": rounds, "poll": c["poll"], "txsync": c["txsync"], "rxsync": c["rxsync"],
            "pollin": c["pollin"], "pollout": c["pollout"], "poll_tx_rings": c["poll_tx_rings"],
            "syscalls_per_round": round(calls / rounds, 3),
            "syscalls_per_mframe": round(calls * 1e6 / moved),
            "frames_per_round": round(moved / rounds, 1)}


def syscalls() -> list[dict[str, float]]:
    n = 200_000
    out = [round_counts(256, "both", "sync", n), round_counts(1024, "both", "sync", n),
           round_counts(256, "both", "poll", n), round_counts(1024, "both", "poll", n),
           round_counts(1024, "a-to-b", "poll", n), round_counts(256, "a-to-b", "poll", n)]
    before, after = out[0], out[3]
    # before: two ioctls per direction per round, at most 256 frames a round
    assert round(before["syscalls_per_round"]) == 4 and before["frames_per_round"] == 256, before
    # after: one poll() per round (plus the sync at start and after the last frame), and a
    # round moves what the ring holds (1023 of 1024 slots)
    for r in out[2:]:
        assert r["poll"] == r["rounds"], r
        assert r["txsync"] <= 4 and r["rxsync"] <= 4, r
        assert r["frames"] >= n
    assert after["frames_per_round"] > 1000, after
    assert after["syscalls_per_mframe"] * 4 < before["syscalls_per_mframe"], (before, after)
    # bridge.c on the same rings: a poll() that rxsyncs (POLLIN) and one that moves (POLLOUT)
    # per ring-full: 2 polls per 1023 frames
    assert after["syscalls_per_mframe"] <= 2 * 1e6 / 1023
    # the pattern of a round: the source emptied -> POLLIN on it (release + refill), and the
    # frames just moved go out through the sink's TX poll (no POLLOUT needed while it has room)
    one = out[4]
    assert one["pollin"] == one["poll"] and one["pollout"] == 0, one
    assert one["poll_tx_rings"] >= one["poll"] - 1, one  # every round pushed the sink's TX ring
    # burst 256 of a 1023-frame ring: three rounds of four leave frames -> POLLOUT on the sink
    # (returns at once while it has room), the fourth empties the source -> POLLIN on it
    quarter = out[5]
    assert abs(quarter["pollout"] - 3 * quarter["poll"] / 4) <= 2, quarter
    assert abs(quarter["pollin"] - quarter["poll"] / 4) <= 2, quarter
    return out


def prompt() -> None:
    """The poll discipline adds no timeout's worth of delay (issue 12): with a 60 s poll
    timeout, frames that arrive while the loop sleeps in poll() wake it, and the frames it just
    moved leave through the next poll()'s TX sync (the port is registered without
    NR_NO_TX_POLL) -- not when that poll() times out.  Each wave must arrive long before 60 s."""
    import threading
    import time

    a = open_port("netmap:pa", device=DEV)
    b = open_port("netmap:pb", device=DEV)
    fwd = Forwarder(a, b, direction="a-to-b", poll_timeout_ms=60_000)
    t = threading.Thread(target=fwd.run)
    t.start()
    try:
        for wave in range(3):
            deadline = time.monotonic() + 10.0
            # asleep in poll(): the first time; after a wave the loop is already in the poll()
            # whose TX sync sent that wave out
            polls = fwd.polls
            while polls < 1:
                assert time.monotonic() < deadline, "the loop never went to poll()"
                time.sleep(0.001)
                polls = fwd.polls
            frames = [bytes([wave, i]) * 30 for i in range(5)]
            assert a.send(frames) == 5  # a's wire loops them into a's RX: they arrive now
            got: list[bytes] = []
            while len(got) < 5:
                assert time.monotonic() < deadline, f"wave {wave}: {len(got)} of 5 after 10 s"
                got += b.recv()
                time.sleep(0.001)
            assert got == frames, (wave, len(got), [g[:2] for g in got[:8]])
            assert fwd.polls <= polls + 2  # woken once by the wave, then asleep again
    finally:
        fwd.stop()
        t.join(10)
    assert not t.is_alive()
    a.close()
    b.close()


def shared_ring() -> None:
    """Two threads on one port, as prompt() has them: this one sends on `a` (a txsync), the
    forwarder sleeps in poll() on `a`, whose TX poll also txsyncs `a`'s rings with new slots.
    The kernel runs one sync per ring at a time (nm_kr_tryget: the other skips the ring); the
    fake must too, or both syncs move the same slots.  With the wire slowed to 3 ms a frame, a
    5-frame txsync outlasts the fake poll()'s 10 ms re-check, so the syncs overlap every time."""
    import threading
    import time

    a = open_port("netmap:sra", device=DEV)
    b = open_port("netmap:srb", device=DEV)
    fwd = Forwarder(a, b, direction="a-to-b", poll_timeout_ms=60_000)
    t = threading.Thread(target=fwd.run)
    t.start()
    FAKE.fake_netmap_slow_wire(3000)
    try:
        for wave in range(3):
            frames = [bytes([0x5A, wave, i]) * 20 for i in range(5)]
            assert a.send(frames) == 5
            got: list[bytes] = []
            deadline = time.monotonic() + 10.0
            while len(got) < 5 and time.monotonic() < deadline:
                got += b.recv()
                time.sleep(0.001)
            assert got == frames, (wave, len(got), [g[:3] for g in got[:8]])
        assert fwd.stats()["a_to_b"]["frames"] == 15, fwd.stats()
    finally:
        FAKE.fake_netmap_slow_wire(0)
        fwd.stop()
        t.join(10)
    assert not t.is_alive()
    assert b.recv() == []  # nothing moved twice
    a.close()
    b.close()


def main() -> None:
    what = sys.argv[1] if len(sys.argv) > 1 else "all"
    if what == "all":
        basics()
        exclusive()
        prompt()
        shared_ring()
        shares()
    counts = syscalls()
    print(json.dumps(counts))
    print("ok")


if __name__ == "__main__":
    main()
    sys.exit(0)
