#!/usr/bin/env bash
# Runs every test: formatting, lints, the dependencies' licences, unit tests, protocol tests
# over real QUIC, end-to-end suites with real agents, the GUI driven by egui_kittest, and a
# real VM under QEMU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh test
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi

# The tiny guest for the real-VM test, built from Debian packages (cached under target/).
export DUNES_GUEST_DIR="$PWD/target/tiny-guest"
bash assets/guest/build-tiny-guest.sh "$DUNES_GUEST_DIR"
# A Debian 12 disk image for the real-OS test, built from Debian's packages (cached too).
export DUNES_DEBIAN_DIR="$PWD/target/debian-image"
bash assets/guest/build-debian-image.sh "$DUNES_DEBIAN_DIR"

# The GUI test renders with wgpu on the CPU; winit wants a runtime dir.
export XDG_RUNTIME_DIR=${XDG_RUNTIME_DIR:-$(mktemp -d)}

cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The dependencies' licences and bans (deny.toml), checked offline. cargo-deny is built once
# into the target dir (a debug build: it takes a few minutes, and checks in a second).
tools="${CARGO_TARGET_DIR:-$PWD/target}/tools"
if [ ! -x "$tools/bin/cargo-deny" ]; then
  cargo install cargo-deny --version 0.20.2 --locked --debug --quiet \
    --root "$tools" --target-dir "$tools/build"
fi
# cargo-deny reads the metadata of every platform's dependencies (a build fetches only this
# one's), so they are fetched first.
cargo fetch --locked --quiet
PATH="$tools/bin:$PATH" cargo deny --offline check licenses bans
# The suites start the real agent binary, so build it first.
cargo build --workspace --bins
log=$(mktemp)
cargo test --workspace --lib --bins --tests -- --test-threads=2 2>&1 | tee "$log"
# One closing line for the whole run.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
rm -f "$log"
