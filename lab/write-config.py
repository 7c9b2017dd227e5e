#!/usr/bin/env python3
"""Write the lab bridge's nmbridge config, naming its two data NICs found by MAC.

    write-config.py MAC_A MAC_B [-o /etc/nmbridge/bridge.toml] [--links FILE]

MAC_A is the NIC on the `left` segment (the pair's port a), MAC_B the one on the `right`
segment (port b). The interface list is ``ip -j link show`` output: read from FILE ("-" for
stdin) when given, else by running ``ip -j link show``. Ports are ``netmap:`` where
/dev/netmap exists (``--backend auto``, the default), else ``afpacket:``.

The file is written atomically and only when its content changes; a previous file that
differs (say, one with filters added by hand) is kept beside it as FILE.bak. Exit status 0
when written or unchanged, 1 on an error, which is one line on stderr naming what is wrong.
Only the standard library is used: provisioning runs this with the system python3.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

PROG = "write-config"
_MAC_RE = re.compile(r"^[0-9a-f]{2}([:-]?)[0-9a-f]{2}(?:\1[0-9a-f]{2}){4}$")
# what the kernel allows in an interface name (IFNAMSIZ 16, no '/', ':' or whitespace)
_IFNAME_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,15}$")


class LabError(Exception):
    """An error for the person running the provisioning: one line, no traceback."""


def normalize_mac(text: str) -> str:
    """``02-77-00-00-02-01``, ``027700000201`` or ``02:77:...`` -> ``02:77:00:00:02:01``."""
    mac = text.strip().lower()
    if not _MAC_RE.match(mac):
        raise LabError(f"{text!r} is not a MAC address (want six hex bytes, e.g. 02:77:00:00:02:01)")
    digits = mac.replace(":", "").replace("-", "")
    return ":".join(digits[i:i + 2] for i in range(0, 12, 2))


def parse_links(text: str, source: str) -> list[tuple[str, str]]:
    """(name, MAC) of every interface in ``ip -j link show`` output that has a MAC."""
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise LabError(f"{source}: not the JSON of `ip -j link show`: {e}") from None
    if not isinstance(data, list):
        raise LabError(f"{source}: not the JSON of `ip -j link show` (want a list of interfaces)")
    links: list[tuple[str, str]] = []
    for i, link in enumerate(data):
        if not isinstance(link, dict) or not isinstance(link.get("ifname"), str):
            raise LabError(f"{source}: entry {i} has no \"ifname\"")
        address = link.get("address")
        if link.get("link_type", "ether") != "ether" or not isinstance(address, str):
            continue  # loopback, tunnels, ...: nothing to find by MAC
        try:
            links.append((link["ifname"], normalize_mac(address)))
        except LabError:
            continue  # an address that is not a MAC (e.g. an IP tunnel's)
    return links


def find_by_mac(links: Sequence[tuple[str, str]], mac: str, role: str) -> str:
    """The one interface with `mac`; `role` says which NIC it is in errors."""
    names = [name for name, m in links if m == mac]
    if len(names) == 1:
        return names[0]
    seen = ", ".join(f"{n} {m}" for n, m in links) or "none"
    if not names:
        raise LabError(f"no interface has the {role} MAC {mac} (interfaces with a MAC: {seen}); "
                       "is this the VM the Vagrantfile gives these MACs to?")
    raise LabError(f"{len(names)} interfaces have the {role} MAC {mac} ({', '.join(names)}); "
                   "cannot tell which one is the data NIC")


def choose_backend(backend: str, netmap_device: Path) -> str:
    if backend == "auto":
        return "netmap" if netmap_device.exists() else "afpacket"
    return backend


def render(port_a: str, port_b: str, backend: str) -> str:
    """The config text. It ends inside the [[pair]] table, so a key appended to the file (as
    the lab walkthrough does with ``filter_a_to_b``) belongs to the pair."""
    for name in (port_a, port_b):
        if not _IFNAME_RE.match(name):
            raise LabError(f"{name!r} is not an interface name nmbridge can be given")
    return (
        "# Written by lab/write-config.py during `vagrant provision bridge`; provisioning again\n"
        "# rewrites it (a copy that differs is kept as bridge.toml.bak).\n"
        "# Port a is on the segment of `left`, port b on the segment of `right`.\n"
        "\n"
        "[bridge]\n"
        'name = "lab"\n'
        f'backend = "{backend}"\n'
        "\n"
        "[log]\n"
        'format = "json"\n'
        "\n"
        "[[pair]]\n"
        'name = "left-right"\n'
        f'ports = ["{backend}:{port_a}", "{backend}:{port_b}"]\n'
        'direction = "both"\n'
    )


def write_if_changed(path: Path, text: str) -> str:
    """Write atomically; return "unchanged", "written" or "written (previous kept as X)"."""
    old: str | None = None
    if path.exists():
        old = path.read_text(encoding="utf-8")
        if old == text:
            return "unchanged"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.chmod(tmp, 0o644)
        if old is not None:
            backup = path.with_name(path.name + ".bak")
            shutil.copy2(path, backup)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return "written" if old is None else f"written (previous kept as {path.name}.bak)"


def read_links(source: str | None) -> tuple[str, str]:
    """The `ip -j link show` text and a name for it in errors."""
    if source is None:
        try:
            out = subprocess.run(["ip", "-j", "link", "show"], check=True, capture_output=True, text=True)
        except FileNotFoundError:
            raise LabError("`ip` not found (Debian package iproute2); or pass --links FILE") from None
        except subprocess.CalledProcessError as e:
            raise LabError(f"`ip -j link show` failed: {e.stderr.strip()}") from None
        return out.stdout, "`ip -j link show`"
    if source == "-":
        return sys.stdin.read(), "<stdin>"
    try:
        return Path(source).read_text(encoding="utf-8"), source
    except OSError as e:
        raise LabError(f"{source}: cannot read: {e.strerror or e}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    p.add_argument("mac_a", metavar="MAC_A", help="MAC of the data NIC on the left segment (port a)")
    p.add_argument("mac_b", metavar="MAC_B", help="MAC of the data NIC on the right segment (port b)")
    p.add_argument("-o", "--output", metavar="FILE", help="where to write (default: print to stdout)")
    p.add_argument("--links", metavar="FILE", help='`ip -j link show` output ("-": stdin; default: run it)')
    p.add_argument("--backend", choices=("auto", "netmap", "afpacket"), default="auto",
                   help="port backend; auto: netmap where --netmap-device exists (default: auto)")
    p.add_argument("--netmap-device", metavar="PATH", default="/dev/netmap", type=Path,
                   help="the device whose presence means netmap (default: /dev/netmap)")
    args = p.parse_args(argv)
    try:
        mac_a, mac_b = normalize_mac(args.mac_a), normalize_mac(args.mac_b)
        if mac_a == mac_b:
            raise LabError(f"MAC_A and MAC_B are the same ({mac_a}): the pair needs two NICs")
        links = parse_links(*read_links(args.links))
        port_a = find_by_mac(links, mac_a, "left-segment (MAC_A)")
        port_b = find_by_mac(links, mac_b, "right-segment (MAC_B)")
        text = render(port_a, port_b, choose_backend(args.backend, args.netmap_device))
        if args.output is None:
            sys.stdout.write(text)
        else:
            status = write_if_changed(Path(args.output), text)
            print(f"{args.output}: {status}; port a {port_a} ({mac_a}), port b {port_b} ({mac_b})")
    except LabError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
