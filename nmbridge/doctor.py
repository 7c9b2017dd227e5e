"""``nmbridge doctor -c FILE``: check every interface of every port, change nothing.

For each port: the backend is available here; for each interface behind a port: it exists,
is up, is promiscuous, has none of the frame-merging/splitting offloads on that its port's
backend needs off (those ``nmbridge run`` turns off: :func:`nmbridge.links.port_offloads`),
its MTU fits the buffer size and matches the other side of its pair; for ``netmap:`` ports,
whether netmap will run the interface natively or through its emulated adapter (a heuristic,
see :func:`netmap_mode`); per pair, its workers, the ring pairs of each port each one owns and
its CPU, and a warning when an interface's RSS spreads its traffic over more receive queues
than the pair has workers (:func:`worker_findings`).  Each problem is printed with the
command that fixes it.

Exit status: 0 when nothing needs fixing, 1 otherwise.  Things ``nmbridge run`` sets itself
(link set-up on) are printed as notes and do not fail the check.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Protocol, TextIO, cast

from nmbridge.backends import PortSpec, backend
from nmbridge.links import (
    CHAINING_BACKENDS,
    Finding,
    LinkState,
    check_mtu,
    check_state,
    lookup_links,
    port_offloads,
)

# Drivers that netmap ships native support for (its LINUX/ patches and in-tree adapters).
# A heuristic: native mode also needs the netmap-patched module to be the one loaded, which
# :func:`netmap_mode` checks through /sys/module/netmap/holders where it can.
NETMAP_NATIVE_DRIVERS = frozenset({
    "e1000", "e1000e", "igb", "ixgbe", "ixgbevf", "i40e", "ice", "iavf", "virtio_net", "veth",
    "vmxnet3", "r8169", "forcedeth", "mlx5_core", "cxgb4",
})


class _Bridge(Protocol):
    @property
    def buf_size(self) -> int: ...


class _Pair(Protocol):
    @property
    def name(self) -> str: ...

    @property
    def ports(self) -> Sequence[PortSpec]: ...


class DoctorConfig(Protocol):
    """What doctor needs of a Config (nmbridge.config.Config has it)."""

    @property
    def bridge(self) -> _Bridge: ...

    @property
    def pairs(self) -> Sequence[_Pair]: ...


def netmap_mode(ifname: str, driver: str | None, sys_root: str = "/sys") -> Finding:
    """How netmap would open ``ifname``: native or emulated (best effort; says so)."""
    mod = os.path.join(sys_root, "module", "netmap")
    if not os.path.isdir(mod):
        return Finding(ifname, "note", "netmap module not loaded: cannot tell native from emulated mode")
    admode = _read(os.path.join(mod, "parameters", "admode"))
    if admode == "2":
        return Finding(ifname, "note", "netmap admode=2 forces the emulated adapter for every interface "
                                       "(slower; hides VLAN tags; loses frames under load)")
    drv = (driver or "").replace("-", "_")
    if drv and os.path.exists(os.path.join(mod, "holders", drv)):
        return Finding(ifname, "note", f"netmap native mode (driver {driver} is netmap's patched module)")
    if drv in NETMAP_NATIVE_DRIVERS:
        return Finding(ifname, "note", (
            f"netmap probably emulated: driver {driver} has native netmap support "
            "but the loaded module does not use netmap (load netmap's build of it)"))
    return Finding(ifname, "note", f"netmap emulated mode: no native netmap support known for driver "
                                   f"{driver or 'unknown'} (heuristic; slower, hides VLAN tags)")


# Drivers with AF_XDP zero-copy in mainline Linux (a heuristic: `afxdp:` tries zero-copy first
# whatever the driver, and the port's `mode` says what it got).
AF_XDP_ZC_DRIVERS = frozenset({"ice", "i40e", "ixgbe", "igc", "igb", "mlx5_core", "stmmac", "ena",
                               "bnxt_en", "idpf", "gve", "virtio_net", "netdevsim"})


def afxdp_mode(ifname: str, driver: str | None, mtu: int, buf_size: int) -> Finding:
    """Which AF_XDP mode an ``afxdp:`` port would likely get, and whether its MTU fits."""
    room = buf_size - 256
    if buf_size not in (2048, 4096):
        return Finding(ifname, "error",
                       f"afxdp: needs bridge.buf_size 2048 or 4096 (a UMEM chunk), not {buf_size}",
                       "set buf_size = 2048 in [bridge]")
    if mtu + 22 > room:
        return Finding(ifname, "error", f"afxdp: MTU {mtu} does not fit one buffer less 256 bytes of XDP "
                                        f"headroom ({room} bytes; multi-buffer AF_XDP is not supported)",
                       f"ip link set dev {ifname} mtu {room - 22}  # or buf_size = 4096")
    drv = (driver or "").replace("-", "_")
    if drv in AF_XDP_ZC_DRIVERS:
        return Finding(ifname, "note", f"afxdp: driver {driver} has AF_XDP zero-copy: mode zc expected "
                                       "(the port's mode in `nmbridge ports` and its port_opened log say)")
    if drv == "veth":
        return Finding(ifname, "note", "afxdp: veth has driver-mode XDP but no AF_XDP zero-copy: mode "
                                       "native (the kernel copies each frame in and out)")
    return Finding(ifname, "note", f"afxdp: no AF_XDP zero-copy known for driver {driver or 'unknown'}: "
                                   "mode native if it has driver-mode XDP, else skb (generic XDP)")


def rx_queues(ifname: str, sys_root: str = "/sys") -> int | None:
    """The interface's receive queues as the kernel uses them (RSS spreads flows over them), or
    None when /sys does not say."""
    try:
        return sum(1 for q in os.listdir(os.path.join(sys_root, "class", "net", ifname, "queues"))
                   if q.startswith("rx-")) or None
    except OSError:
        return None


def worker_findings(pair: _Pair, queues: dict[str, int | None]) -> list[Finding]:
    """Who forwards which rings: the pair's workers, each one's CPU and the ring pairs of each
    port it owns (as `run` will split them); a warning per interface whose receive queues
    (`queues`, by interface) outnumber the workers -- its RSS spreads flows over more queues
    (cores) than forward them."""
    from nmbridge.backends import OpenOptions, ring_pairs, share_rings
    from nmbridge.config import workers_for

    rings: list[int | None] = []
    for spec in pair.ports:
        try:
            rings.append(ring_pairs(backend(spec.backend), spec.name, OpenOptions()))
        except Exception:  # an interface that is not there: the link checks say so
            rings.append(None)
    pc = pair if hasattr(pair, "workers") else None
    n = workers_for(pc, rings[0] or 1, rings[1] or 1) if pc is not None else 1  # type: ignore[arg-type]
    cpus: tuple[int, ...] = tuple(getattr(pair, "cpus", ()))
    out: list[Finding] = []
    if n > 1 or cpus:
        parts = []
        for w in range(n):
            owned = ", ".join(f"{spec} ring pair{'s' if len(r) != 1 else ''} {','.join(map(str, r))}"
                              for spec, total in zip(pair.ports, rings, strict=True)
                              if (r := share_rings(total or n, n, w)))
            cpu = f"cpu {cpus[w % len(cpus)]}" if cpus else "not pinned"
            parts.append(f"worker {w} ({cpu}): {owned}")
        out.append(Finding(f"pair {pair.name}", "note", f"{n} workers: " + "; ".join(parts)))
    for spec in pair.ports:
        ifname = _interface(spec)
        q = queues.get(ifname) if ifname else None
        if ifname and q and q > n:
            out.append(Finding(ifname, "warning", (
                f"RSS spreads its received flows over {q} RX queues, but pair {pair.name} forwards them "
                f"with {n} worker{'s' if n != 1 else ''}: {q - n} more core{'s' if q - n != 1 else ''} "
                "could forward"), f"workers = {q} (and cpus) in pair {pair.name}, or fewer queues: "
                                  f"ethtool -L {ifname} combined {n}"))
    return out


def _read(path: str) -> str | None:
    try:
        with open(path) as f:
            return f.read().strip()
    except OSError:
        return None


def _backend_problem(spec: PortSpec) -> str | None:
    try:
        return backend(spec.backend).unavailable()
    except Exception as e:  # a backend module that cannot even load
        return f"cannot load the {spec.backend} backend: {e}"


def _interface(spec: PortSpec) -> str | None:
    try:
        return backend(spec.backend).interface(spec.name)
    except Exception:
        return None


def collect_findings(config: DoctorConfig, link_setup: Sequence[bool] | None = None,
                     netns: str | None = None) -> list[tuple[str, list[Finding]]]:
    """Findings per pair (pair heading, findings).  ``link_setup[i]``: pair i has link set-up on."""
    buf_size = config.bridge.buf_size
    pairs = list(config.pairs)
    flags = list(link_setup) if link_setup is not None else [_pair_link_setup(config, p) for p in pairs]
    names = {i for p in pairs for s in p.ports if (i := _interface(s))}
    # the offloads that must be off behind each interface: any of its ports' backends' need,
    # as run's set-up works it out (so doctor reports just what run would change)
    managed: dict[str, frozenset[str]] = {}
    for p in pairs:
        for s in p.ports:
            if (i := _interface(s)) is not None:
                managed[i] = managed.get(i, frozenset()) | port_offloads(s)
    states: dict[str, LinkState | None] = lookup_links(sorted(names), netns) if names else {}
    seen: set[str] = set()
    out: list[tuple[str, list[Finding]]] = []
    for pair, setup in zip(pairs, flags, strict=True):
        heading = f"pair {pair.name}: " + " <-> ".join(str(s) for s in pair.ports)
        found: list[Finding] = []
        sides: list[tuple[str, int]] = []
        for spec in pair.ports:
            reason = _backend_problem(spec)
            if reason:
                found.append(Finding(str(spec), "error", f"backend unavailable: {reason}"))
            ifname = _interface(spec)
            if ifname is None:
                continue
            st = states.get(ifname)
            if st is None:
                found.append(Finding(ifname, "error", f"no such interface (port {spec})",
                                     "ip -br link  # list the interfaces and correct the port name"))
                continue
            sides.append((ifname, st.mtu))
            if ifname not in seen:
                seen.add(ifname)
                found += check_state(st, setup, managed[ifname])
            if spec.backend == "netmap":
                found.append(netmap_mode(ifname, st.driver))
            if spec.backend == "afxdp":
                found.append(afxdp_mode(ifname, st.driver, st.mtu, buf_size))
        if sides:
            chains = all(s.backend in CHAINING_BACKENDS for s in pair.ports)
            found += check_mtu(sides[0], sides[1] if len(sides) > 1 else None, buf_size, chains)
        # receive queues from this namespace's /sys (another namespace's are not visible here)
        queues = {i: rx_queues(i) for i, _ in sides} if netns is None else {}
        found += worker_findings(pair, queues)
        out.append((heading, found))
    return out


def _pair_link_setup(config: DoctorConfig, pair: _Pair) -> bool:
    # the config gives each pair the bridge's link_setup unless the pair sets its own
    return bool(getattr(pair, "link_setup", True))


def run_doctor(config: DoctorConfig, out: TextIO, link_setup: bool = True, netns: str | None = None) -> int:
    """Print what is wrong with each interface and how to fix it; 0 if nothing needs fixing.

    ``link_setup=False`` checks as ``run --no-link-setup`` would run: then down, promisc off
    and offloads on are problems, not notes.
    """
    pairs = list(config.pairs)
    flags = [link_setup and _pair_link_setup(config, p) for p in pairs]
    problems = 0
    for heading, found in collect_findings(config, flags, netns):
        print(heading, file=out)
        for f in found:
            problems += f.severity != "note"
            print("  " + f.line().replace("\n", "\n  "), file=out)
        if not any(f.severity != "note" for f in found):
            print("  ok", file=out)
    settings = config.bridge
    if hasattr(settings, "sched"):  # a full BridgeConfig: how its forwarding threads would run
        from nmbridge import sched

        print(sched.describe_settings(cast(Any, settings)), file=out)
    if problems:
        print(f"{problems} problem{'s' if problems != 1 else ''} to fix", file=out)
        return 1
    print("all interfaces ready", file=out)
    return 0
