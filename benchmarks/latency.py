#!/usr/bin/env python3
"""One-way latency across a bridge: the Linux bridge and nmbridge, alternating, in one run.

    left ns --veth-- [bridge ns: Linux bridge br0 | nmbridge run] --veth-- right ns

Timestamped probe frames (nmbridge/probe.py) go from ``left`` to ``right`` at a low rate
(``--rate``, 1,000/s) on an idle lab, then again under background load: 60-byte frames from
``left`` to ``right`` at a steady ``--load-pps`` (default: half the slower bridge's maximum,
measured at the start of the run with trafgen at full speed for ``--max-seconds``).  Each
bridge runs on a fresh start in each round (``--rounds``), the order alternating; a bridge's
figures are over all its rounds' probes: p50/p99/p99.9/max one-way, in µs.

The load is benchmarks/_pacer.c (compiled at run time): one frame every 1/RATE s, busy-waiting
for each.  Not ``trafgen --rate``: trafgen reaches an average rate by sending at full speed and
then sleeping, so "half the maximum" arrived as ~400 ms bursts at the generator's full speed
with ~400 ms of silence between them (0 or 500-690 kpps per 10 ms, measured) -- a bridge
"under half load" was saturated half the time.  Each load line says what the pacer achieved
and in how many 1 ms windows its rate strayed more than 10 % from the target.

CPUs: the generator and the probe process run on ``--wire-cpu`` (CPU 0), the wire's side of
the lab; the bridge is not pinned (nmbridge: its defaults; the scheduler places its threads).
The Linux bridge forwards inside each sender's softirq, so all its work happens on the wire
CPU; nmbridge's forwarding thread needs a CPU of its own.  A probe process free to run next
to that thread would compete with it for the CPU and measure itself.  ``--wire-cpu -1``
pins nothing.  Each line also gives the CPU time used while the probes ran: all CPUs (busy
CPU-seconds per second, the pacer's spinning included) and nmbridge's process alone.

nmbridge runs as ``nmbridge run -c CONFIG`` (its defaults) inside the bridge namespace, one
entry of BRIDGES per backend: a backend this build or machine lacks is skipped with the
reason.  A variant is one more entry: port options, or [bridge] keys in ``settings`` (e.g.
``afpacket-sleep``, ``spin_us = 0``: the loop sleeps as soon as its rings are idle, the
default before round 4).  ``--rt PRIO`` runs every thread of the process SCHED_FIFO at PRIO.

    python benchmarks/latency.py [--probes 2000] [--rate 1000] [--rounds 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from nmbridge import netns, probe  # noqa: E402
from nmbridge.demo import BridgeProcess  # noqa: E402

FORWARDING_TIMEOUT = 30.0
RT_PRIORITY = 0  # --rt: SCHED_FIFO priority for nmbridge's threads (0: the default policy)
WIRE_CPU = 0  # --wire-cpu: where the load generator and the probe process run (-1: anywhere)


@dataclass(frozen=True)
class BridgeKind:
    """One bridge under test: "linux", or nmbridge with ports ``PREFIX:IFNAME?OPTIONS``."""

    name: str
    prefix: str | None = None  # None: the Linux bridge
    options: str = ""
    settings: str = ""  # more [bridge] keys, TOML lines (e.g. "rt_priority = 0")

    def unavailable(self) -> str | None:
        if self.prefix is None:
            return None
        from nmbridge.backends import backend

        try:
            return backend(self.prefix).unavailable()
        except (ImportError, ValueError) as e:
            return str(e)


BRIDGES = [
    BridgeKind("linux"),
    BridgeKind("afpacket", "afpacket"),
    BridgeKind("afxdp", "afxdp"),
    # opt-in receive coalescing (README, afxdp: options): what it costs in latency; not run
    # unless named (--bridges ...,afxdp-coalesce)
    BridgeKind("afxdp-coalesce", "afxdp", "rx_coalesce=30"),
    # the forwarding loop sleeping as soon as its rings are idle (README "Latency": spin_us)
    BridgeKind("afpacket-sleep", "afpacket", settings="spin_us = 0"),
    BridgeKind("afxdp-sleep", "afxdp", settings="spin_us = 0"),
    # SCHED_FIFO (which does not poll by default): what README "Latency" advises for a host
    # where other work competes for the bridge's CPUs
    BridgeKind("afpacket-fifo", "afpacket", settings='sched = "fifo"'),
]
DEFAULT_BRIDGES = ("linux", "afpacket", "afxdp")


@dataclass
class Sample:
    bridge: str
    round: int
    load: str  # "idle" or "load"
    result: probe.ProbeResult
    extra: dict[str, Any] = field(default_factory=dict)


@contextmanager
def linux_bridge(lb: netns.Lab) -> Iterator[None]:
    lb.ip(lb.ns_bridge, "link", "add", "name", "br0", "type", "bridge")
    try:
        for ifname in (lb.bridge_left_if, lb.bridge_right_if):
            lb.ip(lb.ns_bridge, "link", "set", "dev", ifname, "master", "br0")
        lb.set_up(lb.ns_bridge, "br0")
        yield
    finally:
        lb.ip(lb.ns_bridge, "link", "del", "br0", check=False)


def config_text(lb: netns.Lab, kind: BridgeKind) -> str:
    q = f"?{kind.options}" if kind.options else ""
    return ("[bridge]\n"
            'name = "latency"\n'
            "stats_interval = 0\n"
            f"{kind.settings}\n\n"
            "[[pair]]\n"
            'name = "lr"\n'
            f'ports = ["{kind.prefix}:{lb.bridge_left_if}{q}", "{kind.prefix}:{lb.bridge_right_if}{q}"]\n')


@contextmanager
def nmbridge(lb: netns.Lab, kind: BridgeKind, tmp: str) -> Iterator[BridgeProcess]:
    path = os.path.join(tmp, f"{kind.name}.toml")
    with open(path, "w") as f:
        f.write(config_text(lb, kind))
    br = BridgeProcess(lb, path)
    try:
        br.wait_event("forwarding", FORWARDING_TIMEOUT)
        if RT_PRIORITY:  # every thread of the bridge, the forwarding one included
            subprocess.run(["chrt", "-a", "-f", "-p", str(RT_PRIORITY), str(br.proc.pid)], check=True)
        yield br
    finally:
        br.kill()


@contextmanager
def running(lb: netns.Lab, kind: BridgeKind, tmp: str) -> Iterator[int | None]:
    """The bridge of `kind` up for the block: nmbridge's pid, None for the Linux bridge."""
    if kind.prefix is None:
        with linux_bridge(lb):
            yield None
    else:
        with nmbridge(lb, kind, tmp) as br:
            yield br.proc.pid


def trafgen_conf(lb: netns.Lab, directory: str) -> str:
    """60-byte frames to right's MAC, ethertype 0x88b6 (the probe receiver ignores them)."""
    path = os.path.join(directory, "load.cfg")
    with open(path, "w") as f:
        f.write("{ " + ", ".join(f"0x{b:02x}" for b in load_frame(lb)) + " }\n")
    return path


def load_frame(lb: netns.Lab) -> bytes:
    return (lb.mac(lb.ns_right, lb.right_if) + lb.mac(lb.ns_left, lb.left_if) + bytes.fromhex("88b6")
            + bytes(46))


def build_pacer(directory: str) -> str:
    """benchmarks/_pacer.c compiled into `directory`."""
    out = os.path.join(directory, "pacer")
    subprocess.run(["gcc", "-O2", "-std=gnu11", "-Wall", os.path.join(HERE, "_pacer.c"), "-o", out],
                   check=True)
    return out


def on_wire(argv: list[str]) -> list[str]:
    """`argv` run on the wire CPU (nothing changes with --wire-cpu -1)."""
    return ["taskset", "-c", str(WIRE_CPU), *argv] if WIRE_CPU >= 0 else argv


@contextmanager
def wire_cpu() -> Iterator[None]:
    """The calling thread on the wire CPU for the block (the probe's sends and receives)."""
    if WIRE_CPU < 0:
        yield
        return
    before = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {WIRE_CPU})
    try:
        yield
    finally:
        os.sched_setaffinity(0, before)


def started(gen: subprocess.Popen[Any], what: str, settle: float) -> None:
    """After `settle` s, SystemExit with its stderr if generator `gen` has already exited."""
    time.sleep(settle)
    if gen.poll() is not None:
        err = gen.stderr.read() if gen.stderr else ""
        raise SystemExit(f"{what} exited: {err.decode() if isinstance(err, bytes) else err}")


@contextmanager
def full_speed(lb: netns.Lab, conf: str) -> Iterator[None]:
    """trafgen in left as fast as it goes (one process; it pins itself to CPU 0)."""
    gen = lb.popen(lb.ns_left, "trafgen", "-o", lb.left_if, "-i", conf, "--cpus", "1",
                   "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        started(gen, "trafgen", 0.5)
        yield
    finally:
        from veth import stop_group  # benchmarks/veth.py: stops trafgen's whole process group

        stop_group(gen)


@contextmanager
def paced(lb: netns.Lab, pacer: str, pps: int, report: dict[str, Any]) -> Iterator[None]:
    """The pacer in left at `pps` frames/s on the wire CPU until the block ends; what it
    achieved goes into `report` (achieved rate, share of 1 ms windows off by > 10 %)."""
    gen = lb.popen(lb.ns_left, *on_wire([pacer, lb.left_if, str(pps), "0", load_frame(lb).hex()]),
                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        started(gen, "the pacer", 0.3)
        yield
    finally:
        gen.terminate()
        out, err = gen.communicate(timeout=10)
        fields = out.split()
        got = dict(zip(fields[::2], fields[1::2], strict=False))
        if "rate" not in got:
            raise SystemExit(f"the pacer said nothing useful: {out!r} {err!r}")
        windows = max(1, int(got["windows"]))
        report.update({"load_pps_achieved": round(float(got["rate"])),
                       "load_windows_off": round(int(got["off_windows"]) / windows, 4)})


def max_rate(lb: netns.Lab, kind: BridgeKind, conf: str, tmp: str, seconds: float) -> float:
    """Frames/s the bridge delivers to right with trafgen at full speed."""
    with running(lb, kind, tmp), full_speed(lb, conf):
        r0, t0 = lb.rx_packets(lb.ns_right, lb.right_if), time.monotonic()
        time.sleep(seconds)
        r1, t1 = lb.rx_packets(lb.ns_right, lb.right_if), time.monotonic()
    return (r1 - r0) / (t1 - t0)


def busy_ticks() -> int:
    """Non-idle clock ticks of all CPUs so far (/proc/stat: all but idle and iowait)."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return sum(v) - v[3] - v[4]


def probed(lb: netns.Lab, args: argparse.Namespace, pid: int | None
           ) -> tuple[probe.ProbeResult, dict[str, Any]]:
    """The probes, sent and received on the wire CPU, and the CPU time used meanwhile."""
    hz = os.sysconf("SC_CLK_TCK")
    b0, p0, t0 = busy_ticks(), probe.cpu_seconds(pid) if pid else 0.0, time.monotonic()
    with wire_cpu():
        res = probe.probe(lb, args.probes, args.rate, skip=args.skip)
    secs = time.monotonic() - t0
    cpu = {"cpu_busy": round((busy_ticks() - b0) / hz / secs, 2)}
    if pid is not None:
        cpu["bridge_cpu"] = round((probe.cpu_seconds(pid) - p0) / secs, 2)
    return res, cpu


def measure(lb: netns.Lab, kind: BridgeKind, rnd: int, args: argparse.Namespace, pacer: str,
            tmp: str, load_pps: int | None) -> list[Sample]:
    out = []
    with running(lb, kind, tmp) as pid:
        res, cpu = probed(lb, args, pid)
        out.append(Sample(kind.name, rnd, "idle", res, cpu))
        if load_pps:
            extra: dict[str, Any] = {}
            with paced(lb, pacer, load_pps, extra):
                r0 = lb.rx_packets(lb.ns_right, lb.right_if)
                t0 = time.monotonic()
                res, cpu = probed(lb, args, pid)
                delivered = (lb.rx_packets(lb.ns_right, lb.right_if) - r0) / (time.monotonic() - t0)
            extra.update(cpu, delivered_pps=round(delivered))
            out.append(Sample(kind.name, rnd, "load", res, extra))
    return out


def describe(rnd: int, s: Sample) -> str:
    """One progress line of a measurement."""
    r, x = s.result.summary(), s.extra
    line = (f"round {rnd} {s.bridge:14} {s.load:4}  p50 {r['p50_us']} µs  p99 {r['p99_us']} µs  "
            f"p99.9 {r['p99_9_us']} µs  max {r['max_us']} µs  lost {r['lost']}  CPU {x['cpu_busy']}"
            + (f" (bridge {x['bridge_cpu']})" if "bridge_cpu" in x else ""))
    if "delivered_pps" in x:
        line += (f"  load {x['load_pps_achieved'] / 1e3:.1f} kpps sent, {x['delivered_pps'] / 1e3:.1f} "
                 f"delivered, {x['load_windows_off']:.1%} of 1 ms windows off by > 10 %")
    return line


def mean_cpu(samples: list[Sample]) -> dict[str, float]:
    """The CPU figures of a bridge's measurements of one mode, averaged over its rounds."""
    out = {}
    for key in ("cpu_busy", "bridge_cpu"):
        v = [s.extra[key] for s in samples if key in s.extra]
        if v:
            out[key] = round(sum(v) / len(v), 2)
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--probes", type=int, default=2000, help="probes per measurement")
    ap.add_argument("--rate", type=float, default=1000.0, help="probes per second")
    ap.add_argument("--skip", type=int, default=50, help="warm-up probes not counted")
    ap.add_argument("--rounds", type=int, default=2, help="rounds per bridge, alternating")
    ap.add_argument("--load-pps", type=int, default=None,
                    help="background load in frames/s (default: half the slower bridge's maximum; 0: none)")
    ap.add_argument("--max-seconds", type=float, default=2.0, help="window of the maximum-rate measurement")
    ap.add_argument("--bridges", default=",".join(DEFAULT_BRIDGES),
                    help=f"which bridges, by name, of {', '.join(b.name for b in BRIDGES)} "
                         f"(default: {', '.join(DEFAULT_BRIDGES)}, those that can run here)")
    ap.add_argument("--rt", type=int, default=0, metavar="PRIO",
                    help="run nmbridge's threads SCHED_FIFO at this priority (a busy host's scheduler "
                         "otherwise decides its tail latency)")
    ap.add_argument("--wire-cpu", type=int, default=0, metavar="CPU",
                    help="the CPU of the load generator and the probe process (-1: not pinned)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    global RT_PRIORITY, WIRE_CPU
    RT_PRIORITY = args.rt
    WIRE_CPU = args.wire_cpu
    if os.geteuid() != 0:
        print("latency.py needs root (network namespaces, veth, AF_PACKET)", file=sys.stderr)
        return 1
    sys.path.insert(0, HERE)
    say: Callable[[str], None] = (lambda s: print(s, file=sys.stderr, flush=True)) if args.json else print
    wanted = set(args.bridges.split(","))
    kinds, skipped = [], {}
    for k in BRIDGES:
        if k.name not in wanted:
            continue
        why = k.unavailable()
        if why:
            skipped[k.name] = why
            say(f"skipping {k.name}: {why}")
        else:
            kinds.append(k)
    samples: list[Sample] = []
    maxima: dict[str, float] = {}
    with netns.lab() as lb, tempfile.TemporaryDirectory() as tmp:
        conf = trafgen_conf(lb, tmp)
        pacer = build_pacer(tmp)
        load_pps = args.load_pps
        if load_pps is None:
            for k in kinds:
                maxima[k.name] = max_rate(lb, k, conf, tmp, args.max_seconds)
                say(f"max rate {k.name:9} {maxima[k.name] / 1e3:8.1f} kpps")
            load_pps = int(min(maxima.values()) / 2) if maxima else 0
        say(f"background load: {load_pps / 1e3:.1f} kpps" if load_pps else "no background load")
        for rnd in range(args.rounds):
            order = kinds if rnd % 2 == 0 else kinds[::-1]
            for k in order:
                for s in measure(lb, k, rnd + 1, args, pacer, tmp, load_pps):
                    samples.append(s)
                    say(describe(rnd + 1, s))
    results: dict[str, dict[str, Any]] = {}
    for k in kinds:
        results[k.name] = {}
        for mode in ("idle", "load"):
            mine = [s for s in samples if s.bridge == k.name and s.load == mode]
            if not mine:
                continue
            lat = [v for s in mine for v in s.result.latencies_ns]
            sent = sum(s.result.sent for s in mine)
            results[k.name][mode] = {"sent": sent, "received": len(lat), "lost": sent - len(lat),
                                     **probe.percentiles_us(lat), **mean_cpu(mine)}
    ratios: dict[str, dict[str, float | None]] = {}
    base = results.get("linux", {})
    for name, r in results.items():
        if name == "linux":
            continue
        ratios[name] = {}
        for mode in r:
            lx, me = base.get(mode, {}).get("p99_us"), r[mode].get("p99_us")
            ratios[name][f"p99_vs_linux_{mode}"] = round(me / lx, 2) if lx and me else None
    summary = {"probes": args.probes, "rate_pps": args.rate, "rounds": args.rounds, "load_pps": load_pps,
               "rt_priority": args.rt, "wire_cpu": args.wire_cpu, "load_generator": "benchmarks/_pacer.c",
               "max_rate_pps": {k: round(v) for k, v in maxima.items()}, "skipped": skipped,
               "results": results, "ratios": ratios,
               "runs": [{"bridge": s.bridge, "round": s.round, "load": s.load, **s.result.summary(),
                         **s.extra} for s in samples]}
    if args.json:
        print(json.dumps(summary, indent=2))
    else:
        print(f"\none-way latency, µs (probes at {args.rate:g}/s; load {load_pps / 1e3:.1f} kpps)")
        print(f"{'bridge':15}{'mode':6}{'p50':>9}{'p99':>9}{'p99.9':>9}{'max':>9}{'lost':>7}"
              f"{'CPU all':>9}{'bridge':>8}")
        for name, r in results.items():
            for mode, v in r.items():
                print(f"{name:15}{mode:6}{v['p50_us']!s:>9}{v['p99_us']!s:>9}{v['p99_9_us']!s:>9}"
                      f"{v['max_us']!s:>9}{v['lost']:>7}{v['cpu_busy']:>9}{v.get('bridge_cpu', '-')!s:>8}")
        print("(CPU: CPU-seconds per second while the probes ran -- all CPUs, the pacer's included; "
              "nmbridge's process alone)")
        for name, r in ratios.items():
            parts = [f"{v} ({k.rsplit('_', 1)[1]})" for k, v in r.items()]
            print(f"{name}: p99 / Linux p99 = " + ", ".join(parts))
    return 0


if __name__ == "__main__":
    sys.exit(main())
