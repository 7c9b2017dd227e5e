"""One accounting identity for every pair and direction, whatever the backends.

Per direction (source port S, destination port D)::

    received = forwarded + sum(dropped[reason]) + queued

- ``received``: frames S's kernel (or NIC) delivered into the bridge's RX rings, plus those
  S received and could not deliver: the kernel's ring was full (``rx_kernel_drops``), the
  frame was truncated or too long for a chain (``rx_truncated``, ``rx_oversize``).
- ``forwarded``: frames D handed successfully to its kernel/NIC (the kernel took them) --
  not frames merely put on a TX slot, which may still be lost.
- ``dropped[reason]``: S's RX-side drops, fastfwd's own (``filtered``, ``oversize``: a slot
  longer than its buffer, ``broken_chain``), and D's TX-side drops (``egress_mtu``,
  ``tx_error``, ``tx_link_down``, ...).
- ``queued``: frames inside the bridge at that moment: in S's RX ring not yet taken, on D's
  TX slots not yet synced, in D's kernel TX ring not yet taken.  0 when idle.

At stop, a forwarder first drains (``fastfwd.drain``: what is inside goes out, for a bounded
time, taking nothing new).  What is still inside when the pair's ports close is lost with
them: the final counters (``stopped``, ``pair_stopped``) count it as dropped, reason
:data:`STOPPED`, so there queued is 0 (:func:`closed`).

Each backend says, in one table (:class:`PortAccounting`, its ``accounting``), which of its
port counters are the RX deliveries, the TX handovers and the drops of each side, and under
which reason.  Adding a backend or a drop reason is one table line; fastfwd's loop never
changes.  A backend without port counters (the kernel's netmap) has ``accounting = None``:
fastfwd's own counts stand in (received = taken from the RX rings, forwarded = put on TX
slots, both synced at every batch boundary).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypedDict

# fastfwd's own drop counters (Forwarder.stats() keys), in the loop's order
FASTFWD_DROPS = ("filtered", "oversize", "broken_chain")
# still inside the bridge when its ports closed, after the drain at stop (see closed())
STOPPED = "stopped"


@dataclass(frozen=True)
class PortAccounting:
    """Which counters of a backend's ports make a pair's numbers (names as the port's
    ``decode_counters`` gives them)."""

    rx_delivered: str  # frames put into the bridge's RX rings
    tx_sent: str  # frames handed to the kernel/NIC: forwarded
    tx_bytes: str  # bytes of those
    # counter -> reason: frames the port received but never delivered
    rx_drops: Mapping[str, str] = field(default_factory=dict)
    # counter -> reason: frames the port took from TX slots and never handed over
    tx_drops: Mapping[str, str] = field(default_factory=dict)

    def reasons(self) -> list[str]:
        return [*self.rx_drops.values(), *self.tx_drops.values()]


class Direction(TypedDict):
    received: int
    forwarded: int
    queued: int
    dropped: dict[str, int]
    bytes: int  # bytes forwarded
    batches: int
    tx_stalls: int  # batches that found every TX ring full: frames waited (not a drop)


def direction(fwd: Mapping[str, int], src: Mapping[str, int] | None, src_acc: PortAccounting | None,
              dst: Mapping[str, int] | None, dst_acc: PortAccounting | None) -> Direction:
    """One direction's numbers from fastfwd's counters and the two ports' (one snapshot)."""
    dropped: dict[str, int] = {}

    def add(reason: str, n: int) -> None:
        dropped[reason] = dropped.get(reason, 0) + int(n)

    consumed = int(fwd["frames"]) + sum(int(fwd[r]) for r in FASTFWD_DROPS)
    if src_acc is not None and src is not None:
        delivered = int(src[src_acc.rx_delivered])
        for counter, reason in src_acc.rx_drops.items():
            add(reason, src.get(counter, 0))
    else:
        delivered = consumed
    received = delivered + sum(dropped.values())
    for r in FASTFWD_DROPS:
        add(r, fwd[r])
    if dst_acc is not None and dst is not None:
        forwarded, nbytes = int(dst[dst_acc.tx_sent]), int(dst[dst_acc.tx_bytes])
        for counter, reason in dst_acc.tx_drops.items():
            add(reason, dst.get(counter, 0))
    else:
        forwarded, nbytes = int(fwd["frames"]), int(fwd["bytes"])
    return Direction(received=received, forwarded=forwarded,
                     queued=received - forwarded - sum(dropped.values()), dropped=dropped,
                     bytes=nbytes, batches=int(fwd["batches"]), tx_stalls=int(fwd["tx_stalls"]))


def closed(d: Direction) -> Direction:
    """A direction's numbers once its ports are closed: nothing is inside the bridge any
    more, so what was queued (what the drain at stop could not move out) is dropped, as
    :data:`STOPPED`."""
    dropped = {**d["dropped"], STOPPED: d["dropped"].get(STOPPED, 0) + d["queued"]}
    return Direction(received=d["received"], forwarded=d["forwarded"], queued=0, dropped=dropped,
                     bytes=d["bytes"], batches=d["batches"], tx_stalls=d["tx_stalls"])


def pair_directions(snap: Mapping[str, Any], a: Any, b: Any) -> dict[str, Direction]:
    """Every enabled direction of a pair, from ``Forwarder.snapshot()`` and its ports."""
    from nmbridge.backends import backend

    accs = [backend(p.backend).accounting for p in (a, b)]
    ports = snap["ports"]
    out: dict[str, Direction] = {}
    for d, (si, di) in (("a_to_b", (0, 1)), ("b_to_a", (1, 0))):
        if d in snap:
            out[d] = direction(snap[d], ports["ab"[si]], accs[si], ports["ab"[di]], accs[di])
    return out
