"""A running bridge whose pair has several workers (no root): config keys, start, pinning,
per-worker filters, stats/ports/metrics, reload changing workers, stop, a failing worker."""

from __future__ import annotations

import io
import json
import os
import struct
import threading
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from fwdutil import run_in_thread
from prometheus_client.parser import text_string_to_metric_families
from test_ops import DEADLINE, events, wait_for

from nmbridge import app, config, healing
from nmbridge.app import Bridge
from nmbridge.backends.mem import MemPort
from nmbridge.capture import block_comments, read_blocks, run_client
from nmbridge.config import workers_for
from nmbridge.control import ControlError, request
from nmbridge.errors import ConfigError, PortError
from nmbridge.fastfwd import Forwarder
from nmbridge.stats import balance
from nmbridge.workers import FilterCopies

CPU = min(config.allowed_cpus())


def frame(ring: int, i: int, ethertype: int = 0x88B5) -> bytes:
    head = b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big")
    return head + bytes([ring]) + i.to_bytes(4, "big") + bytes(60)


# --- config ------------------------------------------------------------------------------------

def test_workers_and_cpus_keys() -> None:
    c = config.loads('[[pair]]\nports = ["mem:a", "mem:b"]\n')
    assert c.pairs[0].workers == 1 and c.pairs[0].cpus == ()
    c = config.loads(f'[bridge]\nworkers = "auto"\ncpus = [{CPU}]\n'
                     '[[pair]]\nports = ["mem:a?rings=2", "mem:b"]\n'
                     '[[pair]]\nports = ["mem:c?rings=4", "mem:d?rings=4"]\nworkers = 2\ncpus = []\n', "t")
    assert (c.pairs[0].workers, c.pairs[0].cpus) == ("auto", (CPU,))  # [bridge] is the default
    assert (c.pairs[1].workers, c.pairs[1].cpus) == (2, ())
    assert config.from_dict(c.as_dict(), c.path) == c
    # "auto": one per ring pair of the smaller port, up to the CPUs given (or allowed)
    assert workers_for(c.pairs[0], 2, 1) == 1
    assert workers_for(c.pairs[0], 4, 4) == 1  # one CPU given
    auto = config.loads('[[pair]]\nports = ["mem:a", "mem:b"]\nworkers = "auto"\n').pairs[0]
    assert workers_for(auto, 64, 64) == len(config.allowed_cpus())


@pytest.mark.parametrize("pair, message", [
    ('workers = 0', "pair[1].workers = 0: must be from 1 to 64"),
    ('workers = "all"', 'pair[1].workers = "all": must be a number of worker threads or "auto", '
                        'not a string'),
    ('workers = 1.5', "must be a number of worker threads"),
    ('cpus = [99999]', "pair[1].cpus = [99999]: CPU 99999 is not one this process may run on (allowed: "),
    (f'cpus = [{CPU}, {CPU}]', "names a CPU twice"),
    ('cpus = "0-1"', 'must be an array of CPU numbers, e.g. [2, 3]'),
    ('workers = 3', 'pair[1].workers = 3: mem:a?rings=2 has 2 ring pairs: at most 2 workers can forward it'),
])
def test_bad_workers_keys_are_one_line(pair: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.loads(f'[[pair]]\nports = ["mem:a?rings=2", "mem:b?rings=4"]\n{pair}\n', "t")
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_bad_workers_exit_78(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from nmbridge import cli

    path = tmp_path / "b.toml"
    path.write_text('[bridge]\nworkers = 2\n[[pair]]\nports = ["mem:a", "mem:b"]\n')
    assert cli.main(["check", "-c", str(path)]) == 78
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "bridge.workers = 2: mem:a has 1 ring pair: at most 1 worker" in err[0], err


# --- a running bridge --------------------------------------------------------------------------

CONFIG = ('[bridge]\nstats_interval = 0\n[metrics]\nlisten = "127.0.0.1:0"\n[control]\nsocket = "{sock}"\n'
          '[filter.noarp]\n[[filter.noarp.rule]]\nname = "arp"\naction = "drop"\nethertype = "arp"\n'
          '[[pair]]\nname = "lan"\nports = ["mem:a?rings=4", "mem:b?rings=2"]\nfilter = "noarp"\n'
          'workers = 2\ncpus = [{cpu}]\n')
PER_RING = 300


@pytest.fixture
def running(tmp_path: Path, log_lines: io.StringIO) -> Iterator[tuple[Bridge, str, Path]]:
    path = tmp_path / "bridge.toml"
    sock = str(tmp_path / "c.sock")
    path.write_text(CONFIG.format(sock=sock, cpu=CPU))
    bridge = Bridge(config.load(path))
    bridge.set_up_links()
    bridge.open_ports()
    lan = bridge.pairs[0]
    for ring in range(4):  # port a's ring pair r is ring r // 2 of share r % 2
        share = lan.fwd.a_shares[ring % 2]
        assert isinstance(share, MemPort)
        share.inject_many((frame(ring, i, 0x0806 if i % 3 == 0 else 0x88B5) for i in range(PER_RING)),
                          ring=ring // 2)
    bridge.install_filters()
    bridge.start()
    bridge.serve_ops()
    main = threading.Thread(target=bridge.wait, daemon=True)
    main.start()
    try:
        wait_for(lambda: sum(lan.fwd.stats()["a_to_b"][k] for k in ("frames", "filtered")) == 4 * PER_RING,
                 "every frame forwarded or filtered")
        yield bridge, sock, path
    finally:
        bridge.events.put(("signal", "TEST"))
        main.join(DEADLINE)
        bridge.stop()
        bridge.close()


def test_a_pair_of_two_workers(running: tuple[Bridge, str, Path], log_lines: io.StringIO) -> None:
    bridge, sock, _ = running
    lan = bridge.pairs[0]
    assert len(lan.threads) == 2 and all(t.is_alive() for t in lan.threads)
    assert [t.name for t in lan.threads] == ["fwd-lan-0", "fwd-lan-1"]
    for t in lan.threads:  # pinned from inside the thread, before it forwarded
        assert t.native_id is not None and os.sched_getaffinity(t.native_id) == {CPU}
    # one filter program per worker: two threads never write the same rule counters
    f = lan.filters["a_to_b"]
    assert isinstance(f, FilterCopies) and len({id(p) for p in f.parts}) == 2
    assert [w.filter("a_to_b") for w in lan.fwd.forwarders] == f.parts
    assert f.hits() == {"arp": 4 * PER_RING // 3, "default": 4 * PER_RING * 2 // 3}
    per_worker = [w.stats()["a_to_b"] for w in lan.fwd.forwarders]
    assert [s["frames"] + s["filtered"] for s in per_worker] == [2 * PER_RING, 2 * PER_RING]

    # stats: the pair's numbers are the sums, the workers' detail beside them
    r = request(sock, "stats")
    p = r["snapshot"]["pairs"][0]
    d = p["directions"]["a_to_b"]
    assert (d["received"], d["forwarded"], d["queued"]) == (4 * PER_RING, 4 * PER_RING * 2 // 3, 0)
    assert d["dropped"]["filtered"] == 4 * PER_RING // 3 and balance(d) == 0
    assert d["rule_hits"] == f.hits()
    ws = p["workers"]
    assert [(w["worker"], w["cpu"], w["rings"]) for w in ws] == [
        (0, CPU, {"a": [0, 2], "b": [0]}), (1, CPU, {"a": [1, 3], "b": [1]})]
    assert [w["directions"]["a_to_b"]["received"] for w in ws] == [2 * PER_RING, 2 * PER_RING]
    assert sum(w["directions"]["a_to_b"]["forwarded"] for w in ws) == d["forwarded"]

    # ports: one row per share, with its worker, CPU and the port's ring pairs it owns
    rows = request(sock, "ports")["ports"]
    assert [(x["port"], x["worker"], x["cpu"], x["ring_pairs"], x["rx_rings"]) for x in rows] == [
        ("mem:a?rings=4", 0, CPU, [0, 2], 2), ("mem:a?rings=4", 1, CPU, [1, 3], 2),
        ("mem:b?rings=2", 0, CPU, [0], 1), ("mem:b?rings=2", 1, CPU, [1], 1)]

    # metrics: the pair totals keep their labels; per-worker series have a worker label
    port = events(log_lines, "metrics_listening")[0]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    assert samples[("nmbridge_forwarded_total", (("direction", "a_to_b"), ("pair", "lan")))] == d["forwarded"]
    for w in (0, 1):
        lab = (("direction", "a_to_b"), ("pair", "lan"), ("worker", str(w)))
        assert samples[("nmbridge_worker_received_total", lab)] == 2 * PER_RING
        assert samples[("nmbridge_worker_cpu", (("pair", "lan"), ("worker", str(w))))] == CPU
    assert samples[("nmbridge_workers", (("pair", "lan"),))] == 2



def test_a_capture_of_two_workers_is_one_stream(running: tuple[Bridge, str, Path]) -> None:
    """A tap per worker (each written by its own thread), one pcapng stream: every frame sent
    while it runs once, each ring's in order, the dropped ones with their rule."""
    bridge, sock, _ = running
    lan = bridge.pairs[0]
    per_ring = 25
    out = io.BytesIO()
    ended: list[object] = []
    req = {"pair": "lan", "direction": "a-to-b", "rate": 0, "count": 4 * per_ring}
    client = threading.Thread(target=lambda: ended.append(run_client(sock, req, out)), daemon=True)
    client.start()
    wait_for(lambda: [c["state"] for c in request(sock, "captures")["captures"]] == ["running"],
             "the capture's taps in")
    sent = {ring: [frame(ring, 1000 + i, 0x0806 if i % 5 == 0 else 0x88B5) for i in range(per_ring)]
            for ring in range(4)}
    for ring in range(4):  # rings 0, 2: worker 0; rings 1, 3: worker 1
        share = lan.fwd.a_shares[ring % 2]
        assert isinstance(share, MemPort)
        share.inject_many(sent[ring], ring=ring // 2)
    client.join(DEADLINE)
    assert ended, "the capture did not end at its count"
    blocks = read_blocks(out.getvalue())
    got = []
    for t, body in blocks:
        if t == 6:
            caplen = struct.unpack_from("<I", body, 12)[0]
            got.append((body[20:20 + caplen], block_comments(6, body)))
    for ring in range(4):  # each frame once, a ring's (one worker's) in the order sent
        assert [(f, c) for f, c in got if f[14] == ring] == [
            (f, ['dropped: filter noarp, rule "arp"'] if f[12:14] == b"\x08\x06" else
             ["forwarded: filter noarp, default action"]) for f in sent[ring]]
    (isb_comment,) = [block_comments(t, body)[0] for t, body in blocks if t == 5]
    assert (f"seen {4 * per_ring}, captured {4 * per_ring}, capture_dropped 0, rate_limited 0; "
            f"worker 0: captured {2 * per_ring}, capture_dropped 0, rate_limited 0; "
            f"worker 1: captured {2 * per_ring}") in isb_comment, isb_comment
    assert all(w.tap("a_to_b") is None for w in lan.fwd.forwarders)  # the taps are out


def test_reload_changing_workers_restarts_the_pair(running: tuple[Bridge, str, Path],
                                                   log_lines: io.StringIO) -> None:
    bridge, sock, path = running
    old = bridge.pairs[0]
    path.write_text(path.read_text().replace("workers = 2", "workers = 1"))
    r = request(sock, "reload")
    assert r["restarted"] == ["lan"]
    lan = bridge.pairs[0]
    assert lan is not old and all(not t.is_alive() for t in old.threads) and old.a.closed
    assert len(lan.fwd) == 1 and len(lan.threads) == 1 and lan.threads[0].is_alive()
    assert lan.fwd.owned(0) == {"a": [0, 1, 2, 3], "b": [0, 1]}
    assert not isinstance(lan.filters["a_to_b"], FilterCopies)  # one worker, one program
    share = lan.fwd.a_shares[0]
    assert isinstance(share, MemPort)
    for ring in range(4):
        share.inject_many((frame(ring, i) for i in range(50)), ring=ring)
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 200, "the restarted pair to forward")
    # and back to two workers, filter edited at the same time: one restart
    path.write_text(path.read_text().replace("workers = 1", "workers = 2"))
    assert request(sock, "reload")["restarted"] == ["lan"]
    assert len(bridge.pairs[0].fwd) == 2 and len(bridge.pairs[0].threads) == 2
    assert [e["pair"] for e in events(log_lines, "pair_stopped")] == ["lan", "lan"]


def test_a_filter_swap_reaches_every_worker(running: tuple[Bridge, str, Path]) -> None:
    bridge, sock, path = running
    lan = bridge.pairs[0]
    old = lan.filters["a_to_b"]
    path.write_text(path.read_text().replace('action = "drop"', 'action = "pass"'))
    r = request(sock, "reload")
    assert r["restarted"] == [] and r["filters"] == {"lan": {"a_to_b": "noarp", "b_to_a": "noarp"}}
    assert bridge.pairs[0] is lan  # the same workers, still forwarding
    new = lan.filters["a_to_b"]
    assert isinstance(new, FilterCopies) and not set(map(id, new.parts)) & set(map(id, old.parts))
    assert [w.filter("a_to_b") for w in lan.fwd.forwarders] == new.parts
    # the edited filter's rules go on counting from the old totals; ARP now passes on both workers
    for ring in range(4):
        share = lan.fwd.a_shares[ring % 2]
        assert isinstance(share, MemPort)
        share.inject_many((frame(ring, i, 0x0806) for i in range(30)), ring=ring // 2)
    wait_for(lambda: all(w.stats()["a_to_b"]["frames"] == PER_RING * 2 * 2 // 3 + 60
                         for w in lan.fwd.forwarders), "ARP frames to pass on both workers")
    hits = request(sock, "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"]["rule_hits"]
    assert hits == {"arp": 4 * PER_RING // 3 + 120, "default": 4 * PER_RING * 2 // 3}


def test_stop_stops_every_worker(tmp_path: Path, log_lines: io.StringIO) -> None:
    cfg = config.loads('[bridge]\nstats_interval = 0\n[control]\nsocket = ""\n'
                       '[[pair]]\nname = "p"\nports = ["mem:s?rx=source&tx=sink&rings=2", '
                       '"mem:d?rx=none&tx=sink&rings=2"]\nworkers = 2\n', "t")
    bridge = Bridge(cfg)
    done = threading.Thread(target=bridge.run, daemon=True)
    done.start()
    wait_for(lambda: events(log_lines, "ready") or events(log_lines, "forwarding"), "forwarding")
    wait_for(lambda: bridge.pairs and all(f.stats()["a_to_b"]["frames"] > 0
                                          for f in bridge.pairs[0].fwd.forwarders), "both workers to forward")
    threads = list(bridge.pairs[0].threads)
    bridge.events.put(("signal", "SIGTERM"))
    done.join(DEADLINE)
    assert not done.is_alive() and all(not t.is_alive() for t in threads)
    stopped = events(log_lines, "stopped")[0]["counters"]["p"]["a_to_b"]
    assert stopped["received"] == stopped["forwarded"] + stopped["dropped"] + stopped["queued"]


class FailingWorker(Forwarder):
    def run(self, *, max_frames: int = 0) -> None:
        if self.a.spec == "mem:s" and self.a.info()["rx_rings"] == 1:  # share 1 of 3 ring pairs: 1 ring
            raise PortError(f"{self.a.spec}: txsync: link went away")
        super().run(max_frames=max_frames)


def test_a_failing_worker_stops_the_pair_with_one_error(log_lines: io.StringIO,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker 1 fails: worker 0 is stopped too, the pair fails once, as a whole, and is closed
    and retried (nmbridge.healing); the bridge goes on until stopped."""
    monkeypatch.setattr(app, "Forwarder", FailingWorker)
    monkeypatch.setattr(healing, "FIRST_DELAY", 60.0)  # no retry during the test
    cfg = config.loads('[bridge]\nstats_interval = 0\n[control]\nsocket = ""\n'
                       '[[pair]]\nname = "p"\nports = ["mem:s?rx=source&tx=sink&rings=3", '
                       '"mem:d?rx=none&tx=sink&rings=2"]\nworkers = 2\n', "t")
    bridge = Bridge(cfg)
    t, errors = run_in_thread(bridge)
    try:
        wait_for(lambda: events(log_lines, "pair_down"), "the pair to go down")
        assert t.is_alive() and bridge.pairs == []
    finally:
        bridge.events.put(("signal", "TEST"))
        t.join(DEADLINE)
    assert not t.is_alive() and errors == []
    (failed,) = events(log_lines, "pair_failed")
    assert failed["error"] == "worker 1: mem:s: txsync: link went away"
    assert events(log_lines, "pair_down")[0]["reason"] == failed["error"]
    assert not events(log_lines, "threads_stuck")  # worker 0 was stopped too: the ports closed
    (stopped,) = events(log_lines, "pair_stopped")
    assert len(stopped["workers"]) == 2
    assert events(log_lines, "stopped")[0]["down"] == {"p": failed["error"]}


# --- doctor --------------------------------------------------------------------------------------

def test_doctor_shows_workers_and_warns_when_rss_has_more_queues(tmp_path: Path) -> None:
    from nmbridge import doctor

    c = config.loads(f'[[pair]]\nname = "lan"\nports = ["mem:a?rings=4", "mem:b?rings=2"]\nworkers = 2\n'
                     f'cpus = [{CPU}]\n', "t")
    (found,) = doctor.worker_findings(c.pairs[0], {})
    assert found.line() == (f"note: pair lan: 2 workers: worker 0 (cpu {CPU}): mem:a?rings=4 ring pairs 0,2, "
                            f"mem:b?rings=2 ring pair 0; worker 1 (cpu {CPU}): mem:a?rings=4 ring pairs 1,3, "
                            "mem:b?rings=2 ring pair 1")
    one = config.loads('[[pair]]\nname = "wan"\nports = ["afpacket:eth1", "afpacket:eth2"]\n', "t")
    warned = doctor.worker_findings(one.pairs[0], {"eth1": 4, "eth2": 1})
    assert [f.line() for f in warned] == [
        "warning: eth1: RSS spreads its received flows over 4 RX queues, but pair wan forwards them with 1 "
        "worker: 3 more cores could forward\n"
        "    fix: workers = 4 (and cpus) in pair wan, or fewer queues: ethtool -L eth1 combined 1"]
    for q in ("rx-0", "rx-1", "tx-0"):
        (tmp_path / "class" / "net" / "eth1" / "queues" / q).mkdir(parents=True)
    assert doctor.rx_queues("eth1", str(tmp_path)) == 2 and doctor.rx_queues("eth9", str(tmp_path)) is None


def test_nmbridge_run_with_workers(tmp_path: Path) -> None:
    """`nmbridge run` as a process: two workers forward, `nmbridge stats --json` and `ports
    --json` show them, SIGTERM stops both and the process exits 0."""
    import signal
    import subprocess
    import sys

    sock = tmp_path / "c.sock"
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0\n[control]\nsocket = "{sock}"\n'
                   '[[pair]]\nname = "p"\nports = ["mem:s?rx=source&tx=sink&rings=2", '
                   f'"mem:d?rx=none&tx=sink&rings=2"]\ndirection = "a-to-b"\nworkers = 2\ncpus = [{CPU}]\n')
    root = str(Path(__file__).resolve().parents[2])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    proc = subprocess.Popen([sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def both_forward() -> bool:
            assert proc.poll() is None, "nmbridge run ended"
            try:  # the socket is made, then listened on, then served before the pairs start
                pairs = request(str(sock), "stats")["snapshot"]["pairs"]
            except ControlError:
                return False
            ws = pairs[0]["workers"] if pairs else []
            return len(ws) == 2 and all(w["directions"]["a_to_b"]["forwarded"] > 0 for w in ws)

        wait_for(both_forward, "both workers to forward")
        rows = request(str(sock), "ports")["ports"]
        assert [(r["worker"], r["cpu"], r["ring_pairs"]) for r in rows] == [
            (0, CPU, [0]), (1, CPU, [1]), (0, CPU, [0]), (1, CPU, [1])]
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, err
    evs = [json.loads(line) for line in out.splitlines()]
    started = next(e for e in evs if e["event"] == "forwarding")
    assert [w["worker"] for w in started["workers"]] == [0, 1]
    stopped = next(e for e in evs if e["event"] == "stopped")["counters"]["p"]["a_to_b"]
    assert stopped["received"] == stopped["forwarded"] + stopped["dropped"] + stopped["queued"] > 0
