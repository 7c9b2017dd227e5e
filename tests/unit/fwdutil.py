"""Helpers shared by the fastfwd tests: build mem: pairs and run a forwarder to quiescence."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

from nmbridge.backends.mem import MemPort
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Region


def pair(*, slots: int = 64, slots_b: int | None = None, rings: int = 1, buf_size: int = 2048,
         zerocopy: bool = True, strict: bool = True) -> tuple[MemPort, MemPort]:
    """mem: ports a and b (b with `slots_b` slots if given): one region, or one each."""
    sb = slots if slots_b is None else slots_b
    big = max(slots, sb)
    if zerocopy:
        ra = rb = Region(ports=2, rings=rings, slots=big, buf_size=buf_size)
    else:
        ra = Region(ports=1, rings=rings, slots=big, buf_size=buf_size)
        rb = Region(ports=1, rings=rings, slots=big, buf_size=buf_size)
    a = MemPort(ra, "a", rings=rings, slots=slots, strict=strict)
    b = MemPort(rb, "b", rings=rings, slots=sb, strict=strict)
    return a, b


def drain(fwd: Forwarder, *ports: MemPort, max_steps: int = 10_000) -> int:
    """step() until nothing is pending and nothing moves; returns the number of steps."""
    idle = 0
    for n in range(max_steps):
        moved = fwd.step()
        pending = sum(p.pending for p in ports)
        idle = idle + 1 if moved == 0 and pending == 0 else 0
        if idle >= 3:  # RX refills after one sync, TX reclaims after the next
            return n
    raise AssertionError("forwarder did not go idle")


def frame(i: int, size: int = 60) -> bytes:
    """A frame whose bytes say who it is."""
    head = b"\x02\x00\x00\x00\x00\x01" + b"\x02\x00\x00\x00\x00\x02" + b"\x88\xb5" + i.to_bytes(4, "big")
    body = bytes((i + k) & 0xFF for k in range(max(0, size - len(head))))
    return (head + body)[:size]


def run_in_thread(bridge: Any) -> tuple[threading.Thread, list[BaseException]]:
    """`bridge.run()` in a daemon thread, started; what it raised lands in the list."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            bridge.run()
        except BaseException as e:
            errors.append(e)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t, errors


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    """Poll `cond` until it holds; fail the test naming `what` after `timeout` seconds (a
    deadline for a loaded machine, never slept out)."""
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.005)
