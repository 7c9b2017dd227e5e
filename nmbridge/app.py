"""``nmbridge run``: the life of a bridge — check, set up links, open ports, forward, stop.

Life of a run (each step is one method of :class:`Bridge`, in this order)::

    preflight -> set_up_links -> open_ports -> install_filters -> start -> serve_ops -> wait -> stop -> close
    backends,    lock, look up,   all-or-nothing  per pair and      a thread   control socket   SIGINT/SIGTERM
    filters,     check, set up                    direction         per pair   served, metrics,
    control      each interface                                                READY=1

Everything that can fail without touching a link fails in ``preflight`` or in the look-up and
checks of ``set_up_links``, before the first change.  The main thread owns the signals and
sleeps on a queue (``events``) between timer ticks; everything that changes the running
bridge happens there.  Forwarding threads only run ``Forwarder.run()`` (GIL-free) and report
back through the same queue when they fail; link watchers report re-created interfaces the
same way.  Other threads (metrics scrapes, control requests) only read :meth:`snapshot`.
Nothing is logged per packet.

The pieces, each readable and testable alone:

* ``app`` (this module): :class:`Bridge` — its pairs (open, start, stop), the links it holds
  (one :class:`LinkManager` for every interface, with a lock and a persisted restore record
  each: :mod:`nmbridge.runstate`) and :meth:`Bridge.snapshot`;
* :mod:`nmbridge.reload`: a reload as a plan (a pure diff of two configs) applied as a
  transaction; the same transaction re-opens the ports of a re-created interface;
* :mod:`nmbridge.ops`: control socket commands, metrics, stats events, the main loop, signals.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Any

from nmbridge import caps, sched
from nmbridge import filters as filters_module
from nmbridge.backends import OpenOptions, PortSet, PortSpec, backend, ring_pairs
from nmbridge.config import Config, PairConfig, workers_for
from nmbridge.errors import NmbridgeError, PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.healing import Healer
from nmbridge.links import LinkManager, pair_links
from nmbridge.linkwatch import LinkEvent, LinkWatcher
from nmbridge.logs import get_logger
from nmbridge.ops import Ops, port_info
from nmbridge.port import Port
from nmbridge.runstate import InterfaceLocks, state_dir
from nmbridge.sdnotify import Notifier
from nmbridge.stats import (
    DirectionStats,
    PairStats,
    Snapshot,
    WorkerStats,
    drain_report,
    final_counters,
    final_report,
    sum_directions,
    worker_directions,
)
from nmbridge.workers import FilterCopies, Workers

JOIN_TIMEOUT = 10.0  # seconds a forwarding thread gets to return after stop()
DIRECTIONS = ("a_to_b", "b_to_a")


@dataclass
class _Pair:
    """A pair while it runs: its config, its two open ports (share 0 of each, with several
    workers: ``fwd.a_shares``/``fwd.b_shares`` has every share), its workers and their
    threads, the watcher of its links, and the filter compiled for it per direction."""

    config: PairConfig
    a: Port
    b: Port
    fwd: Workers
    threads: list[threading.Thread] = field(default_factory=list)
    error: str | None = field(default=None)
    watcher: LinkWatcher | None = None
    filters: dict[str, Any] = field(default_factory=dict)  # direction -> CompiledFilter
    # direction -> rule hits of the filters of that name swapped out by reloads
    hits_base: dict[str, dict[str, int]] = field(default_factory=dict)


class Bridge:
    """Every pair of one Config, forwarding.  ``run()`` does it all; the steps are public."""

    def __init__(self, config: Config, link_setup: bool = True, *, control_path: str | None = None,
                 notifier: Notifier | None = None, log_level_fixed: bool = False,
                 state_directory: str | None = None) -> None:
        """`control_path`: the control socket (None: ``[control] socket``; "": none).
        `log_level_fixed`: the command line set the log level, so a reload leaves it.
        `state_directory`: where interface locks and restore records live (None:
        ``$NMBRIDGE_STATE_DIR``, else /run/nmbridge)."""
        self.config = config
        self.link_setup = link_setup  # False: --no-link-setup, interfaces only looked up and checked
        self.control_path = control_path
        self.notifier = notifier if notifier is not None else Notifier()
        self.log_level_fixed = log_level_fixed
        self.log = get_logger(bridge=config.bridge.name)
        b = config.bridge
        self.portset = PortSet(OpenOptions(slots=b.ring_slots, buf_size=b.buf_size))
        self.locks = InterfaceLocks(state_directory or state_dir())
        self.links = LinkManager(b.buf_size, store=self.locks.save)
        # replaced, never changed in place, by the main thread: other threads may iterate it
        self.pairs: list[_Pair] = []
        # ("signal", name), ("failed", _Pair), ("hup", ""), ("usr1", ""), ("reload", _Request),
        # ("relink", pair name), ("heal", (pair name, LinkEvent))
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.ops = Ops(self)
        self.heal = Healer(self)  # the pairs that are down, and their retries
        self._opened = False  # the ports opened at start: a stop logs `stopped`
        self._compiled: dict[str, dict[str, Any]] | None = None  # by preflight, for install_filters
        self._fail_lock = threading.Lock()  # the first failing worker of a pair names the error

    # --- the steps ----------------------------------------------------------------------

    def preflight(self) -> None:
        """Everything checkable before a link is touched (capabilities and the config were
        checked by the caller): each port's backend is in this build, each filter compiles,
        the control socket can be made (it is, and served).
        Links are looked up, checked and locked by ``set_up_links`` before it changes any."""
        check_backends(self.config.pairs)
        self._compiled = {p.name: self.compile(p, self.config) for p in self.config.pairs}
        self.ops.bind_control()

    def set_up_links(self) -> None:
        """Look up, check and lock every interface; bring it up, promiscuous, offloads off where
        link set-up is on.  All or nothing; ``restore_links`` undoes it."""
        self.hold_links(self.config.pairs)

    def hold_links(self, pcs: Iterable[PairConfig], retake: Collection[str] = ()) -> list[str]:
        """Set up (and lock) the interfaces of `pcs` this bridge does not hold yet; those it
        holds (for running pairs) are looked up and checked, never touched again — a pair
        that restarts on an interface that was down does not bounce it — except those in
        `retake` (a pair whose link_setup was turned on).  Returns the names newly held;
        raises with nothing changed."""
        pls = [pair_links(p.name, list(p.ports), self.link_setup and p.link_setup) for p in pcs]
        before = set(self.locks.held)
        try:
            self.links.setup(pls, held=before - set(retake), before_change=self.locks.acquire)
        except BaseException:
            self.release_links(set(self.locks.held) - before)
            raise
        return [n for n in self.locks.held if n not in before]

    def release_links(self, names: Collection[str]) -> None:
        """Restore and unlock some interfaces (no pair uses them any more)."""
        if names:
            self.links.restore(names)
            self.locks.release(names)

    def unused_links(self, pcs: Iterable[PairConfig]) -> set[str]:
        """The interfaces held that none of `pcs` uses."""
        used = {i for p in pcs for s in p.ports if (i := backend(s.backend).interface(s.name))}
        return set(self.locks.held) - used

    def restore_links(self) -> None:
        """Give every interface back its original state: exactly what set-up changed."""
        for p in self.pairs:
            _stop_watcher(p)
        self.links.restore()
        self.locks.release(list(self.locks.held))

    def open_ports(self) -> None:
        """Open every port of every pair in one PortSet, all or nothing."""
        self.pairs = self.open_pairs(self.config.pairs)

    def open_pairs(self, pcs: tuple[PairConfig, ...] | list[PairConfig]) -> list[_Pair]:
        """Open the ports of some pairs, all or nothing, and watch their links."""
        owner: dict[PortSpec, PairConfig] = {}
        for p in pcs:
            for spec in p.ports:
                owner[spec] = p
        check_backends(pcs)
        try:
            rings = {p.name: [self.ring_pairs(s) for s in p.ports] for p in pcs}
            counts = {p.name: workers_for(p, *rings[p.name]) for p in pcs}
            shares = self.portset.open_shares([s for p in pcs for s in p.ports],
                                              [counts[p.name] for p in pcs for _ in p.ports])
        except PortError as e:
            failed = self.portset.failed
            if failed is None:
                raise
            prefix = f"pair {owner[failed].name}: port {failed}"
            message = str(e).removeprefix(f"{failed}: ")
            raise PortError(f"{prefix}: {message}") from None
        opened: list[_Pair] = []
        try:
            for i, p in enumerate(pcs):
                a, b = shares[2 * i], shares[2 * i + 1]
                for spec, port in ((p.a, a), (p.b, b)):
                    extra = {"workers": len(port)} if len(port) > 1 else {}
                    self.log.info("port_opened", pair=p.name, port=str(spec), **port_info(port[0]), **extra)
                pair = _Pair(p, a[0], b[0], self._workers(a, b, p, rings[p.name]))
                opened.append(pair)
                self._watch(pair)
        except BaseException:
            for pair in opened:
                _stop_watcher(pair)
            self.portset.close_ports(port for ps in shares for port in ps)
            raise
        return opened

    def ring_pairs(self, spec: PortSpec) -> int:
        """Ring pairs of a port, as its backend counts them before opening (1 when it cannot)."""
        try:
            return ring_pairs(backend(spec.backend), spec.name, self.portset.options)
        except Exception:  # an interface that is not there yet: opening it says so
            return 1

    def _watch(self, p: _Pair) -> None:
        """Follow the links behind the pair's ports, each by the ifindex its port is bound to."""
        ports = {}
        for spec in p.config.ports:
            ifname = backend(spec.backend).interface(spec.name)
            if ifname:
                ports[ifname] = str(spec)
        if not ports:
            return
        indexes = {n: self.links.states[n].index for n in ports if n in self.links.states}
        name = p.config.name

        def on_event(ev: LinkEvent) -> None:  # the watcher's thread: only queue
            if ev.stale:  # deleted (the pair is down) or re-created (re-open it)
                self.events.put(("relink", name))

        p.watcher = LinkWatcher(ports, on_event, indexes=indexes).start()

    def install_filters(self) -> None:
        """Compile each pair's filters, one program per pair and direction (each forwarding
        thread counts rule hits in its own), and hand them to its forwarder."""
        compiled = self._compiled or {}
        self._compiled = None
        for p in self.pairs:
            got = compiled.get(p.config.name)
            self.set_filters(p, got if got is not None else self.compile(p.config, self.config))

    def compile(self, p: PairConfig, cfg: Config, workers: int | None = None) -> dict[str, Any]:
        """One program per direction and worker (`workers`: of the running pair; None: as many
        as the pair will start with); a pair of several workers gets FilterCopies."""
        wanted = p.filters
        if not wanted:
            return {}
        compile_filter = getattr(filters_module, "compile_filter", None)
        if compile_filter is None:  # the filter compiler is not in yet (issue 5): fail closed
            name = next(iter(wanted.values()))
            raise NmbridgeError(f'pair {p.name}: filter "{name}" cannot run: this build has no '
                                "filter compiler yet")
        n = workers if workers is not None else workers_for(p, *(self.ring_pairs(s) for s in p.ports))
        if n == 1:
            return {d: compile_filter(cfg.filters[name]) for d, name in wanted.items()}
        return {d: FilterCopies([compile_filter(cfg.filters[name]) for _ in range(n)])
                for d, name in wanted.items()}

    def set_filters(self, p: _Pair, compiled: dict[str, Any]) -> None:
        for d in DIRECTIONS:
            old, new = p.filters.get(d), compiled.get(d)
            if old is None and new is None:
                continue
            if old is not None and new is not None and old.name == new.name:
                base = p.hits_base.get(d, {})  # the same filter, edited: its rules' totals go on
                p.hits_base[d] = {r: base.get(r, 0) + n for r, n in old.hits().items()}
            else:
                p.hits_base.pop(d, None)
            p.fwd.set_filter(d, new)  # between batches; returns once `old` is out of use
            if new is None:
                p.filters.pop(d, None)
            else:
                p.filters[d] = new

    def start(self) -> None:
        self.ops.start_stats()
        for p in self.pairs:
            self.start_pair(p)

    def start_pair(self, p: _Pair) -> None:
        n = len(p.fwd)
        p.threads = [threading.Thread(target=self._forward, args=(p, w), daemon=True,
                                      name=f"fwd-{p.config.name}" + (f"-{w}" if n > 1 else ""))
                     for w in range(n)]
        for t in p.threads:
            t.start()
        extra = {"workers": p.fwd.describe()} if n > 1 or p.fwd.cpus else {}
        self.log.info("forwarding", pair=p.config.name, ports=[str(s) for s in p.config.ports],
                      direction=p.config.direction, zero_copy=p.fwd.zerocopy,
                      filters=p.config.filters, **extra)

    def _forward(self, p: _Pair, w: int) -> None:
        """Worker w of pair p (its own thread): pinned to its CPU, then forwarding until
        stopped.  The first worker that fails stops the others: the pair fails as one."""
        fwd = p.fwd.forwarders[w]
        try:
            p.fwd.pin(w)
            threads = sum(len(q.fwd) for q in self.pairs)  # the bridge's forwarding threads
            spins = any(port.spin_us for port in (*p.fwd.a_shares, *p.fwd.b_shares) if not port.closed)
            got = sched.enter_forwarding(self.config.bridge, self.log, threads=threads, spins=spins)
            fwd.spin_us = got.spin_us
            fwd.run()
        except Exception as e:  # PortError mostly; anything else must stop the bridge too
            with self._fail_lock:
                first = p.error is None
                if first:
                    why = str(e) or type(e).__name__
                    p.error = f"worker {w}: {why}" if len(p.fwd) > 1 else why
            if first:
                p.fwd.stop()  # the pair stops as a whole
                self.log.error("pair_failed", pair=p.config.name, error=p.error)
                self.events.put(("failed", p))  # the main thread closes it and retries it

    def serve_ops(self) -> None:
        """The control socket and the metrics endpoint, then READY=1 to systemd."""
        self.ops.serve()

    def close_ops(self) -> None:
        self.ops.close()

    def wait(self) -> None:
        """Until a signal or a failed pair (see :meth:`nmbridge.ops.Ops.wait`)."""
        self.ops.wait()

    def log_stats(self) -> None:
        self.ops.log_stats()

    # --- pairs a reload or a re-created interface changes (main thread) ------------------

    def pause_pairs(self, pairs: list[_Pair]) -> None:
        """Stop the forwarders of some pairs and join them; ports stay open (frames wait in
        the kernel's rings)."""
        self.join(pairs)

    def _forwarder(self, a: Port, b: Port, pc: PairConfig) -> Forwarder:
        """A forwarder for pair `pc` over ports a, b (the config says ``a_to_b``; fastfwd
        takes ``a-to-b``)."""
        return Forwarder(a, b, burst=self.config.bridge.burst, direction=pc.direction.replace("_", "-"),
                         poll_timeout_ms=self.config.bridge.poll_timeout_ms)

    def _workers(self, a: list[Port], b: list[Port], pc: PairConfig, rings: list[int]) -> Workers:
        """Pair `pc`'s workers over the shares of its ports (one forwarder each)."""
        return Workers(a, b, lambda x, y: self._forwarder(x, y, pc), cpus=pc.cpus,
                       rings=(max(rings[0], len(a)), max(rings[1], len(b))))

    def resume_pair(self, p: _Pair) -> None:
        """Forward again on a paused pair's open ports (a forwarder's stop is final: a new one,
        whose counters start at 0; the old one's are logged)."""
        self.log.warning("pair_resumed", pair=p.config.name, counters=final_counters(p.fwd, p.a, p.b),
                         note="forwarding again on the same ports; counters restart")
        p.fwd = Workers(p.fwd.a_shares, p.fwd.b_shares, lambda x, y: self._forwarder(x, y, p.config),
                        cpus=p.fwd.cpus, rings=p.fwd.rings)
        p.error = None
        compiled, p.filters = p.filters, {}
        self.set_filters(p, compiled)
        self.start_pair(p)

    def close_pairs(self, pairs: list[_Pair]) -> None:
        """Stop, join and close some pairs (their links stay: see ``release_links``)."""
        pairs = [p for p in pairs if not (p.a.closed and p.b.closed)]  # closed already
        self.join(pairs)
        for p in pairs:
            _stop_watcher(p)
            if _alive(p):
                self.log.error("threads_stuck", pairs=[p.config.name], note="ports left open")
            else:
                self.portset.close_ports([*p.fwd.a_shares, *p.fwd.b_shares])
            counters, workers = final_report(p.fwd, p.a, p.b)  # closed: what is left is `stopped`
            self.log.info("pair_stopped", pair=p.config.name, counters=counters, drain=drain_report(p.fwd),
                          **({"workers": workers} if workers else {}))

    def join(self, pairs: list[_Pair]) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in pairs:  # stop() is sticky: a stop before run() has started still counts
            p.fwd.stop()
        for p in pairs:
            for t in p.threads:
                t.join(timeout=max(0.0, deadline - time.monotonic()))

    def status(self) -> str:
        """systemd's STATUS line: the pairs forwarding, and those down (retried)."""
        down = self.heal.down
        up = [p.config.name for p in self.pairs if p.config.name not in down]
        n = len(up)
        text = f"forwarding {n} pair{'s' if n != 1 else ''}" + (f": {', '.join(up)}" if up else "")
        if down:
            text += f"; down, retrying: {', '.join(down)}"
        return text

    def reload(self, source: str) -> dict[str, Any]:
        """Re-read the config file and apply what changed, all or nothing (main thread only):
        see :mod:`nmbridge.reload`."""
        from nmbridge import reload

        return reload.reload(self, source)

    def relink(self, pair: str) -> None:
        """A port of `pair` is stale (its interface deleted or re-created): re-open it, or
        keep the pair down and retry it (main thread only; see :mod:`nmbridge.healing`)."""
        self.heal.relink(pair)

    def stop(self) -> None:
        """Stop every forwarder at a batch boundary and join its thread."""
        self.notifier.stopping()
        self.join(self.pairs)

    def close(self) -> None:
        """Close the ports (unless a thread still runs on them) and restore the links."""
        self.close_ops()
        self.heal.close()
        stuck = [p.config.name for p in self.pairs if _alive(p)]
        for p in self.pairs:
            _stop_watcher(p)
        if stuck:
            self.log.error("threads_stuck", pairs=stuck, note="ports left open")
        else:
            self.portset.close()
        self.restore_links()

    # --- all of it ----------------------------------------------------------------------

    def run(self) -> None:
        """Forward until SIGINT/SIGTERM (a pair that fails or is lost meanwhile is retried:
        :mod:`nmbridge.healing`); raise if the start fails.  Once the ports opened, every
        stop logs ``stopped``: the counters of the pairs running, and the pairs down."""
        c = self.config
        self.log.info("starting", config=c.path, pairs={p.name: [str(s) for s in p.ports] for p in c.pairs},
                      backends=sorted({s.backend for p in c.pairs for s in p.ports}))
        with self.ops.signals():
            try:
                self.preflight()
                self.set_up_links()
                self.open_ports()
                self._opened = True
                self.install_filters()
                self.start()
                self.serve_ops()
                self.wait()
            finally:
                down = self.heal.describe()
                self.stop()
                self.close()
                if self._opened:
                    reports = {p.config.name: final_report(p.fwd, p.a, p.b) for p in self.pairs}
                    workers = {name: w for name, (_, w) in reports.items() if w}
                    failed = {p.config.name: p.error for p in self.pairs if p.error}  # while stopping
                    self.log.info("stopped", counters={name: c for name, (c, _) in reports.items()},
                                  drain={p.config.name: drain_report(p.fwd) for p in self.pairs},
                                  **({"workers": workers} if workers else {}),
                                  **({"down": {**down, **failed}} if down or failed else {}))

    # --- stats --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every pair's C counters, filters and rule hits, and the link states, now."""
        pairs: list[PairStats] = []
        links: dict[str, bool] = {}
        modes: dict[str, str] = {}
        for p in list(self.pairs):
            for spec, port in zip(p.config.ports, (p.a, p.b), strict=True):
                mode = getattr(port, "mode", None) if not port.closed else None
                if isinstance(mode, str):
                    modes[str(spec)] = mode
            per = worker_directions(p.fwd, p.a, p.b)
            dirs: dict[str, DirectionStats] = {}
            for d, s in sum_directions(per).items():
                f = p.filters.get(d)
                s["filter"] = f.name if f is not None else None
                if f is not None:
                    base = p.hits_base.get(d, {})
                    s["rule_hits"] = {r: base.get(r, 0) + n for r, n in f.hits().items()}
                dirs[d] = s
            workers = [WorkerStats(worker=w["worker"], cpu=w["cpu"], rings=w["rings"], directions=wd)
                       for w, wd in zip(p.fwd.describe(), per, strict=True)]
            pairs.append(PairStats(pair=p.config.name, ports=[str(s) for s in p.config.ports],
                                   zerocopy=bool(p.fwd.zerocopy), directions=dirs, workers=workers))
            if p.watcher is not None:
                links.update({ev.port: ev.up for ev in dict(p.watcher.state).values()})
        for gone in list(self.heal.down.values()):  # down, its ports closed: none carries frames
            if gone.kept is None:
                links.update({str(s): False for s in gone.config.ports
                              if backend(s.backend).interface(s.name)})
        snap = Snapshot(time=time.monotonic(), pairs=pairs, links=links, modes=modes,
                        captures=[c.info() for c in list(self.ops.captures.values())])
        down = self.heal.snapshot()
        if down:
            snap["down"] = down
        return snap


def required_capabilities(config: Config, link_setup: bool) -> list[tuple[int, str]]:
    """(capability, what needs it) for running `config`."""
    need: list[tuple[int, str]] = []
    specs = [s for p in config.pairs for s in p.ports]
    if any(s.backend == "afpacket" for s in specs):
        need.append((caps.CAP_NET_RAW, "afpacket: ports"))
    if any(s.backend == "afxdp" for s in specs):
        from nmbridge.backends.afxdp_backend import needed_capabilities

        # the UMEM is the region's buffer pool: room for twice the user-memory ports (reload)
        b = config.bridge
        n_user = sum(1 for s in specs if backend(s.backend).user_memory)
        need.extend(needed_capabilities(2 * n_user * 2 * b.ring_slots * b.buf_size))
    if link_setup and any(p.link_setup and any(backend(s.backend).interface(s.name) for s in p.ports)
                          for p in config.pairs):
        need.append((caps.CAP_NET_ADMIN, "link set-up; or run --no-link-setup"))
    return need


def check_capabilities(config: Config, link_setup: bool) -> None:
    """Raise NmbridgeError, one line naming each missing capability and what needs it."""
    message = caps.require_for(required_capabilities(config, link_setup), "nmbridge run")
    if message is not None:
        raise NmbridgeError(message)


def check_backends(pcs: Iterable[PairConfig]) -> None:
    """Every port's backend is in this build (PortError naming pair and port).  Whether it
    can run here (capabilities, extension built) is the capability check's (cli) and the
    port's own, at open."""
    for p in pcs:
        for spec in p.ports:
            try:
                backend(spec.backend)
            except ImportError as e:  # a backend whose issue is still open
                raise PortError(f"pair {p.name}: port {spec}: the {spec.backend} backend is not in "
                                f"this build ({e})") from None


def _alive(p: _Pair) -> bool:
    return any(t.is_alive() for t in p.threads)


def _stop_watcher(p: _Pair) -> None:
    if p.watcher is not None:
        p.watcher.stop()
        p.watcher = None
