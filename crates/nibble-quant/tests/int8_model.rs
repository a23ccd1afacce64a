//! exploration
use candle_core::{DType, Device, Tensor};
use nibble_quant::{Linear8bit, QuantLinear};

fn st_dtype(d: safetensors::Dtype) -> DType {
    match d {
        safetensors::Dtype::F32 => DType::F32,
        safetensors::Dtype::F16 => DType::F16,
        safetensors::Dtype::BF16 => DType::BF16,
        safetensors::Dtype::I64 => DType::I64,
        o => panic!("{o:?}"),
    }
}

#[test]
#[ignore]
fn explore_capture() {
    let name = std::env::var("CAP").unwrap_or("float16".into());
    let filt = std::env::var("FILT").unwrap_or_default();
    let bytes = std::fs::read(format!("/tmp/int8cap/{name}.safetensors")).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<String> = st.names().into_iter().filter(|n| n.starts_with("cb.")).map(|n| n[3..].to_string()).collect();
    names.sort_by_key(|n| {
        let l: usize = n.split('.').nth(2).unwrap().parse().unwrap();
        (l, n.clone())
    });
    for n in names {
        if !n.contains(&filt) { continue; }
        let cbt = st.tensor(&format!("cb.{n}")).unwrap();
        let cb: Vec<i8> = cbt.data().iter().map(|&b| b as i8).collect();
        let (out_f, in_f) = (cbt.shape()[0], cbt.shape()[1]);
        let scbt = st.tensor(&format!("scb.{n}")).unwrap();
        let scb: Vec<f32> = scbt.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect();
        let xt = st.tensor(&format!("x.{n}")).unwrap();
        let dt = st_dtype(xt.dtype());
        let x = Tensor::from_raw_buffer(xt.data(), dt, xt.shape(), &Device::Cpu).unwrap();
        let yt = st.tensor(&format!("y.{n}")).unwrap();
        let y = Tensor::from_raw_buffer(yt.data(), dt, yt.shape(), &Device::Cpu).unwrap();
        let want: Vec<f32> = y.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let layer = Linear8bit::from_parts(cb, scb, out_f, in_f, 6.0, dt, Device::Cpu).unwrap();
        let got: Vec<f32> = layer.forward(&x).unwrap().to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let xs: Vec<f32> = x.to_dtype(DType::F32).unwrap().flatten_all().unwrap().to_vec1().unwrap();
        let got2 = layer.forward_f32(&xs, xt.shape()[0]).unwrap();
        let xmax = xs.iter().fold(0f32, |m, v| m.max(v.abs()));
        let ncols = (0..in_f).filter(|&c| (0..xt.shape()[0]).any(|r| half::f16::from_f32(xs[r * in_f + c]).to_f32().abs() >= 6.0)).count();
        let diff = got.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let diff2 = got2.iter().zip(&want).filter(|(a, b)| a.to_bits() != b.to_bits()).count();
        let maxd = got.iter().zip(&want).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
        let ymax = want.iter().fold(0f32, |m, v| m.max(v.abs()));
        println!("{n}: rows {} xmax {xmax} outlier cols {ncols} diff {diff}/{} (f32 path {diff2}) maxdiff {maxd} ymax {ymax}", xt.shape()[0], want.len());
    }
}
