"""Counter snapshots and rates: what stats events, metrics and `nmbridge stats` report.

A snapshot is plain JSON-ready data, taken from each forwarder at one batch boundary
(``Forwarder.snapshot()``: fastfwd's counters and both ports', copied together) and turned
into the accounting identity of :mod:`nmbridge.accounting`::

    {"time": <monotonic s>, "pairs": [{"pair": "lan", "ports": ["afpacket:a", "afpacket:b"],
      "zerocopy": true, "directions": {"a_to_b": {"received": .., "forwarded": .., "queued": ..,
      "dropped": {"rx_kernel_drops": .., "filtered": .., "egress_mtu": .., ...}, "bytes": ..,
      "batches": .., "tx_stalls": .., "filter": "no-ssh", "rule_hits": {"ssh": 3, "default": 10}}}}],
      "links": {"afpacket:a": true}}

received = forwarded + sum(dropped) + queued, per direction, in every snapshot.
``tx_stalls`` counts batches that found every TX ring full (frames waited): not drops.
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict


class DirectionStats(TypedDict, total=False):
    received: int
    forwarded: int
    queued: int
    dropped: dict[str, int]
    bytes: int
    batches: int
    tx_stalls: int
    filter: str | None
    rule_hits: dict[str, int]


class WorkerStats(TypedDict):
    worker: int                    # counted from 0, as cpus[w % len(cpus)] and ring i % workers
    cpu: int | None                # the CPU it is pinned to (None: not pinned)
    rings: dict[str, list[int]]    # "a"/"b": the ring pairs of each port it owns
    directions: dict[str, DirectionStats]


class PairStats(TypedDict):
    pair: str
    ports: list[str]
    zerocopy: bool
    directions: dict[str, DirectionStats]
    workers: NotRequired[list[WorkerStats]]  # per worker: the pair's directions are their sums


class Snapshot(TypedDict):
    time: float
    pairs: list[PairStats]
    links: dict[str, bool]
    modes: NotRequired[dict[str, str]]  # port -> mode, for backends that have one (afxdp: zc/native/skb)
    captures: NotRequired[list[CaptureStats]]  # running captures (see below)
    down: NotRequired[list[DownStats]]  # pairs down, retried (nmbridge.healing)


class DownStats(TypedDict):
    pair: str
    ports: list[str]
    reason: str
    state: str  # "stale" (ports bound to a deleted interface) or "closed" (no ports open)
    down_seconds: float
    attempts: int  # attempts made since it went down
    retry_in: float  # seconds to the next attempt (sooner if a link event comes)


# --- running captures (nmbridge capture) -----------------------------------------------------

class CaptureCounters(TypedDict):
    seen: int             # frames that matched the capture's selection
    captured: int         # copied into the tap's ring
    capture_dropped: int  # the ring was full (the reader was behind): not captured
    rate_limited: int     # over the capture's rate limit: not captured
    bytes: int


class CaptureStats(TypedDict, total=False):
    capture: int
    pair: str
    what: str
    filter: str | None
    state: str            # "starting", then "running" once its taps are in
    written: int
    running_seconds: float
    directions: dict[str, CaptureCounters]


def rates(prev: Snapshot | None, cur: Snapshot) -> dict[str, dict[str, dict[str, float]]]:
    """Forwarded frames/s, bits/s and average batch size per pair and direction since `prev`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    before = {p["pair"]: p for p in prev["pairs"]} if prev else {}
    dt = cur["time"] - prev["time"] if prev else 0.0
    for p in cur["pairs"]:
        out[p["pair"]] = {}
        for d, s in p["directions"].items():
            old_pair = before.get(p["pair"])
            old: DirectionStats = old_pair["directions"].get(d, {}) if old_pair else {}
            df = s.get("forwarded", 0) - old.get("forwarded", 0)
            db = s.get("bytes", 0) - old.get("bytes", 0)
            dbatch = s.get("batches", 0) - old.get("batches", 0)
            out[p["pair"]][d] = {
                "frames_per_s": df / dt if dt > 0 else 0.0,
                "bits_per_s": 8 * db / dt if dt > 0 else 0.0,
                "avg_batch": df / dbatch if dbatch > 0 else 0.0,
            }
    return out


def drops(s: DirectionStats) -> dict[str, int]:
    """Frames dropped, by reason."""
    return {r: int(n) for r, n in s.get("dropped", {}).items()}


def balance(s: DirectionStats) -> int:
    """received - forwarded - dropped - queued: 0, always (tests and self-checks)."""
    return (s.get("received", 0) - s.get("forwarded", 0) - sum(drops(s).values())
            - s.get("queued", 0))


def event_fields(p: PairStats, r: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The fields of one periodic `stats` log event for pair `p` (rates `r` for that pair)."""
    fields: dict[str, Any] = {"pair": p["pair"], "zerocopy": p["zerocopy"]}
    for d, s in p["directions"].items():
        rr = r.get(d, {})
        fields[d] = {
            **counters(s),
            "frames_per_s": round(rr.get("frames_per_s", 0.0), 1),
            "bits_per_s": round(rr.get("bits_per_s", 0.0), 1),
            "avg_batch": round(rr.get("avg_batch", 0.0), 2),
            **({"filter": s["filter"], "rule_hits": s.get("rule_hits", {})} if s.get("filter") else {}),
        }
    return fields


def counters(s: DirectionStats) -> dict[str, Any]:
    """The identity's terms of one direction, as the `stats` and `stopped` events show them."""
    return {"received": s.get("received", 0), "forwarded": s.get("forwarded", 0),
            "queued": s.get("queued", 0), "dropped": sum(drops(s).values()), "drops": drops(s),
            "bytes": s.get("bytes", 0), "tx_stalls": s.get("tx_stalls", 0)}


def worker_directions(fwd: Any, a: Any, b: Any, *, final: bool = False) -> list[dict[str, DirectionStats]]:
    """Each enabled direction per worker: `fwd` is one forwarder (between ports `a` and `b`)
    or a pair's :class:`nmbridge.workers.Workers` (each worker between its own shares), every
    worker's counters from one snapshot, all asked at once.  `final`: the ports are closed,
    what was queued is dropped (``accounting.closed``)."""
    from nmbridge.accounting import closed, pair_directions

    if hasattr(fwd, "snapshots"):
        snaps, sides = fwd.snapshots(), list(zip(fwd.a_shares, fwd.b_shares, strict=True))
    else:
        snaps, sides = [fwd.snapshot()], [(a, b)]
    out: list[dict[str, DirectionStats]] = []
    for snap, (pa, pb) in zip(snaps, sides, strict=True):
        dirs: dict[str, DirectionStats] = {}
        for d, acc in pair_directions(snap, pa, pb).items():
            if final:
                acc = closed(acc)
            dirs[d] = DirectionStats(received=acc["received"], forwarded=acc["forwarded"],
                                     queued=acc["queued"], dropped=acc["dropped"], bytes=acc["bytes"],
                                     batches=acc["batches"], tx_stalls=acc["tx_stalls"])
        out.append(dirs)
    return out


_SUMMED = ("received", "forwarded", "queued", "bytes", "batches", "tx_stalls")


def sum_directions(per: list[dict[str, DirectionStats]]) -> dict[str, DirectionStats]:
    """A pair's directions from its workers': every counter and every drop reason summed (the
    identity holds for the sum because it holds for each worker)."""
    out: dict[str, DirectionStats] = {}
    for dirs in per:
        for d, s in dirs.items():
            into = out.setdefault(d, DirectionStats(received=0, forwarded=0, queued=0, dropped={}, bytes=0,
                                                    batches=0, tx_stalls=0))
            for k in _SUMMED:
                was, add = into.get(k, 0), s.get(k, 0)
                into[k] = int(was) + int(add)  # type: ignore[literal-required,call-overload]
            dropped = into.setdefault("dropped", {})
            for r, n in s.get("dropped", {}).items():
                dropped[r] = dropped.get(r, 0) + n
    return out


def pair_counters(fwd: Any, a: Any, b: Any) -> dict[str, DirectionStats]:
    """Each enabled direction of one pair (a forwarder between ports `a` and `b`, or a
    pair's workers: summed), from one snapshot per worker."""
    return sum_directions(worker_directions(fwd, a, b))


def final_counters(fwd: Any, a: Any, b: Any) -> dict[str, dict[str, Any]]:
    """What the `stopped` and `pair_stopped` events show for one pair."""
    return final_report(fwd, a, b)[0]


def ports_closed(fwd: Any, a: Any, b: Any) -> bool:
    """Whether every port (every share) of a pair is closed."""
    ports = [*fwd.a_shares, *fwd.b_shares] if hasattr(fwd, "a_shares") else [a, b]
    return all(p.closed for p in ports)


def final_report(fwd: Any, a: Any, b: Any) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """One pair's final counters per direction and, for a pair of several workers, each
    worker's (``worker``, ``cpu``, ``directions``; else []), from one snapshot per worker: the
    pair's are the workers' sums, and each worker balances on its own.  Once the pair's ports
    are closed, what its drain at stop left inside is a drop (``stopped``): queued is 0."""
    per = worker_directions(fwd, a, b, final=ports_closed(fwd, a, b))
    total = {d: counters(s) for d, s in sum_directions(per).items()}
    if len(per) < 2:
        return total, []
    return total, [{"worker": w["worker"], "cpu": w["cpu"],
                    "directions": {d: counters(s) for d, s in dirs.items()}}
                   for w, dirs in zip(fwd.describe(), per, strict=True)]


def drain_report(fwd: Any) -> dict[str, Any]:
    """How a pair's drain at stop went (fastfwd ``Forwarder.drained``, over its workers, which
    drain at once): the longest ``ms``, the RX slots ``moved`` in all, and whether every
    worker's was ``complete`` (else what was left is counted ``stopped``)."""
    ds = [f.drained for f in getattr(fwd, "forwarders", [fwd])]
    return {"ms": round(max(int(d["us"]) for d in ds) / 1000, 3), "moved": sum(int(d["moved"]) for d in ds),
            "complete": all(bool(d["complete"]) for d in ds)}
