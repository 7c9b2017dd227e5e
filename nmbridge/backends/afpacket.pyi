"""Type stub for the afpacket Cython extension (nmbridge/backends/afpacket.pyx)."""

from nmbridge.port import Port, Region

DEFAULT_SNDBUF: int
DEFAULT_RCVBUF: int
DEFAULT_RX_RING_BYTES: int

class AfPacketPort(Port):
    """An afpacket: port on interface `ifname` (in the calling thread's network namespace)."""

    ifname: str
    def __init__(
        self,
        region: Region,
        ifname: str,
        *,
        slots: int = 1024,
        rx_ring: bool = True,
        rx_frames: int = 0,
        rcvbuf: int = ...,
        promisc: bool = True,
        qdisc_bypass: bool = True,
        sndbuf: int = ...,
        tx_ring: bool = True,
        tx_frames: int = 0,
        vnet: bool = True,
        busy_poll_us: int = 0,
        rx_ring_bytes: int = 0,
        fanout: int = -1,
        fanout_group: int = -1,
        fanout_legacy: bool = False,
    ) -> None: ...
    @property
    def fanout_group(self) -> int | None: ...
    @property
    def ring_bytes(self) -> tuple[int, int]: ...
    def fanout_start(self) -> None: ...
    @property
    def ifindex(self) -> int: ...
    def counters(self) -> dict[str, int]: ...
    def check(self) -> None: ...
