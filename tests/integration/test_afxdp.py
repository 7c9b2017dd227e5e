"""End-to-end: afxdp: ports in a bridge namespace (veth has driver-mode XDP), forwarded by
fastfwd, and `nmbridge run` with afxdp: ports stopped by SIGTERM and killed by SIGKILL.

left ns (10.77.0.1) -- veth -- [bridge ns: nmbridge] -- veth -- right ns (10.77.0.2)

Skipped (with the reason) only where the kernel has no AF_XDP sockets.
"""

from __future__ import annotations

import os
import secrets
import signal
import struct
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from rawio import TEST_ETHERTYPE, Collector, RawPort, RunningBridge, udp_both_ways, wait_for

from nmbridge import netns
from nmbridge.backends import OpenOptions, PortSet, backend, parse_spec
from nmbridge.backends.afxdp_backend import kernel_lacks_af_xdp
from nmbridge.errors import PortError
from nmbridge.netns import Lab, in_netns

ROOT = Path(__file__).resolve().parents[2]
_LACKS = kernel_lacks_af_xdp() if os.geteuid() == 0 else None
pytestmark = [pytest.mark.root, pytest.mark.skipif(_LACKS is not None, reason=str(_LACKS))]

StartBridge = Callable[..., RunningBridge]


# ---------------------------------------------------------------------------------------
# names (no root needed for these, but the module is root-only: they are cheap anyway)

@pytest.mark.parametrize("name, reason", [
    ("eth0?mode=fast", "use one of auto, zc, native, skb"),
    ("eth0?queues=0", "from 1 to 64"),
    ("eth0?bogus=1", "unknown afxdp option 'bogus'"),
    ("eth0?promisc=2", "use 0 or 1"),
])
def test_bad_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        backend("afxdp").check_name(name)


# ---------------------------------------------------------------------------------------
# helpers

@pytest.fixture
def bridge(start_bridge: Callable[..., RunningBridge]) -> Callable[..., RunningBridge]:
    """bridge(lab, right="afxdp", query="", slots=1024): conftest's start_bridge with an afxdp:
    port on the left veth and one of `right`'s backend on the right (`query`: afxdp options)."""

    def start(lb: Lab, *, right: str = "afxdp", query: str = "", slots: int = 1024) -> RunningBridge:
        return start_bridge(lb, left="afxdp", right=right, query=query, slots=slots)

    return start


def xdp_attached(lb: Lab, ifname: str) -> bool:
    return "xdp" in lb.link(lb.ns_bridge, ifname)


def ping(ns: str, dst: str, count: int = 3, timeout: float = 3.0) -> int:
    return sum(rtt is not None for rtt in netns.ping(ns, dst, count, timeout))


def eth(dst: bytes, src: bytes, token: bytes, seq: int, size: int, tags: bytes = b"") -> bytes:
    head = dst + src + tags + struct.pack("!H", TEST_ETHERTYPE) + token + struct.pack("!I", seq)
    return head + bytes((seq + k) & 0xFF for k in range(size - len(head)))


def tag(tpid: int, vid: int) -> bytes:
    return struct.pack("!HH", tpid, vid)


def crafted_burst(rb: RunningBridge, src: RawPort, dst: RawPort, dst_mac: bytes, src_mac: bytes,
                  direction: str, n: int = 600) -> None:
    """n frames of 60 to 1514 bytes, untagged, 802.1Q and QinQ: exactly those arrive, whole,
    in order, and the forwarder counts exactly n."""
    token = secrets.token_bytes(8)
    col = Collector(dst, token)
    kinds = [b"", tag(0x8100, 42), tag(0x88A8, 100) + tag(0x8100, 7)]
    sizes = [60, 64, 61, 128, 1514, 999]
    sent = []
    for i in range(n):
        tags = kinds[i % 3]
        size = sizes[i % len(sizes)] + (len(tags) if sizes[i % len(sizes)] == 1514 else 0)
        sent.append(eth(dst_mac, src_mac, token, i, size, tags))
    before = rb.fwd.stats()[direction]  # type: ignore[attr-defined]
    for i in range(0, n, 100):  # bursts of 100: the peer's per-CPU backlog holds 1000
        for f in sent[i:i + 100]:
            src.send(f)
        col.wait(i + min(100, n - i))
    after = rb.fwd.stats()[direction]  # type: ignore[attr-defined]
    col.poll()
    assert col.frames == sent
    assert after["frames"] - before["frames"] == n
    assert after["bytes"] - before["bytes"] == sum(len(f) for f in sent)
    # the pair's numbers (port counters included) balance: received = forwarded + drops + queued
    from nmbridge.stats import balance, pair_counters

    for d, s in pair_counters(rb.fwd, rb.left, rb.right).items():
        assert balance(s) == 0, (d, s)
        assert s["received"] >= (n if d == direction else 0), (d, s)


# ---------------------------------------------------------------------------------------
# ports

def test_missing_interface_is_one_clear_line(lab: Lab) -> None:
    ps = PortSet(OpenOptions(slots=64))
    with pytest.raises(PortError, match=r"^afxdp:nmbnosuch0: no such interface$"):
        in_netns(lab.ns_bridge, ps.open, [parse_spec("afxdp:nmbnosuch0")])


def test_too_large_an_mtu_is_refused_at_open(lab: Lab) -> None:
    lab.ip(lab.ns_bridge, "link", "set", "dev", lab.bridge_left_if, "mtu", "3000")
    ps = PortSet(OpenOptions(slots=64))
    with pytest.raises(PortError, match=r"MTU 3000 is too large.*multi-buffer AF_XDP is not supported"):
        in_netns(lab.ns_bridge, ps.open, [parse_spec(f"afxdp:{lab.bridge_left_if}")])
    assert not xdp_attached(lab, lab.bridge_left_if)


def test_fewer_queues_than_the_interface_has_is_refused(lab: Lab) -> None:
    ps = PortSet(OpenOptions(slots=64))
    with pytest.raises(PortError, match=r"queues=2, but the interface has 1 receive queues"):
        in_netns(lab.ns_bridge, ps.open, [parse_spec(f"afxdp:{lab.bridge_left_if}?queues=2")])


def test_zero_copy_insisted_on_veth_says_why_it_fails(lab: Lab) -> None:
    ps = PortSet(OpenOptions(slots=64))
    with pytest.raises(PortError, match=r"zero-copy"):
        in_netns(lab.ns_bridge, ps.open, [parse_spec(f"afxdp:{lab.bridge_left_if}?mode=zc")])
    assert not xdp_attached(lab, lab.bridge_left_if)
    assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 0


def test_an_interface_with_an_xdp_program_is_refused_and_kept(lab: Lab) -> None:
    """A second bridge on the same interface: one clear line, the first keeps forwarding."""
    first = PortSet(OpenOptions(slots=64))
    in_netns(lab.ns_bridge, first.open, [parse_spec(f"afxdp:{lab.bridge_left_if}")])
    try:
        second = PortSet(OpenOptions(slots=64))
        with pytest.raises(PortError, match=r"already|busy"):
            in_netns(lab.ns_bridge, second.open, [parse_spec(f"afxdp:{lab.bridge_left_if}")])
        assert xdp_attached(lab, lab.bridge_left_if)
    finally:
        first.close()
    assert not xdp_attached(lab, lab.bridge_left_if)


@pytest.mark.parametrize("mode, extra", [("auto", ""), ("skb", ""), ("native", "&need_wakeup=0")])
def test_arp_and_ping_both_ways(lab: Lab, bridge: StartBridge, mode: str, extra: str) -> None:
    rb = bridge(lab, query=f"?mode={mode}{extra}")
    info = rb.left.info()  # type: ignore[attr-defined]
    assert info["mode"] == ("native" if mode == "auto" else mode)  # veth has no AF_XDP zero-copy
    if mode == "auto":
        assert "zero-copy" in info["mode_reason"]
    assert xdp_attached(lab, lab.bridge_left_if) and xdp_attached(lab, lab.bridge_right_if)
    assert ping(lab.ns_left, lab.right_ip) == 3
    assert ping(lab.ns_right, lab.left_ip) == 3
    left_mac = lab.mac(lab.ns_left, lab.left_if)
    right_mac = lab.mac(lab.ns_right, lab.right_if)
    assert right_mac.hex(":") in lab.ip(lab.ns_left, "neigh", "show", lab.right_ip).stdout
    assert left_mac.hex(":") in lab.ip(lab.ns_right, "neigh", "show", lab.left_ip).stdout
    assert rb.fwd.zerocopy  # type: ignore[attr-defined]
    # one UMEM for both interfaces: the first port registered it, the second shares it
    assert (rb.left.shared_sockets, rb.right.shared_sockets) == (0, 1)  # type: ignore[attr-defined]
    assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 1
    rb.stop()
    assert not xdp_attached(lab, lab.bridge_left_if) and not xdp_attached(lab, lab.bridge_right_if)
    assert lab.link(lab.ns_bridge, lab.bridge_left_if)["promiscuity"] == 0


def test_udp_from_local_stacks_arrives_intact(lab: Lab, bridge: StartBridge) -> None:
    """veth peers hand over CHECKSUM_PARTIAL frames; the port finishes their checksums."""
    rb = bridge(lab)
    udp_both_ways(lab)
    fixed = sum(p.counters()["rx_csum_fixed"] for p in (rb.left, rb.right))  # type: ignore[attr-defined]
    assert fixed >= 6


def crafted_bursts_both_ways(lab: Lab, rb: RunningBridge) -> None:
    """crafted_burst() left to right, then right to left."""
    left, rightp = RawPort(lab.ns_left, lab.left_if), RawPort(lab.ns_right, lab.right_if)
    lm, rm = lab.mac(lab.ns_left, lab.left_if), lab.mac(lab.ns_right, lab.right_if)
    try:
        crafted_burst(rb, left, rightp, rm, lm, "a_to_b")
        crafted_burst(rb, rightp, left, lm, rm, "b_to_a")
    finally:
        left.close()
        rightp.close()


@pytest.mark.parametrize("right", ["afxdp", "afpacket"])
def test_exact_counts_for_crafted_bursts_with_vlan_tags(lab: Lab, bridge: StartBridge, right: str) -> None:
    """Untagged, 802.1Q and QinQ frames of 60 to 1522 bytes, both ways: each arrives once,
    whole, tags included; against afpacket: too (a mixed pair swaps buffers: one region, and
    the UMEM is the whole pool, so an afpacket: buffer is a valid UMEM chunk)."""
    rb = bridge(lab, right=right)
    assert rb.fwd.zerocopy  # type: ignore[attr-defined]
    crafted_bursts_both_ways(lab, rb)
    c = rb.left.counters()  # type: ignore[attr-defined]
    assert c["rx_frames"] == rb.fwd.stats()["a_to_b"]["frames"]  # type: ignore[attr-defined]
    assert c["tx_errors"] == c["tx_dev_drops"] == c["rx_kernel_drops"] == c["rx_fill_empty"] == 0


def test_exact_counts_with_coalescing_and_busy_polling(lab: Lab, bridge: StartBridge) -> None:
    """rx_coalesce and busy_poll change when the port syncs, never what it delivers: the same
    bursts arrive exactly, and the pair's numbers balance."""
    rb = bridge(lab, query="?rx_coalesce=50&busy_poll=20&busy_budget=16")
    crafted_bursts_both_ways(lab, rb)
    c = rb.left.counters()  # type: ignore[attr-defined]
    assert c["busy_polls"] > 0 and c["fill_kicks"] == 0  # every rxsync asks the kernel itself
    assert c["rx_fill_empty"] == c["rx_kernel_drops"] == 0


def test_link_down_and_up(lab: Lab, bridge: StartBridge) -> None:
    """With the far side down, frames are dropped and counted; once it is up again, ping works."""
    rb = bridge(lab)
    assert ping(lab.ns_left, lab.right_ip) == 3
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, False)
    left = RawPort(lab.ns_left, lab.left_if)
    lm, rm = lab.mac(lab.ns_left, lab.left_if), lab.mac(lab.ns_right, lab.right_if)
    token = secrets.token_bytes(8)
    before = rb.fwd.stats()["a_to_b"]["frames"]  # type: ignore[attr-defined]
    for i in range(50):
        left.send(eth(rm, lm, token, i, 60))
    wait_for(lambda: rb.fwd.stats()["a_to_b"]["frames"] - before >= 50,  # type: ignore[attr-defined]
             what="50 frames forwarded towards the down link")
    c = rb.right.counters()  # type: ignore[attr-defined]
    assert c["tx_link_down"] + c["tx_frames"] >= 50  # dropped and counted, or waiting in the XSK TX ring
    left.close()
    lab.set_up(lab.ns_bridge, lab.bridge_right_if, True)
    wait_for(lambda: ping(lab.ns_left, lab.right_ip, 1, 1.0) == 1, 15.0, "ping after link up")
    assert ping(lab.ns_right, lab.left_ip) == 3
    assert rb.right.counters()["tx_errors"] == 0  # type: ignore[attr-defined]


def test_every_receive_queue_gets_a_socket(lab: Lab) -> None:
    """Two-queue veths: both queues are bound (a ring pair each; the port is polled through
    one epoll fd over its sockets), ping works both ways, and bursts arrive exactly."""
    from nmbridge.fastfwd import Forwarder

    mq_l, mq_bl, mq_br, mq_r = (f"{lab.prefix}-{s}" for s in ("ml", "mbl", "mbr", "mr"))
    for a, a_ns, b in ((mq_l, lab.ns_left, mq_bl), (mq_r, lab.ns_right, mq_br)):
        netns.run("ip", "link", "add", a, "numtxqueues", "2", "numrxqueues", "2", "type", "veth", "peer",
                  "name", b, "numtxqueues", "2", "numrxqueues", "2")
        netns.run("ip", "link", "set", "dev", a, "netns", a_ns)
        netns.run("ip", "link", "set", "dev", b, "netns", lab.ns_bridge)
    lab.ip(lab.ns_left, "addr", "add", "10.78.0.1/24", "dev", mq_l)
    lab.ip(lab.ns_right, "addr", "add", "10.78.0.2/24", "dev", mq_r)
    for ns, ifname in ((lab.ns_left, mq_l), (lab.ns_bridge, mq_bl), (lab.ns_bridge, mq_br),
                       (lab.ns_right, mq_r)):
        lab.set_up(ns, ifname)
    ps = PortSet(OpenOptions(rings=2, slots=256))
    a, b = in_netns(lab.ns_bridge, ps.open, [parse_spec(f"afxdp:{mq_bl}"), parse_spec(f"afxdp:{mq_br}")])
    fwd = Forwarder(a, b, burst=256, poll_timeout_ms=1000)
    t = threading.Thread(target=fwd.run, daemon=True)
    t.start()
    try:
        assert a.info()["queues"] == b.info()["queues"] == 2
        assert (a.shared_sockets, b.shared_sockets) == (1, 2)  # queue 1 shares queue 0's UMEM
        assert a.info()["rx_rings"] == 2
        assert ping(lab.ns_left, "10.78.0.2") == 3 and ping(lab.ns_right, "10.78.0.1") == 3
        left, right = RawPort(lab.ns_left, mq_l), RawPort(lab.ns_right, mq_r)
        lm, rm = lab.mac(lab.ns_left, mq_l), lab.mac(lab.ns_right, mq_r)
        token = secrets.token_bytes(8)
        col = Collector(right, token)
        sent = [eth(rm, lm, token, i, 60) for i in range(2000)]
        for i in range(0, len(sent), 200):
            for f in sent[i:i + 200]:
                left.send(f)
            col.wait(i + 200)  # windows of 200 frames: within what a 256-slot fill ring holds
        col.poll()
        assert sorted(col.frames) == sorted(sent)  # two queues: order holds per queue only
        left.close()
        right.close()
    finally:
        fwd.stop()
        t.join(10)
        ps.close()


# ---------------------------------------------------------------------------------------
# nmbridge run: SIGTERM restores everything, SIGKILL leaves no black hole

def start_run(lb: Lab, tmp_path: Path) -> subprocess.Popen[str]:
    cfg = tmp_path / "bridge.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0\n[[pair]]\nname = "lab"\n'
                   f'ports = ["afxdp:{lb.bridge_left_if}", "afxdp:{lb.bridge_right_if}"]\n')
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT))
    proc = lb.popen(lb.ns_bridge, sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c",
                    str(cfg), "--control", "", cwd="/", env=env, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    for line in proc.stdout:
        if '"ready"' in line:
            break
    else:
        pytest.fail(f"nmbridge run ended: {proc.stderr.read() if proc.stderr else ''}")
    threading.Thread(target=proc.stdout.read, daemon=True).start()  # keep the pipe drained
    return proc


def test_run_sigterm_restores_every_interface(lab: Lab, tmp_path: Path) -> None:
    proc = start_run(lab, tmp_path)
    try:
        assert xdp_attached(lab, lab.bridge_left_if) and xdp_attached(lab, lab.bridge_right_if)
        assert ping(lab.ns_left, lab.right_ip) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    for ifname in (lab.bridge_left_if, lab.bridge_right_if):
        link = lab.link(lab.ns_bridge, ifname)
        assert "xdp" not in link, f"{ifname} still has an XDP program: {link['xdp']}"
        assert link["promiscuity"] == 0


def test_run_sigkill_leaves_no_black_hole(lab: Lab, tmp_path: Path) -> None:
    proc = start_run(lab, tmp_path)
    assert ping(lab.ns_left, lab.right_ip) == 3
    proc.send_signal(signal.SIGKILL)
    proc.wait(60)
    # the BPF link died with the process: the program is gone, and the interface is the
    # stack's again -- give it an address and ping it from the left
    wait_for(lambda: not xdp_attached(lab, lab.bridge_left_if), 10.0, "the XDP program to go")
    assert not xdp_attached(lab, lab.bridge_right_if)
    lab.ip(lab.ns_bridge, "addr", "add", "10.77.0.3/24", "dev", lab.bridge_left_if)
    assert ping(lab.ns_left, "10.77.0.3") == 3


# ---------------------------------------------------------------------------------------
# capabilities: what is missing is named; with exactly what is named, it forwards

def _as_nobody(*caps: str) -> list[str]:
    """setpriv as uid/gid 65534 with only `caps` (plus dac_read_search when 65534 cannot read
    the interpreter's directory, as under /root)."""
    nobody = ["--reuid=65534", "--regid=65534", "--clear-groups"]
    probe = subprocess.run(["setpriv", *nobody, sys.executable, "-c", "import nmbridge.cli"],
                           capture_output=True, timeout=60, cwd=ROOT,
                           env=dict(os.environ, PYTHONPATH=str(ROOT)))
    wanted = list(caps) if probe.returncode == 0 else [*caps, "dac_read_search"]
    spec = ",".join(f"+{c}" for c in wanted)
    return ["setpriv", *nobody, f"--inh-caps={spec}", f"--ambient-caps={spec}"]


@pytest.fixture
def public_config(lab: Lab) -> Iterator[Path]:
    import shutil
    import tempfile

    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    d = Path(tempfile.mkdtemp(prefix="nmbtest-"))
    d.chmod(0o755)
    cfg = d / "bridge.toml"
    cfg.write_text(f'[bridge]\nstats_interval = 0\n[[pair]]\nname = "lab"\n'
                   f'ports = ["afxdp:{lab.bridge_left_if}", "afxdp:{lab.bridge_right_if}"]\n')
    cfg.chmod(0o644)
    try:
        yield cfg
    finally:
        shutil.rmtree(d)


def test_without_cap_bpf_it_says_so_in_one_line(lab: Lab, public_config: Path) -> None:
    """CAP_BPF missing is named; and CAP_IPC_LOCK when RLIMIT_MEMLOCK (8 MiB by default)
    cannot hold the UMEM (16 MiB here)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    argv = [sys.executable, "-m", "nmbridge", "run", "-c", str(public_config), "--control", ""]
    p = subprocess.run(["ip", "netns", "exec", lab.ns_bridge, *_as_nobody("net_admin", "net_raw"), *argv],
                       capture_output=True, text=True, timeout=60, env=env)
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "CAP_BPF (afxdp: XDP program load)" in p.stderr
    import resource

    soft = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0]
    if soft != resource.RLIM_INFINITY and soft < 16 << 20:
        assert "CAP_IPC_LOCK (afxdp: a 16 MiB UMEM over RLIMIT_MEMLOCK" in p.stderr
    assert not xdp_attached(lab, lab.bridge_left_if)


def test_an_unprivileged_user_with_the_named_capabilities_forwards(lab: Lab, public_config: Path) -> None:
    state = public_config.parent / "state"  # /run/nmbridge is root's: the service gets its own
    state.mkdir()
    os.chown(state, 65534, 65534)
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(ROOT), NMBRIDGE_STATE_DIR=str(state))
    argv = [sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(public_config),
            "--control", ""]
    proc = lab.popen(lab.ns_bridge, *_as_nobody("net_admin", "net_raw", "bpf", "ipc_lock"), *argv, cwd="/",
                     env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            if '"ready"' in line:
                break
        else:
            pytest.fail(f"nmbridge run ended: {proc.stderr.read() if proc.stderr else ''}")
        threading.Thread(target=proc.stdout.read, daemon=True).start()
        assert "\nUid:\t65534\t65534\t65534\t65534\n" in Path(f"/proc/{proc.pid}/status").read_text()
        assert ping(lab.ns_left, lab.right_ip) == 3
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert not xdp_attached(lab, lab.bridge_left_if)
