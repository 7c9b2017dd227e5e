#!/usr/bin/env bash
# `bridge`: build and install nmbridge from the synced project folder, write
# /etc/nmbridge/bridge.toml naming the two data NICs (found by MAC), run it as a service.
#
#   bridge.sh MAC_A MAC_B     MAC_A: the NIC on left's segment, MAC_B: the NIC on right's
#
# Idempotent: nmbridge is rebuilt only when its source changed, the config and the unit are
# rewritten only when they differ, and the service is restarted only when one of the three
# changed (or it is not running). Ports are netmap: where /dev/netmap exists, afpacket:
# otherwise, so after loading netmap, `vagrant provision bridge` switches the lab over.
# Run as root by `vagrant provision`.
set -euo pipefail

if [ $# -ne 2 ]; then
    echo "usage: $0 MAC_A MAC_B" >&2
    exit 2
fi
mac_a=${1,,}
mac_b=${2,,}

src=${NMB_SRC:-/vagrant}          # the project, synced by Vagrant
venv=/opt/nmbridge
conf_dir=/etc/nmbridge
conf=$conf_dir/bridge.toml
unit=/etc/systemd/system/nmbridge.service
changed=""                        # why the service must restart, if it must

export DEBIAN_FRONTEND=noninteractive
export PIP_DISABLE_PIP_VERSION_CHECK=1

say() { echo "bridge: $*"; }

if [ ! -f "$src/pyproject.toml" ]; then
    echo "bridge: no nmbridge project in $src (is the synced folder there? try: vagrant rsync bridge)" >&2
    exit 1
fi

# --- packages: Python, a compiler for the Cython extensions, libpcap for pcap filters -----
missing=()
for pkg in python3 python3-venv python3-dev gcc libc6-dev libpcap0.8 iproute2 ethtool; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "ok installed" || missing+=("$pkg")
done
if ((${#missing[@]})); then
    say "installing ${missing[*]}"
    # the package lists `common` fetched minutes ago are good enough (an update costs minutes
    # in an emulated VM); older or missing ones are fetched again
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*_Packages*' -mmin -60 -print -quit)" ]; then
        apt-get update -qq
    fi
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# --- pip behind a TLS-inspecting proxy: the CA bundle the Vagrantfile copied in, if any -----
# (NMBRIDGE_LAB_CA_BUNDLE on the host); kept in /etc/pip.conf for pip run by hand later.
if [ -n "${NMB_CA_BUNDLE:-}" ]; then
    install -D -m 0644 "$NMB_CA_BUNDLE" /usr/local/share/nmbridge-lab/ca-bundle.pem
    printf '[global]\ncert = /usr/local/share/nmbridge-lab/ca-bundle.pem\n' > /etc/pip.conf
    say "pip trusts the CA bundle given by NMBRIDGE_LAB_CA_BUNDLE"
fi

# --- nmbridge in a venv, rebuilt when the source changed ----------------------------------
# What a user's `pip install .` of a clone builds: the whole synced tree, copied to a build
# directory outside it (build output never lands in /vagrant). setup.py refuses to build when
# an extension's source is missing. The digest covers every file that can go into the build:
# the whole tree but for the parts a build never reads (the lab itself, tests, benchmarks).
[ -x "$venv/bin/python" ] || python3 -m venv "$venv"
stamp=$venv/.nmbridge-source.sha256
digest=$(cd "$src" && find . -type f \
            ! -path './lab/*' ! -path './tests/*' ! -path './benchmarks/*' ! -path './.git/*' \
            ! -path './.vagrant/*' ! -path '*/__pycache__/*' ! -path './build/*' \
            ! -name '*.so' ! -name '*.pyc' -print0 \
         | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -d' ' -f1)
if [ "$(cat "$stamp" 2>/dev/null || true)" != "$digest" ] || ! "$venv/bin/nmbridge" version >/dev/null 2>&1; then
    say "building and installing nmbridge from $src into $venv (compiles the extensions)"
    build=$(mktemp -d)
    trap 'rm -rf "$build"' EXIT
    cp -a "$src/." "$build/"
    rm -rf "$build/.vagrant" "$build/.git" "$build/build"
    "$venv/bin/pip" install -q "$build"
    echo "$digest" > "$stamp"
    changed+=" package"
fi
ln -sfn "$venv/bin/nmbridge" /usr/local/bin/nmbridge
# (an assignment, so that `set -e` stops here when nmbridge cannot even start)
version=$(nmbridge version)
say "$version"

# --- the config: the two data NICs by MAC, netmap: or afpacket: ------------------------------
mkdir -p "$conf_dir"
before=$(sha256sum "$conf" 2>/dev/null || true)
python3 "$src/lab/write-config.py" "$mac_a" "$mac_b" -o "$conf"
[ "$(sha256sum "$conf")" = "$before" ] || changed+=" config"
nmbridge check -c "$conf"

# The data NICs are bridge ports: no IPv6 link-local address, no solicitations of their own.
sysctl_conf=/etc/sysctl.d/60-nmbridge-lab.conf
want=""
for mac in "$mac_a" "$mac_b"; do
    # the name `ip` shows with link/ether $mac (write-config.py found exactly one)
    dev=$(ip -o link show | awk -v mac="$mac" '{
        for (i = 1; i < NF; i++) if ($i == "link/ether" && tolower($(i + 1)) == mac) {
            name = $2; sub(/:$/, "", name); sub(/@.*/, "", name); print name } }')
    if [ -z "$dev" ]; then
        echo "bridge: no interface has MAC $mac" >&2
        exit 1
    fi
    want+="net.ipv6.conf.${dev}.disable_ipv6 = 1"$'\n'
done
if [ "$(cat "$sysctl_conf" 2>/dev/null || true)"$'\n' != "$want" ]; then
    printf '%s' "$want" > "$sysctl_conf"
fi
sysctl -q -p "$sysctl_conf"

# --- the systemd unit: the project's, or a minimal one until the project has it -------------
tmp_unit=$(mktemp)
if [ -f "$src/etc/systemd/nmbridge.service" ]; then
    cp "$src/etc/systemd/nmbridge.service" "$tmp_unit"
else
    say "$src/etc/systemd/nmbridge.service does not exist yet: installing a minimal unit (root)"
    cat > "$tmp_unit" <<'EOF'
# Minimal unit written by lab/provision/bridge.sh (the project has no etc/systemd/nmbridge.service yet).
[Unit]
Description=nmbridge L2 bridge (lab)
After=network-pre.target
Wants=network-pre.target

[Service]
ExecStart=/usr/local/bin/nmbridge run -c /etc/nmbridge/bridge.toml
ExecReload=/bin/kill -HUP $MAINPID
Restart=on-failure
RestartSec=2s

[Install]
WantedBy=multi-user.target
EOF
fi
if ! cmp -s "$tmp_unit" "$unit"; then
    install -m 0644 "$tmp_unit" "$unit"
    systemctl daemon-reload
    changed+=" unit"
fi
rm -f "$tmp_unit"

# the unit may run as a system user (User=nmbridge) with capabilities instead of root
svc_user=$(sed -n 's/^User=//p' "$unit" | tail -n 1)
if [ -n "$svc_user" ] && [ "$svc_user" != root ] && ! id -u "$svc_user" >/dev/null 2>&1; then
    say "creating system user $svc_user"
    useradd --system --no-create-home --shell /usr/sbin/nologin "$svc_user"
fi
# /dev/netmap for that user's group, where the project ships the rule
if [ -f "$src/etc/udev/60-netmap.rules" ] && ! cmp -s "$src/etc/udev/60-netmap.rules" /etc/udev/rules.d/60-netmap.rules; then
    install -D -m 0644 "$src/etc/udev/60-netmap.rules" /etc/udev/rules.d/60-netmap.rules
    udevadm control --reload
    if [ -e /dev/netmap ]; then udevadm trigger --action=change /dev/netmap; fi
fi

systemctl enable --quiet nmbridge
if [ -n "$changed" ] || ! systemctl is-active --quiet nmbridge; then
    say "(re)starting nmbridge:${changed:- not running}"
    if ! systemctl restart nmbridge || ! systemctl is-active --quiet nmbridge; then
        echo "bridge: nmbridge did not start; its last log lines:" >&2
        journalctl -u nmbridge -n 30 --no-pager -o cat >&2 || true
        exit 1
    fi
fi
state=$(systemctl is-active nmbridge)
ports=$(grep -m1 '^ports' "$conf")
say "nmbridge is $state: $ports"
