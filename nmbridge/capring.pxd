# The capture tap's ring (nmbridge/include/nmb_capring.h): fastfwd's producer, capture's consumer.
from libc.stdint cimport int32_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "nmb_capring.h" nogil:
    enum:
        NMB_CAP_FORWARDED
        NMB_CAP_FILTERED
        NMB_CAP_OVERSIZE
        NMB_CAP_BROKEN_CHAIN
        NMB_CAP_NREASONS
        NMB_CAP_RULE_NONE

    ctypedef int (*nmb_decide_fn)(const void *prog, const uint8_t *frame, uint32_t len,
                                  int *action) noexcept nogil

    struct nmb_cap_rec:
        uint32_t size
        uint32_t caplen
        uint32_t origlen
        uint8_t reason
        uint8_t dir
        int32_t rule
        uint64_t ts_ns

    struct nmb_tap:
        uint64_t prod
        uint64_t seen
        uint64_t captured
        uint64_t ring_full
        uint64_t rate_limited
        uint64_t cap_bytes
        uint64_t tokens
        uint64_t last_ns
        uint64_t cons
        uint8_t *buf
        uint64_t size
        uint32_t snaplen
        uint32_t want
        uint64_t limit
        uint64_t rate
        uint64_t burst
        const void *sel
        nmb_decide_fn decide
        uint8_t dir

    uint64_t nmb_cap_now_ns() noexcept nogil
    void nmb_tap_offer_v(nmb_tap *t, unsigned reason, const void *filt, const uint8_t **bufs,
                         const uint32_t *lens, uint32_t n, uint32_t origlen) noexcept nogil
    void nmb_tap_offer(nmb_tap *t, unsigned reason, const void *filt, const uint8_t *frame,
                       uint32_t len, uint32_t origlen) noexcept nogil
    int nmb_tap_init(nmb_tap *t, uint64_t size) noexcept nogil
    void nmb_tap_fini(nmb_tap *t) noexcept nogil
    const nmb_cap_rec *nmb_tap_peek(nmb_tap *t) noexcept nogil
    void nmb_tap_release(nmb_tap *t, const nmb_cap_rec *r) noexcept nogil


cdef class Tap:
    cdef nmb_tap *c
    cdef object _sel
