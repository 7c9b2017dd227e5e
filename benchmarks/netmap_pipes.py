#!/usr/bin/env python3
"""nmbridge over netmap pipes: frames per second delivered, zero-copy, forced copy, and
(with --baseline) netmap's own bridge on the same pipes in the same run.

    generator --> PIPE{0 ==pipe== PIPE}0 --forwarder--> PIPE}1 ==pipe== PIPE{1 --> sink

The generator writes --frame-len-byte frames into ``netmap:PIPE{0``, the forwarder moves them
from ``netmap:PIPE}0`` to ``netmap:PIPE}1`` (both directions forwarded, as ``nmbridge run``
and ``bridge`` do by default) and a sink on ``netmap:PIPE{1`` counts them.  The forwarders:

* ``zero-copy``: nmbridge's Forwarder at its defaults (burst 1024); the slave ends share their
  parent's memory region, so it swaps buffers;
* ``copy``: the same with ``zerocopy=False``;
* ``bridge`` (with ``--baseline PATH``): netmap's ``bridge -w 0 -i netmap:PIPE}0 -i netmap:PIPE}1``
  at its defaults.

Generator and sink are nmbridge's C drivers (in this process, in threads), or netmap's
``pkt-gen -f tx`` / ``pkt-gen -f rx`` with ``--pktgen PATH`` (then the rate is the one pkt-gen
rx reports).  ``--repeat N`` runs the modes in turn N times (zero-copy, copy, bridge, zero-copy,
...), so a machine whose speed drifts slows every mode alike, and prints each mode's median
and the ratio of nmbridge's medians to bridge's.  Where /dev/netmap is missing it prints a
skip line and exits 0.

    python benchmarks/netmap_pipes.py [--pipe g] [--frames 20000000] [--repeat 3]
        [--baseline /usr/local/bin/bridge] [--pktgen /usr/local/bin/pkt-gen] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

try:
    import nmbridge.backends.netmap  # noqa: F401  (an installed nmbridge, or a built checkout)
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from nmbridge.backends.netmap import NetmapPort
from nmbridge.backends.netmap_backend import device_problem, open_port
from nmbridge.fastfwd import Forwarder

DEADLINE = 120.0  # seconds a run may take at most (a guard, not a measurement)
Result = dict[str, Any]


class Forwarding:
    """A forwarder between PIPE}0 and PIPE}1, started before the traffic and stopped after."""

    def start(self) -> None: ...
    def stop(self) -> Result: ...


class NmbridgeForwarding(Forwarding):
    def __init__(self, pipe: str, zerocopy: bool | None, burst: int | None) -> None:
        self.src = open_port(f"netmap:{pipe}}}0")
        self.dst = open_port(f"netmap:{pipe}}}1")
        kw: dict[str, Any] = {} if burst is None else {"burst": burst}
        self.fwd = Forwarder(self.src, self.dst, zerocopy=zerocopy, **kw)
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._run)

    def _run(self) -> None:
        try:
            self.fwd.run()
        except BaseException as e:
            self.errors.append(e)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> Result:
        self.fwd.stop()
        self.thread.join()
        st = self.fwd.stats()["a_to_b"]
        out = {"mode": "zero-copy" if self.fwd.zerocopy else "copy", "forwarded": st["frames"],
               "frames_per_batch": st["frames"] / max(1, st["batches"]), "polls": self.fwd.polls,
               "tx_full": st["tx_full"], "burst": self.fwd.burst, "mem_id": self.src.mem_id}
        self.src.close()
        self.dst.close()
        if self.errors:
            raise self.errors[0]
        return out


class BridgeForwarding(Forwarding):
    """netmap's bridge in a subprocess; ready once it says so on stderr."""

    def __init__(self, path: str, pipe: str) -> None:
        self.argv = [path, "-w", "0", "-i", f"netmap:{pipe}}}0", "-i", f"netmap:{pipe}}}1"]
        self.proc: subprocess.Popen[str] | None = None
        self.log: list[str] = []

    def start(self) -> None:
        self.proc = subprocess.Popen(self.argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        assert self.proc.stderr is not None
        ready = threading.Event()

        def read() -> None:
            assert self.proc is not None and self.proc.stderr is not None
            for line in self.proc.stderr:
                self.log.append(line.rstrip())
                if "Ready to go" in line:
                    ready.set()
            ready.set()

        threading.Thread(target=read, daemon=True).start()
        ready.wait(30)
        if self.proc.poll() is not None or not any("Ready to go" in x for x in self.log):
            self.proc.kill()
            raise RuntimeError(f"{' '.join(self.argv)} did not start: " + " | ".join(self.log[-5:]))

    def stop(self) -> Result:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGINT)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        return {"mode": "bridge"}


def drive_inprocess(pipe: str, frames: int, frame_len: int, fwd: Forwarding) -> Result:
    """nmbridge's C generator and sink on the master ends; time from start to the last frame."""
    gen = open_port(f"netmap:{pipe}{{0")
    sink = open_port(f"netmap:{pipe}{{1")
    try:
        fwd.start()
        results: dict[str, Any] = {}
        errors: list[BaseException] = []

        def guarded(key: str, fn: Callable[[], object]) -> None:
            try:
                results[key] = fn()
            except BaseException as e:
                errors.append(e)

        threads = [threading.Thread(target=guarded, args=("received", lambda: sink.sink(frames))),
                   threading.Thread(target=guarded, args=("sent", lambda: gen.generate(frame_len, frames)))]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        threads[0].join(DEADLINE)
        elapsed = time.perf_counter() - t0
        stop_drivers(gen, sink, threads)
        out = fwd.stop()
        if errors:
            raise errors[0]
        got = int(results.get("received", (0, 0))[0])
        return {**out, "frames": got, "seconds": elapsed, "fps": got / elapsed}
    finally:
        gen.close()
        sink.close()


def stop_drivers(gen: NetmapPort, sink: NetmapPort, threads: list[threading.Thread]) -> None:
    sink.stop_driver()
    gen.stop_driver()
    for t in threads:
        t.join()


PKTGEN_RX = re.compile(r"Received (\d+) packets.*? in ([0-9.]+) seconds")


def drive_pktgen(pktgen: str, pipe: str, frames: int, frame_len: int, fwd: Forwarding) -> Result:
    """pkt-gen rx on PIPE{1 and pkt-gen tx on PIPE{0; the rate pkt-gen rx reports."""
    fwd.start()
    rx = subprocess.Popen([pktgen, "-i", f"netmap:{pipe}{{1", "-f", "rx", "-n", str(frames), "-w", "1"],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        time.sleep(1.5)  # rx bound and waiting (its -w 1) before the first frame is sent
        tx = subprocess.run([pktgen, "-i", f"netmap:{pipe}{{0", "-f", "tx", "-n", str(frames), "-l",
                             str(frame_len), "-w", "1"], capture_output=True, text=True, timeout=DEADLINE,
                            check=False)
        if tx.returncode != 0:
            raise RuntimeError(f"pkt-gen tx failed: {tx.stdout[-500:]}")
        try:
            rx.wait(10)  # it ends by itself once it has every frame
        except subprocess.TimeoutExpired:
            rx.send_signal(signal.SIGINT)  # frames were lost: it prints what it got
            rx.wait(10)
        text = rx.stdout.read() if rx.stdout else ""
    finally:
        if rx.poll() is None:
            rx.kill()
            rx.wait()
        out = fwd.stop()
    found = PKTGEN_RX.findall(text)
    if not found:
        raise RuntimeError(f"no 'Received ... packets ... in ... seconds' from pkt-gen rx: {text[-500:]}")
    got, seconds = int(found[-1][0]), float(found[-1][1])
    return {**out, "frames": got, "seconds": seconds, "fps": got / seconds if seconds else 0.0}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    ap.add_argument("--pipe", default="g", help="pipe parent name (default g: netmap:g{0 ... g}1)")
    ap.add_argument("--frames", type=int, default=20_000_000)
    ap.add_argument("--frame-len", type=int, default=60)
    ap.add_argument("--burst", type=int, default=None, help="nmbridge's burst (default: its default)")
    ap.add_argument("--repeat", type=int, default=1, help="rounds over the modes; medians are printed")
    ap.add_argument("--baseline", metavar="PATH", help="netmap's bridge binary: run it on the same pipes")
    ap.add_argument("--pktgen", metavar="PATH", help="netmap's pkt-gen: generator and sink for every mode")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    problem = device_problem()
    if problem:
        print(f"skip: netmap pipe benchmark not run: {problem}")
        return 0
    if not args.pipe.replace("_", "a").isalnum():
        ap.error(f"--pipe {args.pipe!r}: letters, digits or '_' only")
    for opt, path in (("--baseline", args.baseline), ("--pktgen", args.pktgen)):
        if path and not os.access(path, os.X_OK):
            ap.error(f"{opt} {path}: not an executable file")
    if args.repeat < 1 or args.frames < 1:
        ap.error("--repeat and --frames must be at least 1")

    def forwarding(mode: str) -> Forwarding:
        if mode == "bridge":
            return BridgeForwarding(args.baseline, args.pipe)
        return NmbridgeForwarding(args.pipe, None if mode == "zero-copy" else False, args.burst)

    def once(mode: str) -> Result:
        fwd = forwarding(mode)
        if args.pktgen:
            return drive_pktgen(args.pktgen, args.pipe, args.frames, args.frame_len, fwd)
        return drive_inprocess(args.pipe, args.frames, args.frame_len, fwd)

    modes = ["zero-copy", "copy"] + (["bridge"] if args.baseline else [])
    runs: dict[str, list[Result]] = {m: [] for m in modes}
    for _ in range(args.repeat):
        for mode in modes:  # in turn, so drift hits every mode alike
            r = once(mode)
            runs[mode].append(r)
            if not args.json:
                extra = ""
                if "frames_per_batch" in r:
                    extra = (f", {r['frames_per_batch']:.0f} frames/batch, "
                             f"{r['polls'] * 1e6 / max(1, r['forwarded']):.0f} polls/Mframe")
                print(f"  {mode:>9}: {r['fps'] / 1e6:7.3f} Mfps "
                      f"({r['frames']} frames in {r['seconds']:.2f} s{extra})")
    medians = {m: statistics.median(float(r["fps"]) for r in rs) for m, rs in runs.items()}
    ratios = {m: medians[m] / medians["bridge"]
              for m in modes if "bridge" in medians and medians["bridge"] > 0}
    if args.json:
        print(json.dumps({"benchmark": "netmap_pipes", "pid": os.getpid(), "driver": "pkt-gen" if args.pktgen
                          else "nmbridge", "medians_fps": medians, "ratio_to_bridge": ratios, "runs": runs}))
        return 0
    src = f"netmap:{args.pipe}}}0 -> netmap:{args.pipe}}}1"
    driver = "pkt-gen" if args.pktgen else "nmbridge's C generator and sink"
    print(f"median of {args.repeat} ({src}, {args.frame_len}-byte frames, {driver}):")
    for m in modes:
        vs = f"  = {ratios[m]:.2f}x bridge" if m in ratios and m != "bridge" else ""
        print(f"  {m:>9}: {medians[m] / 1e6:7.3f} Mfps{vs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
