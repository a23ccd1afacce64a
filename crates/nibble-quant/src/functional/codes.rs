//! Code books: the 16-entry NF4 and FP4 tables and the 256-entry signed dynamic 8-bit map, each
//! computed the way bitsandbytes computes it in f32 so that they match bit for bit.

use std::sync::OnceLock;

/// The 4-bit data type: NormalFloat4 or bitsandbytes' FP4 (1 sign, 2 exponent, 1 mantissa bit).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum QuantType {
    /// NormalFloat4 (QLoRA): 16 quantiles of N(0, 1), normalized to [-1, 1].
    Nf4,
    /// bitsandbytes FP4, normalized to [-1, 1].
    Fp4,
}

/// NF4 as `get_4bit_type("nf4")` lists it. Kept as f64 so that `as f32` reproduces torch's
/// decimal -> double -> float conversion instead of Rust's direct decimal -> float parse.
const NF4_F64: [f64; 16] = [
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
];

/// FP4 before normalization, in bit-pattern order. bnb writes entry 8 as the Python int `-0`,
/// which is +0, so the code book holds +0.0 twice.
const FP4_RAW: [f32; 16] =
    [0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0, 0.0, -0.0625, -8.0, -12.0, -4.0, -6.0, -2.0, -3.0];

/// The 16-entry code book of `q`, equal bit for bit to bitsandbytes' `get_4bit_type(q)` (the
/// `quant_map` of a quant state). Index = 4-bit code.
pub fn code_book(q: QuantType) -> &'static [f32; 16] {
    &tables(q).code
}

/// bitsandbytes' `create_dynamic_map(signed=True)`: the 256-entry signed dynamic 8-bit code book
/// (sorted ascending) used for double quantization, computed once.
pub fn dynamic_map() -> &'static [f32; 256] {
    static MAP: OnceLock<[f32; 256]> = OnceLock::new();
    MAP.get_or_init(create_dynamic_map)
}

/// Everything the 4-bit kernels need about one quant type, derived once from its code book.
#[derive(Debug)]
pub(crate) struct Quant4Tables {
    /// `get_4bit_type` values (what bnb stores as `quant_map`).
    pub code: [f32; 16],
    /// Midpoints between consecutive sorted codes, in f32 as bnb's `(a + b) / 2`.
    pub bounds: [f32; 15],
    /// Sorted position -> 4-bit code (a stable argsort of `code`).
    pub order: [u8; 16],
    /// The code that 0.0 maps to; bnb pads an odd element count with it.
    pub zero_code: u8,
    /// The table bnb's native CPU dequantization kernel uses: `code`, except FP4 code 8 is -0.0.
    pub dequant_native: [f32; 16],
}

pub(crate) fn tables(q: QuantType) -> &'static Quant4Tables {
    static NF4: OnceLock<Quant4Tables> = OnceLock::new();
    static FP4: OnceLock<Quant4Tables> = OnceLock::new();
    match q {
        QuantType::Nf4 => NF4.get_or_init(|| build_tables(QuantType::Nf4)),
        QuantType::Fp4 => FP4.get_or_init(|| build_tables(QuantType::Fp4)),
    }
}

fn build_tables(q: QuantType) -> Quant4Tables {
    let raw: [f32; 16] = match q {
        QuantType::Nf4 => NF4_F64.map(|v| v as f32),
        QuantType::Fp4 => FP4_RAW,
    };
    // `data.div_(data.abs().max())`, in f32 like torch.
    let max = raw.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let code = raw.map(|v| v / max);

    // Stable argsort: for FP4's two zeros, code 0 sorts before code 8, which is what makes tiny
    // negative values quantize to 0 and tiny positive ones to 8 in bnb.
    let mut order_idx: [usize; 16] = std::array::from_fn(|i| i);
    order_idx.sort_by(|&a, &b| code[a].total_cmp(&code[b]).then(a.cmp(&b)));
    // total_cmp would order -0.0 before +0.0; both zeros are +0.0 here, so it equals torch's order.
    let order = order_idx.map(|i| i as u8);
    let bounds: [f32; 15] = std::array::from_fn(|i| (code[order_idx[i]] + code[order_idx[i + 1]]) / 2.0);

    let mut t = Quant4Tables { code, bounds, order, zero_code: 0, dequant_native: code };
    t.zero_code = t.encode(0.0);
    if q == QuantType::Fp4 {
        // csrc/cpu_ops.cpp `fp4_lut` spells entry 8 as `-0.0f`.
        t.dequant_native[8] = -0.0;
    }
    t
}

impl Quant4Tables {
    /// The 4-bit code of an already scaled value: `torch.bucketize(s, bounds)` (the number of
    /// midpoints `b` with `!(b >= s)`, so NaN lands past the last one), mapped back through
    /// `order`. Branch-free so the compiler can vectorize the 15 comparisons.
    #[inline(always)]
    pub fn encode(&self, s: f32) -> u8 {
        let s = s.clamp(-1.0, 1.0);
        let mut ge = 0u8;
        for &b in &self.bounds {
            ge += u8::from(b >= s);
        }
        // 15 - ge <= 15 always, and `order` has 16 entries.
        self.order[usize::from(15 - ge) & 15]
    }
}

/// `create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8)`.
fn create_dynamic_map() -> [f32; 256] {
    // `10 ** (-(7 - 1) + i)` as Python evaluates it (a double), then cast to f32 by the multiply.
    const SCALES: [f64; 7] = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1, 1.0];
    let mut data: Vec<f32> = Vec::with_capacity(256);
    for (i, &scale) in SCALES.iter().enumerate() {
        let fraction_items = (1usize << i) + 1;
        let boundaries = linspace_f32(0.1f64 as f32, 1.0, fraction_items);
        let s = scale as f32;
        for w in boundaries.windows(2) {
            let mean = (w[0] + w[1]) / 2.0;
            data.push(s * mean);
            data.push(-s * mean);
        }
    }
    data.push(0.0);
    data.push(1.0);
    data.sort_by(f32::total_cmp);
    let mut out = [0.0f32; 256];
    // Exactly 2 * 127 + 2 = 256 values; zip guards the length anyway.
    for (o, v) in out.iter_mut().zip(data) {
        *o = v;
    }
    out
}

/// `torch.linspace(start, end, steps, dtype=float32)` on CPU. torch evaluates the first half
/// forward from `start` and the second half backward from `end`, and its compiled kernel fuses
/// `start + step * i` into one FMA; the reference map only matches with both.
fn linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|idx| {
            if idx < halfway {
                step.mul_add(idx as f32, start)
            } else {
                (-step).mul_add((steps - idx - 1) as f32, end)
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nf4_is_sorted_identity_order() {
        let t = tables(QuantType::Nf4);
        assert_eq!(t.order, std::array::from_fn(|i| i as u8));
        assert_eq!(t.zero_code, 7);
        assert_eq!(t.dequant_native, t.code);
    }

    #[test]
    fn fp4_zeros() {
        let t = tables(QuantType::Fp4);
        assert_eq!(t.zero_code, 0);
        assert_eq!(t.code[8].to_bits(), 0);
        assert_eq!(t.dequant_native[8].to_bits(), (-0.0f32).to_bits());
        // Tiny negatives take code 0, tiny positives code 8, as bnb does.
        assert_eq!(t.encode(-1e-4), 0);
        assert_eq!(t.encode(1e-4), 8);
        assert_eq!(t.encode(1.0), 3);
        assert_eq!(t.encode(-1.0), 11);
    }

    #[test]
    fn midpoint_goes_to_lower_code() {
        let t = tables(QuantType::Nf4);
        for (i, &b) in t.bounds.iter().enumerate() {
            assert_eq!(usize::from(t.encode(b)), i);
            assert_eq!(usize::from(t.encode(b + f32::EPSILON)), i + 1);
        }
    }

    #[test]
    fn nan_and_out_of_range() {
        let t = tables(QuantType::Nf4);
        assert_eq!(t.encode(f32::NAN), 15);
        assert_eq!(t.encode(7.0), 15);
        assert_eq!(t.encode(-7.0), 0);
    }

    #[test]
    fn dynamic_map_shape() {
        let m = dynamic_map();
        assert!(m.windows(2).all(|w| w[0] < w[1]));
        assert_eq!(m[255], 1.0);
        assert!(m.contains(&0.0));
    }
}
