/*
 * nmb_filter_prog.h -- the compiled form of a filter: what filter.c evaluates per frame.
 *
 * One allocation per filter: `struct nmb_filter_prog` (whose first member is the
 * `struct nmb_filter` fastfwd calls), followed by its rules, their classic-BPF programs and
 * the hit counters.  Structured rules carry precomputed values and masks and a bit set of the
 * fields they test; a pcap rule carries a validated classic-BPF program (see bpf.c).  Rules
 * are tried in order, the first whose fields all match decides, else the default action.
 * Hit counters are written only by the thread that calls `run` (the forwarding thread).
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

/* a BPF program after validation: instructions translated to a dense internal opcode */
struct nmb_bpf_op {
    uint8_t op;  /* NMB_BPF_OP_* (bpf.c) */
    uint8_t jt;
    uint8_t jf;
    uint8_t pad;
    uint32_t k;
};

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

struct nmb_filter_prog {
    struct nmb_filter hdr;    /* first: fastfwd calls hdr.run */
    uint32_t nrules;
    uint32_t nops;
    uint8_t default_action;
    struct nmb_rule *rules;   /* nrules */
    struct nmb_bpf_op *ops;   /* nops, all BPF programs back to back */
    uint64_t *hits;           /* nrules + 1: the last counts the default action */
};

/* Allocate a program for `nrules` rules and `nops` BPF instructions in total (zeroed;
 * hdr.run set).  NULL when out of memory.  Free with nmb_filter_prog_free. */
struct nmb_filter_prog *nmb_filter_prog_alloc(uint32_t nrules, uint32_t nops);
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
uint32_t nmb_bpf_run(const struct nmb_bpf_op *ops, const uint8_t *frame, uint32_t len);

#define NMB_BPF_MAX_INSNS 65536
#define NMB_BPF_MAX_BACKJUMPS 65536

#endif /* NMB_FILTER_PROG_H */
