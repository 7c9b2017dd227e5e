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
that comes meanwhile is taken without a wake-up, at the price of a busy core),
``fanout=hash|cpu|qm|lb`` (default hash: how a port opened as several shares spreads the
frames it receives over them; see below).
Example: ``afpacket:eth1?rx_frames=8192``.

Shares (``open_shares``, for a pair's workers): the port opened as N AF_PACKET sockets, each
with its own rings, TX path, GSO socket and counters, joined to one PACKET_FANOUT group
(kernel-chosen id, unique in the network namespace) that hands each received frame to one of
them: ``hash`` (PACKET_FANOUT_HASH, the flow hash: every frame of a flow goes to the same
share, so order within a flow holds), ``cpu`` (the CPU that received it), ``qm`` (the
receive queue it came through, modulo N), ``lb`` (round robin: even, but a flow's frames
are reordered across shares).  No PACKET_FANOUT_FLAG_DEFRAG: it would reassemble IP
fragments and hand the bridge one datagram larger than the MTU, which the egress cannot
send; a bridge forwards fragments as they came (all fragments of a datagram hash alike: the
flow hash of a fragment leaves out the ports).  No PACKET_FANOUT_FLAG_ROLLOVER either: a
full share's frames would go to another one, out of order.  Each share's default RX ring
is 8 MiB / N (1 MiB at least), so N shares cost about what one port does; ``rx_frames=N``
sizes each share's ring.  ``ring_pairs`` is the interface's RX queue count (any number of
shares works, though).  One share (N = 1) is exactly ``open()``: no group.

Each port has one TX and one RX ring of ``OpenOptions.slots`` slots.  Frames larger than a
buffer of the region arrive as NS_MOREFRAG chains; frames the kernel truncated are counted
(``rx_truncated``) and dropped.  Needs CAP_NET_RAW.
"""

from __future__ import annotations

import os
import socket
import sys
from typing import TYPE_CHECKING

from nmbridge.accounting import PortAccounting
from nmbridge.backends import OpenOptions, close_all, parse_options, whole_number
from nmbridge.errors import PortError
from nmbridge.links import RX_MERGING, TX_SEGMENTATION, VLAN_STRIPPING, ethtool_rx_queues
from nmbridge.port import Port, Region

if TYPE_CHECKING:
    from nmbridge.backends.afpacket import AfPacketPort

_INT_OPTIONS = {
    "rx_frames": (16, 1 << 20),
    "rcvbuf": (0, 1 << 30),
    "sndbuf": (0, 1 << 30),
    "tx_frames": (16, 1 << 16),
    "busy_poll": (0, 60_000_000),
}
_BOOL_OPTIONS = ("rx_ring", "promisc", "qdisc_bypass", "tx_ring", "vnet", "tx_vnet")
# fanout= -> the kernel's PACKET_FANOUT_* type
FANOUT_MODES = {"hash": 0, "cpu": 2, "qm": 5, "lb": 1}
MAX_SHARES = 256
SHARE_RX_RING_MIN = 1 << 20  # a share's default RX ring: 8 MiB / shares, at least this
SYSFS_NET = "/sys/class/net"
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
        elif key == "fanout":
            if value not in FANOUT_MODES:
                raise ValueError(f"afpacket option fanout={value!r}: use {', '.join(FANOUT_MODES)}")
            n = FANOUT_MODES[value]
        elif key in _GONE_OPTIONS:
            raise ValueError(f"afpacket option {key} is gone: {_GONE_OPTIONS[key]}")
        else:
            known = ", ".join([*_INT_OPTIONS, *_BOOL_OPTIONS, "fanout"])
            raise ValueError(f"unknown afpacket option {key!r} (known: {known})")
        opts["vnet" if key == "tx_vnet" else key] = n
    return ifname, opts


def rx_queues(ifname: str, ifindex: int, sysfs: str | None = None) -> int | None:
    """The RX queues sysfs lists for the interface (``queues/rx-N``); None when sysfs has no
    entry for it or the entry is another interface's (sysfs shows the interfaces of the
    namespace it was mounted in, which a thread that entered another one does not see)."""
    base = os.path.join(sysfs or SYSFS_NET, ifname)
    try:
        with open(os.path.join(base, "ifindex")) as f:
            if int(f.read().strip()) != ifindex:
                return None
        names = os.listdir(os.path.join(base, "queues"))
    except (OSError, ValueError):
        return None
    return max(1, sum(1 for n in names if n.startswith("rx-") and n[3:].isdigit()))


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
        ifname, opts = _parse_open(name, region)
        assert region is not None
        return _port(region, ifname, opts, options)

    def open_shares(self, name: str, options: OpenOptions, region: Region | None, shares: int) -> list[Port]:
        """The port as `shares` sockets of one PACKET_FANOUT group (see the module's doc)."""
        if shares == 1:
            return [self.open(name, options, region)]
        if not 1 <= shares <= MAX_SHARES:
            raise PortError(f"afpacket:{name}: {shares} shares: from 1 to {MAX_SHARES}")
        ifname, opts = _parse_open(name, region)
        assert region is not None
        from nmbridge.backends import afpacket

        ring = max(afpacket.DEFAULT_RX_RING_BYTES // shares, SHARE_RX_RING_MIN)
        mode = opts.get("fanout", FANOUT_MODES["hash"])
        ports: list[afpacket.AfPacketPort] = []
        try:
            for i in range(shares):
                group = ports[0].fanout_group if ports else None
                try:
                    ports.append(_port(region, ifname, opts, options, rx_ring_bytes=ring, fanout=mode,
                                       fanout_group=-1 if group is None else group))
                except PortError as e:
                    raise PortError(f"{e} (share {i} of {shares})") from None
            for p in ports:  # every share is in the group: let frames in
                p.fanout_start()
        except BaseException:
            close_all(ports)
            raise
        return list(ports)

    def ring_pairs(self, name: str, options: OpenOptions) -> int:
        """The interface's RX queues (sysfs, else ethtool): one share per queue for "auto"."""
        try:
            ifname, _ = parse(name)
        except ValueError as e:
            raise PortError(f"afpacket:{name}: {e}") from None
        try:
            index = socket.if_nametoindex(ifname)
        except OSError:
            raise PortError(f"afpacket:{name}: no such interface") from None
        n = rx_queues(ifname, index)
        return n if n is not None else ethtool_rx_queues(ifname)


def _parse_open(name: str, region: Region | None) -> tuple[str, dict[str, int]]:
    if region is None:
        raise PortError(f"afpacket:{name}: needs a user-memory region")
    try:
        return parse(name)
    except ValueError as e:
        raise PortError(f"afpacket:{name}: {e}") from None


def _port(region: Region, ifname: str, opts: dict[str, int], options: OpenOptions, *, rx_ring_bytes: int = 0,
          fanout: int = -1, fanout_group: int = -1) -> AfPacketPort:
    from nmbridge.backends import afpacket

    return afpacket.AfPacketPort(
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
        rx_ring_bytes=rx_ring_bytes,
        fanout=fanout,
        fanout_group=fanout_group,
    )


BACKEND = _AfPacketBackend()
