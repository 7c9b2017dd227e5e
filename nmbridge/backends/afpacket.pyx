# cython: language_level=3
"""afpacket: ports -- netmap rings in user memory whose NIC side is an AF_PACKET socket.

nmbridge plays the NIC in C at sync time (no GIL): rxsync copies frames from a TPACKET_V2
mmap ring (frames larger than a ring frame: recvmsg() of the kernel's copy; ``rx_ring=False``:
recvmmsg() of every frame) into free RX slots; frames larger than a buffer become NS_MOREFRAG
chains, the outer VLAN tag the kernel
moved into metadata is put back, and a GSO/checksum request travels in the first slot's
``ptr`` to an egress that takes it (``nmb_port.h``).  txsync copies the TX slots the
user filled into a PACKET_TX_RING and kicks it with one send() (``tx_ring=False``: sendmmsg(),
one system call per batch).  One TX and one RX ring per port.
See ``nmbridge/include/nmb_afpacket.h`` for the rules.
"""

cimport cython
from libc.stdint cimport uint32_t, uint64_t
from libc.string cimport memcpy, memset

from nmbridge.port cimport Port, Region, nmb_port, nmb_umem

from nmbridge.errors import PortError, RingError


cdef extern from "nmb_afpacket.h" nogil:
    struct nmb_afpacket_opts:
        uint32_t slots
        int rx_ring
        uint32_t rx_frames
        int rcvbuf
        int promisc
        int qdisc_bypass
        int sndbuf
        int tx_ring
        uint32_t tx_frames
        uint32_t busy_poll_us
        int vnet
        uint32_t rx_ring_bytes
        int fanout
        int fanout_group
        int fanout_legacy

    # every field of the C struct, in any order (it converts to a dict of them all)
    struct nmb_afpacket_stats:
        uint64_t rx_frames, rx_bytes, rx_kernel_drops, rx_truncated, rx_oversize
        uint64_t rx_vlan_restored, rx_csum_fixed, rx_csum_passed, rx_gso, rx_gso_dropped, tx_gso
        uint64_t tx_frames, tx_bytes, tx_errors, tx_link_down, tx_again
        uint64_t link_errors, rxsyncs, txsyncs, tx_calls, rx_calls
        uint64_t tx_mtu

    nmb_port *nmb_afpacket_open(nmb_umem *m, const char *ifname, const nmb_afpacket_opts *o,
                                char *err, size_t errlen)
    void nmb_afpacket_close(nmb_port *p)
    void nmb_afpacket_get_stats(nmb_port *p, nmb_afpacket_stats *out)
    const void *nmb_afpacket_counters(nmb_port *p, size_t *len)
    int nmb_afpacket_ifindex(nmb_port *p)
    int nmb_afpacket_check(nmb_port *p)
    int nmb_afpacket_fanout_group(nmb_port *p)
    void nmb_afpacket_ring_bytes(nmb_port *p, size_t *rx, size_t *tx)
    int nmb_afpacket_fanout_start(nmb_port *p)


DEFAULT_SNDBUF = 4 << 20
DEFAULT_RCVBUF = 8 << 20
DEFAULT_RX_RING_BYTES = 8 << 20


@cython.no_gc_clear  # the region must outlive the port, even at interpreter exit
cdef class AfPacketPort(Port):
    """An afpacket: port on interface `ifname` (in the calling thread's network namespace).

    ``fanout`` (a PACKET_FANOUT_* type: hash 0, lb 1, cpu 2, qm 5) makes it one share of a PACKET_FANOUT group: a new group
    (``fanout_group=-1``) or the group of an earlier share (its ``fanout_group``).  A share
    receives nothing until ``fanout_start()``: call it once every share has joined.
    ``fanout_legacy`` (tests) makes the group as Linux < 6.2 would: without
    PACKET_FANOUT_FLAG_IGNORE_OUTGOING (a socket filter drops outgoing frames then)."""

    cdef Region region
    cdef readonly str ifname
    cdef uint64_t _kernel_drops  # the kernel's drop count when last read (kept after close)

    def __init__(self, Region region not None, str ifname, *, int slots=1024, bint rx_ring=True,
                 int rx_frames=0, int rcvbuf=DEFAULT_RCVBUF, bint promisc=True,
                 bint qdisc_bypass=True, int sndbuf=DEFAULT_SNDBUF, bint tx_ring=True,
                 int tx_frames=0, bint vnet=True, int busy_poll_us=0, int rx_ring_bytes=0,
                 int fanout=-1, int fanout_group=-1, bint fanout_legacy=False):
        cdef char err[256]
        cdef nmb_afpacket_opts o
        cdef bytes name = ifname.encode()
        if (slots < 2 or rx_frames < 0 or sndbuf < 0 or rcvbuf < 0 or tx_frames < 0 or busy_poll_us < 0
                or rx_ring_bytes < 0):
            raise PortError(f"afpacket:{ifname}: slots >= 2, rx_frames >= 0, sndbuf >= 0, rcvbuf >= 0, "
                            f"tx_frames >= 0, busy_poll_us >= 0 and rx_ring_bytes >= 0 are needed")
        o.slots = slots
        o.rx_ring = rx_ring
        o.rx_frames = rx_frames
        o.rcvbuf = rcvbuf
        o.promisc = promisc
        o.qdisc_bypass = qdisc_bypass
        o.sndbuf = sndbuf
        o.tx_ring = tx_ring
        o.tx_frames = tx_frames
        o.vnet = vnet
        o.busy_poll_us = busy_poll_us
        o.rx_ring_bytes = rx_ring_bytes
        o.fanout = fanout
        o.fanout_group = fanout_group
        o.fanout_legacy = fanout_legacy
        self.c = nmb_afpacket_open(region.c, name, &o, err, sizeof(err))
        if self.c == NULL:
            raise PortError(f"afpacket:{ifname}: {err.decode(errors='replace')}")
        self.region = region
        self.ifname = ifname
        self.spec = f"afpacket:{ifname}"
        self.backend = "afpacket"
        self.region_name = f"user:{region.address:#x}"

    cdef void _release(self) noexcept:
        cdef nmb_afpacket_stats s
        nmb_afpacket_get_stats(self.c, &s)
        self._kernel_drops = s.rx_kernel_drops
        nmb_afpacket_close(self.c)

    def __dealloc__(self):
        # runs before the region reference is dropped (a base-class __dealloc__ would not)
        if self.c != NULL:
            nmb_afpacket_close(self.c)
            self.c = NULL

    @property
    def fanout_group(self):
        """The PACKET_FANOUT group id of a share (None: a socket of its own)."""
        self._check_open()
        cdef int g = nmb_afpacket_fanout_group(self.c)
        return None if g < 0 else g

    @property
    def ring_bytes(self):
        """(RX, TX): the bytes of the kernel's packet rings mapped for the port (0: none)."""
        self._check_open()
        cdef size_t rx = 0, tx = 0
        nmb_afpacket_ring_bytes(self.c, &rx, &tx)
        return (rx, tx)

    def fanout_start(self) -> None:
        """Let frames in on a share (once every share of its group has joined)."""
        self._check_open()
        if nmb_afpacket_fanout_start(self.c) != 0:
            raise PortError(self.c.error.decode(errors="replace"))

    @property
    def ifindex(self) -> int:
        self._check_open()
        return nmb_afpacket_ifindex(self.c)

    def counters(self) -> dict:
        """Per-port counters (safe while the port forwards)."""
        self._check_open()
        cdef nmb_afpacket_stats s
        nmb_afpacket_get_stats(self.c, &s)
        return s

    def counters_buffer(self) -> tuple:
        self._check_open()
        cdef size_t n = 0
        cdef const void *p = nmb_afpacket_counters(self.c, &n)
        return (<size_t>p, n)

    def decode_counters(self, bytes raw) -> dict:
        """A copy fastfwd took at a batch boundary; rx_kernel_drops (the kernel's count, which
        the forwarding thread does not keep) is read now: a frame it counts is received and
        dropped at once, so reading it later never unbalances a snapshot."""
        cdef nmb_afpacket_stats s, live
        memset(&s, 0, sizeof(s))
        memcpy(&s, <const char *>raw, min(<size_t>len(raw), sizeof(s)))
        if self.c != NULL:
            nmb_afpacket_get_stats(self.c, &live)
            self._kernel_drops = live.rx_kernel_drops
        s.rx_kernel_drops = self._kernel_drops
        return s

    def check(self) -> None:
        """The kernel's prologue checks on both rings, now (raises RingError)."""
        self._check_open()
        if nmb_afpacket_check(self.c) != 0:
            raise RingError(self.c.error.decode(errors="replace"))
