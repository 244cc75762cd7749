#!/usr/bin/env bash
# Installs the Debian 12 packages Dunes needs. Usage: install-deps.sh [build|demo|test]
#   build: compile (libvirt headers)      demo: + what the window needs at run time
#   test:  + Xvfb and xdotool for screenshots, network namespaces (QEMU comes with the tiny guest's recipe)
set -euo pipefail
level=${1:-test}

build=(pkg-config libvirt-dev gcc libc6-dev ca-certificates)
window=(python3 libx11-6 libx11-xcb1 libxcursor1 libxi6 libxrandr2 libxkbcommon-x11-0 libfontconfig1
        libvulkan1 mesa-vulkan-drivers libegl1 libegl-mesa0 libgl1-mesa-dri)
# QEMU, libvirt's daemon library and the guest's ingredients are installed by
# assets/guest/build-tiny-guest.sh, which pins qemu-utils to qemu-system-x86's version.
# dbus-daemon: a private session bus for the desktop-notification test.
# genisoimage: isoinfo reads the cloud-init seeds back, as a second opinion on them.
# nftables: the firewall of service networks (the agents write it); tcpdump: the test that
# looks at what crosses a link.
# mmdebstrap, extlinux, syslinux-common, fdisk: the Debian 12 disk image of the real-OS test
# (assets/guest/build-debian-image.sh). ovmf: UEFI for the VM of that test that asks for it.
vms=(xvfb x11-apps xdotool imagemagick iproute2 nftables tcpdump python3 dbus-daemon genisoimage
     mmdebstrap extlinux syslinux-common fdisk ovmf)

packages=("${build[@]}")
case "$level" in
  build) ;;
  demo) packages+=("${window[@]}") ;;
  test) packages+=("${window[@]}" "${vms[@]}") ;;
  *) echo "usage: $0 [build|demo|test]" >&2; exit 2 ;;
esac

missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null || { echo "missing packages (${missing[*]}) and no sudo: run this as root" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "installing: ${missing[*]}"
  $sudo apt-get update -qq
  $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# qemu:///embed runs QEMU as root but libvirt still looks these up.
if [ "$level" = test ]; then
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  getent group libvirt-qemu >/dev/null || $sudo groupadd --system libvirt-qemu
  getent passwd libvirt-qemu >/dev/null ||
    $sudo useradd --system --gid libvirt-qemu --no-create-home --shell /usr/sbin/nologin libvirt-qemu
fi

# Rust: the toolchain pinned in rust-toolchain.toml, through rustup.
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
if ! command -v cargo >/dev/null; then
  echo "installing Rust with rustup (https://rustup.rs) into $HOME/.cargo"
  sudo=""
  [ "$(id -u)" -eq 0 ] || sudo="sudo"
  command -v curl >/dev/null || {
    $sudo apt-get update -qq
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends curl ca-certificates >/dev/null
  }
  toolchain=$(sed -n 's/^channel = "\(.*\)"/\1/p' "$(dirname "$0")/../rust-toolchain.toml")
  curl --proto '=https' --tlsv1.2 -sSf https://sh.rustup.rs |
    sh -s -- -y --no-modify-path --profile minimal --default-toolchain "$toolchain" -c rustfmt -c clippy ||
    { echo "could not install Rust: install Rust $toolchain with rustup, then run this again" >&2; exit 1; }
fi
