#!/usr/bin/env bash
# lab/smoke.sh: boot the Vagrant lab for real under libvirt, check that nmbridge is what joins
# left and right, then destroy it. Prints every step and how long it took.
#
#   sudo lab/smoke.sh        (a Debian 12 host with what scripts/setup installs)
#
# Steps: libvirt (started by hand where no init system runs it) -> the pinned box (already
# registered, downloaded, or else built from Debian packages by lab/box/build.sh and cached)
# -> vagrant up (boot) -> provision left, right, bridge -> ping left->right through the bridge
# -> nmbridge stopped: no reply -> started: replies -> the README's filter applied with
# `nmbridge reload`: no reply, the drops counted -> the README's journal query finds stats
# events -> vagrant destroy -f.
#
# Environment (all optional):
#   NMBRIDGE_LAB_ACCEL=kvm|qemu     default: kvm when a KVM guest really runs here, else qemu
#   NMBRIDGE_LAB_CACHE=DIR          built boxes and the smoke's Vagrant home
#                                   (default /var/cache/nmbridge-lab)
#   NMBRIDGE_LAB_CA_BUNDLE=FILE     the CA bundle pip in the bridge VM trusts (default: the
#                                   host's /etc/ssl/certs/ca-certificates.crt, so a TLS-inspecting
#                                   proxy the host trusts is trusted in the VM too; "" for none)
#   NMBRIDGE_LAB_MIRROR=URL         Debian mirror for a box build (default deb.debian.org)
#   NMBRIDGE_LAB_KEEP=1             leave the VMs running at the end (then: vagrant destroy -f
#                                   with the VAGRANT_* variables the script prints)
set -euo pipefail
cd "$(dirname "$0")/.."
root=$PWD

if [ "$(id -u)" -ne 0 ]; then
    echo "smoke: run as root (it starts libvirt and VMs)" >&2
    exit 1
fi
for tool in vagrant virsh qemu-system-x86_64 ssh rsync; do
    command -v "$tool" >/dev/null || { echo "smoke: $tool is missing; run scripts/setup" >&2; exit 1; }
done
if ! vagrant plugin list 2>/dev/null | grep vagrant-libvirt >/dev/null; then
    echo "smoke: the vagrant-libvirt plugin is missing (Debian: vagrant-libvirt); run scripts/setup" >&2
    exit 1
fi

cache=${NMBRIDGE_LAB_CACHE:-/var/cache/nmbridge-lab}
mkdir -p "$cache"
# one lab at a time on this host: the segments nmb-left/nmb-right have fixed names
exec 9>"$cache/lock"
if ! flock -w 3600 9; then
    echo "smoke: another lab/smoke.sh holds $cache/lock" >&2
    exit 1
fi

run=$(mktemp -d /var/tmp/nmb-smoke.XXXXXX)
export VAGRANT_HOME=$cache/vagrant.d VAGRANT_DOTFILE_PATH=$run/dot-vagrant
export VAGRANT_DEFAULT_PROVIDER=libvirt VAGRANT_CHECKPOINT_DISABLE=1 VAGRANT_NO_COLOR=1
export NMBRIDGE_LAB_CA_BUNDLE=${NMBRIDGE_LAB_CA_BUNDLE-/etc/ssl/certs/ca-certificates.crt}
[ -f "$NMBRIDGE_LAB_CA_BUNDLE" ] || NMBRIDGE_LAB_CA_BUNDLE=""
box_name=$(sed -n 's/^BOX = "\(.*\)"$/\1/p' Vagrantfile)
box_version=$(sed -n 's/^BOX_VERSION = "\(.*\)"$/\1/p' Vagrantfile)
if [ -z "$box_name" ] || [ -z "$box_version" ]; then
    echo "smoke: no BOX/BOX_VERSION in the Vagrantfile" >&2
    exit 1
fi

# --- reporting ---------------------------------------------------------------------------
t0=$(date +%s)
steps=()
step_name=""
step_t0=0
step() {   # step NAME: ends the running step (ok) and starts NAME
    end_step ok
    step_name=$1
    step_t0=$(date +%s)
    echo
    echo "=== smoke: $step_name  [$(date -u +%H:%M:%S)]"
}
end_step() {
    [ -n "$step_name" ] || return 0
    local took=$(($(date +%s) - step_t0))
    steps+=("$(printf '%-60s %5ss  %s' "$step_name" "$took" "$1")")
    echo "--- smoke: $step_name: $1 in ${took}s"
    step_name=""
}
say() { echo "smoke: $*"; }
vg() {   # vagrant, without its progress bars (thousands of them in a log); VG_TIMEOUT=seconds
    timeout "${VG_TIMEOUT:-3600}" vagrant "$@" 2>&1 | sed -u -e 's/\x1b\[K/\n/g' | awk '!/^Progress: / {print; fflush()}'
}
fail() { echo "smoke: FAILED: $*" >&2; exit 1; }

# --- clean-up, whatever happens -----------------------------------------------------------
started_daemons=()
finished=0
vms_created=0
cleanup() {
    local rc=$?
    set +e
    [ "$rc" -eq 0 ] || end_step FAILED
    local d n
    if ((vms_created)); then
        if [ "${NMBRIDGE_LAB_KEEP:-0}" = 1 ]; then
            say "NMBRIDGE_LAB_KEEP=1: the lab stays up; to take it down:"
            say "  cd $root && VAGRANT_HOME=$VAGRANT_HOME VAGRANT_DOTFILE_PATH=$VAGRANT_DOTFILE_PATH vagrant destroy -f"
        else
            step "vagrant destroy -f"
            vg destroy -f
            local drc=$?
            end_step "$([ "$drc" -eq 0 ] && echo ok || echo FAILED)"
            # what vagrant-libvirt leaves when a run dies half-way: this run's domains and
            # networks (only once this run created them: never a lab of the user's)
            for d in $(virsh list --all --name 2>/dev/null | grep -E "^$(basename "$root")_(left|bridge|right)$"); do
                virsh destroy "$d" >/dev/null 2>&1; virsh undefine "$d" --remove-all-storage >/dev/null 2>&1
                say "removed leftover domain $d"
            done
            for n in nmb-left nmb-right nmb-mgmt; do
                if virsh net-info "$n" >/dev/null 2>&1; then
                    virsh net-destroy "$n" >/dev/null 2>&1; virsh net-undefine "$n" >/dev/null 2>&1
                    say "removed leftover network $n"
                fi
            done
        fi
    fi
    if [ "${NMBRIDGE_LAB_KEEP:-0}" != 1 ]; then
        for d in "${started_daemons[@]}"; do
            if [ -f "/run/$d.pid" ]; then
                kill "$(cat "/run/$d.pid")" 2>/dev/null && say "stopped $d (started by this script)"
            fi
        done
        rm -rf "$run"
    fi
    echo
    echo "=== smoke: summary ($(($(date +%s) - t0))s in all)"
    printf '%s\n' "${steps[@]}"
    if [ "$rc" -eq 0 ] && ((finished)); then
        echo "=== smoke: PASSED"
    else
        [ "$rc" -ne 0 ] || rc=1
        echo "=== smoke: FAILED (exit $rc)"
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT
trap 'exit 143' TERM

# --- 1. libvirt ---------------------------------------------------------------------------
step "libvirt daemons and the default storage pool"
if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    if [ "$(cat /proc/1/comm 2>/dev/null)" = systemd ]; then
        systemctl start libvirtd virtlogd || fail "systemctl start libvirtd virtlogd"
    else
        # no init system to start them (a container): run the daemons by hand, as root, with no
        # security driver (no AppArmor/SELinux here) and qemu running as root
        say "no systemd: starting virtlogd and libvirtd by hand; /etc/libvirt/qemu.conf: user/group root, security_driver none"
        conf=/etc/libvirt/qemu.conf
        if ! grep -q '^# nmbridge lab/smoke.sh' "$conf"; then
            printf '\n# nmbridge lab/smoke.sh: libvirtd started by hand, no init system, no LSM\nuser = "root"\ngroup = "root"\nsecurity_driver = "none"\n' >> "$conf"
        fi
        # (9>&-: the daemons must not inherit the lock this script holds)
        pgrep -x virtlogd >/dev/null || { virtlogd -d 9>&- && started_daemons+=(virtlogd); }
        pgrep -x libvirtd >/dev/null || { libvirtd -d 9>&- && started_daemons+=(libvirtd); }
    fi
    for _ in $(seq 60); do
        virsh -c qemu:///system version >/dev/null 2>&1 && break
        sleep 1
    done
    virsh -c qemu:///system version >/dev/null || fail "libvirtd does not answer"
fi
if ! virsh pool-info default >/dev/null 2>&1; then
    virsh pool-define-as default dir --target /var/lib/libvirt/images >/dev/null
    virsh pool-build default >/dev/null
    virsh pool-autostart default >/dev/null
fi
# (never `... | grep -q` under pipefail: grep leaving early fails the writer with SIGPIPE)
pool=$(virsh pool-info default)
grep -q 'State: *running' <<<"$pool" || virsh pool-start default >/dev/null
for n in nmb-left nmb-right; do
    if virsh net-info "$n" >/dev/null 2>&1; then
        fail "libvirt network $n exists already (a lab is up on this host?); see virsh net-list --all"
    fi
done
say "$(virsh -c qemu:///system version | grep -m1 'Running hypervisor')"

# --- 2. box --------------------------------------------------------------------------------
box_line="$box_name (libvirt, $box_version)"
box_inputs=$(cd lab/box && find . -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum | sha256sum | cut -c1-16)
registered=$(cat "$cache/registered" 2>/dev/null || true)
box_file=""
step "box $box_line"
if vagrant box list 2>/dev/null | awk -v n="$box_name" -v v="$box_version)" '$1 == n && $2 == "(libvirt," && $3 == v {f = 1} END {exit !f}' && { [ "$registered" = downloaded ] || [ "$registered" = "$box_inputs" ]; }; then
    say "registered already ($registered) in $VAGRANT_HOME"
else
    if VG_TIMEOUT=1800 vg box add --provider libvirt --box-version "$box_version" "$box_name"; then
        echo downloaded > "$cache/registered"
    else
        say "the pinned box cannot be downloaded: using a local build of lab/box (inputs $box_inputs)"
        box_file=$cache/box-$box_inputs.box
        if [ -f "$box_file" ]; then
            say "cached: $box_file"
        else
            rm -f "$cache"/box-*.box
            lab/box/build.sh "$box_file" "${NMBRIDGE_LAB_MIRROR:-http://deb.debian.org/debian}"
        fi
        # a catalog entry gives the local file the pinned name and version
        printf '{"name": "%s", "versions": [{"version": "%s", "providers": [{"name": "libvirt", "url": "file://%s"}]}]}\n' \
            "$box_name" "$box_version" "$box_file" > "$run/box.json"
        vg box add --force "$run/box.json"
        echo "$box_inputs" > "$cache/registered"
        # vagrant-libvirt keeps an uploaded copy of the box image in the pool: drop a stale one
        for vol in $(virsh vol-list default 2>/dev/null | awk '/_vagrant_box_image_/ {print $1}'); do
            virsh vol-delete --pool default "$vol" >/dev/null && say "removed the pool's old copy $vol"
        done
    fi
fi

# --- 3. accelerator: a probe boots the box's kernel ------------------------------------
step "accelerator: KVM or plain qemu"
accel=${NMBRIDGE_LAB_ACCEL:-auto}
if [ "$accel" = auto ]; then
    # /dev/kvm can exist where a guest cannot run (nested, no vmx/svm): run one for real, a
    # kernel with no disk, and look for its first console line
    kernel=""
    for k in /boot/vmlinuz-"$(uname -r)" /boot/vmlinuz "$VAGRANT_HOME/boxes/${box_name//\//-VAGRANTSLASH-}/$box_version/libvirt/vmlinuz"; do
        [ -f "$k" ] && { kernel=$k; break; }
    done
    probe=""
    if [ -e /dev/kvm ] && [ -n "$kernel" ]; then
        probe=$(timeout 20 qemu-system-x86_64 -accel kvm -cpu host -m 256 -nodefaults -display none \
                    -serial stdio -no-reboot -kernel "$kernel" -append "console=ttyS0 panic=-1" \
                    </dev/null 2>&1 || true)
    fi
    if grep -q "Linux version" <<<"$probe"; then
        accel=kvm
    else
        accel=qemu
        [ -e /dev/kvm ] || say "no /dev/kvm"
        [ -n "$kernel" ] || say "no kernel to probe KVM with: assuming it does not work"
        [ -z "$probe" ] || say "a KVM guest did not boot here: $(head -c 300 <<<"$probe" | tr '\n' ' ')"
    fi
fi
export NMBRIDGE_LAB_ACCEL=$accel
say "accelerator: $accel ($([ "$accel" = kvm ] && echo KVM || echo 'plain qemu emulation, TCG: slow'))"

# --- 4. boot ------------------------------------------------------------------------------
step "vagrant up --no-provision (boot left, bridge, right)"
vms_created=1
vg up --no-provision
vagrant ssh-config > "$run/ssh_config"
on() {  # on VM COMMAND...: run a command in a VM over ssh (faster than `vagrant ssh -c`)
    local vm=$1
    shift
    ssh -F "$run/ssh_config" -o LogLevel=ERROR "$vm" -- "$@"
}
for vm in left bridge right; do
    info=$(on "$vm" "uname -sr; nproc; grep MemTotal /proc/meminfo" | paste -sd' ')
    say "$vm: $info"
done

# --- 5. provision -------------------------------------------------------------------------
# bridge (the long one: it compiles nmbridge) in the foreground, left and right meanwhile
step "vagrant provision left, right (alongside) and bridge"
provision_bg() {   # provision_bg VM: in the background, output and duration into $run/VM.*
    local vm=$1 s
    s=$(date +%s)
    { vg provision "$vm" > "$run/$vm.log" 2>&1; echo $? > "$run/$vm.rc"; } || true
    echo $(($(date +%s) - s)) > "$run/$vm.took"
}
provision_bg left &
bg_left=$!
provision_bg right &
bg_right=$!
s=$(date +%s)
vg provision bridge
say "bridge provisioned in $(($(date +%s) - s))s"
wait "$bg_left" "$bg_right"
for vm in left right; do
    sed "s/^/[$vm] /" "$run/$vm.log"
    say "$vm provisioned in $(cat "$run/$vm.took")s (exit $(cat "$run/$vm.rc"))"
    [ "$(cat "$run/$vm.rc")" = 0 ] || fail "vagrant provision $vm"
done

# --- 6. the checks --------------------------------------------------------------------------
wait_ping() {  # replies from right again, within 120 s
    local deadline=$(($(date +%s) + 120))
    until on left ping -c 1 -W 2 10.77.0.2 >/dev/null; do
        (($(date +%s) < deadline)) || fail "no reply from right (10.77.0.2) within 120 s"
    done
}
ping_out() {   # ping_out COUNT: the summary line of COUNT pings from left to right
    on left ping -c "$1" -i 0.5 -W 1 10.77.0.2 | grep 'packets transmitted' || true
}
filtered() {   # frames the pair's a->b filter dropped, from `nmbridge stats --json`
    on bridge sudo nmbridge stats --json | python3 -c \
        'import json, sys; print(json.load(sys.stdin)["snapshot"]["pairs"][0]["directions"]["a_to_b"].get("dropped", {}).get("filtered", 0))'
}

step "ping left -> right through the bridge"
wait_ping
out=$(ping_out 5)
say "$out"
[[ $out == "5 packets transmitted, 5 received"* ]] || fail "ping left -> right: $out"

step "stop nmbridge: the ping must fail"
on bridge sudo systemctl stop nmbridge
out=$(ping_out 3)
say "$out"
[[ $out == "3 packets transmitted, 0 received"* ]] || fail "ping with nmbridge stopped: $out"

step "start nmbridge: the ping must work again"
on bridge sudo systemctl start nmbridge
wait_ping
out=$(ping_out 3)
say "$out"
[[ $out == "3 packets transmitted, 3 received"* ]] || fail "ping after the restart: $out"

step "the README's filter, applied with nmbridge reload, counted"
filter=$(sed -n "/^sudo tee -a \/etc\/nmbridge\/bridge.toml <<'EOF'\$/,/^EOF\$/p" lab/README.md | sed '1d;$d')
[ -n "$filter" ] || fail "lab/README.md has no 'sudo tee -a /etc/nmbridge/bridge.toml' step"
printf '%s\n' "$filter" | on bridge sudo tee -a /etc/nmbridge/bridge.toml >/dev/null
on bridge sudo nmbridge check -c /etc/nmbridge/bridge.toml
before=$(filtered)
on bridge sudo nmbridge reload
out=$(ping_out 3)
after=$(filtered)
say "$out; filtered a->b: $before -> $after"
[[ $out == "3 packets transmitted, 0 received"* ]] || fail "ping through the no-icmp filter: $out"
((after - before >= 3)) || fail "the filter's drops are not counted: filtered a->b went $before -> $after"
on bridge sudo nmbridge stats

step "the README's journal query: stats events"
# (lab/README.md section 5, as written there)
lines=$(on bridge "sudo journalctl -u nmbridge -o json --no-pager | jq -c '.MESSAGE | fromjson? | select(.event == \"stats\")'")
events=$(grep -c '"event":"stats"' <<<"$lines" || true)
say "$events stats events in the journal; the last:"
say "$(tail -n 1 <<<"$lines")"
((events >= 1)) || fail "journalctl | jq found no stats event"

end_step ok
finished=1
