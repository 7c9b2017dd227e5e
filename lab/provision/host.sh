#!/usr/bin/env bash
# `left` and `right`: check that the data NIC (found by MAC) has its lab address, which
# Vagrant configured from the Vagrantfile, and stays out of IPv6 autoconfiguration noise.
#
#   host.sh MAC ADDRESS/PREFIX        e.g. host.sh 02:77:00:00:01:01 10.77.0.1/24
#
# Idempotent. Run as root by `vagrant provision`.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MAC ADDRESS/PREFIX" >&2
    exit 2
fi
mac=${1,,}
addr=$2

# the interface whose MAC is $mac: exactly one, or a clear error
names=$(ip -o link show | awk -v mac="$mac" '{
    for (i = 1; i < NF; i++) if ($i == "link/ether" && tolower($(i + 1)) == mac) {
        name = $2; sub(/:$/, "", name); sub(/@.*/, "", name); print name } }')
if [ -z "$names" ]; then
    echo "host: no interface has MAC $mac (the Vagrantfile gives it to this VM's data NIC); have:" >&2
    ip -br link >&2
    exit 1
fi
if [ "$(wc -l <<<"$names")" -ne 1 ]; then
    echo "host: more than one interface has MAC $mac: ${names//$'\n'/ }" >&2
    exit 1
fi
ifname=$names

# Vagrant writes the address into /etc/network/interfaces; if it is not up, say so loudly
# rather than guess: the lab's ping would fail later for no visible reason.
has_addr() { [[ "$(ip -o -4 addr show dev "$ifname")" == *" ${addr} "* ]]; }
if ! has_addr; then
    echo "host: $ifname ($mac) does not have $addr; bringing it up with: ifup $ifname" >&2
    ifup "$ifname" || true
    if ! has_addr; then
        echo "host: $ifname still has no $addr; check /etc/network/interfaces" >&2
        exit 1
    fi
fi

# no router advertisements exist on the segment; skip the solicitations and SLAAC chatter
# so the bridge's counters show the lab's traffic
conf=/etc/sysctl.d/60-nmbridge-lab.conf
want="net.ipv6.conf.${ifname}.disable_ipv6 = 1"
if [ ! -f "$conf" ] || [ "$(cat "$conf")" != "$want" ]; then
    echo "$want" > "$conf"
fi
sysctl -q -p "$conf"

host=$(hostname)
echo "host: $host data NIC $ifname ($mac) has $addr"
