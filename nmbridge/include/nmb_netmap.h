/*
 * nmb_netmap.h -- the netmap user/kernel ABI (API 14), declared by nmbridge.
 *
 * Written from the project's measured ABI facts (shared/netmap-abi.md): struct layouts,
 * ioctl numbers and flag values.  Every size and offset is checked at compile time, so a
 * layout mistake fails the build instead of corrupting rings at run time.
 */
#ifndef NMB_NETMAP_H
#define NMB_NETMAP_H

#include <stddef.h>
#include <stdint.h>
#include <sys/time.h>

#define NETMAP_API 14
#define NETMAP_MIN_API 14
#define NETMAP_MAX_API 15
#define NETMAP_REQ_IFNAMSIZ 64
#define NM_IFNAMSIZ 16
#define NM_CACHE_ALIGN 128

/* ioctls */
#define NIOCCTRL 0xc0586997UL
#define NIOCTXSYNC 0x6994UL
#define NIOCRXSYNC 0x6995UL

/* slot flags */
#define NS_BUF_CHANGED 0x0001
#define NS_REPORT 0x0002
#define NS_FORWARD 0x0004
#define NS_NO_LEARN 0x0008
#define NS_INDIRECT 0x0010
#define NS_MOREFRAG 0x0020
#define NS_TXMON 0x0040
#define NS_PORT_SHIFT 8
#define NS_PORT_MASK (0xffU << NS_PORT_SHIFT)
#define NETMAP_MAX_FRAGS 64

/* ring flags */
#define NR_TIMESTAMP 0x0002
#define NR_FORWARD 0x0004

/* netmap_if flags */
#define NI_PRIV_MEM 0x1

/* nr_mode */
#define NR_REG_DEFAULT 0
#define NR_REG_ALL_NIC 1
#define NR_REG_SW 2
#define NR_REG_NIC_SW 3
#define NR_REG_ONE_NIC 4
#define NR_REG_PIPE_MASTER 5
#define NR_REG_PIPE_SLAVE 6
#define NR_REG_NULL 7
#define NR_REG_ONE_SW 8

/* nr_flags */
#define NR_MONITOR_TX 0x100ULL
#define NR_MONITOR_RX 0x200ULL
#define NR_ZCOPY_MON 0x400ULL
#define NR_EXCLUSIVE 0x800ULL
#define NR_RX_RINGS_ONLY 0x2000ULL
#define NR_TX_RINGS_ONLY 0x4000ULL
#define NR_ACCEPT_VNET_HDR 0x8000ULL
#define NR_DO_RX_POLL 0x10000ULL
#define NR_NO_TX_POLL 0x20000ULL

/* request types and options */
#define NETMAP_REQ_REGISTER 1
#define NETMAP_REQ_PORT_INFO_GET 2
#define NETMAP_REQ_VALE_ATTACH 3
#define NETMAP_REQ_VALE_DETACH 4
#define NETMAP_REQ_VALE_LIST 5
#define NETMAP_REQ_PORT_HDR_SET 6
#define NETMAP_REQ_PORT_HDR_GET 7
#define NETMAP_REQ_VALE_NEWIF 8
#define NETMAP_REQ_VALE_DELIF 9
#define NETMAP_REQ_VALE_POLLING_ENABLE 10
#define NETMAP_REQ_VALE_POLLING_DISABLE 11
#define NETMAP_REQ_POOLS_INFO_GET 12
#define NETMAP_REQ_SYNC_KLOOP_START 13
#define NETMAP_REQ_SYNC_KLOOP_STOP 14
#define NETMAP_REQ_CSB_ENABLE 15
#define NETMAP_REQ_OPT_EXTMEM 1
#define NETMAP_REQ_OPT_OFFSETS 5

/* legacy ring-id bits */
#define NETMAP_HW_RING 0x4000
#define NETMAP_SW_RING 0x2000
#define NETMAP_RING_MASK 0x0fff
#define NETMAP_NO_TX_POLL 0x1000
#define NETMAP_DO_RX_POLL 0x8000

struct netmap_slot {
    uint32_t buf_idx;
    uint16_t len;
    uint16_t flags;
    uint64_t ptr;
};

struct netmap_ring {
    const int64_t buf_ofs;
    const uint32_t num_slots;
    const uint32_t nr_buf_size;
    const uint16_t ringid;
    const uint16_t dir;
    uint32_t head;
    uint32_t cur;
    uint32_t tail;
    uint32_t flags;
    struct timeval ts;
    const uint64_t offset_mask;
    const uint64_t buf_align;
    uint8_t sem[128] __attribute__((__aligned__(NM_CACHE_ALIGN)));
    struct netmap_slot slot[0];
};

struct netmap_if {
    const char ni_name[NM_IFNAMSIZ];
    const uint32_t ni_version;
    const uint32_t ni_flags;
    const uint32_t ni_tx_rings;
    const uint32_t ni_rx_rings;
    uint32_t ni_bufs_head;
    const uint32_t ni_host_tx_rings;
    const uint32_t ni_host_rx_rings;
    uint32_t ni_spare1[3];
    const int64_t ring_ofs[0];
};

struct nmreq_header {
    uint16_t nr_version;
    uint16_t nr_reqtype;
    uint32_t nr_reserved;
    char nr_name[NETMAP_REQ_IFNAMSIZ];
    uint64_t nr_options;
    uint64_t nr_body;
};

struct nmreq_register {
    uint64_t nr_offset;
    uint64_t nr_memsize;
    uint32_t nr_tx_slots;
    uint32_t nr_rx_slots;
    uint16_t nr_tx_rings;
    uint16_t nr_rx_rings;
    uint16_t nr_host_tx_rings;
    uint16_t nr_host_rx_rings;
    uint16_t nr_mem_id;
    uint16_t nr_ringid;
    uint32_t nr_mode;
    uint32_t nr_extra_bufs;
    uint64_t nr_flags;
};

struct nmreq_option {
    uint64_t nro_next;
    uint32_t nro_reqtype;
    int32_t nro_status;
    uint64_t nro_size;
};

struct nmreq_port_info_get {
    uint64_t nr_memsize;
    uint32_t nr_tx_slots;
    uint32_t nr_rx_slots;
    uint16_t nr_tx_rings;
    uint16_t nr_rx_rings;
    uint16_t nr_host_tx_rings;
    uint16_t nr_host_rx_rings;
    uint16_t nr_mem_id;
    uint16_t pad[3];
};

/* ---- the layout, checked: a mistake here fails the build ---- */
#define NMB_CHECK_OFF(t, f, o) _Static_assert(offsetof(struct t, f) == (o), #t "." #f " must be at offset " #o)
#define NMB_CHECK_SIZE(t, s) _Static_assert(sizeof(struct t) == (s), "sizeof(struct " #t ") must be " #s)

NMB_CHECK_SIZE(timeval, 16);
NMB_CHECK_SIZE(netmap_slot, 16);
NMB_CHECK_OFF(netmap_slot, buf_idx, 0);
NMB_CHECK_OFF(netmap_slot, len, 4);
NMB_CHECK_OFF(netmap_slot, flags, 6);
NMB_CHECK_OFF(netmap_slot, ptr, 8);
_Static_assert(_Alignof(struct netmap_slot) == 8, "netmap_slot aligned to 8");

NMB_CHECK_SIZE(netmap_ring, 256);
_Static_assert(_Alignof(struct netmap_ring) == 128, "netmap_ring aligned to 128");
NMB_CHECK_OFF(netmap_ring, buf_ofs, 0);
NMB_CHECK_OFF(netmap_ring, num_slots, 8);
NMB_CHECK_OFF(netmap_ring, nr_buf_size, 12);
NMB_CHECK_OFF(netmap_ring, ringid, 16);
NMB_CHECK_OFF(netmap_ring, dir, 18);
NMB_CHECK_OFF(netmap_ring, head, 20);
NMB_CHECK_OFF(netmap_ring, cur, 24);
NMB_CHECK_OFF(netmap_ring, tail, 28);
NMB_CHECK_OFF(netmap_ring, flags, 32);
NMB_CHECK_OFF(netmap_ring, ts, 40);
NMB_CHECK_OFF(netmap_ring, offset_mask, 56);
NMB_CHECK_OFF(netmap_ring, buf_align, 64);
NMB_CHECK_OFF(netmap_ring, sem, 128);
NMB_CHECK_OFF(netmap_ring, slot, 256);

NMB_CHECK_SIZE(netmap_if, 56);
NMB_CHECK_OFF(netmap_if, ni_name, 0);
NMB_CHECK_OFF(netmap_if, ni_version, 16);
NMB_CHECK_OFF(netmap_if, ni_flags, 20);
NMB_CHECK_OFF(netmap_if, ni_tx_rings, 24);
NMB_CHECK_OFF(netmap_if, ni_rx_rings, 28);
NMB_CHECK_OFF(netmap_if, ni_bufs_head, 32);
NMB_CHECK_OFF(netmap_if, ni_host_tx_rings, 36);
NMB_CHECK_OFF(netmap_if, ni_host_rx_rings, 40);
NMB_CHECK_OFF(netmap_if, ni_spare1, 44);
NMB_CHECK_OFF(netmap_if, ring_ofs, 56);

NMB_CHECK_SIZE(nmreq_header, 88);
NMB_CHECK_OFF(nmreq_header, nr_version, 0);
NMB_CHECK_OFF(nmreq_header, nr_reqtype, 2);
NMB_CHECK_OFF(nmreq_header, nr_reserved, 4);
NMB_CHECK_OFF(nmreq_header, nr_name, 8);
NMB_CHECK_OFF(nmreq_header, nr_options, 72);
NMB_CHECK_OFF(nmreq_header, nr_body, 80);

NMB_CHECK_SIZE(nmreq_register, 56);
NMB_CHECK_OFF(nmreq_register, nr_offset, 0);
NMB_CHECK_OFF(nmreq_register, nr_memsize, 8);
NMB_CHECK_OFF(nmreq_register, nr_tx_slots, 16);
NMB_CHECK_OFF(nmreq_register, nr_rx_slots, 20);
NMB_CHECK_OFF(nmreq_register, nr_tx_rings, 24);
NMB_CHECK_OFF(nmreq_register, nr_rx_rings, 26);
NMB_CHECK_OFF(nmreq_register, nr_host_tx_rings, 28);
NMB_CHECK_OFF(nmreq_register, nr_host_rx_rings, 30);
NMB_CHECK_OFF(nmreq_register, nr_mem_id, 32);
NMB_CHECK_OFF(nmreq_register, nr_ringid, 34);
NMB_CHECK_OFF(nmreq_register, nr_mode, 36);
NMB_CHECK_OFF(nmreq_register, nr_extra_bufs, 40);
NMB_CHECK_OFF(nmreq_register, nr_flags, 48);

NMB_CHECK_SIZE(nmreq_option, 24);
NMB_CHECK_OFF(nmreq_option, nro_next, 0);
NMB_CHECK_OFF(nmreq_option, nro_reqtype, 8);
NMB_CHECK_OFF(nmreq_option, nro_status, 12);
NMB_CHECK_OFF(nmreq_option, nro_size, 16);

NMB_CHECK_SIZE(nmreq_port_info_get, 32);
NMB_CHECK_OFF(nmreq_port_info_get, nr_memsize, 0);
NMB_CHECK_OFF(nmreq_port_info_get, nr_tx_slots, 8);
NMB_CHECK_OFF(nmreq_port_info_get, nr_rx_slots, 12);
NMB_CHECK_OFF(nmreq_port_info_get, nr_tx_rings, 16);
NMB_CHECK_OFF(nmreq_port_info_get, nr_rx_rings, 18);
NMB_CHECK_OFF(nmreq_port_info_get, nr_host_tx_rings, 20);
NMB_CHECK_OFF(nmreq_port_info_get, nr_host_rx_rings, 22);
NMB_CHECK_OFF(nmreq_port_info_get, nr_mem_id, 24);

_Static_assert(NIOCCTRL == ((3UL << 30) | (sizeof(struct nmreq_header) << 16) | ('i' << 8) | 151),
               "NIOCCTRL is _IOWR('i', 151, struct nmreq_header)");
_Static_assert(NIOCTXSYNC == (('i' << 8) | 148), "NIOCTXSYNC is _IO('i', 148)");
_Static_assert(NIOCRXSYNC == (('i' << 8) | 149), "NIOCRXSYNC is _IO('i', 149)");

/* ---- ring helpers (the same arithmetic as netmap_user.h, written for nmbridge) ---- */
static inline struct netmap_ring *nmb_txring(struct netmap_if *nifp, uint32_t i)
{
    return (struct netmap_ring *)((char *)nifp + nifp->ring_ofs[i]);
}

static inline struct netmap_ring *nmb_rxring(struct netmap_if *nifp, uint32_t i)
{
    return (struct netmap_ring *)((char *)nifp +
                                  nifp->ring_ofs[i + nifp->ni_tx_rings + nifp->ni_host_tx_rings]);
}

static inline char *nmb_buf(struct netmap_ring *ring, uint32_t buf_idx)
{
    return (char *)ring + ring->buf_ofs + (size_t)buf_idx * ring->nr_buf_size;
}

static inline uint32_t nmb_ring_next(const struct netmap_ring *ring, uint32_t i)
{
    return (i + 1 == ring->num_slots) ? 0 : i + 1;
}

/* Slots the user owns: [head, tail). */
static inline uint32_t nmb_ring_space(const struct netmap_ring *ring)
{
    int64_t n = (int64_t)ring->tail - (int64_t)ring->head;
    if (n < 0)
        n += ring->num_slots;
    return (uint32_t)n;
}

static inline int nmb_ring_empty(const struct netmap_ring *ring)
{
    return ring->head == ring->tail;
}

/* Aliases under netmap's own spelling, for code read side by side with netmap_user.h. */
#define NETMAP_TXRING(nifp, i) nmb_txring((nifp), (i))
#define NETMAP_RXRING(nifp, i) nmb_rxring((nifp), (i))
#define NETMAP_BUF(ring, idx) nmb_buf((ring), (idx))
#define nm_ring_next(r, i) nmb_ring_next((r), (i))
#define nm_ring_space(r) nmb_ring_space((r))
#define nm_ring_empty(r) nmb_ring_empty((r))

#endif /* NMB_NETMAP_H */
