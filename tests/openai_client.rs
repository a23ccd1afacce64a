//! `nibble serve` on SmolLM2 NF4 driven by the official `openai` Python client
//! (`tests/openai/test_openai.py`, in a virtual environment that `tests/openai/setup-venv.sh`
//! makes from PyPI): models, chat, a streamed chat equal to the plain answer, completions, 8
//! concurrent greedy requests answering as one by one, each error status, `/metrics`, `/health`.

mod common;

use std::process::Command;

use common::server::Running;
use common::*;
use nibble::{BitsAndBytesConfig, LoadOptions, Model, ModelDtype};

#[test]
fn the_openai_client_talks_to_nibble_serve() {
    let Some(dir) = smollm2_dir() else { return };
    let venv = root().join("target/openai-venv");
    let setup = Command::new("bash").arg(root().join("tests/openai/setup-venv.sh")).arg(&venv).status().unwrap();
    assert!(setup.success(), "could not install the openai client from PyPI");
    // dtype float32: with prefix reuse a prompt's prefill is split where the cache ends, and in
    // bfloat16 a different split can round a logit by an ulp and flip a near-tie between two
    // greedy tokens (docs/serving.md); in float32 the orders agree to far below any gap.
    let load_opts = LoadOptions { quant: BitsAndBytesConfig::nf4(), dtype: ModelDtype::F32, ..LoadOptions::default() };
    let (d1, o1) = (dir.clone(), load_opts.clone());
    let server = Running::start(Some("sekret"), 64, 4 << 20, 2048, move || Model::load(&d1, &o1));
    let full = Running::start(Some("sekret"), 0, 4 << 20, 2048, move || Model::load(&dir, &load_opts));
    let out = Command::new(venv.join("bin/python"))
        .arg(root().join("tests/openai/test_openai.py"))
        .args([server.url(), "sekret".into(), "tiny".into(), full.url()])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    println!("{stdout}{}", String::from_utf8_lossy(&out.stderr));
    assert!(out.status.success() && stdout.contains("all passed"), "the openai client test failed");
}
