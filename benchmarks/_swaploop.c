/*
 * The baseline for benchmarks/fastfwd.py: the plainest loop that moves frames between the
 * same rings with the same source/sink syncs -- swap (or copy), len, flags, nothing else:
 * no chains, no bounds checks, no filter, no counters but one, no poll.
 */
#include <stdint.h>
#include <string.h>

#include "nmb_port.h"

uint64_t swap_loop(struct nmb_port *src, struct nmb_port *dst, uint64_t nframes, uint32_t burst,
                   int zerocopy)
{
    uint64_t done = 0;
    struct netmap_ring *rx = nmb_rxring(src->nifp, src->rx_first);
    struct netmap_ring *tx = nmb_txring(dst->nifp, dst->tx_first);
    src->rxsync(src);
    while (done < nframes) {
        uint32_t m = nmb_ring_space(rx), room = nmb_ring_space(tx);
        uint32_t j = rx->head, k = tx->head;
        if (room < m)
            m = room;
        if (burst < m)
            m = burst;
        for (uint32_t i = 0; i < m; i++) {
            struct netmap_slot *rs = &rx->slot[j], *ts = &tx->slot[k];
            if (zerocopy) {
                uint32_t t = ts->buf_idx;
                ts->buf_idx = rs->buf_idx;
                rs->buf_idx = t;
                rs->flags = NS_BUF_CHANGED;
                ts->flags = NS_BUF_CHANGED;
            } else {
                memcpy(nmb_buf(tx, ts->buf_idx), nmb_buf(rx, rs->buf_idx), rs->len);
                ts->flags = 0;
            }
            ts->len = rs->len;
            j = nmb_ring_next(rx, j);
            k = nmb_ring_next(tx, k);
        }
        rx->head = rx->cur = j;
        tx->head = tx->cur = k;
        done += m;
        if (dst->txsync(dst) < 0 || src->rxsync(src) < 0)
            break;
    }
    return done;
}
