# cython: language_level=3
"""afxdp: ports -- netmap rings in user memory whose NIC side is a set of AF_XDP sockets.

The region's buffer pool is the UMEM (buffer b is UMEM chunk b), so a frame the kernel
receives is already in a netmap buffer and a frame swapped into a TX slot is transmitted from
where it lies.  One socket and one netmap ring pair per receive queue; our own XDP program
(redirect by rx_queue_index) attached through a BPF link.  See ``nmbridge/include/nmb_afxdp.h``.
"""

cimport cython
from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc
from libc.string cimport memcpy, memset

from nmbridge.port cimport Port, Region, nmb_port, nmb_umem

from nmbridge.errors import PortError, RingError


cdef extern from "nmb_afxdp.h" nogil:
    enum:
        NMB_AFXDP_MODE_AUTO
        NMB_AFXDP_MODE_ZC
        NMB_AFXDP_MODE_NATIVE
        NMB_AFXDP_MODE_SKB

    struct nmb_afxdp_opts:
        uint32_t slots
        int mode
        uint32_t queues
        int promisc
        int need_wakeup
        int csum_fix
        uint32_t busy_poll_us
        uint32_t busy_budget
        uint32_t rx_coalesce_us

    struct nmb_afxdp_stats:
        uint64_t rx_frames, rx_bytes, rx_kernel_drops, rx_ring_full, rx_fill_empty, rx_bad_desc, rx_csum_fixed
        uint64_t tx_frames, tx_bytes, tx_errors, tx_link_down, tx_dev_drops, tx_invalid, tx_again
        uint64_t rxsyncs, txsyncs, tx_kicks, fill_kicks, completions, link_errors, busy_polls, rx_coalesced
        uint64_t tx_mtu

    nmb_port *nmb_afxdp_open(nmb_umem *m, const char *ifname, const nmb_afxdp_opts *o,
                             char *err, size_t errlen)
    int nmb_afxdp_open_shares(nmb_umem *m, const char *ifname, const nmb_afxdp_opts *o, uint32_t shares,
                              nmb_port **out, char *err, size_t errlen)
    int nmb_afxdp_count_queues(const char *ifname)
    uint32_t nmb_afxdp_queue_id(nmb_port *p, uint32_t ring)
    void nmb_afxdp_close(nmb_port *p)
    void nmb_afxdp_get_stats(nmb_port *p, nmb_afxdp_stats *out)
    const void *nmb_afxdp_counters(nmb_port *p, size_t *len)
    int nmb_afxdp_ifindex(nmb_port *p)
    int nmb_afxdp_mode(nmb_port *p)
    const char *nmb_afxdp_mode_reason(nmb_port *p)
    uint32_t nmb_afxdp_queues(nmb_port *p)
    uint32_t nmb_afxdp_shared_sockets(nmb_port *p)
    int nmb_afxdp_check(nmb_port *p)
    nmb_port *nmb_afxdp_open_fake(nmb_umem *m, const char *name, uint32_t slots, char *err, size_t errlen)
    uint32_t nmb_afxdp_fake_kernel(nmb_port *p, uint32_t rx, uint32_t tx, uint32_t len, uint32_t perm,
                                   uint8_t *seen, uint32_t seen_len)
    uint32_t nmb_afxdp_fake_held(nmb_port *p, int tx_side, uint32_t *out, uint32_t max)


MODES = {"auto": NMB_AFXDP_MODE_AUTO, "zc": NMB_AFXDP_MODE_ZC, "native": NMB_AFXDP_MODE_NATIVE,
         "skb": NMB_AFXDP_MODE_SKB}
_MODE_NAMES = {NMB_AFXDP_MODE_ZC: "zc", NMB_AFXDP_MODE_NATIVE: "native", NMB_AFXDP_MODE_SKB: "skb"}


cdef dict _stats_dict(nmb_afxdp_stats *s):
    return {
        "rx_frames": s.rx_frames, "rx_bytes": s.rx_bytes,
        "rx_kernel_drops": s.rx_kernel_drops, "rx_ring_full": s.rx_ring_full,
        "rx_fill_empty": s.rx_fill_empty, "rx_bad_desc": s.rx_bad_desc, "rx_csum_fixed": s.rx_csum_fixed,
        "tx_frames": s.tx_frames, "tx_bytes": s.tx_bytes, "tx_errors": s.tx_errors,
        "tx_link_down": s.tx_link_down, "tx_dev_drops": s.tx_dev_drops,
        "tx_invalid": s.tx_invalid, "tx_again": s.tx_again,
        "rxsyncs": s.rxsyncs, "txsyncs": s.txsyncs, "tx_kicks": s.tx_kicks,
        "fill_kicks": s.fill_kicks, "completions": s.completions, "link_errors": s.link_errors,
        "busy_polls": s.busy_polls, "rx_coalesced": s.rx_coalesced, "tx_mtu": s.tx_mtu,
        "tx_sent": s.tx_frames - s.tx_dev_drops - s.tx_invalid,
    }


cdef int _options(nmb_afxdp_opts *o, str ifname, int slots, str mode, int queues, bint promisc,
                  bint need_wakeup, bint csum_fix, int busy_poll, int busy_budget, int rx_coalesce) except -1:
    if mode not in MODES:
        raise PortError(f"afxdp:{ifname}: mode {mode!r}: use one of {', '.join(MODES)}")
    if slots < 2 or queues < 0 or busy_poll < 0 or busy_budget < 0 or rx_coalesce < 0:
        raise PortError(f"afxdp:{ifname}: slots >= 2, queues, busy_poll, busy_budget and rx_coalesce >= 0 "
                        f"are needed")
    o.slots = slots
    o.mode = MODES[mode]
    o.queues = queues
    o.promisc = promisc
    o.need_wakeup = need_wakeup
    o.csum_fix = csum_fix
    o.busy_poll_us = busy_poll
    o.busy_budget = busy_budget
    o.rx_coalesce_us = rx_coalesce
    return 0


def count_queues(str ifname) -> int:
    """The interface's receive queues (ETHTOOL_GCHANNELS; 1 when the driver does not say), in
    the calling thread's network namespace: the ring pairs an afxdp: port of it has."""
    cdef bytes name = ifname.encode()
    return nmb_afxdp_count_queues(name)


@cython.no_gc_clear  # the region must outlive the port, even at interpreter exit
cdef class AfXdpPort(Port):
    """An afxdp: port on interface `ifname` (in the calling thread's network namespace)."""

    cdef Region region
    cdef readonly str ifname
    cdef tuple _kernel  # the kernel-kept counters last read (see decode_counters)

    def __init__(self, Region region not None, str ifname, *, int slots=1024, str mode="auto",
                 int queues=0, bint promisc=True, bint need_wakeup=True, bint csum_fix=True,
                 int busy_poll=0, int busy_budget=0, int rx_coalesce=0):
        cdef char err[256]
        cdef nmb_afxdp_opts o
        cdef bytes name = ifname.encode()
        _options(&o, ifname, slots, mode, queues, promisc, need_wakeup, csum_fix, busy_poll, busy_budget,
                 rx_coalesce)
        cdef nmb_port *c = nmb_afxdp_open(region.c, name, &o, err, sizeof(err))
        if c == NULL:
            raise PortError(f"afxdp:{ifname}: {err.decode(errors='replace')}")
        self._adopt(c, region, ifname)

    cdef void _adopt(self, nmb_port *c, Region region, str ifname):
        self.c = c
        self._kernel = (0, 0, 0, 0)
        self.region = region
        self.ifname = ifname
        self.spec = f"afxdp:{ifname}"
        self.backend = "afxdp"
        self.region_name = f"user:{region.address:#x}"

    cdef void _release(self) noexcept:
        cdef nmb_afxdp_stats s
        nmb_afxdp_get_stats(self.c, &s)  # the kernel's counters go with the sockets: keep them
        self._kernel = (s.rx_kernel_drops, s.rx_ring_full, s.rx_fill_empty, s.tx_invalid)
        nmb_afxdp_close(self.c)

    def __dealloc__(self):
        # runs before the region reference is dropped (a base-class __dealloc__ would not)
        if self.c != NULL:
            nmb_afxdp_close(self.c)
            self.c = NULL

    @property
    def ifindex(self) -> int:
        self._check_open()
        return nmb_afxdp_ifindex(self.c)

    @property
    def mode(self) -> str:
        """The mode in use: "zc", "native" or "skb"."""
        self._check_open()
        return _MODE_NAMES.get(nmb_afxdp_mode(self.c), "?")

    @property
    def mode_reason(self) -> str:
        """Why the mode is not zero-copy ("" when nothing was given up)."""
        self._check_open()
        return nmb_afxdp_mode_reason(self.c).decode(errors="replace")

    @property
    def queues(self) -> int:
        self._check_open()
        return nmb_afxdp_queues(self.c)

    @property
    def queue_ids(self) -> list:
        """The interface queue each of the port's ring pairs plays (a share: w, w + shares, ...)."""
        self._check_open()
        return [nmb_afxdp_queue_id(self.c, i) for i in range(nmb_afxdp_queues(self.c))]

    @property
    def shared_sockets(self) -> int:
        """Sockets bound to another socket's UMEM (XDP_SHARED_UMEM); the rest registered one."""
        self._check_open()
        return nmb_afxdp_shared_sockets(self.c)

    def info(self) -> dict:
        out = Port.info(self)
        out["mode"] = self.mode
        if self.mode_reason:
            out["mode_reason"] = self.mode_reason
        out["queues"] = self.queues
        out["queue_ids"] = self.queue_ids
        out["umem"] = "shared" if self.shared_sockets == self.queues else "registered"
        return out

    def counters(self) -> dict:
        """Per-port counters (safe while the port forwards)."""
        self._check_open()
        cdef nmb_afxdp_stats s
        nmb_afxdp_get_stats(self.c, &s)
        return _stats_dict(&s)

    def counters_buffer(self) -> tuple:
        self._check_open()
        cdef size_t n = 0
        cdef const void *p = nmb_afxdp_counters(self.c, &n)
        return (<size_t>p, n)

    def decode_counters(self, bytes raw) -> dict:
        """A copy fastfwd took at a batch boundary, with the kernel-kept counters
        (XDP_STATISTICS) read now: a frame the kernel drops on receive is received and
        dropped at once, so reading them later never unbalances a snapshot.  ``tx_sent``
        (forwarded) is what was posted less what the device or the kernel refused."""
        cdef nmb_afxdp_stats s, live
        memset(&s, 0, sizeof(s))
        memcpy(&s, <const char *>raw, min(<size_t>len(raw), sizeof(s)))
        if self.c != NULL:
            nmb_afxdp_get_stats(self.c, &live)
            self._kernel = (live.rx_kernel_drops, live.rx_ring_full, live.rx_fill_empty, live.tx_invalid)
        s.rx_kernel_drops, s.rx_ring_full, s.rx_fill_empty, s.tx_invalid = self._kernel
        return _stats_dict(&s)

    def check(self) -> None:
        """The kernel's prologue checks on every ring, now (raises RingError)."""
        self._check_open()
        if nmb_afxdp_check(self.c) != 0:
            raise RingError(self.c.error.decode(errors="replace"))


@cython.no_gc_clear
cdef class FakeXskPort(AfXdpPort):
    """An afxdp port whose "kernel" is a fake over plain memory (ownership tests): the same
    sync code as a real port, one queue, no socket."""

    def __init__(self, Region region not None, str name, *, int slots=64):
        cdef char err[256]
        if slots < 2:
            raise PortError(f"fake afxdp port {name}: slots >= 2 are needed")
        self.c = nmb_afxdp_open_fake(region.c, name.encode(), slots, err, sizeof(err))
        if self.c == NULL:
            raise PortError(f"fake afxdp port {name}: {err.decode(errors='replace')}")
        self.region = region
        self.ifname = name
        self.spec = f"afxdp-fake:{name}"
        self.backend = "afxdp"
        self.region_name = f"user:{region.address:#x}"

    def kernel(self, int rx=0, int tx=0, int length=60, int perm=0, bytearray seen=None) -> int:
        """The fake kernel receives up to `rx` frames (numbered in their first 4 bytes, in a
        rotated order of the fill ring when `perm` is not 0) and transmits and completes up to
        `tx` frames (in reverse order when `perm` is odd), counting each TX frame's number in
        `seen`.  Returns frames moved."""
        self._check_open()
        cdef unsigned char[:] view
        cdef uint8_t *sp = NULL
        cdef uint32_t sl = 0
        if seen is not None and len(seen):
            view = seen
            sp = &view[0]
            sl = len(seen)
        return nmb_afxdp_fake_kernel(self.c, rx, tx, length, perm, sp, sl)

    def held(self, bint tx_side=False) -> list:
        """Buffer indices the fake kernel holds now: fill and RX rings, or (`tx_side`) TX and
        completion rings."""
        self._check_open()
        cdef uint32_t cap = 1 << 20
        cdef uint32_t *buf = <uint32_t *>malloc(cap * sizeof(uint32_t))
        if buf == NULL:
            raise MemoryError()
        try:
            n = nmb_afxdp_fake_held(self.c, tx_side, buf, cap)
            return [buf[i] for i in range(n)]
        finally:
            free(buf)


def open_shares(Region region not None, str ifname, int shares, *, int slots=1024, str mode="auto",
                int queues=0, bint promisc=True, bint need_wakeup=True, bint csum_fix=True,
                int busy_poll=0, int busy_budget=0, int rx_coalesce=0) -> list:
    """The port as `shares` AfXdpPorts: share w owns the interface's queues w, w + shares, ...
    (its ring pairs 0, 1, ...), one socket each, all in the region's one UMEM, each share with
    its own counters; one XDP program for the interface, detached when the last share closes."""
    cdef char err[256]
    cdef nmb_afxdp_opts o
    cdef bytes name = ifname.encode()
    cdef nmb_port *out[64]
    cdef int i
    cdef AfXdpPort p
    _options(&o, ifname, slots, mode, queues, promisc, need_wakeup, csum_fix, busy_poll, busy_budget,
             rx_coalesce)
    if not 1 <= shares <= 64:
        raise PortError(f"afxdp:{ifname}: {shares} shares: 1 to 64 are possible")
    if nmb_afxdp_open_shares(region.c, name, &o, shares, out, err, sizeof(err)) != 0:
        raise PortError(f"afxdp:{ifname}: {err.decode(errors='replace')}")
    ports = []
    for i in range(shares):
        p = AfXdpPort.__new__(AfXdpPort)
        p._adopt(out[i], region, ifname)
        ports.append(p)
    return ports
