#!/usr/bin/env python3
"""fastfwd against a plain C swap loop, on mem: ports, in one process.

An endless mem: source feeds 64-byte frames (60 + FCS the NIC would strip: len 60 here unless
--frame-len) to a mem: sink through (a) nmbridge's Forwarder and (b) a C loop of our own that
does only the swap (or copy) over the same rings with the same source/sink syncs. Runs
alternate, the best of --repeat is kept, for bursts 32/256/1024, zero-copy (one region) and
copy mode (two regions). Prints Mpps, ns/packet and fastfwd/C ratio; --json for machines.

--capture adds, per case, fastfwd with a capture running on the direction (`nmbridge
capture`'s tap, every forwarded frame selected): "tap 10k/s" with the default rate limit and
a thread draining the ring as the capture client's connection does, and "tap all" with no
limit (every frame copied into the ring or counted as capture_dropped when the drain thread
is behind).  The plain fastfwd column is the cost with no capture: the tap's only trace there
is one pointer load per batch.

--workers 1,2 measures forwarding workers instead (README "Workers"): a mem: source and sink
of --rings ring pairs (2), split into N shares for N workers, worker w pinned to CPU w (of
those this process may use), all started together; per worker count the total Mpps (frames
of every worker / wall time until the last one is done), each worker's own Mpps, and the
ratio to the first count.  Zero-copy, --burst (1024, the bridge's default).

    python benchmarks/fastfwd.py [--frames 20000000] [--repeat 3] [--capture] [--json]
    python benchmarks/fastfwd.py --workers 1,2 [--rings 2] [--frames 20000000] [--json]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import threading
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


def run_fastfwd(frames: int, burst: int, zerocopy: bool, slots: int, frame_len: int,
                tap_rate: int | None = None, taps: list[dict[str, int]] | None = None) -> float:
    """Seconds per frame; with `tap_rate` (frames/s, 0: no limit) a capture tap selecting every
    forwarded frame runs, drained by a thread; its counters go to `taps`."""
    src, dst = make_ports(zerocopy, slots, frame_len)
    fwd = Forwarder(src, dst, burst=burst, direction="a-to-b")
    assert fwd.zerocopy == zerocopy
    tap = None
    done = threading.Event()
    drained = [0]
    if tap_rate is not None:
        from nmbridge.capring import Tap

        tap = Tap(0, ["forwarded"], snaplen=frame_len, rate=tap_rate)
        fwd.set_tap("a_to_b", tap)

        def consume() -> None:
            while not done.is_set():
                got = len(tap.drain())
                drained[0] += got
                if not got:
                    time.sleep(0.001)

        threading.Thread(target=consume, daemon=True).start()
    t0 = time.perf_counter()
    fwd.run(max_frames=frames)
    dt = time.perf_counter() - t0
    done.set()
    moved = fwd.stats()["a_to_b"]["frames"]
    assert moved >= frames, moved
    if tap is not None and taps is not None:
        taps.append(tap.counters())
    return dt / moved


def run_c(lib: ctypes.CDLL, frames: int, burst: int, zerocopy: bool, slots: int, frame_len: int) -> float:
    src, dst = make_ports(zerocopy, slots, frame_len)
    t0 = time.perf_counter()
    moved = lib.swap_loop(src.address, dst.address, frames, burst, int(zerocopy))
    dt = time.perf_counter() - t0
    assert moved >= frames, moved
    return dt / moved


def run_workers(n: int, rings: int, frames: int, burst: int, slots: int, frame_len: int
                ) -> tuple[float, list[float]]:
    """N workers over shares of a `rings`-ring source and sink, worker w pinned to CPU w (of
    the allowed ones): (total frames/s, each worker's frames/s)."""
    from nmbridge.backends import OpenOptions
    from nmbridge.backends.mem_backend import BACKEND as MEM
    from nmbridge.workers import Workers

    region = Region(ports=2, rings=rings, slots=slots)
    opts = OpenOptions(slots=slots)
    src = MEM.open_shares(f"src?rx=source&tx=sink&rings={rings}&frame_len={frame_len}", opts, region, n)
    dst = MEM.open_shares(f"dst?rx=none&tx=sink&rings={rings}", opts, region, n)
    cpus = sorted(os.sched_getaffinity(0))
    group = Workers(src, dst, lambda a, b: Forwarder(a, b, burst=burst, direction="a-to-b"),
                    cpus=cpus[:n], rings=(rings, rings))
    assert group.zerocopy
    go = threading.Barrier(n + 1)
    spans: list[tuple[float, float]] = [(0.0, 0.0)] * n

    def worker(w: int) -> None:
        group.pin(w)
        go.wait()
        t0 = time.perf_counter()
        group.forwarders[w].run(max_frames=frames // n)
        spans[w] = (t0, time.perf_counter())

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(n)]
    for t in threads:
        t.start()
    go.wait()
    for t in threads:
        t.join()
    moved = [f.stats()["a_to_b"]["frames"] for f in group.forwarders]
    wall = max(e for _, e in spans) - min(s for s, _ in spans)
    return sum(moved) / wall, [m / (e - s) for m, (s, e) in zip(moved, spans, strict=True)]


def workers_main(args: argparse.Namespace) -> int:
    counts = [int(c) for c in args.workers.split(",")]
    burst = args.burst
    best: dict[int, tuple[float, list[float]]] = {}
    for _ in range(args.repeat):  # alternating counts, best total kept
        for n in counts:
            got = run_workers(n, args.rings, args.frames, burst, args.slots, args.frame_len)
            if n not in best or got[0] > best[n][0]:
                best[n] = got
    base = best[counts[0]][0]
    results = [{"workers": n, "mpps": best[n][0] / 1e6, "per_worker_mpps": [r / 1e6 for r in best[n][1]],
                "ratio": best[n][0] / base} for n in counts]
    if args.json:
        json.dump({"frames": args.frames, "frame_len": args.frame_len, "slots": args.slots,
                   "rings": args.rings, "burst": burst, "cpus": sorted(os.sched_getaffinity(0)),
                   "results": results}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.frames} frames of {args.frame_len} bytes per run, mem: ports of {args.rings} ring pairs, "
          f"{args.slots}-slot rings, burst {burst}, zero-copy, worker w on CPU w, best of {args.repeat}")
    print(f"{'workers':>7} {'Mpps':>7} {'ratio':>6}  per worker Mpps")
    for r in results:
        per = " ".join(f"{m:.1f}" for m in r["per_worker_mpps"])
        print(f"{r['workers']:7} {r['mpps']:7.1f} {r['ratio']:6.2f}  {per}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--frames", type=int, default=20_000_000, help="frames per run")
    ap.add_argument("--repeat", type=int, default=3, help="alternating runs per case; best kept")
    ap.add_argument("--bursts", default="32,256,1024")
    ap.add_argument("--slots", type=int, default=1024, help="slots per ring")
    ap.add_argument("--frame-len", type=int, default=60)
    ap.add_argument("--capture", action="store_true",
                    help="also run with a capture tap (10k/s limit, and no limit) on the direction")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--workers", metavar="N,M", help="measure forwarding workers (e.g. 1,2) instead")
    ap.add_argument("--rings", type=int, default=2, help="ring pairs of each port (--workers)")
    ap.add_argument("--burst", type=int, default=1024, help="burst of each worker (--workers)")
    args = ap.parse_args()
    if args.workers:
        return workers_main(args)
    lib = build_baseline()
    results = []
    for zerocopy in (True, False):
        for burst in (int(b) for b in args.bursts.split(",")):
            best_f = best_c = float("inf")
            best_t = {10_000: float("inf"), 0: float("inf")}
            taps: dict[int, list[dict[str, int]]] = {10_000: [], 0: []}
            for _ in range(args.repeat):
                best_c = min(best_c, run_c(lib, args.frames, burst, zerocopy, args.slots, args.frame_len))
                best_f = min(best_f, run_fastfwd(args.frames, burst, zerocopy, args.slots, args.frame_len))
                if args.capture:
                    for rate in best_t:
                        best_t[rate] = min(best_t[rate], run_fastfwd(
                            args.frames, burst, zerocopy, args.slots, args.frame_len, rate, taps[rate]))
            r = {"mode": "zerocopy" if zerocopy else "copy", "burst": burst,
                 "fastfwd_ns": best_f * 1e9, "fastfwd_mpps": 1e-6 / best_f,
                 "c_ns": best_c * 1e9, "c_mpps": 1e-6 / best_c, "ratio": best_f / best_c}
            if args.capture:
                for rate, name in ((10_000, "tap10k"), (0, "tapall")):
                    r[f"{name}_ns"] = best_t[rate] * 1e9
                    r[f"{name}_ratio"] = best_t[rate] / best_c
                    last = taps[rate][-1]
                    r[f"{name}_captured"] = last["captured"]
                    r[f"{name}_skipped"] = last["capture_dropped"] + last["rate_limited"]
            results.append(r)
    if args.json:
        json.dump({"frames": args.frames, "frame_len": args.frame_len, "slots": args.slots,
                   "cpu": os.cpu_count(), "results": results}, sys.stdout, indent=2)
        print()
        return 0
    print(f"{args.frames} frames of {args.frame_len} bytes per run, {args.slots}-slot rings, "
          f"best of {args.repeat}")
    extra = (f" {'tap 10k/s ns':>12} {'ratio':>6} {'tap all ns':>10} {'ratio':>6} {'captured':>9}"
             if args.capture else "")
    print(f"{'mode':9} {'burst':>5} {'fastfwd Mpps':>13} {'ns/pkt':>7} {'C loop Mpps':>12} "
          f"{'ns/pkt':>7} {'ratio':>6}{extra}")
    for r in results:
        extra = (f" {r['tap10k_ns']:12.2f} {r['tap10k_ratio']:6.2f} {r['tapall_ns']:10.2f} "
                 f"{r['tapall_ratio']:6.2f} {r['tapall_captured']:9}" if args.capture else "")
        print(f"{r['mode']:9} {r['burst']:5} {r['fastfwd_mpps']:13.1f} {r['fastfwd_ns']:7.2f} "
              f"{r['c_mpps']:12.1f} {r['c_ns']:7.2f} {r['ratio']:6.2f}{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
