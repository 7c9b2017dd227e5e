# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The capture tap's Python face: one :class:`Tap` per captured direction.

A Tap owns a ``struct nmb_tap`` (nmbridge/include/nmb_capring.h): the selection (which verdicts,
an optional compiled expression), the snap length, the rate limit and the record limit, the
bounded ring the forwarding thread writes into, and its counters.  ``Forwarder.set_tap`` hands
its ``address`` to fastfwd; :meth:`drain` (the consumer thread) takes the records out.
"""

from libc.stdint cimport uint8_t, uint32_t, uint64_t
from libc.stdlib cimport calloc, free

REASONS = ("forwarded", "filter", "oversize", "broken_chain")


cdef class Tap:
    """A tap for direction index `dir` (0 a-to-b, 1 b-to-a).

    ``want``: reasons to capture (names of REASONS); ``select``: an object with ``address`` (a
    compiled filter whose pass means "capture"), kept alive here, or None; ``decide``: the
    address of the engine's ``nmb_filter_decide`` (names deciding rules; needed with
    ``select``); ``rate``: frames per second (0: unlimited); ``limit``: records (0: no limit);
    ``ring_bytes``: a power of two, at least twice the largest record.
    """

    def __cinit__(self):
        self.c = NULL

    def __init__(self, int dir, want, *, uint32_t snaplen=262144, uint64_t ring_bytes=4 << 20,
                 uint64_t rate=10000, uint64_t limit=0, select=None, size_t decide=0):
        cdef uint32_t mask = 0
        for w in want:
            mask |= 1u << REASONS.index(w)
        if snaplen < 1:
            raise ValueError("snaplen must be at least 1")
        if ring_bytes & (ring_bytes - 1) or ring_bytes < 2 * (snaplen + sizeof(nmb_cap_rec) + 8):
            raise ValueError(f"ring_bytes {ring_bytes}: a power of two holding two {snaplen}-byte records")
        if select is not None and not decide:
            raise ValueError("a selection expression needs the engine's decide function")
        self.c = <nmb_tap *>calloc(1, sizeof(nmb_tap))
        if self.c == NULL or nmb_tap_init(self.c, ring_bytes) != 0:
            raise MemoryError()
        self.c.dir = dir
        self.c.want = mask
        self.c.snaplen = snaplen
        self.c.rate = rate
        self.c.burst = (rate // 20 if rate >= 1280 else 64) if rate else 0
        self.c.tokens = self.c.burst * 1000000000
        self.c.last_ns = 0  # the first token check fills the bucket
        self.c.limit = limit
        self.c.decide = <nmb_decide_fn>decide
        self._sel = select
        cdef size_t sel = 0 if select is None else select.address
        self.c.sel = <const void *>sel

    def __dealloc__(self):
        if self.c != NULL:
            nmb_tap_fini(self.c)
            free(self.c)
            self.c = NULL

    @property
    def address(self) -> int:
        """The ``struct nmb_tap *`` for ``Forwarder.set_tap``."""
        return <size_t>self.c

    @property
    def dir(self) -> int:
        return self.c.dir

    @property
    def rate(self) -> int:
        """Frames per second this tap takes at most (0: no limit)."""
        return self.c.rate

    def counters(self) -> dict:
        """seen (matched the selection), captured, capture_dropped (ring full), rate_limited,
        bytes (copied)."""
        return {"seen": self.c.seen, "captured": self.c.captured,
                "capture_dropped": self.c.ring_full, "rate_limited": self.c.rate_limited,
                "bytes": self.c.cap_bytes}

    def drain(self, int max_records=4096) -> list:
        """Take up to `max_records` records out of the ring, oldest first: tuples
        (dir, reason name, rule index (-1 default, None none), ts_ns, origlen, frame bytes)."""
        cdef const nmb_cap_rec *r
        cdef list out = []
        while len(out) < max_records:
            r = nmb_tap_peek(self.c)
            if r == NULL:
                break
            data = (<const char *>(r + 1))[:r.caplen]
            out.append((r.dir, REASONS[r.reason] if r.reason < NMB_CAP_NREASONS else "unknown",
                        None if r.rule == NMB_CAP_RULE_NONE else r.rule, r.ts_ns, r.origlen, data))
            nmb_tap_release(self.c, r)
        return out

    def _offer(self, str reason, const uint8_t[:] frame, size_t filt=0) -> None:
        """Offer one frame as fastfwd does (tests)."""
        cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
        nmb_tap_offer(self.c, REASONS.index(reason), <const void *>filt, p,
                      <uint32_t>frame.shape[0], <uint32_t>frame.shape[0])

    def _produce(self, uint64_t n, uint32_t length) -> None:
        """Offer n forwarded frames of `length` bytes (>= 8) carrying a sequence number in
        their first 8 bytes, without the GIL, as fast as possible (tests: run it in a thread
        while another drains)."""
        cdef uint8_t *buf = <uint8_t *>calloc(max(length, 8), 1)
        cdef uint64_t i
        if buf == NULL:
            raise MemoryError()
        with nogil:
            for i in range(n):
                (<uint64_t *>buf)[0] = i
                nmb_tap_offer(self.c, NMB_CAP_FORWARDED, NULL, buf, length, length)
        free(buf)
