/* nmport.c -- netmap: and vale ports through /dev/netmap (see nmb_nmport.h). */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <unistd.h>

#include "nmb_nmport.h"

/* One mapping of one kernel memory region, shared by every port of this process in it. */
struct nmregion {
    struct nmregion *next;
    uint16_t mem_id;
    void *base;
    size_t size;
    uint32_t users;
};

struct nmport {
    struct nmb_port port;
    struct nmregion *region;
    struct nmb_nmport_info info;
};

static pthread_mutex_t regions_lock = PTHREAD_MUTEX_INITIALIZER;
static struct nmregion *regions;

/* ---------------------------------------------------------------------------------------- */
/* requests and errors */

int nmb_nmport_encode(struct nmb_nmport_req *req, const char *nr_name, uint32_t mode, uint16_t ringid,
                      uint64_t flags, uint16_t mem_id)
{
    size_t n = strlen(nr_name);
    memset(req, 0, sizeof(*req));
    if (n == 0 || n >= sizeof(req->hdr.nr_name))
        return -1;
    req->hdr.nr_version = NETMAP_API;
    req->hdr.nr_reqtype = NETMAP_REQ_REGISTER;
    req->hdr.nr_reserved = 0;
    memcpy(req->hdr.nr_name, nr_name, n);
    req->hdr.nr_options = 0;
    req->hdr.nr_body = (uint64_t)(uintptr_t)&req->reg;
    req->reg.nr_mode = mode;
    req->reg.nr_ringid = ringid;
    req->reg.nr_flags = flags;
    req->reg.nr_mem_id = mem_id;
    return 0;
}

void nmb_nmport_strerror(int what, int err, const char *dev, const char *nr_name, unsigned kernel_version,
                         char *out, size_t outlen)
{
    if (what == NMB_NMPORT_ERR_OPEN) {
        switch (err) {
        case ENOENT:
            snprintf(out, outlen,
                     "the netmap kernel module is not loaded (%s is missing): load it with "
                     "`modprobe netmap` or `insmod netmap.ko`",
                     dev);
            break;
        case ENODEV:
        case ENXIO:
            snprintf(out, outlen,
                     "%s exists but no netmap driver answers it: load the module with `modprobe netmap`", dev);
            break;
        case EACCES:
        case EPERM:
            snprintf(out, outlen,
                     "permission denied on %s: run as root, or give this user read-write access to it "
                     "(its group or a udev rule)",
                     dev);
            break;
        default:
            snprintf(out, outlen, "cannot open %s: %s", dev, strerror(err));
        }
        return;
    }
    switch (err) {
    case ENOENT:
    case ENXIO:
    case ENODEV:
        snprintf(out, outlen, "no such interface '%s' (the kernel cannot find it or put it in netmap mode)",
                 nr_name);
        break;
    case EBUSY:
        /* NR_EXCLUSIVE: a ring we asked for is held by another registration (netmap_krings_get) */
        snprintf(out, outlen,
                 "its rings are in use by another netmap program (or by another port of this bridge "
                 "on the same rings of '%s'): stop it or pick other rings",
                 nr_name);
        break;
    case EINVAL:
        if (kernel_version != NETMAP_API)
            snprintf(out, outlen,
                     "netmap API mismatch: nmbridge speaks NETMAP_API %d, the kernel answered nr_version %u",
                     NETMAP_API, kernel_version);
        else
            snprintf(out, outlen,
                     "the kernel refused to register '%s' (EINVAL): a ring number or flag it does not "
                     "support, or a netmap API other than NETMAP_API %d (see dmesg)",
                     nr_name, NETMAP_API);
        break;
    case EACCES:
    case EPERM:
        snprintf(out, outlen, "permission denied registering '%s': needs root or CAP_NET_ADMIN", nr_name);
        break;
    case ENOMEM:
        snprintf(out, outlen, "the kernel has no netmap memory left for '%s'", nr_name);
        break;
    case ENOTTY:
        snprintf(out, outlen,
                 "%s does not understand NIOCCTRL: not a netmap device, or a netmap older than API %d", dev,
                 NETMAP_API);
        break;
    default:
        snprintf(out, outlen, "cannot register '%s': %s", nr_name, strerror(err));
    }
}

/* ---------------------------------------------------------------------------------------- */
/* memory regions: one mapping per nr_mem_id */

/* Find or create the mapping of `mem_id` (mapping it through `fd` if new). Returns NULL with
 * errno set. */
static struct nmregion *region_get(uint16_t mem_id, size_t size, int fd)
{
    struct nmregion *r;
    pthread_mutex_lock(&regions_lock);
    for (r = regions; r; r = r->next) {
        if (r->mem_id == mem_id) {
            if (size > r->size) { /* the kernel grew a region we mapped: never expected */
                pthread_mutex_unlock(&regions_lock);
                errno = EOVERFLOW;
                return NULL;
            }
            r->users++;
            pthread_mutex_unlock(&regions_lock);
            return r;
        }
    }
    r = calloc(1, sizeof(*r));
    if (!r) {
        pthread_mutex_unlock(&regions_lock);
        errno = ENOMEM;
        return NULL;
    }
    r->base = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
    if (r->base == MAP_FAILED) {
        int e = errno;
        free(r);
        pthread_mutex_unlock(&regions_lock);
        errno = e;
        return NULL;
    }
    r->mem_id = mem_id;
    r->size = size;
    r->users = 1;
    r->next = regions;
    regions = r;
    pthread_mutex_unlock(&regions_lock);
    return r;
}

static void region_put(struct nmregion *r)
{
    struct nmregion **pp;
    pthread_mutex_lock(&regions_lock);
    if (--r->users == 0) {
        for (pp = &regions; *pp; pp = &(*pp)->next) {
            if (*pp == r) {
                *pp = r->next;
                break;
            }
        }
        munmap(r->base, r->size);
        free(r);
    }
    pthread_mutex_unlock(&regions_lock);
}

uint32_t nmb_nmport_regions(void)
{
    uint32_t n = 0;
    pthread_mutex_lock(&regions_lock);
    for (struct nmregion *r = regions; r; r = r->next)
        n++;
    pthread_mutex_unlock(&regions_lock);
    return n;
}

/* ---------------------------------------------------------------------------------------- */
/* sync */

static int nm_ioctl_sync(struct nmb_port *p, unsigned long req, const char *what)
{
    for (;;) {
        if (ioctl(p->fd, req, NULL) == 0)
            return 0;
        if (errno != EINTR)
            break;
    }
    int e = errno;
    snprintf(p->error, NMB_PORT_ERRLEN, "%s on %s: %s", what, p->nifp->ni_name, strerror(e));
    return -e;
}

static int nm_rxsync(struct nmb_port *p)
{
    return nm_ioctl_sync(p, NIOCRXSYNC, "NIOCRXSYNC");
}

static int nm_txsync(struct nmb_port *p)
{
    return nm_ioctl_sync(p, NIOCTXSYNC, "NIOCTXSYNC");
}

/* ---------------------------------------------------------------------------------------- */
/* open / close */

/* The rings a port owns follow from its mode; the counts come from the netmap_if (the
 * register reply says 0 host rings for VALE ports and pipes while the netmap_if says 1). */
static int ring_ranges(struct nmport *np, uint32_t mode, uint16_t ringid, uint64_t flags, char *err,
                       size_t errlen)
{
    struct nmb_port *p = &np->port;
    const struct netmap_if *nifp = p->nifp;
    uint32_t ntx = nifp->ni_tx_rings, nrx = nifp->ni_rx_rings;
    uint32_t htx = nifp->ni_host_tx_rings, hrx = nifp->ni_host_rx_rings;
    uint32_t r = ringid & NETMAP_RING_MASK;

    switch (mode) {
    case NR_REG_DEFAULT:
    case NR_REG_ALL_NIC:
        p->tx_first = 0, p->tx_last = ntx;
        p->rx_first = 0, p->rx_last = nrx;
        break;
    case NR_REG_SW:
        p->tx_first = ntx, p->tx_last = ntx + htx;
        p->rx_first = nrx, p->rx_last = nrx + hrx;
        break;
    case NR_REG_NIC_SW:
        p->tx_first = 0, p->tx_last = ntx + htx;
        p->rx_first = 0, p->rx_last = nrx + hrx;
        break;
    case NR_REG_ONE_NIC:
        if (r >= ntx || r >= nrx) {
            snprintf(err, errlen, "ring %u out of range: '%s' has %u TX and %u RX rings", r, nifp->ni_name,
                     ntx, nrx);
            return -1;
        }
        p->tx_first = r, p->tx_last = r + 1;
        p->rx_first = r, p->rx_last = r + 1;
        break;
    case NR_REG_ONE_SW:
        if (r >= htx || r >= hrx) {
            snprintf(err, errlen, "host ring %u out of range: '%s' has %u host TX and %u host RX rings", r,
                     nifp->ni_name, htx, hrx);
            return -1;
        }
        p->tx_first = ntx + r, p->tx_last = ntx + r + 1;
        p->rx_first = nrx + r, p->rx_last = nrx + r + 1;
        break;
    default:
        snprintf(err, errlen, "nmbridge cannot forward with nr_mode %u", mode);
        return -1;
    }
    if (flags & NR_RX_RINGS_ONLY)
        p->tx_last = p->tx_first;
    if (flags & NR_TX_RINGS_ONLY)
        p->rx_last = p->rx_first;
    if (p->tx_first == p->tx_last && p->rx_first == p->rx_last) {
        snprintf(err, errlen, "'%s' has no rings in this mode", nifp->ni_name);
        return -1;
    }

    /* every ring we will touch must be bound to this fd and lie inside the region */
    const char *base = np->region->base;
    size_t size = np->region->size;
    size_t nifp_off = (size_t)((const char *)nifp - base);
    uint32_t total = ntx + htx + nrx + hrx;
    for (uint32_t i = p->tx_first; i < p->tx_last; i++) {
        int64_t o = nifp->ring_ofs[i];
        if (o <= 0 || nifp_off + (uint64_t)o + sizeof(struct netmap_ring) > size) {
            snprintf(err, errlen, "TX ring %u of '%s' is not bound or lies outside the region", i,
                     nifp->ni_name);
            return -1;
        }
    }
    for (uint32_t i = p->rx_first; i < p->rx_last; i++) {
        int64_t o = nifp->ring_ofs[i + ntx + htx];
        if (i + ntx + htx >= total || o <= 0 || nifp_off + (uint64_t)o + sizeof(struct netmap_ring) > size) {
            snprintf(err, errlen, "RX ring %u of '%s' is not bound or lies outside the region", i,
                     nifp->ni_name);
            return -1;
        }
    }
    return 0;
}

struct nmb_port *nmb_nmport_open(const char *dev, const char *nr_name, uint32_t mode, uint16_t ringid,
                                 uint64_t flags, uint16_t mem_id, char *err, size_t errlen)
{
    struct nmb_nmport_req req;
    struct nmport *np;
    int fd, e;

    if (nmb_nmport_encode(&req, nr_name, mode, ringid, flags, mem_id) != 0) {
        snprintf(err, errlen, "port name '%s' must be 1 to %d bytes", nr_name, NETMAP_REQ_IFNAMSIZ - 1);
        return NULL;
    }
    np = calloc(1, sizeof(*np));
    if (!np) {
        snprintf(err, errlen, "out of memory");
        return NULL;
    }
    fd = open(dev, O_RDWR | O_CLOEXEC);
    if (fd < 0) {
        nmb_nmport_strerror(NMB_NMPORT_ERR_OPEN, errno, dev, nr_name, NETMAP_API, err, errlen);
        free(np);
        return NULL;
    }
    if (ioctl(fd, NIOCCTRL, &req.hdr) != 0) {
        e = errno;
        nmb_nmport_strerror(NMB_NMPORT_ERR_REGISTER, e, dev, nr_name, req.hdr.nr_version, err, errlen);
        goto fail_fd;
    }
    if (req.reg.nr_memsize == 0 || req.reg.nr_offset + sizeof(struct netmap_if) > req.reg.nr_memsize) {
        snprintf(err, errlen, "the kernel's reply for '%s' is inconsistent (netmap_if at %llu in a %llu-byte region)",
                 nr_name, (unsigned long long)req.reg.nr_offset, (unsigned long long)req.reg.nr_memsize);
        goto fail_fd;
    }
    np->region = region_get(req.reg.nr_mem_id, (size_t)req.reg.nr_memsize, fd);
    if (!np->region) {
        snprintf(err, errlen, "cannot map the %llu-byte netmap memory region %u of '%s': %s",
                 (unsigned long long)req.reg.nr_memsize, req.reg.nr_mem_id, nr_name, strerror(errno));
        goto fail_fd;
    }
    np->port.nifp = (struct netmap_if *)((char *)np->region->base + req.reg.nr_offset);
    if (ring_ranges(np, mode, ringid, flags, err, errlen) != 0)
        goto fail_region;

    np->port.fd = fd;
    np->port.poll_syncs = 1;
    np->port.mem_key = (1ULL << 63) | req.reg.nr_mem_id;
    np->port.rxsync = nm_rxsync;
    np->port.txsync = nm_txsync;
    np->port.priv = np;
    np->info.memsize = req.reg.nr_memsize;
    np->info.offset = req.reg.nr_offset;
    np->info.mem_id = req.reg.nr_mem_id;
    np->info.ni_flags = np->port.nifp->ni_flags;
    np->info.ni_tx_rings = np->port.nifp->ni_tx_rings;
    np->info.ni_rx_rings = np->port.nifp->ni_rx_rings;
    np->info.ni_host_tx_rings = np->port.nifp->ni_host_tx_rings;
    np->info.ni_host_rx_rings = np->port.nifp->ni_host_rx_rings;
    np->info.reply_host_tx_rings = req.reg.nr_host_tx_rings;
    np->info.reply_host_rx_rings = req.reg.nr_host_rx_rings;
    np->info.nr_mode = mode;
    np->info.nr_ringid = ringid;
    np->info.nr_flags = flags;
    return &np->port;

fail_region:
    region_put(np->region);
fail_fd:
    close(fd);
    free(np);
    return NULL;
}

void nmb_nmport_close(struct nmb_port *p)
{
    struct nmport *np = (struct nmport *)p;
    if (!np)
        return;
    close(p->fd); /* unbinds the port (the kernel keeps the region while it is mapped) */
    region_put(np->region);
    free(np);
}

void nmb_nmport_get_info(struct nmb_port *p, struct nmb_nmport_info *out)
{
    struct nmport *np = (struct nmport *)p;
    *out = np->info;
    pthread_mutex_lock(&regions_lock);
    out->region_users = np->region->users;
    pthread_mutex_unlock(&regions_lock);
}

/* ---------------------------------------------------------------------------------------- */
/* test and benchmark drivers */

long nmb_nmport_put(struct nmb_port *p, const char *data, const uint32_t *lens, uint32_t n)
{
    uint32_t done = 0;
    size_t off = 0;
    for (uint32_t ri = p->tx_first; ri < p->tx_last && done < n; ri++) {
        struct netmap_ring *ring = nmb_txring(p->nifp, ri);
        uint32_t h = ring->head;
        while (done < n && h != ring->tail) {
            struct netmap_slot *s = &ring->slot[h];
            if (lens[done] > ring->nr_buf_size || lens[done] > 0xffff)
                return -EMSGSIZE;
            memcpy(nmb_buf(ring, s->buf_idx), data + off, lens[done]);
            s->len = (uint16_t)lens[done];
            s->flags = 0;
            off += lens[done];
            done++;
            h = nmb_ring_next(ring, h);
        }
        ring->head = ring->cur = h;
    }
    return done;
}

static int wait_fd(int fd, short events)
{
    struct pollfd pfd = {.fd = fd, .events = events, .revents = 0};
    int rc = poll(&pfd, 1, 100);
    if (rc < 0 && errno != EINTR)
        return -errno;
    return 0;
}

int64_t nmb_nmport_generate(struct nmb_port *p, uint32_t frame_len, uint64_t count, volatile int *stop)
{
    static const unsigned char head[14] = {0x02, 0, 0, 0, 0, 0x02, 0x02, 0, 0, 0, 0, 0x01, 0x88, 0xb5};
    uint64_t sent = 0;
    int rc;
    if (frame_len < 22)
        return -EINVAL;
    while (!*stop && (count == 0 || sent < count)) {
        uint64_t placed = 0;
        for (uint32_t ri = p->tx_first; ri < p->tx_last; ri++) {
            struct netmap_ring *ring = nmb_txring(p->nifp, ri);
            uint32_t h = ring->head;
            if (frame_len > ring->nr_buf_size)
                return -EMSGSIZE;
            while (h != ring->tail && (count == 0 || sent + placed < count)) {
                struct netmap_slot *s = &ring->slot[h];
                char *b = nmb_buf(ring, s->buf_idx);
                uint64_t seq = sent + placed;
                memcpy(b, head, sizeof(head));
                memcpy(b + 14, &seq, sizeof(seq));
                s->len = (uint16_t)frame_len;
                s->flags = 0;
                placed++;
                h = nmb_ring_next(ring, h);
            }
            ring->head = ring->cur = h;
        }
        sent += placed;
        if (placed) {
            if ((rc = p->txsync(p)) < 0)
                return rc;
        } else if ((rc = wait_fd(p->fd, POLLOUT)) < 0) {
            return rc;
        }
    }
    return (int64_t)sent;
}

int64_t nmb_nmport_sink(struct nmb_port *p, uint64_t count, volatile int *stop, uint64_t *bytes)
{
    uint64_t got = 0;
    int rc;
    while (!*stop && (count == 0 || got < count)) {
        uint64_t seen = 0;
        for (uint32_t ri = p->rx_first; ri < p->rx_last; ri++) {
            struct netmap_ring *ring = nmb_rxring(p->nifp, ri);
            uint32_t h = ring->head;
            while (h != ring->tail) {
                struct netmap_slot *s = &ring->slot[h];
                *bytes += s->len;
                if (!(s->flags & NS_MOREFRAG))
                    got++;
                seen++;
                h = nmb_ring_next(ring, h);
            }
            ring->head = ring->cur = h;
        }
        if (seen) {
            if ((rc = p->rxsync(p)) < 0)
                return rc;
        } else if ((rc = wait_fd(p->fd, POLLIN)) < 0) {
            return rc;
        }
    }
    return (int64_t)got;
}
