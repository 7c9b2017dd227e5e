"""The afxdp: backend: rings in user memory whose NIC side is AF_XDP sockets (one per RX queue).

Port names: ``afxdp:IFNAME`` (a Linux interface in nmbridge's network namespace), with options
after ``?``: ``mode=auto|zc|native|skb`` (default auto: driver XDP with zero-copy sockets where
the driver has them, else driver XDP with copy sockets, else generic (skb) XDP; a named mode
is insisted on), ``queues=N`` (receive queues to bind, default all; fewer than the interface
has is refused, since frames of an unbound queue would reach the host stack), ``promisc=0|1``
(default 1, held by a socket: the kernel undoes it on close), ``need_wakeup=0|1`` (default 1),
``csum_fix=0|1`` (default 1: finish the TCP/UDP checksums a veth peer's stack leaves partial;
AF_XDP does not pass the kernel's CHECKSUM_PARTIAL mark, so a frame whose checksum field
equals its pseudo-header sum is completed), ``busy_poll=USEC`` (default 0: off; else AF_XDP
preferred busy polling -- SO_PREFER_BUSY_POLL and SO_BUSY_POLL on the sockets, every rxsync
runs the queue's NAPI in the forwarding thread, and the loop spins USEC after the last frame
before it sleeps), ``busy_budget=N`` (SO_BUSY_POLL_BUDGET, frames per busy poll; default the
kernel's), ``rx_coalesce=USEC`` (default 0: off; else while frames stream in -- the last came
less than 200 us before -- a sync that finds 1 to 31 frames waiting sleeps USEC first, so one
wake-up, batch and transmit kick serve more frames: less CPU per frame, up to USEC more latency
under load, none for a lone frame).
Example: ``afxdp:eth1?mode=native``.

Shares (forwarding workers): ``open_shares(..., shares=N)`` opens the interface as N ports,
share w owning the sockets (ring pairs) of queues w, w + N, ...; one XDP program for the
interface, detached when the last share closes; ``ring_pairs()`` is the number of receive
queues (``queues=`` when given).

The bridge's buffer pool is the UMEM shared by every afxdp: port, so forwarding between them
is a buffer swap.  Frames must fit one buffer less 256 bytes of XDP headroom (1792 bytes with
the default 2048-byte buffers): a larger MTU is refused at open.  Needs CAP_NET_RAW (the
sockets), CAP_NET_ADMIN (attaching the XDP program), CAP_BPF (loading it; CAP_SYS_ADMIN
before Linux 5.8), and locked memory for the UMEM where RLIMIT_MEMLOCK still counts it.
"""

from __future__ import annotations

import socket
import sys

from nmbridge import caps
from nmbridge.accounting import PortAccounting
from nmbridge.backends import OpenOptions, parse_options, whole_number
from nmbridge.backends.afpacket_backend import check_ifname
from nmbridge.errors import PortError
from nmbridge.links import OFFLOAD_GROUPS
from nmbridge.port import Port, Region

MODES = ("auto", "zc", "native", "skb")
_BOOL_OPTIONS = ("promisc", "need_wakeup", "csum_fix")
AF_XDP = 44


def parse(name: str) -> tuple[str, dict[str, str]]:
    """Split ``IFNAME?opt=v&...`` into the interface name and checked options."""
    ifname, _, query = name.partition("?")
    check_ifname(ifname)
    opts: dict[str, str] = {}
    for key, value in parse_options("afxdp", query).items():
        if key == "mode":
            if value not in MODES:
                raise ValueError(f"afxdp option mode={value!r}: use one of {', '.join(MODES)}")
        elif key == "queues":
            if whole_number(value, 1, 64) is None:
                raise ValueError(f"afxdp option queues={value!r}: a whole number from 1 to 64")
        elif key in ("busy_poll", "busy_budget", "rx_coalesce"):
            if whole_number(value, 0, 1_000_000) is None:
                raise ValueError(f"afxdp option {key}={value!r}: a whole number from 0 to 1000000")
        elif key in _BOOL_OPTIONS:
            if value not in ("0", "1"):
                raise ValueError(f"afxdp option {key}={value!r}: use 0 or 1")
        else:
            known = ", ".join(("mode", "queues", "busy_poll", "busy_budget", "rx_coalesce", *_BOOL_OPTIONS))
            raise ValueError(f"unknown afxdp option {key!r} (known: {known})")
        opts[key] = value
    return ifname, opts


def needed_capabilities(umem_bytes: int = 0) -> list[tuple[int, str]]:
    """(capability, what needs it) for afxdp: ports on this kernel; with the UMEM's size,
    CAP_IPC_LOCK when RLIMIT_MEMLOCK cannot hold it (the kernel counts the UMEM there unless
    the process has CAP_IPC_LOCK)."""
    import resource

    bpf = caps.CAP_BPF if caps.kernel_has_cap_bpf() else caps.CAP_SYS_ADMIN
    need = [(caps.CAP_NET_RAW, "afxdp: sockets"), (caps.CAP_NET_ADMIN, "afxdp: XDP program attach"),
            (bpf, "afxdp: XDP program load")]
    soft, _ = resource.getrlimit(resource.RLIMIT_MEMLOCK)
    if umem_bytes and soft != resource.RLIM_INFINITY and soft < umem_bytes:
        need.append((caps.CAP_IPC_LOCK, f"afxdp: a {umem_bytes >> 20} MiB UMEM over RLIMIT_MEMLOCK "
                                        f"{soft >> 20} MiB; or raise LimitMEMLOCK"))
    return need


def kernel_lacks_af_xdp() -> str | None:
    """None when this kernel has AF_XDP sockets, else why not."""
    try:
        s = socket.socket(AF_XDP, socket.SOCK_RAW, 0)
    except OSError as e:
        import errno

        if e.errno == errno.EAFNOSUPPORT:
            return "this kernel has no AF_XDP sockets (CONFIG_XDP_SOCKETS)"
        if e.errno in (errno.EPERM, errno.EACCES):
            return None  # exists; the capability check says what is missing
        return f"socket(AF_XDP): {e.strerror}"
    s.close()
    return None


# what an afxdp: port's counters mean to a pair's numbers (nmbridge/accounting.py); every
# field of struct nmb_afxdp_stats commented "dropped:" is a reason here
ACCOUNTING = PortAccounting(
    rx_delivered="rx_frames",
    tx_sent="tx_sent",  # posted to the XSK TX ring, less what the device or kernel refused
    tx_bytes="tx_bytes",
    rx_drops={
        "rx_kernel_drops": "rx_kernel_drops",  # the kernel dropped it (e.g. longer than a chunk)
        "rx_ring_full": "rx_ring_full",  # the XSK RX ring was full (overrun)
        "rx_fill_empty": "rx_fill_empty",  # no free buffer in the fill ring (overrun)
        "rx_bad_desc": "rx_bad_desc",
    },
    tx_drops={
        "tx_errors": "tx_error",  # too long for a chunk, a runt, or a chain (no multi-buffer)
        "tx_mtu": "egress_mtu",  # larger than the egress MTU (the kernel does not check it)
        "tx_link_down": "tx_link_down",
        "tx_dev_drops": "tx_device_refused",  # the device refused a posted frame
        "tx_invalid": "tx_invalid",  # the kernel found the descriptor invalid
    },
)


class _AfXdpBackend:
    name = "afxdp"
    user_memory = True
    accounting = ACCOUNTING

    def unavailable(self) -> str | None:
        if not sys.platform.startswith("linux"):
            return "AF_XDP exists only on Linux"
        try:
            import nmbridge.backends.afxdp  # noqa: F401
        except ImportError as e:
            return f"the afxdp extension is not built ({e}); run ./scripts/build"
        lacking = kernel_lacks_af_xdp()
        if lacking:
            return lacking
        return caps.require_for(needed_capabilities(), "afxdp: ports")

    def check_name(self, name: str) -> None:
        parse(name)

    def interface(self, name: str) -> str | None:
        return parse(name)[0]

    def offloads_off(self, name: str) -> frozenset[str]:
        # An XDP descriptor is one frame in one chunk: no GSO metadata either way.
        return OFFLOAD_GROUPS

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        from nmbridge.backends.afxdp import AfXdpPort

        ifname, kw = self._args(name, region)
        assert region is not None
        return AfXdpPort(region, ifname, slots=options.slots, **kw)  # type: ignore[arg-type]

    def open_shares(self, name: str, options: OpenOptions, region: Region | None, shares: int) -> list[Port]:
        """The port as `shares` ports for forwarding workers: share w owns the sockets (and ring
        pairs) of queues w, w + shares, ...; one UMEM, one XDP program for the interface."""
        from nmbridge.backends.afxdp import open_shares

        ifname, kw = self._args(name, region)
        assert region is not None
        return list(open_shares(region, ifname, shares, slots=options.slots, **kw))  # type: ignore[arg-type]

    def ring_pairs(self, name: str, options: OpenOptions) -> int:
        """One ring pair per receive queue: ``queues=`` when given, else what the interface has
        (in the calling thread's network namespace)."""
        from nmbridge.backends.afxdp import count_queues

        try:
            ifname, opts = parse(name)
        except ValueError as e:
            raise PortError(f"afxdp:{name}: {e}") from None
        return int(opts["queues"]) if "queues" in opts else count_queues(ifname)

    def _args(self, name: str, region: Region | None) -> tuple[str, dict[str, object]]:
        if region is None:
            raise PortError(f"afxdp:{name}: needs a user-memory region")
        try:
            ifname, opts = parse(name)
        except ValueError as e:
            raise PortError(f"afxdp:{name}: {e}") from None
        return ifname, dict(mode=opts.get("mode", "auto"), queues=int(opts.get("queues", "0")),
                            promisc=opts.get("promisc", "1") == "1",
                            need_wakeup=opts.get("need_wakeup", "1") == "1",
                            csum_fix=opts.get("csum_fix", "1") == "1",
                            busy_poll=int(opts.get("busy_poll", "0")),
                            busy_budget=int(opts.get("busy_budget", "0")),
                            rx_coalesce=int(opts.get("rx_coalesce", "0")))


BACKEND = _AfXdpBackend()
