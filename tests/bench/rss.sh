#!/usr/bin/env bash
# Goal G9 of docs/performance.md: the server's resident memory while one big
# blob streams in and back out. Starts a plaintext server, samples VmRSS from
# /proc every 100 ms, and runs for each SIZE one `big-write` and one
# `big-read` (which writes a fresh blob, then streams it back and re-hashes
# it). Prints idle RSS, the peak of each phase and the peak over idle.
#
#   tests/bench/rss.sh [SIZE ...]              # default: 256MiB 4GiB
#   PROVCACHE_BIN=path/to/provcache tests/bench/rss.sh 4GiB
#   PROVCACHE_RSS_FLAGS='--store s3://bucket/prefix' tests/bench/rss.sh 4GiB   # a replica
#
# Needs about 2x the largest SIZE free under $TMPDIR (the data directory).
set -euo pipefail
[ $# -gt 0 ] || set -- 256MiB 4GiB
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
# shellcheck disable=SC2086 # the extra flags are words
start_provcache data --plaintext-insecure ${PROVCACHE_RSS_FLAGS:-}
url=${url#grpc://}

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
