#!/usr/bin/env python3
"""nmbridge (afxdp: and afpacket:) against the Linux bridge on the same veth lab, in the same run.

    left ns --veth-- [bridge ns: nmbridge | Linux bridge br0] --veth-- right ns

One traffic generator, trafgen (netsniff-ng) with one process in ``left``, sends 60-byte
frames (64 on a wire, with the FCS) as fast as it can: ethertype 0x88b5, to the MAC address
of the interface in ``right``.  What counts is frames delivered per second at the far end: the
rx packet counter of the interface in ``right``, read before and after a measuring window
that starts after a warm-up.  The bridges (``--bridges``, default linux, afpacket, afxdp)
alternate (``--rounds``; the order rotates each round), each on a fresh start; the rate of each
is the median over its rounds.  nmbridge runs as its own process inside the bridge namespace
(two ports of one backend in one region, one Forwarder thread), which reports its peak RSS
(VmHWM) and CPU time.

Scaling (``--workers 1,2``): each nmbridge bridge runs once per worker count; with N > 1 the
two ports are opened as N shares each (the backend's ``open_shares``: for afpacket:, N
sockets of one PACKET_FANOUT group) and share w of left and share w of right are forwarded
by Forwarder w in a thread of its own (pinned to CPU 1 + w with ``--pin``) -- what a
``[[pair]] workers = N`` does in the app, without the app.  ``--queues Q`` gives every veth
Q TX and RX queues (``numtxqueues Q numrxqueues Q``).  A fanout hash needs several flows:
``--flows F`` (default 1 with one worker, 64 with more) makes the frames IPv4/UDP, 60 bytes,
in F flows (the UDP source port counts up), to a MAC address no interface has: the far stack
drops them on arrival (not for this host), the Linux bridge floods them to its one other port.

CPU per delivered frame is summed over all CPUs, from /proc/stat (every non-idle jiffy: user,
nice, system, irq, softirq, steal) across the measuring window, so that work moved to a second
CPU (nmbridge's thread) or done in the generator's softirq (the Linux bridge) both count.  The
machine's background load is measured over ``--idle`` seconds before each round (no traffic)
and subtracted at its rate; on a busy machine both numbers are noisy.  For nmbridge the CPU
of its process alone (user + system, from /proc/PID/stat across the same window) per
delivered frame is printed too ("nmbridge process"): it includes the kernel's transmit path
and the far end's receive that the process's system calls run, not the receive work done in
the generator's softirq, and other load on the machine disturbs it less.  Needs root.

    python benchmarks/veth.py [--seconds 3] [--rounds 3] [--pin] [--bridges linux,afxdp]
                              [--options tx_ring=0] [--afxdp-options mode=skb] [--json]
                              [--workers 1,2] [--queues 2] [--flows 64]

``--pin`` runs trafgen on CPU 0 (for both bridges) and nmbridge's process on CPU 1 (its
workers on CPUs 1, 2, ...: on a 2-core machine the second worker shares CPU 0 with trafgen),
so the scheduler's placement (and other load moving between CPUs) varies less between rounds.

What the Mpps column measures.  One trafgen on one CPU is a generator of limited speed, and
by default the receive work of the bridge's ingress veth runs in that same CPU's softirq: the
Linux bridge forwards there in full, and an XDP program (afxdp:) runs there and copies each
frame into the UMEM.  When a bridge keeps up, delivered == generated and the figure is the
generator's rate, a lower bound of the bridge's, not its ceiling: such a round is marked
"generator-bound" (delivered >= 97 % of generated) and the summary says so.  To see a bridge's
own ceiling, ``--threaded-napi`` moves the ingress veth's receive work out of the generator's
softirq into a NAPI kernel thread (``/sys/class/net/IF/threaded``; veth has NAPI only with an
XDP program or GRO, so GRO is turned on for every bridge), applied equally to every bridge,
after it has started and undone after the round; with ``--pin`` that thread runs on CPU 1 with
nmbridge (trafgen keeps CPU 0 to itself).  The generator then offers more than it could when
it also did the bridge's receive work, and a bridge that is slower than the generator shows
drops: the ingress veth's receive ring (256 frames) fills and the generator's veth drops
(its tx dropped counter); the round then says "veth ring full: N dropped", its figure is the
bridge's ceiling, and it is not generator-bound.  (The 256 frames a full veth ring holds
are charged to trafgen's socket and exceed the default send buffer, which makes trafgen give
up on EAGAIN: with this option net.core.wmem_default is raised to 4 MiB while the benchmark
runs -- for every new socket of the machine -- and restored at the end.)  On this 2-CPU
machine there is no room for a second generator (each trafgen needs a CPU), and this kernel
has no pktgen.  ``--bridges none,...`` measures the generator's own ceiling: no bridge, the
frames end in the bridge namespace's stack (unknown ethertype: dropped at once); its
"generator" rate is the most any bridge can be shown to deliver here.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from typing import Any

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
if ROOT not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, ROOT)

from nmbridge import netns  # noqa: E402

# The nmbridge side: runs inside the bridge namespace until SIGTERM, then prints JSON.
CHILD = r"""
import json, os, resource, signal, sys, threading
from dataclasses import replace
from nmbridge import sched
from nmbridge.backends import OpenOptions, PortSet, backend, close_all, parse_spec
from nmbridge.config import BridgeConfig
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Region
left, right, burst, slots, opts, kind, settings, workers, cpus = sys.argv[1:10]
pairs = (kv.split("=") for kv in settings.split(",") if kv)
bridge = replace(BridgeConfig(), **{k: int(v) if v.lstrip("-").isdigit() else v for k, v in pairs})
got = []
burst, slots, workers = int(burst), int(slots), int(workers)
cpus = [int(c) for c in cpus.split(",") if c]
ps = PortSet(OpenOptions(slots=slots))
if workers == 1:
    a_s, b_s = ps.open([parse_spec(kind + ":" + left + opts), parse_spec(kind + ":" + right + opts)])
    a_s, b_s = [a_s], [b_s]
else:  # share w of left <-> share w of right, as a pair's workers
    be, o = backend(kind), OpenOptions(slots=slots)
    if not hasattr(be, "open_shares"):
        sys.exit(f"{kind}: this backend cannot open a port as several shares yet")
    region = Region(ports=2 * workers, slots=slots)
    a_s = be.open_shares(left + opts, o, region, workers)
    b_s = be.open_shares(right + opts, o, region, workers)
fwds = [Forwarder(a, b, burst=burst, poll_timeout_ms=100) for a, b in zip(a_s, b_s)]
done = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: done.set())
def work(i):  # as `nmbridge run` does: pinned, the thread's scheduling from [bridge], the loop
    if cpus:
        os.sched_setaffinity(0, {cpus[i % len(cpus)]})
    applied = sched.choose(bridge)
    got.append(applied.describe())
    fwds[i].spin_us = applied.spin_us
    fwds[i].run()
ts = [threading.Thread(target=work, args=(i,)) for i in range(workers)]
for t in ts:
    t.start()
print("ready", flush=True)
done.wait()
for f in fwds:
    f.stop()
for t in ts:
    t.join()
hwm = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:"))
ru = resource.getrusage(resource.RUSAGE_SELF)
print(json.dumps({"peak_rss_kib": hwm, "cpu_user_s": ru.ru_utime, "cpu_sys_s": ru.ru_stime,
                  "ctx_voluntary": ru.ru_nvcsw, "ctx_involuntary": ru.ru_nivcsw,
                  "forwarder": fwds[0].stats(), "polls": sum(f.polls for f in fwds),
                  "left_port": a_s[0].counters(), "right_port": b_s[0].counters(),
                  "workers": workers, "per_worker_frames": [f.stats()["a_to_b"]["frames"] for f in fwds],
                  "mode": a_s[0].info().get("mode"), "sched": got[0] if got else None}), flush=True)
if workers > 1:
    close_all(a_s + b_s)
ps.close()
"""


@dataclass
class Round:
    bridge: str
    frames: int
    seconds: float
    rate_pps: float
    generator_pps: float
    cpu_s: float = 0.0  # all CPUs across the window
    background_cpu_s: float = 0.0
    cpu_ns_per_frame: float = 0.0  # cpu_s per delivered frame
    net_cpu_ns_per_frame: float = 0.0  # background subtracted
    generator_bound: bool = False  # delivered ~ generated: the rate is the generator's
    extra: dict[str, Any] = field(default_factory=dict)


GENERATOR_BOUND = 0.97  # delivered / generated at or above this: the bridge kept up


def softnet_drops() -> int:
    """Frames dropped because a CPU's backlog queue was full (all CPUs, all namespaces)."""
    with open("/proc/net/softnet_stat") as f:
        return sum(int(line.split()[1], 16) for line in f)


def busy_jiffies() -> int:
    """Non-idle time of all CPUs (user, nice, system, irq, softirq, steal), in clock ticks."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


TICK = os.sysconf("SC_CLK_TCK")


def background_cpu(seconds: float) -> float:
    """CPU seconds per second the machine spends without our traffic (other work)."""
    if seconds <= 0:
        return 0.0
    j0, t0 = busy_jiffies(), time.monotonic()
    time.sleep(seconds)
    return (busy_jiffies() - j0) / TICK / (time.monotonic() - t0)


def tx_packets(lb: netns.Lab) -> int:
    return int(lb.link(lb.ns_left, lb.left_if)["stats64"]["tx"]["packets"])


def refused(lb: netns.Lab) -> int:
    """Frames the generator's veth dropped on transmit (its peer's receive ring was full)."""
    return int(lb.link(lb.ns_left, lb.left_if)["stats64"]["tx"]["dropped"])


def snapshot(lb: netns.Lab) -> tuple[int, int, int, float, int, int]:
    """Far-end rx packets, generator tx packets, backlog drops, time, busy CPU jiffies, frames
    the generator's veth dropped."""
    return (lb.rx_packets(lb.ns_right, lb.right_if), tx_packets(lb), softnet_drops(), time.monotonic(),
            busy_jiffies(), refused(lb))


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


@dataclass
class Window:
    frames: int  # delivered at the far end
    seconds: float
    generated: int
    backlog_drops: int
    cpu_s: float  # all CPUs, non-idle, across the window
    background_cpu_s: float  # the machine's background load at its pre-round rate, same window
    canary_share: float | None = None  # CPU share a spinning normal process got on the bridge's CPU
    refused: int = 0  # frames the generator's veth dropped: its peer's receive ring was full
    process_cpu_s: float = 0.0  # the nmbridge process alone, same window


def process_cpu(pid: int | None) -> float:
    """CPU seconds (user + system, all threads) process `pid` has used; 0 without one."""
    if pid is None:
        return 0.0
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / TICK  # utime, stime (fields 14, 15)


@contextmanager
def canary(cpu: str | None) -> Iterator[Callable[[], float | None]]:
    """A normal process spinning on `cpu` while the block runs; yields a function that gives
    the share of the CPU it got (None without a canary)."""
    if cpu is None:
        yield lambda: None
        return
    p = subprocess.Popen(["taskset", "-c", cpu, sys.executable, "-c", "while True: pass"])

    def cpu_ticks() -> int:
        with open(f"/proc/{p.pid}/stat") as f:
            v = f.read().rsplit(")", 1)[1].split()
        return int(v[11]) + int(v[12])  # utime, stime

    got: list[float] = []
    try:
        time.sleep(0.2)
        c0, t0 = cpu_ticks(), time.monotonic()
        yield lambda: got[0] if got else None
    finally:
        if p.poll() is None and not got:
            got.append((cpu_ticks() - c0) / TICK / (time.monotonic() - t0))
        p.kill()
        p.wait()



def measure(lb: netns.Lab, conf: str, warmup: float, seconds: float, cpu: str | None = None,
            idle: float = 1.0, pid: int | None = None, canary_cpu: str | None = None) -> Window:
    """Run trafgen in left; count frames arriving in right over `seconds` after `warmup`."""
    bg = background_cpu(idle)
    # trafgen forks its sender: it gets a process group of its own, and the whole group is
    # stopped -- a signal to the parent alone leaves the sender running into the next rounds
    gen = lb.popen(lb.ns_left, *pinned(cpu, "trafgen"), "-o", lb.left_if, "-i", conf, "--cpus", "1",
                   "--no-sock-mem", "--notouch-irq", "--no-cpu-stats",
                   stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        time.sleep(warmup)
        if gen.poll() is not None:
            raise SystemExit(f"trafgen exited: {gen.stderr.read().decode() if gen.stderr else ''}")
        with canary(canary_cpu) as share:
            c0 = process_cpu(pid)
            r0, g0, d0, t0, j0, q0 = snapshot(lb)
            time.sleep(seconds)
            r1, g1, d1, t1, j1, q1 = snapshot(lb)
            c1 = process_cpu(pid)
    finally:
        stop_group(gen)
    return Window(r1 - r0, t1 - t0, g1 - g0, d1 - d0, (j1 - j0) / TICK, bg * (t1 - t0), share(), q1 - q0,
                  c1 - c0)


def make_round(name: str, w: Window, extra: dict[str, Any]) -> Round:
    extra = dict(extra, backlog_drops=w.backlog_drops, canary_share=w.canary_share, refused=w.refused)
    if w.process_cpu_s and w.frames:
        extra["process_ns_per_frame"] = w.process_cpu_s / w.frames * 1e9
    net = max(0.0, w.cpu_s - w.background_cpu_s)
    return Round(name, w.frames, w.seconds, w.frames / w.seconds, w.generated / w.seconds,
                 cpu_s=w.cpu_s, background_cpu_s=w.background_cpu_s,
                 cpu_ns_per_frame=w.cpu_s / w.frames * 1e9 if w.frames else float("inf"),
                 net_cpu_ns_per_frame=net / w.frames * 1e9 if w.frames else float("inf"),
                 generator_bound=(w.generated > 0 and w.frames >= GENERATOR_BOUND * w.generated
                                  and w.refused == 0), extra=extra)


def w_refused(r: Round) -> int:
    return int(r.extra.get("refused", 0))


@contextmanager
def send_buffers(size: int | None) -> Iterator[None]:
    """net.core.wmem_default at least `size` bytes inside the block (None: unchanged)."""
    path = "/proc/sys/net/core/wmem_default"
    with open(path) as f:
        old = f.read().strip()
    if size is not None and int(old) < size:
        with open(path, "w") as f:
            f.write(str(size))
    try:
        yield
    finally:
        with open(path, "w") as f:
            f.write(old)


def napi_threads(ifname: str) -> list[int]:
    """Pids of the NAPI kernel threads of `ifname` (comm ``napi/IFNAME-ID``, cut to 15 bytes)."""
    want = ("napi/" + ifname + "-")[:15]
    out = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open(f"/proc/{pid}/comm") as f:
                    if f.read().strip().startswith(want):
                        out.append(int(pid))
            except OSError:
                pass
    return out


def threaded_napi(lb: netns.Lab, on: bool, cpu: str | None) -> None:
    """Turn threaded NAPI (and GRO, without which a veth has no NAPI unless XDP is attached) on
    or off on the bridge's ingress veth; pin its NAPI threads to `cpu`."""
    ifname = lb.bridge_left_if
    if on:
        lb.exec(lb.ns_bridge, "ethtool", "-K", ifname, "gro", "on")
    lb.exec(lb.ns_bridge, "sh", "-c", f"echo {int(on)} > /sys/class/net/{ifname}/threaded")
    if not on:
        lb.exec(lb.ns_bridge, "ethtool", "-K", ifname, "gro", "off")
    elif cpu is not None:
        for pid in napi_threads(ifname):
            subprocess.run(["taskset", "-p", "-c", cpu, str(pid)], check=True, stdout=subprocess.DEVNULL)


def run_linux(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    lb.ip(lb.ns_bridge, "link", "add", "name", "br0", "type", "bridge")
    # a plain bridge: no iptables for bridged IP frames (br_netfilter, when loaded, defaults
    # to calling them in every namespace; measured here: IPv4 frames fell to 24 kpps)
    for key in ("iptables", "ip6tables", "arptables"):
        if os.path.exists(f"/proc/sys/net/bridge/bridge-nf-call-{key}"):
            netns.write_sysctl(lb.ns_bridge, f"net.bridge.bridge-nf-call-{key}", "0")
    try:
        for ifname in (lb.bridge_left_if, lb.bridge_right_if):
            lb.ip(lb.ns_bridge, "link", "set", "dev", ifname, "master", "br0")
        lb.set_up(lb.ns_bridge, "br0")
        if args.threaded_napi:
            threaded_napi(lb, True, args.bridge_cpu)
        w = measure(lb, conf, args.warmup, args.seconds, args.gen_cpu, args.idle,
                    canary_cpu=args.bridge_cpu if args.canary else None)
    finally:
        if args.threaded_napi:
            threaded_napi(lb, False, None)
        lb.ip(lb.ns_bridge, "link", "del", "br0", check=False)
    return make_round("linux", w, {})


def worker_cpus(n: int) -> list[int]:
    """The CPUs of workers 0..n-1 when pinning: 1, 2, ... (wrapping over the machine's)."""
    ncpu = os.cpu_count() or 1
    return [(1 + i) % ncpu for i in range(n)]


def run_nmbridge(lb: netns.Lab, conf: str, args: argparse.Namespace, kind: str, workers: int = 1) -> Round:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    query = args.afxdp_options if kind == "afxdp" else args.options
    opts = "?" + query if query else ""
    cpus = worker_cpus(workers) if args.pin else [int(args.bridge_cpu)] * workers if args.bridge_cpu else []
    where = ",".join(map(str, sorted(set(cpus)))) if cpus else None
    child = lb.popen(lb.ns_bridge, *pinned(where, sys.executable), "-c", CHILD, lb.bridge_left_if,
                     lb.bridge_right_if, str(args.burst), str(args.slots), opts, kind, args.sched,
                     str(workers), ",".join(map(str, cpus)),
                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        assert child.stdout is not None
        line = child.stdout.readline()
        if line.strip() != "ready":
            child.wait(5)
            err = child.stderr.read() if child.stderr else ""
            raise SystemExit(f"nmbridge did not start: {err.strip().splitlines()[-1:] or line}")
        if args.threaded_napi:
            threaded_napi(lb, True, args.bridge_cpu)
        w = measure(lb, conf, args.warmup, args.seconds, args.gen_cpu, args.idle, child.pid,
                    args.bridge_cpu if args.canary else None)
    finally:
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=20)
        if args.threaded_napi:
            threaded_napi(lb, False, None)
    if child.returncode != 0:
        raise SystemExit(f"nmbridge ({kind}, {workers} worker(s)) failed: {err.strip()}")
    return make_round(label(kind, workers), w, json.loads(out.strip().splitlines()[-1]))


def trafgen_conf(lb: netns.Lab, directory: str, flows: int = 1) -> str:
    """One 60-byte frame (flows == 1: ethertype 0x88b5, to right's MAC address), or IPv4/UDP
    frames in `flows` flows (the UDP source port's low byte counts 0 .. flows-1) to a MAC
    address no interface has, so that right's stack drops them at once (the frame is for
    another host; the header is valid, for the bridge netfilter of a Linux bridge)."""
    dst = lb.mac(lb.ns_right, lb.right_if)
    src = lb.mac(lb.ns_left, lb.left_if)
    if flows <= 1:
        body = [f"0x{b:02x}" for b in dst + src + bytes.fromhex("88b5") + bytes(46)]  # 60 bytes
    else:
        ip = bytes.fromhex("4500002e00000000401100000a4d00010a4d0002")  # 10.77.0.1 -> 10.77.0.2
        ip = ip[:10] + netns.inet_checksum(ip).to_bytes(2, "big") + ip[12:]
        other = bytes.fromhex("02000000a77e")  # locally administered, no interface's
        head = [f"0x{b:02x}" for b in other + src + bytes.fromhex("0800") + ip + bytes([0x9C])]
        tail = [f"0x{b:02x}" for b in bytes.fromhex("0009001a0000") + bytes(18)]  # dport 9, len 26
        body = [*head, f"dinc(0, {flows - 1})", *tail]  # source port 0x9c00 + flow
    path = os.path.join(directory, "frame.cfg")
    with open(path, "w") as f:
        f.write("{ " + ", ".join(body) + " }\n")
    return path


BRIDGES = ("linux", "afpacket", "afxdp")
KNOWN = (*BRIDGES, "none")  # none: the generator alone


def run_none(lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    """No bridge: what the generator alone sends (the frames die in the bridge namespace)."""
    if args.threaded_napi:
        threaded_napi(lb, True, args.bridge_cpu)
    try:
        w = measure(lb, conf, args.warmup, args.seconds, args.gen_cpu, args.idle)
    finally:
        if args.threaded_napi:
            threaded_napi(lb, False, None)
    return make_round("none", w, {})


def label(kind: str, workers: int) -> str:
    """A bridge's name in the results: ``afpacket`` (one worker), ``afpacket-w2`` (two)."""
    return kind if workers == 1 else f"{kind}-w{workers}"


def run_one(name: str, lb: netns.Lab, conf: str, args: argparse.Namespace) -> Round:
    if name == "none":
        return run_none(lb, conf, args)
    if name == "linux":
        return run_linux(lb, conf, args)
    kind, _, w = name.partition("-w")
    return run_nmbridge(lb, conf, args, kind, int(w or 1))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=3.0, help="measuring window per round")
    ap.add_argument("--warmup", type=float, default=1.0, help="seconds before the window opens")
    ap.add_argument("--idle", type=float, default=1.0,
                    help="seconds of background-load measurement before each round (0: none)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds per bridge, alternating")
    ap.add_argument("--bridges", default=",".join(BRIDGES),
                    help="linux, afpacket, afxdp to run, comma-separated (none: the generator alone)")
    ap.add_argument("--burst", type=int, default=256, help="nmbridge forwarder burst")
    ap.add_argument("--slots", type=int, default=1024, help="nmbridge ring slots")
    ap.add_argument("--options", default="", help="afpacket port options, e.g. tx_ring=0&blocks=128")
    ap.add_argument("--afxdp-options", default="", help="afxdp port options, e.g. mode=skb")
    ap.add_argument("--sched", default="", metavar="KEY=VALUE,...",
                    help="nmbridge's [bridge] scheduling keys (sched, rt_priority, sched_slice_us) when "
                         "not its defaults, e.g. sched=other,sched_slice_us=0 (the kernel's defaults)")
    ap.add_argument("--pin", action="store_true",
                    help="trafgen on CPU 0 (for every bridge), nmbridge's process on CPU 1")
    ap.add_argument("--one-cpu", action="store_true",
                    help="trafgen and nmbridge both on CPU 0: what a 1-CPU machine would do")
    ap.add_argument("--canary", action="store_true",
                    help="a normal (SCHED_OTHER) process spinning on the bridge's CPU (CPU 1, or 0 with "
                         "--one-cpu) during the window: the share of CPU it got says what is left "
                         "to the rest of the machine")
    ap.add_argument("--workers", default="1",
                    help="worker counts for each nmbridge bridge, e.g. 1,2 (N > 1: ports opened as N shares)")
    ap.add_argument("--queues", type=int, default=None,
                    help="TX and RX queues of every veth (default: the kernel's, one in use)")
    ap.add_argument("--flows", type=int, default=None,
                    help="IPv4/UDP flows the generator spreads its frames over "
                         "(default 1 with one worker: 0x88b5 frames; 64 with more)")
    ap.add_argument("--threaded-napi", action="store_true",
                    help="receive work of the bridge's ingress veth in a NAPI thread, not in the "
                         "generator's softirq (every bridge; see the docstring)")
    ap.add_argument("--json", action="store_true", help="print one JSON object")
    args = ap.parse_args()
    if args.canary and not (args.pin or args.one_cpu):
        args.pin = True
    args.gen_cpu, args.bridge_cpu = ("0", "1") if args.pin else ("0", "0") if args.one_cpu else (None, None)
    kinds = [b.strip() for b in args.bridges.split(",") if b.strip()]
    bad = [b for b in kinds if b not in KNOWN]
    if bad or not kinds:
        print(f"--bridges: unknown {', '.join(bad) or '(none)'}; use {', '.join(KNOWN)}", file=sys.stderr)
        return 2
    try:
        counts = sorted({int(x) for x in args.workers.split(",") if x.strip()})
    except ValueError:
        counts = []
    if not counts or counts[0] < 1 or counts[-1] > 64:
        print(f"--workers {args.workers!r}: worker counts from 1 to 64, comma-separated", file=sys.stderr)
        return 2
    if args.queues is not None and not 1 <= args.queues <= 64:
        print(f"--queues {args.queues}: from 1 to 64", file=sys.stderr)
        return 2
    flows = args.flows if args.flows is not None else (64 if counts[-1] > 1 else 1)
    if not 1 <= flows <= 256:
        print(f"--flows {flows}: from 1 to 256", file=sys.stderr)
        return 2
    names = [k if k in ("linux", "none") else label(k, n) for k in kinds
             for n in ([1] if k in ("linux", "none") else counts)]
    if os.geteuid() != 0:
        print("veth.py needs root (network namespaces, veth, AF_PACKET, AF_XDP)", file=sys.stderr)
        return 1
    rounds: list[Round] = []
    with (netns.lab(queues=args.queues) as lb, tempfile.TemporaryDirectory() as tmp,
          send_buffers(4 << 20 if args.threaded_napi else None)):
        conf = trafgen_conf(lb, tmp, flows)
        for i in range(args.rounds):
            k = i % len(names)
            for name in names[k:] + names[:k]:  # the order rotates each round
                r = run_one(name, lb, conf, args)
                rounds.append(r)
                if not args.json:
                    print(f"round {i + 1} {r.bridge:12} {r.rate_pps / 1e6:7.3f} Mpps delivered "
                          f"(generator {r.generator_pps / 1e6:.3f} Mpps), "
                          f"CPU {r.cpu_ns_per_frame:7.0f} ns/frame "
                          f"({r.net_cpu_ns_per_frame:.0f} less background)"
                          f"{', generator-bound' if r.generator_bound else ''}"
                          f"{f', veth ring full: {w_refused(r)} dropped' if w_refused(r) else ''}"
                          + (f", canary got {r.extra['canary_share']:.0%} of CPU {args.bridge_cpu}"
                             if r.extra.get("canary_share") is not None else ""), flush=True)
    per: dict[str, dict[str, Any]] = {}
    for name in names:
        rs = [r for r in rounds if r.bridge == name]
        per[name] = {
            "pps": statistics.median(r.rate_pps for r in rs),
            "pps_all": sorted(r.rate_pps for r in rs),
            "cpu_ns_per_frame": statistics.median(r.cpu_ns_per_frame for r in rs),
            "net_cpu_ns_per_frame": statistics.median(r.net_cpu_ns_per_frame for r in rs),
            "generator_bound_rounds": sum(r.generator_bound for r in rs),
        }
        if name not in ("linux", "none"):
            per[name]["process_ns_per_frame"] = statistics.median(
                r.extra.get("process_ns_per_frame", float("inf")) for r in rs)
        if name == "none":
            per[name]["generator_pps"] = statistics.median(r.generator_pps for r in rs)
        elif name != "linux":
            per[name]["peak_rss_mib"] = max(int(r.extra["peak_rss_kib"]) for r in rs) / 1024
            per[name]["mode"] = rs[-1].extra.get("mode")
            per[name]["sched"] = rs[-1].extra.get("sched")

    def ratio(a: str, b: str) -> float | None:
        if a in per and b in per and per[b]["pps"]:
            return float(per[a]["pps"] / per[b]["pps"])
        return None

    summary: dict[str, Any] = {
        "frame_bytes": 60,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "pinned": args.pin,
        "threaded_napi": args.threaded_napi,
        "options": args.options,
        "afxdp_options": args.afxdp_options,
        "sched": args.sched,
        "workers": counts,
        "queues": args.queues,
        "flows": flows,
        "bridges": per,
        "ratios": {"afxdp/linux": ratio("afxdp", "linux"), "afxdp/afpacket": ratio("afxdp", "afpacket"),
                   "afpacket/linux": ratio("afpacket", "linux")},
        "runs": [asdict(r) for r in rounds],
    }
    # kept for readers of the earlier output (afpacket against the Linux bridge)
    if "afpacket" in per and "linux" in per:
        summary.update(nmbridge_pps=per["afpacket"]["pps"], linux_bridge_pps=per["linux"]["pps"],
                       ratio=ratio("afpacket", "linux"),
                       nmbridge_peak_rss_mib=per["afpacket"]["peak_rss_mib"])
    for kind in ("afpacket", "afxdp"):  # scaling: N workers against one, same run
        for n in counts[1:]:
            summary["ratios"][f"{label(kind, n)}/{kind}"] = ratio(label(kind, n), kind)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    for name, p in per.items():
        lo, hi = min(p["pps_all"]), max(p["pps_all"])
        if name == "none":
            print(f"{'no bridge (generator)':34} {p['generator_pps'] / 1e6:7.3f} Mpps generated (median)")
            continue
        kind, _, w = name.partition("-w")
        text = {"linux": "Linux bridge", "afpacket": "nmbridge afpacket", "afxdp": "nmbridge afxdp"}[kind]
        text += f" x{w} workers" if w else ""
        if p.get("mode"):
            text += f" ({p['mode']})"
        rss = f", peak RSS {p['peak_rss_mib']:.1f} MiB" if "peak_rss_mib" in p else ""
        if "process_ns_per_frame" in p:
            rss += f", nmbridge process {p['process_ns_per_frame']:.0f} ns/frame"
        print(f"{text:34} {p['pps'] / 1e6:7.3f} Mpps median (rounds {lo / 1e6:.3f} .. {hi / 1e6:.3f}), "
              f"CPU {p['cpu_ns_per_frame']:.0f} ns/frame "
              f"({p['net_cpu_ns_per_frame']:.0f} less background){rss}")
    for key, v in summary["ratios"].items():
        if v is not None:
            print(f"ratio {key:15} {v:7.3f}")
    bound = [n for n, p in per.items() if p["generator_bound_rounds"] and n != "none"]
    if bound:
        print(f"generator-bound (delivered >= {GENERATOR_BOUND:.0%} of generated) in some rounds: "
              f"{', '.join(bound)}: their Mpps is the generator's rate, a lower bound of the bridge's, "
              f"and ratios between such bridges say nothing about the bridges"
              f"{'' if args.threaded_napi else ' (try --threaded-napi --pin)'}")
    for name in [n for n in names if n not in ("linux", "none")]:
        rs = [r for r in rounds if r.bridge == name]
        if not rs:
            continue
        last = rs[-1].extra
        print(f"last {name} round: process cpu {last['cpu_user_s']:.2f}s user + "
              f"{last['cpu_sys_s']:.2f}s sys, "
              f"polls {last['polls']}, context switches {last['ctx_voluntary']} voluntary / "
              f"{last['ctx_involuntary']} involuntary; forwarding thread {last.get('sched')}")
        if name == "afxdp":
            c = last["left_port"]
            t = last["right_port"]
            print(f"last afxdp round: rxsyncs {c['rxsyncs']}, rx_fill_empty {c['rx_fill_empty']}, "
                  f"rx_ring_full {c['rx_ring_full']}; tx side: txsyncs {t['txsyncs']}, "
                  f"tx_kicks {t['tx_kicks']}, tx_again {t['tx_again']}, busy_polls {c.get('busy_polls', 0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
