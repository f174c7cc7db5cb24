#!/usr/bin/env bash
# A/B ratio of two server configurations, measured in one run (goals G2, G3,
# G5 of docs/performance.md). Starts server A and server B side by side (same
# binary, separate data directories), then runs ROUNDS interleaved rounds of
# `provcache bench` against A, then B, and prints each round, the medians of
# req/s, MB/s, p50 and the server's CPU per call, and the ratio A/B: the median of the per-round ratios (each
# round's A and B ran back to back, so a slow spell of a noisy machine hits
# both) with their spread (lowest–highest, and the middle half).
#
#   tests/bench/ab.sh 'A server flags' 'B server flags' [bench flags ...]
#
# The word `mtls` among a side's flags means: serve mTLS (the default; the
# development PKI is created in its data directory) and connect with the dev
# writer certificate; without it that side is plaintext. Environment: ROUNDS
# (default 7, at least 3), PROVCACHE_BIN, and PROVCACHE_BIN_B to run server B from
# another build (before/after a change; the bench client is always
# PROVCACHE_BIN). Examples:
#
#   # G2: verification on vs off (GetActionResult hits)
#   tests/bench/ab.sh '' '--unsafe-no-verify' --scenario ac-hit --duration 5s
#   # G3: signing on vs off (UpdateActionResult), fsync off on both
#   tests/bench/ab.sh '--unsafe-no-sync' '--unsafe-no-sync --unsafe-no-sign --unsafe-no-verify' \
#       --scenario ac-update --duration 5s
#   # G5: mTLS vs plaintext
#   tests/bench/ab.sh 'mtls' '' --scenario ac-hit --duration 5s
#   tests/bench/ab.sh 'mtls' '' --scenario write --size 1MiB --chunk 64KiB --concurrency 8 --duration 5s
set -euo pipefail
[ $# -ge 2 ] || { sed -n '2,24p' "$0" >&2; exit 2; }
flags_a=$1
flags_b=$2
shift 2
rounds=${ROUNDS:-7}
[ "$rounds" -ge 3 ] || { echo "ab.sh: ROUNDS must be at least 3 for a spread" >&2; exit 2; }
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"

# start SIDE FLAGS: starts a server, sets client_SIDE to the bench's connection flags.
start() {
    local side=$1 flags=$2 mtls=0 args=()
    for f in $flags; do
        if [ "$f" = mtls ]; then mtls=1; else args+=("$f"); fi
    done
    [ "$mtls" = 1 ] || args+=(--plaintext-insecure)
    local server_bin=$bin
    [ "$side" = a ] || server_bin=${PROVCACHE_BIN_B:-$bin}
    start_provcache "$side" "${args[@]}"
    local client="--server $url --server-pid $pid"
    if [ "$mtls" = 1 ]; then
        local pki="$work/$side/dev-pki"
        client="$client --ca $pki/ca.pem --cert $pki/writer.pem --key $pki/writer.key"
    fi
    printf -v "client_$side" '%s' "$client"
}
start a "$flags_a"
start b "$flags_b"

# One round: prints "req/s MB/s p50_ms errors server_us_per_call" of the
# bench's summary line (the server's CPU per call, from its /proc counters).
round() {
    local side=$1 client
    shift
    client="client_$side"
    # shellcheck disable=SC2086
    "$bin" bench ${!client} "$@" | awk '/req\/s/ {
        for (i = 1; i <= NF; i++) { if ($(i+1) == "req/s") r = $i; if ($(i+1) == "MB/s") m = $i; if ($i == "p50") p = $(i+1); if ($i == "errors") e = $(i+1); if ($(i+1) == "us/call") c = $i }
        print r, m, p, e, c; exit }'
}

printf 'A: %s\nB: %s\nbench: %s\n' "${flags_a:-(defaults)}" "${flags_b:-(defaults)}" "$*"
ra=()
rb=()
for i in $(seq "$rounds"); do
    a=$(round a "$@")
    b=$(round b "$@")
    printf 'round %d  A %-32s B %s\n' "$i" "$a" "$b"
    for r in "$a" "$b"; do
        [ "$(echo "$r" | awk '{ print $4 }')" = 0 ] || { echo "ab.sh: a round had errors or no result" >&2; exit 1; }
    done
    ra+=("$a")
    rb+=("$b")
done
col() { printf '%s\n' "${@:2}" | awk -v c="$1" '{ print $c }'; }
# ratios COLUMN: each round's A/B of that column, one per line.
ratios() { paste -d' ' <(col "$1" "${ra[@]}") <(col "$1" "${rb[@]}") | awk '$2 > 0 { print $1 / $2 }'; }
# spread: "median (lowest–highest, middle half q1–q3)" of numbers on stdin.
spread() {
    sort -g | awk '{ v[NR] = $1 }
        function q(p,   x, i) { x = 1 + (NR - 1) * p; i = int(x); return v[i] + (x - i) * (v[i + 1 < NR ? i + 1 : NR] - v[i]) }
        END { if (NR) printf "%.2f (%.2f-%.2f, middle half %.2f-%.2f)", q(0.5), v[1], v[NR], q(0.25), q(0.75) }'
}
summary() {
    local what=$1 c=$2 fmt=$3 a b
    a=$(col "$c" "${ra[@]}" | median)
    b=$(col "$c" "${rb[@]}" | median)
    awk -v a="$a" -v b="$b" -v w="$what" -v f="$fmt" 'BEGIN { printf "median %-6s A " f "  B " f, w, a, b }'
    printf '  A/B %s\n' "$(ratios "$c" | spread)"
}
summary req/s 1 %.0f
awk -v m="$(col 2 "${rb[@]}" | median)" 'BEGIN { exit !(m > 0) }' && summary MB/s 2 %.1f
summary p50ms 3 %.3f
awk -v m="$(col 5 "${ra[@]}" | median)" 'BEGIN { exit !(m > 0) }' && summary us/call 5 %.1f
