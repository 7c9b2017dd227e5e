"""The afpacket: backend: rings in user memory whose NIC side nmbridge plays over AF_PACKET.

Port names: ``afpacket:IFNAME`` (a Linux interface in nmbridge's network namespace), with
options after ``?``: ``blocks=N`` and ``block_size=BYTES`` (the TPACKET_V3 RX ring, default
64 blocks of 64 KiB), ``block_timeout_ms=N`` (how long the kernel keeps a partly filled block,
default 2), ``promisc=0|1`` (default 1: the socket holds the interface in promiscuous mode
while open; the kernel drops that on close, so nothing needs restoring), ``qdisc_bypass=0|1``
(default 1), ``sndbuf=BYTES``, ``tx_ring=0|1`` (default 1: TX through a PACKET_TX_RING
with one ``send()`` kick per txsync; 0: ``sendmmsg()``), ``tx_frames=N`` (frames of that ring,
default the ring's slots, fewer when frames for a jumbo MTU would take more than 4 MiB),
``tx_vnet=0|1`` (default 1: a virtio-net header per TX ring frame, so the kernel copies the
frame into the skb instead of attaching the ring page).  Example: ``afpacket:eth1?blocks=128``.

Each port has one TX and one RX ring of ``OpenOptions.slots`` slots.  Frames larger than a
buffer of the region arrive as NS_MOREFRAG chains; frames the kernel truncated are counted
(``rx_truncated``) and dropped.  Needs CAP_NET_RAW.
"""

from __future__ import annotations

import os
import sys

from nmbridge.backends import OpenOptions, parse_options, whole_number
from nmbridge.errors import PortError
from nmbridge.port import Port, Region

_INT_OPTIONS = {
    "blocks": (2, 1 << 16),
    "block_size": (4096, 1 << 30),
    "block_timeout_ms": (1, 60_000),
    "sndbuf": (0, 1 << 30),
    "tx_frames": (16, 1 << 16),
}
_BOOL_OPTIONS = ("promisc", "qdisc_bypass", "tx_ring", "tx_vnet")
_CAP_NET_RAW = 13


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
    for key, value in parse_options("afpacket", query).items():
        if key in _INT_OPTIONS:
            lo, hi = _INT_OPTIONS[key]
            n = whole_number(value, lo, hi)
            if n is None:
                raise ValueError(f"afpacket option {key}={value!r}: a whole number from {lo} to {hi}")
        elif key in _BOOL_OPTIONS:
            if value not in ("0", "1"):
                raise ValueError(f"afpacket option {key}={value!r}: use 0 or 1")
            n = int(value)
        else:
            known = ", ".join([*_INT_OPTIONS, *_BOOL_OPTIONS])
            raise ValueError(f"unknown afpacket option {key!r} (known: {known})")
        opts[key] = n
    if "block_size" in opts and opts["block_size"] % os.sysconf("SC_PAGE_SIZE"):
        raise ValueError(f"afpacket option block_size={opts['block_size']}: not a multiple of the page size")
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


class _AfPacketBackend:
    name = "afpacket"
    user_memory = True

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
            block_size=opts.get("block_size", afpacket.DEFAULT_BLOCK_SIZE),
            blocks=opts.get("blocks", afpacket.DEFAULT_BLOCKS),
            block_timeout_ms=opts.get("block_timeout_ms", afpacket.DEFAULT_BLOCK_TIMEOUT_MS),
            promisc=bool(opts.get("promisc", 1)),
            qdisc_bypass=bool(opts.get("qdisc_bypass", 1)),
            sndbuf=opts.get("sndbuf", afpacket.DEFAULT_SNDBUF),
            tx_ring=bool(opts.get("tx_ring", 1)),
            tx_frames=opts.get("tx_frames", 0),
            tx_vnet=bool(opts.get("tx_vnet", 1)),
        )


BACKEND = _AfPacketBackend()
