"""Port backends: every backend has the same shape.

A backend is a small object registered here under its prefix (``mem``, ``afpacket``,
``netmap``). It can say why it is unavailable on this machine, check a port name without
opening anything, and open a port, returning a :class:`nmbridge.port.Port` whose C struct
fastfwd drives.  Backends that keep their rings in user memory (``user_memory = True``)
open every port of a bridge in one shared :class:`nmbridge.port.Region`, so forwarding
between them is the zero-copy swap.  Adding a backend means adding a module and one line in
``_BACKEND_MODULES``; fastfwd and the app do not change.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from nmbridge.accounting import PortAccounting
from nmbridge.errors import PortError
from nmbridge.port import Port, Region

# prefix -> module (imported on first use, so a missing optional dependency of one backend
# never breaks the others)
_BACKEND_MODULES = {
    "mem": "nmbridge.backends.mem_backend",
    "afpacket": "nmbridge.backends.afpacket_backend",
    "afxdp": "nmbridge.backends.afxdp_backend",
    "netmap": "nmbridge.backends.netmap_backend",
}


@dataclass(frozen=True)
class PortSpec:
    """A parsed port string: ``afpacket:eth1`` -> backend "afpacket", name "eth1"."""

    backend: str
    name: str

    def __str__(self) -> str:
        return f"{self.backend}:{self.name}"


@dataclass(frozen=True)
class OpenOptions:
    """What every port of a bridge is opened with."""

    rings: int = 1  # ring pairs of a user-memory port
    slots: int = 1024  # slots per ring of a user-memory port
    buf_size: int = 2048  # buffer size of the user-memory region
    extra: dict[str, object] = field(default_factory=dict)


class Backend(Protocol):
    """The shape of a backend module's ``BACKEND`` object."""

    name: str
    user_memory: bool
    # how its ports' counters make a pair's received/forwarded/dropped (None: it has none)
    accounting: PortAccounting | None

    def unavailable(self) -> str | None:
        """None when the backend can run here, else the reason, in words."""

    def check_name(self, name: str) -> None:
        """Raise ValueError(reason) when `name` is not a valid port name for this backend."""

    def interface(self, name: str) -> str | None:
        """The kernel interface behind the port (for link set-up), or None."""

    def offloads_off(self, name: str) -> frozenset[str]:
        """The offload groups (``nmbridge.links.RX_MERGING``, ``TX_SEGMENTATION``,
        ``VLAN_STRIPPING``) that link set-up must turn off on the port's interface: those that
        would hand the port, or expect from it, frames it cannot carry."""

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        """Open the port; raise PortError naming the port and the reason."""

    # Forwarding workers (README "Workers"). A backend may leave these two out: the module's
    # open_shares() and ring_pairs() below then give it one ring pair, one share.

    def open_shares(self, name: str, options: OpenOptions, region: Region | None,
                    shares: int) -> list[Port]:
        """Open the port as `shares` Ports (len == shares), each owning a disjoint set of the
        port's ring pairs; ring pair i goes to share i % shares. Raise PortError naming the
        port and the reason when it cannot be split so (e.g. fewer ring pairs than shares)."""

    def ring_pairs(self, name: str, options: OpenOptions) -> int:
        """How many ring pairs the port would have (for workers = "auto"), without opening it."""


def open_shares(b: Backend, name: str, options: OpenOptions, region: Region | None,
                shares: int) -> list[Port]:
    """`b.open_shares(...)`, or for a backend without it: one share is the port itself, more
    are refused (PortError naming the port: its backend has one ring pair per port)."""
    method = getattr(b, "open_shares", None)
    if method is not None:
        ports: list[Port] = method(name, options, region, shares)
        if len(ports) != shares:
            close_all(ports)
            raise PortError(f"{b.name}:{name}: the {b.name} backend opened {len(ports)} shares, not {shares}")
        return ports
    if shares == 1:
        return [b.open(name, options, region)]
    raise PortError(f"{b.name}:{name}: the {b.name} backend has one ring pair per port; "
                    f"workers = {shares} needs {shares}")


def ring_pairs(b: Backend, name: str, options: OpenOptions) -> int:
    """`b.ring_pairs(...)`, or 1 for a backend without it."""
    method = getattr(b, "ring_pairs", None)
    return int(method(name, options)) if method is not None else 1


def _ring_pairs_or_1(b: Backend, name: str, options: OpenOptions) -> int:
    try:
        return ring_pairs(b, name, options)
    except Exception:  # a port that cannot be counted (yet): opening it says why
        return 1


def share_rings(total: int, shares: int, share: int) -> list[int]:
    """The ring pairs (of `total`) that share `share` of `shares` owns: i % shares == share."""
    return list(range(share, total, shares))


def parse_options(backend: str, query: str) -> dict[str, str]:
    """The options after a port name's ``?``: ``a=1&b=2`` -> {"a": "1", "b": "2"}; ValueError
    naming the option for a field that is not KEY=VALUE or a key given twice (the last one
    silently winning would hide a typo)."""
    opts: dict[str, str] = {}
    for item in query.split("&") if query else ():
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"{backend} option {item!r}: write KEY=VALUE, options separated by '&'")
        if key in opts:
            raise ValueError(f"{backend} option {key} is given twice ({key}={opts[key]!r} and "
                             f"{key}={value!r}): keep one")
        opts[key] = value
    return opts


def whole_number(value: str, lo: int, hi: int) -> int | None:
    """`value` as an int when it is ASCII decimal digits (not "²", not "+1", not "1_0")
    from `lo` to `hi`; else None."""
    if not (value.isascii() and value.isdigit()):
        return None
    if len(value.lstrip("0")) > len(str(hi)):  # out of range; and int() refuses > 4300 digits
        return None
    n = int(value)
    return n if lo <= n <= hi else None


def backend(prefix: str) -> Backend:
    try:
        module = _BACKEND_MODULES[prefix]
    except KeyError:
        known = ", ".join(sorted(_BACKEND_MODULES))
        raise ValueError(f"unknown backend {prefix!r} (known: {known})") from None
    return importlib.import_module(module).BACKEND  # type: ignore[no-any-return]


def backend_names() -> list[str]:
    return sorted(_BACKEND_MODULES)


def resolve_default(default: str) -> str:
    """``auto`` means netmap where /dev/netmap exists, afpacket elsewhere."""
    if default == "auto":
        return "netmap" if os.path.exists("/dev/netmap") else "afpacket"
    return default


def parse_spec(text: str, default_backend: str = "auto") -> PortSpec:
    """Split a port string into backend and name; raise ValueError(reason) if malformed.

    ``eth1`` uses the default backend; ``valeX:port`` belongs to the netmap backend.
    """
    if not text or text != text.strip():
        raise ValueError("a port must be a non-empty string without surrounding spaces")
    prefix, sep, rest = text.partition(":")
    if sep and prefix.startswith("vale"):
        spec = PortSpec("netmap", text)
    elif sep and prefix in _BACKEND_MODULES:
        spec = PortSpec(prefix, rest)
    elif sep and prefix.isidentifier():
        raise ValueError(f"unknown backend {prefix!r} (known: {', '.join(backend_names())}, vale*)")
    else:
        spec = PortSpec(resolve_default(default_backend), text)
    if not spec.name:
        raise ValueError(f"{text!r} names no interface after {spec.backend!r}")
    backend(spec.backend).check_name(spec.name)
    return spec


class PortSet:
    """Opens the ports of a bridge all-or-nothing and closes them together.

    User-memory ports share one Region, sized by the first ``open()`` for twice its user-memory
    ports: later ``open()`` calls (pairs a reload adds) use the same region while it has room,
    and ``close_ports()`` gives a removed pair's room back.
    """

    def __init__(self, options: OpenOptions | None = None) -> None:
        self.options = options or OpenOptions()
        self.region: Region | None = None
        self.ports: list[Port] = []
        self.failed: PortSpec | None = None  # the spec whose opening failed, for the caller's message

    def open(self, specs: Sequence[PortSpec]) -> list[Port]:
        return [share for shares in self.open_shares(specs, [1] * len(specs)) for share in shares]

    def open_shares(self, specs: Sequence[PortSpec], shares: Sequence[int]) -> list[list[Port]]:
        """Open each spec as `shares[i]` Ports (one per forwarding worker; see the module's
        ``open_shares``), all or nothing."""
        backends = [backend(s.backend) for s in specs]
        n_user = sum(1 for b in backends if b.user_memory)
        if n_user and self.region is None:
            o = self.options
            # room for the most ring pairs a user-memory port asks for, for every port (and as
            # many again for pairs a reload adds); a share costs one more netmap_if header
            rings = max([o.rings] + [_ring_pairs_or_1(b, s.name, o)
                                     for s, b in zip(specs, backends, strict=True) if b.user_memory])
            self.region = Region(ports=n_user, rings=rings, slots=o.slots, buf_size=o.buf_size,
                                 spare_ports=n_user)
        opened: list[list[Port]] = []
        self.failed = None
        try:
            for spec, b, n in zip(specs, backends, shares, strict=True):
                reason = b.unavailable()
                if reason:
                    raise PortError(f"{spec}: {reason}")
                region = self.region if b.user_memory else None
                opened.append(open_shares(b, spec.name, self.options, region, n))
        except BaseException:
            self.failed = specs[len(opened)]
            close_all(p for ps in opened for p in ps)
            raise
        self.ports.extend(p for ps in opened for p in ps)
        return opened

    def close_ports(self, ports: Iterable[Port]) -> None:
        """Close some of the ports (a pair a reload removes); their room in the region, objects
        and buffers, is free again for ports opened later."""
        gone = list(ports)
        close_all(gone)
        self.ports = [p for p in self.ports if all(p is not g for g in gone)]

    def close(self) -> None:
        close_all(self.ports)
        self.ports = []

    def __enter__(self) -> PortSet:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def close_all(ports: Iterable[Port]) -> None:
    for p in reversed(list(ports)):
        p.close()
