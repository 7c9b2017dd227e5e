/*
 * A stand-in for the netmap kernel module, for tests on machines without it: an LD_PRELOAD
 * library that answers ioctl() on one regular file (path in $NMB_FAKE_DEV) as /dev/netmap
 * would, from the ABI facts.  The file itself is the memory region (mmap of it works as is).
 *
 * Every registered port gets one NIC ring pair and one host ring pair of 64 slots, in
 * region 1 (names starting with "vale": region 3, mapped separately).  TXSYNC loops the
 * frames of the bound TX ring back into the bound RX ring of the same port.  Names
 * starting with "nosuch", "busy" or "oldapi" fail with ENOENT, EBUSY, or EINVAL and
 * nr_version 11.  Only what the netmap backend's tests need; not a model of netmap.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "nmb_netmap.h"

#define REGION (4u << 20)
#define POOL_OFS (1u << 20)
#define BUF 2048u
#define SLOTS 64u
#define PORT_SPAN (64u << 10)
#define MAXFD 1024

static char *mem;
static unsigned nports;
static int port_of_fd[MAXFD];      /* port index + 1 */
static uint32_t hwcur[16];

static int is_fake(int fd)
{
    const char *dev = getenv("NMB_FAKE_DEV");
    struct stat a, b;
    if (!dev || fd < 0 || fd >= MAXFD || fstat(fd, &a) || stat(dev, &b))
        return 0;
    if (a.st_dev != b.st_dev || a.st_ino != b.st_ino)
        return 0;
    if (!mem) {
        mem = mmap(NULL, REGION, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
        if (mem == MAP_FAILED)
            abort();
    }
    return 1;
}

static void init_ring(struct netmap_ring *r, size_t ring_ofs, uint32_t first_buf, int tx)
{
    *(int64_t *)&r->buf_ofs = (int64_t)POOL_OFS - (int64_t)ring_ofs;
    *(uint32_t *)&r->num_slots = SLOTS;
    *(uint32_t *)&r->nr_buf_size = BUF;
    r->head = r->cur = 0;
    r->tail = tx ? SLOTS - 1 : 0;
    for (uint32_t i = 0; i < SLOTS; i++) {
        r->slot[i].buf_idx = first_buf + i;
        r->slot[i].len = 0;
        r->slot[i].flags = 0;
    }
}

static int do_register(int fd, struct nmreq_header *h)
{
    struct nmreq_register *reg = (struct nmreq_register *)(uintptr_t)h->nr_body;
    if (h->nr_version != NETMAP_API || !strncmp(h->nr_name, "oldapi", 6)) {
        h->nr_version = 11;
        errno = EINVAL;
        return -1;
    }
    if (h->nr_reqtype != NETMAP_REQ_REGISTER || h->nr_reserved || h->nr_options) {
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
    unsigned k = nports++;
    size_t nifp_ofs = (size_t)k * PORT_SPAN;
    struct netmap_if *nifp = (struct netmap_if *)(mem + nifp_ofs);
    int sw = reg->nr_mode == NR_REG_SW;
    memset(nifp, 0, PORT_SPAN);
    strncpy((char *)nifp->ni_name, h->nr_name, NM_IFNAMSIZ - 1);
    *(uint32_t *)&nifp->ni_version = NETMAP_API;
    *(uint32_t *)&nifp->ni_tx_rings = 1;
    *(uint32_t *)&nifp->ni_rx_rings = 1;
    *(uint32_t *)&nifp->ni_host_tx_rings = 1;
    *(uint32_t *)&nifp->ni_host_rx_rings = 1;
    int64_t *ofs = (int64_t *)nifp->ring_ofs;
    size_t tx_ofs = nifp_ofs + 1024, rx_ofs = nifp_ofs + 1024 + 2048;
    ofs[sw ? 1 : 0] = (int64_t)(tx_ofs - nifp_ofs);
    ofs[sw ? 3 : 2] = (int64_t)(rx_ofs - nifp_ofs);
    init_ring((struct netmap_ring *)(mem + tx_ofs), tx_ofs, 2 + k * 2 * SLOTS, 1);
    init_ring((struct netmap_ring *)(mem + rx_ofs), rx_ofs, 2 + k * 2 * SLOTS + SLOTS, 0);
    hwcur[k] = 0;
    port_of_fd[fd] = (int)k + 1;
    reg->nr_offset = nifp_ofs;
    reg->nr_memsize = REGION;
    reg->nr_mem_id = strncmp(h->nr_name, "vale", 4) ? 1 : 3;
    reg->nr_tx_rings = reg->nr_rx_rings = 1;
    reg->nr_host_tx_rings = reg->nr_host_rx_rings = 0; /* as VALE ports and pipes answer */
    reg->nr_tx_slots = reg->nr_rx_slots = SLOTS;
    return 0;
}

static int do_txsync(int fd)
{
    unsigned k = (unsigned)port_of_fd[fd] - 1;
    char *base = mem + (size_t)k * PORT_SPAN;
    struct netmap_ring *tx = (struct netmap_ring *)(base + 1024);
    struct netmap_ring *rx = (struct netmap_ring *)(base + 1024 + 2048);
    while (hwcur[k] != tx->head) {
        uint32_t t = rx->tail, next = (t + 1) % SLOTS;
        if (next == rx->head)
            break; /* RX full: the rest waits */
        struct netmap_slot *s = &tx->slot[hwcur[k]], *d = &rx->slot[t];
        memcpy(nmb_buf(rx, d->buf_idx), nmb_buf(tx, s->buf_idx), s->len);
        d->len = s->len;
        d->flags = s->flags & NS_MOREFRAG;
        s->flags = 0;
        rx->tail = next;
        hwcur[k] = (hwcur[k] + 1) % SLOTS;
    }
    tx->tail = (hwcur[k] + SLOTS - 1) % SLOTS;
    return 0;
}

int ioctl(int fd, unsigned long req, ...)
{
    static int (*real)(int, unsigned long, ...);
    va_list ap;
    va_start(ap, req);
    void *arg = va_arg(ap, void *);
    va_end(ap);
    if (!real)
        real = (int (*)(int, unsigned long, ...))dlsym(RTLD_NEXT, "ioctl");
    if (!is_fake(fd))
        return real(fd, req, arg);
    if (req == NIOCCTRL)
        return do_register(fd, arg);
    if (port_of_fd[fd] == 0) {
        errno = ENXIO;
        return -1;
    }
    if (req == NIOCTXSYNC)
        return do_txsync(fd);
    if (req == NIOCRXSYNC)
        return 0;
    errno = ENOTTY;
    return -1;
}

int close(int fd)
{
    static int (*real)(int);
    if (!real)
        real = (int (*)(int))dlsym(RTLD_NEXT, "close");
    if (fd >= 0 && fd < MAXFD)
        port_of_fd[fd] = 0;
    return real(fd);
}
