//! `torch.sum` / `torch.mean` of a contiguous f32 vector on CPU, in torch's exact summation order.
//!
//! Double quantization stores `offset = absmax.mean()`, and every dequantized absmax depends on its
//! last bit, so a plain left-to-right sum is not good enough. torch (aten/src/ATen/native/cpu/
//! SumKernel.cpp, `vectorized_inner_sum`) sums whole 8-lane AVX2 vectors with a 4-way ILP
//! "cascade" of partial sums, then adds the scalar tail and finally the 8 lanes in order. The
//! reference data matches this with 8 lanes (AVX2), not 16 (AVX-512) nor a sequential sum.
//!
//! torch only splits the reduction across threads from 32768 elements on; beyond that its result
//! depends on its thread count, and this single-thread order is what it computes with one thread.

/// Lanes of `Vectorized<float>` under AVX2.
const LANES: usize = 8;
/// torch's `ilp_factor`.
const ILP: usize = 4;
/// torch's `num_levels` of the cascade.
const LEVELS: usize = 4;

type Lanes = [f32; LANES];

/// torch's `utils::CeilLog2`.
fn ceil_log2(x: usize) -> usize {
    if x <= 2 {
        1
    } else {
        (usize::BITS - (x - 1).leading_zeros()) as usize
    }
}

#[inline(always)]
fn add_into(acc: &mut Lanes, v: &[f32]) {
    for (a, &b) in acc.iter_mut().zip(v) {
        *a += b;
    }
}

/// Adds a group of `ILP` vectors (`ILP * LANES` values) to `ILP` accumulators.
#[inline(always)]
fn add_group(acc: &mut [Lanes; ILP], group: &[f32]) {
    for (a, v) in acc.iter_mut().zip(group.chunks_exact(LANES)) {
        add_into(a, v);
    }
}

/// `multi_row_sum<Vectorized<float>, 4>`: groups of `ILP` vectors, summed per column through the
/// level cascade. `x.len()` is a multiple of `ILP * LANES`.
fn multi_row_sum(x: &[f32]) -> [Lanes; ILP] {
    let mut groups = x.chunks_exact(ILP * LANES);
    let rows = groups.len();
    let level_power = 4usize.max(ceil_log2(rows) / LEVELS);
    let level_step = 1usize << level_power;
    let level_mask = level_step - 1;
    let mut acc = [[[0.0f32; LANES]; ILP]; LEVELS];

    let mut i = 0usize;
    while i + level_step <= rows {
        for g in groups.by_ref().take(level_step) {
            add_group(&mut acc[0], g);
            i += 1;
        }
        for j in 1..LEVELS {
            // acc[j] += acc[j - 1]; acc[j - 1] = 0
            let (lower, upper) = acc.split_at_mut(j);
            if let (Some(lo), Some(up)) = (lower.last_mut(), upper.first_mut()) {
                for (u, l) in up.iter_mut().zip(lo.iter()) {
                    add_into(u, l);
                }
                *lo = [[0.0; LANES]; ILP];
            }
            if i & (level_mask << (j * level_power)) != 0 {
                break;
            }
        }
    }
    for g in groups {
        add_group(&mut acc[0], g);
    }
    let (first, rest) = acc.split_at_mut(1);
    for level in rest.iter() {
        for (f, l) in first[0].iter_mut().zip(level) {
            add_into(f, l);
        }
    }
    first[0]
}

/// `torch.sum` of a contiguous f32 vector (single-threaded order).
pub(crate) fn torch_sum_f32(x: &[f32]) -> f32 {
    let n_vec = x.len() / LANES;
    let vec_part = &x[..n_vec * LANES];

    // row_sum: ILP-wide groups through the cascade, leftover vectors into partial 0, then fold
    // partials 1..ILP into partial 0.
    let rows = n_vec / ILP;
    let mut partial = multi_row_sum(&vec_part[..rows * ILP * LANES]);
    for v in vec_part[rows * ILP * LANES..].chunks_exact(LANES) {
        add_into(&mut partial[0], v);
    }
    let (first, rest) = partial.split_at_mut(1);
    for p in rest.iter() {
        add_into(&mut first[0], p);
    }

    // The scalar tail first, then the lanes in order.
    let mut total = 0.0f32;
    for &v in &x[n_vec * LANES..] {
        total += v;
    }
    for &v in &partial[0] {
        total += v;
    }
    total
}

/// `torch.mean` of a contiguous f32 vector: the sum divided by the count in f32, as torch does
/// (`sum_out(...).div_(n)`). NaN for an empty slice, like torch.
pub(crate) fn torch_mean_f32(x: &[f32]) -> f32 {
    torch_sum_f32(x) / x.len() as f32
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_sums_are_exact() {
        assert_eq!(torch_sum_f32(&[]), 0.0);
        assert_eq!(torch_sum_f32(&[1.0, 2.0, 3.0]), 6.0);
        let v: Vec<f32> = (0..1000).map(|i| i as f32).collect();
        assert_eq!(torch_sum_f32(&v), 499_500.0);
        assert_eq!(torch_mean_f32(&[2.0, 4.0]), 3.0);
    }

    #[test]
    fn order_is_not_sequential() {
        // Left to right, 1e8 + 1 loses the 1 and the result is 1. torch keeps lane 1 apart from
        // lane 0 (where 1e8 and -1e8 cancel) and adds the tail first: 1 + 0 + 1 = 2.
        let mut v = vec![0.0f32; 33];
        v[0] = 1.0e8;
        v[1] = 1.0;
        v[8] = -1.0e8;
        v[32] = 1.0;
        assert_eq!(torch_sum_f32(&v), 2.0);
    }

    #[test]
    fn ceil_log2_matches_torch() {
        assert_eq!(ceil_log2(0), 1);
        assert_eq!(ceil_log2(2), 1);
        assert_eq!(ceil_log2(3), 2);
        assert_eq!(ceil_log2(4), 2);
        assert_eq!(ceil_log2(5), 3);
        assert_eq!(ceil_log2(1 << 20), 20);
    }
}
