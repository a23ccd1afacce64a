//! Placement through `from_pretrained`: an explicit map over several logical devices gives the
//! same logits as one device; the planner refuses, before loading, what does not fit.

mod common;

use common::*;
use nibble::{BitsAndBytesConfig, DeviceMap, DeviceSpec, Error, Inventory, LoadOptions, Model};

#[test]
fn explicit_map_across_logical_devices_matches_one_device() {
    let map = DeviceMap::parse(
        "model.embed_tokens=cpu,model.layers.0=cpu:1,model.layers.1=cpu:2,model.layers.2=cpu:2,model.norm=cpu:3,lm_head=cpu:3",
    )
    .unwrap();
    let split = nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), map).unwrap();
    let placement = split.llama().placement();
    assert_eq!(placement.layers.len(), 3);
    let one = nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), DeviceMap::Cpu).unwrap();
    let ids = reference_ids();
    assert_eq!(max_abs_diff(&split.logits(&ids).unwrap(), &one.logits(&ids).unwrap()), 0.0);
}

#[test]
fn bad_maps_are_typed_errors() {
    let missing = DeviceMap::parse("model.embed_tokens=cpu,model.layers.0=cpu,model.norm=cpu,lm_head=cpu").unwrap();
    assert!(matches!(
        nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), missing),
        Err(Error::InvalidDeviceMap { .. })
    ));
    // A GPU this machine does not have: never a panic, a typed answer naming the device.
    let gpu = DeviceMap::Device(DeviceSpec::Cuda(0));
    match nibble::from_pretrained(&tiny_model(), BitsAndBytesConfig::nf4(), gpu) {
        Err(Error::DeviceUnavailable { device, .. }) => assert_eq!(device, "cuda:0"),
        other => panic!("expected DeviceUnavailable, got {other:?}"),
    }
}

#[test]
fn planner_refuses_before_loading() {
    let opts = LoadOptions {
        quant: BitsAndBytesConfig::none(),
        inventory: Some(Inventory::simulated(&[], 1 << 20)),
        ..LoadOptions::default()
    };
    match Model::load(&tiny_model(), &opts) {
        Err(Error::OutOfMemory { device, needed, available, .. }) => {
            assert_eq!(device, "cpu");
            assert!(needed > available);
        }
        other => panic!("expected OutOfMemory, got {other:?}"),
    }
}
