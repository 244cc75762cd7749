#!/usr/bin/env bash
# Takes docs/screenshot.png: the real console window with the demo fleet, under Xvfb.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/screenshot.png}
bash scripts/install-deps.sh test
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --workspace --bins
work=$(mktemp -d)
console=""
display=:97
Xvfb $display -screen 0 1440x900x24 >/dev/null 2>&1 &
xvfb=$!
export DISPLAY=$display XDG_RUNTIME_DIR=$work
trap 'kill $console $xvfb 2>/dev/null || true; rm -rf "$work"' EXIT
./target/debug/dunes-console --demo --data-dir "$work/console" >"$work/console.log" 2>&1 &
console=$!
ctl() { ./target/debug/dunes-console ctl --data-dir "$work/console" "$@"; }
for _ in $(seq 100); do
  if [ "$(ctl --json hosts 2>/dev/null | grep -c '"state": "online"')" = 3 ]; then break; fi
  sleep 0.2
done
# A little life in the picture: the shop service deployed and started, one VM stopped.
ctl service create -f assets/examples/shop.toml >/dev/null
ctl service deploy shop >/dev/null
ctl service start shop >/dev/null
ctl vm stop build-runner --force >/dev/null 2>&1 || true
for _ in $(seq 100); do
  if ctl --json services 2>/dev/null | grep -q '"status": "available"'; then break; fi
  sleep 0.2
done
# Select the service so the details panel has something to show: the console draws its window
# at the screen's origin without a window manager, and the demo's layout is fixed.
xdotool mousemove 150 95 click 1
sleep 1
window=$(xdotool search --name '^Dunes' | head -n1)
xwd -id "$window" -display $display -silent | convert xwd:- "$out"
echo "wrote $out"
