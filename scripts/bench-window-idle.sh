#!/usr/bin/env bash
# The idle cost of the window with the demo fleet, under Xvfb at 1600×1000: frames drawn per
# second (DUNES_FRAME_STATS=1) and the share of a core the console process uses, over
# SECONDS in each scene: nothing selected, a host selected (its details show live readings),
# and a host's charts open (the last hour, asked again every 2 s). Method and figures:
# docs/BENCHMARKS.md.
#   scripts/bench-window-idle.sh [CONSOLE_BINARY] [SECONDS] [CARD_X CARD_Y STATS_X STATS_Y]
# The last four are where lsn-1's card and then the "Statistics…" button of its details are
# (defaults: this release's layout).
set -euo pipefail
cd "$(dirname "$0")/.."
bin=${1:-target/release/dunes-console}
secs=${2:-60}
card=(${3:-346} ${4:-101})
stats=(${5:-1438} ${6:-56})
work=$(mktemp -d)
display=:98
Xvfb $display -screen 0 1600x1000x24 >/dev/null 2>&1 &
xvfb=$!
console=""
export DISPLAY=$display XDG_RUNTIME_DIR=$work DUNES_FRAME_STATS=1
trap 'kill $console $xvfb 2>/dev/null || true; sleep 1; rm -rf "$work"' EXIT
"$bin" --demo --data-dir "$work/console" 2>"$work/stderr" >/dev/null &
console=$!
for _ in $(seq 300); do
  if [ "$("$bin" ctl --data-dir "$work/console" --json vms 2>/dev/null | grep -c '"name"')" = 7 ]; then break; fi
  sleep 0.2
done
window=""
for _ in $(seq 100); do
  window=$(xdotool search --name '^Dunes' 2>/dev/null | head -n1 || true)
  [ -n "$window" ] && break
  sleep 0.2
done
xdotool windowsize "$window" 1600 1000
# Let the start settle: agents connect, the first readings arrive.
sleep 20
ticks=$(getconf CLK_TCK)
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$console/stat"; }
measure() {
  local scene=$1
  local before after lines_before
  lines_before=$(wc -l <"$work/stderr")
  before=$(cpu_ticks)
  sleep "$secs"
  after=$(cpu_ticks)
  # Frames from the 10 s reports that came during the scene.
  local frames
  frames=$(tail -n +"$((lines_before + 1))" "$work/stderr" |
    sed -n 's/.*: \([0-9]*\) frames in \([0-9.]*\) s.*/\1 \2/p' |
    awk '{ f += $1; s += $2 } END { if (s > 0) printf "%.2f", f / s; else print "?" }')
  echo "$scene: $frames frames/s, $(awk -v t=$((after - before)) -v hz="$ticks" -v s="$secs" 'BEGIN { printf "%.1f", 100 * t / hz / s }') % of a core"
}
measure "nothing selected"
xdotool mousemove "${card[0]}" "${card[1]}" click 1
xdotool mousemove 1000 900
sleep 2
measure "a host selected"
xdotool mousemove "${stats[0]}" "${stats[1]}" click 1
xdotool mousemove 1000 900
sleep 2
measure "a host's charts open (1 hour)"
