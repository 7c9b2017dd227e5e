/*
 * nmb_filter.h -- how fastfwd calls a compiled filter.
 *
 * A filter object starts with this struct; `run` returns NMB_PASS or NMB_DROP for the
 * frame's first `len` bytes (never reading past them) and counts the deciding rule itself.
 * fastfwd loads a direction's filter pointer once per batch, so a new filter takes effect
 * between batches, never in the middle of one.
 */
#ifndef NMB_FILTER_H
#define NMB_FILTER_H

#include <stdint.h>

#define NMB_DROP 0
#define NMB_PASS 1

struct nmb_filter {
    int (*run)(struct nmb_filter *self, const uint8_t *frame, uint32_t len);
};

#endif
