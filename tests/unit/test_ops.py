"""Operating a running bridge (no root): config keys, the control socket, stats events,
Prometheus metrics, reload, sd_notify and the capability check."""

from __future__ import annotations

import io
import json
import os
import queue
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fwdutil import wait_for
from prometheus_client.parser import text_string_to_metric_families

from nmbridge import caps, cli, config, logs
from nmbridge import reload as reload_module
from nmbridge.app import Bridge, required_capabilities
from nmbridge.control import ControlError, ControlServer, request
from nmbridge.errors import ConfigError, PortError

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds; generous for a loaded machine, never slept


def events(out: io.StringIO, name: str | None = None) -> list[dict[str, Any]]:
    evs = [json.loads(line) for line in out.getvalue().splitlines()]
    return [e for e in evs if name is None or e["event"] == name]


# --- config ------------------------------------------------------------------------------

PAIR = '[[pair]]\nports = ["mem:a", "mem:b"]\n'


def test_metrics_and_control_defaults_and_values() -> None:
    c = config.loads(PAIR)
    assert c.metrics.listen is None and c.control.socket is None
    assert c.control.path == "/run/nmbridge/control.sock"
    c = config.loads('[metrics]\nlisten = "[::1]:9108"\n[control]\nsocket = ""\n' + PAIR)
    assert c.metrics.listen == "[::1]:9108" and c.control.path == ""
    assert config.from_dict(c.as_dict(), c.path) == c


@pytest.mark.parametrize("toml, message", [
    ('[metrics]\nlisten = "9108"\n', 't:2: metrics.listen = "9108": must be HOST:PORT'),
    ('[metrics]\nlisten = "example.org:9108"\n', "is not an IP address (or localhost)"),
    ('[metrics]\nlisten = "::1:9108"\n', "in brackets"),
    ('[metrics]\nlisten = 9108\n', "must be a string, not an integer"),
    ('[metrics]\nport = 9108\n', 't:2: metrics.port = 9108: unknown key; known keys: listen'),
    ('[control]\nsocket = "run/c.sock"\n', "control.socket = \"run/c.sock\": must be an absolute path"),
    ('[control]\nsocket = "/' + "x" * 120 + '"\n', "longer than 107 bytes"),
    ('[control]\npath = "/x"\n', 'unknown key; known keys: socket'),
])
def test_bad_metrics_and_control_keys(toml: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.loads(toml + PAIR, "t")
    assert message in str(e.value) and "\n" not in str(e.value)


def test_annotated_example_config_has_the_new_keys() -> None:
    text = (ROOT / "etc" / "bridge.toml").read_text()
    assert "[metrics]" in text and "[control]" in text
    c = config.loads(text.replace('ports = ["eth1", "eth2"]', 'ports = ["mem:x", "mem:y"]'), "bridge.toml")
    assert c.control.path == "/run/nmbridge/control.sock"


# --- the control socket ------------------------------------------------------------------


def test_control_commands_errors_and_mode(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")

    def boom(req: dict[str, Any]) -> Any:
        raise RuntimeError("a handler bug")

    server = ControlServer(path, {"echo": lambda req: req.get("x"), "boom": boom}).start()
    try:
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o660
        assert request(path, "echo", x=[1, 2]) == [1, 2]
        with pytest.raises(ControlError, match=r"^unknown command 'nope' \(known: boom, echo\)$"):
            request(path, "nope")
        with pytest.raises(ControlError, match="RuntimeError: a handler bug"):
            request(path, "boom")
        # a malformed line is answered, and the same connection still works afterwards
        with socket.socket(socket.AF_UNIX) as s:
            s.connect(path)
            f = s.makefile("rwb")
            f.write(b"not json\n{\"cmd\": \"echo\", \"x\": 3}\n")
            f.flush()
            first, second = json.loads(f.readline()), json.loads(f.readline())
        assert not first["ok"] and first["error"].startswith("not a JSON line")
        assert second == {"ok": True, "result": 3}
        # a second server on the same path is refused while the first listens
        with pytest.raises(ControlError, match="another nmbridge is already listening"):
            ControlServer(path, {})
    finally:
        server.close()
    assert not os.path.exists(path)
    with pytest.raises(ControlError, match=rf"^no control socket at {path}: is nmbridge running\?$"):
        request(path, "stats")


def test_control_refuses_a_world_writable_directory(tmp_path: Path) -> None:
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    with pytest.raises(ControlError, match=rf"^control socket directory {d} is world-writable"):
        ControlServer(str(d / "c.sock"), {})
    assert not (d / "c.sock").exists()


def test_cli_without_a_running_bridge_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "none.sock"
    for argv in (["stats"], ["ports", "--json"], ["reload"], ["stats", "--watch", "1"]):
        assert cli.main([*argv, "--control", str(path)]) == cli.EX_ERROR
        err = capsys.readouterr().err
        assert err == f"nmbridge: no control socket at {path}: is nmbridge running?\n"


# --- in process: stats events, control and metrics against the C counters --------------

FRAMES = 3000


def frame(i: int, ethertype: int) -> bytes:
    return b"\x02" * 6 + b"\x04" * 6 + ethertype.to_bytes(2, "big") + i.to_bytes(4, "big") + bytes(60)


@pytest.fixture
def running(tmp_path: Path, log_lines: io.StringIO) -> Iterator[tuple[Bridge, str, Path]]:
    """A bridge of two mem: pairs whose first pair is given FRAMES frames (a third of them
    ARP, dropped by its filter), forwarding in threads, the main loop in another; control
    socket and metrics endpoint in a temporary directory / on a free port."""
    path = tmp_path / "bridge.toml"
    path.write_text(
        '[bridge]\nstats_interval = 0\n[metrics]\nlisten = "127.0.0.1:0"\n'
        f'[control]\nsocket = "{tmp_path / "c.sock"}"\n'
        '[filter.noarp]\n[[filter.noarp.rule]]\nname = "arp"\naction = "drop"\nethertype = "arp"\n'
        '[[pair]]\nname = "lan"\nports = ["mem:a", "mem:b"]\nfilter = "noarp"\n'
        '[[pair]]\nname = "idle"\nports = ["mem:c", "mem:d"]\ndirection = "b-to-a"\n')
    bridge = Bridge(config.load(path))
    bridge.set_up_links()
    bridge.open_ports()
    lan = bridge.pairs[0]
    lan.a.inject_many(frame(i, 0x0806 if i % 3 == 0 else 0x88B5) for i in range(FRAMES))  # type: ignore[attr-defined]
    bridge.install_filters()
    bridge.start()
    bridge.serve_ops()
    main = threading.Thread(target=bridge.wait, daemon=True)
    main.start()
    try:
        wait_for(lambda: sum(lan.fwd.stats()["a_to_b"][k] for k in ("frames", "filtered")) == FRAMES,
                 "every frame to be forwarded or filtered")
        yield bridge, str(tmp_path / "c.sock"), path
    finally:
        bridge.events.put(("signal", "TEST"))
        main.join(DEADLINE)
        bridge.stop()
        bridge.close()


def expected_lan(bridge: Bridge) -> dict[str, Any]:
    c = bridge.pairs[0].fwd.stats()["a_to_b"]
    assert c["frames"] == 2 * FRAMES // 3 and c["filtered"] == FRAMES // 3
    return c


def test_sigusr1_stats_event_equals_the_c_counters(running: tuple[Bridge, str, Path],
                                                    log_lines: io.StringIO) -> None:
    bridge, _, _ = running
    c = expected_lan(bridge)
    bridge.events.put(("usr1", "SIGUSR1"))
    wait_for(lambda: len(events(log_lines, "stats")) == 2, "one stats event per pair")
    lan, idle = events(log_lines, "stats")
    assert lan["pair"] == "lan" and idle["pair"] == "idle"
    d = lan["a_to_b"]
    # mem ports lose nothing: forwarded = what fastfwd put on TX; received = all of it
    assert (d["forwarded"], d["bytes"]) == (c["frames"], c["bytes"])
    assert d["received"] == FRAMES and d["queued"] == 0 and d["tx_stalls"] == c["tx_stalls"]
    assert d["drops"] == {"filtered": c["filtered"], "oversize": 0, "broken_chain": 0}
    assert d["dropped"] == c["filtered"]
    assert d["filter"] == "noarp" and d["rule_hits"] == {"arp": FRAMES // 3, "default": 2 * FRAMES // 3}
    assert d["avg_batch"] > 0 and d["frames_per_s"] > 0 and d["bits_per_s"] > 0
    assert set(idle) >= {"b_to_a"} and "a_to_b" not in idle and idle["b_to_a"]["received"] == 0


def test_control_stats_ports_version_and_a_metrics_scrape_agree(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO) -> None:
    bridge, sock, _ = running
    c = expected_lan(bridge)
    r = request(sock, "stats")
    lan = r["snapshot"]["pairs"][0]
    assert lan["pair"] == "lan" and lan["zerocopy"] is True
    d = lan["directions"]["a_to_b"]
    assert (d["received"], d["forwarded"], d["queued"], d["bytes"]) == (FRAMES, c["frames"], 0, c["bytes"])
    assert d["dropped"] == {"filtered": c["filtered"], "oversize": 0, "broken_chain": 0}
    assert d["batches"] == c["batches"] and d["tx_stalls"] == c["tx_stalls"]
    assert lan["directions"]["a_to_b"]["rule_hits"] == {"arp": FRAMES // 3, "default": 2 * FRAMES // 3}
    assert set(r["rates"]["lan"]["a_to_b"]) == {"frames_per_s", "bits_per_s", "avg_batch"}

    port = events(log_lines, "metrics_listening")[0]["port"]
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    samples = {(s.name, tuple(sorted(s.labels.items()))): s.value
               for fam in text_string_to_metric_families(text) for s in fam.samples}
    lab = (("direction", "a_to_b"), ("pair", "lan"))
    assert samples[("nmbridge_received_total", lab)] == FRAMES
    assert samples[("nmbridge_forwarded_total", lab)] == c["frames"]
    assert samples[("nmbridge_queued", lab)] == 0
    assert samples[("nmbridge_tx_stalls_total", lab)] == c["tx_stalls"]
    assert not any(name == "nmbridge_frames_total" for name, _ in samples)
    assert samples[("nmbridge_bytes_total", lab)] == c["bytes"]
    assert samples[("nmbridge_drops_total", (*lab, ("reason", "filtered")))] == c["filtered"]
    hits = (("direction", "a_to_b"), ("filter", "noarp"), ("pair", "lan"), ("rule", "arp"))
    assert samples[("nmbridge_filter_rule_hits_total", hits)] == FRAMES // 3
    assert samples[("nmbridge_zerocopy", (("pair", "lan"),))] == 1

    ports = request(sock, "ports")["ports"]
    assert [(p["pair"], p["port"]) for p in ports] == [
        ("lan", "mem:a"), ("lan", "mem:b"), ("idle", "mem:c"), ("idle", "mem:d")]
    assert ports[0]["rx_slots"] == 1024 and ports[0]["buf_size"] == 2048 and ports[0]["zerocopy"]
    assert request(sock, "version") == {"version": cli.__version__}
    with pytest.raises(ControlError, match="unknown command 'frobnicate'"):
        request(sock, "frobnicate")


def test_cli_stats_table_and_json(running: tuple[Bridge, str, Path], capsys: pytest.CaptureFixture[str],
                                  log_lines: io.StringIO) -> None:
    bridge, sock, _ = running
    c = expected_lan(bridge)
    assert cli.main(["stats", "--control", sock]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["PAIR", "DIRECTION", "RECEIVED", "FORWARDED", "DROPS", "QUEUED", "FRAMES/S",
                              "BITS/S", "TX", "STALLS", "DROPPED", "BY"]
    row = out[1].split()
    assert row[:6] == ["lan", "a_to_b", str(FRAMES), str(c["frames"]), str(c["filtered"]), "0"]
    assert f"filtered {c['filtered']}" in out[1]
    assert [r.split()[:4] for r in out[2:]] == [["lan", "b_to_a", "0", "0"], ["idle", "b_to_a", "0", "0"]]
    assert cli.main(["stats", "--json", "--control", sock]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["snapshot"]["pairs"][0]["directions"]["a_to_b"]["forwarded"] == c["frames"]
    logs.configure("json", "info", log_lines)  # cli.main logged to capsys's stdout


def test_cli_stats_watch_refreshes_without_clearing_off_a_terminal(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO, capsys: pytest.CaptureFixture[str],
        monkeypatch: pytest.MonkeyPatch) -> None:
    _, sock, _ = running
    sleeps: list[float] = []

    def sleep(seconds: float) -> None:  # the third refresh ends the watch as Ctrl-C would
        sleeps.append(seconds)
        if len(sleeps) == 3:
            raise KeyboardInterrupt

    monkeypatch.setattr(cli.time, "sleep", sleep)
    assert cli.main(["stats", "--watch", "0.5", "--control", sock]) == 0
    out = capsys.readouterr().out
    logs.configure("json", "info", log_lines)
    assert sleeps == [0.5, 0.5, 0.5] and out.count("PAIR  DIRECTION") == 3
    assert "\x1b" not in out and out.count("every 0.5 s") == 3


def test_reload_swaps_a_filter_and_adds_and_removes_pairs(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO) -> None:
    bridge, sock, path = running
    lan = bridge.pairs[0]
    old_filter = lan.filters["a_to_b"]
    text = path.read_text()
    # the filter now drops nothing; pair idle goes, pair new comes; a restart-only key changes
    path.write_text(text.replace('action = "drop"', 'action = "pass"')
                    .replace('name = "idle"\nports = ["mem:c", "mem:d"]',
                             'name = "new"\nports = ["mem:e", "mem:f"]')
                    .replace("stats_interval = 0", "stats_interval = 0\nburst = 64"))
    r = request(sock, "reload")
    assert r["added"] == ["new"] and r["removed"] == ["idle"] and r["restarted"] == []
    assert r["filters"] == {"lan": {"a_to_b": "noarp", "b_to_a": "noarp"}}
    assert r["needs_restart"] == ["bridge.burst"] and r["failed"] == {}
    assert bridge.pairs[0] is lan and lan.filters["a_to_b"] is not old_filter
    assert [p.config.name for p in bridge.pairs] == ["lan", "new"]
    assert bridge.config.bridge.burst == config.BridgeConfig().burst  # kept until a restart
    # the same filter, edited: its rules' totals go on from where they were
    assert request(sock, "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"]["rule_hits"] == {
        "arp": FRAMES // 3, "default": 2 * FRAMES // 3}
    lan.a.inject_many(frame(i, 0x0806) for i in range(30))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 2 * FRAMES // 3 + 30, "ARP to pass now")
    names = [e["event"] for e in events(log_lines)]
    assert names.count("forwarding") == 3 and "pair_stopped" in names
    reloaded = events(log_lines, "reloaded")[0]
    assert reloaded["added"] == ["new"] and reloaded["removed"] == ["idle"]
    assert events(log_lines, "reload_needs_restart")[0]["keys"] == ["bridge.burst"]
    # a pair whose ports change restarts alone
    path.write_text(path.read_text().replace('"mem:e", "mem:f"', '"mem:e", "mem:g"'))
    r = request(sock, "reload")
    assert r["restarted"] == ["new"] and r["added"] == r["removed"] == [] and r["filters"] == {}
    assert bridge.pairs[0] is lan


def test_a_broken_file_changes_nothing(running: tuple[Bridge, str, Path], log_lines: io.StringIO) -> None:
    bridge, sock, path = running
    before = (bridge.config, list(bridge.pairs), dict(bridge.pairs[0].filters))
    path.write_text(path.read_text().replace('filter = "noarp"', 'filter = "noarpp"'))
    with pytest.raises(ControlError) as e:
        request(sock, "reload")
    assert e.value.config_error
    assert str(e.value).startswith(f'{path}:') and 'no such filter; did you mean "noarp"?' in str(e.value)
    assert (bridge.config, list(bridge.pairs), dict(bridge.pairs[0].filters)) == before
    failed = events(log_lines, "reload_failed")[0]
    assert failed["level"] == "error" and failed["error"] == str(e.value)
    lan = bridge.pairs[0]
    lan.a.inject_many(frame(i, 0x88B5) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 2 * FRAMES // 3 + 10, "forwarding to go on")
    assert cli.main(["reload", "--control", sock]) == cli.EX_CONFIG
    logs.configure("json", "info", log_lines)


# --- the real process: signals and sd_notify ---------------------------------------------


def test_sd_notify_ready_reloading_ready_stopping(tmp_path: Path) -> None:
    """`nmbridge run` as systemd runs it: READY=1 once forwarding, RELOADING=1 / READY=1
    around a SIGHUP, WATCHDOG=1 while running, STOPPING=1 on SIGTERM."""
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    notify.settimeout(DEADLINE)
    cfg = tmp_path / "b.toml"
    cfg.write_text('[bridge]\nstats_interval = 0\n[control]\nsocket = ""\n'
                   '[[pair]]\nports = ["mem:g?rx=source&tx=sink", "mem:s?rx=none&tx=sink"]\n')
    env = dict(os.environ, NOTIFY_SOCKET=str(tmp_path / "notify"), WATCHDOG_USEC="200000",
               PYTHONPATH=str(ROOT))
    env.pop("WATCHDOG_PID", None)
    proc = subprocess.Popen([sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg)],
                            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    got: list[dict[str, str]] = []

    def next_state() -> dict[str, str]:
        while True:  # watchdog pings come in between: keep them, return the next other one
            msg = dict(line.split("=", 1) for line in notify.recv(4096).decode().splitlines())
            got.append(msg)
            if "WATCHDOG" not in msg:
                return msg

    try:
        ready = next_state()
        assert ready["READY"] == "1" and ready["STATUS"] == "forwarding 1 pair: pair1"
        proc.send_signal(signal.SIGHUP)
        reloading = next_state()
        assert reloading["RELOADING"] == "1" and int(reloading["MONOTONIC_USEC"]) > 0
        assert next_state()["READY"] == "1"
        while not any("WATCHDOG" in m for m in got):
            next_state()
        proc.send_signal(signal.SIGTERM)
        assert next_state() == {"STOPPING": "1"}
        out, err = proc.communicate(timeout=DEADLINE)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
    assert proc.returncode == 0, err
    names = [json.loads(line)["event"] for line in out.splitlines()]
    assert names.index("ready") < names.index("reloading") < names.index("reloaded") < names.index("stopped")
    assert next(m for m in got if "WATCHDOG" not in m)["READY"] == "1"


def test_sighup_with_a_broken_file_keeps_running(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    sock = tmp_path / "c.sock"
    cfg.write_text(f'[bridge]\nstats_interval = 0\n[control]\nsocket = "{sock}"\n'
                   '[[pair]]\nports = ["mem:g?rx=source&tx=sink", "mem:s?rx=none&tx=sink"]\n'
                   'direction = "a-to-b"\n')
    proc = subprocess.Popen([sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg)],
                            cwd=ROOT, env=dict(os.environ, PYTHONPATH=str(ROOT)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: queue.SimpleQueue[str] = queue.SimpleQueue()
    threading.Thread(target=lambda: [lines.put(x) for x in proc.stdout or ()], daemon=True).start()

    def wait_event(name: str) -> dict[str, Any]:
        deadline = time.monotonic() + DEADLINE
        while True:
            ev = json.loads(lines.get(timeout=max(0.0, deadline - time.monotonic())))
            if ev["event"] == name:
                return ev

    try:
        wait_event("ready")
        cfg.write_text(cfg.read_text() + "[bridge]\n")  # a table defined twice
        proc.send_signal(signal.SIGHUP)
        failed = wait_event("reload_failed")
        assert failed["error"].startswith(f"{cfg}:") and failed["level"] == "error"
        first = request(str(sock), "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"]["forwarded"]
        wait_for(lambda: request(str(sock), "stats")["snapshot"]["pairs"][0]["directions"]["a_to_b"]
                 ["forwarded"] > first, "forwarding to go on after the failed reload")
        proc.send_signal(signal.SIGTERM)
        wait_event("stopped")
        assert proc.wait(DEADLINE) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# --- capabilities ------------------------------------------------------------------------


def test_required_capabilities() -> None:
    c = config.loads('[[pair]]\nports = ["afpacket:eth1", "afpacket:eth2"]\n'
                     '[[pair]]\nports = ["mem:a", "mem:b"]\n')
    assert [n for n, _ in required_capabilities(c, True)] == [caps.CAP_NET_RAW, caps.CAP_NET_ADMIN]
    assert [n for n, _ in required_capabilities(c, False)] == [caps.CAP_NET_RAW]
    assert required_capabilities(config.loads(PAIR), True) == []


def test_a_missing_capability_is_named_in_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caps, "effective", lambda status_path="": 1 << caps.CAP_NET_ADMIN)
    msg = caps.require_for([(caps.CAP_NET_RAW, "afpacket: ports"), (caps.CAP_NET_ADMIN, "link set-up")],
                           "nmbridge run")
    assert msg == ("nmbridge run needs CAP_NET_RAW (afpacket: ports): run as root, or give the service "
                   "AmbientCapabilities=CAP_NET_RAW (see etc/systemd/nmbridge.service)")
    monkeypatch.setattr(caps, "effective", lambda status_path="": (1 << 13) | (1 << 12))
    assert caps.require_for([(caps.CAP_NET_RAW, "x")], "nmbridge run") is None


# --- reload is all or nothing -------------------------------------------------------------


def test_reload_naming_a_missing_interface_changes_nothing(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO,
        capsys: pytest.CaptureFixture[str]) -> None:
    """A typo in a reload (an interface that does not exist) is refused before anything
    stops: the running pairs go on and the reply names the failure (exit 1, not 78)."""
    bridge, sock, path = running
    before = (bridge.config, list(bridge.pairs))
    lan = bridge.pairs[0]
    # pair idle moves onto interfaces that do not exist: it would restart
    path.write_text(path.read_text().replace('"mem:c", "mem:d"', '"afpacket:nmbnope0", "afpacket:nmbnope1"'))
    with pytest.raises(ControlError) as e:
        request(sock, "reload")
    assert not e.value.config_error
    assert "pair idle: port afpacket:nmbnope0: no such interface nmbnope0" in str(e.value)
    assert (bridge.config, list(bridge.pairs)) == before
    assert all(p.threads and all(t.is_alive() for t in p.threads) for p in bridge.pairs)
    lan.a.inject_many(frame(i, 0x88B5) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 2 * FRAMES // 3 + 10, "lan to go on")
    assert cli.main(["reload", "--control", sock]) == cli.EX_ERROR
    err = capsys.readouterr().err
    assert err.startswith("nmbridge: pair idle: port afpacket:nmbnope0: no such interface")
    assert "nothing changed" not in err and err.count("\n") == 1
    logs.configure("json", "info", log_lines)
    assert "pair_stopped" not in [e["event"] for e in events(log_lines)]


def test_a_restart_whose_ports_fail_to_open_resumes_the_old_pair(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    """The ports of a restarting pair fail to open: the old pair forwards again on its own
    ports and the reload fails naming the port."""
    bridge, sock, path = running
    lan = bridge.pairs[0]
    real_open = bridge.portset.open_shares

    def failing_open(specs: Any, shares: Any) -> Any:
        if any(s.name == "e" for s in specs):
            bridge.portset.failed = next(s for s in specs if s.name == "e")
            raise PortError("mem:e: no room")
        return real_open(specs, shares)

    monkeypatch.setattr(bridge.portset, "open_shares", failing_open)
    path.write_text(path.read_text().replace('ports = ["mem:a", "mem:b"]', 'ports = ["mem:a", "mem:e"]'))
    with pytest.raises(ControlError, match=r"^pair lan: port mem:e: no room$"):
        request(sock, "reload")
    assert [p.config.name for p in bridge.pairs] == ["lan", "idle"] and bridge.pairs[0] is lan
    assert lan.threads and all(t.is_alive() for t in lan.threads)
    assert events(log_lines, "pair_resumed")[0]["pair"] == "lan"
    lan.a.inject_many(frame(i, 0x88B5) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 10, "the resumed pair to forward")
    assert bridge.config.pairs[0].b == config.loads(PAIR).pairs[0].b  # mem:b, still


def test_reload_plan_is_a_pure_diff() -> None:
    old = config.loads('[filter.f]\n[[pair]]\nname = "x"\nports = ["mem:a", "mem:b"]\nfilter = "f"\n'
                       '[[pair]]\nname = "y"\nports = ["mem:c", "mem:d"]\n'
                       '[[pair]]\nname = "z"\nports = ["mem:e", "mem:f"]\n', "t")
    new = config.loads('[filter.f]\ndefault = "drop"\n[[pair]]\nname = "x"\nports = ["mem:a", "mem:b"]\n'
                       'filter = "f"\n[[pair]]\nname = "y"\nports = ["mem:c", "mem:d"]\n'
                       'direction = "a-to-b"\n'
                       '[[pair]]\nname = "w"\nports = ["mem:g", "mem:h"]\n', "t")
    plan = reload_module.diff(old, new)
    assert [p.name for p in plan.added] == ["w"] and plan.removed == ["z"]
    assert [p.name for p in plan.restarted] == ["y"] and [p.name for p in plan.refilter] == ["x"]
    assert reload_module.diff(old, old).to_start == [] and reload_module.diff(old, old).refilter == []


def _busy_while_open(bridge: Bridge, monkeypatch: pytest.MonkeyPatch, fail_always: str = "") -> list[str]:
    """PortSet.open_shares as a backend that cannot open the same rings twice: a spec already
    open fails (and so does `fail_always`, open or not)."""
    real_open = bridge.portset.open_shares
    refused: list[str] = []

    def open_(specs: Any, shares: Any) -> Any:
        busy = {p.spec for p in bridge.portset.ports if not p.closed}
        for s in specs:
            if str(s) in busy or str(s) == fail_always:
                bridge.portset.failed = s
                refused.append(str(s))
                raise PortError(f"{s}: busy")
        return real_open(specs, shares)

    monkeypatch.setattr(bridge.portset, "open_shares", open_)
    return refused


def test_a_restart_on_rings_that_cannot_be_opened_twice_closes_the_old_ports_first(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, sock, path = running
    old = bridge.pairs[0]
    refused = _busy_while_open(bridge, monkeypatch)
    path.write_text(path.read_text().replace('filter = "noarp"', 'filter = "noarp"\ndirection = "a-to-b"', 1))
    r = request(sock, "reload")
    assert r["restarted"] == ["lan"] and refused == ["mem:a"]  # refused once, then the retry opened it
    lan = bridge.pairs[0]
    assert lan is not old and old.a.closed and lan.threads and all(t.is_alive() for t in lan.threads)
    assert [e["pair"] for e in events(log_lines, "pair_stopped")] == ["lan"]  # once
    lan.a.inject_many(frame(i, 0x88B5) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 10, "the restarted pair to forward")


def test_when_the_retry_fails_too_the_old_ports_are_opened_again(
        running: tuple[Bridge, str, Path], log_lines: io.StringIO, monkeypatch: pytest.MonkeyPatch) -> None:
    bridge, sock, path = running
    refused = _busy_while_open(bridge, monkeypatch, fail_always="mem:z")
    path.write_text(path.read_text().replace('ports = ["mem:a", "mem:b"]', 'ports = ["mem:a", "mem:z"]'))
    with pytest.raises(ControlError) as e:
        request(sock, "reload")
    assert str(e.value) == ("pair lan: port mem:z: busy (the old ports of lan were closed to retry and "
                            "opened again)")
    assert refused == ["mem:a", "mem:z"]
    lan = bridge.pairs[0]
    assert lan.config.ports[1].name == "b" and lan.threads and all(t.is_alive() for t in lan.threads)
    assert lan.filters["a_to_b"].name == "noarp"  # its filters go with it
    assert events(log_lines, "pair_reopened")[0]["pair"] == "lan"
    lan.a.inject_many(frame(i, 0x88B5) for i in range(10))  # type: ignore[attr-defined]
    wait_for(lambda: lan.fwd.stats()["a_to_b"]["frames"] == 10, "the re-opened pair to forward")
