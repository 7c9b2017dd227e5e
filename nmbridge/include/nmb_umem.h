/*
 * nmb_umem.h -- netmap-format memory in user space.
 *
 * One region laid out as the kernel lays out a netmap memory region: netmap_if objects with
 * ring offsets, rings with buf_ofs, slots, and one buffer pool shared by every port in the
 * region.  Pointer arithmetic written for the kernel's layout (nmb_txring, nmb_buf, ...)
 * works unchanged.  Backends that play the NIC's part themselves (mem:, afpacket:) keep the
 * kernel's per-ring state in nmb_kring and use the prologue checks below.
 */
#ifndef NMB_UMEM_H
#define NMB_UMEM_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_netmap.h"

#define NMB_UMEM_MAX_IFS 256
/* The buffer pool starts this many bytes into a page: AF_XDP (afxdp:) writes a received frame
 * XDP_PACKET_HEADROOM (256) bytes into a UMEM chunk, so with the UMEM registered from the
 * page before buffer 0, chunk b's frame lands exactly at buffer b. */
#define NMB_UMEM_BUF_LEAD 256

typedef struct nmb_umem nmb_umem;

/* The kernel's view of one ring (netmap's kring): what it has handed out and taken back. */
struct nmb_kring {
    uint32_t hwcur;  /* first slot not yet seen by the "kernel" */
    uint32_t hwtail; /* TX: first slot the user may not fill; RX: first slot the NIC fills next */
};

/* Create a region with room for `obj_bytes` of netmap_if + ring objects and `nbufs`
 * buffers (indices 0 and 1 are reserved, as in the kernel) of `buf_size` bytes.
 * Returns NULL with errno set. */
nmb_umem *nmb_umem_create(size_t obj_bytes, uint32_t nbufs, uint32_t buf_size);
void nmb_umem_destroy(nmb_umem *m);

/* Bytes of object space one interface with these rings needs. */
size_t nmb_umem_if_bytes(uint32_t ntx, uint32_t nrx, uint32_t tx_slots, uint32_t rx_slots);

/* Lay out a netmap_if with its rings; every slot gets a buffer from the pool.
 * TX rings start as the kernel's: head = cur = 0, tail = num_slots - 1; RX rings empty. */
struct netmap_if *nmb_umem_if_create(nmb_umem *m, const char *name, uint32_t ntx, uint32_t nrx,
                                     uint32_t tx_slots, uint32_t rx_slots);
/* Give the interface's buffers back to the pool and free its objects. */
void nmb_umem_if_destroy(nmb_umem *m, struct netmap_if *nifp);

uint32_t nmb_umem_nbufs(const nmb_umem *m);
uint32_t nmb_umem_buf_size(const nmb_umem *m);
uint32_t nmb_umem_free_bufs(const nmb_umem *m);
size_t nmb_umem_size(const nmb_umem *m);
const char *nmb_umem_base(const nmb_umem *m);
/* Buffer 0 (NMB_UMEM_BUF_LEAD bytes after a page boundary). */
char *nmb_umem_bufs(const nmb_umem *m);

/* Kernel prologue checks (as nm_txsync_prologue / nm_rxsync_prologue): head and cur of
 * the ring lie in the user's part, [hwcur, hwtail] cyclically, and cur is not behind head.
 * Returns 0 or -1 with a message in err. */
int nmb_kring_check(const struct netmap_ring *ring, const struct nmb_kring *kr,
                    const char *what, char *err, size_t errlen);

/* Every buffer index of every live ring in the region is in range and appears exactly once,
 * and ring slots + free pool account for every buffer.  0 or -1 with a message. */
int nmb_umem_check(nmb_umem *m, char *err, size_t errlen);

#endif /* NMB_UMEM_H */
