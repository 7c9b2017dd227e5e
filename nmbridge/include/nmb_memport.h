/*
 * nmb_memport.h -- mem: ports: netmap-format rings in user memory whose "NIC" is a test
 * driver (frames injected into RX, frames collected from TX) or a benchmark source/sink.
 */
#ifndef NMB_MEMPORT_H
#define NMB_MEMPORT_H

#include <stddef.h>
#include <stdint.h>
#include "nmb_port.h"
#include "nmb_umem.h"

enum { NMB_MEM_RX_QUEUE = 0, NMB_MEM_RX_SOURCE = 1, NMB_MEM_RX_NONE = 2 };
/* TX_HOLD: a "NIC" that never takes a frame (a stuck egress, for tests) */
enum { NMB_MEM_TX_COLLECT = 0, NMB_MEM_TX_SINK = 1, NMB_MEM_TX_HOLD = 2 };

struct nmb_memport_stats {
    uint64_t rx_slots, rx_bytes; /* delivered into the RX rings */
    uint64_t tx_slots, tx_bytes; /* taken from the TX rings */
    uint64_t rxsyncs, txsyncs;
    uint64_t rx_frames;          /* frames delivered (slots that end a frame) */
    uint64_t tx_frames;          /* frames taken from the TX rings */
};

/* A record in the inject queue and in the collected buffer: this header, then `datalen`
 * bytes.  `slot_len` is what the slot's len says (normally == datalen). */
struct nmb_mem_record {
    uint32_t datalen;
    uint16_t slot_len;
    uint16_t flags;
};

struct nmb_port *nmb_memport_open(nmb_umem *m, const char *name, uint32_t nrings, uint32_t nslots,
                                  int rx_mode, int tx_mode, uint16_t source_len, int strict,
                                  char *err, size_t errlen);
void nmb_memport_close(struct nmb_port *p);
/* Queue one slot's worth for RX ring `ring` (-1: whichever ring has room, filled in ring
 * order); thread-safe against the forwarding thread. 0 or -errno. */
int nmb_memport_inject(struct nmb_port *p, int ring, const void *data, uint32_t datalen, uint16_t slot_len,
                       uint16_t flags);
/* Take everything collected from TX so far (records, see above); caller frees *out. */
size_t nmb_memport_take(struct nmb_port *p, char **out);
/* Slots still waiting in the inject queue. */
size_t nmb_memport_pending(struct nmb_port *p);
void nmb_memport_get_stats(struct nmb_port *p, struct nmb_memport_stats *out);
/* The live counters (only the thread that syncs the port writes them) and their size, for
 * fastfwd's copy at a batch boundary. */
const void *nmb_memport_counters(struct nmb_port *p, size_t *len);
/* Run the kernel's checks now (strict mode does it on every sync). 0 or -1 (see p->error). */
int nmb_memport_check(struct nmb_port *p);

#endif
