"""Run under LD_PRELOAD=fake_netmap.so with NMB_FAKE_DEV=<file>: the netmap backend's open,
region sharing, ring ranges, syncs, errors and close, end to end. Exits non-zero on failure."""

from __future__ import annotations

import os
import sys

import pytest

from nmbridge.backends.netmap import mapped_regions
from nmbridge.backends.netmap_backend import open_port
from nmbridge.errors import PortError
from nmbridge.fastfwd import Forwarder

DEV = os.environ["NMB_FAKE_DEV"]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def main() -> None:
    fd0 = fds()
    a = open_port("netmap:fa", device=DEV)
    b = open_port("netmap:fb", device=DEV)
    assert mapped_regions() == 1, "two ports of region 1 share one mapping"
    ra = a.registration()
    assert ra["mem_id"] == 1 and ra["region_users"] == 2 and ra["memsize"] == 4 << 20
    assert ra["tx_range"] == (0, 1) and ra["rx_range"] == (0, 1)
    assert ra["host_tx_rings"] == 1 and ra["reply_host_tx_rings"] == 0
    assert ra["nr_flags"] & 0x20000, "NR_NO_TX_POLL is set"
    assert a.mem_key == b.mem_key == (1 << 63) | 1
    assert a.name == "fa" and a.info()["tx_slots"] == 64 and a.info()["buf_size"] == 2048

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
                        ("netmap:busy0", "interface 'busy0' is busy"),
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
    print("ok")


if __name__ == "__main__":
    main()
    sys.exit(0)
