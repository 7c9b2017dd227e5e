"""``nmbridge filter test``: run a capture file through filters, offline.

The filters come from a config (one by name, a pair's, or all of them), from a rule file (the
body of a ``[filter.NAME]`` table alone in a file) or from tcpdump expressions on the command
line.  Each frame of a pcap file (Ethernet link type) goes through each filter by the same C
code as the fast path; the output is each frame's verdict and the rule that decided it, then
per-rule totals.  Frames, rules and pairs are numbered from 1 (frame 1 is the capture's first,
as Wireshark numbers it; rule 1 is ``rule[1]`` in key paths).  Frames are judged on their
captured bytes (a capture cut by a snap length is judged on what was captured).
"""

from __future__ import annotations

import json
import os
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, BinaryIO, TextIO

from nmbridge.errors import NmbridgeError
from nmbridge.filters.compiler import CompiledFilter
from nmbridge.filters.lint import FilterWarning
from nmbridge.filters.model import FilterConfig, RuleConfig

if TYPE_CHECKING:
    from nmbridge.config import Config

LINKTYPE_ETHERNET = 1


def parse_direction(text: str) -> str | None:
    from nmbridge.config import parse_direction as parse  # config imports the filters package

    return parse(text)


class FilterTestError(NmbridgeError):
    """What `filter test` was asked for is not there (a pair, a filter, a readable capture):
    one line; exit status 1."""


class CaptureError(Exception):
    """The capture file cannot be read (one line: file and reason)."""


def open_capture(path: str | Path) -> BinaryIO:
    """The capture file at `path` opened for reading, or standard input for ``-`` (``tcpdump
    -w - | nmbridge filter test --pcap - ...``).  Never blocks: anything but a regular file (a
    FIFO, whose open() waits for a writer; a device) is refused before it is opened, and
    opened non-blocking in case it became one."""
    from nmbridge.config import _not_regular  # config imports the filters package

    name = str(path)
    try:
        if name == "-":
            if os.isatty(0):
                raise CaptureError("-: standard input is a terminal: pipe a capture in "
                                   "(tcpdump -w - ... | nmbridge filter test --pcap - ...)")
            return os.fdopen(os.dup(0), "rb")
        kind = _not_regular(os.stat(path).st_mode)
        fd = -1
        if not kind:
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
            kind = _not_regular(os.fstat(fd).st_mode)  # replaced between stat() and open()
        if kind:
            if fd >= 0:
                os.close(fd)
            raise CaptureError(f"{name}: is {kind}, not a capture file: give a pcap file, or pipe "
                               "the capture in with --pcap -")
        os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except OSError as e:
        raise CaptureError(f"{name}: {e.strerror or e}") from None


def read_pcap(path: str | Path) -> Iterator[bytes]:
    """The frames of a classic pcap file (either byte order, micro- or nanosecond); `path`
    ``-`` reads standard input."""
    f = open_capture(path)
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
class Target:
    """One filter to run the capture through, and where it came from."""

    flt: CompiledFilter
    pair: str | None = None  # the pair and direction it filters, when it came from one
    direction: str | None = None
    source: str = ""  # "rules FILE", "-e", or "" for a config's filter
    used: bool = True  # a config's filter that some pair uses
    totals: dict[str, int] = field(default_factory=dict)
    verdicts: dict[str, int] = field(default_factory=lambda: {"pass": 0, "drop": 0})
    frames: list[dict[str, object]] = field(default_factory=list)

    @property
    def title(self) -> str:
        f = self.flt.config
        what = (f"pair {self.pair} {self.direction}: filter {f.name}" if self.pair is not None else
                self.source or f"filter {f.name}{'' if self.used else ' (used by no pair)'}")
        n = len(f.rules)
        return f"{what} ({n} rule{'s' if n != 1 else ''}, default {f.default})"


def rule_title(number: int, name: str) -> str:
    """``rule 3``, or ``rule 3 "ssh"`` when the rule has a name of its own."""
    return f"rule {number}" if name == f"rule {number}" else f"rule {number} {json.dumps(name)}"


def config_targets(cfg: Config, pair: str | None = None, direction: str | None = None,
                   filter_name: str | None = None) -> list[Target]:
    """What `filter test -c` runs: the filter named `filter_name`; else the filters of `pair`
    (in `direction`); else every pair's filters and then every filter no pair uses.  Raises
    FilterTestError when the selection names nothing."""
    compiled: dict[str, CompiledFilter] = {}

    def get(name: str) -> CompiledFilter:
        if name not in compiled:
            compiled[name] = CompiledFilter(cfg.filters[name])
        return compiled[name]

    if filter_name is not None:
        if filter_name not in cfg.filters:
            known = ", ".join(cfg.filters) or "none"
            raise FilterTestError(f"no filter named {filter_name!r} in {cfg.path} (filters: {known})")
        in_use = any(filter_name in p.filters.values() for p in cfg.pairs)
        return [Target(get(filter_name), used=in_use)]
    if direction is not None:
        d = parse_direction(direction)
        if d is None or d == "both":
            raise FilterTestError(f"--direction is a_to_b or b_to_a (a-to-b, b-to-a also read), "
                                  f"not {direction!r}")
        direction = d
    pairs = [p for p in cfg.pairs if pair is None or p.name == pair]
    if pair is not None and not pairs:
        known = ", ".join(p.name for p in cfg.pairs) or "none"
        raise FilterTestError(f"no pair named {pair!r} in {cfg.path} (pairs: {known})")
    out = [Target(get(name), p.name, d) for p in pairs for d, name in p.filters.items()
           if direction is None or d == direction]
    if pair is None and direction is None:
        used = {name for p in cfg.pairs for name in p.filters.values()}
        out += [Target(get(name), used=False) for name in cfg.filters if name not in used]
    if not out:
        way = f" for {direction}" if direction else ""
        if pair is not None:
            why = f"pair {pair!r} has no filter{way} in {cfg.path}: it forwards every frame"
        elif direction is not None:
            why = f"no pair of {cfg.path} has a filter{way}"
        else:
            why = f"{cfg.path} defines no filter ([filter.NAME])"
        hint = f"; try a filter by name: --filter {next(iter(cfg.filters))}" if cfg.filters else ""
        raise FilterTestError(why + hint)
    return out


def expression_filter(exprs: list[str]) -> FilterConfig:
    """``-e EXPR`` (one or more): one pcap rule each, named by its expression, action pass;
    the default drop: a frame passes when an expression matches it, as tcpdump would print it."""
    names: set[str] = set()
    rules = []
    for n, expr in enumerate(exprs, 1):
        name = expr if expr.strip() and expr not in names and expr != "default" else f"rule {n}"
        names.add(name)
        rules.append(RuleConfig(name=name, action="pass", pcap=expr, keypath=f"-e[{n}]"))
    return FilterConfig(name="-e", default="drop", rules=tuple(rules), keypath="-e")


def run_capture(targets: list[Target], pcap_path: str | Path) -> int:
    """Judge every frame of the capture by every target (the fast path's C code); returns
    the number of frames.  Raises FilterTestError for a capture that cannot be read."""
    try:
        frames = list(read_pcap(pcap_path))
    except CaptureError as e:
        raise FilterTestError(str(e)) from None
    for t in targets:
        names = [r.name for r in t.flt.config.rules]
        t.totals = {name: 0 for name in names} | {"default": 0}
        for n, frame in enumerate(frames, 1):
            verdict, index = t.flt.evaluate(frame)
            rule = "default" if index is None else names[index]
            t.totals[rule] += 1
            t.verdicts[verdict] += 1
            t.frames.append({"frame": n, "len": len(frame), "verdict": verdict, "rule": rule,
                             "rule_number": None if index is None else index + 1})
    return len(frames)


def report(targets: list[Target], pcap_path: str | Path, nframes: int,
           warnings: list[FilterWarning], as_json: bool, out: TextIO, per_frame: bool = True) -> None:
    """Print the verdicts and totals (text, or one JSON document) on `out`."""
    if as_json:
        doc = {"capture": str(pcap_path), "frames": nframes, "results": [
            {"pair": t.pair, "direction": t.direction, "filter": t.flt.config.name,
             "source": t.source or "config", "default": t.flt.config.default,
             "rules": [{"rule_number": n, "rule": r.name, "action": r.action, "frames": t.totals[r.name]}
                       for n, r in enumerate(t.flt.config.rules, 1)],
             **({"frames": t.frames} if per_frame else {}),
             "totals": t.totals, "passed": t.verdicts["pass"], "dropped": t.verdicts["drop"]}
            for t in targets], "warnings": [w.as_dict() for w in warnings]}
        out.write(json.dumps(doc, indent=2) + "\n")
        return
    for t in targets:
        f = t.flt.config
        titles = [rule_title(n, r.name) for n, r in enumerate(f.rules, 1)]
        out.write(f"{t.title}: {nframes} frame{'s' if nframes != 1 else ''} from {pcap_path}\n")
        if per_frame and t.frames:
            out.write(f"  {'frame':>6}  {'bytes':>5}  verdict  rule\n")
            for fr in t.frames:
                number = fr["rule_number"]
                rule = "default" if not isinstance(number, int) else titles[number - 1]
                out.write(f"  {fr['frame']:6d}  {fr['len']:5d}  {fr['verdict']:7s}  {rule}\n")
        rows = [(title, t.totals[r.name]) for title, r in zip(titles, f.rules, strict=True)]
        rows.append((f"default ({f.default})", t.totals["default"]))
        width = max(len(title) for title, _ in rows)
        out.write("  totals:\n")
        for title, count in rows:
            out.write(f"    {title:{width}s}  {count}\n")
        out.write(f"    passed {t.verdicts['pass']}, dropped {t.verdicts['drop']}\n")
