"""The mem: backend: rings in user memory driven by a test driver or a source/sink.

Port names: ``mem:NAME`` (frames injected by a test, collected from TX) with options after
``?``: ``rx=queue|source|none``, ``tx=collect|sink``, ``frame_len=N`` (source frames),
``strict=1`` (check every sync as the kernel would).  Example: ``mem:gen?rx=source&tx=sink``.
"""

from __future__ import annotations

import re

from nmbridge.accounting import PortAccounting
from nmbridge.backends import OpenOptions, parse_options, whole_number
from nmbridge.backends.mem import MemPort
from nmbridge.errors import PortError
from nmbridge.port import Port, Region

_NAME = re.compile(r"^[A-Za-z0-9_]{1,15}$")
_OPTIONS = {"rx": ("queue", "source", "none"), "tx": ("collect", "sink")}


def _parse(name: str) -> tuple[str, dict[str, str]]:
    base, _, query = name.partition("?")
    if not _NAME.fullmatch(base):
        raise ValueError(f"mem port name {base!r} must be 1-15 letters, digits or '_'")
    opts = parse_options("mem", query)
    for key, value in opts.items():
        if key in _OPTIONS:
            if value not in _OPTIONS[key]:
                raise ValueError(f"mem option {key}={value!r}: use one of {', '.join(_OPTIONS[key])}")
        elif key == "frame_len":
            if whole_number(value, 14, 65535) is None:
                raise ValueError(f"mem option frame_len={value!r}: a number of bytes from 14 to 65535")
        elif key == "strict":
            if value not in ("0", "1"):
                raise ValueError(f"mem option strict={value!r}: use 0 or 1")
        else:
            raise ValueError(f"unknown mem option {key!r} (known: rx, tx, frame_len, strict)")
    return base, opts


class _MemBackend:
    name = "mem"
    user_memory = True
    # the test driver loses nothing: frames in, frames out
    accounting = PortAccounting(rx_delivered="rx_frames", tx_sent="tx_frames", tx_bytes="tx_bytes")

    def unavailable(self) -> str | None:
        return None

    def check_name(self, name: str) -> None:
        try:
            _parse(name)
        except ValueError as e:
            raise ValueError(str(e)) from None

    def interface(self, name: str) -> str | None:
        return None

    def offloads_off(self, name: str) -> frozenset[str]:
        return frozenset()  # no interface

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        assert region is not None
        base, opts = _parse(name)
        try:
            return MemPort(region, base, rings=options.rings, slots=options.slots,
                           rx=opts.get("rx", "queue"), tx=opts.get("tx", "collect"),
                           frame_len=int(opts.get("frame_len", "60")), strict=opts.get("strict") == "1")
        except ValueError as e:
            raise PortError(str(e)) from None


BACKEND = _MemBackend()
