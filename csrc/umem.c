/* umem.c -- netmap-format memory regions in user space (see nmb_umem.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "nmb_umem.h"

#define ALIGN_UP(x, a) (((x) + ((a) - 1)) & ~((size_t)(a) - 1))

struct obj_block {
    size_t off, len;
};

struct nmb_umem {
    char *base; /* one mapping: objects, then the buffer pool */
    size_t size;
    size_t obj_bytes, obj_used;
    char *bufs;
    uint32_t nbufs, buf_size;
    uint32_t *free_stack, nfree;
    struct obj_block freed[NMB_UMEM_MAX_IFS];
    uint32_t nfreed;
    struct netmap_if *ifs[NMB_UMEM_MAX_IFS];
    size_t if_len[NMB_UMEM_MAX_IFS];
    uint32_t nifs;
    uint64_t *owner; /* strict check: where each buffer was seen */
};

size_t nmb_umem_if_bytes(uint32_t ntx, uint32_t nrx, uint32_t tx_slots, uint32_t rx_slots)
{
    size_t n = ALIGN_UP(sizeof(struct netmap_if) + sizeof(int64_t) * (ntx + nrx), NM_CACHE_ALIGN);
    n += (size_t)ntx * ALIGN_UP(sizeof(struct netmap_ring) + sizeof(struct netmap_slot) * tx_slots, NM_CACHE_ALIGN);
    n += (size_t)nrx * ALIGN_UP(sizeof(struct netmap_ring) + sizeof(struct netmap_slot) * rx_slots, NM_CACHE_ALIGN);
    return n;
}

nmb_umem *nmb_umem_create(size_t obj_bytes, uint32_t nbufs, uint32_t buf_size)
{
    if (nbufs < 3 || buf_size < 64 || buf_size % 64 != 0 || buf_size > 65535 + 1) {
        errno = EINVAL;
        return NULL;
    }
    nmb_umem *m = calloc(1, sizeof(*m));
    if (!m)
        return NULL;
    m->obj_bytes = ALIGN_UP(obj_bytes, 4096);
    /* the pool starts NMB_UMEM_BUF_LEAD bytes into a page, with room for one more buffer */
    m->size = m->obj_bytes + ALIGN_UP((size_t)(nbufs + 1) * buf_size + NMB_UMEM_BUF_LEAD, 4096);
    void *p = mmap(NULL, m->size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) {
        int e = errno;
        free(m);
        errno = e;
        return NULL;
    }
    m->base = p;
    m->bufs = m->base + m->obj_bytes + NMB_UMEM_BUF_LEAD;
    m->nbufs = nbufs;
    m->buf_size = buf_size;
    m->free_stack = malloc(sizeof(uint32_t) * nbufs);
    if (!m->free_stack) {
        munmap(p, m->size);
        free(m);
        errno = ENOMEM;
        return NULL;
    }
    /* indices 0 and 1 are reserved; hand out low indices first */
    for (uint32_t i = nbufs - 1; i >= 2; i--)
        m->free_stack[m->nfree++] = i;
    return m;
}

void nmb_umem_destroy(nmb_umem *m)
{
    if (!m)
        return;
    munmap(m->base, m->size);
    free(m->free_stack);
    free(m->owner);
    free(m);
}

/* Objects are carved from [0, obj_bytes): a block freed by a closed port is reused, split
 * (the smallest block that fits, its rest freed again) and merged with free neighbours, and the
 * free block at the end goes back to the untouched part; so ports of other shapes (a reload
 * that changes a pair's workers: one port of N ring pairs becomes N ports of one) fit where
 * the old ones were. */
static char *obj_alloc(nmb_umem *m, size_t len)
{
    uint32_t best = m->nfreed;
    for (uint32_t i = 0; i < m->nfreed; i++)
        if (m->freed[i].len >= len && (best == m->nfreed || m->freed[i].len < m->freed[best].len))
            best = i;
    if (best < m->nfreed) {
        char *p = m->base + m->freed[best].off;
        if (m->freed[best].len > len) {
            m->freed[best].off += len;
            m->freed[best].len -= len;
        } else {
            m->freed[best] = m->freed[--m->nfreed];
        }
        return p;
    }
    if (m->obj_used + len > m->obj_bytes)
        return NULL;
    char *p = m->base + m->obj_used;
    m->obj_used += len;
    return p;
}

static void obj_free(nmb_umem *m, size_t off, size_t len)
{
    for (uint32_t i = 0; i < m->nfreed;) { /* merge with the free blocks just before and after */
        struct obj_block *b = &m->freed[i];
        if (b->off + b->len == off || off + len == b->off) {
            off = b->off < off ? b->off : off;
            len += b->len;
            *b = m->freed[--m->nfreed];
            continue;
        }
        i++;
    }
    if (off + len == m->obj_used)
        m->obj_used = off;
    else if (m->nfreed < NMB_UMEM_MAX_IFS)
        m->freed[m->nfreed++] = (struct obj_block){off, len};
}

static void ring_init(nmb_umem *m, struct netmap_ring *ring, uint32_t id, int is_tx, uint32_t nslots)
{
    /* the ring's const fields are the kernel's to write; here we are the kernel */
    *(int64_t *)&ring->buf_ofs = (int64_t)(m->bufs - (char *)ring);
    *(uint32_t *)&ring->num_slots = nslots;
    *(uint32_t *)&ring->nr_buf_size = m->buf_size;
    *(uint16_t *)&ring->ringid = (uint16_t)id;
    *(uint16_t *)&ring->dir = is_tx ? 1 : 0; /* as the live kernel reports: TX 1, RX 0 */
    ring->head = ring->cur = 0;
    ring->tail = is_tx ? nslots - 1 : 0;
    ring->flags = 0;
    for (uint32_t s = 0; s < nslots; s++) {
        ring->slot[s].buf_idx = m->free_stack[--m->nfree];
        ring->slot[s].len = 0;
        ring->slot[s].flags = 0;
        ring->slot[s].ptr = 0;
    }
}

struct netmap_if *nmb_umem_if_create(nmb_umem *m, const char *name, uint32_t ntx, uint32_t nrx,
                                     uint32_t tx_slots, uint32_t rx_slots)
{
    if (ntx == 0 || nrx == 0 || tx_slots < 2 || rx_slots < 2 || m->nifs >= NMB_UMEM_MAX_IFS) {
        errno = EINVAL;
        return NULL;
    }
    uint64_t need = (uint64_t)ntx * tx_slots + (uint64_t)nrx * rx_slots;
    if (need > m->nfree) {
        errno = ENOBUFS;
        return NULL;
    }
    size_t len = nmb_umem_if_bytes(ntx, nrx, tx_slots, rx_slots);
    char *p = obj_alloc(m, len);
    if (!p) {
        errno = ENOMEM;
        return NULL;
    }
    memset(p, 0, len);
    struct netmap_if *nifp = (struct netmap_if *)p;
    strncpy((char *)nifp->ni_name, name, NM_IFNAMSIZ - 1);
    *(uint32_t *)&nifp->ni_version = NETMAP_API;
    *(uint32_t *)&nifp->ni_flags = 0;
    *(uint32_t *)&nifp->ni_tx_rings = ntx;
    *(uint32_t *)&nifp->ni_rx_rings = nrx;
    int64_t *ofs = (int64_t *)nifp->ring_ofs;
    char *r = p + ALIGN_UP(sizeof(struct netmap_if) + sizeof(int64_t) * (ntx + nrx), NM_CACHE_ALIGN);
    for (uint32_t i = 0; i < ntx + nrx; i++) {
        int is_tx = i < ntx;
        uint32_t nslots = is_tx ? tx_slots : rx_slots;
        ofs[i] = r - p;
        ring_init(m, (struct netmap_ring *)r, is_tx ? i : i - ntx, is_tx, nslots);
        r += ALIGN_UP(sizeof(struct netmap_ring) + sizeof(struct netmap_slot) * nslots, NM_CACHE_ALIGN);
    }
    m->ifs[m->nifs] = nifp;
    m->if_len[m->nifs] = len;
    m->nifs++;
    return nifp;
}

static void ring_release(nmb_umem *m, struct netmap_ring *ring)
{
    for (uint32_t s = 0; s < ring->num_slots; s++) {
        uint32_t b = ring->slot[s].buf_idx;
        if (b >= 2 && b < m->nbufs && m->nfree < m->nbufs)
            m->free_stack[m->nfree++] = b;
    }
}

void nmb_umem_if_destroy(nmb_umem *m, struct netmap_if *nifp)
{
    for (uint32_t k = 0; k < m->nifs; k++) {
        if (m->ifs[k] != nifp)
            continue;
        for (uint32_t i = 0; i < nifp->ni_tx_rings; i++)
            ring_release(m, nmb_txring(nifp, i));
        for (uint32_t i = 0; i < nifp->ni_rx_rings; i++)
            ring_release(m, nmb_rxring(nifp, i));
        obj_free(m, (size_t)((char *)nifp - m->base), m->if_len[k]);
        m->ifs[k] = m->ifs[m->nifs - 1];
        m->if_len[k] = m->if_len[m->nifs - 1];
        m->nifs--;
        return;
    }
}

uint32_t nmb_umem_nbufs(const nmb_umem *m) { return m->nbufs; }
uint32_t nmb_umem_buf_size(const nmb_umem *m) { return m->buf_size; }
uint32_t nmb_umem_free_bufs(const nmb_umem *m) { return m->nfree; }
size_t nmb_umem_size(const nmb_umem *m) { return m->size; }
const char *nmb_umem_base(const nmb_umem *m) { return m->base; }
char *nmb_umem_bufs(const nmb_umem *m) { return m->bufs; }

/* is i in the cyclic interval [lo, hi] of a ring of n slots? */
static int in_cyclic(uint32_t i, uint32_t lo, uint32_t hi)
{
    if (lo <= hi)
        return i >= lo && i <= hi;
    return i >= lo || i <= hi;
}

int nmb_kring_check(const struct netmap_ring *ring, const struct nmb_kring *kr, const char *what,
                    char *err, size_t errlen)
{
    uint32_t n = ring->num_slots, head = ring->head, cur = ring->cur;
    if (head >= n || cur >= n) {
        snprintf(err, errlen, "%s: head %u / cur %u out of range (num_slots %u)", what, head, cur, n);
        return -1;
    }
    if (!in_cyclic(head, kr->hwcur, kr->hwtail)) {
        snprintf(err, errlen, "%s: head %u outside the user's slots [%u, %u]", what, head, kr->hwcur,
                 kr->hwtail);
        return -1;
    }
    if (!in_cyclic(cur, head, kr->hwtail)) {
        snprintf(err, errlen, "%s: cur %u outside [head %u, tail %u]", what, cur, head, kr->hwtail);
        return -1;
    }
    return 0;
}

#define OWNER(ifk, tx, ring, slot) \
    (((uint64_t)(ifk) << 48) | ((uint64_t)(tx) << 47) | ((uint64_t)(ring) << 32) | (uint64_t)(slot) | (1ULL << 63))

static void owner_str(nmb_umem *m, uint64_t o, char *buf, size_t len)
{
    uint32_t ifk = (o >> 48) & 0x7fff, tx = (o >> 47) & 1, ring = (o >> 32) & 0x7fff, slot = o & 0xffffffff;
    if (ifk == 0x7fff) {
        snprintf(buf, len, "the free pool");
        return;
    }
    snprintf(buf, len, "%s %s ring %u slot %u", m->ifs[ifk]->ni_name, tx ? "tx" : "rx", ring, slot);
}

static int check_ring(nmb_umem *m, uint32_t ifk, int tx, uint32_t ri, struct netmap_ring *ring, char *err,
                      size_t errlen)
{
    for (uint32_t s = 0; s < ring->num_slots; s++) {
        uint32_t b = ring->slot[s].buf_idx;
        uint64_t me = OWNER(ifk, tx, ri, s);
        char here[96], there[96];
        if (b < 2 || b >= m->nbufs) {
            owner_str(m, me, here, sizeof(here));
            snprintf(err, errlen, "%s: buf_idx %u out of range [2, %u)", here, b, m->nbufs);
            return -1;
        }
        if (m->owner[b]) {
            owner_str(m, me, here, sizeof(here));
            owner_str(m, m->owner[b], there, sizeof(there));
            snprintf(err, errlen, "%s: buf_idx %u is also in %s", here, b, there);
            return -1;
        }
        m->owner[b] = me;
    }
    return 0;
}

int nmb_umem_check(nmb_umem *m, char *err, size_t errlen)
{
    if (!m->owner) {
        m->owner = calloc(m->nbufs, sizeof(uint64_t));
        if (!m->owner) {
            snprintf(err, errlen, "out of memory for the buffer check");
            return -1;
        }
    } else {
        memset(m->owner, 0, sizeof(uint64_t) * m->nbufs);
    }
    for (uint32_t k = 0; k < m->nifs; k++) {
        struct netmap_if *nifp = m->ifs[k];
        for (uint32_t i = 0; i < nifp->ni_tx_rings; i++)
            if (check_ring(m, k, 1, i, nmb_txring(nifp, i), err, errlen))
                return -1;
        for (uint32_t i = 0; i < nifp->ni_rx_rings; i++)
            if (check_ring(m, k, 0, i, nmb_rxring(nifp, i), err, errlen))
                return -1;
    }
    for (uint32_t f = 0; f < m->nfree; f++) {
        uint32_t b = m->free_stack[f];
        char there[96];
        if (m->owner[b]) {
            owner_str(m, m->owner[b], there, sizeof(there));
            snprintf(err, errlen, "buf_idx %u is in %s and in the free pool", b, there);
            return -1;
        }
        m->owner[b] = OWNER(0x7fff, 0, 0, 0);
    }
    for (uint32_t b = 2; b < m->nbufs; b++) {
        if (!m->owner[b]) {
            snprintf(err, errlen, "buf_idx %u is lost: in no ring and not in the free pool", b);
            return -1;
        }
    }
    return 0;
}
