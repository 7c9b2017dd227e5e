"""Prometheus metrics: a collector that reads a counter snapshot at scrape time.

Nothing is updated per packet or per interval: each scrape asks the app for a fresh
snapshot of the C counters (see nmbridge.stats) and turns it into metric families.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from nmbridge.config import is_loopback, parse_listen
from nmbridge.errors import ConfigError, NmbridgeError
from nmbridge.serving import ConnectionLimit
from nmbridge.stats import Snapshot
from nmbridge.stats import drops as drop_counts

MAX_SCRAPES = 16  # connections holding a place at once
REQUEST_TIMEOUT = 5.0  # seconds to send the request (line and headers) after connecting
SCRAPE_TIMEOUT = 10.0  # seconds to answer it (Prometheus' default scrape_timeout: later is no use)
BUSY = b"HTTP/1.0 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
TIMEOUT = b"HTTP/1.0 408 Request Timeout\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"


def _closing(reason: str) -> bytes:
    """What a connection the limiter closes is sent (nmbridge.serving): 503 when every place
    is busy, 408 to one that sent no complete request in time (or made room for a newcomer),
    nothing in the middle of a response."""
    return BUSY if reason == "busy" else b"" if reason == "busy_timeout" else TIMEOUT


class BridgeCollector(Collector):
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        snap = self.snapshot()
        pd = ["pair", "direction"]
        received = CounterMetricFamily(
            "nmbridge_received", "Frames the source port received (delivered to the bridge, or dropped "
            "on receive); received = forwarded + drops + queued", labels=pd)
        forwarded = CounterMetricFamily(
            "nmbridge_forwarded", "Frames handed successfully to the egress kernel/NIC", labels=pd)
        drops = CounterMetricFamily("nmbridge_drops", "Frames received and never forwarded, by reason",
                                    labels=[*pd, "reason"])
        queued = GaugeMetricFamily("nmbridge_queued", "Frames inside the bridge now (rings, in flight)",
                                   labels=pd)
        nbytes = CounterMetricFamily("nmbridge_bytes", "Bytes forwarded", labels=pd)
        batches = CounterMetricFamily("nmbridge_batches", "Batches that moved frames", labels=pd)
        stalls = CounterMetricFamily("nmbridge_tx_stalls", "Batches that found every TX ring full "
                                     "(frames waited; not drops)", labels=pd)
        hits = CounterMetricFamily("nmbridge_filter_rule_hits", "Frames decided by each filter rule",
                                   labels=["pair", "direction", "filter", "rule"])
        zc = GaugeMetricFamily("nmbridge_zerocopy", "1 when the pair swaps buffers, 0 when it copies",
                               labels=["pair"])
        link = GaugeMetricFamily("nmbridge_link_up", "1 when the port's link is up", labels=["port"])
        mode = GaugeMetricFamily("nmbridge_port_mode",
                                 "1 for the mode the port runs in (afxdp: zc, native, skb)",
                                 labels=["port", "mode"])
        for p in snap["pairs"]:
            zc.add_metric([p["pair"]], 1.0 if p["zerocopy"] else 0.0)
            for d, s in p["directions"].items():
                labels = [p["pair"], d]
                received.add_metric(labels, float(s.get("received", 0)))
                forwarded.add_metric(labels, float(s.get("forwarded", 0)))
                queued.add_metric(labels, float(s.get("queued", 0)))
                nbytes.add_metric(labels, float(s.get("bytes", 0)))
                batches.add_metric(labels, float(s.get("batches", 0)))
                stalls.add_metric(labels, float(s.get("tx_stalls", 0)))
                for reason, n in drop_counts(s).items():
                    drops.add_metric([*labels, reason], float(n))
                filt = s.get("filter")
                if filt:
                    for rule, n in s.get("rule_hits", {}).items():
                        hits.add_metric([*labels, filt, rule], float(n))
        for port, up in snap["links"].items():
            link.add_metric([port], 1.0 if up else 0.0)
        pair_up = GaugeMetricFamily("nmbridge_pair_up", "1 when the pair forwards, 0 while it is down "
                                    "(retried; nmbridge stats says why)", labels=["pair"])
        down = {d["pair"] for d in snap.get("down", [])}
        for name in dict.fromkeys([*(p["pair"] for p in snap["pairs"]), *sorted(down)]):
            pair_up.add_metric([name], 0.0 if name in down else 1.0)
        for port, m in snap.get("modes", {}).items():
            mode.add_metric([port, m], 1.0)
        yield from (received, forwarded, drops, queued, nbytes, batches, stalls, hits, zc, link, mode,
                    pair_up)
        yield from worker_metrics(snap)
        yield from capture_metrics(snap)


def worker_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Per forwarding worker (README "Workers"): the same counters with a `worker` label, in
    families of their own (the pair totals above are their sums and keep their labels)."""
    pdw = ["pair", "direction", "worker"]
    workers = GaugeMetricFamily("nmbridge_workers", "Forwarding threads of the pair", labels=["pair"])
    cpu = GaugeMetricFamily("nmbridge_worker_cpu", "The CPU a worker is pinned to (absent: not pinned)",
                            labels=["pair", "worker"])
    received = CounterMetricFamily("nmbridge_worker_received", "nmbridge_received of one worker's rings",
                                   labels=pdw)
    forwarded = CounterMetricFamily("nmbridge_worker_forwarded", "nmbridge_forwarded of one worker's rings",
                                    labels=pdw)
    drops = CounterMetricFamily("nmbridge_worker_drops", "nmbridge_drops of one worker's rings",
                                labels=[*pdw, "reason"])
    queued = GaugeMetricFamily("nmbridge_worker_queued", "nmbridge_queued of one worker's rings", labels=pdw)
    nbytes = CounterMetricFamily("nmbridge_worker_bytes", "nmbridge_bytes of one worker's rings", labels=pdw)
    for p in snap["pairs"]:
        ws = p.get("workers", [])
        workers.add_metric([p["pair"]], float(len(ws) or 1))
        for w in ws:
            wid = str(w["worker"])
            if w["cpu"] is not None:
                cpu.add_metric([p["pair"], wid], float(w["cpu"]))
            for d, s in w["directions"].items():
                labels = [p["pair"], d, wid]
                received.add_metric(labels, float(s.get("received", 0)))
                forwarded.add_metric(labels, float(s.get("forwarded", 0)))
                queued.add_metric(labels, float(s.get("queued", 0)))
                nbytes.add_metric(labels, float(s.get("bytes", 0)))
                for reason, n in drop_counts(s).items():
                    drops.add_metric([*labels, reason], float(n))
    yield from (workers, cpu, received, forwarded, drops, queued, nbytes)


def capture_metrics(snap: Snapshot) -> Iterator[Metric]:
    """Running captures (`nmbridge capture`): their taps' counters; none while none runs."""
    running = GaugeMetricFamily("nmbridge_captures", "Captures running", labels=["pair"])
    frames = CounterMetricFamily("nmbridge_capture_frames", "Frames a running capture's tap saw, "
                                 "by outcome (captured, capture_dropped: ring full, rate_limited)",
                                 labels=["pair", "direction", "capture", "outcome"])
    per_pair: dict[str, int] = {}
    for c in snap.get("captures", []):
        pair = c.get("pair", "")
        per_pair[pair] = per_pair.get(pair, 0) + 1
        for d, t in c.get("directions", {}).items():
            for outcome, v in (("captured", t["captured"]), ("capture_dropped", t["capture_dropped"]),
                               ("rate_limited", t["rate_limited"])):
                frames.add_metric([pair, d, str(c.get("capture", 0)), outcome], float(v))
    for pair, count in per_pair.items():
        running.add_metric([pair], float(count))
    yield from (running, frames)


class MetricsServer:
    """The HTTP endpoint serving one collector, in a daemon thread; ``close()`` stops it."""

    def __init__(self, listen: str, snapshot: Callable[[], Snapshot]) -> None:
        try:
            host, port = parse_listen(listen)
        except ValueError as e:
            raise ConfigError(f"metrics.listen = {listen!r}: {e}") from None
        self.listen = listen
        self.public = not is_loopback(host)
        self.registry = CollectorRegistry()
        self.registry.register(BridgeCollector(snapshot))
        try:
            self.server, self.thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as e:
            raise NmbridgeError(f"metrics.listen = {listen!r}: cannot listen: {e.strerror or e}") from None
        # scrapers that reset, stall or multiply: bounded threads, no traceback, and idle
        # connections make room for new ones (nmbridge.serving); wsgiref answers one request
        # per connection, so there is no wait between requests (idle_timeout: a backstop)
        self.limit = ConnectionLimit("metrics", MAX_SCRAPES, request_timeout=REQUEST_TIMEOUT,
                                     idle_timeout=SCRAPE_TIMEOUT, message=_closing)
        self.limit.install(self.server)
        app = self.server.get_app()
        assert app is not None  # start_http_server set it
        limit = self.limit

        def scrape(environ: dict[str, Any], start_response: Any) -> Any:
            """The request was read: the connection is busy (not evicted) while answered."""
            if not limit.busy(SCRAPE_TIMEOUT):  # cut while the request came: answer nothing
                start_response("408 Request Timeout", [("Content-Length", "0")])
                return [b""]
            return app(environ, start_response)

        self.server.set_app(scrape)

    @property
    def port(self) -> int:
        return int(self.server.server_address[1])

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5.0)


def serve(listen: str, snapshot: Callable[[], Snapshot]) -> tuple[Any, CollectorRegistry]:
    """Start the HTTP endpoint in a daemon thread; returns (server, registry)."""
    m = MetricsServer(listen, snapshot)
    return m.server, m.registry
