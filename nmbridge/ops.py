"""Operating a running bridge: the control socket and its commands, the metrics endpoint,
periodic stats events, the main thread's event loop and the signals.

:class:`Ops` belongs to one :class:`nmbridge.app.Bridge` and only reads it (``snapshot()``,
``pairs``, ``config``) — except in the main thread, where :meth:`Ops.wait` is the loop that
turns events into actions: a signal ends it, SIGHUP and ``nmbridge reload`` call
``Bridge.reload``, a deleted or re-created interface calls ``Bridge.relink``, a failed pair
and the retries of pairs that are down go to ``Bridge.heal`` (:mod:`nmbridge.healing`),
SIGUSR1 logs stats.
Signal handlers, control threads and link watchers only queue events (``Bridge.events``).
"""

from __future__ import annotations

import collections
import contextlib
import queue
import signal
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from types import FrameType
from typing import TYPE_CHECKING, Any

from nmbridge import __version__
from nmbridge.errors import NmbridgeError
from nmbridge.port import Port
from nmbridge.sdnotify import watchdog_interval
from nmbridge.stats import Snapshot, event_fields, rates

if TYPE_CHECKING:
    from nmbridge.app import Bridge

RATE_SAMPLE = 1.0  # seconds between the samples `nmbridge stats` computes its rates from
RELOAD_TIMEOUT = 120.0  # seconds a control request waits for the main thread to reload


@dataclass
class _Request:
    """A reload asked for by a control client; the main thread fills in the outcome."""

    source: str
    done: threading.Event = field(default_factory=threading.Event)
    result: dict[str, Any] | None = None
    error: NmbridgeError | None = None


class Ops:
    """Control socket, metrics, stats events, the main loop and signals of one bridge."""

    def __init__(self, bridge: Bridge) -> None:
        self.bridge = bridge
        self.control: Any = None  # nmbridge.control.ControlServer
        self.metrics: Any = None  # nmbridge.metrics.MetricsServer
        self._control_problem: str | None = None  # the default socket could not be made
        self._samples: collections.deque[Snapshot] = collections.deque(maxlen=3)
        self._last_stats: Snapshot | None = None
        self.captures: dict[int, Any] = {}  # id -> nmbridge.capture.Capture, while it runs
        self.stopping = threading.Event()   # set by close(): running captures end
        self._captures_lock = threading.Lock()

    # --- the control socket and metrics ---------------------------------------------------

    def bind_control(self) -> None:
        """Create and serve the control socket before any link is touched, so a path in use
        or a bad directory fails the start with nothing changed.  Until ``wait()`` runs,
        ``stats``/``ports`` see the pairs opened so far and a ``reload`` waits its turn."""
        from nmbridge import control  # only where it is used

        b = self.bridge
        if self.control is not None:
            return
        path = b.control_path if b.control_path is not None else b.config.control.path
        if not path:
            return
        handlers = {"stats": self._cmd_stats, "ports": self._cmd_ports, "reload": self._cmd_reload,
                    "capture": self._cmd_capture, "captures": self._cmd_captures,
                    "version": lambda req: {"version": __version__}}
        try:
            self.control = control.ControlServer(path, handlers).start()
        except (OSError, NmbridgeError) as e:
            reason = str(e) if isinstance(e, NmbridgeError) else f"{path}: {e.strerror or e}"
            explicit = b.control_path is not None or b.config.control.socket is not None
            if explicit:
                raise NmbridgeError(f"control socket: {reason}") from None
            # the default path, not asked for: the bridge runs on without one (said at serve())
            self._control_problem = reason

    def serve(self) -> None:
        """The control socket and the metrics endpoint, then READY=1 to systemd."""
        b = self.bridge
        self.bind_control()
        if self.control is not None:
            b.log.info("control_listening", path=self.control.path)
        elif self._control_problem is not None:
            path = b.control_path if b.control_path is not None else b.config.control.path
            b.log.warning("control_unavailable", path=path, reason=self._control_problem,
                          fix='set [control] socket (or "" for none), or run --control PATH')
        if b.config.metrics.listen:
            from nmbridge.metrics import MetricsServer

            self.metrics = MetricsServer(b.config.metrics.listen, b.snapshot)
            b.log.info("metrics_listening", listen=b.config.metrics.listen, port=self.metrics.port)
            if self.metrics.public:
                b.log.warning("metrics_public", listen=b.config.metrics.listen,
                              note="counters are readable from other machines; use 127.0.0.1 "
                                   "unless that is meant")
        b.notifier.ready(b.status())
        b.log.info("ready", pairs=[p.config.name for p in b.pairs],
                   control=self.control.path if self.control else None,
                   metrics=b.config.metrics.listen, systemd=b.notifier.enabled)

    def close(self) -> None:
        self.stopping.set()
        for what in ("control", "metrics"):
            server = getattr(self, what)
            setattr(self, what, None)
            if server is not None:
                try:
                    server.close()
                except Exception as e:
                    self.bridge.log.warning(f"{what}_close_failed", reason=str(e))

    # --- the main loop ----------------------------------------------------------------------

    def wait(self) -> None:
        """Until a signal; logs a ``stats`` event every stats_interval, reloads on SIGHUP and
        control requests, re-opens ports of re-created interfaces, retries pairs that are down
        when due, pets the systemd watchdog."""
        b = self.bridge
        now = time.monotonic()
        next_stats = now + b.config.bridge.stats_interval
        next_sample = now
        dog = watchdog_interval() if b.notifier.enabled else None
        next_dog = now
        while True:
            now = time.monotonic()
            interval = b.config.bridge.stats_interval
            if interval and now >= next_stats:
                self.log_stats()
                next_stats = max(next_stats + interval, now)
            if now >= next_sample:
                self._samples.append(b.snapshot())
                next_sample = now + RATE_SAMPLE
            if dog is not None and now >= next_dog:
                b.notifier.watchdog()
                next_dog = now + dog
            b.heal.run_due()
            heal = b.heal.next_due()
            due = ([next_sample] + ([next_stats] if interval else []) + ([next_dog] if dog else [])
                   + ([heal] if heal is not None else []))
            try:
                kind, what = b.events.get(timeout=max(0.0, min(due) - time.monotonic()))
            except queue.Empty:
                continue
            if kind == "signal":
                b.log.info("stopping", signal=what)
            elif kind == "failed":  # closed, then retried: the bridge goes on
                b.heal.failed(what)
                continue
            elif kind == "heal":  # a link event of a pair down with its ports closed
                b.heal.link_event(*what)
                continue
            elif kind == "usr1":
                self.log_stats()
                continue
            elif kind == "relink":
                b.relink(what)
                continue
            elif kind == "hup":
                with contextlib.suppress(NmbridgeError):  # logged as reload_failed
                    b.reload("SIGHUP")
                next_stats = min(next_stats, time.monotonic() + b.config.bridge.stats_interval)
                continue
            elif kind == "reload":
                req: _Request = what
                try:
                    req.result = b.reload(req.source)
                except NmbridgeError as e:
                    req.error = e
                finally:
                    req.done.set()
                next_stats = min(next_stats, time.monotonic() + b.config.bridge.stats_interval)
                continue
            return

    @contextlib.contextmanager
    def signals(self) -> Iterator[None]:
        """SIGINT/SIGTERM end wait(), SIGHUP reloads, SIGUSR1 logs stats; installed only in
        the main thread (tests call run() from others and use ``events``)."""
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        kinds: dict[int, str] = {signal.SIGHUP: "hup", signal.SIGUSR1: "usr1"}
        events = self.bridge.events

        def handler(signum: int, frame: FrameType | None) -> None:
            # SimpleQueue.put is reentrant
            events.put((kinds.get(signum, "signal"), signal.Signals(signum).name))

        old = {s: signal.signal(s, handler)
               for s in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1)}
        try:
            yield
        finally:
            for s, h in old.items():
                signal.signal(s, h)

    # --- stats events -----------------------------------------------------------------------

    def start_stats(self) -> None:
        self._last_stats = self.bridge.snapshot()  # the first stats event's rates start here

    def log_stats(self) -> None:
        """One ``stats`` event per pair: counters, rates since the last stats event, drops."""
        cur = self.bridge.snapshot()
        r = rates(self._last_stats, cur)
        self._last_stats = cur
        for p in cur["pairs"]:
            self.bridge.log.info("stats", **event_fields(p, r.get(p["pair"], {})))
        for d in cur.get("down", []):  # pairs down, retried (nmbridge.healing): why, and since when
            self.bridge.log.warning("pair_still_down", **d)
        for c in cur.get("captures", []):  # running `nmbridge capture`s: one event each
            self.bridge.log.info("capture_stats", **c)

    def _rate_base(self, cur: Snapshot) -> Snapshot | None:
        """The newest sample at least half a sample period older than `cur`."""
        for s in reversed(list(self._samples)):
            if cur["time"] - s["time"] >= RATE_SAMPLE / 2:
                return s
        return None

    # --- control commands (control threads; reload itself runs in the main thread) -------

    def _cmd_stats(self, req: dict[str, Any]) -> dict[str, Any]:
        cur = self.bridge.snapshot()
        base = self._rate_base(cur)
        return {"bridge": self.bridge.config.bridge.name, "snapshot": cur, "rates": rates(base, cur),
                "rate_seconds": round(cur["time"] - base["time"], 3) if base else 0.0}

    def _cmd_ports(self, req: dict[str, Any]) -> dict[str, Any]:
        out = []
        for p in list(self.bridge.pairs):
            states = {ev.port: ev for ev in dict(p.watcher.state).values()} if p.watcher else {}
            workers = p.fwd.describe()
            for side, spec, shares in (("a", p.config.a, p.fwd.a_shares), ("b", p.config.b, p.fwd.b_shares)):
                for w, port in zip(workers, shares, strict=True):  # one row per share: its worker's
                    try:
                        info = port_info(port)
                    except Exception:  # closed by a reload between the list and now
                        continue
                    ev = states.get(str(spec))
                    out.append({"pair": p.config.name, "side": side, "port": str(spec),
                                **info, "zerocopy": bool(p.fwd.zerocopy),
                                "worker": w["worker"], "cpu": w["cpu"], "ring_pairs": w["rings"][side],
                                "link": None if ev is None else {"up": ev.up, "operstate": ev.operstate}})
        down = self.bridge.heal.snapshot()
        return {"bridge": self.bridge.config.bridge.name, "ports": out, **({"down": down} if down else {})}

    def _cmd_capture(self, req: dict[str, Any]) -> Any:
        """Start a capture and stream it (see nmbridge.capture and control.Stream)."""
        from nmbridge.capture import Capture, CaptureSpec
        from nmbridge.control import Stream

        spec = CaptureSpec.from_request(req)
        pair = next((p for p in list(self.bridge.pairs) if p.config.name == spec.pair), None)
        if pair is None:
            known = ", ".join(p.config.name for p in self.bridge.pairs) or "none"
            raise NmbridgeError(f"capture: no pair {spec.pair!r} (running: {known})")
        with self._captures_lock:
            for other in self.captures.values():
                both = set(other.taps) & set(spec.directions)
                if other.spec.pair == spec.pair and both:
                    raise NmbridgeError(f"capture: pair {spec.pair} {'/'.join(sorted(both))} is "
                                        f"being captured already (capture {other.id})")
            cap = Capture(spec, pair, alive=lambda: pair in self.bridge.pairs and not pair.a.closed)
            self.captures[cap.id] = cap
        log = self.bridge.log

        def run(sock: Any) -> None:
            log.info("capture_started", **{k: v for k, v in cap.header().items() if k != "format"})
            try:
                cap.stream(sock, self.stopping)
            finally:
                self.captures.pop(cap.id, None)
                info = cap.info()
                log.info("capture_ended", capture=cap.id, pair=spec.pair, reason=cap.ended,
                         written=cap.written, counters=info["directions"],
                         **({"workers": info["workers"]} if "workers" in info else {}))

        return Stream("pcapng", cap.header(), run)

    def _cmd_captures(self, req: dict[str, Any]) -> dict[str, Any]:
        return {"captures": [c.info() for c in list(self.captures.values())]}

    def _cmd_reload(self, req: dict[str, Any]) -> dict[str, Any]:
        from nmbridge.control import ControlError

        r = _Request("control")
        self.bridge.events.put(("reload", r))
        if not r.done.wait(RELOAD_TIMEOUT):
            raise ControlError(f"the reload did not finish within {RELOAD_TIMEOUT:g} s")
        if r.error is not None:
            raise r.error
        assert r.result is not None
        return r.result


def port_info(port: Port) -> dict[str, object]:
    info: dict[str, object] = port.info()
    info.pop("port", None)  # bound as port=, from the config's spelling
    return info
