"""The afpacket: backend: rings in user memory whose NIC side nmbridge plays over AF_PACKET.

Port names: ``afpacket:IFNAME`` (a Linux interface in nmbridge's network namespace), with
options after ``?``: ``rx_ring=0|1`` (default 1: a TPACKET_V2 receive ring, which hands
over each frame as soon as it is written; frames larger than a ring frame come whole through
the socket's queue; 0: ``recvmmsg()`` of every frame straight into the ring's buffers),
``rx_frames=N`` (frames of that ring, default as many as fit in 8 MiB: 4096 for MTU 1500),
``rcvbuf=BYTES`` (the socket's receive queue, default 8 MiB),
``promisc=0|1`` (default 1: the socket holds the interface in promiscuous mode while open;
the kernel drops that on close, so nothing needs restoring), ``qdisc_bypass=0|1`` (default
1), ``sndbuf=BYTES``, ``tx_ring=0|1`` (default 1: TX through a PACKET_TX_RING with one
``send()`` kick per txsync; 0: ``sendmmsg()``), ``tx_frames=N`` (frames of that ring, default
the ring's slots, fewer when frames for a jumbo MTU would take more than 4 MiB),
``vnet=0|1`` (default 1: a virtio-net header on every frame, both ways: GSO super-frames and
checksum requests of local stacks reach the egress port's kernel, which segments them; TX
ring frames are copied into the skb instead of attached as a page; ``tx_vnet`` is an old
name for it), ``busy_poll=USEC`` (default 0: the forwarding loop of the port's pair keeps
polling the rings this long after the last frame before it sleeps in ``poll()``: a frame
that comes meanwhile is taken without a wake-up, at the price of a busy core).
Example: ``afpacket:eth1?rx_frames=8192``.

Each port has one TX and one RX ring of ``OpenOptions.slots`` slots.  Frames larger than a
buffer of the region arrive as NS_MOREFRAG chains; frames the kernel truncated are counted
(``rx_truncated``) and dropped.  Needs CAP_NET_RAW.
"""

from __future__ import annotations

import os
import sys

from nmbridge.accounting import PortAccounting
from nmbridge.backends import OpenOptions, parse_options, whole_number
from nmbridge.errors import PortError
from nmbridge.links import RX_MERGING, TX_SEGMENTATION, VLAN_STRIPPING
from nmbridge.port import Port, Region

_INT_OPTIONS = {
    "rx_frames": (16, 1 << 20),
    "rcvbuf": (0, 1 << 30),
    "sndbuf": (0, 1 << 30),
    "tx_frames": (16, 1 << 16),
    "busy_poll": (0, 60_000_000),
}
_BOOL_OPTIONS = ("rx_ring", "promisc", "qdisc_bypass", "tx_ring", "vnet", "tx_vnet")
_CAP_NET_RAW = 13
_OFFLOADS_OFF = frozenset({RX_MERGING, TX_SEGMENTATION, VLAN_STRIPPING})
_OFFLOADS_OFF_VNET = frozenset({RX_MERGING, VLAN_STRIPPING})
_RING_GONE = "the receive ring is a TPACKET_V2 ring now (no blocks, no retire timer): rx_frames=N sizes it"
_GONE_OPTIONS = {"blocks": _RING_GONE, "block_size": _RING_GONE, "block_timeout_ms": _RING_GONE}


def check_ifname(name: str) -> None:
    """Raise ValueError unless `name` is a valid Linux interface name (dev_valid_name)."""
    raw = name.encode(errors="surrogateescape")
    if not raw:
        raise ValueError("an interface name cannot be empty")
    if len(raw) > 15:
        raise ValueError(f"interface name {name!r} is longer than 15 bytes")
    if name in (".", ".."):
        raise ValueError(f"{name!r} is not a valid interface name")
    bad = [c for c in name if c in "/:" or c.isspace() or not c.isprintable()]
    if bad:
        raise ValueError(f"interface name {name!r} contains {bad[0]!r} ('/', ':', spaces and control "
                         "characters such as NUL are not allowed)")


def parse(name: str) -> tuple[str, dict[str, int]]:
    """Split ``IFNAME?opt=v&...`` into the interface name and checked options."""
    ifname, _, query = name.partition("?")
    check_ifname(ifname)
    opts: dict[str, int] = {}
    given = parse_options("afpacket", query)
    if "vnet" in given and "tx_vnet" in given:
        raise ValueError("afpacket options vnet and tx_vnet are one option (tx_vnet is its old name): "
                         "keep one")
    for key, value in given.items():
        if key in _INT_OPTIONS:
            lo, hi = _INT_OPTIONS[key]
            n = whole_number(value, lo, hi)
            if n is None:
                raise ValueError(f"afpacket option {key}={value!r}: a whole number from {lo} to {hi}")
        elif key in _BOOL_OPTIONS:
            if value not in ("0", "1"):
                raise ValueError(f"afpacket option {key}={value!r}: use 0 or 1")
            n = int(value)
        elif key in _GONE_OPTIONS:
            raise ValueError(f"afpacket option {key} is gone: {_GONE_OPTIONS[key]}")
        else:
            known = ", ".join([*_INT_OPTIONS, *_BOOL_OPTIONS])
            raise ValueError(f"unknown afpacket option {key!r} (known: {known})")
        opts["vnet" if key == "tx_vnet" else key] = n
    return ifname, opts


def has_cap_net_raw() -> bool:
    """Whether this process may open AF_PACKET sockets (effective CAP_NET_RAW)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("CapEff:"):
                    return bool(int(line.split()[1], 16) >> _CAP_NET_RAW & 1)
    except OSError:
        pass
    return os.geteuid() == 0


# How a port's counters (nmb_afpacket_stats) make a pair's numbers: every field commented
# "dropped: ..." in nmb_afpacket.h has its reason here (a unit test checks it).
ACCOUNTING = PortAccounting(
    rx_delivered="rx_frames",
    tx_sent="tx_frames",
    tx_bytes="tx_bytes",
    rx_drops={
        "rx_kernel_drops": "rx_kernel_drops",  # the kernel's RX ring was full (overrun)
        "rx_truncated": "rx_truncated",
        "rx_oversize": "rx_oversize",
        # a GSO super-frame whose egress cannot take offload metadata (mem:, netmap:, vnet=0)
        "rx_gso_dropped": "gso_not_carried",
    },
    tx_drops={
        "tx_mtu": "egress_mtu",  # larger than the egress interface's MTU
        "tx_errors": "tx_error",  # the kernel refused it for another reason
        "tx_link_down": "tx_link_down",  # egress link down, without a carrier, or gone
    },
)


class _AfPacketBackend:
    name = "afpacket"
    user_memory = True
    accounting = ACCOUNTING

    def unavailable(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return "AF_PACKET exists only on Linux"
        try:
            import nmbridge.backends.afpacket  # noqa: F401
        except ImportError as e:
            return f"the afpacket extension is not built ({e}); run ./scripts/build"
        if not has_cap_net_raw():
            return "AF_PACKET sockets need CAP_NET_RAW (run as root)"
        return None

    def check_name(self, name: str) -> None:
        parse(name)

    def interface(self, name: str) -> str | None:
        return parse(name)[0]

    def offloads_off(self, name: str) -> frozenset[str]:
        # With vnet the GSO request of a super-frame crosses with it and the egress kernel
        # segments it (or hands it on whole to a veth peer): TX segmentation may stay on.
        # Receive merging stays off: GRO would hand the filters and counters merged frames,
        # and a pair whose other side has no GSO metadata would drop them.
        vnet = bool(parse(name)[1].get("vnet", 1))
        return _OFFLOADS_OFF_VNET if vnet else _OFFLOADS_OFF

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        from nmbridge.backends import afpacket
        from nmbridge.backends.afpacket import AfPacketPort

        if region is None:
            raise PortError(f"afpacket:{name}: needs a user-memory region")
        try:
            ifname, opts = parse(name)
        except ValueError as e:
            raise PortError(f"afpacket:{name}: {e}") from None
        return AfPacketPort(
            region,
            ifname,
            slots=options.slots,
            rx_ring=bool(opts.get("rx_ring", 1)),
            rx_frames=opts.get("rx_frames", 0),
            rcvbuf=opts.get("rcvbuf", afpacket.DEFAULT_RCVBUF),
            promisc=bool(opts.get("promisc", 1)),
            qdisc_bypass=bool(opts.get("qdisc_bypass", 1)),
            sndbuf=opts.get("sndbuf", afpacket.DEFAULT_SNDBUF),
            tx_ring=bool(opts.get("tx_ring", 1)),
            tx_frames=opts.get("tx_frames", 0),
            vnet=bool(opts.get("vnet", 1)),
            busy_poll_us=opts.get("busy_poll", 0),
        )


BACKEND = _AfPacketBackend()
