"""``nmbridge filter test``: run a capture file through the configured filters, offline.

Each frame of a pcap file (Ethernet link type) goes through the filter of each selected
(pair, direction) by the same C code as the fast path; the output is each frame's verdict and
the rule that decided it, then per-rule totals.  Frames are judged on their captured bytes
(a capture cut by a snap length is judged on what was captured).
"""

from __future__ import annotations

import json
import struct
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from nmbridge.filters.compiler import CompiledFilter
from nmbridge.filters.model import FilterError

if TYPE_CHECKING:
    from nmbridge.config import Config

LINKTYPE_ETHERNET = 1
DIRECTIONS = ("a_to_b", "b_to_a")


class CaptureError(Exception):
    """The capture file cannot be read (one line: file and reason)."""


def read_pcap(path: str | Path) -> Iterator[bytes]:
    """The frames of a classic pcap file (either byte order, micro- or nanosecond)."""
    try:
        f = open(path, "rb")
    except OSError as e:
        raise CaptureError(f"{path}: {e.strerror or e}") from None
    try:
        head = f.read(24)
        if len(head) < 24:
            raise CaptureError(f"{path}: too short for a pcap file header")
        magic = head[:4]
        if magic in (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1"):
            order = "<"
        elif magic in (b"\xa1\xb2\xc3\xd4", b"\xa1\xb2\x3c\x4d"):
            order = ">"
        elif magic == b"\x0a\x0d\x0d\x0a":
            raise CaptureError(f"{path}: a pcapng file; convert it first: "
                               f"tcpdump -r {path} -w capture.pcap")
        else:
            raise CaptureError(f"{path}: not a pcap file (magic {magic.hex()})")
        linktype = struct.unpack(order + "I", head[20:24])[0] & 0x0FFFFFFF
        if linktype != LINKTYPE_ETHERNET:
            raise CaptureError(f"{path}: link type {linktype}, not Ethernet (1)")
        n = 0
        while True:
            rec = f.read(16)
            if not rec:
                return
            n += 1
            if len(rec) < 16:
                raise CaptureError(f"{path}: frame {n}: truncated record header")
            _, _, incl, _ = struct.unpack(order + "IIII", rec)
            if incl > 0x40000:
                raise CaptureError(f"{path}: frame {n}: implausible length {incl}")
            data = f.read(incl)
            if len(data) < incl:
                raise CaptureError(f"{path}: frame {n}: truncated ({len(data)} of {incl} bytes)")
            yield data
    finally:
        f.close()


@dataclass
class _Target:
    pair: str
    direction: str
    flt: CompiledFilter
    totals: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=lambda: {"pass": 0, "drop": 0})
    frames: list[dict[str, object]] = field(default_factory=list)


def _targets(cfg: Config, pair: str | None, direction: str | None) -> list[_Target]:
    if direction is not None:
        direction = direction.replace("-", "_")
        if direction not in DIRECTIONS:
            raise ValueError(f"--direction must be a-to-b or b-to-a, not {direction!r}")
    pairs = [p for p in cfg.pairs if pair is None or p.name == pair]
    if pair is not None and not pairs:
        known = ", ".join(p.name for p in cfg.pairs) or "none"
        raise ValueError(f"no pair named {pair!r} in {cfg.path} (pairs: {known})")
    compiled: dict[str, CompiledFilter] = {}
    out = []
    for p in pairs:
        for d, name in p.filters.items():
            if direction is not None and d != direction:
                continue
            if name not in compiled:
                compiled[name] = CompiledFilter(cfg.filters[name])
            flt = compiled[name]
            out.append(_Target(p.name, d, flt, {r.name: 0 for r in flt.config.rules} | {"default": 0}))
    if not out:
        where = f"pair {pair!r}" if pair else "any pair"
        raise ValueError(f"{where} has no filter{' for ' + direction if direction else ''} "
                         f"in {cfg.path}")
    return out


def filter_test(cfg: Config, pcap_path: str | Path, pair: str | None, direction: str | None,
                as_json: bool, out: TextIO) -> int:
    """Run the capture through the filters; print verdicts and totals on `out`. Returns 0, or
    1 for a bad capture, pair or direction: one line on stderr (with `as_json`, an
    ``{"error": ...}`` object on `out`)."""
    try:
        targets = _targets(cfg, pair, direction)
        frames = list(read_pcap(pcap_path))
    except (ValueError, CaptureError, FilterError) as e:
        if as_json:
            out.write(json.dumps({"error": str(e)}) + "\n")
        else:
            print(f"nmbridge filter test: {e}", file=sys.stderr)
        return 1
    for t in targets:
        names = [r.name for r in t.flt.config.rules]
        for n, frame in enumerate(frames, 1):
            verdict, index = t.flt.evaluate(frame)
            rule = "default" if index is None else names[index]
            t.totals[rule] += 1
            t.verdicts[verdict] += 1
            t.frames.append({"frame": n, "len": len(frame), "verdict": verdict, "rule": rule,
                             "index": index})
    if as_json:
        doc = {"capture": str(pcap_path), "frames": len(frames), "results": [
            {"pair": t.pair, "direction": t.direction, "filter": t.flt.config.name,
             "default": t.flt.config.default, "frames": t.frames, "totals": t.totals,
             "passed": t.verdicts["pass"], "dropped": t.verdicts["drop"]} for t in targets]}
        out.write(json.dumps(doc, indent=2) + "\n")
        return 0
    for t in targets:
        out.write(f"pair {t.pair} {t.direction.replace('_', '-')}: filter {t.flt.config.name} "
                  f"(default {t.flt.config.default}), {len(frames)} frames from {pcap_path}\n")
        for fr in t.frames:
            out.write(f"  {fr['frame']:6d} {fr['len']:5d} B  {fr['verdict']:4s}  {fr['rule']}\n")
        out.write("  totals:\n")
        for rule, count in t.totals.items():
            out.write(f"    {rule:30s} {count}\n")
        out.write(f"    {'(passed / dropped)':30s} {t.verdicts['pass']} / {t.verdicts['drop']}\n")
    return 0
