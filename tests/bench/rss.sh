#!/usr/bin/env bash
# Goal G9 of docs/performance.md: the server's resident memory while one big
# blob streams in and back out. Starts a plaintext server, samples VmRSS from
# /proc every 100 ms, and runs for each SIZE one `big-write` and one
# `big-read` (which writes a fresh blob, then streams it back and re-hashes
# it). Prints idle RSS, the peak of each phase and the peak over idle.
#
#   tests/bench/rss.sh [SIZE ...]              # default: 256MiB 4GiB
#   PROVCACHE_BIN=path/to/provcache tests/bench/rss.sh 4GiB
#
# Needs about 2x the largest SIZE free under $TMPDIR (the data directory).
set -euo pipefail
[ $# -gt 0 ] || set -- 256MiB 4GiB
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

bin=${PROVCACHE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release
    bin="${CARGO_TARGET_DIR:-$root/target}/release/provcache"
fi
work=$(mktemp -d)
pid=""
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

"$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 --plaintext-insecure >"$work/log" 2>&1 &
pid=$!
url=""
for _ in $(seq 100); do
    url=$(sed -n 's/^provcache listening on grpc:\/\/\(.*\)$/\1/p' "$work/log" | head -1)
    [ -n "$url" ] && break
    sleep 0.2
done
[ -n "$url" ] || { echo "the server did not start:" >&2; cat "$work/log" >&2; exit 1; }

rss_kib() { awk '/^VmRSS:/ {print $2}' "/proc/$pid/status"; }
sleep 1
idle=$(rss_kib)
printf '%-22s %8s %10s %10s\n' phase MB/s 'peak MB' 'over idle'
mb() { awk -v k="$1" 'BEGIN { printf "%.1f", k / 1024 }'; }
printf '%-22s %8s %10s %10s\n' idle - "$(mb "$idle")" -
for size in "$@"; do
    for scenario in big-write big-read; do
        peak_file="$work/peak"
        echo 0 >"$peak_file"
        (
            peak=0
            while kill -0 "$pid" 2>/dev/null; do
                now=$(rss_kib || echo 0)
                if [ "$now" -gt "$peak" ]; then
                    peak=$now
                    echo "$peak" >"$peak_file"
                fi
                sleep 0.1
            done
        ) &
        sampler=$!
        out=$("$bin" bench --server "grpc://$url" --scenario "$scenario" --size "$size" --chunk 64KiB)
        kill "$sampler" 2>/dev/null || true
        wait "$sampler" 2>/dev/null || true
        peak=$(cat "$peak_file")
        mbs=$(echo "$out" | grep -oE '[0-9.]+ MB/s' | head -1 | cut -d' ' -f1)
        printf '%-22s %8s %10s %10s\n' "$scenario $size" "${mbs:--}" "$(mb "$peak")" "$(mb $((peak - idle)))"
    done
done
