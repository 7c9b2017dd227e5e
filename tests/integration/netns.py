"""Throw-away network namespace labs: ``left`` -- ``bridge`` -- ``right``.

::

    [left ns] left_if ==veth== bridge_left_if [bridge ns] bridge_right_if ==veth== right_if [right ns]
              10.77.0.1/24     (no address)                (no address)               10.77.0.2/24

Every lab gets a unique name prefix (``nmb`` + 5 hex digits), used for its namespaces and its
interfaces, so parallel runs and leftovers of killed runs never collide.  :func:`lab` is a
context manager that always tears everything down (deleting a namespace deletes its veths).
Needs root and ``ip`` (iproute2).

Code can run *inside* a namespace without a subprocess: :func:`in_netns` runs a function in a
short-lived thread that has entered the namespace (``setns`` affects only that thread), and
:func:`netns_socket` creates a socket there -- a socket stays in the namespace it was created
in, so the rest of the program can use it from any thread.  The same holds for nmbridge's
ports: open them through :func:`in_netns` and forward from anywhere.

Example::

    with lab() as lb:
        lb.exec(lb.ns_left, "ping", "-c", "1", lb.right_ip)
"""

from __future__ import annotations

import ctypes
import json
import os
import secrets
import socket
import subprocess
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

T = TypeVar("T")

CLONE_NEWNET = 0x40000000
NETNS_DIR = "/run/netns"
PREFIX_BASE = "nmb"

_libc = ctypes.CDLL(None, use_errno=True)


class NetnsError(RuntimeError):
    """An ``ip`` command or a namespace switch failed."""


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command, capturing output; raise NetnsError with its stderr when it fails."""
    p = subprocess.run(list(args), capture_output=True, text=True)
    if check and p.returncode != 0:
        raise NetnsError(f"{' '.join(args)}: {p.stderr.strip() or f'exit status {p.returncode}'}")
    return p


def unique_prefix() -> str:
    """``nmb`` + 5 random hex digits: short enough for 15-byte interface names."""
    return PREFIX_BASE + secrets.token_hex(3)[:5]


def in_netns(ns: str, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """Call ``fn(*args, **kwargs)`` in a fresh thread inside namespace `ns`; return its result.

    The calling thread never changes namespace; exceptions propagate.
    """
    result: list[Any] = []
    error: list[BaseException] = []

    def body() -> None:
        try:
            fd = os.open(os.path.join(NETNS_DIR, ns), os.O_RDONLY | os.O_CLOEXEC)
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
    mtu: int

    @property
    def namespaces(self) -> tuple[str, str, str]:
        return (self.ns_left, self.ns_bridge, self.ns_right)

    def ip(self, ns: str, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """``ip -n NS ARGS...``."""
        return run("ip", "-n", ns, *args, check=check)

    def exec(self, ns: str, *cmd: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        """Run a command inside `ns` (``ip netns exec``) and wait for it."""
        return run("ip", "netns", "exec", ns, *cmd, check=check)

    def popen(self, ns: str, *cmd: str, **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command inside `ns`; the caller waits for it (or kills it)."""
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


@contextmanager
def lab(prefix: str | None = None, *, mtu: int = 1500, ipv6: bool = False,
        left_ip: str = "10.77.0.1", right_ip: str = "10.77.0.2", plen: int = 24) -> Iterator[Lab]:
    """Build a left -- bridge -- right lab; yield its :class:`Lab`; always tear it down.

    Interfaces are up, with `mtu`; IPv6 is off in all three namespaces unless `ipv6` (so the
    lab is silent until a test sends something); the bridge namespace has no addresses.
    """
    p = prefix or unique_prefix()
    lb = Lab(prefix=p, ns_left=f"{p}-left", ns_bridge=f"{p}-bridge", ns_right=f"{p}-right",
             left_if=f"{p}-l", bridge_left_if=f"{p}-bl", bridge_right_if=f"{p}-br", right_if=f"{p}-r",
             left_ip=left_ip, right_ip=right_ip, mtu=mtu)
    try:
        for ns in lb.namespaces:
            run("ip", "netns", "add", ns)
            if not ipv6:
                write_sysctl(ns, "net.ipv6.conf.all.disable_ipv6", "1")
                write_sysctl(ns, "net.ipv6.conf.default.disable_ipv6", "1")
        # create each pair here, then move the ends (creating them in place can fail: EEXIST)
        for a, a_ns, b, b_ns in ((lb.left_if, lb.ns_left, lb.bridge_left_if, lb.ns_bridge),
                                 (lb.right_if, lb.ns_right, lb.bridge_right_if, lb.ns_bridge)):
            run("ip", "link", "add", a, "mtu", str(mtu), "type", "veth", "peer", "name", b, "mtu", str(mtu))
            run("ip", "link", "set", "dev", a, "netns", a_ns)
            run("ip", "link", "set", "dev", b, "netns", b_ns)
        lb.ip(lb.ns_left, "addr", "add", f"{left_ip}/{plen}", "dev", lb.left_if)
        lb.ip(lb.ns_right, "addr", "add", f"{right_ip}/{plen}", "dev", lb.right_if)
        for ns, ifname in ((lb.ns_left, lb.left_if), (lb.ns_bridge, lb.bridge_left_if),
                           (lb.ns_bridge, lb.bridge_right_if), (lb.ns_right, lb.right_if)):
            lb.set_up(ns, ifname)
        yield lb
    finally:
        destroy(lb)


def destroy(lb: Lab) -> None:
    """Delete the lab's namespaces (and with them its veths) and any veth left in this one."""
    for ns in lb.namespaces:
        run("ip", "netns", "del", ns, check=False)
    for ifname in (lb.left_if, lb.bridge_left_if, lb.bridge_right_if, lb.right_if):
        if os.path.exists(f"/sys/class/net/{ifname}"):
            run("ip", "link", "del", ifname, check=False)


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
