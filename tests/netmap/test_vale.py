"""VALE: nmbridge forwards between ports of two VALE switches (different memory regions,
so it copies), while the test talks through a second port on each switch.

    test --> vA:ta ==switch A== vA:a --nmbridge--> vB:b ==switch B== vB:tb --> test
"""

from __future__ import annotations

from collections.abc import Callable

from nmhelpers import Deadline, wait_readable

from nmbridge.backends import PortSet, PortSpec
from nmbridge.backends.netmap import NetmapPort
from nmbridge.backends.netmap_backend import open_port
from nmbridge.fastfwd import Forwarder


def frame(src: int, i: int, length: int) -> bytes:
    head = bytes([0xFF] * 6 + [0x02, 0, 0, 0, src, 1] + [0x88, 0xB5])  # broadcast: every port
    body = i.to_bytes(4, "little") + bytes((i * 7 + k) & 0xFF for k in range(length))
    return (head + body)[:length]


def exchange(tx: NetmapPort, rx: NetmapPort, fwd: Forwarder, frames: list[bytes],
             dl: Deadline) -> list[bytes]:
    got: list[bytes] = []
    sent = 0
    while len(got) < len(frames) and not dl.expired:
        if sent < len(frames):
            sent += tx.send(frames[sent:sent + 64])
        fwd.step()
        got += rx.recv()
        if sent == len(frames) and len(got) < len(frames):
            fwd.step()
            wait_readable(rx.fd, 0.05)
    return got


def test_vale_copy_mode(uniq: Callable[[str], str], deadline: Callable[[float], Deadline]) -> None:
    sw_a, sw_b = uniq("vale"), uniq("vale")
    ta = open_port(f"{sw_a}:ta")
    tb = open_port(f"{sw_b}:tb")
    ports = PortSet()
    try:
        a, b = ports.open([PortSpec("netmap", f"{sw_a}:a"), PortSpec("netmap", f"{sw_b}:b")])
        assert isinstance(a, NetmapPort) and isinstance(b, NetmapPort)
        assert a.mem_id != b.mem_id and a.mem_key != b.mem_key
        fwd = Forwarder(a, b)
        assert not fwd.zerocopy
        dl = deadline(60)
        ab = [frame(1, i, 60 + i % 1400) for i in range(2000)]
        ba = [frame(2, i, 1514 - i % 1400) for i in range(1500)]
        assert exchange(ta, tb, fwd, ab, dl) == ab
        assert exchange(tb, ta, fwd, ba, dl) == ba
        st = fwd.stats()
        assert st["a_to_b"]["frames"] == len(ab) and st["b_to_a"]["frames"] == len(ba)
        assert st["a_to_b"]["bytes"] == sum(map(len, ab))
    finally:
        ports.close()
        ta.close()
        tb.close()
