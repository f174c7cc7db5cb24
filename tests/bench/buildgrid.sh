#!/usr/bin/env bash
# Goal G1 of docs/performance.md: GetActionResult hits against BuildGrid
# 0.9.1 (in-memory, cache only) and against provcache (verification on, mTLS
# off for both), the same `provcache bench` load, interleaved rounds.
#
#   tests/bench/buildgrid.sh [ROUNDS] [DURATION]     # default 3 rounds of 10s
#   PROVCACHE_BIN=path/to/provcache tests/bench/buildgrid.sh
#
# Installs BuildGrid into a virtualenv under $HOME/.cache/provcache/buildgrid
# (it needs Python 3.13: pyenv's, or python3.13 on the PATH).
set -euo pipefail
rounds=${1:-3}
duration=${2:-10s}
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

venv="$HOME/.cache/provcache/buildgrid/venv"
if [ ! -x "$venv/bin/bgd" ]; then
    py=""
    for c in python3.13 "$HOME/.pyenv/versions/"3.13*/bin/python; do
        if [ -x "$(command -v "$c" 2>/dev/null || echo "$c")" ]; then py=$(command -v "$c" 2>/dev/null || echo "$c"); break; fi
    done
    [ -n "$py" ] || { echo "buildgrid.sh: needs Python 3.13 (pyenv install 3.13)" >&2; exit 2; }
    "$py" -m venv "$venv"
    "$venv/bin/pip" install -q buildgrid==0.9.1
fi

# $bin (PROVCACHE_BIN, or a release build), $work and $pids, cleaned up on exit.
# shellcheck source=tests/bench/common.sh
source "$here/common.sh"

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
wait_port() {
    for _ in $(seq 100); do
        if python3 -c "import socket,sys; socket.create_connection(('127.0.0.1', $1), 1)" 2>/dev/null; then return 0; fi
        sleep 0.2
    done
    echo "nothing listens on port $1" >&2
    exit 1
}

bg_port=$(free_port)
sed "s/@PORT@/$bg_port/" "$here/buildgrid.yml" >"$work/buildgrid.yml"
"$venv/bin/bgd" server start "$work/buildgrid.yml" >"$work/buildgrid.log" 2>&1 &
pids+=($!)
pc_port=$(free_port)
"$bin" serve --data-dir "$work/provcache" --listen "127.0.0.1:$pc_port" --plaintext-insecure >"$work/provcache.log" 2>&1 &
pids+=($!)
wait_port "$bg_port"
wait_port "$pc_port"

run() { # name port -> req/s
    "$bin" bench --server "grpc://127.0.0.1:$2" --scenario ac-hit --concurrency 32 --keys 1000 \
        --duration "$duration" 2>&1 | tee -a "$work/bench-$1.log" | awk '/ac-hit/ && /req\/s/ {for (i=1;i<=NF;i++) if ($i=="req/s") print $(i-1)}' | tail -1
}

echo "round provcache_req_s buildgrid_req_s"
pc=() bg=()
for r in $(seq "$rounds"); do
    a=$(run provcache "$pc_port")
    b=$(run buildgrid "$bg_port")
    pc+=("$a")
    bg+=("$b")
    echo "$r $a $b"
done
median() { printf '%s\n' "$@" | sort -g | awk '{v[NR]=$1} END {print (NR%2) ? v[(NR+1)/2] : (v[NR/2]+v[NR/2+1])/2}'; }
m_pc=$(median "${pc[@]}")
m_bg=$(median "${bg[@]}")
echo "median provcache $m_pc req/s, BuildGrid $m_bg req/s, ratio $(awk -v a="$m_pc" -v b="$m_bg" 'BEGIN {printf "%.1f", a/b}')"
