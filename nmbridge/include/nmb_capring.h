/*
 * nmb_capring.h -- the capture tap: a bounded single-producer/single-consumer ring of frame
 * copies that fastfwd fills (one tap per direction, the forwarding thread the only producer)
 * and a consumer thread drains (nmbridge/capture.py through nmbridge.capring).
 *
 * The producer side is inline here, so fastfwd needs no other C: nmb_tap_offer() is called
 * at a verdict point only when a tap is installed (fastfwd loads the tap pointer once per
 * batch).  It never blocks and never touches the frame: a frame the selection skips costs a
 * mask test; a frame past the rate limit or that finds the ring full is counted and left.
 *
 * The ring is `size` bytes (a power of two); `prod` and `cons` are byte counters that only
 * grow.  A record is a struct nmb_cap_rec followed by `caplen` frame bytes, padded to 8.
 * A record never wraps: when it does not fit before the end, the producer writes a wrap
 * marker (size 0) and starts the record at offset 0.  The producer publishes with a release
 * store of `prod`; the consumer frees space with a release store of `cons`.
 */
#ifndef NMB_CAPRING_H
#define NMB_CAPRING_H

#include <stdint.h>
#include <string.h>
#include <time.h>

/* why a frame reached the tap: bit (1 << reason) of nmb_tap.want selects it */
enum {
    NMB_CAP_FORWARDED = 0,
    NMB_CAP_FILTERED = 1,
    NMB_CAP_OVERSIZE = 2,
    NMB_CAP_BROKEN_CHAIN = 3,
    NMB_CAP_NREASONS = 4,
};

#define NMB_CAP_RULE_NONE (-2)  /* no filter decided (no filter, or not a filter verdict) */

/* nmb_filter_decide's shape (filter.c, in the engine extension; its address is handed in) */
typedef int (*nmb_decide_fn)(const void *prog, const uint8_t *frame, uint32_t len, int *action);

struct nmb_cap_rec {
    uint32_t size;     /* the whole record, padded to 8; 0: wrap marker, go to offset 0 */
    uint32_t caplen;   /* frame bytes that follow */
    uint32_t origlen;  /* the frame's length on the wire */
    uint8_t reason;    /* NMB_CAP_* */
    uint8_t dir;       /* the tap's direction index */
    uint16_t pad;
    int32_t rule;      /* deciding rule index, -1 the default action, NMB_CAP_RULE_NONE */
    uint32_t pad2;
    uint64_t ts_ns;    /* CLOCK_REALTIME, ns */
};

struct nmb_tap {
    /* the producer's (forwarding thread) */
    uint64_t prod __attribute__((aligned(64)));
    uint64_t seen;          /* frames that matched the selection */
    uint64_t captured;      /* records written */
    uint64_t ring_full;     /* capture_dropped: the consumer was behind */
    uint64_t rate_limited;  /* over the rate limit */
    uint64_t cap_bytes;     /* frame bytes copied */
    uint64_t tokens;        /* token bucket, in frames * 1e9 */
    uint64_t last_ns;
    /* the consumer's */
    uint64_t cons __attribute__((aligned(64)));
    /* set before the tap is installed, read-only afterwards */
    uint8_t *buf __attribute__((aligned(64)));
    uint64_t size;          /* power of two */
    uint32_t snaplen;
    uint32_t want;          /* bits 1 << NMB_CAP_* */
    uint64_t limit;         /* stop capturing after this many records (0: no limit) */
    uint64_t rate;          /* frames per second (0: no limit) */
    uint64_t burst;         /* bucket depth, frames */
    const void *sel;        /* optional selection program (a filter: pass = capture) */
    nmb_decide_fn decide;   /* runs `sel` and names a filter's deciding rule */
    uint8_t dir;
};

static inline uint64_t nmb_cap_now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* The rate limiter: 1 when a frame may be taken now.  It reads the coarse clock (a few ns
 * through the vDSO, a tick's resolution: plenty for a bucket refilled per tick), so that a
 * frame over the limit costs no precise clock read. */
static inline int nmb_tap_token(struct nmb_tap *t)
{
    uint64_t cap = t->burst * 1000000000ull, dt, now;
    struct timespec ts;
    if (!t->rate)
        return 1;
    clock_gettime(CLOCK_MONOTONIC_COARSE, &ts);
    now = (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
    dt = now > t->last_ns ? now - t->last_ns : 0;
    if (dt > 1000000000ull)
        dt = 1000000000ull;     /* a full bucket is at most one second away */
    t->last_ns = now;
    t->tokens += dt * t->rate;
    if (t->tokens > cap)
        t->tokens = cap;
    if (t->tokens < 1000000000ull)
        return 0;
    t->tokens -= 1000000000ull;
    return 1;
}

/* Offer one frame in `n` pieces (`lens[i]` readable bytes at `bufs[i]`: the slots of a
 * chain; `origlen` on the wire) with its verdict `reason`; `filt` is the direction's filter
 * (an engine program) or NULL.  The selection and the deciding rule look at the first piece,
 * as the filter does.  Producer only. */
static inline void nmb_tap_offer_v(struct nmb_tap *t, unsigned reason, const void *filt,
                                   const uint8_t *const *bufs, const uint32_t *lens, uint32_t n,
                                   uint32_t origlen)
{
    uint64_t now, cons, pos, contig, need, prod;
    uint32_t caplen = 0, i, k;
    int action = 0, rule = NMB_CAP_RULE_NONE;
    const uint8_t *frame = bufs[0];
    uint32_t len = lens[0];
    uint8_t *dst;
    struct nmb_cap_rec *r;

    if (!(t->want & (1u << reason)))
        return;
    if (t->sel != NULL && (t->decide(t->sel, frame, len, &action), action == 0))
        return;                             /* the capture's expression says no */
    if (t->limit && t->captured >= t->limit)
        return;
    t->seen++;
    if (!nmb_tap_token(t)) {
        t->rate_limited++;
        return;
    }
    for (i = 0; i < n && caplen < t->snaplen; i++)
        caplen += lens[i] < t->snaplen - caplen ? lens[i] : t->snaplen - caplen;
    need = (sizeof(struct nmb_cap_rec) + caplen + 7) & ~7ull;
    prod = t->prod;
    cons = __atomic_load_n(&t->cons, __ATOMIC_ACQUIRE);
    pos = prod & (t->size - 1);
    contig = t->size - pos;
    if (need > contig) {                    /* wrap: waste the tail, start at 0 */
        if (t->size - (prod - cons) < contig + need) {
            t->ring_full++;
            return;
        }
        ((struct nmb_cap_rec *)(t->buf + pos))->size = 0;
        prod += contig;
        pos = 0;
    } else if (t->size - (prod - cons) < need) {
        t->ring_full++;
        return;
    }
    if (filt != NULL && t->decide != NULL &&
        (reason == NMB_CAP_FILTERED || reason == NMB_CAP_FORWARDED))
        rule = t->decide(filt, frame, len, &action);
    now = nmb_cap_now_ns();
    r = (struct nmb_cap_rec *)(t->buf + pos);
    r->size = (uint32_t)need;
    r->caplen = caplen;
    r->origlen = origlen;
    r->reason = (uint8_t)reason;
    r->dir = t->dir;
    r->pad = 0;
    r->rule = rule;
    r->pad2 = 0;
    r->ts_ns = now;
    dst = (uint8_t *)(r + 1);
    for (i = 0, k = caplen; k; i++) {
        uint32_t m = lens[i] < k ? lens[i] : k;
        memcpy(dst, bufs[i], m);
        dst += m;
        k -= m;
    }
    t->captured++;
    t->cap_bytes += caplen;
    __atomic_store_n(&t->prod, prod + need, __ATOMIC_RELEASE);
}

/* One frame in one piece. */
static inline void nmb_tap_offer(struct nmb_tap *t, unsigned reason, const void *filt,
                                 const uint8_t *frame, uint32_t len, uint32_t origlen)
{
    nmb_tap_offer_v(t, reason, filt, &frame, &len, 1, origlen);
}

/* The consumer's side (csrc/tapring.c). */
int nmb_tap_init(struct nmb_tap *t, uint64_t size);   /* 0, or -1: out of memory */
void nmb_tap_fini(struct nmb_tap *t);
/* The oldest record, or NULL when the ring is empty; valid until nmb_tap_release(). */
const struct nmb_cap_rec *nmb_tap_peek(struct nmb_tap *t);
void nmb_tap_release(struct nmb_tap *t, const struct nmb_cap_rec *r);

#endif /* NMB_CAPRING_H */
