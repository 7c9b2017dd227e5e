/*
 * nmb_afpacket.h -- afpacket: ports: netmap-format rings in user memory whose "NIC" is an
 * AF_PACKET socket bound to a Linux interface, driven by nmbridge at sync time.
 *
 * RX (default, rx_ring): a TPACKET_V2 mmap ring (one frame per ring frame, handed over -- and
 * poll() woken -- as soon as the kernel wrote it).  rxsync copies ready frames into the free
 * RX slots' buffers, puts back the outer VLAN tag the kernel moved into metadata, and returns
 * each ring frame to the kernel.  A frame larger than a ring frame is also queued whole on
 * the socket (PACKET_COPY_THRESH, TP_STATUS_COPY) and read from there with recvmsg(), in ring
 * order.  RX (rx_ring = 0): recvmmsg() of every frame straight into the free slots' buffers.
 * Both: a frame larger than one buffer becomes an NS_MOREFRAG chain (waiting for enough free
 * slots); one longer than NETMAP_MAX_FRAGS buffers or than the ring can ever hold is counted
 * and dropped (rx_oversize), and one that could not be received whole is counted and dropped
 * (rx_truncated).  With vnet (PACKET_VNET_HDR, default) a frame's GSO/checksum request goes
 * to the first slot's ptr when the peer port takes it (nmb_port.h), else its checksum is
 * finished here and a GSO super-frame is counted and dropped (rx_gso_dropped).
 * TX (default, tx_ring): a PACKET_TX_RING of TPACKET_V2 frames (MTU + 18 bytes each, 2048 at
 * least) after the RX frames in the same mapping: txsync copies each frame of [hwcur, head) (a
 * chain gathered into one ring frame) and kicks the kernel once with send(fd, NULL, 0,
 * MSG_DONTWAIT).  With vnet (PACKET_VNET_HDR, default) each frame has a virtio_net_hdr (the
 * frame's offload request, if any) whose hdr_len covers the whole frame, so the kernel copies it into the skb's head instead of
 * attaching the ring page as a fragment (which veth copies again into a fresh page: measured
 * ~25% more CPU per frame).  PACKET_LOSS is on, so the kernel skips a frame it refuses
 * silently: frames over its limit (MTU + 14, + 4 with an 802.1Q tag) are counted as tx_mtu
 * and dropped before the ring.  A ring frame counts in tx_frames once the kernel has taken
 * it; ENOBUFS while the interface has no carrier is a link down (see below).  When every
 * ring frame is in flight the rest waits (tx_again).
 * TX (tx_ring = 0): sendmmsg() of the slots in [hwcur, head), one message per frame (chains
 * gathered with iovecs), one system call per batch of up to NMB_AFP_TX_BATCH frames.
 * GSO super-frames (either path) go alone, in order, through a second socket without
 * PACKET_QDISC_BYPASS (whose direct path drops the frames the kernel must segment).
 * Both: PACKET_QDISC_BYPASS on; link down (ENETDOWN, ENXIO, ENODEV; or ENOBUFS
 * with no carrier, as when the far end of a veth is down) drops and counts (frames already
 * requested in the ring are cancelled, never sent later), and so does every frame after it
 * until the interface is up and running again; EAGAIN/ENOBUFS keeps the
 * frames for the next txsync.  The socket ignores its own outgoing frames (PACKET_IGNORE_OUTGOING) and, by
 * default, puts the interface in promiscuous mode for as long as it is open
 * (PACKET_MR_PROMISC: per socket, the kernel undoes it on close).
 * Shares (fanout >= 0): several ports on one interface, each one socket with its own rings,
 * TX path (and GSO socket) and counters (PACKET_STATISTICS is per socket, so each share's
 * numbers balance alone), joined to one PACKET_FANOUT group that hands each received frame
 * to exactly one of them.  The group's id comes from the kernel (PACKET_FANOUT_FLAG_UNIQUEID
 * for the first share: an id no group of the network namespace has, so neither another
 * bridge nor a previous run's lingering socket can share it); the group ignores outgoing
 * frames (PACKET_FANOUT_FLAG_IGNORE_OUTGOING, Linux >= 6.2: a socket's own
 * PACKET_IGNORE_OUTGOING does not apply once it is in a group; older kernels: each share
 * gets a socket filter that drops PACKET_OUTGOING frames instead).  A share is opened "held": a filter that accepts nothing is
 * attached before bind(), so a socket bound but not yet in the group never receives the
 * frames the group also hands out (duplicates); nmb_afpacket_fanout_start() removes it once
 * every share has joined.
 */
#ifndef NMB_AFPACKET_H
#define NMB_AFPACKET_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_port.h"
#include "nmb_umem.h"

#define NMB_AFP_TX_BATCH 512
#define NMB_AFP_RX_BATCH 64 /* frames per recvmmsg() */

struct nmb_afpacket_opts {
    uint32_t slots;            /* slots of the one TX and the one RX ring */
    int rx_ring;               /* 1: a TPACKET_V2 receive ring; 0: recvmmsg() into the slots */
    uint32_t rx_frames;        /* frames of that ring; 0 = as many as fit in rx_ring_bytes */
    int rcvbuf;                /* SO_RCVBUF(FORCE) in bytes (the receive queue: every frame with
                                  rx_ring = 0, else copies of frames larger than a ring frame);
                                  0 = the system default */
    int promisc;               /* PACKET_MR_PROMISC while open */
    int qdisc_bypass;          /* PACKET_QDISC_BYPASS */
    int sndbuf;                /* SO_SNDBUF(FORCE) in bytes; 0 = the system default */
    int tx_ring;               /* 1: PACKET_TX_RING + one send() kick per txsync; 0: sendmmsg */
    uint32_t tx_frames;        /* frames of the TX ring; 0 = slots, within 4 MiB (at least 64) */
    uint32_t busy_poll_us;     /* the forwarding loop polls the rings this long before sleeping */
    int vnet;                  /* PACKET_VNET_HDR: offload requests (GSO, checksum) carried from
                                  receive to transmit; TX ring frames go into the skb's head */
    uint32_t rx_ring_bytes;    /* the default size of the RX ring (rx_frames = 0); 0 = 8 MiB */
    int fanout;                /* -1: a socket of its own; else PACKET_FANOUT_HASH, _LB, _CPU or
                                  _QM: the socket is one share of a fanout group (below) */
    int fanout_group;          /* -1: a new group (the kernel picks an id no group of the
                                  namespace has); else the id of the group to join */
    int fanout_legacy;         /* tests: a group without PACKET_FANOUT_FLAG_IGNORE_OUTGOING,
                                  as Linux < 6.2 makes them */
};

struct nmb_afpacket_stats {
    uint64_t rx_frames, rx_bytes;   /* delivered into the RX ring (bytes with the VLAN tag) */
    uint64_t rx_kernel_drops;       /* dropped: the kernel's RX ring was full (tp_drops) */
    uint64_t rx_truncated;          /* dropped: the block could not hold the whole frame */
    uint64_t rx_oversize;           /* dropped: more buffers than a chain may have */
    uint64_t rx_vlan_restored;      /* frames whose VLAN tag was put back */
    uint64_t rx_csum_fixed;         /* CHECKSUM_PARTIAL frames whose L4 checksum we finished */
    uint64_t rx_csum_passed;        /* CHECKSUM_PARTIAL frames passed on with their request */
    uint64_t rx_gso;                /* GSO super-frames received and passed on with their metadata */
    uint64_t rx_gso_dropped;        /* dropped: a GSO super-frame whose egress port cannot take
                                       offload metadata (not an afpacket: port with vnet) */
    uint64_t tx_gso;                /* GSO super-frames handed to the kernel to segment */
    uint64_t tx_frames, tx_bytes;   /* handed to the kernel: it took them (TX ring: the frame
                                     * left TP_STATUS_SEND_REQUEST; sendmmsg/sendmsg: the call sent it) */
    uint64_t tx_errors;             /* dropped: the kernel refused the frame (not for its size) */
    uint64_t tx_link_down;          /* dropped: the link was down, without a carrier, or gone */
    uint64_t tx_again;              /* EAGAIN/ENOBUFS or TX ring full: frames kept for later */
    uint64_t link_errors;           /* socket errors reported by the kernel (link down events) */
    uint64_t rxsyncs, txsyncs, tx_calls; /* tx_calls: sendmmsg() or ring kicks */
    uint64_t rx_calls;              /* recvmmsg() calls (rx_ring = 0) */
    uint64_t tx_mtu;                /* dropped: larger than the egress interface's MTU allows */
};

/* Open a port on interface `ifname` in region `m` (the calling thread's network namespace).
 * NULL with a one-line reason in err (without the "afpacket:IFNAME: " prefix). */
struct nmb_port *nmb_afpacket_open(nmb_umem *m, const char *ifname, const struct nmb_afpacket_opts *o,
                                   char *err, size_t errlen);
void nmb_afpacket_close(struct nmb_port *p);
/* Counters; safe from another thread while the port forwards (reads the kernel's drop
 * counter, which it accumulates, under a lock of its own). */
void nmb_afpacket_get_stats(struct nmb_port *p, struct nmb_afpacket_stats *out);
/* The live counters (written only by the thread that syncs the port; rx_kernel_drops is not
 * kept there: see nmb_afpacket_get_stats) and their size, for fastfwd's copy at a batch
 * boundary. */
const void *nmb_afpacket_counters(struct nmb_port *p, size_t *len);
int nmb_afpacket_ifindex(struct nmb_port *p);
/* The kernel's prologue checks on both rings (for tests). 0 or -1 with p->error set. */
int nmb_afpacket_check(struct nmb_port *p);
/* The bytes of the kernel's RX and TX rings mapped for the port (0: none). */
void nmb_afpacket_ring_bytes(struct nmb_port *p, size_t *rx, size_t *tx);
/* The fanout group of a share (-1: none). */
int nmb_afpacket_fanout_group(struct nmb_port *p);
/* Let frames in on a held share (detach the filter that accepts nothing).  0 or -1 with
 * p->error set. */
int nmb_afpacket_fanout_start(struct nmb_port *p);

#endif /* NMB_AFPACKET_H */
