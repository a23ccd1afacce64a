//! The counterpart of `bitsandbytes.functional`, bit-exact with bitsandbytes 0.50.2 on an x86-64
//! CPU (AVX2, no AVX-512): NF4/FP4 blockwise 4-bit quantization with optional double quantization
//! of the absmax, the 8-bit blockwise quantization that double quantization uses, and LLM.int8()
//! row-wise int8 quantization.
//!
//! "Bit-exact" was established against reference tensors written by bitsandbytes itself
//! (`tests/fixtures/`); where bitsandbytes' documentation and its CPU code paths disagree, the
//! functions here follow what the reference data shows:
//!
//! - **4-bit quantize** (bnb's pure-PyTorch `quantize_4bit`): per block `absmax = max |x|`; full
//!   blocks are scaled by the *reciprocal* `x * (1 / max(absmax, 1e-38))`, the trailing partial
//!   block by *division* `x / max(absmax, 1e-38)` (and stores that clamped absmax). The code is
//!   not an argmin: it is `torch.bucketize` against the 15 f32 midpoints of the sorted code book,
//!   so a value exactly on a midpoint takes the lower code. FP4 holds 0.0 twice (codes 0 and 8);
//!   its stable sort puts code 0 first, so tiny negatives get code 0 and tiny positives code 8.
//!   An odd element count pads the last low nibble with the code of 0.0 (7 for NF4, 0 for FP4).
//! - **All-zero blocks** get the code of 0.0 (0 times the clamped reciprocal is 0, never NaN); a
//!   full block stores absmax 0, the partial block the 1e-38 floor, as bnb's code does.
//! - **4-bit dequantize** (bnb's native CPU kernel): `(code[i] * absmax)` in f32, then one
//!   rounding to f16/bf16. The kernel's FP4 table holds -0.0 at code 8, so those values dequantize
//!   to -0.0.
//! - **Double quantization**: `offset` is `torch.mean` of the f32 absmax, whose summation order
//!   (an 8-lane, 4-way cascade) is reproduced exactly; the shifted absmax goes through bnb's native
//!   8-bit quantizer, which finds codes through a 65536-entry lookup table rather than an exact
//!   nearest-code search.
//! - **LLM.int8()**: `cb = round_half_even(x * (127 / row_absmax))` computed in f32.

mod blockwise8;
mod codes;
mod element;
mod four_bit;
mod int8;
mod reduce;

pub use blockwise8::{dequantize_blockwise_8bit, quantize_blockwise_8bit};
pub use codes::{code_book, dynamic_map, QuantType};
pub(crate) use codes::{tables, Quant4Tables};
pub use element::Element;
pub(crate) use four_bit::quantize_4bit_impl;
pub(crate) use int8::int8_vectorwise_quant_impl;
pub use four_bit::{
    dequantize_4bit, dequantize_4bit_into, quantize_4bit, Absmax, DoubleQuant, Packed4bit, NESTED_BLOCKSIZE,
};
pub use int8::{int8_vectorwise_dequant, int8_vectorwise_quant, Int8Quantized, INV_127};

use nibble_core::{Error, Result};

/// The block sizes bitsandbytes accepts for 4-bit quantization (and that nibble accepts for the
/// 8-bit blockwise functions too).
pub const BLOCKSIZES: [usize; 8] = [32, 64, 128, 256, 512, 1024, 2048, 4096];

/// Rejects a block size bitsandbytes would reject, so later `n / blocksize` never divides by zero.
pub(crate) fn check_blocksize(name: &str, blocksize: usize) -> Result<()> {
    if BLOCKSIZES.contains(&blocksize) {
        Ok(())
    } else {
        Err(Error::invalid_argument(
            name,
            format!("{blocksize} is not a valid block size; use a power of two from 32 to 4096"),
        ))
    }
}

/// `ceil(n / blocksize)` for an already-validated (non-zero) block size.
pub(crate) fn n_blocks(n: usize, blocksize: usize) -> usize {
    n.div_ceil(blocksize)
}

/// Rayon work items are blocks; this many elements per task keeps scheduling overhead small for
/// the smallest block sizes without starving threads on mid-sized tensors.
pub(crate) const MIN_ELEMS_PER_TASK: usize = 16 * 1024;
