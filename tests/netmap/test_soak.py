"""Soak: 60 seconds of 64-byte frames through a pipe pair, in rounds of exact counts.

C-level generator on t{0, nmbridge (run() in a thread, zero-copy) t}0 -> t}1, C-level sink on
t{1.  Every round must deliver exactly the frames generated: a lost or duplicated frame fails.
NMBRIDGE_SOAK_SECONDS shortens or lengthens it.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable

from nmbridge.backends import PortSet, PortSpec
from nmbridge.backends.netmap_backend import open_port
from nmbridge.fastfwd import Forwarder

SECONDS = float(os.environ.get("NMBRIDGE_SOAK_SECONDS", "60"))
ROUND = 500_000
FRAME = 64


def test_soak_exact_counts(uniq: Callable[[str], str]) -> None:
    parent = uniq("s")
    gen = open_port(f"netmap:{parent}{{0")
    sink = open_port(f"netmap:{parent}{{1")
    ports = PortSet()
    src, dst = ports.open([PortSpec("netmap", f"{parent}}}0"), PortSpec("netmap", f"{parent}}}1")])
    fwd = Forwarder(src, dst, direction="a-to-b", poll_timeout_ms=100)
    assert fwd.zerocopy
    errors: list[BaseException] = []

    def guarded(fn: Callable[[], object], out: list[object]) -> None:
        try:
            out.append(fn())
        except BaseException as e:  # reported below
            errors.append(e)

    fwd_thread = threading.Thread(target=guarded, args=(fwd.run, []))
    fwd_thread.start()
    total = rounds = 0
    try:
        end = time.monotonic() + SECONDS
        while time.monotonic() < end and not errors:
            sent: list[object] = []
            got: list[object] = []
            tg = threading.Thread(target=guarded, args=(lambda: gen.generate(FRAME, ROUND), sent))
            ts = threading.Thread(target=guarded, args=(lambda: sink.sink(ROUND), got))
            ts.start()
            tg.start()
            tg.join(120)
            ts.join(120)
            if tg.is_alive() or ts.is_alive():  # a frame was lost: unstick and fail below
                gen.stop_driver()
                sink.stop_driver()
                tg.join()
                ts.join()
            assert errors == []
            assert sent == [ROUND], f"round {rounds}: generator sent {sent}"
            assert got == [(ROUND, ROUND * FRAME)], f"round {rounds}: sink got {got} of {ROUND}"
            total += ROUND
            rounds += 1
    finally:
        fwd.stop()
        fwd_thread.join(30)
        ports.close()
        gen.close()
        sink.close()
    assert errors == []
    st = fwd.stats()["a_to_b"]
    assert rounds >= 1
    assert st["frames"] == total and st["bytes"] == total * FRAME
    assert st["oversize"] == st["broken_chain"] == st["filtered"] == 0
