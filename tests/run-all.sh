#!/usr/bin/env bash
# The one command that runs the whole test suite, on a fresh machine or in CI:
# installs what the tests need, then formatting, lints and every test,
# including the ones that drive a real Bazel (#[ignore]d in a plain `cargo test`).
# Needs no stdin; works with CI=true.
set -euo pipefail

cd "$(dirname "${BASH_SOURCE[0]}")/.."

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-}/.cargo/bin/cargo" ]; then
    export PATH="$HOME/.cargo/bin:$PATH"
fi

# Always the release profile, as `cargo run --release` uses: the dev profile
# would compile RocksDB (C++, ~20 min on 2 cores) a second time. In CI the build
# directory lives outside the clone and is reused between runs; on a developer's
# machine it is the clone's ./target, shared with `cargo run --release`.
if [ -n "${CI:-}" ]; then
    export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${HOME:?HOME is not set}/.cache/provcache/target}"
    # Cargo names a root package's artifacts the same in every checkout, so a
    # shared build directory may hold provcache built from another clone:
    # drop those (dependencies, RocksDB included, stay).
    cargo clean --release -p provcache >/dev/null 2>&1 || true
fi

summary=()
phase() {
    local name=$1
    shift
    local start=$SECONDS
    echo "==> $name: $*"
    if ! "$@" </dev/null; then
        echo "==> $name FAILED after $((SECONDS - start))s" >&2
        exit 1
    fi
    summary+=("$(printf '%-8s %4ds' "$name" $((SECONDS - start)))")
    echo "==> $name ok in $((SECONDS - start))s"
}

total=$SECONDS
phase setup bash tests/setup.sh
phase fmt cargo fmt --check
phase clippy cargo clippy --release --all-targets -- -D warnings
# `failpoints` adds the crash points the crash tests use (src/failpoint.rs);
# only this test build has them.
phase test cargo test --release --features failpoints -- --include-ignored
# Every fuzz target (tests/fuzz) for PROVCACHE_FUZZ_SECONDS each (default 60;
# 0 skips them). Their sanitizer build leaves RocksDB out and takes a few minutes.
fuzz_seconds=${PROVCACHE_FUZZ_SECONDS:-60}
if [ "$fuzz_seconds" -gt 0 ]; then
    phase fuzz bash tests/fuzz/run.sh "$fuzz_seconds"
fi

echo "==> all passed in $((SECONDS - total))s (target dir: ${CARGO_TARGET_DIR:-./target})"
printf '    %s\n' "${summary[@]}"
