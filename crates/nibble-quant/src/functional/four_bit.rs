//! NF4/FP4 blockwise quantization (`bitsandbytes.functional.quantize_4bit` / `dequantize_4bit`),
//! with optional double quantization of the absmax (`compress_statistics=True`).

use nibble_core::{Error, Result};
use rayon::prelude::*;

use super::blockwise8::{dequantize_blockwise_8bit, quantize_blockwise_8bit};
use super::codes::{self, Quant4Tables, QuantType};
use super::reduce::torch_mean_f32;
use super::{check_blocksize, dynamic_map, n_blocks, Element, MIN_ELEMS_PER_TASK};
use crate::kernels::quant::{self, Scale};
use crate::kernels::Isa;

/// The block size bitsandbytes uses to quantize the absmax under double quantization.
pub const NESTED_BLOCKSIZE: usize = 256;

/// bnb's `absmax.clamp(min=1e-38)` before taking a reciprocal: the Python float cast to f32 (a
/// subnormal). It keeps all-zero blocks at 0 * 1e38 = 0 instead of 0 * inf = NaN.
const ABSMAX_FLOOR: f32 = 1e-38_f64 as f32;

/// The absmax of a double-quantized tensor: 8-bit codes of `absmax - offset` in blocks of
/// `nested_blocksize`, against [`dynamic_map`].
#[derive(Debug, Clone, PartialEq)]
pub struct DoubleQuant {
    /// One 8-bit code per 4-bit block (bnb's `quant_state.absmax`, uint8).
    pub codes: Vec<u8>,
    /// The mean of the f32 absmax, added back after dequantization (`quant_state.offset`).
    pub offset: f32,
    /// Per nested block, the absmax of `absmax - offset` (`quant_state.state2.absmax`).
    pub nested_absmax: Vec<f32>,
    /// Values per nested block; bitsandbytes always uses [`NESTED_BLOCKSIZE`].
    pub nested_blocksize: usize,
}

impl DoubleQuant {
    /// The dequantized absmax, as bnb computes it: `dequantize_blockwise(codes) + offset`, i.e.
    /// `dynamic_map[c] * nested_absmax[i / nested_blocksize]`, then `+ offset`, both in f32.
    ///
    /// Errors when `nested_blocksize` is not a valid block size or `nested_absmax` has the wrong
    /// length for `codes`.
    pub fn dequantize(&self) -> Result<Vec<f32>> {
        check_blocksize("nested_blocksize", self.nested_blocksize)
            .map_err(|e| Error::quant_state("absmax", e.to_string()))?;
        let expected = n_blocks(self.codes.len(), self.nested_blocksize);
        if self.nested_absmax.len() != expected {
            return Err(Error::quant_state(
                "nested_absmax",
                format!(
                    "has {} values, but {} absmax codes in nested blocks of {} need {expected}",
                    self.nested_absmax.len(),
                    self.codes.len(),
                    self.nested_blocksize
                ),
            ));
        }
        let mut v = dequantize_blockwise_8bit(&self.codes, &self.nested_absmax, dynamic_map(), self.nested_blocksize)?;
        for a in &mut v {
            *a += self.offset;
        }
        Ok(v)
    }
}

/// The per-block scales of a 4-bit tensor.
#[derive(Debug, Clone, PartialEq)]
pub enum Absmax {
    /// One f32 absmax per block.
    F32(Vec<f32>),
    /// Double-quantized (bnb `compress_statistics=True`).
    Double(DoubleQuant),
}

impl Absmax {
    /// The f32 absmax per block, exactly as bnb dequantizes it. Never fails: where a
    /// [`DoubleQuant`] is inconsistent (a code without its nested absmax), that block's value is
    /// NaN. Use [`Absmax::try_to_f32`] to get an error instead.
    pub fn to_f32(&self) -> Vec<f32> {
        match self {
            Absmax::F32(v) => v.clone(),
            Absmax::Double(d) => {
                let code = dynamic_map();
                d.codes
                    .iter()
                    .enumerate()
                    .map(|(i, &c)| {
                        let nested = i.checked_div(d.nested_blocksize).and_then(|b| d.nested_absmax.get(b));
                        match nested {
                            Some(&s) => code[usize::from(c)] * s + d.offset,
                            None => f32::NAN,
                        }
                    })
                    .collect()
            }
        }
    }

    /// The f32 absmax per block, or an error if a [`DoubleQuant`] is inconsistent.
    pub fn try_to_f32(&self) -> Result<Vec<f32>> {
        match self {
            Absmax::F32(v) => Ok(v.clone()),
            Absmax::Double(d) => d.dequantize(),
        }
    }

    /// The number of 4-bit blocks these scales cover.
    pub fn n_blocks(&self) -> usize {
        match self {
            Absmax::F32(v) => v.len(),
            Absmax::Double(d) => d.codes.len(),
        }
    }
}

/// A 4-bit quantized tensor in the bitsandbytes layout.
#[derive(Debug, Clone, PartialEq)]
pub struct Packed4bit {
    /// Two codes per byte, the first element in the high nibble; `ceil(numel / 2)` bytes.
    pub packed: Vec<u8>,
    /// Per-block scales, `ceil(numel / blocksize)` of them.
    pub absmax: Absmax,
    /// The number of quantized values (the product of the original shape).
    pub numel: usize,
    /// Values per block (a power of two from 32 to 4096).
    pub blocksize: usize,
    /// NF4 or FP4.
    pub quant_type: QuantType,
}

impl Packed4bit {
    /// Checks that the sizes agree with each other: a valid block size, `ceil(numel / 2)` packed
    /// bytes and `ceil(numel / blocksize)` absmax entries.
    pub fn validate(&self) -> Result<()> {
        check_blocksize("blocksize", self.blocksize).map_err(|e| Error::quant_state("packed", e.to_string()))?;
        let bytes = self.numel.div_ceil(2);
        if self.packed.len() != bytes {
            return Err(Error::quant_state(
                "packed",
                format!("has {} bytes, but {} 4-bit values need {bytes}", self.packed.len(), self.numel),
            ));
        }
        let blocks = n_blocks(self.numel, self.blocksize);
        if self.absmax.n_blocks() != blocks {
            return Err(Error::quant_state(
                "absmax",
                format!(
                    "has {} blocks, but {} values in blocks of {} need {blocks}",
                    self.absmax.n_blocks(),
                    self.numel,
                    self.blocksize
                ),
            ));
        }
        Ok(())
    }

    /// The number of blocks, `ceil(numel / blocksize)`.
    pub fn n_blocks(&self) -> usize {
        self.numel.div_ceil(self.blocksize.max(1))
    }
}

/// Quantizes `input` (the weight flattened row-major) to NF4 or FP4 in blocks of `blocksize`,
/// bit-exact with `bitsandbytes.functional.quantize_4bit` on CPU; with `double_quant` the absmax
/// is itself quantized as with `compress_statistics=True`. See the [module docs](super) for the
/// exact arithmetic.
///
/// Errors: `blocksize` not a power of two in 32..=4096, or an empty `input`.
pub fn quantize_4bit<T: Element>(
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Packed4bit> {
    quantize_4bit_impl(Isa::detect(), input, blocksize, quant_type, double_quant)
}

/// [`quantize_4bit`] on the kernels of `isa` (already checked to be supported).
pub(crate) fn quantize_4bit_impl<T: Element>(
    isa: Isa,
    input: &[T],
    blocksize: usize,
    quant_type: QuantType,
    double_quant: bool,
) -> Result<Packed4bit> {
    check_blocksize("blocksize", blocksize)?;
    if input.is_empty() {
        return Err(Error::invalid_argument("input", "is empty; there is nothing to quantize"));
    }
    let tables = codes::tables(quant_type);
    let numel = input.len();
    let mut packed = vec![0u8; numel.div_ceil(2)];
    let mut absmax = vec![0.0f32; n_blocks(numel, blocksize)];
    // Blocks are even-sized, so block b owns exactly bytes [b * bs/2, (b+1) * bs/2) of `packed`.
    packed
        .par_chunks_mut(blocksize / 2)
        .zip(input.par_chunks(blocksize))
        .zip(absmax.par_iter_mut())
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(blocksize))
        .for_each(|((p, x), am)| *am = quantize_block(isa, x, p, x.len() == blocksize, tables));

    let absmax = if double_quant { Absmax::Double(double_quantize(&absmax)?) } else { Absmax::F32(absmax) };
    Ok(Packed4bit { packed, absmax, numel, blocksize, quant_type })
}

/// Quantizes one block into its packed bytes and returns the absmax to store.
///
/// bnb treats full blocks and the trailing partial block differently: full blocks multiply by
/// the reciprocal of the clamped absmax and store the unclamped absmax; the partial block divides
/// by the clamped absmax and stores it clamped.
#[inline]
fn quantize_block<T: Element>(isa: Isa, x: &[T], p: &mut [u8], full: bool, t: &Quant4Tables) -> f32 {
    let (mut absmax, nan) = quant::abs_max(isa, x);
    if nan {
        // torch's max propagates NaN (f32::max would skip it).
        absmax = f32::NAN;
    }
    // `clamp(min=1e-38)`, written so that NaN passes through as in torch.
    let floored = if absmax < ABSMAX_FLOOR { ABSMAX_FLOOR } else { absmax };
    if full {
        encode_block(isa, x, p, t, Scale::Mul(1.0 / floored));
        absmax
    } else {
        encode_block(isa, x, p, t, Scale::Div(floored));
        floored
    }
}

/// The vectorized kernels encode whole 32-value groups; the rest (and an odd last value) here.
#[inline]
fn encode_block<T: Element>(isa: Isa, x: &[T], p: &mut [u8], t: &Quant4Tables, scale: Scale) {
    let done = quant::encode_4bit(isa, x, scale, t, p);
    let (x, p) = (&x[done..], &mut p[done / 2..]);
    let mut pairs = x.chunks_exact(2);
    for (byte, pair) in p.iter_mut().zip(&mut pairs) {
        let hi = t.encode(scale.apply(pair[0].to_f32()));
        let lo = t.encode(scale.apply(pair[1].to_f32()));
        *byte = (hi << 4) | lo;
    }
    // An odd element count: bnb pads the scaled values with 0.0, so the low nibble is 0.0's code.
    if let ([last], Some(byte)) = (pairs.remainder(), p.last_mut()) {
        *byte = (t.encode(scale.apply(last.to_f32())) << 4) | t.zero_code;
    }
}

/// bnb's `compress_statistics`: `offset = absmax.mean()`, then 8-bit blockwise quantization of
/// `absmax - offset` with the dynamic map in blocks of 256.
fn double_quantize(absmax: &[f32]) -> Result<DoubleQuant> {
    let offset = torch_mean_f32(absmax);
    let shifted: Vec<f32> = absmax.iter().map(|&a| a - offset).collect();
    let (codes, nested_absmax) = quantize_blockwise_8bit(&shifted, dynamic_map(), NESTED_BLOCKSIZE)?;
    Ok(DoubleQuant { codes, offset, nested_absmax, nested_blocksize: NESTED_BLOCKSIZE })
}

/// Dequantizes `q` into a new vector of `q.numel` values, bit-exact with bnb's
/// `dequantize_4bit` on CPU for output dtype `T`.
///
/// Errors when `q`'s sizes are inconsistent ([`Packed4bit::validate`], [`Absmax::try_to_f32`]).
pub fn dequantize_4bit<T: Element>(q: &Packed4bit) -> Result<Vec<T>> {
    // Validate before allocating `numel` values from untrusted sizes.
    q.validate()?;
    let absmax = q.absmax.try_to_f32()?;
    let mut out = vec![T::from_f32(0.0); q.numel];
    dequantize_4bit_into(q, &absmax, &mut out)?;
    Ok(out)
}

/// Dequantizes `q` into `out` (exactly `q.numel` values) using `absmax`, the already dequantized
/// per-block scales ([`Absmax::to_f32`]), so that callers can keep both buffers across calls.
///
/// Each value is `code[nibble] * absmax[block]` in f32, rounded once to `T`. bnb's native CPU
/// kernel (used whenever the last dimension is even) writes -0.0 for FP4 code 8; its fallback for
/// odd last dimensions writes +0.0. Only `numel` is known here, so an odd `numel` (which implies
/// an odd last dimension) gets +0.0 and an even one -0.0; the two compare equal.
///
/// Errors when `q`'s sizes are inconsistent, `absmax` does not have one value per block, or
/// `out.len() != q.numel`.
pub fn dequantize_4bit_into<T: Element>(q: &Packed4bit, absmax: &[f32], out: &mut [T]) -> Result<()> {
    q.validate()?;
    let blocks = n_blocks(q.numel, q.blocksize);
    if absmax.len() != blocks {
        return Err(Error::invalid_argument(
            "absmax",
            format!("has {} values, but the tensor has {blocks} blocks", absmax.len()),
        ));
    }
    if out.len() != q.numel {
        return Err(Error::invalid_argument(
            "out",
            format!("has room for {} values, but the tensor has {}", out.len(), q.numel),
        ));
    }
    let t = codes::tables(q.quant_type);
    let lut = if q.numel % 2 == 1 { &t.code } else { &t.dequant_native };
    out.par_chunks_mut(q.blocksize)
        .zip(q.packed.par_chunks(q.blocksize / 2))
        .zip(absmax.par_iter())
        .with_min_len(MIN_ELEMS_PER_TASK.div_ceil(q.blocksize))
        .for_each(|((o, p), &scale)| dequantize_block(o, p, scale, lut));
    Ok(())
}

#[inline]
fn dequantize_block<T: Element>(o: &mut [T], p: &[u8], scale: f32, lut: &[f32; 16]) {
    // The 16 possible outputs of this block; each is computed exactly as bnb computes it per
    // element, so the table changes nothing but the cost.
    let table: [T; 16] = std::array::from_fn(|k| T::from_f32(lut[k] * scale));
    let mut pairs = o.chunks_exact_mut(2);
    for (pair, &b) in (&mut pairs).zip(p) {
        pair[0] = table[usize::from(b >> 4)];
        pair[1] = table[usize::from(b & 0x0f)];
    }
    if let ([last], Some(&b)) = (pairs.into_remainder(), p.last()) {
        *last = table[usize::from(b >> 4)];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use half::{bf16, f16};

    fn sample(n: usize) -> Vec<f32> {
        (0..n).map(|i| ((i as f32) * 0.731).sin() * (1.0 + (i % 7) as f32)).collect()
    }

    #[test]
    fn bad_blocksizes() {
        let x = sample(100);
        for bs in [0, 1, 16, 48, 100, 8192, usize::MAX] {
            let e = quantize_4bit(&x, bs, QuantType::Nf4, false).unwrap_err();
            assert!(matches!(e, Error::InvalidArgument { .. }), "{bs}: {e}");
        }
        let mut q = quantize_4bit(&x, 64, QuantType::Nf4, false).unwrap();
        q.blocksize = 0;
        assert!(dequantize_4bit::<f32>(&q).is_err());
        q.blocksize = 96;
        assert!(dequantize_4bit::<f32>(&q).is_err());
    }

    #[test]
    fn empty_input() {
        assert!(quantize_4bit::<f32>(&[], 64, QuantType::Fp4, false).is_err());
    }

    #[test]
    fn length_mismatches() {
        let x = sample(300);
        let q = quantize_4bit(&x, 64, QuantType::Nf4, false).unwrap();
        let am = q.absmax.to_f32();

        let mut short = q.clone();
        short.packed.pop();
        assert!(matches!(dequantize_4bit::<f32>(&short), Err(Error::QuantState { .. })));

        let mut huge = q.clone();
        huge.numel = usize::MAX;
        assert!(dequantize_4bit::<f32>(&huge).is_err());

        let mut fewer = q.clone();
        fewer.absmax = Absmax::F32(am[1..].to_vec());
        assert!(dequantize_4bit::<f32>(&fewer).is_err());

        let mut out = vec![0.0f32; 299];
        assert!(dequantize_4bit_into(&q, &am, &mut out).is_err());
        let mut out = vec![0.0f32; 300];
        assert!(dequantize_4bit_into(&q, &am[..4], &mut out).is_err());
        dequantize_4bit_into(&q, &am, &mut out).unwrap();
        assert_eq!(out, dequantize_4bit::<f32>(&q).unwrap());
    }

    #[test]
    fn inconsistent_double_quant() {
        let x = sample(64 * 300);
        let q = quantize_4bit(&x, 64, QuantType::Nf4, true).unwrap();
        let Absmax::Double(d) = &q.absmax else { panic!("expected double quant") };
        assert_eq!(d.nested_absmax.len(), 2);
        assert_eq!(d.nested_blocksize, NESTED_BLOCKSIZE);
        assert_eq!(q.absmax.to_f32(), q.absmax.try_to_f32().unwrap());

        let mut missing = d.clone();
        missing.nested_absmax.pop();
        assert!(missing.dequantize().is_err());
        let partial = Absmax::Double(missing).to_f32();
        assert_eq!(partial.len(), 300);
        assert!(partial[..256].iter().all(|v| v.is_finite()));
        assert!(partial[256..].iter().all(|v| v.is_nan()));

        let mut zero = d.clone();
        zero.nested_blocksize = 0;
        assert!(zero.dequantize().is_err());
        assert!(Absmax::Double(zero).to_f32().iter().all(|v| v.is_nan()));
    }

    #[test]
    fn odd_lengths_round_trip() {
        for n in [1usize, 7, 63, 65, 129, 301] {
            let x = sample(n);
            for qt in [QuantType::Nf4, QuantType::Fp4] {
                for dq in [false, true] {
                    let q = quantize_4bit(&x, 64, qt, dq).unwrap();
                    assert_eq!(q.packed.len(), n.div_ceil(2));
                    assert_eq!(q.absmax.n_blocks(), n.div_ceil(64));
                    if n % 2 == 1 {
                        let pad = q.packed[n / 2] & 0x0f;
                        assert_eq!(pad, if qt == QuantType::Nf4 { 7 } else { 0 });
                    }
                    let y: Vec<f32> = dequantize_4bit(&q).unwrap();
                    assert_eq!(y.len(), n);
                    let am = q.absmax.to_f32();
                    for (i, (a, b)) in x.iter().zip(&y).enumerate() {
                        // Worst case is half the widest FP4 gap (1/3) of the block's absmax.
                        let tol = am[i / 64] * 0.17 + 1e-3;
                        assert!((a - b).abs() <= tol, "n={n} {qt:?} dq={dq} i={i}: {a} vs {b}");
                    }
                }
            }
        }
    }

    #[test]
    fn half_types() {
        let x: Vec<f16> = sample(130).into_iter().map(f16::from_f32).collect();
        let q = quantize_4bit(&x, 32, QuantType::Nf4, false).unwrap();
        let y: Vec<f16> = dequantize_4bit(&q).unwrap();
        assert_eq!(y.len(), 130);
        let xb: Vec<bf16> = sample(130).into_iter().map(bf16::from_f32).collect();
        let qb = quantize_4bit(&xb, 32, QuantType::Fp4, true).unwrap();
        let yb: Vec<bf16> = dequantize_4bit(&qb).unwrap();
        assert_eq!(yb.len(), 130);
    }

    #[test]
    fn zero_blocks() {
        // A full zero block stores absmax 0; a partial zero block stores the 1e-38 floor, as bnb.
        let mut x = sample(64 * 2 + 10);
        x[64..128].fill(0.0);
        x[128..].fill(0.0);
        let q = quantize_4bit(&x, 64, QuantType::Nf4, false).unwrap();
        let am = q.absmax.to_f32();
        assert_eq!(am[1], 0.0);
        assert_eq!(am[2], ABSMAX_FLOOR);
        assert!(q.packed[32..].iter().all(|&b| b == 0x77));
        let y: Vec<f32> = dequantize_4bit(&q).unwrap();
        assert!(y[64..].iter().all(|&v| v == 0.0));

        let qf = quantize_4bit(&x, 64, QuantType::Fp4, false).unwrap();
        assert!(qf.packed[32..].iter().all(|&b| b == 0x00));
    }

    #[test]
    fn nan_block() {
        let mut x = sample(128);
        x[3] = f32::NAN;
        let q = quantize_4bit(&x, 64, QuantType::Nf4, false).unwrap();
        let am = q.absmax.to_f32();
        assert!(am[0].is_nan());
        assert!(am[1].is_finite());
        // bucketize puts NaN past the last midpoint: code 15 for the whole NaN block.
        assert!(q.packed[..32].iter().all(|&b| b == 0xff));
    }
}
