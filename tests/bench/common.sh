# Shared by the benchmark scripts in tests/bench (sourced, not run):
# goes to the repository root, sets $bin (PROVCACHE_BIN, or a release build),
# $work (a temporary directory removed on exit with every server started by
# start_provcache), start_provcache, and the helpers median and need_h2load.
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

bin=${PROVCACHE_BIN:-}
if [ -z "$bin" ]; then
    cargo build --release
    bin="${CARGO_TARGET_DIR:-$root/target}/release/provcache"
fi
work=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap cleanup EXIT

# start_provcache NAME [serve flags ...]: starts `BIN serve --data-dir
# $work/NAME --listen 127.0.0.1:0 FLAGS` (BIN: $server_bin if set, else $bin),
# logs to $work/NAME.log, sets $url (grpc://... or grpcs://...) and $pid.
start_provcache() {
    local name=$1
    shift
    "${server_bin:-$bin}" serve --data-dir "$work/$name" --listen 127.0.0.1:0 "$@" >"$work/$name.log" 2>&1 &
    pid=$!
    pids+=("$pid")
    url=""
    for _ in $(seq 150); do
        url=$(sed -n 's/^provcache listening on \(grpcs*:\/\/.*\)$/\1/p' "$work/$name.log" | head -1)
        [ -n "$url" ] && return 0
        sleep 0.2
    done
    echo "server $name did not start:" >&2
    cat "$work/$name.log" >&2
    exit 1
}

# median: the median of the numbers on stdin, one per line.
median() { sort -g | awk '{ v[NR] = $1 } END { print (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2 }'; }

# need_h2load: installs Debian's nghttp2-client (h2load) when it is missing.
need_h2load() {
    command -v h2load >/dev/null 2>&1 && return 0
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo env DEBIAN_FRONTEND=noninteractive apt-get install -y -q nghttp2-client >/dev/null
}
