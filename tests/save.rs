//! `save_pretrained` writes the bitsandbytes layout: the NF4 + double-quant save of the tiny model
//! equals, tensor for tensor and byte for byte, the checkpoint transformers + bitsandbytes saved;
//! and loading what nibble saved gives the same logits bit for bit.

mod common;

use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap};
use safetensors::SafeTensors;

#[test]
fn nf4_double_quant_save_equals_bitsandbytes_checkpoint() {
    let model =
        nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4().with_double_quant(true), DeviceMap::Auto)
            .unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path()).unwrap();

    let ours_bytes = std::fs::read(out.path().join("model.safetensors")).unwrap();
    let theirs_bytes = std::fs::read(fixture("tiny-llama-bnb-nf4/model.safetensors")).unwrap();
    let ours = SafeTensors::deserialize(&ours_bytes).unwrap();
    let theirs = SafeTensors::deserialize(&theirs_bytes).unwrap();
    let mut names: Vec<_> = theirs.names();
    names.sort();
    let mut our_names: Vec<_> = ours.names();
    our_names.sort();
    assert_eq!(our_names, names, "tensor names differ");
    for name in names {
        let (a, b) = (ours.tensor(name).unwrap(), theirs.tensor(name).unwrap());
        assert_eq!(a.dtype(), b.dtype(), "{name}: dtype");
        assert_eq!(a.shape(), b.shape(), "{name}: shape");
        if name.contains("quant_state") {
            let pa: serde_json::Value = serde_json::from_slice(a.data()).unwrap();
            let pb: serde_json::Value = serde_json::from_slice(b.data()).unwrap();
            assert_eq!(pa, pb, "{name}: quant_state");
        } else {
            assert!(a.data() == b.data(), "{name}: bytes differ");
        }
    }
    let cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("config.json")).unwrap()).unwrap();
    let reference: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(fixture("tiny-llama-bnb-nf4/config.json")).unwrap()).unwrap();
    assert_eq!(cfg["quantization_config"], reference["quantization_config"]);
    for f in ["tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json"] {
        assert!(out.path().join(f).is_file(), "{f} not copied");
    }
}

fn round_trip(quant: BitsAndBytesConfig) {
    let ids = reference_ids();
    let model = nibble::from_pretrained(&tiny_model(), quant.clone(), DeviceMap::Auto).unwrap();
    let before = model.logits(&ids).unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_pretrained(out.path()).unwrap();
    let reloaded =
        nibble::from_pretrained(out.path().to_str().unwrap(), BitsAndBytesConfig::none(), DeviceMap::Auto).unwrap();
    assert_eq!(reloaded.quantization(), &quant);
    let after = reloaded.logits(&ids).unwrap();
    assert_eq!(max_abs_diff(&before, &after), 0.0, "{quant:?}: logits changed after save/load");
}

#[test]
fn save_then_load_is_identity() {
    round_trip(BitsAndBytesConfig::nf4());
    round_trip(BitsAndBytesConfig::nf4().with_double_quant(true));
    round_trip(BitsAndBytesConfig::fp4());
    round_trip(BitsAndBytesConfig::int8());
    round_trip(BitsAndBytesConfig::nf4().with_blocksize(128).unwrap());
}
