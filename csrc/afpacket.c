/* afpacket.c -- the afpacket: backend (see nmb_afpacket.h). */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <linux/if_ether.h>
#include <linux/if_packet.h>
#include <linux/virtio_net.h>
#include <endian.h>
#include <net/if.h>
#include <pthread.h>
#include <linux/filter.h>
#include <sys/ioctl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

#include "nmb_afpacket.h"

#ifndef PACKET_IGNORE_OUTGOING
#define PACKET_IGNORE_OUTGOING 23
#endif
#ifndef PACKET_FANOUT_FLAG_UNIQUEID
#define PACKET_FANOUT_FLAG_UNIQUEID 0x2000
#endif
#ifndef PACKET_FANOUT_FLAG_IGNORE_OUTGOING
#define PACKET_FANOUT_FLAG_IGNORE_OUTGOING 0x4000
#endif

#define VNET_LEN ((uint32_t)sizeof(struct virtio_net_hdr))
/* recv: bytes past a message's first slot that one receive call can take (a GSO super-frame
 * of up to 64 KiB, a jumbo frame); a frame longer still is counted as truncated */
#define RX_BOUNCE (65536u + 256u)
#define RX_CTL 64u /* control bytes per message: one PACKET_AUXDATA */

struct afport {
    struct nmb_port port;
    nmb_umem *mem;
    int ifindex;
    struct nmb_kring tx_kr, rx_kr;
    int vnet;                         /* PACKET_VNET_HDR on the socket: both directions */
    /* RX through recvmmsg (rx_ring = 0): each message takes a virtio_net_hdr, the frame's
     * first bytes straight into a free slot's buffer, the rest (if any) into a bounce
     * buffer of its own; frames that do not fit the ring yet wait there (pending) */
    struct mmsghdr *rmsgs;
    struct iovec *riov;               /* 3 per message */
    struct virtio_net_hdr *rvh;       /* 1 per message */
    char *rctl;                       /* RX_CTL per message */
    char *bounce;                     /* rx_bstride per message: bs bytes, then RX_BOUNCE */
    size_t bounce_len, rx_bstride;
    uint32_t rx_batch;
    uint32_t *rtmp, *rfree;           /* slot buffers while frames are laid out */
    struct rxmsg {
        char *data;                   /* the whole frame, when it is in the bounce buffer */
        uint32_t len, nslots;
        uint64_t meta;
        int state;                    /* RX_DROP, RX_SINGLE (in its first buffer), RX_BOUNCED */
    } *rm;
    uint32_t pend, npend;             /* messages [pend, pend + npend) wait for ring room */
    /* RX: the TPACKET_V2 ring (rx_ring = 1) */
    char *map;
    size_t map_len;
    uint32_t rx_frame_size, rx_frame_count;
    uint32_t rx_pos;                  /* next ring frame to take from the kernel */
    /* TX through PACKET_TX_RING (TPACKET_V2 frames after the RX frames in one mapping) */
    char *txmap;                      /* NULL: sendmmsg only */
    uint32_t tx_frame_size, tx_frame_count;
    uint32_t tx_pos;                  /* next ring frame we fill */
    uint32_t tx_ring_max;             /* largest untagged frame the ring takes */
    uint32_t tx_vnet;                 /* bytes of virtio_net_hdr before each TX frame (or 0) */
    uint32_t niov;                    /* entries of iov */
    int gso_fd;                       /* a socket without PACKET_QDISC_BYPASS for GSO frames, or -1 */
    int tx_down;                      /* the link is down or has no carrier: TX drops */
    uint32_t tx_req;                  /* ring frames requested that the kernel has not taken */
    uint32_t tx_kpos;                 /* the oldest of them (the kernel sends in ring order) */
    int tx_kick;                      /* frames may wait in the ring for a kick */
    int mtu;
    uint64_t mtu_read_ns;             /* when the MTU (and the carrier) was last read: coarse clock */
    uint32_t idle_rx;                 /* idle rxsyncs since the socket error was read */
    /* TX through sendmmsg */
    struct mmsghdr *msgs;
    struct iovec *iov;
    struct virtio_net_hdr *tvh;       /* one per message (vnet) */
    uint32_t *msg_slots, *msg_len;
    struct nmb_afpacket_stats st;
    pthread_mutex_t stats_lock;       /* kernel drop counter: read-and-clear, so one reader */
    uint64_t kernel_drops;
    int fanout_group;                 /* the PACKET_FANOUT group of a share, or -1 */
    int held;                         /* a share's filter that accepts nothing is attached */
    int outgoing_bpf;                 /* its group sees outgoing frames: a filter drops them */
};

static int fail(struct afport *ap, int rc, const char *msg)
{
    snprintf(ap->port.error, NMB_PORT_ERRLEN, "afpacket:%s: %s", ap->port.nifp->ni_name, msg);
    return rc;
}

/* ---------------------------------------------------------------------------------------
 * RX */

/* Frames the kernel's stack built (veth peers, local senders) may carry CHECKSUM_PARTIAL: the
 * L4 checksum field only holds the pseudo-header sum and the device was to finish it.  A
 * frame we send on does not keep that metadata, so finish the checksum here (TCP and UDP over
 * IPv4 and IPv6 without extension headers).  Returns 1 when it wrote a checksum. */
static uint64_t sum16(uint64_t sum, const uint8_t *p, uint32_t len)
{
    while (len > 1) {
        sum += (uint32_t)(p[0] << 8 | p[1]);
        p += 2;
        len -= 2;
    }
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static int finish_l4_csum(uint8_t *f, uint32_t len)
{
    uint32_t off = 12;
    uint16_t et;
    uint64_t sum = 0;
    uint32_t l4, l4len, proto;
    if (len < 14)
        return 0;
    et = (uint16_t)(f[12] << 8 | f[13]);
    while ((et == ETH_P_8021Q || et == ETH_P_8021AD) && off + 6 <= len) { /* inner tags */
        off += 4;
        et = (uint16_t)(f[off] << 8 | f[off + 1]);
    }
    off += 2;
    uint8_t *ip = f + off;
    if (et == ETH_P_IP && off + 20 <= len) {
        uint32_t ihl = (ip[0] & 15u) * 4, tot = (uint32_t)(ip[2] << 8 | ip[3]);
        if (ihl < 20 || tot < ihl || off + tot > len)
            return 0;
        proto = ip[9];
        l4 = off + ihl;
        l4len = tot - ihl;
        sum = sum16(sum, ip + 12, 8);
    } else if (et == ETH_P_IPV6 && off + 40 <= len) {
        l4len = (uint32_t)(ip[4] << 8 | ip[5]);
        proto = ip[6];
        l4 = off + 40;
        if (l4 + l4len > len)
            return 0;
        sum = sum16(sum, ip + 8, 32);
    } else {
        return 0;
    }
    uint32_t csum_at;
    if (proto == IPPROTO_TCP && l4len >= 20)
        csum_at = l4 + 16;
    else if (proto == IPPROTO_UDP && l4len >= 8)
        csum_at = l4 + 6;
    else
        return 0;
    sum += proto + l4len;
    f[csum_at] = f[csum_at + 1] = 0;
    sum = sum16(sum, f + l4, l4len);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    if (c == 0 && proto == IPPROTO_UDP)
        c = 0xffff;
    f[csum_at] = (uint8_t)(c >> 8);
    f[csum_at + 1] = (uint8_t)c;
    return 1;
}

/* Finish a CHECKSUM_PARTIAL frame as a device would: the ones' complement sum from `start`
 * to the end (the field at start + off holds the pseudo-header's sum) goes, complemented,
 * into that field (0 becomes 0xffff, as the kernel's skb_checksum_help writes it). */
static int finish_csum_at(uint8_t *f, uint32_t len, uint32_t start, uint32_t off)
{
    if (start >= len || off + 2 > len - start)
        return 0;
    uint64_t sum = sum16(0, f + start, len - start);
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    uint16_t c = (uint16_t)~sum;
    if (c == 0)
        c = 0xffff;
    f[start + off] = (uint8_t)(c >> 8);
    f[start + off + 1] = (uint8_t)c;
    return 1;
}

/* A frame's offload request, from the virtio_net_hdr the kernel wrote before it (`shift`: 4
 * when the VLAN tag was put back in front of the offsets, in the metadata; `fshift`: the same
 * for frame `f` of `len` bytes, whose checksum may be finished here).  A peer that takes metadata gets
 * it (returned, for the first slot's ptr); otherwise the checksum is finished here, and a GSO
 * super-frame -- which only a kernel can cut into wire-sized frames -- is dropped (*drop). */
static uint64_t rx_offload(struct afport *ap, const struct virtio_net_hdr *vh, uint8_t *f, uint32_t len,
                           uint32_t shift, uint32_t fshift, int *drop)
{
    uint8_t flags = vh->flags, gso = vh->gso_type;
    if (!(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM) && gso == VIRTIO_NET_HDR_GSO_NONE)
        return 0;
    uint32_t cs = le16toh(vh->csum_start) + shift, co = le16toh(vh->csum_offset);
    if (ap->port.peer_offloads & NMB_OFFLOAD_META) {
        if (gso != VIRTIO_NET_HDR_GSO_NONE)
            ap->st.rx_gso++;
        else
            ap->st.rx_csum_passed++;
        return nmb_meta_pack(flags & VIRTIO_NET_HDR_F_NEEDS_CSUM, gso, le16toh(vh->gso_size), (uint16_t)cs,
                             (uint16_t)co);
    }
    if (gso != VIRTIO_NET_HDR_GSO_NONE) {
        ap->st.rx_gso_dropped++;
        *drop = 1;
        return 0;
    }
    if (finish_csum_at(f, len, cs - shift + fshift, co))
        ap->st.rx_csum_fixed++;
    return 0;
}

struct seg {
    const char *p;
    uint32_t len;
};

/* Copy the segments into RX slots from *hwtail on: one slot, or an NS_MOREFRAG chain. */
static void fill_slots(struct netmap_ring *ring, uint32_t *hwtail, const struct seg *sg, int nsg)
{
    uint32_t bs = ring->nr_buf_size, t = *hwtail, used = 0;
    struct netmap_slot *slot = &ring->slot[t];
    char *dst = nmb_buf(ring, slot->buf_idx);
    for (int i = 0; i < nsg; i++) {
        const char *p = sg[i].p;
        uint32_t l = sg[i].len;
        while (l) {
            if (used == bs) {
                slot->len = (uint16_t)used;
                slot->flags = NS_MOREFRAG;
                slot->ptr = 0;
                t = nmb_ring_next(ring, t);
                slot = &ring->slot[t];
                dst = nmb_buf(ring, slot->buf_idx);
                used = 0;
            }
            uint32_t c = l < bs - used ? l : bs - used;
            memcpy(dst + used, p, c);
            used += c;
            p += c;
            l -= c;
        }
    }
    slot->len = (uint16_t)used;
    slot->flags = 0;
    slot->ptr = 0;
    *hwtail = nmb_ring_next(ring, t);
}

/* The kernel flags a link going down as a socket error, which makes poll() return at once
 * until someone reads it: read it when idle, and count it. */
static void clear_socket_error(struct afport *ap)
{
    int e = 0;
    socklen_t l = sizeof(e);
    if (getsockopt(ap->port.fd, SOL_SOCKET, SO_ERROR, &e, &l) == 0 && e != 0)
        ap->st.link_errors++;
}

/* ---------------------------------------------------------------------------------------
 * RX through recvmmsg (the default): no ring of the kernel's, so poll() reports each frame
 * as it is queued on the socket -- no block to fill or retire -- and the kernel copies the
 * frame straight into a free slot's buffer.
 *
 * Message i of a batch receives into the buffer of free slot hwtail + i (bs - 4 bytes: room
 * to put a VLAN tag back) and, past that, its own bounce buffer.  A frame that spilled into
 * the bounce buffer is made whole there and copied out as an NS_MOREFRAG chain; frames that
 * do not fit the ring's free slots any more wait there, whole, for the next rxsync.  The free
 * slots' buffers are all the "NIC's", so laying out a batch just permutes them. */

enum { RX_DROP, RX_SINGLE, RX_BOUNCED };

static inline char *rx_bounce(struct afport *ap, uint32_t i)
{
    return ap->bounce + (size_t)i * ap->rx_bstride;
}

/* Copy frame `data` of `len` bytes into slots from position *pos (relative to hwtail) on,
 * taking buffers from rfree; the first slot gets `meta`. */
static void rx_place_bounced(struct netmap_ring *ring, uint32_t hwtail, uint32_t *pos, const uint32_t *rfree,
                             uint32_t *nfree, const char *data, uint32_t len, uint64_t meta)
{
    uint32_t n = ring->num_slots, bs = ring->nr_buf_size, first = 1;
    do {
        uint32_t c = len < bs ? len : bs;
        struct netmap_slot *slot = &ring->slot[(hwtail + *pos) % n];
        slot->buf_idx = rfree[--*nfree];
        memcpy(nmb_buf(ring, slot->buf_idx), data, c);
        slot->len = (uint16_t)c;
        slot->flags = len > c ? NS_MOREFRAG : 0;
        slot->ptr = first ? meta : 0;
        first = 0;
        data += c;
        len -= c;
        (*pos)++;
    } while (len);
}

/* Frames of the last batch that waited for room, in order.  1 when none is left. */
static int rx_deliver_pending(struct afport *ap, struct netmap_ring *ring, struct nmb_kring *kr, uint32_t *room)
{
    uint32_t n = ring->num_slots;
    while (ap->npend) {
        struct rxmsg *m = &ap->rm[ap->pend];
        if (m->state == RX_DROP) {
            ap->pend++;
            ap->npend--;
            continue;
        }
        if (m->nslots > *room)
            return 0;
        uint32_t pos = 0, nfree = 0;
        for (uint32_t k = 0; k < m->nslots; k++)
            ap->rfree[nfree++] = ring->slot[(kr->hwtail + k) % n].buf_idx;
        rx_place_bounced(ring, kr->hwtail, &pos, ap->rfree, &nfree, m->data, m->len, m->meta);
        kr->hwtail = (kr->hwtail + pos) % n;
        *room -= pos;
        ap->st.rx_frames++;
        ap->st.rx_bytes += m->len;
        ap->pend++;
        ap->npend--;
    }
    return 1;
}

/* One recvmmsg() of up to `want` frames into the free slots (*room > 0, nothing pending).
 * Returns the frames taken off the socket (some may now be pending), 0 when none was
 * queued. */
static uint32_t rx_recv(struct afport *ap, struct netmap_ring *ring, struct nmb_kring *kr, uint32_t *room,
                        uint32_t want)
{
    uint32_t n = ring->num_slots, bs = ring->nr_buf_size, t = kr->hwtail;
    if (want > *room)
        want = *room;
    if (want > ap->rx_batch)
        want = ap->rx_batch;
    for (uint32_t i = 0; i < want; i++) {
        struct iovec *iov = &ap->riov[3 * i];
        struct msghdr *mh = &ap->rmsgs[i].msg_hdr;
        iov[0].iov_base = &ap->rvh[i];
        iov[0].iov_len = VNET_LEN;
        iov[1].iov_base = nmb_buf(ring, ring->slot[t].buf_idx);
        iov[1].iov_len = bs - 4;
        iov[2].iov_base = rx_bounce(ap, i) + bs;
        iov[2].iov_len = RX_BOUNCE;
        mh->msg_name = NULL;
        mh->msg_namelen = 0;
        mh->msg_iov = ap->vnet ? iov : iov + 1;
        mh->msg_iovlen = ap->vnet ? 3 : 2;
        mh->msg_control = ap->rctl + (size_t)i * RX_CTL;
        mh->msg_controllen = RX_CTL;
        mh->msg_flags = 0;
        t = t + 1 == n ? 0 : t + 1;
    }
    int r;
    do {
        ap->st.rx_calls++;
        r = recvmmsg(ap->port.fd, ap->rmsgs, want, MSG_DONTWAIT, NULL);
    } while (r < 0 && errno == EINTR);
    if (r <= 0) {
        if (r < 0 && errno != EAGAIN && errno != EWOULDBLOCK)
            ap->st.link_errors++; /* a socket error (link down): reading it cleared it */
        return 0;
    }
    /* what each message holds */
    uint32_t got = (uint32_t)r, need = 0, nfit = got;
    int identity = 1;
    for (uint32_t i = 0; i < got; i++) {
        struct rxmsg *m = &ap->rm[i];
        struct msghdr *mh = &ap->rmsgs[i].msg_hdr;
        uint32_t len = ap->rmsgs[i].msg_len;
        m->state = RX_DROP;
        m->meta = 0;
        if ((mh->msg_flags & MSG_TRUNC) || len < (ap->vnet ? VNET_LEN : 0) + 1) {
            ap->st.rx_truncated++;
            identity = 0;
            continue;
        }
        if (ap->vnet)
            len -= VNET_LEN;
        struct tpacket_auxdata aux;
        memset(&aux, 0, sizeof(aux));
        for (struct cmsghdr *c = CMSG_FIRSTHDR(mh); c; c = CMSG_NXTHDR(mh, c))
            if (c->cmsg_level == SOL_PACKET && c->cmsg_type == PACKET_AUXDATA &&
                c->cmsg_len >= CMSG_LEN(sizeof(aux)))
                memcpy(&aux, CMSG_DATA(c), sizeof(aux));
        char *buf = nmb_buf(ring, ring->slot[(kr->hwtail + i) % n].buf_idx);
        uint32_t firstlen = len < bs - 4 ? len : bs - 4, over = len - firstlen;
        int vlan = (aux.tp_status & TP_STATUS_VLAN_VALID) && len >= 12;
        if (vlan) {
            uint16_t tpid = (aux.tp_status & TP_STATUS_VLAN_TPID_VALID) && aux.tp_vlan_tpid ? aux.tp_vlan_tpid
                                                                                      : ETH_P_8021Q;
            memmove(buf + 16, buf + 12, firstlen - 12);
            buf[12] = (char)(tpid >> 8);
            buf[13] = (char)tpid;
            buf[14] = (char)(aux.tp_vlan_tci >> 8);
            buf[15] = (char)aux.tp_vlan_tci;
            firstlen += 4;
            ap->st.rx_vlan_restored++;
        }
        uint32_t total = firstlen + over, ns = (total + bs - 1) / bs; /* chains refill to bs */
        if (ns > NETMAP_MAX_FRAGS || ns > n - 1) {
            ap->st.rx_oversize++;
            identity = 0;
            continue;
        }
        uint8_t *f = (uint8_t *)buf;
        if (over) { /* make the frame whole in the bounce buffer, in front of its tail */
            f = (uint8_t *)rx_bounce(ap, i) + bs - firstlen;
            memcpy(f, buf, firstlen);
        }
        int drop = 0;
        if (ap->vnet)
            m->meta = rx_offload(ap, &ap->rvh[i], f, total, vlan ? 4 : 0, vlan ? 4 : 0, &drop);
        else if ((aux.tp_status & TP_STATUS_CSUMNOTREADY) && finish_l4_csum(f, total))
            ap->st.rx_csum_fixed++;
        if (drop) {
            identity = 0;
            continue;
        }
        m->len = total;
        m->nslots = ns;
        m->data = (char *)f;
        m->state = over ? RX_BOUNCED : RX_SINGLE;
        if (over)
            identity = 0;
        if (nfit == got && need + ns > *room) {
            nfit = i; /* no room left: this one and the rest wait */
            identity = 0;
        }
        if (nfit == got)
            need += ns;
    }
    if (identity) {
        /* one frame per slot, in order: only lengths, flags and metadata to write */
        for (uint32_t i = 0; i < got; i++) {
            struct netmap_slot *slot = &ring->slot[(kr->hwtail + i) % n];
            slot->len = (uint16_t)ap->rm[i].len;
            slot->flags = 0;
            slot->ptr = ap->rm[i].meta;
            ap->st.rx_bytes += ap->rm[i].len;
        }
        ap->st.rx_frames += got;
        kr->hwtail = (kr->hwtail + got) % n;
        *room -= got;
        return got;
    }
    /* frames that wait go whole into their bounce buffers, before their slots' buffers
     * are handed out below */
    for (uint32_t i = nfit; i < got; i++) {
        struct rxmsg *m = &ap->rm[i];
        if (m->state == RX_SINGLE) {
            char *to = rx_bounce(ap, i) + bs - m->len;
            memcpy(to, m->data, m->len);
            m->data = to;
            m->state = RX_BOUNCED;
        }
    }
    /* lay the batch out: buffers of positions [0, M) are permuted */
    uint32_t M = need > got ? need : got, nfree = 0, pos = 0;
    for (uint32_t k = 0; k < M; k++)
        ap->rtmp[k] = ring->slot[(kr->hwtail + k) % n].buf_idx;
    for (uint32_t k = M; k-- > 0;)
        if (k >= got || k >= nfit || ap->rm[k].state != RX_SINGLE)
            ap->rfree[nfree++] = ap->rtmp[k];
    for (uint32_t i = 0; i < nfit; i++) {
        struct rxmsg *m = &ap->rm[i];
        if (m->state == RX_DROP)
            continue;
        if (m->state == RX_SINGLE) {
            struct netmap_slot *slot = &ring->slot[(kr->hwtail + pos) % n];
            slot->buf_idx = ap->rtmp[i];
            slot->len = (uint16_t)m->len;
            slot->flags = 0;
            slot->ptr = m->meta;
            pos++;
        } else {
            rx_place_bounced(ring, kr->hwtail, &pos, ap->rfree, &nfree, m->data, m->len, m->meta);
        }
        ap->st.rx_frames++;
        ap->st.rx_bytes += m->len;
    }
    for (uint32_t k = pos; k < M; k++)
        ring->slot[(kr->hwtail + k) % n].buf_idx = ap->rfree[--nfree];
    kr->hwtail = (kr->hwtail + pos) % n;
    *room -= pos;
    if (nfit < got) {
        ap->pend = nfit;
        ap->npend = got - nfit;
    }
    return got;
}

/* What both receive paths do first: count the sync, the kernel's checks on the user's
 * head/cur, take back the slots the user released ([hwcur, head)), and say how many slots
 * the "NIC" may fill (*room).  0 or -errno with the port's error set. */
static int rx_prologue(struct afport *ap, const struct netmap_ring *ring, uint32_t *room)
{
    struct nmb_kring *kr = &ap->rx_kr;
    char err[NMB_PORT_ERRLEN - 32];
    uint32_t n = ring->num_slots;
    ap->st.rxsyncs++;
    if (nmb_kring_check(ring, kr, "rx ring 0", err, sizeof(err)))
        return fail(ap, -EINVAL, err);
    kr->hwcur = ring->head;
    *room = (kr->hwcur + n - 1 - kr->hwtail) % n;
    return 0;
}

static int afp_rxsync_recv(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    struct netmap_ring *ring = nmb_rxring(p->nifp, 0);
    struct nmb_kring *kr = &ap->rx_kr;
    uint32_t room;
    int rc = rx_prologue(ap, ring, &room);
    if (rc)
        return rc;
    int idle = 1;
    if (rx_deliver_pending(ap, ring, kr, &room)) {
        while (room > 0) {
            uint32_t want = room < ap->rx_batch ? room : ap->rx_batch;
            uint32_t got = rx_recv(ap, ring, kr, &room, want);
            if (got)
                idle = 0;
            if (got < want || ap->npend)
                break; /* the queue is empty (no system call to learn it again), or full */
        }
    }
    ring->tail = kr->hwtail;
    if (idle && room > 0 && ++ap->idle_rx >= 64) {
        ap->idle_rx = 0;
        clear_socket_error(ap);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * RX through a TPACKET_V2 ring (the default): the kernel copies each frame into the next
 * ring frame in its softirq and wakes poll() for each one (a TPACKET_V3 block would hold a
 * lone frame until its retire timer, milliseconds).  rxsync copies ring frames into free
 * slots.  A frame larger than a ring frame (a GSO super-frame, a jumbo frame) is also queued
 * whole on the socket (PACKET_COPY_THRESH; its ring frame says TP_STATUS_COPY) and taken from
 * there with recvmsg(), in ring order. */

static inline struct tpacket2_hdr *rx_frame(struct afport *ap, uint32_t i)
{
    return (struct tpacket2_hdr *)(ap->map + (size_t)i * ap->rx_frame_size);
}

static int afp_rxsync_ring(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    struct netmap_ring *ring = nmb_rxring(p->nifp, 0);
    struct nmb_kring *kr = &ap->rx_kr;
    uint32_t room, n = ring->num_slots, bs = ring->nr_buf_size;
    int rc = rx_prologue(ap, ring, &room);
    if (rc)
        return rc;
    int idle = 1;
    if (!rx_deliver_pending(ap, ring, kr, &room))
        goto out;
    while (room > 0) {
        struct tpacket2_hdr *h = rx_frame(ap, ap->rx_pos);
        uint32_t st = __atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE);
        if (!(st & TP_STATUS_USER))
            break;
        idle = 0;
        uint32_t snap = h->tp_snaplen;
        char *data = (char *)h + h->tp_mac;
        if (st & TP_STATUS_COPY) {
            /* the whole frame waits on the socket: straight into slots (or pending) */
            uint32_t before = ap->st.rx_truncated;
            if (!rx_recv(ap, ring, kr, &room, 1) && before == ap->st.rx_truncated)
                ap->st.rx_truncated++; /* not there after all */
        } else if (snap < h->tp_len || snap == 0) {
            ap->st.rx_truncated++; /* larger than a ring frame, and no room for a copy */
        } else {
            int vlan = (st & TP_STATUS_VLAN_VALID) && snap >= 12;
            uint32_t total = snap + (vlan ? 4 : 0);
            uint32_t need = (total + bs - 1) / bs;
            if (need > NETMAP_MAX_FRAGS || need > n - 1 || total > 0xffff * NETMAP_MAX_FRAGS) {
                ap->st.rx_oversize++;
            } else if (need > room) {
                break; /* wait for room; resume at this frame */
            } else {
                struct seg sg[3];
                uint8_t tag[4];
                int nsg = 0, drop = 0;
                uint64_t meta = 0;
                uint32_t first = kr->hwtail;
                if (ap->vnet)
                    meta = rx_offload(ap, (const struct virtio_net_hdr *)(data - VNET_LEN), (uint8_t *)data, snap,
                                      vlan ? 4 : 0, 0, &drop);
                else if ((st & TP_STATUS_CSUMNOTREADY) && finish_l4_csum((uint8_t *)data, snap))
                    ap->st.rx_csum_fixed++;
                if (!drop) {
                    if (vlan) {
                        uint16_t tpid = (st & TP_STATUS_VLAN_TPID_VALID) && h->tp_vlan_tpid ? h->tp_vlan_tpid
                                                                                            : ETH_P_8021Q;
                        tag[0] = (uint8_t)(tpid >> 8);
                        tag[1] = (uint8_t)tpid;
                        tag[2] = (uint8_t)(h->tp_vlan_tci >> 8);
                        tag[3] = (uint8_t)h->tp_vlan_tci;
                        sg[0] = (struct seg){data, 12};
                        sg[1] = (struct seg){(const char *)tag, 4};
                        sg[2] = (struct seg){data + 12, snap - 12};
                        nsg = 3;
                        ap->st.rx_vlan_restored++;
                    } else {
                        sg[0] = (struct seg){data, snap};
                        nsg = 1;
                    }
                    fill_slots(ring, &kr->hwtail, sg, nsg);
                    ring->slot[first].ptr = meta;
                    room -= need;
                    ap->st.rx_frames++;
                    ap->st.rx_bytes += total;
                }
            }
        }
        __atomic_store_n(&h->tp_status, TP_STATUS_KERNEL, __ATOMIC_RELEASE);
        ap->rx_pos = ap->rx_pos + 1 == ap->rx_frame_count ? 0 : ap->rx_pos + 1;
        if (ap->npend)
            break; /* a copied frame waits for room: nothing may pass it */
    }
out:
    ring->tail = kr->hwtail;
    /* only when idle, and not on every idle rxsync: the other direction's busy loop rxsyncs
     * this port once per batch, and a pending error just makes poll() return at once */
    if (idle && room > 0 && ++ap->idle_rx >= 64) {
        ap->idle_rx = 0;
        clear_socket_error(ap);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * TX */

/* Whether the interface can transmit: up, and running (a carrier: operstate up).  Without a
 * carrier the kernel's transmit path drops every frame (__dev_direct_xmit with qdisc bypass:
 * ENOBUFS, the ring frame requested again; through a qdisc: silently).  An interface that is
 * gone cannot; one whose flags cannot be read is assumed able to. */
static int link_ready(struct afport *ap)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_ifindex = ap->ifindex;
    if (ioctl(ap->port.fd, SIOCGIFNAME, &ifr) || ioctl(ap->port.fd, SIOCGIFFLAGS, &ifr))
        return errno != ENODEV && errno != ENXIO;
    return (ifr.ifr_flags & IFF_UP) && (ifr.ifr_flags & IFF_RUNNING);
}

static inline uint32_t advance(struct afport *ap, struct netmap_ring *ring, uint32_t s, uint32_t nslots)
{
    for (uint32_t i = 0; i < nslots; i++) {
        ring->slot[s].flags &= ~NS_BUF_CHANGED; /* the "kernel" has taken the new buffer */
        ring->slot[s].ptr = 0;                  /* and the frame's offload request */
        s = nmb_ring_next(ring, s);
    }
    (void)ap;
    return s;
}

/* The virtio_net_hdr a frame goes out with: its offload request (nmb_port.h), if any;
 * hdr_len: how many bytes the kernel should copy into the skb's head. */
static void tx_vnet_hdr(struct virtio_net_hdr *vh, uint64_t meta, uint32_t hdr_len)
{
    memset(vh, 0, sizeof(*vh));
    if (meta & NMB_META_VALID) {
        vh->flags = NMB_META_FLAGS(meta) & VIRTIO_NET_HDR_F_NEEDS_CSUM;
        vh->gso_type = NMB_META_GSO_TYPE(meta);
        vh->gso_size = htole16(NMB_META_GSO_SIZE(meta));
        vh->csum_start = htole16(NMB_META_CSUM_START(meta));
        vh->csum_offset = htole16(NMB_META_CSUM_OFFSET(meta));
    }
    vh->hdr_len = htole16((uint16_t)(hdr_len > 0xffff ? 0 : hdr_len));
}

static inline int is_gso(uint64_t meta)
{
    return (meta & NMB_META_VALID) && NMB_META_GSO_TYPE(meta) != VIRTIO_NET_HDR_GSO_NONE;
}

static int tx_send_one(struct afport *ap, struct netmap_ring *ring, uint32_t s, uint32_t nsl, uint64_t meta);

/* Both transmit paths start alike: count the sync, check head/cur as the kernel would. */
static int tx_prologue(struct afport *ap, const struct netmap_ring *ring)
{
    char err[NMB_PORT_ERRLEN - 32];
    ap->st.txsyncs++;
    if (nmb_kring_check(ring, &ap->tx_kr, "tx ring 0", err, sizeof(err)))
        return fail(ap, -EINVAL, err);
    return 0;
}

static int afp_txsync(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    struct netmap_ring *ring = nmb_txring(p->nifp, 0);
    struct nmb_kring *kr = &ap->tx_kr;
    int rc = tx_prologue(ap, ring);
    if (rc)
        return rc;
    uint32_t head = ring->head, n = ring->num_slots, bs = ring->nr_buf_size;
    uint32_t s = kr->hwcur;
    while (s != head) {
        /* gather up to a batch of whole frames */
        uint32_t nmsg = 0, niov = 0, scan = s;
        int bad_first = 0;
        while (scan != head && nmsg < NMB_AFP_TX_BATCH && niov + NETMAP_MAX_FRAGS + 1 <= ap->niov) {
            uint32_t start = scan, nsl = 0, flen = 0, v = ap->vnet ? 1 : 0;
            int complete = 0, bad = 0;
            uint64_t meta = ring->slot[scan].ptr;
            for (;;) {
                struct netmap_slot *slot = &ring->slot[scan];
                if (slot->len > bs)
                    bad = 1;
                ap->iov[niov + v + nsl].iov_base = nmb_buf(ring, slot->buf_idx);
                ap->iov[niov + v + nsl].iov_len = slot->len;
                nsl++;
                flen += slot->len;
                scan = nmb_ring_next(ring, scan);
                if (!(slot->flags & NS_MOREFRAG)) {
                    complete = 1;
                    break;
                }
                if (scan == head)
                    break;
            }
            if (!complete) { /* the user has not finished this chain yet */
                scan = start;
                break;
            }
            if (bad) {
                if (nmsg == 0) { /* a slot longer than its buffer: drop the frame */
                    ap->st.tx_errors++;
                    s = advance(ap, ring, s, nsl);
                    bad_first = 1;
                }
                scan = start;
                break;
            }
            if (v && ap->gso_fd >= 0 && is_gso(meta)) {
                if (nmsg == 0) { /* alone, through the GSO socket (see tx_send_one) */
                    int r = tx_send_one(ap, ring, s, nsl, meta);
                    if (r == 1)
                        goto done;
                    if (r == 0) {
                        ap->st.tx_frames++;
                        ap->st.tx_bytes += flen;
                        ap->st.tx_gso++;
                    }
                    s = advance(ap, ring, s, nsl);
                    bad_first = 1;
                }
                scan = start;
                break;
            }
            memset(&ap->msgs[nmsg].msg_hdr, 0, sizeof(ap->msgs[nmsg].msg_hdr));
            if (v) {
                tx_vnet_hdr(&ap->tvh[nmsg], meta, 0);
                ap->iov[niov].iov_base = &ap->tvh[nmsg];
                ap->iov[niov].iov_len = VNET_LEN;
                if (is_gso(meta))
                    ap->st.tx_gso++;
            }
            ap->msgs[nmsg].msg_hdr.msg_iov = &ap->iov[niov];
            ap->msgs[nmsg].msg_hdr.msg_iovlen = v + nsl;
            ap->msg_slots[nmsg] = nsl;
            ap->msg_len[nmsg] = flen;
            niov += v + nsl;
            nmsg++;
        }
        if (nmsg == 0) {
            if (bad_first)
                continue;
            break; /* only an unfinished chain is left */
        }
        uint32_t sent = 0;
        while (sent < nmsg) {
            ap->st.tx_calls++;
            int r = sendmmsg(p->fd, &ap->msgs[sent], nmsg - sent, MSG_DONTWAIT);
            if (r > 0) {
                for (uint32_t k = sent; k < sent + (uint32_t)r; k++) {
                    s = advance(ap, ring, s, ap->msg_slots[k]);
                    ap->st.tx_bytes += ap->msg_len[k];
                }
                ap->st.tx_frames += (uint32_t)r;
                sent += (uint32_t)r;
                continue;
            }
            int e = r < 0 ? errno : EAGAIN;
            if (e == EINTR)
                continue;
            if ((e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS) && (e != ENOBUFS || link_ready(ap))) {
                ap->st.tx_again++;
                goto done; /* keep the rest for the next txsync */
            }
            if (e == ENETDOWN || e == ENXIO || e == ENODEV || e == ENOBUFS) {
                /* the link is down or gone: drop what we have, resume when it is back */
                for (uint32_t k = sent; k < nmsg; k++)
                    s = advance(ap, ring, s, ap->msg_slots[k]);
                ap->st.tx_link_down += nmsg - sent;
                sent = nmsg;
            } else {
                /* the kernel refused this frame (e.g. EMSGSIZE): drop it, send the rest */
                s = advance(ap, ring, s, ap->msg_slots[sent]);
                if (e == EMSGSIZE)
                    ap->st.tx_mtu++;
                else
                    ap->st.tx_errors++;
                sent++;
            }
        }
    }
done:
    kr->hwcur = s;
    kr->hwtail = s == 0 ? n - 1 : s - 1;
    ring->tail = kr->hwtail;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * TX through PACKET_TX_RING
 *
 * txsync copies each frame of [hwcur, head) (a chain gathered into one) into the next free
 * ring frame, marks it TP_STATUS_SEND_REQUEST and, once per txsync, kicks the kernel with
 * send(fd, NULL, 0, MSG_DONTWAIT), which sends every requested frame in ring order.  The slots
 * are the user's again as soon as they are copied.  A ring frame is free again when the
 * kernel has freed the frame's skb (TP_STATUS_AVAILABLE); when the next one is not, the rest
 * waits for the next txsync (poll() reports POLLOUT when it is free).  PACKET_LOSS is on: the
 * kernel drops a frame it refuses instead of stopping the ring at it, silently, so frames
 * the kernel would refuse for their size (the MTU, read at open and now and then) are counted
 * as tx_mtu and dropped here.  A ring frame holds MTU + 18 bytes, at least 2048 minus
 * its header. */

#define TX_DATA_OFF TPACKET_ALIGN(sizeof(struct tpacket2_hdr)) /* no PACKET_TX_HAS_OFF */

/* A monotonic clock of a tick's resolution (a few ns through the vDSO). */
static uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* How often a TX ring's txsync reads the MTU and the carrier again: by time, not by a count
 * of txsyncs, since a loaded bridge moves whole batches in few of them (measured: after an
 * MTU lowered under load, one of two workers sent every frame oversize for seconds; with a
 * PACKET_VNET_HDR TX ring the kernel does not check the MTU itself). */
#define MTU_RECHECK_NS 100000000ull

/* The interface's MTU, asked through the socket (so in its network namespace, whichever
 * thread asks); the last known one when that fails. */
static int read_mtu(struct afport *ap)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_ifindex = ap->ifindex;
    if (ioctl(ap->port.fd, SIOCGIFNAME, &ifr) || ioctl(ap->port.fd, SIOCGIFMTU, &ifr))
        return ap->mtu;
    return ifr.ifr_mtu;
}

/* The largest untagged frame the ring takes: the kernel's limit (MTU + Ethernet header; 4
 * more for an 802.1Q-tagged frame) within a ring frame. */
static void refresh_tx_max(struct afport *ap)
{
    uint32_t cap = ap->tx_frame_size - TX_DATA_OFF - ap->tx_vnet - 4;
    uint32_t m = (uint32_t)ap->mtu + ETH_HLEN;
    ap->mtu_read_ns = coarse_ns();
    ap->tx_ring_max = m < cap ? m : cap;
}

static inline int is_8021q(struct netmap_ring *ring, uint32_t s)
{
    const uint8_t *f = (const uint8_t *)nmb_buf(ring, ring->slot[s].buf_idx);
    return ring->slot[s].len >= 14 && f[12] == 0x81 && f[13] == 0x00;
}

static inline struct tpacket2_hdr *tx_frame(struct afport *ap, uint32_t i)
{
    return (struct tpacket2_hdr *)(ap->txmap + (size_t)i * ap->tx_frame_size);
}

/* Frames still requested (not yet taken by the kernel) are dropped and counted as lost to a
 * link down: a zero length fails the kernel's header check, and with PACKET_LOSS it skips
 * them once the link is back. */
static void tx_ring_cancel(struct afport *ap)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < ap->tx_frame_count; i++) {
        struct tpacket2_hdr *h = tx_frame(ap, i);
        if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) == TP_STATUS_SEND_REQUEST && h->tp_len) {
            h->tp_len = 0;
            n++;
        }
    }
    ap->st.tx_link_down += n;
    ap->tx_req = 0;
    ap->tx_kpos = ap->tx_pos;
}

/* Count what the kernel took since the last look (tx_frames: handed to the kernel): from the
 * oldest requested frame on, every frame no longer TP_STATUS_SEND_REQUEST.  A frame the
 * kernel could not send now (ENOBUFS) it marks requested again, so it is still ours. */
static void tx_ring_reap(struct afport *ap)
{
    while (ap->tx_req) {
        struct tpacket2_hdr *h = tx_frame(ap, ap->tx_kpos);
        if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) == TP_STATUS_SEND_REQUEST)
            break;
        ap->st.tx_frames++;
        ap->st.tx_bytes += h->tp_len - ap->tx_vnet;
        ap->tx_req--;
        ap->tx_kpos = ap->tx_kpos + 1 == ap->tx_frame_count ? 0 : ap->tx_kpos + 1;
    }
}

/* The link is down or has no carrier: drop what waits in the ring, and what comes next until
 * it is back (see tx_still_down). */
static void tx_link_lost(struct afport *ap)
{
    tx_ring_cancel(ap);
    ap->tx_down = 1;
    ap->tx_kick = 1; /* the cancelled frames go (skipped) when the link is back */
}

static inline int link_gone(int e)
{
    return e == ENETDOWN || e == ENXIO || e == ENODEV;
}

/* Kick the ring. 0: the kernel took everything; 1: frames wait (EAGAIN, ENOBUFS); -1: the
 * link is down, without a carrier or gone (requested frames dropped and counted); -2 another
 * error (the frames stay requested). */
static int tx_ring_kick(struct afport *ap)
{
    for (;;) {
        ap->st.tx_calls++;
        int r = (int)send(ap->port.fd, NULL, 0, MSG_DONTWAIT);
        int e = errno;
        tx_ring_reap(ap);
        if (r >= 0) {
            ap->tx_kick = 0;
            if (ap->tx_down) {
                ap->tx_down = 0;
                ap->mtu = read_mtu(ap);
                refresh_tx_max(ap);
            }
            return 0;
        }
        if (e == EINTR)
            continue;
        /* ENOBUFS without a carrier is a link down: the kernel would retry the frame forever
         * (and poll() says POLLOUT all along: a busy loop) */
        if ((e == EAGAIN || e == EWOULDBLOCK || e == ENOBUFS) && (e != ENOBUFS || link_ready(ap))) {
            ap->st.tx_again++;
            ap->tx_kick = 1;
            return 1;
        }
        if (link_gone(e) || e == ENOBUFS) {
            tx_link_lost(ap);
            return -1;
        }
        ap->st.tx_again++; /* the frames stay requested: no frame is lost, the next kick retries */
        ap->tx_kick = 1;
        return -2;
    }
}

/* While tx_down: 1 as long as the link is still down or without a carrier; when it is back,
 * kicks the ring (which skips the cancelled frames) and resumes. */
static int tx_still_down(struct afport *ap)
{
    if (!link_ready(ap))
        return 1;
    return tx_ring_kick(ap) == -1;
}

/* Send one GSO super-frame (slots from s on) with its virtio_net_hdr through sendmsg().
 * A packet socket marks GSO frames "dodgy" (SKB_GSO_DODGY): a device without
 * NETIF_F_GSO_ROBUST (veth, most NICs) has them segmented in software on the way out, and
 * the direct path of PACKET_QDISC_BYPASS drops any frame that validation changed -- so they
 * go through a second socket of this port without the bypass (gso_fd), after the frames
 * before them.  0: sent; 1: try again later; -1: dropped (counted). */
static int tx_send_one(struct afport *ap, struct netmap_ring *ring, uint32_t s, uint32_t nsl, uint64_t meta)
{
    struct virtio_net_hdr vh;
    struct msghdr mh;
    tx_vnet_hdr(&vh, meta, 0);
    ap->iov[0].iov_base = &vh;
    ap->iov[0].iov_len = VNET_LEN;
    for (uint32_t i = 0; i < nsl; i++) {
        ap->iov[1 + i].iov_base = nmb_buf(ring, ring->slot[s].buf_idx);
        ap->iov[1 + i].iov_len = ring->slot[s].len;
        s = nmb_ring_next(ring, s);
    }
    memset(&mh, 0, sizeof(mh));
    mh.msg_iov = ap->iov;
    mh.msg_iovlen = 1 + nsl;
    for (;;) {
        ap->st.tx_calls++;
        if (sendmsg(ap->gso_fd >= 0 ? ap->gso_fd : ap->port.fd, &mh, MSG_DONTWAIT) >= 0)
            return 0;
        int e = errno;
        if (e == EINTR)
            continue;
        /* as tx_ring_kick: ENOBUFS without a carrier is a link down */
        if (e == EAGAIN || e == EWOULDBLOCK || (e == ENOBUFS && link_ready(ap))) {
            ap->st.tx_again++;
            return 1;
        }
        if (link_gone(e) || e == ENOBUFS) {
            if (ap->txmap)
                tx_link_lost(ap); /* the ring's waiting frames go too, and what follows */
            ap->st.tx_link_down++;
        } else {
            ap->st.tx_errors++;
        }
        return -1;
    }
}

static int afp_txsync_ring(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    struct netmap_ring *ring = nmb_txring(p->nifp, 0);
    struct nmb_kring *kr = &ap->tx_kr;
    int rc = tx_prologue(ap, ring);
    if (rc)
        return rc;
    uint32_t head = ring->head, n = ring->num_slots, bs = ring->nr_buf_size;
    uint32_t s = kr->hwcur, queued = 0;
    int down = 0;
    if (coarse_ns() - ap->mtu_read_ns >= MTU_RECHECK_NS) {
        ap->mtu = read_mtu(ap);
        refresh_tx_max(ap);
        if (!ap->tx_down && !link_ready(ap))
            tx_link_lost(ap); /* through a qdisc, frames without a carrier vanish silently */
    }
    if (ap->tx_down && tx_still_down(ap))
        down = 1; /* still down: what the user queued is dropped below */
    while (s != head) {
        uint32_t scan = s, nsl = 0, flen = 0;
        int complete = 0, bad = 0;
        for (;;) {
            struct netmap_slot *slot = &ring->slot[scan];
            bad |= slot->len > bs;
            flen += slot->len;
            nsl++;
            scan = nmb_ring_next(ring, scan);
            if (!(slot->flags & NS_MOREFRAG)) {
                complete = 1;
                break;
            }
            if (scan == head)
                break;
        }
        if (!complete)
            break; /* the user has not finished this chain yet */
        uint64_t meta = ring->slot[s].ptr;
        if (bad) {
            ap->st.tx_errors++;
        } else if (down) {
            ap->st.tx_link_down++;
        } else if (ap->tx_vnet && is_gso(meta)) {
            /* a GSO super-frame: larger than a ring frame, it goes through sendmsg(), after
             * the frames already requested in the ring (order is kept: it waits until the
             * kernel has taken every one of them) */
            if (queued || ap->tx_kick || ap->tx_req) {
                int k = tx_ring_kick(ap);
                queued = 0;
                if (k == -1) { /* link down: the ring's frames were cancelled and counted */
                    down = 1;
                    ap->st.tx_link_down++;
                    s = advance(ap, ring, s, nsl);
                    continue;
                }
                if (k != 0 || ap->tx_req)
                    break; /* ring frames wait: this one waits behind them */
            }
            int r = tx_send_one(ap, ring, s, nsl, meta);
            if (r == 1)
                break;
            if (r == 0) {
                ap->st.tx_frames++;
                ap->st.tx_bytes += flen;
                ap->st.tx_gso++;
            } else if (ap->tx_down) {
                down = 1; /* what follows is dropped too, until the link is back */
            }
        } else if (flen < ETH_HLEN) {
            ap->st.tx_errors++; /* what the kernel would refuse (with PACKET_LOSS, silently) */
        } else if (flen > ap->tx_ring_max && (flen > ap->tx_ring_max + 4 || !is_8021q(ring, s))) {
            ap->st.tx_mtu++; /* larger than the egress MTU allows: the kernel would drop it */
        } else {
            struct tpacket2_hdr *h = tx_frame(ap, ap->tx_pos);
            if (__atomic_load_n(&h->tp_status, __ATOMIC_ACQUIRE) != TP_STATUS_AVAILABLE) {
                ap->st.tx_again++; /* every ring frame is in flight */
                break;
            }
            /* the next ring frame and the next frame's first buffer are cache misses */
            __builtin_prefetch(tx_frame(ap, ap->tx_pos + 1 == ap->tx_frame_count ? 0 : ap->tx_pos + 1), 1);
            if (scan != head)
                __builtin_prefetch(nmb_buf(ring, ring->slot[scan].buf_idx));
            char *dst = (char *)h + TX_DATA_OFF;
            if (ap->tx_vnet) {
                /* hdr_len = the whole frame: the kernel copies it into the skb's head instead
                 * of attaching the ring page as a fragment (which veth copies again) */
                tx_vnet_hdr((struct virtio_net_hdr *)dst, meta, flen);
                dst += VNET_LEN;
            }
            uint32_t t = s;
            for (uint32_t i = 0; i < nsl; i++) {
                struct netmap_slot *slot = &ring->slot[t];
                memcpy(dst, nmb_buf(ring, slot->buf_idx), slot->len);
                dst += slot->len;
                t = nmb_ring_next(ring, t);
            }
            h->tp_len = ap->tx_vnet + flen;
            h->tp_snaplen = h->tp_len;
            __atomic_store_n(&h->tp_status, TP_STATUS_SEND_REQUEST, __ATOMIC_RELEASE);
            ap->tx_pos = ap->tx_pos + 1 == ap->tx_frame_count ? 0 : ap->tx_pos + 1;
            ap->tx_req++; /* counted in tx_frames once the kernel takes it (tx_ring_reap) */
            queued++;
        }
        s = advance(ap, ring, s, nsl);
    }
    if ((queued || ap->tx_kick) && !down)
        tx_ring_kick(ap);
    kr->hwcur = s;
    kr->hwtail = s == 0 ? n - 1 : s - 1;
    ring->tail = kr->hwtail;
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * open / close */

static void afp_free(struct afport *ap)
{
    if (ap->map && ap->map != MAP_FAILED)
        munmap(ap->map, ap->map_len);
    if (ap->port.fd >= 0)
        close(ap->port.fd);
    if (ap->gso_fd >= 0)
        close(ap->gso_fd);
    if (ap->port.nifp)
        nmb_umem_if_destroy(ap->mem, ap->port.nifp);
    free(ap->msgs);
    free(ap->iov);
    free(ap->tvh);
    free(ap->rmsgs);
    free(ap->riov);
    free(ap->rvh);
    free(ap->rctl);
    free(ap->rm);
    free(ap->rtmp);
    free(ap->rfree);
    if (ap->bounce)
        munmap(ap->bounce, ap->bounce_len);
    free(ap->msg_slots);
    free(ap->msg_len);
    pthread_mutex_destroy(&ap->stats_lock);
    free(ap);
}

#define OPEN_FAIL(...)                          \
    do {                                        \
        snprintf(err, errlen, __VA_ARGS__);     \
        afp_free(ap);                           \
        return NULL;                            \
    } while (0)


/* A PACKET_RX_RING/PACKET_TX_RING request for `frames` frames of `fs` bytes (a power of two):
 * blocks of 64 KiB (or one frame, when larger), rounded up to whole blocks. */
static void ring_req(struct tpacket_req *req, uint32_t fs, uint32_t frames)
{
    uint32_t bsz = fs > (1u << 16) ? fs : (1u << 16), per_block = bsz / fs;
    uint32_t nblocks = (frames + per_block - 1) / per_block;
    memset(req, 0, sizeof(*req));
    req->tp_block_size = bsz;
    req->tp_block_nr = nblocks;
    req->tp_frame_size = fs;
    req->tp_frame_nr = nblocks * per_block;
}

struct nmb_port *nmb_afpacket_open(nmb_umem *m, const char *ifname, const struct nmb_afpacket_opts *o,
                                   char *err, size_t errlen)
{
    if (!ifname[0] || strlen(ifname) >= IFNAMSIZ) {
        snprintf(err, errlen, "an interface name has 1 to %d bytes", IFNAMSIZ - 1);
        return NULL;
    }
    if (o->slots < 2 || (o->rx_frames && o->rx_frames < 16)) {
        snprintf(err, errlen, "bad ring options: slots %u, rx_frames %u (16 at least)", o->slots, o->rx_frames);
        return NULL;
    }
    if (o->fanout != -1 && o->fanout != PACKET_FANOUT_HASH && o->fanout != PACKET_FANOUT_LB &&
        o->fanout != PACKET_FANOUT_CPU && o->fanout != PACKET_FANOUT_QM) {
        snprintf(err, errlen, "bad fanout mode %d", o->fanout);
        return NULL;
    }
    if (o->fanout_group < -1 || o->fanout_group > 0xffff) {
        snprintf(err, errlen, "bad fanout group %d (0 to 65535, or -1 for a new one)", o->fanout_group);
        return NULL;
    }
    struct afport *ap = calloc(1, sizeof(*ap));
    if (!ap) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    pthread_mutex_init(&ap->stats_lock, NULL);
    ap->mem = m;
    ap->port.fd = -1;
    ap->gso_fd = -1;
    ap->fanout_group = -1;
    ap->ifindex = (int)if_nametoindex(ifname);
    if (ap->ifindex == 0)
        OPEN_FAIL("%s", errno == ENODEV || errno == ENXIO ? "no such interface" : strerror(errno));
    /* protocol 0: nothing is queued before the ring exists; bind() below starts reception */
    ap->port.fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (ap->port.fd < 0) {
        if (errno == EPERM || errno == EACCES)
            OPEN_FAIL("an AF_PACKET socket needs CAP_NET_RAW (run as root)");
        OPEN_FAIL("socket(AF_PACKET): %s", strerror(errno));
    }
    int fd = ap->port.fd, one = 1, v2 = TPACKET_V2;
    ap->vnet = o->vnet ? 1 : 0;
    if (setsockopt(fd, SOL_PACKET, PACKET_VERSION, &v2, sizeof(v2)))
        OPEN_FAIL("PACKET_VERSION TPACKET_V2: %s", strerror(errno));
    /* before any ring exists: the kernel skips a TX ring frame it refuses */
    if (o->tx_ring && setsockopt(fd, SOL_PACKET, PACKET_LOSS, &one, sizeof(one)))
        OPEN_FAIL("PACKET_LOSS: %s", strerror(errno));
    /* before any ring exists, too; on the socket, so for both directions */
    if (ap->vnet && setsockopt(fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)))
        OPEN_FAIL("PACKET_VNET_HDR: %s", strerror(errno));
    size_t rx_len = 0, tx_len = 0;
    ap->mtu = 1500;
    ap->mtu = read_mtu(ap);
    /* VLAN tags and checksum state of frames read with recvmsg() come as a control message */
    if (setsockopt(fd, SOL_PACKET, PACKET_AUXDATA, &one, sizeof(one)))
        OPEN_FAIL("PACKET_AUXDATA: %s", strerror(errno));
    /* the receive queue: every frame (rx_ring = 0), or those larger than a ring frame */
    int rcvbuf = o->rcvbuf;
    if (rcvbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_RCVBUFFORCE, &rcvbuf, sizeof(rcvbuf)) &&
        setsockopt(fd, SOL_SOCKET, SO_RCVBUF, &rcvbuf, sizeof(rcvbuf)))
        OPEN_FAIL("SO_RCVBUF %d: %s", rcvbuf, strerror(errno));
    if (o->rx_ring) {
        /* ring frames for the MTU (2048 bytes at least, 16 KiB at most: larger frames come
         * through the copy); as many as fit in 8 MiB unless rx_frames says */
        uint32_t fs = 2048, frames = o->rx_frames;
        while (fs < (uint32_t)ap->mtu + ETH_HLEN + 4 + 128 && fs < (16u << 10))
            fs <<= 1;
        if (!frames)
            frames = (o->rx_ring_bytes ? o->rx_ring_bytes : 8u << 20) / fs;
        if (frames < 16)
            frames = 16;
        struct tpacket_req req;
        ring_req(&req, fs, frames);
        if (setsockopt(fd, SOL_PACKET, PACKET_COPY_THRESH, &one, sizeof(one)))
            OPEN_FAIL("PACKET_COPY_THRESH: %s", strerror(errno));
        if (setsockopt(fd, SOL_PACKET, PACKET_RX_RING, &req, sizeof(req)))
            OPEN_FAIL("PACKET_RX_RING (%u frames of %u bytes): %s", req.tp_frame_nr, fs, strerror(errno));
        ap->rx_frame_size = fs;
        ap->rx_frame_count = req.tp_frame_nr;
        rx_len = (size_t)req.tp_block_size * req.tp_block_nr;
    }
    if (o->tx_ring) {
        /* frames of MTU + 18 bytes (2048 at least), in blocks of 64 KiB or one frame */
        uint32_t fs = 2048;
        ap->tx_vnet = ap->vnet ? VNET_LEN : 0;
        while (fs < TX_DATA_OFF + ap->tx_vnet + (uint32_t)ap->mtu + ETH_HLEN + 4 && fs < (1u << 20))
            fs <<= 1;
        /* default: as many frames as slots, in at most 4 MiB (jumbo MTUs: fewer frames) */
        uint32_t frames = o->tx_frames;
        if (!frames) {
            uint32_t fit = (4u << 20) / fs;
            frames = o->slots < fit ? o->slots : fit < 64 ? 64 : fit;
        }
        struct tpacket_req treq;
        ring_req(&treq, fs, frames);
        if (setsockopt(fd, SOL_PACKET, PACKET_TX_RING, &treq, sizeof(treq)))
            OPEN_FAIL("PACKET_TX_RING (%u frames of %u bytes): %s", treq.tp_frame_nr, fs, strerror(errno));
        ap->tx_frame_size = fs;
        ap->tx_frame_count = treq.tp_frame_nr;
        tx_len = (size_t)treq.tp_block_size * treq.tp_block_nr;
        refresh_tx_max(ap);
    }
    ap->map_len = rx_len + tx_len;
    if (ap->map_len) {
        ap->map = mmap(NULL, ap->map_len, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (ap->map == MAP_FAILED) {
            ap->map = NULL;
            OPEN_FAIL("mmap of the packet rings: %s", strerror(errno));
        }
    }
    if (o->tx_ring)
        ap->txmap = ap->map + rx_len; /* the kernel maps the RX ring first, then the TX ring */
    if (setsockopt(fd, SOL_PACKET, PACKET_IGNORE_OUTGOING, &one, sizeof(one)))
        OPEN_FAIL("PACKET_IGNORE_OUTGOING (needs Linux >= 4.20): %s", strerror(errno));
    if (o->qdisc_bypass && setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)))
        OPEN_FAIL("PACKET_QDISC_BYPASS: %s", strerror(errno));
    int sndbuf = o->sndbuf;
    /* a TX ring's frames in flight must never exceed the send buffer: a frame the kernel
     * could not allocate would wait for a kick, and poll() reports no POLLOUT for it */
    if (sndbuf > 0 && ap->txmap && (uint64_t)sndbuf < (uint64_t)ap->tx_frame_count * (ap->tx_frame_size + 1024))
        sndbuf = (int)((uint64_t)ap->tx_frame_count * (ap->tx_frame_size + 1024) > INT32_MAX / 2
                           ? INT32_MAX / 2
                           : (uint64_t)ap->tx_frame_count * (ap->tx_frame_size + 1024));
    if (sndbuf > 0 && setsockopt(fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) &&
        setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf)))
        OPEN_FAIL("SO_SNDBUF %d: %s", sndbuf, strerror(errno));
    struct sockaddr_ll sll;
    memset(&sll, 0, sizeof(sll));
    sll.sll_family = AF_PACKET;
    sll.sll_ifindex = ap->ifindex;
    if (ap->vnet && o->qdisc_bypass) { /* protocol 0: it receives nothing */
        ap->gso_fd = socket(AF_PACKET, SOCK_RAW | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
        if (ap->gso_fd < 0)
            OPEN_FAIL("socket(AF_PACKET) for GSO frames: %s", strerror(errno));
        if (setsockopt(ap->gso_fd, SOL_PACKET, PACKET_VNET_HDR, &one, sizeof(one)) ||
            (sndbuf > 0 && setsockopt(ap->gso_fd, SOL_SOCKET, SO_SNDBUFFORCE, &sndbuf, sizeof(sndbuf)) &&
             setsockopt(ap->gso_fd, SOL_SOCKET, SO_SNDBUF, &sndbuf, sizeof(sndbuf))) ||
            bind(ap->gso_fd, (struct sockaddr *)&sll, sizeof(sll)))
            OPEN_FAIL("the socket for GSO frames: %s", strerror(errno));
    }
    if (o->fanout >= 0) {
        /* held until every share is in the group (nmb_afpacket_fanout_start) */
        struct sock_filter none = BPF_STMT(BPF_RET | BPF_K, 0);
        struct sock_fprog prog = {.len = 1, .filter = &none};
        if (setsockopt(fd, SOL_SOCKET, SO_ATTACH_FILTER, &prog, sizeof(prog)))
            OPEN_FAIL("a filter that holds the share until the group is complete: %s", strerror(errno));
        ap->held = 1;
    }
    sll.sll_protocol = htons(ETH_P_ALL);
    if (bind(fd, (struct sockaddr *)&sll, sizeof(sll))) {
        if (errno == ENODEV || errno == ENXIO)
            OPEN_FAIL("no such interface");
        OPEN_FAIL("bind: %s", strerror(errno));
    }
    if (o->fanout >= 0) {
        /* the kernel joins a socket to a group only while it is bound and the interface is
         * up (it leaves it while the interface is down and re-joins it when it comes up).
         * A group of Linux < 6.2 cannot ignore outgoing frames (EINVAL, or the flag missing
         * when read back): the socket filter set at start drops them then (outgoing_bpf). */
        uint32_t id = o->fanout_group < 0 ? 0 : (uint32_t)o->fanout_group;
        uint32_t base = (uint32_t)o->fanout | (o->fanout_group < 0 ? PACKET_FANOUT_FLAG_UNIQUEID : 0);
        uint32_t arg = id | (base | (o->fanout_legacy ? 0 : PACKET_FANOUT_FLAG_IGNORE_OUTGOING)) << 16;
        int r = setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg));
        if (r && errno == EINVAL && !o->fanout_legacy) { /* an older kernel, or a group without the flag */
            arg = id | base << 16;
            r = setsockopt(fd, SOL_PACKET, PACKET_FANOUT, &arg, sizeof(arg));
        }
        if (r) {
            int e = errno;
            if (e == EINVAL && o->fanout_group < 0)
                OPEN_FAIL("PACKET_FANOUT: %s (is the interface up?)", strerror(e));
            if (e == EINVAL)
                OPEN_FAIL("cannot join fanout group %d: %s (is the interface up?)", o->fanout_group, strerror(e));
            OPEN_FAIL("PACKET_FANOUT: %s", strerror(e));
        }
        uint32_t got = 0;
        socklen_t gl = sizeof(got);
        if (getsockopt(fd, SOL_PACKET, PACKET_FANOUT, &got, &gl))
            OPEN_FAIL("PACKET_FANOUT (reading the group back): %s", strerror(errno));
        ap->fanout_group = (int)(got & 0xffff);
        ap->outgoing_bpf = !((got >> 24) & (PACKET_FANOUT_FLAG_IGNORE_OUTGOING >> 8));
    }
    if (o->promisc) {
        struct packet_mreq mr;
        memset(&mr, 0, sizeof(mr));
        mr.mr_ifindex = ap->ifindex;
        mr.mr_type = PACKET_MR_PROMISC;
        if (setsockopt(fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr)))
            OPEN_FAIL("promiscuous mode (PACKET_MR_PROMISC): %s", strerror(errno));
    }
    ap->port.nifp = nmb_umem_if_create(m, ifname, 1, 1, o->slots, o->slots);
    if (!ap->port.nifp)
        OPEN_FAIL("cannot lay out rings of %u slots in the memory region: %s", o->slots,
                  errno == ENOBUFS ? "not enough free buffers" : strerror(errno));
    ap->msgs = calloc(NMB_AFP_TX_BATCH, sizeof(*ap->msgs));
    ap->niov = o->slots + NMB_AFP_TX_BATCH + NETMAP_MAX_FRAGS + 1;
    ap->iov = calloc(ap->niov, sizeof(*ap->iov));
    ap->tvh = calloc(NMB_AFP_TX_BATCH, sizeof(*ap->tvh));
    ap->msg_slots = calloc(NMB_AFP_TX_BATCH, sizeof(uint32_t));
    ap->msg_len = calloc(NMB_AFP_TX_BATCH, sizeof(uint32_t));
    if (!ap->msgs || !ap->iov || !ap->tvh || !ap->msg_slots || !ap->msg_len)
        OPEN_FAIL("out of memory");
    {
        /* recvmmsg() for every frame (rx_ring = 0) or for copies of large ones */
        uint32_t bs = nmb_rxring(ap->port.nifp, 0)->nr_buf_size;
        ap->rx_batch = NMB_AFP_RX_BATCH < o->slots ? NMB_AFP_RX_BATCH : o->slots;
        ap->rmsgs = calloc(ap->rx_batch, sizeof(*ap->rmsgs));
        ap->riov = calloc(3 * (size_t)ap->rx_batch, sizeof(*ap->riov));
        ap->rvh = calloc(ap->rx_batch, sizeof(*ap->rvh));
        ap->rctl = calloc(ap->rx_batch, RX_CTL);
        ap->rm = calloc(ap->rx_batch, sizeof(*ap->rm));
        ap->rtmp = calloc(o->slots, sizeof(uint32_t));
        ap->rfree = calloc(o->slots, sizeof(uint32_t));
        /* untouched pages cost nothing: only frames longer than a buffer write here */
        ap->rx_bstride = ((size_t)bs + RX_BOUNCE + 4095) & ~(size_t)4095;
        ap->bounce_len = ap->rx_bstride * ap->rx_batch;
        ap->bounce = mmap(NULL, ap->bounce_len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (ap->bounce == MAP_FAILED)
            ap->bounce = NULL;
        if (!ap->rmsgs || !ap->riov || !ap->rvh || !ap->rctl || !ap->rm || !ap->rtmp || !ap->rfree || !ap->bounce)
            OPEN_FAIL("out of memory");
    }
    ap->tx_kr.hwcur = 0;
    ap->tx_kr.hwtail = o->slots - 1;
    ap->rx_kr.hwcur = ap->rx_kr.hwtail = 0;
    ap->port.tx_first = ap->port.rx_first = 0;
    ap->port.tx_last = ap->port.rx_last = 1;
    ap->port.poll_syncs = 0;
    ap->port.mem_key = (uint64_t)(uintptr_t)m;
    ap->port.offloads = ap->vnet ? NMB_OFFLOAD_META : 0;
    ap->port.spin_us = o->busy_poll_us;
    ap->port.rxsync = o->rx_ring ? afp_rxsync_ring : afp_rxsync_recv;
    ap->port.txsync = ap->txmap ? afp_txsync_ring : afp_txsync;
    ap->port.priv = ap;
    return &ap->port;
}

void nmb_afpacket_close(struct nmb_port *p)
{
    if (p)
        afp_free((struct afport *)p);
}

const void *nmb_afpacket_counters(struct nmb_port *p, size_t *len)
{
    *len = sizeof(((struct afport *)p)->st);
    return &((struct afport *)p)->st;
}

void nmb_afpacket_get_stats(struct nmb_port *p, struct nmb_afpacket_stats *out)
{
    struct afport *ap = (struct afport *)p;
    struct tpacket_stats_v3 ks;
    socklen_t l = sizeof(ks);
    pthread_mutex_lock(&ap->stats_lock);
    if (getsockopt(p->fd, SOL_PACKET, PACKET_STATISTICS, &ks, &l) == 0)
        ap->kernel_drops += ks.tp_drops;
    *out = ap->st;
    out->rx_kernel_drops = ap->kernel_drops;
    pthread_mutex_unlock(&ap->stats_lock);
}

void nmb_afpacket_ring_bytes(struct nmb_port *p, size_t *rx, size_t *tx)
{
    struct afport *ap = (struct afport *)p;
    *tx = ap->txmap ? ap->map_len - (size_t)(ap->txmap - ap->map) : 0;
    *rx = ap->map_len - *tx;
}

int nmb_afpacket_fanout_group(struct nmb_port *p)
{
    return ((struct afport *)p)->fanout_group;
}

int nmb_afpacket_fanout_start(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    int zero = 0, r;
    if (!ap->held)
        return 0;
    if (ap->outgoing_bpf) {
        /* replaces the filter that holds the share: drop PACKET_OUTGOING, take the rest */
        struct sock_filter prog[] = {
            BPF_STMT(BPF_LD | BPF_B | BPF_ABS, (uint32_t)(SKF_AD_OFF + SKF_AD_PKTTYPE)),
            BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, PACKET_OUTGOING, 0, 1),
            BPF_STMT(BPF_RET | BPF_K, 0),
            BPF_STMT(BPF_RET | BPF_K, 0xffffffffu),
        };
        struct sock_fprog fp = {.len = 4, .filter = prog};
        r = setsockopt(p->fd, SOL_SOCKET, SO_ATTACH_FILTER, &fp, sizeof(fp));
    } else {
        r = setsockopt(p->fd, SOL_SOCKET, SO_DETACH_FILTER, &zero, sizeof(zero));
    }
    if (r) {
        char msg[128];
        snprintf(msg, sizeof(msg), "releasing the share (%s): %s",
                 ap->outgoing_bpf ? "a filter of outgoing frames" : "SO_DETACH_FILTER", strerror(errno));
        return fail(ap, -1, msg);
    }
    ap->held = 0;
    return 0;
}

int nmb_afpacket_ifindex(struct nmb_port *p)
{
    return ((struct afport *)p)->ifindex;
}

int nmb_afpacket_check(struct nmb_port *p)
{
    struct afport *ap = (struct afport *)p;
    char err[NMB_PORT_ERRLEN - 32];
    if (nmb_kring_check(nmb_txring(p->nifp, 0), &ap->tx_kr, "tx ring 0", err, sizeof(err)) ||
        nmb_kring_check(nmb_rxring(p->nifp, 0), &ap->rx_kr, "rx ring 0", err, sizeof(err))) {
        fail(ap, -1, err);
        return -1;
    }
    return 0;
}
