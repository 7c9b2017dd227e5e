"""FilterConfig -> a C program fastfwd runs (nmbridge/include/nmb_filter_prog.h).

Structured fields are parsed into precomputed values and masks; a pcap rule's expression is
compiled by libpcap to classic BPF and checked by the interpreter's loader, so every error is
found here, at load time, as a FilterError naming the filter, the rule and the field.
"""

from __future__ import annotations

import difflib
from typing import Any

from nmbridge.filters.fields import FIELDS, PARSERS
from nmbridge.filters.model import ACTIONS, FilterConfig, FilterError, RuleConfig, action_hint

# keys people write for a field (from tcpdump, nftables, other firewalls) -> what to write
FIELD_HINTS: dict[str, str] = {
    "port": "the fields of a rule all match, so either port is two rules: one with src_port, "
            "one with dst_port (or pcap = \"port N\")",
    "dport": "dst_port", "sport": "src_port", "proto": "ip_proto", "protocol": "ip_proto",
    "ip_protocol": "ip_proto", "l4_proto": "ip_proto", "src_addr": "src_ip", "dst_addr": "dst_ip",
    "saddr": "src_ip", "daddr": "dst_ip", "src": "write src_ip or src_mac", "dst": "write dst_ip or dst_mac",
    "host": "write src_ip or dst_ip (a rule for each, or pcap = \"host A\")",
    "net": "write src_ip or dst_ip (a rule for each, or pcap = \"net N\")",
    "ip": "write src_ip, dst_ip or ethertype = \"ipv4\"", "mac": "write src_mac or dst_mac",
    "vid": "vlan_id", "vlan_tag": "vlan_id", "pcp": "vlan_pcp", "tpid": "vlan_tpid",
    "ether_type": "ethertype", "eth_type": "ethertype", "ethtype": "ethertype",
    "expr": "pcap", "expression": "pcap", "bpf": "pcap", "tcpdump": "pcap", "filter": "pcap",
}


def _filter_keypath(f: FilterConfig) -> str:
    return f.keypath or f"filter.{f.name}"


def _rule_keypath(f: FilterConfig, i: int, r: RuleConfig) -> str:
    return r.keypath or f"{_filter_keypath(f)}.rule[{i + 1}]"


def _label(i: int, r: RuleConfig) -> str:
    """The rule's name in messages when the file gave it one."""
    return "" if r.name == f"rule {i + 1}" or not r.name else f"rule {r.name!r}: "


def _rule_spec(f: FilterConfig, i: int, r: RuleConfig) -> dict[str, Any]:
    """The engine's dict for rule `i` of `f`; raises FilterError."""
    path = _rule_keypath(f, i, r)
    if r.action not in ACTIONS:
        raise FilterError(f"{path}.action", r.action,
                          f"{_label(i, r)}the action must be pass or drop{action_hint(r.action)}")
    spec: dict[str, Any] = {"action": r.action}
    for key, raw in r.fields.items():
        parse = PARSERS.get(key)
        if parse is None:
            raise FilterError(f"{path}.{key}", raw, f"{_label(i, r)}unknown field; {_field_hint(key)}")
        try:
            spec[key] = parse(raw)
        except ValueError as e:
            raise FilterError(f"{path}.{key}", raw, f"{_label(i, r)}{e}") from None
    if r.pcap is not None:
        spec["bpf"] = _compile_pcap(path, i, r)
    return spec


def _field_hint(key: str) -> str:
    """What to write instead of the unknown field `key`."""
    hint = FIELD_HINTS.get(key.strip().lower())
    if hint is not None:
        return hint if " " in hint else f'write "{hint}"'
    close = difflib.get_close_matches(key, [*FIELDS, "pcap", "name", "action"], n=1)
    return f'did you mean "{close[0]}"?' if close else f"known: {', '.join(FIELDS)}, pcap"


def _compile_pcap(path: str, i: int, r: RuleConfig) -> bytes:
    from nmbridge.filters.engine import BPFError, check_bpf  # the C extension
    from nmbridge.filters.pcap import PcapError, compile_expr

    expr = r.pcap
    if not isinstance(expr, str):
        raise FilterError(f"{path}.pcap", expr, f"{_label(i, r)}a pcap rule is a string")
    try:
        insns = compile_expr(expr)
    except PcapError as e:
        raise FilterError(f"{path}.pcap", expr, f"{_label(i, r)}libpcap: {e}") from None
    try:
        check_bpf(insns)
    except BPFError as e:
        raise FilterError(f"{path}.pcap", expr,
                          f"{_label(i, r)}nmbridge's BPF interpreter refuses libpcap's program: {e}"
                          ) from None
    return insns


def rule_specs(f: FilterConfig) -> list[dict[str, Any]]:
    """Validate `f` and return the engine's rule dicts; raises FilterError."""
    fpath = _filter_keypath(f)
    if f.default not in ACTIONS:
        raise FilterError(f"{fpath}.default", f.default,
                          f"the default action must be pass or drop{action_hint(f.default)}")
    seen: dict[str, int] = {}
    specs = []
    for i, r in enumerate(f.rules):
        if r.name in seen or r.name == "default":
            why = ("the name 'default' is reserved for the default action's counter"
                   if r.name == "default" else f"this name is already used by rule[{seen[r.name] + 1}]")
            raise FilterError(f"{_rule_keypath(f, i, r)}.name", r.name, why)
        seen[r.name] = i
        specs.append(_rule_spec(f, i, r))
    return specs


class CompiledFilter:
    """A filter compiled for fastfwd. ``address`` is its ``struct nmb_filter *``; the C memory
    lives as long as this object (fastfwd keeps a reference while it is installed)."""

    def __init__(self, config: FilterConfig) -> None:
        from nmbridge.filters.engine import BPFError, Program

        self.config = config
        specs = rule_specs(config)
        try:
            self.program = Program(specs, config.default)
        except BPFError as e:  # check_bpf passed already: should not happen
            raise FilterError(_filter_keypath(config), config.name, str(e)) from None
        self._names = [r.name for r in config.rules]

    @property
    def address(self) -> int:
        return self.program.address

    @property
    def name(self) -> str:
        return self.config.name

    def hits(self) -> dict[str, int]:
        """Frames decided in the fast path, per rule name, plus "default"."""
        counts = self.program.hits()
        out = dict(zip(self._names, counts, strict=False))
        out["default"] = counts[-1]
        return out

    def evaluate(self, frame: bytes) -> tuple[str, int | None]:
        """(verdict "pass"/"drop", index of the deciding rule or None for the default), by
        the fast path's C code; counts nothing."""
        verdict, index = self.program.evaluate(frame)
        return verdict, (None if index < 0 else index)

    def __repr__(self) -> str:
        return f"<CompiledFilter {self.config.name!r}: {len(self._names)} rules>"
