#!/usr/bin/env bash
# The server's CPU per call (issue 18's figure that holds on any machine):
# µs of the server process's CPU (utime+stime from /proc/PID/stat) per call,
# 32 calls in flight (h2load -c4 -m8: 4 connections × 8 streams), plaintext,
# for a verified GetActionResult hit, a FindMissingBlobs of 100 digests, an
# UpdateActionResult (synced) and a ByteStream read of 1 MiB. h2load is the
# load generator because it costs far less CPU than the server, so on a
# 2-core machine the server is not starved by its own load. Server A is
# PROVCACHE_BIN, server B is PROVCACHE_BIN_B (default: the same binary);
# ROUNDS (default 3) interleaved A/B rounds; each line prints the median
# µs/call of A and B with the A/B ratio's median and range.
#
#   tests/bench/server-cpu.sh                       # every kind
#   tests/bench/server-cpu.sh ac-hit find-missing   # some
#   PROVCACHE_BIN=new PROVCACHE_BIN_B=old tests/bench/server-cpu.sh
#
# Installs Debian's nghttp2-client (h2load) when it is missing.
set -euo pipefail
kinds=("$@")
[ ${#kinds[@]} -gt 0 ] || kinds=(ac-hit find-missing ac-update read)
rounds=${ROUNDS:-3}
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
need_h2load

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
metrics_a=127.0.0.1:$(free_port)
server_bin=$bin start_provcache a --plaintext-insecure --metrics-listen "$metrics_a"
url_a=${url#grpc://} pid_a=$pid
metrics_b=127.0.0.1:$(free_port)
server_bin=${PROVCACHE_BIN_B:-$bin} start_provcache b --plaintext-insecure --metrics-listen "$metrics_b"
url_b=${url#grpc://} pid_b=$pid

calls() {
    case $1 in
    ac-hit) echo 100000 ;;
    find-missing) echo 30000 ;;
    ac-update) echo 20000 ;;
    read) echo 3000 ;;
    *) echo "server-cpu.sh: unknown kind $1" >&2; exit 2 ;;
    esac
}
ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }
# ok SIDE METHOD: how many calls of METHOD (/service/Method) the server
# finished with gRPC status OK. h2load counts HTTP statuses only, and a gRPC
# error is an HTTP 200 with a grpc-status trailer.
ok() {
    local m="metrics_$1" service=${2#/}
    curl -s "http://${!m}/metrics" | awk -v s="${service%/*}" -v f="${2##*/}" '
        /^grpc_server_handled_total/ && index($0, "grpc_service=\"" s "\"") && index($0, "grpc_method=\"" f "\"") &&
        index($0, "grpc_code=\"OK\"") { n += $NF } END { print n + 0 }'
}
# measure SIDE KIND: prints the server's µs of CPU per call of one run.
measure() {
    local side=$1 kind=$2 u p n t0 t1 out method ok0 ok1
    u="url_$side" p="pid_$side"
    n=$(calls "$kind")
    method=$(cat "$work/$side-$kind.method")
    ok0=$(ok "$side" "$method")
    t0=$(ticks "${!p}")
    out=$(h2load -c4 -m8 -t1 -n "$n" -d "$work/$side-$kind.req" -H 'content-type: application/grpc' \
        -H 'te: trailers' "http://${!u}$method")
    t1=$(ticks "${!p}")
    ok1=$(ok "$side" "$method")
    [ $((ok1 - ok0)) -eq "$n" ] ||
        { echo "server-cpu.sh: $((ok1 - ok0)) of $n $kind calls succeeded: $out" >&2; exit 1; }
    awk -v a="$t0" -v b="$t1" -v n="$n" -v hz="$(getconf CLK_TCK)" 'BEGIN { printf "%.1f\n", (b - a) * 1e6 / hz / n }'
}

printf 'A: %s\nB: %s\n%-13s %12s %12s %s\n' "$bin" "${PROVCACHE_BIN_B:-$bin}" kind 'A us/call' 'B us/call' 'A/B (lowest-highest)'
for kind in "${kinds[@]}"; do
    for side in a b; do
        u="url_$side"
        "$bin" bench --server "grpc://${!u}" --scenario "$kind" --size 1MiB \
            --write-request "$work/$side-$kind.req" >"$work/$side-$kind.method"
        measure "$side" "$kind" >/dev/null # warm-up: caches, connections, compaction
    done
    as=() bs=() rs=()
    for _ in $(seq "$rounds"); do
        a=$(measure a "$kind")
        b=$(measure b "$kind")
        as+=("$a") bs+=("$b") rs+=("$(awk -v a="$a" -v b="$b" 'BEGIN { printf "%.3f", a / b }')")
    done
    ma=$(printf '%s\n' "${as[@]}" | median)
    mb=$(printf '%s\n' "${bs[@]}" | median)
    range=$(printf '%s\n' "${rs[@]}" | sort -g | awk 'NR == 1 { lo = $1 } { hi = $1 } END { printf "%.2f-%.2f", lo, hi }')
    printf '%-13s %12s %12s %.2f (%s)\n' "$kind" "$ma" "$mb" "$(printf '%s\n' "${rs[@]}" | median)" "$range"
done
