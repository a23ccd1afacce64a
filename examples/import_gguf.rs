//! Imports a llama.cpp GGUF file (Llama architecture) to a Hugging Face folder that transformers
//! and nibble load: config.json, model.safetensors (bf16), tokenizer.json, tokenizer_config.json
//! (with the chat template) and generation_config.json.
//!
//! ```text
//! cargo run --release --example import_gguf -- FILE.gguf OUT_DIR
//! ```
//!
//! OUT_DIR must not exist yet; it appears only once complete. `models/fetch-smollm2.sh` uses this
//! to make the default model.

use std::process::ExitCode;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [file, out] = args.as_slice() else {
        eprintln!("usage: import_gguf FILE.gguf OUT_DIR");
        return ExitCode::from(2);
    };
    match nibble::import_gguf(file, out) {
        Ok(()) => {
            println!("imported {file} to {out}");
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
