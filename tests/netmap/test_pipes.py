"""Pipes: the test writes into master ends, nmbridge forwards between the slave ends.

    test --> t{0 ==pipe== t}0 --nmbridge--> t}1 ==pipe== t{1 --> test   (and back)

Both slave ends belong to one parent, so they share a memory region: zero-copy is asserted,
and the region is mapped once.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import pytest
from nmhelpers import Deadline, wait_readable, wait_writable

from nmbridge.backends import OpenOptions, PortSet, PortSpec
from nmbridge.backends.netmap import NetmapPort, mapped_regions
from nmbridge.backends.netmap_backend import open_port
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Port

Bridge = tuple[tuple[NetmapPort, NetmapPort], tuple[NetmapPort, NetmapPort]]


def frames_for(tag: int, n: int) -> list[bytes]:
    """n distinct frames of varied lengths (60..1514), each carrying its direction and number."""
    out = []
    for i in range(n):
        length = 60 + (i * 37) % (1514 - 60 + 1)
        head = bytes([0x02, 0, 0, 0, 0, tag, 0x02, 0, 0, 0, 0, tag, 0x88, 0xB5])
        body = tag.to_bytes(1, "little") + i.to_bytes(4, "little")
        out.append((head + body + bytes((i + k) & 0xFF for k in range(length)))[:length])
    return out


def send_all(port: NetmapPort, frames: list[bytes], pending: list[int], dl: Deadline) -> None:
    """Push what fits now; `pending[0]` counts frames already placed."""
    while pending[0] < len(frames) and not dl.expired:
        placed = port.send(frames[pending[0]:pending[0] + 256])
        pending[0] += placed
        if placed == 0:
            return


def slave(p: Port) -> NetmapPort:
    assert isinstance(p, NetmapPort)
    return p


@pytest.fixture
def pipe_bridge(uniq: Callable[[str], str]) -> Iterator[Bridge]:
    parent = uniq("t")
    ports = PortSet(OpenOptions())
    masters = [open_port(f"netmap:{parent}{{0"), open_port(f"netmap:{parent}{{1")]
    opened = ports.open([PortSpec("netmap", f"{parent}}}0"), PortSpec("netmap", f"{parent}}}1")])
    s0, s1 = (slave(p) for p in opened)
    try:
        yield (masters[0], masters[1]), (s0, s1)
    finally:
        ports.close()
        for m in masters:
            m.close()


def test_slaves_share_one_region(pipe_bridge: Bridge) -> None:
    (m0, m1), (s0, s1) = pipe_bridge
    assert s0.mem_id == s1.mem_id == m0.mem_id == m1.mem_id
    assert s0.mem_key == s1.mem_key
    reg = s0.registration()
    assert reg["region_users"] == 4  # both masters and both slaves: one mapping
    assert reg["tx_range"] == (0, reg["tx_rings"]) and reg["rx_range"] == (0, reg["rx_rings"])
    fwd = Forwarder(s0, s1)
    assert fwd.zerocopy
    assert not Forwarder(s0, s1, zerocopy=False).zerocopy


@pytest.mark.parametrize("zerocopy", [None, False])
def test_both_directions_byte_for_byte(pipe_bridge: Bridge, deadline: Callable[[float], Deadline],
                                       zerocopy: bool | None) -> None:
    (m0, m1), (s0, s1) = pipe_bridge
    fwd = Forwarder(s0, s1, zerocopy=zerocopy)
    assert fwd.zerocopy is (zerocopy is None)
    a_frames, b_frames = frames_for(1, 3000), frames_for(2, 2500)
    a_sent, b_sent = [0], [0]
    got_b: list[bytes] = []  # arrived at m1 (from m0)
    got_a: list[bytes] = []  # arrived at m0 (from m1)
    dl = deadline(60)
    while (len(got_b) < len(a_frames) or len(got_a) < len(b_frames)) and not dl.expired:
        send_all(m0, a_frames, a_sent, dl)
        send_all(m1, b_frames, b_sent, dl)
        moved = fwd.step()
        got_b += m1.recv()
        got_a += m0.recv()
        if not moved and a_sent[0] == len(a_frames) and b_sent[0] == len(b_frames):
            if not wait_readable(m1.fd, 0.05):
                wait_readable(m0.fd, 0.05)
    assert got_b == a_frames
    assert got_a == b_frames
    st = fwd.stats()
    assert st["a_to_b"]["frames"] == len(a_frames)
    assert st["b_to_a"]["frames"] == len(b_frames)
    assert st["a_to_b"]["bytes"] == sum(map(len, a_frames))
    assert st["b_to_a"]["bytes"] == sum(map(len, b_frames))
    assert st["a_to_b"]["oversize"] == st["a_to_b"]["broken_chain"] == 0


def test_forwarder_thread_polls(pipe_bridge: Bridge, deadline: Callable[[float], Deadline]) -> None:
    """run() in a thread: the kernel's poll() wakes it; every frame arrives once, in order."""
    (m0, m1), (s0, s1) = pipe_bridge
    fwd = Forwarder(s0, s1, direction="a-to-b", poll_timeout_ms=50)
    errors: list[BaseException] = []

    def run() -> None:
        try:
            fwd.run()
        except BaseException as e:  # reported by the assertion below
            errors.append(e)

    t = threading.Thread(target=run)
    t.start()
    try:
        frames = frames_for(3, 10000)
        sent: list[int] = [0]
        got: list[bytes] = []
        dl = deadline(60)
        while len(got) < len(frames) and not dl.expired:
            send_all(m0, frames, sent, dl)
            if sent[0] < len(frames):
                wait_writable(m0.fd, 0.05)
            if wait_readable(m1.fd, 0.05):
                got += m1.recv()
    finally:
        fwd.stop()
        t.join(30)
    assert not t.is_alive() and errors == []
    assert got == frames
    assert fwd.stats()["a_to_b"]["frames"] == len(frames)
    assert fwd.polls > 0


def test_close_unmaps_the_region(uniq: Callable[[str], str]) -> None:
    before = mapped_regions()
    parent = uniq("u")
    a = open_port(f"netmap:{parent}}}0")
    b = open_port(f"netmap:{parent}}}1")
    assert mapped_regions() == before + 1
    a.close()
    assert mapped_regions() == before + 1
    b.close()
    assert mapped_regions() == before


def test_failing_second_port_leaks_nothing(uniq: Callable[[str], str]) -> None:
    parent = uniq("w")
    before = mapped_regions()
    ports = PortSet()
    with pytest.raises(PortError, match="its rings are in use by another netmap program") as e:
        # the same slave end twice: registered with NR_EXCLUSIVE, the first holds the rings and
        # the kernel refuses the second (EBUSY)
        ports.open([PortSpec("netmap", f"{parent}}}0"), PortSpec("netmap", f"{parent}}}0")])
    assert str(e.value).startswith(f"netmap:{parent}}}0: ")
    assert ports.ports == []
    assert mapped_regions() == before
