/*
 * bpf.c -- a bounded classic-BPF interpreter for the programs libpcap's pcap_compile emits.
 *
 * nmb_bpf_load checks a program once, at load time, and translates each instruction into a
 * dense internal opcode: every opcode known, every jump target inside the program, scratch
 * indices below 16, no division or modulo by a constant 0, constant shifts below 32, and a
 * return as the last instruction (so execution can never fall off the end).  A load directly
 * followed by a conditional jump on a constant (`ldh [12]; jeq #0x800`, most of what
 * pcap_compile emits) also gets one fused op doing both, so the pair costs one dispatch; the
 * jump stays in place, translated as usual, for any jump that targets it.  nmb_bpf_run then
 * needs no checks but the frame bounds (direct-threaded dispatch: GCC/Clang labels as
 * values): a load past `len` ends the program with 0 (no match), as libpcap's runner does;
 * division by X == 0 returns 0.  `ip6 protochain` uses a
 * backward unconditional jump (libpcap sign-extends its k); it is run, and the number of
 * backward jumps taken per frame is bounded, so no program can loop forever.
 */
#include <stdio.h>
#include <string.h>
#include "nmb_filter_prog.h"

/* classic BPF encoding (the public ABI of <linux/filter.h> / <pcap/bpf.h>) */
#define C_LD 0x00
#define C_LDX 0x01
#define C_ST 0x02
#define C_STX 0x03
#define C_ALU 0x04
#define C_JMP 0x05
#define C_RET 0x06
#define C_MISC 0x07
#define S_W 0x00
#define S_H 0x08
#define S_B 0x10
#define M_IMM 0x00
#define M_ABS 0x20
#define M_IND 0x40
#define M_MEM 0x60
#define M_LEN 0x80
#define M_MSH 0xa0
#define SRC_K 0x00
#define SRC_X 0x08
#define RET_A 0x10
#define MEMWORDS 16

enum {
    OP_LD_W_ABS, OP_LD_H_ABS, OP_LD_B_ABS, OP_LD_W_IND, OP_LD_H_IND, OP_LD_B_IND,
    OP_LD_IMM, OP_LD_LEN, OP_LD_MEM, OP_LDX_IMM, OP_LDX_LEN, OP_LDX_MEM, OP_LDX_MSH,
    OP_ST, OP_STX,
    OP_ADD_K, OP_SUB_K, OP_MUL_K, OP_DIV_K, OP_MOD_K, OP_AND_K, OP_OR_K, OP_XOR_K,
    OP_LSH_K, OP_RSH_K,
    OP_ADD_X, OP_SUB_X, OP_MUL_X, OP_DIV_X, OP_MOD_X, OP_AND_X, OP_OR_X, OP_XOR_X,
    OP_LSH_X, OP_RSH_X, OP_NEG,
    OP_JA, OP_JA_BACK, OP_JEQ_K, OP_JGT_K, OP_JGE_K, OP_JSET_K,
    OP_JEQ_X, OP_JGT_X, OP_JGE_X, OP_JSET_X,
    OP_RET_K, OP_RET_A, OP_TAX, OP_TXA,
    /* fused: load (W/H/B, ABS/IND) then jump on (A op k2) */
#define FUSED_OPS(L) \
    L(W_ABS, JEQ) L(W_ABS, JGT) L(W_ABS, JGE) L(W_ABS, JSET) \
    L(H_ABS, JEQ) L(H_ABS, JGT) L(H_ABS, JGE) L(H_ABS, JSET) \
    L(B_ABS, JEQ) L(B_ABS, JGT) L(B_ABS, JGE) L(B_ABS, JSET) \
    L(W_IND, JEQ) L(W_IND, JGT) L(W_IND, JGE) L(W_IND, JSET) \
    L(H_IND, JEQ) L(H_IND, JGT) L(H_IND, JGE) L(H_IND, JSET) \
    L(B_IND, JEQ) L(B_IND, JGT) L(B_IND, JGE) L(B_IND, JSET)
#define ENUM_FUSED(ld, j) OP_##ld##_##j,
    FUSED_OPS(ENUM_FUSED)
#undef ENUM_FUSED
    OP_COUNT
};

static int bad(char *err, size_t errlen, uint32_t pc, const char *what)
{
    snprintf(err, errlen, "BPF instruction %u: %s", pc, what);
    return -1;
}

static int alu_op(uint16_t code)
{
    int x = (code & SRC_X) != 0;
    switch (code & 0xf0) {
    case 0x00: return x ? OP_ADD_X : OP_ADD_K;
    case 0x10: return x ? OP_SUB_X : OP_SUB_K;
    case 0x20: return x ? OP_MUL_X : OP_MUL_K;
    case 0x30: return x ? OP_DIV_X : OP_DIV_K;
    case 0x40: return x ? OP_OR_X : OP_OR_K;
    case 0x50: return x ? OP_AND_X : OP_AND_K;
    case 0x60: return x ? OP_LSH_X : OP_LSH_K;
    case 0x70: return x ? OP_RSH_X : OP_RSH_K;
    case 0x80: return x ? -1 : OP_NEG;
    case 0x90: return x ? OP_MOD_X : OP_MOD_K;
    case 0xa0: return x ? OP_XOR_X : OP_XOR_K;
    }
    return -1;
}

/* the fused family of a load op (index in FUSED_OPS order / 4), or -1 */
static int fused_load(int op)
{
    switch (op) {
    case OP_LD_W_ABS: return 0;
    case OP_LD_H_ABS: return 1;
    case OP_LD_B_ABS: return 2;
    case OP_LD_W_IND: return 3;
    case OP_LD_H_IND: return 4;
    case OP_LD_B_IND: return 5;
    }
    return -1;
}

static int fused_jump(int op)
{
    switch (op) {
    case OP_JEQ_K: return 0;
    case OP_JGT_K: return 1;
    case OP_JGE_K: return 2;
    case OP_JSET_K: return 3;
    }
    return -1;
}

static uint32_t interp(const struct nmb_bpf_op *ops, const uint8_t *p, uint32_t len,
                       const void *const **table);

int nmb_bpf_load(const struct nmb_bpf_insn *insns, uint32_t n, struct nmb_bpf_op *out,
                 char *err, size_t errlen)
{
    if (n == 0) {
        snprintf(err, errlen, "empty BPF program");
        return -1;
    }
    if (n > NMB_BPF_MAX_INSNS) {
        snprintf(err, errlen, "BPF program of %u instructions (at most %u)", n, NMB_BPF_MAX_INSNS);
        return -1;
    }
    for (uint32_t pc = 0; pc < n; pc++) {
        const struct nmb_bpf_insn *in = &insns[pc];
        uint16_t code = in->code;
        int op = -1;
        uint32_t k = in->k;
        uint8_t jt = 0, jf = 0;
        switch (code & 0x07) {
        case C_LD:
            switch (code) {
            case C_LD | S_W | M_ABS: op = OP_LD_W_ABS; break;
            case C_LD | S_H | M_ABS: op = OP_LD_H_ABS; break;
            case C_LD | S_B | M_ABS: op = OP_LD_B_ABS; break;
            case C_LD | S_W | M_IND: op = OP_LD_W_IND; break;
            case C_LD | S_H | M_IND: op = OP_LD_H_IND; break;
            case C_LD | S_B | M_IND: op = OP_LD_B_IND; break;
            case C_LD | S_W | M_IMM: op = OP_LD_IMM; break;
            case C_LD | S_W | M_LEN: op = OP_LD_LEN; break;
            case C_LD | S_W | M_MEM: op = OP_LD_MEM; break;
            }
            break;
        case C_LDX:
            switch (code) {
            case C_LDX | S_W | M_IMM: op = OP_LDX_IMM; break;
            case C_LDX | S_W | M_LEN: op = OP_LDX_LEN; break;
            case C_LDX | S_W | M_MEM: op = OP_LDX_MEM; break;
            case C_LDX | S_B | M_MSH: op = OP_LDX_MSH; break;
            }
            break;
        case C_ST:
            if (code == C_ST)
                op = OP_ST;
            break;
        case C_STX:
            if (code == C_STX)
                op = OP_STX;
            break;
        case C_ALU:
            if ((code & ~0xf8) == C_ALU)
                op = alu_op(code);
            if ((op == OP_DIV_K || op == OP_MOD_K) && k == 0)
                return bad(err, errlen, pc, "division by the constant 0");
            if ((op == OP_LSH_K || op == OP_RSH_K) && k >= 32)
                return bad(err, errlen, pc, "shift by 32 or more");
            break;
        case C_JMP:
            if (code == (C_JMP | 0x00)) {
                /* ja: libpcap sign-extends k (its `ip6 protochain` jumps backward) */
                int64_t target = (int64_t)pc + 1 + (int32_t)k;
                if (target < 0 || target >= (int64_t)n)
                    return bad(err, errlen, pc, "jump out of the program");
                op = target <= (int64_t)pc ? OP_JA_BACK : OP_JA;
                k = (uint32_t)target;
                break;
            }
            switch (code & 0xf8) {
            case 0x10: op = OP_JEQ_K; break;
            case 0x20: op = OP_JGT_K; break;
            case 0x30: op = OP_JGE_K; break;
            case 0x40: op = OP_JSET_K; break;
            case 0x18: op = OP_JEQ_X; break;
            case 0x28: op = OP_JGT_X; break;
            case 0x38: op = OP_JGE_X; break;
            case 0x48: op = OP_JSET_X; break;
            }
            if (op >= 0 && ((uint64_t)pc + 1 + in->jt >= n || (uint64_t)pc + 1 + in->jf >= n))
                return bad(err, errlen, pc, "jump out of the program");
            jt = in->jt;
            jf = in->jf;
            break;
        case C_RET:
            if (code == (C_RET | SRC_K))
                op = OP_RET_K;
            else if (code == (C_RET | RET_A))
                op = OP_RET_A;
            break;
        case C_MISC:
            if (code == (C_MISC | 0x00))
                op = OP_TAX;
            else if (code == (C_MISC | 0x80))
                op = OP_TXA;
            break;
        }
        if (op < 0) {
            char what[48];
            snprintf(what, sizeof(what), "unknown opcode 0x%04x", code);
            return bad(err, errlen, pc, what);
        }
        if ((op == OP_LD_MEM || op == OP_LDX_MEM || op == OP_ST || op == OP_STX) && k >= MEMWORDS)
            return bad(err, errlen, pc, "scratch memory index out of range (0..15)");
        out[pc].h = NULL;
        out[pc].op = (uint8_t)op;
        out[pc].flags = 0;
        out[pc].jt = (uint16_t)(jt + 1);  /* in ops from this op, until the end */
        out[pc].jf = (uint16_t)(jf + 1);
        out[pc].pad = 0;
        out[pc].k = k;
        out[pc].k2 = 0;
    }
    if (out[n - 1].op != OP_RET_K && out[n - 1].op != OP_RET_A)
        return bad(err, errlen, n - 1, "the program does not end with a return");
    /* fuse each load with a conditional jump on a constant right after it (the jump's op
     * stays as it is, for jumps that land on it) */
    for (uint32_t pc = 0; pc + 1 < n; pc++) {
        int ld = fused_load(out[pc].op), j = fused_jump(out[pc + 1].op);
        if (ld < 0 || j < 0)
            continue;
        out[pc].op = (uint8_t)(OP_W_ABS_JEQ + ld * 4 + j);
        out[pc].k2 = out[pc + 1].k;
        out[pc].jt = (uint16_t)(out[pc + 1].jt + 1);
        out[pc].jf = (uint16_t)(out[pc + 1].jf + 1);
    }
    /* ops[0].flags bit 0: the program reads scratch memory (nmb_bpf_run zeroes it first) */
    for (uint32_t pc = 0; pc < n; pc++)
        if (out[pc].op == OP_LD_MEM || out[pc].op == OP_LDX_MEM)
            out[0].flags = 1;
    /* thread: each op's code address; jumps as byte offsets (at most 257 ops away) */
    const void *const *labels = NULL;
    interp(NULL, NULL, 0, &labels);
    for (uint32_t pc = 0; pc < n; pc++) {
        out[pc].h = labels[out[pc].op];
        out[pc].jt = (uint16_t)(out[pc].jt * sizeof(struct nmb_bpf_op));
        out[pc].jf = (uint16_t)(out[pc].jf * sizeof(struct nmb_bpf_op));
    }
    return 0;
}

static inline uint32_t be32(const uint8_t *p)
{
    return (uint32_t)p[0] << 24 | (uint32_t)p[1] << 16 | (uint32_t)p[2] << 8 | p[3];
}

static inline uint32_t be16(const uint8_t *p)
{
    return (uint32_t)p[0] << 8 | p[1];
}

__thread int nmb_bpf_bounded;

uint32_t nmb_bpf_run(const struct nmb_bpf_op *ops, const uint8_t *p, uint32_t len)
{
    return interp(ops, p, len, NULL);
}

/* Run `ops`; or, when `table` is not NULL, only store the label table there (the loader
 * threads the ops with it).  Labels are values only inside this function. */
static __attribute__((noinline)) uint32_t interp(const struct nmb_bpf_op *ops, const uint8_t *p,
                                                 uint32_t len, const void *const **table)
{
    uint32_t A = 0, X = 0, mem[MEMWORDS];
    uint32_t back = 0;
    uint64_t off;
    const uint64_t n = len;  /* the bound every load is checked against */
    const struct nmb_bpf_op *pc = ops, *in;
    uint32_t k;
    if (table != NULL)
        goto give_table;
    if (ops[0].flags & 1)
        memset(mem, 0, sizeof(mem));  /* libpcap leaves it undefined; make runs reproducible */
    /* direct-threaded dispatch: one indirect jump per op, no range check (the loader admits
     * only known ops) */
#define LBL(ld, j) [OP_##ld##_##j] = &&L_##ld##_##j,
    static const void *const labels[OP_COUNT] = {
        [OP_LD_W_ABS] = &&L_OP_LD_W_ABS,
        [OP_LD_H_ABS] = &&L_OP_LD_H_ABS,
        [OP_LD_B_ABS] = &&L_OP_LD_B_ABS,
        [OP_LD_W_IND] = &&L_OP_LD_W_IND,
        [OP_LD_H_IND] = &&L_OP_LD_H_IND,
        [OP_LD_B_IND] = &&L_OP_LD_B_IND,
        [OP_LD_IMM] = &&L_OP_LD_IMM,
        [OP_LD_LEN] = &&L_OP_LD_LEN,
        [OP_LD_MEM] = &&L_OP_LD_MEM,
        [OP_LDX_IMM] = &&L_OP_LDX_IMM,
        [OP_LDX_LEN] = &&L_OP_LDX_LEN,
        [OP_LDX_MEM] = &&L_OP_LDX_MEM,
        [OP_LDX_MSH] = &&L_OP_LDX_MSH,
        [OP_ST] = &&L_OP_ST,
        [OP_STX] = &&L_OP_STX,
        [OP_ADD_K] = &&L_OP_ADD_K,
        [OP_SUB_K] = &&L_OP_SUB_K,
        [OP_MUL_K] = &&L_OP_MUL_K,
        [OP_DIV_K] = &&L_OP_DIV_K,
        [OP_MOD_K] = &&L_OP_MOD_K,
        [OP_AND_K] = &&L_OP_AND_K,
        [OP_OR_K] = &&L_OP_OR_K,
        [OP_XOR_K] = &&L_OP_XOR_K,
        [OP_LSH_K] = &&L_OP_LSH_K,
        [OP_RSH_K] = &&L_OP_RSH_K,
        [OP_ADD_X] = &&L_OP_ADD_X,
        [OP_SUB_X] = &&L_OP_SUB_X,
        [OP_MUL_X] = &&L_OP_MUL_X,
        [OP_DIV_X] = &&L_OP_DIV_X,
        [OP_MOD_X] = &&L_OP_MOD_X,
        [OP_AND_X] = &&L_OP_AND_X,
        [OP_OR_X] = &&L_OP_OR_X,
        [OP_XOR_X] = &&L_OP_XOR_X,
        [OP_LSH_X] = &&L_OP_LSH_X,
        [OP_RSH_X] = &&L_OP_RSH_X,
        [OP_NEG] = &&L_OP_NEG,
        [OP_JA] = &&L_OP_JA,
        [OP_JA_BACK] = &&L_OP_JA_BACK,
        [OP_JEQ_K] = &&L_OP_JEQ_K,
        [OP_JGT_K] = &&L_OP_JGT_K,
        [OP_JGE_K] = &&L_OP_JGE_K,
        [OP_JSET_K] = &&L_OP_JSET_K,
        [OP_JEQ_X] = &&L_OP_JEQ_X,
        [OP_JGT_X] = &&L_OP_JGT_X,
        [OP_JGE_X] = &&L_OP_JGE_X,
        [OP_JSET_X] = &&L_OP_JSET_X,
        [OP_RET_K] = &&L_OP_RET_K,
        [OP_RET_A] = &&L_OP_RET_A,
        [OP_TAX] = &&L_OP_TAX,
        [OP_TXA] = &&L_OP_TXA,
        FUSED_OPS(LBL)
    };
#undef LBL
#define NEXT do { in = pc; k = in->k; goto *in->h; } while (0)
#define STEP do { pc = in + 1; NEXT; } while (0)
#define BRANCH(cond) \
    do { \
        pc = (const struct nmb_bpf_op *)((const char *)in + ((cond) ? in->jt : in->jf)); \
        NEXT; \
    } while (0)
    /* the loads: A from the frame, or the program ends with 0 */
#define LOAD_W_ABS() do { if ((uint64_t)k + 4 > n) return 0; A = be32(p + k); } while (0)
#define LOAD_H_ABS() do { if ((uint64_t)k + 2 > n) return 0; A = be16(p + k); } while (0)
#define LOAD_B_ABS() do { if (k >= n) return 0; A = p[k]; } while (0)
#define LOAD_W_IND() \
    do { off = (uint64_t)X + k; if (off + 4 > n) return 0; A = be32(p + off); } while (0)
#define LOAD_H_IND() \
    do { off = (uint64_t)X + k; if (off + 2 > n) return 0; A = be16(p + off); } while (0)
#define LOAD_B_IND() \
    do { off = (uint64_t)X + k; if (off >= n) return 0; A = p[off]; } while (0)
#define COND_JEQ(v) (A == (v))
#define COND_JGT(v) (A > (v))
#define COND_JGE(v) (A >= (v))
#define COND_JSET(v) ((A & (v)) != 0)
#define FUSED_BODY(ld, j) \
    L_##ld##_##j: LOAD_##ld(); BRANCH(COND_##j(in->k2));
    NEXT;
    L_OP_LD_W_ABS: LOAD_W_ABS(); STEP;
    L_OP_LD_H_ABS: LOAD_H_ABS(); STEP;
    L_OP_LD_B_ABS: LOAD_B_ABS(); STEP;
    L_OP_LD_W_IND: LOAD_W_IND(); STEP;
    L_OP_LD_H_IND: LOAD_H_IND(); STEP;
    L_OP_LD_B_IND: LOAD_B_IND(); STEP;
    FUSED_OPS(FUSED_BODY)
    L_OP_LD_IMM: A = k; STEP;
    L_OP_LD_LEN: A = len; STEP;
    L_OP_LD_MEM: A = mem[k]; STEP;
    L_OP_LDX_IMM: X = k; STEP;
    L_OP_LDX_LEN: X = len; STEP;
    L_OP_LDX_MEM: X = mem[k]; STEP;
    L_OP_LDX_MSH:
        if (k >= n)
            return 0;
        X = (uint32_t)(p[k] & 0xf) << 2;
        STEP;
    L_OP_ST: mem[k] = A; STEP;
    L_OP_STX: mem[k] = X; STEP;
    L_OP_ADD_K: A += k; STEP;
    L_OP_SUB_K: A -= k; STEP;
    L_OP_MUL_K: A *= k; STEP;
    L_OP_DIV_K: A /= k; STEP;
    L_OP_MOD_K: A %= k; STEP;
    L_OP_AND_K: A &= k; STEP;
    L_OP_OR_K: A |= k; STEP;
    L_OP_XOR_K: A ^= k; STEP;
    L_OP_LSH_K: A <<= k; STEP;
    L_OP_RSH_K: A >>= k; STEP;
    L_OP_ADD_X: A += X; STEP;
    L_OP_SUB_X: A -= X; STEP;
    L_OP_MUL_X: A *= X; STEP;
    L_OP_DIV_X:
        if (X == 0)
            return 0;
        A /= X;
        STEP;
    L_OP_MOD_X:
        if (X == 0)
            return 0;
        A %= X;
        STEP;
    L_OP_AND_X: A &= X; STEP;
    L_OP_OR_X: A |= X; STEP;
    L_OP_XOR_X: A ^= X; STEP;
    L_OP_LSH_X: A = X < 32 ? A << X : 0; STEP;
    L_OP_RSH_X: A = X < 32 ? A >> X : 0; STEP;
    L_OP_NEG: A = (uint32_t)0 - A; STEP;
    L_OP_JA: pc = ops + k; NEXT;
    L_OP_JA_BACK:
        if (++back > NMB_BPF_MAX_BACKJUMPS) {
            nmb_bpf_bounded = 1; /* cold: only a program that would loop gets here */
            return 0;
        }
        pc = ops + k;
        NEXT;
    L_OP_JEQ_K: BRANCH(A == k);
    L_OP_JGT_K: BRANCH(A > k);
    L_OP_JGE_K: BRANCH(A >= k);
    L_OP_JSET_K: BRANCH((A & k) != 0);
    L_OP_JEQ_X: BRANCH(A == X);
    L_OP_JGT_X: BRANCH(A > X);
    L_OP_JGE_X: BRANCH(A >= X);
    L_OP_JSET_X: BRANCH((A & X) != 0);
    L_OP_RET_K: return k;
    L_OP_RET_A: return A;
    L_OP_TAX: X = A; STEP;
    L_OP_TXA: A = X; STEP;
give_table:
    *table = labels;
    return 0;
#undef NEXT
#undef STEP
#undef BRANCH
#undef FUSED_BODY
}
