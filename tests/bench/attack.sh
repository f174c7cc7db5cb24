#!/usr/bin/env bash
# Issue 13: honest load with and without an attacker, per attack, each on a
# fresh mTLS server (development PKI) so its peak memory is that attack's.
# The honest client is the dev `writer`; the attacker has its own identity
# (spiffe://provcache.dev/attacker, granted read and write), so per-identity
# limits tell them apart. Prints the honest p50/p99 alone and under attack,
# how the attacker's rounds ended, and the server's RSS and peak (VmHWM)
# after each run.
#
#   tests/bench/attack.sh [KIND ...]     # default: every domain attack
#   PROVCACHE_BIN=new/provcache SERVER_BIN=old/provcache tests/bench/attack.sh inline-names
#
# The bench client is always $bin (it has --attacker); SERVER_BIN picks the
# server measured (default: $bin too). DURATION (default 5s) is each timed
# part; BENCH_ARGS adds bench flags.
set -euo pipefail
[ $# -gt 0 ] || set -- inline-names directory-amplification half-uploads ranged-reads
# shellcheck source=tests/bench/common.sh
. "$(dirname "${BASH_SOURCE[0]}")/common.sh"
server_bin=${SERVER_BIN:-$bin}

# One development PKI for every run: made by a first start, plus the attacker.
start_provcache pki
kill "$pid"
wait "$pid" 2>/dev/null || true
pki="$work/pki/dev-pki"
"$bin" issue-cert --ca-dir "$pki" --principal spiffe://provcache.dev/attacker --out "$work/attacker" >/dev/null
cp "$pki/policy.toml" "$work/policy.toml"
cat >>"$work/policy.toml" <<'POLICY'

[[rules]]
name = "attacker"
principals = ["spiffe://provcache.dev/attacker"]
instances = ["*"]
permissions = ["ac:read", "ac:write", "cas:read", "cas:write"]
POLICY

for kind in "$@"; do
    # Uploads compete with uploads; the other attacks with Action Cache hits.
    case $kind in
        half-uploads) honest=(--scenario write --size 64KiB) ;;
        *) honest=(--scenario ac-hit --keys 200) ;;
    esac
    mkdir -p "$work/$kind"
    cp -r "$pki" "$work/$kind/dev-pki"
    start_provcache "$kind" --policy "$work/policy.toml"
    echo "== $kind ($server_bin)"
    # shellcheck disable=SC2086
    "$bin" bench --server "$url" --ca "$pki/ca.pem" --cert "$pki/writer.pem" --key "$pki/writer.key" \
        --attacker-cert "$work/attacker.pem" --attacker-key "$work/attacker.key" \
        "${honest[@]}" --concurrency 4 --connections 1 --duration "${DURATION:-5s}" \
        --attacker "$kind" --attackers 2 --server-pid "$pid" ${BENCH_ARGS:-}
    kill "$pid"
    wait "$pid" 2>/dev/null || true
    rm -rf "${work:?}/$kind"
done
