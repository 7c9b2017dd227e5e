"""afpacket: shares (PACKET_FANOUT) without sockets: the fanout= option, ring_pairs from a
fake sysfs, and the share counts open_shares refuses before opening anything.  The kernel
side (one group per port, unique ids, frames once and in flow order) is in
tests/integration/test_afpacket_fanout.py."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest

from nmbridge import config
from nmbridge.backends import OpenOptions, afpacket_backend, backend
from nmbridge.errors import ConfigError, PortError
from nmbridge.port import Region


@pytest.mark.parametrize("mode, kind", [("hash", 0), ("lb", 1), ("cpu", 2), ("qm", 5)])
def test_fanout_modes_are_the_kernels_types(mode: str, kind: int) -> None:
    assert afpacket_backend.parse(f"eth0?fanout={mode}") == ("eth0", {"fanout": kind})


@pytest.mark.parametrize("value", ["rss", "HASH", "", "0", "hash2"])
def test_a_bad_fanout_mode_is_one_clear_line(value: str) -> None:
    with pytest.raises(ConfigError) as e:
        config.loads(f'[[pair]]\nports = ["afpacket:eth0?fanout={value}", "mem:z"]\n', "b.toml")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("b.toml:2: pair[1].ports[1] = ")
    assert f"afpacket option fanout={value!r}: use hash, cpu, qm, lb" in message


def test_fanout_is_named_among_the_known_options() -> None:
    with pytest.raises(ValueError, match=r"unknown afpacket option 'fan_out' .*fanout"):
        afpacket_backend.parse("eth0?fan_out=hash")


def fake_sysfs(root: Path, ifname: str, ifindex: int, queues: list[str]) -> Path:
    d = root / ifname
    (d / "queues").mkdir(parents=True)
    (d / "ifindex").write_text(f"{ifindex}\n")
    for q in queues:
        (d / "queues" / q).mkdir()
    return root


def test_rx_queues_counts_the_rx_entries_of_sysfs(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, "eth1", 7, ["rx-0", "rx-1", "rx-2", "tx-0", "tx-1", "rx-x"])
    assert afpacket_backend.rx_queues("eth1", 7, str(root)) == 3


def test_rx_queues_does_not_trust_another_interfaces_entry(tmp_path: Path) -> None:
    """sysfs shows the namespace it was mounted in: an entry of the same name with another
    ifindex is another interface (the caller then asks the kernel through ethtool)."""
    root = fake_sysfs(tmp_path, "eth1", 7, ["rx-0", "rx-1"])
    assert afpacket_backend.rx_queues("eth1", 8, str(root)) is None
    assert afpacket_backend.rx_queues("eth2", 7, str(root)) is None


def test_rx_queues_is_one_at_least(tmp_path: Path) -> None:
    root = fake_sysfs(tmp_path, "eth1", 7, ["tx-0"])
    assert afpacket_backend.rx_queues("eth1", 7, str(root)) == 1


def test_ring_pairs_reads_the_interfaces_rx_queues(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`lo` exists in every namespace: ring_pairs finds its index, then its (fake) sysfs entry."""
    root = fake_sysfs(tmp_path, "lo", socket.if_nametoindex("lo"), ["rx-0", "rx-1", "rx-2", "rx-3"])
    monkeypatch.setattr(afpacket_backend, "SYSFS_NET", str(root))
    assert backend("afpacket").ring_pairs("lo?fanout=qm", OpenOptions()) == 4  # type: ignore[attr-defined]


def test_ring_pairs_of_a_missing_interface_names_it() -> None:
    with pytest.raises(PortError, match=r"^afpacket:nmbnone0: no such interface$"):
        backend("afpacket").ring_pairs("nmbnone0", OpenOptions())  # type: ignore[attr-defined]


@pytest.mark.parametrize("shares", [0, -1, afpacket_backend.MAX_SHARES + 1])
def test_open_shares_refuses_a_bad_count_before_opening(shares: int) -> None:
    region = Region(ports=1, slots=16)
    with pytest.raises(PortError, match=rf"^afpacket:eth0: {shares} shares: from 1 to 256$"):
        backend("afpacket").open_shares("eth0", OpenOptions(slots=16), region, shares)  # type: ignore[attr-defined]


def test_one_share_is_a_plain_open(monkeypatch: pytest.MonkeyPatch) -> None:
    """shares == 1 is exactly open(): no group, no other sizing."""
    calls: list[tuple[str, OpenOptions, object]] = []
    b = backend("afpacket")
    monkeypatch.setattr(type(b), "open", lambda self, n, o, r: calls.append((n, o, r)) or "port")
    opts, region = OpenOptions(slots=16), Region(ports=1, slots=16)
    assert b.open_shares("eth0?fanout=lb", opts, region, 1) == ["port"]  # type: ignore[attr-defined]
    assert calls == [("eth0?fanout=lb", opts, region)]
