/* memport.c -- the mem: backend (see nmb_memport.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include "nmb_memport.h"

struct bytebuf {
    char *data;
    size_t len, cap, start;
};

struct memport {
    struct nmb_port port;
    nmb_umem *mem;
    struct nmb_kring *tx_kr, *rx_kr;
    int rx_mode, tx_mode, strict;
    uint16_t source_len;
    pthread_mutex_t lock;
    struct bytebuf inq, outq;
    size_t inq_records;
    int chain_ring; /* RX ring a chain from inq is being delivered to, or -1 */
    /* per RX ring: frames injected for that ring only (a flow an RSS hash put there) */
    struct bytebuf *ringq;
    size_t *ringq_records;
    uint8_t *ringq_chain; /* 1: the ring's last slot from ringq ended in NS_MOREFRAG */
    struct nmb_memport_stats st;
};

/* Zeroed memory on cache lines of its own: a port's state is written at every sync by the one
 * thread that forwards it, and the ports of a pair's other workers (shares of the same port,
 * opened one after the other) must not share a line with it. */
#define LINE 128u
static void *zalloc_lines(size_t n)
{
    void *p = NULL;
    n = (n + LINE - 1) / LINE * LINE;
    if (posix_memalign(&p, LINE, n ? n : LINE) != 0)
        return NULL;
    memset(p, 0, n ? n : LINE);
    return p;
}

static int bb_append(struct bytebuf *b, const void *hdr, size_t hlen, const void *data, size_t dlen)
{
    if (b->len + hlen + dlen > b->cap) {
        size_t cap = b->cap ? b->cap : 4096;
        while (cap < b->len + hlen + dlen)
            cap *= 2;
        char *n = realloc(b->data, cap);
        if (!n)
            return -ENOMEM;
        b->data = n;
        b->cap = cap;
    }
    memcpy(b->data + b->len, hdr, hlen);
    if (dlen)
        memcpy(b->data + b->len + hlen, data, dlen);
    b->len += hlen + dlen;
    return 0;
}

static int fail(struct memport *mp, const char *msg)
{
    snprintf(mp->port.error, NMB_PORT_ERRLEN, "mem:%s: %s", mp->port.nifp->ni_name, msg);
    return -EINVAL;
}

static int strict_region(struct memport *mp)
{
    char err[NMB_PORT_ERRLEN - NM_IFNAMSIZ - 8];
    if (nmb_umem_check(mp->mem, err, sizeof(err)))
        return fail(mp, err);
    return 0;
}

static int kring_ok(struct memport *mp, struct netmap_ring *ring, struct nmb_kring *kr, const char *dir,
                    uint32_t i)
{
    char what[64], err[NMB_PORT_ERRLEN - NM_IFNAMSIZ - 8];
    snprintf(what, sizeof(what), "%s ring %u", dir, i);
    if (nmb_kring_check(ring, kr, what, err, sizeof(err)))
        return fail(mp, err);
    return 0;
}

static size_t total_ring_records(const struct memport *mp)
{
    size_t n = 0;
    if (mp->ringq)
        for (uint32_t i = 0; i < mp->port.nifp->ni_rx_rings; i++)
            n += mp->ringq_records[i];
    return n;
}

static int mem_rxsync(struct nmb_port *p)
{
    struct memport *mp = (struct memport *)p;
    struct netmap_if *nifp = p->nifp;
    int queue = mp->rx_mode == NMB_MEM_RX_QUEUE;
    mp->st.rxsyncs++;
    if (queue)
        pthread_mutex_lock(&mp->lock);
    /* take back what the user released: [hwcur, head) of every ring */
    for (uint32_t i = 0; i < nifp->ni_rx_rings; i++) {
        struct netmap_ring *ring = nmb_rxring(nifp, i);
        if (mp->strict && kring_ok(mp, ring, &mp->rx_kr[i], "rx", i)) {
            if (queue)
                pthread_mutex_unlock(&mp->lock);
            return -EINVAL;
        }
        mp->rx_kr[i].hwcur = ring->head;
    }
    /* deliver: ring by ring, as a NIC does.  A ring takes first what was injected for it
     * alone, then from the shared queue; a chain in progress (from either queue) stays in its
     * ring and nothing else is put between its slots. */
    uint32_t first = mp->chain_ring >= 0 ? (uint32_t)mp->chain_ring : 0;
    int shared_open = 1; /* the shared queue may still deliver in this sync */
    for (uint32_t i = 0; i < nifp->ni_rx_rings; i++) {
        struct netmap_ring *ring = nmb_rxring(nifp, i);
        struct nmb_kring *kr = &mp->rx_kr[i];
        uint32_t n = ring->num_slots;
        while (nmb_ring_next(ring, kr->hwtail) != kr->hwcur) {
            struct netmap_slot *slot = &ring->slot[kr->hwtail];
            struct bytebuf *q = NULL;
            if (mp->rx_mode == NMB_MEM_RX_SOURCE) {
                slot->len = mp->source_len;
                slot->flags = 0;
            } else if (queue) {
                int shared_ok = shared_open && i >= first && mp->inq.start < mp->inq.len &&
                                (mp->chain_ring < 0 || mp->chain_ring == (int)i);
                int own = mp->ringq && mp->ringq[i].start < mp->ringq[i].len;
                if (mp->chain_ring == (int)i && shared_ok)
                    q = &mp->inq;                       /* finish the shared chain first */
                else if (own && mp->chain_ring != (int)i)
                    q = &mp->ringq[i];
                else if (shared_ok && !(mp->ringq && mp->ringq_chain[i]))
                    q = &mp->inq;
                if (!q)
                    break;
                struct nmb_mem_record rec;
                memcpy(&rec, q->data + q->start, sizeof(rec));
                uint32_t copy = rec.datalen < ring->nr_buf_size ? rec.datalen : ring->nr_buf_size;
                memcpy(nmb_buf(ring, slot->buf_idx), q->data + q->start + sizeof(rec), copy);
                slot->len = rec.slot_len;
                slot->flags = rec.flags & ~NS_BUF_CHANGED;
                q->start += sizeof(rec) + rec.datalen;
                if (q == &mp->inq) {
                    mp->inq_records--;
                    mp->chain_ring = (rec.flags & NS_MOREFRAG) ? (int)i : -1;
                } else {
                    mp->ringq_records[i]--;
                    mp->ringq_chain[i] = (rec.flags & NS_MOREFRAG) != 0;
                    if (q->start == q->len)
                        q->start = q->len = 0;
                }
            } else {
                break;
            }
            mp->st.rx_slots++;
            mp->st.rx_frames += !(slot->flags & NS_MOREFRAG);
            mp->st.rx_bytes += slot->len;
            kr->hwtail = kr->hwtail + 1 == n ? 0 : kr->hwtail + 1;
        }
        ring->tail = kr->hwtail;
        if (mp->chain_ring == (int)i)
            shared_open = 0; /* later rings must not overtake the shared chain's rest */
    }
    if (queue) {
        if (mp->inq.start == mp->inq.len)
            mp->inq.start = mp->inq.len = 0;
        if (mp->inq_records == 0 && total_ring_records(mp) == 0) {
            uint64_t v;
            if (read(p->fd, &v, sizeof(v)) < 0 && errno != EAGAIN) {
                /* nothing to do: the counter only wakes poll() */
            }
        }
        pthread_mutex_unlock(&mp->lock);
    }
    return mp->strict ? strict_region(mp) : 0;
}

static int mem_txsync(struct nmb_port *p)
{
    struct memport *mp = (struct memport *)p;
    struct netmap_if *nifp = p->nifp;
    int collect = mp->tx_mode == NMB_MEM_TX_COLLECT;
    int rc = 0;
    mp->st.txsyncs++;
    if (collect)
        pthread_mutex_lock(&mp->lock);
    for (uint32_t i = 0; i < nifp->ni_tx_rings; i++) {
        struct netmap_ring *ring = nmb_txring(nifp, i);
        struct nmb_kring *kr = &mp->tx_kr[i];
        if (mp->strict && kring_ok(mp, ring, kr, "tx", i)) {
            rc = -EINVAL;
            break;
        }
        uint32_t n = ring->num_slots;
        if (mp->tx_mode == NMB_MEM_TX_HOLD)
            continue; /* the slots stay with the "NIC" for good */
        for (uint32_t s = kr->hwcur; s != ring->head; s = s + 1 == n ? 0 : s + 1) {
            struct netmap_slot *slot = &ring->slot[s];
            if (mp->strict && slot->len > ring->nr_buf_size) {
                char msg[128];
                snprintf(msg, sizeof(msg), "tx ring %u slot %u: len %u exceeds the buffer size %u", i, s,
                         slot->len, ring->nr_buf_size);
                rc = fail(mp, msg);
                goto out;
            }
            if (collect) {
                struct nmb_mem_record rec = {slot->len, slot->len, slot->flags & ~NS_BUF_CHANGED};
                uint32_t dl = slot->len <= ring->nr_buf_size ? slot->len : ring->nr_buf_size;
                rec.datalen = dl;
                if (bb_append(&mp->outq, &rec, sizeof(rec), nmb_buf(ring, slot->buf_idx), dl)) {
                    rc = fail(mp, "out of memory collecting frames");
                    goto out;
                }
            }
            slot->flags &= ~NS_BUF_CHANGED; /* the "kernel" has taken the new buffer */
            mp->st.tx_slots++;
            mp->st.tx_frames += !(slot->flags & NS_MOREFRAG);
            mp->st.tx_bytes += slot->len;
        }
        kr->hwcur = ring->head;
        kr->hwtail = kr->hwcur == 0 ? n - 1 : kr->hwcur - 1;
        ring->tail = kr->hwtail;
    }
out:
    if (collect)
        pthread_mutex_unlock(&mp->lock);
    if (rc == 0 && mp->strict)
        rc = strict_region(mp);
    return rc;
}

struct nmb_port *nmb_memport_open(nmb_umem *m, const char *name, uint32_t nrings, uint32_t nslots,
                                  int rx_mode, int tx_mode, uint16_t source_len, int strict,
                                  char *err, size_t errlen)
{
    struct memport *mp = zalloc_lines(sizeof(*mp));
    if (!mp) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    mp->port.nifp = nmb_umem_if_create(m, name, nrings, nrings, nslots, nslots);
    if (!mp->port.nifp) {
        snprintf(err, errlen, "cannot lay out %u rings of %u slots in the memory region: %s", nrings, nslots,
                 errno == ENOBUFS ? "not enough free buffers" : strerror(errno));
        free(mp);
        return NULL;
    }
    mp->port.fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
    if (mp->port.fd < 0) {
        snprintf(err, errlen, "eventfd: %s", strerror(errno));
        nmb_umem_if_destroy(m, mp->port.nifp);
        free(mp);
        return NULL;
    }
    mp->mem = m;
    mp->tx_kr = zalloc_lines(nrings * sizeof(struct nmb_kring));
    mp->rx_kr = zalloc_lines(nrings * sizeof(struct nmb_kring));
    if (!mp->tx_kr || !mp->rx_kr) {
        snprintf(err, errlen, "out of memory");
        free(mp->tx_kr);
        free(mp->rx_kr);
        close(mp->port.fd);
        nmb_umem_if_destroy(m, mp->port.nifp);
        free(mp);
        return NULL;
    }
    for (uint32_t i = 0; i < nrings; i++) {
        mp->tx_kr[i].hwcur = 0;
        mp->tx_kr[i].hwtail = nslots - 1;
        mp->rx_kr[i].hwcur = mp->rx_kr[i].hwtail = 0;
    }
    mp->port.tx_first = mp->port.rx_first = 0;
    mp->port.tx_last = mp->port.rx_last = nrings;
    mp->port.poll_syncs = 0;
    mp->port.mem_key = (uint64_t)(uintptr_t)m;
    mp->port.rxsync = mem_rxsync;
    mp->port.txsync = mem_txsync;
    mp->port.priv = mp;
    mp->rx_mode = rx_mode;
    mp->tx_mode = tx_mode;
    mp->source_len = source_len;
    mp->strict = strict;
    mp->chain_ring = -1;
    pthread_mutex_init(&mp->lock, NULL);
    if (rx_mode == NMB_MEM_RX_SOURCE) {
        uint64_t one = 1;
        if (write(mp->port.fd, &one, sizeof(one)) < 0) {
            /* an endless source is always readable; a failed write only slows poll() */
        }
    }
    return &mp->port;
}

void nmb_memport_close(struct nmb_port *p)
{
    struct memport *mp = (struct memport *)p;
    if (!mp)
        return;
    nmb_umem_if_destroy(mp->mem, p->nifp);
    close(p->fd);
    free(mp->tx_kr);
    free(mp->rx_kr);
    free(mp->inq.data);
    free(mp->outq.data);
    if (mp->ringq) {
        for (uint32_t i = 0; i < p->nifp->ni_rx_rings; i++)
            free(mp->ringq[i].data);
        free(mp->ringq);
        free(mp->ringq_records);
        free(mp->ringq_chain);
    }
    pthread_mutex_destroy(&mp->lock);
    free(mp);
}

int nmb_memport_inject(struct nmb_port *p, int ring, const void *data, uint32_t datalen, uint16_t slot_len,
                       uint16_t flags)
{
    struct memport *mp = (struct memport *)p;
    struct nmb_mem_record rec = {datalen, slot_len, flags};
    uint64_t one = 1;
    int rc;
    if (ring >= (int)p->nifp->ni_rx_rings)
        return -EINVAL;
    pthread_mutex_lock(&mp->lock);
    if (ring >= 0 && !mp->ringq) {
        uint32_t nr = p->nifp->ni_rx_rings;
        mp->ringq = calloc(nr, sizeof(*mp->ringq));
        mp->ringq_records = calloc(nr, sizeof(*mp->ringq_records));
        mp->ringq_chain = calloc(nr, sizeof(*mp->ringq_chain));
        if (!mp->ringq || !mp->ringq_records || !mp->ringq_chain) {
            free(mp->ringq);
            free(mp->ringq_records);
            free(mp->ringq_chain);
            mp->ringq = NULL;
            pthread_mutex_unlock(&mp->lock);
            return -ENOMEM;
        }
    }
    if (ring < 0) {
        rc = bb_append(&mp->inq, &rec, sizeof(rec), data, datalen);
        if (rc == 0)
            mp->inq_records++;
    } else {
        rc = bb_append(&mp->ringq[ring], &rec, sizeof(rec), data, datalen);
        if (rc == 0)
            mp->ringq_records[ring]++;
    }
    pthread_mutex_unlock(&mp->lock);
    if (rc == 0 && write(p->fd, &one, sizeof(one)) < 0)
        return -errno;
    return rc;
}

size_t nmb_memport_take(struct nmb_port *p, char **out)
{
    struct memport *mp = (struct memport *)p;
    pthread_mutex_lock(&mp->lock);
    size_t n = mp->outq.len;
    *out = mp->outq.data;
    mp->outq.data = NULL;
    mp->outq.len = mp->outq.cap = 0;
    pthread_mutex_unlock(&mp->lock);
    return n;
}

size_t nmb_memport_pending(struct nmb_port *p)
{
    struct memport *mp = (struct memport *)p;
    pthread_mutex_lock(&mp->lock);
    size_t n = mp->inq_records + total_ring_records(mp);
    pthread_mutex_unlock(&mp->lock);
    return n;
}

void nmb_memport_get_stats(struct nmb_port *p, struct nmb_memport_stats *out)
{
    *out = ((struct memport *)p)->st;
}

const void *nmb_memport_counters(struct nmb_port *p, size_t *len)
{
    *len = sizeof(((struct memport *)p)->st);
    return &((struct memport *)p)->st;
}

int nmb_memport_check(struct nmb_port *p)
{
    struct memport *mp = (struct memport *)p;
    for (uint32_t i = 0; i < p->nifp->ni_tx_rings; i++)
        if (kring_ok(mp, nmb_txring(p->nifp, i), &mp->tx_kr[i], "tx", i))
            return -1;
    for (uint32_t i = 0; i < p->nifp->ni_rx_rings; i++)
        if (kring_ok(mp, nmb_rxring(p->nifp, i), &mp->rx_kr[i], "rx", i))
            return -1;
    return strict_region(mp) ? -1 : 0;
}
