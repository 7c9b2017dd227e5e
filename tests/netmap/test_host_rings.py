"""Host rings: ``netmap:IF`` <-> ``netmap:IF^`` puts nmbridge between the wire and the host
stack.  Needs a real interface: set NMBRIDGE_NETMAP_IFACE (its traffic is interrupted while
the test runs)."""

from __future__ import annotations

import os
import socket
from collections.abc import Callable

import pytest
from nmhelpers import IFACE_ENV, Deadline

from nmbridge.backends import PortSet, PortSpec
from nmbridge.backends.netmap import NetmapPort
from nmbridge.fastfwd import Forwarder

IFACE = os.environ.get(IFACE_ENV)
pytestmark = pytest.mark.skipif(not IFACE, reason=f"set {IFACE_ENV} to an interface netmap may take over")


def test_host_rings_inline(deadline: Callable[[float], Deadline]) -> None:
    assert IFACE
    ports = PortSet()
    try:
        nic, host = ports.open([PortSpec("netmap", IFACE), PortSpec("netmap", f"{IFACE}^")])
        assert isinstance(nic, NetmapPort) and isinstance(host, NetmapPort)
        n, h = nic.registration(), host.registration()
        assert n["tx_range"] == (0, n["tx_rings"]) and n["rx_range"] == (0, n["rx_rings"])
        assert h["tx_range"] == (h["tx_rings"], h["tx_rings"] + h["host_tx_rings"])
        assert h["rx_range"] == (h["rx_rings"], h["rx_rings"] + h["host_rx_rings"])
        assert nic.mem_id == host.mem_id
        fwd = Forwarder(nic, host)
        assert fwd.zerocopy
        # a frame the host stack sends on IFACE reaches the host RX ring; nmbridge takes it
        # to the NIC (b_to_a)
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
        s.bind((IFACE, 0))
        payload = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x09" + b"\x88\xb5" + b"nmbridge host ring" * 3
        sent = 0
        dl = deadline(10)
        while fwd.stats()["b_to_a"]["frames"] < 10 and not dl.expired:
            if sent < 10:
                s.send(payload)
                sent += 1
            fwd.step()
        s.close()
        assert fwd.stats()["b_to_a"]["frames"] >= 10
    finally:
        ports.close()
