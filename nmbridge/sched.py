"""How the kernel schedules a forwarding thread (``[bridge] sched``, ``rt_priority``,
``sched_slice_us``), how long its loop polls idle rings before sleeping (``spin_us``), and
the opt-in idle-state limit (``[bridge] cpu_dma_latency_us``).  README "Latency" has the
measurements behind each default.

A frame that reaches an idle ``afpacket:`` port waits for nmbridge's forwarding thread to be
woken and to get a CPU; the Linux bridge does not wait, it forwards inside the sender's
softirq.  By default the thread is a normal (SCHED_OTHER) thread with a short EEVDF slice
(``sched_slice_us``: it preempts sooner when woken, Linux 6.12+, no privilege needed) whose
loop polls its rings for ``AUTO_SPIN_US`` after the last frame (``spin_us = "auto"``), so a
busy link's frames need no wake-up at all.  ``sched = "fifo"`` (or ``"auto"``) asks for
``SCHED_FIFO`` at ``rt_priority`` instead -- wake-ups that preempt any normal task, for a
host where other work competes for the CPUs -- and such a thread sleeps as soon as its rings
are idle unless ``spin_us`` says otherwise.  Without the right to FIFO (CAP_SYS_NICE, or an
``RLIMIT_RTPRIO`` such as systemd's ``LimitRTPRIO=``) it falls back to the slice and says so
once.

A SCHED_FIFO thread that never sleeps owns its CPU except for what the kernel's RT
throttling (``/proc/sys/kernel/sched_rt_runtime_us``, 95 % by default) leaves to the rest.
:func:`enter_forwarding` is called by each forwarding thread itself (``pid 0`` = the calling
thread), so only forwarding threads change; the main thread and the others stay normal.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import struct
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

SCHED_OTHER = 0
SCHED_FIFO = 1
# [bridge] spin_us = "auto" for a normal forwarding thread: a ring that had a frame in the last
# 2 ms (>= 500 frames/s) is polled, not slept on (README "Latency": what it saves, what it costs)
AUTO_SPIN_US = 2000
DMA_LATENCY_PATH = "/dev/cpu_dma_latency"
# sched_setattr(2) system call numbers (glibc has no wrapper); others: not attempted
_SYS_SCHED_SETATTR = {"x86_64": 314, "aarch64": 274, "armv7l": 380, "riscv64": 274, "ppc64le": 355,
                      "s390x": 345, "i686": 351, "i386": 351}
_SCHED_ATTR = struct.Struct("=IIQiIQQQ")  # size, policy, flags, nice, priority, runtime, deadline, period


class _Settings(Protocol):
    @property
    def sched(self) -> str: ...

    @property
    def rt_priority(self) -> int: ...

    @property
    def sched_slice_us(self) -> int: ...

    @property
    def spin_us(self) -> int | str: ...


@dataclass(frozen=True)
class Applied:
    """What a forwarding thread got: ``policy`` ("fifo", "other"), its priority, its slice
    (µs, 0: the kernel's default), how long its loop polls idle rings before it sleeps
    (``spin_us``) and, when it got less than was asked, why."""

    policy: str
    priority: int = 0
    slice_us: int = 0
    fallback: str | None = None
    spin_us: int = 0

    def describe(self) -> str:
        if self.policy == "fifo":
            got = f"SCHED_FIFO priority {self.priority}"
        else:
            got = "SCHED_OTHER" + (f", slice {self.slice_us} µs" if self.slice_us else "")
        return got + (f", polls idle rings {self.spin_us} µs before sleeping" if self.spin_us
                      else ", sleeps when its rings are idle")


def spin_for(setting: int | str, policy: str) -> int:
    """The ``spin_us`` a forwarding loop gets: the setting, or for "auto" AUTO_SPIN_US when
    the thread is normal and 0 when it is SCHED_FIFO (a FIFO thread that polls takes its CPU
    from the softirq work that feeds it)."""
    if setting == "auto":
        return 0 if policy == "fifo" else AUTO_SPIN_US
    return int(setting)


def spins_explicitly(settings: _Settings) -> bool:
    """Whether ``spin_us`` asks for polling whatever the policy (a number above 0)."""
    return isinstance(settings.spin_us, int) and settings.spin_us > 0


def set_fifo(priority: int) -> None:
    """The calling thread SCHED_FIFO at `priority` (OSError when not permitted)."""
    os.sched_setscheduler(0, SCHED_FIFO, os.sched_param(priority))


def set_slice(slice_us: int) -> None:
    """The calling thread SCHED_OTHER with a custom EEVDF slice (Linux 6.12+: the
    ``sched_runtime`` of sched_setattr(2) for a fair task).  A shorter slice gives an earlier
    virtual deadline, so a woken thread preempts a running one sooner, and runs for less
    at a time.  Its nice value is kept.  OSError when the kernel refuses or lacks it."""
    nr = _SYS_SCHED_SETATTR.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"sched_setattr: unknown on {platform.machine()}")
    nice = os.getpriority(os.PRIO_PROCESS, 0)  # per thread on Linux
    attr = ctypes.create_string_buffer(_SCHED_ATTR.pack(_SCHED_ATTR.size, SCHED_OTHER, 0, nice, 0,
                                                        slice_us * 1000, 0, 0))
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.syscall(nr, 0, attr, 0) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


def usable_cpus() -> int:
    """CPUs this process may run on."""
    return len(os.sched_getaffinity(0))


def choose(settings: _Settings, fifo: Callable[[int], None] = set_fifo,
           slice_: Callable[[int], None] = set_slice, cpus: Callable[[], int] = usable_cpus, *,
           threads: int = 1, spins: bool = False) -> Applied:
    """Apply `settings` to the calling thread and say what it got.

    ``sched = "fifo"``: SCHED_FIFO at ``rt_priority``; ``"auto"`` (the default): the same when
    the process's forwarding threads (`threads`, over every pair and worker) leave at least one
    of the CPUs it may use to everything else -- SCHED_FIFO loops under overload on every CPU
    would leave the rest of the machine 5 % of it -- and the thread does not busy-poll
    (`spins`: a spinning SCHED_FIFO thread starves the softirq work of its own CPU);
    ``"other"``, the auto case that does not qualify, or when SCHED_FIFO is not permitted:
    SCHED_OTHER with an EEVDF slice of ``sched_slice_us`` (0: the kernel's)."""
    why: str | None = None
    spin = settings.spin_us
    spins = spins or spins_explicitly(settings)
    if settings.sched == "fifo" or (settings.sched == "auto" and auto_fifo(cpus(), threads, spins) is None):
        try:
            fifo(settings.rt_priority)
            return Applied("fifo", priority=settings.rt_priority, spin_us=spin_for(spin, "fifo"))
        except OSError as e:
            why = (f"SCHED_FIFO priority {settings.rt_priority} not permitted ({e.strerror}): needs "
                   "CAP_SYS_NICE or an RLIMIT_RTPRIO that allows it (systemd: LimitRTPRIO=)")
    if settings.sched_slice_us > 0:
        try:
            slice_(settings.sched_slice_us)
            return Applied("other", slice_us=settings.sched_slice_us, fallback=why,
                           spin_us=spin_for(spin, "other"))
        except OSError as e:
            refused = f"EEVDF slice {settings.sched_slice_us} µs refused ({e.strerror})"
            why = f"{why}; {refused}" if why else refused
    return Applied("other", fallback=why, spin_us=spin_for(spin, "other"))


def auto_fifo(cpus: int, threads: int, spins: bool) -> str | None:
    """None when ``sched = "auto"`` gives forwarding threads SCHED_FIFO, else why not."""
    if spins:
        return ("sched = auto: the loop busy-polls (spin_us, a port's busy_poll), which a SCHED_FIFO "
                "thread must not")
    if threads >= cpus:
        return (f"sched = auto: {threads} forwarding thread{'s' if threads != 1 else ''} on "
                f"{cpus} usable CPU{'s' if cpus != 1 else ''} would leave no CPU to the rest")
    return None


class _Log(Protocol):
    def info(self, event: str, **kw: object) -> object: ...

    def warning(self, event: str, **kw: object) -> object: ...


_lock = threading.Lock()
_said: set[str] = set()  # what this process logged already (once per process, not per thread)
_held: list[DmaLatency] = []  # the PM QoS request, held until the process ends


def enter_forwarding(settings: _Settings, log: _Log, *, threads: int = 1, spins: bool = False) -> Applied:
    """Called by each forwarding thread as it starts: :func:`choose` for itself.  The first
    thread of the process logs what it got (``forwarding_sched``; a warning with the reason
    when it got less than was asked) and takes the ``cpu_dma_latency_us`` request if one is
    configured; later threads say nothing unless they got something else."""
    got = choose(settings, threads=threads, spins=spins)
    with _lock:
        first = not _said
        said = got.describe() in _said
        _said.add(got.describe())
        dma = getattr(settings, "cpu_dma_latency_us", -1)
        dma_note: dict[str, object] = {}
        if first and isinstance(dma, int) and dma >= 0:
            try:
                _held.append(DmaLatency(dma))
                dma_note = {"cpu_dma_latency_us": dma}
            except OSError as e:
                log.warning("cpu_dma_latency_refused", path=DMA_LATENCY_PATH, error=e.strerror,
                            note="CPUs may enter deep idle states: wake-ups cost more")
    if not said:
        if got.fallback:
            log.warning("forwarding_sched", sched=got.describe(), reason=got.fallback, **dma_note)
        else:
            log.info("forwarding_sched", sched=got.describe(), **dma_note)
    return got


def preview(settings: _Settings) -> Applied:
    """What a forwarding thread would get here, found by asking the kernel from a short-lived
    thread of this process (``nmbridge doctor``); the calling thread is left alone."""
    got: list[Applied] = []
    t = threading.Thread(target=lambda: got.append(choose(settings)), name="sched-preview")
    t.start()
    t.join()
    return got[0]


def describe_settings(settings: _Settings) -> str:
    """One line for ``nmbridge doctor``: what forwarding threads would get, and why not more."""
    got = preview(settings)
    line = f"forwarding threads: {got.describe()}"
    if got.fallback:
        line += f" ({got.fallback})"
    elif got.policy == "other" and settings.sched == "auto":
        line += f" ({auto_fifo(usable_cpus(), 1, False)})"
    elif got.policy == "fifo" and settings.sched == "auto":
        line += (" (sched = auto: while the forwarding threads leave a CPU to the rest and no port "
                 "busy-polls; else SCHED_OTHER)")
    dma = getattr(settings, "cpu_dma_latency_us", -1)
    if isinstance(dma, int) and dma >= 0:
        ok = os.access(DMA_LATENCY_PATH, os.W_OK)
        line += f"; cpu_dma_latency_us {dma}" + ("" if ok else f": cannot open {DMA_LATENCY_PATH}")
    return line


def thread_policy(tid: int = 0) -> str:
    """The scheduling of a thread as :meth:`Applied.describe` would say it (its slice unknown)."""
    policy = os.sched_getscheduler(tid)
    if policy == SCHED_FIFO:
        return f"SCHED_FIFO priority {os.sched_getparam(tid).sched_priority}"
    return {SCHED_OTHER: "SCHED_OTHER", 2: "SCHED_RR", 3: "SCHED_BATCH", 5: "SCHED_IDLE",
            6: "SCHED_DEADLINE"}.get(policy, f"policy {policy}")


class DmaLatency:
    """Holds ``/dev/cpu_dma_latency`` at a value (µs) while open: the kernel's PM QoS keeps
    every CPU out of idle states slower to leave than that (0: the CPU only polls when idle,
    so a wake-up needs no interrupt to a halted CPU; what tuned's latency profiles do).  The
    request lasts as long as the file is open, and ends with the process."""

    def __init__(self, usec: int, path: str = DMA_LATENCY_PATH) -> None:
        self.usec = usec
        self.fd = os.open(path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            os.write(self.fd, struct.pack("=i", usec))
        except OSError:
            os.close(self.fd)
            raise

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
