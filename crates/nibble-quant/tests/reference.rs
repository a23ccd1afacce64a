//! Every reference case written by bitsandbytes 0.50.2 / torch on CPU must be reproduced bit for
//! bit: packed codes, absmax (or its double quantization), code books and dequantized values for
//! 4-bit; codes, scales and outlier columns for LLM.int8().

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use nibble_quant::functional::{
    code_book, dequantize_4bit, dynamic_map, int8_vectorwise_quant, quantize_4bit, Absmax, DoubleQuant, Element,
    Packed4bit, QuantType, NESTED_BLOCKSIZE,
};
use safetensors::{Dtype, SafeTensors};

const QUANT4_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/quant4");
const INT8_DIR: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/int8");
/// bitsandbytes' quantization of SmolLM2-135M layer-0 weights (`int8.*`: what `Int8Params` stores)
/// and the checkpoint weights they came from (`input.*`).
const SMOLLM2_WEIGHTS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../../tests/fixtures/smollm2/real-weights.safetensors");

fn cases(dir: &str) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("reading {dir}: {e}"))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "safetensors"))
        .collect();
    v.sort();
    v
}

struct Case {
    name: String,
    bytes: Vec<u8>,
    meta: HashMap<String, String>,
}

impl Case {
    fn load(path: &Path) -> Self {
        let bytes = std::fs::read(path).unwrap();
        let (_, metadata) = SafeTensors::read_metadata(&bytes).unwrap();
        let meta = metadata.metadata().clone().unwrap_or_default();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        Case { name, bytes, meta }
    }

    fn st(&self) -> SafeTensors<'_> {
        SafeTensors::deserialize(&self.bytes).unwrap()
    }

    fn meta(&self, key: &str) -> &str {
        self.meta.get(key).unwrap_or_else(|| panic!("{}: metadata `{key}` missing", self.name))
    }

    fn has(&self, tensor: &str) -> bool {
        self.st().tensor(tensor).is_ok()
    }

    /// The raw little-endian bytes of a tensor, with its dtype checked.
    fn raw(&self, tensor: &str, dtype: Dtype) -> Vec<u8> {
        let st = self.st();
        let t = st.tensor(tensor).unwrap_or_else(|e| panic!("{}: tensor `{tensor}`: {e}", self.name));
        assert_eq!(t.dtype(), dtype, "{}: dtype of `{tensor}`", self.name);
        t.data().to_vec()
    }

    fn u8s(&self, tensor: &str) -> Vec<u8> {
        self.raw(tensor, Dtype::U8)
    }

    fn i8s(&self, tensor: &str) -> Vec<i8> {
        self.raw(tensor, Dtype::I8).into_iter().map(|b| b as i8).collect()
    }

    fn f32_bits(&self, tensor: &str) -> Vec<u32> {
        self.raw(tensor, Dtype::F32).chunks_exact(4).map(|c| u32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }

    fn f32s(&self, tensor: &str) -> Vec<f32> {
        self.f32_bits(tensor).into_iter().map(f32::from_bits).collect()
    }

    fn u16s(&self, tensor: &str, dtype: Dtype) -> Vec<u16> {
        self.raw(tensor, dtype).chunks_exact(2).map(|c| u16::from_le_bytes([c[0], c[1]])).collect()
    }

    fn i64s(&self, tensor: &str) -> Vec<i64> {
        self.raw(tensor, Dtype::I64).chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().unwrap())).collect()
    }
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// An element type together with how its raw bits compare.
trait Bits: Element {
    const DTYPE: Dtype;
    fn from_raw(raw: &[u8]) -> Vec<Self>;
    fn to_bits64(self) -> u64;
}

impl Bits for f32 {
    const DTYPE: Dtype = Dtype::F32;
    fn from_raw(raw: &[u8]) -> Vec<Self> {
        raw.chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect()
    }
    fn to_bits64(self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Bits for f16 {
    const DTYPE: Dtype = Dtype::F16;
    fn from_raw(raw: &[u8]) -> Vec<Self> {
        raw.chunks_exact(2).map(|c| f16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
    }
    fn to_bits64(self) -> u64 {
        u64::from(self.to_bits())
    }
}

impl Bits for bf16 {
    const DTYPE: Dtype = Dtype::BF16;
    fn from_raw(raw: &[u8]) -> Vec<Self> {
        raw.chunks_exact(2).map(|c| bf16::from_bits(u16::from_le_bytes([c[0], c[1]]))).collect()
    }
    fn to_bits64(self) -> u64 {
        u64::from(self.to_bits())
    }
}

/// Checks one 4-bit case in dtype `T`; returns the list of mismatches (empty when it passes).
fn check_quant4<T: Bits>(case: &Case) -> Vec<String> {
    let mut errs = Vec::new();
    let name = &case.name;
    let quant_type = match case.meta("quant_type") {
        "nf4" => QuantType::Nf4,
        "fp4" => QuantType::Fp4,
        other => panic!("{name}: quant_type {other}"),
    };
    let blocksize: usize = case.meta("blocksize").parse().unwrap();
    let double_quant = case.meta("double_quant") == "true";
    let shape: Vec<usize> = serde_json::from_str(case.meta("shape")).unwrap();
    let numel: usize = shape.iter().product();

    let input = T::from_raw(&case.raw("input", T::DTYPE));
    assert_eq!(input.len(), numel, "{name}: input length");

    // Code books.
    if bits(code_book(quant_type)) != case.f32_bits("quant_map") {
        errs.push(format!("{name}: code_book({quant_type:?}) differs from quant_map"));
    }
    if double_quant && bits(dynamic_map()) != case.f32_bits("nested_quant_map") {
        errs.push(format!("{name}: dynamic_map() differs from nested_quant_map"));
    }

    // Quantization.
    let q = match quantize_4bit(&input, blocksize, quant_type, double_quant) {
        Ok(q) => q,
        Err(e) => return vec![format!("{name}: quantize_4bit failed: {e}")],
    };
    assert_eq!((q.numel, q.blocksize, q.quant_type), (numel, blocksize, quant_type));
    let ref_packed = case.u8s("packed");
    if q.packed != ref_packed {
        let n = q.packed.iter().zip(&ref_packed).filter(|(a, b)| a != b).count();
        errs.push(format!("{name}: packed differs in {n} of {} bytes", ref_packed.len()));
    }
    let ref_absmax = match (&q.absmax, double_quant) {
        (Absmax::F32(v), false) => {
            let r = case.f32_bits("absmax");
            if bits(v) != r {
                errs.push(format!("{name}: absmax differs"));
            }
            Absmax::F32(r.into_iter().map(f32::from_bits).collect())
        }
        (Absmax::Double(d), true) => {
            let codes = case.u8s("absmax");
            let nested = case.f32_bits("nested_absmax");
            let offset = case.f32_bits("offset");
            if d.codes != codes {
                let n = d.codes.iter().zip(&codes).filter(|(a, b)| a != b).count();
                errs.push(format!("{name}: absmax codes differ in {n} of {}", codes.len()));
            }
            if bits(&d.nested_absmax) != nested {
                errs.push(format!("{name}: nested_absmax differs"));
            }
            if vec![d.offset.to_bits()] != offset {
                errs.push(format!("{name}: offset {} != {}", d.offset, f32::from_bits(offset[0])));
            }
            let nested_bs: usize = case.meta("nested_blocksize").parse().unwrap();
            assert_eq!(d.nested_blocksize, nested_bs, "{name}: nested_blocksize");
            assert_eq!(nested_bs, NESTED_BLOCKSIZE);
            Absmax::Double(DoubleQuant {
                codes,
                offset: f32::from_bits(offset[0]),
                nested_absmax: nested.into_iter().map(f32::from_bits).collect(),
                nested_blocksize: nested_bs,
            })
        }
        _ => panic!("{name}: absmax kind does not match double_quant={double_quant}"),
    };

    // Dequantization, both of our own result and of bnb's tensors as a checkpoint would hold them.
    let expected: Vec<u64> = T::from_raw(&case.raw("dequant", T::DTYPE)).into_iter().map(Bits::to_bits64).collect();
    let from_ref = Packed4bit { packed: ref_packed, absmax: ref_absmax, numel, blocksize, quant_type };
    for (label, packed) in [("ours", &q), ("reference", &from_ref)] {
        match dequantize_4bit::<T>(packed) {
            Ok(out) => {
                let got: Vec<u64> = out.into_iter().map(Bits::to_bits64).collect();
                if got != expected {
                    let n = got.iter().zip(&expected).filter(|(a, b)| a != b).count();
                    errs.push(format!("{name}: dequantize_4bit({label}) differs in {n} of {numel} values"));
                }
            }
            Err(e) => errs.push(format!("{name}: dequantize_4bit({label}) failed: {e}")),
        }
    }
    errs
}

#[test]
fn quant4_reference_cases() {
    let paths = cases(QUANT4_DIR);
    assert_eq!(paths.len(), 60, "expected the 60 quant4 reference cases in {QUANT4_DIR}");
    let mut errs = Vec::new();
    let mut seen = HashMap::<(String, String, String), usize>::new();
    for path in &paths {
        let case = Case::load(path);
        let dtype = case.meta("dtype").to_string();
        *seen.entry((case.meta("quant_type").into(), dtype.clone(), case.meta("double_quant").into())).or_default() +=
            1;
        errs.extend(match dtype.as_str() {
            "float32" => check_quant4::<f32>(&case),
            "float16" => check_quant4::<f16>(&case),
            "bfloat16" => check_quant4::<bf16>(&case),
            other => panic!("{}: dtype {other}", case.name),
        });
    }
    // Every (quant type, dtype, double quant) combination is covered.
    assert_eq!(seen.len(), 12, "{seen:?}");
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

#[test]
fn int8_reference_cases() {
    let paths = cases(INT8_DIR);
    assert_eq!(paths.len(), 4, "expected the 4 int8 reference cases in {INT8_DIR}");
    let mut errs = Vec::new();
    for path in &paths {
        let case = Case::load(path);
        let name = &case.name;
        let threshold: f32 = case.meta("threshold").parse().unwrap();
        let shape: Vec<usize> = serde_json::from_str(case.meta("shape")).unwrap();
        let [rows, cols] = shape[..] else { panic!("{name}: shape {shape:?}") };
        let input: Vec<f16> = case.u16s("input", Dtype::F16).into_iter().map(f16::from_bits).collect();
        let q = int8_vectorwise_quant(&input, rows, cols, threshold).unwrap();
        assert_eq!((q.rows, q.cols), (rows, cols));
        if q.cb != case.i8s("cb") {
            errs.push(format!("{name}: cb differs"));
        }
        if bits(&q.scb) != case.f32_bits("scb") {
            errs.push(format!("{name}: scb differs: {:?} vs {:?}", q.scb, case.f32s("scb")));
        }
        let expected: Vec<usize> = if case.has("outlier_cols") {
            case.i64s("outlier_cols").into_iter().map(|c| usize::try_from(c).unwrap()).collect()
        } else {
            Vec::new()
        };
        let got = q.outlier_cols.clone().unwrap_or_default();
        if got != expected {
            errs.push(format!("{name}: outlier_cols {got:?} != {expected:?}"));
        }
        // No threshold means no outlier list at all; a threshold always yields one.
        if (threshold > 0.0) != q.outlier_cols.is_some() {
            errs.push(format!("{name}: outlier_cols presence {:?} for threshold {threshold}", q.outlier_cols));
        }
    }
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

/// Every `int8.<module>` case of the SmolLM2 real-weights fixture: `int8_vectorwise_quant` of the
/// f16 input, and `Linear8bit::quantize` of the checkpoint weight in f32 and bf16 (what
/// transformers hands `Int8Params`, which quantizes its f16 copy), give bitsandbytes' codes and
/// row scales bit for bit. (Computing `127 / absmax` with one rounding instead of torch's
/// `reciprocal(absmax) * 127` flipped 44 of q_proj's 331,776 codes and 239 of gate_proj's 884,736.)
#[test]
fn int8_smollm2_weights_match_int8params() {
    use candle_core::{DType, Device, Tensor};
    use nibble_quant::linear::LinearStorage;
    use nibble_quant::{Linear8bit, QuantLinear};
    let case = Case::load(Path::new(SMOLLM2_WEIGHTS));
    let st = case.st();
    let mut modules: Vec<String> =
        st.names().iter().filter_map(|n| n.strip_prefix("int8.")?.strip_suffix(".cb").map(str::to_string)).collect();
    modules.sort();
    assert_eq!(modules, ["model.layers.0.mlp.gate_proj", "model.layers.0.self_attn.q_proj"]);
    let mut errs = Vec::new();
    for m in &modules {
        let (cb, scb) = (case.i8s(&format!("int8.{m}.cb")), case.f32_bits(&format!("int8.{m}.scb")));
        let shape = st.tensor(&format!("int8.{m}.input")).unwrap().shape().to_vec();
        let [rows, cols] = shape[..] else { panic!("{m}: shape {shape:?}") };
        let input: Vec<f16> =
            case.u16s(&format!("int8.{m}.input"), Dtype::F16).into_iter().map(f16::from_bits).collect();
        let q = int8_vectorwise_quant(&input, rows, cols, 0.0).unwrap();
        let flipped = q.cb.iter().zip(&cb).filter(|(a, b)| a != b).count();
        if flipped != 0 {
            errs.push(format!("{m} (f16 input): {flipped} codes differ"));
        }
        if bits(&q.scb) != scb {
            errs.push(format!("{m} (f16 input): scb differs"));
        }
        for (dt, st_dt) in [(DType::F32, Dtype::F32), (DType::BF16, Dtype::BF16)] {
            let name = format!("input.{m}.{}", if dt == DType::F32 { "float32" } else { "bfloat16" });
            let w = Tensor::from_raw_buffer(&case.raw(&name, st_dt), dt, &[rows, cols], &Device::Cpu).unwrap();
            let layer = Linear8bit::quantize(&w, 6.0, dt, &Device::Cpu).unwrap();
            let LinearStorage::Int8 { cb: got_cb, scb: got_scb } = layer.storage() else { panic!("{m}: not int8") };
            let flipped = got_cb.iter().zip(&cb).filter(|(a, b)| a != b).count();
            if got_cb.len() != cb.len() || flipped != 0 {
                errs.push(format!("{name}: {flipped} codes differ"));
            }
            if bits(got_scb) != scb {
                errs.push(format!("{name}: scb differs"));
            }
        }
    }
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}

/// Every `q4.*` case of the SmolLM2 real-weights fixture (layer-0 `q_proj` and `gate_proj`, cast
/// to f32 and bf16 as transformers casts them, NF4 and FP4, with and without double quant, block
/// size 64): `quantize_4bit` gives bitsandbytes 0.50.2's packed codes and absmax bit for bit, and
/// with double quant its absmax codes, nested absmax and offset (all compared as f32 bits, no
/// tolerance).
#[test]
fn quant4_smollm2_weights_match_quantize_4bit() {
    #[derive(serde::Deserialize)]
    struct Entry {
        case: String,
        input: Option<String>,
        dtype: String,
        quant_type: Option<String>,
        double_quant: Option<bool>,
        blocksize: Option<usize>,
        shape: Vec<usize>,
    }
    let case = Case::load(Path::new(SMOLLM2_WEIGHTS));
    let index: Vec<Entry> = serde_json::from_str(case.meta("index")).unwrap();
    let st = case.st();
    let mut errs = Vec::new();
    let mut seen = Vec::new();
    for e in index.iter().filter(|e| e.case.starts_with("q4.")) {
        let name = &e.case;
        let quant_type = match e.quant_type.as_deref() {
            Some("nf4") => QuantType::Nf4,
            Some("fp4") => QuantType::Fp4,
            other => panic!("{name}: quant_type {other:?}"),
        };
        let double_quant = e.double_quant.unwrap_or_else(|| panic!("{name}: double_quant missing"));
        let blocksize = e.blocksize.unwrap_or_else(|| panic!("{name}: blocksize missing"));
        let input_name = e.input.as_deref().unwrap_or_else(|| panic!("{name}: input missing"));
        let input_t = st.tensor(input_name).unwrap_or_else(|err| panic!("{name}: {input_name}: {err}"));
        assert_eq!(input_t.shape(), &e.shape[..], "{name}: shape of {input_name}");
        let q = match e.dtype.as_str() {
            "float32" => {
                quantize_4bit(&f32::from_raw(&case.raw(input_name, Dtype::F32)), blocksize, quant_type, double_quant)
            }
            "bfloat16" => {
                quantize_4bit(&bf16::from_raw(&case.raw(input_name, Dtype::BF16)), blocksize, quant_type, double_quant)
            }
            other => panic!("{name}: dtype {other}"),
        }
        .unwrap_or_else(|err| panic!("{name}: quantize_4bit failed: {err}"));
        let numel: usize = e.shape.iter().product();
        assert_eq!((q.numel, q.blocksize, q.quant_type), (numel, blocksize, quant_type), "{name}");

        let ref_packed = case.u8s(&format!("{name}.packed"));
        let n = q.packed.iter().zip(&ref_packed).filter(|(a, b)| a != b).count();
        if q.packed.len() != ref_packed.len() || n != 0 {
            errs.push(format!("{name}: packed differs in {n} of {} bytes", ref_packed.len()));
        }
        match (&q.absmax, double_quant) {
            (Absmax::F32(v), false) => {
                let r = case.f32_bits(&format!("{name}.absmax"));
                let n = bits(v).iter().zip(&r).filter(|(a, b)| a != b).count();
                if v.len() != r.len() || n != 0 {
                    errs.push(format!("{name}: absmax differs in {n} of {}", r.len()));
                }
            }
            (Absmax::Double(d), true) => {
                let codes = case.u8s(&format!("{name}.absmax"));
                let n = d.codes.iter().zip(&codes).filter(|(a, b)| a != b).count();
                if d.codes.len() != codes.len() || n != 0 {
                    errs.push(format!("{name}: absmax codes differ in {n} of {}", codes.len()));
                }
                let nested = case.f32_bits(&format!("{name}.nested_absmax"));
                if bits(&d.nested_absmax) != nested {
                    errs.push(format!("{name}: nested_absmax differs"));
                }
                let offset = case.f32_bits(&format!("{name}.offset"));
                if vec![d.offset.to_bits()] != offset {
                    let want: Vec<f32> = offset.iter().map(|&b| f32::from_bits(b)).collect();
                    errs.push(format!("{name}: offset {} != {want:?}", d.offset));
                }
                assert_eq!(d.nested_blocksize, NESTED_BLOCKSIZE, "{name}: nested_blocksize");
            }
            _ => panic!("{name}: absmax kind does not match double_quant={double_quant}"),
        }
        seen.push((e.dtype.clone(), quant_type, double_quant));
    }
    // 2 modules x {f32, bf16} x {NF4, FP4} x {plain, double quant}.
    assert_eq!(seen.len(), 16, "q4 cases: {seen:?}");
    seen.sort_by_key(|s| format!("{s:?}"));
    seen.dedup();
    assert_eq!(seen.len(), 8, "every (dtype, quant type, double quant) combination: {seen:?}");
    assert!(errs.is_empty(), "{} mismatches:\n{}", errs.len(), errs.join("\n"));
}
