"""The mem: backend: rings in user memory driven by a test driver or a source/sink.

Port names: ``mem:NAME`` (frames injected by a test, collected from TX) with options after
``?``: ``rx=queue|source|none``, ``tx=collect|sink|hold`` (hold: never takes a frame, a stuck
egress), ``frame_len=N`` (source frames), ``strict=1`` (check every sync as the kernel would),
``rings=N`` (ring pairs, 1 to 64; default the bridge's).  Example: ``mem:gen?rx=source&tx=sink&rings=2``.

Shares (forwarding workers): a port of R ring pairs opened as N shares is N ports in the same
region, share w a netmap_if of its own holding ring pairs w, w + N, w + 2N, ... of the port (as
its rings 0, 1, ...), so a share's syncs touch its own rings only.
"""

from __future__ import annotations

import re

from nmbridge.accounting import PortAccounting
from nmbridge.backends import OpenOptions, parse_options, whole_number
from nmbridge.backends.mem import MemPort
from nmbridge.errors import PortError
from nmbridge.port import Port, Region

_NAME = re.compile(r"^[A-Za-z0-9_]{1,15}$")
MAX_RINGS = 64  # fastfwd keeps a bit per RX ring of a port (broken chains)
_OPTIONS = {"rx": ("queue", "source", "none"), "tx": ("collect", "sink", "hold")}


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
        elif key == "rings":
            if whole_number(value, 1, MAX_RINGS) is None:
                raise ValueError(f"mem option rings={value!r}: a number of ring pairs from 1 to {MAX_RINGS}")
        elif key == "strict":
            if value not in ("0", "1"):
                raise ValueError(f"mem option strict={value!r}: use 0 or 1")
        else:
            raise ValueError(f"unknown mem option {key!r} (known: rx, tx, frame_len, strict, rings)")
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

    def ring_pairs(self, name: str, options: OpenOptions) -> int:
        _, opts = _parse(name)
        return int(opts.get("rings", options.rings))

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        return self.open_shares(name, options, region, 1)[0]

    def open_shares(self, name: str, options: OpenOptions, region: Region | None,
                    shares: int) -> list[Port]:
        assert region is not None
        base, opts = _parse(name)
        total = self.ring_pairs(name, options)
        if not 1 <= shares <= total:
            raise PortError(f"mem:{base}: {total} ring pair{'s' if total != 1 else ''} cannot be split "
                            f"into {shares} shares (set rings={shares} or more)")
        out: list[Port] = []
        try:
            for w in range(shares):
                out.append(MemPort(region, base, rings=len(range(w, total, shares)), slots=options.slots,
                                   rx=opts.get("rx", "queue"), tx=opts.get("tx", "collect"),
                                   frame_len=int(opts.get("frame_len", "60")),
                                   strict=opts.get("strict") == "1"))
        except (ValueError, PortError) as e:
            for p in out:
                p.close()
            raise PortError(str(e)) from None
        return out


BACKEND = _MemBackend()
