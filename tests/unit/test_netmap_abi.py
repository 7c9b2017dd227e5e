"""The netmap backend's requests, byte by byte, against the ABI facts (shared/netmap-abi.md);
the build-time layout checks of nmb_netmap.h; and the words a user gets when netmap fails.

Offsets and values below are written from the ABI facts, not from nmbridge's headers.
"""

from __future__ import annotations

import errno
import os
import shutil
import struct
import subprocess
from pathlib import Path

import pytest

from nmbridge.backends import PortSet, PortSpec
from nmbridge.backends.netmap import NetmapPort, encode_request, explain, mapped_regions, request_size
from nmbridge.backends.netmap_backend import device_problem, open_port
from nmbridge.errors import PortError

INCLUDE = Path(__file__).resolve().parents[2] / "nmbridge" / "include"
GCC = shutil.which("gcc")


def u16(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<H", b, off)[0])


def u32(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<I", b, off)[0])


def u64(b: bytes, off: int) -> int:
    return int(struct.unpack_from("<Q", b, off)[0])


# ---- the request ---------------------------------------------------------------------------

def test_header_bytes() -> None:
    hdr, reg, reg_addr = encode_request("vale0:port_1", 4, 3, 0x20800, 7)
    assert len(hdr) == 88 and len(reg) == 56
    assert u16(hdr, 0) == 14  # nr_version = NETMAP_API
    assert u16(hdr, 2) == 1  # nr_reqtype = NETMAP_REQ_REGISTER
    assert u32(hdr, 4) == 0  # nr_reserved
    assert hdr[8:8 + 64] == b"vale0:port_1".ljust(64, b"\0")  # nr_name, NUL-padded
    assert u64(hdr, 72) == 0  # nr_options: none
    assert u64(hdr, 80) == reg_addr != 0  # nr_body -> the register request


def test_register_bytes() -> None:
    _, reg, _ = encode_request("eth1", 8, 0x0123, 0x0000_0001_0002_4800, 0xBEEF)
    assert u64(reg, 0) == 0 and u64(reg, 8) == 0  # nr_offset, nr_memsize: outputs
    assert reg[16:32] == bytes(16)  # slots, rings, host rings: 0 = kernel defaults
    assert u16(reg, 32) == 0xBEEF  # nr_mem_id
    assert u16(reg, 34) == 0x0123  # nr_ringid
    assert u32(reg, 36) == 8  # nr_mode (NR_REG_ONE_SW)
    assert u32(reg, 40) == 0  # nr_extra_bufs
    assert reg[44:48] == bytes(4)  # padding before the u64
    assert u64(reg, 48) == 0x0000_0001_0002_4800  # nr_flags, all 64 bits


@pytest.mark.parametrize(("mode", "ringid"), [(1, 0), (2, 0), (3, 0), (4, 4094), (8, 1)])
def test_register_modes(mode: int, ringid: int) -> None:
    _, reg, _ = encode_request("x", mode, ringid)
    assert (u32(reg, 36), u16(reg, 34)) == (mode, ringid)
    assert reg[:32] + reg[40:] == bytes(32 + 16)


def test_name_limits() -> None:
    hdr, _, _ = encode_request("p" * 63, 1)
    assert hdr[8:71] == b"p" * 63 and hdr[71] == 0
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        encode_request("p" * 64, 1)
    with pytest.raises(ValueError, match="1 to 63 bytes"):
        encode_request("", 1)


def test_request_is_header_then_body() -> None:
    assert request_size() == 88 + 56


def test_ioctl_numbers_follow_linux_encoding() -> None:
    def ioc(direction: int, nr: int, size: int) -> int:
        return (direction << 30) | (size << 16) | (ord("i") << 8) | nr

    text = (INCLUDE / "nmb_netmap.h").read_text()
    assert f"#define NIOCCTRL {ioc(3, 151, 88):#x}UL" in text
    assert f"#define NIOCTXSYNC {ioc(0, 148, 0):#x}UL" in text
    assert f"#define NIOCRXSYNC {ioc(0, 149, 0):#x}UL" in text


# ---- build-time layout checks ----------------------------------------------------------------

def compile_c(tmp_path: Path, source: str, include: Path = INCLUDE) -> subprocess.CompletedProcess[str]:
    assert GCC is not None
    c = tmp_path / "probe.c"
    c.write_text(source)
    return subprocess.run([GCC, "-std=gnu11", "-Wall", "-Werror", "-fsyntax-only", f"-I{include}", str(c)],
                          capture_output=True, text=True, check=False)


@pytest.mark.skipif(GCC is None, reason="gcc is not installed")
def test_headers_compile(tmp_path: Path) -> None:
    source = '#include "nmb_netmap.h"\n#include "nmb_nmport.h"\nint main(void) { return 0; }\n'
    r = compile_c(tmp_path, source)
    assert r.returncode == 0, r.stderr


@pytest.mark.skipif(GCC is None, reason="gcc is not installed")
@pytest.mark.parametrize(
    ("original", "tweaked", "complaint"),
    [
        ("    uint16_t nr_ringid;\n", "    uint32_t nr_ringid;\n", "nmreq_register"),
        ("    char nr_name[NETMAP_REQ_IFNAMSIZ];\n", "    char nr_name[NM_IFNAMSIZ];\n", "nmreq_header"),
        ("    const uint32_t ni_host_rx_rings;\n", "", "netmap_if"),
        ("    uint16_t len;\n", "    uint32_t len;\n", "netmap_slot"),
        ("__attribute__((__aligned__(NM_CACHE_ALIGN)))", "", "netmap_ring"),
    ],
)
def test_wrong_layout_fails_the_build(tmp_path: Path, original: str, tweaked: str, complaint: str) -> None:
    text = (INCLUDE / "nmb_netmap.h").read_text()
    assert text.count(original) == 1, f"the header no longer contains {original!r}"
    (tmp_path / "nmb_netmap.h").write_text(text.replace(original, tweaked))
    r = compile_c(tmp_path, '#include "nmb_netmap.h"\nint main(void) { return 0; }\n', include=tmp_path)
    assert r.returncode != 0
    assert "static assert" in r.stderr.lower() or "_Static_assert" in r.stderr
    assert complaint in r.stderr


# ---- errors in words -----------------------------------------------------------------------

def test_open_errors_in_words() -> None:
    missing = explain("open", errno.ENOENT)
    assert "netmap kernel module is not loaded" in missing and "modprobe netmap" in missing
    assert "/dev/netmap" in missing
    assert "permission denied on /dev/netmap" in explain("open", errno.EACCES)
    assert "permission denied" in explain("open", errno.EPERM)


@pytest.mark.parametrize(
    ("err", "version", "words"),
    [
        (errno.ENOENT, 14, "no such interface 'eth9'"),
        (errno.ENXIO, 14, "no such interface 'eth9'"),
        (errno.EBUSY, 14, "its rings are in use by another netmap program"),
        (errno.EINVAL, 13, "nmbridge speaks NETMAP_API 14, the kernel answered nr_version 13"),
        (errno.EINVAL, 14, "NETMAP_API 14"),
        (errno.EPERM, 14, "CAP_NET_ADMIN"),
        (errno.EACCES, 14, "permission denied registering 'eth9'"),
        (errno.ENOMEM, 14, "no netmap memory"),
        (errno.ENOTTY, 14, "not a netmap device"),
        (errno.EIO, 14, "cannot register 'eth9': Input/output error"),
    ],
)
def test_register_errors_in_words(err: int, version: int, words: str) -> None:
    msg = explain("register", err, "eth9", version)
    assert words in msg
    assert "\n" not in msg


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@pytest.mark.parametrize(
    ("device", "words"),
    [("/nonexistent/netmap", "netmap kernel module is not loaded (/nonexistent/netmap is missing)"),
     ("/dev/null", "/dev/null does not understand NIOCCTRL")],
)
def test_failed_open_leaves_nothing(device: str, words: str) -> None:
    fds, regions = open_fds(), mapped_regions()
    for _ in range(3):
        with pytest.raises(PortError) as e:
            open_port("netmap:t{0", device=device)
        assert str(e.value).startswith("netmap:t{0: ")
        assert words in str(e.value)
    assert open_fds() == fds
    assert mapped_regions() == regions


def test_bad_name_is_a_port_error() -> None:
    with pytest.raises(PortError, match=r"netmap port 'netmap:eth1/q': unknown flag 'q'"):
        open_port("netmap:eth1/q")


def test_closed_port_object_is_inert() -> None:
    with pytest.raises(PortError):
        NetmapPort("netmap:x", "x", mode=1, device="/nonexistent/netmap")


def test_device_problem_missing(tmp_path: Path) -> None:
    msg = device_problem(str(tmp_path / "netmap"))
    assert msg is not None
    assert "netmap kernel module is not loaded" in msg and "modprobe netmap" in msg


@pytest.mark.skipif(os.geteuid() == 0, reason="root may open any device node")
def test_device_problem_permission(tmp_path: Path) -> None:
    dev = tmp_path / "netmap"
    dev.write_bytes(b"")
    dev.chmod(0o400)
    msg = device_problem(str(dev))
    assert msg is not None and "permission denied" in msg and "group" in msg


@pytest.mark.skipif(os.path.exists("/dev/netmap"), reason="this machine has /dev/netmap")
def test_portset_says_the_module_is_not_loaded() -> None:
    with pytest.raises(PortError) as e:
        PortSet().open([PortSpec("netmap", "eth0"), PortSpec("netmap", "eth0^")])
    msg = str(e.value)
    assert msg.startswith("netmap:eth0: the netmap kernel module is not loaded")
    assert "modprobe netmap" in msg and "\n" not in msg


@pytest.mark.skipif(os.path.exists("/dev/netmap"), reason="this machine has /dev/netmap")
def test_run_without_the_module_exits_with_one_line(tmp_path: Path) -> None:
    import sys

    import nmbridge

    cfg = tmp_path / "nm.toml"
    cfg.write_text('[[pair]]\nports = ["netmap:eth0", "netmap:eth0^"]\n')
    env = dict(os.environ, PYTHONPATH=str(Path(nmbridge.__file__).parents[1]))
    done = subprocess.run([sys.executable, "-m", "nmbridge", "--log-format", "json", "run", "-c", str(cfg)],
                          capture_output=True, text=True, check=False, timeout=60, env=env)
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert "netmap:eth0" in lines[0] and "the netmap kernel module is not loaded" in lines[0]
