#!/usr/bin/env bash
# Goal G4 of docs/performance.md, checked with an independent client: one
# connection, one request at a time (`h2load -c1 -m1`), GetActionResult hits
# on a plaintext server. A missing TCP_NODELAY shows as a ~40 ms max/mean.
#
#   tests/bench/h2load.sh [REQUESTS]                 # default 20000
#   PROVCACHE_BIN=path/to/provcache tests/bench/h2load.sh
#
# Installs Debian's nghttp2-client (h2load) when it is missing.
set -euo pipefail
requests=${1:-20000}
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_h2load
metrics=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
start_provcache data --plaintext-insecure --metrics-listen "127.0.0.1:$metrics"
url=${url#grpc://}

method=$("$bin" bench --server "grpc://$url" --scenario ac-hit --write-request "$work/request.bin")
h2load -c1 -m1 -n "$requests" -d "$work/request.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' "http://$url$method" |
    grep -E 'finished in|requests:|status codes|time for request|req/s'
# h2load counts HTTP statuses only (a gRPC error is a 200 with a trailer):
# the server's own counters must show every request as a hit.
hits=$(curl -s "http://127.0.0.1:$metrics/metrics" |
    sed -n 's/^provcache_action_cache_lookups_total{result="hit"} \([0-9]*\).*/\1/p')
echo "server: ${hits:-0} Action Cache hits for $requests requests"
[ "${hits:-0}" -ge "$requests" ] || { echo "h2load.sh: not every request was a hit" >&2; exit 1; }
