"""A running bridge's forwarding thread has the scheduling [bridge] asks for (root, netns lab):
by default a normal thread with a 100 µs EEVDF slice; with `sched = "auto"` SCHED_FIFO priority 1,
only that thread; as the service's user without CAP_SYS_NICE, a normal thread with a 100 µs
slice and one warning line saying why."""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import pytest
from rawio import NmbridgeRun
from test_operating import _setpriv, public_dir  # noqa: F401  (public_dir: a fixture)

from nmbridge import sched
from nmbridge.netns import Lab


def tasks(pid: int) -> dict[int, dict[str, int]]:
    """Per thread of `pid`: its policy, kernel prio and (when shown) EEVDF slice in ns."""
    out: dict[int, dict[str, int]] = {}
    for d in Path(f"/proc/{pid}/task").iterdir():
        fields: dict[str, int] = {}
        try:
            text = (d / "sched").read_text()
        except FileNotFoundError:  # a thread that just ended
            continue
        for line in text.splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("policy", "prio", "se.slice"):
                fields[key.strip()] = int(float(value))
        out[int(d.name)] = fields
    return out


def event(run: NmbridgeRun, name: str) -> dict[str, Any]:
    """Event `name`, logged already or the next one (the forwarding thread's `forwarding_sched`
    and the main thread's `ready` come in either order)."""
    return next((e for e in run.seen if e["event"] == name), None) or run.wait_event(name)


def config(dirpath: Path, lab: Lab, bridge: str = "") -> Path:
    cfg = dirpath / "bridge.toml"
    cfg.write_text(f"[bridge]\nstats_interval = 0\n{bridge}\n[[pair]]\nname = \"lab\"\n"
                   f'ports = ["afpacket:{lab.bridge_left_if}", "afpacket:{lab.bridge_right_if}"]\n')
    cfg.chmod(0o644)
    return cfg


@pytest.mark.root
def test_by_default_the_forwarding_thread_gets_a_100us_slice(lab: Lab, tmp_path: Path) -> None:
    run = NmbridgeRun(lab, config(tmp_path, lab))
    try:
        ev = event(run, "forwarding_sched")
        assert (ev["level"], ev["sched"]) == ("info", "SCHED_OTHER, slice 100 µs")
        event(run, "ready")
        t = tasks(run.proc.pid)
        assert all(f["policy"] == sched.SCHED_OTHER for f in t.values())
        if any("se.slice" in f for f in t.values()):
            assert [f["se.slice"] for f in t.values()].count(100_000) == 1
        run.stop()
    finally:
        run.kill()


@pytest.mark.root
def test_sched_auto_the_forwarding_thread_alone_runs_sched_fifo_priority_1(lab: Lab, tmp_path: Path) -> None:
    run = NmbridgeRun(lab, config(tmp_path, lab, 'sched = "auto"'))
    try:
        ev = event(run, "forwarding_sched")
        assert (ev["level"], ev["sched"]) == ("info", "SCHED_FIFO priority 1")
        event(run, "ready")
        t = tasks(run.proc.pid)
        fifo = [tid for tid, f in t.items() if f["policy"] == sched.SCHED_FIFO]
        assert len(fifo) == 1 and fifo[0] != run.proc.pid  # one pair: one forwarding thread, not main
        assert t[fifo[0]]["prio"] == 98  # the kernel's prio for SCHED_FIFO priority 1 (99 - 1)
        assert all(f["policy"] == sched.SCHED_OTHER for tid, f in t.items() if tid != fifo[0])
        run.stop()
    finally:
        run.kill()


@pytest.mark.root
def test_sched_other_keeps_every_thread_normal_with_the_slice(lab: Lab, tmp_path: Path) -> None:
    run = NmbridgeRun(lab, config(tmp_path, lab, 'sched = "other"\nsched_slice_us = 250'))
    try:
        ev = event(run, "forwarding_sched")
        assert (ev["level"], ev["sched"]) == ("info", "SCHED_OTHER, slice 250 µs")
        event(run, "ready")
        t = tasks(run.proc.pid)
        assert all(f["policy"] == sched.SCHED_OTHER for f in t.values())
        if any("se.slice" in f for f in t.values()):
            assert [f["se.slice"] for f in t.values()].count(250_000) == 1
        run.stop()
    finally:
        run.kill()


@pytest.mark.root
@pytest.mark.parametrize("nice_cap", [False, True], ids=["without-cap_sys_nice", "with-cap_sys_nice"])
def test_the_service_user_gets_fifo_only_with_cap_sys_nice_and_else_one_warning(
        lab: Lab, public_dir: Path, nice_cap: bool) -> None:  # noqa: F811
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    state = public_dir / "state"
    state.mkdir()
    os.chown(state, 65534, 65534)
    caps = ("net_admin", "net_raw", *(("sys_nice",) if nice_cap else ()))
    run = NmbridgeRun(lab, config(public_dir, lab, 'sched = "auto"'), *_setpriv(*caps), state=state)
    try:
        ev = event(run, "forwarding_sched")
        event(run, "ready")
        t = tasks(run.proc.pid)
        if nice_cap:
            assert (ev["level"], ev["sched"]) == ("info", "SCHED_FIFO priority 1")
            assert [f["policy"] for f in t.values()].count(sched.SCHED_FIFO) == 1
        else:
            assert (ev["level"], ev["sched"]) == ("warning", "SCHED_OTHER, slice 100 µs")
            assert "CAP_SYS_NICE" in ev["reason"]
            assert all(f["policy"] == sched.SCHED_OTHER for f in t.values())
            if any("se.slice" in f for f in t.values()):
                assert [f["se.slice"] for f in t.values()].count(100_000) == 1
        run.stop()
        assert [e["event"] for e in run.seen].count("forwarding_sched") == 1  # one line, not one per thread
    finally:
        run.kill()
