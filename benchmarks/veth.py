#!/usr/bin/env python3
"""nmbridge (afpacket:) against the Linux bridge on the same veth lab, in the same run.

    left ns --veth-- [bridge ns: nmbridge | Linux bridge br0] --veth-- right ns

One traffic generator, trafgen (netsniff-ng) with one process in ``left``, sends 60-byte
frames (64 on a wire, with the FCS) as fast as it can: ethertype 0x88b5, to the MAC address
of the interface in ``right``.  What counts is frames delivered per second at the far end: the
rx packet counter of the interface in ``right``, read before and after a measuring window
that starts after a warm-up.  The two bridges alternate (``--rounds``), each on a fresh start;
the rate of each is the median over its rounds.  nmbridge runs as its own process inside the
bridge namespace (two afpacket: ports in one region, one Forwarder thread), which reports its
peak RSS (VmHWM) and CPU time.  Needs root.

    python benchmarks/veth.py [--seconds 3] [--rounds 3] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

from nmbridge import netns

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)

# The nmbridge side: runs inside the bridge namespace until SIGTERM, then prints JSON.
CHILD = r"""
import json, resource, signal, sys, threading
from nmbridge.backends import OpenOptions, PortSet, parse_spec
from nmbridge.fastfwd import Forwarder
left, right, burst, slots = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
ps = PortSet(OpenOptions(slots=slots))
a, b = ps.open([parse_spec("afpacket:" + left), parse_spec("afpacket:" + right)])
fwd = Forwarder(a, b, burst=burst, poll_timeout_ms=100)
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
t = threading.Thread(target=fwd.run)
t.start()
print("ready", flush=True)
done.wait()
fwd.stop()
t.join()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"peak_rss_kib": hwm, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
                  "ctx_voluntary": ru.ru_nvcsw, "ctx_involuntary": ru.ru_nivcsw,
                  "forwarder": fwd.stats(), "polls": fwd.polls,
                  "left_port": a.counters(), "right_port": b.counters()}), flush=True)
ps.close()
"""


@dataclass
class Round:
    bridge: str
    frames: int
    seconds: float
    rate_pps: float
    generator_pps: float
    extra: dict[str, Any] = field(default_factory=dict)


def softnet_drops() -> int:
    """Frames dropped because a CPU's backlog queue was full (all CPUs, all namespaces)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)


def tx_packets(lb: netns.Lab) -> int:
    return int(lb.link(lb.ns_left, lb.left_if)["stats64"]["tx"]["packets"])


def snapshot(lb: netns.Lab) -> tuple[int, int, int, float]:
    """Far-end rx packets, generator tx packets, backlog drops, time."""
    return lb.rx_packets(lb.ns_right, lb.right_if), tx_packets(lb), softnet_drops(), time.monotonic()


def measure(lb: netns.Lab, conf: str, warmup: float, seconds: float) -> tuple[int, float, int, int]:
    """Run trafgen in left; count frames arriving in right over `seconds` after `warmup`."""
    gen = lb.popen(lb.ns_left, "trafgen", "-o", lb.left_if, "-i", conf, "--cpus", "1", "--no-sock-mem",
                   "--notouch-irq", "--no-cpu-stats",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        time.sleep(warmup)
        if gen.poll() is not None:
            raise SystemExit(f"trafgen exited: {gen.stderr.read().decode() if gen.stderr else ''}")
        r0, g0, d0, t0 = snapshot(lb)
        time.sleep(seconds)
        r1, g1, d1, t1 = snapshot(lb)
    finally:
        gen.send_signal(signal.SIGINT)
        try:
            gen.wait(5)
        except subprocess.TimeoutExpired:
            gen.kill()
            gen.wait()
    return r1 - r0, t1 - t0, g1 - g0, d1 - d0


def run_linux(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    lb.ip(lb.ns_bridge, "link", "add", "name", "br0", "type", "bridge")
    try:
        for ifname in (lb.bridge_left_if, lb.bridge_right_if):
            lb.ip(lb.ns_bridge, "link", "set", "dev", ifname, "master", "br0")
        lb.set_up(lb.ns_bridge, "br0")
        frames, secs, gen, drops = measure(lb, conf, args.warmup, args.seconds)
    finally:
        lb.ip(lb.ns_bridge, "link", "del", "br0", check=False)
    return Round("linux", frames, secs, frames / secs, gen / secs, {"backlog_drops": drops})


def run_nmbridge(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    child = lb.popen(lb.ns_bridge, sys.executable, "-c", CHILD, lb.bridge_left_if, lb.bridge_right_if,
                     str(args.burst), str(args.slots), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     text=True, env=env)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            child.wait(5)
            err = child.stderr.read() if child.stderr else ""
            raise SystemExit(f"nmbridge did not start: {err.strip().splitlines()[-1:] or line}")
        frames, secs, gen, drops = measure(lb, conf, args.warmup, args.seconds)
    finally:
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=20)
    if child.returncode != 0:
        raise SystemExit(f"nmbridge failed: {err.strip()}")
    report = json.loads(out.strip().splitlines()[-1])
    report["backlog_drops"] = drops
    return Round("nmbridge", frames, secs, frames / secs, gen / secs, report)


def trafgen_conf(lb: netns.Lab, directory: str) -> str:
    dst = lb.mac(lb.ns_right, lb.right_if)
    src = lb.mac(lb.ns_left, lb.left_if)
    frame = dst + src + bytes.fromhex("88b5") + bytes(46)  # 60 bytes
    path = os.path.join(directory, "frame.cfg")
    with open(path, "w") as f:
        f.write("{ " + ", ".join(f"0x{b:02x}" for b in frame) + " }\n")
    return path


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before the window opens")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per bridge, alternating")
    ap.add_argument("--burst", type=int, default=256, help="nmbridge forwarder burst")
    ap.add_argument("--slots", type=int, default=1024, help="nmbridge ring slots")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if os.geteuid() != 0:
        print("veth.py needs root (network namespaces, veth, AF_PACKET)", file=sys.stderr)
        return 1
    rounds: list[Round] = []
    with netns.lab() as lb, tempfile.TemporaryDirectory() as tmp:
        conf = trafgen_conf(lb, tmp)
        for i in range(args.rounds):
            order = (run_linux, run_nmbridge) if i % 2 == 0 else (run_nmbridge, run_linux)
            for fn in order:
                r = fn(lb, conf, args)
                rounds.append(r)
                if not args.json:
                    print(f"round {i + 1} {r.bridge:9} {r.rate_pps / 1e6:7.3f} Mpps delivered "
                          f"(generator {r.generator_pps / 1e6:.3f} Mpps)", flush=True)
    nm = [r for r in rounds if r.bridge == "nmbridge"]
    lx = [r for r in rounds if r.bridge == "linux"]
    nm_rate = statistics.median(r.rate_pps for r in nm)
    lx_rate = statistics.median(r.rate_pps for r in lx)
    rss_kib = max(int(r.extra["peak_rss_kib"]) for r in nm)
    summary = {
        "frame_bytes": 60,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "nmbridge_pps": nm_rate,
        "linux_bridge_pps": lx_rate,
        "ratio": nm_rate / lx_rate if lx_rate else None,
        "nmbridge_peak_rss_mib": rss_kib / 1024,
        "runs": [asdict(r) for r in rounds],
    }
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        last = nm[-1].extra
        print(f"nmbridge (afpacket)  {nm_rate / 1e6:7.3f} Mpps")
        print(f"Linux bridge         {lx_rate / 1e6:7.3f} Mpps")
        print(f"ratio nmbridge/Linux {summary['ratio']:7.3f}")
        print(f"nmbridge peak RSS    {rss_kib / 1024:7.1f} MiB")
        cpu = last["cpu_user_s"] + last["cpu_sys_s"]
        lp, rp = last["left_port"], last["right_port"]
        print(f"last nmbridge round: cpu {last['cpu_user_s']:.2f}s user + {last['cpu_sys_s']:.2f}s sys "
              f"= {cpu:.2f}s; rx ring drops {lp['rx_kernel_drops']}, rx blocks {lp['blocks']}, "
              f"sendmmsg calls {rp['tx_calls']} for {rp['tx_frames']} frames, "
              f"EAGAIN {rp['tx_again']}, polls {last['polls']}, context switches "
              f"{last['ctx_voluntary']} voluntary / {last['ctx_involuntary']} involuntary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
