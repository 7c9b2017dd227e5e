"""Link management: prepare the kernel interfaces behind ports, restore them, watch them.

For every interface behind a port (``afpacket:eth1`` -> ``eth1``), before the ports open:

* look it up — all of them first, so a missing one changes nothing anywhere;
* check the MTU of the two sides of a pair against each other and against the buffer size
  (:func:`check_mtu`, a pure function that ``nmbridge doctor`` uses too);
* unless link set-up is off for it: bring it up, turn promiscuous mode on and turn off the
  offloads that merge or split frames (:data:`OFFLOADS`) that its port's backend declares must
  be off (``Backend.offloads_off``: an ``afpacket:`` port with ``vnet`` leaves TX segmentation
  on, its egress kernel segments), where the interface has them on and lets them be changed.

What was changed is worked out by comparing a snapshot taken before with one taken after
(:func:`changes_made`), so the kernel's own knock-on changes are recorded too, and
:meth:`LinkManager.restore` puts back exactly those fields — and only those, and only where
they still hold the value nmbridge set.  Restore is idempotent and never raises.

:class:`nmbridge.linkwatch.LinkWatcher` follows link events.

A manager may hold the interfaces of several pairs: ``setup(..., held=...)`` looks up and
checks interfaces it already set up without touching them again, ``restore(names)`` gives
back only some, ``before_change`` lets the owner lock each interface (and hand back a restore
record left by a run that died) after every check and before the first change, and
``store`` sees every record as it changes (the owner persists them).  An adopted record's
offloads that this run leaves as they are (an older run turned them off) are put back at
once.  With link set-up off for an interface, each problem ``nmbridge doctor`` would report
about it is logged as a warning (:func:`check_state`).

pyroute2 is untyped: everything that touches it lives in :class:`_Kernel` and the watcher's
parser; the rest of the module is typed, and the decisions are pure functions over
:class:`LinkState` snapshots (tested without root).

Offloads are read and changed with pyroute2's ethtool ioctl layer
(``pyroute2.ethtool.ioctl.IoctlEthtool``: ETHTOOL_GFEATURES / ETHTOOL_SFEATURES by kernel
feature name); the driver name comes from ETHTOOL_GDRVINFO through ``fcntl.ioctl`` (pyroute2
has no call for it).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import structlog

from nmbridge.errors import LinkError

log = structlog.get_logger("nmbridge.links")

IFF_UP = 0x1
IFF_PROMISC = 0x100
IFF_LOWER_UP = 0x10000

ETH_HLEN = 14
VLAN_HLEN = 4


# Groups of offloads: what a backend declares must be off behind its ports
# (``Backend.offloads_off``).
RX_MERGING = "rx-merging"  # receive side: the kernel merges wire frames into one large frame
TX_SEGMENTATION = "tx-segmentation"  # transmit side: the kernel passes super-frames on unsegmented
VLAN_STRIPPING = "vlan-stripping"  # receive side: the tag moves from the frame into metadata
OFFLOAD_GROUPS: frozenset[str] = frozenset({RX_MERGING, TX_SEGMENTATION, VLAN_STRIPPING})


@dataclass(frozen=True)
class Offload:
    """An offload nmbridge may turn off: the kernel feature name, ``ethtool -K`` keyword, group."""

    feature: str
    keyword: str
    group: str
    why: str


_MERGES = "merges received frames into one large frame"
_SPLITS = "passes frames larger than the MTU"

# Features that make the kernel hand over or expect frames that are not one wire frame each.
# Which of them set-up turns off on an interface depends on the backend of the port(s) behind
# it: each backend declares the groups that must be off (``offloads_off``); a TX offload only
# matters to what the interface transmits, so a backend whose egress hands the kernel GSO
# metadata (afpacket: with vnet) leaves TX_SEGMENTATION as it is.
OFFLOADS: tuple[Offload, ...] = (
    Offload("rx-gro", "gro", RX_MERGING, _MERGES),
    Offload("rx-gro-hw", "rx-gro-hw", RX_MERGING, _MERGES),
    Offload("rx-lro", "lro", RX_MERGING, _MERGES),
    Offload("tx-generic-segmentation", "gso", TX_SEGMENTATION, _SPLITS),
    Offload("tx-tcp-segmentation", "tso", TX_SEGMENTATION, _SPLITS),
    Offload("tx-tcp-ecn-segmentation", "tx-tcp-ecn-segmentation", TX_SEGMENTATION, _SPLITS),
    Offload("tx-tcp-mangleid-segmentation", "tx-tcp-mangleid-segmentation", TX_SEGMENTATION, _SPLITS),
    Offload("tx-tcp6-segmentation", "tx-tcp6-segmentation", TX_SEGMENTATION, _SPLITS),
    # Linux 6.18+ (AccECN); absent elsewhere, and then simply not there to turn off
    Offload("tx-tcp-accecn-segmentation", "tx-tcp-accecn-segmentation", TX_SEGMENTATION, _SPLITS),
    Offload("tx-udp-segmentation", "tx-udp-segmentation", TX_SEGMENTATION, _SPLITS),
    Offload("rx-vlan-hw-parse", "rxvlan", VLAN_STRIPPING, "strips 802.1Q tags from received frames"),
    Offload("rx-vlan-stag-hw-parse", "rx-vlan-stag-hw-parse", VLAN_STRIPPING,
            "strips 802.1ad tags from received frames"),
)
OFFLOAD_BY_FEATURE: dict[str, Offload] = {o.feature: o for o in OFFLOADS}
EVERY_OFFLOAD: frozenset[str] = frozenset(OFFLOAD_BY_FEATURE)


def offload_features(groups: Collection[str]) -> frozenset[str]:
    """The kernel feature names of some offload groups; raises ValueError on an unknown group."""
    unknown = set(groups) - OFFLOAD_GROUPS
    if unknown:
        raise ValueError(f"unknown offload group(s): {', '.join(sorted(unknown))}")
    return frozenset(o.feature for o in OFFLOADS if o.group in groups)


def port_offloads(spec: Any) -> frozenset[str]:
    """The features that must be off behind one port (a PortSpec), as its backend declares.

    A backend that cannot say (it fails to load) gets every offload off: the safe side.
    """
    from nmbridge.backends import backend

    try:
        return offload_features(backend(spec.backend).offloads_off(spec.name))
    except Exception:
        return EVERY_OFFLOAD


@dataclass(frozen=True)
class Feature:
    """One ethtool feature: on or off, and whether the driver lets it change."""

    active: bool
    changeable: bool


@dataclass(frozen=True)
class LinkState:
    """A snapshot of what nmbridge looks at and may change on one interface."""

    ifname: str
    index: int
    admin_up: bool
    promisc: bool
    mtu: int
    operstate: str = "UNKNOWN"
    lower_up: bool = False
    features: Mapping[str, Feature] = field(default_factory=dict)
    driver: str | None = None


# --------------------------------------------------------------------------- pure decisions


@dataclass(frozen=True)
class SetupPlan:
    """What set-up changes on one interface (nothing that is already as wanted)."""

    ifname: str
    bring_up: bool
    promisc_on: bool
    offloads_off: tuple[str, ...]  # kernel feature names
    fixed_on: tuple[str, ...]  # managed offloads that are on but cannot be changed

    @property
    def empty(self) -> bool:
        return not (self.bring_up or self.promisc_on or self.offloads_off)


def plan_setup(state: LinkState, managed: Collection[str] = EVERY_OFFLOAD) -> SetupPlan:
    """What set-up changes on one interface; ``managed``: the offload features (of
    :data:`OFFLOADS`) that must be off behind it (see :func:`port_offloads`), the rest are
    left as they are."""
    off: list[str] = []
    fixed: list[str] = []
    for o in OFFLOADS:
        if o.feature not in managed:
            continue
        f = state.features.get(o.feature)
        if f is None or not f.active:
            continue
        (off if f.changeable else fixed).append(o.feature)
    return SetupPlan(state.ifname, bring_up=not state.admin_up, promisc_on=not state.promisc,
                     offloads_off=tuple(off), fixed_on=tuple(fixed))


@dataclass(frozen=True)
class RestoreRecord:
    """What set-up changed on one interface: each field holds the value to put back
    (None / absent: not changed); ``set_*`` hold the value set-up left (for the logs)."""

    ifname: str
    index: int
    admin_up: bool | None = None
    promisc: bool | None = None
    features: Mapping[str, bool] = field(default_factory=dict)  # feature -> original value
    set_features: Mapping[str, bool] = field(default_factory=dict)  # feature -> value left
    set_admin_up: bool | None = None
    set_promisc: bool | None = None

    @property
    def empty(self) -> bool:
        return self.admin_up is None and self.promisc is None and not self.features


def changes_made(before: LinkState, after: LinkState) -> RestoreRecord:
    """The difference between two snapshots of one interface, as a restore record.

    Every feature that changed is recorded, managed or not: switching one feature off can
    switch others off with it (the kernel's dependencies), and restore must undo those too.
    """
    feats = {name: f.active for name, f in before.features.items()
             if name in after.features and after.features[name].active != f.active}
    return RestoreRecord(
        ifname=before.ifname,
        index=before.index,
        admin_up=before.admin_up if before.admin_up != after.admin_up else None,
        promisc=before.promisc if before.promisc != after.promisc else None,
        features=feats,
        set_features={name: after.features[name].active for name in feats},
        set_admin_up=after.admin_up if before.admin_up != after.admin_up else None,
        set_promisc=after.promisc if before.promisc != after.promisc else None,
    )


def merge_records(older: RestoreRecord, newer: RestoreRecord) -> RestoreRecord:
    """One record for an interface set up twice (a run that died, then this one): each field's
    original value is the older record's where it has one — that is the true original."""
    feats = {**newer.features, **older.features}
    return RestoreRecord(
        ifname=newer.ifname, index=newer.index,
        admin_up=older.admin_up if older.admin_up is not None else newer.admin_up,
        promisc=older.promisc if older.promisc is not None else newer.promisc,
        features=feats,
        set_features={**older.set_features, **newer.set_features},
        set_admin_up=newer.set_admin_up if newer.set_admin_up is not None else older.set_admin_up,
        set_promisc=newer.set_promisc if newer.set_promisc is not None else older.set_promisc,
    )


def record_to_dict(rec: RestoreRecord) -> dict[str, Any]:
    return {"ifname": rec.ifname, "index": rec.index, "admin_up": rec.admin_up, "promisc": rec.promisc,
            "features": dict(rec.features), "set_features": dict(rec.set_features),
            "set_admin_up": rec.set_admin_up, "set_promisc": rec.set_promisc}


def record_from_dict(d: Mapping[str, Any]) -> RestoreRecord:
    """The inverse of :func:`record_to_dict`; raises ValueError on anything else."""
    def opt_bool(key: str) -> bool | None:
        v = d.get(key)
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{key}: not a boolean")
        return v

    def bools(key: str) -> dict[str, bool]:
        v = d.get(key, {})
        if not isinstance(v, dict) or not all(isinstance(x, bool) for x in v.values()):
            raise ValueError(f"{key}: not a map of booleans")
        return dict(v)

    ifname, index = d.get("ifname"), d.get("index")
    if not isinstance(ifname, str) or not isinstance(index, int) or isinstance(index, bool):
        raise ValueError("ifname/index missing")
    return RestoreRecord(ifname, index, opt_bool("admin_up"), opt_bool("promisc"), bools("features"),
                         bools("set_features"), opt_bool("set_admin_up"), opt_bool("set_promisc"))


@dataclass(frozen=True)
class RestorePlan:
    """What restore does now on one interface, given its current state."""

    ifname: str
    features: Mapping[str, bool]  # feature -> value to set
    promisc: bool | None
    admin_up: bool | None

    @property
    def empty(self) -> bool:
        return self.admin_up is None and self.promisc is None and not self.features


def plan_restore(record: RestoreRecord, current: LinkState) -> RestorePlan:
    """The fields of `record` that do not hold their original value now.

    A field someone else has already put back is left alone (all fields are on/off, so a
    field not at its original value is at the value nmbridge set).
    """
    feats = {name: original for name, original in record.features.items()
             if name in current.features and current.features[name].active != original}
    promisc = record.promisc if record.promisc is not None and current.promisc != record.promisc else None
    admin_up = (record.admin_up if record.admin_up is not None and current.admin_up != record.admin_up
                else None)
    return RestorePlan(record.ifname, feats, promisc, admin_up)


Severity = Literal["error", "warning", "note"]


@dataclass(frozen=True)
class Finding:
    """Something wrong (or worth knowing) about one interface, with the command that fixes it."""

    ifname: str
    severity: Severity
    problem: str
    fix: str | None = None

    def line(self) -> str:
        text = f"{self.severity}: {self.ifname}: {self.problem}"
        return f"{text}\n    fix: {self.fix}" if self.fix else text


def frame_limit(mtu: int, vlan: bool = True) -> int:
    """The largest frame an interface with this MTU passes: header, tag, payload."""
    return mtu + ETH_HLEN + (VLAN_HLEN if vlan else 0)


def check_mtu(a: tuple[str, int], b: tuple[str, int] | None, buf_size: int,
              allow_chains: bool = False) -> list[Finding]:
    """MTU findings for one pair: ``a`` and ``b`` are (ifname, mtu); ``b`` None for a mem: side.

    * each side: MTU + 14 + 4 (802.1Q tag) must fit one buffer unless frames may span several
      buffers (``allow_chains``) — else an error, with the largest MTU that fits;
    * the two sides: a frame larger than the smaller MTU is dropped by the kernel on the way
      out — a warning naming the side to raise.
    """
    out: list[Finding] = []
    if b is not None and b[0] == a[0]:
        b = None  # one interface on both sides (its NIC and its host rings): check it once
    sides = [a] if b is None else [a, b]
    for ifname, mtu in sides:
        need = frame_limit(mtu)
        if need > buf_size and allow_chains:
            out.append(Finding(ifname, "note", f"frames up to {need} bytes (MTU {mtu}) span several "
                                               f"{buf_size}-byte buffers"))
        elif need > buf_size:
            out.append(Finding(
                ifname, "error",
                f"MTU {mtu} needs {need}-byte buffers (MTU + 14 header + 4 VLAN tag) but buf_size is "
                f"{buf_size}: set buf_size >= {need} or lower the MTU",
                f"ip link set dev {ifname} mtu {buf_size - ETH_HLEN - VLAN_HLEN}"))
    if b is not None and a[1] != b[1]:
        (small, small_mtu), (big, big_mtu) = sorted(sides, key=lambda s: s[1])
        out.append(Finding(
            small, "warning",
            f"MTU {small_mtu} is smaller than {big}'s MTU {big_mtu}: frames larger than {small_mtu} "
            f"bytes of payload from {big} are dropped by the kernel when sent on {small}",
            f"ip link set dev {small} mtu {big_mtu}"))
    return out


def _keywords(features: Sequence[str]) -> list[str]:
    """``ethtool -K`` keywords for features; ``tso`` covers every tx-tcp*-segmentation."""
    tso = "tx-tcp-segmentation" in features
    return [OFFLOAD_BY_FEATURE[f].keyword for f in features
            if not (tso and f != "tx-tcp-segmentation" and f.startswith("tx-tcp")
                    and f.endswith("-segmentation"))]


def check_state(state: LinkState, link_setup: bool,
                managed: Collection[str] = EVERY_OFFLOAD) -> list[Finding]:
    """Findings about up/promisc/offloads (``managed``: the offloads that must be off behind
    this interface, as for :func:`plan_setup`; the others are no problem).

    With ``link_setup`` nmbridge run fixes these itself (and restores them), so they are
    notes; without it they are warnings the operator must fix.
    """
    sev: Severity = "note" if link_setup else "warning"
    suffix = " (nmbridge run sets this and restores it on exit)" if link_setup else ""
    n = state.ifname
    out: list[Finding] = []
    if not state.admin_up:
        out.append(Finding(n, sev, f"is down{suffix}", f"ip link set dev {n} up"))
    if not state.promisc:
        out.append(Finding(n, sev, f"promiscuous mode is off: frames for other MACs are not "
                                   f"received{suffix}", f"ip link set dev {n} promisc on"))
    plan = plan_setup(state, managed)
    if plan.offloads_off:
        names = _keywords(plan.offloads_off)
        why = sorted({OFFLOAD_BY_FEATURE[f].why for f in plan.offloads_off})
        out.append(Finding(n, sev, f"offloads on: {', '.join(names)} ({'; '.join(why)}){suffix}",
                           f"ethtool -K {n} " + " ".join(f"{k} off" for k in names)))
    if plan.fixed_on:
        names = [OFFLOAD_BY_FEATURE[f].keyword for f in plan.fixed_on]
        out.append(Finding(n, "note", f"offloads on that the driver does not let change: "
                                      f"{', '.join(names)}"))
    return out


# --------------------------------------------------------------------------- kernel access


CLONE_NEWNET = 0x40000000


@contextlib.contextmanager
def in_netns(name: str | None) -> Iterator[None]:
    """Run the body with the calling thread in network namespace ``name`` (None: stay).

    Sockets opened inside stay in that namespace.  A missing namespace is an error, never
    created (unlike ``IPRoute(netns=...)``).
    """
    if name is None:
        yield
        return
    libc = ctypes.CDLL(None, use_errno=True)
    try:
        target = os.open(f"/var/run/netns/{name}", os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise LinkError(f"netns {name}: no such network namespace") from None
    own = os.open("/proc/thread-self/ns/net", os.O_RDONLY | os.O_CLOEXEC)
    try:
        if libc.setns(target, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise LinkError(f"netns {name}: cannot enter: {os.strerror(err)}")
        try:
            yield
        finally:
            if libc.setns(own, CLONE_NEWNET) != 0:  # pragma: no cover - would need a broken kernel
                raise OSError(ctypes.get_errno(), "cannot return to the original network namespace")
    finally:
        os.close(target)
        os.close(own)


SIOCETHTOOL = 0x8946
ETHTOOL_GDRVINFO = 0x3
ETHTOOL_GCHANNELS = 0x3C
_DRVINFO_SIZE = 196  # struct ethtool_drvinfo
_CHANNELS_SIZE = 36  # struct ethtool_channels: 9 x u32


def _ethtool(ifname: str, cmd: int, size: int) -> bytes | None:
    """The `size`-byte answer of ethtool command `cmd` for an interface (SIOCETHTOOL, in the
    calling thread's namespace), or None when the driver does not answer it."""
    buf = ctypes.create_string_buffer(size)
    struct.pack_into("I", buf, 0, cmd)
    ifreq = struct.pack("16sP", ifname.encode(), ctypes.addressof(buf)).ljust(40, b"\0")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            fcntl.ioctl(s.fileno(), SIOCETHTOOL, ifreq)
        except OSError:
            return None
    return buf.raw


def _driver_name(ifname: str) -> str | None:
    """The driver behind an interface (ETHTOOL_GDRVINFO), or None if it has none to tell."""
    info = _ethtool(ifname, ETHTOOL_GDRVINFO, _DRVINFO_SIZE)
    name = info[4:36].split(b"\0", 1)[0].decode(errors="replace") if info else ""
    return name or None


def ethtool_rx_queues(ifname: str) -> int:
    """The interface's RX queues from ETHTOOL_GCHANNELS (rx + combined channels), in the
    calling thread's namespace; 1 when the driver does not tell."""
    chan = _ethtool(ifname, ETHTOOL_GCHANNELS, _CHANNELS_SIZE)
    if chan is None:
        return 1
    rx, _tx, _other, combined = struct.unpack_from("4I", chan, 20)
    return max(1, int(rx) + int(combined))


def _reason(e: BaseException) -> str:
    code = getattr(e, "code", None)
    if isinstance(code, int) and code > 0:
        return os.strerror(code)
    if isinstance(e, OSError) and e.errno:
        return os.strerror(e.errno)
    return str(e) or type(e).__name__


class _Kernel:
    """The one place that calls pyroute2 for link state (it is untyped)."""

    def __init__(self) -> None:
        from pyroute2 import IPRoute
        from pyroute2.ethtool.ioctl import IoctlEthtool

        self._ipr: Any = IPRoute()
        self._eth: Any = IoctlEthtool()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._ipr.close()
        with contextlib.suppress(Exception):
            self._eth.close()

    def __enter__(self) -> _Kernel:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def lookup(self, ifname: str) -> LinkState | None:
        from pyroute2.netlink.exceptions import NetlinkError

        try:
            msg = self._ipr.link("get", ifname=ifname)[0]
        except NetlinkError as e:
            if e.code == errno.ENODEV:
                return None
            raise LinkError(f"{ifname}: cannot look up: {_reason(e)}") from None
        flags = int(msg["flags"])
        return LinkState(
            ifname=ifname,
            index=int(msg["index"]),
            admin_up=bool(flags & IFF_UP),
            promisc=bool(flags & IFF_PROMISC),
            mtu=int(msg.get("mtu")),
            operstate=str(msg.get("operstate") or "UNKNOWN"),
            lower_up=bool(flags & IFF_LOWER_UP),
            features=self.features(ifname),
            driver=_driver_name(ifname),
        )

    def features(self, ifname: str) -> dict[str, Feature]:
        try:
            self._eth.change_ifname(ifname)
            fl = self._eth.get_features()
        except Exception:  # no ethtool ops at all: nothing to switch
            return {}
        return {str(name): Feature(bool(active), bool(avail)) for name, active, avail, _i, _b in fl}

    def set_flags(self, index: int, flags: int, change: int) -> None:
        self._ipr.link("set", index=index, flags=flags, change=change)

    def set_features(self, ifname: str, values: Mapping[str, bool]) -> None:
        """One ETHTOOL_SFEATURES call; the caller re-reads to see what the kernel did."""
        if not values:
            return
        self._eth.change_ifname(ifname)
        fl = self._eth.get_features()
        for name, value in values.items():
            if name in fl:
                fl[name] = bool(value)
        try:
            self._eth.set_features(fl)
        except Exception as e:
            # ETHTOOL_F_WISH etc. come back as a positive return that pyroute2 reports as
            # NotSupportedError: the caller's re-read shows what really happened.
            if type(e).__name__ != "NotSupportedError":
                raise


# --------------------------------------------------------------------------- set-up / restore


@dataclass(frozen=True)
class PortLink:
    """The interface behind one port of a pair (``ifname`` None: a port with no interface),
    and the offload features its backend needs off there (all of them unless told)."""

    port: str
    ifname: str | None
    offloads_off: frozenset[str] = EVERY_OFFLOAD


@dataclass(frozen=True)
class PairLinks:
    name: str
    ports: tuple[PortLink, PortLink]
    link_setup: bool = True
    allow_chains: bool = False  # a frame may span several buffers (NS_MOREFRAG) on these ports


# Backends whose ports carry a frame larger than one buffer as an NS_MOREFRAG chain.
CHAINING_BACKENDS = frozenset({"afpacket"})


def pair_links(pair_name: str, specs: Sequence[Any], link_setup: bool) -> PairLinks:
    """Build a :class:`PairLinks` from a pair's two PortSpecs, asking each backend for its interface."""
    from nmbridge.backends import backend

    ports = tuple(PortLink(str(s), backend(s.backend).interface(s.name), port_offloads(s)) for s in specs)
    if len(ports) != 2:
        raise ValueError(f"pair {pair_name!r} has {len(ports)} ports, not 2")
    chains = all(s.backend in CHAINING_BACKENDS for s in specs)
    return PairLinks(pair_name, (ports[0], ports[1]), link_setup, chains)


def config_links(config: Any, link_setup: bool = True) -> list[PairLinks]:
    """The pairs of an nmbridge Config as PairLinks; ``link_setup=False`` (``--no-link-setup``)
    switches set-up off for every pair, else each pair's own ``link_setup`` decides (the
    config gives it the bridge's value unless the pair sets its own)."""
    return [pair_links(p.name, list(p.ports), link_setup and bool(getattr(p, "link_setup", True)))
            for p in config.pairs]


# before_change(states of the interfaces about to be used, not yet held) -> restore records a
# run that died left for some of them (adopted: this manager restores them)
BeforeChange = Callable[[Mapping[str, LinkState]], Mapping[str, RestoreRecord]]


class LinkManager:
    """Sets up the interfaces of a bridge and restores exactly what it changed.

    ::

        links = LinkManager(buf_size=2048)
        links.setup(pairs)          # raises LinkError; on error nothing stays changed
        try:
            ...run...
        finally:
            links.restore()         # idempotent, never raises
    """

    def __init__(self, buf_size: int, netns: str | None = None, allow_chains: bool = False,
                 store: Callable[[str, RestoreRecord | None], None] | None = None) -> None:
        self.buf_size = buf_size
        self.netns = netns
        self.allow_chains = allow_chains
        self.store = store  # told each record as it changes (None: restored, nothing to keep)
        self.records: dict[str, RestoreRecord] = {}
        self.states: dict[str, LinkState] = {}
        self._lock = threading.Lock()

    def __enter__(self) -> LinkManager:
        return self

    def __exit__(self, *exc: object) -> None:
        self.restore()

    def setup(self, pairs: Sequence[PairLinks], *, held: Collection[str] = (),
              before_change: BeforeChange | None = None) -> list[Finding]:
        """Look up and check every interface, then set up those whose pairs allow it.

        Interfaces in ``held`` (set up earlier by this manager, for pairs still running) are
        looked up and checked but not touched.  Returns the warnings and notes (already
        logged).  Raises LinkError — with nothing this call changed left changed — when an
        interface is missing, a check fails, ``before_change`` refuses, or the kernel refuses
        a change.
        """
        if not any(pl.ifname for pair in pairs for pl in pair.ports):
            return []  # mem: ports only
        with in_netns(self.netns), _Kernel() as k:
            # 1. look everything up before touching anything
            names: dict[str, bool] = {}  # ifname -> set it up (only if every pair using it agrees)
            managed: dict[str, frozenset[str]] = {}  # ifname -> offloads off (any port's need)
            where: dict[str, str] = {}  # ifname -> "pair lan: port afpacket:eth1" (first user)
            for pair in pairs:
                users: dict[str, list[str]] = {}  # both ports of netmap:eth1 <-> netmap:eth1^
                for pl in pair.ports:
                    if pl.ifname is not None:
                        names[pl.ifname] = names.get(pl.ifname, True) and pair.link_setup
                        managed[pl.ifname] = managed.get(pl.ifname, frozenset()) | pl.offloads_off
                        users.setdefault(pl.ifname, []).append(str(pl.port))
                for ifname, ports in users.items():
                    where.setdefault(ifname, f"pair {pair.name}: port{'s' * (len(ports) > 1)} "
                                             f"{' and '.join(ports)}")
            missing: list[str] = []
            for name in names:
                st = k.lookup(name)
                if st is None:
                    missing.append(name)
                else:
                    self.states[name] = st
            if missing:
                raise LinkError("; ".join(f"{where[m]}: no such interface {m}" for m in missing))
            # 2. checks
            findings: list[Finding] = []
            for pair in pairs:
                sides = [(pl.ifname, self.states[pl.ifname].mtu) for pl in pair.ports if pl.ifname]
                if sides:
                    findings += check_mtu(sides[0], sides[1] if len(sides) > 1 else None,
                                          self.buf_size, self.allow_chains or pair.allow_chains)
            fresh = [n for n in names if n not in held]
            for name in fresh:
                if not names[name]:  # left as it is: what doctor would report is the operator's
                    findings += [f for f in check_state(self.states[name], False, managed[name])
                                 if f.severity != "note"]
            errors = [f for f in findings if f.severity == "error"]
            if errors:
                raise LinkError("; ".join(f"{where[f.ifname]}: {f.ifname}: {f.problem}" for f in errors))
            for f in findings:
                if f.severity == "note":
                    log.info("link_check", ifname=f.ifname, note=f.problem)
                else:
                    log.warning("link_check", ifname=f.ifname, problem=f.problem, fix=f.fix)
            # 3. the owner's last word (locks), then changes
            adopted = dict(before_change({n: self.states[n] for n in fresh})) if before_change else {}
            done: list[str] = []
            try:
                for name in fresh:
                    rec = adopted.get(name)
                    if rec is not None:
                        with self._lock:
                            self.records[name] = rec
                        done.append(name)
                    if names[name]:
                        done.append(name)
                        if rec is not None:
                            self._give_back_unmanaged(k, rec, managed[name])
                        self._setup_one(k, self.states[name], managed[name])
                    elif rec is not None:  # a run that died set it up; this one must not: put it back
                        self._restore_with(k, [name])
                        log.info("link_setup_skipped", ifname=name, reason="link_setup = false")
                    else:
                        log.info("link_setup_skipped", ifname=name, reason="link_setup = false")
            except BaseException:
                self._restore_with(k, done)
                raise
        return findings

    def _keep(self, name: str, rec: RestoreRecord | None) -> None:
        with self._lock:
            if rec is None:
                self.records.pop(name, None)
            else:
                self.records[name] = rec
        if self.store is not None:
            try:
                self.store(name, rec)
            except Exception as e:
                log.error("link_record_not_saved", ifname=name, reason=_reason(e))

    def _give_back_unmanaged(self, k: _Kernel, rec: RestoreRecord, managed: Collection[str]) -> None:
        """An adopted record (a run that died) may hold offloads this run leaves as they are —
        an older nmbridge turned TSO/GSO off behind every port: put those back now, not at stop."""
        name = rec.ifname
        cur = self.states[name]
        back = {f: v for f, v in rec.features.items()
                if f in EVERY_OFFLOAD and f not in managed
                and f in cur.features and cur.features[f].active != v}
        if not back:
            return
        k.set_features(name, back)
        after = k.lookup(name)
        if after is None:
            return  # gone: set-up says so next
        self.states[name] = after
        given = sorted(f for f in back if f in after.features and after.features[f].active == back[f])
        keep = {f: v for f, v in rec.features.items() if f not in given}
        newer = replace(rec, features=keep,
                        set_features={f: v for f, v in rec.set_features.items() if f in keep})
        self._keep(name, None if newer.empty else newer)
        log.info("link_offloads_given_back", ifname=name, offloads=given)

    def _setup_one(self, k: _Kernel, before: LinkState, managed: Collection[str]) -> None:
        plan = plan_setup(before, managed)
        name = before.ifname
        for feature in plan.fixed_on:
            log.warning("offload_fixed_on", ifname=name, offload=OFFLOAD_BY_FEATURE[feature].keyword)
        if plan.empty:
            done = self.records.get(name)
            log.info("link_ready", ifname=name, changed=_describe(done) if done else [])
            return
        step = "bring up"
        try:
            if plan.offloads_off:
                step = "turn off offloads"
                k.set_features(name, {f: False for f in plan.offloads_off})
            if plan.promisc_on:
                step = "turn on promiscuous mode"
                k.set_flags(before.index, IFF_PROMISC, IFF_PROMISC)
            if plan.bring_up:
                step = "bring up"
                k.set_flags(before.index, IFF_UP, IFF_UP)
        except LinkError:
            raise
        except Exception as e:
            raise LinkError(f"{name}: cannot {step}: {_reason(e)}") from None
        finally:
            after = k.lookup(name)
            if after is not None:
                rec = changes_made(before, after)
                older = self.records.get(name)
                if older is not None:
                    rec = merge_records(older, rec)
                if not rec.empty:
                    self._keep(name, rec)
                self.states[name] = after
        if after is None:
            raise LinkError(f"{name}: disappeared during set-up")
        still_on = [OFFLOAD_BY_FEATURE[f].keyword for f in plan.offloads_off
                    if after.features.get(f, Feature(False, False)).active]
        if still_on:
            log.warning("offload_still_on", ifname=name, offloads=still_on,
                        fix=f"ethtool -K {name} " + " ".join(f"{o} off" for o in still_on))
        done = self.records.get(name)
        log.info("link_ready", ifname=name, changed=_describe(done) if done else [])

    def forget(self, names: Collection[str]) -> None:
        """Drop the records of interfaces that are gone (deleted: nothing to restore)."""
        for name in names:
            if name in self.records:
                self._keep(name, None)
            self.states.pop(name, None)

    def restore(self, names: Collection[str] | None = None) -> None:
        """Put back what set-up changed (on ``names`` only, if given).  Idempotent; logs
        failures, never raises."""
        with self._lock:
            todo = [n for n in self.records if names is None or n in names]
        if not todo:
            return
        try:
            with in_netns(self.netns), _Kernel() as k:
                self._restore_with(k, todo)
        except Exception as e:
            log.error("link_restore_failed", ifname=",".join(todo), reason=_reason(e))

    def _restore_with(self, k: _Kernel, names: Collection[str]) -> None:
        with self._lock:
            records = [r for n, r in self.records.items() if n in names]
        for rec in reversed(records):
            try:
                self._restore_one(k, rec)
            except Exception as e:
                log.error("link_restore_failed", ifname=rec.ifname, reason=_reason(e))
                with self._lock:  # forgotten here; a persisted copy stays for the next run
                    self.records.pop(rec.ifname, None)
                continue
            self._keep(rec.ifname, None)

    def _restore_one(self, k: _Kernel, rec: RestoreRecord) -> None:
        cur = k.lookup(rec.ifname)
        if cur is None or cur.index != rec.index:
            log.warning("link_restore_skipped", ifname=rec.ifname, reason="interface is gone")
            return
        plan = plan_restore(rec, cur)
        # reverse order of set-up: down first, then promisc, then offloads
        if plan.admin_up is not None:
            k.set_flags(rec.index, IFF_UP if plan.admin_up else 0, IFF_UP)
        if plan.promisc is not None:
            k.set_flags(rec.index, IFF_PROMISC if plan.promisc else 0, IFF_PROMISC)
        if plan.features:
            k.set_features(rec.ifname, plan.features)
            after = k.lookup(rec.ifname)
            wrong = [f for f, v in plan.features.items()
                     if after is not None and f in after.features and after.features[f].active != v]
            if wrong:
                log.warning("link_restore_incomplete", ifname=rec.ifname, features=wrong)
        log.info("link_restored", ifname=rec.ifname, restored=_describe(rec, original=True))


def restore_record(rec: RestoreRecord, netns: str | None = None) -> None:
    """Put back one record (a run that died left it); logs, never raises."""
    m = LinkManager(0, netns)
    m.records[rec.ifname] = rec
    m.restore()


def _describe(rec: RestoreRecord, original: bool = False) -> list[str]:
    """The changes of a record in words: as set-up left them, or (``original``) as restored."""
    up = rec.admin_up if original else rec.set_admin_up
    promisc = rec.promisc if original else rec.set_promisc
    feats = rec.features if original else rec.set_features
    out = []
    if up is not None:
        out.append("up" if up else "down")
    if promisc is not None:
        out.append("promisc on" if promisc else "promisc off")
    out += [f"{f} {'on' if v else 'off'}" for f, v in sorted(feats.items())]
    return out


def lookup_links(ifnames: Sequence[str], netns: str | None = None) -> dict[str, LinkState | None]:
    """Snapshots of interfaces (None for a missing one); changes nothing."""
    with in_netns(netns), _Kernel() as k:
        return {n: k.lookup(n) for n in ifnames}
