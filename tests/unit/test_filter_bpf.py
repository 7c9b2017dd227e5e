"""The classic-BPF interpreter: invalid programs are refused at load time; edge cases at run time."""

from __future__ import annotations

import struct

import pytest
from scapy.layers.inet import IP, TCP
from scapy.layers.inet6 import IPv6, IPv6ExtHdrDestOpt, IPv6ExtHdrHopByHop
from scapy.layers.l2 import Ether

from nmbridge.filters.engine import BPFError, Program, check_bpf, run_bpf
from nmbridge.filters.pcap import compile_expr, offline_filter


def prog(*insns: tuple[int, int, int, int]) -> bytes:
    return b"".join(struct.pack("=HBBI", *i) for i in insns)


RET_K = 0x06
RET_A = 0x16
LD_H_ABS = 0x28
LD_B_ABS = 0x30
LD_IMM = 0x00
LDX_IMM = 0x01
LD_MEM = 0x60
ST = 0x02
STX = 0x03
JA = 0x05
JEQ_K = 0x15
DIV_K = 0x34
DIV_X = 0x3C
MOD_X = 0x9C
LSH_K = 0x64
TAX = 0x07

INVALID = {
    "empty": (b"", "empty"),
    "no return at the end": (prog((LD_IMM, 0, 0, 1)), "does not end with a return"),
    "conditional jump past the end": (prog((JEQ_K, 1, 0, 5), (RET_K, 0, 0, 1)), "jump out"),
    "false branch past the end": (prog((JEQ_K, 0, 3, 5), (RET_K, 0, 0, 1)), "jump out"),
    "ja past the end": (prog((JA, 0, 0, 1), (RET_K, 0, 0, 1)), "jump out"),
    "ja before the start": (prog((RET_K, 0, 0, 0), (JA, 0, 0, 0xFFFFFFFD), (RET_K, 0, 0, 1)),
                            "jump out"),
    "unknown opcode": (prog((0xFF, 0, 0, 0), (RET_K, 0, 0, 1)), "unknown opcode 0x00ff"),
    "ldx halfword abs": (prog((0x29, 0, 0, 0), (RET_K, 0, 0, 1)), "unknown opcode"),
    "ret x": (prog((0x0E, 0, 0, 0),), "unknown opcode"),
    "scratch load 16": (prog((LD_MEM, 0, 0, 16), (RET_K, 0, 0, 1)), "scratch"),
    "scratch store 99": (prog((ST, 0, 0, 99), (RET_K, 0, 0, 1)), "scratch"),
    "stx 16": (prog((STX, 0, 0, 16), (RET_K, 0, 0, 1)), "scratch"),
    "divide by constant 0": (prog((DIV_K, 0, 0, 0), (RET_K, 0, 0, 1)), "division"),
    "shift by 32": (prog((LSH_K, 0, 0, 32), (RET_K, 0, 0, 1)), "shift"),
    "odd size": (b"\x06\x00\x00", "multiple of 8"),
}


@pytest.mark.parametrize("name", list(INVALID))
def test_invalid_program_refused_at_load(name: str) -> None:
    insns, reason = INVALID[name]
    with pytest.raises(BPFError, match=reason):
        check_bpf(insns)
    with pytest.raises(BPFError, match=reason):
        Program([{"action": "drop", "bpf": insns}])


def test_refusal_names_the_rule() -> None:
    good = prog((RET_K, 0, 0, 1))
    with pytest.raises(BPFError, match=r"rule 1: BPF instruction 0"):
        Program([{"action": "drop", "bpf": good}, {"action": "drop", "bpf": prog((0xFF, 0, 0, 0))}])


def test_loads_past_len_return_zero() -> None:
    p = prog((LD_H_ABS, 0, 0, 12), (JEQ_K, 0, 1, 0x0800), (RET_K, 0, 0, 0), (RET_K, 0, 0, 7))
    assert run_bpf(p, bytes(14)) == 7  # not 0x0800 -> 7 ...
    assert run_bpf(p, bytes(13)) == 0  # ... but a load past the end ends with 0
    assert run_bpf(p, b"") == 0


def test_division_by_x_zero_returns_zero() -> None:
    p = prog((LDX_IMM, 0, 0, 0), (LD_IMM, 0, 0, 10), (DIV_X, 0, 0, 0), (RET_K, 0, 0, 1))
    assert run_bpf(p, b"x") == 0
    p = prog((LDX_IMM, 0, 0, 0), (LD_IMM, 0, 0, 10), (MOD_X, 0, 0, 0), (RET_K, 0, 0, 1))
    assert run_bpf(p, b"x") == 0
    p = prog((LDX_IMM, 0, 0, 3), (LD_IMM, 0, 0, 10), (DIV_X, 0, 0, 0), (RET_A, 0, 0, 0))
    assert run_bpf(p, b"x") == 3


def test_scratch_memory() -> None:
    p = prog((LD_B_ABS, 0, 0, 0), (ST, 0, 0, 15), (LD_IMM, 0, 0, 0), (LD_MEM, 0, 0, 15), (RET_A, 0, 0, 0))
    assert run_bpf(p, b"\x2a") == 42


def test_backward_jump_loop_is_bounded() -> None:
    # ja -1: an endless loop in a naive runner; here the bound ends it with "no match"
    p = prog((TAX, 0, 0, 0), (JA, 0, 0, 0xFFFFFFFF), (RET_K, 0, 0, 1))
    assert run_bpf(p, b"abc") == 0


PROTOCHAIN = [
    Ether() / IPv6() / TCP(),
    Ether() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt() / TCP(),
    Ether() / IPv6() / IPv6ExtHdrHopByHop() / IPv6ExtHdrDestOpt(),
    Ether() / IP() / TCP(),
]


def test_protochain_backward_jump_runs_like_libpcap() -> None:
    insns = compile_expr("ip6 protochain 6")
    ops = struct.iter_unpack("=HBBI", insns)
    assert any(code == JA and k >= 0x80000000 for code, _, _, k in ops)  # really backward
    for p in PROTOCHAIN:
        raw = bytes(p)
        for cut in (len(raw), len(raw) - 10, 60, 55):
            assert run_bpf(insns, raw[:cut]) == offline_filter(insns, raw[:cut])
    assert [run_bpf(insns, bytes(p)) != 0 for p in PROTOCHAIN] == [True, True, False, False]
