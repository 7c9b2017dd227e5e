"""The user-memory region is laid out as the kernel lays out a netmap region.

These tests read the memory with ctypes using only the ABI facts (offsets from
shared/netmap-abi.md), not nmbridge's C helpers, so a helper and its test cannot share a bug.
"""

from __future__ import annotations

import ctypes
import struct

import pytest

from nmbridge.backends import OpenOptions, PortSet, parse_spec
from nmbridge.backends.mem import MemPort
from nmbridge.errors import PortError, RingError
from nmbridge.port import Region, port_bytes

SLOT = 16
RING_HDR = 256
IF_HDR = 56


def read(addr: int, fmt: str) -> tuple[int, ...]:
    size = struct.calcsize(fmt)
    return struct.unpack(fmt, ctypes.string_at(addr, size))


def nifp_of(port: MemPort) -> int:
    (nifp,) = read(port.address, "<Q")  # struct nmb_port: nifp is the first member
    return nifp


def rings(nifp: int) -> tuple[list[int], list[int]]:
    ntx, nrx, _bufs_head, host_tx, host_rx = read(nifp + 24, "<5I")
    ofs = read(nifp + IF_HDR, f"<{ntx + host_tx + nrx + host_rx}q")
    tx = [nifp + ofs[i] for i in range(ntx)]
    rx = [nifp + ofs[i + ntx + host_tx] for i in range(nrx)]
    return tx, rx


def ring_header(ring: int) -> dict[str, int]:
    buf_ofs, num_slots, buf_size, ringid, dirn, head, cur, tail = read(ring, "<qIIHHIII")
    return {"buf_ofs": buf_ofs, "num_slots": num_slots, "buf_size": buf_size, "ringid": ringid,
            "dir": dirn, "head": head, "cur": cur, "tail": tail}


def slots(ring: int, n: int) -> list[tuple[int, int, int]]:
    return [read(ring + RING_HDR + i * SLOT, "<IHH") for i in range(n)]


@pytest.fixture
def port() -> MemPort:
    region = Region(ports=1, rings=3, slots=64, buf_size=512)
    return MemPort(region, "lay", rings=3, slots=64)


def test_netmap_if_header(port: MemPort) -> None:
    nifp = nifp_of(port)
    name = ctypes.string_at(nifp, 16).rstrip(b"\0")
    version, flags, ntx, nrx = read(nifp + 16, "<4I")
    assert name == b"lay"
    assert (version, flags, ntx, nrx) == (14, 0, 3, 3)


def test_fresh_rings_follow_the_kernel(port: MemPort) -> None:
    tx, rx = rings(nifp_of(port))
    for i, r in enumerate(tx):
        h = ring_header(r)
        assert (h["num_slots"], h["buf_size"], h["ringid"], h["dir"]) == (64, 512, i, 1)
        assert (h["head"], h["cur"], h["tail"]) == (0, 0, 63)  # one slot always kept back
    for i, r in enumerate(rx):
        h = ring_header(r)
        assert (h["ringid"], h["dir"]) == (i, 0)
        assert (h["head"], h["cur"], h["tail"]) == (0, 0, 0)
        assert r % 128 == 0  # rings are cache-aligned like the kernel's


def test_every_slot_has_its_own_buffer_in_one_pool(port: MemPort) -> None:
    tx, rx = rings(nifp_of(port))
    pools = set()
    seen: list[int] = []
    for r in tx + rx:
        h = ring_header(r)
        pools.add(r + h["buf_ofs"])  # buf_ofs is relative to each ring; all point at one pool
        seen += [idx for idx, _len, _flags in slots(r, h["num_slots"])]
    assert len(pools) == 1
    assert len(seen) == len(set(seen)) == 6 * 64
    assert min(seen) >= 2  # 0 and 1 are reserved


def test_buffer_address_arithmetic_is_the_kernels(port: MemPort) -> None:
    tx, _ = rings(nifp_of(port))
    h = ring_header(tx[0])
    idx, _, _ = slots(tx[0], 1)[0]
    addr = tx[0] + h["buf_ofs"] + idx * h["buf_size"]
    ctypes.memmove(addr, b"\xaa" * h["buf_size"], h["buf_size"])  # the whole buffer is ours
    assert ctypes.string_at(addr, 4) == b"\xaa" * 4


def test_ports_of_one_region_share_the_pool_and_a_second_region_does_not() -> None:
    r1 = Region(ports=2, rings=1, slots=16)
    r2 = Region(ports=1, rings=1, slots=16)
    a, b, c = MemPort(r1, "a", slots=16), MemPort(r1, "b", slots=16), MemPort(r2, "c", slots=16)

    def pool(p: MemPort) -> int:
        t, _ = rings(nifp_of(p))
        return t[0] + ring_header(t[0])["buf_ofs"]

    assert pool(a) == pool(b) != pool(c)
    assert a.mem_key == b.mem_key != c.mem_key


def test_region_accounting_and_reuse_after_close() -> None:
    region = Region(ports=1, rings=1, slots=32, spare_ports=1)
    assert region.buffers == 2 * 2 * 32 + 2
    free0 = region.free_buffers
    p = MemPort(region, "x", slots=32)
    assert region.free_buffers == free0 - 64
    region.check()
    p.close()
    assert region.free_buffers == free0
    q = MemPort(region, "y", slots=32)  # objects and buffers are reused
    region.check()
    q.close()
    assert port_bytes(1, 32) > 0


def test_room_freed_by_ports_of_one_shape_fits_ports_of_another() -> None:
    """A reload that changes a pair's workers closes ports of one shape (2 shares of 1 ring
    pair each) and opens another (1 share of 2 ring pairs), over and over: the freed room must
    be merged and split again, never lost to fragments (the region is sized for the ports, with
    spares, once)."""
    ps = PortSet(OpenOptions(slots=64))
    specs = [parse_spec("mem:a?rings=2"), parse_spec("mem:b?rings=2")]
    for n in (2, 1, 2, 1, 2, 1, 2, 1):
        shares = ps.open_shares(specs, [n, n])
        assert [len(s) for s in shares] == [n, n]
        ps.close_ports([p for s in shares for p in s])
    assert ps.region is not None
    ps.region.check()


def test_region_refuses_what_does_not_fit() -> None:
    region = Region(ports=1, rings=1, slots=32)
    first = MemPort(region, "x", slots=32)
    with pytest.raises(PortError, match=r"mem:y: .*not enough free buffers"):
        MemPort(region, "y", slots=32)
    first.close()
    MemPort(region, "y", slots=32).close()  # its buffers came back


def test_check_names_a_duplicated_buffer(port: MemPort) -> None:
    tx, rx = rings(nifp_of(port))
    idx, _, _ = slots(tx[0], 1)[0]
    ctypes.memmove(rx[2] + RING_HDR + 5 * SLOT, struct.pack("<I", idx), 4)
    with pytest.raises(RingError, match=r"lay rx ring 2 slot 5: buf_idx \d+ is also in lay tx ring 0 slot 0"):
        port.check()


def test_check_names_a_buffer_out_of_range(port: MemPort) -> None:
    _, rx = rings(nifp_of(port))
    ctypes.memmove(rx[1] + RING_HDR + 3 * SLOT, struct.pack("<I", 1), 4)
    with pytest.raises(RingError, match=r"lay rx ring 1 slot 3: buf_idx 1 out of range"):
        port.check()
