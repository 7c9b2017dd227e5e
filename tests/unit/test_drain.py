"""The drain at stop (fastfwd ``drain``): what is inside the bridge when a forwarder stops goes
out before its ports close, for a bounded time; what cannot go is a drop (``stopped``) once
the ports are closed, so the final counters show queued = 0."""

from __future__ import annotations

import io
import json
import threading
import time
from collections.abc import Callable

import pytest
from fwdutil import frame

from nmbridge import config
from nmbridge.accounting import STOPPED, Direction, closed
from nmbridge.app import Bridge
from nmbridge.backends.mem import MemPort
from nmbridge.fastfwd import Forwarder
from nmbridge.port import Region
from nmbridge.stats import balance, drain_report, final_report

SLOTS = 64  # a ring holds SLOTS - 1 frames


def ports(tx: str = "collect") -> tuple[MemPort, MemPort]:
    region = Region(ports=2, rings=1, slots=SLOTS, buf_size=2048)
    return (MemPort(region, "a", slots=SLOTS, strict=True),
            MemPort(region, "b", slots=SLOTS, tx=tx, strict=True))


def wait_until(cond: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.002)


def test_frames_inside_at_stop_go_out_before_run_returns() -> None:
    """A stop that came before run(): run() takes the frames the kernel already delivered
    (its first sync), its loop ends at once, and the drain forwards every one of them."""
    a, b = ports()
    frames = [frame(i) for i in range(40)]
    a.inject_many(frames)
    fwd = Forwarder(a, b, direction="a-to-b")
    fwd.stop()
    fwd.run()
    assert b.collect() == frames
    assert fwd.drained["complete"] is True and fwd.drained["moved"] == 40
    a.close()
    b.close()
    c = final_report(fwd, a, b)[0]["a_to_b"]
    assert (c["received"], c["forwarded"], c["queued"], c["drops"][STOPPED]) == (40, 40, 0, 0), c


def test_without_a_drain_the_frames_left_inside_are_counted_stopped_once_closed() -> None:
    """drain_ms=0 (what stopping did before): the delivered frames stay in the RX ring; while
    the ports are open they are queued, once closed they are dropped as `stopped`."""
    a, b = ports()
    a.inject_many([frame(i) for i in range(40)])
    fwd = Forwarder(a, b, direction="a-to-b", drain_ms=0)
    fwd.stop()
    fwd.run()
    assert b.collect() == []
    c = final_report(fwd, a, b)[0]["a_to_b"]
    assert (c["received"], c["queued"]) == (40, 40) and STOPPED not in c["drops"], c
    a.close()
    b.close()
    c = final_report(fwd, a, b)[0]["a_to_b"]
    assert (c["received"], c["forwarded"], c["queued"], c["drops"][STOPPED]) == (40, 0, 0, 40), c
    assert c["dropped"] == 40


def test_a_destination_that_never_takes_frames_stops_within_the_bound() -> None:
    """b's "NIC" never takes a frame: its TX ring fills, a's RX ring fills behind it.  After
    stop() the drain cannot move anything; it gives up at its bound and run() returns; what
    is left (on b's TX slots, in a's RX ring) is `stopped` in the final counters."""
    bound_ms = 50
    a, b = ports(tx="hold")
    a.inject_many([frame(i) for i in range(3 * SLOTS)])
    fwd = Forwarder(a, b, direction="a-to-b", poll_timeout_ms=60_000, drain_ms=bound_ms)
    t = threading.Thread(target=fwd.run)
    t.start()
    try:
        def stuck() -> bool:  # both rings full, nothing moves any more
            s = fwd.snapshot()
            return (s["a_to_b"]["frames"] == SLOTS - 1
                    and s["ports"]["a"]["rx_frames"] == 2 * (SLOTS - 1))

        wait_until(stuck, "b's TX ring and a's RX ring to fill")
    finally:
        fwd.stop()
        t.join(timeout=30)
    assert not t.is_alive()
    d = fwd.drained
    assert d["complete"] is False and d["moved"] == 0, d
    # it waited for its bound, and not much longer (1 s of slack: a loaded machine may
    # preempt the thread; the point is that it does not wait for the egress)
    assert bound_ms * 1000 <= d["us"] < bound_ms * 1000 + 1_000_000, d
    assert drain_report(fwd)["complete"] is False
    a.close()
    b.close()
    c = final_report(fwd, a, b)[0]["a_to_b"]
    assert c["received"] == 2 * (SLOTS - 1) and c["forwarded"] == 0 and c["queued"] == 0, c
    assert c["drops"][STOPPED] == 2 * (SLOTS - 1) == c["dropped"], c


def test_both_directions_drain_at_once() -> None:
    a, b = ports()
    to_b, to_a = [frame(i) for i in range(30)], [frame(100 + i) for i in range(20)]
    a.inject_many(to_b)
    b.inject_many(to_a)
    fwd = Forwarder(a, b)
    fwd.stop()
    fwd.run()
    assert b.collect() == to_b and a.collect() == to_a
    assert fwd.drained == {"us": fwd.drained["us"], "moved": 50, "complete": True}


def test_closed_moves_queued_into_stopped() -> None:
    d = Direction(received=10, forwarded=4, queued=3, dropped={"filtered": 3}, bytes=240, batches=2,
                  tx_stalls=0)
    c = closed(d)
    assert c["queued"] == 0 and c["dropped"] == {"filtered": 3, STOPPED: 3}
    assert balance(c) == 0 and d["queued"] == 3  # a new record; the old one is unchanged


@pytest.mark.parametrize("bad", [-1, 10_001])
def test_drain_ms_is_checked(bad: int) -> None:
    a, b = ports()
    with pytest.raises(ValueError, match="drain_ms"):
        Forwarder(a, b, drain_ms=bad)


def test_the_stopped_event_counts_what_a_stuck_egress_kept_as_stopped(log_lines: io.StringIO) -> None:
    """A whole bridge: an endless source into an egress that takes nothing.  At the stop the
    drain gives up at its bound; the `stopped` event (read after the ports closed) shows
    queued 0, every frame received as `stopped`, and the drain as incomplete."""
    cfg = config.loads('[bridge]\nstats_interval = 0\n[[pair]]\nname = "p"\n'
                       'ports = ["mem:src?rx=source&tx=sink", "mem:dst?rx=none&tx=hold"]\n'
                       'direction = "a-to-b"\n', "test.toml")
    bridge = Bridge(cfg)

    def stop_once_stuck() -> None:
        def stuck() -> bool:
            return bool(bridge.pairs) and any(
                s["a_to_b"]["frames"] > 0 for s in (f.snapshot() for f in bridge.pairs[0].fwd.forwarders))
        wait_until(stuck, "the egress ring to take frames", timeout=30)
        bridge.events.put(("signal", "TEST"))

    t = threading.Thread(target=stop_once_stuck, daemon=True)
    t.start()
    bridge.run()
    t.join(timeout=30)
    stopped = [json.loads(line) for line in log_lines.getvalue().splitlines()][-1]
    assert stopped["event"] == "stopped"
    c = stopped["counters"]["p"]["a_to_b"]
    assert c["received"] > 0 and c["forwarded"] == 0 and c["queued"] == 0, c
    assert c["drops"][STOPPED] == c["received"] == c["dropped"], c
    assert stopped["drain"]["p"]["complete"] is False and stopped["drain"]["p"]["moved"] == 0, stopped
