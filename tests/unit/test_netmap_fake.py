"""The netmap backend end to end against a fake /dev/netmap (tests/unit/fakenetmap): a
preloaded library answers open, ioctl, poll and close on a regular file from the ABI facts and
netmap's semantics, so open, the shared mapping per memory region, ring ranges, syncs,
exclusive rings, the system calls of a forwarding round, errors and close run on any machine.
The real module is exercised by tests/netmap where it exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

import nmbridge
from nmbridge import netns

HERE = Path(__file__).resolve().parent / "fakenetmap"
INCLUDE = Path(__file__).resolve().parents[2] / "nmbridge" / "include"
# the nmbridge this test imported (a checkout's in-place build or an installed wheel)
WHERE = str(Path(nmbridge.__file__).parents[1])

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="gcc is not installed")


@pytest.fixture
def fake(tmp_path: Path) -> dict[str, str]:
    """Build the fake; the environment that makes a process see it as /dev/netmap."""
    lib = tmp_path / "fake_netmap.so"
    subprocess.run(["gcc", "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-shared", "-fPIC", f"-I{INCLUDE}",
                    str(HERE / "fake_netmap.c"), "-o", str(lib), "-ldl"], check=True)
    dev = tmp_path / "netmap"
    dev.touch()  # the fake sizes it (sparse) at first use
    path = os.pathsep.join(filter(None, [WHERE, os.environ.get("PYTHONPATH")]))
    return dict(os.environ, LD_PRELOAD=str(lib), NMB_FAKE_DEV=str(dev), PYTHONPATH=path, PYTHONUNBUFFERED="1")


@needs_gcc
def test_backend_against_fake_kernel(fake: dict[str, str]) -> None:
    done = subprocess.run([sys.executable, str(HERE / "scenario.py")], env=fake, capture_output=True,
                          text=True, check=False, timeout=120)
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.strip().splitlines()
    assert lines[-1] == "ok"
    counts = json.loads(lines[-2])
    after = next(c for c in counts
                 if c["discipline"] == "poll" and c["burst"] == 1024 and c["direction"] == "both")
    assert after["syscalls_per_round"] < 1.1  # one poll() per round, the start/end syncs aside


# ---- two `nmbridge run` on one interface ------------------------------------------------------

@pytest.fixture
def ns() -> Iterator[str]:
    """A namespace of our own with two interfaces, fk0 and fk1 (a veth pair) (netmap names may not
    contain '-', which the lab's interface names do)."""
    if os.geteuid() != 0 or shutil.which("ip") is None:
        pytest.skip("needs root and iproute2 (network namespaces)")
    name = netns.unique_prefix() + "fk"
    netns.run("ip", "netns", "add", name)
    try:
        netns.run("ip", "-n", name, "link", "add", "fk0", "type", "veth", "peer", "name", "fk1")
        yield name
    finally:
        netns.run("ip", "netns", "del", name, check=False)


def config(tmp_path: Path, name: str, a: str, b: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [bridge]
        link_setup = false
        stats_interval = 0
        [[pair]]
        name = "{name}"
        ports = ["{a}", "{b}"]
        """))
    return cfg


def start(ns: str, cfg: Path, env: dict[str, str]) -> subprocess.Popen[str]:
    argv = [sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg), "--control", ""]
    return subprocess.Popen(["ip", "netns", "exec", ns, *argv], cwd="/", env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def wait_ready(proc: subprocess.Popen[str]) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    for line in proc.stdout:
        if json.loads(line)["event"] == "ready":
            return
        assert time.monotonic() < deadline, "no ready event"
    pytest.fail(f"nmbridge ended before it was ready: {proc.stderr.read() if proc.stderr else ''}")


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.terminate()
    assert proc.wait(60) == 0


@needs_gcc
def test_a_second_bridge_on_the_same_rings_is_refused(ns: str, tmp_path: Path, fake: dict[str, str]) -> None:
    left, right = "netmap:fk0", "netmap:fk1"
    first = start(ns, config(tmp_path, "lan", left, right), fake)
    try:
        wait_ready(first)
        # another bridge wants the same NIC rings of the left interface (and the right one's
        # host rings, which nobody holds): refused in one line naming its pair and port
        cfg = config(tmp_path, "other", left, f"{right}^")
        argv = ["ip", "netns", "exec", ns, sys.executable, "-m", "nmbridge", "run", "-c", str(cfg),
                "--control", ""]
        # another nmbridge: its interface lock refuses it before any ring is asked for
        second = subprocess.run(argv, env=fake, capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1, second.stderr
        assert "fk0 is in use by another nmbridge" in second.stderr.strip().splitlines()[-1], second.stderr
        # a program that takes no nmbridge lock (a different state directory stands in for
        # pkt-gen): the kernel's exclusive registration refuses it
        second = subprocess.run([*argv, "--state-dir", str(tmp_path / "elsewhere")], env=fake,
                                capture_output=True, text=True, timeout=60, check=False)
        assert second.returncode == 1, second.stderr
        err = second.stderr.strip().splitlines()
        assert err[-1] == (f"nmbridge: pair other: port {left}: its rings are in use by another netmap "
                           f"program (or by another port of this bridge on the same rings of "
                           "'fk0'): stop it or pick other rings"), second.stderr
        assert first.poll() is None, "the running bridge is untouched"
    finally:
        stop(first)
    # the first bridge closed its ports: the rings are free again
    again = start(ns, config(tmp_path, "other", left, f"{right}^"), fake)
    try:
        wait_ready(again)
    finally:
        stop(again)


@needs_gcc
def test_one_interface_on_both_sides_gets_one_mtu_error(ns: str, tmp_path: Path,
                                                        fake: dict[str, str]) -> None:
    # lo's MTU (65536) fits no 2048-byte buffer: one error, naming both ports of the pair
    cfg = config(tmp_path, "lo", "netmap:lo", "netmap:lo^")
    done = subprocess.run(["ip", "netns", "exec", ns, sys.executable, "-m", "nmbridge", "run", "-c",
                           str(cfg), "--control", ""], env=fake, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 1
    assert done.stderr.count("MTU 65536") == 1, done.stderr
    assert done.stderr.startswith("nmbridge: pair lo: ports netmap:lo and netmap:lo^: lo: MTU 65536 needs"), \
        done.stderr
