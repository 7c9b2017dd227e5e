# cython: language_level=3, boundscheck=False, wraparound=False, cdivision=True
"""The C side of filters: a compiled program (nmb_filter_prog.h) owned by a Python object.

:class:`Program` is built by :mod:`nmbridge.filters.compiler` from normalised rules (plain
dicts, see ``Program.__init__``); its ``address`` is the ``struct nmb_filter *`` fastfwd calls.
The C memory is freed when the Program is garbage collected; fastfwd keeps a reference to the
installed filter, so that cannot happen while it runs.
"""

from libc.stdint cimport int64_t, uint8_t, uint16_t, uint32_t, uint64_t
from libc.string cimport memcpy, memset


cdef extern from "<time.h>" nogil:
    ctypedef long time_t
    struct timespec:
        time_t tv_sec
        long tv_nsec
    enum:
        CLOCK_MONOTONIC
    int clock_gettime(int clk, timespec *ts)

cdef extern from "<sys/time.h>" nogil:
    struct timeval:
        long tv_sec
        long tv_usec


cdef extern from "nmb_filter_prog.h" nogil:
    enum:
        NMB_PASS
        NMB_DROP
        NMB_F_ETHERTYPE
        NMB_F_VLAN
        NMB_F_VLAN_ID
        NMB_F_VLAN_PCP
        NMB_F_VLAN_TPID
        NMB_F_INNER_VLAN_ID
        NMB_F_INNER_VLAN_PCP
        NMB_F_DST_MAC
        NMB_F_SRC_MAC
        NMB_F_SRC_IP
        NMB_F_DST_IP
        NMB_F_IP_PROTO
        NMB_F_SRC_PORT
        NMB_F_DST_PORT
        NMB_F_BPF

    struct nmb_filter:
        int (*run)(nmb_filter *self, const uint8_t *frame, uint32_t len) noexcept nogil

    struct nmb_bpf_insn:
        uint16_t code
        uint8_t jt
        uint8_t jf
        uint32_t k

    struct nmb_bpf_op:
        pass

    struct nmb_rule:
        uint32_t fields
        uint8_t action
        uint8_t vlan
        uint8_t vlan_pcp, inner_vlan_pcp
        uint16_t ethertype, vlan_id, vlan_tpid, inner_vlan_id
        uint8_t ip_proto
        uint8_t src_ip_v6, dst_ip_v6
        uint8_t dst_mac[6]
        uint8_t dst_mac_mask[6]
        uint8_t src_mac[6]
        uint8_t src_mac_mask[6]
        uint8_t src_ip[16]
        uint8_t src_ip_mask[16]
        uint8_t dst_ip[16]
        uint8_t dst_ip_mask[16]
        uint16_t src_port_lo, src_port_hi, dst_port_lo, dst_port_hi
        uint32_t bpf_off, bpf_len

    struct nmb_filter_prog:
        nmb_filter hdr
        uint32_t nrules
        uint32_t nops
        uint8_t default_action
        nmb_rule *rules
        nmb_bpf_op *ops
        uint64_t *hits

    nmb_filter_prog *nmb_filter_prog_alloc(uint32_t nrules, uint32_t nops)
    int nmb_filter_prog_finish(nmb_filter_prog *p)
    void nmb_filter_prog_free(nmb_filter_prog *p)
    int nmb_filter_decide(const nmb_filter_prog *p, const uint8_t *frame, uint32_t len,
                          int *action)
    int nmb_filter_run(nmb_filter *self, const uint8_t *frame, uint32_t len)
    int nmb_bpf_load(const nmb_bpf_insn *insns, uint32_t n, nmb_bpf_op *out,
                     char *err, size_t errlen)
    uint32_t nmb_bpf_run(const nmb_bpf_op *ops, const uint8_t *frame, uint32_t len)
    int nmb_bpf_bounded
    enum:
        NMB_BPF_MAX_INSNS


cdef extern from "<stdlib.h>" nogil:
    void *malloc(size_t n)
    void free(void *p)


_FLAGS = {
    "ethertype": NMB_F_ETHERTYPE, "vlan": NMB_F_VLAN, "vlan_id": NMB_F_VLAN_ID,
    "vlan_pcp": NMB_F_VLAN_PCP, "vlan_tpid": NMB_F_VLAN_TPID,
    "inner_vlan_id": NMB_F_INNER_VLAN_ID, "inner_vlan_pcp": NMB_F_INNER_VLAN_PCP,
    "dst_mac": NMB_F_DST_MAC, "src_mac": NMB_F_SRC_MAC, "src_ip": NMB_F_SRC_IP,
    "dst_ip": NMB_F_DST_IP, "ip_proto": NMB_F_IP_PROTO, "src_port": NMB_F_SRC_PORT,
    "dst_port": NMB_F_DST_PORT, "bpf": NMB_F_BPF,
}


class BPFError(ValueError):
    """A classic-BPF program the interpreter refuses (found at load time)."""


cdef uint32_t insn_count(bytes insns) except? 0:
    if len(insns) % 8:
        raise BPFError(f"a BPF program is a multiple of 8 bytes, not {len(insns)}")
    return <uint32_t>(len(insns) // 8)


cdef int load_bpf(bytes insns, nmb_bpf_op *out) except -1:
    cdef char err[160]
    cdef uint32_t n = insn_count(insns)
    cdef const char *raw = insns
    cdef nmb_bpf_insn *tmp = <nmb_bpf_insn *>malloc(max(n, 1) * sizeof(nmb_bpf_insn))
    cdef int rc
    if tmp == NULL:
        raise MemoryError()
    memcpy(tmp, raw, n * sizeof(nmb_bpf_insn))
    rc = nmb_bpf_load(tmp, n, out, err, sizeof(err))
    free(tmp)
    if rc != 0:
        raise BPFError(err.decode(errors="replace"))
    return 0


def decide_address() -> int:
    """The address of ``nmb_filter_decide`` (first-match rule index, counts nothing): the
    capture tap calls it on a Program's ``address`` to name the deciding rule."""
    return <size_t>&nmb_filter_decide


def check_bpf(bytes insns) -> None:
    """Raise BPFError unless the interpreter accepts `insns` (libpcap's struct bpf_insn array,
    8 native-endian bytes each)."""
    cdef uint32_t n = insn_count(insns)
    cdef nmb_bpf_op *ops = <nmb_bpf_op *>malloc(max(n, 1) * sizeof(nmb_bpf_op))
    if ops == NULL:
        raise MemoryError()
    try:
        load_bpf(insns, ops)
    finally:
        free(ops)


def run_bpf(bytes insns, const uint8_t[:] frame) -> int:
    """Load `insns` and run them once on `frame` (for tests): the program's return value."""
    return run_bpf_bounded(insns, frame)[0]


def run_bpf_bounded(bytes insns, const uint8_t[:] frame) -> tuple:
    """Like run_bpf, and whether the run was cut off by the backward-jump bound (then the
    verdict is 0; libpcap's unbounded runner would never return on that frame)."""
    global nmb_bpf_bounded
    cdef uint32_t n = insn_count(insns)
    cdef nmb_bpf_op *ops = <nmb_bpf_op *>malloc(max(n, 1) * sizeof(nmb_bpf_op))
    cdef uint32_t r
    cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
    if ops == NULL:
        raise MemoryError()
    try:
        load_bpf(insns, ops)
        nmb_bpf_bounded = 0
        r = nmb_bpf_run(ops, p, <uint32_t>frame.shape[0])
    finally:
        free(ops)
    return r, bool(nmb_bpf_bounded)


cdef void put_bytes(uint8_t *dst, object src, size_t n) except *:
    cdef bytes b = bytes(src)
    if len(b) != <Py_ssize_t>n:
        raise ValueError(f"expected {n} bytes, got {len(b)}")
    memcpy(dst, <const char *>b, n)


cdef inline uint64_t now_ns() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return <uint64_t>ts.tv_sec * 1000000000 + <uint64_t>ts.tv_nsec


cdef class Program:
    """A compiled filter in C memory.

    ``rules``: one dict per rule, in order, with ``action`` ("pass"/"drop") and any of
    ``ethertype``, ``vlan`` (bool), ``vlan_id``, ``vlan_pcp``, ``vlan_tpid``,
    ``inner_vlan_id``, ``inner_vlan_pcp`` (ints); ``dst_mac``/``src_mac``: (value, mask), 6
    bytes each; ``src_ip``/``dst_ip``: (is_v6, value, mask), 16 bytes each (IPv4 in the first
    4); ``ip_proto`` (int); ``src_port``/``dst_port``: (lo, hi); ``bpf``: libpcap's
    instructions as bytes.  Raises BPFError (with the rule index) for a program the
    interpreter refuses.
    """

    cdef nmb_filter_prog *c
    cdef readonly int nrules

    def __cinit__(self, list rules not None, str default="pass"):
        cdef uint32_t nops = 0, off = 0, i
        cdef nmb_rule *r
        for rule in rules:
            if "bpf" in rule:
                nops += insn_count(rule["bpf"])
        if len(rules) > 100000 or nops > 16 * <uint32_t>NMB_BPF_MAX_INSNS:
            raise ValueError("filter too large")
        self.c = nmb_filter_prog_alloc(len(rules), nops)
        if self.c == NULL:
            raise MemoryError()
        self.nrules = len(rules)
        self.c.default_action = NMB_DROP if default == "drop" else NMB_PASS
        for i in range(len(rules)):
            rule = rules[i]
            r = &self.c.rules[i]
            r.action = NMB_DROP if rule["action"] == "drop" else NMB_PASS
            for key in rule:
                if key != "action":
                    r.fields |= _FLAGS[key]
            if "ethertype" in rule:
                r.ethertype = rule["ethertype"]
            if "vlan" in rule:
                r.vlan = 1 if rule["vlan"] else 0
            if "vlan_id" in rule:
                r.vlan_id = rule["vlan_id"]
            if "vlan_pcp" in rule:
                r.vlan_pcp = rule["vlan_pcp"]
            if "vlan_tpid" in rule:
                r.vlan_tpid = rule["vlan_tpid"]
            if "inner_vlan_id" in rule:
                r.inner_vlan_id = rule["inner_vlan_id"]
            if "inner_vlan_pcp" in rule:
                r.inner_vlan_pcp = rule["inner_vlan_pcp"]
            if "dst_mac" in rule:
                put_bytes(r.dst_mac, rule["dst_mac"][0], 6)
                put_bytes(r.dst_mac_mask, rule["dst_mac"][1], 6)
            if "src_mac" in rule:
                put_bytes(r.src_mac, rule["src_mac"][0], 6)
                put_bytes(r.src_mac_mask, rule["src_mac"][1], 6)
            if "src_ip" in rule:
                r.src_ip_v6 = 1 if rule["src_ip"][0] else 0
                put_bytes(r.src_ip, rule["src_ip"][1], 16)
                put_bytes(r.src_ip_mask, rule["src_ip"][2], 16)
            if "dst_ip" in rule:
                r.dst_ip_v6 = 1 if rule["dst_ip"][0] else 0
                put_bytes(r.dst_ip, rule["dst_ip"][1], 16)
                put_bytes(r.dst_ip_mask, rule["dst_ip"][2], 16)
            if "ip_proto" in rule:
                r.ip_proto = rule["ip_proto"]
            if "src_port" in rule:
                r.src_port_lo, r.src_port_hi = rule["src_port"]
            if "dst_port" in rule:
                r.dst_port_lo, r.dst_port_hi = rule["dst_port"]
            if "bpf" in rule:
                r.bpf_off = off
                r.bpf_len = insn_count(rule["bpf"])
                try:
                    load_bpf(rule["bpf"], self.c.ops + off)
                except BPFError as e:
                    raise BPFError(f"rule {i}: {e}") from None
                off += r.bpf_len
        if nmb_filter_prog_finish(self.c) != 0:
            raise MemoryError()

    def __dealloc__(self):
        if self.c != NULL:
            nmb_filter_prog_free(self.c)
            self.c = NULL

    @property
    def address(self) -> int:
        """The ``struct nmb_filter *`` to give fastfwd."""
        return <size_t>self.c

    def evaluate(self, const uint8_t[:] frame) -> tuple:
        """(verdict "pass"/"drop", index of the deciding rule or -1 for the default), by the
        same C code as the fast path; counts nothing."""
        cdef int action
        cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
        cdef int i = nmb_filter_decide(self.c, p, <uint32_t>frame.shape[0], &action)
        return ("pass" if action == NMB_PASS else "drop", i)

    def run(self, const uint8_t[:] frame) -> str:
        """The verdict of the fast path's own entry point (``hdr.run``, as fastfwd calls it;
        it counts the deciding rule's hit), for tests."""
        cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
        cdef nmb_filter *f = &self.c.hdr
        return "pass" if f.run(f, p, <uint32_t>frame.shape[0]) == NMB_PASS else "drop"

    def hits(self) -> list:
        """Frames decided by each rule (fast path only), then by the default action."""
        return [self.c.hits[i] for i in range(self.c.nrules + 1)]

    def bench(self, const uint8_t[:] frame, uint64_t iterations) -> int:
        """Run the fast-path entry point `iterations` times on `frame` without the GIL;
        returns the elapsed nanoseconds (and counts the hits, as the fast path does)."""
        cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
        cdef uint32_t n = <uint32_t>frame.shape[0]
        cdef uint64_t t0, t1, i
        cdef nmb_filter *f = &self.c.hdr
        cdef int acc = 0
        with nogil:
            t0 = now_ns()
            for i in range(iterations):
                acc += f.run(f, p, n)
            t1 = now_ns()
        return <int64_t>(t1 - t0) + (0 * acc)


cdef struct pcap_pkthdr:
    timeval ts
    uint32_t caplen
    uint32_t len

cdef struct bpf_program:
    uint32_t bf_len
    void *bf_insns

ctypedef int (*offline_filter_fn)(const bpf_program *prog, const pcap_pkthdr *h,
                                  const uint8_t *pkt) noexcept nogil


def bench_offline_filter(size_t fn, bytes insns, const uint8_t[:] frame,
                         uint64_t iterations) -> int:
    """Call libpcap's ``pcap_offline_filter`` (its address `fn`) `iterations` times on
    `frame` from C without the GIL; returns the elapsed nanoseconds."""
    cdef bpf_program prog
    cdef pcap_pkthdr h
    cdef offline_filter_fn f = <offline_filter_fn>fn
    cdef const uint8_t *p = &frame[0] if frame.shape[0] else <const uint8_t *>b""
    cdef uint64_t t0, t1, i
    cdef int acc = 0
    prog.bf_len = insn_count(insns)
    prog.bf_insns = <void *><const char *>insns
    memset(&h, 0, sizeof(h))
    h.caplen = h.len = <uint32_t>frame.shape[0]
    with nogil:
        t0 = now_ns()
        for i in range(iterations):
            acc += f(&prog, &h, p)
        t1 = now_ns()
    return <int64_t>(t1 - t0) + (0 * acc)
