"""Forwarding workers: one pair forwarded by several threads, each over its own ring pairs.

A port of R ring pairs opened for N workers is N *shares* (``Backend.open_shares``): share w
is a :class:`~nmbridge.port.Port` owning ring pairs w, w + N, w + 2N, ... of the port.  Worker
w is one :class:`~nmbridge.fastfwd.Forwarder` over share w of port a and share w of port b, run
by a thread of its own (optionally pinned to a CPU), so no ring ever has two owners and the
forwarding loop is the same one a single-threaded pair runs: each worker has its own counters,
filter programs (rule hits) and stop flag.

:class:`Workers` is what the bridge keeps for a pair in place of one forwarder: it fans a stop,
a filter swap, a capture tap (one per worker) or a snapshot request out to every worker and sums
what they count.  A pair's number of workers is at most the ring pairs of its smaller port;
within a worker, its RX rings of one port feed its TX rings of the other exactly as one
forwarder's do (every RX ring into the first TX ring with room), so unequal ring counts need
no rule of their own.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from typing import Any

from nmbridge.backends import share_rings
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Port


class FilterCopies:
    """One filter compiled once per worker (each program counts its rule hits for the one
    thread that runs it); quacks like one compiled filter for the bridge and captures."""

    def __init__(self, parts: Sequence[Any]) -> None:
        if not parts:
            raise ValueError("FilterCopies needs at least one compiled filter")
        self.parts = list(parts)

    @property
    def name(self) -> str:
        return str(self.parts[0].name)

    @property
    def config(self) -> Any:
        return self.parts[0].config

    def hits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for part in self.parts:
            for rule, n in part.hits().items():
                out[rule] = out.get(rule, 0) + n
        return out

    def evaluate(self, frame: bytes) -> tuple[str, int | None]:
        verdict, index = self.parts[0].evaluate(frame)
        return str(verdict), index


class Workers:
    """The forwarders of one pair, worker w over ``a_shares[w]`` and ``b_shares[w]``.
    `rings`: the ring pairs of port a and of port b (for who owns which); `cpus`: worker w
    runs on ``cpus[w % len(cpus)]`` (empty: not pinned)."""

    def __init__(self, a_shares: Sequence[Port], b_shares: Sequence[Port],
                 make: Callable[[Port, Port], Forwarder], *, cpus: Sequence[int] = (),
                 rings: tuple[int, int] | None = None) -> None:
        if not a_shares or len(a_shares) != len(b_shares):
            raise ValueError("a pair's workers need as many shares of port a as of port b (at least one)")
        self.a_shares = list(a_shares)
        self.b_shares = list(b_shares)
        self.cpus = tuple(cpus)
        n = len(a_shares)
        self.rings = rings if rings is not None else (n, n)
        self.forwarders: list[Forwarder] = []
        for a, b in zip(a_shares, b_shares, strict=True):
            self.forwarders.append(make(a, b))
        self._filters: dict[str, Any] = {}
        self._taps: dict[str, Any] = {}

    def __len__(self) -> int:
        return len(self.forwarders)

    # --- who does what ---------------------------------------------------------------------

    def cpu(self, w: int) -> int | None:
        return self.cpus[w % len(self.cpus)] if self.cpus else None

    def owned(self, w: int) -> dict[str, list[int]]:
        """Ring pairs of port a and of port b that worker w owns."""
        n = len(self.forwarders)
        return {"a": share_rings(self.rings[0], n, w), "b": share_rings(self.rings[1], n, w)}

    def describe(self) -> list[dict[str, Any]]:
        return [{"worker": w, "cpu": self.cpu(w), "rings": self.owned(w)} for w in range(len(self))]

    def pin(self, w: int) -> None:
        """Pin the calling thread (worker w's, before it runs) to its CPU, if it has one."""
        cpu = self.cpu(w)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})  # 0: the calling thread, on Linux

    # --- what a single forwarder offers, for the whole pair ---------------------------------

    @property
    def zerocopy(self) -> bool:
        return all(f.zerocopy for f in self.forwarders)

    @property
    def running(self) -> bool:
        return any(f.running for f in self.forwarders)

    @property
    def polls(self) -> int:
        return sum(f.polls for f in self.forwarders)

    def stop(self) -> None:
        for f in self.forwarders:
            f.stop()

    def stop_wake(self) -> None:
        for f in self.forwarders:
            f.stop_wake()

    def stats(self) -> dict[str, dict[str, int]]:
        """Forwarder.stats() summed over the workers (the enabled directions)."""
        out: dict[str, dict[str, int]] = {}
        for f in self.forwarders:
            for d, s in f.stats().items():
                into = out.setdefault(d, {})
                for k, v in s.items():
                    into[k] = into.get(k, 0) + v
        return out

    def snapshots(self, timeout: float = 0.5) -> list[dict[str, Any]]:
        """Every worker's Forwarder.snapshot(), asked of all workers at once (each copies its
        counters at its own next batch boundary).  The workers share no ring and no port
        counter, so each snapshot's identity holds alone and their sum holds too."""
        asked = [f.ask_snapshot() for f in self.forwarders]
        return [f.snapshot(timeout, asked=r) for f, r in zip(self.forwarders, asked, strict=True)]

    def _one_each(self, obj: Any, what: str, why: str) -> list[Any]:
        """`obj`'s per-worker parts (its ``parts``, or itself for a single worker; Nones for
        None), checked to be one per worker."""
        parts = [None] * len(self) if obj is None else getattr(obj, "parts", [obj])
        if len(parts) != len(self):
            raise ValueError(f"{len(parts)} {what} for {len(self)} workers: one each ({why})")
        return parts

    @staticmethod
    def _keep(kept: dict[str, Any], direction: str, obj: Any) -> None:
        if obj is None:
            kept.pop(direction, None)
        else:
            kept[direction] = obj

    def set_filter(self, direction: str, filt: Any) -> None:
        """Install a filter on every worker (a :class:`FilterCopies` with one program per
        worker, or one compiled filter for a single worker); returns once no worker can still
        run the old one (each worker's loop passed its epochs)."""
        parts = self._one_each(filt, "filter programs", "a program's rule counters have one writer")
        for f, part in zip(self.forwarders, parts, strict=True):
            f.set_filter(direction, part)
        self._keep(self._filters, direction, filt)

    def filter(self, direction: str) -> Any:
        return self._filters.get(direction)

    def set_tap(self, direction: str, tap: Any) -> None:
        """Install a capture tap on every worker (a :class:`~nmbridge.capture.TapSet` with one
        tap per worker, or one tap for a single worker), or None to remove it; returns once the
        change is in force on every worker (each worker's loop passed its epochs)."""
        parts = self._one_each(tap, "capture taps", "a tap's ring has one writer")
        for f, part in zip(self.forwarders, parts, strict=True):
            f.set_tap(direction, part)
        self._keep(self._taps, direction, tap)

    def tap(self, direction: str) -> Any:
        return self._taps.get(direction)
