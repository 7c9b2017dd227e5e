#!/usr/bin/env python3
"""nmbridge over netmap pipes: frames per second delivered, zero-copy and forced copy.

    C generator --> PIPE{0 ==pipe== PIPE}0 --nmbridge--> PIPE}1 ==pipe== PIPE{1 --> C sink

The generator writes 64-byte frames (--frame-len) into ``netmap:PIPE{0``, nmbridge's
Forwarder moves them from ``netmap:PIPE}0`` to ``netmap:PIPE}1`` and a C sink on
``netmap:PIPE{1`` counts them; the time is from the start until the sink has every frame.
The slave ends share their parent's memory region, so the automatic mode swaps buffers;
``zerocopy=False`` forces the copy. ``--pipe`` picks the parent name, so it can run beside
netmap's own tools (pkt-gen -i netmap:g{0 ...). Where /dev/netmap is missing it prints a skip
line and exits 0.

    python benchmarks/netmap_pipes.py [--pipe g] [--frames 20000000] [--burst 256] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

try:
    import nmbridge.backends.netmap  # noqa: F401  (an installed nmbridge, or a built checkout)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmbridge.backends.netmap_backend import device_problem, open_port
from nmbridge.fastfwd import Forwarder


def run_once(pipe: str, frames: int, frame_len: int, burst: int, zerocopy: bool | None) -> dict[str, object]:
    gen = open_port(f"netmap:{pipe}{{0")
    sink = open_port(f"netmap:{pipe}{{1")
    src = open_port(f"netmap:{pipe}}}0")
    dst = open_port(f"netmap:{pipe}}}1")
    try:
        fwd = Forwarder(src, dst, burst=burst, direction="a-to-b", zerocopy=zerocopy)
        results: dict[str, object] = {}
        errors: list[BaseException] = []

        def guarded(key: str, fn: object) -> None:
            try:
                results[key] = fn()  # type: ignore[operator]
            except BaseException as e:
                errors.append(e)

        threads = [
            threading.Thread(target=guarded, args=("forwarded", lambda: fwd.run(max_frames=frames))),
            threading.Thread(target=guarded, args=("received", lambda: sink.sink(frames))),
            threading.Thread(target=guarded, args=("sent", lambda: gen.generate(frame_len, frames))),
        ]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        threads[1].join()
        elapsed = time.perf_counter() - t0
        fwd.stop()
        gen.stop_driver()
        for t in threads:
            t.join()
        if errors:
            raise errors[0]
        received = results["received"]
        assert isinstance(received, tuple)
        got, nbytes = int(received[0]), int(received[1])
        st = fwd.stats()["a_to_b"]
        return {
            "mode": "zero-copy" if fwd.zerocopy else "copy",
            "frames": got, "bytes": nbytes, "forwarded": st["frames"], "seconds": elapsed,
            "fps": got / elapsed, "mem_id": src.mem_id,
        }
    finally:
        for p in (src, dst, gen, sink):
            p.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--pipe", default="g", help="pipe parent name (default g: netmap:g{0 ... g}1)")
    ap.add_argument("--frames", type=int, default=20_000_000)
    ap.add_argument("--frame-len", type=int, default=64)
    ap.add_argument("--burst", type=int, default=256)
    ap.add_argument("--repeat", type=int, default=1, help="runs per mode; the best is kept")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    problem = device_problem()
    if problem:
        print(f"skip: netmap pipe benchmark not run: {problem}")
        return 0
    if not args.pipe.isidentifier() and not args.pipe.replace("_", "a").isalnum():
        ap.error(f"--pipe {args.pipe!r}: letters, digits or '_' only")
    out = []
    for zerocopy in (None, False):
        best = max((run_once(args.pipe, args.frames, args.frame_len, args.burst, zerocopy)
                    for _ in range(args.repeat)), key=lambda r: float(r["fps"]))  # type: ignore[arg-type]
        out.append(best)
        if not args.json:
            print(f"{best['mode']:>9}: {float(best['fps']) / 1e6:7.2f} Mfps  "  # type: ignore[arg-type]
                  f"({best['frames']} frames of {args.frame_len} B in {float(best['seconds']):.2f} s, "  # type: ignore[arg-type]
                  f"netmap:{args.pipe}}}0 -> netmap:{args.pipe}}}1, mem_id {best['mem_id']})")
    if args.json:
        print(json.dumps({"benchmark": "netmap_pipes", "pid": os.getpid(), "results": out}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
