#!/usr/bin/env bash
# Builds a small bootable Debian 12 disk image from Debian's packages, for the test of a real
# operating system: linux-image-amd64, systemd, cloud-init (NoCloud), openssh-server and
# qemu-guest-agent (which reports the guest's addresses) on
# one ext4 partition, booted by extlinux from the disk's MBR, its console on ttyS0.
# Writes OUT_DIR/debian-12.qcow2 (and keeps it while the recipe is the same).
#
# Needs root (a loop device and a mount) and mmdebstrap, extlinux, syslinux-common, fdisk
# and qemu-utils (scripts/install-deps.sh test installs them).
# Usage: build-debian-image.sh OUT_DIR
set -euo pipefail
OUT_DIR=${1:?usage: build-debian-image.sh OUT_DIR}
RECIPE=3
SIZE_MIB=2048
mkdir -p "$OUT_DIR"
image="$OUT_DIR/debian-12.qcow2"
if [[ -s $image && "$(cat "$OUT_DIR/debian-12.recipe" 2>/dev/null)" == "$RECIPE" ]]; then
    echo "build-debian-image: $image is current"
    exit 0
fi

work=$(mktemp -d)
loop=""
cleanup() {
    mountpoint -q "$work/root" && umount "$work/root"
    [[ -n $loop ]] && losetup -d "$loop"
    rm -rf "$work"
}
trap cleanup EXIT

# The root file system, from Debian's packages.
mmdebstrap --quiet --variant=important --components=main \
    --include=linux-image-amd64,systemd-sysv,cloud-init,openssh-server,qemu-guest-agent,ifupdown,isc-dhcp-client,sudo \
    --customize-hook='echo debian > "$1/etc/hostname"' \
    --customize-hook='printf "/dev/vda1 / ext4 errors=remount-ro 0 1\n" > "$1/etc/fstab"' \
    --customize-hook='chroot "$1" systemctl enable serial-getty@ttyS0.service' \
    --customize-hook='printf "datasource_list: [ NoCloud, None ]\nlocale: false\n" > "$1/etc/cloud/cloud.cfg.d/90-dunes.cfg"' \
    --customize-hook='rm -f "$1/etc/ssh/ssh_host_"*' \
    bookworm "$work/rootfs.tar" http://deb.debian.org/debian

# One bootable partition from 1 MiB, an ext4 file system in it, extlinux in the MBR.
raw="$work/disk.raw"
truncate -s "${SIZE_MIB}M" "$raw"
echo 'start=2048, type=83, bootable' | sfdisk -q "$raw"
dd if=/usr/lib/syslinux/mbr/mbr.bin of="$raw" bs=440 count=1 conv=notrunc status=none
loop=$(losetup -f --show -o $((2048 * 512)) "$raw")
mkfs.ext4 -q -O ^64bit -L root "$loop"
mkdir "$work/root"
mount "$loop" "$work/root"
tar -C "$work/root" -xf "$work/rootfs.tar"
kernel=$(basename "$(ls "$work"/root/boot/vmlinuz-* | sort -V | tail -n1)")
initrd=$(basename "$(ls "$work"/root/boot/initrd.img-* | sort -V | tail -n1)")
mkdir -p "$work/root/boot/extlinux"
cat > "$work/root/boot/extlinux/extlinux.conf" <<EOF
DEFAULT debian
TIMEOUT 0
SERIAL 0 115200
LABEL debian
    LINUX /boot/$kernel
    INITRD /boot/$initrd
    APPEND root=/dev/vda1 ro console=ttyS0,115200 net.ifnames=0
EOF
extlinux --install "$work/root/boot/extlinux" 2>/dev/null
umount "$work/root"
losetup -d "$loop"
loop=""
qemu-img convert -q -O qcow2 "$raw" "$image.tmp"
mv "$image.tmp" "$image"
echo "$RECIPE" > "$OUT_DIR/debian-12.recipe"
printf 'debian-12.qcow2 %8s apparent %8s on disk\n' \
    "$(du -h --apparent-size "$image" | cut -f1)" "$(du -h "$image" | cut -f1)"
