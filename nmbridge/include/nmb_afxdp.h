/*
 * nmb_afxdp.h -- afxdp: ports: netmap-format rings in user memory whose "NIC" is a set of
 * AF_XDP sockets (one per receive queue of a Linux interface), driven at sync time.
 *
 * Memory: the region's buffer pool is the UMEM.  umem.c starts the pool NMB_UMEM_BUF_LEAD
 * (256) bytes into a page, and the UMEM is registered from that page on, in chunks of the
 * region's buffer size (aligned mode; 2048 or 4096).  The kernel puts a received frame 256
 * bytes (XDP_PACKET_HEADROOM) into its chunk, which is exactly the start of a netmap buffer:
 * buffer b <-> UMEM chunk b, frame data at UMEM offset b * buf_size + 256.  A frame is at most
 * buf_size - 256 bytes (1792 with 2048-byte buffers); no multi-buffer (XDP_USE_SG): an MTU
 * that does not fit is refused at open.  All afxdp: ports of a region share one UMEM per
 * binding kind (zero-copy or copy; the kernel makes a shared socket inherit the first one's)
 * through XDP_SHARED_UMEM; each socket has its own fill and completion rings.
 *
 * Ownership, exactly netmap's: RX slots the "NIC" owns ([tail, head - 1) of an RX ring) hold
 * the buffers the kernel holds (fill ring, in flight, or in the XSK RX ring); rxsync posts the
 * buffers of slots entering that part to the fill ring and moves XSK RX descriptors into the
 * slots at tail (a buffer the kernel hands back out of order is swapped with the slot that
 * held it).  TX slots in [hwcur, head) go to the XSK TX ring; a slot comes back to the user
 * (tail advances over it) once the completion ring has returned its buffer, in ring order.
 *
 * XDP program: our own, five instructions loaded with bpf(): redirect to an XSKMAP by
 * rx_queue_index (XDP_PASS when a queue has no socket), attached through a BPF link
 * (BPF_LINK_CREATE): it goes away with the link's last fd, so a killed bridge never leaves the
 * interface black-holing traffic.  Modes: "zc" (driver XDP + XDP_ZEROCOPY), "native" (driver
 * XDP + XDP_COPY), "skb" (generic XDP + XDP_COPY); "auto" tries them in that order.
 *
 * Kicks: with XDP_USE_NEED_WAKEUP, sendto() only when the TX ring asks (copy mode always does:
 * each call sends a budget of 32 frames, so txsync loops while the kernel makes progress) and
 * recvfrom() when the fill ring asks.  EBUSY from sendto() is one frame the device dropped
 * (tx_dev_drops); ENETDOWN stops posting until the link is up again (tx_link_down).  The fd
 * to poll is the socket (one queue) or an epoll fd over the sockets (several; EPOLLOUT is
 * watched only while a TX ring is full).  rxsync completes TCP/UDP checksums a local stack
 * left partial (AF_XDP does not carry CHECKSUM_PARTIAL): a frame whose checksum field equals
 * its pseudo-header sum gets the full sum (idempotent for a frame that was already right).
 */
#ifndef NMB_AFXDP_H
#define NMB_AFXDP_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_port.h"
#include "nmb_umem.h"

#define NMB_AFXDP_MODE_AUTO 0
#define NMB_AFXDP_MODE_ZC 1
#define NMB_AFXDP_MODE_NATIVE 2
#define NMB_AFXDP_MODE_SKB 3

#define NMB_AFXDP_MAX_QUEUES 64

struct nmb_afxdp_opts {
    uint32_t slots;   /* slots of each netmap ring (XSK rings: the next power of two) */
    int mode;         /* NMB_AFXDP_MODE_* */
    uint32_t queues;  /* receive queues to bind; 0 = all the interface has */
    int promisc;      /* hold the interface in promiscuous mode while open */
    int need_wakeup;  /* XDP_USE_NEED_WAKEUP (default 1) */
    int csum_fix;     /* finish TCP/UDP checksums a local stack left partial (default 1) */
    uint32_t busy_poll_us; /* >0: preferred busy polling (SO_PREFER_BUSY_POLL, SO_BUSY_POLL = this,
                            * SO_BUSY_POLL_BUDGET): every rxsync runs the queue's NAPI in the
                            * calling thread, and the loop spins this long before it sleeps */
    uint32_t busy_budget;  /* SO_BUSY_POLL_BUDGET (frames per busy poll; 0: the kernel's 8) */
    uint32_t rx_coalesce_us; /* >0: while frames stream in, a sync that finds 1-31 waiting sleeps
                              * this long first (see afxdp.c: rx_coalesce) */
};

struct nmb_afxdp_stats {
    uint64_t rx_frames, rx_bytes;   /* moved from XSK RX rings into netmap RX slots */
    uint64_t rx_kernel_drops;       /* dropped: XDP_STATISTICS rx_dropped less the fill-empty ones (frame > chunk) */
    uint64_t rx_ring_full;          /* dropped: XDP_STATISTICS rx_ring_full (XSK RX ring full) */
    uint64_t rx_fill_empty;         /* dropped: XDP_STATISTICS rx_fill_ring_empty_descs (no free buffer) */
    uint64_t rx_bad_desc;           /* dropped: an RX descriptor naming a buffer we did not post */
    uint64_t rx_csum_fixed;         /* frames whose partial TCP/UDP checksum we finished */
    uint64_t tx_frames, tx_bytes;   /* posted to XSK TX rings */
    uint64_t tx_errors;             /* dropped: too long for a chunk, shorter than 14 bytes, or a chain */
    uint64_t tx_link_down;          /* dropped: the link was down (sendto said ENETDOWN) */
    uint64_t tx_dev_drops;          /* dropped: the device refused a posted frame (sendto EBUSY) */
    uint64_t tx_invalid;            /* dropped: XDP_STATISTICS tx_invalid_descs */
    uint64_t tx_again;              /* kicks that left frames in the TX ring for later */
    uint64_t rxsyncs, txsyncs, tx_kicks, fill_kicks, completions;
    uint64_t link_errors;           /* socket errors reported by the kernel */
    uint64_t busy_polls;            /* recvfrom() calls that ran the RX NAPI here (busy_poll) */
    uint64_t rx_coalesced;          /* syncs that slept rx_coalesce_us for more frames */
    uint64_t tx_mtu;                /* dropped: larger than the egress MTU allows */
};

/* Open a port on `ifname` in region `m` (the calling thread's network namespace). NULL with
 * a one-line reason in err (without the "afxdp:IFNAME: " prefix). */
struct nmb_port *nmb_afxdp_open(nmb_umem *m, const char *ifname, const struct nmb_afxdp_opts *o,
                                char *err, size_t errlen);
/* The same interface as `shares` ports (1 <= shares <= its queues): share w binds queues w,
 * w + shares, w + 2 * shares, ... (its ring pairs 0, 1, ... in that order), all in one UMEM,
 * with one XDP program for the interface, which goes when the last share closes.  Each share
 * has its own counters and fd and is synced by one thread.  0, or -1 with a reason in err
 * (nothing is left open). */
int nmb_afxdp_open_shares(nmb_umem *m, const char *ifname, const struct nmb_afxdp_opts *o, uint32_t shares,
                          struct nmb_port **out, char *err, size_t errlen);
/* The interface's receive queues (ETHTOOL_GCHANNELS rx + combined; 1 when the driver does not
 * say), in the calling thread's network namespace. */
int nmb_afxdp_count_queues(const char *ifname);
/* The interface queue that ring pair `ring` of the port plays (UINT32_MAX if none). */
uint32_t nmb_afxdp_queue_id(struct nmb_port *p, uint32_t ring);
void nmb_afxdp_close(struct nmb_port *p);
void nmb_afxdp_get_stats(struct nmb_port *p, struct nmb_afxdp_stats *out);
/* The live counter struct (written only by the thread that syncs the port), for fastfwd to
 * copy at a batch boundary; the kernel-kept ones (XDP_STATISTICS) are not in it. */
const void *nmb_afxdp_counters(struct nmb_port *p, size_t *len);
int nmb_afxdp_ifindex(struct nmb_port *p);
/* NMB_AFXDP_MODE_ZC/NATIVE/SKB in use; why it is not the first choice ("" if it is) */
int nmb_afxdp_mode(struct nmb_port *p);
const char *nmb_afxdp_mode_reason(struct nmb_port *p);
uint32_t nmb_afxdp_queues(struct nmb_port *p);
/* sockets of the port bound with XDP_SHARED_UMEM (the others registered a UMEM themselves) */
uint32_t nmb_afxdp_shared_sockets(struct nmb_port *p);
int nmb_afxdp_check(struct nmb_port *p);

/* Tests: a port whose "kernel" is a fake over rings in plain memory, the same sync code (see
 * afxdp.c for what each call does). */
struct nmb_port *nmb_afxdp_open_fake(nmb_umem *m, const char *name, uint32_t slots, char *err, size_t errlen);
uint32_t nmb_afxdp_fake_kernel(struct nmb_port *p, uint32_t rx, uint32_t tx, uint32_t len, uint32_t perm,
                               uint8_t *seen, uint32_t seen_len);
uint32_t nmb_afxdp_fake_held(struct nmb_port *p, int tx_side, uint32_t *out, uint32_t max);

#endif /* NMB_AFXDP_H */
