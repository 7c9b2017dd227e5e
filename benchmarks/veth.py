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

    python benchmarks/veth.py [--seconds 3] [--rounds 3] [--pin] [--options tx_ring=0] [--json]

``--pin`` runs trafgen on CPU 0 (for both bridges) and nmbridge's process on CPU 1, so the
scheduler's placement (and other load moving between CPUs) varies less between rounds.
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

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from nmbridge import netns  # noqa: E402

# The nmbridge side: runs inside the bridge namespace until SIGTERM, then prints JSON.
CHILD = r"""
import json, resource, signal, sys, threading
from nmbridge.backends import OpenOptions, PortSet, parse_spec
from nmbridge.fastfwd import Forwarder
left, right, burst, slots, opts = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
ps = PortSet(OpenOptions(slots=slots))
a, b = ps.open([parse_spec("afpacket:" + left + opts), parse_spec("afpacket:" + right + opts)])
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


def pinned(cpu: str | None, *argv: str) -> list[str]:
    """`argv`, run on the CPUs `cpu` names (a taskset list) when pinning."""
    return ["taskset", "-c", cpu, *argv] if cpu is not None else list(argv)


def stop_group(p: subprocess.Popen[Any]) -> None:
    """SIGINT to `p`'s process group, SIGKILL after 5 s; returns when no member is left."""
    for sig, wait in ((signal.SIGINT, 5.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(p.pid, sig)
        except ProcessLookupError:
            break
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if p.poll() is None:
                time.sleep(0.02)
                continue
            try:
                os.killpg(p.pid, 0)  # members other than the leader still running?
            except ProcessLookupError:
                return
            time.sleep(0.02)
    p.wait()


def measure(lb: netns.Lab, conf: str, warmup: float, seconds: float,
            cpu: str | None = None) -> tuple[int, float, int, int]:
    """Run trafgen in left; count frames arriving in right over `seconds` after `warmup`."""
    # trafgen forks its sender: it gets a process group of its own, and the whole group is
    # stopped -- a signal to the parent alone leaves the sender running into the next rounds
    gen = lb.popen(lb.ns_left, *pinned(cpu, "trafgen"), "-o", lb.left_if, "-i", conf, "--cpus", "1",
                   "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(warmup)
        if gen.poll() is not None:
            raise SystemExit(f"trafgen exited: {gen.stderr.read().decode() if gen.stderr else ''}")
        r0, g0, d0, t0 = snapshot(lb)
        time.sleep(seconds)
        r1, g1, d1, t1 = snapshot(lb)
    finally:
        stop_group(gen)
    return r1 - r0, t1 - t0, g1 - g0, d1 - d0


def run_linux(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    lb.ip(lb.ns_bridge, "link", "add", "name", "br0", "type", "bridge")
    try:
        for ifname in (lb.bridge_left_if, lb.bridge_right_if):
            lb.ip(lb.ns_bridge, "link", "set", "dev", ifname, "master", "br0")
        lb.set_up(lb.ns_bridge, "br0")
        frames, secs, gen, drops = measure(lb, conf, args.warmup, args.seconds, args.gen_cpu)
    finally:
        lb.ip(lb.ns_bridge, "link", "del", "br0", check=False)
    return Round("linux", frames, secs, frames / secs, gen / secs, {"backlog_drops": drops})


def run_nmbridge(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    opts = "?" + args.options if args.options else ""
    child = lb.popen(lb.ns_bridge, *pinned(args.bridge_cpu, sys.executable), "-c", CHILD, lb.bridge_left_if,
                     lb.bridge_right_if, str(args.burst), str(args.slots), opts,
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            child.wait(5)
            err = child.stderr.read() if child.stderr else ""
            raise SystemExit(f"nmbridge did not start: {err.strip().splitlines()[-1:] or line}")
        frames, secs, gen, drops = measure(lb, conf, args.warmup, args.seconds, args.gen_cpu)
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
    ap.add_argument("--options", default="", help="afpacket port options, e.g. tx_ring=0&blocks=128")
    ap.add_argument("--pin", action="store_true",
                    help="trafgen on CPU 0 (for both bridges), nmbridge's process on CPU 1")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    args.gen_cpu, args.bridge_cpu = ("0", "1") if args.pin else (None, None)
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
        "pinned": args.pin,
        "options": args.options,
        "nmbridge_pps_all": sorted(r.rate_pps for r in nm),
        "linux_bridge_pps_all": sorted(r.rate_pps for r in lx),
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

        def spread(rs: list[Round]) -> str:
            lo, hi = min(r.rate_pps for r in rs), max(r.rate_pps for r in rs)
            return f"(rounds {lo / 1e6:.3f} .. {hi / 1e6:.3f})"

        print(f"nmbridge (afpacket)  {nm_rate / 1e6:7.3f} Mpps median {spread(nm)}")
        print(f"Linux bridge         {lx_rate / 1e6:7.3f} Mpps median {spread(lx)}")
        print(f"ratio nmbridge/Linux {summary['ratio']:7.3f}")
        print(f"nmbridge peak RSS    {rss_kib / 1024:7.1f} MiB")
        cpu = last["cpu_user_s"] + last["cpu_sys_s"]
        lp, rp = last["left_port"], last["right_port"]
        print(f"last nmbridge round: cpu {last['cpu_user_s']:.2f}s user + {last['cpu_sys_s']:.2f}s sys "
              f"= {cpu:.2f}s; rx ring drops {lp['rx_kernel_drops']}, "
              f"tx calls {rp['tx_calls']} for {rp['tx_frames']} frames, "
              f"EAGAIN {rp['tx_again']}, polls {last['polls']}, context switches "
              f"{last['ctx_voluntary']} voluntary / {last['ctx_involuntary']} involuntary")
    return 0


if __name__ == "__main__":
    sys.exit(main())
