"""``nmbridge run``: forwarding on mem: ports, clean stops, and every way a run fails."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nmbridge import config, filters
from nmbridge.app import Bridge
from nmbridge.backends import mem_backend
from nmbridge.errors import NmbridgeError, PortError
from nmbridge.port import Port

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds; generous for a loaded CI machine, never slept


def mem_config(extra: str = "", pairs: int = 1, **bridge: object) -> config.Config:
    head = "[bridge]\n" + "".join(f"{k} = {json.dumps(v)}\n" for k, v in bridge.items())
    body = "".join(f'[[pair]]\nname = "p{i}"\nports = ["mem:src{i}?rx=source&tx=sink", '
                   f'"mem:dst{i}?rx=none&tx=sink"]\ndirection = "a-to-b"\n' for i in range(pairs))
    return config.loads(head + body + extra, "test.toml")


def events(out: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def stop_when(bridge: Bridge, out: io.StringIO, event: str) -> threading.Thread:
    """Stop `bridge` (as a signal would) once `event` has been logged."""
    def watch() -> None:
        deadline = time.monotonic() + DEADLINE
        while event not in out.getvalue() and time.monotonic() < deadline:
            time.sleep(0.01)
        bridge.events.put(("signal", "TEST"))
    t = threading.Thread(target=watch, daemon=True)
    t.start()
    return t


# --- the real thing: a subprocess stopped by a signal ----------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_mem_forwards_and_stops_cleanly_on_a_signal(sig: signal.Signals) -> None:
    pythonpath = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    argv = [sys.executable, "-m", "nmbridge", "run", "-c", str(ROOT / "etc" / "mem.toml")]
    with subprocess.Popen(argv, cwd=ROOT, env=dict(os.environ, PYTHONPATH=pythonpath),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) as proc:
        got: queue.SimpleQueue[str] = queue.SimpleQueue()
        reader = threading.Thread(target=lambda: [got.put(line) for line in proc.stdout or ()], daemon=True)
        reader.start()
        lines: list[str] = []
        try:
            deadline = time.monotonic() + DEADLINE
            while not any('"forwarding"' in line for line in lines):
                lines.append(got.get(timeout=max(0.0, deadline - time.monotonic())))
            proc.send_signal(sig)
            proc.wait(timeout=DEADLINE)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        reader.join(timeout=DEADLINE)
        stderr = proc.stderr.read() if proc.stderr else ""
    while not got.empty():
        lines.append(got.get())
    assert proc.returncode == 0, stderr
    assert stderr == ""
    records = [json.loads(line) for line in lines]  # every line is one JSON object
    records = [r for r in records if r["event"] != "forwarding_sched"]  # the thread's own, in any order
    names = [r["event"] for r in records]
    assert names[:4] == ["starting", "port_opened", "port_opened", "forwarding"]
    assert names[-2:] == ["stopping", "stopped"]
    assert all({"timestamp", "level", "event"} <= r.keys() for r in records)
    assert records[0]["config"].endswith("mem.toml") and records[0]["backends"] == ["mem"]
    assert records[1]["port"] == "mem:gen?rx=source&tx=sink" and records[1]["pair"] == "mem"
    assert records[1]["rx_slots"] == 1024 and records[1]["buf_size"] == 2048 and records[1]["region"]
    assert records[3]["zero_copy"] is True
    assert records[-2]["signal"] == sig.name
    counters = records[-1]["counters"]["mem"]
    assert set(counters) == {"a_to_b"}
    a_to_b = counters["a_to_b"]
    assert a_to_b["forwarded"] > 0 and a_to_b["bytes"] == 60 * a_to_b["forwarded"]
    # an endless source: what it delivered was forwarded or still in the rings, never lost
    assert a_to_b["received"] == a_to_b["forwarded"] + a_to_b["queued"] and a_to_b["dropped"] == 0


# --- in process ------------------------------------------------------------------------


def test_every_pair_forwards_and_every_port_is_closed_after(log_lines: io.StringIO) -> None:
    bridge = Bridge(mem_config(pairs=2, stats_interval=0.05))
    stop_when(bridge, log_lines, '"stats"')
    bridge.run()
    names = [e["event"] for e in events(log_lines)]
    assert names.count("port_opened") == 4 and names.count("forwarding") == 2
    assert "stats" in names
    stats = next(e for e in events(log_lines) if e["event"] == "stats")
    assert stats["pair"] in ("p0", "p1") and "forwarded" in stats["a_to_b"]
    stopped = events(log_lines)[-1]
    assert stopped["event"] == "stopped" and set(stopped["counters"]) == {"p0", "p1"}
    assert all(p.a.closed and p.b.closed for p in bridge.pairs)
    assert all(p.threads and not any(t.is_alive() for t in p.threads) for p in bridge.pairs)


def test_stop_before_the_loop_starts_is_not_lost(log_lines: io.StringIO) -> None:
    bridge = Bridge(mem_config())
    bridge.events.put(("signal", "TEST"))  # already there when run() starts
    bridge.run()
    assert events(log_lines)[-1]["event"] == "stopped"


def test_a_port_that_fails_to_open_names_pair_and_port_and_leaves_nothing_open(
        log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    opened: list[Port] = []
    real_open = mem_backend.BACKEND.open_shares

    def recording_open(*args: Any) -> list[Port]:
        ports = real_open(*args)
        opened.extend(ports)
        return ports
    monkeypatch.setattr(mem_backend.BACKEND, "open_shares", recording_open)
    # frames of 4000 bytes do not fit 2048-byte buffers: the last port refuses to open
    cfg = mem_config('[[pair]]\nname = "bad"\nports = ["mem:x", "mem:y?rx=source&frame_len=4000"]\n')
    with pytest.raises(PortError) as e:
        Bridge(cfg).run()
    assert str(e.value).startswith("pair bad: port mem:y?rx=source&frame_len=4000: ")
    assert "frame_len 4000" in str(e.value)
    assert len(opened) == 3 and all(p.closed for p in opened)
    assert [x["event"] for x in events(log_lines)] == ["starting"]


def test_a_missing_interface_names_pair_and_port(log_lines: io.StringIO) -> None:
    """A missing interface is found by the link look-up, before any port opens or any link
    changes, and the error names the pair and the port."""
    cfg = config.loads('[[pair]]\nname = "lan"\nports = ["afpacket:nmbtest0", "afpacket:nmbtest1"]\n', "t")
    with pytest.raises(NmbridgeError, match=r"^pair lan: port afpacket:nmbtest0: .*no such interface"):
        Bridge(cfg).run()


# A pair whose forwarder fails is closed and retried, the bridge goes on: tests/unit/test_healing.py


class FakeFilter:
    address = 0  # no C program: the loop forwards everything

    def __init__(self, f: filters.FilterConfig) -> None:
        self.config = f


def test_filters_are_compiled_per_pair_and_direction(
        log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """Each forwarding direction gets its own compiled program: two threads never write the
    same rule-hit counters."""
    monkeypatch.setattr(filters, "compile_filter", FakeFilter, raising=False)
    cfg = config.loads('[filter.f]\n[[pair]]\nports = ["mem:a", "mem:b"]\nfilter = "f"\n'
                       '[[pair]]\nports = ["mem:c", "mem:d"]\nfilter_a_to_b = "f"\n', "t")
    bridge = Bridge(cfg)
    bridge.open_ports()
    try:
        bridge.install_filters()
        installed = [bridge.pairs[0].fwd.filter("a_to_b"), bridge.pairs[0].fwd.filter("b_to_a"),
                     bridge.pairs[1].fwd.filter("a_to_b")]
        assert all(isinstance(f, FakeFilter) and f.config is cfg.filters["f"] for f in installed)
        assert len({id(f) for f in installed}) == 3
        assert bridge.pairs[1].fwd.filter("b_to_a") is None
    finally:
        bridge.close()


def test_a_filter_without_a_compiler_refuses_to_run(
        log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delattr(filters, "compile_filter", raising=False)
    cfg = config.loads('[filter.f]\n[[pair]]\nname = "x"\nports = ["mem:a", "mem:b"]\nfilter = "f"\n', "t")
    with pytest.raises(NmbridgeError, match=r'^pair x: filter "f" cannot run'):
        Bridge(cfg).run()


def test_a_control_socket_in_use_is_refused_before_any_interface_is_looked_up(
        log_lines: io.StringIO, tmp_path: Path) -> None:
    """Checks that need no link come first: a control socket another bridge serves fails the
    start before the (missing) interface is even looked up."""
    from nmbridge.control import ControlServer

    path = str(tmp_path / "c.sock")
    other = ControlServer(path, {}).start()
    try:
        cfg = config.loads(f'[control]\nsocket = "{path}"\n[[pair]]\nname = "lan"\n'
                           'ports = ["afpacket:nmbtest0", "afpacket:nmbtest1"]\n', "t")
        with pytest.raises(NmbridgeError, match=r"^control socket: .*another nmbridge is already listening"):
            Bridge(cfg, state_directory=str(tmp_path / "state")).run()
    finally:
        other.close()
    assert [e["event"] for e in events(log_lines)] == ["starting"]
    assert not (tmp_path / "state").exists()  # no lock taken either
