"""Type stub for the afxdp Cython extension (nmbridge/backends/afxdp.pyx)."""

from nmbridge.port import Port, Region

MODES: dict[str, int]

class AfXdpPort(Port):
    """An afxdp: port on interface `ifname` (in the calling thread's network namespace)."""

    ifname: str
    def __init__(
        self,
        region: Region,
        ifname: str,
        *,
        slots: int = 1024,
        mode: str = "auto",
        queues: int = 0,
        promisc: bool = True,
        need_wakeup: bool = True,
        csum_fix: bool = True,
        busy_poll: int = 0,
        busy_budget: int = 0,
        rx_coalesce: int = 0,
    ) -> None: ...
    @property
    def ifindex(self) -> int: ...
    @property
    def mode(self) -> str: ...
    @property
    def mode_reason(self) -> str: ...
    @property
    def queues(self) -> int: ...
    @property
    def queue_ids(self) -> list[int]: ...
    @property
    def shared_sockets(self) -> int: ...
    def counters(self) -> dict[str, int]: ...
    def check(self) -> None: ...

class FakeXskPort(AfXdpPort):
    def __init__(self, region: Region, name: str, *, slots: int = 64) -> None: ...  # type: ignore[override]
    def kernel(self, rx: int = 0, tx: int = 0, length: int = 60, perm: int = 0,
               seen: bytearray | None = None) -> int: ...
    def held(self, tx_side: bool = False) -> list[int]: ...

def count_queues(ifname: str) -> int: ...
def open_shares(
    region: Region,
    ifname: str,
    shares: int,
    *,
    slots: int = 1024,
    mode: str = "auto",
    queues: int = 0,
    promisc: bool = True,
    need_wakeup: bool = True,
    csum_fix: bool = True,
    busy_poll: int = 0,
    busy_budget: int = 0,
    rx_coalesce: int = 0,
) -> list[AfXdpPort]: ...
