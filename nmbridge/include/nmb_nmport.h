/*
 * nmb_nmport.h -- netmap: and vale ports through the kernel's /dev/netmap.
 *
 * A port is one file descriptor bound with NIOCCTRL + NETMAP_REQ_REGISTER.  Every port of
 * one memory region (nr_mem_id) shares a single mapping of that region, so ports that live
 * in it can swap buffer indices (zero-copy); the mapping goes when its last port closes.
 * The port name is parsed in Python (nmbridge/backends/netmap_backend.py): this code gets
 * the kernel's nr_name, nr_mode, nr_ringid, nr_flags and nr_mem_id.
 */
#ifndef NMB_NMPORT_H
#define NMB_NMPORT_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_port.h"

/* What a registered port looks like, for logs, tests and `nmbridge ports`. */
struct nmb_nmport_info {
    uint64_t memsize;     /* bytes of the memory region */
    uint64_t offset;      /* where this port's netmap_if sits in it */
    uint32_t mem_id;      /* the kernel's nr_mem_id */
    uint32_t region_users; /* ports of this process sharing the mapping now */
    uint32_t ni_flags;    /* NI_PRIV_MEM, ... */
    uint32_t ni_tx_rings, ni_rx_rings, ni_host_tx_rings, ni_host_rx_rings;
    uint32_t reply_host_tx_rings, reply_host_rx_rings; /* as the register reply said */
    uint32_t nr_mode;
    uint32_t nr_ringid;
    uint64_t nr_flags;
};

/* The header + register request pair, as sent with NIOCCTRL (hdr.nr_body points at reg). */
struct nmb_nmport_req {
    struct nmreq_header hdr;
    struct nmreq_register reg;
};

/* Fill `req` for registering nr_name with mode/ringid/flags/mem_id.  Returns 0, or -1 when
 * the name does not fit nr_name (63 bytes + NUL). */
int nmb_nmport_encode(struct nmb_nmport_req *req, const char *nr_name, uint32_t mode, uint16_t ringid,
                      uint64_t flags, uint16_t mem_id);

/* Open and register a port; `dev` is normally "/dev/netmap".  On failure returns NULL with a
 * one-line reason in err (nothing is left open or mapped). */
struct nmb_port *nmb_nmport_open(const char *dev, const char *nr_name, uint32_t mode, uint16_t ringid,
                                 uint64_t flags, uint16_t mem_id, char *err, size_t errlen);
void nmb_nmport_close(struct nmb_port *p);
void nmb_nmport_get_info(struct nmb_port *p, struct nmb_nmport_info *out);
/* Mappings (memory regions) this process holds now: for leak tests. */
uint32_t nmb_nmport_regions(void);

/* Turn an errno from open() or NIOCCTRL into words (exposed for the unit tests). */
void nmb_nmport_strerror(int what, int err, const char *dev, const char *nr_name, unsigned kernel_version,
                         char *out, size_t outlen);
enum { NMB_NMPORT_ERR_OPEN = 0, NMB_NMPORT_ERR_REGISTER = 1 };

/* ---- test and benchmark drivers (never used by fastfwd) ---- */

/* Copy frames into the TX rings from head: `n` frames laid out back to back in `data` with
 * their lengths in `lens`.  Stops when the rings are full; returns frames placed (then the
 * caller txsyncs).  Frames longer than a buffer are refused (-EMSGSIZE). */
long nmb_nmport_put(struct nmb_port *p, const char *data, const uint32_t *lens, uint32_t n);

/* Generator: fill every free TX slot with a `frame_len`-byte frame, txsync, and wait with
 * poll(POLLOUT) when full, until `count` frames went out (0 = endless) or *stop.  Frame k
 * carries k (little-endian u64) at byte 14.  Returns frames sent, or -errno. */
int64_t nmb_nmport_generate(struct nmb_port *p, uint32_t frame_len, uint64_t count, volatile int *stop);

/* Sink: release every RX slot, counting frames and bytes, rxsync, poll(POLLIN) when empty,
 * until `count` frames (0 = endless) or *stop.  Returns frames received, or -errno. */
int64_t nmb_nmport_sink(struct nmb_port *p, uint64_t count, volatile int *stop, uint64_t *bytes);

#endif /* NMB_NMPORT_H */
