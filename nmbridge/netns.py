"""Throw-away network namespace labs: ``left`` -- ``bridge`` -- ``right``.

::

    [left ns] left_if ==veth== bridge_left_if [bridge ns] bridge_right_if ==veth== right_if [right ns]
              10.77.0.1/24     (no address)                (no address)               10.77.0.2/24

Used by ``nmbridge demo``, the end-to-end tests and ``benchmarks/veth.py``.  Every lab gets a
unique name prefix (``nmb`` + 5 hex digits, checked free before use), used for its namespaces
and its interfaces, so parallel runs and leftovers of killed runs never collide.  :func:`lab`
is a context manager that always tears everything down (deleting a namespace deletes its
veths); :func:`new_lab`, :func:`build` and :func:`destroy` are its steps, for a caller that
may keep a lab up.  The left and right veths keep the Linux defaults (TSO/GSO on: their
kernel stacks hand the bridge GSO super-frames, as containers' stacks do); ``offloads=False``
turns TSO and GSO off there, so each packet is one wire-sized frame.  Needs root and ``ip``
(iproute2).

Code can run *inside* a namespace without a subprocess: :func:`in_netns` runs a function in a
short-lived thread that has entered the namespace (``setns`` affects only that thread), and
:func:`netns_socket` creates a socket there -- a socket stays in the namespace it was created
in, so the rest of the program can use it from any thread.  The same holds for nmbridge's
ports: open them through :func:`in_netns` and forward from anywhere.  :func:`ping` sends ICMP
echo requests from a namespace's own stack (no ``ping`` binary needed).

Example::

    with lab() as lb:
        print(ping(lb.ns_left, lb.right_ip))
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import select
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from nmbridge.errors import NmbridgeError

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
PREFIX_BASE = "nmb"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(NmbridgeError, RuntimeError):
    """An ``ip`` command, an offload switch or a namespace switch failed."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise NetnsError with its stderr when it fails."""
    try:
        p = subprocess.run(list(args), capture_output=True, text=True)
    except FileNotFoundError:
        raise NetnsError(f"{args[0]}: command not found (install iproute2)") from None
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {p.stderr.strip() or f'exit status {p.returncode}'}")
    return p


def _names_taken(prefix: str) -> bool:
    """Whether a namespace or an interface of this namespace already starts with `prefix`."""
    for d in (NETNS_DIR, "/sys/class/net"):
        try:
            if any(n.startswith(prefix + "-") for n in os.listdir(d)):
                return True
        except FileNotFoundError:
            pass
    return False


def unique_prefix() -> str:
    """``nmb`` + 5 random hex digits (short enough for 15-byte interface names) that no
    namespace and no interface here uses yet."""
    while True:
        p = PREFIX_BASE + secrets.token_hex(3)[:5]
        if not _names_taken(p):
            return p


def in_netns(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` in a fresh thread inside namespace `ns`; return its result.

    The calling thread never changes namespace; exceptions propagate.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            try:
                fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                raise NetnsError(f"netns {ns}: no such network namespace") from None
            try:
                if _libc.setns(fd, CLONE_NEWNET) != 0:
                    e = ctypes.get_errno()
                    raise NetnsError(f"setns({ns}): {os.strerror(e)}")
            finally:
                os.close(fd)
            result.append(fn(*args, **kwargs))
        except BaseException as e:
            error.append(e)

    t = threading.Thread(target=body, name=f"netns-{ns}", daemon=True)
    t.start()
    t.join()
    if error:
        raise error[0]
    return result[0]  # type: ignore[no-any-return]


def netns_socket(ns: str, family: int, type_: int, proto: int = 0) -> socket.socket:
    """A socket created inside namespace `ns` (usable from any thread afterwards)."""
    return in_netns(ns, socket.socket, family, type_, proto)


def write_sysctl(ns: str, key: str, value: str) -> None:
    """Set a per-namespace sysctl (``net.ipv6.conf.all.disable_ipv6``) inside `ns`."""

    def body() -> None:
        with open("/proc/sys/" + key.replace(".", "/"), "w") as f:
            f.write(value)

    in_netns(ns, body)


def _is_segmentation(feature: str) -> bool:
    """``ethtool -K tso`` (every tx-tcp*-segmentation), ``gso`` and UDP segmentation."""
    return feature in ("tx-generic-segmentation", "tx-udp-segmentation") or (
        feature.startswith("tx-tcp") and feature.endswith("-segmentation"))


def _ethtool(ns: str) -> Any:
    """pyroute2's ethtool ioctl layer, its socket opened inside `ns` (untyped: Any)."""
    from pyroute2.ethtool.ioctl import IoctlEthtool

    return in_netns(ns, IoctlEthtool)


def segmentation_offloads(ns: str, ifname: str) -> dict[str, bool]:
    """The TSO/GSO/UDP-segmentation features of an interface in `ns`: name -> on."""
    eth = _ethtool(ns)
    try:
        eth.change_ifname(ifname)
        return {str(n): bool(on) for n, on, _avail, _i, _b in eth.get_features() if _is_segmentation(str(n))}
    finally:
        eth.close()


def set_segmentation_offloads(ns: str, ifname: str, on: bool) -> None:
    """``ethtool -K IFNAME tso on|off gso on|off`` (and UDP segmentation) inside `ns`,
    checked by reading back: a feature the driver will not change is an error."""
    eth = _ethtool(ns)
    try:
        eth.change_ifname(ifname)
        fl = eth.get_features()
        for name, _on, avail, _i, _b in list(fl):
            if _is_segmentation(str(name)) and avail:
                fl[name] = on
        try:
            eth.set_features(fl)
        except Exception as e:  # ETHTOOL_F_WISH & co come back as NotSupportedError: re-read
            if type(e).__name__ != "NotSupportedError":
                raise NetnsError(f"{ifname}: cannot switch segmentation offloads: {e}") from None
    finally:
        eth.close()
    wrong = sorted(n for n, v in segmentation_offloads(ns, ifname).items() if v != on)
    if wrong:
        raise NetnsError(f"{ifname}: {', '.join(wrong)} stay{'s' if len(wrong) == 1 else ''} "
                         f"{'off' if on else 'on'}")


@dataclass(frozen=True)
class Lab:
    """Names and addresses of one lab; methods run things in its namespaces."""

    prefix: str
    ns_left: str
    ns_bridge: str
    ns_right: str
    left_if: str  # in ns_left, peer of bridge_left_if
    bridge_left_if: str  # in ns_bridge
    bridge_right_if: str  # in ns_bridge
    right_if: str  # in ns_right, peer of bridge_right_if
    left_ip: str
    right_ip: str
    plen: int
    mtu: int
    queues: int = 1  # receive and transmit queues of each veth end

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.ns_left, self.ns_bridge, self.ns_right)

    @property
    def interfaces(self) -> tuple[str, str, str, str]:
        return (self.left_if, self.bridge_left_if, self.bridge_right_if, self.right_if)

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NS ARGS...``."""
        return run("ip", "-n", ns, *args, check=check)

    def exec(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside `ns` (``ip netns exec``) and wait for it."""
        return run("ip", "netns", "exec", ns, *cmd, check=check)

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside `ns`; the caller waits for it (or kills it).  ``ip netns
        exec`` execs the command, so the process is the command itself (signals reach it)."""
        return subprocess.Popen(["ip", "netns", "exec", ns, *cmd], **kwargs)

    def link(self, ns: str, ifname: str) -> dict[str, Any]:
        """``ip -d -s -j link show`` of one interface, as a dict (flags, promiscuity, stats64...)."""
        out = self.ip(ns, "-d", "-s", "-j", "link", "show", "dev", ifname).stdout
        return json.loads(out)[0]  # type: ignore[no-any-return]

    def mac(self, ns: str, ifname: str) -> bytes:
        return bytes.fromhex(self.link(ns, ifname)["address"].replace(":", ""))

    def rx_packets(self, ns: str, ifname: str) -> int:
        """The interface's rx packet counter."""
        return int(self.link(ns, ifname)["stats64"]["rx"]["packets"])

    def set_up(self, ns: str, ifname: str, up: bool = True) -> None:
        self.ip(ns, "link", "set", "dev", ifname, "up" if up else "down")

    def leftovers(self) -> list[str]:
        """What of this lab still exists: namespaces, and veths in this namespace."""
        out = [ns for ns in self.namespaces if os.path.exists(os.path.join(NETNS_DIR, ns))]
        out += [i for i in self.interfaces if os.path.exists(f"/sys/class/net/{i}")]
        return out

    def pids(self) -> list[int]:
        """Processes running in the lab's namespaces (``ip netns pids``)."""
        found: list[int] = []
        for ns in self.namespaces:
            p = run("ip", "netns", "pids", ns, check=False)
            found += [int(x) for x in p.stdout.split() if x.isdigit()]
        return found


def new_lab(prefix: str | None = None, *, mtu: int = 1500, left_ip: str = "10.77.0.1",
            right_ip: str = "10.77.0.2", plen: int = 24, queues: int = 1) -> Lab:
    """The names of a new lab (nothing is created yet); `queues`: receive and transmit queues
    of every veth end (``numrxqueues``/``numtxqueues``)."""
    p = prefix or unique_prefix()
    return Lab(prefix=p, ns_left=f"{p}-left", ns_bridge=f"{p}-bridge", ns_right=f"{p}-right",
               left_if=f"{p}-l", bridge_left_if=f"{p}-bl", bridge_right_if=f"{p}-br", right_if=f"{p}-r",
               left_ip=left_ip, right_ip=right_ip, plen=plen, mtu=mtu, queues=queues)


def build(lb: Lab, *, ipv6: bool = False, offloads: bool = True) -> None:
    """Create the lab's namespaces and veths (up, with its MTU); addresses on left and right
    only.  IPv6 is off in all three namespaces unless `ipv6` (so the lab is silent until
    someone sends something); TSO/GSO off on the left and right veths when not `offloads`;
    every veth end gets ``lb.queues`` TX and RX queues (``numtxqueues Q numrxqueues Q``; 1:
    the kernel's default).
    On failure the caller destroys what was made (:func:`lab` does)."""
    for ns in lb.namespaces:
        run("ip", "netns", "add", ns)
        if not ipv6:
            write_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
            write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
    # create each pair here, then move the ends (creating them in place can fail: EEXIST)
    mtu = str(lb.mtu)
    qs = ("numtxqueues", str(lb.queues), "numrxqueues", str(lb.queues)) if lb.queues > 1 else ()
    for a, a_ns, b, b_ns in ((lb.left_if, lb.ns_left, lb.bridge_left_if, lb.ns_bridge),
                             (lb.right_if, lb.ns_right, lb.bridge_right_if, lb.ns_bridge)):
        run("ip", "link", "add", a, *qs, "mtu", mtu, "type", "veth", "peer", "name", b, *qs, "mtu", mtu)
        run("ip", "link", "set", "dev", a, "netns", a_ns)
        run("ip", "link", "set", "dev", b, "netns", b_ns)
    lb.ip(lb.ns_left, "addr", "add", f"{lb.left_ip}/{lb.plen}", "dev", lb.left_if)
    lb.ip(lb.ns_right, "addr", "add", f"{lb.right_ip}/{lb.plen}", "dev", lb.right_if)
    if not offloads:
        set_segmentation_offloads(lb.ns_left, lb.left_if, False)
        set_segmentation_offloads(lb.ns_right, lb.right_if, False)
    for ns, ifname in ((lb.ns_left, lb.left_if), (lb.ns_bridge, lb.bridge_left_if),
                       (lb.ns_bridge, lb.bridge_right_if), (lb.ns_right, lb.right_if)):
        lb.set_up(ns, ifname)


@contextmanager
def lab(prefix: str | None = None, *, mtu: int = 1500, ipv6: bool = False, offloads: bool = True,
        left_ip: str = "10.77.0.1", right_ip: str = "10.77.0.2", plen: int = 24,
        queues: int | None = None) -> Iterator[Lab]:
    """Build a left -- bridge -- right lab (see :func:`build`; `queues` per veth end, None:
    the kernel's default); yield its :class:`Lab`; always tear it down."""
    lb = new_lab(prefix, mtu=mtu, left_ip=left_ip, right_ip=right_ip, plen=plen, queues=queues or 1)
    try:
        build(lb, ipv6=ipv6, offloads=offloads)
        yield lb
    finally:
        destroy(lb)


def destroy(lb: Lab) -> list[str]:
    """Delete the lab's namespaces (and with them its veths) and any veth left in this one;
    return what could not be removed (empty when all is gone).  Processes still inside a
    namespace keep it alive: stop them first (:meth:`Lab.pids`)."""
    for ns in lb.namespaces:
        run("ip", "netns", "del", ns, check=False)
    for ifname in lb.interfaces:
        if os.path.exists(f"/sys/class/net/{ifname}"):
            run("ip", "link", "del", ifname, check=False)
    return lb.leftovers()


def stale_namespaces() -> list[str]:
    """Namespaces that look like this module's (``nmb`` + 5 hex digits + ``-left`` ...)."""
    try:
        names = os.listdir(NETNS_DIR)
    except FileNotFoundError:
        return []
    out = []
    for n in names:
        base, _, role = n.partition("-")
        if (role in ("left", "bridge", "right") and len(base) == len(PREFIX_BASE) + 5
                and base.startswith(PREFIX_BASE)):
            out.append(n)
    return sorted(out)


# --- ICMP echo from a namespace's own stack ------------------------------------------------


def inet_checksum(data: bytes) -> int:
    """The Internet checksum (RFC 1071)."""
    if len(data) % 2:
        data += b"\0"
    s: int = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while s >> 16:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def ping(ns: str, dst: str, count: int = 3, timeout: float = 2.0,
         on_reply: Callable[[int, float | None], None] | None = None) -> list[float | None]:
    """Send `count` ICMP echo requests from namespace `ns` to `dst`, one after the other
    (ARP included); return each one's round-trip time in seconds, None where no reply came
    within `timeout`.  `on_reply(seq, rtt)` is called as each one completes.  Uses a raw
    ICMP socket (root), so no ``ping`` binary and no ``ping_group_range`` are needed."""
    s = netns_socket(ns, socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP)
    ident = secrets.randbits(16)
    rtts: list[float | None] = []
    try:
        for seq in range(count):
            payload = secrets.token_bytes(32)
            csum = inet_checksum(struct.pack("!BBHHH", 8, 0, 0, ident, seq) + payload)
            t0 = time.monotonic()
            s.sendto(struct.pack("!BBHHH", 8, 0, csum, ident, seq) + payload, (dst, 0))
            rtt: float | None = None
            deadline = t0 + timeout
            while rtt is None and (left := deadline - time.monotonic()) > 0:
                if not select.select([s], [], [], left)[0]:
                    break
                pkt = s.recv(2048)
                now = time.monotonic()
                ihl = (pkt[0] & 15) * 4
                if len(pkt) < ihl + 8:
                    continue
                typ, _, _, rid, rseq = struct.unpack_from("!BBHHH", pkt, ihl)
                if typ == 0 and rid == ident and rseq == seq and pkt[ihl + 8:] == payload:
                    rtt = now - t0
            rtts.append(rtt)
            if on_reply is not None:
                on_reply(seq, rtt)
    finally:
        s.close()
    return rtts
