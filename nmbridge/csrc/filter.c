/*
 * filter.c -- evaluate a compiled filter (nmb_filter_prog.h) on one frame.
 *
 * The frame's headers are parsed lazily, once per frame and only as deep as the rule being
 * tested needs: MAC fields and `vlan` read the first bytes directly; the tag fields walk the
 * 802.1Q/802.1ad tag chain; IP, protocol and port fields parse L3 and L4.  Every read is
 * bounded by `len`; a field whose bytes (or the bytes needed to find it) are not all in the
 * frame does not match.  The meaning of each field is /work/shared/filter-semantics.md.
 */
#include <stdlib.h>
#include <string.h>
#include "nmb_filter_prog.h"

#define TPID_8021Q 0x8100
#define TPID_8021AD 0x88a8
#define ETH_IPV4 0x0800
#define ETH_IPV6 0x86dd

#define L2_FIELDS (NMB_F_ETHERTYPE | NMB_F_VLAN_ID | NMB_F_VLAN_PCP | NMB_F_INNER_VLAN_ID | \
                   NMB_F_INNER_VLAN_PCP)
#define L3_FIELDS (NMB_F_SRC_IP | NMB_F_DST_IP | NMB_F_IP_PROTO | NMB_F_SRC_PORT | NMB_F_DST_PORT)

/* what has been learned about one frame so far */
struct pkt {
    const uint8_t *p;
    uint32_t len;
    uint8_t l2_done, l3_done;
    /* L2: tags */
    uint8_t tci0_ok, tci1_ok;  /* outer / second tag present with its TCI inside the frame */
    uint16_t tci0, tci1;
    int32_t ethertype;         /* innermost type >= 0x0600, or -1 */
    uint32_t l3;               /* offset of L3 when ethertype >= 0 */
    /* L3 / L4 */
    uint8_t ipver;             /* 0 (no IP), 4 or 6 */
    int16_t proto;             /* ip_proto or -1 when unknown */
    uint8_t ports;             /* L4 ports exist (TCP/UDP/SCTP, first fragment) */
    uint32_t l4;
};

static inline uint32_t rd16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

static inline int is_tpid(uint32_t t)
{
    return t == TPID_8021Q || t == TPID_8021AD;
}

static void parse_l2(struct pkt *k)
{
    const uint8_t *p = k->p;
    uint32_t len = k->len, off = 12, ntags = 0;
    k->l2_done = 1;
    k->ethertype = -1;
    while (off + 2 <= len) {
        uint32_t t = rd16(p + off);
        if (!is_tpid(t)) {
            if (t >= 0x0600) {
                k->ethertype = (int32_t)t;
                k->l3 = off + 2;
            }
            return;  /* below 0x0600: an 802.3 length, no ethertype */
        }
        if (off + 4 > len)
            return;  /* a tag whose TCI is cut off */
        if (ntags == 0) {
            k->tci0_ok = 1;
            k->tci0 = (uint16_t)rd16(p + off + 2);
        } else if (ntags == 1) {
            k->tci1_ok = 1;
            k->tci1 = (uint16_t)rd16(p + off + 2);
        }
        ntags++;
        off += 4;
    }
}

static inline int is_ports_proto(uint32_t proto)
{
    return proto == 6 || proto == 17 || proto == 132;
}

static void parse_l3(struct pkt *k)
{
    const uint8_t *p = k->p;
    uint32_t len = k->len, l3;
    k->l3_done = 1;
    k->proto = -1;
    if (!k->l2_done)
        parse_l2(k);
    if (k->ethertype < 0)
        return;
    l3 = k->l3;
    if (l3 >= len)
        return;
    if (k->ethertype == ETH_IPV4) {
        uint32_t ihl = p[l3] & 0x0f;
        if ((p[l3] >> 4) != 4 || ihl < 5)
            return;
        k->ipver = 4;
        if (l3 + 10 > len)
            return;
        k->proto = p[l3 + 9];
        /* bytes 6-7 (flags, fragment offset) are inside the frame: l3 + 10 <= len */
        if (is_ports_proto(p[l3 + 9]) && (rd16(p + l3 + 6) & 0x1fff) == 0) {
            k->ports = 1;
            k->l4 = l3 + 4 * ihl;
        }
    } else if (k->ethertype == ETH_IPV6) {
        if ((p[l3] >> 4) != 6)
            return;
        k->ipver = 6;
        if (l3 + 7 > len)
            return;
        uint32_t nh = p[l3 + 6], off = l3 + 40, hl;
        for (;;) {
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
                    k->proto = p[off];  /* not the first fragment: no ports */
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
        k->proto = (int16_t)nh;
        if (is_ports_proto(nh)) {
            k->ports = 1;
            k->l4 = off;
        }
    }
}

static inline uint64_t ld48(const uint8_t *p)
{
    uint32_t hi;
    uint16_t lo;
    memcpy(&hi, p, 4);
    memcpy(&lo, p + 4, 2);
    return (uint64_t)hi | (uint64_t)lo << 32;
}

static inline int mac_match(const uint8_t *m, const uint8_t *v, const uint8_t *mask)
{
    return ((ld48(m) ^ ld48(v)) & ld48(mask)) == 0;
}

static inline uint64_t ld64(const uint8_t *p)
{
    uint64_t v;
    memcpy(&v, p, 8);
    return v;
}

static inline uint32_t ld32(const uint8_t *p)
{
    uint32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* the prefix value is stored already masked */
static inline int ip_match(const struct pkt *k, uint32_t v6, uint32_t off, const uint8_t *v,
                           const uint8_t *mask)
{
    const uint8_t *a = k->p + off;
    if (!v6)
        return k->ipver == 4 && off + 4 <= k->len && (ld32(a) & ld32(mask)) == ld32(v);
    return k->ipver == 6 && off + 16 <= k->len && (ld64(a) & ld64(mask)) == ld64(v) &&
           (ld64(a + 8) & ld64(mask + 8)) == ld64(v + 8);
}

static int rule_match(const struct nmb_filter_prog *prog, const struct nmb_rule *r, struct pkt *k)
{
    uint32_t f = r->fields;
    const uint8_t *p = k->p;
    uint32_t len = k->len;
    if (f == 0)
        return 1;
    if (f & NMB_F_DST_MAC) {
        if (len < 6 || !mac_match(p, r->dst_mac, r->dst_mac_mask))
            return 0;
    }
    if (f & NMB_F_SRC_MAC) {
        if (len < 12 || !mac_match(p + 6, r->src_mac, r->src_mac_mask))
            return 0;
    }
    if (f & (NMB_F_VLAN | NMB_F_VLAN_TPID)) {
        if (len < 14)
            return 0;
        uint32_t t = rd16(p + 12);
        if ((f & NMB_F_VLAN) && is_tpid(t) != r->vlan)
            return 0;
        if ((f & NMB_F_VLAN_TPID) && t != r->vlan_tpid)
            return 0;
    }
    if (f & L2_FIELDS) {
        if (!k->l2_done)
            parse_l2(k);
        if ((f & NMB_F_ETHERTYPE) && k->ethertype != (int32_t)r->ethertype)
            return 0;
        if ((f & NMB_F_VLAN_ID) && (!k->tci0_ok || (k->tci0 & 0x0fff) != r->vlan_id))
            return 0;
        if ((f & NMB_F_VLAN_PCP) && (!k->tci0_ok || (k->tci0 >> 13) != r->vlan_pcp))
            return 0;
        if ((f & NMB_F_INNER_VLAN_ID) && (!k->tci1_ok || (k->tci1 & 0x0fff) != r->inner_vlan_id))
            return 0;
        if ((f & NMB_F_INNER_VLAN_PCP) && (!k->tci1_ok || (k->tci1 >> 13) != r->inner_vlan_pcp))
            return 0;
    }
    if (f & L3_FIELDS) {
        if (!k->l3_done)
            parse_l3(k);
        if (k->ipver == 0)
            return 0;
        if ((f & NMB_F_SRC_IP) &&
            !ip_match(k, r->src_ip_v6, k->l3 + (k->ipver == 4 ? 12 : 8), r->src_ip, r->src_ip_mask))
            return 0;
        if ((f & NMB_F_DST_IP) &&
            !ip_match(k, r->dst_ip_v6, k->l3 + (k->ipver == 4 ? 16 : 24), r->dst_ip, r->dst_ip_mask))
            return 0;
        if ((f & NMB_F_IP_PROTO) && k->proto != (int16_t)r->ip_proto)
            return 0;
        if (f & NMB_F_SRC_PORT) {
            if (!k->ports || k->l4 + 2 > len)
                return 0;
            uint32_t port = rd16(p + k->l4);
            if (port < r->src_port_lo || port > r->src_port_hi)
                return 0;
        }
        if (f & NMB_F_DST_PORT) {
            if (!k->ports || k->l4 + 4 > len)
                return 0;
            uint32_t port = rd16(p + k->l4 + 2);
            if (port < r->dst_port_lo || port > r->dst_port_hi)
                return 0;
        }
    }
    if ((f & NMB_F_BPF) && nmb_bpf_run(prog->ops + r->bpf_off, p, len) == 0)
        return 0;
    return 1;
}

int nmb_filter_decide(const struct nmb_filter_prog *prog, const uint8_t *frame, uint32_t len,
                      int *action)
{
    struct pkt k;
    k.p = frame;
    k.len = len;
    k.l2_done = k.l3_done = 0;
    k.tci0_ok = k.tci1_ok = 0;
    k.ipver = 0;
    k.ports = 0;
    for (uint32_t i = 0; i < prog->nrules; i++) {
        const struct nmb_rule *r = &prog->rules[i];
        if (rule_match(prog, r, &k)) {
            *action = r->action;
            return (int)i;
        }
    }
    *action = prog->default_action;
    return -1;
}

int nmb_filter_run(struct nmb_filter *self, const uint8_t *frame, uint32_t len)
{
    struct nmb_filter_prog *prog = (struct nmb_filter_prog *)self;
    int action;
    int i = nmb_filter_decide(prog, frame, len, &action);
    prog->hits[i < 0 ? prog->nrules : (uint32_t)i]++;
    return action;
}

static size_t align8(size_t n)
{
    return (n + 7) & ~(size_t)7;
}

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
    p->hdr.run = nmb_filter_run;
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
    free(p);
}
