#!/usr/bin/env bash
# Build a local stand-in for the pinned Vagrant box (libvirt provider) from Debian packages, for
# hosts that cannot download it (offline, air-gapped, or only Debian mirrors and PyPI reachable).
#
#   lab/box/build.sh OUT.box [MIRROR]        (root; needs mmdebstrap, e2fsprogs, qemu-utils)
#
# What the box holds, as the official debian/bookworm64 box does: Debian 12 with its own kernel
# (linux-image-amd64), systemd, the user `vagrant` (password "vagrant", passwordless sudo) who
# accepts Vagrant's insecure key (from Debian's `vagrant` package; Vagrant replaces it on first
# `vagrant up`), sshd, rsync, ifupdown with DHCP on the first NIC (eth0). The root file system is
# one ext4 disk with no partition table, booted directly with the box's kernel and initrd (the
# box's own Vagrantfile hands them to libvirt), so no boot loader and no loop device is needed.
# MIRROR defaults to http://deb.debian.org/debian (security updates come from -security).
set -euo pipefail

if [ $# -lt 1 ] || [ $# -gt 2 ]; then
    echo "usage: $0 OUT.box [MIRROR]" >&2
    exit 2
fi
out=$(realpath -m "$1")
mirror=${2:-http://deb.debian.org/debian}
here=$(cd "$(dirname "$0")" && pwd)
size=${NMB_BOX_DISK_GB:-8}                 # virtual disk size in GB (sparse)

key=""
for k in /usr/share/rubygems-integration/all/gems/vagrant-*/keys/vagrant.pub; do
    [ -f "$k" ] && key=$k
done
if [ -z "$key" ]; then
    echo "box: Vagrant's insecure public key not found (Debian package: vagrant)" >&2
    exit 1
fi
for tool in mmdebstrap mke2fs qemu-img; do
    command -v "$tool" >/dev/null || { echo "box: $tool is missing (Debian: mmdebstrap, e2fsprogs, qemu-utils)" >&2; exit 1; }
done

work=$(mktemp -d /var/tmp/nmb-box.XXXXXX)
trap 'rm -rf "$work"' EXIT
root=$work/root

# The packages of a small Debian server: minbase + boot (kernel, systemd, udev), network
# (ifupdown, DHCP client), what Vagrant needs (sshd, sudo, rsync) and what the official box has.
packages=systemd-sysv,dbus,udev,kmod,linux-image-amd64,initramfs-tools,zstd,openssh-server,sudo,rsync
packages+=,ifupdown,isc-dhcp-client,iproute2,iputils-ping,netbase,ca-certificates,procps,less,nano
echo "box: mmdebstrap bookworm from $mirror"
# (the hooks run in mmdebstrap's shell, where "$1" is the new root: single quotes on purpose)
# shellcheck disable=SC2016
mmdebstrap --mode=root --variant=minbase --include="$packages" \
    --customize-hook='chroot "$1" useradd --create-home --shell /bin/bash --uid 1000 --user-group vagrant' \
    --customize-hook='echo vagrant:vagrant | chroot "$1" chpasswd' \
    --customize-hook='mkdir -p "$1/home/vagrant/.ssh"' \
    --customize-hook="upload $key /home/vagrant/.ssh/authorized_keys" \
    --customize-hook='chroot "$1" sh -c "chown -R vagrant:vagrant /home/vagrant/.ssh && chmod 700 /home/vagrant/.ssh && chmod 600 /home/vagrant/.ssh/authorized_keys"' \
    --customize-hook="cp -R $here/files/. \"\$1/\"" \
    --customize-hook='chmod 0440 "$1/etc/sudoers.d/vagrant"' \
    --customize-hook='rm -f "$1"/etc/ssh/ssh_host_*' \
    --customize-hook='chroot "$1" systemctl enable ssh-hostkeys.service' \
    --customize-hook='rm -f "$1/etc/machine-id" && touch "$1/etc/machine-id"' \
    bookworm "$root" \
    "deb $mirror bookworm main" \
    "deb $mirror bookworm-updates main" \
    "deb ${mirror%/debian}/debian-security bookworm-security main"

mkdir -p "$work/box"
kernels=("$root"/boot/vmlinuz-*)
version=${kernels[-1]#"$root"/boot/vmlinuz-}      # the one kernel linux-image-amd64 brought
cp "$root/boot/vmlinuz-$version" "$work/box/vmlinuz"
cp "$root/boot/initrd.img-$version" "$work/box/initrd.img"

echo "box: ext4 root file system (${size} GB sparse) -> qcow2"
mke2fs -q -t ext4 -L root -d "$root" "$work/root.ext4" "${size}G"
rm -rf "$root"
qemu-img convert -c -O qcow2 "$work/root.ext4" "$work/box/box.img"
rm -f "$work/root.ext4"
printf '{"provider": "libvirt", "format": "qcow2", "virtual_size": %d}\n' "$size" > "$work/box/metadata.json"
cp "$here/Vagrantfile.box" "$work/box/Vagrantfile"

mkdir -p "$(dirname "$out")"
tar -C "$work/box" -cf "$out.tmp" metadata.json Vagrantfile box.img vmlinuz initrd.img
mv "$out.tmp" "$out"
echo "box: $out ($(du -h "$out" | cut -f1))"
