# cython: language_level=3
"""Ports and user-memory regions: the shape every backend shares.

A :class:`Port` is an open interface exposing netmap-format rings; fastfwd only ever sees
its C struct (``nmb_port``). A :class:`Region` is netmap-format memory laid out in user
space exactly as the kernel lays out a netmap region; every user-memory port opened in the
same region shares its buffer pool, so forwarding between them swaps buffer indices.
"""

from libc.errno cimport errno
from libc.string cimport strerror
from libc.stdint cimport uint32_t

from nmbridge.netmap cimport netmap_if, netmap_ring, nmb_rxring, nmb_txring

from nmbridge.errors import PortError, RingError


cdef extern from "nmb_umem.h" nogil:
    nmb_umem *nmb_umem_create(size_t obj_bytes, uint32_t nbufs, uint32_t buf_size)
    void nmb_umem_destroy(nmb_umem *m)
    size_t nmb_umem_if_bytes(uint32_t ntx, uint32_t nrx, uint32_t tx_slots, uint32_t rx_slots)
    uint32_t nmb_umem_nbufs(const nmb_umem *m)
    uint32_t nmb_umem_buf_size(const nmb_umem *m)
    uint32_t nmb_umem_free_bufs(const nmb_umem *m)
    size_t nmb_umem_size(const nmb_umem *m)
    int nmb_umem_check(nmb_umem *m, char *err, size_t errlen)


def port_bytes(int rings, int slots) -> int:
    """Object bytes one port with `rings` TX and `rings` RX rings of `slots` slots needs."""
    return nmb_umem_if_bytes(rings, rings, slots, slots)


cdef class Region:
    """User-space netmap memory: objects (netmap_if, rings) and one buffer pool."""

    def __cinit__(self, *, int ports=2, int rings=1, int slots=1024, int buf_size=2048,
                  int spare_ports=0):
        """Room for `ports` (+ `spare_ports`) ports of `rings` ring pairs with `slots` slots."""
        if ports < 1 or rings < 1 or slots < 2 or buf_size < 64:
            raise ValueError("a region needs ports >= 1, rings >= 1, slots >= 2, buf_size >= 64")
        if buf_size % 64:
            raise ValueError(f"buf_size {buf_size} is not a multiple of 64")
        cdef int total = ports + spare_ports
        cdef size_t obj = total * nmb_umem_if_bytes(rings, rings, slots, slots)
        cdef size_t nbufs = <size_t>total * rings * 2 * slots + 2
        if nbufs > 0xffffffff:
            raise ValueError("region too large")
        self.c = nmb_umem_create(obj, <uint32_t>nbufs, buf_size)
        if self.c == NULL:
            raise MemoryError(f"cannot map a netmap region of {nbufs} buffers: "
                              f"{strerror(errno).decode()}")

    def __dealloc__(self):
        if self.c != NULL:
            nmb_umem_destroy(self.c)
            self.c = NULL

    @property
    def buffers(self) -> int:
        return nmb_umem_nbufs(self.c)

    @property
    def buf_size(self) -> int:
        return nmb_umem_buf_size(self.c)

    @property
    def free_buffers(self) -> int:
        return nmb_umem_free_bufs(self.c)

    @property
    def size(self) -> int:
        return nmb_umem_size(self.c)

    @property
    def address(self) -> int:
        return <size_t>self.c

    def check(self) -> None:
        """Raise RingError unless every buffer is in exactly one slot or the free pool."""
        cdef char err[256]
        if nmb_umem_check(self.c, err, sizeof(err)) != 0:
            raise RingError(err.decode(errors="replace"))


cdef class Port:
    """Base of every backend's port.

    A backend subclass sets ``c`` when it opens, implements ``_release`` (close the C port)
    and calls the same from its own ``__dealloc__``: a base-class ``__dealloc__`` would run
    after the subclass's references (its memory region) are already gone.
    """

    def __cinit__(self, *args, **kwargs):
        self.c = NULL
        self.spec = ""
        self.backend = ""
        self.region_name = ""

    cdef void _release(self) noexcept:
        pass

    def close(self) -> None:
        """Close the port; idempotent."""
        if self.c != NULL:
            self._release()
            self.c = NULL

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _check_open(self):
        if self.c == NULL:
            raise PortError(f"{self.spec}: port is closed")

    @property
    def closed(self) -> bool:
        return self.c == NULL

    @property
    def address(self) -> int:
        """Address of the C ``struct nmb_port`` (for benchmarks' own C loops)."""
        self._check_open()
        return <size_t>self.c

    @property
    def fd(self) -> int:
        self._check_open()
        return self.c.fd

    @property
    def mem_key(self) -> int:
        self._check_open()
        return self.c.mem_key

    @property
    def spin_us(self) -> int:
        """µs its pair's loop busy-polls before sleeping (the port's ``busy_poll``; 0: none)."""
        self._check_open()
        return self.c.spin_us

    @property
    def name(self) -> str:
        self._check_open()
        return self.c.nifp.ni_name.decode(errors="replace")

    def info(self) -> dict:
        """Rings, slots, buffer size and memory region, for logs and `nmbridge ports`."""
        self._check_open()
        cdef netmap_if *nifp = self.c.nifp
        cdef netmap_ring *tx = nmb_txring(nifp, self.c.tx_first)
        cdef netmap_ring *rx = nmb_rxring(nifp, self.c.rx_first)
        return {
            "port": self.spec,
            "backend": self.backend,
            "tx_rings": self.c.tx_last - self.c.tx_first,
            "rx_rings": self.c.rx_last - self.c.rx_first,
            "tx_slots": tx.num_slots,
            "rx_slots": rx.num_slots,
            "buf_size": rx.nr_buf_size,
            "region": self.region_name,
        }

    def counters_buffer(self) -> tuple:
        """(address, bytes) of the port's live counters -- a C struct of uint64_t written only
        by the thread that syncs the port -- which fastfwd copies at a batch boundary for a
        consistent snapshot; (0, 0) for a port without counters of its own."""
        return (0, 0)

    def decode_counters(self, bytes raw) -> dict:
        """The counters as a dict of names, from a copy of that buffer (see the backend's
        ``accounting`` for what they mean to a pair's numbers)."""
        return {}

    def rxsync(self) -> None:
        """One rxsync, as the forwarder would call it (for tests and benchmarks driving rings
        by hand); RingError with the backend's reason."""
        self._check_open()
        cdef int rc
        with nogil:
            rc = self.c.rxsync(self.c)
        if rc != 0:
            raise RingError(self.c.error.decode(errors="replace"))

    def txsync(self) -> None:
        """One txsync, as the forwarder would call it (see rxsync)."""
        self._check_open()
        cdef int rc
        with nogil:
            rc = self.c.txsync(self.c)
        if rc != 0:
            raise RingError(self.c.error.decode(errors="replace"))

    def ring_state(self) -> dict:
        """head/cur/tail of every ring this port forwards (for tests and `nmbridge ports`)."""
        self._check_open()
        cdef uint32_t i
        cdef netmap_ring *r
        out = {"tx": [], "rx": []}
        for i in range(self.c.tx_first, self.c.tx_last):
            r = nmb_txring(self.c.nifp, i)
            out["tx"].append((r.head, r.cur, r.tail))
        for i in range(self.c.rx_first, self.c.rx_last):
            r = nmb_rxring(self.c.nifp, i)
            out["rx"].append((r.head, r.cur, r.tail))
        return out

    def buffer_indices(self) -> list:
        """Every slot's buf_idx, TX rings then RX rings (for the no-loss property tests)."""
        self._check_open()
        cdef uint32_t i, s
        cdef netmap_ring *r
        out = []
        for i in range(self.c.tx_first, self.c.tx_last):
            r = nmb_txring(self.c.nifp, i)
            for s in range(r.num_slots):
                out.append(r.slot[s].buf_idx)
        for i in range(self.c.rx_first, self.c.rx_last):
            r = nmb_rxring(self.c.nifp, i)
            for s in range(r.num_slots):
                out.append(r.slot[s].buf_idx)
        return out
