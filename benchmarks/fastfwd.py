#!/usr/bin/env python3
"""fastfwd against a plain C swap loop, on mem: ports, in one process.

An endless mem: source feeds 64-byte frames (60 + FCS the NIC would strip: len 60 here unless
--frame-len) to a mem: sink through (a) nmbridge's Forwarder and (b) a C loop of our own that
does only the swap (or copy) over the same rings with the same source/sink syncs. Runs
alternate, the best of --repeat is kept, for bursts 32/256/1024, zero-copy (one region) and
copy mode (two regions). Prints Mpps, ns/packet and fastfwd/C ratio; --json for machines.

    python benchmarks/fastfwd.py [--frames 20000000] [--repeat 3] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from nmbridge.backends.mem import MemPort  # noqa: E402
from nmbridge.fastfwd import Forwarder  # noqa: E402
from nmbridge.port import Region  # noqa: E402


def build_baseline() -> ctypes.CDLL:
    """Compile benchmarks/_swaploop.c with the same flags as the extensions."""
    out = Path(tempfile.mkdtemp(prefix="nmb-bench-")) / "swaploop.so"
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-shared", "-fPIC", f"-I{ROOT}/nmbridge/include",
                    str(ROOT / "benchmarks" / "_swaploop.c"), "-o", str(out)], check=True)
    lib = ctypes.CDLL(str(out))
    lib.swap_loop.restype = ctypes.c_uint64
    lib.swap_loop.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint32,
                              ctypes.c_int]
    return lib


def make_ports(zerocopy: bool, slots: int, frame_len: int) -> tuple[MemPort, MemPort]:
    if zerocopy:  # one region: the forwarder swaps buffers
        ra = rb = Region(ports=2, rings=1, slots=slots)
    else:  # two regions: the forwarder must copy
        ra, rb = Region(ports=1, rings=1, slots=slots), Region(ports=1, rings=1, slots=slots)
    src = MemPort(ra, "src", slots=slots, rx="source", tx="sink", frame_len=frame_len)
    dst = MemPort(rb, "dst", slots=slots, rx="none", tx="sink")
    return src, dst


def run_fastfwd(frames: int, burst: int, zerocopy: bool, slots: int, frame_len: int) -> float:
    src, dst = make_ports(zerocopy, slots, frame_len)
    fwd = Forwarder(src, dst, burst=burst, direction="a-to-b")
    assert fwd.zerocopy == zerocopy
    t0 = time.perf_counter()
    fwd.run(max_frames=frames)
    dt = time.perf_counter() - t0
    moved = fwd.stats()["a_to_b"]["frames"]
    assert moved >= frames, moved
    return dt / moved


def run_c(lib: ctypes.CDLL, frames: int, burst: int, zerocopy: bool, slots: int, frame_len: int) -> float:
    src, dst = make_ports(zerocopy, slots, frame_len)
    t0 = time.perf_counter()
    moved = lib.swap_loop(src.address, dst.address, frames, burst, int(zerocopy))
    dt = time.perf_counter() - t0
    assert moved >= frames, moved
    return dt / moved


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20_000_000, help="frames per run")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per case; best kept")
    ap.add_argument("--bursts", default="32,256,1024")
    ap.add_argument("--slots", type=int, default=1024, help="slots per ring")
    ap.add_argument("--frame-len", type=int, default=60)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    lib = build_baseline()
    results = []
    for zerocopy in (True, False):
        for burst in (int(b) for b in args.bursts.split(",")):
            best_f = best_c = float("inf")
            for _ in range(args.repeat):
                best_c = min(best_c, run_c(lib, args.frames, burst, zerocopy, args.slots, args.frame_len))
                best_f = min(best_f, run_fastfwd(args.frames, burst, zerocopy, args.slots, args.frame_len))
            results.append({
                "mode": "zerocopy" if zerocopy else "copy", "burst": burst,
                "fastfwd_ns": best_f * 1e9, "fastfwd_mpps": 1e-6 / best_f,
                "c_ns": best_c * 1e9, "c_mpps": 1e-6 / best_c, "ratio": best_f / best_c,
            })
    if args.json:
        json.dump({"frames": args.frames, "frame_len": args.frame_len, "slots": args.slots,
                   "cpu": os.cpu_count(), "results": results}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.frames} frames of {args.frame_len} bytes per run, {args.slots}-slot rings, "
          f"best of {args.repeat}")
    print(f"{'mode':9} {'burst':>5} {'fastfwd Mpps':>13} {'ns/pkt':>7} {'C loop Mpps':>12} "
          f"{'ns/pkt':>7} {'ratio':>6}")
    for r in results:
        print(f"{r['mode']:9} {r['burst']:5} {r['fastfwd_mpps']:13.1f} {r['fastfwd_ns']:7.2f} "
              f"{r['c_mpps']:12.1f} {r['c_ns']:7.2f} {r['ratio']:6.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
