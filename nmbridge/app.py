"""``nmbridge run``: open the ports, forward each pair in its own thread, stop cleanly.

Life of a run (each step is one method of :class:`Bridge`, in this order)::

    set_up_links  -> open_ports -> install_filters -> start -> wait -> stop -> close
    (no-op for now)  all-or-nothing  (issue 5)         a thread per pair   SIGINT/SIGTERM

The main thread owns the signals and sleeps on a queue between stats ticks; forwarding
threads only run ``Forwarder.run()`` (GIL-free) and report back through the same queue when
they fail.  Nothing is logged per packet.
"""

from __future__ import annotations

import contextlib
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType

from nmbridge import filters as filters_module
from nmbridge.backends import OpenOptions, PortSet, PortSpec, backend
from nmbridge.config import Config, PairConfig
from nmbridge.errors import NmbridgeError, PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.links import LinkManager, LinkWatcher, config_links
from nmbridge.logs import get_logger
from nmbridge.port import Port

JOIN_TIMEOUT = 10.0  # seconds a forwarding thread gets to return after stop()


@dataclass
class _Pair:
    """A pair while it runs: its config, its two open ports, its forwarder and thread."""

    config: PairConfig
    a: Port
    b: Port
    fwd: Forwarder
    thread: threading.Thread | None = None
    error: str | None = field(default=None)


class Bridge:
    """Every pair of one Config, forwarding.  ``run()`` does it all; the steps are public for
    the hooks of later features (link set-up, filters, reload, stats)."""

    def __init__(self, config: Config, link_setup: bool = True) -> None:
        self.config = config
        self.link_setup = link_setup  # False: --no-link-setup, interfaces only looked up and checked
        self.links: LinkManager | None = None
        self.watcher: LinkWatcher | None = None
        self.log = get_logger(bridge=config.bridge.name)
        b = config.bridge
        self.portset = PortSet(OpenOptions(slots=b.ring_slots, buf_size=b.buf_size))
        self.pairs: list[_Pair] = []
        # ("signal", name) from a handler, ("failed", pair name) from a forwarding thread
        self.events: queue.SimpleQueue[tuple[str, str]] = queue.SimpleQueue()

    # --- the steps ----------------------------------------------------------------------

    def set_up_links(self) -> None:
        """Look up and check every interface; bring it up, promiscuous, offloads off where
        ``link_setup``; watch link events.  ``restore_links`` undoes it."""
        pairs = config_links(self.config, link_setup=self.link_setup)
        self.links = LinkManager(self.config.bridge.buf_size)
        self.links.setup(pairs)  # LinkError, with nothing left changed
        ports = {pl.ifname: pl.port for p in pairs for pl in p.ports if pl.ifname}
        if ports:
            try:
                self.watcher = LinkWatcher(ports).start()
            except BaseException:
                self.links.restore()
                raise

    def restore_links(self) -> None:
        """Give every interface back its original state: exactly what set-up changed."""
        if self.watcher is not None:
            self.watcher.stop()
            self.watcher = None
        if self.links is not None:
            self.links.restore()  # idempotent, never raises

    def open_ports(self) -> None:
        """Open every port of every pair in one PortSet, all or nothing."""
        c = self.config
        owner: dict[PortSpec, PairConfig] = {}
        for p in c.pairs:
            for spec in p.ports:
                owner[spec] = p
                try:
                    backend(spec.backend)
                except ImportError as e:  # a backend whose issue is still open
                    raise PortError(f"pair {p.name}: port {spec}: the {spec.backend} backend is not in "
                                    f"this build ({e})") from None
        try:
            ports = self.portset.open([s for p in c.pairs for s in p.ports])
        except PortError as e:
            failed = self.portset.failed
            if failed is None:
                raise
            prefix = f"pair {owner[failed].name}: port {failed}"
            message = str(e).removeprefix(f"{failed}: ")
            raise PortError(f"{prefix}: {message}") from None
        try:
            for i, p in enumerate(c.pairs):
                a, b = ports[2 * i], ports[2 * i + 1]
                for spec, port in ((p.a, a), (p.b, b)):
                    self.log.info("port_opened", pair=p.name, port=str(spec), **_port_info(port))
                fwd = Forwarder(a, b, burst=c.bridge.burst, direction=p.direction,
                                poll_timeout_ms=c.bridge.poll_timeout_ms)
                self.pairs.append(_Pair(p, a, b, fwd))
        except BaseException:
            self.close()
            raise

    def install_filters(self) -> None:
        """Compile each pair's filters and hand them to its forwarder."""
        wanted = [(p, d, name) for p in self.pairs for d, name in p.config.filters.items()]
        if not wanted:
            return
        compile_filter = getattr(filters_module, "compile_filter", None)
        if compile_filter is None:  # the filter compiler is not in yet (issue 5): fail closed
            p, _, name = wanted[0]
            raise NmbridgeError(f'pair {p.config.name}: filter "{name}" cannot run: this build has no '
                                "filter compiler yet")
        compiled = {name: compile_filter(self.config.filters[name]) for name in {n for _, _, n in wanted}}
        for p, d, name in wanted:
            p.fwd.set_filter(d, compiled[name])

    def start(self) -> None:
        for p in self.pairs:
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

    def wait(self) -> None:
        """Until a signal or a failed pair; logs a ``stats`` event every stats_interval."""
        interval = self.config.bridge.stats_interval
        next_stats = time.monotonic() + interval
        while True:
            timeout = max(0.0, next_stats - time.monotonic()) if interval else None
            try:
                kind, what = self.events.get(timeout=timeout)
            except queue.Empty:
                self.log_stats()
                next_stats += interval
                continue
            if kind == "signal":
                self.log.info("stopping", signal=what)
            else:
                self.log.info("stopping", failed_pair=what)
            return

    def log_stats(self) -> None:
        for p in self.pairs:
            self.log.info("stats", pair=p.config.name, **p.fwd.stats())

    def stop(self) -> None:
        """Stop every forwarder at a batch boundary and join its thread."""
        deadline = time.monotonic() + JOIN_TIMEOUT
        for p in self.pairs:
            # stop() again until the thread ends: a stop() that lands before run() has
            # started its loop is reset by run()
            while p.thread is not None and p.thread.is_alive() and time.monotonic() < deadline:
                p.fwd.stop()
                p.thread.join(timeout=0.1)

    def close(self) -> None:
        """Close the ports (unless a thread still runs on them) and restore the links."""
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
                self.wait()
            finally:
                self.stop()
                self.close()
                if self.pairs:
                    self.log.info("stopped", counters={p.config.name: p.fwd.stats() for p in self.pairs})
        failed = [p for p in self.pairs if p.error]
        if failed:
            raise PortError(f"pair {failed[0].config.name}: {failed[0].error}")

    @contextlib.contextmanager
    def _signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM end wait(); installed only in the main thread (tests call run()
        from others and stop it through ``events``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return

        def handler(signum: int, frame: FrameType | None) -> None:
            self.events.put(("signal", signal.Signals(signum).name))  # SimpleQueue.put is reentrant

        old = {s: signal.signal(s, handler) for s in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)


def _port_info(port: Port) -> dict[str, object]:
    info: dict[str, object] = port.info()
    info.pop("port", None)  # bound as port=, from the config's spelling
    return info
