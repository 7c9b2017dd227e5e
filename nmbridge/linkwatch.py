"""Link events: follow RTMGRP_LINK for the interfaces behind a bridge's ports.

:class:`LinkWatcher` reports, per port, whether its link is operationally up, and whether
the port is *stale*: bound to an interface that has been deleted.  A socket or netmap
handle bound to an interface stays bound to that interface object (its ifindex) forever:
when the interface is deleted and a new one is created under the same name, the old port
receives and transmits nothing.  So the watcher keys on the ifindex each port was opened
on, not only on the name:

* ``RTM_DELLINK`` of that ifindex: the port is stale, ``operstate`` ``NOTPRESENT``, down;
* ``RTM_NEWLINK`` of that name with another ifindex: still stale, ``operstate``
  ``REPLACED``, down — the owner re-opens the port (``callback`` is told each time).

``link_down`` is logged at warning (an operator-visible event on an appliance: traffic
stops), ``link_up`` at info.  ``stop()`` returns promptly: the thread waits in ``select()``
on the netlink socket and a wake-up pipe, never polling.
"""

from __future__ import annotations

import contextlib
import errno
import os
import select
import socket
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import structlog

from nmbridge.links import IFF_LOWER_UP, IFF_UP, _reason, in_netns, lookup_links

log = structlog.get_logger("nmbridge.links")


@dataclass(frozen=True)
class LinkEvent:
    port: str
    ifname: str
    up: bool  # operationally up (carrier and admin up) AND the port is bound to this interface
    operstate: str  # the kernel's, or NOTPRESENT (deleted) / REPLACED (re-created, port stale)
    ifindex: int = 0  # of the interface of that name now (0: none)
    stale: bool = False  # the port is bound to an interface that was deleted: re-open it


RTMGRP_LINK = 0x1
RTM_NEWLINK = 16
RTM_DELLINK = 17
_NLMSGHDR = struct.Struct("=IHHII")
_IFINFOMSG_INDEX = struct.Struct("=BxHiII")  # family, type, index, flags, change
_OPERSTATES = ("UNKNOWN", "NOTPRESENT", "DOWN", "LOWERLAYERDOWN", "TESTING", "DORMANT", "UP")


def _parse_link_messages(data: bytes) -> Iterator[tuple[int, str, int, str, int]]:
    """(message type, ifname, flags, operstate, ifindex) per link message of a datagram."""
    from pyroute2.netlink.rtnl.ifinfmsg import ifinfmsg

    off = 0
    while off + _NLMSGHDR.size <= len(data):
        length, mtype, _flags, _seq, _pid = _NLMSGHDR.unpack_from(data, off)
        if length < _NLMSGHDR.size:
            break
        if mtype in (RTM_NEWLINK, RTM_DELLINK):
            msg: Any = ifinfmsg(data[off:off + length])
            msg.decode()
            name = msg.get_attr("IFLA_IFNAME")
            state = msg.get_attr("IFLA_OPERSTATE")
            if isinstance(state, int):
                state = _OPERSTATES[state] if state < len(_OPERSTATES) else "UNKNOWN"
            if name:
                yield mtype, str(name), int(msg["flags"]), str(state or "UNKNOWN"), int(msg["index"])
        off += (length + 3) & ~3


def link_is_up(flags: int, operstate: str) -> bool:
    """Operationally up: admin up with carrier (operstate UP, or UNKNOWN for drivers without one)."""
    return bool(flags & IFF_UP) and bool(flags & IFF_LOWER_UP) and operstate in ("UP", "UNKNOWN")


class LinkWatcher:
    """A thread that follows RTMGRP_LINK events for some interfaces (see the module doc)."""

    def __init__(self, ports: Mapping[str, str], callback: Callable[[LinkEvent], None] | None = None,
                 netns: str | None = None, indexes: Mapping[str, int] | None = None) -> None:
        """``ports`` maps interface name -> port label (``afpacket:eth1``); ``indexes`` maps
        interface name -> the ifindex its port is bound to (default: the one found at start)."""
        self.ports = dict(ports)
        self.callback = callback
        self.netns = netns
        self.indexes: dict[str, int] = dict(indexes or {})
        self.gone: set[str] = set()  # interfaces whose bound ifindex was deleted
        self.state: dict[str, LinkEvent] = {}
        self._sock: socket.socket | None = None
        self._wake_r, self._wake_w = -1, -1
        self._thread: threading.Thread | None = None

    def start(self) -> LinkWatcher:
        with in_netns(self.netns):
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, socket.NETLINK_ROUTE)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            sock.bind((0, RTMGRP_LINK))
        except BaseException:
            sock.close()
            raise
        self._sock = sock
        self._wake_r, self._wake_w = os.pipe2(os.O_CLOEXEC | os.O_NONBLOCK)
        self._seed(initial=True)  # after bind: no change between the snapshot and the first event is lost
        self._thread = threading.Thread(target=self._run, name="nmbridge-links", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        if self._thread is None:
            return
        with contextlib.suppress(OSError):
            os.write(self._wake_w, b"x")
        self._thread.join(timeout)
        self._thread = None
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        for fd in (self._wake_r, self._wake_w):
            with contextlib.suppress(OSError):
                os.close(fd)
        self._wake_r = self._wake_w = -1

    def __enter__(self) -> LinkWatcher:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _seed(self, initial: bool = False) -> None:
        try:
            states = lookup_links(list(self.ports), self.netns)
        except Exception as e:
            log.warning("link_watch_seed_failed", reason=_reason(e))
            return
        for name, st in states.items():
            if st is None:
                if initial:
                    self.state[name] = LinkEvent(self.ports[name], name, False, "NOTPRESENT")
                self._observe(name, RTM_DELLINK, 0, "NOTPRESENT", self.indexes.get(name, 0), initial)
            else:
                flags = (IFF_UP if st.admin_up else 0) | (IFF_LOWER_UP if st.lower_up else 0)
                if initial:
                    self.indexes.setdefault(name, st.index)
                self._observe(name, RTM_NEWLINK, flags, st.operstate, st.index, initial)

    def _run(self) -> None:
        assert self._sock is not None
        sock = self._sock
        fds = [sock.fileno(), self._wake_r]
        while True:
            try:
                ready, _, _ = select.select(fds, [], [])
            except OSError:
                return
            if self._wake_r in ready:
                return
            try:
                data = sock.recv(1 << 16)
            except OSError as e:
                if e.errno == errno.ENOBUFS:  # events lost: read the state afresh
                    log.warning("link_watch_overrun")
                    self._seed()
                    continue
                return
            try:
                for mtype, name, flags, operstate, index in _parse_link_messages(data):
                    if name in self.ports or (mtype == RTM_DELLINK and index in self._bound()):
                        self._observe(self._name_of(name, index, mtype), mtype, flags, operstate, index)
            except Exception as e:  # a message we cannot parse must not stop the watcher
                log.warning("link_watch_parse_failed", reason=_reason(e))

    def _bound(self) -> dict[int, str]:
        return {i: n for n, i in self.indexes.items()}

    def _name_of(self, name: str, index: int, mtype: int) -> str:
        """A DELLINK of a bound ifindex under another name (renamed, then deleted) counts for
        the port's name."""
        if mtype == RTM_DELLINK and index in self._bound():
            return self._bound()[index]
        return name

    def _observe(self, name: str, mtype: int, flags: int, operstate: str, index: int,
                 initial: bool = False) -> None:
        bound = self.indexes.get(name)
        if mtype == RTM_DELLINK:
            if bound is None or index in (bound, 0):
                self.gone.add(name)
            self._update(name, False, "NOTPRESENT", 0, name in self.gone, initial)
        elif bound is not None and index != bound:
            self.gone.add(name)  # a new interface of that name: the port is still bound to the old one
            self._update(name, False, "REPLACED", index, True, initial, always=True)
        else:
            self._update(name, link_is_up(flags, operstate), operstate, index, name in self.gone, initial)

    def _update(self, name: str, up: bool, operstate: str, index: int, stale: bool,
                initial: bool = False, always: bool = False) -> None:
        prev = self.state.get(name)
        event = LinkEvent(self.ports[name], name, up, operstate, index, stale)
        self.state[name] = event
        if initial and not stale:
            return  # the state at start is no event
        if prev == event and not always:
            return
        if prev != event and (prev is None or prev.up != up or stale):
            if up:
                log.info("link_up", port=event.port, ifname=name, operstate=operstate)
            else:
                note = {"NOTPRESENT": "interface deleted: the port is re-opened when it is back",
                        "REPLACED": "interface re-created: re-opening the port"}.get(operstate)
                log.warning("link_down", port=event.port, ifname=name, operstate=operstate,
                            **({"note": note} if note and stale else {}))
        elif not always:
            return
        if self.callback is not None:
            try:
                self.callback(event)
            except Exception as e:
                log.error("link_callback_failed", ifname=name, reason=_reason(e))
