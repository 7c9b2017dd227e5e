"""afxdp: port names, the capabilities it needs, and what doctor says (no root needed)."""

from __future__ import annotations

import resource
from pathlib import Path

import pytest

from nmbridge import caps, config
from nmbridge.app import required_capabilities
from nmbridge.backends import backend, parse_spec
from nmbridge.backends.afxdp_backend import needed_capabilities, parse
from nmbridge.doctor import afxdp_mode


@pytest.mark.parametrize("name, reason", [
    ("", "empty"),
    ("a" * 16, "longer than 15 bytes"),
    ("eth0?mode=fast", "use one of auto, zc, native, skb"),
    ("eth0?queues=0", "from 1 to 64"),
    ("eth0?queues=x", "from 1 to 64"),
    ("eth0?bogus=1", "unknown afxdp option 'bogus' \\(known: mode, queues, busy_poll, busy_budget, "
                     "rx_coalesce, promisc, need_wakeup, csum_fix\\)"),
    ("eth0?promisc=2", "use 0 or 1"),
    ("eth0?busy_poll=-1", "from 0 to 1000000"),
    ("eth0?rx_coalesce=1000001", "from 0 to 1000000"),
    ("eth0?busy_budget=x", "from 0 to 1000000"),
])
def test_bad_names_are_refused(name: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        backend("afxdp").check_name(name)


def test_good_names() -> None:
    assert parse("eth1?mode=skb&queues=4&promisc=0") == ("eth1", {"mode": "skb", "queues": "4",
                                                                  "promisc": "0"})
    assert parse("eth1?busy_poll=50&busy_budget=64&rx_coalesce=20") == (
        "eth1", {"busy_poll": "50", "busy_budget": "64", "rx_coalesce": "20"})
    assert backend("afxdp").interface("eth1?mode=zc") == "eth1"
    assert parse_spec("afxdp:eth1").backend == "afxdp"
    assert backend("afxdp").user_memory


def test_capabilities_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    last = tmp_path / "cap_last_cap"
    last.write_text("40\n")
    assert caps.kernel_has_cap_bpf(str(last))
    last.write_text("37\n")  # Linux before 5.8: no CAP_BPF, loading BPF needs CAP_SYS_ADMIN
    assert not caps.kernel_has_cap_bpf(str(last))
    monkeypatch.setattr(caps, "kernel_has_cap_bpf", lambda *_: True)
    assert [c for c, _ in needed_capabilities()] == [caps.CAP_NET_RAW, caps.CAP_NET_ADMIN, caps.CAP_BPF]
    monkeypatch.setattr(caps, "kernel_has_cap_bpf", lambda *_: False)
    assert [c for c, _ in needed_capabilities()][-1] == caps.CAP_SYS_ADMIN
    monkeypatch.setattr(resource, "getrlimit", lambda _: (8 << 20, 8 << 20))
    need = dict(needed_capabilities(16 << 20))
    assert need[caps.CAP_IPC_LOCK].startswith("afxdp: a 16 MiB UMEM over RLIMIT_MEMLOCK 8 MiB")
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    assert caps.CAP_IPC_LOCK not in dict(needed_capabilities(16 << 20))


def test_run_needs_them_for_afxdp_ports(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(caps, "kernel_has_cap_bpf", lambda *_: True)
    c = config.loads('[[pair]]\nports = ["afxdp:eth1", "afxdp:eth2"]\n')
    got = [n for n, _ in required_capabilities(c, False)]
    assert got[:3] == [caps.CAP_NET_RAW, caps.CAP_NET_ADMIN, caps.CAP_BPF]
    have = (1 << caps.CAP_NET_RAW) | (1 << caps.CAP_NET_ADMIN)
    monkeypatch.setattr(caps, "effective", lambda status_path="": have)
    monkeypatch.setattr(resource, "getrlimit", lambda _: (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
    msg = caps.require_for(required_capabilities(c, False), "nmbridge run")
    assert msg == ("nmbridge run needs CAP_BPF (afxdp: XDP program load): run as root, or give the service "
                   "AmbientCapabilities=CAP_BPF (see etc/systemd/nmbridge.service)")


def test_doctor_says_what_mode_to_expect() -> None:
    assert "mode native" in afxdp_mode("v0", "veth", 1500, 2048).problem
    assert "mode zc expected" in afxdp_mode("e0", "ice", 1500, 2048).problem
    assert "else skb" in afxdp_mode("e0", "r8169", 1500, 2048).problem
    f = afxdp_mode("e0", "ice", 9000, 2048)
    assert f.severity == "error" and "MTU 9000" in f.problem and f.fix is not None
    assert afxdp_mode("e0", "ice", 3000, 4096).severity == "note"
    assert afxdp_mode("e0", "ice", 1500, 1024).severity == "error"


def test_metrics_carry_the_port_mode() -> None:
    from nmbridge.metrics import BridgeCollector
    from nmbridge.stats import Snapshot

    snap = Snapshot(time=0.0, pairs=[], links={}, modes={"afxdp:eth1": "native", "afxdp:eth2": "zc"})
    fams = {m.name: m for m in BridgeCollector(lambda: snap).collect()}
    got = {(s.labels["port"], s.labels["mode"]): s.value for s in fams["nmbridge_port_mode"].samples}
    assert got == {("afxdp:eth1", "native"): 1.0, ("afxdp:eth2", "zc"): 1.0}
