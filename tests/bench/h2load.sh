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
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

if ! command -v h2load >/dev/null 2>&1; then
    sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null
fi
bin=${PROVCACHE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release
    bin="${CARGO_TARGET_DIR:-$root/target}/release/provcache"
fi
work=$(mktemp -d)
pid=""
cleanup() { [ -z "$pid" ] || kill "$pid" 2>/dev/null || true; wait 2>/dev/null || true; rm -rf "$work"; }
trap cleanup EXIT

metrics=$(python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
"$bin" serve --data-dir "$work/data" --listen 127.0.0.1:0 --plaintext-insecure \
    --metrics-listen "127.0.0.1:$metrics" >"$work/log" 2>&1 &
pid=$!
url=""
for _ in $(seq 100); do
    url=$(sed -n 's/^provcache listening on grpc:\/\/\(.*\)$/\1/p' "$work/log" | head -1)
    [ -n "$url" ] && break
    sleep 0.2
done
[ -n "$url" ] || { echo "the server did not start:" >&2; cat "$work/log" >&2; exit 1; }

"$bin" bench --server "grpc://$url" --write-request "$work/request.bin"
h2load -c1 -m1 -n "$requests" -d "$work/request.bin" \
    -H 'content-type: application/grpc' -H 'te: trailers' \
    "http://$url/build.bazel.remote.execution.v2.ActionCache/GetActionResult" |
    grep -E 'finished in|requests:|status codes|time for request|req/s'
# h2load counts HTTP statuses only (a gRPC error is a 200 with a trailer):
# the server's own counters must show every request as a hit.
hits=$(curl -s "http://127.0.0.1:$metrics/metrics" |
    sed -n 's/^provcache_action_cache_lookups_total{result="hit"} \([0-9]*\).*/\1/p')
echo "server: ${hits:-0} Action Cache hits for $requests requests"
[ "${hits:-0}" -ge "$requests" ] || { echo "h2load.sh: not every request was a hit" >&2; exit 1; }
