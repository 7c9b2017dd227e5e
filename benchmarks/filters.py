"""What filters cost per packet: 0, 1, 8, 32 structured rules and one pcap expression.

(a) in the forwarder: frames injected on a mem: port, forwarded to a sink through
    ``Forwarder.run(max_frames=N)`` with the filter installed, against the same run without a
    filter (the mem: port's own copy into the ring is in both);
(b) the filter alone: the fast-path entry point called in a tight C loop on one fixed frame,
    without Python per call; for the pcap rule also libpcap's ``pcap_offline_filter`` called
    the same way, to compare nmbridge's BPF interpreter with libpcap's.

Every filter's rules miss the frame (an IPv4/TCP frame to port 443), so every rule is tried
and the default decides: the worst case.  Run: ``python benchmarks/filters.py [--json]``.

Wall-clock numbers are noisy on a shared machine; ``--callgrind`` instead runs (b) under
valgrind's callgrind and reports instructions per call, which load does not change.  They
count the whole loop body (the call through the function pointer and the loop itself, about 5
instructions), so the 0-rule figure is the floor.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
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


LIBPCAP = "libpcap pcap_offline_filter: " + PCAP


def run_case(case: str, iterations: int) -> None:
    """One tight-loop run of `case` (a filters() name or LIBPCAP), for callgrind."""
    if case == LIBPCAP:
        bench_offline_filter(offline_filter_address(), compile_expr(PCAP), FRAME, iterations)
    else:
        compile_filter(filters()[case]).program.bench(FRAME, iterations)


def callgrind(iterations: int) -> dict[str, float]:
    """Instructions per call of each tight loop, counted by callgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        raise SystemExit("--callgrind needs valgrind (apt install valgrind)")
    # the interpreter itself, not a wrapper script (pyenv shims are shell scripts)
    python = os.path.realpath(sys.executable)
    out: dict[str, float] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for case in [*filters(), LIBPCAP]:
            loop = "*bench_offline_filter*" if case == LIBPCAP else "*Program_*bench*"
            dump = os.path.join(tmp, "cg.out")
            subprocess.run([valgrind, "--tool=callgrind", f"--callgrind-out-file={dump}",
                            "--collect-atstart=no", f"--toggle-collect={loop}", python,
                            __file__, "--case", case, "--iterations", str(iterations)],
                           check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            with open(dump) as f:
                m = re.search(r"^(?:summary|totals): (\d+)", f.read(), re.M)
            assert m is not None, "no totals in the callgrind output"
            out[case] = int(m.group(1)) / iterations
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    ap.add_argument("--frames", type=int, default=200_000, help="frames per forwarder run")
    ap.add_argument("--iterations", type=int, default=5_000_000, help="calls per tight-loop run")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the best one counts")
    ap.add_argument("--filter-only", action="store_true", help="skip (a), the forwarder runs")
    ap.add_argument("--callgrind", action="store_true",
                    help="(b) as instructions per call under callgrind (--iterations default 100000)")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # one tight loop, for --callgrind
    args = ap.parse_args()
    if args.case is not None:
        run_case(args.case, args.iterations)
        return 0
    if args.callgrind:
        iterations = args.iterations if "--iterations" in sys.argv else 100_000
        counts = callgrind(iterations)
        if args.json:
            print(json.dumps({"frame_len": len(FRAME), "iterations": iterations,
                              "instructions_per_call": counts}, indent=2))
            return 0
        print(f"{len(FRAME)}-byte IPv4/TCP frame; every rule misses (worst case)\n")
        print(f"(b) filter alone under callgrind, {iterations} calls: instructions per call")
        for name, ir in counts.items():
            print(f"  {name:58s} {ir:7.1f}")
        return 0

    result: dict[str, Any] = {"frame_len": len(FRAME), "frames": args.frames,
                              "iterations": args.iterations, "forwarder": {}, "filter_only": {}}
    compiled = {name: compile_filter(cfg) for name, cfg in filters().items()}
    for flt in compiled.values():
        assert flt.evaluate(FRAME) == ("pass", None)

    if not args.filter_only:
        # interleaved (no filter, then each filter, repeat) so a burst of load on a shared
        # machine hits every case alike; the best run of each counts
        cases: dict[str, CompiledFilter | None] = {"no filter": None, **compiled}
        best = {name: float("inf") for name in cases}
        for _ in range(args.repeat):
            for name, flt in cases.items():
                best[name] = min(best[name], forwarder_run(flt, args.frames))
        base = best["no filter"]
        for name, t in best.items():
            result["forwarder"][name] = {"ns_per_packet": t / args.frames * 1e9,
                                         "mpps": args.frames / t / 1e6,
                                         "extra_ns": (t - base) / args.frames * 1e9}

    for name, flt in compiled.items():
        ns = min(flt.program.bench(FRAME, args.iterations) for _ in range(args.repeat))
        result["filter_only"][name] = {"ns_per_packet": ns / args.iterations}
    insns = compile_expr(PCAP)
    fn = offline_filter_address()
    ns = min(bench_offline_filter(fn, insns, FRAME, args.iterations) for _ in range(args.repeat))
    result["filter_only"][LIBPCAP] = {"ns_per_packet": ns / args.iterations}

    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(FRAME)}-byte IPv4/TCP frame; every rule misses (worst case)\n")
    if not args.filter_only:
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
