#!/usr/bin/env bash
# Goal C1 of docs/performance.md: GetActionResult latency as the Action Cache
# grows. For each N, `provcache bench --scenario ac-hit --keys N` stores N
# more entries through the server's real write path (signed, with their
# blobs; the entries accumulate, so the store then holds the sum of all N)
# and, after a pause for the compaction that prefill leaves behind, reads
# back a hot working set of the first 10,000 of them, one call at a time: the
# lookup cost in a store of that size. A last pass stores 100,000
# more and reads each about once (cold lookups: block cache and
# verified-entry cache miss).
#
#   tests/bench/c1.sh [N ...]                  # default: 10000 1000000
#   PROVCACHE_BIN=path/to/provcache tests/bench/c1.sh 10000 1000000 10000000
#
# The server runs with --unsafe-no-sync so the prefill is not bound by fsync
# (reads do not sync). The prefill runs at about 5,000 entries/s here and
# takes about 1.7 KB of disk per entry.
set -euo pipefail
[ $# -gt 0 ] || set -- 10000 1000000
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
start_provcache data --plaintext-insecure --unsafe-no-sync
url=${url#grpc://}

total=0
run() {
    local n=$1 label=$2
    shift 2
    total=$((total + n))
    local start=$SECONDS
    echo "== $label: $n more entries (store: $total), then one client, 20 s"
    "$bin" bench --server "grpc://$url" --scenario ac-hit --keys "$n" --concurrency 1 --connections 1 \
        --duration 20s "$@"
    echo "   (prefill and run: $((SECONDS - start)) s; data directory: $(du -sh "$work/data" | cut -f1))"
}
for n in "$@"; do
    # Large prefills leave compaction work behind: let it finish first.
    run "$n" "hot 10k" --working-set 10000 --settle "$((n / 20000 + 2))s"
done
run 100000 "cold" --settle 10s
