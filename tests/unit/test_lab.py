"""The Vagrant lab, checked without booting it: the Vagrantfile validates, both providers get
the settings the lab depends on (asked of Vagrant itself), and the provisioning's
config-writing step turns an interface list into a config that `nmbridge check` accepts."""

from __future__ import annotations

import importlib.util
import ipaddress
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import tomli

ROOT = Path(__file__).resolve().parents[2]
WRITE_CONFIG = ROOT / "lab" / "write-config.py"
PROVISION = ROOT / "lab" / "provision"

VAGRANT = shutil.which("vagrant")
needs_vagrant = pytest.mark.skipif(
    VAGRANT is None,
    reason="vagrant is not installed (Debian: apt-get install --no-install-recommends vagrant)")


# --- Vagrant --------------------------------------------------------------------------------


def vagrant_env(tmp_path: Path) -> dict[str, str]:
    """Keep Vagrant's state out of the tree and out of the user's home."""
    return {**os.environ, "VAGRANT_HOME": str(tmp_path / "vagrant.d"),
            "VAGRANT_DOTFILE_PATH": str(tmp_path / "dot-vagrant"),
            "VAGRANT_CHECKPOINT_DISABLE": "1", "VAGRANT_NO_COLOR": "1"}


def vagrant(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    assert VAGRANT is not None
    return subprocess.run([VAGRANT, *args], cwd=ROOT, env={**vagrant_env(tmp_path), **env},
                          capture_output=True, text=True, timeout=300)


@needs_vagrant
def test_vagrant_validate(tmp_path: Path) -> None:
    """The machines, networks, provisioners and synced folder, with no provider installed."""
    done = vagrant(tmp_path, "validate", "--ignore-provider")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


def libvirt_plugin_installed(tmp_path: Path) -> bool:
    done = vagrant(tmp_path, "plugin", "list")
    return done.returncode == 0 and "vagrant-libvirt" in done.stdout


@needs_vagrant
def test_vagrant_validate_libvirt_provider(tmp_path: Path) -> None:
    """With vagrant-libvirt, its provider block is validated too (unknown keys are errors)."""
    if not libvirt_plugin_installed(tmp_path):
        pytest.skip("the vagrant-libvirt plugin is not installed (Debian: apt-get install "
                    "--no-install-recommends vagrant-libvirt)")
    done = vagrant(tmp_path, "validate", VAGRANT_DEFAULT_PROVIDER="libvirt")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "validated successfully" in done.stdout


# Vagrant's own view of each machine under each provider: the Vagrantfile as Vagrant merges
# and finalizes it (provider-scoped options, per-machine overrides), not as text.
DUMP_RB = r"""
require "json"
require "vagrant"
env = Vagrant::Environment.new(cwd: ARGV[0])
out = {}
env.vagrantfile.machine_names.each do |name|
  out[name] = {}
  %i[virtualbox libvirt].each do |provider|
    c = env.vagrantfile.machine_config(name, provider, env.boxes, nil, false)[:config]
    pc = c.vm.get_provider_config(provider)
    out[name][provider] = {
      box: c.vm.box, box_version: c.vm.box_version,
      networks: c.vm.networks.map { |type, options| { type: type, options: options } },
      provisioners: c.vm.provisioners.map { |p|
        prc = p.config
        { name: p.name, type: p.type, path: prc.respond_to?(:path) ? prc.path : nil,
          args: prc.respond_to?(:args) ? prc.args : nil, env: prc.respond_to?(:env) ? prc.env : nil,
          source: prc.respond_to?(:source) ? prc.source : nil,
          destination: prc.respond_to?(:destination) ? prc.destination : nil } },
      synced_folders: c.vm.synced_folders,
      customizations: pc.respond_to?(:customizations) ? pc.customizations : nil,
      network_adapters: pc.respond_to?(:network_adapters) ? pc.network_adapters.keys : nil,
      nic_model_type: pc.respond_to?(:nic_model_type) ? pc.nic_model_type : nil,
      driver: pc.respond_to?(:driver) ? pc.driver : nil,
      cpu_mode: pc.respond_to?(:cpu_mode) ? pc.cpu_mode : nil,
      cpu_model: pc.respond_to?(:cpu_model) ? pc.cpu_model : nil,
      management_network_address:
        pc.respond_to?(:management_network_address) ? pc.management_network_address : nil,
    }
  end
end
puts JSON.generate(out)
"""


def dump_machines(tmp: Path, **env: str) -> dict[str, dict[str, Any]]:
    ruby = shutil.which("ruby")
    if VAGRANT is None or ruby is None:
        pytest.skip("vagrant (and the Ruby it runs on) is not installed")
    lab_env = {k: v for k, v in vagrant_env(tmp).items() if not k.startswith("NMBRIDGE_LAB_")}
    done = subprocess.run([ruby, "-e", DUMP_RB, str(ROOT)], env={**lab_env, **env},
                          capture_output=True, text=True, timeout=300)
    if done.returncode and "cannot load such file -- vagrant" in done.stderr:
        pytest.skip("vagrant's Ruby library is not loadable by the system ruby (a vagrant with its "
                    "own embedded Ruby); `vagrant validate` still runs")
    assert done.returncode == 0, done.stderr
    data: dict[str, dict[str, Any]] = json.loads(done.stdout.splitlines()[-1])
    return data


@pytest.fixture(scope="module")
def machines(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return dump_machines(tmp_path_factory.mktemp("vagrant"))


def data_nics(machine: dict[str, Any]) -> list[dict[str, Any]]:
    return [n["options"] for n in machine["networks"] if n["type"] == "private_network"]


def colon(mac: str) -> str:
    return ":".join(re.findall("..", mac.lower()))


def test_three_machines_on_one_pinned_box(machines: dict[str, dict[str, Any]]) -> None:
    assert set(machines) == {"left", "bridge", "right"}
    for name, providers in machines.items():
        for provider, m in providers.items():
            assert m["box"] == "debian/bookworm64", (name, provider)
            assert re.fullmatch(r"12\.\d{8}\.\d+", m["box_version"] or ""), (name, provider, m["box_version"])
            folder = m["synced_folders"]["/vagrant"]
            assert folder["type"] == "rsync" and not folder["disabled"]  # no NFS, no guest additions


@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_topology_left_bridge_right(machines: dict[str, dict[str, Any]], provider: str) -> None:
    left, bridge, right = (data_nics(machines[n][provider]) for n in ("left", "bridge", "right"))
    assert len(left) == 1 and len(right) == 1 and len(bridge) == 2

    # left and right: one subnet, addresses configured by Vagrant, on two different segments
    (lnic,), (rnic,) = left, right
    subnet = {ipaddress.ip_interface(f"{n['ip']}/{n['netmask']}").network for n in (lnic, rnic)}
    assert subnet == {ipaddress.ip_network("10.77.0.0/24")}
    assert (lnic["ip"], rnic["ip"]) == ("10.77.0.1", "10.77.0.2")
    assert lnic.get("auto_config", True) and rnic.get("auto_config", True)

    # bridge: no address, not configured, port a on left's segment, port b on right's
    for nic in bridge:
        assert "ip" not in nic and nic["auto_config"] is False
    key = {"libvirt": "libvirt__network_name", "virtualbox": "virtualbox__intnet"}[provider]
    assert lnic[key] != rnic[key]
    assert [n[key] for n in bridge] == [lnic[key], rnic[key]]

    # every data NIC has its own fixed MAC, unicast
    macs = [n["mac"] for n in (lnic, rnic, *bridge)]
    assert len(set(macs)) == 4
    for mac in macs:
        assert re.fullmatch(r"[0-9a-fA-F]{12}", mac), mac
        assert int(mac[:2], 16) & 1 == 0, f"{mac} is a multicast MAC"


def test_libvirt_segments_are_isolated(machines: dict[str, dict[str, Any]]) -> None:
    """No host address, no DHCP, no forwarding: the only way between the segments is nmbridge."""
    for name, providers in machines.items():
        for nic in data_nics(providers["libvirt"]):
            assert nic["libvirt__forward_mode"] == "veryisolated", name
            assert nic["libvirt__dhcp_enabled"] is False, name
            assert nic["libvirt__network_name"] == nic["virtualbox__intnet"]  # one name per segment
        assert providers["libvirt"]["nic_model_type"] in (None, "virtio")  # netmap has native virtio


def test_virtualbox_bridge_nics_are_promiscuous(machines: dict[str, dict[str, Any]]) -> None:
    """VirtualBox gives a NIC only its own frames unless --nicpromiscN is allow-all; N is the
    adapter slot Vagrant picks: the lowest free ones, in network order, after NAT's."""
    bridge = machines["bridge"]["virtualbox"]
    taken = set(bridge["network_adapters"])
    assert taken == {1}  # NAT
    slots = [s for s in range(1, 37) if s not in taken][: len(data_nics(bridge))]
    modifyvm = [c[1] for c in bridge["customizations"] if c[0] == "pre-boot"]
    for slot in slots:  # (Ruby's :id arrives as "id")
        assert ["modifyvm", "id", f"--nicpromisc{slot}", "allow-all"] in modifyvm, slot


@pytest.mark.parametrize("provider", ["libvirt", "virtualbox"])
def test_provisioners_get_the_macs_of_their_nics(machines: dict[str, dict[str, Any]], provider: str) -> None:
    for name, providers in machines.items():
        m = providers[provider]
        by_name = {p["name"]: p for p in m["provisioners"]}
        assert by_name["common"]["path"] == "lab/provision/common.sh"
        nics = data_nics(m)
        if name == "bridge":
            p = by_name["bridge"]
            assert p["path"] == "lab/provision/bridge.sh"
            assert p["args"] == [colon(n["mac"]) for n in nics]
        else:
            p = by_name["host"]
            assert p["path"] == "lab/provision/host.sh"
            assert p["args"] == [colon(nics[0]["mac"]), f"{nics[0]['ip']}/24"]
        for p in m["provisioners"]:
            assert p["type"] == "shell" and (ROOT / p["path"]).is_file(), p
        if name == "bridge":
            assert by_name["bridge"]["env"] == {"NMB_CA_BUNDLE": ""}


def test_a_ca_bundle_for_pip_is_copied_into_the_bridge_vm(tmp_path: Path) -> None:
    """NMBRIDGE_LAB_CA_BUNDLE: behind a TLS-inspecting proxy, pip in `bridge` must trust its CA."""
    bundle = tmp_path / "ca.pem"
    bundle.write_text("-----BEGIN CERTIFICATE-----\n")
    dumped = dump_machines(tmp_path, NMBRIDGE_LAB_CA_BUNDLE=str(bundle))
    for name, providers in dumped.items():
        names = [p["name"] for p in providers["libvirt"]["provisioners"]]
        if name != "bridge":
            assert "ca-bundle" not in names
            continue
        assert names.index("ca-bundle") < names.index("bridge")  # copied before it is used
        by_name = {p["name"]: p for p in providers["libvirt"]["provisioners"]}
        assert by_name["ca-bundle"]["type"] == "file"
        assert by_name["ca-bundle"]["source"] == str(bundle)
        assert by_name["bridge"]["env"] == {"NMB_CA_BUNDLE": by_name["ca-bundle"]["destination"]}


@pytest.mark.parametrize("accel", ["kvm", "qemu"])
def test_libvirt_emulation_without_kvm(tmp_path: Path, accel: str) -> None:
    """Without KVM the domains are plain qemu with an emulated CPU model (the host's is not on
    offer); NMBRIDGE_LAB_ACCEL overrides the Vagrantfile's guess."""
    dumped = dump_machines(tmp_path, NMBRIDGE_LAB_ACCEL=accel)
    for name, providers in dumped.items():
        lv = providers["libvirt"]
        if accel == "qemu":
            assert (lv["driver"], lv["cpu_mode"], lv["cpu_model"]) == ("qemu", "custom", "qemu64"), name
        else:
            assert lv["driver"] != "qemu" and lv["cpu_mode"] != "custom", name


def test_the_management_network_is_the_labs_own(machines: dict[str, dict[str, Any]]) -> None:
    nets = {ipaddress.ip_network(m["libvirt"]["management_network_address"]) for m in machines.values()}
    assert nets == {ipaddress.ip_network("172.30.77.0/24")}
    # never one of the lab's own data subnets
    assert not any(n.overlaps(ipaddress.ip_network("10.77.0.0/24")) for n in nets)


# --- the provisioning scripts -----------------------------------------------------------------


SCRIPTS = sorted(PROVISION.glob("*.sh"))
LAB_SCRIPTS = [*SCRIPTS, ROOT / "lab" / "smoke.sh", ROOT / "lab" / "box" / "build.sh"]


def test_the_three_provisioning_scripts_exist() -> None:
    assert [s.name for s in SCRIPTS] == ["bridge.sh", "common.sh", "host.sh"]


@pytest.mark.parametrize("script", LAB_SCRIPTS, ids=lambda p: p.name)
def test_lab_script_is_strict_bash(script: Path) -> None:
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash\n")
    assert "\nset -euo pipefail\n" in text
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: p.name)
def test_no_command_substitution_hides_a_failure(script: Path) -> None:
    """`set -e` ignores a failing `$(...)` used as an argument (`say "$(nmbridge version)"` once
    let a broken install through): provisioning assigns it to a variable first, which stops."""
    for n, line in enumerate(script.read_text().splitlines(), 1):
        code = line.split("#", 1)[0] if not line.lstrip().startswith("#") else ""
        assert not re.search(r"\b(echo|say|printf)\b[^|;&]*\$\(", code), f"{script.name}:{n}: {line.strip()}"


def test_bridge_provisioning_builds_the_whole_tree_and_hashes_csrc() -> None:
    """What a user's `pip install .` builds: the whole tree (csrc/ included), copied out of the
    synced folder; the source digest leaves out only what a build never reads."""
    text = (PROVISION / "bridge.sh").read_text()
    assert 'cp -a "$src/." "$build/"' in text
    assert '"$venv/bin/pip" install -q "$build"' in text
    digest = text[text.index("digest=$("):text.index("if [", text.index("digest=$("))]
    excluded = set(re.findall(r"! -path '\./([^/*]+)/\*'", digest))
    assert excluded <= {"lab", "tests", "benchmarks", ".git", ".vagrant", "build"}, excluded
    assert "find . -type f" in digest


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck is not installed")
def test_lab_scripts_pass_shellcheck() -> None:
    done = subprocess.run(["shellcheck", *map(str, LAB_SCRIPTS)], capture_output=True, text=True)
    assert done.returncode == 0, done.stdout + done.stderr


# --- the config-writing step --------------------------------------------------------------------

MAC_A, MAC_B = "02:77:00:00:02:01", "02:77:00:00:02:02"


def link(ifname: str, address: str, link_type: str = "ether", **extra: object) -> dict[str, object]:
    """One entry of `ip -j link show`, as iproute2 6.1 (Debian 12) prints it."""
    return {"ifindex": 0, "ifname": ifname, "flags": ["BROADCAST", "MULTICAST"], "mtu": 1500,
            "qdisc": "noop", "operstate": "DOWN", "linkmode": "DEFAULT", "group": "default",
            "txqlen": 1000, "link_type": link_type, "address": address,
            "broadcast": "ff:ff:ff:ff:ff:ff", **extra}


# the bridge VM: loopback, the management NIC, the two data NICs (names as libvirt gives them)
BRIDGE_VM = [
    link("lo", "00:00:00:00:00:00", "loopback"),
    link("ens5", "52:54:00:3a:9c:11"),
    link("ens6", MAC_A),
    link("ens7", MAC_B),
]


def write_config(tmp_path: Path, links: object, *args: str) -> subprocess.CompletedProcess[str]:
    links_file = tmp_path / "links.json"
    links_file.write_text(links if isinstance(links, str) else json.dumps(links))
    return subprocess.run([sys.executable, str(WRITE_CONFIG), "--links", str(links_file), *args],
                          capture_output=True, text=True, timeout=60)


def nmbridge_check(path: Path) -> str:
    """`nmbridge check -c FILE`'s output; fails the test unless it accepts the file."""
    if importlib.util.find_spec("nmbridge.cli") is None:
        pytest.skip("nmbridge.cli is not importable (build nmbridge first: scripts/setup)")
    done = subprocess.run([sys.executable, "-m", "nmbridge", "check", "-c", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    return done.stdout


def test_writes_the_agreed_config_with_afpacket_ports_without_netmap(tmp_path: Path) -> None:
    out = tmp_path / "etc" / "bridge.toml"
    done = write_config(tmp_path, BRIDGE_VM, MAC_A, MAC_B, "-o", str(out),
                        "--netmap-device", str(tmp_path / "no-netmap"))
    assert done.returncode == 0, done.stderr
    assert f"port a ens6 ({MAC_A}), port b ens7 ({MAC_B})" in done.stdout
    assert tomli.loads(out.read_text()) == {
        "bridge": {"name": "lab", "backend": "afpacket"},
        "log": {"format": "json"},
        "pair": [{"name": "left-right", "ports": ["afpacket:ens6", "afpacket:ens7"], "direction": "both"}],
    }
    assert "pair left-right: afpacket:ens6 <-> afpacket:ens7; filters: none" in nmbridge_check(out)


def test_uses_netmap_ports_where_the_netmap_device_exists(tmp_path: Path) -> None:
    device = tmp_path / "netmap"
    device.touch()
    out = tmp_path / "bridge.toml"
    done = write_config(tmp_path, BRIDGE_VM, MAC_A, MAC_B, "-o", str(out), "--netmap-device", str(device))
    assert done.returncode == 0, done.stderr
    data = tomli.loads(out.read_text())
    assert data["bridge"]["backend"] == "netmap"
    assert data["pair"][0]["ports"] == ["netmap:ens6", "netmap:ens7"]
    assert "pair left-right: netmap:ens6 <-> netmap:ens7" in nmbridge_check(out)


def test_every_port_parses_as_a_port_spec(tmp_path: Path) -> None:
    """The floor under `nmbridge check`: each port string is one the backends accept."""
    from nmbridge.backends import PortSpec, parse_spec

    for backend in ("afpacket", "netmap"):
        done = write_config(tmp_path, BRIDGE_VM, MAC_A, MAC_B, "--backend", backend)
        assert done.returncode == 0, done.stderr
        ports = tomli.loads(done.stdout)["pair"][0]["ports"]
        assert [parse_spec(p) for p in ports] == [PortSpec(backend, "ens6"), PortSpec(backend, "ens7")]


def test_macs_match_whatever_their_spelling(tmp_path: Path) -> None:
    vm = [link("eth0", "08:00:27:AA:BB:CC"), link("eth1", "02:77:00:00:02:01"),
          link("eth2", "02:77:00:00:02:02")]
    done = write_config(tmp_path, vm, "027700000201", "02-77-00-00-02-02", "--backend", "afpacket")
    assert done.returncode == 0, done.stderr
    assert tomli.loads(done.stdout)["pair"][0]["ports"] == ["afpacket:eth1", "afpacket:eth2"]


def test_the_walkthroughs_filter_step_gives_a_config_nmbridge_accepts(tmp_path: Path) -> None:
    """lab/README.md appends a filter to the written file; the result must load, with the filter
    on the left-to-right direction only."""
    readme = (ROOT / "lab" / "README.md").read_text()
    m = re.search(r"sudo tee -a /etc/nmbridge/bridge\.toml <<'EOF'\n(.*?)\nEOF\n", readme, re.S)
    assert m, "lab/README.md has no `sudo tee -a /etc/nmbridge/bridge.toml <<'EOF'` step"
    out = tmp_path / "bridge.toml"
    done = write_config(tmp_path, BRIDGE_VM, MAC_A, MAC_B, "-o", str(out), "--backend", "afpacket")
    assert done.returncode == 0, done.stderr
    out.write_text(out.read_text() + m.group(1) + "\n")
    data = tomli.loads(out.read_text())
    assert data["pair"][0]["filter_a_to_b"] == "no-icmp"
    assert data["filter"]["no-icmp"]["rule"] == [{"action": "drop", "ip_proto": "icmp"}]
    summary = nmbridge_check(out)
    assert "filters: a_to_b: no-icmp;" in summary
    assert "filter no-icmp: 1 rule, default pass" in summary


def test_rewriting_is_idempotent_and_keeps_an_edited_file(tmp_path: Path) -> None:
    out = tmp_path / "bridge.toml"
    args = (MAC_A, MAC_B, "-o", str(out), "--backend", "afpacket")
    assert "written;" in write_config(tmp_path, BRIDGE_VM, *args).stdout
    first = out.read_text()
    mtime = out.stat().st_mtime_ns
    done = write_config(tmp_path, BRIDGE_VM, *args)
    assert done.returncode == 0 and "unchanged;" in done.stdout
    assert out.stat().st_mtime_ns == mtime
    assert not out.with_name("bridge.toml.bak").exists()

    edited = first + 'filter_a_to_b = "x"\n'
    out.write_text(edited)
    done = write_config(tmp_path, BRIDGE_VM, *args)
    assert "written (previous kept as bridge.toml.bak)" in done.stdout
    assert out.read_text() == first
    assert out.with_name("bridge.toml.bak").read_text() == edited
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bridge.toml", "bridge.toml.bak", "links.json"]


def error_of(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 1, done.stdout + done.stderr
    assert done.stdout == ""
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("write-config: error: "), done.stderr
    return lines[0]


def test_a_missing_mac_names_the_mac_and_the_interfaces_seen(tmp_path: Path) -> None:
    out = tmp_path / "bridge.toml"
    err = error_of(write_config(tmp_path, BRIDGE_VM[:3], MAC_A, MAC_B, "-o", str(out)))
    assert f"no interface has the right-segment (MAC_B) MAC {MAC_B}" in err
    assert f"ens5 52:54:00:3a:9c:11, ens6 {MAC_A}" in err
    assert "lo " not in err  # loopback has no MAC worth listing
    assert not out.exists()


def test_a_wrong_mac_is_not_matched_by_a_near_one(tmp_path: Path) -> None:
    err = error_of(write_config(tmp_path, BRIDGE_VM, "02:77:00:00:02:03", MAC_B))
    assert "no interface has the left-segment (MAC_A) MAC 02:77:00:00:02:03" in err


@pytest.mark.parametrize("bad", ["", "02:77:00:00:02", "02:77:00:00:02:0g", "02:77-00:00:02:01", "ens6"])
def test_a_malformed_mac_is_refused(tmp_path: Path, bad: str) -> None:
    err = error_of(write_config(tmp_path, BRIDGE_VM, bad, MAC_B))
    assert f"{bad!r} is not a MAC address" in err


def test_the_same_mac_twice_is_refused(tmp_path: Path) -> None:
    err = error_of(write_config(tmp_path, BRIDGE_VM, MAC_A, MAC_A.upper()))
    assert "MAC_A and MAC_B are the same" in err


def test_two_interfaces_with_one_mac_are_refused(tmp_path: Path) -> None:
    vm = [*BRIDGE_VM, link("ens6.10", MAC_A, link="ens6")]
    err = error_of(write_config(tmp_path, vm, MAC_A, MAC_B))
    assert f"2 interfaces have the left-segment (MAC_A) MAC {MAC_A} (ens6, ens6.10)" in err


@pytest.mark.parametrize("text", ["not json", '{"ifname": "eth0"}', '[{"address": "02:77:00:00:02:01"}]'])
def test_an_interface_list_that_is_not_ip_json_is_refused(tmp_path: Path, text: str) -> None:
    err = error_of(write_config(tmp_path, text, MAC_A, MAC_B))
    assert "links.json: " in err and ("ip -j link show" in err or "ifname" in err)
