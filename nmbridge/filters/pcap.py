"""libpcap through ctypes: compile tcpdump expressions to classic BPF; run libpcap's own filter.

libpcap is loaded the first time a pcap rule is compiled, never at import, so it is needed
only by configurations that use pcap rules.  Debian ships only the runtime library
(``libpcap.so.0.8``, package ``libpcap0.8``); no development symlink is required.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import threading

DLT_EN10MB = 1
SNAPLEN = 65535
PCAP_NETMASK_UNKNOWN = 0xFFFFFFFF


class PcapError(Exception):
    """libpcap is missing, or refused an expression (the message is libpcap's)."""


class _BpfProgram(ctypes.Structure):
    _fields_ = [("bf_len", ctypes.c_uint), ("bf_insns", ctypes.c_void_p)]


class _Timeval(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_usec", ctypes.c_long)]


class _PktHdr(ctypes.Structure):
    _fields_ = [("ts", _Timeval), ("caplen", ctypes.c_uint32), ("len", ctypes.c_uint32)]


_lock = threading.Lock()  # pcap_compile was not thread-safe before libpcap 1.8; be careful
_lib: ctypes.CDLL | None = None
_dead: int | None = None


def _load() -> ctypes.CDLL:
    global _lib, _dead
    if _lib is not None:
        return _lib
    names = [n for n in (ctypes.util.find_library("pcap"), "libpcap.so.0.8", "libpcap.so.1") if n]
    errors = []
    lib = None
    for name in names:
        try:
            lib = ctypes.CDLL(name)
            break
        except OSError as e:
            errors.append(str(e))
    if lib is None:
        raise PcapError("pcap rules need libpcap (Debian/Ubuntu: apt install libpcap0.8): "
                        + "; ".join(errors or ["not found"]))
    lib.pcap_open_dead.restype = ctypes.c_void_p
    lib.pcap_open_dead.argtypes = [ctypes.c_int, ctypes.c_int]
    lib.pcap_compile.restype = ctypes.c_int
    lib.pcap_compile.argtypes = [ctypes.c_void_p, ctypes.POINTER(_BpfProgram), ctypes.c_char_p,
                                 ctypes.c_int, ctypes.c_uint32]
    lib.pcap_geterr.restype = ctypes.c_char_p
    lib.pcap_geterr.argtypes = [ctypes.c_void_p]
    lib.pcap_freecode.restype = None
    lib.pcap_freecode.argtypes = [ctypes.POINTER(_BpfProgram)]
    lib.pcap_offline_filter.restype = ctypes.c_int
    lib.pcap_offline_filter.argtypes = [ctypes.POINTER(_BpfProgram), ctypes.POINTER(_PktHdr),
                                        ctypes.c_char_p]
    lib.pcap_lib_version.restype = ctypes.c_char_p
    lib.pcap_lib_version.argtypes = []
    dead = lib.pcap_open_dead(DLT_EN10MB, SNAPLEN)
    if not dead:
        raise PcapError("pcap_open_dead failed")
    _dead = dead
    _lib = lib
    return lib


def version() -> str:
    """libpcap's version string (loads libpcap)."""
    return (_load().pcap_lib_version() or b"").decode(errors="replace")


def compile_expr(expr: str) -> bytes:
    """Compile a tcpdump expression for Ethernet frames (optimised, netmask unknown): the
    program as libpcap's ``struct bpf_insn`` array (8 native-endian bytes per instruction)."""
    try:
        raw = expr.encode()
    except UnicodeEncodeError as e:
        raise PcapError(f"not a valid expression: {e}") from None
    if b"\0" in raw:
        raise PcapError("the expression contains a NUL character")
    with _lock:
        lib = _load()
        prog = _BpfProgram()
        if lib.pcap_compile(_dead, ctypes.byref(prog), raw, 1, PCAP_NETMASK_UNKNOWN) != 0:
            msg = (lib.pcap_geterr(_dead) or b"cannot compile").decode(errors="replace")
            raise PcapError(msg)
        try:
            return ctypes.string_at(prog.bf_insns, prog.bf_len * 8) if prog.bf_len else b""
        finally:
            lib.pcap_freecode(ctypes.byref(prog))


def offline_filter(insns: bytes, frame: bytes) -> int:
    """libpcap's ``pcap_offline_filter`` on `frame` (caplen = len = its size): the
    program's return value (0: no match)."""
    lib = _load()
    buf = ctypes.create_string_buffer(insns, len(insns) or 1)
    prog = _BpfProgram(len(insns) // 8, ctypes.cast(buf, ctypes.c_void_p))
    hdr = _PktHdr(_Timeval(0, 0), len(frame), len(frame))
    return int(lib.pcap_offline_filter(ctypes.byref(prog), ctypes.byref(hdr), frame))


def offline_filter_address() -> int:
    """The C address of ``pcap_offline_filter`` (for a GIL-free benchmark loop)."""
    addr = ctypes.cast(_load().pcap_offline_filter, ctypes.c_void_p).value
    assert addr is not None
    return addr
