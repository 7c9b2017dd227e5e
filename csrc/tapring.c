/*
 * tapring.c -- the consumer's side of the capture ring (see nmb_capring.h): allocation and
 * reading.  The producer (nmb_tap_offer) is inline in the header, in fastfwd.
 */
#include <stdlib.h>
#include "nmb_capring.h"

int nmb_tap_init(struct nmb_tap *t, uint64_t size)
{
    void *p = NULL;
    if (size < 4096 || (size & (size - 1)))
        return -1;
    if (posix_memalign(&p, 64, size) != 0)
        return -1;
    memset(p, 0, size);
    t->buf = p;
    t->size = size;
    t->prod = t->cons = 0;
    return 0;
}

void nmb_tap_fini(struct nmb_tap *t)
{
    free(t->buf);
    t->buf = NULL;
    t->size = 0;
}

const struct nmb_cap_rec *nmb_tap_peek(struct nmb_tap *t)
{
    uint64_t prod = __atomic_load_n(&t->prod, __ATOMIC_ACQUIRE);
    uint64_t cons = t->cons, pos;
    const struct nmb_cap_rec *r;
    while (cons != prod) {
        pos = cons & (t->size - 1);
        r = (const struct nmb_cap_rec *)(t->buf + pos);
        if (r->size != 0)
            return r;
        cons += t->size - pos;              /* a wrap marker: the record is at offset 0 */
        __atomic_store_n(&t->cons, cons, __ATOMIC_RELEASE);
    }
    return NULL;
}

void nmb_tap_release(struct nmb_tap *t, const struct nmb_cap_rec *r)
{
    __atomic_store_n(&t->cons, t->cons + r->size, __ATOMIC_RELEASE);
}
