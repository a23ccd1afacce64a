//! The float types quantization reads and dequantization writes.

use half::{bf16, f16};

/// A float type the quantizers accept and the dequantizers produce: `f32`, `half::f16` or
/// `half::bf16`. All arithmetic happens in f32, as bitsandbytes does; these conversions are the
/// only places precision changes.
pub trait Element: Copy + Send + Sync + 'static {
    /// Widens to f32 (exact for all three types).
    fn to_f32(self) -> f32;
    /// Narrows from f32, rounding to nearest-even as torch's `.to(dtype)` does.
    fn from_f32(v: f32) -> Self;
}

impl Element for f32 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        self
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        v
    }
}

impl Element for f16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        f16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        f16::from_f32(v)
    }
}

impl Element for bf16 {
    #[inline(always)]
    fn to_f32(self) -> f32 {
        bf16::to_f32(self)
    }
    #[inline(always)]
    fn from_f32(v: f32) -> Self {
        bf16::from_f32(v)
    }
}
