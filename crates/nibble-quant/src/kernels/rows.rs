//! Products over rows held in a model dtype (f32, or bf16 / f16 bit patterns), read without
//! widening them to an f32 copy first: the attention of a decode step over its KV cache.

use half::{bf16, f16};

use super::dense::dot_widened;
use super::Isa;

/// Values held in a model dtype: f32 values, or the bit patterns of bf16 or f16 ones.
#[derive(Debug, Clone, Copy)]
pub enum Rows<'a> {
    /// f32 values.
    F32(&'a [f32]),
    /// bfloat16 bit patterns.
    Bf16(&'a [u16]),
    /// IEEE half bit patterns.
    F16(&'a [u16]),
}

impl<'a> Rows<'a> {
    /// How many values.
    pub fn len(&self) -> usize {
        match self {
            Rows::F32(v) => v.len(),
            Rows::Bf16(v) | Rows::F16(v) => v.len(),
        }
    }

    /// Whether there are no values.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start .. start + n` (fewer where that runs past the end).
    pub fn slice(&self, start: usize, n: usize) -> Rows<'a> {
        fn cut<T>(v: &[T], start: usize, n: usize) -> &[T] {
            let s = start.min(v.len());
            &v[s..s + n.min(v.len() - s)]
        }
        match *self {
            Rows::F32(v) => Rows::F32(cut(v, start, n)),
            Rows::Bf16(v) => Rows::Bf16(cut(v, start, n)),
            Rows::F16(v) => Rows::F16(cut(v, start, n)),
        }
    }

    /// `sum self[i] x[i]` over the common length, each value widened exactly, in f32.
    pub fn dot(&self, x: &[f32]) -> f32 {
        let isa = Isa::detect();
        match *self {
            Rows::F32(v) => super::four_bit::dot(isa, v, x),
            #[cfg(target_arch = "x86_64")]
            // SAFETY: `Isa::detect` returns only supported sets (avx2+fma+f16c detected); the
            // kernel reads `v.len().min(x.len())` values of both.
            Rows::Bf16(v) if isa.avx2() => unsafe { super::avx2::dot_16bit::<false>(v.as_ptr(), x, v.len()) },
            #[cfg(target_arch = "x86_64")]
            // SAFETY: as above.
            Rows::F16(v) if isa.avx2() => unsafe { super::avx2::dot_16bit::<true>(v.as_ptr(), x, v.len()) },
            Rows::Bf16(v) => dot_widened(v, x, |b| bf16::from_bits(b).to_f32()),
            Rows::F16(v) => dot_widened(v, x, |b| f16::from_bits(b).to_f32()),
        }
    }

    /// `y[i] += a * self[i]` over the common length (one fused multiply-add per value where the
    /// CPU has FMA, else a product and a sum).
    pub fn axpy(&self, a: f32, y: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().avx2() {
            // SAFETY: `Isa::detect` returns only supported sets (avx2+fma+f16c detected); the
            // kernels read and write within the common length.
            unsafe {
                match *self {
                    Rows::F32(v) => super::avx2::axpy_f32(a, v, y),
                    Rows::Bf16(v) => super::avx2::axpy_16bit::<false>(a, v, y),
                    Rows::F16(v) => super::avx2::axpy_16bit::<true>(a, v, y),
                }
            }
            return;
        }
        match *self {
            Rows::F32(v) => y.iter_mut().zip(v).for_each(|(o, &w)| *o += a * w),
            Rows::Bf16(v) => y.iter_mut().zip(v).for_each(|(o, &w)| *o += a * bf16::from_bits(w).to_f32()),
            Rows::F16(v) => y.iter_mut().zip(v).for_each(|(o, &w)| *o += a * f16::from_bits(w).to_f32()),
        }
    }
}

impl Rows<'_> {
    /// `out[j] = self[j d .. (j + 1) d] . q` for every `j < out.len()`: the scores of a query
    /// against positions held `d` values apart. Each is [`Rows::dot`]'s sum, in its order; the
    /// loop over positions runs inside one kernel call instead of one call per position.
    pub fn dots(&self, d: usize, q: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().avx2() {
            // SAFETY: `Isa::detect` returns only supported sets (avx2+fma+f16c detected); the
            // kernels read within `self` and `q` and write within `out`.
            unsafe {
                match *self {
                    Rows::F32(v) => super::avx2::dots_f32(v, d, q, out),
                    Rows::Bf16(v) => super::avx2::dots_16bit::<false>(v, d, q, out),
                    Rows::F16(v) => super::avx2::dots_16bit::<true>(v, d, q, out),
                }
            }
            return;
        }
        for (j, o) in out.iter_mut().enumerate() {
            *o = self.slice(j * d, d).dot(q);
        }
    }

    /// `out = sum_j e[j] self[j d .. (j + 1) d]`, over `j` in order from zero, each term added
    /// as [`Rows::axpy`] adds it: the values of an attention head weighted by its scores. The
    /// sums stay in registers across positions instead of going through memory at each one.
    pub fn weighted_sum(&self, d: usize, e: &[f32], out: &mut [f32]) {
        #[cfg(target_arch = "x86_64")]
        if Isa::detect().avx2() {
            // SAFETY: as in [`Rows::dots`].
            unsafe {
                match *self {
                    Rows::F32(v) => super::avx2::weighted_sum(v, d, e, out, false),
                    Rows::Bf16(v) => super::avx2::weighted_sum(v, d, e, out, false),
                    Rows::F16(v) => super::avx2::weighted_sum(v, d, e, out, true),
                }
            }
            return;
        }
        out.fill(0.0);
        for (j, &a) in e.iter().enumerate() {
            self.slice(j * d, d).axpy(a, out);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every representation gives the f64 product within f32 rounding, and the same `axpy`.
    #[test]
    fn rows_match_their_definitions() {
        let n = 77;
        let vals: Vec<f32> = (0..n).map(|i| ((i * 37 % 19) as f32 - 9.0) * 0.125).collect();
        let x: Vec<f32> = (0..n).map(|i| ((i * 13 % 7) as f32 - 3.0) * 0.5).collect();
        let b: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
        let h: Vec<u16> = vals.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
        // The values are exact in bf16 and f16, and every product and sum is exact in f32.
        let want: f32 = vals.iter().zip(&x).map(|(a, b)| a * b).sum();
        for rows in [Rows::F32(&vals), Rows::Bf16(&b), Rows::F16(&h)] {
            assert_eq!(rows.len(), n);
            assert_eq!(rows.dot(&x), want, "{rows:?}");
            let mut y = x.clone();
            rows.axpy(2.0, &mut y);
            let expect: Vec<f32> = x.iter().zip(&vals).map(|(y, v)| y + 2.0 * v).collect();
            assert_eq!(y, expect);
            assert_eq!(rows.slice(70, 20).len(), 7);
            assert!(rows.slice(90, 2).is_empty());
        }
    }

    /// The batched score and weighted-sum loops give exactly what the per-position calls give,
    /// for head sizes on and off the 8- and 64-value steps.
    #[test]
    fn position_loops_equal_the_calls_they_replace() {
        for d in [3usize, 8, 24, 64, 72, 128] {
            let t = 13;
            let vals: Vec<f32> = (0..t * d).map(|i| ((i * 7919 % 1013) as f32 - 506.0) / 97.0).collect();
            let q: Vec<f32> = (0..d).map(|i| ((i * 31 % 17) as f32 - 8.0) / 3.0).collect();
            let e: Vec<f32> = (0..t).map(|j| 1.0 / (j as f32 + 1.7)).collect();
            let b: Vec<u16> = vals.iter().map(|&v| bf16::from_f32(v).to_bits()).collect();
            let h: Vec<u16> = vals.iter().map(|&v| f16::from_f32(v).to_bits()).collect();
            for rows in [Rows::F32(&vals), Rows::Bf16(&b), Rows::F16(&h)] {
                let mut got = vec![0.0f32; t];
                rows.dots(d, &q, &mut got);
                let want: Vec<f32> = (0..t).map(|j| rows.slice(j * d, d).dot(&q)).collect();
                assert_eq!(got, want, "dots d={d} {rows:?}");
                let mut got = vec![f32::NAN; d];
                rows.weighted_sum(d, &e, &mut got);
                let mut want = vec![0.0f32; d];
                for (j, &a) in e.iter().enumerate() {
                    rows.slice(j * d, d).axpy(a, &mut want);
                }
                assert_eq!(got, want, "weighted_sum d={d}");
            }
        }
    }
}
