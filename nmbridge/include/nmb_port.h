/*
 * nmb_port.h -- the one shape every backend has.
 *
 * A port exposes netmap-format memory (a netmap_if and its rings) plus two sync operations
 * and an fd to poll.  fastfwd sees nothing else, so one loop serves the kernel's netmap,
 * user-memory rings played by AF_PACKET, and the mem: test/benchmark ports.
 */
#ifndef NMB_PORT_H
#define NMB_PORT_H

#include <stdint.h>
#include "nmb_netmap.h"

#define NMB_PORT_ERRLEN 256

struct nmb_port;
typedef int (*nmb_sync_fn)(struct nmb_port *port);

struct nmb_port {
    struct netmap_if *nifp;
    /* rings this port forwards: TX rings [tx_first, tx_last), RX rings [rx_first, rx_last),
     * as indices for nmb_txring()/nmb_rxring() */
    uint32_t tx_first, tx_last;
    uint32_t rx_first, rx_last;
    /* fd to poll(): POLLIN when RX has (or will have after rxsync) frames, POLLOUT when TX
     * has room; -1 if the port never needs waiting for */
    int fd;
    /* 1 when poll() on fd also syncs the rings (the kernel's netmap); 0 when fastfwd must
     * call rxsync/txsync after poll() returns (user-memory backends) */
    int poll_syncs;
    /* ports with the same mem_key share one buffer pool: forwarding between them swaps
     * buf_idx (zero-copy); otherwise the bytes are copied */
    uint64_t mem_key;
    /* hand released RX slots to the "NIC" and take new frames; 0 or -errno */
    nmb_sync_fn rxsync;
    /* hand new TX slots to the "NIC" and reclaim completed ones; 0 or -errno */
    nmb_sync_fn txsync;
    /* what this port's transmit side understands (NMB_OFFLOAD_*), and what the port this
     * one's received frames are forwarded to understands (set by fastfwd for each direction
     * it sets up; 0 -- nothing -- until then) */
    uint32_t offloads, peer_offloads;
    /* microseconds the forwarding loop keeps polling this port's rings before it sleeps in
     * poll() (busy polling, an operator's choice: a core for less wake-up latency); 0: none */
    uint32_t spin_us;
    /* backend state */
    void *priv;
    /* set by a failing sync: what went wrong, in words */
    char error[NMB_PORT_ERRLEN];
};

/* Offload metadata.  A kernel stack hands a bridge frames whose work it left to "the
 * device": GSO super-frames (a veth peer's TSO/GSO) and CHECKSUM_PARTIAL frames.  A port that
 * receives such a frame may record the request in the frame's first slot's `ptr` (unused in
 * user-memory rings); fastfwd copies `ptr` along with `len`, and a port whose `offloads` has
 * NMB_OFFLOAD_META passes it to its kernel on transmit, which then segments or checksums.
 * A port that transmits clears `ptr` of the slots it took.  Packing (8 bytes, the fields of
 * a virtio_net_hdr): bits 0-7 flags (VIRTIO_NET_HDR_F_* | NMB_META_VALID), 8-15 gso_type
 * (VIRTIO_NET_HDR_GSO_*), 16-31 gso_size, 32-47 csum_start, 48-63 csum_offset. */
#define NMB_OFFLOAD_META 1u
#define NMB_META_VALID 0x80u

static inline uint64_t nmb_meta_pack(uint8_t flags, uint8_t gso_type, uint16_t gso_size, uint16_t csum_start,
                                     uint16_t csum_offset)
{
    return (uint64_t)(flags | NMB_META_VALID) | (uint64_t)gso_type << 8 | (uint64_t)gso_size << 16 |
           (uint64_t)csum_start << 32 | (uint64_t)csum_offset << 48;
}
#define NMB_META_FLAGS(m) ((uint8_t)((m) & 0x7f))
#define NMB_META_GSO_TYPE(m) ((uint8_t)((m) >> 8))
#define NMB_META_GSO_SIZE(m) ((uint16_t)((m) >> 16))
#define NMB_META_CSUM_START(m) ((uint16_t)((m) >> 32))
#define NMB_META_CSUM_OFFSET(m) ((uint16_t)((m) >> 48))

#endif /* NMB_PORT_H */
