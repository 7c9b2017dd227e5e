#!/usr/bin/env bash
# Every lab VM: the tools the walkthrough uses (ping, tcpdump, ip, ethtool, jq).
# Idempotent: installs only what is missing. Run as root by `vagrant provision`.
set -euo pipefail

export DEBIAN_FRONTEND=noninteractive

# apt-get install when a package is missing; `apt-get update` first, once per run
apt_install() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
    done
    ((${#missing[@]})) || return 0
    if [ -z "${APT_UPDATED:-}" ]; then
        apt-get update -qq
        APT_UPDATED=1
    fi
    echo "installing: ${missing[*]}"
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
}

apt_install iproute2 iputils-ping tcpdump ethtool jq
host=$(hostname)
echo "common: $host ready"
