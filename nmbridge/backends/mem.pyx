# cython: language_level=3
"""mem: ports -- netmap rings in user memory whose NIC is a test driver or a benchmark.

``rx="queue"``: frames given to :meth:`MemPort.inject` arrive on the RX rings at the next
rxsync, as a NIC would deliver them (frames larger than a buffer become NS_MOREFRAG chains).
``rx="source"``: every free RX slot is refilled with a ``frame_len``-byte frame at each rxsync
(an endless source).  ``tx="collect"``: frames the user hands to TX are kept for
:meth:`MemPort.collect`; ``tx="sink"``: they are only counted;
``tx="hold"``: they are never taken (a stuck egress: the TX rings fill and stay full).  ``strict=True`` checks every
sync the way the kernel would and raises :class:`~nmbridge.errors.RingError` naming the ring
and slot.
"""

cimport cython
from libc.stdint cimport uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free
from libc.string cimport memcpy, memset

from nmbridge.netmap cimport NS_MOREFRAG
from nmbridge.port cimport Port, Region, nmb_port, nmb_umem

from nmbridge.errors import PortError, RingError


cdef extern from "nmb_memport.h" nogil:
    enum:
        NMB_MEM_RX_QUEUE
        NMB_MEM_RX_SOURCE
        NMB_MEM_RX_NONE
        NMB_MEM_TX_COLLECT
        NMB_MEM_TX_SINK
        NMB_MEM_TX_HOLD

    struct nmb_memport_stats:
        uint64_t rx_slots, rx_bytes, tx_slots, tx_bytes, rxsyncs, txsyncs, rx_frames, tx_frames

    struct nmb_mem_record:
        uint32_t datalen
        uint16_t slot_len
        uint16_t flags

    nmb_port *nmb_memport_open(nmb_umem *m, const char *name, uint32_t nrings, uint32_t nslots,
                               int rx_mode, int tx_mode, uint16_t source_len, int strict,
                               char *err, size_t errlen)
    void nmb_memport_close(nmb_port *p)
    int nmb_memport_inject(nmb_port *p, int ring, const void *data, uint32_t datalen, uint16_t slot_len,
                           uint16_t flags)
    size_t nmb_memport_take(nmb_port *p, char **out)
    size_t nmb_memport_pending(nmb_port *p)
    void nmb_memport_get_stats(nmb_port *p, nmb_memport_stats *out)
    const void *nmb_memport_counters(nmb_port *p, size_t *len)
    int nmb_memport_check(nmb_port *p)


_RX_MODES = {"queue": NMB_MEM_RX_QUEUE, "source": NMB_MEM_RX_SOURCE, "none": NMB_MEM_RX_NONE}
_TX_MODES = {"collect": NMB_MEM_TX_COLLECT, "sink": NMB_MEM_TX_SINK, "hold": NMB_MEM_TX_HOLD}


@cython.no_gc_clear  # the region must outlive the port, even at interpreter exit
cdef class MemPort(Port):
    """A mem: port in `region`."""

    cdef Region region
    cdef readonly uint32_t buf_size
    cdef list _partial

    def __init__(self, Region region not None, str name, *, int rings=1, int slots=1024,
                 str rx="queue", str tx="collect", int frame_len=60, bint strict=False):
        cdef char err[256]
        if rx not in _RX_MODES:
            raise ValueError(f"mem:{name}: rx must be one of {sorted(_RX_MODES)}, not {rx!r}")
        if tx not in _TX_MODES:
            raise ValueError(f"mem:{name}: tx must be one of {sorted(_TX_MODES)}, not {tx!r}")
        if not 14 <= frame_len <= region.buf_size:
            raise ValueError(f"mem:{name}: frame_len {frame_len} outside [14, {region.buf_size}]")
        if not 0 < len(name.encode()) < 16:
            raise ValueError(f"mem:{name}: the name must be 1 to 15 bytes")
        self.c = nmb_memport_open(region.c, name.encode(), rings, slots, _RX_MODES[rx],
                                  _TX_MODES[tx], frame_len, strict, err, sizeof(err))
        if self.c == NULL:
            raise PortError(f"mem:{name}: {err.decode(errors='replace')}")
        self.region = region
        self.spec = f"mem:{name}"
        self.backend = "mem"
        self.region_name = f"user:{region.address:#x}"
        self.buf_size = region.buf_size
        self._partial = []

    cdef void _release(self) noexcept:
        nmb_memport_close(self.c)

    def __dealloc__(self):
        # runs before the region reference is dropped (a base-class __dealloc__ would not)
        if self.c != NULL:
            nmb_memport_close(self.c)
            self.c = NULL

    def inject_slot(self, bytes data, *, int flags=0, length=None, ring=None) -> None:
        """Queue one RX slot: `data` with `flags`; `length` overrides the slot's len; `ring`:
        for that RX ring only (as a NIC's RSS would put a flow there), else the first ring
        with room."""
        self._check_open()
        cdef int c_ring = -1 if ring is None else ring
        if not -1 <= c_ring < <int>self.c.rx_last:
            raise ValueError(f"{self.spec}: no RX ring {ring} (it has {self.c.rx_last})")
        cdef int slot_len = len(data) if length is None else length
        if len(data) > self.buf_size:
            raise ValueError(f"{self.spec}: {len(data)} bytes do not fit a {self.buf_size}-byte buffer")
        if not 0 <= slot_len <= 0xffff:
            raise ValueError(f"{self.spec}: slot length {slot_len} outside [0, 65535]")
        if nmb_memport_inject(self.c, c_ring, <const char *>data, len(data), slot_len, flags) != 0:
            raise MemoryError(f"{self.spec}: cannot queue a frame")

    def inject(self, bytes frame, ring=None) -> None:
        """Queue one frame (for RX ring `ring` only, or the first with room); one larger than a
        buffer becomes an NS_MOREFRAG chain."""
        cdef Py_ssize_t off = 0, n = len(frame)
        if n <= self.buf_size:
            self.inject_slot(frame, ring=ring)
            return
        while off < n:
            chunk = frame[off:off + self.buf_size]
            off += len(chunk)
            self.inject_slot(chunk, flags=NS_MOREFRAG if off < n else 0, ring=ring)

    def inject_many(self, frames, ring=None) -> None:
        for f in frames:
            self.inject(f, ring)

    def collect_slots(self) -> list:
        """Everything TX took since the last call, one ``(data, flags, len)`` per slot."""
        self._check_open()
        cdef char *buf = NULL
        cdef size_t n = nmb_memport_take(self.c, &buf)
        cdef size_t off = 0
        cdef nmb_mem_record *rec
        out = []
        try:
            while off < n:
                rec = <nmb_mem_record *>(buf + off)
                off += sizeof(nmb_mem_record)
                out.append((buf[off:off + rec.datalen], rec.flags, rec.slot_len))
                off += rec.datalen
        finally:
            free(buf)
        return out

    def collect(self) -> list:
        """Whole frames TX took since the last call (NS_MOREFRAG chains joined)."""
        frames = []
        for data, flags, _ in self.collect_slots():
            self._partial.append(data)
            if not flags & NS_MOREFRAG:
                frames.append(b"".join(self._partial))
                self._partial = []
        return frames

    @property
    def pending(self) -> int:
        """Slots injected but not yet delivered to an RX ring."""
        self._check_open()
        return nmb_memport_pending(self.c)

    def counters(self) -> dict:
        self._check_open()
        cdef nmb_memport_stats st
        nmb_memport_get_stats(self.c, &st)
        return st

    def counters_buffer(self) -> tuple:
        self._check_open()
        cdef size_t n = 0
        cdef const void *p = nmb_memport_counters(self.c, &n)
        return (<size_t>p, n)

    def decode_counters(self, bytes raw) -> dict:
        cdef nmb_memport_stats st
        memset(&st, 0, sizeof(st))
        memcpy(&st, <const char *>raw, min(<size_t>len(raw), sizeof(st)))
        return st

    def check(self) -> None:
        """The kernel's checks on every ring of this port and on the whole region, now."""
        self._check_open()
        if nmb_memport_check(self.c) != 0:
            raise RingError(self.c.error.decode(errors="replace"))
