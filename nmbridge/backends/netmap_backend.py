"""The netmap backend: NIC, host-ring, pipe and VALE ports through the kernel's /dev/netmap.

Port names (the ``netmap:`` prefix is optional here; ``valeX:`` ports are written whole)::

    netmap:eth1        all NIC rings                 (NR_REG_ALL_NIC)
    netmap:eth1^       the host-stack rings          (NR_REG_SW)
    netmap:eth1^N      host ring pair N              (NR_REG_ONE_SW)
    netmap:eth1*       NIC and host rings            (NR_REG_NIC_SW)
    netmap:eth1-N      NIC ring pair N               (NR_REG_ONE_NIC)
    netmap:pipe{N      master end of pipe N of parent "pipe" (the name goes to the kernel whole)
    netmap:pipe}N      its slave end
    vale0:port         port "port" of VALE switch "vale0" (both created when missing)

then optionally ``/`` and flags: ``x`` exclusive (always on, see below), ``R`` RX rings only,
``T`` TX rings only; then optionally ``@N``: use memory region N (nr_mem_id).

Every port is registered with ``NR_EXCLUSIVE``: the kernel then refuses (EBUSY) any later
registration of the same rings, by this process or another, until the port closes, and
refuses ours when another registration holds them -- two programs moving one ring's head/cur
would corrupt each other silently.  Exclusivity is per kernel ring: ``eth1`` (NIC rings) and
``eth1^`` (host rings) of one bridge do not conflict, ``eth1*`` conflicts with both; the two
ends of a pipe are separate ports.

Forwarding workers (README "Workers"): a NIC port of all its rings (``netmap:eth1``) opened
for N workers is N registrations of one ring pair each (``NR_REG_ONE_NIC``, ring w for share
w, each with its own fd, so a share's syncs and poll() touch its ring only); that needs N
equal to the NIC's ring pairs, since a registration is one ring or all of them.  A port
that names its rings (``-N``, ``^``, ``*``), a pipe or a VALE port has one share.

``NR_NO_TX_POLL`` is not set, as in netmap's bridge: a poll() on a port's fd also pushes its
TX rings out, which fastfwd relies on when both ports of a pair are netmap ports (one poll()
per round syncs every ring).
"""

from __future__ import annotations

import grp
import os
import re
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from nmbridge.backends import OpenOptions
from nmbridge.errors import PortError
from nmbridge.links import OFFLOAD_GROUPS
from nmbridge.port import Port, Region

if TYPE_CHECKING:
    from nmbridge.backends.netmap import NetmapPort

DEVICE = "/dev/netmap"

NR_REG_ALL_NIC = 1
NR_REG_SW = 2
NR_REG_NIC_SW = 3
NR_REG_ONE_NIC = 4
NR_REG_ONE_SW = 8

NR_EXCLUSIVE = 0x800
NR_RX_RINGS_ONLY = 0x2000
NR_TX_RINGS_ONLY = 0x4000
NR_NO_TX_POLL = 0x20000

NETMAP_RING_MASK = 0xFFF
NR_NAME_MAX = 63  # nmreq_header.nr_name is 64 bytes with the NUL
IFNAME_MAX = 15  # a Linux interface name (IFNAMSIZ 16 with the NUL)

_FLAGS = {"x": NR_EXCLUSIVE, "R": NR_RX_RINGS_ONLY, "T": NR_TX_RINGS_ONLY}
_MONITOR_FLAGS = "trz"
_IDENT = re.compile(r"[A-Za-z0-9_]+")
_IFNAME = re.compile(r"[A-Za-z0-9_.]+")  # Linux also allows '.', e.g. VLAN interfaces eth0.100
_SEPARATORS = "^*-/@"

Kind = Literal["nic", "pipe", "vale"]


@dataclass(frozen=True)
class NetmapName:
    """A parsed port name: what the kernel is sent, plus what nmbridge needs to know."""

    spec: str  # as written (without the netmap: prefix)
    nr_name: str  # nmreq_header.nr_name
    nr_mode: int  # nmreq_register.nr_mode (NR_REG_*)
    nr_ringid: int  # nmreq_register.nr_ringid
    nr_flags: int  # nmreq_register.nr_flags from the name's /flags
    mem_id: int  # nmreq_register.nr_mem_id (0: the kernel chooses)
    kind: Kind
    interface: str | None  # the NIC behind the port (None for pipes and VALE ports)

    @property
    def register_flags(self) -> int:
        """nr_flags as sent: the name's flags plus NR_EXCLUSIVE (see the module docstring)."""
        return self.nr_flags | NR_EXCLUSIVE


def _number(text: str, spec: str, what: str, sep: str, limit: int) -> tuple[int, str]:
    """Leading decimal number of `text` (which followed `sep`) and the rest."""
    m = re.match(r"[0-9]+", text)
    if not m:
        got = repr(text[0]) if text else "the end of the name"
        raise ValueError(f"netmap port {spec!r}: expected a {what} after {sep!r} but found {got}")
    digits = m.group()
    value = int(digits) if len(digits.lstrip("0")) <= len(str(limit)) else limit + 1  # int() stops at 4300
    if value > limit:
        shown = digits if len(digits) <= 20 else digits[:17] + "..."
        raise ValueError(f"netmap port {spec!r}: {what} {shown} after {sep!r} is out of range "
                         f"(at most {limit})")
    return value, text[m.end():]


def parse_name(name: str) -> NetmapName:
    """Parse a netmap or VALE port name; raise ValueError showing the name and what is wrong."""
    spec = name[len("netmap:"):] if name.startswith("netmap:") else name
    if not spec:
        raise ValueError(f"netmap port {name!r}: no interface name")
    if spec != spec.strip() or any(c.isspace() for c in spec):
        raise ValueError(f"netmap port {name!r}: spaces are not allowed in a port name")

    # -- the part the kernel sees: interface, pipe or VALE port
    vale_prefix = ""
    rest = spec
    if ":" in spec:
        switch, _, rest = spec.partition(":")
        if not switch.startswith("vale"):
            raise ValueError(f"netmap port {name!r}: only VALE switches (vale*) may appear before ':', "
                             f"not {switch!r}")
        if switch != "vale" and not _IDENT.fullmatch(switch[4:]):
            raise ValueError(f"netmap port {name!r}: VALE switch name {switch!r} must be 'vale' followed by "
                             "letters, digits or '_'")
        vale_prefix = switch + ":"
    end = next((i for i, c in enumerate(rest) if c in _SEPARATORS), len(rest))
    base, suffix = rest[:end], rest[end:]
    kind: Kind = "vale" if vale_prefix else "nic"
    brace = next((c for c in "{}" if c in base), None)
    if brace is not None:
        parent, _, pipe_id = base.partition(brace)
        if not parent:
            raise ValueError(f"netmap port {name!r}: a pipe needs its parent's name before {brace!r}")
        if not pipe_id:
            raise ValueError(f"netmap port {name!r}: a pipe needs an identifier after {brace!r}")
        if not _IDENT.fullmatch(pipe_id):
            raise ValueError(f"netmap port {name!r}: pipe identifier {pipe_id!r} must be letters, "
                             "digits or '_'")
        if not (_IDENT if vale_prefix else _IFNAME).fullmatch(parent):
            raise ValueError(f"netmap port {name!r}: pipe parent {parent!r} must be letters, digits or '_'")
        kind = "pipe"
    elif not base:
        what = "VALE port name after ':'" if vale_prefix else "interface name"
        raise ValueError(f"netmap port {name!r}: no {what}")
    elif vale_prefix and not _IDENT.fullmatch(base):
        raise ValueError(f"netmap port {name!r}: VALE port name {base!r} must be letters, digits or '_'")
    elif not vale_prefix and not _IFNAME.fullmatch(base):
        bad = next(c for c in base if not (c.isalnum() or c in "_."))
        raise ValueError(f"netmap port {name!r}: character {bad!r} is not allowed in an interface name")
    elif not vale_prefix and len(base) > IFNAME_MAX:
        raise ValueError(f"netmap port {name!r}: interface name {base!r} is longer than {IFNAME_MAX} bytes")
    nr_name = vale_prefix + base
    if len(nr_name.encode()) > NR_NAME_MAX:
        raise ValueError(f"netmap port {name!r}: {nr_name!r} is longer than {NR_NAME_MAX} bytes")

    # -- rings
    mode, ringid = NR_REG_ALL_NIC, 0
    if suffix[:1] in ("^", "*") and kind != "nic":
        raise ValueError(f"netmap port {name!r}: {suffix[0]!r} selects host rings, which only a NIC has")
    if suffix.startswith("^"):
        if suffix[1:2].isdigit():
            mode = NR_REG_ONE_SW
            ringid, suffix = _number(suffix[1:], name, "host ring number", "^", NETMAP_RING_MASK - 1)
        else:
            mode, suffix = NR_REG_SW, suffix[1:]
    elif suffix.startswith("*"):
        mode, suffix = NR_REG_NIC_SW, suffix[1:]
    elif suffix.startswith("-"):
        mode = NR_REG_ONE_NIC
        if not suffix[1:2].isdigit():
            raise ValueError(f"netmap port {name!r}: '-' must be followed by a ring number "
                             "(interface names containing '-' cannot be opened through netmap)")
        ringid, suffix = _number(suffix[1:], name, "ring number", "-", NETMAP_RING_MASK - 1)

    # -- flags
    flags = 0
    if suffix.startswith("/"):
        m = re.match(r"/([A-Za-z]*)", suffix)
        assert m is not None
        letters, suffix = m.group(1), suffix[m.end():]
        if not letters:
            raise ValueError(f"netmap port {name!r}: '/' must be followed by flags (x, R, T)")
        for c in letters:
            if c in _MONITOR_FLAGS:
                raise ValueError(f"netmap port {name!r}: monitor flag {c!r} is not supported by nmbridge")
            if c not in _FLAGS:
                raise ValueError(f"netmap port {name!r}: unknown flag {c!r} (known: x exclusive, "
                                 "R rx rings only, T tx rings only)")
            if flags & _FLAGS[c]:
                raise ValueError(f"netmap port {name!r}: flag {c!r} given twice")
            flags |= _FLAGS[c]
        if flags & NR_RX_RINGS_ONLY and flags & NR_TX_RINGS_ONLY:
            raise ValueError(f"netmap port {name!r}: flags 'R' and 'T' exclude each other")

    # -- memory region
    mem_id = 0
    if suffix.startswith("@"):
        if suffix[1:2] and not suffix[1:2].isdigit():
            raise ValueError(f"netmap port {name!r}: '@' must be followed by a memory region number "
                             "(external memory files are not supported)")
        mem_id, suffix = _number(suffix[1:], name, "memory region number", "@", 0xFFFF)
        if mem_id == 0:
            raise ValueError(f"netmap port {name!r}: memory region numbers start at 1")

    if suffix:
        raise ValueError(f"netmap port {name!r}: unexpected {suffix!r} at the end "
                         "(the order is NAME[^|^N|*|-N][/FLAGS][@MEMID])")
    return NetmapName(spec=spec, nr_name=nr_name, nr_mode=mode, nr_ringid=ringid, nr_flags=flags,
                      mem_id=mem_id, kind=kind, interface=base if kind == "nic" else None)


def device_problem(device: str = DEVICE) -> str | None:
    """None when `device` can be opened read-write, else why not, in words."""
    if not os.path.exists(device):
        return (f"the netmap kernel module is not loaded ({device} is missing): load it with "
                "`modprobe netmap` or `insmod netmap.ko`; see https://github.com/luigirizzo/netmap "
                "(LINUX/README) to build it, or use afpacket: ports")
    if not os.access(device, os.R_OK | os.W_OK):
        st = os.stat(device)
        try:
            group = grp.getgrgid(st.st_gid).gr_name
        except KeyError:
            group = str(st.st_gid)
        return (f"permission denied on {device} (mode {stat.filemode(st.st_mode)}, group {group}): "
                f"run as root, or add this user to group {group!r} and make the device group-writable")
    return None


class _NetmapBackend:
    name = "netmap"
    user_memory = False
    # the kernel's rings: no port counters of ours; fastfwd's own counts stand in
    accounting = None

    def unavailable(self) -> str | None:
        return device_problem(DEVICE)

    def check_name(self, name: str) -> None:
        parse_name(name)

    def interface(self, name: str) -> str | None:
        return parse_name(name).interface

    def offloads_off(self, name: str) -> frozenset[str]:
        # netmap slots are wire frames: the host stack would hand its rings super-frames
        return OFFLOAD_GROUPS

    def open(self, name: str, options: OpenOptions, region: Region | None) -> Port:
        return open_port(name)

    def ring_pairs(self, name: str, options: OpenOptions) -> int:
        return ring_pairs(name)

    def open_shares(self, name: str, options: OpenOptions, region: Region | None,
                    shares: int) -> list[Port]:
        return list(open_shares(name, shares))


SYS_NET = "/sys/class/net"


def ring_pairs(name: str, sys_net: str = SYS_NET) -> int:
    """Ring pairs of a port before it opens: 1 for a port that names its rings, a pipe or a
    VALE port; for a NIC's rings, its receive queues as the kernel lists them (netmap gives a
    native driver's port one ring pair per queue).  PortError when they cannot be counted."""
    parsed = parse_name(name)
    if parsed.nr_mode != NR_REG_ALL_NIC or parsed.interface is None:
        return 1
    queues = os.path.join(sys_net, parsed.interface, "queues")
    try:
        n = sum(1 for q in os.listdir(queues) if q.startswith("rx-"))
    except OSError as e:
        raise PortError(f"netmap:{parsed.spec}: cannot count its queues in {queues}: {e.strerror}") from None
    return max(n, 1)


def open_shares(name: str, shares: int, *, device: str = DEVICE) -> list[NetmapPort]:
    """The port as `shares` registrations of one NIC ring pair each (share w: ring w); one
    share is the port as named.  PortError naming the port when it cannot be split so."""
    if shares == 1:
        return [open_port(name, device=device)]
    spec = name if ":" in name else f"netmap:{name}"
    try:
        parsed = parse_name(name)
    except ValueError as e:
        raise PortError(str(e)) from None
    if parsed.nr_mode != NR_REG_ALL_NIC or parsed.kind != "nic":
        what = {"pipe": "a pipe", "vale": "a VALE port"}.get(parsed.kind, "a port that names its rings")
        raise PortError(f"{spec}: {what} is one ring pair; workers = {shares} needs a NIC's rings "
                        "(name the interface alone)")
    from nmbridge.backends.netmap import NetmapPort

    out: list[NetmapPort] = []
    try:
        for w in range(shares):
            out.append(NetmapPort(spec, parsed.nr_name, mode=NR_REG_ONE_NIC, ringid=w,
                                  flags=parsed.register_flags, mem_id=parsed.mem_id, device=device))
            total = out[0].registration()["rx_rings"]
            if total != shares:
                raise PortError(f"{spec}: {total} ring pair{'s' if total != 1 else ''} cannot be split into "
                                f"{shares} netmap shares: a share is one ring pair (NR_REG_ONE_NIC), so "
                                f"workers = {total} or 1")
    except BaseException:
        for p in out:
            p.close()
        raise
    return out


def open_port(name: str, *, device: str = DEVICE) -> NetmapPort:
    """Open one netmap port by name; PortError naming the port and the reason when it cannot."""
    spec = name if ":" in name else f"netmap:{name}"
    try:
        parsed = parse_name(name)
    except ValueError as e:
        raise PortError(str(e)) from None
    from nmbridge.backends.netmap import NetmapPort  # the extension only when a port opens

    return NetmapPort(spec, parsed.nr_name, mode=parsed.nr_mode, ringid=parsed.nr_ringid,
                      flags=parsed.register_flags,
                      mem_id=parsed.mem_id, device=device)


BACKEND = _NetmapBackend()
