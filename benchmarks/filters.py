"""What filters cost per packet: 0, 1, 8, 32 structured rules and one pcap expression.

(a) in the forwarder: frames injected on a mem: port, forwarded to a sink through
    ``Forwarder.run(max_frames=N)`` with the filter installed, against the same run without a
    filter (the mem: port's own copy into the ring is in both);
(b) the filter alone: the fast-path entry point called in a tight C loop on one fixed frame,
    without Python per call; for the pcap rule also libpcap's ``pcap_offline_filter`` called
    the same way, to compare nmbridge's BPF interpreter with libpcap's.

Every filter's rules miss the frame (an IPv4/TCP frame to port 443), so every rule is tried
and the default decides: the worst case.  Run: ``python benchmarks/filters.py [--json]``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmbridge.backends.mem import MemPort
from nmbridge.fastfwd import Forwarder
from nmbridge.filters import CompiledFilter, FilterConfig, RuleConfig, compile_filter
from nmbridge.filters.engine import bench_offline_filter
from nmbridge.filters.pcap import compile_expr, offline_filter_address
from nmbridge.port import Region

# Ethernet / IPv4 / TCP 10.0.0.1:40000 -> 192.168.1.10:443, padded to 60 bytes
FRAME = bytes.fromhex(
    "020000000002" "020000000001" "0800"
    "45000028000140004006" "0000" "0a000001" "c0a8010a"
    "9c4001bb" "00000000" "00000000" "50022000" "00000000"
).ljust(60, b"\0")

EIGHT: list[dict[str, object]] = [
    {"ethertype": "arp"},
    {"dst_mac": "broadcast"},
    {"vlan_id": 100},
    {"src_ip": "172.16.0.0/12"},
    {"dst_ip": "2001:db8::/32"},
    {"ip_proto": "udp", "dst_port": 53},
    {"ip_proto": "tcp", "dst_port": 22},
    {"src_port": [1, 1023], "dst_ip": "192.168.1.0/24"},
]
PCAP = "not arp and tcp port 22"


def structured(n: int) -> FilterConfig:
    if n <= len(EIGHT):
        fields = EIGHT[:n] if n != 1 else [{"dst_port": 22}]
    else:
        fields = [*EIGHT, *({"dst_port": 1000 + i} for i in range(n - len(EIGHT)))]
    return FilterConfig(f"{n} rules", "pass",
                        tuple(RuleConfig(f"r{i}", "drop", f) for i, f in enumerate(fields)))


def filters() -> dict[str, FilterConfig]:
    out = {f"{n} structured": structured(n) for n in (0, 1, 8, 32)}
    out["pcap: " + PCAP] = FilterConfig("pcap", "pass", (RuleConfig("r", "drop", pcap=PCAP),))
    return out


def forwarder_run(flt: CompiledFilter | None, frames: int) -> float:
    """Seconds to forward `frames` frames from a mem: queue to a sink."""
    region = Region(ports=2, slots=1024)
    src = MemPort(region, "bsrc", slots=1024, rx="queue", tx="sink")
    dst = MemPort(region, "bdst", slots=1024, rx="none", tx="sink")
    fwd = Forwarder(src, dst, direction="a-to-b", burst=256)
    if flt is not None:
        fwd.set_filter("a_to_b", flt)
    for _ in range(frames):
        src.inject(FRAME)
    t0 = time.perf_counter()
    fwd.run(max_frames=frames)
    elapsed = time.perf_counter() - t0
    assert fwd.stats()["a_to_b"]["frames"] == frames
    src.close()
    dst.close()
    return elapsed


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--frames", type=int, default=200_000, help="frames per forwarder run")
    ap.add_argument("--iterations", type=int, default=5_000_000, help="calls per tight-loop run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best one counts")
    args = ap.parse_args()

    result: dict[str, Any] = {"frame_len": len(FRAME), "frames": args.frames,
                              "iterations": args.iterations, "forwarder": {}, "filter_only": {}}
    compiled = {name: compile_filter(cfg) for name, cfg in filters().items()}
    for flt in compiled.values():
        assert flt.evaluate(FRAME) == ("pass", None)

    base = min(forwarder_run(None, args.frames) for _ in range(args.repeat))
    result["forwarder"]["no filter"] = {"ns_per_packet": base / args.frames * 1e9,
                                        "mpps": args.frames / base / 1e6, "extra_ns": 0.0}
    for name, flt in compiled.items():
        t = min(forwarder_run(flt, args.frames) for _ in range(args.repeat))
        result["forwarder"][name] = {"ns_per_packet": t / args.frames * 1e9,
                                     "mpps": args.frames / t / 1e6,
                                     "extra_ns": (t - base) / args.frames * 1e9}

    for name, flt in compiled.items():
        ns = min(flt.program.bench(FRAME, args.iterations) for _ in range(args.repeat))
        result["filter_only"][name] = {"ns_per_packet": ns / args.iterations}
    insns = compile_expr(PCAP)
    fn = offline_filter_address()
    ns = min(bench_offline_filter(fn, insns, FRAME, args.iterations) for _ in range(args.repeat))
    result["filter_only"]["libpcap pcap_offline_filter: " + PCAP] = {"ns_per_packet": ns / args.iterations}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(FRAME)}-byte IPv4/TCP frame; every rule misses (worst case)\n")
    print(f"(a) forwarder, mem: queue -> sink, {args.frames} frames, best of {args.repeat}")
    for name, r in result["forwarder"].items():
        print(f"  {name:42s} {r['mpps']:7.2f} Mpps {r['ns_per_packet']:8.1f} ns/pkt "
              f"{r['extra_ns']:+7.1f} ns")
    print(f"\n(b) filter alone, tight C loop, {args.iterations} calls, best of {args.repeat}")
    for name, r in result["filter_only"].items():
        print(f"  {name:58s} {r['ns_per_packet']:7.2f} ns/pkt")
    return 0


if __name__ == "__main__":
    sys.exit(main())
