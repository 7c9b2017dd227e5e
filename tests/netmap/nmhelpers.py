"""Helpers for tests/netmap (a unique module name: several conftest.py exist)."""

from __future__ import annotations

import select
import time

IFACE_ENV = "NMBRIDGE_NETMAP_IFACE"
NETMAP_DEVICE = "/dev/netmap"


def wait_readable(fd: int, timeout_s: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLIN)
    return bool(p.poll(int(timeout_s * 1000)))


def wait_writable(fd: int, timeout_s: float) -> bool:
    p = select.poll()
    p.register(fd, select.POLLOUT)
    return bool(p.poll(int(timeout_s * 1000)))


class Deadline:
    """A guard against hanging forever, never a timing assertion: `expired` ends a loop that
    then fails on the exact counts it was waiting for."""

    def __init__(self, seconds: float) -> None:
        self.end = time.monotonic() + seconds

    @property
    def expired(self) -> bool:
        return time.monotonic() >= self.end
