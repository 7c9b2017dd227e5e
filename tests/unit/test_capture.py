"""The capture tap: the C ring (SPSC, bounded, counted), the tap in fastfwd, the pcapng writer."""

from __future__ import annotations

import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from fwdutil import drain, frame
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.utils import PcapNgReader

from nmbridge.backends import OpenOptions
from nmbridge.backends.mem import MemPort
from nmbridge.backends.mem_backend import BACKEND as MEM
from nmbridge.capring import Tap
from nmbridge.capture import Capture, CaptureSpec, block_comments, epb, idb, isb, read_blocks, shb
from nmbridge.errors import NmbridgeError
from nmbridge.fastfwd import Forwarder
from nmbridge.filters import FilterConfig, RuleConfig, compile_filter
from nmbridge.filters.engine import decide_address
from nmbridge.netmap_consts import NS_MOREFRAG
from nmbridge.port import Region
from nmbridge.workers import FilterCopies, Workers


def test_ring_loses_and_duplicates_nothing_between_threads() -> None:
    """A producer without the GIL against a draining consumer: every record arrives once, in
    order; what found the ring full is counted, and captured + full == offered."""
    tap = Tap(0, ["forwarded"], snaplen=64, ring_bytes=1 << 14, rate=0)
    n = 200_000
    got: list[int] = []
    producer = threading.Thread(target=tap._produce, args=(n, 64))
    producer.start()
    while producer.is_alive() or len(got) < tap.counters()["captured"]:
        got += [struct.unpack_from("<Q", r[5])[0] for r in tap.drain()]
    producer.join()
    got += [struct.unpack_from("<Q", r[5])[0] for r in tap.drain()]
    c = tap.counters()
    assert len(got) == c["captured"] == len(set(got))
    assert got == sorted(got)
    assert c["captured"] + c["capture_dropped"] == c["seen"] == n
    assert c["captured"] > 0


def test_full_ring_counts_and_keeps_what_it_has() -> None:
    tap = Tap(1, ["forwarded"], snaplen=100, ring_bytes=4096, rate=0)
    for i in range(100):
        tap._offer("forwarded", frame(i, 100))
    c = tap.counters()
    assert c["captured"] == 4096 // (32 + 104) and c["capture_dropped"] == 100 - c["captured"]
    recs = tap.drain()
    assert [r[5] for r in recs] == [frame(i, 100) for i in range(c["captured"])]
    assert all(r[0] == 1 and r[1] == "forwarded" and r[4] == 100 for r in recs)
    for i in range(100, 125):  # room again, wrapping around the end
        tap._offer("forwarded", frame(i, 100))
    assert [r[5] for r in tap.drain()] == [frame(i, 100) for i in range(100, 125)]
    assert tap.counters()["capture_dropped"] == 100 - c["captured"]


def test_selection_snaplen_limit_and_rate() -> None:
    tap = Tap(0, ["filter"], snaplen=20, ring_bytes=1 << 16, rate=0, limit=3)
    tap._offer("forwarded", frame(1))  # not selected: not even seen
    for i in range(5):
        tap._offer("filter", frame(i, 80))
    recs = tap.drain()
    assert [(r[1], r[4], r[5]) for r in recs] == [("filter", 80, frame(i, 80)[:20]) for i in range(3)]
    assert tap.counters()["seen"] == 3
    slow = Tap(0, ["forwarded"], snaplen=64, ring_bytes=1 << 16, rate=1)  # bucket of 64
    for i in range(200):
        slow._offer("forwarded", frame(i))
    c = slow.counters()
    assert c["captured"] == 64 and c["rate_limited"] == 136  # well within one second


def test_expression_selects_and_filter_rule_is_named() -> None:
    flt = compile_filter(FilterConfig("guard", "pass", (
        RuleConfig("keep-ssh", "pass", {"dst_port": 22}),
        RuleConfig("no telnet", "drop", pcap="tcp port 23"),
    )))
    sel = compile_filter(FilterConfig("sel", "drop", (RuleConfig("m", "pass", pcap="tcp"),)))
    tap = Tap(0, ["forwarded", "filter"], snaplen=256, ring_bytes=1 << 16, rate=0,
              select=sel, decide=decide_address())
    telnet = bytes(Ether() / IP() / TCP(dport=23))
    ssh = bytes(Ether() / IP() / TCP(dport=22))
    dns = bytes(Ether() / IP() / UDP(dport=53))
    tap._offer("filter", telnet, flt.address)
    tap._offer("forwarded", ssh, flt.address)
    tap._offer("forwarded", dns, flt.address)  # not tcp: the expression skips it
    recs = tap.drain()
    assert [(r[1], r[2], r[5]) for r in recs] == [("filter", 1, telnet), ("forwarded", 0, ssh)]
    assert flt.hits()["no telnet"] == 0  # naming the rule counts nothing


def _capture_pair(flt: object | None = None) -> tuple[MemPort, MemPort, Forwarder, object]:
    region = Region(ports=2, slots=64, buf_size=2048)
    a = MemPort(region, "ca", slots=64)
    b = MemPort(region, "cb", slots=64)
    fwd = Forwarder(a, b, burst=16)

    class P:  # what Capture needs of a running pair
        class config:
            name = "lan"
            ports = ("mem:ca", "mem:cb")
        filters: dict[str, object] = {}

    p = P()
    p.fwd = Workers([a], [b], lambda x, y: fwd)  # type: ignore[attr-defined]
    if flt is not None:
        fwd.set_filter("a_to_b", flt)
        p.filters = {"a_to_b": flt}
    return a, b, fwd, p


def test_tap_in_fastfwd_sees_every_verdict_and_changes_nothing() -> None:
    flt = compile_filter(FilterConfig("guard", "pass",
                                      (RuleConfig("no telnet", "drop", pcap="tcp port 23"),)))
    a, b, fwd, p = _capture_pair(flt)
    cap = Capture(CaptureSpec("lan", ("a_to_b", "b_to_a"), "all", rate=0), p)
    cap.attach()
    telnet = bytes(Ether() / IP() / TCP(dport=23))
    sent = [frame(1, 100), telnet, frame(2, 1500), telnet, frame(3, 3000)]  # the last: a chain
    a.inject_many(sent)
    a.inject_slot(frame(4, 100), length=2049)  # oversize
    back = [frame(9, 64)]
    b.inject_many(back)
    drain(fwd, a, b)
    cap.detach()
    assert b.collect() == [sent[0], sent[2], sent[4]] and a.collect() == back
    blocks = read_blocks(cap.preamble() + cap.drain() + cap.trailer())
    epbs = [body for t, body in blocks if t == 6]
    got = []
    for body in epbs:
        ifc, _hi, _lo, caplen, origlen = struct.unpack_from("<IIIII", body)
        got.append((ifc, body[20:20 + caplen], origlen, block_comments(6, body)))
    assert sorted(got, key=lambda g: (g[0], g[1])) == sorted([
        (0, sent[0], 100, ["forwarded: filter guard, default action"]),
        (0, telnet, len(telnet), ['dropped: filter guard, rule "no telnet"']),
        (0, sent[1 + 1], 1500, ["forwarded: filter guard, default action"]),
        (0, telnet, len(telnet), ['dropped: filter guard, rule "no telnet"']),
        (0, sent[4], 3000, ["forwarded: filter guard, default action"]),  # a chain, whole
        (0, frame(4, 100) + bytes(2048 - 100), 2049, ["dropped: oversize (longer than a buffer)"]),
        (1, back[0], 64, []),
    ], key=lambda g: (g[0], g[1]))
    assert fwd.stats()["a_to_b"]["filtered"] == 2 and fwd.stats()["a_to_b"]["oversize"] == 1
    assert flt.hits()["no telnet"] == 2  # the tap's naming of rules added no hit


def test_broken_chain_is_captured() -> None:
    a, b, fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "dropped", rate=0), p)
    cap.attach()
    for _ in range(63):
        a.inject_slot(b"z" * 64, flags=NS_MOREFRAG)
    a.inject_slot(b"end")
    a.inject(frame(5))
    drain(fwd, a, b)
    epbs = [body for t, body in read_blocks(cap.drain()) if t == 6]
    assert len(epbs) == 1 and block_comments(6, epbs[0])[0].startswith("dropped: broken chain")
    assert b.collect() == [frame(5)]


def test_a_removed_tap_is_not_written_and_what_is_off_costs_nothing() -> None:
    a, b, fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0), p)
    cap.attach()
    cap.detach()
    assert fwd.tap("a_to_b") is None
    a.inject_many([frame(i) for i in range(10)])
    drain(fwd, a, b)
    assert cap.taps["a_to_b"].counters()["seen"] == 0 and len(b.collect()) == 10


def test_pcapng_reads_back_with_scapy_and_tcpdump(tmp_path: Path) -> None:
    import shutil
    import subprocess

    frames = [bytes(Ether() / IP(dst="10.0.0.2") / UDP(dport=53 + i)) for i in range(3)]
    ts = 1_700_000_000_123_456_789
    data = (shb() + idb("lan:a-to-b", "mem:a -> mem:b", 65535) + idb("lan:b-to-a", "x", 65535)
            + b"".join(epb(i % 2, ts + i, f, len(f) + 4, "dropped: filter g, rule \"r\"" if i else None)
                       for i, f in enumerate(frames))
            + isb(0, ts + 10, start_ns=ts, received=3, dropped=1, comment="done"))
    path = tmp_path / "c.pcapng"
    path.write_bytes(data)
    with PcapNgReader(str(path)) as r:
        pkts = list(r)
    assert [bytes(p) for p in pkts] == frames
    assert pkts[0].time == pytest.approx(ts / 1e9)
    assert int(pkts[1].time * 10**9) // 1000 == (ts + 1) // 1000
    assert pkts[1].comments == [b'dropped: filter g, rule "r"']
    if shutil.which("tcpdump"):
        out = subprocess.run(["tcpdump", "-nr", str(path)], capture_output=True, text=True, check=True)
        assert out.stdout.count("\n") == 3 and ".53:" not in out.stdout.split("\n")[1]


def test_capture_spec_refuses_bad_requests_in_one_line() -> None:
    for req, word in (({}, "pair"), ({"pair": "x", "what": "some"}, "what"),
                      ({"pair": "x", "count": -1}, "count"), ({"pair": "x", "direction": "up"}, "direction"),
                      ({"pair": "x", "snaplen": 0}, "snaplen")):
        with pytest.raises(NmbridgeError, match=word):
            CaptureSpec.from_request(req)
    with pytest.raises(NmbridgeError, match="capture filter"):
        _a, _b, _fwd, p = _capture_pair()
        Capture(CaptureSpec("lan", ("a_to_b",), expr="tcp port"), p)


def test_stream_ends_at_count_and_when_the_client_closes() -> None:
    import socket

    a, b, fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", count=3, rate=0), p)
    srv, cli = socket.socketpair()
    t = threading.Thread(target=cap.stream, args=(srv,))
    t.start()
    deadline = time.monotonic() + 10
    while fwd.tap("a_to_b") is None and time.monotonic() < deadline:
        time.sleep(0.005)
    a.inject_many([frame(i) for i in range(5)])
    drain(fwd, a, b)
    t.join(10)
    assert not t.is_alive() and cap.ended == "count"
    srv.close()
    data = b""
    while chunk := cli.recv(65536):
        data += chunk
    assert [t for t, _ in read_blocks(data)] == [0x0A0D0D0A, 1, 6, 6, 6, 5]
    assert fwd.tap("a_to_b") is None
    cap2 = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0), p)
    srv2, cli2 = socket.socketpair()
    t = threading.Thread(target=cap2.stream, args=(srv2,))
    t.start()
    cli2.close()  # the client goes away
    t.join(10)
    assert not t.is_alive() and cap2.ended in ("client closed", "client gone")
    assert fwd.tap("a_to_b") is None
    srv2.close()


def test_metrics_and_stats_table_show_running_captures() -> None:
    from nmbridge.cli import stats_table
    from nmbridge.metrics import capture_metrics

    counters = {"seen": 10, "captured": 7, "capture_dropped": 1, "rate_limited": 2, "bytes": 700}
    snap: dict[str, object] = {
        "time": 0.0, "links": {},
        "pairs": [{"pair": "lan", "ports": ["mem:a", "mem:b"], "zerocopy": True,
                   "directions": {"a_to_b": {"frames": 5}}}],
        "captures": [{"capture": 4, "pair": "lan", "what": "dropped", "filter": "tcp", "written": 7,
                      "directions": {"a_to_b": counters}}]}
    fams = {m.name: m for m in capture_metrics(snap)}  # type: ignore[arg-type]
    assert [s.value for s in fams["nmbridge_captures"].samples] == [1.0]
    got = {(s.labels["outcome"], s.value) for s in fams["nmbridge_capture_frames"].samples
           if s.name.endswith("_total")}
    assert got == {("captured", 7.0), ("capture_dropped", 1.0), ("rate_limited", 2.0)}
    text = stats_table({"snapshot": snap, "rates": {}})
    assert text.splitlines()[-1] == ("capture 4 on lan (dropped, 'tcp'): 7 written, 10 seen, "
                                     "1 capture_dropped, 2 rate_limited")
    assert not list(capture_metrics({"time": 0.0, "pairs": [], "links": {}}))[1].samples


def test_a_chain_is_captured_across_its_slots_up_to_snaplen() -> None:
    a, b, fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "forwarded", snaplen=2100, rate=0), p)
    cap.attach()
    big = frame(6, 5000)  # three 2048-byte slots
    a.inject(big)
    drain(fwd, a, b)
    assert b.collect() == [big]
    (body,) = [body for t, body in read_blocks(cap.drain()) if t == 6]
    caplen, origlen = struct.unpack_from("<II", body, 12)
    assert (caplen, origlen, body[20:20 + caplen]) == (2100, 5000, big[:2100])


def test_a_new_forwarder_for_the_pair_gets_the_taps_again() -> None:
    """A reload that resumes a pair gives it a new Forwarder: the capture follows it."""
    a, b, _fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0), p)
    cap.attach()
    new = Forwarder(a, b, burst=16)
    p.fwd = Workers([a], [b], lambda x, y: new)  # type: ignore[attr-defined]
    cap.attach()
    assert p.fwd.tap("a_to_b") is cap.taps["a_to_b"]  # type: ignore[attr-defined]
    assert new.tap("a_to_b") is cap.taps["a_to_b"].parts[0]
    a.inject(frame(1))
    drain(new, a, b)
    assert cap.taps["a_to_b"].counters()["captured"] == 1
    cap.detach()
    assert p.fwd.tap("a_to_b") is None and new.tap("a_to_b") is None  # type: ignore[attr-defined]


def test_stream_ends_after_its_duration_with_the_statistics_block() -> None:
    import socket

    _a, _b, _fwd, p = _capture_pair()
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", duration=0.2, rate=0), p)
    srv, cli = socket.socketpair()
    t = threading.Thread(target=cap.stream, args=(srv,))
    t.start()
    t.join(10)
    assert not t.is_alive() and cap.ended == "duration"
    srv.close()
    data = b""
    while chunk := cli.recv(65536):
        data += chunk
    blocks = read_blocks(data)
    assert [t for t, _ in blocks] == [0x0A0D0D0A, 1, 5]
    assert block_comments(*blocks[-1])[0].startswith("capture ") and "ended (duration)" in \
        block_comments(*blocks[-1])[0]


# --- a pair of several workers: a tap per worker, merged by timestamp ------------------------

class _TwoWorkers:
    """What Capture needs of a pair of two workers, without ports (the taps are fed by hand)."""

    class config:
        name = "lan"
        ports = ("mem:ca", "mem:cb")

    filters: dict[str, object] = {}

    class fwd:
        @staticmethod
        def __len__() -> int:
            return 2

        @staticmethod
        def stats() -> dict[str, object]:
            return {"a_to_b": {}, "b_to_a": {}}


def _frames_of(data: bytes) -> list[tuple[int, bytes]]:
    """(interface, frame) of each EPB."""
    out = []
    for t, body in read_blocks(data):
        if t == 6:
            ifc, _hi, _lo, caplen, _origlen = struct.unpack_from("<IIIII", body)
            out.append((ifc, body[20:20 + caplen]))
    return out


def test_taps_of_several_workers_merge_by_time_each_in_its_order(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _TwoWorkers()
    p.fwd = _TwoWorkers.fwd()  # type: ignore[assignment]
    cap = Capture(CaptureSpec("lan", ("a_to_b", "b_to_a"), "all", rate=0), p)
    assert [len(t.parts) for t in cap.taps.values()] == [2, 2]
    a0, a1 = cap.taps["a_to_b"].parts
    b0, b1 = cap.taps["b_to_a"].parts
    order = [(a0, 0), (a1, 1), (b1, 2), (a0, 3), (b0, 4), (a1, 5), (a1, 6), (b0, 7)]
    for tap, i in order:  # each stamped when offered: one clock, so this is time order
        tap._offer("forwarded", frame(i))
    got = _frames_of(cap.drain())
    assert got == [(0 if tap in (a0, a1) else 1, frame(i)) for tap, i in order]
    assert cap.drain() == b""

    # a tap that may hold more than one read takes: what another tap has of later is held back
    monkeypatch.setattr("nmbridge.capture.DRAIN_RECORDS", 2)
    for i in range(3):
        a0._offer("forwarded", frame(10 + i))
    a1._offer("forwarded", frame(13))
    assert _frames_of(cap.drain()) == [(0, frame(10)), (0, frame(11))]  # frame 13 waits for 12
    assert _frames_of(cap.drain()) == [(0, frame(12)), (0, frame(13))]

    # counters: summed per direction, and each worker's beside them (info, statistics blocks)
    info = cap.info()
    assert info["directions"]["a_to_b"]["captured"] == 9
    assert [w["directions"]["a_to_b"]["captured"] for w in info["workers"]] == [5, 4]
    cap.ended = "count"
    comments = [block_comments(t, body)[0] for t, body in read_blocks(cap.trailer())]
    assert comments[0].endswith("ended (count): seen 9, captured 9, capture_dropped 0, rate_limited 0; "
                                "worker 0: captured 5, capture_dropped 0, rate_limited 0; "
                                "worker 1: captured 4, capture_dropped 0, rate_limited 0")
    assert "worker 0: captured 2" in comments[1] and "worker 1: captured 1" in comments[1]


def test_a_flush_writes_what_was_held_back_and_count_spans_taps(monkeypatch: pytest.MonkeyPatch) -> None:
    p = _TwoWorkers()
    p.fwd = _TwoWorkers.fwd()  # type: ignore[assignment]
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0, count=5), p)
    t0, t1 = cap.taps["a_to_b"].parts
    monkeypatch.setattr("nmbridge.capture.DRAIN_RECORDS", 1)
    t0._offer("forwarded", frame(0))
    t0._offer("forwarded", frame(1))
    t1._offer("forwarded", frame(2))
    assert _frames_of(cap.drain()) == [(0, frame(0))]
    assert _frames_of(cap.drain(flush=True)) == [(0, frame(1)), (0, frame(2))]
    for i in range(3, 10):
        (t0 if i % 2 else t1)._offer("forwarded", frame(i))
    assert _frames_of(cap.drain(flush=True)) == [(0, frame(3)), (0, frame(4))]  # 5 in all
    assert cap.done() and cap.written == 5


def test_the_rate_limit_is_the_pairs_shared_by_its_workers() -> None:
    p = _TwoWorkers()
    p.fwd = _TwoWorkers.fwd()  # type: ignore[assignment]
    cap = Capture(CaptureSpec("lan", ("a_to_b", "b_to_a"), "all", rate=2561), p)
    assert [[t.rate for t in taps.parts] for taps in cap.taps.values()] == [[1281, 1281]] * 2  # rounded up
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0), p)
    assert [t.rate for t in cap.taps["a_to_b"].parts] == [0, 0]  # no limit stays none


def test_two_forwarding_workers_each_write_their_own_tap() -> None:
    """Two workers over two shares of each port (stepped here, one after the other): the
    capture sees every verdict of both, once each, in time order, with the deciding rule."""
    region = Region(ports=2, rings=2, slots=64, buf_size=2048)
    a = MEM.open_shares("ca?rings=2", OpenOptions(slots=64), region, 2)
    b = MEM.open_shares("cb?rings=2", OpenOptions(slots=64), region, 2)
    fwds = [Forwarder(x, y, burst=16) for x, y in zip(a, b, strict=True)]
    made = iter(fwds)
    workers = Workers(a, b, lambda x, y: next(made))
    rules = (RuleConfig("no 3", "drop", pcap="ether[17] = 3"),)
    parts = [compile_filter(FilterConfig("guard", "pass", rules)) for _ in fwds]
    copies = FilterCopies(parts)
    workers.set_filter("a_to_b", copies)
    p = _TwoWorkers()
    p.fwd = workers  # type: ignore[assignment]
    p.filters = {"a_to_b": copies}
    cap = Capture(CaptureSpec("lan", ("a_to_b",), "all", rate=0), p)
    cap.attach()
    assert [f.tap("a_to_b") for f in fwds] == cap.taps["a_to_b"].parts
    sent = []
    for i in range(8):
        w = (i // 2) % 2  # 0 0 1 1 0 0 1 1
        share = a[w]
        assert isinstance(share, MemPort)
        share.inject(frame(i))
        drain(fwds[w], a[w], b[w])
        sent.append(frame(i))
    cap.detach()
    assert all(f.tap("a_to_b") is None for f in fwds) and workers.tap("a_to_b") is None
    blocks = read_blocks(cap.drain(flush=True))
    epbs = [body for t, body in blocks if t == 6]
    assert [body[20:20 + struct.unpack_from("<I", body, 12)[0]] for body in epbs] == sent
    assert [block_comments(6, body) for body in epbs][3] == ['dropped: filter guard, rule "no 3"']
    assert [w["directions"]["a_to_b"]["captured"] for w in cap.info()["workers"]] == [4, 4]
    with pytest.raises(ValueError, match="1 capture taps for 2 workers"):
        workers.set_tap("a_to_b", Tap(0, ["forwarded"]))


def _stream_until_half_closed(srv: Any, chunk: bytes, end: bytes, sent: list[int]) -> None:
    """A capture's bridge side: answer the request, send `chunk` after `chunk` until the
    client half-closes, then `end` and close; `sent[0]`: the bytes sent."""
    import json
    import select

    conn, _ = srv.accept()
    with conn:
        json.loads(conn.makefile("rb").readline())
        conn.sendall(json.dumps({"ok": True, "result": {}}).encode() + b"\n")
        while not select.select([conn], [], [], 0)[0]:
            conn.sendall(chunk)
            sent[0] += len(chunk)
        assert conn.recv(1) == b""
        conn.sendall(end)
        sent[0] += len(end)


def test_capture_client_ends_cleanly_on_sigint_while_the_stream_flows(tmp_path: Path) -> None:
    """`nmbridge capture` interrupted while blocks keep coming (so the signal lands anywhere
    in its copy loop, mostly while it parses and writes a chunk): it half-closes, the bridge
    ends the stream, and it exits 0 with every byte the bridge sent in the file -- not 130
    with a torn file, as when the interrupt was a KeyboardInterrupt caught only around recv."""
    import os
    import signal
    import socket
    import subprocess
    import sys

    block = struct.pack("<II", 6, 32) + bytes(20) + struct.pack("<I", 32)  # an empty EPB
    chunk = block * 2048
    for attempt in range(3):
        path = str(tmp_path / f"c{attempt}.sock")
        out = tmp_path / f"cap{attempt}.pcapng"
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(path)
        srv.listen(1)
        sent = [0]
        t = threading.Thread(target=_stream_until_half_closed, args=(srv, chunk, block, sent))
        t.start()
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(Path(__file__).parents[2]),
                                                                           os.environ.get("PYTHONPATH")])))
        cli = subprocess.Popen([sys.executable, "-m", "nmbridge", "capture", "--control", path, "-p", "x",
                                "-w", str(out)], env=env, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 30
            while not out.exists() or out.stat().st_size < 4 << 20:  # well into the copy loop
                assert time.monotonic() < deadline and cli.poll() is None, cli.stderr
                time.sleep(0.01)
            cli.send_signal(signal.SIGINT)
            assert cli.wait(30) == 0, cli.stderr.read() if cli.stderr else ""
        finally:
            if cli.poll() is None:
                cli.kill()
            t.join(30)
            srv.close()
        assert out.stat().st_size == sent[0]
