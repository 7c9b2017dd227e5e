/*
 * nmb_port.h -- the one shape every backend has.
 *
 * A port exposes netmap-format memory (a netmap_if and its rings) plus two sync operations
 * and an fd to poll.  fastfwd sees nothing else, so one loop serves the kernel's netmap,
 * user-memory rings played by AF_PACKET, and the mem: test/benchmark ports.
 */
#ifndef NMB_PORT_H
#define NMB_PORT_H

#include <stdint.h>
#include "nmb_netmap.h"

#define NMB_PORT_ERRLEN 256

struct nmb_port;
typedef int (*nmb_sync_fn)(struct nmb_port *port);

struct nmb_port {
    struct netmap_if *nifp;
    /* rings this port forwards: TX rings [tx_first, tx_last), RX rings [rx_first, rx_last),
     * as indices for nmb_txring()/nmb_rxring() */
    uint32_t tx_first, tx_last;
    uint32_t rx_first, rx_last;
    /* fd to poll(): POLLIN when RX has (or will have after rxsync) frames, POLLOUT when TX
     * has room; -1 if the port never needs waiting for */
    int fd;
    /* 1 when poll() on fd also syncs the rings (the kernel's netmap); 0 when fastfwd must
     * call rxsync/txsync after poll() returns (user-memory backends) */
    int poll_syncs;
    /* ports with the same mem_key share one buffer pool: forwarding between them swaps
     * buf_idx (zero-copy); otherwise the bytes are copied */
    uint64_t mem_key;
    /* hand released RX slots to the "NIC" and take new frames; 0 or -errno */
    nmb_sync_fn rxsync;
    /* hand new TX slots to the "NIC" and reclaim completed ones; 0 or -errno */
    nmb_sync_fn txsync;
    /* backend state */
    void *priv;
    /* set by a failing sync: what went wrong, in words */
    char error[NMB_PORT_ERRLEN];
};

#endif /* NMB_PORT_H */
