#!/usr/bin/env bash
# A replica over an object store against the embedded store, and against the
# object store's raw speed (docs/performance.md, "Scale-out"). Starts a
# SeaweedFS (installed by tests/setup.sh) on loopback with one bucket, then:
#   1. tests/bench/ab.sh: a replica (--store, default ac_ttl) vs the embedded
#      store, for hits, FindMissingBlobs of 100 digests, 1 MiB writes and reads;
#      and a replica with ac_ttl 0 (every Action Cache read goes to the bucket)
#      vs one with the default;
#   2. two replicas on the bucket, each under its own bench, vs one;
#   3. one SIZE write and read through a replica vs `bench --scenario
#      raw-store-write,raw-store-read` (the same client library and parts);
#   4. the replica's resident memory while RSS_SIZE streams in and out.
#
#   tests/bench/scale-out.sh [SIZE]         # default 1GiB; RSS_SIZE default 4GiB (0 skips)
#
# Environment: SECTIONS (default "1 2 3 4"), ROUNDS (ab.sh, default 7), DURATION (default 5s),
# PROVCACHE_SEAWEEDFS_DIR (default ~/.cache/provcache/seaweedfs), PROVCACHE_BIN.
set -euo pipefail
size=${1:-1GiB}
rss_size=${RSS_SIZE:-4GiB}
duration=${DURATION:-5s}
sections=" ${SECTIONS:-1 2 3 4} "
want() { [[ "$sections" == *" $1 "* ]]; }
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
# shellcheck source=tests/bench/common.sh
. "$here/common.sh"
weed="${PROVCACHE_SEAWEEDFS_DIR:-$HOME/.cache/provcache/seaweedfs}/bin/weed"
[ -x "$weed" ] || { echo "scale-out.sh: $weed is missing: run tests/setup.sh" >&2; exit 1; }

# SeaweedFS on eight free loopback ports.
read -r -a ports <<<"$(python3 -c '
import socket
socks = [socket.socket() for _ in range(8)]
for s in socks: s.bind(("127.0.0.1", 0))
print(" ".join(str(s.getsockname()[1]) for s in socks))')"
mkdir -p "$work/weed"
"$weed" server -s3 -ip=127.0.0.1 -ip.bind=127.0.0.1 -volume.max=0 -master.volumeSizeLimitMB=512 \
    -master.telemetry=false -s3.port.iceberg=0 -s3.port.lance=0 -dir="$work/weed" \
    -master.port="${ports[0]}" -master.port.grpc="${ports[1]}" -volume.port="${ports[2]}" \
    -volume.port.grpc="${ports[3]}" -filer.port="${ports[4]}" -filer.port.grpc="${ports[5]}" \
    -s3.port="${ports[6]}" -s3.port.grpc="${ports[7]}" >"$work/weed.log" 2>&1 &
pids+=("$!")
export AWS_ENDPOINT_URL="http://127.0.0.1:${ports[6]}" AWS_REGION=us-east-1
export AWS_ACCESS_KEY_ID=bench AWS_SECRET_ACCESS_KEY=bench
store="s3://bench/provcache"
for i in $(seq 120); do
    if [ "$(curl -s -o /dev/null -w '%{http_code}' -X PUT "$AWS_ENDPOINT_URL/bench" || true)" = 200 ] &&
        "$bin" bench --store "$store" --scenario raw-store-write --size 1KiB >/dev/null 2>&1; then
        break
    fi
    [ "$i" -lt 120 ] || { tail -20 "$work/weed.log" >&2; echo "SeaweedFS did not start" >&2; exit 1; }
    sleep 0.5
done
echo "SeaweedFS at $AWS_ENDPOINT_URL, bucket ready; CPU: $(sed -n 's/^model name\s*: //p' /proc/cpuinfo | head -1)"

if want 1; then
echo "== 1. replica (--store) / embedded, A/B"
"$here/ab.sh" "--store $store" '' --scenario ac-hit --duration "$duration"
"$here/ab.sh" "--store $store" '' --scenario find-missing --duration "$duration"
"$here/ab.sh" "--store $store" '' --scenario write --size 1MiB --chunk 64KiB --concurrency 8 --duration "$duration"
"$here/ab.sh" "--store $store" '' --scenario read --size 1MiB --chunk 64KiB --concurrency 8 --duration "$duration"
ttl0="$work/ttl0.toml"
printf 'store = "%s"\n[storage]\nac_ttl = "0s"\n' "$store" >"$ttl0"
echo "== 1b. replica with ac_ttl 0 / replica with the default ac_ttl (hits)"
"$here/ab.sh" "--config $ttl0" "--store $store" --scenario ac-hit --duration "$duration"
fi

start_provcache one --plaintext-insecure --store "$store"
one_url=$url
if want 2; then
echo "== 2. two replicas on one bucket, each under its own bench, vs one"
start_provcache two --plaintext-insecure --store "$store"
two_url=$url
"$bin" bench --server "$one_url" --scenario ac-hit --duration "$duration" | sed 's/^/one replica:   /'
"$bin" bench --server "$one_url" --scenario ac-hit --duration "$duration" >"$work/one.out" &
a=$!
"$bin" bench --server "$two_url" --scenario ac-hit --duration "$duration" >"$work/two.out"
wait "$a"
sed 's/^/two replicas, A: /' "$work/one.out"
sed 's/^/two replicas, B: /' "$work/two.out"
fi

if want 3; then
echo "== 3. $size through a replica vs the object store's raw speed"
"$bin" bench --server "$one_url" --scenario big-write,big-read --size "$size" --chunk 64KiB
"$bin" bench --store "$store" --scenario raw-store-write,raw-store-read --size "$size"
fi

if want 4 && [ "$rss_size" != 0 ]; then
    echo "== 4. replica RSS while $rss_size streams in and out"
    PROVCACHE_RSS_FLAGS="--store $store" "$here/rss.sh" "$rss_size"
fi
