#!/usr/bin/env bash
# Fuzzes nibble's parsers with AFL++ through cargo-afl (docs/reliability.md).
#   bash fuzz/run.sh [TARGET|all] [SECONDS]     default: all targets, 60 s each
# Installs cargo-afl (which builds its own AFL++) when missing, builds the targets with AFL's
# instrumentation, runs each for SECONDS from its committed corpus (fuzz/corpus/TARGET), and
# fails when any run found a crash or a hang (kept under fuzz/out/TARGET/default/).
set -euo pipefail
cd "$(dirname "$0")"
which=${1:-all}
secs=${2:-60}
all=(safetensors config gguf gguf_tokenizer quant_state chat_template serve_request hub_response adapter_config)
if [ "$which" = all ]; then targets=("${all[@]}"); else targets=("$which"); fi

if ! cargo afl --version >/dev/null 2>&1; then
    cargo install cargo-afl --locked --version 0.18.2
fi
# cargo-afl keeps AFL++ (afl-fuzz and the compiler runtime) per rustc version; build it once.
if ! ls "${XDG_DATA_HOME:-$HOME/.local/share}"/afl.rs/rustc-"$(rustc --version | awk '{print $2}')"-*/afl.rs-0.18.2/afl/bin/afl-fuzz >/dev/null 2>&1; then
    cargo afl config --build
fi
# cargo-afl builds at opt-level 3 with one codegen unit unless told: an hour on two cores for
# candle and the HTTP stack. The targets spend their time in nibble's parsers; level 1 is enough.
export AFL_OPT_LEVEL=${AFL_OPT_LEVEL:-1}
cargo afl build --release

# A container has no CPU governor to set and may pipe core dumps elsewhere; neither matters here.
export AFL_SKIP_CPUFREQ=1 AFL_I_DONT_CARE_ABOUT_MISSING_CRASHES=1 AFL_NO_UI=1 AFL_NO_AFFINITY=1
mkdir -p out
failed=0
for t in "${targets[@]}"; do
    out="out/$t"
    rm -rf "$out"
    # -t: a render may use its whole template fuel (about a second); -m: an allocation past 4 GiB
    # aborts, so running out of memory is a crash too.
    cargo afl fuzz -V "$secs" -t 5000 -m 4096 -i "corpus/$t" -o "$out" "target/release/$t" >"out/$t.log" 2>&1 || {
        echo "fuzz $t: afl-fuzz failed to run (see fuzz/out/$t.log)"; tail -20 "out/$t.log"; failed=1; continue; }
    stats="$out/default/fuzzer_stats"
    crashes=$(find "$out/default/crashes" -type f ! -name README.txt | wc -l)
    hangs=$(find "$out/default/hangs" -type f | wc -l)
    execs=$(awk -F: '/^execs_done/ {gsub(/ /, "", $2); print $2}' "$stats")
    corpus=$(awk -F: '/^corpus_count/ {gsub(/ /, "", $2); print $2}' "$stats")
    echo "fuzz $t: ${secs}s, $execs executions, corpus $corpus, $crashes crashes, $hangs hangs"
    if [ "$crashes" -ne 0 ] || [ "$hangs" -ne 0 ]; then failed=1; fi
done
exit "$failed"
