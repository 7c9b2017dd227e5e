/*
 * nmb_filter_prog.h -- the compiled form of a filter: what filter.c evaluates per frame.
 *
 * One allocation per filter: `struct nmb_filter_prog` (whose first member is the
 * `struct nmb_filter` fastfwd calls), followed by its rules, their classic-BPF programs and
 * the hit counters.  The compiler fills `struct nmb_rule` (values, masks, the fields tested;
 * a pcap rule's validated classic-BPF program, see bpf.c); nmb_filter_prog_finish then builds
 * the hot form filter.c runs (a second allocation: per-rule masked key compares, candidate
 * tables) and picks the run function that fits (no rules; pcap rules only; up to 64 rules;
 * more).  Rules are tried in order, the first whose fields all match decides, else the
 * default action.  Hit counters are written only by the thread that calls `run` (the
 * forwarding thread).
 */
#ifndef NMB_FILTER_PROG_H
#define NMB_FILTER_PROG_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_filter.h"

/* which fields a rule tests (bits of nmb_rule.fields) */
enum {
    NMB_F_ETHERTYPE = 1u << 0,
    NMB_F_VLAN = 1u << 1,
    NMB_F_VLAN_ID = 1u << 2,
    NMB_F_VLAN_PCP = 1u << 3,
    NMB_F_VLAN_TPID = 1u << 4,
    NMB_F_INNER_VLAN_ID = 1u << 5,
    NMB_F_INNER_VLAN_PCP = 1u << 6,
    NMB_F_DST_MAC = 1u << 7,
    NMB_F_SRC_MAC = 1u << 8,
    NMB_F_SRC_IP = 1u << 9,
    NMB_F_DST_IP = 1u << 10,
    NMB_F_IP_PROTO = 1u << 11,
    NMB_F_SRC_PORT = 1u << 12,
    NMB_F_DST_PORT = 1u << 13,
    NMB_F_BPF = 1u << 14,
};

/* one classic-BPF instruction, the layout of libpcap's struct bpf_insn */
struct nmb_bpf_insn {
    uint16_t code;
    uint8_t jt;
    uint8_t jf;
    uint32_t k;
};

/* a BPF program after validation and translation (bpf.c), threaded: each op holds the address
 * of the interpreter code that runs it.  A load directly followed by a conditional jump on a
 * constant also gets a fused op doing both (the jump stays in place for anything that jumps
 * to it).  jt/jf are byte offsets from this op; k2 is a fused jump's constant. */
struct nmb_bpf_op {
    const void *h;  /* the interpreter's label for `op` */
    uint32_t k;
    uint32_t k2;
    uint16_t jt;
    uint16_t jf;
    uint8_t op;     /* internal opcode (bpf.c) */
    uint8_t flags;  /* ops[0] only: bit 0 = the program reads scratch memory */
    uint16_t pad;
};

/* One rule as the compiler describes it (cold: read only by nmb_filter_prog_finish). */
struct nmb_rule {
    uint32_t fields;          /* NMB_F_* bits */
    uint8_t action;           /* NMB_PASS or NMB_DROP */
    uint8_t vlan;             /* vlan = true (1) / false (0) */
    uint8_t vlan_pcp, inner_vlan_pcp;
    uint16_t ethertype, vlan_id, vlan_tpid, inner_vlan_id;
    uint8_t ip_proto;
    uint8_t src_ip_v6, dst_ip_v6;   /* family of the prefix: 0 = IPv4, 1 = IPv6 */
    uint8_t pad0;
    uint8_t dst_mac[6], dst_mac_mask[6];
    uint8_t src_mac[6], src_mac_mask[6];
    uint8_t src_ip[16], src_ip_mask[16];   /* value already masked */
    uint8_t dst_ip[16], dst_ip_mask[16];
    uint16_t src_port_lo, src_port_hi, dst_port_lo, dst_port_hi;
    uint32_t bpf_off, bpf_len;  /* NMB_F_BPF: ops[bpf_off .. bpf_off + bpf_len) */
};

/*
 * The hot form nmb_filter_prog_finish builds from the rules (filter.c).  Per frame, the
 * fields the filter needs are extracted once into a key of 8 64-bit words (MACs, tags,
 * ethertype, protocol, ports, addresses and a presence bit per field); a rule is then a few
 * masked word compares (`(key[w] ^ val) & mask == 0`, presence bits included, so a field
 * the frame lacks never matches), port ranges as one unsigned compare each, and its BPF
 * program.  Before any rule is looked at, three small tables indexed by frame facts (L3 and
 * protocol class; destination group bit and tag at bytes 12-13; destination-port bucket)
 * give the bit set of the rules that can possibly match; only those are checked, in order.
 */
struct nmb_chk {
    uint64_t mask, val;       /* val already masked */
};

struct nmb_hot_rule {         /* 64 bytes: one cache line */
    uint64_t mask[2], val[2]; /* the first two compares (mask 0: none) */
    uint8_t w[2];             /* their key words */
    uint8_t nmore;            /* further compares: chk[more_off ..] */
    uint8_t action;
    uint8_t flags;            /* NMB_HR_* */
    uint8_t pad[3];
    uint8_t widx[8];          /* key word of each further compare */
    uint16_t sport_lo, sport_span, dport_lo, dport_span;  /* ranges: p - lo <= span */
    uint32_t more_off;
    uint32_t bpf_off;
};

#define NMB_HR_SPORT_RANGE 1u
#define NMB_HR_DPORT_RANGE 2u
#define NMB_HR_BPF 4u

struct nmb_filter_prog {
    struct nmb_filter hdr;    /* first: fastfwd calls hdr.run */
    uint32_t nrules;
    uint32_t nops;
    uint8_t default_action;
    /* set by nmb_filter_prog_finish */
    uint8_t level;            /* key extraction: 0 none, 1 bytes 0-13, 2 + tags, 3 + L3/L4 */
    uint8_t use_t1, use_t2, use_t3;  /* which candidate tables tell anything */
    uint32_t nblocks;         /* 64-rule blocks */
    struct nmb_hot_rule *hot; /* nrules */
    struct nmb_chk *chk;
    uint64_t *t1;             /* [20][nblocks]: L3 class * 5 + protocol class */
    uint64_t *t2;             /* [9][nblocks]: dst group bit (0 short, 1 clear, 2 set) * 3
                                 + bytes 12-13 a tag (0 short, 1 no, 2 yes) */
    uint64_t *t3;             /* [65][nblocks]: dst_port & 63, or 64 without dst_port */
    void *compiled;           /* the allocation behind hot, chk, t1..t3 */
    /* filled by the compiler */
    struct nmb_rule *rules;   /* nrules */
    struct nmb_bpf_op *ops;   /* nops, all BPF programs back to back */
    uint64_t *hits;           /* nrules + 1: the last counts the default action */
};

/* Allocate a program for `nrules` rules and `nops` BPF instructions in total (zeroed).
 * NULL when out of memory.  Fill rules, ops and default_action, then call
 * nmb_filter_prog_finish; until then run/decide give the default action and count nothing.
 * Free with nmb_filter_prog_free. */
struct nmb_filter_prog *nmb_filter_prog_alloc(uint32_t nrules, uint32_t nops);
/* Build the hot form from the rules and install the run function: 0, or -1 when out of
 * memory (the program then keeps giving the default action). */
int nmb_filter_prog_finish(struct nmb_filter_prog *p);
void nmb_filter_prog_free(struct nmb_filter_prog *p);

/* The index of the rule that decides `frame` (first match), or -1 for the default; the
 * verdict in *action.  Counts nothing (safe to call from another thread). */
int nmb_filter_decide(const struct nmb_filter_prog *p, const uint8_t *frame, uint32_t len,
                      int *action);

/* fastfwd's entry point: decide, count the hit, return NMB_PASS or NMB_DROP. */
int nmb_filter_run(struct nmb_filter *self, const uint8_t *frame, uint32_t len);

/* Check a classic-BPF program and translate it into `out` (n entries).  Returns 0, or -1
 * with a one-line reason in err.  Runs nothing: every check happens here, at load time. */
int nmb_bpf_load(const struct nmb_bpf_insn *insns, uint32_t n, struct nmb_bpf_op *out,
                 char *err, size_t errlen);

/* Run a loaded program on a frame: its return value (0 = no match).  Never reads past len;
 * backward jumps (libpcap's `ip6 protochain`) are bounded by NMB_BPF_MAX_BACKJUMPS. */
__attribute__((visibility("hidden")))  /* called directly, not through the PLT */
uint32_t nmb_bpf_run(const struct nmb_bpf_op *ops, const uint8_t *frame, uint32_t len);

#define NMB_BPF_MAX_INSNS 65536
#define NMB_BPF_MAX_BACKJUMPS 65536
/* set (never cleared) by nmb_bpf_run in this thread when a program hit that bound: for tests,
 * which must not hand such a frame to libpcap's own runner (it has no bound and never returns) */
extern __thread int nmb_bpf_bounded;

#endif /* NMB_FILTER_PROG_H */
