"""Which Linux capabilities this process has, and a plain error when one it needs is missing."""

from __future__ import annotations

import os

CAP_NET_ADMIN = 12
CAP_NET_RAW = 13
CAP_IPC_LOCK = 14
CAP_SYS_ADMIN = 21
CAP_BPF = 39  # Linux 5.8+; before it, loading BPF programs needs CAP_SYS_ADMIN
NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_NET_RAW: "CAP_NET_RAW", CAP_SYS_ADMIN: "CAP_SYS_ADMIN",
         CAP_BPF: "CAP_BPF", CAP_IPC_LOCK: "CAP_IPC_LOCK"}


def kernel_has_cap_bpf(last_cap_path: str = "/proc/sys/kernel/cap_last_cap") -> bool:
    """Whether this kernel knows CAP_BPF (5.8+)."""
    try:
        with open(last_cap_path) as f:
            return int(f.read()) >= CAP_BPF
    except (OSError, ValueError):
        return True


def effective(status_path: str = "/proc/self/status") -> int:
    """The effective capability mask (CapEff) of this process."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def missing(needed: list[int], status_path: str = "/proc/self/status") -> list[str]:
    """Names of the capabilities in `needed` this process does not have."""
    have = effective(status_path)
    return [NAMES.get(c, f"capability {c}") for c in needed if not have & (1 << c)]


def require(needed: list[int], why: str) -> str | None:
    """None when all are present, else a one-line reason naming what is missing and how to get it."""
    if os.geteuid() == 0 and not missing(needed):
        return None
    lacking = missing(needed)
    if not lacking:
        return None
    return (f"{why} needs {' and '.join(lacking)}: run as root, or give the service "
            f"AmbientCapabilities={' '.join(lacking)} (see etc/systemd/nmbridge.service)")


def require_for(needs: list[tuple[int, str]], who: str) -> str | None:
    """Like :func:`require`, with what needs each capability: None when nothing is missing,
    else e.g. ``nmbridge run needs CAP_NET_RAW (afpacket: ports): run as root, or ...``."""
    lacking = set(missing([c for c, _ in needs]))
    if not lacking:
        return None
    named = [(NAMES.get(c, f"capability {c}"), why) for c, why in needs]
    named = [(n, why) for n, why in named if n in lacking]
    return (f"{who} needs {' and '.join(f'{n} ({why})' for n, why in named)}: run as root, or give "
            f"the service AmbientCapabilities={' '.join(n for n, _ in named)} "
            f"(see etc/systemd/nmbridge.service)")
