"""netmap port names: what the kernel is sent for each, and a clear error for every bad one.

Pure Python (the parser needs neither the extension nor /dev/netmap). Mode and flag values
are the ABI facts' numbers, written here independently of the parser's constants.
"""

from __future__ import annotations

import pytest

from nmbridge.backends import PortSpec, parse_spec
from nmbridge.backends.netmap_backend import BACKEND, NetmapName, parse_name

ALL_NIC, SW, NIC_SW, ONE_NIC, ONE_SW = 1, 2, 3, 4, 8
EXCLUSIVE, RX_ONLY, TX_ONLY = 0x800, 0x2000, 0x4000


@pytest.mark.parametrize(
    ("name", "nr_name", "mode", "ringid", "flags", "mem_id", "kind", "interface"),
    [
        ("eth1", "eth1", ALL_NIC, 0, 0, 0, "nic", "eth1"),
        ("netmap:eth1", "eth1", ALL_NIC, 0, 0, 0, "nic", "eth1"),
        ("eth1^", "eth1", SW, 0, 0, 0, "nic", "eth1"),
        ("eth1^0", "eth1", ONE_SW, 0, 0, 0, "nic", "eth1"),
        ("eth1^3", "eth1", ONE_SW, 3, 0, 0, "nic", "eth1"),
        ("eth1*", "eth1", NIC_SW, 0, 0, 0, "nic", "eth1"),
        ("eth1-0", "eth1", ONE_NIC, 0, 0, 0, "nic", "eth1"),
        ("eth1-12", "eth1", ONE_NIC, 12, 0, 0, "nic", "eth1"),
        ("eth1-4094", "eth1", ONE_NIC, 4094, 0, 0, "nic", "eth1"),
        ("enp3s0f1", "enp3s0f1", ALL_NIC, 0, 0, 0, "nic", "enp3s0f1"),
        ("eth0.100", "eth0.100", ALL_NIC, 0, 0, 0, "nic", "eth0.100"),
        ("t{0", "t{0", ALL_NIC, 0, 0, 0, "pipe", None),
        ("t}0", "t}0", ALL_NIC, 0, 0, 0, "pipe", None),
        ("pipe}ab_1", "pipe}ab_1", ALL_NIC, 0, 0, 0, "pipe", None),
        ("eth1{3", "eth1{3", ALL_NIC, 0, 0, 0, "pipe", None),
        ("vale0:a", "vale0:a", ALL_NIC, 0, 0, 0, "vale", None),
        ("vale:a", "vale:a", ALL_NIC, 0, 0, 0, "vale", None),
        ("vale_sw1:port_2", "vale_sw1:port_2", ALL_NIC, 0, 0, 0, "vale", None),
        ("vale0:a-1", "vale0:a", ONE_NIC, 1, 0, 0, "vale", None),
        ("vale0:p{1", "vale0:p{1", ALL_NIC, 0, 0, 0, "pipe", None),
        ("eth1/x", "eth1", ALL_NIC, 0, EXCLUSIVE, 0, "nic", "eth1"),
        ("eth1/R", "eth1", ALL_NIC, 0, RX_ONLY, 0, "nic", "eth1"),
        ("eth1/T", "eth1", ALL_NIC, 0, TX_ONLY, 0, "nic", "eth1"),
        ("eth1/xR", "eth1", ALL_NIC, 0, EXCLUSIVE | RX_ONLY, 0, "nic", "eth1"),
        ("eth1^/x", "eth1", SW, 0, EXCLUSIVE, 0, "nic", "eth1"),
        ("eth1-2/T@3", "eth1", ONE_NIC, 2, TX_ONLY, 3, "nic", "eth1"),
        ("eth1@7", "eth1", ALL_NIC, 0, 0, 7, "nic", "eth1"),
        ("t}1@65535", "t}1", ALL_NIC, 0, 0, 65535, "pipe", None),
        ("vale0:b/x@2", "vale0:b", ALL_NIC, 0, EXCLUSIVE, 2, "vale", None),
    ],
)
def test_good_names(name: str, nr_name: str, mode: int, ringid: int, flags: int, mem_id: int, kind: str,
                    interface: str | None) -> None:
    p = parse_name(name)
    assert isinstance(p, NetmapName)
    assert (p.nr_name, p.nr_mode, p.nr_ringid, p.nr_flags, p.mem_id, p.kind, p.interface) == (
        nr_name, mode, ringid, flags, mem_id, kind, interface)
    assert p.register_flags == flags | EXCLUSIVE  # always exclusive; NR_NO_TX_POLL never
    assert BACKEND.interface(name) == interface


@pytest.mark.parametrize(
    ("name", "reason"),
    [
        ("", "no interface name"),
        ("netmap:", "no interface name"),
        ("eth 1", "spaces"),
        ("eth1^x", "unexpected 'x'"),
        ("eth1-", "'-' must be followed by a ring number"),
        ("br-lan", "'-' must be followed by a ring number"),
        ("eth1-4095", "out of range"),
        ("eth1^4095", "out of range"),
        ("eth1-2-3", "unexpected '-3'"),
        ("eth1*2", "unexpected '2'"),
        ("eth1^*", "unexpected '*'"),
        ("eth1/", "'/' must be followed by flags"),
        ("eth1/q", "unknown flag 'q'"),
        ("eth1/RT", "exclude each other"),
        ("eth1/xx", "given twice"),
        ("eth1/t", "monitor flag 't'"),
        ("eth1@", "memory region number"),
        ("eth1@0", "start at 1"),
        ("eth1@65536", "out of range"),
        ("eth1@/dev/shm/x", "external memory"),
        ("eth1@2@3", "unexpected '@3'"),
        ("eth1@3/x", "unexpected '/x'"),
        ("eth$1", "character '$'"),
        ("averyveryverylongname0", "longer than 15"),
        ("t{", "identifier after '{'"),
        ("{0", "parent's name before '{'"),
        ("t{0}1", "pipe identifier '0}1'"),
        ("t{a.b", "pipe identifier"),
        ("t{0^", "only a NIC has"),
        ("vale0:a^", "only a NIC has"),
        ("vale0:a*", "only a NIC has"),
        ("vale0:", "no VALE port name"),
        ("vale-0:a", "must be 'vale' followed by"),
        ("vale0:a.b", "VALE port name 'a.b'"),
        ("eth0:1", "only VALE switches"),
        ("vale0:" + "p" * 60, "longer than 63"),
    ],
)
def test_bad_names(name: str, reason: str) -> None:
    with pytest.raises(ValueError) as e:
        parse_name(name)
    msg = str(e.value)
    assert reason in msg
    assert repr(name) in msg or repr("netmap:" + name) in msg or name == "netmap:"
    assert "\n" not in msg


def test_vale_ports_go_to_the_netmap_backend() -> None:
    assert parse_spec("vale0:a") == PortSpec("netmap", "vale0:a")
    assert parse_spec("netmap:t}0") == PortSpec("netmap", "t}0")
    with pytest.raises(ValueError, match=r"'eth1/q'.*unknown flag"):
        parse_spec("netmap:eth1/q")


def test_backend_shape() -> None:
    assert BACKEND.name == "netmap"
    assert BACKEND.user_memory is False
    BACKEND.check_name("eth1^")
    with pytest.raises(ValueError, match="eth1-x"):
        BACKEND.check_name("eth1-x")
