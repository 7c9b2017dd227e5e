"""netmap constants for Python code (the C header nmbridge/include/nmb_netmap.h is the source)."""

from __future__ import annotations

NETMAP_API = 14
NS_BUF_CHANGED = 0x0001
NS_REPORT = 0x0002
NS_FORWARD = 0x0004
NS_NO_LEARN = 0x0008
NS_INDIRECT = 0x0010
NS_MOREFRAG = 0x0020
NS_TXMON = 0x0040
NETMAP_MAX_FRAGS = 64
