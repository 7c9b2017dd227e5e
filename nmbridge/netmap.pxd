# The netmap ABI (API 14) as nmbridge declares it: nmbridge/include/nmb_netmap.h.
from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t


cdef extern from "nmb_netmap.h" nogil:
    enum:
        NETMAP_API
        NETMAP_MIN_API
        NETMAP_MAX_API
        NETMAP_REQ_IFNAMSIZ
        NM_IFNAMSIZ
        NS_BUF_CHANGED
        NS_REPORT
        NS_FORWARD
        NS_NO_LEARN
        NS_INDIRECT
        NS_MOREFRAG
        NS_TXMON
        NETMAP_MAX_FRAGS
        NR_REG_ALL_NIC
        NR_REG_SW
        NR_REG_NIC_SW
        NR_REG_ONE_NIC
        NR_REG_ONE_SW
        NETMAP_REQ_REGISTER
        NETMAP_REQ_PORT_INFO_GET

    cdef unsigned long NIOCCTRL
    cdef unsigned long NIOCTXSYNC
    cdef unsigned long NIOCRXSYNC

    struct netmap_slot:
        uint32_t buf_idx
        uint16_t len
        uint16_t flags
        uint64_t ptr

    struct netmap_ring:
        int64_t buf_ofs
        uint32_t num_slots
        uint32_t nr_buf_size
        uint16_t ringid
        uint16_t dir
        uint32_t head
        uint32_t cur
        uint32_t tail
        uint32_t flags
        uint64_t offset_mask
        uint64_t buf_align
        netmap_slot slot[1]

    struct netmap_if:
        char ni_name[16]
        uint32_t ni_version
        uint32_t ni_flags
        uint32_t ni_tx_rings
        uint32_t ni_rx_rings
        uint32_t ni_bufs_head
        uint32_t ni_host_tx_rings
        uint32_t ni_host_rx_rings
        int64_t ring_ofs[1]

    struct nmreq_header:
        uint16_t nr_version
        uint16_t nr_reqtype
        uint32_t nr_reserved
        char nr_name[64]
        uint64_t nr_options
        uint64_t nr_body

    struct nmreq_register:
        uint64_t nr_offset
        uint64_t nr_memsize
        uint32_t nr_tx_slots
        uint32_t nr_rx_slots
        uint16_t nr_tx_rings
        uint16_t nr_rx_rings
        uint16_t nr_host_tx_rings
        uint16_t nr_host_rx_rings
        uint16_t nr_mem_id
        uint16_t nr_ringid
        uint32_t nr_mode
        uint32_t nr_extra_bufs
        uint64_t nr_flags

    netmap_ring *nmb_txring(netmap_if *nifp, uint32_t i)
    netmap_ring *nmb_rxring(netmap_if *nifp, uint32_t i)
    char *nmb_buf(netmap_ring *ring, uint32_t buf_idx)
    uint32_t nmb_ring_next(const netmap_ring *ring, uint32_t i)
    uint32_t nmb_ring_space(const netmap_ring *ring)
    int nmb_ring_empty(const netmap_ring *ring)
