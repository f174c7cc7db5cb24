#!/usr/bin/env bash
# Runs every fuzz target (docs/threat-model.md T15) for SECONDS each
# (default 60), with AddressSanitizer, installing cargo-fuzz if missing.
#
#   tests/fuzz/run.sh 600           # ten minutes per target
#   tests/fuzz/run.sh 60 verify_envelope canonicalize   # only these targets
#
# provcache is built without its `server` feature (no RocksDB), so the
# sanitizer build takes minutes. Corpora and crash artifacts are kept under
# the build directory ($FUZZ_TARGET_DIR, default $CARGO_TARGET_DIR/fuzz or
# ./target/fuzz), so later runs continue from what earlier runs found; the
# committed seeds in tests/fuzz/seeds/<target> are read as well. Exits
# non-zero if any target finds a crash, a panic, a leak, a timeout or OOM.
set -euo pipefail

seconds=${1:-60}
shift || true
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
root="$(cd "$here/../.." && pwd)"
cd "$root"

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-}/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi
# cargo-fuzz passes nightly-only flags (-Zsanitizer=address); the stable
# toolchain accepts them with RUSTC_BOOTSTRAP.
export RUSTC_BOOTSTRAP=1
if ! cargo fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

target_dir="${FUZZ_TARGET_DIR:-${CARGO_TARGET_DIR:-$root/target}/fuzz}"
work="$target_dir/work"
fuzz=(--fuzz-dir tests/fuzz)
if [ "$#" -gt 0 ]; then
    targets=("$@")
else
    mapfile -t targets < <(cargo fuzz list "${fuzz[@]}")
fi

cargo fuzz build "${fuzz[@]}" --target-dir "$target_dir"

failed=()
for t in "${targets[@]}"; do
    corpus="$work/corpus/$t"
    artifacts="$work/artifacts/$t"
    mkdir -p "$corpus" "$artifacts"
    seeds=()
    if [ -d "tests/fuzz/seeds/$t" ]; then
        seeds=("tests/fuzz/seeds/$t")
    fi
    echo "==> fuzz $t for ${seconds}s"
    start=$SECONDS
    if cargo fuzz run "${fuzz[@]}" --target-dir "$target_dir" "$t" "$corpus" "${seeds[@]}" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=2048 -max_len=65536 \
        -artifact_prefix="$artifacts/" -print_final_stats=1 </dev/null; then
        echo "==> fuzz $t: clean for $((SECONDS - start))s ($(find "$corpus" -type f | wc -l) inputs in the corpus)"
    else
        echo "==> fuzz $t FOUND A PROBLEM: see $artifacts" >&2
        failed+=("$t")
    fi
done

if [ "${#failed[@]}" -gt 0 ]; then
    echo "==> fuzz failures: ${failed[*]}" >&2
    exit 1
fi
echo "==> fuzz: ${#targets[@]} targets clean for ${seconds}s each"
