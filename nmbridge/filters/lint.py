"""Rules that compile but cannot do what they say: warnings, never errors.

Two kinds of finding, each proved from the definitions in the filter semantics (nothing here
guesses from traffic):

* ``never_matches``: no frame can ever match the rule.  Structured rules: ``ethertype`` is
  the innermost type, so 0x8100/0x88a8 never match; fields that need different ethertypes,
  IP families or protocols (``ethertype = "arp"`` with ``dst_ip``, an IPv4 with an IPv6 prefix,
  ports with ``ip_proto = "icmp"``, ``vlan = false`` with a ``vlan_*`` field).  pcap rules:
  libpcap's program has no way to a match (a load of kernel metadata — ``inbound``,
  ``outbound``, ``ifindex`` — ends the program with no match on a bridge, as a load past the
  frame does).
* ``shadowed``: an earlier rule matches every frame this one matches, so this one never
  decides.  Proved for: an earlier rule that matches every frame (no fields, or a pcap
  program that returns a match without looking at the frame), an earlier pcap rule with the
  same program, and an earlier structured rule each of whose fields is implied by this rule's
  fields (same field with an equal or looser value: a shorter prefix or mask, a wider port
  range; ``ethertype``/``vlan`` also implied by the fields that need them).  Anything else is
  not claimed: no warning is not a proof that a rule can decide.

Also ``partial``: the rule can match, but part of it cannot (kernel metadata inside a larger
pcap expression; an ``ip_proto`` that is an IPv6 extension header matches IPv6 frames only
when the walk stops at a non-first fragment whose next header it is).
"""

from __future__ import annotations

import json
import struct
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from nmbridge.filters.model import FilterConfig, RuleConfig

Kind = Literal["never_matches", "shadowed", "partial"]

IPV4, IPV6, TAG_TYPES = 0x0800, 0x86DD, (0x8100, 0x88A8)
PORT_PROTOS = frozenset((6, 17, 132))
IPV6_EXT = {0: "hop-by-hop options", 43: "routing", 44: "fragment", 51: "AH", 60: "destination options"}
_TAG_FIELDS = ("vlan_id", "vlan_pcp", "vlan_tpid", "inner_vlan_id", "inner_vlan_pcp")  # need a tag

# Linux's ancillary loads (SKF_AD_OFF + n): kernel metadata, never in a bridge's frames
SKF_AD_OFF = 0xFFFFF000
SKF_AD = {0: "protocol", 4: "inbound/outbound", 8: "ifindex", 20: "mark",
          24: "queue", 28: "hatype", 32: "rxhash", 36: "cpu", 44: "vlan tag",
          48: "vlan tag present", 56: "random", 60: "vlan tpid"}


@dataclass(frozen=True)
class FilterWarning:
    """One finding about rule `number` (counted from 1) of filter `filter`."""

    kind: Kind
    filter: str
    number: int
    rule: str
    keypath: str
    message: str
    other_number: int | None = None  # the earlier rule that shadows this one
    other_rule: str | None = None
    other_keypath: str | None = None
    where: str = ""  # "FILE:LINE" when the rule came from a file

    def __str__(self) -> str:
        prefix = f"{self.where}: " if self.where else ""
        return f"{prefix}warning: {rule_label(self.keypath, self.number, self.rule)}: {self.message}"

    def as_dict(self) -> dict[str, object]:
        d = {"kind": self.kind, "filter": self.filter, "rule_number": self.number, "rule": self.rule,
             "keypath": self.keypath, "message": self.message}
        if self.other_number is not None:
            d |= {"shadowed_by_number": self.other_number, "shadowed_by": self.other_rule,
                  "shadowed_by_keypath": self.other_keypath}
        if self.where:
            d["where"] = self.where
        return d


def rule_label(keypath: str, number: int, name: str) -> str:
    """``filter.f.rule[3]``, plus the rule's name when it has one of its own."""
    return keypath if name == f"rule {number}" else f"{keypath} {json.dumps(name)}"


# --- structured rules -----------------------------------------------------------------


@dataclass
class _Shape:
    """What a structured rule requires of a frame, explicit fields and their consequences."""

    spec: Mapping[str, Any]
    eth: frozenset[int] | None = None  # the innermost ethertype is one of these (None: any)
    eth_why: list[str] = field(default_factory=list)
    proto: frozenset[int] | None = None
    proto_why: list[str] = field(default_factory=list)
    tagged: bool | None = None  # vlan = true/false, or implied by a tag field
    never: list[str] = field(default_factory=list)
    partial: list[str] = field(default_factory=list)

    def need_eth(self, types: Sequence[int], why: str) -> None:
        self.eth = frozenset(types) if self.eth is None else self.eth & frozenset(types)
        self.eth_why.append(why)

    def need_proto(self, protos: Sequence[int], why: str) -> None:
        self.proto = frozenset(protos) if self.proto is None else self.proto & frozenset(protos)
        self.proto_why.append(why)


def _show(raw: Mapping[str, object], key: str) -> str:
    value = raw[key]
    text = json.dumps(value) if isinstance(value, str) else (
        "[" + ", ".join(map(str, value)) + "]" if isinstance(value, list) else str(value).lower()
        if isinstance(value, bool) else str(value))
    return f"{key} = {text}"


def _shape(rule: RuleConfig, spec: Mapping[str, Any]) -> _Shape:
    raw = rule.fields
    s = _Shape(spec)
    if "ethertype" in spec:
        et = spec["ethertype"]
        if et in TAG_TYPES:
            s.never.append(f"{_show(raw, 'ethertype')} is a VLAN tag type, and ethertype is the type "
                           "after all tags (a tag type never is): to match tagged frames write vlan = "
                           f"true or vlan_tpid = {et:#06x}")
        s.need_eth([et], f"{_show(raw, 'ethertype')} ({et:#06x})")
    for key in ("src_ip", "dst_ip"):
        if key in spec:
            v6 = spec[key][0]
            s.need_eth([IPV6 if v6 else IPV4], f"{_show(raw, key)} is {'IPv6' if v6 else 'IPv4'}")
    if "ip_proto" in spec:
        s.need_eth([IPV4, IPV6], f"{_show(raw, 'ip_proto')} needs IPv4 or IPv6")
        s.need_proto([spec["ip_proto"]], _show(raw, "ip_proto"))
    for key in ("src_port", "dst_port"):
        if key in spec:
            s.need_eth([IPV4, IPV6], f"{key} needs IPv4 or IPv6")
            s.need_proto(sorted(PORT_PROTOS), f"{_show(raw, key)} exists only for TCP, UDP and SCTP")
    tag_fields = [k for k in _TAG_FIELDS if k in spec]
    if "vlan" in spec:
        s.tagged = bool(spec["vlan"])
        if not s.tagged and tag_fields:
            s.never.append(f"vlan = false, and {_show(raw, tag_fields[0])} needs a tag")
    elif tag_fields:
        s.tagged = True
    if s.eth is not None and not s.eth and not s.never:
        s.never.append("its fields need different ethertypes: " + "; ".join(s.eth_why))
    if s.proto is not None and not s.proto and not s.never:
        s.never.append("its fields need different IP protocols: " + "; ".join(s.proto_why))
    proto = spec.get("ip_proto")
    if proto in IPV6_EXT and not s.never and s.eth is not None and IPV6 in s.eth:
        # The walk goes past this header; it stops early only at a Fragment header with a
        # non-zero offset, whose next-header (possibly this value) is then the protocol.
        s.partial.append(f"on IPv6 it matches non-first fragments only: elsewhere ip_proto is the "
                         f"protocol after the extension headers, never {proto} ({IPV6_EXT[proto]} "
                         "is walked past)" + ("; IPv4 frames match as usual" if IPV4 in s.eth else ""))
    return s


def _implies(j: _Shape, i: _Shape) -> bool:
    """Every frame that matches j (structured) matches i (structured): field by field."""
    for key, want in i.spec.items():
        if key == "action":
            continue
        have = j.spec.get(key)
        if key == "ethertype":
            if j.eth is None or not j.eth <= {want}:
                return False
        elif key == "vlan":
            if j.tagged is None or j.tagged != want:
                return False
        elif key == "ip_proto":
            if j.proto is None or not j.proto <= {want} or key not in j.spec:
                return False
        elif have is None:
            return False
        elif key in _TAG_FIELDS:
            if have != want:
                return False
        elif key in ("src_mac", "dst_mac"):
            (jv, jm), (iv, im) = have, want
            if any(a & b != b for a, b in zip(jm, im, strict=True)) or \
                    any(a & b != c for a, b, c in zip(jv, im, iv, strict=True)):
                return False
        elif key in ("src_ip", "dst_ip"):
            (j6, jv, jm), (i6, iv, im) = have, want
            if j6 != i6 or any(a & b != b for a, b in zip(jm, im, strict=True)) or \
                    any(a & b != c for a, b, c in zip(jv, im, iv, strict=True)):
                return False
        elif key in ("src_port", "dst_port"):
            if not (want[0] <= have[0] and have[1] <= want[1]):
                return False
        else:  # a field this module does not know: claim nothing
            return False
    return True


# --- pcap rules: what libpcap's program can do ------------------------------------------


@dataclass(frozen=True)
class _Program:
    can_match: bool  # some way from the start to a match
    matches_all: bool  # every frame matches (it never looks at the frame)
    metadata: tuple[str, ...]  # kernel metadata it loads (on a reachable instruction)


def analyse_bpf(insns: bytes) -> _Program:
    """Follow every way through a classic-BPF program (jumps on constants folded).  A load of
    kernel metadata (Linux's SKF_AD_OFF + n) ends it with no match, as a load past the end of
    the frame does; loads of frame bytes may fail (no match) or not."""
    prog = [struct.unpack_from("=HBBI", insns, o) for o in range(0, len(insns), 8)]
    seen: set[int] = set()
    todo = [0]
    can_match = False
    all_match = True
    metadata: list[str] = []
    while todo:
        pc = todo.pop()
        if pc in seen or pc >= len(prog):
            continue
        seen.add(pc)
        code, jt, jf, k = prog[pc]
        cls, mode = code & 0x07, code & 0xE0
        if cls in (0, 1) and mode in (0x20, 0x40) and k >= SKF_AD_OFF:  # ld [k] / [x+k] metadata
            what = SKF_AD.get(k - SKF_AD_OFF, f"SKF_AD_OFF+{k - SKF_AD_OFF}")
            if what not in metadata:
                metadata.append(what)
            all_match = False
            continue
        if cls in (0, 1) and mode in (0x20, 0x40, 0xA0):  # a frame byte: the load can fail
            all_match = False
        if cls == 0x04 and code & 0x08 and code & 0xF0 in (0x30, 0x90):  # div/mod by x: may be 0
            all_match = False
        if cls == 0x06:  # ret
            rval = code & 0x18
            if rval == 0x10 or k != 0:  # ret a: unknown; ret #k: k
                can_match = True
            if rval == 0x10 or k == 0:
                all_match = False
            continue
        if cls == 0x05:  # jumps
            op, src = code & 0xF0, code & 0x08
            if op == 0x00:  # ja
                todo.append((pc + 1 + k) & 0xFFFFFFFF)  # a backward jump is a wrap-around
                continue
            always: bool | None = None
            if src == 0 and op == 0x30 and k == 0:  # jge #0
                always = True
            elif src == 0 and op == 0x20 and k == 0xFFFFFFFF:  # jgt #0xffffffff
                always = False
            elif src == 0 and op == 0x40 and k == 0:  # jset #0
                always = False
            if always is not False:
                todo.append(pc + 1 + jt)
            if always is not True:
                todo.append(pc + 1 + jf)
            continue
        todo.append(pc + 1)
    return _Program(can_match, all_match and can_match, tuple(metadata))


# --- the filter -----------------------------------------------------------------------


def _matches_all(spec: Mapping[str, Any], prog: _Program | None) -> str | None:
    """Why the rule matches every frame, or None."""
    if prog is not None:
        return "its program does not look at the frame" if prog.matches_all else None
    return "it has no fields" if len(spec) == 1 else None


def lint(f: FilterConfig, specs: Sequence[Mapping[str, Any]]) -> list[FilterWarning]:
    """The warnings about filter `f`, whose engine specs (``rule_specs(f)``) are `specs`."""
    out: list[FilterWarning] = []
    shapes: list[_Shape | None] = []
    progs: list[_Program | None] = []
    never: list[bool] = []

    def warn(kind: Kind, n: int, message: str, other: int | None = None) -> None:
        r = f.rules[n]
        o = f.rules[other] if other is not None else None
        out.append(FilterWarning(kind, f.name, n + 1, r.name, _keypath(f, n), message,
                                 None if other is None else other + 1, o.name if o else None,
                                 None if other is None else _keypath(f, other)))

    for n, (rule, spec) in enumerate(zip(f.rules, specs, strict=True)):
        if "bpf" in spec:
            prog = analyse_bpf(spec["bpf"])
            shapes.append(None)
            progs.append(prog)
            meta = ", ".join(prog.metadata)
            if not prog.can_match:
                why = (f"it reads kernel metadata ({meta}) that frames on a bridge do not have: "
                       "that test always ends the program with no match" if meta else
                       "libpcap's program for it never returns a match")
                warn("never_matches", n, f"can never match: {why}")
            elif meta:
                warn("partial", n, f"part of it can never be true: it reads kernel metadata ({meta}) "
                     "that frames on a bridge do not have; a frame whose test reaches it does not match")
            never.append(not prog.can_match)
        else:
            shape = _shape(rule, spec)
            shapes.append(shape)
            progs.append(None)
            for why in shape.never[:1]:
                warn("never_matches", n, f"can never match: {why}")
            for why in shape.partial:
                warn("partial", n, why)
            never.append(bool(shape.never))
    for n in range(len(f.rules)):
        if never[n]:
            continue
        for m in range(n):
            if never[m]:
                continue
            all_why = _matches_all(specs[m], progs[m])
            if all_why is not None:
                label = rule_label(_keypath(f, m), m + 1, f.rules[m].name)
                warn("shadowed", n, f"never decides: {label} before it matches every frame ({all_why})", m)
                break
            sm, sn = shapes[m], shapes[n]
            same_prog = progs[m] is not None and specs[m].get("bpf") == specs[n].get("bpf")
            if same_prog or (sm is not None and sn is not None and _implies(sn, sm)):
                label = rule_label(_keypath(f, m), m + 1, f.rules[m].name)
                warn("shadowed", n, f"never decides: {label} before it matches every frame it matches", m)
                break
    out.sort(key=lambda w: w.number)
    return out


def _keypath(f: FilterConfig, n: int) -> str:
    r = f.rules[n]
    if r.keypath:
        return r.keypath
    return f"{f.keypath or 'filter.' + f.name}.rule[{n + 1}]"
