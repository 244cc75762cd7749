#!/usr/bin/env bash
# Takes the scenes of docs/screenshots/ under Xvfb: the real console window with the demo
# fleet (the shop service deployed and started), at 1600×1000 and at 800×500: the topology,
# a migration to the remote site under way, a VM's details, the plan dialog, the charts of
# 30 days, the capacity view, the image library and a new VM from an image. docs/screenshot.png (in the README) is the topology at
# 1600×1000. Usage: scripts/screenshot.sh [OUT_DIR]
#
# The window opens at the screen's origin (Xvfb has no window manager) and the demo's
# layout is fixed, so the clicks below are at known places; look at every scene it writes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-docs/screenshots}
bash scripts/install-deps.sh test
if [ -x "$HOME/.cargo/bin/cargo" ]; then export PATH="$HOME/.cargo/bin:$PATH"; fi
cargo build --workspace --bins
mkdir -p "$out"
work=$(mktemp -d)
console=""
display=:97
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
export DISPLAY=$display XDG_RUNTIME_DIR=$work
trap 'kill $console $xvfb 2>/dev/null || true; rm -rf "$work"' EXIT
./target/debug/dunes-console --demo --data-dir "$work/console" >"$work/console.log" 2>&1 &
console=$!
ctl() { ./target/debug/dunes-console ctl --data-dir "$work/console" "$@"; }
for _ in $(seq 150); do
  if [ "$(ctl --json vms 2>/dev/null | grep -c '"name"')" = 7 ]; then break; fi
  sleep 0.2
done
# An image in the library: a raw disk with a partition table's signature.
python3 -c '
import sys
with open(sys.argv[1], "wb") as f:
    f.truncate(2 << 30); f.seek(510); f.write(b"\x55\xaa")' "$work/debian-12.raw"
ctl image import "$work/debian-12.raw" --name debian-12 >/dev/null
ctl service create -f assets/examples/shop.toml >/dev/null
ctl service deploy shop >/dev/null
ctl service start shop >/dev/null
for _ in $(seq 150); do
  if ctl --json services 2>/dev/null | grep -q '"status": "available"'; then break; fi
  sleep 0.2
done
window=""
for _ in $(seq 100); do
  window=$(xdotool search --name '^Dunes' 2>/dev/null | head -n1 || true)
  [ -n "$window" ] && break
  sleep 0.2
done
[ -n "$window" ] || { echo "the window did not open; see $work/console.log" >&2; exit 1; }

shot() { sleep 1.5; xwd -id "$window" -silent | convert xwd:- "$out/$1.png"; echo "wrote $out/$1.png"; }
click() { xdotool mousemove "$1" "$2" click 1; sleep 0.7; }
key() { xdotool windowfocus --sync "$window"; xdotool key "$@"; sleep 0.7; }
size() { xdotool windowsize "$window" "$1" "$2"; sleep 1.5; }
# Waits until the migration under way has streamed at least a third of its disk.
third_streamed() {
  for _ in $(seq 100); do
    if ctl --json migrations | python3 -c '
import json, sys
open_ = [m for m in json.load(sys.stdin) if m["state"] == "transferring"]
sys.exit(0 if open_ and open_[0]["bytes_done"] * 3 > open_[0]["bytes_total"] > 0 else 1)'; then
      return 0
    fi
    sleep 0.2
  done
  return 1
}

# 1600×1000: every panel docked.
size 1600 1000
shot topology-1600x1000
cp "$out/topology-1600x1000.png" docs/screenshot.png
ctl vm migrate bi-warehouse --to lsn-1 >/dev/null
third_streamed
shot migration-1600x1000
sleep 10
click 443 202            # build-runner on lsn-1 (stopped: its settings are all live)
shot vm-details-1600x1000
click 43 96              # the shop service
click 40 303             # its Plan… button
shot plan-1600x1000
click 193 297            # Close
click 346 101            # lsn-1's card
click 1438 56            # Statistics… in its details
click 291 67             # 30 days
shot charts-1600x1000
key Escape               # closes the charts
click 293 13             # Capacity… in the toolbar
shot capacity-1600x1000
key Escape               # closes the capacity view
click 376 13             # Images… in the toolbar
shot images-1600x1000
key Escape               # closes the image library
key ctrl+n               # the New VM dialog, from an image of the library
xdotool type new-web; sleep 0.5
click 178 113            # Boot from: Image
click 201 136            # the image picker
click 170 162            # debian-12
shot new-vm-image-1600x1000
key Escape               # closes the dialog

# 800×500: the side panels are strips; the details open over the topology.
size 800 500
shot topology-800x500
ctl vm migrate bi-warehouse --to gva-1 >/dev/null
third_streamed
shot migration-800x500
sleep 10
click 180 201            # the crm-db chip
shot vm-details-800x500
key Escape               # folds the details drawer
click 12 80              # the Services strip
click 67 308             # the shop service's Plan… button
shot plan-800x500
key Escape               # closes the plan
key Escape               # folds the services drawer
click 293 13             # Capacity…
shot capacity-800x500
key Escape               # closes the capacity view
click 376 13             # Images…
shot images-800x500
