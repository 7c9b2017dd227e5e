"""The forwarding threads' scheduling: [bridge] sched, rt_priority, sched_slice_us,
cpu_dma_latency_us (config), what nmbridge.sched asks the kernel for, and its fallbacks."""

from __future__ import annotations

import errno
import os
import resource
import shutil
import subprocess
import sys
import threading
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from nmbridge import caps, config, sched
from nmbridge.config import BridgeConfig
from nmbridge.errors import ConfigError

AUTO = replace(BridgeConfig(), sched="auto")  # the default is "other"; these test what auto decides

ROOT = Path(__file__).resolve().parents[2]
PAIR = '[[pair]]\nports = ["mem:a", "mem:b"]\n'


def error(text: str) -> str:
    with pytest.raises(ConfigError) as e:
        config.loads(text, "b.toml")
    assert "\n" not in str(e.value)
    return str(e.value)


# --- config ----------------------------------------------------------------------------


def test_defaults_a_normal_thread_with_a_100_us_slice_fifo_priority_1_when_asked_no_pm_qos() -> None:
    b = config.loads(PAIR, "b.toml").bridge
    assert (b.sched, b.rt_priority, b.sched_slice_us, b.cpu_dma_latency_us) == ("other", 1, 100, -1)


def test_spin_defaults_to_auto_and_takes_microseconds() -> None:
    assert config.loads(PAIR, "b.toml").bridge.spin_us == "auto"
    assert config.loads("[bridge]\nspin_us = 0\n" + PAIR, "b.toml").bridge.spin_us == 0
    assert config.loads("[bridge]\nspin_us = 250\n" + PAIR, "b.toml").bridge.spin_us == 250


def test_auto_spin_polls_for_a_normal_thread_and_never_for_a_fifo_one() -> None:
    """spin_us = "auto": a normal thread polls its idle rings AUTO_SPIN_US before sleeping; a
    SCHED_FIFO one sleeps at once (polling, it would starve its CPU's softirq work); a number
    is what it says, whatever the policy -- also when FIFO was refused."""
    k = Kernel()
    assert choose(k, sched="other").spin_us == sched.AUTO_SPIN_US == 2000
    assert choose(k, sched="fifo").spin_us == 0
    assert choose(k, sched="fifo", spin_us=300).spin_us == 300
    assert choose(k, sched="other", spin_us=0).spin_us == 0
    assert choose(Kernel(refuse_fifo=True), sched="fifo").spin_us == sched.AUTO_SPIN_US
    assert choose(k, sched="other").describe() == ("SCHED_OTHER, slice 100 µs, polls idle rings 2000 µs "
                                                   "before sleeping")


def test_every_scheduling_key_is_read() -> None:
    b = config.loads('[bridge]\nsched = "other"\nrt_priority = 20\nsched_slice_us = 0\n'
                     "cpu_dma_latency_us = 0\n" + PAIR, "b.toml").bridge
    assert (b.sched, b.rt_priority, b.sched_slice_us, b.cpu_dma_latency_us) == ("other", 20, 0, 0)


@pytest.mark.parametrize(("line", "reason"), [
    ('sched = "rt"', "must be one of auto, fifo, other"),
    ('sched = "fif"', 'must be one of auto, fifo, other; did you mean "fifo"?'),
    ("rt_priority = 0", "must be from 1 to 99"),
    ("rt_priority = 100", "must be from 1 to 99"),
    ("sched_slice_us = 99", "must be 0 (the kernel's) or 100 .. 100000 µs"),
    ("sched_slice_us = 100001", "must be from 0 to 100000"),
    ("cpu_dma_latency_us = -2", "must be from -1 to 2000000000"),
    ("spin_us = -1", 'must be from 0 to 1000000 µs (or "auto")'),
    ("spin_us = 1000001", 'must be from 0 to 1000000 µs (or "auto")'),
    ('spin_us = "2ms"', 'must be a number of microseconds or "auto", not a string'),
    ("spin_us = true", 'must be a number of microseconds or "auto", not a boolean'),
    ('cpu_dma_latency_us = "0"', "must be an integer, not a string"),
])
def test_bad_values_are_one_line_naming_the_key(line: str, reason: str) -> None:
    key, _, value = line.partition(" = ")
    assert error(f"[bridge]\n{line}\n" + PAIR) == f"b.toml:2: bridge.{key} = {value}: {reason}"


def test_a_bad_value_exits_78_with_one_line(tmp_path: Path) -> None:
    cfg = tmp_path / "b.toml"
    cfg.write_text('[bridge]\nsched = "realtime"\n' + PAIR)
    p = subprocess.run([sys.executable, "-m", "nmbridge", "check", "-c", str(cfg)], capture_output=True,
                       text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 78
    assert p.stderr.count("\n") == 1 and "bridge.sched" in p.stderr and "Traceback" not in p.stderr


# --- choose(): what is asked, in which order, and the fallbacks -------------------------


class Kernel:
    """Records what choose() asks for; refuses what it is told to."""

    def __init__(self, refuse_fifo: bool = False, refuse_slice: bool = False) -> None:
        self.calls: list[tuple[str, int]] = []
        self.refuse_fifo, self.refuse_slice = refuse_fifo, refuse_slice

    def fifo(self, prio: int) -> None:
        self.calls.append(("fifo", prio))
        if self.refuse_fifo:
            raise OSError(errno.EPERM, "Operation not permitted")

    def slice(self, us: int) -> None:
        self.calls.append(("slice", us))
        if self.refuse_slice:
            raise OSError(errno.EINVAL, "Invalid argument")


def choose(k: Kernel, cpus: int = 2, **kw: Any) -> sched.Applied:
    return sched.choose(replace(AUTO, **kw), k.fifo, k.slice, lambda: cpus)


def test_auto_on_two_cpus_asks_for_fifo_at_the_configured_priority_only() -> None:
    k = Kernel()
    got = choose(k, rt_priority=7)
    assert k.calls == [("fifo", 7)]
    assert got == sched.Applied("fifo", priority=7)
    assert got.describe() == "SCHED_FIFO priority 7, sleeps when its rings are idle"


def test_auto_on_one_cpu_never_asks_for_fifo() -> None:
    k = Kernel()
    got = choose(k, cpus=1)
    assert k.calls == [("slice", 100)]
    assert got == sched.Applied("other", slice_us=100, spin_us=sched.AUTO_SPIN_US) and got.fallback is None


def test_auto_leaves_a_cpu_to_the_rest_and_never_spins_fifo() -> None:
    """auto gives SCHED_FIFO only while the bridge's forwarding threads (all pairs, all
    workers) are fewer than the usable CPUs, and never to a thread whose port busy-polls."""
    k = Kernel()
    assert sched.choose(AUTO, k.fifo, k.slice, lambda: 4, threads=3).policy == "fifo"
    assert sched.choose(AUTO, k.fifo, k.slice, lambda: 2, threads=2).policy == "other"
    assert sched.choose(AUTO, k.fifo, k.slice, lambda: 4, spins=True).policy == "other"
    assert k.calls == [("fifo", 1), ("slice", 100), ("slice", 100)]
    assert sched.auto_fifo(2, 2, False) == ("sched = auto: 2 forwarding threads on 2 usable CPUs "
                                            "would leave no CPU to the rest")
    assert "busy_poll" in (sched.auto_fifo(8, 1, True) or "")
    # a spin_us asked for explicitly is polling too: auto keeps the thread normal
    assert sched.choose(replace(AUTO, spin_us=50), k.fifo, k.slice, lambda: 4).policy == "other"
    # asked for explicitly, fifo is what it is
    k = Kernel()
    assert sched.choose(replace(BridgeConfig(), sched="fifo"), k.fifo, k.slice, lambda: 2, threads=2,
                        spins=True).policy == "fifo"


def test_fifo_is_asked_for_even_on_one_cpu() -> None:
    k = Kernel()
    assert choose(k, cpus=1, sched="fifo").policy == "fifo"
    assert k.calls == [("fifo", 1)]


def test_fifo_not_permitted_falls_back_to_the_slice_and_says_why() -> None:
    k = Kernel(refuse_fifo=True)
    got = choose(k)
    assert k.calls == [("fifo", 1), ("slice", 100)]
    assert got.policy == "other" and got.slice_us == 100
    assert got.fallback is not None and "CAP_SYS_NICE" in got.fallback and "LimitRTPRIO" in got.fallback


def test_other_never_asks_for_fifo_and_slice_0_asks_for_nothing() -> None:
    k = Kernel()
    assert choose(k, sched="other") == sched.Applied("other", slice_us=100, spin_us=sched.AUTO_SPIN_US)
    assert choose(k, sched="other", sched_slice_us=0) == sched.Applied("other", spin_us=sched.AUTO_SPIN_US)
    assert k.calls == [("slice", 100)]


def test_both_refused_leaves_the_thread_as_it_was_with_both_reasons() -> None:
    k = Kernel(refuse_fifo=True, refuse_slice=True)
    got = choose(k)
    assert got.policy == "other" and got.slice_us == 0
    assert got.fallback is not None
    assert "not permitted" in got.fallback and "slice 100 µs refused" in got.fallback


class Log:
    def __init__(self) -> None:
        self.events: list[tuple[str, str, dict[str, object]]] = []

    def info(self, event: str, **kw: object) -> None:
        self.events.append(("info", event, kw))

    def warning(self, event: str, **kw: object) -> None:
        self.events.append(("warning", event, kw))


def test_enter_forwarding_logs_once_per_process_and_warns_on_a_fallback(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sched, "_said", set())

    def refuse(prio: int) -> None:
        raise OSError(errno.EPERM, "Operation not permitted")

    monkeypatch.setattr(sched, "set_fifo", refuse)
    monkeypatch.setattr(sched.choose, "__defaults__", (refuse, lambda us: None, lambda: 2))
    log = Log()
    for _ in range(3):  # three pairs' threads: one line
        sched.enter_forwarding(AUTO, log)
    assert len(log.events) == 1
    level, event, kw = log.events[0]
    assert (level, event, kw["sched"]) == ("warning", "forwarding_sched", "SCHED_OTHER, slice 100 µs, polls "
                                           "idle rings 2000 µs before sleeping")
    assert "CAP_SYS_NICE" in str(kw["reason"])


# --- the real kernel ------------------------------------------------------------------------


def slice_ns() -> int | None:
    """The calling thread's EEVDF slice (ns), from /proc/thread-self/sched (None if not shown)."""
    for line in Path("/proc/thread-self/sched").read_text().splitlines():
        if line.startswith("se.slice"):
            return int(float(line.split(":")[1]))
    return None


def in_thread(fn: Any) -> Any:
    out: list[Any] = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


@pytest.mark.root
def test_with_cap_sys_nice_the_calling_thread_alone_becomes_fifo() -> None:
    def run() -> tuple[sched.Applied, int, int]:
        got = sched.choose(replace(BridgeConfig(), sched="fifo", rt_priority=3))
        return got, os.sched_getscheduler(0), os.sched_getparam(0).sched_priority

    got, policy, prio = in_thread(run)
    assert got == sched.Applied("fifo", priority=3)
    assert (policy, prio) == (sched.SCHED_FIFO, 3)
    assert os.sched_getscheduler(0) == sched.SCHED_OTHER  # this thread untouched


def test_set_slice_gives_the_thread_a_100_us_slice_and_keeps_its_nice() -> None:
    def run() -> tuple[int | None, int, int | None]:
        os.setpriority(os.PRIO_PROCESS, 0, 3)  # this thread's nice
        before = slice_ns()
        try:
            sched.set_slice(100)
        except OSError as e:
            pytest.skip(f"no custom EEVDF slices here (Linux 6.12+): {e}")
        return before, os.getpriority(os.PRIO_PROCESS, 0), slice_ns()

    before, nice, after = in_thread(run)
    if after is None:
        pytest.skip("this kernel does not show se.slice")
    assert after == 100_000 and before != 100_000
    assert nice == 3


CHILD = """
import os, sys
from dataclasses import replace
from nmbridge import sched
from nmbridge.config import BridgeConfig
got = sched.choose(replace(BridgeConfig(), sched="fifo"))
print(got.policy, os.sched_getscheduler(0), got.fallback)
"""


@pytest.mark.root
def test_without_cap_sys_nice_the_kernel_refuses_and_the_thread_stays_normal() -> None:
    if shutil.which("capsh") is None:
        pytest.skip("capsh (libcap2-bin) is not installed")
    p = subprocess.run(["capsh", "--drop=cap_sys_nice", "--", "-c", f'exec "{sys.executable}" -c "$0"',
                        CHILD],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    policy, kernel_policy, reason = p.stdout.split(" ", 2)
    assert (policy, int(kernel_policy)) == ("other", sched.SCHED_OTHER)
    assert "not permitted" in reason


@pytest.mark.root
def test_an_rtprio_limit_of_1_is_enough_without_cap_sys_nice() -> None:
    """systemd's LimitRTPRIO=1, the narrower alternative etc/systemd/nmbridge.service names."""
    if shutil.which("capsh") is None or shutil.which("prlimit") is None:
        pytest.skip("capsh or prlimit is not installed")
    if resource.getrlimit(resource.RLIMIT_RTPRIO)[1] < 1 and not caps.effective() & (1 << 24):
        pytest.skip("cannot raise RLIMIT_RTPRIO here (no CAP_SYS_RESOURCE)")
    p = subprocess.run(["prlimit", "--rtprio=1", "capsh", "--drop=cap_sys_nice", "--", "-c",
                        f'exec "{sys.executable}" -c "$0"', CHILD],
                       capture_output=True, text=True, timeout=60, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split(" ", 2)[:2] == ["fifo", str(sched.SCHED_FIFO)]


@pytest.mark.root
def test_cpu_dma_latency_is_held_while_open() -> None:
    path = sched.DMA_LATENCY_PATH
    if not os.path.exists(path):
        pytest.skip(f"no {path}")
    held = sched.DmaLatency(0)
    try:
        with open(path, "rb") as f:  # reading gives the current system-wide target
            assert int.from_bytes(f.read(4), sys.byteorder, signed=True) == 0
    finally:
        held.close()
    assert held.fd == -1


def test_doctor_line_says_what_a_thread_would_get() -> None:
    line = sched.describe_settings(replace(BridgeConfig(), sched="other"))
    spin = ", polls idle rings 2000 µs before sleeping"
    assert line in (f"forwarding threads: SCHED_OTHER, slice 100 µs{spin}",
                    f"forwarding threads: SCHED_OTHER{spin} (EEVDF slice 100 µs refused (Invalid argument))")
    assert os.sched_getscheduler(0) == sched.SCHED_OTHER
