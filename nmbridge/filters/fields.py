"""Structured rule fields: their documentation and the parsing of their config values.

Each parser takes the raw TOML value and returns the normalised value the engine needs
(see :class:`nmbridge.filters.engine.Program`), or raises ``ValueError`` with the reason;
the compiler turns that into a :class:`~nmbridge.filters.model.FilterError` naming the key.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable

# field name -> one line for the README and the config reference
FIELDS: dict[str, str] = {
    "ethertype": "innermost EtherType after all 802.1Q/802.1ad tags: a name (arp, ipv4, ipv6, "
                 "lldp, mpls, ...) or a number 0x0600-0xffff; 802.3 length frames have none",
    "vlan": "true: bytes 12-13 are a tag (0x8100 or 0x88a8); false: they are not",
    "vlan_id": "VLAN id (0-4095) of the outermost tag (the S-tag of a QinQ frame)",
    "vlan_pcp": "priority (0-7) of the outermost tag",
    "vlan_tpid": "TPID of the outermost tag: 0x8100 (802.1q) or 0x88a8 (802.1ad)",
    "inner_vlan_id": "VLAN id (0-4095) of the second tag (the C-tag of a QinQ frame)",
    "inner_vlan_pcp": "priority (0-7) of the second tag",
    "dst_mac": "destination MAC: \"aa:bb:cc:dd:ee:ff\" (also aa-bb-..., aabb.ccdd.eeff), "
               "\"value/mask\" (mask as a MAC or a length: /24), \"broadcast\" or "
               "\"multicast\" (group bit set, includes broadcast)",
    "src_mac": "source MAC, same forms as dst_mac",
    "src_ip": "IPv4 or IPv6 source prefix (\"10.0.0.0/8\", \"2001:db8::/32\") or address; "
              "matches only its own family; never ARP",
    "dst_ip": "IPv4 or IPv6 destination prefix or address",
    "ip_proto": "IP protocol: a number 0-255 or a name (tcp, udp, icmp, icmpv6, sctp, gre, ...); "
                "for IPv6 the protocol after the extension headers",
    "src_port": "TCP/UDP/SCTP source port: a number or an inclusive range [lo, hi] (a range, "
                "not a list); never on non-first fragments",
    "dst_port": "TCP/UDP/SCTP destination port: a number or an inclusive range [lo, hi]",
}

ETHERTYPES: dict[str, int] = {
    "ipv4": 0x0800, "ip": 0x0800, "arp": 0x0806, "wol": 0x0842, "rarp": 0x8035,
    "vlan": 0x8100, "802.1q": 0x8100, "qinq": 0x88A8, "802.1ad": 0x88A8,
    "ipv6": 0x86DD, "ip6": 0x86DD, "pause": 0x8808, "slow": 0x8809, "lacp": 0x8809,
    "mpls": 0x8847, "mpls_multicast": 0x8848, "pppoe_discovery": 0x8863, "pppoe": 0x8864,
    "eapol": 0x888E, "lldp": 0x88CC, "macsec": 0x88E5, "ptp": 0x88F7, "cfm": 0x8902,
    "fcoe": 0x8906, "roce": 0x8915, "loopback": 0x9000,
}

IP_PROTOS: dict[str, int] = {
    "hopopt": 0, "icmp": 1, "igmp": 2, "ipip": 4, "ipencap": 4, "tcp": 6, "egp": 8, "udp": 17,
    "ipv6": 41, "rsvp": 46, "gre": 47, "esp": 50, "ah": 51, "icmpv6": 58, "icmp6": 58,
    "ipv6-nonxt": 59, "ospf": 89, "pim": 103, "vrrp": 112, "l2tp": 115, "sctp": 132,
    "udplite": 136,
}

TPIDS: dict[str, int] = {"802.1q": 0x8100, "vlan": 0x8100, "802.1ad": 0x88A8, "qinq": 0x88A8}


def _int(value: object, lo: int, hi: int, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{what} must be a number from {lo} to {hi}")
    if not lo <= value <= hi:
        raise ValueError(f"{what} {value} is outside {lo}..{hi}")
    return value


def _named(value: object, names: dict[str, int], lo: int, hi: int, what: str) -> int:
    if isinstance(value, str):
        key = value.strip().lower()
        if key in names:
            return names[key]
        try:
            number = int(key, 0)
        except ValueError:
            known = ", ".join(sorted(names))
            raise ValueError(f"unknown {what} name {value!r} (known: {known}; or a number)") from None
        return _int(number, lo, hi, what)
    return _int(value, lo, hi, what)


def parse_ethertype(value: object) -> int:
    return _named(value, ETHERTYPES, 0x0600, 0xFFFF, "ethertype")


def parse_vlan(value: object) -> bool:
    if not isinstance(value, bool):
        raise ValueError("vlan must be true or false")
    return value


def parse_vlan_id(value: object) -> int:
    return _int(value, 0, 4095, "a VLAN id")


def parse_pcp(value: object) -> int:
    return _int(value, 0, 7, "a VLAN priority")


def parse_tpid(value: object) -> int:
    tpid = _named(value, TPIDS, 0, 0xFFFF, "TPID")
    if tpid not in (0x8100, 0x88A8):
        raise ValueError("only 0x8100 (802.1q) and 0x88a8 (802.1ad) are VLAN tags")
    return tpid


def parse_mac(value: object) -> tuple[bytes, bytes]:
    """(value, mask), 6 bytes each.  The address as six bytes separated by ':' or '-', or
    Cisco's three dotted groups (0180.c200.0000); the mask as a MAC or a length (/24)."""
    if not isinstance(value, str):
        raise ValueError("a MAC address must be a string like \"aa:bb:cc:dd:ee:ff\"")
    text = value.strip().lower()
    if text == "broadcast":
        return b"\xff" * 6, b"\xff" * 6
    if text == "multicast":
        return b"\x01" + bytes(5), b"\x01" + bytes(5)
    addr, slash, mask = text.partition("/")
    mac = _mac_bytes(addr)
    m = _mac_mask(mask) if slash else b"\xff" * 6
    return bytes(a & b for a, b in zip(mac, m, strict=True)), m


_HEX = frozenset("0123456789abcdef")


def _mac_bytes(text: str) -> bytes:
    text = text.strip()
    groups = text.split(".")
    if len(groups) == 3 and all(len(g) == 4 and set(g) <= _HEX for g in groups):  # Cisco
        return bytes.fromhex("".join(groups))
    parts = text.replace("-", ":").split(":")
    if len(parts) == 6 and all(1 <= len(p) <= 2 and set(p) <= _HEX for p in parts):
        return bytes(int(p, 16) for p in parts)
    raise ValueError(f"{text!r} is not a MAC address: write six hex bytes as \"aa:bb:cc:dd:ee:ff\" "
                     "(or aa-bb-cc-dd-ee-ff, aabb.ccdd.eeff), \"broadcast\" or \"multicast\"")


def _mac_mask(text: str) -> bytes:
    """A mask written as a MAC (ff:ff:ff:00:00:00) or as a length of leading one bits (/24)."""
    text = text.strip()
    if text.isdigit():
        bits = int(text)
        if bits > 48:
            raise ValueError(f"a MAC mask length is 0 to 48, not {bits}")
        return (((1 << bits) - 1) << (48 - bits)).to_bytes(6, "big")
    try:
        return _mac_bytes(text)
    except ValueError:
        raise ValueError(f"{text!r} is not a MAC mask: write a length (/24) or a mask like "
                         "ff:ff:ff:00:00:00") from None


def parse_ip(value: object) -> tuple[bool, bytes, bytes]:
    """(is_v6, value & mask, mask): 16 bytes each, an IPv4 prefix in the first 4."""
    if not isinstance(value, str):
        raise ValueError("an IP prefix must be a string like \"10.0.0.0/8\" or \"2001:db8::/32\"")
    try:
        net = ipaddress.ip_network(value.strip(), strict=False)
    except ValueError as e:
        raise ValueError(f"not an IP address or prefix ({e})") from None
    return (net.version == 6, net.network_address.packed.ljust(16, b"\0"),
            net.netmask.packed.ljust(16, b"\0"))


def parse_ip_proto(value: object) -> int:
    return _named(value, IP_PROTOS, 0, 255, "IP protocol")


def parse_port(value: object) -> tuple[int, int]:
    """(lo, hi), inclusive.  One spelling of each: 443, [1000, 2000]; the forms people bring
    from elsewhere ("1000-2000", [443], "443") are refused with the spelling to use."""
    if isinstance(value, str):
        lo_text, dash, hi_text = value.strip().partition("-")
        if dash and lo_text.strip().isdigit() and hi_text.strip().isdigit():
            raise ValueError(f"write a range as an array: [{int(lo_text)}, {int(hi_text)}]")
        if value.strip().isdigit():
            raise ValueError(f"write a port as a number, without quotes: {int(value)}")
        raise ValueError("a port is a number (443) or an inclusive range [lo, hi]; service names "
                         "are not looked up")
    if isinstance(value, list | tuple):
        if len(value) == 1:
            raise ValueError(f"[{_show_port(value[0])}] is an array of one: write one port as a number "
                             f"({_show_port(value[0])}); an array is a range [lo, hi]")
        if len(value) != 2:
            raise ValueError("an array is an inclusive range [lo, hi], not a list of ports: "
                             "write one rule per port or range")
        lo = _int(value[0], 0, 65535, "a port")
        hi = _int(value[1], 0, 65535, "a port")
        if lo > hi:
            raise ValueError(f"port range [{lo}, {hi}] is empty (lo > hi)")
        return lo, hi
    port = _int(value, 0, 65535, "a port")
    return port, port


def _show_port(value: object) -> str:
    return str(value) if isinstance(value, int) else repr(value)


PARSERS: dict[str, Callable[[object], object]] = {
    "ethertype": parse_ethertype,
    "vlan": parse_vlan,
    "vlan_id": parse_vlan_id,
    "vlan_pcp": parse_pcp,
    "vlan_tpid": parse_tpid,
    "inner_vlan_id": parse_vlan_id,
    "inner_vlan_pcp": parse_pcp,
    "dst_mac": parse_mac,
    "src_mac": parse_mac,
    "src_ip": parse_ip,
    "dst_ip": parse_ip,
    "ip_proto": parse_ip_proto,
    "src_port": parse_port,
    "dst_port": parse_port,
}
assert PARSERS.keys() == FIELDS.keys()
