"""``nmbridge demo`` end to end: run as a program, interrupted, and refused without privileges."""

from __future__ import annotations

import json
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from nmbridge import config, netns
from nmbridge.demo import ROOT_MESSAGE, config_text

ROOT = Path(__file__).resolve().parents[2]
DEMO = [sys.executable, "-m", "nmbridge", "demo"]
TIMEOUT = 120.0  # seconds for a whole demo run on a loaded machine


def leftovers(prefix: str) -> list[str]:
    """Namespaces and interfaces (of this namespace) whose name starts with `prefix`-."""
    found = [n for n in os.listdir(netns.NETNS_DIR) if n.startswith(prefix + "-")] \
        if os.path.isdir(netns.NETNS_DIR) else []
    return found + [n for n in os.listdir("/sys/class/net") if n.startswith(prefix + "-")]


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_generated_config_is_what_run_reads(tmp_path: Path) -> None:
    """The demo's config passes nmbridge's own loader: one pair, the two bridge-side veths."""
    lb = netns.new_lab("nmbtest0")
    p = tmp_path / "bridge.toml"
    p.write_text(config_text(lb))
    cfg = config.load(str(p))
    assert [(str(pair.a), str(pair.b), pair.direction) for pair in cfg.pairs] == [
        ("afpacket:nmbtest0-bl", "afpacket:nmbtest0-br", "both")]
    assert cfg.bridge.stats_interval == 0


@pytest.mark.root
def test_demo_json_summary_and_nothing_left() -> None:
    p = subprocess.run([*DEMO, "--frames", "2000", "--json"], capture_output=True, text=True,
                       timeout=TIMEOUT, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    s: dict[str, Any] = json.loads(p.stdout)
    assert s["ok"] and s["exit_status"] == 0 and s["reason"] is None
    assert [(x["source"], x["target"], x["answered"]) for x in s["pings"]] == [
        ("left", "right", 3), ("right", "left", 3)]
    assert all(isinstance(r, float) and r > 0 for x in s["pings"] for r in x["rtt_ms"])
    pr = s["probe"]  # one-way latency probes: all arrived, their percentiles in order
    assert pr["sent"] == pr["received"] == 500 and pr["lost"] == 0
    assert 0 < pr["p50_us"] <= pr["p99_us"] <= pr["max_us"]
    b = s["burst"]
    assert b["sent"] == b["delivered"] == 2000 and b["in_order"] and b["duplicates"] == 0
    assert s["zero_copy"] is True
    # the bridge's own counters saw at least the burst and the pings, and dropped nothing
    a_to_b, b_to_a = s["counters"]["a_to_b"], s["counters"]["b_to_a"]
    assert a_to_b["forwarded"] >= 2000 + 500 + 3 and b_to_a["forwarded"] >= 3
    assert a_to_b["dropped"] == b_to_a["dropped"] == 0
    assert a_to_b["received"] == a_to_b["forwarded"] and a_to_b["queued"] == 0
    assert s["bridge_exit_status"] == 0
    # nothing left: namespaces, veths, the bridge process, the config
    assert s["left_behind"] == [] and not s["kept"]
    assert leftovers(s["lab"]["prefix"]) == []
    assert not alive(s["bridge_pid"])
    config_path = s["bridge_command"][-1]
    assert not os.path.exists(config_path)
    # the progress a person reads went to stderr, step by step
    assert "[6/6] Removing the lab" in p.stderr and "zero-copy: yes" in p.stderr
    assert "one-way, left -> right: 500 of 500" in p.stderr
    assert "its forwarding thread runs SCHED_OTHER, slice 100 µs" in p.stderr  # the default


@pytest.mark.root
def test_sigint_mid_run_tears_everything_down() -> None:
    """Ctrl-C once the bridge forwards (a burst far too long to finish first): the demo stops
    the bridge, removes the lab and exits 130."""
    proc = subprocess.Popen([*DEMO, "--frames", "100000000", "--json"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    lines: queue.SimpleQueue[str | None] = queue.SimpleQueue()

    def read() -> None:
        assert proc.stderr is not None
        for line in proc.stderr:
            lines.put(line)
        lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    progress: list[str] = []
    prefix = None
    try:
        deadline = time.monotonic() + TIMEOUT
        while not any("[4/6] Burst" in x for x in progress):  # the bridge is up and traffic flows
            line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            assert line is not None, f"the demo ended early: {''.join(progress)}"
            progress.append(line)
            m = re.search(r"every name starts with (nmb[0-9a-f]{5})", line)
            prefix = prefix or (m.group(1) if m else None)
        assert prefix is not None and leftovers(prefix) != []
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=TIMEOUT)  # the summary on stdout is small: it fits in the pipe
        assert proc.stdout is not None
        out = proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    while (line := lines.get(timeout=10)) is not None:
        progress.append(line)
    assert proc.returncode == 130, "".join(progress)
    s = json.loads(out)
    assert s["interrupted_by"] == "SIGINT" and not s["ok"] and s["exit_status"] == 130
    assert s["left_behind"] == []
    assert leftovers(prefix) == []
    assert not alive(s["bridge_pid"])
    assert any("removed namespaces" in x for x in progress)


def _run_as(setpriv_args: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["setpriv", *setpriv_args, *DEMO], capture_output=True, text=True,
                          timeout=60, cwd=ROOT)


@pytest.mark.root
def test_non_root_is_refused_in_one_line() -> None:
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(["setpriv", *nobody, sys.executable, "-c", "import nmbridge.cli"],
                           capture_output=True, timeout=60, cwd=ROOT)
    if probe.returncode != 0:
        # the interpreter lives where uid 65534 may not look (/root/.pyenv): let it read
        # files anyway (CAP_DAC_READ_SEARCH, nothing else); it is still not root
        nobody += ["--inh-caps=+dac_read_search", "--ambient-caps=+dac_read_search"]
    p = _run_as(nobody)
    assert (p.returncode, p.stderr, p.stdout) == (1, ROOT_MESSAGE + "\n", "")


@pytest.mark.root
def test_root_without_capabilities_is_refused() -> None:
    """uid 0 with every capability dropped (a restricted container) cannot build a lab either."""
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    p = _run_as(["--bounding-set=-all", "--inh-caps=-all"])
    assert p.returncode == 1 and p.stdout == ""
    assert p.stderr.count("\n") == 1
    assert p.stderr.startswith("nmbridge demo needs root (network namespaces): ")
    assert "CAP_SYS_ADMIN" in p.stderr


@pytest.mark.root
def test_demo_into_head_removes_the_lab() -> None:
    """`nmbridge demo | head`: the progress's reader goes away once the lab is built; the
    demo stops at its next step and removes everything (it used to die on BrokenPipeError in
    the middle of its teardown, leaving the three namespaces behind), exit 141, no traceback."""
    proc = subprocess.Popen([*DEMO, "--frames", "100000000"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=ROOT)
    prefix = None
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            m = re.search(r"every name starts with (nmb[0-9a-f]{5})", line)
            prefix = prefix or (m.group(1) if m else None)
            if prefix and "namespace " in line and "-right" in line:  # printed once it is built
                break
        assert prefix is not None and leftovers(prefix) != []
        proc.stdout.close()  # what head does
        assert proc.wait(timeout=TIMEOUT) == 141
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.stderr is not None
    err = proc.stderr.read()
    proc.stderr.close()
    assert err == ""
    assert leftovers(prefix) == []
