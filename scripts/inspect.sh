#!/usr/bin/env bash
# Show what a running director has pinned, with bpftool: the program, its links (which
# interface, which mode) and every map (type, size, memory). Usage: scripts/inspect.sh [PIN_DIR]
set -euo pipefail
dir=${1:-/sys/fs/bpf/xdplb}
if [ ! -d "$dir" ]; then
    echo "no director pinned under $dir; start one with: xdplb run --config FILE" >&2
    exit 1
fi
echo "== program"
bpftool prog show pinned "$dir/prog_xdplb"
echo "== links"
for link in "$dir"/link_*; do
    [ -e "$link" ] && bpftool link show pinned "$link"
done
echo "== maps"
for map in SERVICES RINGS BACKENDS FLOWS IFACES SERVICE_STATS BACKEND_STATS REASONS; do
    bpftool map show pinned "$dir/$map"
done
echo "== dump one with: bpftool map dump pinned $dir/SERVICES"
