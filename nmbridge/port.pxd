# The C-level port every backend provides (nmbridge/include/nmb_port.h) and its Python face.
from libc.stdint cimport uint32_t, uint64_t

from nmbridge.netmap cimport netmap_if


cdef extern from "nmb_port.h" nogil:
    enum:
        NMB_PORT_ERRLEN
        NMB_OFFLOAD_META

    ctypedef int (*nmb_sync_fn)(nmb_port *port) noexcept nogil

    struct nmb_port:
        netmap_if *nifp
        uint32_t tx_first
        uint32_t tx_last
        uint32_t rx_first
        uint32_t rx_last
        int fd
        int poll_syncs
        uint64_t mem_key
        nmb_sync_fn rxsync
        nmb_sync_fn txsync
        uint32_t offloads
        uint32_t peer_offloads
        uint32_t spin_us
        void *priv
        char error[256]


cdef extern from "nmb_umem.h" nogil:
    ctypedef struct nmb_umem:
        pass


cdef class Region:
    """A netmap-format memory region in user memory, shared by the ports opened in it."""
    cdef nmb_umem *c


cdef class Port:
    """An open port: netmap rings plus rxsync/txsync/fd, whatever the backend."""
    cdef nmb_port *c
    cdef readonly str spec
    cdef readonly str backend
    cdef readonly str region_name
    cdef void _release(self) noexcept
