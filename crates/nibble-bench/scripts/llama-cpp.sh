#!/usr/bin/env bash
# Builds llama.cpp's `llama-bench` and `llama-server` from the llama-cpp-python source package on
# PyPI, the peers nibble-bench and serve_bench.py compare against; prints the folder holding them.
#   bash crates/nibble-bench/scripts/llama-cpp.sh [CACHE_DIR]
# CACHE_DIR defaults to $XDG_CACHE_HOME/nibble-bench (~/.cache/nibble-bench); a finished build is
# reused. cmake comes from Debian (apt-get, when root), else from PyPI into a venv in the cache.
set -euo pipefail
# The version and its sha256 as PyPI lists them: the sdist vendors the llama.cpp it binds.
version=0.3.36
sha256=832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e
index=${PIP_INDEX_URL:-https://pypi.org/simple}
cache=${1:-${XDG_CACHE_HOME:-$HOME/.cache}/nibble-bench}
root="$cache/llama-cpp-python-$version"
bin="$root/build/bin"
if [ -x "$bin/llama-bench" ] && [ -x "$bin/llama-server" ]; then
    echo "$bin"
    exit 0
fi
mkdir -p "$cache"
log="$cache/llama-cpp-build.log"
{
    if ! command -v cmake >/dev/null 2>&1; then
        if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
            apt-get install -y cmake || { apt-get update && apt-get install -y cmake; }
        else
            python3 -m venv "$cache/cmake-venv" && "$cache/cmake-venv/bin/pip" install cmake
            export PATH="$cache/cmake-venv/bin:$PATH"
        fi
    fi
    tarball="$cache/llama_cpp_python-$version.tar.gz"
    if ! echo "$sha256  $tarball" | sha256sum -c --status 2>/dev/null; then
        # The simple index names the file's URL; the hash pins its bytes.
        url=$(curl -fsSL "$index/llama-cpp-python/" | grep -o "https://[^\"#]*llama_cpp_python-$version.tar.gz" | head -1)
        [ -n "$url" ] || { echo "llama-cpp-python $version is not on $index"; exit 1; }
        curl -fsSL -o "$tarball.part" "$url"
        echo "$sha256  $tarball.part" | sha256sum -c --status || { echo "sha256 of $url differs"; rm -f "$tarball.part"; exit 1; }
        mv "$tarball.part" "$tarball"
    fi
    rm -rf "$root.part"
    mkdir -p "$root.part"
    tar -xzf "$tarball" -C "$root.part" --strip-components=1
    # CPU only, tuned for this machine (GGML_NATIVE), as a user building it here would, but
    # without AMX: its kernels crash (SIGSEGV in ggml_backend_amx_mul_mat) on the Sapphire
    # Rapids virtual machines these benchmarks run on. Explicit -mno-* flags beat -march=native.
    noamx="-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"
    cmake -S "$root.part/vendor/llama.cpp" -B "$root.part/build" -DCMAKE_BUILD_TYPE=Release \
        -DGGML_NATIVE=ON -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF \
        -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_EXAMPLES=OFF \
        -DCMAKE_C_FLAGS="$noamx" -DCMAKE_CXX_FLAGS="$noamx"
    cmake --build "$root.part/build" --target llama-bench llama-server -j "$(nproc)"
    rm -rf "$root"
    mv "$root.part" "$root"
} >"$log" 2>&1 || { echo "building llama.cpp failed; see $log" >&2; tail -20 "$log" >&2; exit 1; }
echo "$bin"
