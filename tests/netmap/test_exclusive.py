"""Exclusive rings on the real module: nmbridge registers every port with NR_EXCLUSIVE, so a
second program naming rings a running bridge forwards is refused (EBUSY), and what the
kernel keeps apart -- the two ends of a pipe, NIC and host rings -- stays usable together.

    nmbridge run (pair lan:   P}0 <-> P}1)       forwarding
    nmbridge run (pair other: P}0 <-> P}2)       refused: P}0 is held
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest
from nmhelpers import IFACE_ENV

from nmbridge.backends.netmap_backend import open_port
from nmbridge.errors import PortError

BUSY = "its rings are in use by another netmap program"
IFACE = os.environ.get(IFACE_ENV)


def config(tmp_path: Path, name: str, a: str, b: str) -> Path:
    cfg = tmp_path / f"{name}.toml"
    cfg.write_text(textwrap.dedent(f"""\
        [bridge]
        stats_interval = 0
        [[pair]]
        name = "{name}"
        ports = ["{a}", "{b}"]
        """))
    return cfg


def run_args(cfg: Path) -> list[str]:
    return [sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg), "--control", ""]


def two_bridges(tmp_path: Path, first: tuple[str, str], second: tuple[str, str], held: str) -> None:
    proc = subprocess.Popen(run_args(config(tmp_path, "lan", *first)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:  # ends if nmbridge exits: then the assertion below fails
            if json.loads(line)["event"] == "ready":
                break
        assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
        done = subprocess.run(run_args(config(tmp_path, "other", *second)), capture_output=True, text=True,
                              timeout=60, check=False)
        assert done.returncode == 1, done.stderr
        last = done.stderr.strip().splitlines()[-1]
        assert last.startswith(f"nmbridge: pair other: port {held}: {BUSY}"), done.stderr
        assert proc.poll() is None, "the running bridge is untouched"
    finally:
        proc.terminate()
        assert proc.wait(60) == 0


def test_second_bridge_on_a_held_pipe_end(tmp_path: Path, uniq: Callable[[str], str]) -> None:
    p = uniq("x")
    two_bridges(tmp_path, (f"netmap:{p}}}0", f"netmap:{p}}}1"), (f"netmap:{p}}}0", f"netmap:{p}}}2"),
                f"netmap:{p}}}0")


@pytest.mark.skipif(not IFACE, reason=f"set {IFACE_ENV} to an interface netmap may take over")
def test_second_bridge_on_a_held_interface(tmp_path: Path, uniq: Callable[[str], str]) -> None:
    p = uniq("y")
    two_bridges(tmp_path, (f"netmap:{IFACE}", f"netmap:{IFACE}^"), (f"netmap:{IFACE}", f"netmap:{p}}}0"),
                f"netmap:{IFACE}")


def test_pipe_ends_and_vale_ports_are_separate(uniq: Callable[[str], str]) -> None:
    p, sw = uniq("z"), uniq("vale")
    ports = [open_port(f"netmap:{p}{{0"), open_port(f"netmap:{p}}}0"),
             open_port(f"{sw}:a"), open_port(f"{sw}:b")]
    try:
        for name in (f"netmap:{p}{{0", f"netmap:{p}}}0", f"{sw}:a"):
            with pytest.raises(PortError, match=BUSY):
                open_port(name)
    finally:
        for port in ports:
            port.close()
    open_port(f"netmap:{p}}}0").close()  # released with its fd


@pytest.mark.skipif(not IFACE, reason=f"set {IFACE_ENV} to an interface netmap may take over")
def test_nic_and_host_rings_are_separate() -> None:
    assert IFACE
    nic, host = open_port(f"netmap:{IFACE}"), open_port(f"netmap:{IFACE}^")
    try:
        for name in (f"netmap:{IFACE}", f"netmap:{IFACE}^", f"netmap:{IFACE}*"):
            with pytest.raises(PortError, match=BUSY):
                open_port(name)
    finally:
        nic.close()
        host.close()
