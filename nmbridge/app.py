"""``nmbridge run``: open the ports, forward each pair in its own thread, stop cleanly.

Life of a run (each step is one method of :class:`Bridge`, in this order)::

    set_up_links -> open_ports -> install_filters -> start -> serve_ops -> wait -> stop -> close
    per pair        all-or-nothing  per pair and      a thread   control socket,   SIGINT/SIGTERM
                                    direction         per pair   metrics, READY=1

The main thread owns the signals and sleeps on a queue (``events``) between timer ticks
(stats events, rate samples, the systemd watchdog).  Everything that changes the running
bridge happens in the main thread: a signal handler or a control request only queues an
event (SIGHUP and ``nmbridge reload``: :meth:`reload`; SIGUSR1: a stats event now).
Forwarding threads only run ``Forwarder.run()`` (GIL-free) and report back through the same
queue when they fail.  Other threads (metrics scrapes, control requests) only read
:meth:`snapshot`.  Nothing is logged per packet.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import json
import logging
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import Any

from nmbridge import __version__, caps
from nmbridge import config as config_module
from nmbridge import filters as filters_module
from nmbridge.backends import OpenOptions, PortSet, PortSpec, backend
from nmbridge.config import Config, PairConfig
from nmbridge.errors import ConfigError, NmbridgeError, PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.links import LinkManager, LinkWatcher, pair_links
from nmbridge.logs import get_logger
from nmbridge.port import Port
from nmbridge.sdnotify import Notifier, watchdog_interval
from nmbridge.stats import (
    DirectionStats,
    PairStats,
    Snapshot,
    event_fields,
    final_counters,
    pair_counters,
    rates,
)

JOIN_TIMEOUT = 10.0  # seconds a forwarding thread gets to return after stop()
RATE_SAMPLE = 1.0  # seconds between the samples `nmbridge stats` computes its rates from
RELOAD_TIMEOUT = 120.0  # seconds a control request waits for the main thread to reload
DIRECTIONS = ("a_to_b", "b_to_a")
# [bridge] keys that shape ports and forwarders already open: a reload keeps the old value
RESTART_KEYS = ("backend", "burst", "poll_timeout_ms", "ring_slots", "buf_size")


@dataclass
class _Pair:
    """A pair while it runs: its config, its two open ports, its forwarder and thread, its
    links, and the filter compiled for it per direction."""

    config: PairConfig
    a: Port
    b: Port
    fwd: Forwarder
    thread: threading.Thread | None = None
    error: str | None = field(default=None)
    links: LinkManager | None = None
    watcher: LinkWatcher | None = None
    filters: dict[str, Any] = field(default_factory=dict)  # direction -> CompiledFilter
    # direction -> rule hits of the filters of that name swapped out by reloads
    hits_base: dict[str, dict[str, int]] = field(default_factory=dict)


@dataclass
class _Request:
    """A reload asked for by a control client; the main thread fills in the outcome."""

    source: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: NmbridgeError | None = None


class Bridge:
    """Every pair of one Config, forwarding.  ``run()`` does it all; the steps are public."""

    def __init__(self, config: Config, link_setup: bool = True, *, control_path: str | None = None,
                 notifier: Notifier | None = None, log_level_fixed: bool = False) -> None:
        """`control_path`: the control socket (None: ``[control] socket``; "": none).
        `log_level_fixed`: the command line set the log level, so a reload leaves it."""
        self.config = config
        self.link_setup = link_setup  # False: --no-link-setup, interfaces only looked up and checked
        self.control_path = control_path
        self.notifier = notifier if notifier is not None else Notifier()
        self.log_level_fixed = log_level_fixed
        self.log = get_logger(bridge=config.bridge.name)
        b = config.bridge
        self.portset = PortSet(OpenOptions(slots=b.ring_slots, buf_size=b.buf_size))
        # replaced, never changed in place, by the main thread: other threads may iterate it
        self.pairs: list[_Pair] = []
        self._links: dict[str, tuple[LinkManager | None, LinkWatcher | None]] = {}  # before open
        # ("signal", name), ("failed", pair), ("hup", ""), ("usr1", ""), ("reload", _Request)
        self.events: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self.control: Any = None  # nmbridge.control.ControlServer
        self.metrics: Any = None  # nmbridge.metrics.MetricsServer
        self._samples: collections.deque[Snapshot] = collections.deque(maxlen=3)
        self._last_stats: Snapshot | None = None

    # --- the steps ----------------------------------------------------------------------

    def set_up_links(self) -> None:
        """Look up and check every interface; bring it up, promiscuous, offloads off where
        link set-up is on; watch link events.  All or nothing; ``restore_links`` undoes it."""
        try:
            for p in self.config.pairs:
                self._links[p.name] = self._set_up_pair_links(p)
        except BaseException:
            self.restore_links()
            raise

    def _set_up_pair_links(self, p: PairConfig) -> tuple[LinkManager | None, LinkWatcher | None]:
        pl = pair_links(p.name, list(p.ports), self.link_setup and p.link_setup)
        links = LinkManager(self.config.bridge.buf_size)
        links.setup([pl])  # LinkError, with nothing left changed
        ports = {x.ifname: x.port for x in pl.ports if x.ifname}
        if not ports:
            return links, None
        try:
            return links, LinkWatcher(ports).start()
        except BaseException:
            links.restore()
            raise

    def restore_links(self) -> None:
        """Give every interface back its original state: exactly what set-up changed."""
        held = list(self._links.values()) + [(p.links, p.watcher) for p in self.pairs]
        self._links = {}
        for p in self.pairs:
            p.links = p.watcher = None
        for links, watcher in held:
            _release_links(links, watcher)

    def open_ports(self) -> None:
        """Open every port of every pair in one PortSet, all or nothing."""
        self.pairs = self._open_pairs(self.config.pairs)

    def _open_pairs(self, pcs: tuple[PairConfig, ...] | list[PairConfig]) -> list[_Pair]:
        c = self.config
        owner: dict[PortSpec, PairConfig] = {}
        for p in pcs:
            for spec in p.ports:
                owner[spec] = p
                try:
                    backend(spec.backend)
                except ImportError as e:  # a backend whose issue is still open
                    raise PortError(f"pair {p.name}: port {spec}: the {spec.backend} backend is not in "
                                    f"this build ({e})") from None
        try:
            ports = self.portset.open([s for p in pcs for s in p.ports])
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
                a, b = ports[2 * i], ports[2 * i + 1]
                for spec, port in ((p.a, a), (p.b, b)):
                    self.log.info("port_opened", pair=p.name, port=str(spec), **_port_info(port))
                fwd = Forwarder(a, b, burst=c.bridge.burst, direction=p.direction,
                                poll_timeout_ms=c.bridge.poll_timeout_ms)
                links, watcher = self._links.pop(p.name, (None, None))
                opened.append(_Pair(p, a, b, fwd, links=links, watcher=watcher))
        except BaseException:
            self.portset.close_ports(ports)
            raise
        return opened

    def install_filters(self) -> None:
        """Compile each pair's filters, one program per pair and direction (each forwarding
        thread counts rule hits in its own), and hand them to its forwarder."""
        for p in self.pairs:
            self._set_filters(p, self._compile(p.config, self.config))

    def _compile(self, p: PairConfig, cfg: Config) -> dict[str, Any]:
        wanted = p.filters
        if not wanted:
            return {}
        compile_filter = getattr(filters_module, "compile_filter", None)
        if compile_filter is None:  # the filter compiler is not in yet (issue 5): fail closed
            name = next(iter(wanted.values()))
            raise NmbridgeError(f'pair {p.name}: filter "{name}" cannot run: this build has no '
                                "filter compiler yet")
        return {d: compile_filter(cfg.filters[name]) for d, name in wanted.items()}

    def _set_filters(self, p: _Pair, compiled: dict[str, Any]) -> None:
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
        self._last_stats = self.snapshot()  # the first stats event's rates start here
        for p in self.pairs:
            self._start_pair(p)

    def _start_pair(self, p: _Pair) -> None:
        p.thread = threading.Thread(target=self._forward, args=(p,), name=f"fwd-{p.config.name}",
                                    daemon=True)
        p.thread.start()
        self.log.info("forwarding", pair=p.config.name, ports=[str(s) for s in p.config.ports],
                      direction=p.config.direction, zero_copy=p.fwd.zerocopy,
                      filters=p.config.filters)

    def _forward(self, p: _Pair) -> None:
        try:
            p.fwd.run()
        except Exception as e:  # PortError mostly; anything else must stop the bridge too
            p.error = str(e) or type(e).__name__
            self.log.error("pair_failed", pair=p.config.name, error=p.error)
            self.events.put(("failed", p.config.name))

    def serve_ops(self) -> None:
        """The control socket and the metrics endpoint, then READY=1 to systemd."""
        from nmbridge import control  # only where it is used

        path = self.control_path if self.control_path is not None else self.config.control.path
        if path:
            handlers = {"stats": self._cmd_stats, "ports": self._cmd_ports, "reload": self._cmd_reload,
                        "version": lambda req: {"version": __version__}}
            try:
                self.control = control.ControlServer(path, handlers).start()
                self.log.info("control_listening", path=path)
            except (OSError, NmbridgeError) as e:
                reason = str(e) if isinstance(e, NmbridgeError) else f"{path}: {e.strerror or e}"
                explicit = self.control_path is not None or self.config.control.socket is not None
                if explicit:
                    raise NmbridgeError(f"control socket: {reason}") from None
                # the default path, not asked for: the bridge runs on without one
                self.log.warning("control_unavailable", path=path, reason=reason,
                                 fix='set [control] socket (or "" for none), or run --control PATH')
        if self.config.metrics.listen:
            from nmbridge.metrics import MetricsServer

            self.metrics = MetricsServer(self.config.metrics.listen, self.snapshot)
            self.log.info("metrics_listening", listen=self.config.metrics.listen, port=self.metrics.port)
            if self.metrics.public:
                self.log.warning("metrics_public", listen=self.config.metrics.listen,
                                 note="counters are readable from other machines; use 127.0.0.1 "
                                      "unless that is meant")
        self.notifier.ready(self._status())
        self.log.info("ready", pairs=[p.config.name for p in self.pairs],
                      control=self.control.path if self.control else None,
                      metrics=self.config.metrics.listen, systemd=self.notifier.enabled)

    def close_ops(self) -> None:
        for what in ("control", "metrics"):
            server = getattr(self, what)
            setattr(self, what, None)
            if server is not None:
                try:
                    server.close()
                except Exception as e:
                    self.log.warning(f"{what}_close_failed", reason=str(e))

    def wait(self) -> None:
        """Until a signal or a failed pair; logs a ``stats`` event every stats_interval,
        reloads on SIGHUP and control requests, pets the systemd watchdog."""
        now = time.monotonic()
        next_stats = now + self.config.bridge.stats_interval
        next_sample = now
        dog = watchdog_interval() if self.notifier.enabled else None
        next_dog = now
        while True:
            now = time.monotonic()
            interval = self.config.bridge.stats_interval
            if interval and now >= next_stats:
                self.log_stats()
                next_stats = max(next_stats + interval, now)
            if now >= next_sample:
                self._samples.append(self.snapshot())
                next_sample = now + RATE_SAMPLE
            if dog is not None and now >= next_dog:
                self.notifier.watchdog()
                next_dog = now + dog
            due = [next_sample] + ([next_stats] if interval else []) + ([next_dog] if dog else [])
            try:
                kind, what = self.events.get(timeout=max(0.0, min(due) - time.monotonic()))
            except queue.Empty:
                continue
            if kind == "signal":
                self.log.info("stopping", signal=what)
            elif kind == "failed":
                self.log.info("stopping", failed_pair=what)
            elif kind == "usr1":
                self.log_stats()
                continue
            elif kind == "hup":
                with contextlib.suppress(NmbridgeError):  # logged as reload_failed
                    self.reload("SIGHUP")
                next_stats = min(next_stats, time.monotonic() + self.config.bridge.stats_interval)
                continue
            elif kind == "reload":
                req: _Request = what
                try:
                    req.result = self.reload(req.source)
                except NmbridgeError as e:
                    req.error = e
                finally:
                    req.done.set()
                next_stats = min(next_stats, time.monotonic() + self.config.bridge.stats_interval)
                continue
            return

    # --- stats --------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every pair's C counters, filters and rule hits, and the link states, now."""
        pairs: list[PairStats] = []
        links: dict[str, bool] = {}
        for p in list(self.pairs):
            dirs: dict[str, DirectionStats] = {}
            for d, s in pair_counters(p.fwd, p.a, p.b).items():
                f = p.filters.get(d)
                s["filter"] = f.name if f is not None else None
                if f is not None:
                    base = p.hits_base.get(d, {})
                    s["rule_hits"] = {r: base.get(r, 0) + n for r, n in f.hits().items()}
                dirs[d] = s
            pairs.append(PairStats(pair=p.config.name, ports=[str(s) for s in p.config.ports],
                                   zerocopy=bool(p.fwd.zerocopy), directions=dirs))
            if p.watcher is not None:
                links.update({ev.port: ev.up for ev in dict(p.watcher.state).values()})
        return Snapshot(time=time.monotonic(), pairs=pairs, links=links)

    def log_stats(self) -> None:
        """One ``stats`` event per pair: counters, rates since the last stats event, drops."""
        cur = self.snapshot()
        r = rates(self._last_stats, cur)
        self._last_stats = cur
        for p in cur["pairs"]:
            self.log.info("stats", **event_fields(p, r.get(p["pair"], {})))

    def _rate_base(self, cur: Snapshot) -> Snapshot | None:
        """The newest sample at least half a sample period older than `cur`."""
        for s in reversed(list(self._samples)):
            if cur["time"] - s["time"] >= RATE_SAMPLE / 2:
                return s
        return None

    # --- control commands (control threads; reload itself runs in the main thread) -------

    def _cmd_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        cur = self.snapshot()
        base = self._rate_base(cur)
        return {"bridge": self.config.bridge.name, "snapshot": cur, "rates": rates(base, cur),
                "rate_seconds": round(cur["time"] - base["time"], 3) if base else 0.0}

    def _cmd_ports(self, req: dict[str, Any]) -> dict[str, Any]:
        out = []
        for p in list(self.pairs):
            states = {ev.port: ev for ev in dict(p.watcher.state).values()} if p.watcher else {}
            for side, spec, port in (("a", p.config.a, p.a), ("b", p.config.b, p.b)):
                try:
                    info = _port_info(port)
                except Exception:  # closed by a reload between the list and now
                    continue
                ev = states.get(str(spec))
                out.append({"pair": p.config.name, "side": side, "port": str(spec),
                            **info, "zerocopy": bool(p.fwd.zerocopy),
                            "link": None if ev is None else {"up": ev.up, "operstate": ev.operstate}})
        return {"bridge": self.config.bridge.name, "ports": out}

    def _cmd_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        from nmbridge.control import ControlError

        r = _Request("control")
        self.events.put(("reload", r))
        if not r.done.wait(RELOAD_TIMEOUT):
            raise ControlError(f"the reload did not finish within {RELOAD_TIMEOUT:g} s")
        if r.error is not None:
            raise r.error
        assert r.result is not None
        return r.result

    # --- reload -------------------------------------------------------------------------

    def reload(self, source: str) -> dict[str, Any]:
        """Re-read the config file and apply what changed (main thread only).  A file that
        does not load changes nothing: ConfigError, logged as ``reload_failed``."""
        self.notifier.reloading()
        self.log.info("reloading", source=source, config=self.config.path)
        try:
            result = self._reload()
        except NmbridgeError as e:
            self.log.error("reload_failed", source=source, error=str(e), note="the running config stays")
            raise
        finally:
            self.notifier.ready(self._status())
        level = "warning" if result["failed"] else "info"
        getattr(self.log, level)("reloaded", source=source, **result)
        return result

    def _reload(self) -> dict[str, Any]:
        old = self.config
        written = config_module.load(old.path)
        frozen = {k: getattr(old.bridge, k) for k in RESTART_KEYS}
        needs_restart = [f"bridge.{k}" for k in RESTART_KEYS if getattr(written.bridge, k) != frozen[k]]
        new = config_module.load(old.path, frozen) if needs_restart else written
        for key, changed in (("log.format", new.log.format != old.log.format),
                             ("metrics.listen", new.metrics != old.metrics),
                             ("control.socket", new.control != old.control)):
            if changed:
                needs_restart.append(key)
        new = dataclasses.replace(new, log=dataclasses.replace(new.log, format=old.log.format),
                                  metrics=old.metrics, control=old.control)
        if needs_restart:
            self.log.warning("reload_needs_restart", keys=needs_restart,
                             note="these keep their running values until nmbridge restarts")

        running = {p.config.name: p for p in self.pairs}
        removed = [p for name, p in running.items() if name not in {pc.name for pc in new.pairs}]
        added: list[PairConfig] = []
        restarted: list[tuple[_Pair, PairConfig]] = []
        refilter: list[tuple[_Pair, PairConfig]] = []
        for pc in new.pairs:
            p = running.get(pc.name)
            if p is None:
                added.append(pc)
            elif _shape(p.config) != _shape(pc):
                restarted.append((p, pc))
            elif _filters_key(old, p.config) != _filters_key(new, pc):
                refilter.append((p, pc))
        # compile everything before changing anything: a filter that does not compile fails
        # the reload with nothing touched
        compiled: dict[str, dict[str, Any]] = {}
        try:
            for pc in [*added, *(pc for _, pc in restarted), *(pc for _, pc in refilter)]:
                compiled[pc.name] = self._compile(pc, new)
        except (ValueError, NmbridgeError) as e:
            raise ConfigError(f"{new.path}: {e}") from None

        filters_changed: dict[str, dict[str, str | None]] = {}
        for p, pc in refilter:
            self._set_filters(p, compiled[pc.name])
            filters_changed[pc.name] = {d: pc.filters.get(d) for d in DIRECTIONS if d in p.fwd.stats()}
        self._stop_pairs([*removed, *(p for p, _ in restarted)])
        failed: dict[str, str] = {}
        started: list[_Pair] = []
        for pc in [*(pc for _, pc in restarted), *added]:
            try:
                started.append(self._bring_up(pc, compiled[pc.name]))
            except NmbridgeError as e:
                failed[pc.name] = str(e)
                self.log.error("pair_not_started", pair=pc.name, error=str(e))
        gone = {p.config.name for p in removed} | {p.config.name for p, _ in restarted}
        by_name = {p.config.name: p for p in self.pairs if p.config.name not in gone}
        by_name.update({p.config.name: p for p in started})
        for pc in new.pairs:  # unchanged pairs take the new config too (key paths may move)
            if pc.name in by_name:
                by_name[pc.name].config = pc
        self.pairs = [by_name[pc.name] for pc in new.pairs if pc.name in by_name]

        changes: dict[str, Any] = {}
        if new.bridge.name != old.bridge.name:
            self.log = get_logger(bridge=new.bridge.name)
            changes["bridge.name"] = new.bridge.name
        if new.bridge.stats_interval != old.bridge.stats_interval:
            changes["bridge.stats_interval"] = new.bridge.stats_interval
        if new.log.level != old.log.level:
            if self.log_level_fixed:
                changes["log.level"] = f"{new.log.level} (the command line's --log-level stays)"
            else:
                logging.getLogger().setLevel(new.log.level.upper())
                changes["log.level"] = new.log.level
        self.config = dataclasses.replace(new, pairs=tuple(p.config for p in self.pairs))
        return {"added": [pc.name for pc in added if pc.name not in failed],
                "removed": [p.config.name for p in removed],
                "restarted": [pc.name for _, pc in restarted if pc.name not in failed],
                "filters": filters_changed, "settings": changes, "needs_restart": needs_restart,
                "failed": failed, "pairs": [p.config.name for p in self.pairs]}

    def _bring_up(self, pc: PairConfig, compiled: dict[str, Any]) -> _Pair:
        """Links, ports, filters and thread of one pair a reload adds; nothing left if it fails."""
        self._links[pc.name] = self._set_up_pair_links(pc)
        try:
            (p,) = self._open_pairs([pc])
        except BaseException:
            _release_links(*self._links.pop(pc.name, (None, None)))
            raise
        try:
            self._set_filters(p, compiled)
        except BaseException:
            self.portset.close_ports([p.a, p.b])
            _release_links(p.links, p.watcher)
            raise
        self._start_pair(p)
        return p

    def _stop_pairs(self, pairs: list[_Pair]) -> None:
        """Stop, close and restore some pairs (a reload removes or restarts them)."""
        self._join(pairs)
        for p in pairs:
            counters = final_counters(p.fwd, p.a, p.b)
            if p.thread is not None and p.thread.is_alive():
                self.log.error("threads_stuck", pairs=[p.config.name], note="ports left open")
            else:
                self.portset.close_ports([p.a, p.b])
            _release_links(p.links, p.watcher)
            p.links = p.watcher = None
            self.log.info("pair_stopped", pair=p.config.name, counters=counters)

    def _join(self, pairs: list[_Pair]) -> None:
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in pairs:  # stop() is sticky: a stop before run() has started still counts
            p.fwd.stop()
        for p in pairs:
            if p.thread is not None:
                p.thread.join(timeout=max(0.0, deadline - time.monotonic()))

    def _status(self) -> str:
        n = len(self.pairs)
        return f"forwarding {n} pair{'s' if n != 1 else ''}: {', '.join(p.config.name for p in self.pairs)}"

    def stop(self) -> None:
        """Stop every forwarder at a batch boundary and join its thread."""
        self.notifier.stopping()
        self._join(self.pairs)

    def close(self) -> None:
        """Close the ports (unless a thread still runs on them) and restore the links."""
        self.close_ops()
        stuck = [p.config.name for p in self.pairs if p.thread is not None and p.thread.is_alive()]
        if stuck:
            self.log.error("threads_stuck", pairs=stuck, note="ports left open")
        else:
            self.portset.close()
        self.restore_links()

    # --- all of it ----------------------------------------------------------------------

    def run(self) -> None:
        """Forward until SIGINT/SIGTERM; raise PortError if a pair failed (after stopping)."""
        c = self.config
        self.log.info("starting", config=c.path, pairs={p.name: [str(s) for s in p.ports] for p in c.pairs},
                      backends=sorted({s.backend for p in c.pairs for s in p.ports}))
        with self._signals():
            self.set_up_links()
            try:
                self.open_ports()
                self.install_filters()
                self.start()
                self.serve_ops()
                self.wait()
            finally:
                self.stop()
                self.close()
                if self.pairs:
                    self.log.info("stopped", counters={p.config.name: final_counters(p.fwd, p.a, p.b)
                                                       for p in self.pairs})
        failed = [p for p in self.pairs if p.error]
        if failed:
            raise PortError(f"pair {failed[0].config.name}: {failed[0].error}")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM end wait(), SIGHUP reloads, SIGUSR1 logs stats; installed only in
        the main thread (tests call run() from others and use ``events``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        kinds: dict[int, str] = {signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}

        def handler(signum: int, frame: FrameType | None) -> None:
            # SimpleQueue.put is reentrant
            self.events.put((kinds.get(signum, "signal"), signal.Signals(signum).name))

        old = {s: signal.signal(s, handler)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def required_capabilities(config: Config, link_setup: bool) -> list[tuple[int, str]]:
    """(capability, what needs it) for running `config`."""
    need: list[tuple[int, str]] = []
    specs = [s for p in config.pairs for s in p.ports]
    if any(s.backend == "afpacket" for s in specs):
        need.append((caps.CAP_NET_RAW, "afpacket: ports"))
    if link_setup and any(p.link_setup and any(backend(s.backend).interface(s.name) for s in p.ports)
                          for p in config.pairs):
        need.append((caps.CAP_NET_ADMIN, "link set-up; or run --no-link-setup"))
    return need


def check_capabilities(config: Config, link_setup: bool) -> None:
    """Raise NmbridgeError, one line naming each missing capability and what needs it."""
    message = caps.require_for(required_capabilities(config, link_setup), "nmbridge run")
    if message is not None:
        raise NmbridgeError(message)


def _shape(p: PairConfig) -> tuple[object, ...]:
    """What a pair cannot change without restarting it."""
    return (p.a, p.b, p.direction, p.link_setup)


def _filters_key(cfg: Config, p: PairConfig) -> dict[str, str | None]:
    """Each direction's filter, by content (a key path that moved is no change)."""
    out: dict[str, str | None] = {}
    for d, name in p.filters.items():
        f = cfg.filters[name]
        rules = [(r.name, r.action, r.fields, r.pcap) for r in f.rules]
        out[d] = json.dumps([name, f.default, rules], sort_keys=True, default=str)
    return out


def _release_links(links: LinkManager | None, watcher: LinkWatcher | None) -> None:
    if watcher is not None:
        watcher.stop()
    if links is not None:
        links.restore()  # idempotent, never raises


def _port_info(port: Port) -> dict[str, object]:
    info: dict[str, object] = port.info()
    info.pop("port", None)  # bound as port=, from the config's spelling
    return info
