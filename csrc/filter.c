/*
 * filter.c -- evaluate a compiled filter (nmb_filter_prog.h) on one frame.
 *
 * nmb_filter_prog_finish turns the rules into the hot form once, at load time:
 *   - `level`: how deep the filter as a whole needs the frame parsed (nothing; bytes 0-13;
 *     the 802.1Q/802.1ad tag chain and ethertype; L3 and L4), so each frame is parsed once
 *     and exactly that deep;
 *   - per rule, the masked key words it tests (only those, presence bits included), its
 *     port ranges and its BPF program;
 *   - three candidate tables: for each value of a cheap frame fact, the bit set of rules
 *     that can match a frame with that fact.  A rule's bit is cleared only where the rule
 *     cannot match, so the candidate set always holds the deciding rule; the tables only
 *     save work.
 * Per frame: extract the key (every read bounded by `len`; a field whose bytes, or the bytes
 * needed to find it, are not all in the frame is absent and never matches; untagged IPv4
 * with a 20-byte header, the common case, in straight-line code), AND the three table rows,
 * then check the candidates in rule order; the first that matches decides.  Filters of pcap
 * rules only skip all that and run the BPF programs in order.  The meaning of each field is
 * /work/shared/filter-semantics.md.
 */
#include <stdlib.h>
#include <string.h>
#include "nmb_filter_prog.h"

#define TPID_8021Q 0x8100
#define TPID_8021AD 0x88a8
#define ETH_IPV4 0x0800
#define ETH_IPV6 0x86dd

/*
 * The key.  MACs and addresses are the frame's bytes loaded as they lie (ld_bytes), so the
 * rule side is built with the same helper; the other fields are numbers.
 *   w[0] dst MAC   w[1] src MAC
 *   w[2] bits 0-15 outer TCI, 16-31 second TCI, 32-39 ip_proto, 40-63 presence bits (P_*)
 *   w[3] bits 0-15 src port, 16-31 dst port, 32-47 ethertype, 48-63 bytes 12-13
 *   w[4..5] src IP (IPv4: the first 4 bytes)   w[6..7] dst IP
 */
#define NWORDS 8
#define P_(n) (1ull << (40 + (n)))
#define P_DMAC P_(0)
#define P_SMAC P_(1)
#define P_B12 P_(2)     /* bytes 12-13 are in the frame */
#define P_TAG P_(3)     /* ... and are 0x8100 or 0x88a8 */
#define P_TCI0 P_(4)
#define P_TCI1 P_(5)
#define P_ETYPE P_(6)
#define P_SRC4 P_(7)
#define P_DST4 P_(8)
#define P_SRC6 P_(9)
#define P_DST6 P_(10)
#define P_PROTO P_(11)
#define P_SPORT P_(12)
#define P_DPORT P_(13)

/* parse levels (nmb_filter_prog.level) */
#define LV_NONE 0
#define LV_L2 1      /* bytes 0-13 */
#define LV_TAGS 2    /* + tag chain, ethertype */
#define LV_L3 3      /* + IP, protocol, ports */

/* L3 classes (t1 row = l3 * NPCLS + protocol class) */
#define L3_NONE 0    /* no ethertype */
#define L3_IP4 1
#define L3_IP6 2
#define L3_OTHER 3   /* any other ethertype, or 0x0800/0x86dd failing the version check */
#define NL3 4
#define PC_NONE 0    /* protocol unknown (no IP, or cut off) */
#define PC_TCP 1
#define PC_UDP 2
#define PC_SCTP 3
#define PC_OTHER 4
#define NPCLS 5
#define NT1 (NL3 * NPCLS)
#define NT2 9
#define NT3 65

struct key {
    uint64_t w[NWORDS];
    uint32_t t1, t2, t3;  /* table rows */
};

/* big-endian 16/32-bit reads (one load and a byte swap) */
static inline uint32_t rd16(const uint8_t *p)
{
    uint16_t v;
    memcpy(&v, p, 2);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap16(v);
#endif
    return v;
}

static inline uint32_t rd32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
    v = __builtin_bswap32(v);
#endif
    return v;
}

static inline int is_tpid(uint32_t t)
{
    return t == TPID_8021Q || t == TPID_8021AD;
}

static inline int is_ports_proto(uint32_t proto)
{
    return proto == 6 || proto == 17 || proto == 132;
}

static inline uint32_t proto_class(uint32_t proto)
{
    return proto == 6 ? PC_TCP : proto == 17 ? PC_UDP : proto == 132 ? PC_SCTP : PC_OTHER;
}

/* the first 6 of 8 bytes loaded as they lie (what ld_bytes(p, 6) gives) */
#if __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#define FIRST6 0x0000ffffffffffffull
#else
#define FIRST6 0xffffffffffff0000ull
#endif

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}


/* n (<= 8) bytes as they lie, in a word */
static inline uint64_t ld_bytes(const uint8_t *p, size_t n)
{
    uint64_t v = 0;
    memcpy(&v, p, n);
    return v;
}

/* IPv6 extension-header walk from `off` with next header `nh`: sets the protocol and ports
 * in the key; `l4` is where ports would start.  Bounded: each step advances off. */
static inline void walk_ip6(const uint8_t *p, uint32_t len, uint32_t nh, uint32_t off,
                            struct key *k, uint64_t *pres, uint32_t *pcls)
{
    for (;;) {
        uint32_t hl;
        switch (nh) {
        case 0:
        case 43:
        case 60:
        case 51:
            if (off + 2 > len)
                return;
            hl = nh == 51 ? ((uint32_t)p[off + 1] + 2) * 4 : ((uint32_t)p[off + 1] + 1) * 8;
            if (off + hl > len)
                return;
            nh = p[off];
            off += hl;
            continue;
        case 44:
            if (off + 8 > len)
                return;
            if ((rd16(p + off + 2) & 0xfff8) != 0) {
                /* not the first fragment: the protocol, no ports */
                k->w[2] |= (uint64_t)p[off] << 32;
                *pres |= P_PROTO;
                *pcls = proto_class(p[off]);
                return;
            }
            nh = p[off];
            off += 8;
            continue;
        default:
            break;
        }
        break;
    }
    k->w[2] |= (uint64_t)nh << 32;
    *pres |= P_PROTO;
    *pcls = proto_class(nh);
    if (is_ports_proto(nh)) {
        if (off + 2 <= len) {
            k->w[3] |= rd16(p + off);
            *pres |= P_SPORT;
        }
        if (off + 4 <= len) {
            k->w[3] |= (uint64_t)rd16(p + off + 2) << 16;
            *pres |= P_DPORT;
        }
    }
}

/* The common frame, untagged IPv4 with a 20-byte header and 4 bytes after it (len >= 38,
 * so every read below is inside the frame): the key in straight-line code.  Gives exactly
 * what the general path below gives for such a frame. */
static inline __attribute__((always_inline)) void extract_ip4(const uint8_t *p, struct key *k)
{
    uint32_t proto = p[23], pcls = proto_class(proto);
    uint64_t pres = P_DMAC | P_SMAC | P_B12 | P_ETYPE | P_SRC4 | P_DST4 | P_PROTO;
    uint64_t w3 = (uint64_t)ETH_IPV4 << 48 | (uint64_t)ETH_IPV4 << 32;
    k->t3 = 64;
    if (pcls != PC_OTHER && (rd16(p + 20) & 0x1fff) == 0) {
        uint32_t ports = rd32(p + 34);  /* src << 16 | dst */
        w3 |= (uint32_t)(ports >> 16 | ports << 16);
        pres |= P_SPORT | P_DPORT;
        k->t3 = p[37] & 63;
    }
    k->w[0] = ld64(p) & FIRST6;
    k->w[1] = ld64(p + 6) & FIRST6;
    k->w[2] = pres | (uint64_t)proto << 32;
    k->w[3] = w3;
    /* as ld_bytes(.., 4) lays them out: the 4 bytes first in the word */
    k->w[4] = ld_bytes(p + 26, 4);
    k->w[5] = 0;
    k->w[6] = ld_bytes(p + 30, 4);
    k->w[7] = 0;
    k->t1 = L3_IP4 * NPCLS + pcls;
    k->t2 = 4 + 3 * (p[0] & 1);  /* unicast/group, not a tag */
}

/* Fill the key as deep as `level` (any frame); every read is inside p[0 .. len).  Not
 * inlined: it keeps the callers' common path small. */
static __attribute__((noinline)) void extract_any(uint32_t level, const uint8_t *p,
                                                  uint32_t len, struct key *k)
{
    uint64_t pres = 0;
    uint32_t l3cls = L3_NONE, pcls = PC_NONE, t, off = 12;
    memset(k->w, 0, sizeof(k->w));
    k->t2 = 0;
    if (len >= 6) {
        k->w[0] = ld_bytes(p, 6);
        pres |= P_DMAC;
        k->t2 = 3 + 3 * (p[0] & 1);  /* group bit: row 3 or 6 */
    }
    if (len < 14) {
        if (len >= 12) {
            k->w[1] = ld_bytes(p + 6, 6);
            pres |= P_SMAC;
        }
        goto done;
    }
    k->w[1] = ld_bytes(p + 6, 6);
    t = rd16(p + 12);
    k->w[3] = (uint64_t)t << 48;
    pres |= P_SMAC | P_B12;
    if (is_tpid(t)) {
        pres |= P_TAG;
        k->t2 += 2;
    } else {
        k->t2 += 1;
    }
    if (level < LV_TAGS)
        goto done;
    /* the tag chain: each pass consumes 4 bytes, so it ends */
    if (is_tpid(t)) {
        uint32_t ntags = 0;
        for (;;) {
            if (off + 4 > len)
                goto done;  /* a tag whose TCI is cut off: no ethertype */
            uint32_t tci = rd16(p + off + 2);
            if (ntags == 0) {
                k->w[2] |= tci;
                pres |= P_TCI0;
            } else if (ntags == 1) {
                k->w[2] |= tci << 16;
                pres |= P_TCI1;
            }
            ntags++;
            off += 4;
            if (off + 2 > len)
                goto done;
            t = rd16(p + off);
            if (!is_tpid(t))
                break;
        }
    }
    if (t < 0x0600)
        goto done;  /* an 802.3 length: no ethertype */
    k->w[3] |= (uint64_t)t << 32;
    pres |= P_ETYPE;
    l3cls = L3_OTHER;
    if (level < LV_L3)
        goto done;
    uint32_t l3 = off + 2;
    if (l3 >= len)
        goto done;
    if (t == ETH_IPV4) {
        uint32_t vi = p[l3], ihl = vi & 0x0f;
        if ((vi >> 4) != 4 || ihl < 5)
            goto done;
        l3cls = L3_IP4;
        if (l3 + 20 <= len) {
            k->w[4] = ld_bytes(p + l3 + 12, 4);
            k->w[6] = ld_bytes(p + l3 + 16, 4);
            pres |= P_SRC4 | P_DST4;
        } else {
            if (l3 + 10 > len)
                goto done;
            if (l3 + 16 <= len) {
                k->w[4] = ld_bytes(p + l3 + 12, 4);
                pres |= P_SRC4;
            }
        }
        /* here l3 + 10 <= len: bytes 6-7 (flags, fragment offset) and 9 are in the frame */
        uint32_t proto = p[l3 + 9];
        k->w[2] |= (uint64_t)proto << 32;
        pres |= P_PROTO;
        pcls = proto_class(proto);
        if (pcls != PC_OTHER && (rd16(p + l3 + 6) & 0x1fff) == 0) {
            uint32_t l4 = l3 + 4 * ihl;
            if (l4 + 4 <= len) {
                k->w[3] |= rd16(p + l4) | (uint64_t)rd16(p + l4 + 2) << 16;
                pres |= P_SPORT | P_DPORT;
            } else if (l4 + 2 <= len) {
                k->w[3] |= rd16(p + l4);
                pres |= P_SPORT;
            }
        }
    } else if (t == ETH_IPV6) {
        if ((p[l3] >> 4) != 6)
            goto done;
        l3cls = L3_IP6;
        if (l3 + 24 <= len) {
            memcpy(&k->w[4], p + l3 + 8, 16);
            pres |= P_SRC6;
        }
        if (l3 + 40 <= len) {
            memcpy(&k->w[6], p + l3 + 24, 16);
            pres |= P_DST6;
        }
        if (l3 + 7 <= len)
            walk_ip6(p, len, p[l3 + 6], l3 + 40, k, &pres, &pcls);
    }
done:
    k->w[2] |= pres;
    k->t1 = l3cls * NPCLS + pcls;
    k->t3 = (pres & P_DPORT) ? (uint32_t)(k->w[3] >> 16) & 63 : 64;
}

static inline __attribute__((always_inline)) void extract(uint32_t level, const uint8_t *p,
                                                          uint32_t len, struct key *k)
{
    /* at LV_L2 and LV_TAGS the L3 facts are extra, and no rule reads them */
    if (len >= 38 && rd32(p + 12) >> 8 == 0x080045)
        extract_ip4(p, k);
    else
        extract_any(level, p, len, k);
}

static inline __attribute__((always_inline)) int rule_match(const struct nmb_filter_prog *prog,
                                                            const struct nmb_hot_rule *r,
                                                            const struct key *k,
                                                            const uint8_t *p, uint32_t len)
{
    /* two compares unconditionally (an unused one has mask 0), the rest in a loop */
    if ((k->w[r->w[0]] ^ r->val[0]) & r->mask[0])
        return 0;
    if ((k->w[r->w[1]] ^ r->val[1]) & r->mask[1])
        return 0;
    if (r->nmore) {
        const struct nmb_chk *c = prog->chk + r->more_off;
        for (uint32_t i = 0; i < r->nmore; i++)
            if ((k->w[r->widx[i]] ^ c[i].val) & c[i].mask)
                return 0;
    }
    if (r->flags) {
        if ((r->flags & NMB_HR_SPORT_RANGE) &&
            (uint16_t)((uint16_t)k->w[3] - r->sport_lo) > r->sport_span)
            return 0;
        if ((r->flags & NMB_HR_DPORT_RANGE) &&
            (uint16_t)((uint16_t)(k->w[3] >> 16) - r->dport_lo) > r->dport_span)
            return 0;
        if ((r->flags & NMB_HR_BPF) && nmb_bpf_run(prog->ops + r->bpf_off, p, len) == 0)
            return 0;
    }
    return 1;
}

/* the index of the deciding rule, or -1 for the default */
static inline __attribute__((always_inline)) int decide(const struct nmb_filter_prog *prog,
                                                        const uint8_t *p, uint32_t len)
{
    struct key k;
    uint32_t nb = prog->nblocks;
    if (prog->level != LV_NONE) {
        extract(prog->level, p, len, &k);
    } else {
        /* rules without fields: their unused compares read w[0] under mask 0 */
        k.w[0] = 0;
        k.t1 = k.t2 = k.t3 = 0;
    }
    const uint64_t *r1 = prog->t1 + (size_t)k.t1 * nb;
    const uint64_t *r2 = prog->t2 + (size_t)k.t2 * nb;
    const uint64_t *r3 = prog->t3 + (size_t)k.t3 * nb;
    for (uint32_t b = 0; b < nb; b++) {
        /* a table that tells nothing holds every rule in every row (finish) */
        uint64_t cand = r1[b] & r2[b] & r3[b];
        while (cand) {
            uint32_t i = b * 64 + (uint32_t)__builtin_ctzll(cand);
            cand &= cand - 1;
            if (rule_match(prog, &prog->hot[i], &k, p, len))
                return (int)i;
        }
    }
    return -1;
}

/* up to 64 rules: one word of candidates */
static int run_small(struct nmb_filter *self, const uint8_t *p, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    struct key k;
    if (prog->level != LV_NONE) {
        extract(prog->level, p, len, &k);
    } else {
        /* rules without fields: their unused compares read w[0] under mask 0 */
        k.w[0] = 0;
        k.t1 = k.t2 = k.t3 = 0;
    }
    uint64_t cand = prog->t1[k.t1] & prog->t2[k.t2] & prog->t3[k.t3];
    while (cand) {
        uint32_t i = (uint32_t)__builtin_ctzll(cand);
        cand &= cand - 1;
        if (rule_match(prog, &prog->hot[i], &k, p, len)) {
            prog->hits[i]++;
            return prog->hot[i].action;
        }
    }
    prog->hits[prog->nrules]++;
    return prog->default_action;
}

/* every rule a bare BPF program (pcap rules): no key, no tables */
static int run_bpf_only(struct nmb_filter *self, const uint8_t *p, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    const struct nmb_hot_rule *r = prog->hot;
    for (uint32_t i = 0; i < prog->nrules; i++) {
        if (nmb_bpf_run(prog->ops + r[i].bpf_off, p, len) != 0) {
            prog->hits[i]++;
            return r[i].action;
        }
    }
    prog->hits[prog->nrules]++;
    return prog->default_action;
}

/* one bare BPF program: the most common pcap filter */
static int run_bpf1(struct nmb_filter *self, const uint8_t *p, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    if (nmb_bpf_run(prog->ops + prog->hot[0].bpf_off, p, len) != 0) {
        prog->hits[0]++;
        return prog->hot[0].action;
    }
    prog->hits[1]++;
    return prog->default_action;
}

int nmb_filter_decide(const struct nmb_filter_prog *prog, const uint8_t *frame, uint32_t len,
                      int *action)
{
    int i = prog->hot != NULL ? decide(prog, frame, len) : -1;
    *action = i < 0 ? prog->default_action : prog->hot[i].action;
    return i;
}

int nmb_filter_run(struct nmb_filter *self, const uint8_t *frame, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    int i = decide(prog, frame, len);
    if (i < 0) {
        prog->hits[prog->nrules]++;
        return prog->default_action;
    }
    prog->hits[i]++;
    return prog->hot[i].action;
}

/* no rules: the default decides every frame */
static int run_default(struct nmb_filter *self, const uint8_t *frame, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    (void)frame;
    (void)len;
    prog->hits[prog->nrules]++;
    return prog->default_action;
}

/* before nmb_filter_prog_finish: the default, uncounted */
static int run_unfinished(struct nmb_filter *self, const uint8_t *frame, uint32_t len)
{
    (void)frame;
    (void)len;
    return ((struct nmb_filter_prog *)self)->default_action;
}

/* --- load time ------------------------------------------------------------------------- */

/* What one rule tests, as masks and values over the key, and the frame facts it needs. */
struct rule_form {
    uint64_t mask[NWORDS], val[NWORDS];
    uint32_t level;
    uint8_t t1_ok[NT1];  /* 1: the rule can match a frame in this row */
    uint8_t t2_ok[NT2];
    uint8_t t3_ok[NT3];
};

static void put(struct rule_form *f, uint32_t w, uint64_t mask, uint64_t val)
{
    f->mask[w] |= mask;
    f->val[w] |= val & mask;
}

static void need(struct rule_form *f, uint32_t level)
{
    if (f->level < level)
        f->level = level;
}

/* keep only the t1 rows where l3 is allowed (bit per class) and the protocol class is
 * allowed (bit per class) */
static void restrict_t1(struct rule_form *f, uint32_t l3_ok, uint32_t pc_ok)
{
    for (uint32_t l3 = 0; l3 < NL3; l3++)
        for (uint32_t pc = 0; pc < NPCLS; pc++)
            if (!(l3_ok >> l3 & 1) || !(pc_ok >> pc & 1))
                f->t1_ok[l3 * NPCLS + pc] = 0;
}

/* keep only the t2 rows whose group part (0 short, 1 unicast, 2 group) is in g_ok and whose
 * bytes-12-13 part (0 short, 1 not a tag, 2 a tag) is in v_ok */
static void restrict_t2(struct rule_form *f, uint32_t g_ok, uint32_t v_ok)
{
    for (uint32_t g = 0; g < 3; g++)
        for (uint32_t v = 0; v < 3; v++)
            if (!(g_ok >> g & 1) || !(v_ok >> v & 1))
                f->t2_ok[g * 3 + v] = 0;
}

#define ANY_PC ((1u << NPCLS) - 1)
#define IP_L3 ((1u << L3_IP4) | (1u << L3_IP6))
#define HAS_B12 6u  /* v in {1, 2} */

/* an IP prefix in key words w (and w + 1 for IPv6), with its family's presence bit */
static void put_prefix(struct rule_form *f, uint32_t w, int v6, const uint8_t *ip, const uint8_t *mask,
                       uint64_t p4, uint64_t p6)
{
    if (v6) {
        put(f, w, ld_bytes(mask, 8), ld_bytes(ip, 8));
        put(f, w + 1, ld_bytes(mask + 8, 8), ld_bytes(ip + 8, 8));
        put(f, 2, p6, p6);
    } else {
        put(f, w, ld_bytes(mask, 4), ld_bytes(ip, 4));
        put(f, 2, p4, p4);
    }
    need(f, LV_L3);
    restrict_t1(f, 1u << (v6 ? L3_IP6 : L3_IP4), ANY_PC);
    restrict_t2(f, 7u, HAS_B12);
}

static void form_rule(const struct nmb_rule *r, struct rule_form *f)
{
    uint32_t fl = r->fields;
    memset(f, 0, sizeof(*f));
    memset(f->t1_ok, 1, sizeof(f->t1_ok));
    memset(f->t2_ok, 1, sizeof(f->t2_ok));
    memset(f->t3_ok, 1, sizeof(f->t3_ok));
    if (fl & NMB_F_DST_MAC) {
        uint64_t m = ld_bytes(r->dst_mac_mask, 6);
        put(f, 0, m, ld_bytes(r->dst_mac, 6));
        put(f, 2, P_DMAC, P_DMAC);
        need(f, LV_L2);
        if (r->dst_mac_mask[0] & 1)
            restrict_t2(f, (r->dst_mac[0] & 1) ? 4u : 2u, 7u);
        else
            restrict_t2(f, 6u, 7u);
    }
    if (fl & NMB_F_SRC_MAC) {
        put(f, 1, ld_bytes(r->src_mac_mask, 6), ld_bytes(r->src_mac, 6));
        put(f, 2, P_SMAC, P_SMAC);
        need(f, LV_L2);
        restrict_t2(f, 6u, 7u);
    }
    if (fl & NMB_F_VLAN) {
        put(f, 2, P_B12 | P_TAG, r->vlan ? P_B12 | P_TAG : P_B12);
        need(f, LV_L2);
        restrict_t2(f, 7u, r->vlan ? 4u : 2u);
    }
    if (fl & NMB_F_VLAN_TPID) {
        put(f, 3, 0xffffull << 48, (uint64_t)r->vlan_tpid << 48);
        put(f, 2, P_B12, P_B12);
        need(f, LV_L2);
        restrict_t2(f, 7u, is_tpid(r->vlan_tpid) ? 4u : HAS_B12);
    }
    if (fl & NMB_F_VLAN_ID) {
        put(f, 2, 0x0fff | P_TCI0, r->vlan_id | P_TCI0);
        need(f, LV_TAGS);
        restrict_t2(f, 7u, 4u);
    }
    if (fl & NMB_F_VLAN_PCP) {
        put(f, 2, 0xe000 | P_TCI0, (uint64_t)r->vlan_pcp << 13 | P_TCI0);
        need(f, LV_TAGS);
        restrict_t2(f, 7u, 4u);
    }
    if (fl & NMB_F_INNER_VLAN_ID) {
        put(f, 2, 0x0fffull << 16 | P_TCI1, (uint64_t)r->inner_vlan_id << 16 | P_TCI1);
        need(f, LV_TAGS);
        restrict_t2(f, 7u, 4u);
    }
    if (fl & NMB_F_INNER_VLAN_PCP) {
        put(f, 2, 0xe000ull << 16 | P_TCI1, (uint64_t)r->inner_vlan_pcp << 29 | P_TCI1);
        need(f, LV_TAGS);
        restrict_t2(f, 7u, 4u);
    }
    if (fl & NMB_F_ETHERTYPE) {
        uint32_t e = r->ethertype;
        put(f, 3, 0xffffull << 32, (uint64_t)e << 32);
        put(f, 2, P_ETYPE, P_ETYPE);
        need(f, LV_TAGS);
        restrict_t2(f, 7u, HAS_B12);
        /* a frame of class IP4 has ethertype 0x0800, IP6 0x86dd; OTHER any */
        uint32_t l3 = 1u << L3_OTHER;
        if (e == ETH_IPV4)
            l3 |= 1u << L3_IP4;
        else if (e == ETH_IPV6)
            l3 |= 1u << L3_IP6;
        /* the classes are known only when the filter parses L3; otherwise t1 is not used */
        restrict_t1(f, l3, ANY_PC);
    }
    if (fl & NMB_F_SRC_IP)
        put_prefix(f, 4, r->src_ip_v6, r->src_ip, r->src_ip_mask, P_SRC4, P_SRC6);
    if (fl & NMB_F_DST_IP)
        put_prefix(f, 6, r->dst_ip_v6, r->dst_ip, r->dst_ip_mask, P_DST4, P_DST6);
    if (fl & NMB_F_IP_PROTO) {
        put(f, 2, 0xffull << 32 | P_PROTO, (uint64_t)r->ip_proto << 32 | P_PROTO);
        need(f, LV_L3);
        restrict_t1(f, IP_L3, 1u << proto_class(r->ip_proto));
        restrict_t2(f, 7u, HAS_B12);
    }
    if (fl & (NMB_F_SRC_PORT | NMB_F_DST_PORT)) {
        need(f, LV_L3);
        restrict_t1(f, IP_L3, (1u << PC_TCP) | (1u << PC_UDP) | (1u << PC_SCTP));
        restrict_t2(f, 7u, HAS_B12);
    }
    if (fl & NMB_F_SRC_PORT) {
        put(f, 2, P_SPORT, P_SPORT);
        if (r->src_port_lo == r->src_port_hi)
            put(f, 3, 0xffff, r->src_port_lo);
    }
    if (fl & NMB_F_DST_PORT) {
        put(f, 2, P_DPORT, P_DPORT);
        if (r->dst_port_lo == r->dst_port_hi)
            put(f, 3, 0xffffull << 16, (uint64_t)r->dst_port_lo << 16);
        memset(f->t3_ok, 0, sizeof(f->t3_ok));  /* row 64 (no dst_port) stays 0 */
        if (r->dst_port_hi - r->dst_port_lo >= 63) {
            memset(f->t3_ok, 1, 64);
        } else {
            for (uint32_t port = r->dst_port_lo; port <= r->dst_port_hi; port++)
                f->t3_ok[port & 63] = 1;
        }
    }
}

static size_t align16(size_t n)
{
    return (n + 15) & ~(size_t)15;
}

/* the order a rule's compares run in: the value words first (they tell rules apart), the
 * presence/tag/protocol word last (the candidate tables have mostly settled it) */
static const uint8_t WORD_ORDER[NWORDS] = {3, 6, 4, 0, 1, 7, 5, 2};

int nmb_filter_prog_finish(struct nmb_filter_prog *p)
{
    uint32_t n = p->nrules, nb = (n + 63) / 64, nchk = 0;
    struct rule_form *forms = NULL;
    if (nb == 0)
        nb = 1;
    if (n > 0) {
        forms = malloc((size_t)n * sizeof(*forms));
        if (forms == NULL)
            return -1;
    }
    for (uint32_t i = 0; i < n; i++) {
        form_rule(&p->rules[i], &forms[i]);
        uint32_t words = 0;
        for (uint32_t w = 0; w < NWORDS; w++)
            words += forms[i].mask[w] != 0;
        nchk += words > 2 ? words - 2 : 0;
    }
    size_t hot_sz = align16((size_t)n * sizeof(struct nmb_hot_rule));
    size_t chk_sz = align16((size_t)nchk * sizeof(struct nmb_chk));
    size_t tab_sz = (size_t)(NT1 + NT2 + NT3) * nb * sizeof(uint64_t);
    /* cache-line aligned: each hot rule is exactly one line */
    size_t total = (hot_sz + chk_sz + tab_sz + 63) & ~(size_t)63;
    char *mem = aligned_alloc(64, total);
    if (mem != NULL)
        memset(mem, 0, total);
    if (mem == NULL) {
        free(forms);
        return -1;
    }
    struct nmb_hot_rule *hot = (struct nmb_hot_rule *)mem;
    struct nmb_chk *chk = (struct nmb_chk *)(mem + hot_sz);
    uint64_t *t1 = (uint64_t *)(mem + hot_sz + chk_sz);
    uint64_t *t2 = t1 + (size_t)NT1 * nb;
    uint64_t *t3 = t2 + (size_t)NT2 * nb;
    uint32_t level = LV_NONE, c = 0;
    for (uint32_t i = 0; i < n; i++) {
        const struct nmb_rule *r = &p->rules[i];
        const struct rule_form *f = &forms[i];
        struct nmb_hot_rule *h = &hot[i];
        if (f->level > level)
            level = f->level;
        h->action = r->action;
        h->more_off = c;
        uint32_t m = 0;
        for (uint32_t j = 0; j < NWORDS; j++) {
            uint32_t w = WORD_ORDER[j];
            if (f->mask[w] == 0)
                continue;
            if (m < 2) {
                h->w[m] = (uint8_t)w;
                h->mask[m] = f->mask[w];
                h->val[m] = f->val[w];
            } else {
                h->widx[h->nmore++] = (uint8_t)w;
                chk[c].mask = f->mask[w];
                chk[c].val = f->val[w];
                c++;
            }
            m++;
        }
        if ((r->fields & NMB_F_SRC_PORT) && r->src_port_lo != r->src_port_hi &&
            !(r->src_port_lo == 0 && r->src_port_hi == 0xffff)) {
            h->flags |= NMB_HR_SPORT_RANGE;
            h->sport_lo = r->src_port_lo;
            h->sport_span = (uint16_t)(r->src_port_hi - r->src_port_lo);
        }
        if ((r->fields & NMB_F_DST_PORT) && r->dst_port_lo != r->dst_port_hi &&
            !(r->dst_port_lo == 0 && r->dst_port_hi == 0xffff)) {
            h->flags |= NMB_HR_DPORT_RANGE;
            h->dport_lo = r->dst_port_lo;
            h->dport_span = (uint16_t)(r->dst_port_hi - r->dst_port_lo);
        }
        if (r->fields & NMB_F_BPF) {
            h->flags |= NMB_HR_BPF;
            h->bpf_off = r->bpf_off;
        }
        uint64_t bit = 1ull << (i % 64);
        size_t b = i / 64;
        for (uint32_t row = 0; row < NT1; row++)
            if (f->t1_ok[row])
                t1[row * nb + b] |= bit;
        for (uint32_t row = 0; row < NT2; row++)
            if (f->t2_ok[row])
                t2[row * nb + b] |= bit;
        for (uint32_t row = 0; row < NT3; row++)
            if (f->t3_ok[row])
                t3[row * nb + b] |= bit;
    }
    /* a table is worth a lookup only when some row lacks some rule; t1's rows are computed
     * only at LV_L3, t3's only when ports are parsed (LV_L3) */
    uint8_t use[3] = {0, 0, 0};
    const uint64_t *tabs[3] = {t1, t2, t3};
    const uint32_t rows[3] = {NT1, NT2, NT3};
    for (uint32_t t = 0; t < 3; t++)
        for (uint32_t i = 0; i < n && !use[t]; i++)
            for (uint32_t row = 0; row < rows[t]; row++)
                if (!(tabs[t][row * nb + i / 64] >> (i % 64) & 1)) {
                    use[t] = 1;
                    break;
                }
    /* a table not used: every row holds every rule, so ANDing it changes nothing (and no
     * bit beyond the last rule is ever set) */
    const uint8_t used[3] = {level >= LV_L3 && use[0], level >= LV_L2 && use[1],
                             level >= LV_L3 && use[2]};
    for (uint32_t t = 0; t < 3; t++) {
        if (used[t])
            continue;
        uint64_t *tab = (uint64_t *)tabs[t];
        for (uint32_t row = 0; row < rows[t]; row++)
            for (uint32_t b = 0; b < nb; b++)
                tab[row * nb + b] = n - b * 64 >= 64 ? ~0ull : (1ull << (n - b * 64)) - 1;
    }
    free(forms);
    free(p->compiled);
    p->compiled = mem;
    p->level = (uint8_t)level;
    p->use_t1 = used[0];
    p->use_t2 = used[1];
    p->use_t3 = used[2];
    p->nblocks = nb;
    p->chk = chk;
    p->t1 = t1;
    p->t2 = t2;
    p->t3 = t3;
    p->hot = hot;
    uint32_t bare = 0;  /* rules that are a BPF program and nothing else */
    for (uint32_t i = 0; i < n; i++)
        bare += hot[i].flags == NMB_HR_BPF && hot[i].mask[0] == 0;
    if (n == 0)
        p->hdr.run = run_default;
    else if (bare == n)
        p->hdr.run = n == 1 ? run_bpf1 : run_bpf_only;
    else
        p->hdr.run = n <= 64 ? run_small : nmb_filter_run;
    return 0;
}

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

_Static_assert(sizeof(struct nmb_hot_rule) == 64, "a hot rule is one cache line");

struct nmb_filter_prog *nmb_filter_prog_alloc(uint32_t nrules, uint32_t nops)
{
    size_t head = align8(sizeof(struct nmb_filter_prog));
    size_t rules = align8((size_t)nrules * sizeof(struct nmb_rule));
    size_t ops = align8((size_t)nops * sizeof(struct nmb_bpf_op));
    size_t hits = ((size_t)nrules + 1) * sizeof(uint64_t);
    char *mem = calloc(1, head + rules + ops + hits);
    if (mem == NULL)
        return NULL;
    struct nmb_filter_prog *p = (struct nmb_filter_prog *)mem;
    p->hdr.run = run_unfinished;
    p->nrules = nrules;
    p->nops = nops;
    p->default_action = NMB_PASS;
    p->rules = (struct nmb_rule *)(mem + head);
    p->ops = (struct nmb_bpf_op *)(mem + head + rules);
    p->hits = (uint64_t *)(mem + head + rules + ops);
    return p;
}

void nmb_filter_prog_free(struct nmb_filter_prog *p)
{
    if (p != NULL)
        free(p->compiled);
    free(p);
}
