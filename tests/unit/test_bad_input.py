"""Bad input ends with one clear line, never a traceback, and loses nothing (issue 11 items 8
and 9, issue 18 items 3 and 5).  What a user types is reproduced as a user would type it:
``python3 -m nmbridge ...`` in a subprocess; the control socket is driven over a real socket.
"""

from __future__ import annotations

import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from fwdutil import wait_for
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nmbridge import config
from nmbridge.control import (
    MAX_CONNECTIONS,
    MAX_LINE,
    ControlError,
    ControlServer,
    _connect,
    check_path,
    request,
)
from nmbridge.errors import ConfigError
from nmbridge.metrics import MAX_SCRAPES, MetricsServer

ROOT = Path(__file__).resolve().parents[2]
DEADLINE = 30.0  # seconds; generous for a loaded machine, never slept
PAIR = '[[pair]]\nports = ["mem:a", "mem:b"]\n'


def nmbridge(*argv: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    """`python3 -m nmbridge ARGV` as a user runs it (this tree first on the path)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "nmbridge", *argv], capture_output=True, text=True,
                          env=env, **{"timeout": 120, **kw})


def popen(*argv: str, **kw: Any) -> subprocess.Popen[bytes]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.Popen([sys.executable, "-m", "nmbridge", *argv], env=env, **kw)


def one_line(err: str) -> str:
    """The single `nmbridge: ...` line of stderr (and no traceback)."""
    assert "Traceback" not in err, err
    assert err.count("\n") == 1 and err.startswith("nmbridge: "), err
    return err


# --- the config file (item 8): exit 78, one line -----------------------------------------


def test_config_nested_400_deep_is_one_line(tmp_path: Path) -> None:
    f = tmp_path / "deep.toml"
    f.write_text("a = " + "[" * 500 + "]" * 500 + "\n")
    done = nmbridge("check", "-c", str(f))
    assert done.returncode == 78
    assert one_line(done.stderr) == f"nmbridge: {f}: arrays or inline tables nested too deeply (a bridge " \
                                    "config needs a few levels)\n"


@pytest.mark.parametrize("key", ["bridge.name", "control.socket", "filter.f.rule[1].src_ip"])
def test_a_value_nested_399_deep_is_shown_short(key: str) -> None:
    deep = "[" * 399 + "]" * 399
    text = {"bridge.name": f"[bridge]\nname = {deep}\n{PAIR}",
            "control.socket": f"[control]\nsocket = {deep}\n{PAIR}",
            "filter.f.rule[1].src_ip": f'[filter.f]\n[[filter.f.rule]]\naction = "drop"\nsrc_ip = {deep}\n'
                                       f'{PAIR}filter = "f"\n'}[key]
    with pytest.raises(ConfigError) as e:
        config.loads(text, "b.toml")
    assert f"{key} = [[[[[[[[[...]]]]]]]]]: " in str(e.value) and "\n" not in str(e.value)


def test_config_dev_zero_is_refused_not_read(tmp_path: Path) -> None:
    done = nmbridge("check", "-c", "/dev/zero")
    assert done.returncode == 78
    assert one_line(done.stderr) == "nmbridge: /dev/zero: is a character device, not a config file: give " \
                                    "the path of a regular TOML file (write generated text to a file first)\n"


def test_config_fifo_is_refused_without_waiting_for_a_writer(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    for command in ("check", "run"):
        done = nmbridge(command, "-c", str(fifo))  # used to hang in open() for ever
        assert done.returncode == 78
        assert f"{fifo}: is a FIFO, not a config file" in one_line(done.stderr)


def test_config_larger_than_1_mib_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "big.toml"
    padding = "#" * 1023 + "\n"
    f.write_text(PAIR + padding * ((config.MAX_CONFIG_BYTES - len(PAIR)) // 1024))
    assert os.path.getsize(f) <= config.MAX_CONFIG_BYTES
    assert config.load(f).pairs[0].name == "pair1"  # up to the limit it loads
    f.write_text(PAIR + padding * 1025)
    done = nmbridge("check", "-c", str(f))
    assert done.returncode == 78
    assert one_line(done.stderr) == (f"nmbridge: {f}: larger than 1 MiB: not a bridge config (they are "
                                     "a few KiB; is it the right file?)\n")


def test_config_directory_and_integer_too_long(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"^{tmp_path}: is a directory, not a config file"):
        config.load(tmp_path)
    with pytest.raises(ConfigError, match=r"^the config file path is empty$"):  # check -c ''
        config.load("")
    with pytest.raises(ConfigError, match=r"^b.toml: a value TOML cannot hold: Exceeds the limit \(4300"):
        config.loads("[bridge]\nburst = " + "9" * 5000 + "\n" + PAIR, "b.toml")


def test_an_empty_or_odd_key_in_an_inline_table_is_one_line_not_a_hang(tmp_path: Path) -> None:
    """Found by fuzzing: the line finder could not peel the key path `bridge.` and looped for
    ever (`check` hung; a SIGHUP with that file would have hung the running bridge)."""
    f = tmp_path / "b.toml"
    for text, shown in (('bridge = { "" = 1 }\n', "bridge. = 1"),
                        ('bridge = { "x[" = 1 }\n', "bridge.x[ = 1"),
                        ('bridge = { "\\n" = 1 }\n', "bridge.\\n = 1")):
        f.write_text(text)
        done = nmbridge("check", "-c", str(f), timeout=DEADLINE)
        assert done.returncode == 78
        assert one_line(done.stderr).startswith(f"nmbridge: {f}:1: {shown}: unknown key; ")
    with pytest.raises(ConfigError) as e:
        config.from_dict({"bridge": {"name": {"\n": False}}})
    assert str(e.value) == '<dict>: bridge.name = {"\\n" = false}: must be a string, not a table'


_scalar = st.one_of(st.booleans(), st.integers(min_value=-2**70, max_value=2**70),
                    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=20),
                    st.sampled_from(["", "\x00", "²", "0x10", "arp", "10.0.0.0/8", "tcp port 22", "("]))
_value = st.recursive(
    _scalar, lambda k: st.lists(k, max_size=3) | st.dictionaries(st.text(max_size=6), k, max_size=3),
    max_leaves=8)


def _table(*keys: str) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(st.sampled_from(keys) | st.text(max_size=6), _value, max_size=4)


_port = st.builds(lambda p, n: p + n, st.sampled_from(["afpacket:", "netmap:", "mem:", "vale0:", "", "x:"]),
                  st.text(alphabet="ab0_-.^*@/{}?=&:\x00² ", max_size=14)) | _value
_PAIR_KEYS = ["name", "ports", "direction", "filter", "filter_b_to_a", "link_setup"]
_pair = st.dictionaries(st.sampled_from(_PAIR_KEYS),
                        st.lists(_port, min_size=2, max_size=2) | _value | st.sampled_from(["f", "a-to-b"]),
                        max_size=5)
_rule = st.dictionaries(st.sampled_from(["name", "action", "pcap", "ethertype", "src_ip", "dst_port"]),
                        _value | st.sampled_from(["pass", "drop"]), max_size=4)
_document = st.fixed_dictionaries({}, optional={
    "bridge": _table("name", "backend", "burst", "stats_interval", "ring_slots", "buf_size"),
    "log": _table("level", "format"), "metrics": _table("listen"), "control": _table("socket"),
    "filter": st.dictionaries(st.sampled_from(["f", "g"]), st.fixed_dictionaries(
        {}, optional={"default": _value, "rule": st.lists(_rule, max_size=2) | _value}), max_size=2),
    "pair": st.lists(_pair, max_size=3) | _value})


@settings(max_examples=300, deadline=None)
@given(_document)
def test_fuzzed_configs_load_or_fail_in_one_line(document: dict[str, Any]) -> None:
    try:
        config.from_dict(document, "t")
    except ConfigError as e:
        assert "\n" not in str(e)


def test_a_pcap_expression_longer_than_2048_characters_is_refused_before_libpcap(tmp_path: Path) -> None:
    """Found: 20,000 `tcp port N` alternatives made libpcap's optimizer take gigabytes until the
    kernel killed `nmbridge check` (a reload would have taken the running bridge down)."""
    expr = " or ".join(f"tcp port {i}" for i in range(20000))
    f = tmp_path / "b.toml"
    f.write_text(f'[filter.f]\n[[filter.f.rule]]\naction = "drop"\npcap = "{expr}"\n{PAIR}filter = "f"\n')
    done = nmbridge("check", "-c", str(f), timeout=DEADLINE)
    assert done.returncode == 78
    assert f"{len(expr)} characters, more than 2048: libpcap's optimizer" in one_line(done.stderr)
    assert "split it into several rules" in done.stderr


# --- port names and options (item 9) -----------------------------------------------------


@pytest.mark.parametrize("port, reason", [
    ("afpacket:eth0\\u0000", "interface name 'eth0\\x00' contains '\\x00' ('/', ':', spaces and control "
                             "characters such as NUL are not allowed)"),
    ("afpacket:eth\\u00010", "contains '\\x01'"),
    ("netmap:eth0\\u0000", "character '\\x00' is not allowed in an interface name"),
    ("mem:a\\n?rx=source", "mem port name 'a\\n' must be 1-15 letters, digits or '_'"),
    ("afpacket:eth0?rx_frames=64&rx_frames=128", "afpacket option rx_frames is given twice "
                                                 "(rx_frames='64' and rx_frames='128'): keep one"),
    ("afpacket:eth0?vnet=1&tx_vnet=0", "afpacket options vnet and tx_vnet are one option"),
    ("mem:a?rx=source&rx=none", "mem option rx is given twice"),
    ("afpacket:eth0?rx_frames=²", "afpacket option rx_frames='²': a whole number from 16 to 1048576"),
    ("afpacket:eth0?rx_frames=" + "9" * 5000, "a whole number from 16 to 1048576"),
    ("mem:a?frame_len=²", "mem option frame_len='²': a number of bytes from 14 to 65535"),
    ("afpacket:eth0?rx_frames", "afpacket option 'rx_frames': write KEY=VALUE, options separated by '&'"),
    ("netmap:eth0-" + "9" * 5000, "ring number 99999999999999999... after '-' is out of range"),
])
def test_bad_port_names_and_options_are_one_line(port: str, reason: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.loads(f'[[pair]]\nports = ["{port}", "mem:z"]\n', "b.toml")
    message = str(e.value)
    assert message.startswith("b.toml:2: pair[1].ports[1] = ") and "\n" not in message
    assert reason in message


def test_a_nul_in_a_port_name_fails_check(tmp_path: Path) -> None:
    """The issue's case: "eth0\\0" and "eth0" passed, then opened the same interface twice."""
    f = tmp_path / "b.toml"
    f.write_text('[[pair]]\nports = ["afpacket:eth0\\u0000", "afpacket:eth0"]\n')
    done = nmbridge("check", "-c", str(f))
    assert (done.returncode, done.stdout) == (78, "")
    assert "contains '\\x00'" in one_line(done.stderr)


def test_one_interface_under_two_backends_fails_check(tmp_path: Path) -> None:
    f = tmp_path / "b.toml"
    f.write_text('[[pair]]\nname = "a"\nports = ["afpacket:x0", "afpacket:x1"]\n'
                 '[[pair]]\nname = "b"\nports = ["netmap:x0", "netmap:x2"]\n')
    done = nmbridge("check", "-c", str(f))
    assert (done.returncode, done.stdout) == (78, "")
    assert one_line(done.stderr) == (
        f'nmbridge: {f}:6: pair[2].ports[1] = "netmap:x0": interface x0 is already used through '
        'afpacket:x0 in pair "a" (pair[1].ports[1]); an interface is reached through one backend only\n')
    with pytest.raises(ConfigError, match="interface x0 is already used through netmap:x0"):
        config.loads('[[pair]]\nports = ["netmap:x0^", "afpacket:x0?rx_frames=64"]\n')
    # netmap's own NIC rings and host rings of one interface stay two ports (netmap decides)
    c = config.loads('[[pair]]\nports = ["netmap:x0", "netmap:x0^"]\n')
    assert [str(s) for s in c.pairs[0].ports] == ["netmap:x0", "netmap:x0^"]


def test_metrics_port_in_other_digits_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r'metrics.listen = "127.0.0.1:²": must be HOST:PORT'):
        config.loads('[metrics]\nlisten = "127.0.0.1:²"\n' + PAIR)
    with pytest.raises(ConfigError, match=r"control.socket = .*: contains a NUL byte"):
        config.loads('[control]\nsocket = "/run/a\\u0000b"\n' + PAIR)


# --- control socket paths (item 8, item 9) -----------------------------------------------


def test_stats_with_an_empty_or_too_long_control_path_is_one_line(tmp_path: Path) -> None:
    done = nmbridge("stats", "--control", "")
    assert (done.returncode, one_line(done.stderr)) == (1, "nmbridge: the control socket path is empty\n")
    long = str(tmp_path / ("x" * 120))
    done = nmbridge("ports", "--control", long)
    assert done.returncode == 1
    assert "bytes long: a unix socket path is at most 107" in one_line(done.stderr)
    done = nmbridge("reload", "--control", "/etc/passwd/c.sock")
    assert (done.returncode, one_line(done.stderr)) == (1, "nmbridge: /etc/passwd/c.sock: Not a directory\n")
    done = nmbridge("stats", "--control", "/etc/passwd")
    assert "/etc/passwd is not a socket" in one_line(done.stderr)


@pytest.mark.parametrize("value", ["nan", "inf", "1e400", "-1", "0", "100000"])
def test_odd_watch_intervals_are_usage_errors(value: str, tmp_path: Path) -> None:
    done = nmbridge("stats", "--watch", value, "--control", str(tmp_path / "none.sock"))
    assert done.returncode == 2
    assert one_line(done.stderr) == "nmbridge: --watch SECONDS must be more than 0 and at most 86400\n"


MISSING_PORTS = '[[pair]]\nports = ["afpacket:nmbno0", "afpacket:nmbno1"]\n'


def test_a_world_writable_control_directory_is_refused_before_any_link(tmp_path: Path) -> None:
    """Before links are set up: the interfaces here do not exist, so any step that touched
    links would fail on them first.  The advice is a private directory, never chmod o-w."""
    d = tmp_path / "open"
    d.mkdir()
    d.chmod(0o777)
    f = tmp_path / "b.toml"
    f.write_text(MISSING_PORTS)
    done = nmbridge("run", "-c", str(f), "--control", str(d / "c.sock"))
    assert (done.returncode, done.stdout) == (1, "")
    assert one_line(done.stderr) == (
        f"nmbridge: control socket: control socket directory {d} is world-writable: anyone could put "
        "their own c.sock there; use a directory only nmbridge's user can write, e.g. /run/nmbridge "
        "(the default; [control] socket or --control)\n")
    assert "chmod" not in done.stderr and not (d / "c.sock").exists()
    f.write_text(f'[control]\nsocket = "{d / "c.sock"}"\n' + MISSING_PORTS)  # from the file: the same
    done = nmbridge("run", "-c", str(f))
    assert done.returncode == 1 and "is world-writable" in one_line(done.stderr)


def test_a_control_socket_in_use_is_refused_before_any_link(tmp_path: Path) -> None:
    path = str(tmp_path / "c.sock")
    server = ControlServer(path, {}).start()
    try:
        f = tmp_path / "b.toml"
        f.write_text(MISSING_PORTS)
        done = nmbridge("run", "-c", str(f), "--control", path)
        assert done.returncode == 1
        assert one_line(done.stderr) == f"nmbridge: control socket: {path}: another nmbridge is already " \
                                        "listening there\n"
    finally:
        server.close()
    check_path(path)  # gone: nothing to refuse any more


def test_check_path_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "new" / "c.sock"
    check_path(str(path))
    assert not path.parent.exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(ControlError, match="is not a directory"):
        check_path(str(tmp_path / "file" / "c.sock"))
    with pytest.raises(ControlError, match=r"exists and is not a socket"):
        check_path(str(tmp_path / "file"))


# --- the control protocol (item 8, item 9; issue 18 item 3) ------------------------------


@pytest.fixture
def server(tmp_path: Path) -> Iterator[ControlServer]:
    s = ControlServer(str(tmp_path / "c.sock"), {"echo": lambda req: req.get("x")}).start()
    try:
        yield s
    finally:
        s.close()


def connect(path: str) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(DEADLINE)
    _connect(s, path, time.monotonic() + DEADLINE)  # waits while the backlog is full
    return s


def ask(s: socket.socket, line: bytes) -> dict[str, Any]:
    s.sendall(line)
    f = s.makefile("rb")
    reply: dict[str, Any] = json.loads(f.readline())
    return reply


def test_json_nested_5000_deep_is_answered(server: ControlServer, capfd: pytest.CaptureFixture[str]) -> None:
    with connect(server.path) as s:
        assert ask(s, b"[" * 5000 + b"]" * 5000 + b"\n") == {
            "ok": False, "error": "not a JSON request: arrays or objects nested too deeply"}
        assert ask(s, b'{"cmd": "echo", "x": 1}\n') == {"ok": True, "result": 1}  # still served
    assert "Traceback" not in capfd.readouterr().err


def test_a_client_that_resets_its_connection_ends_it_quietly(
        server: ControlServer, capfd: pytest.CaptureFixture[str]) -> None:
    """A `stats --watch` killed after its request: it closes with the reply unread, so the
    bridge's next read gets ECONNRESET (the traceback in the journal of issue 18)."""
    for _ in range(3):
        s = connect(server.path)
        s.sendall(b'{"cmd": "echo", "x": 1}\n')
        assert select.select([s], [], [], DEADLINE)[0]  # the reply is in our buffer, unread
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()
    wait_for(lambda: server.limit.active == 0, "the reset connections to end")
    assert request(server.path, "echo", x=2) == 2
    err = capfd.readouterr().err
    assert "Traceback" not in err and "ConnectionResetError" not in err


def test_an_overlong_line_is_answered_once_and_the_connection_closed(server: ControlServer) -> None:
    with connect(server.path) as s:
        try:
            s.sendall(b"x" * (3 * MAX_LINE) + b"\n")
        except (BrokenPipeError, ConnectionResetError):
            pass  # closed while we still sent: the answer is waiting for us all the same
        f = s.makefile("rb")
        assert json.loads(f.readline())["error"] == f"request longer than {MAX_LINE} bytes"
        try:  # closed, not three more garbage answers; a reset since the rest was left unread
            assert f.readline() == b""
        except ConnectionResetError:
            pass


def test_connections_are_bounded_and_idle_ones_closed(tmp_path: Path) -> None:
    """3,000 idle connections made 3,003 threads: now MAX_CONNECTIONS hold a place and each
    newcomer evicts the one that has waited the longest (one error line, then closed), so
    threads stay bounded and a request always gets through; a silent connection is closed
    after the timeout, with the reason (the lockout itself: tests/unit/test_control_limits.py)."""
    server = ControlServer(str(tmp_path / "c.sock"), {"echo": lambda req: req.get("x")},
                           request_timeout=DEADLINE * 4, idle_timeout=DEADLINE * 4).start()
    threads = threading.active_count()
    held: list[socket.socket] = []
    try:
        held = [connect(server.path) for _ in range(MAX_CONNECTIONS)]
        wait_for(lambda: server.limit.active == MAX_CONNECTIONS,
                 "every connection to be served")
        for i in range(100):
            held.append(connect(server.path))
            f = held[i].makefile("rb")  # the oldest waiting one made room
            assert json.loads(f.readline())["error"].startswith("closed to make room for a new client")
            assert f.readline() == b""
            held[i].close()
            assert threading.active_count() <= threads + 2 * MAX_CONNECTIONS
        wait_for(lambda: server.limit.active == MAX_CONNECTIONS, "the evicted connections' threads to end")
        assert server.limit.places == MAX_CONNECTIONS and server.limit.evicted == 100
        assert request(server.path, "echo", x=1) == 1
        newest = held[-1]
        assert ask(newest, b'{"cmd": "echo", "x": 5}\n')["result"] == 5  # the newest still work
    finally:
        for s in held:
            s.close()
        server.close()
    idle = ControlServer(str(tmp_path / "i.sock"), {"echo": lambda req: req.get("x")},
                         request_timeout=2.0, idle_timeout=0.2).start()
    try:
        with connect(idle.path) as s:  # our own timeout is DEADLINE
            f = s.makefile("rb")
            assert json.loads(f.readline())["error"] == "closed: no complete request line within 2 s"
            assert f.readline() == b""
        with connect(idle.path) as s:
            assert ask(s, b'{"cmd": "echo", "x": 5}\n')["result"] == 5
            f = s.makefile("rb")
            assert json.loads(f.readline())["error"] == "closed: no request for 0.2 s"
            assert f.readline() == b""
    finally:
        idle.close()


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.one_of(
    st.binary(max_size=200),
    st.text(max_size=100).map(str.encode),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=10),
                 lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids,
                                                                             max_size=3),
                 max_leaves=20).map(lambda v: json.dumps(v).encode()),
    st.fixed_dictionaries({"cmd": st.sampled_from(["echo", "stats", "", "ECHO"])},
                          optional={"x": st.integers()}).map(lambda v: json.dumps(v).encode()),
), min_size=1, max_size=5))
def test_fuzzed_requests_get_one_answer_each(server: ControlServer, lines: list[bytes]) -> None:
    lines = [line.replace(b"\n", b" ") for line in lines]
    with connect(server.path) as s:
        s.sendall(b"".join(line + b"\n" for line in lines))
        f = s.makefile("rb")
        for _ in lines:
            reply = json.loads(f.readline())
            assert isinstance(reply, dict) and isinstance(reply["ok"], bool)
            if not reply["ok"]:
                assert isinstance(reply["error"], str) and "\n" not in reply["error"]
    assert request(server.path, "echo", x=7) == 7


def test_metrics_endpoint_resets_and_idle_scrapers(capfd: pytest.CaptureFixture[str]) -> None:
    """The same on the Prometheus endpoint: a reset was a traceback on stderr, and idle TCP
    connections (from anywhere, when it listens publicly) each held a thread."""
    m = MetricsServer("127.0.0.1:0", lambda: {"time": 0.0, "pairs": [], "links": {}})
    held: list[socket.socket] = []
    try:
        for payload in (b"GET /" + b"a" * 70000 + b" HTTP/1.1\r\n\r\n", b"\x00" * 10000):
            with socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE) as s:
                s.sendall(payload)
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # reset
        held = [socket.create_connection(("127.0.0.1", m.port), timeout=DEADLINE)
                for _ in range(MAX_SCRAPES)]
        wait_for(lambda: m.limit.active == MAX_SCRAPES, "every idle connection to be served")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=DEADLINE) as r:
            assert r.status == 200  # the oldest idle connection made room
        assert held[0].recv(100).startswith(b"HTTP/1.0 408 ")
        for s in held:
            s.close()
        wait_for(lambda: m.limit.active == 0, "the idle connections to end")
        with urllib.request.urlopen(f"http://127.0.0.1:{m.port}/metrics", timeout=DEADLINE) as r:
            assert r.status == 200
    finally:
        for s in held:
            s.close()
        m.close()
    assert "Traceback" not in capfd.readouterr().err


# --- a closed stdout (item 8; issue 18 item 5) --------------------------------------------


@pytest.fixture
def bridge(tmp_path: Path) -> Iterator[tuple[subprocess.Popen[bytes], str, Path]]:
    """`nmbridge run` of an endless mem: source, logging a stats event every 50 ms as JSON
    lines into a pipe (the test is its reader), stderr into a file."""
    sock = str(tmp_path / "c.sock")
    cfg = tmp_path / "b.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0.05\n[control]\nsocket = "{sock}"\n'
                   '[[pair]]\nports = ["mem:a?rx=source&tx=sink", "mem:b?rx=none&tx=sink"]\n'
                   'direction = "a-to-b"\n')
    err = tmp_path / "stderr"
    with err.open("wb") as e:
        p = popen("run", "-c", str(cfg), stdout=subprocess.PIPE, stderr=e)
    try:
        wait_for(lambda: os.path.exists(sock) or p.poll() is not None, "the control socket")
        assert p.poll() is None, err.read_text()
        yield p, sock, err
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(DEADLINE)
        if p.stdout:
            p.stdout.close()


def frames(sock: str) -> int:
    snap = request(sock, "stats")["snapshot"]
    return int(snap["pairs"][0]["directions"]["a_to_b"]["forwarded"])


def test_run_whose_log_reader_went_away_keeps_forwarding(
        bridge: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    """`nmbridge run ... | head -1`: one line on stderr, no traceback per later log line,
    and the bridge forwards on (decision: logs are not worth an outage)."""
    p, sock, err = bridge
    assert p.stdout is not None
    assert json.loads(p.stdout.readline())["event"] == "starting"
    p.stdout.close()  # what head does after its line
    wait_for(lambda: "log output was closed" in err.read_text(), "the one line about the closed output")
    before = frames(sock)
    wait_for(lambda: frames(sock) > before, "frames to go on being forwarded")
    p.send_signal(signal.SIGTERM)
    assert p.wait(DEADLINE) == 0
    assert one_line(err.read_text()) == (
        "nmbridge: the log output was closed (its reader went away): logs are discarded from now on; "
        "the bridge keeps forwarding (nmbridge stats shows its counters)\n")


def head(proc: subprocess.Popen[bytes], lines: int) -> None:
    """What `| head -N` does: read N lines, close the pipe."""
    assert proc.stdout is not None
    for _ in range(lines):
        proc.stdout.readline()
    proc.stdout.close()


def test_stats_watch_into_head_ends_quietly_and_a_killed_watch_leaves_no_traceback(
        bridge: tuple[subprocess.Popen[bytes], str, Path]) -> None:
    p, sock, err = bridge
    assert p.stdout is not None
    p.stdout.close()  # logs discarded (one line on stderr, checked below)
    for extra in ([], ["--json"]):
        watch = popen("stats", "--watch", "0.01", "--control", sock, *extra, stdout=subprocess.PIPE,
                      stderr=subprocess.PIPE)
        head(watch, 3)
        assert watch.wait(DEADLINE) == 141  # 128 + SIGPIPE, as a shell reports `yes | head`
        assert watch.stderr is not None and watch.stderr.read() == b""
        watch.stderr.close()
    for _ in range(5):  # issue 18: a killed watch (mid-request: see the in-process reset test)
        watch = popen("stats", "--watch", "0.001", "--json", "--control", sock, stdout=subprocess.PIPE)
        assert watch.stdout is not None
        watch.stdout.readline()  # it has asked at least once, and goes on asking every 1 ms
        watch.kill()
        watch.wait(DEADLINE)
        watch.stdout.close()
    assert frames(sock) > 0  # still answering
    text = err.read_text()
    assert "Traceback" not in text and "Error" not in text, text


def write_pcap(path: Path, n: int) -> None:
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x08\x06" + bytes(46)
    with path.open("wb") as f:
        f.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(n):
            f.write(struct.pack("<IIII", i, 0, len(frame), len(frame)) + frame)


def test_filter_test_into_head_ends_quietly(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('[filter.f]\n[[filter.f.rule]]\naction = "drop"\nethertype = "arp"\n'
                   '[[pair]]\nports = ["mem:a", "mem:b"]\nfilter = "f"\n')
    pcap = tmp_path / "c.pcap"
    write_pcap(pcap, 20000)  # far more text than a pipe holds
    proc = popen("filter", "test", "-c", str(cfg), "--pcap", str(pcap), stdout=subprocess.PIPE,
                 stderr=subprocess.PIPE)
    head(proc, 1)
    assert proc.wait(DEADLINE) == 141
    assert proc.stderr is not None and proc.stderr.read() == b""
    proc.stderr.close()


def test_filter_test_refuses_a_fifo_without_waiting_and_reads_stdin(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    done = nmbridge("filter", "test", "--pcap", str(fifo), "-e", "arp", timeout=DEADLINE)  # hung in open()
    assert done.returncode == 1 and done.stdout == ""
    assert one_line(done.stderr) == f"nmbridge: {fifo}: is a FIFO, not a capture file: give a pcap file, " \
                                    "or pipe the capture in with --pcap -\n"
    done = nmbridge("filter", "test", "--pcap", "/dev/zero", "-e", "arp", timeout=DEADLINE)
    assert done.returncode == 1
    assert "/dev/zero: is a character device, not a capture file" in one_line(done.stderr)
    # a stream on standard input is the way to pipe one in: `tcpdump -w - | ... --pcap -`
    pcap = tmp_path / "c.pcap"
    write_pcap(pcap, 3)
    with pcap.open("rb") as f:
        done = nmbridge("filter", "test", "--pcap", "-", "-e", "arp", "--totals", stdin=f, timeout=DEADLINE)
    assert done.returncode == 0 and done.stderr == "", done.stderr
    assert done.stdout.startswith("-e (1 rule, default drop): 3 frames from -\n") and "passed 3, dropped 0" \
        in done.stdout, done.stdout


def closed(fd: int) -> Callable[[], None]:
    return lambda: os.close(fd)


def test_closed_standard_streams(tmp_path: Path) -> None:
    f = tmp_path / "b.toml"
    f.write_text(PAIR)
    assert nmbridge("check", "-c", str(f), preexec_fn=closed(1)).returncode == 0  # `>&-`
    assert nmbridge("check", "-c", str(tmp_path / "none"), preexec_fn=closed(2)).returncode == 78  # `2>&-`
