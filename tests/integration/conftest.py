"""Fixtures for end-to-end tests in network namespaces (root only).

``lab``: a fresh left -- bridge -- right lab per test (see nmbridge/netns.py).
``start_bridge``: opens two ports (afpacket: by default) inside the lab's bridge namespace
(one shared region, as the app does) and runs a Forwarder over them in a thread; stopped and
closed at teardown, and the test fails if the forwarder thread raised or stopped by itself.
Frame I/O helpers live in rawio.py.
"""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Callable, Iterator

import pytest

sys.path.insert(0, os.path.dirname(__file__))

from rawio import RunningBridge, wait_for

from nmbridge import netns
from nmbridge.backends import OpenOptions, PortSet, parse_spec


@pytest.fixture
def lab() -> Iterator[netns.Lab]:
    with netns.lab() as lb:
        yield lb


@pytest.fixture
def start_bridge() -> Iterator[Callable[..., RunningBridge]]:
    """start_bridge(lab, left="afpacket", right="afpacket", buf_size=2048, slots=1024,
    burst=256, query=""): a Forwarder over a port of backend `left` on the bridge's left veth
    and one of `right` on its right veth (one region), in a thread; `query` (port options) goes
    to the ports of backend `left`.  Stopped at teardown; a test may stop it itself first
    (``rb.stop()``), and the fixture then only checks that it did not fail."""
    from nmbridge.fastfwd import Forwarder

    running: list[RunningBridge] = []

    def start(lb: netns.Lab, *, left: str = "afpacket", right: str = "afpacket", buf_size: int = 2048,
              slots: int = 1024, burst: int = 256, query: str = "") -> RunningBridge:
        ps = PortSet(OpenOptions(slots=slots, buf_size=buf_size))
        specs = [parse_spec(f"{left}:{lb.bridge_left_if}{query}"),
                 parse_spec(f"{right}:{lb.bridge_right_if}{query if right == left else ''}")]
        a, b = netns.in_netns(lb.ns_bridge, ps.open, specs)
        fwd = Forwarder(a, b, burst=burst, poll_timeout_ms=100)
        errors: list[BaseException] = []

        def body() -> None:
            try:
                fwd.run()
            except BaseException as e:
                errors.append(e)

        t = threading.Thread(target=body, name="forwarder", daemon=True)
        rb = RunningBridge(lb, ps, a, b, fwd, t, errors)
        running.append(rb)
        t.start()
        wait_for(lambda: fwd.running, what="the forwarder to start")
        return rb

    yield start
    for rb in running:
        alive = rb.thread.is_alive() or not rb.portset.ports  # not alive: stopped by the test
        rb.stop()
        assert not rb.errors, f"the forwarder failed: {rb.errors[0]}"
        assert alive, "the forwarder stopped by itself"
