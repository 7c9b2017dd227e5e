/*
 * bpf.c -- a bounded classic-BPF interpreter for the programs libpcap's pcap_compile emits.
 *
 * nmb_bpf_load checks a program once, at load time, and translates each instruction into a
 * dense internal opcode: every opcode known, every jump target inside the program, scratch
 * indices below 16, no division or modulo by a constant 0, constant shifts below 32, and a
 * return as the last instruction (so execution can never fall off the end).  nmb_bpf_run then
 * needs no checks but the frame bounds (its dispatch is direct-threaded: GCC/Clang labels): a load past `len` ends the program with 0 (no
 * match), as libpcap's runner does; division by X == 0 returns 0.  `ip6 protochain` uses a
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
        out[pc].op = (uint8_t)op;
        out[pc].jt = jt;
        out[pc].jf = jf;
        out[pc].pad = 0;
        out[pc].k = k;
    }
    if (out[n - 1].op != OP_RET_K && out[n - 1].op != OP_RET_A)
        return bad(err, errlen, n - 1, "the program does not end with a return");
    /* ops[0].pad: the program uses scratch memory (then nmb_bpf_run zeroes it first) */
    for (uint32_t pc = 0; pc < n; pc++)
        if (out[pc].op == OP_LD_MEM || out[pc].op == OP_LDX_MEM)
            out[0].pad = 1;
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

uint32_t nmb_bpf_run(const struct nmb_bpf_op *ops, const uint8_t *p, uint32_t len)
{
    uint32_t A = 0, X = 0, mem[MEMWORDS];
    uint32_t back = 0;
    uint64_t off;
    const struct nmb_bpf_op *pc = ops;
    if (ops[0].pad)
        memset(mem, 0, sizeof(mem));  /* libpcap leaves it undefined; make runs reproducible */
    /* direct-threaded dispatch: one indirect jump per instruction, no range check (the
     * loader admits only known ops) */
    static const void *const labels[] = {
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
    };
    const struct nmb_bpf_op *in;
    uint32_t k;
#define NEXT do { in = pc++; k = in->k; goto *labels[in->op]; } while (0)
    NEXT;
    L_OP_LD_W_ABS:
        if (k > len || len - k < 4)
            return 0;
        A = be32(p + k);
        NEXT;
    L_OP_LD_H_ABS:
        if (k > len || len - k < 2)
            return 0;
        A = be16(p + k);
        NEXT;
    L_OP_LD_B_ABS:
        if (k >= len)
            return 0;
        A = p[k];
        NEXT;
    L_OP_LD_W_IND:
        off = (uint64_t)X + k;
        if (off + 4 > len)
            return 0;
        A = be32(p + off);
        NEXT;
    L_OP_LD_H_IND:
        off = (uint64_t)X + k;
        if (off + 2 > len)
            return 0;
        A = be16(p + off);
        NEXT;
    L_OP_LD_B_IND:
        off = (uint64_t)X + k;
        if (off >= len)
            return 0;
        A = p[off];
        NEXT;
    L_OP_LD_IMM: A = k; NEXT;
    L_OP_LD_LEN: A = len; NEXT;
    L_OP_LD_MEM: A = mem[k]; NEXT;
    L_OP_LDX_IMM: X = k; NEXT;
    L_OP_LDX_LEN: X = len; NEXT;
    L_OP_LDX_MEM: X = mem[k]; NEXT;
    L_OP_LDX_MSH:
        if (k >= len)
            return 0;
        X = (uint32_t)(p[k] & 0xf) << 2;
        NEXT;
    L_OP_ST: mem[k] = A; NEXT;
    L_OP_STX: mem[k] = X; NEXT;
    L_OP_ADD_K: A += k; NEXT;
    L_OP_SUB_K: A -= k; NEXT;
    L_OP_MUL_K: A *= k; NEXT;
    L_OP_DIV_K: A /= k; NEXT;
    L_OP_MOD_K: A %= k; NEXT;
    L_OP_AND_K: A &= k; NEXT;
    L_OP_OR_K: A |= k; NEXT;
    L_OP_XOR_K: A ^= k; NEXT;
    L_OP_LSH_K: A <<= k; NEXT;
    L_OP_RSH_K: A >>= k; NEXT;
    L_OP_ADD_X: A += X; NEXT;
    L_OP_SUB_X: A -= X; NEXT;
    L_OP_MUL_X: A *= X; NEXT;
    L_OP_DIV_X:
        if (X == 0)
            return 0;
        A /= X;
        NEXT;
    L_OP_MOD_X:
        if (X == 0)
            return 0;
        A %= X;
        NEXT;
    L_OP_AND_X: A &= X; NEXT;
    L_OP_OR_X: A |= X; NEXT;
    L_OP_XOR_X: A ^= X; NEXT;
    L_OP_LSH_X: A = X < 32 ? A << X : 0; NEXT;
    L_OP_RSH_X: A = X < 32 ? A >> X : 0; NEXT;
    L_OP_NEG: A = (uint32_t)0 - A; NEXT;
    L_OP_JA: pc = ops + k; NEXT;
    L_OP_JA_BACK:
        if (++back > NMB_BPF_MAX_BACKJUMPS)
            return 0;
        pc = ops + k;
        NEXT;
    L_OP_JEQ_K: pc += A == k ? in->jt : in->jf; NEXT;
    L_OP_JGT_K: pc += A > k ? in->jt : in->jf; NEXT;
    L_OP_JGE_K: pc += A >= k ? in->jt : in->jf; NEXT;
    L_OP_JSET_K: pc += (A & k) ? in->jt : in->jf; NEXT;
    L_OP_JEQ_X: pc += A == X ? in->jt : in->jf; NEXT;
    L_OP_JGT_X: pc += A > X ? in->jt : in->jf; NEXT;
    L_OP_JGE_X: pc += A >= X ? in->jt : in->jf; NEXT;
    L_OP_JSET_X: pc += (A & X) ? in->jt : in->jf; NEXT;
    L_OP_RET_K: return k;
    L_OP_RET_A: return A;
    L_OP_TAX: X = A; NEXT;
    L_OP_TXA: A = X; NEXT;
}
#undef NEXT
