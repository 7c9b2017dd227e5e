"""Counter snapshots and rates: what stats events, metrics and `nmbridge stats` report.

A snapshot is plain JSON-ready data, taken from the forwarders' C counters in one pass:

    {"time": <monotonic s>, "pairs": [{"pair": "lan", "ports": ["afpacket:a", "afpacket:b"],
      "zerocopy": true, "directions": {"a_to_b": {"frames": .., "bytes": .., "batches": ..,
      "tx_full": .., "oversize": .., "broken_chain": .., "filtered": .., "filter": "no-ssh",
      "rule_hits": {"ssh": 3, "default": 10}}}}], "links": {"afpacket:a": true}}
"""

from __future__ import annotations

from typing import Any, NotRequired, TypedDict

DROP_REASONS = ("filtered", "tx_full", "oversize", "broken_chain")


class DirectionStats(TypedDict, total=False):
    frames: int
    bytes: int
    batches: int
    tx_full: int
    oversize: int
    broken_chain: int
    filtered: int
    filter: str | None
    rule_hits: dict[str, int]


class PairStats(TypedDict):
    pair: str
    ports: list[str]
    zerocopy: bool
    directions: dict[str, DirectionStats]


class Snapshot(TypedDict):
    time: float
    pairs: list[PairStats]
    links: dict[str, bool]
    captures: NotRequired[list[CaptureStats]]  # running captures (see below)


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
    """frames/s, bits/s and average batch size per pair and direction since `prev`."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    before = {p["pair"]: p for p in prev["pairs"]} if prev else {}
    dt = cur["time"] - prev["time"] if prev else 0.0
    for p in cur["pairs"]:
        out[p["pair"]] = {}
        for d, s in p["directions"].items():
            old_pair = before.get(p["pair"])
            old: DirectionStats = old_pair["directions"].get(d, {}) if old_pair else {}
            df = s.get("frames", 0) - old.get("frames", 0)
            db = s.get("bytes", 0) - old.get("bytes", 0)
            dbatch = s.get("batches", 0) - old.get("batches", 0)
            out[p["pair"]][d] = {
                "frames_per_s": df / dt if dt > 0 else 0.0,
                "bits_per_s": 8 * db / dt if dt > 0 else 0.0,
                "avg_batch": df / dbatch if dbatch > 0 else 0.0,
            }
    return out


def drops(s: DirectionStats) -> dict[str, int]:
    counters: dict[str, Any] = dict(s)
    return {r: int(counters.get(r, 0) or 0) for r in DROP_REASONS}


def event_fields(p: PairStats, r: dict[str, dict[str, float]]) -> dict[str, Any]:
    """The fields of one periodic `stats` log event for pair `p` (rates `r` for that pair)."""
    fields: dict[str, Any] = {"pair": p["pair"], "zerocopy": p["zerocopy"]}
    for d, s in p["directions"].items():
        rr = r.get(d, {})
        fields[d] = {
            "frames": s.get("frames", 0),
            "bytes": s.get("bytes", 0),
            "frames_per_s": round(rr.get("frames_per_s", 0.0), 1),
            "bits_per_s": round(rr.get("bits_per_s", 0.0), 1),
            "avg_batch": round(rr.get("avg_batch", 0.0), 2),
            "drops": drops(s),
            **({"filter": s["filter"], "rule_hits": s.get("rule_hits", {})} if s.get("filter") else {}),
        }
    return fields
