"""Pairs that are down come back by themselves: a retry schedule and the healer that runs it.

A pair is **down** when it cannot forward and the bridge knows why:

* *kept*: its pair object still runs, but a port is bound to an interface that was deleted
  (``link_down`` ``NOTPRESENT``) or re-created and not re-opened yet (a relink failed: the
  new interface not there any more, locked by another bridge, too few queues, …).  A retry
  is a relink (:func:`nmbridge.reload.relink`); its counters stay in ``nmbridge stats``;
* *lost*: its ports are closed — its forwarder failed (``pair_failed``), or a reload or
  relink closed its old ports to re-open them and could open neither the new nor the old
  ones (``pair_lost``).  Its config stays in the bridge's config; a retry opens it afresh
  (the same transaction as a reload that adds it: links looked up, checked, locked, set up;
  ports opened; filters; start).

Retries (:func:`retry_delay`): 0.5 s after the pair went down, then doubling — 1, 2, 4, 8,
16 s — to a cap of 30 s.  The first is short because the common causes clear at once (a
script re-creating a veth in two steps, a transient EBUSY); doubling keeps a NIC that stays
gone at one cheap attempt (a few netlink look-ups) per 30 s; the cap bounds how long a pair
stays down after a cause the link watcher cannot see has gone (a lock released, a queue
freed).  A link event on one of a down pair's interfaces (it appears, is re-created, comes
up) makes the next attempt due at once and starts the doubling again from 0.5 s — but never
two attempts of one pair less than :data:`MIN_GAP` apart, so a flapping link cannot spin
the main thread.  A pair that goes down again less than :data:`STABLE` seconds after it was
restored resumes its backoff where it stopped (a forwarder that fails at once, each time,
is retried every 30 s, not every 0.5 s).

What the operator sees: ``pair_down`` (warning: reason, ``retry_in``) when it goes down,
``pair_retry_failed`` (warning: attempt, error, ``retry_in``) for an attempt that fails for a
new reason (debug when the reason is the same as before), ``pair_still_down`` (warning) with
each round of ``stats`` events,
``pair_restored`` (info: how long it was down, the attempts, the reason it was down) when it
forwards again; ``down`` in ``nmbridge stats``/``ports`` and in the snapshot,
``nmbridge_pair_up`` 0 in the metrics, the pairs down in systemd's STATUS line.

Everything here runs in the main thread (events are queued by the link watchers' and
forwarding threads); other threads only read :meth:`Healer.snapshot`.  The schedule is pure
(:class:`Down` and the functions over it), tested without root.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from nmbridge.backends import backend
from nmbridge.config import PairConfig
from nmbridge.errors import NmbridgeError
from nmbridge.linkwatch import LinkEvent, LinkWatcher
from nmbridge.stats import DownStats

if TYPE_CHECKING:
    from nmbridge.app import Bridge, _Pair

FIRST_DELAY = 0.5  # seconds from going down to the first retry
MAX_DELAY = 30.0  # the cap of the doubling
MIN_GAP = 0.5  # seconds between two attempts on one pair, whatever asks for them
STABLE = 30.0  # up this long after a restore: healed, a next loss starts the backoff afresh


def retry_delay(failed: int) -> float:
    """Seconds to the next attempt after `failed` failed attempts: 0.5, 1, 2, … 30, 30."""
    if failed >= 16:  # 0.5 * 2**16 is far past the cap (and no float overflow for large counts)
        return MAX_DELAY
    return min(MAX_DELAY, FIRST_DELAY * float(2 ** max(0, failed)))


@dataclass
class Down:
    """One pair that is down (see the module doc)."""

    config: PairConfig
    reason: str
    since: float  # monotonic: when it went down
    kept: _Pair | None = None  # still running, on a stale port (a relink retries); None: lost
    failed: int = 0  # failed attempts since it went down (or since a link event)
    next_at: float = 0.0  # monotonic: the next attempt
    last_try: float | None = None
    attempts: int = 0  # every attempt since it went down
    watcher: LinkWatcher | None = field(default=None, repr=False)  # lost pairs: their interfaces


def went_down(d: Down, now: float, resumed: int = 0) -> None:
    """`d` just went down (`resumed`: the failed count to go on from, see STABLE)."""
    d.since = now
    d.failed = resumed
    d.next_at = now + retry_delay(resumed)


def attempt_failed(d: Down, now: float) -> None:
    d.failed += 1
    d.last_try = now
    d.next_at = now + retry_delay(d.failed)


def link_changed(d: Down, now: float) -> None:
    """An interface of `d` appeared, was re-created or came up: try at once (MIN_GAP after the
    last attempt at the earliest), doubling again from the start."""
    d.failed = 0
    earliest = now if d.last_try is None else d.last_try + MIN_GAP
    d.next_at = min(d.next_at, max(now, earliest))


def due(downs: dict[str, Down], now: float) -> list[str]:
    """The pairs whose next attempt is due, soonest first."""
    return [n for n, d in sorted(downs.items(), key=lambda kv: kv[1].next_at) if d.next_at <= now]


def next_due(downs: dict[str, Down]) -> float | None:
    return min((d.next_at for d in downs.values()), default=None)


class Healer:
    """The down pairs of one bridge and their retries (main thread; see the module doc)."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.down: dict[str, Down] = {}  # replaced, never changed in place: other threads read it
        self._restored: dict[str, tuple[float, int]] = {}  # name -> (when, failed count then)

    # --- going down ------------------------------------------------------------------------

    def pair_down(self, pc: PairConfig, reason: str, kept: _Pair | None) -> Down:
        """Pair `pc` is down (again): log it the first time, schedule its retry."""
        now = time.monotonic()
        d = self.down.get(pc.name)
        if d is None:
            d = Down(pc, reason, now, kept)
            when, failed = self._restored.pop(pc.name, (None, 0))
            went_down(d, now, failed + 1 if when is not None and now - when < STABLE else 0)
            self.down = {**self.down, pc.name: d}
            self.bridge.log.warning("pair_down", pair=pc.name, reason=reason,
                                    state="stale" if kept is not None else "closed",
                                    retry_in=round(d.next_at - now, 3),
                                    note="retried with a backoff, and at once when its links change")
            self._status()
        else:
            d.config, d.reason = pc, reason
        if kept is None and d.kept is not None:
            d.kept = None
        elif kept is not None:
            d.kept = kept
        if d.kept is None and d.watcher is None:
            d.watcher = self._watch(pc)
        return d

    def failed(self, p: _Pair) -> None:
        """A forwarder of `p` failed (the pair's workers stopped): close it, retry it."""
        b = self.bridge
        if not any(x is p for x in b.pairs):
            return  # replaced or closed meanwhile
        b.close_pairs([p])
        b.pairs = [x for x in b.pairs if x is not p]
        self.pair_down(p.config, p.error or "its forwarder failed", None)

    def lost(self, p: _Pair, error: str) -> None:
        """A reload or relink closed `p`'s ports and could not open any again."""
        self.pair_down(p.config, error, None)

    # --- the retries -------------------------------------------------------------------------

    def relink(self, name: str) -> None:
        """A link event said a port of pair `name` is stale (its interface deleted or
        re-created): re-open it now."""
        d = self.down.get(name)
        if d is not None:
            now = time.monotonic()
            link_changed(d, now)
            if d.next_at <= now:
                self._attempt(name, d)
            return
        from nmbridge import reload

        err = reload.relink(self.bridge, name)
        if err is not None:
            p = next((x for x in self.bridge.pairs if x.config.name == name), None)
            if p is not None:
                self.pair_down(p.config, err, p)

    def link_event(self, name: str, ev: LinkEvent) -> None:
        """An interface of a lost pair appeared, was re-created or came up."""
        d = self.down.get(name)
        if d is None or ev.operstate == "NOTPRESENT":
            return
        link_changed(d, time.monotonic())

    def next_due(self) -> float | None:
        return next_due(self.down)

    def run_due(self) -> None:
        for name in due(self.down, time.monotonic()):
            d = self.down.get(name)
            if d is not None:
                self._attempt(name, d)

    def _attempt(self, name: str, d: Down) -> None:
        from nmbridge import reload

        b = self.bridge
        now = time.monotonic()
        if d.last_try is not None and now - d.last_try < MIN_GAP:
            d.next_at = max(d.next_at, d.last_try + MIN_GAP)
            return
        d.last_try = now
        d.attempts += 1
        try:
            if d.kept is not None and any(x is d.kept for x in b.pairs):
                err = reload.relink(b, name)
            else:
                d.kept = None
                err = self._reopen(d)
        except Exception as e:  # a retry must never end the bridge: it is one more failure
            err = f"{type(e).__name__}: {e}"
            b.log.error("pair_retry_crashed", pair=name, error=err)
        if err is None:
            self.restored(name)
            return
        if name not in self.down:  # forgotten meanwhile
            return
        if d.kept is not None and not any(x is d.kept for x in b.pairs):
            d.kept = None  # the relink closed it: lost now
            if d.watcher is None:
                d.watcher = self._watch(d.config)
        now = time.monotonic()
        attempt_failed(d, now)
        same, d.reason = err == d.reason, err
        # a new reason is a warning; the same one again only says when the next attempt is
        # (debug: `nmbridge stats` shows the attempts and the next one at any time)
        (b.log.debug if same else b.log.warning)("pair_retry_failed", pair=name, attempt=d.attempts,
                                                 error=err, retry_in=round(d.next_at - now, 3))

    def _reopen(self, d: Down) -> str | None:
        """Open a lost pair afresh; None when it forwards, else why not."""
        from nmbridge import reload

        b = self.bridge
        pc = d.config
        try:
            self._forget_replaced(pc)
            compiled = {pc.name: b.compile(pc, b.config)}
            reload.swap_pairs(b, [pc], compiled, {}, [], list(b.config.pairs))
        except (NmbridgeError, OSError, ValueError) as e:
            return str(e) or type(e).__name__
        return None

    def _forget_replaced(self, pc: PairConfig) -> None:
        """Interfaces of `pc` held for it that were deleted (or re-created) while it was down:
        their records and locks describe an interface that is gone."""
        from nmbridge.links import lookup_links

        b = self.bridge
        held = [i for i in _interfaces(pc) if i in b.locks.held]
        if not held:
            return
        now = lookup_links(held)
        gone = [n for n in held if now[n] is None or n not in b.links.states
                or now[n].index != b.links.states[n].index]  # type: ignore[union-attr]
        if gone:
            b.links.forget(gone)
            b.locks.release(gone)

    # --- coming back, going away -----------------------------------------------------------

    def restored(self, name: str) -> None:
        d = self.down.get(name)
        if d is None:
            return
        self._drop(name)
        now = time.monotonic()
        self._restored[name] = (now, d.failed)
        self.bridge.log.info("pair_restored", pair=name, down_seconds=round(now - d.since, 3),
                             attempts=d.attempts, was=d.reason)
        self._status()

    def forget(self, name: str) -> None:
        """A reload removed the pair: no more retries."""
        if name in self.down:
            self._drop(name)
            self._status()

    def update(self, pc: PairConfig) -> None:
        """A reload gave a lost pair a new config: the next attempt uses it, at once."""
        d = self.down.get(pc.name)
        if d is not None:
            d.config = pc
            d.next_at = time.monotonic()
            if d.watcher is not None and _interfaces(pc) != set(d.watcher.ports):
                d.watcher.stop()
                d.watcher = self._watch(pc)

    def sync(self) -> None:
        """After a reload: a kept pair that it restarted forwards (restored), one it removed is
        forgotten."""
        for name, d in list(self.down.items()):
            if d.kept is None or any(x is d.kept for x in self.bridge.pairs):
                continue
            if any(x.config.name == name for x in self.bridge.pairs):
                self.restored(name)
            elif all(pc.name != name for pc in self.bridge.config.pairs):
                self.forget(name)

    def lost_names(self) -> set[str]:
        return {n for n, d in self.down.items() if d.kept is None}

    def close(self) -> None:
        for d in self.down.values():
            if d.watcher is not None:
                d.watcher.stop()
                d.watcher = None

    def _drop(self, name: str) -> None:
        down = dict(self.down)
        d = down.pop(name)
        self.down = down
        if d.watcher is not None:
            d.watcher.stop()
            d.watcher = None

    def _watch(self, pc: PairConfig) -> LinkWatcher | None:
        """Follow a lost pair's interfaces by name: any change queues ("heal", pair)."""
        ports = {}
        for spec in pc.ports:
            ifname = backend(spec.backend).interface(spec.name)
            if ifname:
                ports[ifname] = str(spec)
        if not ports:
            return None
        name, events = pc.name, self.bridge.events

        def on_event(ev: LinkEvent) -> None:  # the watcher's thread: only queue
            events.put(("heal", (name, ev)))

        try:
            return LinkWatcher(ports, on_event).start()
        except OSError as e:
            self.bridge.log.warning("link_watch_failed", pair=pc.name, reason=str(e),
                                    note="retried on its backoff only")
            return None

    def _status(self) -> None:
        b = self.bridge
        b.notifier.status(b.status())

    # --- what other threads read -----------------------------------------------------------

    def snapshot(self) -> list[DownStats]:
        now = time.monotonic()
        return [DownStats(pair=n, ports=[str(s) for s in d.config.ports], reason=d.reason,
                          state="stale" if d.kept is not None else "closed",
                          down_seconds=round(now - d.since, 3), attempts=d.attempts,
                          retry_in=round(max(0.0, d.next_at - now), 3))
                for n, d in list(self.down.items())]

    def describe(self) -> dict[str, Any]:
        """{pair: reason} for the ``stopped`` event."""
        return {n: d.reason for n, d in self.down.items()}


def _interfaces(pc: PairConfig) -> set[str]:
    return {i for s in pc.ports if (i := backend(s.backend).interface(s.name))}
