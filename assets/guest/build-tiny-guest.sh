#!/usr/bin/env bash
# Build the Dunes "tiny guest" from Debian packages:
#   OUT_DIR/vmlinuz     stock Debian kernel (linux-image-*-amd64)
#   OUT_DIR/initrd.img  busybox + virtio/ext4 modules + qemu-ga, /init as PID 1
#   OUT_DIR/disk.img    64 MiB sparse raw ext4 data disk (mounted at /data in the guest)
# Idempotent: outputs that already exist are kept (delete them to rebuild).
# Usage: build-tiny-guest.sh OUT_DIR
set -euo pipefail

OUT_DIR=${1:?usage: $0 OUT_DIR}
DISK_MIB=${DISK_MIB:-64}

# Modules in load order; missing dependencies are added automatically (see add_module).
# button + evdev let busybox acpid see the ACPI power button (virsh shutdown --mode acpi).
# virtio_net: the NIC on QEMU's user-mode network (10.0.2.15, gateway 10.0.2.2).
MODULES=(virtio_ring virtio_pci_modern_dev virtio_pci_legacy_dev virtio virtio_pci
         virtio_blk virtio_console virtio_net crc32c_generic jbd2 mbcache crc16 ext4 button evdev)

log() { echo "build-tiny-guest: $*" >&2; }
# mkfs.ext4 and friends live in /usr/sbin, which a normal user's PATH lacks.
export PATH="$PATH:/usr/sbin:/sbin"

mkdir -p "$OUT_DIR"
OUT_DIR=$(cd "$OUT_DIR" && pwd)   # libvirt wants absolute paths

# ---------------------------------------------------------------- packages
# Build needs: busybox-static cpio qemu-guest-agent e2fsprogs (+xz/zstd for compressed modules).
# Running needs: libvirt (no libvirt-daemon-system: it drags systemd units and iptables) + QEMU.
# qemu-utils is pinned to qemu-system-x86's version: a newer (backports) qemu-utils Breaks
# Debian 12's qemu-system-common, and apt would otherwise remove qemu-img.
PKGS=(busybox-static cpio qemu-guest-agent e2fsprogs xz-utils zstd
      libvirt-daemon libvirt-daemon-driver-qemu qemu-system-x86 qemu-utils libvirt-clients)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'install ok installed' || missing+=("$p")
done
if ((${#missing[@]})); then
    sudo=()
    if ((EUID != 0)); then
        command -v sudo >/dev/null || { log "packages missing (${missing[*]}) and no sudo: run as root"; exit 1; }
        sudo=(sudo)
    fi
    qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    if [[ -z $qv || $qv == "(none)" ]]; then
        "${sudo[@]}" apt-get update -qq
        qv=$(apt-cache policy qemu-system-x86 | awk '/Candidate:/ {print $2}')
    fi
    args=()
    for p in "${missing[@]}"; do
        case $p in qemu-system-x86|qemu-utils) args+=("$p=$qv") ;; *) args+=("$p") ;; esac
    done
    # pin qemu-utils too when only qemu-system-x86 is missing (see above)
    [[ " ${args[*]} " == *" qemu-system-x86="* && " ${args[*]} " != *" qemu-utils="* ]] &&
        args+=("qemu-utils=$qv")
    log "installing: ${args[*]}"
    t0=$SECONDS
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends --allow-downgrades "${args[@]}" >&2
    log "apt-get install took $((SECONDS - t0)) s"
fi

WORK=$(mktemp -d /tmp/tiny-guest.XXXXXX)
trap 'rm -rf "$WORK"' EXIT

# ---------------------------------------------------------------- kernel + initrd
# vmlinuz and initrd.img are built together: the modules must match the kernel.
# Bumped whenever the guest's init changes, so that a cached guest is built again.
RECIPE=9
if [[ ! -s $OUT_DIR/vmlinuz || ! -s $OUT_DIR/initrd.img ||
      "$(cat "$OUT_DIR/recipe" 2>/dev/null)" != "$RECIPE" ]]; then
    # The installable kernel is whatever the linux-image-amd64 metapackage depends on.
    resolve_kernel() {
        apt-cache depends linux-image-amd64 2>/dev/null |
            awk '/Depends: linux-image-[0-9]/ {print $2; exit}' || true
    }
    kpkg=$(resolve_kernel)
    if [[ -z $kpkg ]]; then   # empty package lists (fresh containers): fetch them once
        log "refreshing the package lists"
        if ((EUID != 0)); then sudo apt-get update -qq; else apt-get update -qq; fi
        kpkg=$(resolve_kernel)
    fi
    [[ -n $kpkg ]] || { log "cannot resolve linux-image-amd64 from the package lists"; exit 1; }
    log "downloading $kpkg"
    # apt-get download writes into the cwd; _apt cannot write to a 0700 mktemp dir (harmless warning)
    (cd "$WORK" && apt-get download "$kpkg" >&2)
    dpkg -x "$WORK"/"$kpkg"_*.deb "$WORK/k"
    kver=${kpkg#linux-image-}
    moddir=$WORK/k/lib/modules/$kver
    [[ -d $moddir ]] || moddir=$WORK/k/usr/lib/modules/$kver   # newer (usrmerged) packages
    cp "$WORK/k/boot/vmlinuz-$kver" "$OUT_DIR/vmlinuz.tmp"

    R=$WORK/root    # initramfs tree
    # usr/{bin,sbin}: "busybox --install" puts some applets there; var/log: acpid exits without it
    mkdir -p "$R"/{bin,sbin,usr/bin,usr/sbin,etc/acpi/PWRF,proc,sys,dev,run,tmp,data,var/log}
    mkdir -p "$R/lib/modules"
    ln -s /run "$R/var/run"   # qemu-ga's default pidfile and state dir live in /var/run

    # busybox: static, so no libraries; applet symlinks are made at boot (busybox --install).
    cp /bin/busybox "$R/bin/busybox"

    # Kernel modules, uncompressed (busybox insmod cannot read .ko.xz/.ko.zst).
    order=()
    add_module() {   # add_module NAME: copy NAME.ko after its dependencies
        local m=$1 f dep
        for f in "${order[@]}"; do [[ $f == "$m" ]] && return 0; done
        f=$(find "$moddir/kernel" \( -name "$m.ko*" -o -name "${m//_/-}.ko*" \) -print -quit)
        if [[ -z $f ]]; then
            grep -qE "/(${m}|${m//_/-})\.ko$" "$moddir/modules.builtin" && return 0   # built-in
            log "module $m not found in $kpkg"; exit 1
        fi
        case $f in
            *.ko.xz)  xz -dc "$f" ;;
            *.ko.zst) zstd -qdc "$f" ;;
            *.ko.gz)  gzip -dc "$f" ;;
            *)        cat "$f" ;;
        esac > "$R/lib/modules/$m.ko"
        # "depends=" from .modinfo: load those first (modules.dep is not shipped in the .deb)
        for dep in $(tr '\0' '\n' < "$R/lib/modules/$m.ko" | sed -n 's/^depends=//p' | tr ',' ' '); do
            add_module "${dep//-/_}"
        done
        order+=("$m")
    }
    for m in "${MODULES[@]}"; do add_module "$m"; done
    printf '%s\n' "${order[@]}" > "$R/etc/modules"
    log "modules: ${order[*]}"

    # qemu-ga and the shared libraries it links (plus the dynamic loader).
    cp /usr/sbin/qemu-ga "$R/sbin/qemu-ga"
    for lib in $(ldd /usr/sbin/qemu-ga | grep -o '/[^ ]*'); do
        mkdir -p "$R$(dirname "$lib")"; cp -L "$lib" "$R$lib"
    done

    # qemu-ga's guest-shutdown runs "/sbin/shutdown -P|-H|-r +0 MSG". Ask PID 1 (/init) to do
    # an orderly stop with the same signals busybox halt/poweroff/reboot send to init.
    cat > "$R/sbin/shutdown" <<'EOF'
#!/bin/sh
sig=USR2                                  # -P / -h: power off
case " $* " in *" -r "*) sig=TERM ;; *" -H "*) sig=USR1 ;; esac
kill -$sig 1
EOF
    # busybox acpid runs /etc/acpi/PWRF/00000080 when the ACPI power button is pressed.
    cat > "$R/etc/acpi/PWRF/00000080" <<'EOF'
#!/bin/sh
kill -USR2 1
EOF
    # Two small applications the guest runs (what Dunes sees through the guest agent):
    # busybox httpd on 127.0.0.1:8080, and "worker", a job counting seconds.
    mkdir -p "$R/www"
    echo "dunes tiny guest" > "$R/www/index.html"
    cat > "$R/usr/bin/worker" <<'WORKER'
#!/bin/sh
# A small background job of the tiny guest: counts seconds into /run/worker.count.
n=0
while :; do n=$((n+1)); echo $n > /run/worker.count; sleep 1; done
WORKER
    chmod +x "$R/sbin/shutdown" "$R/etc/acpi/PWRF/00000080" "$R/usr/bin/worker"

    cat > "$R/init" <<'EOF'
#!/bin/busybox sh
# PID 1 of the Dunes tiny guest.
/bin/busybox --install -s
export PATH=/sbin:/bin:/usr/sbin:/usr/bin
mount -t proc proc /proc; mount -t sysfs sys /sys; mount -t devtmpfs dev /dev
mkdir -p /dev/pts /dev/virtio-ports; mount -t devpts devpts /dev/pts
exec </dev/console >/dev/console 2>&1
hostname dunes-guest

# Orderly stop: USR2 = poweroff, USR1 = halt, TERM = reboot (what busybox poweroff/halt/reboot
# send to init; /sbin/shutdown and the acpid handler use the same signals).
stop() {
    echo "dunes-guest: stopping ($1)"
    kill $(pidof qemu-ga acpid) 2>/dev/null
    sync; umount /data 2>/dev/null || mount -o remount,ro /data 2>/dev/null; sync
    $1 -f
}
trap 'stop poweroff' USR2; trap 'stop halt' USR1; trap 'stop reboot' TERM

for m in $(cat /etc/modules); do insmod /lib/modules/$m.ko || echo "insmod $m failed"; done

# No udev: wait briefly for devices, create the /dev/virtio-ports/NAME links udev would make.
i=0; while [ $i -lt 50 ] && ! ls /sys/class/virtio-ports/vport* >/dev/null 2>&1; do
    sleep 0.1; i=$((i+1)); done
for p in /sys/class/virtio-ports/vport*; do
    [ -r $p/name ] && ln -sf ../${p##*/} /dev/virtio-ports/$(cat $p/name)
done
i=0; while [ $i -lt 20 ] && [ ! -b /dev/vda ]; do sleep 0.1; i=$((i+1)); done
if [ -b /dev/vda ]; then
    mount -t ext4 /dev/vda /data && echo "dunes-guest: /data mounted" || echo "dunes-guest: /data mount failed"
fi

acpid -c /etc/acpi 2>/dev/null || echo "dunes-guest: no acpid"
# A mark of the guest's own on its disk: written at the first boot, read back at every later
# one (after a migration, on another host), so a test can tell the data came along.
if mountpoint -q /data 2>/dev/null || grep -q ' /data ' /proc/mounts; then
    if [ -s /data/marker ]; then
        echo "dunes-guest: marker found $(cat /data/marker)"
    else
        cat /proc/sys/kernel/random/uuid > /data/marker && sync
        echo "dunes-guest: marker written $(cat /data/marker)"
    fi
fi
ip link set lo up
# On a service network the agent gives the address on the kernel's command line
# (dunes.ip=ADDRESS/PREFIX dunes.gw=GATEWAY dunes.mtu=MTU); otherwise QEMU's user-mode
# network, with its fixed addresses: no DHCP client needed either way.
arg() { sed -n "s/.*dunes\.$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
i=0; while [ $i -lt 50 ] && [ ! -e /sys/class/net/eth0 ]; do sleep 0.1; i=$((i+1)); done
if [ -e /sys/class/net/eth0 ] && [ -n "$(arg ip)" ]; then
    gw=$(arg gw)
    ip link set eth0 mtu "$(arg mtu)" up && ip addr add "$(arg ip)" dev eth0 &&
        ip route add default via "$gw" && echo "nameserver $gw" > /etc/resolv.conf &&
        echo "dunes-guest: network up on $(arg ip)"
elif [ -e /sys/class/net/eth0 ]; then
    ip link set eth0 up && ip addr add 10.0.2.15/24 dev eth0 && ip route add default via 10.0.2.2 &&
        echo "dunes-guest: network up"
fi
httpd -p 127.0.0.1:8080 -h /www && echo "dunes-guest: httpd started"
/usr/bin/worker </dev/null >/dev/null 2>&1 &
# The guest agent last: once it answers, everything above has run (guest-agent readiness).
if [ -e /dev/virtio-ports/org.qemu.guest_agent.0 ]; then
    qemu-ga --daemonize --method=virtio-serial --path=/dev/virtio-ports/org.qemu.guest_agent.0
else
    echo "dunes-guest: no guest agent channel"
fi
# A shell on the serial console for `ctl vm console`, started again whenever it exits.
( while :; do setsid sh -c 'exec sh -i </dev/ttyS0 >/dev/ttyS0 2>&1'; sleep 1; done ) &
# And one on the screen (the first virtual terminal, on the VGA display) for the screen view.
if [ -e /dev/tty1 ]; then
    echo "Dunes tiny guest: this is its screen." >/dev/tty1
    ( while :; do setsid sh -c 'exec sh -i </dev/tty1 >/dev/tty1 2>&1'; sleep 1; done ) &
fi
echo "dunes-guest: ready"
while :; do sleep 3600 & wait $!; done   # "wait" returns on a signal so the traps run promptly
EOF
    chmod +x "$R/init"

    (cd "$R" && find . | cpio -o -H newc -R 0:0 --quiet | gzip -9) > "$OUT_DIR/initrd.img.tmp"
    mv "$OUT_DIR/vmlinuz.tmp" "$OUT_DIR/vmlinuz"
    mv "$OUT_DIR/initrd.img.tmp" "$OUT_DIR/initrd.img"
    echo "$kpkg" > "$OUT_DIR/kernel-version"
    echo "$RECIPE" > "$OUT_DIR/recipe"
fi

# ---------------------------------------------------------------- data disk
# Made on the host so the guest needs no mkfs; sparse, so it costs ~a few MB on disk.
if [[ ! -s $OUT_DIR/disk.img ]]; then
    truncate -s "${DISK_MIB}M" "$OUT_DIR/disk.img.tmp"
    mkfs.ext4 -q -F -L dunes-data "$OUT_DIR/disk.img.tmp"
    mv "$OUT_DIR/disk.img.tmp" "$OUT_DIR/disk.img"
fi

# apparent size and space actually used
for f in vmlinuz initrd.img disk.img; do
    printf '%-11s %8s apparent %8s on disk\n' "$f" \
        "$(du -h --apparent-size "$OUT_DIR/$f" | cut -f1)" "$(du -h "$OUT_DIR/$f" | cut -f1)"
done
