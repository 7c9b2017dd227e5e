#!/usr/bin/env python3
"""TCP through a bridge between kernel stacks with the Linux default offloads: the Linux
bridge and nmbridge, alternating, in one run.

    left ns --veth-- [bridge ns: Linux bridge br0 | nmbridge run] --veth-- right ns

The left and right veths keep TSO/GSO on, as a container's do, so their stacks hand the
bridge GSO super-frames (up to 64 KiB).  iperf3 sends from ``left`` to ``right`` for
``--seconds`` per round; nmbridge runs as ``nmbridge run -c CONFIG`` (its defaults, link
set-up included) with the ports of each entry of latency.py's BRIDGES that can run here.
Prints Gbit/s per round and the median per bridge.  Needs root and iperf3.

    python benchmarks/tcp.py [--seconds 3] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import sys
import tempfile
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
for p in (ROOT, HERE):
    if p not in sys.path:  # run from a checkout without installing
        sys.path.insert(0, p)

from latency import BRIDGES, running  # noqa: E402

from nmbridge import netns, probe  # noqa: E402


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="iperf3 time per round")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per bridge, alternating")
    ap.add_argument("--bridges", default=",".join(b.name for b in BRIDGES), help="which bridges, by name")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("tcp.py needs root (network namespaces, veth, AF_PACKET)", file=sys.stderr)
        return 1
    if shutil.which("iperf3") is None:
        print("tcp.py needs iperf3 (apt-get install iperf3)", file=sys.stderr)
        return 1
    wanted = set(args.bridges.split(","))
    kinds, skipped = [], {}
    for k in BRIDGES:
        why = k.unavailable() if k.name in wanted else "not asked for"
        if why:
            skipped[k.name] = why
        else:
            kinds.append(k)
    runs: list[dict[str, Any]] = []
    with netns.lab() as lb, tempfile.TemporaryDirectory() as tmp:
        for rnd in range(args.rounds):
            for k in kinds if rnd % 2 == 0 else kinds[::-1]:
                with running(lb, k, tmp):
                    r = probe.iperf3(lb, args.seconds)
                runs.append({"bridge": k.name, "round": rnd + 1, "gbit_s": r.bits_per_second / 1e9,
                             "bytes": r.bytes_received, "retransmits": r.retransmits})
                if not args.json:
                    print(f"round {rnd + 1} {k.name:9} {r.bits_per_second / 1e9:7.2f} Gbit/s "
                          f"(retransmits {r.retransmits})", flush=True)
    medians = {k.name: statistics.median(x["gbit_s"] for x in runs if x["bridge"] == k.name) for k in kinds}
    summary = {"seconds": args.seconds, "rounds": args.rounds, "median_gbit_s": medians,
               "skipped": skipped, "runs": runs}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        for name, v in medians.items():
            print(f"{name:10} {v:7.2f} Gbit/s median")
        for name, why in skipped.items():
            print(f"{name:10} skipped: {why}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
