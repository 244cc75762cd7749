#!/usr/bin/env bash
# Runs the demo: the console window with three local agents on libvirt's test driver.
# Extra arguments go to dunes-console (for example --headless).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install-deps.sh demo
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --workspace --bins
exec ./target/debug/dunes-console --demo "$@"
