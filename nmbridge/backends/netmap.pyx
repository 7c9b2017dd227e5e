# cython: language_level=3
"""netmap: and vale ports: the kernel's rings through /dev/netmap.

:class:`NetmapPort` registers one port (NIOCCTRL + NETMAP_REQ_REGISTER) and shares the
mapping of its memory region with every other port of this process in the same region
(``nr_mem_id``), so forwarding between them is the zero-copy swap.  The name is parsed by
:mod:`nmbridge.backends.netmap_backend`; this module takes the kernel's fields.

``send``/``recv``/``generate``/``sink`` drive a port from a test or a benchmark (the master
end of a pipe, say); fastfwd never uses them.
"""

cimport cython
from libc.stdint cimport int64_t, uint16_t, uint32_t, uint64_t
from libc.stdlib cimport free, malloc

from nmbridge.netmap cimport NS_MOREFRAG, netmap_ring, nmb_buf, nmb_ring_next, nmb_rxring
from nmbridge.port cimport Port, nmb_port

import os

from nmbridge.errors import PortError


cdef extern from "nmb_nmport.h" nogil:
    enum:
        NMB_NMPORT_ERR_OPEN
        NMB_NMPORT_ERR_REGISTER

    struct nmb_nmport_info:
        uint64_t memsize
        uint64_t offset
        uint32_t mem_id
        uint32_t region_users
        uint32_t ni_flags
        uint32_t ni_tx_rings, ni_rx_rings, ni_host_tx_rings, ni_host_rx_rings
        uint32_t reply_host_tx_rings, reply_host_rx_rings
        uint32_t nr_mode
        uint32_t nr_ringid
        uint64_t nr_flags

    struct nmb_nmport_req:
        pass

    int nmb_nmport_encode(nmb_nmport_req *req, const char *nr_name, uint32_t mode, uint16_t ringid,
                          uint64_t flags, uint16_t mem_id)
    nmb_port *nmb_nmport_open(const char *dev, const char *nr_name, uint32_t mode, uint16_t ringid,
                              uint64_t flags, uint16_t mem_id, char *err, size_t errlen)
    void nmb_nmport_close(nmb_port *p)
    void nmb_nmport_get_info(nmb_port *p, nmb_nmport_info *out)
    uint32_t nmb_nmport_regions()
    void nmb_nmport_strerror(int what, int err, const char *dev, const char *nr_name,
                             unsigned kernel_version, char *out, size_t outlen)
    long nmb_nmport_put(nmb_port *p, const char *data, const uint32_t *lens, uint32_t n)
    int64_t nmb_nmport_generate(nmb_port *p, uint32_t frame_len, uint64_t count, int *stop)
    int64_t nmb_nmport_sink(nmb_port *p, uint64_t count, int *stop, uint64_t *nbytes)


DEVICE = "/dev/netmap"


def encode_request(str nr_name, uint32_t mode, uint16_t ringid=0, uint64_t flags=0,
                   uint16_t mem_id=0) -> tuple:
    """The NIOCCTRL argument as this module sends it: ``(header, register, register_address)``,
    the bytes of ``struct nmreq_header`` and ``struct nmreq_register`` and where the register
    struct lived (``nr_body`` must hold that address)."""
    cdef nmb_nmport_req req
    if nmb_nmport_encode(&req, nr_name.encode(), mode, ringid, flags, mem_id) != 0:
        raise ValueError(f"{nr_name!r}: nr_name must be 1 to 63 bytes")
    cdef const char *p = <const char *>&req
    return p[:88], p[88:88 + 56], <size_t>(p + 88)


def request_size() -> int:
    return sizeof(nmb_nmport_req)


def explain(str what, int err, str nr_name="", int kernel_version=14, str dev=DEVICE) -> str:
    """The words a user gets for errno `err` from ``open`` or ``register`` (for tests)."""
    cdef char out[256]
    nmb_nmport_strerror(NMB_NMPORT_ERR_OPEN if what == "open" else NMB_NMPORT_ERR_REGISTER, err,
                        dev.encode(), nr_name.encode(), kernel_version, out, sizeof(out))
    return out.decode(errors="replace")


def mapped_regions() -> int:
    """Memory regions this process has mapped now (each one shared by its ports)."""
    return nmb_nmport_regions()


@cython.final
cdef class NetmapPort(Port):
    """A port registered with the kernel's netmap."""

    cdef int _stop

    def __init__(self, str spec, str nr_name, *, uint32_t mode, uint16_t ringid=0, uint64_t flags=0,
                 uint16_t mem_id=0, str device=DEVICE):
        cdef char err[256]
        cdef bytes name_b = nr_name.encode()
        cdef bytes dev_b = device.encode()
        cdef const char *c_name = name_b
        cdef const char *c_dev = dev_b
        if self.c != NULL:
            raise PortError(f"{spec}: already open")
        with nogil:
            self.c = nmb_nmport_open(c_dev, c_name, mode, ringid, flags, mem_id, err, sizeof(err))
        if self.c == NULL:
            raise PortError(f"{spec}: {err.decode(errors='replace')}")
        self.spec = spec
        self.backend = "netmap"
        self.region_name = f"netmap:mem{self.mem_id}"

    cdef void _release(self) noexcept:
        nmb_nmport_close(self.c)

    def __dealloc__(self):
        if self.c != NULL:
            nmb_nmport_close(self.c)
            self.c = NULL

    cdef nmb_nmport_info _info(self):
        cdef nmb_nmport_info i
        nmb_nmport_get_info(self.c, &i)
        return i

    @property
    def mem_id(self) -> int:
        self._check_open()
        return self._info().mem_id

    def registration(self) -> dict:
        """What the kernel answered: region, ring counts (netmap_if and reply), mode and flags."""
        self._check_open()
        cdef nmb_nmport_info i = self._info()
        return {
            "mem_id": i.mem_id, "memsize": i.memsize, "offset": i.offset,
            "region_users": i.region_users, "private_memory": bool(i.ni_flags & 1),
            "tx_rings": i.ni_tx_rings, "rx_rings": i.ni_rx_rings,
            "host_tx_rings": i.ni_host_tx_rings, "host_rx_rings": i.ni_host_rx_rings,
            "reply_host_tx_rings": i.reply_host_tx_rings,
            "reply_host_rx_rings": i.reply_host_rx_rings,
            "nr_mode": i.nr_mode, "nr_ringid": i.nr_ringid, "nr_flags": i.nr_flags,
            "tx_range": (self.c.tx_first, self.c.tx_last),
            "rx_range": (self.c.rx_first, self.c.rx_last),
        }

    def info(self) -> dict:
        out = Port.info(self)
        out["mem_id"] = self.mem_id
        return out

    # ---- test and benchmark drivers --------------------------------------------------

    def rxsync(self) -> None:
        self._check_open()
        if self.c.rxsync(self.c) != 0:
            raise PortError(f"{self.spec}: {self.c.error.decode(errors='replace')}")

    def txsync(self) -> None:
        self._check_open()
        if self.c.txsync(self.c) != 0:
            raise PortError(f"{self.spec}: {self.c.error.decode(errors='replace')}")

    def send(self, frames) -> int:
        """Place as many of `frames` (bytes, each fitting one buffer) as the TX rings have room
        for, then txsync; returns how many were placed."""
        self._check_open()
        cdef list fl = [bytes(f) for f in frames]
        cdef uint32_t n = len(fl)
        if n == 0:
            return 0
        cdef bytes data = b"".join(fl)
        cdef uint32_t *lens = <uint32_t *>malloc(n * sizeof(uint32_t))
        cdef long rc
        if lens == NULL:
            raise MemoryError()
        try:
            for k in range(n):
                lens[k] = len(fl[k])
            rc = nmb_nmport_put(self.c, data, lens, n)
        finally:
            free(lens)
        if rc < 0:
            raise ValueError(f"{self.spec}: a frame does not fit one netmap buffer")
        self.txsync()
        return rc

    def recv(self, *, bint sync=True) -> list:
        """rxsync (unless `sync` is false), then take every frame waiting in the RX rings
        (NS_MOREFRAG chains joined) and hand the slots back."""
        self._check_open()
        if sync:
            self.rxsync()
        cdef uint32_t ri, h
        cdef netmap_ring *ring
        out = []
        parts = []
        for ri in range(self.c.rx_first, self.c.rx_last):
            ring = nmb_rxring(self.c.nifp, ri)
            h = ring.head
            while h != ring.tail:
                parts.append(nmb_buf(ring, ring.slot[h].buf_idx)[:ring.slot[h].len])
                if not (ring.slot[h].flags & NS_MOREFRAG):
                    out.append(b"".join(parts))
                    parts = []
                h = nmb_ring_next(ring, h)
            ring.head = ring.cur = h
        return out

    def generate(self, int frame_len=64, count=0) -> int:
        """C-level generator: `count` frames (0 = until :meth:`stop_driver`) of `frame_len`
        bytes, frame k carrying k at byte 14. Blocks without the GIL; returns frames sent."""
        self._check_open()
        cdef uint64_t c_count = count
        cdef int64_t rc
        self._stop = 0
        with nogil:
            rc = nmb_nmport_generate(self.c, frame_len, c_count, &self._stop)
        if rc < 0:
            raise PortError(f"{self.spec}: generator failed: {self._why(rc)}")
        return rc

    def sink(self, count=0) -> tuple:
        """C-level sink: receive and release frames until `count` (0 = until
        :meth:`stop_driver`); returns ``(frames, bytes)``."""
        self._check_open()
        cdef uint64_t c_count = count, nbytes = 0
        cdef int64_t rc
        self._stop = 0
        with nogil:
            rc = nmb_nmport_sink(self.c, c_count, &self._stop, &nbytes)
        if rc < 0:
            raise PortError(f"{self.spec}: sink failed: {self._why(rc)}")
        return rc, nbytes

    def _why(self, int64_t rc):
        if self.c.error[0]:
            return self.c.error.decode(errors="replace")
        return os.strerror(<int>-rc)

    def stop_driver(self) -> None:
        """Make a running :meth:`generate` or :meth:`sink` return (within 100 ms)."""
        self._stop = 1
