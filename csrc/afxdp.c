/* afxdp.c -- the afxdp: backend (see nmb_afxdp.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/if_packet.h>
#include <linux/if_xdp.h>
#include <net/if.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/mman.h>
#include <sys/socket.h>
#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#include <linux/ethtool.h>
#include <linux/sockios.h>
#include <sys/ioctl.h>

#include "nmb_afxdp.h"

#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif

/* One XSK ring as mapped (or, for the fake kernel of the tests, allocated). */
struct xring {
    uint32_t *producer, *consumer, *flags;
    void *desc;
    uint32_t size, mask;
    void *map;
    size_t map_len;
};

/* One receive queue: its socket, four rings and the netmap ring pair it plays. */
struct xq {
    int fd;
    uint32_t qid;
    int zc;
    int shared; /* bound with XDP_SHARED_UMEM (else this socket registered the UMEM) */
    struct xring rx, tx, fr, cr;
    struct nmb_kring rx_kr, tx_kr;
    uint8_t *tx_state; /* per netmap TX slot: TX_IDLE, TX_KERNEL, TX_DONE */
};

enum { TX_IDLE = 0, TX_KERNEL = 1, TX_DONE = 2 };

struct xport {
    struct nmb_port port;
    nmb_umem *mem;
    struct xport *next; /* every open port: a shared UMEM is found through them */
    char ifname[IFNAMSIZ];
    int ifindex;
    uint32_t nq;
    struct xq *q;
    uint32_t *pos; /* buf_idx -> where we put it when we gave it to the kernel */
    uint32_t bs, nbufs, max_frame;
    uint32_t tx_mtu_max;  /* largest untagged frame the egress MTU allows (0: not known) */
    uint64_t mtu_read_ns; /* when it was read: coarse monotonic clock */
    struct xdev *dev; /* the interface's program, map and promiscuity (shared by its shares) */
    int epfd;
    int mode, need_wakeup, fake, tx_down, csum_fix;
    int ep_out; /* multi-queue: EPOLLOUT watched (a TX ring is full) */
    uint32_t busy_poll_us, busy_budget, coalesce_us;
    uint64_t last_rx_ns;
    uint32_t idle_rx;
    uint32_t fake_seq; /* the fake kernel numbers the frames it receives */
    char mode_reason[160];
    struct nmb_afxdp_stats st;
};

/* What the shares of one interface have in common (one per open; NULL for a fake port): the
 * XSKMAP (every bound queue's socket), our program, its link and the promiscuity socket.  It
 * goes when its last share closes. */
struct xdev {
    int map_fd, prog_fd, link_fd, promisc_fd;
    int ctl_fd; /* a datagram socket of the interface's namespace, for its MTU */
    uint32_t refs; /* under ports_lock */
};

#define POS(tx, ring, slot) (((uint32_t)(tx) << 31) | ((uint32_t)(ring) << 24) | (uint32_t)(slot))
#define POS_NONE 0xffffffffu

static pthread_mutex_t ports_lock = PTHREAD_MUTEX_INITIALIZER;
static struct xport *ports; /* open ports (for XDP_SHARED_UMEM) */

static int fail(struct xport *xp, int rc, const char *msg)
{
    snprintf(xp->port.error, NMB_PORT_ERRLEN, "afxdp:%s: %s", xp->ifname, msg);
    return rc;
}

static inline uint32_t load_acq(const uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void store_rel(uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

/* is i in the cyclic half-open interval [lo, hi)? */
static inline int in_range(uint32_t i, uint32_t lo, uint32_t hi)
{
    return lo <= hi ? i >= lo && i < hi : i >= lo || i < hi;
}

static inline uint32_t prev_slot(uint32_t i, uint32_t n) { return i == 0 ? n - 1 : i - 1; }

/* ---------------------------------------------------------------------------------------
 * Checksums a local stack left for the device to finish
 *
 * A veth peer's stack (containers, VMs' taps) hands over TCP/UDP frames as CHECKSUM_PARTIAL:
 * the checksum field holds only the folded pseudo-header sum.  AF_XDP passes the bytes without
 * that metadata, so a frame forwarded as is arrives with a bad checksum.  A frame whose field
 * equals its pseudo-header sum gets its checksum computed here; recomputing is idempotent for
 * a frame that was right all along (the 1-in-65536 coincidence), so nothing correct changes. */

static inline uint32_t add16(uint32_t sum, const uint8_t *p, uint32_t len)
{
    for (; len > 1; p += 2, len -= 2)
        sum += (uint32_t)(p[0] << 8 | p[1]);
    if (len)
        sum += (uint32_t)p[0] << 8;
    return sum;
}

static inline uint16_t fold16(uint64_t sum)
{
    while (sum >> 16)
        sum = (sum & 0xffff) + (sum >> 16);
    return (uint16_t)sum;
}

static int finish_partial_csum(uint8_t *f, uint32_t len)
{
    uint32_t off = 14, et, proto, l4, l4len;
    uint64_t sum;
    if (len < 14 + 20)
        return 0;
    et = (uint32_t)(f[12] << 8 | f[13]);
    while ((et == 0x8100 || et == 0x88a8) && off + 4 <= len) {
        et = (uint32_t)(f[off + 2] << 8 | f[off + 3]);
        off += 4;
    }
    const uint8_t *ip = f + off;
    if (et == 0x0800 && off + 20 <= len) {
        uint32_t ihl = (ip[0] & 15u) * 4, tot = (uint32_t)(ip[2] << 8 | ip[3]);
        if ((ip[0] >> 4) != 4 || ihl < 20 || tot < ihl || off + tot > len || (ip[6] & 0x3f) || ip[7])
            return 0; /* a fragment never carries a partial checksum */
        proto = ip[9];
        l4 = off + ihl;
        l4len = tot - ihl;
        sum = add16(0, ip + 12, 8);
    } else if (et == 0x86dd && off + 40 <= len) {
        l4len = (uint32_t)(ip[4] << 8 | ip[5]);
        proto = ip[6];
        l4 = off + 40;
        if (l4 + l4len > len)
            return 0;
        sum = add16(0, ip + 8, 32);
    } else {
        return 0;
    }
    uint32_t at;
    if (proto == 6 && l4len >= 20)
        at = l4 + 16;
    else if (proto == 17 && l4len >= 8)
        at = l4 + 6;
    else
        return 0;
    sum += proto + l4len;
    uint16_t stored = (uint16_t)(f[at] << 8 | f[at + 1]);
    if (stored != fold16(sum))
        return 0;
    f[at] = f[at + 1] = 0;
    uint16_t c = (uint16_t)~fold16(add16((uint32_t)fold16(sum), f + l4, l4len));
    if (c == 0 && proto == 17)
        c = 0xffff;
    f[at] = (uint8_t)(c >> 8);
    f[at + 1] = (uint8_t)c;
    return 1;
}

/* ---------------------------------------------------------------------------------------
 * RX: fill ring <- buffers of slots entering the NIC's part; XSK RX ring -> slots at tail */

static int rx_ring_sync(struct xport *xp, uint32_t qi)
{
    struct xq *q = &xp->q[qi];
    struct netmap_ring *ring = nmb_rxring(xp->port.nifp, qi);
    struct nmb_kring *kr = &q->rx_kr;
    uint32_t n = ring->num_slots;
    char err[NMB_PORT_ERRLEN - 48];
    if (nmb_kring_check(ring, kr, "rx ring", err, sizeof(err)))
        return fail(xp, -EINVAL, err);
    /* the NIC's part grows from [hwtail, hwcur - 1) to [hwtail, head - 1) */
    uint32_t s = prev_slot(kr->hwcur, n), e = prev_slot(ring->head, n);
    if (s != e) {
        uint32_t prod = *q->fr.producer; /* ours alone */
        uint64_t *fill = q->fr.desc;
        for (; s != e; s = nmb_ring_next(ring, s)) {
            uint32_t b = ring->slot[s].buf_idx;
            if (b < 2 || b >= xp->nbufs) {
                snprintf(err, sizeof(err), "rx ring %u slot %u: buf_idx %u out of range", qi, s, b);
                return fail(xp, -EINVAL, err);
            }
            xp->pos[b] = POS(0, qi, s);
            fill[prod & q->fr.mask] = (uint64_t)b * xp->bs;
            prod++;
        }
        store_rel(q->fr.producer, prod);
        if (q->fd >= 0 && !xp->busy_poll_us && xp->need_wakeup && (load_acq(q->fr.flags) & XDP_RING_NEED_WAKEUP)) {
            xp->st.fill_kicks++;
            recvfrom(q->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
        }
    }
    if (q->fd >= 0 && xp->busy_poll_us) {
        /* preferred busy polling: this call runs the queue's NAPI (the XDP program and the
         * copy into the UMEM) here, up to the budget, instead of in the sender's softirq */
        xp->st.busy_polls++;
        recvfrom(q->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
    }
    kr->hwcur = ring->head;
    uint32_t room = (kr->hwcur + n - 1 - kr->hwtail) % n;
    uint32_t cons = *q->rx.consumer, avail = load_acq(q->rx.producer) - cons;
    uint32_t k = avail < room ? avail : room;
    struct xdp_desc *rxd = q->rx.desc;
    uint32_t lo = kr->hwtail, hi = prev_slot(kr->hwcur, n); /* the NIC's part */
    for (uint32_t i = 0; i < k; i++) {
        struct xdp_desc *d = &rxd[(cons + i) & q->rx.mask];
        uint64_t b64 = d->addr / xp->bs;
        uint32_t off = (uint32_t)(d->addr % xp->bs), t = kr->hwtail;
        uint32_t b = (uint32_t)b64, p = b64 < xp->nbufs ? xp->pos[b] : POS_NONE;
        uint32_t ps = p & 0xffffff;
        if (b64 >= xp->nbufs || p == POS_NONE || (p >> 31) || ((p >> 24) & 0x7f) != qi || ps >= n ||
            !in_range(ps, lo, hi) || ring->slot[ps].buf_idx != b || off != NMB_UMEM_BUF_LEAD ||
            d->len > xp->bs - NMB_UMEM_BUF_LEAD) {
            snprintf(err, sizeof(err), "rx ring %u: the kernel returned address %llu (len %u), "
                     "not a buffer this ring gave it", qi, (unsigned long long)d->addr, d->len);
            store_rel(q->rx.consumer, cons + i);
            ring->tail = kr->hwtail;
            xp->st.rx_bad_desc++;
            return fail(xp, -EIO, err);
        }
        if (ps != t) { /* out of order: the two buffers trade slots, both still the NIC's */
            uint32_t other = ring->slot[t].buf_idx;
            ring->slot[ps].buf_idx = other;
            xp->pos[other] = POS(0, qi, ps);
            ring->slot[t].buf_idx = b;
        }
        xp->pos[b] = POS_NONE;
        ring->slot[t].len = (uint16_t)d->len;
        ring->slot[t].flags = 0;
        if (xp->csum_fix && finish_partial_csum((uint8_t *)nmb_buf(ring, b), d->len))
            xp->st.rx_csum_fixed++;
        xp->st.rx_frames++;
        xp->st.rx_bytes += d->len;
        kr->hwtail = nmb_ring_next(ring, t);
    }
    if (k)
        store_rel(q->rx.consumer, cons + k);
    ring->tail = kr->hwtail;
    return k ? 1 : 0;
}

/* The kernel flags a device going away as a socket error, which makes poll() return at once
 * until someone reads it: read it now and then when idle, and count it. */
static void clear_socket_errors(struct xport *xp)
{
    for (uint32_t i = 0; i < xp->nq; i++) {
        int e = 0;
        socklen_t l = sizeof(e);
        if (xp->q[i].fd >= 0 && getsockopt(xp->q[i].fd, SOL_SOCKET, SO_ERROR, &e, &l) == 0 && e != 0)
            xp->st.link_errors++;
    }
}

static uint64_t mono_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* The egress MTU: the kernel does not check it on an AF_XDP transmit (a 1400-byte frame
 * went out of a veth of MTU 1000), so the port does, as afpacket: does; read at open and
 * again when MTU_RECHECK_NS have passed at a txsync (through the interface's index, on a
 * socket of its namespace: whichever thread syncs).  Kept as it was when the read fails. */
#define MTU_RECHECK_NS 100000000ull
static uint64_t coarse_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

static void xp_read_mtu(struct xport *xp)
{
    struct ifreq ifr;
    xp->mtu_read_ns = coarse_ns();
    if (!xp->dev || xp->dev->ctl_fd < 0)
        return;
    memset(&ifr, 0, sizeof(ifr));
    ifr.ifr_ifindex = xp->ifindex;
    if (ioctl(xp->dev->ctl_fd, SIOCGIFNAME, &ifr) == 0 && ioctl(xp->dev->ctl_fd, SIOCGIFMTU, &ifr) == 0 &&
        ifr.ifr_mtu > 0)
        xp->tx_mtu_max = (uint32_t)ifr.ifr_mtu + 14;
}

/* Receive coalescing (rx_coalesce=USEC, off by default): while a stream is on (the previous
 * frames came less than 200 us ago), a sync that finds only a few frames (1 to 31) waiting
 * sleeps USEC first, so that one wake-up, one batch and one transmit kick serve many frames
 * instead of one or two -- what a NIC's interrupt moderation does.  A lone frame (latency
 * probes, light traffic) never waits. */
static void rx_coalesce(struct xport *xp)
{
    uint32_t most = 0;
    for (uint32_t i = 0; i < xp->nq; i++) {
        uint32_t a = load_acq(xp->q[i].rx.producer) - *xp->q[i].rx.consumer;
        most = a > most ? a : most;
    }
    if (most == 0)
        return;
    uint64_t now = mono_ns();
    int stream = now - xp->last_rx_ns < 200000;
    xp->last_rx_ns = now;
    if (stream && most < 32) {
        struct timespec ts = {0, (long)xp->coalesce_us * 1000};
        xp->st.rx_coalesced++;
        nanosleep(&ts, NULL);
    }
}

static int xdp_rxsync(struct nmb_port *p)
{
    struct xport *xp = (struct xport *)p;
    int got = 0;
    xp->st.rxsyncs++;
    if (xp->coalesce_us && !xp->fake)
        rx_coalesce(xp);
    for (uint32_t i = 0; i < xp->nq; i++) {
        int rc = rx_ring_sync(xp, i);
        if (rc < 0)
            return rc;
        got |= rc;
    }
    if (!got && !xp->fake && ++xp->idle_rx >= 64) {
        xp->idle_rx = 0;
        clear_socket_errors(xp);
    }
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * TX: netmap slots [hwcur, head) -> XSK TX ring; completion ring -> slots back in order */

static inline int link_gone(int e) { return e == ENETDOWN || e == ENXIO || e == ENODEV; }

/* Ask the kernel to send what the TX ring holds: in copy mode each sendto() sends a budget
 * of frames (32 in Linux 6.x) and says EAGAIN while more wait. */
static void tx_kick(struct xport *xp, struct xq *q)
{
    uint32_t prod = *q->tx.producer;
    for (int tries = 0; tries < 256; tries++) {
        uint32_t before = load_acq(q->tx.consumer);
        if (before == prod)
            return;
        xp->st.tx_kicks++;
        if (sendto(q->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) >= 0) {
            xp->tx_down = 0;
            continue;
        }
        int e = errno;
        if (e == EINTR)
            continue;
        if (e == EBUSY) { /* the device dropped one frame (its buffer completes anyway) */
            xp->st.tx_dev_drops++;
            continue;
        }
        if (e == EAGAIN && load_acq(q->tx.consumer) != before)
            continue;
        if (link_gone(e))
            xp->tx_down = 1;
        else
            xp->st.tx_again++;
        return;
    }
}

/* IFF_UP and IFF_RUNNING (carrier), through an ioctl on one of our sockets */
static int link_running(struct xport *xp)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", xp->ifname);
    if (ioctl(xp->q[0].fd, SIOCGIFFLAGS, &ifr))
        return 1; /* cannot tell: let the next kick say */
    return (ifr.ifr_flags & (IFF_UP | IFF_RUNNING)) == (IFF_UP | IFF_RUNNING);
}

static int tx_ring_sync(struct xport *xp, uint32_t qi)
{
    struct xq *q = &xp->q[qi];
    struct netmap_ring *ring = nmb_txring(xp->port.nifp, qi);
    struct nmb_kring *kr = &q->tx_kr;
    uint32_t n = ring->num_slots;
    char err[NMB_PORT_ERRLEN - 48];
    if (nmb_kring_check(ring, kr, "tx ring", err, sizeof(err)))
        return fail(xp, -EINVAL, err);
    /* completions: mark the slots whose buffers came back */
    uint32_t ccons = *q->cr.consumer, cavail = load_acq(q->cr.producer) - ccons;
    uint64_t *comp = q->cr.desc;
    for (uint32_t i = 0; i < cavail; i++) {
        uint64_t addr = comp[(ccons + i) & q->cr.mask];
        uint64_t b64 = addr / xp->bs;
        uint32_t p = b64 < xp->nbufs ? xp->pos[b64] : POS_NONE, ps = p & 0xffffff;
        if (p == POS_NONE || !(p >> 31) || ((p >> 24) & 0x7f) != qi || ps >= n ||
            q->tx_state[ps] != TX_KERNEL || ring->slot[ps].buf_idx != b64) {
            snprintf(err, sizeof(err), "tx ring %u: the kernel completed address %llu, not a buffer "
                     "in flight on this ring", qi, (unsigned long long)addr);
            store_rel(q->cr.consumer, ccons + i);
            return fail(xp, -EIO, err);
        }
        xp->pos[b64] = POS_NONE;
        q->tx_state[ps] = TX_DONE;
    }
    if (cavail) {
        store_rel(q->cr.consumer, ccons + cavail);
        xp->st.completions += cavail;
    }
    /* new frames */
    uint32_t head = ring->head, s = kr->hwcur, prod = *q->tx.producer, queued = 0;
    struct xdp_desc *txd = q->tx.desc;
    if (xp->tx_down && q->fd >= 0) { /* still down? */
        if (load_acq(q->tx.consumer) != *q->tx.producer)
            tx_kick(xp, q);
        else
            xp->tx_down = !link_running(xp);
    }
    while (s != head) {
        struct netmap_slot *slot = &ring->slot[s];
        uint32_t b = slot->buf_idx, len = slot->len;
        if (b < 2 || b >= xp->nbufs) {
            snprintf(err, sizeof(err), "tx ring %u slot %u: buf_idx %u out of range", qi, s, b);
            return fail(xp, -EINVAL, err);
        }
        if (slot->flags & NS_MOREFRAG) {
            /* no multi-buffer: a chain is dropped whole, once complete */
            uint32_t t = s, nsl = 0;
            int complete = 0;
            while (t != head) {
                nsl++;
                int more = ring->slot[t].flags & NS_MOREFRAG;
                t = nmb_ring_next(ring, t);
                if (!more) {
                    complete = 1;
                    break;
                }
            }
            if (!complete)
                break;
            for (uint32_t i = 0; i < nsl; i++) {
                q->tx_state[s] = TX_DONE;
                s = nmb_ring_next(ring, s);
            }
            xp->st.tx_errors++;
            continue;
        }
        const uint8_t *f = (const uint8_t *)nmb_buf(ring, b);
        if (len < 14 || len > xp->max_frame) {
            xp->st.tx_errors++;
            q->tx_state[s] = TX_DONE;
        } else if (xp->tx_mtu_max && len > xp->tx_mtu_max &&
                   (len > xp->tx_mtu_max + 4 || f[12] != 0x81 || f[13] != 0x00)) {
            xp->st.tx_mtu++; /* larger than the egress MTU allows (+4 for an 802.1Q tag) */
            q->tx_state[s] = TX_DONE;
        } else if (xp->tx_down) {
            xp->st.tx_link_down++;
            q->tx_state[s] = TX_DONE;
        } else {
            struct xdp_desc *d = &txd[prod & q->tx.mask];
            d->addr = (uint64_t)b * xp->bs + NMB_UMEM_BUF_LEAD;
            d->len = len;
            d->options = 0;
            prod++;
            queued++;
            xp->pos[b] = POS(1, qi, s);
            q->tx_state[s] = TX_KERNEL;
            xp->st.tx_frames++;
            xp->st.tx_bytes += len;
        }
        slot->flags = 0;
        s = nmb_ring_next(ring, s);
    }
    kr->hwcur = s;
    if (queued)
        store_rel(q->tx.producer, prod);
    if (q->fd >= 0 && load_acq(q->tx.consumer) != prod &&
        (!xp->need_wakeup || (load_acq(q->tx.flags) & XDP_RING_NEED_WAKEUP)))
        tx_kick(xp, q);
    /* slots come back to the user in ring order */
    uint32_t t = nmb_ring_next(ring, kr->hwtail);
    while (t != kr->hwcur && q->tx_state[t] == TX_DONE) {
        q->tx_state[t] = TX_IDLE;
        kr->hwtail = t;
        t = nmb_ring_next(ring, t);
    }
    ring->tail = kr->hwtail;
    return 0;
}

/* Multi-queue ports are polled through an epoll fd, which reports only readability: while a
 * TX ring is full, its sockets are watched for EPOLLOUT too (the kernel's TX ring has room,
 * i.e. look at the completions again), so a wait for room does not last a poll timeout. */
static void arm_tx_wait(struct xport *xp, int want)
{
    if (want == xp->ep_out)
        return;
    xp->ep_out = want;
    for (uint32_t i = 0; i < xp->nq; i++) {
        struct epoll_event ev = {.events = EPOLLIN | (want ? EPOLLOUT : 0), .data.u32 = i};
        epoll_ctl(xp->epfd, EPOLL_CTL_MOD, xp->q[i].fd, &ev);
    }
}

static int xdp_txsync(struct nmb_port *p)
{
    struct xport *xp = (struct xport *)p;
    int full = 0;
    xp->st.txsyncs++;
    if (xp->dev && coarse_ns() - xp->mtu_read_ns >= MTU_RECHECK_NS)
        xp_read_mtu(xp);
    for (uint32_t i = 0; i < xp->nq; i++) {
        int rc = tx_ring_sync(xp, i);
        if (rc < 0)
            return rc;
        struct netmap_ring *ring = nmb_txring(p->nifp, i);
        full |= ring->tail == ring->head;
    }
    if (xp->epfd >= 0)
        arm_tx_wait(xp, full);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * the XDP program and its link */

static long sys_bpf(int cmd, union bpf_attr *attr)
{
    return syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static int xskmap_create(uint32_t entries)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.map_type = BPF_MAP_TYPE_XSKMAP;
    a.key_size = 4;
    a.value_size = 4;
    a.max_entries = entries;
    strncpy(a.map_name, "nmb_xsks", sizeof(a.map_name) - 1);
    return (int)sys_bpf(BPF_MAP_CREATE, &a);
}

static int xskmap_set(int map_fd, uint32_t key, int fd)
{
    union bpf_attr a;
    uint32_t v = (uint32_t)fd;
    memset(&a, 0, sizeof(a));
    a.map_fd = (uint32_t)map_fd;
    a.key = (uint64_t)(uintptr_t)&key;
    a.value = (uint64_t)(uintptr_t)&v;
    a.flags = BPF_ANY;
    return (int)sys_bpf(BPF_MAP_UPDATE_ELEM, &a);
}

/* return bpf_redirect_map(&xsks, ctx->rx_queue_index, XDP_PASS); */
static int prog_load(int map_fd, char *log, size_t loglen)
{
    struct bpf_insn insns[] = {
        /* r2 = *(u32 *)(r1 + offsetof(struct xdp_md, rx_queue_index)) */
        {.code = BPF_LDX | BPF_MEM | BPF_W, .dst_reg = BPF_REG_2, .src_reg = BPF_REG_1,
         .off = (int16_t)offsetof(struct xdp_md, rx_queue_index)},
        /* r1 = the map (a 16-byte load of an fd the kernel resolves) */
        {.code = BPF_LD | BPF_DW | BPF_IMM, .dst_reg = BPF_REG_1, .src_reg = BPF_PSEUDO_MAP_FD, .imm = map_fd},
        {0},
        /* r3 = XDP_PASS: what the helper returns when the queue has no socket */
        {.code = BPF_ALU64 | BPF_MOV | BPF_K, .dst_reg = BPF_REG_3, .imm = XDP_PASS},
        {.code = BPF_JMP | BPF_CALL, .imm = BPF_FUNC_redirect_map},
        {.code = BPF_JMP | BPF_EXIT},
    };
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.prog_type = BPF_PROG_TYPE_XDP;
    a.expected_attach_type = BPF_XDP;
    a.insns = (uint64_t)(uintptr_t)insns;
    a.insn_cnt = sizeof(insns) / sizeof(insns[0]);
    a.license = (uint64_t)(uintptr_t)"Dual BSD/GPL";
    a.log_buf = (uint64_t)(uintptr_t)log;
    a.log_size = (uint32_t)loglen;
    a.log_level = 1;
    strncpy(a.prog_name, "nmb_xsk_redir", sizeof(a.prog_name) - 1);
    log[0] = 0;
    int fd = (int)sys_bpf(BPF_PROG_LOAD, &a);
    if (fd < 0 && errno == ENOSPC) { /* log too small: retry without it */
        int e = errno;
        a.log_level = 0;
        a.log_buf = 0;
        a.log_size = 0;
        fd = (int)sys_bpf(BPF_PROG_LOAD, &a);
        if (fd < 0)
            errno = e;
    }
    return fd;
}

static int link_create(int prog_fd, int ifindex, uint32_t flags)
{
    union bpf_attr a;
    memset(&a, 0, sizeof(a));
    a.link_create.prog_fd = (uint32_t)prog_fd;
    a.link_create.target_ifindex = (uint32_t)ifindex;
    a.link_create.attach_type = BPF_XDP;
    a.link_create.flags = flags;
    return (int)sys_bpf(BPF_LINK_CREATE, &a);
}

/* ---------------------------------------------------------------------------------------
 * sockets */

static void xring_unmap(struct xring *r, int fake)
{
    if (r->map && r->map != MAP_FAILED) {
        if (fake)
            free(r->map);
        else
            munmap(r->map, r->map_len);
    }
    r->map = NULL;
}

static int xring_map(int fd, struct xring *r, const struct xdp_ring_offset *off, uint32_t size,
                     size_t desc_size, off_t pgoff)
{
    r->map_len = off->desc + size * desc_size;
    r->map = mmap(NULL, r->map_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, pgoff);
    if (r->map == MAP_FAILED) {
        r->map = NULL;
        return -1;
    }
    r->producer = (uint32_t *)((char *)r->map + off->producer);
    r->consumer = (uint32_t *)((char *)r->map + off->consumer);
    r->flags = (uint32_t *)((char *)r->map + off->flags);
    r->desc = (char *)r->map + off->desc;
    r->size = size;
    r->mask = size - 1;
    return 0;
}

static void xq_close(struct xq *q, int fake)
{
    xring_unmap(&q->rx, fake);
    xring_unmap(&q->tx, fake);
    xring_unmap(&q->fr, fake);
    xring_unmap(&q->cr, fake);
    if (q->fd >= 0)
        close(q->fd);
    q->fd = -1;
}

/* a bound socket of another open queue on region m with the same binding kind, or -1: of an
 * open port, or of the ports being opened with this one (sib[0..nsib)) */
static int shared_umem_fd(struct xport *const *sib, uint32_t nsib, nmb_umem *m, int zc)
{
    for (struct xport *o = ports; o; o = o->next)
        if (o->mem == m && !o->fake)
            for (uint32_t i = 0; i < o->nq; i++)
                if (o->q[i].fd >= 0 && o->q[i].zc == zc && o->q[i].rx.map)
                    return o->q[i].fd;
    for (uint32_t k = 0; k < nsib; k++)
        for (uint32_t i = 0; sib[k] && i < sib[k]->nq; i++)
            if (sib[k]->q[i].fd >= 0 && sib[k]->q[i].zc == zc && sib[k]->q[i].rx.map)
                return sib[k]->q[i].fd;
    return -1;
}

static uint32_t pow2_at_least(uint32_t v)
{
    uint32_t p = 64;
    while (p < v)
        p <<= 1;
    return p;
}

/* Open, map and bind the socket of queue qi; zc: XDP_ZEROCOPY (or share a zero-copy UMEM).
 * 0, or -1 with the reason in err. */
static int xq_open(struct xport *const *sib, uint32_t nsib, struct xport *xp, uint32_t qi, int zc,
                   uint32_t ring_size, char *err, size_t errlen)
{
    struct xq *q = &xp->q[qi];
    q->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
    if (q->fd < 0) {
        if (errno == EAFNOSUPPORT)
            snprintf(err, errlen, "this kernel has no AF_XDP (CONFIG_XDP_SOCKETS)");
        else if (errno == EPERM || errno == EACCES)
            snprintf(err, errlen, "an AF_XDP socket needs CAP_NET_RAW");
        else
            snprintf(err, errlen, "socket(AF_XDP): %s", strerror(errno));
        return -1;
    }
    q->zc = zc;
    pthread_mutex_lock(&ports_lock);
    int share = shared_umem_fd(sib, nsib, xp->mem, zc);
    pthread_mutex_unlock(&ports_lock);
    if (share < 0) {
        struct xdp_umem_reg mr;
        memset(&mr, 0, sizeof(mr));
        mr.addr = (uint64_t)(uintptr_t)(nmb_umem_bufs(xp->mem) - NMB_UMEM_BUF_LEAD);
        mr.len = (uint64_t)xp->nbufs * xp->bs;
        mr.chunk_size = xp->bs;
        mr.headroom = 0;
        if (setsockopt(q->fd, SOL_XDP, XDP_UMEM_REG, &mr, sizeof(mr))) {
            if (errno == ENOBUFS || errno == ENOMEM || errno == EPERM)
                snprintf(err, errlen, "registering %llu bytes of buffers as the UMEM: %s (locked memory: "
                         "raise RLIMIT_MEMLOCK, e.g. LimitMEMLOCK=infinity, or grant CAP_IPC_LOCK)",
                         (unsigned long long)mr.len, strerror(errno));
            else
                snprintf(err, errlen, "XDP_UMEM_REG: %s", strerror(errno));
            return -1;
        }
    }
    uint32_t sz = ring_size;
    if (setsockopt(q->fd, SOL_XDP, XDP_UMEM_FILL_RING, &sz, sizeof(sz)) ||
        setsockopt(q->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &sz, sizeof(sz)) ||
        setsockopt(q->fd, SOL_XDP, XDP_RX_RING, &sz, sizeof(sz)) ||
        setsockopt(q->fd, SOL_XDP, XDP_TX_RING, &sz, sizeof(sz))) {
        snprintf(err, errlen, "XSK rings of %u entries: %s", sz, strerror(errno));
        return -1;
    }
    struct xdp_mmap_offsets off;
    socklen_t ol = sizeof(off);
    if (getsockopt(q->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &ol)) {
        snprintf(err, errlen, "XDP_MMAP_OFFSETS: %s", strerror(errno));
        return -1;
    }
    if (xring_map(q->fd, &q->rx, &off.rx, sz, sizeof(struct xdp_desc), XDP_PGOFF_RX_RING) ||
        xring_map(q->fd, &q->tx, &off.tx, sz, sizeof(struct xdp_desc), XDP_PGOFF_TX_RING) ||
        xring_map(q->fd, &q->fr, &off.fr, sz, sizeof(uint64_t), XDP_UMEM_PGOFF_FILL_RING) ||
        xring_map(q->fd, &q->cr, &off.cr, sz, sizeof(uint64_t), XDP_UMEM_PGOFF_COMPLETION_RING)) {
        snprintf(err, errlen, "mmap of the XSK rings: %s", strerror(errno));
        return -1;
    }
    if (xp->busy_poll_us) {
        int one = 1, us = (int)xp->busy_poll_us, budget = (int)xp->busy_budget;
        if (setsockopt(q->fd, SOL_SOCKET, SO_PREFER_BUSY_POLL, &one, sizeof(one)) ||
            setsockopt(q->fd, SOL_SOCKET, SO_BUSY_POLL, &us, sizeof(us)) ||
            (budget && setsockopt(q->fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget, sizeof(budget)))) {
            snprintf(err, errlen, "busy_poll: SO_PREFER_BUSY_POLL/SO_BUSY_POLL%s: %s%s",
                     budget ? "/SO_BUSY_POLL_BUDGET" : "", strerror(errno),
                     errno == EPERM ? " (a budget over the default needs CAP_NET_ADMIN)" : "");
            return -1;
        }
    }
    struct sockaddr_xdp sa;
    memset(&sa, 0, sizeof(sa));
    sa.sxdp_family = AF_XDP;
    sa.sxdp_ifindex = (uint32_t)xp->ifindex;
    sa.sxdp_queue_id = q->qid;
    q->shared = share >= 0;
    if (share >= 0) {
        sa.sxdp_flags = XDP_SHARED_UMEM; /* the kernel copies the UMEM's zc/copy and wakeup flags */
        sa.sxdp_shared_umem_fd = (uint32_t)share;
    } else {
        sa.sxdp_flags = (zc ? XDP_ZEROCOPY : XDP_COPY) | (xp->need_wakeup ? XDP_USE_NEED_WAKEUP : 0);
    }
    if (bind(q->fd, (struct sockaddr *)&sa, sizeof(sa))) {
        int e = errno;
        if (e == EBUSY)
            snprintf(err, errlen, "queue %u is already bound by another AF_XDP socket", q->qid);
        else
            snprintf(err, errlen, "bind to queue %u%s%s: %s", q->qid, zc ? " in zero-copy mode" : "",
                     share >= 0 ? " (shared UMEM)" : "", strerror(e));
        errno = e;
        return -1;
    }
    return 0;
}

/* whether an open port of this process has a socket on queue qid of interface ifindex */
static int queue_held_here(int ifindex, uint32_t qid)
{
    int held = 0;
    pthread_mutex_lock(&ports_lock);
    for (struct xport *o = ports; o && !held; o = o->next)
        if (!o->fake && o->ifindex == ifindex)
            for (uint32_t i = 0; i < o->nq; i++)
                held |= o->q[i].fd >= 0 && o->q[i].qid == qid;
    pthread_mutex_unlock(&ports_lock);
    return held;
}

/* xq_open, waiting out a queue that a socket closed a moment ago still holds: the kernel
 * gives the queue back only when that socket's deferred release has run (an RCU grace period,
 * then a work item; measured here: ~50 ms under load), and bind says EBUSY until then.  A
 * reload or a relink that re-opens a port on the same queues meets exactly that.  A queue an
 * open port of ours holds is refused at once (the caller closes that port and tries again). */
#define BIND_BUSY_WAIT_MS 2000
#define BIND_BUSY_STEP_MS 5
static int xq_open_settled(struct xport *const *sib, uint32_t nsib, struct xport *xp, uint32_t qi, int zc,
                           uint32_t ring_size, char *err, size_t errlen)
{
    for (int waited = 0;; waited += BIND_BUSY_STEP_MS) {
        if (xq_open(sib, nsib, xp, qi, zc, ring_size, err, errlen) == 0)
            return 0;
        if (errno != EBUSY || waited >= BIND_BUSY_WAIT_MS || queue_held_here(xp->ifindex, xp->q[qi].qid))
            return -1;
        xq_close(&xp->q[qi], 0);
        struct timespec ts = {0, BIND_BUSY_STEP_MS * 1000000L};
        nanosleep(&ts, NULL);
    }
}

/* ---------------------------------------------------------------------------------------
 * open / close */

static void xp_free(struct xport *xp)
{
    if (!xp)
        return;
    pthread_mutex_lock(&ports_lock);
    for (struct xport **pp = &ports; *pp; pp = &(*pp)->next)
        if (*pp == xp) {
            *pp = xp->next;
            break;
        }
    struct xdev *dev = xp->dev;
    int last = dev && --dev->refs == 0;
    pthread_mutex_unlock(&ports_lock);
    /* the program first (with the last share): from now on the interface's frames go to the
     * stack again; before that, a closed socket leaves the XSKMAP and its queue's frames pass */
    if (last) {
        if (dev->link_fd >= 0)
            close(dev->link_fd);
        if (dev->prog_fd >= 0)
            close(dev->prog_fd);
        if (dev->map_fd >= 0)
            close(dev->map_fd);
        if (dev->promisc_fd >= 0)
            close(dev->promisc_fd);
        if (dev->ctl_fd >= 0)
            close(dev->ctl_fd);
        free(dev);
    }
    if (xp->epfd >= 0 && xp->epfd != xp->port.fd)
        close(xp->epfd);
    for (uint32_t i = 0; xp->q && i < xp->nq; i++) {
        xq_close(&xp->q[i], xp->fake);
        free(xp->q[i].tx_state);
    }
    free(xp->q);
    free(xp->pos);
    if (xp->port.nifp)
        nmb_umem_if_destroy(xp->mem, xp->port.nifp);
    free(xp);
}

/* Through ioctls on a socket of the calling thread's network namespace (/sys shows the
 * namespace of whoever mounted it, not necessarily ours). */
static int read_mtu(const char *ifname)
{
    struct ifreq ifr;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), mtu = -1;
    if (fd < 0)
        return -1;
    memset(&ifr, 0, sizeof(ifr));
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
    if (ioctl(fd, SIOCGIFMTU, &ifr) == 0)
        mtu = ifr.ifr_mtu;
    close(fd);
    return mtu;
}

/* receive queues: ETHTOOL_GCHANNELS (rx + combined); 1 when the driver does not say */
static int count_rx_queues(const char *ifname)
{
    struct ifreq ifr;
    struct ethtool_channels ch;
    int fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0), n = 1;
    if (fd < 0)
        return 1;
    memset(&ifr, 0, sizeof(ifr));
    memset(&ch, 0, sizeof(ch));
    ch.cmd = ETHTOOL_GCHANNELS;
    snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", ifname);
    ifr.ifr_data = (void *)&ch;
    if (ioctl(fd, SIOCETHTOOL, &ifr) == 0 && ch.rx_count + ch.combined_count > 0)
        n = (int)(ch.rx_count + ch.combined_count);
    close(fd);
    return n;
}

static const char *mode_name(int m)
{
    return m == NMB_AFXDP_MODE_ZC ? "zc" : m == NMB_AFXDP_MODE_NATIVE ? "native" : "skb";
}

static struct xport *xp_alloc(nmb_umem *m, const char *ifname)
{
    struct xport *xp = calloc(1, sizeof(*xp));
    if (!xp)
        return NULL;
    xp->mem = m;
    snprintf(xp->ifname, sizeof(xp->ifname), "%s", ifname);
    xp->epfd = -1;
    xp->port.fd = -1;
    xp->bs = nmb_umem_buf_size(m);
    xp->nbufs = nmb_umem_nbufs(m);
    xp->max_frame = xp->bs - NMB_UMEM_BUF_LEAD;
    return xp;
}

/* rings, buffer map and the netmap side: common to the real and the fake port */
static int xp_layout(struct xport *xp, uint32_t nq, uint32_t first_qid, uint32_t qid_step, uint32_t slots,
                     char *err, size_t errlen)
{
    xp->nq = nq;
    xp->q = calloc(nq, sizeof(*xp->q));
    xp->pos = malloc(sizeof(uint32_t) * xp->nbufs);
    if (!xp->q || !xp->pos) {
        snprintf(err, errlen, "out of memory");
        return -1;
    }
    memset(xp->pos, 0xff, sizeof(uint32_t) * xp->nbufs);
    for (uint32_t i = 0; i < nq; i++) {
        xp->q[i].fd = -1;
        xp->q[i].qid = first_qid + i * qid_step;
        xp->q[i].tx_state = calloc(slots, 1);
        if (!xp->q[i].tx_state) {
            snprintf(err, errlen, "out of memory");
            return -1;
        }
        xp->q[i].tx_kr.hwcur = 0;
        xp->q[i].tx_kr.hwtail = slots - 1;
        xp->q[i].rx_kr.hwcur = xp->q[i].rx_kr.hwtail = 0;
    }
    xp->port.nifp = nmb_umem_if_create(xp->mem, xp->ifname, nq, nq, slots, slots);
    if (!xp->port.nifp) {
        snprintf(err, errlen, "cannot lay out %u ring pairs of %u slots in the memory region: %s", nq, slots,
                 errno == ENOBUFS ? "not enough free buffers" : strerror(errno));
        return -1;
    }
    xp->port.tx_first = xp->port.rx_first = 0;
    xp->port.tx_last = xp->port.rx_last = nq;
    xp->port.poll_syncs = 0;
    xp->port.mem_key = (uint64_t)(uintptr_t)xp->mem;
    xp->port.rxsync = xdp_rxsync;
    xp->port.txsync = xdp_txsync;
    xp->port.priv = xp;
    return 0;
}

/* Close every port of an open that failed, then say why. */
#define OPEN_FAIL(...)                                                                             \
    do {                                                                                           \
        snprintf(err, errlen, __VA_ARGS__);                                                        \
        goto fail;                                                                                 \
    } while (0)

/* Open the interface's sockets as `shares` ports: share w gets queues w, w + shares, ... (its
 * rings 0, 1, ...); all in one UMEM; one XSKMAP, program and link for the interface. */
static int open_shares(nmb_umem *m, const char *ifname, const struct nmb_afxdp_opts *o, uint32_t shares,
                       struct xport **xs, char *err, size_t errlen)
{
    char why[256];
    long page = sysconf(_SC_PAGESIZE);
    struct xdev *dev = NULL;
    uint32_t made = 0;
    if (!ifname[0] || strlen(ifname) >= IFNAMSIZ) {
        snprintf(err, errlen, "an interface name has 1 to %d bytes", IFNAMSIZ - 1);
        return -1;
    }
    uint32_t bs = nmb_umem_buf_size(m);
    if ((bs != 2048 && bs != 4096) || bs > (uint32_t)page) {
        snprintf(err, errlen, "AF_XDP needs the region's buffers to be 2048 or 4096 bytes (a UMEM chunk); "
                 "they are %u (bridge buf_size)", bs);
        return -1;
    }
    if (((uintptr_t)(nmb_umem_bufs(m) - NMB_UMEM_BUF_LEAD)) % (uintptr_t)page) {
        snprintf(err, errlen, "the region's buffers do not start %d bytes into a page", NMB_UMEM_BUF_LEAD);
        return -1;
    }
    if (o->slots < 2 || o->slots > (1u << 20)) {
        snprintf(err, errlen, "slots must be 2 to %u", 1u << 20);
        return -1;
    }
    int ifindex = (int)if_nametoindex(ifname);
    if (ifindex == 0)
        OPEN_FAIL("%s", errno == ENODEV || errno == ENXIO ? "no such interface" : strerror(errno));
    uint32_t max_frame = bs - NMB_UMEM_BUF_LEAD;
    int mtu = read_mtu(ifname);
    if (mtu > 0 && (uint64_t)mtu + 14 + 8 > max_frame)
        OPEN_FAIL("MTU %d is too large: a frame (MTU + 14, + 8 for two VLAN tags) must fit one %u-byte "
                  "buffer less 256 bytes of XDP headroom (%u); multi-buffer AF_XDP is not supported: "
                  "lower the MTU or use buf_size = 4096", mtu, bs, max_frame);
    int have = nmb_afxdp_count_queues(ifname);
    uint32_t nq = o->queues ? o->queues : (uint32_t)have;
    if (nq > NMB_AFXDP_MAX_QUEUES)
        OPEN_FAIL("%u receive queues: at most %d are supported", nq, NMB_AFXDP_MAX_QUEUES);
    if (nq < (uint32_t)have)
        OPEN_FAIL("queues=%u binds %u of the %d receive queues: frames of the others would reach the host "
                  "stack behind the bridge's back; bind all (queues=%d) or reduce them (ethtool -L %s "
                  "combined %u)", nq, nq, have, have, ifname, nq);
    if (nq > (uint32_t)have)
        OPEN_FAIL("queues=%u, but the interface has %d receive queues", nq, have);
    if (shares < 1 || shares > nq)
        OPEN_FAIL("cannot be split into %u shares: it has %u ring pairs (one per receive queue; more with "
                  "ethtool -L %s combined N)", shares, nq, ifname);
    dev = calloc(1, sizeof(*dev));
    if (!dev)
        OPEN_FAIL("out of memory");
    dev->map_fd = dev->prog_fd = dev->link_fd = dev->promisc_fd = -1;
    dev->ctl_fd = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0); /* -1: the MTU is not checked */
    for (made = 0; made < shares; made++) {
        struct xport *xp = xs[made] = xp_alloc(m, ifname);
        if (!xp)
            OPEN_FAIL("out of memory");
        xp->dev = dev;
        dev->refs++; /* not yet visible to any other thread */
        xp->ifindex = ifindex;
        xp_read_mtu(xp);
        xp->need_wakeup = o->need_wakeup;
        xp->csum_fix = o->csum_fix;
        xp->busy_poll_us = o->busy_poll_us;
        xp->busy_budget = o->busy_budget;
        xp->port.spin_us = o->busy_poll_us;
        xp->coalesce_us = o->rx_coalesce_us;
        uint32_t mine = (nq - made + shares - 1) / shares; /* queues made, made + shares, ... below nq */
        if (xp_layout(xp, mine, made, shares, o->slots, why, sizeof(why)))
            OPEN_FAIL("%s", why);
    }
    uint32_t rs = pow2_at_least(o->slots);
    /* sockets: zero-copy first unless told otherwise; the first socket decides for the rest */
    int zc = o->mode == NMB_AFXDP_MODE_AUTO || o->mode == NMB_AFXDP_MODE_ZC;
    char reason[160] = "";
    for (uint32_t w = 0; w < shares; w++) {
        struct xport *xp = xs[w];
        for (uint32_t i = 0; i < xp->nq; i++) {
            if (xq_open_settled(xs, shares, xp, i, zc, rs, why, sizeof(why)) == 0)
                continue;
            int e = errno;
            xq_close(&xp->q[i], 0);
            if (w == 0 && i == 0 && zc && o->mode == NMB_AFXDP_MODE_AUTO && e != EBUSY && e != EPERM &&
                e != EAFNOSUPPORT && e != EACCES) {
                snprintf(reason, sizeof(reason), "the driver has no AF_XDP zero-copy (XDP_ZEROCOPY bind: %s)",
                         strerror(e));
                zc = 0;
                if (xq_open_settled(xs, shares, xp, i, 0, rs, why, sizeof(why)) == 0)
                    continue;
                xq_close(&xp->q[i], 0);
            }
            if (zc && o->mode == NMB_AFXDP_MODE_ZC && (e == EOPNOTSUPP || e == EINVAL))
                OPEN_FAIL("mode=zc: the driver has no AF_XDP zero-copy (%s)", why);
            OPEN_FAIL("%s", why);
        }
        /* the initial fill: every slot of the NIC's part */
        for (uint32_t i = 0; i < xp->nq; i++) {
            struct xq *q = &xp->q[i];
            struct netmap_ring *ring = nmb_rxring(xp->port.nifp, i);
            uint32_t prod = *q->fr.producer;
            for (uint32_t sl = 0; sl + 1 < ring->num_slots; sl++) {
                uint32_t b = ring->slot[sl].buf_idx;
                xp->pos[b] = POS(0, i, sl);
                ((uint64_t *)q->fr.desc)[prod++ & q->fr.mask] = (uint64_t)b * bs;
            }
            store_rel(q->fr.producer, prod);
        }
    }
    dev->map_fd = xskmap_create(nq);
    if (dev->map_fd < 0)
        OPEN_FAIL("creating the XSKMAP: %s%s", strerror(errno),
                  errno == EPERM ? " (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)" : "");
    for (uint32_t w = 0; w < shares; w++)
        for (uint32_t i = 0; i < xs[w]->nq; i++)
            if (xskmap_set(dev->map_fd, xs[w]->q[i].qid, xs[w]->q[i].fd))
                OPEN_FAIL("adding queue %u's socket to the XSKMAP: %s", xs[w]->q[i].qid, strerror(errno));
    char log[2048];
    dev->prog_fd = prog_load(dev->map_fd, log, sizeof(log));
    if (dev->prog_fd < 0)
        OPEN_FAIL("loading the XDP program: %s%s%s", strerror(errno),
                  errno == EPERM ? " (needs CAP_BPF and CAP_NET_ADMIN, or CAP_SYS_ADMIN)" : "",
                  log[0] ? "; verifier: " : "");
    /* driver XDP unless told skb; generic as the fallback (copy sockets only) */
    int native = o->mode != NMB_AFXDP_MODE_SKB;
    if (native) {
        dev->link_fd = link_create(dev->prog_fd, ifindex, XDP_FLAGS_DRV_MODE);
        if (dev->link_fd < 0) {
            int e = errno;
            if (e == EBUSY || e == EEXIST)
                OPEN_FAIL("the interface already has an XDP program (see `ip link show %s`; remove it with "
                          "`ip link set dev %s xdp off`)", ifname, ifname);
            if (e == EPERM)
                OPEN_FAIL("attaching the XDP program needs CAP_NET_ADMIN (and CAP_BPF)");
            if (o->mode != NMB_AFXDP_MODE_AUTO || zc)
                OPEN_FAIL("driver-mode XDP: %s", strerror(e));
            snprintf(reason + strlen(reason), sizeof(reason) - strlen(reason), "%sno driver-mode XDP: %s",
                     reason[0] ? "; " : "", strerror(e));
            native = 0;
        }
    }
    if (!native) {
        dev->link_fd = link_create(dev->prog_fd, ifindex, XDP_FLAGS_SKB_MODE);
        if (dev->link_fd < 0) {
            int e = errno;
            if (e == EBUSY || e == EEXIST)
                OPEN_FAIL("the interface already has an XDP program (see `ip link show %s`; remove it with "
                          "`ip link set dev %s xdp off`)", ifname, ifname);
            OPEN_FAIL("attaching the XDP program (generic mode): %s", strerror(e));
        }
    }
    if (o->promisc) {
        /* an AF_PACKET socket that receives nothing (protocol 0, unbound) but holds the
         * interface promiscuous; the kernel undoes it when the socket goes, even on SIGKILL */
        dev->promisc_fd = socket(AF_PACKET, SOCK_RAW | SOCK_CLOEXEC, 0);
        struct packet_mreq mr;
        memset(&mr, 0, sizeof(mr));
        mr.mr_ifindex = ifindex;
        mr.mr_type = PACKET_MR_PROMISC;
        if (dev->promisc_fd < 0 ||
            setsockopt(dev->promisc_fd, SOL_PACKET, PACKET_ADD_MEMBERSHIP, &mr, sizeof(mr)))
            OPEN_FAIL("promiscuous mode (PACKET_MR_PROMISC): %s", strerror(errno));
    }
    for (uint32_t w = 0; w < shares; w++) {
        struct xport *xp = xs[w];
        xp->mode = zc ? NMB_AFXDP_MODE_ZC : native ? NMB_AFXDP_MODE_NATIVE : NMB_AFXDP_MODE_SKB;
        snprintf(xp->mode_reason, sizeof(xp->mode_reason), "%s", reason);
        if (xp->nq == 1) {
            xp->port.fd = xp->q[0].fd;
            continue;
        }
        xp->epfd = epoll_create1(EPOLL_CLOEXEC);
        if (xp->epfd < 0)
            OPEN_FAIL("epoll_create1: %s", strerror(errno));
        for (uint32_t i = 0; i < xp->nq; i++) {
            struct epoll_event ev = {.events = EPOLLIN, .data.u32 = i};
            if (epoll_ctl(xp->epfd, EPOLL_CTL_ADD, xp->q[i].fd, &ev))
                OPEN_FAIL("epoll_ctl: %s", strerror(errno));
        }
        xp->port.fd = xp->epfd;
    }
    pthread_mutex_lock(&ports_lock);
    for (uint32_t w = 0; w < shares; w++) {
        xs[w]->next = ports;
        ports = xs[w];
    }
    pthread_mutex_unlock(&ports_lock);
    return 0;
fail:
    /* xs[0..made] may be allocated (xs[made] when its layout failed); the last one freed frees
     * dev, unless none was made */
    if (dev && dev->refs == 0)
        free(dev);
    for (uint32_t w = 0; w <= made && w < shares; w++)
        if (xs[w])
            xp_free(xs[w]);
    return -1;
}

int nmb_afxdp_count_queues(const char *ifname)
{
    int n = count_rx_queues(ifname);
    return n < 1 ? 1 : n;
}

struct nmb_port *nmb_afxdp_open(nmb_umem *m, const char *ifname, const struct nmb_afxdp_opts *o,
                                char *err, size_t errlen)
{
    struct xport *xp = NULL;
    if (open_shares(m, ifname, o, 1, &xp, err, errlen))
        return NULL;
    return &xp->port;
}

int nmb_afxdp_open_shares(nmb_umem *m, const char *ifname, const struct nmb_afxdp_opts *o, uint32_t shares,
                          struct nmb_port **out, char *err, size_t errlen)
{
    struct xport *xs[NMB_AFXDP_MAX_QUEUES];
    if (shares < 1 || shares > NMB_AFXDP_MAX_QUEUES) {
        snprintf(err, errlen, "%u shares: 1 to %d are possible", shares, NMB_AFXDP_MAX_QUEUES);
        return -1;
    }
    memset(xs, 0, sizeof(xs));
    if (open_shares(m, ifname, o, shares, xs, err, errlen))
        return -1;
    for (uint32_t w = 0; w < shares; w++)
        out[w] = &xs[w]->port;
    return 0;
}

uint32_t nmb_afxdp_queue_id(struct nmb_port *p, uint32_t ring)
{
    struct xport *xp = (struct xport *)p;
    return ring < xp->nq ? xp->q[ring].qid : UINT32_MAX;
}

void nmb_afxdp_close(struct nmb_port *p)
{
    if (p)
        xp_free((struct xport *)p);
}

const void *nmb_afxdp_counters(struct nmb_port *p, size_t *len)
{
    *len = sizeof(((struct xport *)p)->st);
    return &((struct xport *)p)->st;
}

void nmb_afxdp_get_stats(struct nmb_port *p, struct nmb_afxdp_stats *out)
{
    struct xport *xp = (struct xport *)p;
    *out = xp->st;
    for (uint32_t i = 0; i < xp->nq; i++) {
        struct xdp_statistics ks;
        socklen_t l = sizeof(ks);
        if (xp->q[i].fd < 0 || getsockopt(xp->q[i].fd, SOL_XDP, XDP_STATISTICS, &ks, &l))
            continue;
        /* the kernel's rx_dropped also counts each frame that found the fill ring empty:
         * count that reason once, under rx_fill_empty */
        out->rx_kernel_drops += ks.rx_dropped > ks.rx_fill_ring_empty_descs
                                    ? ks.rx_dropped - ks.rx_fill_ring_empty_descs : 0;
        out->rx_ring_full += ks.rx_ring_full;
        out->rx_fill_empty += ks.rx_fill_ring_empty_descs;
        out->tx_invalid += ks.tx_invalid_descs;
    }
}

int nmb_afxdp_ifindex(struct nmb_port *p) { return ((struct xport *)p)->ifindex; }
int nmb_afxdp_mode(struct nmb_port *p) { return ((struct xport *)p)->mode; }
const char *nmb_afxdp_mode_reason(struct nmb_port *p) { return ((struct xport *)p)->mode_reason; }
uint32_t nmb_afxdp_queues(struct nmb_port *p) { return ((struct xport *)p)->nq; }

uint32_t nmb_afxdp_shared_sockets(struct nmb_port *p)
{
    struct xport *xp = (struct xport *)p;
    uint32_t n = 0;
    for (uint32_t i = 0; i < xp->nq; i++)
        n += xp->q[i].shared != 0;
    return n;
}


int nmb_afxdp_check(struct nmb_port *p)
{
    struct xport *xp = (struct xport *)p;
    char err[NMB_PORT_ERRLEN - 48];
    for (uint32_t i = 0; i < xp->nq; i++)
        if (nmb_kring_check(nmb_txring(p->nifp, i), &xp->q[i].tx_kr, "tx ring", err, sizeof(err)) ||
            nmb_kring_check(nmb_rxring(p->nifp, i), &xp->q[i].rx_kr, "rx ring", err, sizeof(err)))
            return fail(xp, -1, err);
    return 0;
}

/* ---------------------------------------------------------------------------------------
 * a fake kernel for the ownership tests: the same sync code over rings in plain memory */

static int fake_ring(struct xring *r, uint32_t size, size_t desc_size)
{
    r->map = calloc(1, 3 * 64 + (size_t)size * desc_size);
    if (!r->map)
        return -1;
    r->producer = (uint32_t *)r->map;
    r->consumer = (uint32_t *)((char *)r->map + 64);
    r->flags = (uint32_t *)((char *)r->map + 128);
    r->desc = (char *)r->map + 192;
    r->size = size;
    r->mask = size - 1;
    return 0;
}

struct nmb_port *nmb_afxdp_open_fake(nmb_umem *m, const char *name, uint32_t slots, char *err, size_t errlen)
{
    struct xport *xp = xp_alloc(m, name);
    if (!xp) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    xp->fake = 1;
    xp->mode = NMB_AFXDP_MODE_NATIVE;
    if (xp_layout(xp, 1, 0, 1, slots, err, errlen)) {
        xp_free(xp);
        return NULL;
    }
    uint32_t rs = pow2_at_least(slots);
    struct xq *q = &xp->q[0];
    if (fake_ring(&q->rx, rs, sizeof(struct xdp_desc)) || fake_ring(&q->tx, rs, sizeof(struct xdp_desc)) ||
        fake_ring(&q->fr, rs, sizeof(uint64_t)) || fake_ring(&q->cr, rs, sizeof(uint64_t))) {
        snprintf(err, errlen, "out of memory");
        xp_free(xp);
        return NULL;
    }
    struct netmap_ring *ring = nmb_rxring(xp->port.nifp, 0);
    for (uint32_t s = 0; s + 1 < ring->num_slots; s++) {
        uint32_t b = ring->slot[s].buf_idx;
        xp->pos[b] = POS(0, 0, s);
        ((uint64_t *)q->fr.desc)[(*q->fr.producer)++ & q->fr.mask] = (uint64_t)b * xp->bs;
    }
    return &xp->port;
}

/* The fake kernel acts: receive up to `rx` frames of `len` bytes (taking fill entries; a
 * `perm` entry != 0 delivers the fill entries in a rotated order), transmit and complete up
 * to `tx` frames (completing in reverse order when `perm` is odd).  Returns frames moved. */
uint32_t nmb_afxdp_fake_kernel(struct nmb_port *p, uint32_t rx, uint32_t tx, uint32_t len, uint32_t perm,
                               uint8_t *seen, uint32_t seen_len)
{
    struct xport *xp = (struct xport *)p;
    struct xq *q = &xp->q[0];
    uint32_t moved = 0;
    /* receive: take k fill entries, deliver them rotated by perm % k */
    uint32_t fc = *q->fr.consumer, fav = *q->fr.producer - fc;
    uint32_t rp = *q->rx.producer, rroom = q->rx.size - (rp - *q->rx.consumer);
    uint32_t k = rx < fav ? rx : fav;
    if (k > rroom)
        k = rroom;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t j = k ? (i + perm) % k : 0;
        uint64_t a = ((uint64_t *)q->fr.desc)[(fc + j) & q->fr.mask];
        struct xdp_desc *d = &((struct xdp_desc *)q->rx.desc)[(rp + i) & q->rx.mask];
        d->addr = (a / xp->bs) * xp->bs + NMB_UMEM_BUF_LEAD;
        d->len = len;
        d->options = 0;
        char *buf = nmb_umem_bufs(xp->mem) + (a / xp->bs) * xp->bs;
        memset(buf, 0, len);
        memcpy(buf, &xp->fake_seq, sizeof(xp->fake_seq));
        xp->fake_seq++;
        moved++;
    }
    *q->fr.consumer = fc + k;
    *q->rx.producer = rp + k;
    /* transmit: consume k TX descriptors, record their first word, complete them */
    uint32_t tc = *q->tx.consumer, tav = *q->tx.producer - tc;
    uint32_t cp = *q->cr.producer, croom = q->cr.size - (cp - *q->cr.consumer);
    k = tx < tav ? tx : tav;
    if (k > croom)
        k = croom;
    for (uint32_t i = 0; i < k; i++) {
        uint32_t j = (perm & 1) ? k - 1 - i : i;
        struct xdp_desc *d = &((struct xdp_desc *)q->tx.desc)[(tc + j) & q->tx.mask];
        uint32_t id;
        memcpy(&id, nmb_umem_bufs(xp->mem) + (d->addr - NMB_UMEM_BUF_LEAD), sizeof(id));
        if (seen && id < seen_len)
            seen[id]++;
        ((uint64_t *)q->cr.desc)[(cp + i) & q->cr.mask] = d->addr;
        moved++;
    }
    *q->tx.consumer = tc + k;
    *q->cr.producer = cp + k;
    return moved;
}

/* Buffers the fake kernel holds right now: on the RX side fill ring entries not yet consumed
 * and RX descriptors not yet read; on the TX side TX descriptors and completions not yet reaped: the test checks these plus
 * the region's slots and free pool account for every buffer. */
uint32_t nmb_afxdp_fake_held(struct nmb_port *p, int tx_side, uint32_t *out, uint32_t max)
{
    struct xport *xp = (struct xport *)p;
    struct xq *q = &xp->q[0];
    uint32_t n = 0;
    if (!tx_side) {
        for (uint32_t i = *q->fr.consumer; i != *q->fr.producer && n < max; i++)
            out[n++] = (uint32_t)(((uint64_t *)q->fr.desc)[i & q->fr.mask] / xp->bs);
        for (uint32_t i = *q->rx.consumer; i != *q->rx.producer && n < max; i++)
            out[n++] = (uint32_t)(((struct xdp_desc *)q->rx.desc)[i & q->rx.mask].addr / xp->bs);
        return n;
    }
    for (uint32_t i = *q->tx.consumer; i != *q->tx.producer && n < max; i++)
        out[n++] = (uint32_t)(((struct xdp_desc *)q->tx.desc)[i & q->tx.mask].addr / xp->bs);
    for (uint32_t i = *q->cr.consumer; i != *q->cr.producer && n < max; i++)
        out[n++] = (uint32_t)(((uint64_t *)q->cr.desc)[i & q->cr.mask] / xp->bs);
    return n;
}
