/*
 * A stand-in for the netmap kernel module, for tests on machines without it: an LD_PRELOAD
 * library that answers open(), ioctl(), poll() and close() on one regular file (path in
 * $NMB_FAKE_DEV) as /dev/netmap would, from the ABI facts and netmap's documented semantics.
 * The file itself is the memory region (mmap of it works as is); "/dev/netmap" opened, stat'ed
 * or access()ed by path is redirected to it, so `nmbridge run` uses the fake unchanged.
 *
 * What it models (and nothing more):
 * - adapters by name, each with NIC ring pairs (1; 2 for names starting with "mq") and one
 *   host ring pair, 1024 slots of 2048-byte buffers; rings live as long as some registration
 *   of the adapter does, like the kernel's;
 * - registration modes (ALL_NIC, SW, NIC_SW, ONE_NIC, ONE_SW, RX/TX rings only) selecting
 *   krings, and NR_EXCLUSIVE exactly as netmap_krings_get() applies it: EBUSY when a selected
 *   kring is already exclusively owned, or when exclusivity is asked and a selected kring
 *   already has users.  The kring users and exclusive marks are kept in the file, so they
 *   hold across processes; a registration of a process that died is dropped (the kernel
 *   closes a dead process's file descriptors);
 * - NIOCTXSYNC / NIOCRXSYNC, and poll() the way netmap_poll() does on Linux: TX rings are
 *   txsynced when POLLOUT is asked or the port was registered without NR_NO_TX_POLL (then only
 *   rings with new slots), RX rings are rxsynced only when POLLIN is asked;
 * - one sync at a time per kring, as the kernel's nm_kr_tryget() has it: a sync (ioctl or
 *   poll) that finds the kring busy with another thread's sync skips it, so two threads on one
 *   port (one sending, one polling with TX poll) never run the same ring's sync twice at once;
 * - what the "wire" does: by default a txsync loops a TX ring's frames into the same-numbered
 *   RX ring of the adapter, or of the other end of a pipe (`p{0` -> `p}0`, and back) once
 *   that end has been registered; names starting with "sink" consume every transmitted frame;
 *   names starting with "src" also refill their RX rings to full at every rxsync (an endless
 *   source of 60-byte frames) — together a forwarder can be driven without any other thread;
 * - names starting with "nosuch", "busy" or "oldapi" fail with ENOENT, EBUSY, or EINVAL and
 *   nr_version 11; names starting with "vale" report memory region 3, the others region 1.
 *
 * For the tests, per process: fake_netmap_counters() (poll calls, ioctls by type, ring syncs
 * done inside poll), fake_netmap_last_request() (the bytes of the last NIOCCTRL request) and
 * fake_netmap_request(i) (the i-th one since the counters were last reset, up to 16).
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include "nmb_netmap.h"

#define SLOTS 1024u
#define BUF 2048u
#define MAX_AD 16u
#define MAX_NIC 2u
#define RINGS (MAX_NIC + 1u)                /* per direction: NIC rings + the host ring */
#define MAX_BIND 64u
#define RING_SIZE (256u + 16u * SLOTS)      /* header + slots; a multiple of 128 */
#define AD_SPAN (128u << 10)                /* 2 * RINGS rings of one adapter */
#define NIFP_SIZE 1024u
#define NIFP_OFS (256u << 10)               /* after the shared state; before the rings, as */
#define AD_OFS (512u << 10)                 /* the kernel lays them out (ring_ofs > 0) */
#define POOL_OFS (8u << 20)
#define NBUFS (2u + MAX_AD * 2u * RINGS * SLOTS)
#define REGION ((size_t)POOL_OFS + (size_t)NBUFS * BUF)
#define MAXFD 4096
#define FAKE_MAGIC 0x6e6d6662u
#define DEVICE "/dev/netmap"

enum { RX = 0, TX = 1 }; /* the kernel's NR_RX, NR_TX */

struct fk_adapter {
    char name[NETMAP_REQ_IFNAMSIZ];
    uint32_t used, nic;
    uint32_t hwcur[2][RINGS];
    uint32_t busy[2][RINGS]; /* a sync holds the kring (nm_kr_tryget's nr_busy) */
    uint64_t seq;
};

struct fk_binding {
    int32_t pid, fd;
    uint32_t used, ad, excl, txpoll;
    uint32_t first[2], last[2]; /* selected krings per direction */
};

struct fk_shared {
    uint32_t magic;
    int lock;
    struct fk_adapter ad[MAX_AD];
    struct fk_binding bind[MAX_BIND];
};

_Static_assert(sizeof(struct fk_shared) <= NIFP_OFS, "shared state fits before the netmap_ifs");
_Static_assert(NIFP_OFS + MAX_BIND * NIFP_SIZE <= AD_OFS, "netmap_ifs fit before the rings");
_Static_assert(2 * RINGS * RING_SIZE <= AD_SPAN, "an adapter's rings fit its span");
_Static_assert(AD_OFS + MAX_AD * AD_SPAN <= POOL_OFS, "rings fit before the pool");
_Static_assert(RING_SIZE % NM_CACHE_ALIGN == 0, "rings stay aligned");

static char *mem;
static signed char fd_kind[MAXFD]; /* 0 unknown, 1 the fake device, -1 something else */
static uint64_t counters[8];       /* see fake_netmap_counters() */
static unsigned slot_delay_us;     /* see fake_netmap_slow_wire() */
static unsigned char last_req[sizeof(struct nmreq_header) + sizeof(struct nmreq_register)];
#define KEPT_REQ 16u
static unsigned char kept_req[KEPT_REQ][sizeof(last_req)]; /* since the last reset */
static unsigned kept;

/* ---- the exported test hooks ---------------------------------------------------------- */

/* out[0] poll() calls that included a fake port, out[1] NIOCTXSYNC, out[2] NIOCRXSYNC,
 * out[3] NIOCCTRL, out[4] TX rings synced inside poll(), out[5] RX rings synced inside poll(),
 * out[6] / out[7] fake fds a poll() asked for POLLIN / POLLOUT */
void fake_netmap_counters(uint64_t out[8])
{
    memcpy(out, counters, sizeof(counters));
}

void fake_netmap_reset_counters(void)
{
    memset(counters, 0, sizeof(counters));
    kept = 0;
}

/* Make this process's TX syncs take `us` microseconds per frame they move (0: as fast as
 * they go), so a test can have two threads' syncs of one ring overlap for certain. */
void fake_netmap_slow_wire(unsigned us)
{
    slot_delay_us = us;
}

/* NIOCCTRL request i (from 0) since the last reset, as last_request has it: 0, or -1 when
 * there was no such request (or it was past the 16 kept). */
int fake_netmap_request(unsigned i, unsigned char out[sizeof(last_req)])
{
    if (i >= kept || i >= KEPT_REQ)
        return -1;
    memcpy(out, kept_req[i], sizeof(last_req));
    return 0;
}

/* The last NIOCCTRL request as the "kernel" got it: nmreq_header then nmreq_register. */
void fake_netmap_last_request(unsigned char out[sizeof(last_req)])
{
    memcpy(out, last_req, sizeof(last_req));
}

/* ---- plumbing ---------------------------------------------------------------------------- */

#define REAL(ret, name, ...)                                                                        \
    static ret (*real_##name)(__VA_ARGS__);                                                          \
    if (!real_##name)                                                                                \
        real_##name = (ret (*)(__VA_ARGS__))dlsym(RTLD_NEXT, #name)

static const char *fake_path(const char *path)
{
    const char *dev = getenv("NMB_FAKE_DEV");
    return dev && path && !strcmp(path, DEVICE) ? dev : path;
}

static struct fk_shared *shared(void)
{
    return (struct fk_shared *)mem;
}

static void lock(void)
{
    while (__atomic_exchange_n(&shared()->lock, 1, __ATOMIC_ACQUIRE))
        sched_yield();
}

static void unlock(void)
{
    __atomic_store_n(&shared()->lock, 0, __ATOMIC_RELEASE);
}

static int is_fake(int fd)
{
    const char *dev = getenv("NMB_FAKE_DEV");
    struct stat a, b;
    if (fd < 0 || fd >= MAXFD || !dev)
        return 0;
    if (fd_kind[fd])
        return fd_kind[fd] > 0;
    fd_kind[fd] = -1;
    REAL(int, fstat, int, struct stat *);
    REAL(int, stat, const char *, struct stat *);
    if (real_fstat(fd, &a) || real_stat(dev, &b) || a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        return 0;
    if (!mem) {
        if (a.st_size < (off_t)REGION && ftruncate(fd, (off_t)REGION) != 0)
            abort();
        mem = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mem == MAP_FAILED)
            abort();
    }
    fd_kind[fd] = 1;
    return 1;
}

static struct netmap_ring *kring(uint32_t ad, int t, uint32_t i)
{
    return (struct netmap_ring *)(mem + AD_OFS + (size_t)ad * AD_SPAN + ((size_t)t * RINGS + i) * RING_SIZE);
}

static int alive(const struct fk_binding *b)
{
    return b->used && (b->pid == getpid() || kill(b->pid, 0) == 0 || errno == EPERM);
}

static struct fk_binding *binding_of(int fd)
{
    for (uint32_t i = 0; i < MAX_BIND; i++) {
        struct fk_binding *b = &shared()->bind[i];
        if (b->used && b->pid == getpid() && b->fd == fd)
            return b;
    }
    return NULL;
}

/* ---- register ---------------------------------------------------------------------------- */

static void init_ring(uint32_t ad, int t, uint32_t i)
{
    struct netmap_ring *r = kring(ad, t, i);
    size_t ofs = (size_t)((char *)r - mem);
    *(int64_t *)&r->buf_ofs = (int64_t)POOL_OFS - (int64_t)ofs;
    *(uint32_t *)&r->num_slots = SLOTS;
    *(uint32_t *)&r->nr_buf_size = BUF;
    *(uint16_t *)&r->ringid = (uint16_t)i;
    *(uint16_t *)&r->dir = (uint16_t)t;
    r->head = r->cur = 0;
    r->tail = t == TX ? SLOTS - 1 : 0;
    for (uint32_t s = 0; s < SLOTS; s++) {
        r->slot[s].buf_idx = 2 + ((ad * 2 + (uint32_t)t) * RINGS + i) * SLOTS + s;
        r->slot[s].len = 0;
        r->slot[s].flags = 0;
    }
    shared()->ad[ad].hwcur[t][i] = 0;
}

/* The krings a registration selects, per direction (netmap_interp_ringid). */
static int select_krings(uint32_t nic, const struct nmreq_register *reg, uint32_t first[2], uint32_t last[2])
{
    uint32_t r = reg->nr_ringid & NETMAP_RING_MASK, lo, hi;
    switch (reg->nr_mode) {
    case NR_REG_DEFAULT:
    case NR_REG_ALL_NIC:
        lo = 0, hi = nic;
        break;
    case NR_REG_SW:
        lo = nic, hi = nic + 1;
        break;
    case NR_REG_NIC_SW:
        lo = 0, hi = nic + 1;
        break;
    case NR_REG_ONE_NIC:
        if (r >= nic)
            return EINVAL;
        lo = r, hi = r + 1;
        break;
    case NR_REG_ONE_SW:
        if (r >= 1)
            return EINVAL;
        lo = nic, hi = nic + 1;
        break;
    default:
        return EINVAL;
    }
    first[RX] = first[TX] = lo;
    last[RX] = last[TX] = hi;
    if (reg->nr_flags & NR_RX_RINGS_ONLY)
        last[TX] = first[TX];
    if (reg->nr_flags & NR_TX_RINGS_ONLY)
        last[RX] = first[RX];
    return 0;
}

static int overlaps(const struct fk_binding *b, int t, uint32_t i)
{
    return i >= b->first[t] && i < b->last[t];
}

static int do_register_locked(int fd, struct nmreq_header *h, struct nmreq_register *reg)
{
    struct fk_shared *sh = shared();
    uint32_t a, k, first[2], last[2];
    int excl = (reg->nr_flags & NR_EXCLUSIVE) != 0, t, err;

    if (sh->magic != FAKE_MAGIC) { /* a fresh (all-zero) file */
        memset(sh, 0, sizeof(*sh));
        sh->magic = FAKE_MAGIC;
        sh->lock = 1;
    }
    for (k = 0; k < MAX_BIND; k++) /* registrations of dead processes are gone */
        if (sh->bind[k].used && !alive(&sh->bind[k]))
            sh->bind[k].used = 0;
    if (binding_of(fd))
        return EBUSY; /* this fd is already bound */
    for (a = 0; a < MAX_AD; a++)
        if (sh->ad[a].used && !strncmp(sh->ad[a].name, h->nr_name, sizeof(h->nr_name)))
            break;
    if (a == MAX_AD) {
        for (a = 0; a < MAX_AD && sh->ad[a].used; a++)
            ;
        if (a == MAX_AD)
            return ENOMEM;
        memset(&sh->ad[a], 0, sizeof(sh->ad[a]));
        memcpy(sh->ad[a].name, h->nr_name, sizeof(sh->ad[a].name));
        sh->ad[a].name[sizeof(sh->ad[a].name) - 1] = 0;
        sh->ad[a].nic = strncmp(h->nr_name, "mq", 2) ? 1 : MAX_NIC;
    }
    struct fk_adapter *ad = &sh->ad[a];
    int in_use = 0;
    for (k = 0; k < MAX_BIND; k++)
        in_use |= sh->bind[k].used && sh->bind[k].ad == a;
    if ((err = select_krings(ad->nic, reg, first, last)) != 0) {
        if (!in_use)
            ad->used = 0;
        return err;
    }
    /* netmap_krings_get, first round: every selected kring must be neither exclusively owned
     * nor, when we ask for exclusivity, in use at all */
    for (t = RX; t <= TX; t++)
        for (uint32_t i = first[t]; i < last[t]; i++)
            for (k = 0; k < MAX_BIND; k++) {
                const struct fk_binding *b = &sh->bind[k];
                if (b->used && b->ad == a && overlaps(b, t, i) && (b->excl || excl)) {
                    if (!in_use)
                        ad->used = 0;
                    return EBUSY;
                }
            }
    for (k = 0; k < MAX_BIND && sh->bind[k].used; k++)
        ;
    if (k == MAX_BIND)
        return ENOMEM;
    if (!in_use) { /* the adapter's rings are created at its first registration */
        for (t = RX; t <= TX; t++)
            for (uint32_t i = 0; i <= ad->nic; i++)
                init_ring(a, t, i);
        ad->seq = 0;
    }
    ad->used = 1;
    /* second round: the registration holds its krings (users, and the exclusive mark) */
    struct fk_binding *b = &sh->bind[k];
    memset(b, 0, sizeof(*b));
    b->used = 1, b->pid = getpid(), b->fd = fd, b->ad = a, b->excl = (uint32_t)excl;
    b->txpoll = !(reg->nr_flags & NR_NO_TX_POLL);
    memcpy(b->first, first, sizeof(first));
    memcpy(b->last, last, sizeof(last));

    /* its netmap_if: counts of the adapter, offsets only for the rings bound to this fd */
    size_t nifp_ofs = NIFP_OFS + (size_t)k * NIFP_SIZE;
    struct netmap_if *nifp = (struct netmap_if *)(mem + nifp_ofs);
    memset(nifp, 0, NIFP_SIZE);
    strncpy((char *)nifp->ni_name, h->nr_name, NM_IFNAMSIZ - 1);
    *(uint32_t *)&nifp->ni_version = NETMAP_API;
    *(uint32_t *)&nifp->ni_tx_rings = ad->nic;
    *(uint32_t *)&nifp->ni_rx_rings = ad->nic;
    *(uint32_t *)&nifp->ni_host_tx_rings = 1;
    *(uint32_t *)&nifp->ni_host_rx_rings = 1;
    int64_t *ofs = (int64_t *)nifp->ring_ofs;
    for (uint32_t i = first[TX]; i < last[TX]; i++)
        ofs[i] = (int64_t)((char *)kring(a, TX, i) - mem) - (int64_t)nifp_ofs;
    for (uint32_t i = first[RX]; i < last[RX]; i++)
        ofs[ad->nic + 1 + i] = (int64_t)((char *)kring(a, RX, i) - mem) - (int64_t)nifp_ofs;

    reg->nr_offset = nifp_ofs;
    reg->nr_memsize = REGION;
    reg->nr_mem_id = strncmp(h->nr_name, "vale", 4) ? 1 : 3;
    reg->nr_tx_rings = reg->nr_rx_rings = (uint16_t)ad->nic;
    reg->nr_host_tx_rings = reg->nr_host_rx_rings = 0; /* as VALE ports and pipes answer */
    reg->nr_tx_slots = reg->nr_rx_slots = SLOTS;
    return 0;
}

static int do_register(int fd, struct nmreq_header *h)
{
    struct nmreq_register *reg = (struct nmreq_register *)(uintptr_t)h->nr_body;
    memcpy(last_req, h, sizeof(*h));
    if (reg)
        memcpy(last_req + sizeof(*h), reg, sizeof(*reg));
    if (kept < KEPT_REQ)
        memcpy(kept_req[kept], last_req, sizeof(last_req));
    kept++;
    if (h->nr_version != NETMAP_API || !strncmp(h->nr_name, "oldapi", 6)) {
        h->nr_version = 11;
        errno = EINVAL;
        return -1;
    }
    if (h->nr_reqtype != NETMAP_REQ_REGISTER || h->nr_reserved || h->nr_options || !reg) {
        errno = EINVAL;
        return -1;
    }
    if (!strncmp(h->nr_name, "nosuch", 6)) {
        errno = ENOENT;
        return -1;
    }
    if (!strncmp(h->nr_name, "busy", 4)) {
        errno = EBUSY;
        return -1;
    }
    lock();
    int err = do_register_locked(fd, h, reg);
    unlock();
    if (err) {
        errno = err;
        return -1;
    }
    return 0;
}

static void unregister(int fd)
{
    if (!mem || shared()->magic != FAKE_MAGIC)
        return;
    lock();
    struct fk_binding *b = binding_of(fd);
    if (b) {
        uint32_t a = b->ad, k;
        int in_use = 0;
        b->used = 0;
        for (k = 0; k < MAX_BIND; k++)
            in_use |= shared()->bind[k].used && shared()->bind[k].ad == a;
        if (!in_use)
            shared()->ad[a].used = 0; /* the last user gone: the rings go */
    }
    unlock();
}

/* ---- the "NIC" ----------------------------------------------------------------------------- */

/* Where a TX ring's frames go: the same adapter's RX ring, or for a pipe end (`p{0`) the
 * other end's (`p}0`), when that one exists; -1 when nowhere yet. */
static int peer_of(uint32_t a)
{
    struct fk_adapter *ad = &shared()->ad[a];
    char peer[NETMAP_REQ_IFNAMSIZ];
    char *brace;
    memcpy(peer, ad->name, sizeof(peer));
    if (!(brace = strpbrk(peer, "{}")))
        return (int)a;
    *brace = *brace == '{' ? '}' : '{';
    for (uint32_t k = 0; k < MAX_AD; k++)
        if (shared()->ad[k].used && !strncmp(shared()->ad[k].name, peer, sizeof(peer)))
            return (int)k;
    return -1;
}

/* nm_kr_tryget()/nm_kr_put() for a kring: 1 when this sync may run, 0 when another holds it
 * (the caller then skips the ring, as netmap_ioctl() and netmap_poll() do). */
static int kr_tryget(uint32_t a, int t, uint32_t i)
{
    return !__atomic_exchange_n(&shared()->ad[a].busy[t][i], 1, __ATOMIC_ACQUIRE);
}

static void kr_put(uint32_t a, int t, uint32_t i)
{
    __atomic_store_n(&shared()->ad[a].busy[t][i], 0, __ATOMIC_RELEASE);
}

static void txsync_ring(struct fk_binding *b, uint32_t i)
{
    struct fk_adapter *ad = &shared()->ad[b->ad];
    struct netmap_ring *tx = kring(b->ad, TX, i);
    uint32_t *hwcur = &ad->hwcur[TX][i];
    int peer = peer_of(b->ad);
    if (!strncmp(ad->name, "sink", 4) || !strncmp(ad->name, "src", 3)) {
        *hwcur = tx->head; /* the wire took every frame */
    } else if (peer >= 0 && i <= shared()->ad[peer].nic) {
        struct netmap_ring *rx = kring((uint32_t)peer, RX, i);
        while (*hwcur != tx->head) {
            uint32_t t = rx->tail, next = (t + 1) % SLOTS;
            if (next == __atomic_load_n(&shared()->ad[peer].hwcur[RX][i], __ATOMIC_ACQUIRE))
                break; /* RX full: the rest waits */
            struct netmap_slot *s = &tx->slot[*hwcur], *d = &rx->slot[t];
            memcpy(nmb_buf(rx, d->buf_idx), nmb_buf(tx, s->buf_idx), s->len);
            if (slot_delay_us)
                usleep(slot_delay_us);
            d->len = s->len;
            d->flags = s->flags & NS_MOREFRAG;
            __atomic_store_n(&rx->tail, next, __ATOMIC_RELEASE);
            *hwcur = (*hwcur + 1) % SLOTS;
        }
        if (*hwcur == tx->head) {
            /* room to send = room to receive, as where netmap's pipe ends share one ring: what
             * a txsync accepts is always delivered (nothing waits in a TX ring) */
            uint32_t room = (__atomic_load_n(&shared()->ad[peer].hwcur[RX][i], __ATOMIC_ACQUIRE) + SLOTS - 1 -
                             rx->tail) % SLOTS;
            tx->tail = (tx->head + room) % SLOTS;
        } else {
            tx->tail = tx->head; /* cannot happen with the room above; kept safe */
        }
        return;
    }
    tx->tail = (*hwcur + SLOTS - 1) % SLOTS;
}

static void rxsync_ring(struct fk_binding *b, uint32_t i)
{
    static const unsigned char head[14] = {0x02, 0, 0, 0, 0, 0x01, 0x02, 0, 0, 0, 0, 0x02, 0x88, 0xb5};
    struct fk_adapter *ad = &shared()->ad[b->ad];
    struct netmap_ring *rx = kring(b->ad, RX, i);
    __atomic_store_n(&ad->hwcur[RX][i], rx->head, __ATOMIC_RELEASE); /* the slots the user released */
    if (strncmp(ad->name, "src", 3))
        return;
    for (uint32_t t = rx->tail; (t + 1) % SLOTS != ad->hwcur[RX][i]; t = (t + 1) % SLOTS) {
        struct netmap_slot *s = &rx->slot[t];
        char *p = nmb_buf(rx, s->buf_idx);
        memcpy(p, head, sizeof(head));
        memcpy(p + sizeof(head), &ad->seq, sizeof(ad->seq));
        memset(p + sizeof(head) + sizeof(ad->seq), 0, 60 - sizeof(head) - sizeof(ad->seq));
        ad->seq++;
        s->len = 60;
        s->flags = 0;
        rx->tail = (t + 1) % SLOTS;
    }
}

/* netmap_poll() for one fd: the events it reports, after the syncs it does. */
static short fake_poll_one(int fd, short events)
{
    struct fk_binding *b = binding_of(fd);
    short revents = 0;
    int want_tx = events & POLLOUT, want_rx = events & POLLIN;
    if (!b)
        return POLLERR;
    if (b->txpoll || want_tx) {
        for (uint32_t i = b->first[TX]; i < b->last[TX]; i++) {
            struct netmap_ring *tx = kring(b->ad, TX, i);
            if (!want_tx && tx->head == shared()->ad[b->ad].hwcur[TX][i])
                continue; /* nothing new to send on this ring */
            if (!kr_tryget(b->ad, TX, i))
                continue; /* another thread's sync holds it */
            txsync_ring(b, i);
            kr_put(b->ad, TX, i);
            counters[4]++;
            if (tx->cur != tx->tail) {
                revents |= (short)want_tx;
                want_tx = 0;
            }
        }
    }
    if (want_rx) {
        for (uint32_t i = b->first[RX]; i < b->last[RX]; i++) {
            struct netmap_ring *rx = kring(b->ad, RX, i);
            if (!kr_tryget(b->ad, RX, i))
                continue;
            rxsync_ring(b, i);
            kr_put(b->ad, RX, i);
            counters[5]++;
            if (rx->cur != rx->tail)
                revents |= POLLIN;
        }
    }
    return revents;
}

/* ---- the intercepted calls ------------------------------------------------------------------ */

int ioctl(int fd, unsigned long req, ...)
{
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    REAL(int, ioctl, int, unsigned long, ...);
    if (!is_fake(fd))
        return real_ioctl(fd, req, arg);
    if (req == NIOCCTRL) {
        counters[3]++;
        return do_register(fd, arg);
    }
    struct fk_binding *b = binding_of(fd);
    if (!b) {
        errno = ENXIO;
        return -1;
    }
    if (req == NIOCTXSYNC) {
        counters[1]++;
        for (uint32_t i = b->first[TX]; i < b->last[TX]; i++) {
            if (kr_tryget(b->ad, TX, i)) {
                txsync_ring(b, i);
                kr_put(b->ad, TX, i);
            }
        }
        return 0;
    }
    if (req == NIOCRXSYNC) {
        counters[2]++;
        for (uint32_t i = b->first[RX]; i < b->last[RX]; i++) {
            if (kr_tryget(b->ad, RX, i)) {
                rxsync_ring(b, i);
                kr_put(b->ad, RX, i);
            }
        }
        return 0;
    }
    errno = ENOTTY;
    return -1;
}

static long long now_ms(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (long long)ts.tv_sec * 1000 + ts.tv_nsec / 1000000;
}

int poll(struct pollfd *fds, nfds_t nfds, int timeout)
{
    REAL(int, poll, struct pollfd *, nfds_t, int);
    struct pollfd other[64];
    int any_fake = 0;
    if (nfds > 64)
        return real_poll(fds, nfds, timeout);
    for (nfds_t i = 0; i < nfds; i++)
        any_fake |= is_fake(fds[i].fd);
    if (!any_fake)
        return real_poll(fds, nfds, timeout);
    counters[0]++;
    for (nfds_t i = 0; i < nfds; i++) {
        if (is_fake(fds[i].fd)) {
            counters[6] += (fds[i].events & POLLIN) != 0;
            counters[7] += (fds[i].events & POLLOUT) != 0;
        }
    }
    long long end = timeout < 0 ? -1 : now_ms() + timeout;
    for (;;) {
        int ready = 0;
        for (nfds_t i = 0; i < nfds; i++) {
            other[i] = fds[i];
            other[i].revents = 0;
            if (is_fake(fds[i].fd)) {
                fds[i].revents = (short)(fake_poll_one(fds[i].fd, fds[i].events) & (fds[i].events | POLLERR));
                ready += fds[i].revents != 0;
                other[i].fd = -1; /* the real poll() skips it */
            }
        }
        /* the other fds: at once when a fake one is ready, else a short sleep, then the fake
         * rings are looked at again (another thread may have filled them) */
        long long left = end < 0 ? 10 : end - now_ms();
        int slice = ready ? 0 : (int)(left < 0 ? 0 : left > 10 ? 10 : left);
        int rc = real_poll(other, nfds, slice);
        if (rc < 0)
            return rc;
        for (nfds_t i = 0; i < nfds; i++) {
            if (other[i].fd >= 0) {
                fds[i].revents = other[i].revents;
                ready += other[i].revents != 0;
            }
        }
        if (ready || (end >= 0 && now_ms() >= end))
            return ready;
    }
}

int close(int fd)
{
    REAL(int, close, int);
    if (fd >= 0 && fd < MAXFD) {
        if (fd_kind[fd] > 0)
            unregister(fd);
        fd_kind[fd] = 0;
    }
    return real_close(fd);
}

/* "/dev/netmap" by path is the fake device */

static int wants_mode(int flags)
{
    return (flags & O_CREAT) || (flags & O_TMPFILE) == O_TMPFILE;
}

static int open_common(int (*real)(const char *, int, ...), const char *path, int flags, va_list ap)
{
    mode_t mode = wants_mode(flags) ? (mode_t)va_arg(ap, int) : 0;
    const char *p = fake_path(path);
    int fd = real(p, flags, mode);
    if (fd >= 0 && fd < MAXFD)
        fd_kind[fd] = 0;
    return fd;
}

int open(const char *path, int flags, ...)
{
    REAL(int, open, const char *, int, ...);
    va_list ap;
    va_start(ap, flags);
    int fd = open_common(real_open, path, flags, ap);
    va_end(ap);
    return fd;
}

int open64(const char *path, int flags, ...)
{
    REAL(int, open64, const char *, int, ...);
    va_list ap;
    va_start(ap, flags);
    int fd = open_common(real_open64, path, flags, ap);
    va_end(ap);
    return fd;
}

int openat(int dirfd, const char *path, int flags, ...)
{
    REAL(int, openat, int, const char *, int, ...);
    va_list ap;
    va_start(ap, flags);
    mode_t mode = wants_mode(flags) ? (mode_t)va_arg(ap, int) : 0;
    va_end(ap);
    int fd = real_openat(dirfd, fake_path(path), flags, mode);
    if (fd >= 0 && fd < MAXFD)
        fd_kind[fd] = 0;
    return fd;
}

int openat64(int dirfd, const char *path, int flags, ...)
{
    REAL(int, openat64, int, const char *, int, ...);
    va_list ap;
    va_start(ap, flags);
    mode_t mode = wants_mode(flags) ? (mode_t)va_arg(ap, int) : 0;
    va_end(ap);
    int fd = real_openat64(dirfd, fake_path(path), flags, mode);
    if (fd >= 0 && fd < MAXFD)
        fd_kind[fd] = 0;
    return fd;
}

int stat(const char *path, struct stat *st)
{
    REAL(int, stat, const char *, struct stat *);
    return real_stat(fake_path(path), st);
}

int stat64(const char *path, struct stat64 *st)
{
    REAL(int, stat64, const char *, struct stat64 *);
    return real_stat64(fake_path(path), st);
}

int fstatat64(int dirfd, const char *path, struct stat64 *st, int flags)
{
    REAL(int, fstatat64, int, const char *, struct stat64 *, int);
    return real_fstatat64(dirfd, fake_path(path), st, flags);
}

int access(const char *path, int mode)
{
    REAL(int, access, const char *, int);
    return real_access(fake_path(path), mode);
}

int faccessat(int dirfd, const char *path, int mode, int flags)
{
    REAL(int, faccessat, int, const char *, int, int);
    return real_faccessat(dirfd, fake_path(path), mode, flags);
}
